"""Artifact files of an exported model: names, hashes, and loading weights back.

An export folder holds ``model.safetensors``, ``model.onnx`` (+ ``model.onnx.data``), optionally
``model.int8.onnx``, and ``export.json`` (what was exported, hashes, parity, sizes). The model card
and the drift reference sit beside them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fedshield.errors import FedShieldError

SAFETENSORS = "model.safetensors"
ONNX = "model.onnx"
ONNX_DATA = "model.onnx.data"
ONNX_INT8 = "model.int8.onnx"
EXPORT_JSON = "export.json"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
ATTRIBUTION_PNG = "attributions.png"
REFERENCE_JSON = "reference.json"
OPACUS_PREFIX = "_module."


class IntegrityError(FedShieldError):
    """An artifact's sha256 differs from the one recorded when it was exported and registered."""


class NotDeployable(FedShieldError):
    """The run must not reach the registry or production (it failed, or its guarantee is void)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def strip_prefix(state_dict: dict[str, torch.Tensor],
                 prefix: str = OPACUS_PREFIX) -> dict[str, torch.Tensor]:
    """Drop Opacus' ``_module.`` prefix (GradSampleModule) so keys match the plain model."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict with Opacus' prefix stripped."""
    return strip_prefix(load_file(str(path)))


def build_loaded_model(task, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The task's model with ``state_dict`` loaded strictly, in eval mode."""
    model = task.build_model()
    try:
        model.load_state_dict(strip_prefix(state_dict), strict=True)
    except RuntimeError as exc:
        raise FedShieldError(f"weights do not fit task {task.name!r}'s model: {exc}; "
                             f"check that the run folder was trained on that task") from None
    return model.eval()


def hash_folder(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its relative posix path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def hash_mismatches(folder: str | Path, expected: dict[str, str]) -> list[str]:
    """Problems (missing file, differing sha256) of ``folder``'s files against ``expected``."""
    folder = Path(folder)
    problems = []
    for name, digest in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing from {folder}")
        elif (actual := sha256_file(path)) != digest:
            problems.append(f"{name} sha256 {actual[:12]}... differs from the recorded "
                            f"{digest[:12]}...")
    return problems


def verify(folder: str | Path, expected: dict[str, str]) -> None:
    """Raise IntegrityError unless every expected artifact is present and unchanged."""
    if not expected:
        raise IntegrityError(f"no artifact hashes recorded for {folder}; re-export and register it")
    problems = hash_mismatches(folder, expected)
    if problems:
        raise IntegrityError("refusing a tampered or incomplete model: " + "; ".join(problems))


def read_json(path: str | Path) -> dict:
    """A JSON file's object."""
    return json.loads(Path(path).read_text())
