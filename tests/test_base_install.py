"""A base install (no ``[deploy]`` extra) runs a federation to the end and says the hand-off was
skipped; with the extra, the orchestration layer registers the hand-off as a post-run hook."""

import json
import os
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
from fedshield.server import hooks

ROOT = Path(__file__).resolve().parents[1]

# What `pip install fedshield` without extras lacks: the [deploy] extra minus what Flower itself
# depends on (uvicorn, httpx). The path finder on sys.meta_path is swapped for one that does not
# see them, so `import` fails and `find_spec` returns None, as in a real base install (torch probes
# `find_spec("onnx")` and must get None, not an exception).
BLOCKED = ("mlflow", "onnx", "onnxscript", "onnxruntime", "captum")
BLOCKER = f"""
import importlib.machinery, json, sys
BLOCKED = {BLOCKED!r}
class BaseInstallPathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [BaseInstallPathFinder if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
assert BaseInstallPathFinder in sys.meta_path
"""
REPORT_BLOCKED = ("print('LOADED', json.dumps(sorted(m for m in sys.modules "
                  "if m.split('.')[0] in BLOCKED)))")


def base_python(code: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "COLUMNS": "200"}  # one table row per line in rich's summary
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def loaded_blocked(stdout: str) -> list[str]:
    (line,) = [x for x in stdout.splitlines() if x.startswith("LOADED ")]
    return json.loads(line.removeprefix("LOADED "))


@pytest.fixture
def no_hooks(monkeypatch):
    monkeypatch.setattr(hooks, "_HOOKS", {})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_base_install_runs_the_default_simulation_to_the_end(tmp_path):
    # `make run` is `fedshield simulate configs/default.toml`: the same config, made small (digits,
    # 3 clients, 1 round; DP off only to keep this test short) with the hand-off still on.
    registry = tmp_path / "registry.db"
    sets = {"task.name": "digits", "task.model": '""', "federation.num_clients": "3",
            "federation.rounds": "1", "train.batch_size": "32", "train.lr": "0.1",
            "privacy.enabled": "false", "output_dir": f'"{tmp_path / "runs"}"',
            "privacy.ledger_dir": f'"{tmp_path / "ledgers"}"',
            "deployment.registry_uri": f'"sqlite:///{registry}"'}
    argv = ["fedshield", "simulate", str(ROOT / "configs" / "default.toml")]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    code = (f"sys.argv = {argv!r}\nfrom fedshield.cli import main\n"
            f"try:\n    main()\nexcept SystemExit as exc:\n    status = exc.code\n"
            f"{REPORT_BLOCKED}\nsys.exit(status)\n")
    proc = base_python(code, tmp_path, timeout=560)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert loaded_blocked(proc.stdout) == []  # the run never imported the extra
    assert "hand-off skipped" in output and "[deploy] extra is not installed" in output
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    assert "mlflow" in summary["handoff"]["skipped"]
    assert not (summary_path.parent / "export").exists() and not registry.exists()


def test_the_flower_component_registers_a_skip_note_in_a_base_install(tmp_path):
    code = ("import fedshield.flower as component\nfrom flwr.serverapp import ServerApp\n"
            "from fedshield.server.hooks import HANDOFF, registered\nhook = registered(HANDOFF)\n"
            "print('HOOK', json.dumps([isinstance(component.serverapp, ServerApp), "
            "hook.run is None, hook.skipped]))\n" + REPORT_BLOCKED + "\n")
    proc = base_python(code, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HOOK ")]
    is_app, unavailable, reason = json.loads(line.removeprefix("HOOK "))
    assert is_app and unavailable
    assert "missing: mlflow, onnx, onnxscript, onnxruntime, captum" in reason
    assert loaded_blocked(proc.stdout) == []


def test_with_the_extra_the_components_register_the_handoff(no_hooks):
    from fedshield.deployment.hooks import install_post_run_hooks, run_handoff
    from flwr.serverapp import ServerApp

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"]
    module, _, attr = components["serverapp"].partition(":")
    assert isinstance(getattr(import_module(module), attr), ServerApp)
    assert install_post_run_hooks() == []  # this environment has [deploy]
    assert hooks.registered(hooks.HANDOFF).run is run_handoff


def test_an_unregistered_hook_is_skipped_with_a_note(no_hooks, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="flwr"):
        result = hooks.run_post_run_hook(hooks.HANDOFF, tmp_path, None)
    assert result == {"skipped": hooks.NOT_REGISTERED}
    assert "hand-off skipped" in caplog.text


def test_a_failing_hook_is_reported_and_a_working_one_returns_its_result(no_hooks, tmp_path):
    def boom(run_dir, cfg):
        raise OSError("disk full")

    hooks.register_post_run(hooks.HANDOFF, boom)
    assert hooks.run_post_run_hook(hooks.HANDOFF, tmp_path, None) == {
        "error": "OSError: disk full"}
    hooks.register_post_run(hooks.HANDOFF, lambda run_dir, cfg: {"dir": str(run_dir)})
    assert hooks.run_post_run_hook(hooks.HANDOFF, tmp_path, None) == {"dir": str(tmp_path)}
    hooks.mark_unavailable(hooks.HANDOFF, "no extra here")
    assert hooks.run_post_run_hook(hooks.HANDOFF, tmp_path, None) == {"skipped": "no extra here"}
