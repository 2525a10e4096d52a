"""``fedshield privacy ...``: plan noise before training, see what a noise multiplier spends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fedshield.errors import FedShieldError
from fedshield.privacy.accounting import BOUNDS
from fedshield.privacy.planner import PLAN_ACCOUNTANTS, Plan, milestones, plan
from fedshield.privacy.releases import EXACT_MODE, MODES
from fedshield.run_records import SUMMARY_FILE
from fedshield.schema import Config, PrivacyConfig

privacy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          pretty_exceptions_enable=False,
                          help="Differential-privacy planning and accounting.")
_err = Console(stderr=True, soft_wrap=True)


@privacy_app.callback()
def _group() -> None:
    """Differential-privacy planning and accounting."""


def _fail(message: str) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@privacy_app.command("plan", epilog=(
    "Example: fedshield privacy plan --target-epsilon 3 --delta 1e-5 --rounds 50 --local-epochs 1 "
    "--batch-size 64 --num-examples 6000\n\n"
    "Inverse: fedshield privacy plan --noise-multiplier 1.1 --delta 1e-5 --rounds 50 "
    "--local-epochs 1 --batch-size 64 --num-examples 6000"))
def plan_command(
    target_epsilon: float | None = typer.Option(
        None, help="epsilon to spend over the whole schedule"),
    noise_multiplier: float | None = typer.Option(
        None, help="instead of a target: the epsilon this noise multiplier spends"),
    delta: float = typer.Option(1e-5, help="delta; must be < 1/num-examples"),
    rounds: int = typer.Option(..., help="federated rounds the client trains in"),
    local_epochs: int = typer.Option(1, help="local epochs per round"),
    batch_size: int = typer.Option(..., help="expected Poisson batch size"),
    num_examples: int = typer.Option(..., help="examples on the client"),
    max_steps: int = typer.Option(0, help="cap on steps per round, as train.max_steps (0 = none)"),
    accountant: str | None = typer.Option(
        None, help=f"one of {', '.join(BOUNDS)} (default: all three side by side; gdp is an "
                   "approximation, not a bound, and is refused)"),
    json_out: bool = typer.Option(False, "--json",
                                  help="print the plan, with the per-round curve, as JSON"),
    release_stats: str = typer.Option(
        "dp", help="as privacy.release_stats: \"dp\" (default) spends the once-per-run class-"
                   "histogram release, planned and stated with the training; "
                   "\"exact-outside-guarantee\" spends nothing on it"),
    stats_noise_multiplier: float = typer.Option(
        PrivacyConfig().stats_noise_multiplier,
        help="as privacy.stats_noise_multiplier: the release's noise (event sigma, q = 1, 1 step)"),
    evaluate: bool = typer.Option(
        Config().federation.fraction_evaluate > 0, "--evaluate/--no-evaluate",
        help="as federation.fraction_evaluate > 0 (the default): spend federated evaluation's "
             "releases (held-out count once, one evaluation per round) as a DP client does"),
    eval_noise_multiplier: float = typer.Option(
        PrivacyConfig().eval_noise_multiplier,
        help="as privacy.eval_noise_multiplier: each evaluation release's noise (sigma, q = 1, "
             "1 step)"),
    release_reference: bool = typer.Option(
        True, help="as deployment.reference_source = \"clients\" (the default run): the client "
                   "also spends its once-per-run drift-reference release; --no-release-reference "
                   "as \"server\""),
    reference_noise_multiplier: float = typer.Option(
        PrivacyConfig().reference_noise_multiplier,
        help="as privacy.reference_noise_multiplier: that release's noise (sigma, q = 1, 1 step)"),
) -> None:
    """Noise multiplier per accountant that spends --target-epsilon over the schedule (or, with
    --noise-multiplier, the epsilon spent), and epsilon after rounds 1, 10%, 50% and 100%.

    Every epsilon includes the client's class-histogram release unless --release-stats
    exact-outside-guarantee, federated evaluation's releases unless --no-evaluate, and its
    drift-reference release unless --no-release-reference. A client plans from its noised example
    count (std about stats-noise-multiplier x sqrt(classes)): pass that count as --num-examples to
    reproduce its numbers exactly; with --target-epsilon it spends the target whatever the
    count."""
    if release_stats not in MODES:
        _fail(f"--release-stats {release_stats!r}: choose one of {', '.join(MODES)}")
    if accountant is not None and accountant not in BOUNDS:
        _fail(f"--accountant {accountant!r}: choose one of {', '.join(BOUNDS)}"
              + (" (gdp is a CLT approximation, not an upper bound: a planned eps 3.0 really "
                 "spends 3.60 on the default schedule)" if accountant == "gdp" else ""))
    try:
        result = plan(rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
                      num_examples=num_examples, delta=delta, target_epsilon=target_epsilon,
                      noise_multiplier=noise_multiplier, max_steps=max_steps,
                      accountants=(accountant,) if accountant else PLAN_ACCOUNTANTS,
                      curve_rounds=None if json_out else milestones(rounds),
                      stats_noise_multiplier=None if release_stats == EXACT_MODE
                      else stats_noise_multiplier,
                      eval_noise_multiplier=eval_noise_multiplier
                      if evaluate and release_stats != EXACT_MODE else None,
                      reference_noise_multiplier=reference_noise_multiplier
                      if release_reference else None)
    except FedShieldError as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(_table(result))


def _table(result: Plan) -> Table:
    what = (f"target epsilon {result.target_epsilon:g}" if result.target_epsilon is not None
            else "epsilon spent")
    release = ("including the class-histogram release (sigma "
               f"{result.stats_noise_multiplier:g}, q = 1, 1 step)"
               if result.stats_noise_multiplier is not None
               else "no statistics release accounted (release_stats = exact-outside-guarantee)")
    if result.eval_noise_multiplier is not None:
        release += (f"; federated evaluation (sigma {result.eval_noise_multiplier:g}: held-out "
                    "count once, one release per round)")
    if result.reference_noise_multiplier is not None:
        release += (" and the drift-reference release (sigma "
                    f"{result.reference_noise_multiplier:g}, q = 1, 1 step)")
    table = Table(title=f"{what} (sample-level, per client, add/remove), delta {result.delta:g}: "
                        f"{result.rounds} rounds x {result.steps_per_round} steps, sample rate "
                        f"{result.sample_rate:.4g}; {release}",
                  caption="prv (Opacus) and pld (dp_accounting) are tight, rdp a looser upper "
                          "bound; column pld: PLD epsilon at the same sigma; each epsilon is the "
                          "larger of its accountant's and PLD's")
    table.add_column("accountant")
    table.add_column("sigma", justify="right")  # the noise multiplier
    marks = milestones(result.rounds)
    for r in marks:
        table.add_column(f"eps @ round {r}", justify="right")
    table.add_column("pld", justify="right")  # PLD epsilon at the same sigma, side by side
    for acc in result.accountants:
        at = dict(acc.curve)
        table.add_row(acc.accountant, f"{acc.noise_multiplier:.4f}",
                      *(f"{at[r]:.3f}" for r in marks), f"{acc.epsilon_pld:.3f}")
    return table


@privacy_app.command("ledger", epilog=(
    "Example: fedshield privacy ledger --ledger-dir ledger\n\n"
    "Script: fedshield privacy ledger --ledger-dir ledger --json"))
def ledger_command(
    ledger_dir: str = typer.Option(".fedshield/ledgers",
                                   help="the site's ledger directory (node config ledger-dir)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """A site's privacy spend per federation and in total (the total is what its budget caps).
    Exits 1 when a ledger is deleted, truncated or unreadable."""
    from fedshield.privacy.ledger import site_report

    if not Path(ledger_dir).is_dir():
        _fail(f"--ledger-dir {ledger_dir!r} is not a directory; pass the site's ledger-dir")
    try:
        report = site_report(ledger_dir)
    except FedShieldError as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        console = Console()
        if not report["sites"]:
            console.print(f"no privacy ledger in {ledger_dir}")
        for site in report["sites"]:
            console.print(_ledger_table(site))
    if not all(site["complete"] for site in report["sites"]):
        raise typer.Exit(1)


def _ledger_table(site: dict) -> Table:
    table = Table(title=f"site {site['site']}: epsilon (sample-level, per client, add/remove)",
                  caption=f"total: all federations composed, delta {site['delta']:g}, "
                          f"{site['accountant']} floored by PLD; the site's budget caps it")
    for name in ("federation", "events", "runs", "epsilon", "pld", "delta", "accountant"):
        table.add_column(name, justify="left" if name == "federation" else "right")
    for row in site["ledgers"]:
        if row["problem"]:
            table.add_row(row["federation"], "-", "-", "[bold red]" + row["problem"][:60], "", "",
                          "")
            continue
        table.add_row(row["federation"], str(row["events"]), str(row["runs"]),
                      f"{row['epsilon']:.3f}", f"{row['epsilon_pld']:.3f}", f"{row['delta']:g}",
                      row["accountant"])
    table.add_row("[bold]total", "", "", f"[bold]{site['total_epsilon']:.3f}",
                  f"{site['total_epsilon_pld']:.3f}", f"{site['delta']:g}", site["accountant"])
    return table


@privacy_app.command("audit", epilog=(
    "Example: fedshield privacy audit configs/audit-digits.toml --canaries 1000\n\n"
    "Record it on a run's model card: fedshield privacy audit --run-dir runs/NAME --attacks "
    "canary (the run's own config.toml; writes runs/NAME/audit.json)\n\n"
    "Without DP, for the attack's ceiling: add --set privacy.enabled=false"))
def audit_command(
    config: str | None = typer.Argument(
        None, help="TOML experiment config, e.g. configs/default.toml (default with --run-dir: "
                   "the run's config.toml)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override key=value (repeatable)"),
    canaries: int = typer.Option(1000, help="canaries inserted into the client's data (m)"),
    client: int = typer.Option(0, help="partition id of the audited client"),
    shadows: int = typer.Option(4, help="LiRA shadow models"),
    attacks: str = typer.Option("canary,mia,inversion", help="comma-separated attacks to run"),
    seed: int | None = typer.Option(None, help="the auditor's coins (default: fresh entropy)"),
    run_dir: str | None = typer.Option(
        None, help="a finished run's folder: write the audit there (audit.json) for its model "
                   "card, and refresh the card already in its export/"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Empirical privacy audit: a one-run canary epsilon lower bound (95% confidence) next to the
    accountant's epsilon, membership inference (loss, LiRA) and gradient inversion.

    The audit trains its own models (canaries never enter a run's released model); with
    --run-dir its record goes on that run's model card, which says whether the audited settings
    are the run's."""
    from fedshield import validation
    from fedshield.simulations.audit import run_audit, write_run_audit

    if config is None and run_dir is None:
        _fail("give a CONFIG, or --run-dir RUN to audit a run with its own config.toml")
    if run_dir is not None and not (Path(run_dir) / SUMMARY_FILE).is_file():
        _fail(f"--run-dir {run_dir!r}: no summary.json there; pass the folder of a finished run")
    source: str | Path | None = config
    if source is None:
        assert run_dir is not None  # refused above when both are None
        source = Path(run_dir) / "config.toml"
    try:
        cfg = validation.load(source, set_ or [])
        report = run_audit(cfg, canaries=canaries, client=client, shadows=shadows,
                           attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
                           audit_seed=seed)
        written = write_run_audit(run_dir, report, cfg) if run_dir is not None else None
    except FedShieldError as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps(_finite(report.to_dict()), indent=2, allow_nan=False))
    else:
        for table in _audit_tables(report):
            Console().print(table)
    if written is not None and run_dir is not None:  # written only with a run_dir
        _err.print(f"audit recorded in {written}; " + _card_note(Path(run_dir)))


