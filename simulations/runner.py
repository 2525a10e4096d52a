"""Run a configured federation on one machine.

``engine = "inprocess"`` (default) drives the real ServerApp and ClientApps through fedshield's
in-process grid: deterministic, no Ray; its clients train in ``federation.workers`` persistent
processes (simulations/workers.py), with the same results for any number of them.
``engine = "ray"`` runs the same apps on Flower's Ray backend, locally or on a cluster
(simulations/ray_engine.py). Simulated attacks run on both: the omniscient attacker is a reply
hook on the server's strategy (server.hooks), registered here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedshield.client.app import make_client_app
from fedshield.deployment.hooks import install_post_run_hooks
from fedshield.deployment.html_report import REPORT_HTML, write_report
from fedshield.deployment.tracking import log_outcome
from fedshield.server.app import build_server_app
from fedshield.server.outputs import RunFolder, new_run_dir
from fedshield.server.preflight import preflight
from fedshield.server.report import ConsoleReporter
from fedshield.simulations.adversary import install_attack_hook
from fedshield.simulations.grid import InProcessGrid
from fedshield.simulations.reference_truth import write_pooled_truth
from fedshield.simulations.workers import client_costs, federation_apps, federation_pool
from flwr.app import Context, RecordDict

from fedshield import schema
from fedshield.errors import RunFailed
from fedshield.run_records import AttackReport, RunSummary


def simulate(cfg: schema.Config, reporter=None) -> RunSummary:
    """Run ``cfg`` and return its summary (also in ``<run folder>/summary.json``)."""
    preflight(cfg)  # refuse what cannot run before a run folder exists or anything trains
    install_post_run_hooks()  # the hand-off, or the note why a base install skips it
    install_attack_hook()  # simulated attacks: the ServerApp installs it when attack.name asks
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg)
    write_pooled_truth(cfg, run_dir)  # the drift reference's yardstick (simulations only)
    summaries: list[RunSummary] = []  # the ServerApp hands its summary over (no read-back)
    server_app = build_server_app(reporter, str(run_dir), on_summary=summaries.append)
    run_config = cfg.flat()
    if cfg.federation.engine == "ray":
        from fedshield.simulations.ray_engine import run_on_ray

        run_on_ray(cfg, server_app, run_dir)
    else:
        # Byzantine data swapped in; their updates: the strategy's attack hook, not the grid
        client_apps, _ = federation_apps(cfg, make_client_app)
        grid = InProcessGrid(client_apps, run_config, cfg.seed)
        context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=run_config)
        with federation_pool(cfg, grid.run_id) as pool:  # federation.workers processes, or none
            grid.use_workers(pool, client_costs(cfg) if pool else None)
            server_app(grid, context)
    if not summaries:  # a ServerApp that died before its summary (its error is logged above)
        raise RunFailed(f"the run in {run_dir} ended without a summary; the ServerApp's error "
                        "is in the log above")
    summary = summaries[-1]
    if cfg.attack.name != "none":
        # The attack report needs the final model: added once the ServerApp has written it.
        summary = replace(summary, attack_report=attack_report(cfg, run_dir))
        RunFolder(run_dir).write_summary(summary)
        if (run_dir / REPORT_HTML).is_file():  # the post-run hook's report, now with the attack
            write_report(run_dir)
        # who attacked and who was caught, by partition id with the node id beside it
        if show := getattr(reporter or ConsoleReporter(), "attack", None):
            show(summary.attack_report, summary.node_partitions)
        log_outcome(summary.post_run.get("tracking"), summary, run_dir)  # MLflow: the rates too
    return summary


def attack_report(cfg: schema.Config, run_dir: Path) -> AttackReport:
    """Who was Byzantine, who got caught, and (for backdoors) the attack's success rate."""
    from fedshield.server.reputation import detection_rate, false_quarantine_rate
    from fedshield.simulations.adversary import backdoor_success, byzantine_ids
    from fedshield.tasks import task_for
    from safetensors.torch import load_file

    byz = byzantine_ids(cfg)
    lines = RunFolder(run_dir).read_metrics()
    quarantined = set(lines[-1].quarantined) if lines else set()
    success = None
    if cfg.attack.name == "backdoor":
        model = task_for(cfg.task).build_model()
        model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        success = backdoor_success(cfg, model)
    return AttackReport(byzantine_ids=tuple(sorted(byz)), quarantined=tuple(sorted(quarantined)),
                        detection_rate=detection_rate(quarantined, byz),
                        false_quarantine_rate=false_quarantine_rate(
                            quarantined, byz, cfg.federation.num_clients),
                        backdoor_success=success)
