"""MNIST seen through a fixed wavelet scattering transform (ScatterNet), for DP training.

Tramer & Boneh (2021) showed that under DP-SGD a linear model on hand-crafted scattering features
beats end-to-end CNNs on MNIST at the same epsilon: the features are data-independent (they cost no
privacy) and the model left to learn is small, so the noise hurts less. The transform is kymatio's
``Scattering2D`` (J=2, L=8, order 2: 81 channels of 7x7 per image). It costs about 1 ms per image
on a CPU core, so the features are computed once per machine and kept on disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from fedshield.tasks.base import Split, Task, register
from fedshield.tasks.images import MNIST_PREPROCESSING, load_mnist
from torch import nn

J, L = 2, 8
CHANNELS, SIDE = 1 + J * L + L * L * J * (J - 1) // 2, 28 // 2 ** J  # 81, 7


def cache_dir() -> Path:
    """Where computed features are cached: $FEDSHIELD_CACHE or ~/.cache/fedshield."""
    return Path(os.environ.get("FEDSHIELD_CACHE", Path.home() / ".cache" / "fedshield"))


def scatter(images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(n, 1, 28, 28) float32 images -> (n, 81, 7, 7) float32 scattering coefficients."""
    # kymatio.torch also imports the 3-D frontend, which needs a SciPy function removed in 1.15.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    transform = ScatteringTorch2D(J=J, shape=images.shape[-2:], L=L)
    out = np.empty((len(images), CHANNELS, SIDE, SIDE), np.float32)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(images[start:start + chunk])
            out[start:start + chunk] = transform(x).reshape(len(x), CHANNELS, SIDE, SIDE).numpy()
    return out


def cached_scatter(name: str, images: np.ndarray) -> np.ndarray:
    """``scatter(images)``, computed once per machine; concurrent processes wait for the first."""
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    path = cache_dir() / f"{name}-scattering-J{J}L{L}-{digest}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return np.load(path)
        features = scatter(images)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, features)
        os.replace(tmp, path)  # never leave a half-written cache behind
        return features


@lru_cache(maxsize=1)
def load_mnist_scattering() -> tuple[Split, Split]:
    """MNIST (train, test) as ScatterNet features (cached)."""
    train, test = load_mnist()
    return (Split(cached_scatter("mnist-train", train.x), train.y),
            Split(cached_scatter("mnist-test", test.x), test.y))


class ScatterLinear(nn.Module):
    """Tramer & Boneh's ScatterNet+linear: per-image GroupNorm (no parameters, so no privacy cost)
    over the scattering channels, then one linear layer."""

    def __init__(self, num_classes: int = 10, groups: int = 27) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, CHANNELS, affine=False)
        self.fc = nn.Linear(CHANNELS * SIDE * SIDE, num_classes)

    def forward(self, x):
        """Logits of a batch of ScatterNet features."""
        return self.fc(self.norm(x).flatten(1))


class ScatterCNN(nn.Module):
    """Tramer & Boneh's ScatterNet+CNN for MNIST: two tanh convs and a small tanh classifier."""

    def __init__(self, num_classes: int = 10, groups: int = 27) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, CHANNELS, affine=False)
        self.features = nn.Sequential(
            nn.Conv2d(CHANNELS, 16, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        """Logits of a batch of ScatterNet features."""
        return self.classifier(self.features(self.norm(x)))


@register("mnist-scattering")
def mnist_scattering() -> Task:
    """MNIST as fixed ScatterNet features, with Tramer & Boneh's linear model or CNN."""
    return Task("mnist-scattering", (CHANNELS, SIDE, SIDE), 10, ScatterLinear,
                load_mnist_scattering,
                MNIST_PREPROCESSING + f"; then kymatio Scattering2D(J={J}, L={L}) -> "
                f"({CHANNELS}, {SIDE}, {SIDE})",
                models={"scatter_linear": ScatterLinear, "scatter_cnn": ScatterCNN},
                pixel_shape=(1, 28, 28), from_pixels=scatter)
