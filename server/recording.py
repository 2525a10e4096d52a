"""Run recording, shared by both run modes (plain and SecAgg+): the run folder, initial weights
(from the checkpoint when resuming), server-side evaluation, one metrics line per round, best
weights, checkpoints, progress, and the end of the run (final weights, summary, plot, hand-off).

What the recorder needs from a strategy is :class:`RecordedStrategy`; both strategies provide it
from the one federation state they hold (server/federation_state.py).
"""


from __future__ import annotations

import time
from dataclasses import asdict, replace
from logging import WARNING
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from fedshield.privacy.accounting import SAMPLE_LEVEL, USER_LEVEL, describe
from fedshield.privacy.reference import REFERENCE_NEW_KEY, REFERENCE_NOISE_KEY, reference_event
from fedshield.privacy.releases import (
    OUTSIDE_KEY,
    STATS_NEW_KEY,
    STATS_NOISE_KEY,
    class_counts_from_metrics,
    histogram_event,
    merge_class_counts,
)
from fedshield.server.averaging import ModelAverage
from fedshield.server.checkpoint import load_checkpoint, save_checkpoint
from fedshield.server.federation_state import RoundState
from fedshield.server.hooks import HANDOFF, run_after_handoff, run_post_run_hook
from fedshield.server.outputs import RunFolder, library_versions, new_run_dir
from fedshield.server.reference import read_collection
from fedshield.server.report import ConsoleReporter
from fedshield.server.reputation import Reputation
from fedshield.tasks import Split, evaluate, get_task, resolve_device, task_for
from flwr.common import log

from fedshield import configio, schema
from fedshield.errors import ConfigError
from fedshield.run_records import (
    AGGREGATED,
    COMPLETED,
    FAILED,
    BestRound,
    CentralDPSummary,
    ClassCounts,
    DataQuality,
    DPEventLine,
    FinalMetrics,
    HandoffSummary,
    MetricsLine,
    PrivacySummary,
    PrivacyUnits,
    ReleaseEvent,
    RobustnessSummary,
    RunSummary,
)


@runtime_checkable
class RecordedStrategy(Protocol):
    """Exactly what RunRecorder, the metrics line and the summary read from a strategy.

    A round record's ``state`` is a RoundState whose ``reports`` are decoded
    (fedshield.records), never raw reply metrics.
    """

    @property
    def node_partition(self) -> dict[int, int]:
        """Node id -> partition label (clients are reported by label where known)."""
        ...

    @property
    def reputation(self) -> Reputation | None:
        """The reputation tracker, for the quarantined clients (None when off)."""
        ...

    @property
    def exhausted(self) -> dict[int, str]:
        """Nodes that refused because their privacy budget is spent."""
        ...

    def user_level_epsilon(self, rounds: int) -> float | None:
        """Central DP's user-level epsilon after ``rounds`` rounds (None without it)."""
        ...

    def state_dict(self) -> dict:
        """The state a checkpoint keeps."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state."""
        ...



def server_test_split(task_name: str, limit: int) -> Split:
    """The task's test split for server-side evaluation, cut to ``limit`` examples if set."""
    _, test = get_task(task_name).load()
    return test if not limit or limit >= len(test) else test.subset(np.arange(limit))


