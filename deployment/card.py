"""Model card (JSON + Markdown) with the privacy provenance of a federated run."""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from deployment.artifacts import ATTRIBUTION_PNG, CARD_JSON, CARD_MD, SAFETENSORS, build_loaded_model, load_weights
from deployment.explain import attribution_picture, feature_importance
from deployment.export import ExportResult
from fedshield.run_records import (BestRound, FinalMetrics, MetricsLine, PrivacySummary,
                                   RobustnessSummary, RunSummary, read_metrics, read_summary)
from tasks import Split, Task, get_task

TOP_FEATURES = 15
IMAGES_IN_PICTURE = 6


@dataclass
class ModelCard:
    data: dict
    json_path: Path
    md_path: Path


def read_run(run_dir: str | Path) -> tuple[RunSummary, dict, list[MetricsLine]]:
    """(summary, raw config table, per-round metrics) of a run folder (StateCorrupted if its
    summary or metrics are torn or edited)."""
    run = Path(run_dir)
    summary = read_summary(run)
    config = tomllib.loads((run / "config.toml").read_text()) if (run / "config.toml").is_file() else {}
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
    for pkg in ("torch", "onnx", "onnxruntime", "captum", "mlflow-skinny", "flwr", "opacus", "fedshield"):
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
        picked = np.concatenate([np.flatnonzero(test.y == c)[:1] for c in np.unique(test.y)])[:IMAGES_IN_PICTURE]
        attribution_picture(model, test.x[picked], test.y[picked], out / ATTRIBUTION_PNG)
        return base | {"baseline": "black image", "picture": ATTRIBUTION_PNG, "examples": int(len(picked))}
    ranked = feature_importance(model, test.x[:examples], task.feature_names)
    return base | {"baseline": "zeros (standardised mean / blank pixel)", "examples": int(min(examples, len(test))),
                   "statistic": "mean |attribution| per feature on test examples",
                   "num_features": len(ranked), "feature_importance": ranked[:TOP_FEATURES]}


def build_card(run_dir: str | Path, export: ExportResult, explain_examples: int = 64,
               reference_source: str | None = None) -> ModelCard:
    """Write ``model_card.json`` and ``model_card.md`` (and ``attributions.png`` for images)."""
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
        "task": {"name": task.name, "num_classes": task.num_classes, "preprocessing": task.preprocessing},
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
        "metrics": {"final": _dict_or_none(summary.final), "best": _dict_or_none(summary.best),
                    "per_round": [m.to_dict() for m in rounds],
                    "test_onnx_accuracy": export.parity["onnx_accuracy"],
                    "test_int8_accuracy": export.int8["accuracy"] if export.int8 else None},
        "artifacts": {"sha256": export.sha256, "sizes": export.sizes, "parity": export.parity, "int8": export.int8},
        "explanations": _explanations(task, export, test, out, explain_examples),
        "drift_reference": reference_source,
        "config": config,
        "versions": _versions(dict(summary.versions)),
    }
    json_path, md_path = out / CARD_JSON, out / CARD_MD
    json_path.write_text(json.dumps(card, indent=2, default=str))
    md_path.write_text(render_markdown(card))
    return ModelCard(card, json_path, md_path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _range_text(rng) -> str:
    if not isinstance(rng, dict):
        return "not recorded"
    return f"[{rng.get('min', 0.0):.4g}, {rng.get('max', 0.0):.4g}]"


def render_markdown(card: dict) -> str:
    p, t, m, a = card["privacy"], card["training"], card["metrics"], card["artifacts"]
    attack, schema_in = card["attack"], card["data_schema"]["input"]
    warning = card.get("privacy_warning")
    lines = [f"# Model card: {card['name']}", ""]
    if warning:
        lines += [f"> **WARNING: {warning}**", ""]
    lines += [f"Created {card['created_at']} from `{card['run_dir']}`.", "",
              "## Task and data schema", "",
              f"- Task: **{card['task']['name']}**, {card['task']['num_classes']} classes",
              f"- Input: float32, shape {card['data_schema']['input']['shape']} ({card['data_schema']['input']['kind']})",
              f"- Preprocessing: {card['task']['preprocessing']}",
              f"- Input range in evaluation: {_range_text(schema_in.get('range'))}",
              f"- Features: {len(card['data_schema']['feature_names']) or 'pixels'}", "",
              "## Training", "",
              f"- Rounds: {t['rounds']}, clients: {t['num_clients']}, strategy: {t['strategy']}, seed: {t['seed']}",
              f"- Defenses: `{json.dumps(t['defenses'])}`",
              f"- Attack simulated: {attack['name'] if attack['simulated'] else 'none'}", "",
              "## Privacy", ""]
    if p.get("enabled"):
        lines += [f"- Sample-level DP-SGD (Opacus), accountant **{p.get('accountant')}**, delta {_fmt(p.get('delta'))}",
                  f"- {_noise_text(p)}, clip norm {_fmt(p.get('max_grad_norm'))}",
                  f"- Per-client epsilon: max **{_fmt(p.get('epsilon_max'))}**, mean {_fmt(p.get('epsilon_mean'))}"]
        if warning:
            lines.append("- **Reproducible noise: this epsilon is NOT valid against the server.**")
    else:
        lines.append("- **No sample-level differential privacy** in training.")
    lines += [f"- Central (user-level) DP: `{json.dumps(p.get('central_dp'))}`", "",
              "## Metrics", "",
              f"- Final: {m['final']}; best: {m['best']}",
              f"- Test accuracy (ONNX, served): {_fmt(m['test_onnx_accuracy'])}; int8: {_fmt(m['test_int8_accuracy'])}", "",
              "| round | accuracy | loss | epsilon max | rejected | quarantined |", "|---|---|---|---|---|---|"]
    for r in m["per_round"]:
        lines.append(f"| {r.get('round')} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('loss'))} | "
                     f"{_fmt(r.get('epsilon_max'))} | {r.get('rejected', '-')} | {r.get('quarantined', '-')} |")
    e = card["explanations"]
    lines += ["", "## Explanations", "", f"{e['method']}, baseline: {e['baseline']}, {e['examples']} test examples.", ""]
    if "picture" in e:
        lines.append(f"![Integrated Gradients attributions]({e['picture']})")
    else:
        lines += [f"Top {len(e['feature_importance'])} of {e['num_features']} features ({e['statistic']}):", "",
                  "| feature | importance |", "|---|---|"]
        lines += [f"| {f['feature']} | {f['importance']:.4g} |" for f in e["feature_importance"]]
    lines += ["", "## Artifacts", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {n} | {a['sizes'][n]} | `{h}` |" for n, h in a["sha256"].items()]
    lines += ["", f"ONNX parity on {a['parity']['examples']} test inputs: max |logit diff| "
              f"{a['parity']['max_abs_diff']:.3g}, argmax agreement {a['parity']['argmax_agreement']:.4f}.",
              f"Drift reference: {card.get('drift_reference') or 'none'}.", "",
              "## Versions", "", f"`{json.dumps(card['versions'])}`", ""]
    return "\n".join(lines)
