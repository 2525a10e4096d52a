"""Batch prediction from files (``fedshield predict``) with the server's input checks.

The input is a ``.npy`` array shaped ``(rows, *input_shape)`` or a ``.csv`` with one example per
row (flattened in C order; an optional header of feature names). Each chunk is checked as
``/predict`` checks a request: shape, dtype (numbers only; a ``.npy`` is never unpickled),
NaN/inf, float32's range, and the evaluation input range (a warning, or an error with
``strict_inputs``); a problem is an error naming the row and column. A ``.npy`` is memory-mapped
and a CSV streamed, so a large file is never held twice; the output CSV (row, prediction, one
probability per class) is written to a temporary file and renamed only when every row passed.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fedshield.deployment.serving import (
    FLOAT32_MAX,
    ServedModel,
    accepted_range,
    npy_header,
    softmax,
)

from fedshield.errors import DataValidationError

CHUNK_ROWS = 1024
SUFFIXES = (".npy", ".csv")
HEADER_BYTES = 1 << 20  # a .npy header is a few hundred bytes; more is not an array we wrote


@dataclass
class BatchResult:
    """What ``predict_file`` did."""
    input: str
    output: str
    rows: int
    model: str
    version: str
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-able dict (``fedshield predict --json``)."""
        return dict(vars(self))


class Columns:
    """Names a flat column index of one example: a feature name, or an element of an image."""

    def __init__(self, input_shape: tuple[int, ...], feature_names: list[str]) -> None:
        self.input_shape = input_shape
        width = int(np.prod(input_shape))
        self.names = list(feature_names) if len(feature_names) == width else []

    def __call__(self, flat: int) -> str:
        """``column 5 ('age')`` or ``element (0, 3, 4)``."""
        if len(self.input_shape) > 1:
            index = tuple(int(i) for i in np.unravel_index(flat, self.input_shape))
            return f"column {flat} (element {index})"
        return f"column {flat}" + (f" ({self.names[flat]!r})" if self.names else "")


def check_values(x: np.ndarray, first_row: int, where: str, columns: Columns) -> np.ndarray:
    """A chunk as float32, or DataValidationError naming the first NaN/inf/out-of-float32 cell."""
    flat = x.reshape(len(x), -1)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flat) | (np.abs(flat) > FLOAT32_MAX)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = flat[row, col]
        what = "NaN" if np.isnan(value) else ("infinite" if np.isinf(value)
                                              else f"{value:.4g}, beyond float32's range")
        raise DataValidationError(f"{where}: row {first_row + row}, {columns(col)} is {what}; "
                                  "every value must be a finite float32 number")
    return np.ascontiguousarray(x, dtype=np.float32)


def out_of_range(x: np.ndarray, first_row: int, served: ServedModel,
                 columns: Columns) -> str | None:
    """Where a chunk leaves the evaluation range by more than the server tolerates, or None."""
    bounds = accepted_range(served.input_range)
    if bounds is None:
        return None
    lo, hi, low_ok, high_ok = bounds
    flat = x.reshape(len(x), -1)
    outside = (flat < low_ok) | (flat > high_ok)
    if not outside.any():
        return None
    row, col = (int(i) for i in np.argwhere(outside)[0])
    hint = (f"; the model expects inputs preprocessed as: {served.preprocessing}"
            if served.preprocessing else "")
    return (f"row {first_row + row}, {columns(col)} is {flat[row, col]:.4g}, far outside the "
            f"evaluation range [{lo:.4g}, {hi:.4g}]{hint}")