def metrics_line(rnd: int, record: dict, strategy: RecordedStrategy) -> MetricsLine:
    """One round's line of metrics.jsonl, from the round's decoded reports (fedshield.records)."""
    state: RoundState = record["state"]
    part = strategy.node_partition

    def label(n: int) -> int:  # partition id where known, else node id
        return part.get(n, n)

    reports = state.reports
    eps = {str(label(n)): r.epsilon for n, r in reports.items() if r.epsilon is not None}
    evaluation = state.evaluation
    if evaluation is not None:  # evaluation's releases come after training's: the later total
        for key, spent in evaluation.epsilon.items():
            eps[key] = max(eps.get(key, 0.0), spent)
    # The privacy events of this round, per client: enough to recompute every epsilon.
    dp = {str(label(n)): DPEventLine(**asdict(r.dp), release=release_event(r.extra),
                                     reference=reference_release_event(r.extra))
          for n, r in reports.items() if r.dp is not None}
    # Class histograms as released: noised under DP (privacy/releases.py), exact without it.
    counts = {str(label(n)): c for n, r in reports.items()
              if (c := class_counts_from_metrics(r.extra)) is not None}
    quarantined_nodes = strategy.reputation.quarantined if strategy.reputation else set()
    quarantined = sorted(label(n) for n in quarantined_nodes)
    # Every node the line names, by its node id -> partition id: a user reads both (a node id is
    # what Flower's logs show, the partition id is what the attack report and the data show).
    named = (set(state.sampled) | set(reports) | set(state.rejected) | set(state.refused)
             | set(state.ignored_claims) | set(state.newly_quarantined) | set(quarantined_nodes))
    return MetricsLine(
        round=rnd,
        status=FAILED if state.skipped else AGGREGATED,
        accuracy=record["server_eval"].get("accuracy"),
        loss=record["server_eval"].get("loss"),
        client_accuracy=record["client_eval"].get("accuracy"),
        train_loss=record["train"].get("train-loss"),
        epsilon=eps,
        epsilon_max=max(eps.values()) if eps else None,
        epsilon_mean=float(np.mean(list(eps.values()))) if eps else None,
        dp_events=dp,
        central_epsilon=strategy.user_level_epsilon(rnd),
        # What each epsilon above measures (the accountant and delta are in the summary).
        privacy_unit=PrivacyUnits(epsilon=SAMPLE_LEVEL, central_epsilon=USER_LEVEL),
        sampled=len(state.sampled),
        accepted=len(state.accepted),
        rejected={str(label(n)): r for n, r in state.rejected.items()},
        rejected_codes=state.rejected_codes,
        refused={str(label(n)): r for n, r in state.refused.items()},
        ignored_claims={str(label(n)): r for n, r in state.ignored_claims.items()},
        newly_quarantined=tuple(sorted(label(n) for n in state.newly_quarantined)),
        quarantined=tuple(quarantined),
        aggregation=state.aggregation_info,
        skipped=state.skipped,
        seconds=round(record["seconds"], 3),
        # The server's own share of those seconds (outside the round's message exchanges).
        server_seconds=round(record["server_seconds"], 3) if "server_seconds" in record
        else None,
        # Each client's own wall time for the round (data, training, encoding), to tell
        # computation from transport and polling in deployments.
        client_seconds={str(label(n)): round(r.client_seconds, 3)
                        for n, r in reports.items() if r.client_seconds is not None},
        class_counts={k: ClassCounts(counts=tuple(c), noise_std=std)
                      for k, (c, std) in counts.items()},
        outside_guarantee=tuple(outside_guarantee([r.extra for r in reports.values()],
                                                  record["client_eval"])),
        evaluation=evaluation,
        node_partitions={str(n): part[n] for n in sorted(named) if n in part},
        timestamp=round(time.time(), 3),
    )


def run_failure(lines: list[MetricsLine], stopped: str) -> str:
    """Why a run failed ("" when it did not): no round produced a new global model."""
    if any(m.aggregated for m in lines):
        return ""
    if not lines:
        return f"no round completed: {stopped}" if stopped else "no round completed"
    codes: dict[str, int] = {}
    for m in lines:
        for code, n in m.rejected_codes.items():
            codes[code] = codes.get(code, 0) + n
    refused = sum(len(m.refused) for m in lines)
    detail = ", ".join(f"{n} {c}" for c, n in sorted(codes.items())) or "none"
    return (f"every round failed ({len(lines)}), the model was never updated; last round: "
            f"{lines[-1].skipped or 'no aggregation'}; rejections over the run: {detail}; "
            f"refusals: {refused}" + (f"; stopped: {stopped}" if stopped else ""))


