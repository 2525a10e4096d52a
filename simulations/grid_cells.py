"""Running a grid's cells: in parallel processes, one row per finished cell, resumable.

A grid (simulations/sweeps.py) is a list of :class:`Cell`: the base config plus ``key=value``
overrides, named by the cell's own table columns and identified by the digest of its full,
validated config (never by its name alone). :func:`run_cells`

- reuses the rows of cells already finished for the same digest in the grid's append-only
  ``<stem>.rows.jsonl``, and re-runs, with a log line saying why, a cell whose row there is
  torn, edited (its checksum no longer matches), for another config, or an error;
- runs the other cells, ``parallel`` at a time, each in its own (spawned) process with
  ``federation.workers = 1`` and ``cores // parallel`` torch threads, so cells x threads never
  exceed the cores; ``parallel = 1`` runs them one after another in this process with the
  config's own ``federation.workers``. The same seeds give the same rows either way (bit for bit
  with the same torch threads per client step, as for ``federation.workers``);
- appends each cell's row to the JSONL as it finishes (a killed grid loses only its running
  cells) and shows a progress bar with ETA on stderr.

The pure parts (digests, row lines, reading them back, the chance check) have no process code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedshield import schema, validation
from fedshield.run_records import COMPLETED

log = logging.getLogger("flwr")

ROWS_SUFFIX = ".rows.jsonl"
# A cell that raised, or whose process died, has no run summary: its row says so with this
# status, and a resumed grid runs it again (a run that failed has its own status and is kept).
ERROR = "error"
# A grid whose every cell ends within this much of 1/classes learnt nothing: an absolute margin
# on final accuracy (digits/MNIST: 10 classes, so at most 0.15 counts as chance).
CHANCE_MARGIN = 0.05
# Config keys that do not change a cell's result: its worker processes (the same seed gives the
# same run for any number, simulations/workers.py), so a resume does not re-run for them.
RESULT_NEUTRAL_KEYS = ("federation.workers",)

# A cell's job: (cell, workers) -> its row body. ``workers`` is the federation.workers it must
# use (1 in a cell process; None: the config's own). Picklable (module-level or a partial).
CellJob = Callable[["Cell", int | None], dict]


@dataclass(frozen=True)
class Cell:
    """One grid point: its table columns, its overrides on the base, its config's digest."""

    columns: Mapping[str, Any]
    overrides: Mapping[str, Any]
    digest: str

    @property
    def name(self) -> str:
        """The cell as its columns say it, e.g. ``rule=krum partition=iid attack=alie``."""
        return " ".join(f"{k}={_short(v)}" for k, v in self.columns.items())


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def cell_folder(name: str) -> str:
    """A cell's folder under the grid's runs/: its name, file-system safe. Cells started in the
    same second by parallel processes never race for one ``<name>-<timestamp>`` folder."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("_") or "cell"


def cell_config(base: schema.Config, overrides: Mapping[str, Any],
                out_dir: Path) -> schema.Config:
    """The validated config of a cell: ``base`` + ``overrides``, its runs under ``out_dir/runs``
    unless the overrides say where. A bad override is a ConfigError here, before anything runs."""
    flat = {**base.flat(), "output_dir": str(out_dir / "runs"), **overrides}
    return validation.from_run_config(flat)


def config_digest(cfg: schema.Config, extra: Mapping[str, Any] | None = None) -> str:
    """sha256 of a cell's full config (less RESULT_NEUTRAL_KEYS) and what else its job does
    (``extra``, e.g. the audit's canaries): equal digests, equal rows."""
    flat = {k: v for k, v in cfg.flat().items() if k not in RESULT_NEUTRAL_KEYS}
    payload = json.dumps({"config": flat, "extra": dict(extra or {})}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def make_cell(base: schema.Config, columns: Mapping[str, Any], overrides: Mapping[str, Any],
              out_dir: Path, extra: Mapping[str, Any] | None = None) -> Cell:
    """A cell whose runs go to ``out_dir/runs/<its name>/``; its digest covers all of that."""
    name = Cell(columns, {}, "").name
    full = {**overrides, "output_dir": str(out_dir / "runs" / cell_folder(name))}
    cfg = cell_config(base, full, out_dir)
    return Cell(dict(columns), full, config_digest(cfg, extra))


# --- the rows file -----------------------------------------------------------------------------
def _checksum(cell: str, digest: str, row: Mapping[str, Any]) -> str:
    text = json.dumps({"cell": cell, "digest": digest, "row": row}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_line(cell: Cell, row: Mapping[str, Any]) -> str:
    """The JSONL line of a finished cell (the cell's name first, so a torn line still names it;
    a checksum last, so an edited one is seen)."""
    return json.dumps({"cell": cell.name, "digest": cell.digest, "row": dict(row),
                       "checksum": _checksum(cell.name, cell.digest, row)}) + "\n"


_NAMED = re.compile(r'^\{"cell": ("(?:[^"\\]|\\.)*")')


@dataclass
class StoredRows:
    """What a rows file holds: valid rows by digest, and why each other line is not one."""

    by_digest: dict[str, dict] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # cell name -> why its row is unusable
    errors: dict[str, str] = field(default_factory=dict)  # digest -> the error of its last try
    last_digest: dict[str, str] = field(default_factory=dict)  # cell name -> its last digest
    unnamed: list[str] = field(default_factory=list)  # torn lines naming no cell


def _torn_name(text: str) -> str | None:
    """The cell a torn line still names, None when its name is cut or not valid JSON."""
    named = _NAMED.match(text)
    try:
        return json.loads(named.group(1)) if named else None
    except ValueError:  # an edited escape, e.g. "\uZZZZ"
        return None


def read_rows(path: Path) -> StoredRows:
    """Parse a rows file; later lines of a digest win over earlier ones (re-runs append)."""
    out = StoredRows()
    if not path.is_file():
        return out
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)  # a rows-file entry, not a metrics line
            cell, digest, row = entry["cell"], entry["digest"], entry["row"]
            checksum = entry["checksum"]
            if not (isinstance(row, dict) and isinstance(cell, str) and isinstance(digest, str)):
                raise TypeError("wrong field types")
        except (ValueError, KeyError, TypeError) as exc:
            name = _torn_name(text)
            why = f"line {number} of {path.name} is torn ({type(exc).__name__})"
            if name is not None:
                out.problems[name] = why
            else:
                out.unnamed.append(why)
            continue
        if checksum != _checksum(cell, digest, row):
            out.problems[cell] = f"line {number} of {path.name} was edited (checksum mismatch)"
            continue
        out.problems.pop(cell, None)
        out.last_digest[cell] = digest
        if row.get("status") == ERROR:
            out.errors[digest] = str(row.get("error", "unknown error"))
            out.by_digest.pop(digest, None)
        else:
            out.errors.pop(digest, None)
            out.by_digest[digest] = row
    return out


def plan_cells(cells: Sequence[Cell], stored: StoredRows,
               resume: bool) -> tuple[dict[str, dict], list[Cell], list[str]]:
    """(reused rows by digest, cells to run, one reason per re-run cell)."""
    if not resume:
        return {}, list(cells), []
    reused, todo, reasons = {}, [], []
    for cell in cells:
        if cell.digest in stored.by_digest:
            reused[cell.digest] = stored.by_digest[cell.digest]
            continue
        todo.append(cell)
        if cell.digest in stored.errors:
            reasons.append(f"cell {cell.name}: re-running, it failed last time "
                           f"({stored.errors[cell.digest]})")
        elif cell.name in stored.problems:
            reasons.append(f"cell {cell.name}: re-running, {stored.problems[cell.name]}")
        elif cell.name in stored.last_digest:
            reasons.append(f"cell {cell.name}: re-running, its row is for another config "
                           f"(digest {stored.last_digest[cell.name][:12]}, this cell's "
                           f"{cell.digest[:12]}: the base config or the overrides changed)")
    return reused, todo, reasons


def error_row(message: str) -> dict:
    """The row of a cell that produced no run summary."""
    return {"status": ERROR, "error": message, "final_accuracy": None}


def failed(row: Mapping[str, Any]) -> bool:
    """Whether a cell's run did not complete (its run failed, or the cell raised or died)."""
    return row.get("status", COMPLETED) != COMPLETED


# --- at chance ------------------------------------------------------------------------------
def chance_warning(rows: Sequence[Mapping[str, Any]], num_classes: int | None,
                   margin: float = CHANCE_MARGIN) -> str | None:
    """The warning for a grid whose every cell with an accuracy is within ``margin`` of chance
    (1/classes), None otherwise (or when no cell has an accuracy: that is a failed grid)."""
    accs = [r["final_accuracy"] for r in rows if r.get("final_accuracy") is not None]
    if not num_classes or not accs:
        return None
    chance = 1.0 / num_classes
    if max(accs) > chance + margin:
        return None
    return (f"every cell of this grid is at chance: final accuracy at most {max(accs):.4f}, "
            f"within {margin:g} of 1/{num_classes} = {chance:.4f}. The grid measured nothing; "
            "check the base config (train.lr, rounds, the task) before reading its table")


# --- running ---------------------------------------------------------------------------------
def resolve_parallel(requested: int, pending: int, cores: int | None = None) -> int:
    """Cells at a time: ``requested`` (0 = one per core), at most the cores and the cells."""
    from fedshield.simulations.workers import available_cores

    if requested < 0:
        raise ValueError(f"parallel = {requested}: use 0 (one per core) or a positive count")
    n = available_cores(cores)
    return max(1, min(requested or n, n, pending))


def _init_cell_process(threads: int, parent: tuple[str, str] | None) -> None:
    """A cell process: its torch threads, its grid's MLflow run as parent, and its death with
    the grid's process (a SIGKILLed grid leaves no cells training on)."""
    import torch

    torch.set_num_threads(threads)
    # the cell's round-by-round INFO lines would bury the grid's progress bar: warnings only
    # (after Flower's import, which sets its logger to DEBUG)
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    if parent is not None:
        from fedshield.deployment.tracking import adopt_parent

        adopt_parent(*parent)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):  # best effort: no libc, no prctl
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Progress:
    """The grid's progress bar on stderr: done/total, running, failed, ETA (rich, a declared
    dependency; the CLI's console already)."""

    def __init__(self, label: str, total: int, reused: int, enabled: bool) -> None:
        self.enabled, self.failed = enabled and total > 0, 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("running {task.fields[running]}, failed "
                                       "{task.fields[failed]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        what = f"{label} ({reused} reused)" if reused else label
        self.task = self.bar.add_task(what, total=total, running=0, failed=0)
        self.bar.start()

    def update(self, running: int, done: Mapping[str, Any] | None = None) -> None:
        if done is not None and failed(done):
            self.failed += 1
        if self.enabled:
            self.bar.update(self.task, advance=1 if done is not None else 0, running=running,
                            failed=self.failed)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def run_cells(cells: Sequence[Cell], job: CellJob, rows_path: Path, *, parallel: int = 1,
              resume: bool = True, label: str = "grid", progress: bool = True,
              parent: tuple[str, str] | None = None, engine: str = "inprocess") -> list[dict]:
    """Run the grid's cells (see the module docstring); one row per cell, in ``cells``' order:
    its columns, then what its job returned. ``parent``: the grid's MLflow run (uri, run id)."""
    stored = read_rows(rows_path)
    for why in stored.unnamed:
        log.warning("%s: ignored", why)
    reused, todo, reasons = plan_cells(cells, stored, resume)
    for why in reasons:
        log.warning("%s", why)
    if reused:
        log.info("%s: %d of %d cells already finished in %s, reused", label, len(reused),
                 len(cells), rows_path)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = dict(reused)
    # Ray cells share one cluster: they run one after another
    k = 1 if engine == "ray" else resolve_parallel(parallel, len(todo))
    bar = _Progress(label, len(todo), len(reused), progress)
    try:
        with open(rows_path, "a") as fh:
            if fh.tell() and not rows_path.read_text().endswith("\n"):
                fh.write("\n")  # after a torn last line, a new line

            def record(cell: Cell, body: dict, running: int) -> None:
                row = {**cell.columns, **body}
                fh.write(row_line(cell, row))
                fh.flush()
                results[cell.digest] = row
                bar.update(running, row)
                if failed(row):
                    log.warning("cell %s: %s", cell.name, row.get("error") or row.get("status"))

            if k == 1:
                _run_here(todo, job, record, bar)
            else:
                _run_in_processes(todo, job, record, bar, k, parent)
    finally:
        bar.close()
    return [results[c.digest] for c in cells]


def _run_here(todo: Sequence[Cell], job: CellJob, record, bar: _Progress) -> None:
    for cell in todo:
        bar.update(1)
        try:
            body = job(cell, None)
        except Exception as exc:  # noqa: BLE001 — one broken cell is a row, not the grid's end
            body = error_row(f"{type(exc).__name__}: {exc}")
        record(cell, body, 0)


def _run_in_processes(todo: Sequence[Cell], job: CellJob, record, bar: _Progress, k: int,
                      parent: tuple[str, str] | None) -> None:
    from fedshield.simulations.workers import _thread_env, threads_per_worker

    threads = threads_per_worker(k)
    log.info("running %d cells at a time, each in its own process with federation.workers = 1 "
             "and %d torch thread(s)", k, threads)
    with _thread_env(threads), ProcessPoolExecutor(
            k, mp_context=mp.get_context("spawn"), initializer=_init_cell_process,
            initargs=(threads, parent)) as pool:
        queue = list(todo)
        running: dict[Future, Cell] = {}

        def submit() -> None:  # k at a time: "running" on the bar is what runs
            while queue and len(running) < k:
                cell = queue.pop(0)
                running[pool.submit(job, cell, 1)] = cell

        submit()
        bar.update(len(running))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                cell = running.pop(fut)
                try:
                    body = fut.result()
                except BrokenProcessPool:
                    body = error_row("its process died (killed, or out of memory?)")
                except Exception as exc:  # noqa: BLE001 — as in _run_here
                    body = error_row(f"{type(exc).__name__}: {exc}")
                record(cell, body, len(running))
            if not any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                submit()
            else:  # a dead pool runs nothing more: the rest are error rows, re-run on resume
                for cell in queue:
                    record(cell, error_row("not run: a cell process died before it"), 0)
                queue.clear()
            bar.update(len(running))

