"""Retraining on drift: a federated fine-tuning run from the champion, through the same gate.

The drift monitor emits a RetrainTrigger; ``launch_retraining`` starts ``fedshield simulate`` (or,
for partner sites, the coordinator's ``flwr run``) from the champion's weights in a separate
process, so serving goes on. The new run ends with the usual hand-off: export, card, registry and
the promotion gate decide whether it replaces the champion.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from fedshield.deployment.artifacts import SAFETENSORS
from fedshield.deployment.drift import RetrainTrigger
from fedshield.deployment.registry import resolve

from fedshield.errors import ConfigError

log = logging.getLogger("fedshield.serving.retrain")


def retrain_command(config_path: str, model_ref: str, registry_uri: str, rounds: int,
                    workdir: Path) -> list[str]:
    """The fine-tuning command: the champion's weights as init_weights, a fresh run name."""
    if not Path(config_path).is_file():
        raise ConfigError(f"retraining config {config_path} does not exist")
    resolved = resolve(model_ref, registry_uri, workdir / "champion")
    weights = Path(resolved.local_dir) / SAFETENSORS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [sys.executable, "-m", "fedshield.cli", "simulate", config_path,
            "--set", f'init_weights="{weights}"', "--set", f"federation.rounds={rounds}",
            "--set", f'name="retrain-{stamp}"', "--json"]


def launch_retraining(trigger: RetrainTrigger, config_path: str, model_ref: str,
                      registry_uri: str, rounds: int, workdir: str | Path) -> subprocess.Popen:
    """Record the trigger and start the fine-tuning run in the background."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = retrain_command(config_path, model_ref, registry_uri, rounds, workdir)
    (workdir / "trigger.json").write_text(json.dumps({**trigger.to_dict(), "command": cmd},
                                                     indent=2))
    out = open(workdir / "retrain.log", "w")  # noqa: SIM115 — owned by the child process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    log.warning("retraining run started (pid %d, output in %s): %s", proc.pid,
                workdir / "retrain.log", trigger.reason,
                extra={"event": "retrain_started", "pid": proc.pid,
                       "log_file": str(workdir / "retrain.log"), "command": cmd})
    return proc