def release_event(metrics) -> ReleaseEvent | None:
    """The client's statistics-release event, in the round whose ledger entry holds it (the
    server can then recompute every client epsilon from the metrics lines alone)."""
    return _new_event(metrics, STATS_NEW_KEY, STATS_NOISE_KEY, histogram_event)


def reference_release_event(metrics) -> ReleaseEvent | None:
    """The client's drift-reference release event, in the round whose ledger entry holds it
    (privacy/reference.py), like :func:`release_event`."""
    return _new_event(metrics, REFERENCE_NEW_KEY, REFERENCE_NOISE_KEY, reference_event)


def _new_event(metrics, new_key: str, noise_key: str, event) -> ReleaseEvent | None:
    if metrics.get(new_key) != 1.0 or noise_key not in metrics:
        return None
    try:
        noise, rate, steps = event(float(metrics[noise_key]))
    except (TypeError, ValueError, ConfigError):
        return None
    return ReleaseEvent(noise_multiplier=noise, sample_rate=rate, steps=steps)


def outside_guarantee(train_metrics, client_eval: dict) -> list[str]:
    """The metrics-line values this round that clients released exactly under DP, by opt-in."""
    out = []
    if any(m.get(OUTSIDE_KEY) for m in train_metrics):
        out += ["class_counts", "client_seconds", "train_loss"]
    if client_eval.get(OUTSIDE_KEY):
        out += ["client_accuracy", "evaluation"]
    return out


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Initial weights from a safetensors file (ConfigError if it does not exist)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"init_weights = {path!r} does not exist")
    return {k.removeprefix("_module."): v for k, v in load_file(path).items()}


