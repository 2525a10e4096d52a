"""Every corrupted state file in a run folder is a clear refusal, never a silent resume."""

import json
import logging
from pathlib import Path

import pytest
import torch
from fedshield.server.checkpoint import STATE, load_checkpoint, save_checkpoint
from fedshield.server.outputs import RunFolder
from fedshield.server.preflight import check_resume, preflight

from fedshield import configio, validation
from fedshield.errors import ConfigError, StateCorrupted
from fedshield.run_records import MetricsLine
from tests.config_support import neutral_config


def write_run(folder: Path, rounds: int = 2) -> dict[str, torch.Tensor]:
    """A run folder as the server leaves it after ``rounds`` rounds: metrics + checkpoint."""
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    run = RunFolder(folder)
    for rnd in range(1, rounds + 1):
        run.append_metrics(MetricsLine(round=rnd, accuracy=0.5 + rnd / 10))
        save_checkpoint(folder, rnd, weights,
                        {"momentum": torch.full((3,), float(rnd)), "reputation": {"7": 0.25}})
    return weights


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "run-1"
    write_run(folder)
    return folder


def test_a_clean_checkpoint_round_trips(run_dir):
    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 2
    assert torch.equal(ckpt.weights["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(ckpt.state["momentum"], torch.full((3,), 2.0))
    assert ckpt.state["reputation"] == {"7": 0.25}
    check_resume(run_dir)  # no error


def test_a_flipped_byte_in_the_weights_is_refused(run_dir):
    slot = run_dir / json.loads((run_dir / STATE).read_text())["weights"]
    raw = bytearray(slot.read_bytes())
    raw[-3] ^= 0x01  # inside the tensor data: still a valid safetensors file
    slot.write_bytes(bytes(raw))
    with pytest.raises(StateCorrupted, match="does not match the sha256"):
        load_checkpoint(run_dir)


@pytest.mark.parametrize("cut", [0, 1, 10, -1])
def test_a_truncated_checkpoint_json_is_refused(run_dir, cut):
    text = (run_dir / STATE).read_text()
    (run_dir / STATE).write_text(text[:cut] if cut >= 0 else text[:len(text) // 2])
    with pytest.raises(StateCorrupted, match="not valid JSON"):
        load_checkpoint(run_dir)


def test_a_hand_edited_checkpoint_json_is_refused(run_dir):
    meta = json.loads((run_dir / STATE).read_text())
    meta["state"]["reputation"]["7"] = 0.0  # forgive a suspicious client
    (run_dir / STATE).write_text(json.dumps(meta))
    with pytest.raises(StateCorrupted, match="digest"):
        load_checkpoint(run_dir)


def test_a_checkpoint_without_hashes_is_refused(run_dir):
    meta = json.loads((run_dir / STATE).read_text())
    for key in ("format", "digest", "weights_sha256"):
        meta.pop(key)
    (run_dir / STATE).write_text(json.dumps(meta))
    with pytest.raises(StateCorrupted, match="without integrity hashes"):
        load_checkpoint(run_dir)


def test_a_missing_or_swapped_weights_slot_is_refused(run_dir):
    meta = json.loads((run_dir / STATE).read_text())
    (run_dir / meta["weights"]).unlink()
    with pytest.raises(StateCorrupted, match="is missing"):
        load_checkpoint(run_dir)


def test_a_path_in_the_weights_field_is_refused(run_dir):
    """checkpoint.json may only name its own two slots (no path out of the run folder)."""
    meta = json.loads((run_dir / STATE).read_text())
    meta["weights"] = "../elsewhere.safetensors"
    from fedshield.server.checkpoint import _digest

    meta["digest"] = _digest(meta)  # even with a matching digest
    (run_dir / STATE).write_text(json.dumps(meta))
    with pytest.raises(StateCorrupted, match="malformed"):
        load_checkpoint(run_dir)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run_dir, caplog):
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 3, "accur')
    with caplog.at_level(logging.WARNING, logger="fedshield.outputs"):
        rows = RunFolder(run_dir).read_metrics()
    assert [r.round for r in rows] == [1, 2]
    assert "torn last line 3" in caplog.text
    RunFolder(run_dir).truncate_metrics(2)  # what a resume does: the torn line is gone
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    check_resume(run_dir)


@pytest.mark.parametrize("bad", ['{"round": 1, "accur', "[1, 2]", '{"round": "1"}', "\x00\x00"])
def test_a_corrupt_middle_metrics_line_is_refused(run_dir, bad):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], bad, lines[1]]) + "\n")
    with pytest.raises(StateCorrupted, match="line 2 is not a metrics record"):
        RunFolder(run_dir).read_metrics()
    with pytest.raises(StateCorrupted):
        check_resume(run_dir)


