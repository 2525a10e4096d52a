"""The Task abstraction and the registry of tasks, keyed by the name used in configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np
import torch
from torch import nn

from fedshield.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Features ``x`` (float32, ``(n, *input_shape)``) and integer labels ``y`` (int64,
    ``(n,)``)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Split:
        """The examples at ``idx``."""
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Task:
    """A task: input shape, classes, model builders, the data loader and its preprocessing."""
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    build_model: Callable[[], nn.Module]
    load: Callable[[], tuple[Split, Split]]  # (train, test), already preprocessed
    preprocessing: str
    feature_names: tuple[str, ...] = field(default=())
    # Alternative architectures by name (task.model); build_model is the default one.
    models: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)
    model_name: str = ""  # which of ``models`` build_model is ("" = the default)
    # Tasks whose inputs are computed from images (ScatterNet features): the image shape, and the
    # fixed transform from normalised images to inputs, so partner sites can bring raw images.
    pixel_shape: tuple[int, ...] = ()
    from_pixels: Callable[[np.ndarray], np.ndarray] | None = None
    # The same transform as a torch module (differentiable, for explanations over pixels), and the
    # range of normalised pixels: an export of such a task is served on images (deployment/).
    pixel_module: Callable[[], nn.Module] | None = None
    pixel_range: tuple[float, float] | None = None

    def with_model(self, name: str) -> Task:
        """This task with ``build_model`` set to the named architecture ("" = default)."""
        if not name:
            return self
        if name not in self.models:
            raise ConfigError(f"task.model = {name!r} is not a model of task {self.name!r}; "
                              f"choose one of {', '.join(sorted(self.models)) or '(none)'}")
        return replace(self, build_model=self.models[name], model_name=name)

    @property
    def is_image(self) -> bool:
        """Inputs are (channels, height, width) images."""
        return len(self.input_shape) == 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one raw image this task reads (() for tabular tasks)."""
        return self.pixel_shape or (self.input_shape if self.is_image else ())


TASKS: dict[str, Callable[[], Task]] = {}


def register(name: str):
    """Decorator: register a task builder under its config name (``task.name``)."""
    def wrap(fn: Callable[[], Task]) -> Callable[[], Task]:
        TASKS[name] = fn
        return fn

    return wrap


@cache
def get_task(name: str, model: str = "") -> Task:
    """The task ``name`` (a registered one, or ``hf:<dataset>``) with model ``model``."""
    # Import for the side effect of registering each task module.
    from fedshield.tasks import adult, hf, images, scattering  # noqa: F401

    if name.startswith("hf:"):
        return hf.hf_task(name[3:]).with_model(model)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]().with_model(model)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device ``train.device`` names ("auto": CUDA when there is one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = \"cuda\" but this machine has no CUDA GPU; use \"auto\"")
    return torch.device(name)


def task_for(task_cfg) -> Task:
    """The task a ``[task]`` config section names, with its chosen model."""
    return get_task(task_cfg.name, task_cfg.model)


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 1024,
             device: torch.device | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (model stays where it is)."""
    model.eval()
    device = device or next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        xb = torch.from_numpy(data.x[start:start + batch_size]).to(device)
        yb = torch.from_numpy(data.y[start:start + batch_size]).to(device)
        logits = model(xb)
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(data), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}