class RunRecorder:
    """What both run modes (plain and SecAgg+) share: the run folder, the initial weights (from
    the checkpoint when resuming), server-side evaluation, the per-round bookkeeping (metrics line,
    best weights, checkpoint, progress) and the end of the run (final weights, summary, plot).
    With ``aggregation.model_ema`` the evaluated, best and final weights are the running average
    of the global models (server/averaging.py); checkpoints keep the raw model and the average.

    ``strategy`` needs ``node_partition``, ``reputation``, ``exhausted``, ``user_level_epsilon()``
    and ``state_dict()`` / ``load_state_dict()``; a round record's ``state`` is a RoundState whose
    ``reports`` are decoded (fedshield.records), never raw reply metrics.
    """

    def __init__(self, cfg: schema.Config, strategy, reporter=None,
                 run_dir: str | None = None) -> None:
        self.started = time.perf_counter()
        self.cfg, self.strategy = cfg, strategy
        self.reporter = reporter or ConsoleReporter()
        self.task = task_for(cfg.task)
        self.folder = RunFolder(Path(run_dir or cfg.resume) if (run_dir or cfg.resume)
                                else new_run_dir(cfg))
        torch.manual_seed(cfg.seed)
        self.model = self.task.build_model()
        if cfg.init_weights:
            self.model.load_state_dict(load_weights(cfg.init_weights))
        self.start_round = 1
        self.initial_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.average = ModelAverage(cfg.aggregation.model_ema)
        checkpoint = load_checkpoint(self.folder.path) if cfg.resume else None
        if checkpoint is not None:
            # In the model's order: Flower's legacy messages (SecAgg+) carry unnamed arrays.
            self.initial_weights = {k: checkpoint.weights[k] for k in self.model.state_dict()}
            strategy.load_state_dict(checkpoint.state)
            self.average.load_state_dict(checkpoint.state.get("model_average"))
            self.start_round = checkpoint.round + 1
            self.folder.truncate_metrics(checkpoint.round)
        self.folder.write_config(cfg)
        self.reporter.start(cfg, self.folder.path)
        self.test = server_test_split(cfg.task.name, cfg.task.eval_examples)
        self.device = resolve_device(cfg.train.device)
        self.best_acc = max((m.accuracy for m in self.folder.read_metrics()
                             if m.accuracy is not None), default=-1.0)

    def evaluate_round(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Server-side evaluation of this round's released model: the new global model, or with
        model_ema the average it joins (once a round: it updates the average)."""
        self.model.load_state_dict(self.average.update(weights))
        return evaluate(self.model.to(self.device), self.test)

    def on_round(self, rnd: int, weights: dict[str, torch.Tensor], record: dict) -> MetricsLine:
        """Record a finished round: metrics line, best weights, checkpoint, progress."""
        line = metrics_line(rnd, record, self.strategy)
        self.folder.append_metrics(line)
        if line.accuracy is not None and line.accuracy > self.best_acc:
            self.best_acc = line.accuracy
            meta = {"round": rnd, "task": self.task.name, "accuracy": self.best_acc}
            self.folder.save_weights("best.safetensors", self.average.current(weights), meta)
        save_checkpoint(self.folder.path, rnd, weights,
                        {**self.strategy.state_dict(), "model_average": self.average.state_dict()})
        self.reporter.round(line, self.cfg.federation.rounds)
        return line

    def finish(self, final_weights: dict[str, torch.Tensor], stopped: str) -> RunSummary:
        """Write the final model and summary, hand the run off if configured; the summary."""
        self.folder.save_weights("model.safetensors", self.average.current(final_weights),
                                 {"task": self.task.name, "name": self.cfg.name})
        summary = build_summary(self.cfg, self.folder, self.strategy, stopped,
                                time.perf_counter() - self.started)
        self.folder.write_summary(summary)
        self.folder.plot()
        if summary.failed:
            # Nothing is exported or registered from a run that never trained.
            log(WARNING, "run failed: %s; hand-off skipped", summary.failure)
        elif self.cfg.deployment.handoff and summary.rounds_completed:
            summary = replace(summary, handoff=HandoffSummary.from_dict(
                hand_off(self.folder, self.cfg), "hand-off result"))
            self.folder.write_summary(summary)
        # Then the other post-run hooks (report, tracking), also for a failed run: it is worth a
        # look. Their results (e.g. the MLflow run id) join the summary's post_run, by name.
        if after := {k: v for k, v in run_after_handoff(self.folder.path, self.cfg).items()
                     if v}:
            summary = replace(summary, post_run={**summary.post_run, **after})
            self.folder.write_summary(summary)
        self.reporter.end(summary)
        return summary



def train_round_config(cfg: schema.Config, folder: RunFolder) -> dict:
    """What every training message carries besides the weights (clients read ``train.*``).

    run-key names this run for the clients' ledgers: stable across a resume, so a redone round
    is never counted twice."""
    return {"num-rounds": cfg.federation.rounds, "run-key": folder.path.name,
            **configio.flatten({"train": asdict(cfg.train)})}


def hand_off(folder: RunFolder, cfg: schema.Config) -> dict:
    """Export, document, register and gate the final model: the post-run hook that orchestration
    registered (server/hooks.py; deployment/ is never imported here). A failure or a missing
    ``[deploy]`` extra is reported in the summary, never raised: the run's results are on disk."""
    return run_post_run_hook(HANDOFF, folder.path, cfg)


def build_summary(cfg: schema.Config, folder: RunFolder, strategy: RecordedStrategy, stopped: str,
                  wall: float) -> RunSummary:
    """The run's summary.json, from its metrics lines and configuration."""
    lines = folder.read_metrics()
    last = lines[-1] if lines else None
    scored = [(m.accuracy, m) for m in lines if m.accuracy is not None]
    best = max(scored, key=lambda s: s[0]) if scored else None
    eps_by_client: dict[str, float] = {}
    noise_used: set[float] = set()
    class_parts: dict[str, tuple] = {}
    outside: set[str] = set()
    node_partitions: dict[str, int] = {}
    for m in lines:
        eps_by_client.update(m.epsilon)
        noise_used.update(e.noise_multiplier for e in m.dp_events.values())
        class_parts.update({k: (list(v.counts), v.noise_std) for k, v in m.class_counts.items()})
        outside.update(m.outside_guarantee)
        node_partitions.update(m.node_partitions)
    quality = merge_class_counts(class_parts.values())
    evaluated = [m.evaluation for m in lines if m.evaluation is not None and m.evaluation.accuracy]
    failure = run_failure(lines, stopped)
    central_epsilon = last.central_epsilon if last else None
    return RunSummary(
        status=FAILED if failure else COMPLETED, failure=failure,
        name=cfg.name, task=cfg.task.name, run_dir=str(folder.path),
        rounds=cfg.federation.rounds, rounds_completed=len(lines),
        num_clients=cfg.federation.num_clients, partition=asdict(cfg.partition),
        strategy=cfg.aggregation.rule, attack=asdict(cfg.attack), seed=cfg.seed,
        secagg=cfg.secagg.enabled,
        final=FinalMetrics(accuracy=last.accuracy, loss=last.loss) if last else None,
        best=BestRound(round=best[1].round, accuracy=best[0]) if best else None,
        privacy=PrivacySummary(
            enabled=cfg.privacy.enabled, accountant=cfg.privacy.accountant,
            delta=cfg.privacy.delta, noise_multiplier=cfg.privacy.noise_multiplier,
            noise_multipliers_used=tuple(sorted(noise_used)),
            target_epsilon=cfg.privacy.target_epsilon,
            max_grad_norm=cfg.privacy.max_grad_norm, max_epsilon=cfg.privacy.max_epsilon,
            reproducible_noise=cfg.privacy.reproducible_noise,  # True: eps not valid vs server
            epsilon_by_client=eps_by_client,
            epsilon_max=max(eps_by_client.values()) if eps_by_client else None,
            epsilon_mean=float(np.mean(list(eps_by_client.values()))) if eps_by_client else None,
            unit=SAMPLE_LEVEL if cfg.privacy.enabled else None,
            label=describe(max(eps_by_client.values()) if eps_by_client else None,
                           SAMPLE_LEVEL + ", max over clients", cfg.privacy.delta,
                           cfg.privacy.accountant) if cfg.privacy.enabled else None,
            # The config's [central_dp] table plus what was spent; typed by the record.
            central_dp=CentralDPSummary.from_dict(
                {**asdict(cfg.central_dp), "user_level_epsilon": central_epsilon,
                 "unit": USER_LEVEL, "sampling": "poisson",
                 "client_sample_rate": cfg.federation.fraction_train,
                 "label": describe(central_epsilon, USER_LEVEL, cfg.central_dp.delta,
                                   cfg.central_dp.accountant)}, "central_dp")
            if cfg.central_dp.enabled else None,
            exhausted_clients=tuple(sorted(strategy.node_partition.get(n, n)
                                           for n in strategy.exhausted)),
            release_stats=cfg.privacy.release_stats if cfg.privacy.enabled else None,
            stats_noise_multiplier=cfg.privacy.stats_noise_multiplier
            if cfg.privacy.enabled and cfg.privacy.release_stats == "dp" else None,
            # Values clients sent exactly under DP (the opt-in): NOT covered by the epsilons.
            outside_guarantee=tuple(sorted(outside)),
        ),
        # The federation's class mix from the clients' released histograms (noised under DP).
        data_quality=DataQuality.from_dict(quality.to_dict(), "data_quality")
        if quality else None,
        robustness=RobustnessSummary(
            rejected_total=sum(len(m.rejected) for m in lines),
            refused_total=sum(len(m.refused) for m in lines),
            quarantined=last.quarantined if last else (),
        ),
        stopped_early=stopped,
        evaluation=evaluated[-1] if evaluated else None,  # the last evaluated round's
        versions=library_versions(),
        wall_seconds=round(wall, 2),
        node_partitions=node_partitions,
        drift_reference=read_collection(folder, cfg),
    )

