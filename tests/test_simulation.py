"""End-to-end federations on small real data (sklearn digits), through the real apps."""

import json

import pytest
import torch
from fedshield.simulations.runner import simulate
from fedshield.tasks import evaluate, get_task
from safetensors.torch import load_file

from fedshield import validation
from tests.config_support import neutral_config


def read_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = neutral_config({"name": "e2e", "output_dir": str(tmp), "task": {"name": "digits"},
                          "federation": {"num_clients": 5, "rounds": 4, "fraction_evaluate": 1.0},
                          "partition": {"kind": "dirichlet", "alpha": 1.0},
                          "train": {"lr": 0.1, "batch_size": 16},
                          "deployment": {"handoff": False}})
    return cfg, simulate(cfg)


def test_accuracy_improves_over_rounds(finished_run):
    cfg, summary = finished_run
    task = get_task("digits")
    torch.manual_seed(cfg.seed)
    untrained = evaluate(task.build_model(), task.load()[1])["accuracy"]
    lines = read_lines(__import__("pathlib").Path(summary.run_dir))
    accs = [m["accuracy"] for m in lines]
    assert accs[-1] > accs[0] + 0.1, accs
    assert accs[-1] > untrained + 0.5 and accs[-1] > 0.8, (untrained, accs)
    assert all(m["client_accuracy"] is not None for m in lines)  # client-side evaluation ran


def test_run_folder_contents(finished_run):
    cfg, summary = finished_run
    run_dir = __import__("pathlib").Path(summary.run_dir)
    assert run_dir.name.startswith("e2e-")
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png",
                 "model.safetensors", "best.safetensors", "checkpoint.json"):
        assert (run_dir / name).is_file(), name
    assert validation.load(run_dir / "config.toml") == cfg
    lines = read_lines(run_dir)
    assert [m["round"] for m in lines] == [1, 2, 3, 4]
    for key in ("accuracy", "loss", "seconds", "epsilon_max", "rejected", "quarantined", "sampled"):
        assert key in lines[0]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final"]["accuracy"] == lines[-1]["accuracy"]
    assert saved["rounds_completed"] == 4 and saved["num_clients"] == 5
    assert saved["strategy"] == "fedavg" and saved["seed"] == 0
    assert {"flwr", "torch", "opacus", "python"} <= set(saved["versions"])
    assert saved["wall_seconds"] > 0
    # The saved final weights reproduce the final accuracy.
    model = get_task("digits").build_model()
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    assert evaluate(model, get_task("digits").load()[1])["accuracy"] == pytest.approx(
        saved["final"]["accuracy"])


def test_same_seed_same_result(finished_run, tmp_path):
    cfg, summary = finished_run
    again = simulate(neutral_config({**cfg.to_dict(), "output_dir": str(tmp_path)}))
    assert again.final.accuracy == pytest.approx(summary.final.accuracy, abs=1e-6)


def test_invalid_client_data_is_refused_and_the_round_goes_on(small_cfg, nan_client):
    """One client holds NaNs: it refuses with the reason, the others train on."""
    summary = simulate(small_cfg(federation={"rounds": 2}))
    lines = read_lines(__import__("pathlib").Path(summary.run_dir))
    for line in lines:
        assert list(line["refused"]) == ["2"]
        assert "invalid-data" in line["refused"]["2"] and "NaN" in line["refused"]["2"]
        assert line["accepted"] == 4
    assert summary.robustness.refused_total == 2
    assert lines[-1]["accuracy"] > 0.5


def test_resume_continues_from_the_checkpoint(small_cfg, tmp_path):
    """Killed after round 2 of 3 (simulated by a 2-round run), resume finishes round 3 with the
    same result as an uninterrupted 3-round run."""
    full = simulate(small_cfg(name="full", federation={"rounds": 3}))
    part = simulate(small_cfg(name="part", federation={"rounds": 2}))
    resumed = simulate(small_cfg(name="part", resume=part.run_dir, federation={"rounds": 3}))
    assert resumed.run_dir == part.run_dir
    lines = read_lines(__import__("pathlib").Path(part.run_dir))
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert resumed.final.accuracy == pytest.approx(full.final.accuracy, abs=1e-6)
