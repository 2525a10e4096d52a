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
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from fedshield.tasks.base import Split, Task, register
from fedshield.tasks.images import MNIST_MEAN, MNIST_PREPROCESSING, MNIST_STD, load_mnist
from torch import nn

J, L = 2, 8
CHANNELS, SIDE = 1 + J * L + L * L * J * (J - 1) // 2, 28 // 2 ** J  # 81, 7
# Bump when the file layout or the computation changes: old caches are then recomputed.
CACHE_FORMAT = 2


def cache_dir() -> Path:
    """Where computed features are cached: $FEDSHIELD_CACHE or ~/.cache/fedshield."""
    return Path(os.environ.get("FEDSHIELD_CACHE", Path.home() / ".cache" / "fedshield"))


class ScatterTransform(nn.Module):
    """The fixed transform as a module: (n, 1, 28, 28) normalised images -> (n, 81, 7, 7).

    One home for the computation: ``scatter`` (training features, the cache) and the serving
    process (an export of this task takes images) both run it.
    """

    def __init__(self) -> None:
        super().__init__()
        # kymatio.torch also imports the 3-D frontend, which needs a SciPy function removed in
        # 1.15.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.transform = ScatteringTorch2D(J=J, shape=(28, 28), L=L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients of a batch of images."""
        return self.transform(x).reshape(len(x), CHANNELS, SIDE, SIDE)


def scatter(images: np.ndarray, chunk: int = 1024,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(n, 1, 28, 28) float32 images -> (n, 81, 7, 7) float32 scattering coefficients.

    ``progress`` is called with the number of images done after each chunk.
    """
    transform = ScatterTransform()
    out = np.empty((len(images), CHANNELS, SIDE, SIDE), np.float32)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk], np.float32))
            out[start:start + chunk] = transform(x).numpy()
            if progress is not None:
                progress(len(x))
    return out


def transform_params() -> dict[str, object]:
    """What the features depend on besides the images; part of the cache key."""
    import kymatio

    return {"transform": "kymatio.Scattering2D", "J": J, "L": L, "max_order": 2,
            "kymatio": kymatio.__version__, "format": CACHE_FORMAT}


def cache_key(images: np.ndarray) -> str:
    """A digest of the source images (bytes, shape, dtype) and of ``transform_params()``."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(json.dumps({**transform_params(), "shape": list(images.shape),
                                   "dtype": str(images.dtype)}, sort_keys=True).encode())
    h.update(images.data.cast("B"))
    return h.hexdigest()[:16]


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data.cast("B")).hexdigest()


def _read_cache(path: Path, meta_path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached features, memory-mapped, or None when absent, truncated, edited or of another
    shape.

    Mapped, not read: every process of a run (the server, each worker) shares the page cache's
    one copy (~1 GB for MNIST's train split), and a process's resident memory holds only the
    pages its clients touch. The digest is taken with plain reads, which map nothing into the
    process, from the same open file the map is made of (a concurrent atomic replace gives a
    new inode, never a mix). fedshield only ever replaces the file; editing or truncating it in
    place while a run maps it changes (or, truncated, crashes) that run."""
    try:
        meta = json.loads(meta_path.read_text())
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            file_shape, fortran, dtype = read_header(f)
            offset = f.tell()
            nbytes = int(np.prod(file_shape)) * np.dtype(dtype).itemsize
            if (tuple(file_shape) != shape or np.dtype(dtype) != np.float32 or fortran
                    or os.fstat(f.fileno()).st_size != offset + nbytes):
                return None
            # The digest of the array's bytes catches an edit that keeps the size and header.
            digest = hashlib.sha256()
            while block := f.read(1 << 24):
                digest.update(block)
            if meta.get("sha256") != digest.hexdigest():
                return None
            # "c": copy-on-write, so the arrays stay writable (torch) without touching the file
            return np.memmap(f, dtype=np.float32, mode="c", offset=offset, shape=shape)
    except (OSError, ValueError, EOFError):  # missing, truncated, not an .npy, bad JSON
        return None


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary file beside ``path``, flushed, then renamed over it."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a reader sees the old file or the whole new one, never a part
    finally:
        tmp.unlink(missing_ok=True)


def cached_scatter(name: str, images: np.ndarray) -> np.ndarray:
    """``scatter(images)``, computed once per machine; concurrent processes wait for the first.

    The file name carries ``cache_key(images)``; a sidecar JSON holds the SHA-256 of the features,
    so a truncated or edited cache file is recomputed (with a warning), never used.
    """
    key = cache_key(images)
    path = cache_dir() / f"{name}-scattering-J{J}L{L}-{key}.npy"
    meta_path = path.with_suffix(".json")
    shape = (len(images), CHANNELS, SIDE, SIDE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() or meta_path.exists():
            features = _read_cache(path, meta_path, shape)
            if features is not None:
                return features
            warnings.warn(f"ScatterNet feature cache {path} is truncated, edited or incomplete; "
                          "recomputing it", RuntimeWarning, stacklevel=2)
        with Progress(len(images), f"ScatterNet features of {name} (once per machine, cached "
                                   f"in {cache_dir()})") as bar:
            features = scatter(images, progress=bar.update)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a path would make np.save append ".npy"
                np.save(f, features)

        _write_atomic(path, save)
        meta = {**transform_params(), "source": name, "key": key, "shape": list(shape),
                "sha256": _digest(features)}
        _write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        # the mapped file rather than this process's own copy (see _read_cache)
        mapped = _read_cache(path, meta_path, shape)
        return features if mapped is None else mapped


class Progress:
    """Progress of a long computation on stderr: a bar on a terminal (tqdm when installed, else
    a plain one), only a start and a finish line otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._bar = None

    def __enter__(self) -> Progress:
        self.started = time.perf_counter()
        if not self.tty:
            print(f"computing {self.desc}: {self.total} images ...", file=self.stream, flush=True)
            return self
        try:
            from tqdm import tqdm
        except ImportError:
            self._draw()
        else:
            self._bar = tqdm(total=self.total, desc=self.desc, unit="img", file=self.stream)
        return self

    def update(self, n: int) -> None:
        """``n`` more items are done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.tty:
            self._draw()

    def _draw(self) -> None:
        pct = 100 * self.done // max(self.total, 1)
        print(f"\r{self.desc}: {self.done}/{self.total} ({pct}%)", end="", file=self.stream,
              flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.tty:
            print(file=self.stream)
        seconds = time.perf_counter() - self.started
        status = "done" if exc[0] is None else "interrupted"
        print(f"{self.desc}: {status} in {seconds:.1f} s", file=self.stream, flush=True)


@lru_cache(maxsize=1)
def load_mnist_scattering() -> tuple[Split, Split]:
    """MNIST (train, test) as ScatterNet features (cached, memory-mapped).

    The pixels are parsed only to find the cache (its key is their digest) and then let go
    rather than kept in ``load_mnist``'s cache: 220 MB per process (server and every worker)
    that the features replace."""
    train, test = load_mnist() if load_mnist.cache_info().currsize else load_mnist.__wrapped__()
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
                pixel_shape=(1, 28, 28), from_pixels=scatter, pixel_module=ScatterTransform,
                pixel_range=((0 - MNIST_MEAN) / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD))
