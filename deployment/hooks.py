"""Registers the ServerApp's post-run hooks: the hand-off when the ``[deploy]`` extra is installed,
and MLflow tracking when MLflow is.

Importable in a base install: this module imports no deployment dependency. It only looks for the
extra's modules (``importlib.util.find_spec``, which consults the same import machinery a real
import would) and, when one is missing, records why the hand-off will be skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedshield.deployment.html_report import REPORT_HOOK, report_hook
from fedshield.server.hooks import HANDOFF, TRACKING, mark_unavailable, register_post_run

from fedshield.schema import Config

# What the hand-off imports from the [deploy] extra: MLflow registry, ONNX export (dynamo needs
# onnxscript) and its onnxruntime parity check, Captum explanations for the model card.
DEPLOY_MODULES = ("mlflow", "onnx", "onnxscript", "onnxruntime", "captum")


def missing_deploy_modules() -> list[str]:
    """The ``[deploy]`` extra's modules that cannot be imported here (empty: all present)."""
    missing = []
    for name in DEPLOY_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed module
            found = False
        if not found:
            missing.append(name)
    return missing


def run_handoff(run_dir: Path, cfg: Config) -> dict:
    """The post-run hook: export, card, register, gate (deployment.handoff), as a summary dict."""
    from fedshield.deployment.handoff import handoff  # the extra's imports happen only when it runs

    return handoff(run_dir, cfg).to_dict()


def run_tracking(run_dir: Path, cfg: Config) -> dict:
    """The post-run hook: log the run to MLflow (deployment.tracking), after the report; with
    ``tracking.enabled`` and no MLflow installed, a note once per process says what to do."""
    from fedshield.deployment.tracking import track_run  # imports MLflow only when it runs

    return track_run(run_dir, cfg)


def install_post_run_hooks() -> list[str]:
    """Register the post-run hooks (hand-off, report, tracking), or the reason each is skipped;
    returns the hand-off's missing modules. They run in server/hooks.py's POST_RUN_ORDER."""
    register_post_run(REPORT_HOOK, report_hook)  # report.html: standard library, always there
    register_post_run(TRACKING, run_tracking)  # it notes itself when MLflow is missing
    missing = missing_deploy_modules()
    if missing:
        mark_unavailable(HANDOFF, f"the [deploy] extra is not installed (missing: "
                                  f"{', '.join(missing)}); install it with "
                                  f"`pip install 'fedshield[deploy]'` to export and register "
                                  f"the model, or set deployment.handoff = false")
    else:
        register_post_run(HANDOFF, run_handoff)
    return missing
