"""A partner site's loaded data, cached so a new client process does not parse it again.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (docs/partner-sites.md,
"Why every message is a new process"), so an in-memory cache alone would never be hit in a
deployment. The site's node config names a ``cache-dir``; in it each data recipe (task, source,
split) gets a folder with the loaded arrays as ``.npy`` files and ``meta.json``:

- the recipe key: task name and preprocessing, the resolved data path, the split's seed and key,
  the loader code's own hash (a changed loader never reads an old cache);
- the source's stat key (size, mtime, inode of every file) and its content hash (SHA-256).

A hit needs the same recipe and the same stat key; when only the stat key changed (a copied or
touched file) the content is hashed again and, if equal, the cache is kept. Any other change
loads from the source and rewrites the cache. The arrays are still validated after every load
(client/fit.py's ``checked_data``): the cache skips parsing, never checks. The cache holds a copy
of the site's data, so its folder is private to the site's user (0o700), like the data itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedshield.tasks import Split

FORMAT = 1  # bump when the folder layout changes
ARRAYS = ("train_x", "train_y", "val_x", "val_y")
# How each load of this process was served ("memory", "disk", "source"): tests and logs read it.
LOADS: Counter[str] = Counter()
# Per process: a process that loads twice (tests, a long-lived worker) reads memory, not disk.
_MEMORY: dict[tuple[str, str], tuple[Split, Split, str]] = {}


@dataclass(frozen=True)
class Loaded:
    """The (train, validation) splits, their source's content fingerprint and where they came
    from (``memory``, ``disk`` or ``source``)."""

    train: Split
    val: Split
    fingerprint: str
    served_from: str


def source_files(path: Path) -> list[Path]:
    """The files a data path consists of (itself, or every file under a folder), sorted."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def stat_key(files: Iterable[Path]) -> str:
    """A key that changes when any file is replaced, resized or modified (no reading)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


def content_hash(files: Iterable[Path], root: Path | None = None) -> str:
    """SHA-256 over every file's name (relative to ``root``) and bytes: the data fingerprint."""
    h = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(root)) if root is not None and root.is_dir() else f.name
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def code_hash(*modules: object) -> str:
    """SHA-256 of the given modules' source files: a changed loader invalidates the cache."""
    h = hashlib.sha256()
    for m in modules:
        path = getattr(m, "__file__", None)
        if path:
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def _folder(cache_dir: Path, recipe: str) -> Path:
    return cache_dir / hashlib.sha256(recipe.encode()).hexdigest()[:24]


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None  # no cache yet, or a half-written one: load from the source
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _read_arrays(folder: Path, meta: dict) -> tuple[Split, Split] | None:
    try:
        # Copy-on-write maps: pages are read when used, and the arrays stay writable for torch.
        a = {k: np.load(folder / meta["files"][k], mmap_mode="c") for k in ARRAYS}
    except (OSError, KeyError, ValueError):
        return None
    return Split(a["train_x"], a["train_y"]), Split(a["val_x"], a["val_y"])


def _write(folder: Path, meta: dict, train: Split | None = None, val: Split | None = None) -> None:
    """Write the arrays (if given) under fresh names, then meta.json atomically: a reader sees the
    old cache or the new one, never a mix."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if train is not None and val is not None:
        tag = meta["content_hash"][:16]
        values = {"train_x": train.x, "train_y": train.y, "val_x": val.x, "val_y": val.y}
        meta["files"] = {}
        for k in ARRAYS:
            name = f"{k}-{tag}.npy"
            tmp = folder / f"{name}.{os.getpid()}.tmp.npy"  # one per writer process
            np.save(tmp, np.ascontiguousarray(values[k]))
            os.replace(tmp, folder / name)
            meta["files"][k] = name
    fd, meta_tmp = tempfile.mkstemp(dir=folder, prefix="meta.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(meta_tmp, folder / "meta.json")
    keep = set(meta["files"].values()) | {"meta.json"}
    for old in folder.glob("*.npy"):  # arrays of a previous version of the data
        if old.name not in keep and ".tmp." not in old.name:
            old.unlink(missing_ok=True)


def note(message: str) -> None:
    """One line on stderr, which Flower's flwr-clientapp passes into the SuperNode's log."""
    print(f"fedshield data cache: {message}", file=sys.stderr, flush=True)


def cached_splits(recipe: str, files: list[Path], root: Path | None, cache_dir: Path | None,
                  load: Callable[[], tuple[Split, Split]]) -> Loaded:
    """``load()``'s (train, validation), from this process's memory, ``cache_dir`` or the source.

    ``recipe`` names everything that decides the splits besides the source files' bytes;
    ``files`` are the source files (empty for a library dataset the recipe names)."""
    stat = stat_key(files)
    if (recipe, stat) in _MEMORY:
        train, val, kept = _MEMORY[recipe, stat]
        LOADS["memory"] += 1
        note(f"hit in memory (data {kept[:16]})")  # the long-lived site worker's case
        return Loaded(train, val, kept, "memory")
    folder = _folder(cache_dir, recipe) if cache_dir is not None else None
    meta = _read_meta(folder) if folder is not None else None
    fingerprint: str | None = None
    if folder is not None and meta is not None and meta.get("recipe") == recipe:
        if meta.get("stat_key") != stat:  # touched or copied: same bytes keep the cache
            fingerprint = content_hash(files, root)
            if fingerprint == meta.get("content_hash"):
                meta["stat_key"] = stat
                try:
                    _write(folder, meta)
                except OSError:
                    pass  # read-only cache: still valid for this load
        if meta.get("stat_key") == stat and (arrays := _read_arrays(folder, meta)) is not None:
            LOADS["disk"] += 1
            _MEMORY[recipe, stat] = (*arrays, meta["content_hash"])
            note(f"hit {folder} (data {meta['content_hash'][:16]})")
            return Loaded(*arrays, meta["content_hash"], "disk")
    train, val = load()
    fingerprint = fingerprint or content_hash(files, root)
    LOADS["source"] += 1
    _MEMORY[recipe, stat] = (train, val, fingerprint)
    if folder is not None:
        try:
            _write(folder, {"format": FORMAT, "recipe": recipe, "stat_key": stat,
                            "content_hash": fingerprint, "examples": [len(train), len(val)]},
                   train, val)
        except OSError as exc:  # a full or read-only disk costs speed, never the round
            note(f"loaded from the source; could not write the cache in {folder}: {exc}")
        else:
            note(f"loaded from the source, cached in {folder} (data {fingerprint[:16]})")
    return Loaded(train, val, fingerprint, "source")


def clear_memory() -> None:
    """Forget this process's in-memory copies (as a new process would)."""
    _MEMORY.clear()