def _card_note(run: Path) -> str:
    """Refresh the run's card if its hand-off wrote one, and say which cards show the audit."""
    try:
        from fedshield.deployment.card import refresh_audit  # [deploy] extra
    except ImportError:
        return "the model card will show it once the [deploy] extra builds one"
    card = refresh_audit(run)
    if card is None:
        return "the run's model card shows it when its hand-off builds the card"
    note = f"model card refreshed: {card} (and model_card.md)"
    handoff = run / "handoff.json"
    if handoff.is_file():
        try:
            uri = json.loads(handoff.read_text()).get("model_uri", "its registered version")
        except ValueError:
            uri = "its registered version"
        note += (f"; {uri} keeps the card it was registered with (registered cards are "
                 "immutable): it says \"not audited\"")
    return note


def _finite(value):
    """Strict JSON: an infinite epsilon (no DP) is written as the string "inf"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _audit_tables(report) -> list[Table]:
    tables = []
    if report.canary:
        table = Table(title=f"one-run canary audit ({report.task}, client {report.client}): "
                            "empirical epsilon lower bound at 95% vs the accountant's epsilon",
                      caption="a bound above the stated epsilon means the guarantee does not hold "
                              "against that adversary")
        for col in ("adversary", "audit eps >=", "stated eps", "delta", "acct.", "sigma",
                    "m (in)", "correct/r", "seeded"):
            table.add_column(col, justify="left" if col == "adversary" else "right")
        for c in report.canary:
            table.add_row(c.adversary, f"{c.bound.epsilon:.3f}", f"{c.stated_epsilon:.3f}",
                          f"{c.delta:g}", c.accountant if c.noise_multiplier else "-",
                          f"{c.noise_multiplier:.3f}",
                          f"{c.bound.canaries} ({c.canaries_included})",
                          f"{c.bound.correct}/{c.bound.guesses}",
                          "yes" if c.noise_reproducible else "no")
        tables.append(table)
    if report.membership:
        table = Table(title="membership inference on the final model")
        for col in ("attack", "AUC", "TPR@FPR 1e-3", "TPR@FPR 1e-2", "in / out", "shadows",
                    "stated eps"):
            table.add_column(col, justify="left" if col == "attack" else "right")
        for m in report.membership:
            table.add_row(m.attack, f"{m.auc:.3f}", f"{m.tpr_at_fpr['0.001']:.4f}",
                          f"{m.tpr_at_fpr['0.01']:.4f}", f"{m.members} / {m.nonmembers}",
                          str(m.shadows), f"{m.stated_epsilon:.3f}")
        tables.append(table)
    if report.inversion:
        table = Table(title="gradient inversion of one client update (cosine + TV)",
                      caption="baseline: the data mean as the reconstruction")
        for col in ("DP", "batch", "sigma", "MSE", "PSNR dB", "baseline PSNR dB"):
            table.add_column(col, justify="right")
        for i in report.inversion:
            table.add_row("yes" if i.private else "no", str(i.batch), f"{i.noise_multiplier:.3f}",
                          f"{i.mse:.4f}", f"{i.psnr:.2f}", f"{i.baseline_psnr:.2f}")
        tables.append(table)
    return tables
