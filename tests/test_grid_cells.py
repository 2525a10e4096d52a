"""Grids in parallel, row by row, resumable (simulations/grid_cells.py) on tiny digits grids."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import typer
from fedshield.simulations import grid_cells as gc
from fedshield.simulations.sweeps import robustness_matrix
from fedshield.simulations.workers import threads_per_worker

from fedshield import configio
from tests.config_support import neutral_config

GRID = (["fedavg"], ["none", "sign_flip", "label_flip"], [0.4], ["iid"])  # 3 cells
ROWS = "robustness" + gc.ROWS_SUFFIX
# where and when a row was made: differs between two runs of the same cell
VOLATILE = ("run_dir", "wall_seconds")


def _base(tmp: Path, **train):
    return neutral_config({"name": "g", "seed": 0, "output_dir": str(tmp / "runs"),
                           "task": {"name": "digits"},
                           "federation": {"num_clients": 5, "rounds": 2},
                           "partition": {"kind": "iid"},
                           "train": {"lr": 0.1, "batch_size": 16, "max_steps": 6, **train},
                           "privacy": {"ledger_dir": str(tmp / "ledgers")},
                           "reputation": {"enabled": False},
                           "deployment": {"handoff": False}})


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _lines(out: Path) -> list[dict]:
    """The rows file's lines that parse (one may be half-written while a grid runs)."""
    lines = []
    for text in (out / ROWS).read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run one cell after another in this process, each client step on the torch
    threads a cell process of two gets (the same rows bit for bit need the same threads)."""
    tmp = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(2))
    try:
        result = robustness_matrix(_base(tmp), *GRID, tmp / "grid", parallel=1)
    finally:
        torch.set_num_threads(threads)
    return tmp, result


# --- pure parts ------------------------------------------------------------------------------
def _cell(tmp: Path, **overrides) -> gc.Cell:
    return gc.make_cell(_base(tmp), {"rule": "fedavg", "attack": "none"},
                        {"aggregation.rule": "fedavg", **overrides}, tmp / "grid")


def test_the_digest_covers_the_full_config_but_not_the_worker_count(tmp_path):
    cell = _cell(tmp_path)
    assert _cell(tmp_path).digest == cell.digest
    assert _cell(tmp_path, **{"federation.workers": 4}).digest == cell.digest
    assert _cell(tmp_path, **{"train.lr": 0.2}).digest != cell.digest
    other_base = gc.make_cell(_base(tmp_path, local_epochs=2), cell.columns,
                              {"aggregation.rule": "fedavg"}, tmp_path / "grid")
    assert other_base.name == cell.name and other_base.digest != cell.digest


def test_torn_edited_other_config_and_error_rows_are_rerun_with_a_reason(tmp_path):
    cells = [gc.make_cell(_base(tmp_path), {"attack": a}, {"attack.name": "none"} if a == "none"
                          else {"attack.name": a, "attack.byzantine_fraction": 0.2},
                          tmp_path / "grid") for a in ("none", "sign_flip", "gaussian", "ipm",
                                                       "alie")]
    good, edited, torn, errored, other = cells
    path = tmp_path / "rows.jsonl"
    moved = gc.Cell(other.columns, other.overrides, "0" * 64)  # the same name, another config
    lines = [gc.row_line(good, {"attack": "none", "status": "completed", "final_accuracy": 0.9}),
             gc.row_line(edited, {"attack": "sign_flip", "final_accuracy": 0.5}).replace(
                 "0.5", "0.95"),
             gc.row_line(errored, gc.error_row("boom")),
             gc.row_line(moved, {"attack": "alie", "final_accuracy": 0.4}),
             gc.row_line(torn, {"attack": "gaussian", "final_accuracy": 0.3})[:40]]
    path.write_text("".join(lines))  # the torn line last, without its newline (SIGKILL)
    reused, todo, reasons = gc.plan_cells(cells, gc.read_rows(path), resume=True)
    assert list(reused) == [good.digest]
    assert todo == [edited, torn, errored, other]
    assert "edited (checksum mismatch)" in reasons[0] and "sign_flip" in reasons[0]
    assert "torn" in reasons[1] and "gaussian" in reasons[1]
    assert "failed last time (boom)" in reasons[2]
    assert "for another config" in reasons[3]
    assert gc.plan_cells(cells, gc.read_rows(path), resume=False)[1] == cells


def test_the_chance_warning_needs_every_cell_within_the_margin():
    at_chance = [{"final_accuracy": 0.08}, {"final_accuracy": 0.14}, {"final_accuracy": None}]
    note = gc.chance_warning(at_chance, 10)
    assert note and "1/10 = 0.1000" in note and "0.1400" in note
    assert gc.chance_warning(at_chance + [{"final_accuracy": 0.6}], 10) is None
    assert gc.chance_warning([{"final_accuracy": None}], 10) is None  # failed, not at chance


def test_a_grid_whose_every_cell_failed_exits_non_zero():
    from fedshield.cli import _grid_outcome

    with pytest.raises(typer.Exit) as exc:
        _grid_outcome([{"status": gc.ERROR}, {"status": "failed"}], None)
    assert exc.value.exit_code == 1
    _grid_outcome([{"status": gc.ERROR}, {"status": "completed"}], None)  # some finished: ok


def test_parallel_cells_never_oversubscribe_the_cores():
    assert gc.resolve_parallel(0, 10, cores=2) == 2
    assert gc.resolve_parallel(8, 10, cores=2) == 2 and gc.resolve_parallel(4, 1, cores=16) == 1
    assert gc.resolve_parallel(2, 3, cores=16) * threads_per_worker(2, cores=16) <= 16


# --- whole grids -------------------------------------------------------------------------------
def test_a_normal_grid_writes_a_row_per_cell_and_does_not_warn(reference):
    tmp, result = reference
    rows = result["rows"]
    assert [r["attack"] for r in rows] == GRID[1]
    assert result["chance"] is None
    assert all(r["status"] == "completed" for r in rows)
    assert rows[0]["final_accuracy"] > 0.2  # the clean cell learns (chance is 0.1)
    assert [line["row"] for line in _lines(tmp / "grid")] == rows
    assert "WARNING" not in (tmp / "grid" / "robustness.md").read_text()


def test_parallel_cells_give_the_sequential_rows_and_stay_mlflow_children(reference, tmp_path):
    from mlflow import MlflowClient

    ref_tmp, ref = reference
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = _base(ref_tmp)  # the reference's config; its own grid folder
    tracked = replace(base, tracking=replace(base.tracking, enabled=True, uri=uri))
    result = robustness_matrix(tracked, *GRID, tmp_path / "grid", parallel=2)
    assert _stable(result["rows"]) == _stable(ref["rows"])
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fedshield").experiment_id])
    (parent,) = [r.info.run_id for r in runs if r.data.tags.get("fedshield.grid")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 3 and len(runs) == 4


def _cli(config: Path, out: Path, parallel: int) -> subprocess.Popen:
    # one torch thread per client step, as in the reference (OMP_NUM_THREADS sets torch's)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedshield.cli", "robustness", str(config), "--rules", "fedavg",
         "--attacks", ",".join(GRID[1]), "--fractions", "0.4", "--partitions", "iid",
         "--out", str(out), "--parallel", str(parallel)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_grid_resumes_only_its_missing_cells(reference, tmp_path):
    ref_tmp, ref = reference
    config = tmp_path / "base.toml"
    config.write_text(configio.to_toml(_base(ref_tmp)))
    out = tmp_path / "grid"
    proc = _cli(config, out, parallel=1)
    deadline = time.monotonic() + 240
    while not ((out / ROWS).is_file() and _lines(out)) and proc.poll() is None:
        assert time.monotonic() < deadline, "no row after 240 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # mid-grid: one row written, the next cell running
    proc.wait()
    first = len(_lines(out))
    assert 1 <= first < 3, "the grid finished before it was killed"
    resumed = _cli(config, out, parallel=2)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    lines = _lines(out)
    assert len(lines) == 3 and len({line["digest"] for line in lines}) == 3  # each cell once
    rows = json.loads((out / "robustness.json").read_text())
    assert _stable(rows) == _stable(ref["rows"])
    # a torn row (the last line cut short) is run again, and the log says why
    text = (out / ROWS).read_text()
    (out / ROWS).write_text(text[:text.rstrip("\n").rfind("\n") + 120])  # its name kept
    again = _cli(config, out, parallel=1)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "re-running" in err and "is torn" in err
    assert len(_lines_ok(out)) == 3 and len(_lines_ok(out)) + 1 == _count(out)
    assert _stable(json.loads((out / "robustness.json").read_text())) == _stable(ref["rows"])


def _lines_ok(out: Path) -> list[dict]:
    return [line for line in gc.read_rows(out / ROWS).by_digest.values()]


def _count(out: Path) -> int:
    return sum(1 for t in (out / ROWS).read_text().splitlines() if t.strip())


def test_a_grid_at_chance_warns_in_its_log_and_tables(tmp_path, caplog):
    # a learning rate too small to move the model off its initialisation: 10 classes, ~0.1
    base = _base(tmp_path, lr=1e-9)
    result = robustness_matrix(base, ["fedavg"], ["none"], [0.0], ["iid"], tmp_path / "grid")
    assert result["chance"] and "at chance" in result["chance"]
    assert any("at chance" in r.message for r in caplog.records)
    assert "WARNING" in (tmp_path / "grid" / "robustness.md").read_text()


def test_a_torn_line_whose_cell_name_is_not_json_is_an_unnamed_problem(tmp_path):
    """An edited rows file must not crash the grid with a JSON traceback: a line naming its
    cell with an invalid escape is torn and unnamed, so nothing is reused from it."""
    path = tmp_path / "grid.rows.jsonl"
    path.write_text('{"cell": "\\uZZZZ", "digest": 1\n')
    stored = gc.read_rows(path)
    assert not stored.by_digest and not stored.problems
    assert len(stored.unnamed) == 1 and "is torn" in stored.unnamed[0]
