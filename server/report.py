"""Console output for a run: a line per round and a final summary table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from privacy.randomness import warn_reproducible_noise


class ConsoleReporter:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    def start(self, cfg, run_dir) -> None:
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
            f"[bold]fedshield[/] {cfg.name}: task={cfg.task.name} clients={cfg.federation.num_clients} "
            f"rounds={cfg.federation.rounds} partition={cfg.partition.kind} "
            f"rule={cfg.aggregation.rule} privacy={privacy} attack={cfg.attack.name}\n"
            f"run folder: {run_dir}")

    def round(self, line: dict, total: int) -> None:
        parts = [f"round {line['round']:>3}/{total}",
                 f"acc {line['accuracy']:.4f}" if line.get("accuracy") is not None else "acc -",
                 f"loss {line['loss']:.4f}" if line.get("loss") is not None else "loss -"]
        if line.get("epsilon_max") is not None:
            parts.append(f"eps max {line['epsilon_max']:.3f}")
        parts.append(f"accepted {line['accepted']}/{line['sampled']}")
        if line["rejected"] or line["refused"]:
            parts.append(f"[yellow]rejected {len(line['rejected'])} refused {len(line['refused'])}[/]")
        if line["newly_quarantined"]:
            parts.append(f"[red]quarantined {line['newly_quarantined']}[/]")
        parts.append(f"{line['seconds']:.1f} s")
        self.console.print(" | ".join(parts))

    def end(self, summary: dict) -> None:
        table = Table(title=f"Summary: {summary['name']}", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        final = summary["final"]
        table.add_row("final test accuracy", f"{final['accuracy']:.4f}" if final else "-")
        table.add_row("final test loss", f"{final['loss']:.4f}" if final else "-")
        if summary.get("best"):
            table.add_row("best round (accuracy)",
                          f"{summary['best']['round']} ({summary['best']['accuracy']:.4f})")
        table.add_row("rounds completed", f"{summary['rounds_completed']}/{summary['rounds']}")
        table.add_row("aggregation", summary["strategy"])
        p = summary["privacy"]
        central = p.get("central_dp")
        if p["enabled"]:
            table.add_row("privacy spent (max / mean eps)",
                          f"{p['epsilon_max']:.3f} / {p['epsilon_mean']:.3f} at delta={p['delta']:g}"
                          f" ({p.get('unit')}, {p['accountant']})"
                          if p.get("epsilon_max") is not None else "-")
        if p["enabled"] and p.get("reproducible_noise"):
            table.add_row("[bold red]reproducible noise[/]",
                          "the noise is derived from the seed: the epsilon is NOT valid against "
                          "the server, and the gate will not promote this model")
        if central:
            table.add_row("central DP", central.get("label") or "-")
        if not p["enabled"] and not central:
            table.add_row("privacy", "off (no DP guarantee)")
        if p.get("outside_guarantee"):  # privacy.release_stats = "exact-outside-guarantee"
            table.add_row("[yellow]sent exactly, outside the DP guarantee[/]",
                          ", ".join(p["outside_guarantee"]))
        r = summary["robustness"]
        table.add_row("updates rejected / refusals", f"{r['rejected_total']} / {r['refused_total']}")
        table.add_row("clients quarantined", str(r["quarantined"]) if r["quarantined"] else "none")
        if summary.get("stopped_early"):
            table.add_row("[yellow]stopped early[/]", summary["stopped_early"])
        table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
        handoff = summary.get("handoff")
        if handoff and "error" in handoff:
            table.add_row("[red]hand-off failed[/]", handoff["error"])
        elif handoff and "skipped" in handoff:  # e.g. a base install without the [deploy] extra
            table.add_row("[yellow]hand-off skipped[/]", handoff["skipped"])
        elif handoff:
            gate = "[green]champion[/]" if handoff["passed"] else \
                "[yellow]candidate[/] (" + "; ".join(handoff["reasons"]) + ")"
            table.add_row("registered model", f"{handoff['model_uri']} -> {gate}")
            table.add_row("model card", handoff["card_path"])
            table.add_row("serve it", f"fedshield serve --model models:/{handoff['model_name']}"
                          f"/{handoff['version']}")
        table.add_row("run folder", summary["run_dir"])
        self.console.print(table)
