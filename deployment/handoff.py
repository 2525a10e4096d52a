"""The hand-off after the last round: export -> card -> register -> gate.

It runs as the ServerApp's post-run hook (server/hooks.py), which deployment/hooks.py registers
when the ``[deploy]`` extra is installed; the ServerApp never imports this module.

A run whose summary says ``status = "failed"`` is refused before anything is exported."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fedshield.deployment.artifacts import CARD_MD, REFERENCE_JSON, load_weights
from fedshield.deployment.card import build_card
from fedshield.deployment.export import export_model
from fedshield.deployment.gate import promote
from fedshield.deployment.policy import GatePolicy
from fedshield.deployment.reference_stats import (
    Reference,
    names_for,
    reference_from_data,
    with_client_class_priors,
)
from fedshield.deployment.registry import refuse_failed_run, register
from fedshield.tasks import task_for

from fedshield.errors import FedShieldError
from fedshield.run_records import DataQuality, read_summary
from fedshield.schema import Config

EXPORT_DIR = "export"


@dataclass
class HandoffResult:
    """What the hand-off of a finished run registered: version, gate verdict, card and export."""
    model_name: str
    version: str
    passed: bool
    reasons: list[str]
    card_path: str
    export_dir: str
    model_uri: str          # models:/NAME/VERSION
    checks: list[dict]

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict."""
        return asdict(self)


def model_name_for(cfg: Config) -> str:
    """The registered model name: deployment.model_name, else ``fedshield-<task>``."""
    return cfg.deployment.model_name or f"fedshield-{cfg.task.name.replace(':', '-')}"


def drift_reference(run_dir: Path, cfg: Config, out_dir: Path,
                    data_quality: DataQuality | Mapping | None = None) -> Reference:
    """The run's merged DP client reference if the server wrote one, else the server's eval split
    with the class priors of the clients' released histograms (``data_quality``) when known."""
    path = run_dir / REFERENCE_JSON
    if path.is_file():
        reference = Reference.load(path)
    else:
        task = task_for(cfg.task)
        test = task.load()[1]
        reference = reference_from_data(test.x, test.y, task.input_shape, task.num_classes,
                                        names_for(task.input_shape, task.feature_names),
                                        cfg.deployment.reference_bins,
                                        "server evaluation split (no client data, no noise)")
        reference = with_client_class_priors(reference, data_quality)
    reference.save(out_dir / REFERENCE_JSON)
    return reference


def handoff(run_dir: str | Path, cfg: Config) -> HandoffResult:
    """Export, document, register and gate the run's model; also writes ``run_dir/handoff.json``."""
    run = Path(run_dir)
    weights = run / ("best.safetensors" if cfg.deployment.weights == "best"
                     else "model.safetensors")
    if not weights.is_file():
        raise FedShieldError(f"{weights} does not exist; the run folder must hold the global "
                             f"weights (deployment.weights = {cfg.deployment.weights!r})")
    summary = read_summary(run)
    refuse_failed_run(summary, run)  # before anything is exported or registered
    task = task_for(cfg.task)
    out = run / EXPORT_DIR
    if out.exists():
        shutil.rmtree(out)
    privacy = summary.privacy
    metadata = {"run": summary.name or run.name, "weights": cfg.deployment.weights,
                "rounds": summary.rounds, "dp": privacy.enabled,
                "epsilon_max": privacy.epsilon_max}
    test = task.load()[1]
    if cfg.task.eval_examples:
        test = test.subset(np.arange(min(cfg.task.eval_examples, len(test))))
    export = export_model(task, load_weights(weights), out, metadata,
                          quantize=cfg.deployment.quantize, test=test)
    reference = drift_reference(run, cfg, out, summary.data_quality)
    card = build_card(run, export, cfg.deployment.explain_examples, reference.source)
    name = model_name_for(cfg)
    # The policy is stored with the version; this and every later promotion applies it.
    version = register(run, export, card, cfg.deployment.registry_uri, name,
                       policy=GatePolicy.from_deployment(cfg.deployment))
    decision = promote(cfg.deployment.registry_uri, name, version)
    result = HandoffResult(name, version, decision.passed, decision.reasons, str(out / CARD_MD),
                           str(out),
                           f"models:/{name}/{version}", decision.checks)
    (run / "handoff.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
