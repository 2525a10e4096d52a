"""`flwr run .` drives the same ServerApp/ClientApp through Flower's own simulation runtime."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedshield import configio
from tests.config_support import neutral_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # fixed by flwr's managed local SuperLink


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_flwr_run_local_simulation(tmp_path):
    if _port_in_use(LOCAL_SUPERLINK_PORT):
        pytest.skip("a local Flower SuperLink already runs on 127.0.0.1:39091")
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 1\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    out = tmp_path / "runs"
    overrides = configio.to_run_config_overrides(neutral_config({
        "task": {"name": "digits"}, "federation": {"num_clients": 3, "rounds": 2},
        "train": {"lr": 0.1}, "output_dir": str(out), "deployment": {"handoff": False}}))
    try:
        proc = subprocess.run([str(bin_dir / "flwr"), "run", str(ROOT), "--run-config", overrides,
                               "--stream"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=360)
    finally:
        # The managed SuperLink (its log path names our FLWR_HOME) and its executor.
        subprocess.run(["pkill", "-f", str(home)], check=False)
        subprocess.run(["pkill", "-f", f"flower-superexec.*127.0.0.1:{LOCAL_SUPERLINK_PORT}"],
                       check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = list(out.glob("*/summary.json"))
    assert len(summaries) == 1, proc.stdout[-3000:]
    summary = json.loads(summaries[0].read_text())
    assert summary["rounds_completed"] == 2 and summary["num_clients"] == 3
    metrics = summaries[0].parent / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert all(m["accepted"] == 3 for m in lines)  # every simulated SuperNode trained
    assert lines[-1]["accuracy"] > 0.3
