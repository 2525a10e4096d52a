"""A partner site's own data, read from a local path into a task's :class:`Split`.

Formats, picked by the path:

- ``*.csv`` with a header and a ``label`` column. Tabular tasks: the other columns are the task's
  ``feature_names`` (any order), already preprocessed as ``task.preprocessing`` says. Adult also
  accepts the RAW UCI columns (``age, workclass, ..., native-country`` plus ``income`` or
  ``label``), with or without a header, so rows of ``adult.data`` can be dropped in as they are;
  they are encoded with the task's own encoding (vocabulary and statistics of its training set).
  Image tasks: ``label`` plus one column per pixel (e.g. ``pixel0..pixel783``), values 0-255.
- ``*.npz`` with arrays ``x`` and ``y``. ``x`` is preprocessed float data of the task's input shape,
  or, for image tasks, raw ``uint8`` pixels that are normalised like the task's own data.
  Raw images (any of these formats) of a task computed from pixels (``mnist-scattering``) go
  through the task's own transform (``Task.from_pixels``).
- a folder ``<root>/<label>/*.png`` for 28x28 grayscale image tasks (MNIST-like: white digit on
  black), read with Pillow.

Every problem is a :class:`DataValidationError` naming the file and what to change. Range checks
(labels, NaN) happen afterwards in ``client.validation.validate_split``.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
from fedshield.tasks.base import Split, Task
from fedshield.tasks.images import normalise_mnist

from fedshield.errors import DataValidationError

LABEL = "label"
IMAGE_SUFFIXES = (".png",)


def load_local(path: str, task: Task) -> Split:
    """Read a partner's data at ``path`` (CSV, NPZ or image folder) for ``task``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataValidationError(f"{p}: no such file or folder; set data-path in the site's "
                                  "node config to your data (CSV, .npz or an image folder)")
    if p.is_dir():
        return load_image_folder(p, task)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return load_csv(p, task)
    if suffix == ".npz":
        return load_npz(p, task)
    raise DataValidationError(f"{p}: unsupported file type {suffix or '(none)'}; use .csv, .npz "
                              "or a folder <root>/<label>/*.png")


# --- CSV ------------------------------------------------------------------------------------
def _column_key(name: str) -> str:
    """Header names compared case-insensitively, with '-' and '_' treated alike (UCI uses '-')."""
    return name.strip().lower().replace("-", "_")


def _read_rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: cannot read it as UTF-8 text ({exc})") from exc
    rows = [[v.strip() for v in row]
            for row in csv.reader(text.splitlines(), skipinitialspace=True) if any(row)]
    if not rows:
        raise DataValidationError(f"{path}: the file is empty")
    return rows


def _numbers(path: Path, rows: list[list[str]], what: str) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise DataValidationError(f"{path}: {what} must be numbers ({exc})") from exc


def load_csv(path: Path, task: Task) -> Split:
    """A CSV of a task's features (or Adult's raw columns) and labels; see the module docstring."""
    rows = _read_rows(path)
    if task.name == "adult":
        from fedshield.tasks import adult  # only Adult partners need the raw encoder

        raw = _raw_adult_rows(path, rows, adult.COLUMNS)
        if raw is not None:
            return _encode_adult(path, raw)
    header = [_column_key(h) for h in rows[0]]
    widths = {len(r) for r in rows[1:]}
    if widths - {len(header)}:
        bad = next(i for i, r in enumerate(rows[1:], start=2) if len(r) != len(header))
        raise DataValidationError(f"{path}: line {bad} has {len(rows[bad - 1])} fields, the "
                                  f"header has {len(header)}")
    if LABEL not in header:
        raise DataValidationError(f"{path}: no {LABEL!r} column in the header "
                                  f"({', '.join(rows[0][:8])}{', ...' if len(header) > 8 else ''});"
                                  f" name the label column {LABEL!r}")
    if len(rows) < 2:
        raise DataValidationError(f"{path}: a header but no data rows")
    label_at = header.index(LABEL)
    values = _numbers(path, [r for r in rows[1:]], "all values")
    y_float = values[:, label_at]
    if not np.all(y_float == np.round(y_float)):
        raise DataValidationError(f"{path}: the {LABEL!r} column must hold integer class ids")
    y = y_float.astype(np.int64)
    feature_cols = [i for i in range(len(header)) if i != label_at]
    if task.image_shape:
        expected = int(np.prod(task.image_shape))
        if len(feature_cols) != expected:
            raise DataValidationError(f"{path}: {len(feature_cols)} pixel columns, task "
                                      f"{task.name!r} needs {expected} (one per pixel, 0-255)")
        return Split(_pixels_to_inputs(values[:, feature_cols], task), y)
    wanted = [_column_key(n) for n in task.feature_names]
    given = [header[i] for i in feature_cols]
    unknown = sorted(set(given) - set(wanted))
    missing = [n for n in wanted if n not in given]
    if unknown or missing:
        hint = " (raw UCI Adult columns are accepted too)" if task.name == "adult" else ""
        raise DataValidationError(
            f"{path}: columns do not match task {task.name!r}{hint}: unknown "
            f"{_short(unknown)}; missing {_short(missing)}")
    order = [header.index(n) for n in wanted]
    return Split(values[:, order].astype(np.float32), y)


