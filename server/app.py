"""fedshield ServerApp: run the configured federation and write the run folder.

The same app runs under ``fedshield simulate`` (in-process grid), ``flwr run .`` (Flower's
simulation runtime) and on a SuperLink with real SuperNodes. This module is Flower plumbing
only: the strategies are server/strategy.py and server/secagg.py, the run folder and its
bookkeeping server/recording.py; every grid it gets is wrapped in server/prompt_grid.py (replies
pulled promptly, each exchange timed).
"""

from __future__ import annotations

from collections.abc import Callable

from fedshield.server.checkpoint import load_checkpoint
from fedshield.server.hooks import install_reply_hooks
from fedshield.server.preflight import preflight
from fedshield.server.prompt_grid import PromptGrid
from fedshield.server.recording import RunRecorder, train_round_config
from fedshield.server.reference import after_last_round
from fedshield.server.secagg import run_secagg_federation
from fedshield.server.strategy import ShieldStrategy
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedshield import schema, validation
from fedshield.errors import RunFailed, TooFewUpdates
from fedshield.run_records import RunSummary

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


def end_of_round(run: RunRecorder, strategy: ShieldStrategy) -> EvaluateFn:
    """The ``evaluate_fn`` for Flower's ``Strategy.start``: it is called before round 1 and at
    the end of every round, which is where the run records the round (server evaluation,
    metrics line, best weights, checkpoint). Flower counts each segment's rounds from 1; the
    metrics line gets the run's round."""

    def evaluate_fn(segment_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if segment_round == 0:  # the model before round 1: already evaluated and recorded
            return None
        rnd = strategy.federation.run_round(segment_round)
        weights = arrays.to_torch_state_dict()
        server_eval = run.evaluate_round(weights)
        run.on_round(rnd, weights, strategy.round.record(rnd, server_eval))
        metrics: dict[str, int | float | list[int] | list[float]] = dict(server_eval)
        return MetricRecord(metrics)

    return evaluate_fn


def run_federation(grid: Grid, cfg: schema.Config, reporter=None,
                   run_dir: str | None = None) -> RunSummary:
    """Train for ``cfg.federation.rounds`` rounds; returns the summary written to summary.json.

    A resumed run (``cfg.resume``) continues after its checkpoint's round: Flower's
    ``Strategy.start`` drives the remaining rounds, starting from the checkpoint's state."""
    if cfg.secagg.enabled:  # sum-only aggregation through Flower's SecAgg+ workflow
        return run_secagg_federation(grid, cfg, reporter, run_dir)
    strategy = ShieldStrategy(cfg)
    # Replies pulled every reply_poll_s, not Flower's 3 s; each exchange's time is noted.
    grid = PromptGrid(grid, cfg.federation.reply_poll_s, strategy.federation.note_exchange)
    install_reply_hooks(strategy, cfg)  # a simulated attack's hook (simulations/ registers it)
    run = RunRecorder(cfg, strategy, reporter, run_dir)
    strategy.federation.resume_after(run.start_round - 1)
    remaining = cfg.federation.rounds - (run.start_round - 1)
    initial = ArrayRecord(run.initial_weights)
    train_config = ConfigRecord(train_round_config(cfg, run.folder))
    # Evaluation messages carry the run key too: a DP client records its releases under it.
    evaluate_config = ConfigRecord({k: v for k, v in dict(train_config).items()
                                    if k in ("num-rounds", "run-key")})
    stopped = ""
    result_arrays = initial
    try:
        if remaining > 0:
            result = strategy.start(grid, initial, remaining,
                                    timeout=cfg.federation.round_timeout,
                                    train_config=train_config,
                                    evaluate_config=evaluate_config,
                                    evaluate_fn=end_of_round(run, strategy))
            # Flower's Result holds no arrays when no round produced a new model.
            result_arrays = result.arrays if len(result.arrays) else initial
    except TooFewUpdates as exc:
        stopped = str(exc)
        ckpt = load_checkpoint(run.folder.path)
        if ckpt is not None:
            result_arrays = ArrayRecord(ckpt.weights)
    after_last_round(grid, cfg, run.folder, strategy)  # the clients' drift-reference counts
    return run.finish(result_arrays.to_torch_state_dict(), stopped)


def build_server_app(reporter=None, run_dir: str | None = None,
                     on_summary: Callable[[RunSummary], None] | None = None) -> ServerApp:
    """The ServerApp; the in-process runner passes its reporter and run folder, and gets the
    run's summary through ``on_summary`` (without reading summary.json back)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = validation.from_run_config(context.run_config)
        preflight(cfg, partitions="warn")  # fail a config that cannot run before round 1
        summary = run_federation(grid, cfg, reporter, run_dir)
        if on_summary is not None:
            on_summary(summary)
        if summary.failed:
            # Flower marks a run whose ServerApp main raised as failed (run_serverapp); the
            # in-process runner and the CLI see this typed error (summary.json is written).
            raise RunFailed(f"{summary.failure} (run folder {summary.run_dir})", summary)

    return app


app = build_server_app()