def test_a_corrupt_last_line_with_its_newline_is_not_a_torn_write(run_dir):
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(StateCorrupted, match="line 3"):
        RunFolder(run_dir).read_metrics()


def test_metrics_rounds_out_of_order_are_refused(run_dir):
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"round": 1}\n')
    with pytest.raises(StateCorrupted, match="round 1 after round 2"):
        RunFolder(run_dir).read_metrics()


def test_non_utf8_metrics_are_refused(run_dir):
    (run_dir / "metrics.jsonl").write_bytes(b'{"round": 1}\n\xff\xfe\n')
    with pytest.raises(StateCorrupted, match="not UTF-8"):
        RunFolder(run_dir).read_metrics()


def test_truncated_metrics_behind_the_checkpoint_are_refused(run_dir):
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # round 2 lost, checkpoint at 2
    with pytest.raises(StateCorrupted, match="checkpoint is at round 2"):
        check_resume(run_dir)


def test_a_deleted_checkpoint_with_results_present_is_refused(run_dir):
    (run_dir / STATE).unlink()
    assert load_checkpoint(run_dir) is None  # the library call itself just finds none...
    with pytest.raises(StateCorrupted, match="no checkpoint.json"):
        check_resume(run_dir)  # ...but resuming (never restarting at round 1 there) is refused


def test_resume_into_an_empty_or_missing_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is empty"):
        check_resume(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        check_resume(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_resume(tmp_path / "file")


def test_the_runner_refuses_a_bad_resume_before_training(small_cfg, tmp_path, monkeypatch):
    """simulate() with resume into an empty folder fails in pre-flight: no round runs."""
    import fedshield.simulations.runner as runner

    monkeypatch.setattr(runner, "build_server_app", lambda *a: pytest.fail("training started"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="nothing to resume"):
        runner.simulate(small_cfg(resume=str(tmp_path / "empty")))


def test_a_real_run_resumes_only_from_an_intact_checkpoint(small_cfg):
    """End to end: a 1-round run's checkpoint verifies; after a flipped weight byte, resume is
    refused by the runner's pre-flight, before anything trains."""
    from fedshield.simulations.runner import simulate

    summary = simulate(small_cfg(federation={"rounds": 1}))
    run_dir = Path(summary.run_dir)
    cfg = small_cfg(resume=str(run_dir), federation={"rounds": 2})
    preflight(cfg)  # intact: accepted
    slot = run_dir / json.loads((run_dir / STATE).read_text())["weights"]
    raw = bytearray(slot.read_bytes())
    raw[len(raw) // 2] ^= 0x80
    slot.write_bytes(bytes(raw))
    with pytest.raises(StateCorrupted, match="sha256"):
        simulate(cfg)
    assert [m.round for m in RunFolder(run_dir).read_metrics()] == [1]  # nothing was redone


def test_resolved_config_with_odd_strings_reloads(tmp_path):
    """config.toml is written so that it always loads back (quotes, backslashes, unicode)."""
    cfg = neutral_config({"name": "x", "output_dir": 'a "quoted" \\ dir é',
                          "deployment": {"model_name": "m\\n"}})
    path = tmp_path / "c.toml"
    path.write_text(configio.to_toml(cfg))
    assert validation.load(path) == cfg
    assert '"\\u0007"' in configio.toml_value("\x07")  # control characters are escaped, too