def _short(names: list[str], k: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _raw_adult_rows(path: Path, rows: list[list[str]], columns: tuple[str, ...]):
    """Rows in UCI order (label last, as ``>50K``/``<=50K``) when the CSV holds raw Adult data."""
    features = [_column_key(c) for c in columns[:-1]]
    header = [_column_key(h) for h in rows[0]]
    if set(features) <= set(header):  # a header naming the raw columns
        label = "income" if "income" in header else LABEL if LABEL in header else None
        if label is None:
            raise DataValidationError(f"{path}: raw Adult columns but no 'income' or "
                                      f"{LABEL!r} column")
        order = [header.index(c) for c in features] + [header.index(label)]
        body, width, first_line = rows[1:], len(header), 2
    elif len(rows[0]) == len(columns) and rows[0][0].isdigit():  # headerless adult.data rows
        order, label = list(range(len(columns))), "income"
        body, width, first_line = rows, len(columns), 1
    else:
        return None
    out = []
    for line, r in enumerate(body, start=first_line):
        if len(r) != width:
            raise DataValidationError(f"{path}: line {line} has {len(r)} fields, expected {width}")
        row = [r[i] for i in order]
        if label == LABEL:  # 0/1 label -> the UCI income string
            row[-1] = ">50K" if row[-1] in ("1", "1.0") else "<=50K"
        out.append(row)
    if not out:
        raise DataValidationError(f"{path}: a header but no data rows")
    return out


def _encode_adult(path: Path, raw: list[list[str]]) -> Split:
    from fedshield.tasks import adult

    numeric_at = [adult.COLUMNS.index(c) for c in adult.NUMERIC]
    _numbers(path, [[r[i] for i in numeric_at] for r in raw],
             f"the numeric columns ({', '.join(adult.NUMERIC)})")
    # The task's own encoding: vocabulary and statistics come from its training rows.
    _, encoded, _ = adult.encode(adult._read("adult.data"), raw)
    return encoded


# --- NPZ ------------------------------------------------------------------------------------
def load_npz(path: Path, task: Task) -> Split:
    """An .npz with ``x`` and ``y`` (preprocessed features, or raw uint8 pixels)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataValidationError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataValidationError(f"{path}: missing array(s) {', '.join(missing)}; found "
                                  f"{', '.join(arrays) or 'none'}; save with "
                                  "np.savez(path, x=features, y=labels)")
    x, y = arrays["x"], arrays["y"]
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise DataValidationError(f"{path}: y has dtype {y.dtype}; labels must be integers")
    y = y.astype(np.int64).reshape(-1)
    if task.image_shape and x.dtype == np.uint8:
        return Split(_pixels_to_inputs(x.reshape(len(x), -1).astype(np.float64), task), y)
    if tuple(x.shape[1:]) != tuple(task.input_shape):
        raise DataValidationError(f"{path}: x has examples of shape {tuple(x.shape[1:])}, task "
                                  f"{task.name!r} expects {tuple(task.input_shape)}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataValidationError(f"{path}: x has dtype {x.dtype}; expected numbers")
    return Split(x.astype(np.float32), y)


# --- images ---------------------------------------------------------------------------------
def _pixels_to_inputs(pixels: np.ndarray, task: Task) -> np.ndarray:
    """Raw 0-255 pixels, one row per image, -> the task's preprocessed float32 inputs."""
    if pixels.shape[1] != int(np.prod(task.image_shape)):
        raise DataValidationError(f"images have {pixels.shape[1]} pixels, task {task.name!r} "
                                  f"expects {task.image_shape}")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataValidationError("raw pixel values must lie in 0..255")
    if task.image_shape != (1, 28, 28):
        raise DataValidationError(f"raw pixels are supported for 28x28 grayscale tasks, not "
                                  f"{task.name!r}; save preprocessed float features instead")
    images = normalise_mnist(pixels)
    return task.from_pixels(images) if task.from_pixels else images


def load_image_folder(root: Path, task: Task) -> Split:
    """A ``<root>/<label>/*.png`` folder of 28x28 grayscale images."""
    if not task.image_shape or task.image_shape[0] != 1:
        raise DataValidationError(f"{root}: image folders are for grayscale image tasks; task "
                                  f"{task.name!r} takes {task.input_shape} features (use CSV)")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # Pillow comes with matplotlib, but a slim install may lack it
        raise DataValidationError(f"{root}: reading image folders needs Pillow "
                                  "(pip install pillow), or save the images as .npz") from exc
    size = (task.image_shape[2], task.image_shape[1])  # PIL: (width, height)
    images, labels = [], []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        if not folder.name.isdigit() or int(folder.name) >= task.num_classes:
            raise DataValidationError(f"{folder}: sub-folders must be named by class id "
                                      f"0..{task.num_classes - 1}")
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as img:
                    if img.size != size:
                        raise DataValidationError(f"{file}: image is {img.size[0]}x{img.size[1]}"
                                                  f", task {task.name!r} needs {size[0]}x{size[1]}")
                    images.append(np.asarray(img.convert("L"), dtype=np.float64).reshape(-1))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataValidationError(f"{file}: unreadable image ({exc})") from exc
            labels.append(int(folder.name))
    if not images:
        raise DataValidationError(f"{root}: no .png images under <root>/<label>/")
    return Split(_pixels_to_inputs(np.stack(images), task), np.array(labels, dtype=np.int64))
