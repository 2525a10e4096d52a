"""Client-side data validation before training, and a small data-quality report.

Everything here runs on the partner's own data; only the report's aggregate numbers leave.
"""

from __future__ import annotations

import numpy as np
from fedshield.tasks import Split, Task

from fedshield.errors import DataValidationError


def validate_split(data: Split, task: Task, what: str = "local data") -> None:
    """Raise DataValidationError naming the first problem found."""
    x, y = data.x, data.y
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataValidationError(f"{what}: features and labels must be numpy arrays")
    if len(x) != len(y):
        raise DataValidationError(f"{what}: {len(x)} feature rows but {len(y)} labels")
    if len(y) == 0:
        raise DataValidationError(f"{what}: no examples; check the data path and partition")
    if tuple(x.shape[1:]) != tuple(task.input_shape):
        raise DataValidationError(f"{what}: each example has shape {tuple(x.shape[1:])}, task "
                                  f"{task.name!r} expects {tuple(task.input_shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataValidationError(f"{what}: features have dtype {x.dtype}; expected float32 "
                                  "(preprocess as the task describes: " + task.preprocessing + ")")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataValidationError(f"{what}: labels have dtype {y.dtype}; expected integers")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(1))
        raise DataValidationError(f"{what}: {int(bad.sum())} NaN/Inf feature values in "
                                  f"{len(rows)} examples (first at row {int(rows[0])}); "
                                  "impute or drop them")
    out_of_range = (y < 0) | (y >= task.num_classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise DataValidationError(f"{what}: label {int(y[first])} at row {first} is outside "
                                  f"[0, {task.num_classes - 1}] for task {task.name!r}")


def quality_report(data: Split, num_classes: int) -> dict[str, float]:
    """Aggregate statistics a client may share: counts, class histogram, missing values."""
    hist = np.bincount(data.y, minlength=num_classes)
    report = {"examples": float(len(data)),
              "missing-values": float((~np.isfinite(data.x)).sum()),
              "classes-present": float((hist > 0).sum())}
    report.update({f"class-{k}": float(c) for k, c in enumerate(hist)})
    return report