def npy_chunks(path: Path, input_shape: tuple[int, ...], chunk: int,
               columns: Columns) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 chunk) of a ``.npy`` file, memory-mapped, header checked first."""
    expected = f"a float32 array shaped (rows, {', '.join(map(str, input_shape))})"
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    try:
        shape, fortran, dtype, offset = npy_header(head)
    except ValueError as exc:
        raise DataValidationError(f"{path} is not a .npy array ({exc}); write {expected} with "
                                  "numpy.save") from None
    if dtype.hasobject:
        raise DataValidationError(f"{path} holds Python objects (a pickle, never loaded); write "
                                  f"{expected}")
    if dtype.kind not in "fiu" or dtype.subdtype is not None:
        raise DataValidationError(f"{path} has dtype {dtype.str}; write {expected}")
    if len(shape) < 1 or shape[1:] != input_shape:
        raise DataValidationError(f"{path} has shape {shape}; expected {expected}")
    if shape[0] == 0:
        raise DataValidationError(f"{path} is empty (0 rows); write at least one example")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size - offset != size:
        raise DataValidationError(f"{path}: the header says {shape} {dtype.str} ({size} bytes) "
                                  f"but the file holds {path.stat().st_size - offset} data bytes; "
                                  "the file is truncated or padded, write it again")
    array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                      order="F" if fortran else "C")
    for start in range(0, shape[0], chunk):
        yield start, check_values(np.asarray(array[start:start + chunk]), start, str(path),
                                  columns)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_chunks(path: Path, input_shape: tuple[int, ...], chunk: int, columns: Columns,
               feature_names: list[str]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 chunk) of a CSV, streamed; an optional first line of feature names."""
    width = int(np.prod(input_shape))
    rows: list[list[str]] = []
    row = 0  # data rows seen, 0-based like the output's "row" column
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            for fields in reader:
                if not fields or all(not f.strip() for f in fields):
                    continue  # blank lines carry no example
                if row == 0 and not rows and not any(_is_number(f) for f in fields):
                    check_header(path, fields, width, feature_names)
                    continue
                if len(fields) != width:
                    raise DataValidationError(
                        f"{path}: row {row} (line {reader.line_num}) has {len(fields)} columns; "
                        f"the model takes {width} per row ({describe(input_shape, columns)})")
                rows.append(fields)
                row += 1
                if len(rows) == chunk:
                    yield row - len(rows), parse(rows, row - len(rows), path, columns)
                    rows = []
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path} is not a text CSV (byte {exc.object[exc.start]:#04x} "
                                  f"at offset {exc.start} is not UTF-8); pass a .csv of numbers "
                                  "or a .npy array") from None
    except csv.Error as exc:
        raise DataValidationError(f"{path} is not a readable CSV ({exc}); pass comma-separated "
                                  "numbers, one example per line") from None
    if rows:
        yield row - len(rows), parse(rows, row - len(rows), path, columns)
    if row == 0:
        raise DataValidationError(f"{path} has no data rows; write one example per line "
                                  f"({width} numbers)")


def describe(input_shape: tuple[int, ...], columns: Columns) -> str:
    """How one example's columns are laid out, for error messages."""
    if columns.names:
        return f"{columns.names[0]} ... {columns.names[-1]}"
    if len(input_shape) > 1:
        return f"an example of shape {input_shape} flattened in C order"
    return f"{input_shape[0]} features"


def check_header(path: Path, names: list[str], width: int, feature_names: list[str]) -> None:
    """A header must have one name per column and, when the model names its features, the
    model's names in the model's order (a reordered CSV would be silently mispredicted)."""
    names = [n.strip() for n in names]
    if len(names) != width:
        raise DataValidationError(f"{path}: the header has {len(names)} columns; the model takes "
                                  f"{width} per row")
    if len(feature_names) != width:
        return
    for i, (given, wanted) in enumerate(zip(names, feature_names, strict=True)):
        if given != wanted:
            raise DataValidationError(f"{path}: header column {i} is {given!r} but the model's "
                                      f"column {i} is {wanted!r}; write the columns in the "
                                      f"model's order ({', '.join(feature_names[:5])}, ...)")


def parse(rows: list[list[str]], first_row: int, path: Path, columns: Columns) -> np.ndarray:
    """Text fields -> checked float32 rows, or an error naming the first field that is no
    number."""
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        for r, fields in enumerate(rows):
            for c, text in enumerate(fields):
                if not _is_number(text):
                    raise DataValidationError(
                        f"{path}: row {first_row + r}, {columns(c)} is {text[:40]!r}, not a "
                        "number") from None
        raise
    return check_values(values, first_row, str(path), columns)


def predict_file(served: ServedModel, source: str | Path, out: str | Path,
                 chunk: int = CHUNK_ROWS, strict_inputs: bool = False) -> BatchResult:
    """Predict every row of ``source`` (.npy or .csv) into the CSV ``out``."""
    source, out, start = Path(source), Path(out), time.perf_counter()
    if chunk < 1:
        raise DataValidationError(f"chunk size {chunk}; pass at least 1 row per chunk")
    if source.suffix.lower() not in SUFFIXES:
        raise DataValidationError(f"{source}: unknown input type {source.suffix or '(none)'!r}; "
                                  f"pass a .npy array or a .csv file")
    if not source.is_file():
        raise DataValidationError(f"{source} does not exist or is not a file")
    names = [str(n) for n in (served.card.get("data_schema") or {}).get("feature_names") or []]
    if served.reference is not None and not names:
        names = [str(n) for n in served.reference.feature_names]
    columns = Columns(served.input_shape, names)
    chunks = (npy_chunks(source, served.input_shape, chunk, columns)
              if source.suffix.lower() == ".npy"
              else csv_chunks(source, served.input_shape, chunk, columns, columns.names))
    warnings: list[str] = []
    rows = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["row", "prediction",
                             *(f"probability_{k}" for k in range(served.num_classes))])
            for first, x in chunks:
                if problem := out_of_range(x, first, served, columns):
                    if strict_inputs:
                        raise DataValidationError(f"{source}: {problem} (--strict-inputs)")
                    if not warnings:  # once: the first offending row says what is wrong
                        warnings.append(f"{source}: {problem}")
                _, logits = served.logits(x)
                if not np.isfinite(logits).all():
                    bad = int(np.argwhere(~np.isfinite(logits).all(1))[0][0])
                    raise DataValidationError(f"{source}: row {first + bad} makes the model's "
                                              "logits overflow (inf/NaN); send inputs in the "
                                              "model's range")
                probs = softmax(logits)
                for i, (label, p) in enumerate(zip(logits.argmax(1), probs, strict=True)):
                    # 9 significant digits: float32 round-trips exactly
                    writer.writerow([first + i, int(label), *(f"{v:.9g}" for v in p)])
                rows += len(x)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BatchResult(str(source), str(out), rows, served.name, str(served.version),
                       round(time.perf_counter() - start, 3), warnings)
