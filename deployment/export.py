"""Export global weights: safetensors + ONNX (+ int8 ONNX), checked against torch on real test
data."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from fedshield.deployment.artifacts import (
    EXPORT_JSON,
    ONNX,
    ONNX_DATA,
    ONNX_INT8,
    SAFETENSORS,
    build_loaded_model,
    sha256_file,
)
from fedshield.tasks import Split, Task
from safetensors.torch import save_file

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class ExportResult:
    """What an export wrote: files, their hashes, the parity check and the test accuracy."""
    out_dir: str
    task: str
    input_shape: tuple[int, ...]
    num_classes: int
    sha256: dict[str, str]           # artifact file name -> hex digest
    sizes: dict[str, int]            # artifact file name -> bytes
    parity: dict[str, float]         # max_abs_diff, argmax_agreement, examples, torch/onnx accuracy
    int8: dict[str, float] | None    # accuracy, argmax_agreement, size_fp32_bytes, size_int8_bytes
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    # min/max of the (preprocessed) evaluation inputs: serving warns on inputs far outside it,
    # e.g. raw 0-255 pixels sent to a model trained on normalised ones (None: older exports).
    input_range: dict[str, float] | None = None
    # Tasks whose model reads a fixed transform of images (ScatterNet): the served input is the
    # image, of ``pixel_shape`` in ``pixel_range``; the serving process applies the task's
    # registered transform (``pixel_transform`` says which) before the ONNX model. None: the
    # served input is the model's own input.
    pixel_shape: tuple[int, ...] | None = None
    pixel_range: dict[str, float] | None = None
    pixel_transform: str = ""

    @property
    def accuracy(self) -> float:
        """Test accuracy of the ONNX model that is served."""
        return self.parity["onnx_accuracy"]

    def to_dict(self) -> dict:
        """A JSON-able dict (export.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExportResult:
        """The result a ``to_dict`` wrote (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["input_shape"] = tuple(data["input_shape"])
        if data.get("pixel_shape") is not None:
            data["pixel_shape"] = tuple(data["pixel_shape"])
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> ExportResult:
        """The export.json of an export folder."""
        return cls.from_dict(json.loads((Path(folder) / EXPORT_JSON).read_text()))


def onnx_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; one intra-op thread is fastest for the small batches a server sees."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of ``x`` from an onnxruntime session, in batches."""
    parts = [session.run(None, {INPUT_NAME: x[i:i + batch_size]})[0] for i in range(0, len(x),
                                                                                    batch_size)]
    return np.concatenate(parts)


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of ``x`` from the torch model, in batches."""
    parts = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x),
                                                                                 batch_size)]
    return np.concatenate(parts)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Dynamo export with a dynamic batch axis; weights go to the ``.onnx.data`` sidecar."""
    batch = torch.export.Dim("batch", min=1)
    for name in ("torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=True,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: batch},), verbose=False)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Write a dynamically int8-quantised copy of the float32 ONNX model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_dynamic(str(prepared), str(int8_path), weight_type=QuantType.QInt8)


def export_model(task: Task, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                 metadata: Mapping[str, object] | None = None, quantize: bool = True,
                 test: Split | None = None) -> ExportResult:
    """Write safetensors, ONNX and (optionally) int8 ONNX to ``out_dir`` and measure them.

    Parity and accuracy use ``test`` (default: the task's test split). Returns the ExportResult,
    also written to ``out_dir/export.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_loaded_model(task, state_dict)
    clean_state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} | {"task": task.name,
                                                                    "model": task.model_name}
    save_file(clean_state, str(out / SAFETENSORS), metadata=meta)

    test = test if test is not None else task.load()[1]
    export_onnx(model, torch.from_numpy(test.x[:2]), out / ONNX)

    reference = torch_logits(model, test.x)
    served = onnx_logits(onnx_session(out / ONNX), test.x)
    parity = {
        "max_abs_diff": float(np.abs(reference - served).max()),
        "argmax_agreement": float((reference.argmax(1) == served.argmax(1)).mean()),
        "examples": int(len(test)),
        "torch_accuracy": float((reference.argmax(1) == test.y).mean()),
        "onnx_accuracy": float((served.argmax(1) == test.y).mean()),
    }
    int8 = None
    if quantize:
        quantize_int8(out / ONNX, out / ONNX_INT8)
        quantized = onnx_logits(onnx_session(out / ONNX_INT8), test.x)
        int8 = {
            "accuracy": float((quantized.argmax(1) == test.y).mean()),
            "argmax_agreement": float((quantized.argmax(1) == served.argmax(1)).mean()),
            "size_fp32_bytes": (out / ONNX).stat().st_size + (out / ONNX_DATA).stat().st_size,
            "size_int8_bytes": (out / ONNX_INT8).stat().st_size,
        }
    names = [SAFETENSORS, ONNX, ONNX_DATA] + ([ONNX_INT8] if quantize else [])
    pixel_range = None
    if task.pixel_module is not None and task.pixel_range is not None:
        pixel_range = {"min": float(task.pixel_range[0]), "max": float(task.pixel_range[1])}
    pixels = pixel_range is not None
    result = ExportResult(
        out_dir=str(out), task=task.name, input_shape=tuple(task.input_shape),
        num_classes=task.num_classes,
        sha256={n: sha256_file(out / n) for n in names},
        sizes={n: (out / n).stat().st_size for n in names},
        parity=parity, int8=int8, metadata=meta,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        input_range={"min": float(test.x.min()), "max": float(test.x.max())},
        pixel_shape=tuple(task.pixel_shape) if pixels else None,
        pixel_range=pixel_range,
        pixel_transform=task.preprocessing if pixels else "")
    (out / EXPORT_JSON).write_text(json.dumps(result.to_dict(), indent=2))
    return result
