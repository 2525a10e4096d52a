"""Model card (JSON + Markdown) with the privacy provenance of a federated run."""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from fedshield.deployment.artifacts import (
    ATTRIBUTION_PNG,
    CARD_JSON,
    CARD_MD,
    SAFETENSORS,
    build_loaded_model,
    load_weights,
)
from fedshield.deployment.explain import attribution_picture, feature_importance
from fedshield.deployment.export import ExportResult
from fedshield.privacy.accounting import SAMPLE_LEVEL
from fedshield.privacy.audit import AUDIT_JSON, AuditRecord, mechanism_digest
from fedshield.tasks import Split, Task, get_task

from fedshield.errors import ConfigError
from fedshield.run_records import (
    BestRound,
    FinalMetrics,
    MetricsLine,
    PrivacySummary,
    RobustnessSummary,
    RunSummary,
    read_metrics,
    read_summary,
)

TOP_FEATURES = 15
IMAGES_IN_PICTURE = 6


@dataclass
class ModelCard:
    """A written model card: its content and the JSON and Markdown files holding it."""
    data: dict
    json_path: Path
    md_path: Path


def read_run(run_dir: str | Path) -> tuple[RunSummary, dict, list[MetricsLine]]:
    """(summary, raw config table, per-round metrics) of a run folder (StateCorrupted if its
    summary or metrics are torn or edited)."""
    run = Path(run_dir)
    summary = read_summary(run)
    config_file = run / "config.toml"
    config = tomllib.loads(config_file.read_text()) if config_file.is_file() else {}
    return summary, config, read_metrics(run)


REPRODUCIBLE_NOISE_WARNING = (
    "EPSILON NOT VALID AGAINST THE SERVER: this run used reproducible (seeded) DP noise "
    "(privacy.reproducible_noise = true). The server knows the seed and can regenerate and "
    "subtract the noise, so the stated epsilon holds only against parties who see the released "
    "model alone. Research use only; the promotion gate refuses this model.")


def privacy_warning(privacy: PrivacySummary) -> str:
    """The loud warning a run's privacy section needs, or "" (summary ``privacy`` contract)."""
    return REPRODUCIBLE_NOISE_WARNING if privacy.reproducible_noise else ""


def attack_of(summary: RunSummary, config: dict) -> dict:
    """The attack simulated; summary ``attack`` is the attack table (older runs: its name)."""
    raw = summary.attack
    table = raw if isinstance(raw, dict) else (config.get("attack") or {})
    name = raw.get("name") if isinstance(raw, dict) else raw
    if name is None:
        name = table.get("name")
    name = str(name).strip() if name is not None else ""
    simulated = name.lower() not in ("", "none")
    return {"simulated": simulated, "name": name if simulated else "none", "config": table or None}


def noise_used(privacy: PrivacySummary) -> list[float] | None:
    """The noise multipliers actually used (summary ``noise_multipliers_used``), None if unknown."""
    used = privacy.noise_multipliers_used
    return None if used is None else sorted(set(used))


def _noise_text(privacy: dict) -> str:
    """The card's noise line, from the card's privacy block (build_card sorted the used noise)."""
    used = privacy.get("noise_multipliers_used")
    if used:
        shown = f"{used[0]:.4g}" if len(used) == 1 else \
            f"{used[0]:.4g}-{used[-1]:.4g} ({len(used)} values)"
        return f"Noise multiplier used {shown}"
    configured = privacy.get("noise_multiplier")
    if configured:
        return f"Noise multiplier {_fmt(configured)} (configured)"
    return "Noise multiplier: not recorded (planned from the target epsilon)"


