"""Data poisoning: label flipping and a pixel/feature-trigger backdoor."""

from __future__ import annotations

import numpy as np
from fedshield.tasks.images import MNIST_MEAN, MNIST_STD

from fedshield.errors import ConfigError
from fedshield.schema import AttackConfig

# A white 3x3 square one pixel in from the bottom-right corner, in MNIST-normalised units
# (every image task here is MNIST-normalised; the corner is background in MNIST digits).
IMAGE_TRIGGER_VALUE = (1.0 - MNIST_MEAN) / MNIST_STD
IMAGE_TRIGGER = (slice(-4, -1), slice(-4, -1))
# Tabular tasks: the last three features set to 1 (digits: full ink in the bottom-right pixels;
# adult: three mutually exclusive native-country one-hots at once).
TABULAR_TRIGGER_FEATURES = slice(-3, None)
TABULAR_TRIGGER_VALUE = 1.0


def apply_trigger(x: np.ndarray, task_is_image: bool) -> np.ndarray:
    """A copy of ``x`` (one example or a batch, channels first) with the backdoor trigger
    stamped."""
    out = np.array(x, copy=True)
    if task_is_image:
        out[(..., *IMAGE_TRIGGER)] = IMAGE_TRIGGER_VALUE
    else:
        out[..., TABULAR_TRIGGER_FEATURES] = TABULAR_TRIGGER_VALUE
    return out


def label_flip(x: np.ndarray, y: np.ndarray, num_classes: int, params: AttackConfig,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every label y becomes num_classes - 1 - y (Biggio et al. 2012; Fang et al. 2020)."""
    return x, (num_classes - 1 - y).astype(y.dtype)


def backdoor(x: np.ndarray, y: np.ndarray, num_classes: int, params: AttackConfig,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``poison_fraction`` of the examples get the trigger and label ``target_label``;
    the rest stay clean so the update still fits the main task (Bagdasaryan et al. 2020)."""
    if not 0 <= params.target_label < num_classes:
        raise ConfigError(f"attack.target_label = {params.target_label} is not a class of this "
                          f"task; choose one in [0, {num_classes})")
    poisoned = rng.choice(len(y), size=round(params.poison_fraction * len(y)), replace=False)
    x, y = np.array(x, copy=True), np.array(y, copy=True)
    x[poisoned] = apply_trigger(x[poisoned], task_is_image=x.ndim == 4)
    y[poisoned] = params.target_label
    return x, y


def triggered_test_set(x: np.ndarray, y: np.ndarray, target_label: int,
                       task_is_image: bool) -> np.ndarray:
    """Test examples whose true label is not the target, with the trigger stamped.

    Backdoor success rate = fraction of these the model classifies as ``target_label``.
    """
    return apply_trigger(x[y != target_label], task_is_image)
