"""Console output for a run: a line per round and a final summary table (rich).

Clients are shown by partition id (what the data, the attack report and the ledgers use) with
their node id beside it where the two differ (what Flower's logs and a SuperLink show), so a
user can match a quarantined node to the attackers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedshield.privacy.randomness import warn_reproducible_noise
from rich.console import Console
from rich.table import Table

from fedshield.run_records import AttackReport, FederatedEvaluation, MetricsLine, RunSummary


def node_label(node: int, node_partition: Mapping[int, int]) -> str:
    """A node as a log line names it: ``node 8812 (partition 3)``, or ``node 8812`` alone when
    its partition is not known (yet)."""
    return f"node {node} (partition {node_partition[node]})" if node in node_partition \
        else f"node {node}"


def partition_labels(partitions: Iterable[int], node_partitions: Mapping[str, int]) -> str:
    """Partition ids, each with its node id where that differs: ``3 (node 8812), 5``."""
    nodes = {p: n for n, p in node_partitions.items()}
    return ", ".join(f"{p} (node {nodes[p]})" if p in nodes and nodes[p] != str(p) else str(p)
                     for p in partitions)


class ConsoleReporter:
    """Prints a run's start, one line per round (MetricsLine) and the summary (RunSummary)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    def start(self, cfg, run_dir) -> None:
        """The run's header: task, clients, rounds, rule, privacy, attack, run folder."""
        kinds = []
        if cfg.privacy.enabled:
            kinds.append(f"local DP (sample-level, {cfg.privacy.accountant}, delta="
                         f"{cfg.privacy.delta:g}" + (f", budget eps<={cfg.privacy.max_epsilon:g}"
                                                     if cfg.privacy.max_epsilon else "") + ")")
        if cfg.central_dp.enabled:
            kinds.append(f"central DP (user-level, Poisson q={cfg.federation.fraction_train:g}, "
                         f"{cfg.central_dp.accountant}, delta={cfg.central_dp.delta:g})")
        privacy = " + ".join(kinds) or "off"
        if cfg.privacy.enabled and cfg.privacy.reproducible_noise:
            warn_reproducible_noise()
            self.console.print("[bold red]privacy.reproducible_noise = true: DP noise is derived "
                               "from the run seed; the epsilon is NOT valid against the server[/]")
        self.console.print(
            f"[bold]fedshield[/] {cfg.name}: task={cfg.task.name} "
            f"clients={cfg.federation.num_clients} "
            f"rounds={cfg.federation.rounds} partition={cfg.partition.kind} "
            f"rule={cfg.aggregation.rule} privacy={privacy} attack={cfg.attack.name}\n"
            f"run folder: {run_dir}")

    def round(self, line: MetricsLine, total: int) -> None:
        """One line per round: accuracy, loss, epsilon, accepted/rejected, quarantine, time."""
        parts = [f"round {line.round:>3}/{total}",
                 f"acc {line.accuracy:.4f}" if line.accuracy is not None else "acc -",
                 f"loss {line.loss:.4f}" if line.loss is not None else "loss -"]
        if line.epsilon_max is not None:
            parts.append(f"eps max {line.epsilon_max:.3f}")
        if line.evaluation is not None and line.evaluation.mean is not None:
            parts.append(evaluation_text(line.evaluation))
        parts.append(f"accepted {line.accepted}/{line.sampled}")
        if line.rejected or line.refused:
            parts.append(f"[yellow]rejected {len(line.rejected)} refused {len(line.refused)}[/]")
        if line.newly_quarantined:
            parts.append("[red]quarantined partition "
                         f"{partition_labels(line.newly_quarantined, line.node_partitions)}[/]")
        parts.append(f"{line.seconds or 0.0:.1f} s")
        self.console.print(" | ".join(parts))

    def end(self, summary: RunSummary) -> None:
        """The summary table: results, privacy spent, robustness, hand-off, run folder."""
        table = Table(title=f"Summary: {summary.name}", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        final = summary.final
        table.add_row("final test accuracy", _num(final.accuracy if final else None))
        table.add_row("final test loss", _num(final.loss if final else None))
        if summary.best:
            table.add_row("best round (accuracy)",
                          f"{summary.best.round} ({summary.best.accuracy:.4f})")
        if summary.evaluation is not None and summary.evaluation.mean is not None:
            table.add_row(f"client evaluation (round {summary.evaluation.round})",
                          evaluation_text(summary.evaluation, long=True))
        table.add_row("rounds completed", f"{summary.rounds_completed}/{summary.rounds}")
        table.add_row("aggregation", summary.strategy or "-")
        p = summary.privacy
        central = p.central_dp
        if p.enabled:
            table.add_row("privacy spent (max / mean eps)",
                          f"{p.epsilon_max:.3f} / {p.epsilon_mean or 0.0:.3f} at "
                          f"delta={p.delta or 0.0:g} ({p.unit}, {p.accountant})"
                          if p.epsilon_max is not None else "-")
        if p.enabled and p.reproducible_noise:
            table.add_row("[bold red]reproducible noise[/]",
                          "the noise is derived from the seed: the epsilon is NOT valid against "
                          "the server, and the gate will not promote this model")
        if central:
            table.add_row("central DP", central.label or "-")
        if not p.enabled and not central:
            table.add_row("privacy", "off (no DP guarantee)")
        if p.outside_guarantee:  # privacy.release_stats = "exact-outside-guarantee"
            table.add_row("[yellow]sent exactly, outside the DP guarantee[/]",
                          ", ".join(p.outside_guarantee))
        r = summary.robustness
        if r is not None:
            table.add_row("updates rejected / refusals", f"{r.rejected_total} / {r.refused_total}")
            table.add_row("clients quarantined (partition ids)",
                          partition_labels(r.quarantined, summary.node_partitions)
                          if r.quarantined else "none")
        if summary.attack_report is not None:
            self._attack_rows(table, summary.attack_report, summary.node_partitions)
        if summary.stopped_early:
            table.add_row("[yellow]stopped early[/]", summary.stopped_early)
        table.add_row("wall time", f"{summary.wall_seconds or 0.0:.1f} s")
        handoff = summary.handoff
        if handoff and handoff.error is not None:
            table.add_row("[red]hand-off failed[/]", handoff.error)
        elif handoff and handoff.skipped is not None:  # e.g. a base install without [deploy]
            table.add_row("[yellow]hand-off skipped[/]", handoff.skipped)
        elif handoff:
            gate = "[green]champion[/]" if handoff.passed else \
                "[yellow]candidate[/] (" + "; ".join(handoff.reasons or ()) + ")"
            table.add_row("registered model", f"{handoff.model_uri} -> {gate}")
            table.add_row("model card", handoff.card_path or "-")
            table.add_row("serve it", f"fedshield serve --model models:/{handoff.model_name}"
                          f"/{handoff.version}")
        table.add_row("run folder", summary.run_dir or "-")
        self.console.print(table)

    def attack(self, report: AttackReport, node_partitions: Mapping[str, int]) -> None:
        """The simulated attack's outcome: who attacked, who was caught (partition and node)."""
        table = Table(title="Simulated attack", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        self._attack_rows(table, report, node_partitions)
        self.console.print(table)

    @staticmethod
    def _attack_rows(table: Table, report: AttackReport,
                     node_partitions: Mapping[str, int]) -> None:
        caught = sorted(set(report.byzantine_ids) & set(report.quarantined))
        wrong = sorted(set(report.quarantined) - set(report.byzantine_ids))
        table.add_row("attackers (partition ids)",
                      partition_labels(report.byzantine_ids, node_partitions) or "none")
        table.add_row("attackers quarantined",
                      f"{partition_labels(caught, node_partitions) or 'none'} "
                      f"({_pct(report.detection_rate)} of the attackers)")
        table.add_row("honest clients quarantined",
                      f"{partition_labels(wrong, node_partitions) or 'none'} "
                      f"({_pct(report.false_quarantine_rate)} of the honest clients)")
        if report.backdoor_success is not None:
            table.add_row("backdoor success", _pct(report.backdoor_success))


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else "-"


def evaluation_text(e: FederatedEvaluation, long: bool = False) -> str:
    """A round's federated evaluation in one phrase: mean, worst, worst 10%, spread, and how the
    values were released (noise std under DP; exact, or outside the guarantee)."""
    how = f"DP noise std {e.noise_std:.3f}" if e.noise_std is not None else (e.source or "exact")
    if not long:
        return f"clients acc mean {e.mean:.3f} worst {e.worst:.3f} ({how})"
    return (f"accuracy over {len(e.accuracy)} clients: mean {e.mean:.4f}, worst {e.worst:.4f}, "
            f"worst 10% {e.worst_decile:.4f}, spread {e.spread:.4f} ({how})")


def _num(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"