def _versions(run_versions: dict) -> dict:
    mine = {}
    for pkg in ("torch", "onnx", "onnxruntime", "captum", "mlflow-skinny", "flwr", "opacus",
                "fedshield"):
        try:
            mine[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return {"training": run_versions, "export": mine}


def _dict_or_none(part: FinalMetrics | BestRound | RobustnessSummary | None) -> dict | None:
    return part.to_dict() if part is not None else None


def _defenses(config: dict) -> dict:
    return {key: config.get(key) for key in ("aggregation", "screening", "reputation", "central_dp")
            if key in config}


def _explanations(task: Task, export: ExportResult, test: Split, out: Path, examples: int) -> dict:
    model = build_loaded_model(task, load_weights(out / SAFETENSORS))
    base = {"method": "Integrated Gradients (Captum)", "steps": 32}
    if task.is_image:
        picked = np.concatenate([np.flatnonzero(test.y == c)[:1]
                                 for c in np.unique(test.y)])[:IMAGES_IN_PICTURE]
        attribution_picture(model, test.x[picked], test.y[picked], out / ATTRIBUTION_PNG)
        return base | {"baseline": "black image", "picture": ATTRIBUTION_PNG,
                       "examples": int(len(picked))}
    ranked = feature_importance(model, test.x[:examples], task.feature_names)
    return base | {"baseline": "zeros (standardised mean / blank pixel)",
                   "examples": int(min(examples, len(test))),
                   "statistic": "mean |attribution| per feature on test examples",
                   "num_features": len(ranked), "feature_importance": ranked[:TOP_FEATURES]}


NOT_AUDITED = (
    "Not audited: no empirical privacy audit is recorded for this run, so the accountant's "
    "epsilon is the only evidence. `fedshield privacy audit --run-dir RUN` records one.")


def audit_section(run_dir: str | Path, config: dict) -> dict:
    """The card's ``privacy_audit``: the run folder's audit record (privacy/audit.py
    ``AuditRecord``, written by ``fedshield privacy audit --run-dir``) against the run's own
    config, or ``audited: false`` saying why. Never silent: no record reads "not audited"."""
    path = Path(run_dir) / AUDIT_JSON
    if not path.is_file():
        return {"audited": False, "status": "not audited", "text": NOT_AUDITED}
    try:
        record = AuditRecord.from_json(path.read_text())
    except (OSError, ConfigError) as exc:
        return {"audited": False, "status": "audit record unreadable",
                "text": f"Not audited: {path.name} is unreadable ({exc})."}
    # Does the audit's mechanism (data, schedule, privacy settings, seed) equal this run's?
    matches = record.mechanism_digest == mechanism_digest(config) if config else None
    canary = [{
        "adversary": c["adversary"],
        "empirical_epsilon_lower_bound": float(c["empirical_epsilon"]),
        "confidence": float(c["bound"].get("confidence", 0.95)),
        "canaries": int(c["bound"]["canaries"]),
        "canaries_included": c.get("canaries_included"),
        "correct": c["bound"].get("correct"), "guesses": c["bound"].get("guesses"),
        "stated_epsilon": float(c["stated_epsilon"]), "unit": c.get("unit", SAMPLE_LEVEL),
        "delta": float(c["delta"]), "accountant": c["accountant"],
        "noise_multiplier": c.get("noise_multiplier"), "rounds": c.get("rounds"),
        "noise_reproducible": c.get("noise_reproducible"),
        # the accountant's epsilon is an upper bound: a lower bound above it refutes it
        "holds": float(c["empirical_epsilon"]) <= float(c["stated_epsilon"]),
    } for c in record.canary]
    return {"audited": True,
            "status": "audited" if matches is not False else "audited with another configuration",
            "matches_run_config": matches, "mechanism_digest": record.mechanism_digest,
            "source": AUDIT_JSON, "created_at": record.created_at,
            "client": record.client, "procedure": record.procedure,
            "canaries_in_released_model": record.canaries_in_released_model,
            "canary": canary, "membership": list(record.membership),
            "inversion": list(record.inversion)}


def refresh_audit(run_dir: str | Path) -> Path | None:
    """Re-read the run's audit record into the card its hand-off already wrote (``export/``),
    JSON and Markdown; None when the run has no card yet (its hand-off will read the record)."""
    from fedshield.deployment.handoff import EXPORT_DIR  # handoff imports this module

    run = Path(run_dir)
    json_path = run / EXPORT_DIR / CARD_JSON
    if not json_path.is_file():
        return None
    card = json.loads(json_path.read_text())
    _, config, _ = read_run(run)
    card["privacy_audit"] = audit_section(run, config)
    json_path.write_text(json.dumps(card, indent=2, default=str))
    (json_path.parent / CARD_MD).write_text(render_markdown(card))
    return json_path


def build_card(run_dir: str | Path, export: ExportResult, explain_examples: int = 64,
               reference_source: str | None = None,
               reference: dict | None = None) -> ModelCard:
    """Write ``model_card.json`` and ``model_card.md`` (and ``attributions.png`` for images).

    ``reference``: the drift reference's source, how it was built and its distance from the
    true pooled histograms ("unknown" outside simulations; deployment/handoff.py)."""
    summary, config, rounds = read_run(run_dir)
    task = get_task(export.task, export.metadata.get("model", ""))
    test = task.load()[1]
    out = Path(export.out_dir)
    privacy = summary.privacy.to_dict()
    if (used := noise_used(summary.privacy)) is not None:
        privacy["noise_multipliers_used"] = used
    warning = privacy_warning(summary.privacy)
    card = {
        "name": summary.name or Path(run_dir).name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(Path(run_dir).resolve()),
        "task": {"name": task.name, "num_classes": task.num_classes,
                 "preprocessing": task.preprocessing},
        "data_schema": {
            "input": {"dtype": "float32", "shape": ["batch", *task.input_shape],
                      "kind": "image" if task.is_image else "tabular",
                      "range": getattr(export, "input_range", None)},
            "output": {"logits": ["batch", task.num_classes]},
            "feature_names": list(task.feature_names),
        },
        "training": {
            "rounds": summary.rounds, "num_clients": summary.num_clients,
            "strategy": summary.strategy, "defenses": _defenses(config),
            "robustness": _dict_or_none(summary.robustness), "seed": summary.seed,
            "wall_seconds": summary.wall_seconds,
        },
        "status": summary.status,
        "attack": attack_of(summary, config),
        "privacy": privacy,
        "privacy_warning": warning,
        "privacy_audit": audit_section(run_dir, config),
        "federated_evaluation": evaluation_section(summary, rounds),
        "metrics": {"final": _dict_or_none(summary.final), "best": _dict_or_none(summary.best),
                    "per_round": [m.to_dict() for m in rounds],
                    "test_onnx_accuracy": export.parity["onnx_accuracy"],
                    "test_int8_accuracy": export.int8["accuracy"] if export.int8 else None},
        "artifacts": {"sha256": export.sha256, "sizes": export.sizes, "parity": export.parity,
                      "int8": export.int8},
        "explanations": _explanations(task, export, test, out, explain_examples),
        "drift_reference": reference_source,
        "drift_reference_details": reference,
        "config": config,
        "versions": _versions(dict(summary.versions)),
    }
    json_path, md_path = out / CARD_JSON, out / CARD_MD
    json_path.write_text(json.dumps(card, indent=2, default=str))
    md_path.write_text(render_markdown(card))
    return ModelCard(card, json_path, md_path)


EVALUATION_SOURCES = {
    "dp-gaussian": "released under client DP (Gaussian noise, accounted in each client's "
                   "epsilon)",
    "exact (no DP)": "exact (no differential privacy in this run)",
    "exact, outside the DP guarantee": "EXACT values sent by opt-in: outside the DP guarantee",
}


def evaluation_section(summary: RunSummary, rounds: list[MetricsLine]) -> dict:
    """The card's ``federated_evaluation``: how the final model did at each client (the last
    evaluated round's distribution, keyed by partition id), how the values were released, and the
    mean and worst client per round. ``evaluated: false`` when no client evaluated."""
    last = summary.evaluation
    if last is None or last.mean is None:
        return {"evaluated": False, "text": "No federated evaluation: no client evaluated the "
                "global model on its held-out data (federation.fraction_evaluate = 0)."}
    return {"evaluated": True, **last.to_dict(),
            "release": EVALUATION_SOURCES.get(last.source or "", last.source),
            "per_round": [{"round": m.round, "mean": m.evaluation.mean,
                           "worst": m.evaluation.worst, "clients": len(m.evaluation.accuracy)}
                          for m in rounds if m.evaluation is not None
                          and m.evaluation.mean is not None]}


def evaluation_markdown(section: dict | None) -> list[str]:
    """The card's "Federated evaluation" lines (older cards have no section: nothing)."""
    if section is None:
        return []
    lines = ["## Federated evaluation", ""]
    if not section.get("evaluated"):
        return lines + [f"- {section.get('text')}", ""]
    noise = section.get("noise_std")
    lines += [f"Round {section.get('round')}: the global model on each client's held-out data, "
              f"{section.get('release')}"
              + (f"; each accuracy has noise of std about {noise:.3f}." if noise is not None
                 else "."), "",
              f"- Mean accuracy over {len(section['accuracy'])} clients: "
              f"**{section['mean']:.4f}**; worst client {section['worst']:.4f}; worst 10% "
              f"{section['worst_decile']:.4f}; spread (std) {section['spread']:.4f}", "",
              "| client (partition) | accuracy | loss |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {_fmt(section['loss'].get(k))} |"
              for k, v in sorted(section["accuracy"].items(), key=lambda kv: kv[1])]
    lines.append("")
    return lines


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _range_text(rng) -> str:
    if not isinstance(rng, dict):
        return "not recorded"
    return f"[{rng.get('min', 0.0):.4g}, {rng.get('max', 0.0):.4g}]"


def audit_markdown(section: dict | None, privacy: dict) -> list[str]:
    """The card's "Empirical privacy audit" lines (a card written before audits: not audited)."""
    section = section or {"audited": False, "text": NOT_AUDITED}
    lines = ["## Empirical privacy audit", ""]
    if not section.get("audited"):
        return lines + [f"- **{section.get('text') or NOT_AUDITED}**", ""]
    for c in section.get("canary", []):
        seen = ("the server, seeing the client's update every round" if c["adversary"] == "update"
                else "the server replaying the client's seeded training to subtract its noise")
        verdict = ("holds (bound <= stated)" if c["holds"] else
                   "**EXCEEDS the stated epsilon: the guarantee does not hold against this "
                   "adversary**")
        stated = "inf (no DP)" if math.isinf(c["stated_epsilon"]) else f"{c['stated_epsilon']:.3f}"
        lines.append(
            f"- Empirical epsilon lower bound **{c['empirical_epsilon_lower_bound']:.3f}** at "
            f"{c['confidence']:.0%} confidence ({c['canaries']} canaries, "
            f"{c['canaries_included']} included, {c['correct']}/{c['guesses']} guesses right; "
            f"adversary: {c['adversary']}, {seen}) vs accountant epsilon **{stated}** "
            f"({c['unit']}, delta {c['delta']:g}, {c['accountant']}) of the audited training: "
            f"{verdict}.")
    if not section.get("canary"):
        lines.append("- No canary audit in the record: no empirical epsilon bound.")
    for m in section.get("membership", []):
        lines.append(f"- Membership inference ({m['attack']}) on the audit's own final model: AUC "
                     f"{m['auc']:.3f}, TPR {m['tpr_at_fpr'].get('0.001', 0.0):.4f} at FPR 1e-3.")
    for i in section.get("inversion", []):
        lines.append(f"- Gradient inversion of one update ({'with' if i['private'] else 'without'}"
                     f" DP, batch {i['batch']}): PSNR {i['psnr']:.2f} dB (data-mean baseline "
                     f"{i['baseline_psnr']:.2f} dB).")
    if section.get("canaries_in_released_model"):
        lines.append("- **Canaries were inserted into the training data of this model**: it "
                     "carries them, and its data are not the client's alone.")
    else:
        lines.append("- Canaries in this model: **none**. The audit trained separately with this "
                     "run's settings; the released model's training had no canaries, so the "
                     "audit does not weaken its privacy.")
    match = section.get("matches_run_config")
    lines.append("- Configuration: " + (
        "the audit used this run's data, schedule, privacy settings and seed." if match else
        "**the audit used another configuration than this run's: it is not evidence about this "
        "model.**" if match is False else "this run's config is not recorded: not compared."))
    if privacy.get("label"):
        lines.append(f"- This run's stated epsilon: {privacy['label']}.")
    lines += [f"- What was audited: {section.get('procedure')} ({section.get('source')}, "
              f"{section.get('created_at')}).", ""]
    return lines


def render_markdown(card: dict) -> str:
    """The model card as Markdown (a privacy warning first when there is one)."""
    p, t, m, a = card["privacy"], card["training"], card["metrics"], card["artifacts"]
    attack, schema_in = card["attack"], card["data_schema"]["input"]
    warning = card.get("privacy_warning")
    lines = [f"# Model card: {card['name']}", ""]
    if warning:
        lines += [f"> **WARNING: {warning}**", ""]
    lines += [f"Created {card['created_at']} from `{card['run_dir']}`.", "",
              "## Task and data schema", "",
              f"- Task: **{card['task']['name']}**, {card['task']['num_classes']} classes",
              f"- Input: float32, shape {card['data_schema']['input']['shape']} "
              f"({card['data_schema']['input']['kind']})",
              f"- Preprocessing: {card['task']['preprocessing']}",
              f"- Input range in evaluation: {_range_text(schema_in.get('range'))}",
              f"- Features: {len(card['data_schema']['feature_names']) or 'pixels'}", "",
              "## Training", "",
              f"- Rounds: {t['rounds']}, clients: {t['num_clients']}, strategy: {t['strategy']}, "
              f"seed: {t['seed']}",
              f"- Defenses: `{json.dumps(t['defenses'])}`",
              f"- Attack simulated: {attack['name'] if attack['simulated'] else 'none'}", "",
              "## Privacy", ""]
    if p.get("enabled"):
        lines += [f"- Sample-level DP-SGD (Opacus), accountant **{p.get('accountant')}**, delta "
                  f"{_fmt(p.get('delta'))}",
                  f"- {_noise_text(p)}, clip norm {_fmt(p.get('max_grad_norm'))}",
                  f"- Per-client epsilon: max **{_fmt(p.get('epsilon_max'))}**, mean "
                  f"{_fmt(p.get('epsilon_mean'))}"]
        if warning:
            lines.append("- **Reproducible noise: this epsilon is NOT valid against the server.**")
    else:
        lines.append("- **No sample-level differential privacy** in training.")
    lines += [f"- Central (user-level) DP: `{json.dumps(p.get('central_dp'))}`", ""]
    lines += audit_markdown(card.get("privacy_audit"), p)
    lines += evaluation_markdown(card.get("federated_evaluation"))
    lines += ["## Metrics", "",
              f"- Final: {m['final']}; best: {m['best']}",
              f"- Test accuracy (ONNX, served): {_fmt(m['test_onnx_accuracy'])}; int8: "
              f"{_fmt(m['test_int8_accuracy'])}", "",
              "| round | accuracy | loss | epsilon max | rejected | quarantined |",
              "|---|---|---|---|---|---|"]
    for r in m["per_round"]:
        lines.append(f"| {r.get('round')} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('loss'))} | "
                     f"{_fmt(r.get('epsilon_max'))} | {r.get('rejected', '-')} | "
                     f"{r.get('quarantined', '-')} |")
    e = card["explanations"]
    lines += ["", "## Explanations", "",
              f"{e['method']}, baseline: {e['baseline']}, {e['examples']} test examples.", ""]
    if "picture" in e:
        lines.append(f"![Integrated Gradients attributions]({e['picture']})")
    else:
        lines += [f"Top {len(e['feature_importance'])} of {e['num_features']} features "
                  f"({e['statistic']}):", "",
                  "| feature | importance |", "|---|---|"]
        lines += [f"| {f['feature']} | {f['importance']:.4g} |" for f in e["feature_importance"]]
    lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {n} | {a['sizes'][n]} | `{h}` |" for n, h in a["sha256"].items()]
    lines += ["", f"ONNX parity on {a['parity']['examples']} test inputs: max |logit diff| "
              f"{a['parity']['max_abs_diff']:.3g}, argmax agreement "
              f"{a['parity']['argmax_agreement']:.4f}.",
              f"Drift reference: {card.get('drift_reference') or 'none'}.",
              *_reference_lines(card.get("drift_reference_details")), "",
              "## Versions", "", f"`{json.dumps(card['versions'])}`", ""]
    return "\n".join(lines)


def _reference_lines(ref: dict | None) -> list[str]:
    """The drift reference's card lines: how it was built, its distance from the truth."""
    if not ref:
        return []
    lines = [f"Built from: {ref.get('details') or '-'}."]
    dist = ref.get("distance")
    if not isinstance(dist, dict):
        return lines + ["Distance from the true pooled histograms: unknown (only a simulation "
                        "knows the clients' pooled data)."]
    lines.append(f"Distance from the true pooled histograms ({dist.get('truth')}): mean total "
                 f"variation {dist['features_mean']:.3f} per feature (max "
                 f"{dist['features_max']:.3f}), {dist['labels']:.3f} for the labels.")
    server = dist.get("server_split")
    if isinstance(server, dict):
        lines.append(f"For comparison, the server's evaluation split: {server['features_mean']:.3f}"
                     f" per feature, {server['labels']:.3f} for the labels.")
    return lines
