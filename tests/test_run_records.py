"""metrics.jsonl and summary.json are built and read only through their typed records."""

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
from fedshield.simulations.runner import simulate

from fedshield.errors import StateCorrupted
from fedshield.run_records import (
    METRICS_FILE,
    SUMMARY_FILE,
    AttackReport,
    MetricsLine,
    RunSummary,
    read_metrics,
    read_summary,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dp_attacked_run(tmp_path_factory):
    """A tiny real digits run with every nested part filled: DP-SGD events, the noised class
    histograms, central DP and a sign-flip attacker (the attack report)."""
    from tests.config_support import neutral_config

    tmp = tmp_path_factory.mktemp("records")
    cfg = neutral_config({
        "name": "records", "seed": 0, "output_dir": str(tmp / "runs"), "task": {"name": "digits"},
        "federation": {"num_clients": 5, "rounds": 2},
        "train": {"lr": 0.1, "batch_size": 16},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 0.0,
                    "ledger_dir": str(tmp / "ledgers")},
        "central_dp": {"enabled": True, "noise_multiplier": 0.5},  # needs a clipped mean:
        "aggregation": {"rule": "fedavg", "weighting": "uniform"},
        "screening": {"max_norm_ratio": 0.0},
        "attack": {"name": "sign_flip", "byzantine_ids": "4"},
        "deployment": {"handoff": False}})
    summary = simulate(cfg)
    return summary, Path(summary.run_dir)


def test_the_run_files_round_trip_byte_for_byte(dp_attacked_run):
    summary, run_dir = dp_attacked_run
    text = (run_dir / SUMMARY_FILE).read_text()
    decoded = RunSummary.from_json(text)
    assert decoded.to_json() == text  # field names and values exactly as written
    assert decoded == summary == read_summary(run_dir)  # the runner's object is the file
    assert decoded.extra == {}  # every key of a fresh summary is a typed field
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert [MetricsLine.from_json(x).to_json() for x in lines] == lines
    records = read_metrics(run_dir)
    assert [m.round for m in records] == [1, 2] and all(m.extra == {} for m in records)
    # The nested parts are typed, not dicts: what the other modules read.
    event = next(iter(records[0].dp_events.values()))
    assert event.noise_multiplier == 1.0 and event.steps > 0
    assert isinstance(summary.attack_report, AttackReport)
    assert summary.attack_report.byzantine_ids == (4,)
    assert summary.privacy.central_dp.user_level_epsilon == records[-1].central_epsilon
    assert summary.final.accuracy == records[-1].accuracy


def test_a_torn_or_edited_summary_is_refused_with_the_field(dp_attacked_run, tmp_path):
    _, run_dir = dp_attacked_run
    text = (run_dir / SUMMARY_FILE).read_text()
    (tmp_path / SUMMARY_FILE).write_text(text[: len(text) // 2])  # a crash mid-write
    with pytest.raises(StateCorrupted, match="not valid JSON.*restore it from a backup"):
        read_summary(tmp_path)
    edited = json.loads(text)
    edited["privacy"]["epsilon_max"] = "0.1"
    with pytest.raises(StateCorrupted, match=r"privacy\.epsilon_max: expected a number, found str"):
        RunSummary.from_json(json.dumps(edited))
    edited = json.loads(text)
    edited["robustness"]["quarantined"] = [True]
    with pytest.raises(StateCorrupted, match=r"robustness\.quarantined\[0\]: expected an integer"):
        RunSummary.from_dict(edited)
    with pytest.raises(StateCorrupted, match="does not exist"):
        read_summary(tmp_path / "nowhere")


@pytest.mark.parametrize("foreign", ['{"parity": {"onnx_accuracy": 0.9}}', "[1, 2]", '"x"'])
def test_a_foreign_file_is_not_a_summary(foreign):
    with pytest.raises(StateCorrupted, match="not a fedshield run summary|expected a JSON object"):
        RunSummary.from_json(foreign)


def test_an_edited_metrics_line_names_the_field(dp_attacked_run):
    _, run_dir = dp_attacked_run
    line = json.loads((run_dir / METRICS_FILE).read_text().splitlines()[0])
    client = next(iter(line["dp_events"]))
    line["dp_events"][client]["steps"] = "many"
    with pytest.raises(StateCorrupted, match=rf"dp_events\.{client}\.steps: expected an integer"):
        MetricsLine.from_json(json.dumps(line))
    with pytest.raises(StateCorrupted, match="'round' is missing"):
        MetricsLine.from_json('{"accuracy": 0.5}')


def test_older_summaries_load_with_defaults_and_keep_unknown_keys():
    """A summary from before the status/noise fields (tests/deploy_support.py writes one), with
    a key this version does not know: nothing is invented, nothing is lost."""
    old = {"name": "old", "rounds": 3, "privacy": {"enabled": True, "epsilon_max": 2.0},
           "robustness": {"aggregation": "fedavg"}, "final": {"accuracy": 0.9, "loss": 0.3},
           "attack": "none", "from_the_future": {"x": 1}}
    summary = RunSummary.from_dict(old)
    assert summary.status is None and not summary.failed  # unknown, not "completed"
    privacy = summary.privacy
    assert privacy.reproducible_noise is None and privacy.noise_multipliers_used is None
    assert summary.attack == "none" and summary.final_accuracy == 0.9
    again = summary.to_dict()
    assert again["from_the_future"] == {"x": 1} and again["robustness"]["aggregation"] == "fedavg"
    assert RunSummary.from_dict(again) == summary
    assert "handoff" not in again and "attack_report" not in again  # absent until set
    assert replace(summary, status="failed").failed


def test_an_old_metrics_line_without_status_is_judged_by_skipped():
    assert MetricsLine(round=1).aggregated
    assert not MetricsLine(round=1, skipped="too few updates").aggregated
    assert not MetricsLine(round=1, status="failed").aggregated


# --- the convention: no string-keyed reads of a summary or metrics line outside the records ----
RECORD_MODULES = {"fedshield/run_records.py"}
PACKAGES = ("fedshield", "server", "client", "privacy", "simulations", "deployment", "benchmarks",
            "tasks")
# Keys that only a summary or a metrics line has: a subscript or .get() with one of them is a
# read of the JSON around its record.
# (Benchmark result rows share "wall_seconds" and "attack_report": those keys are not listed.)
RECORD_KEYS = {"final", "best", "rounds_completed", "epsilon_by_client", "noise_multipliers_used",
               "rejected_total", "refused_total", "stopped_early", "data_quality", "dp_events",
               "central_epsilon", "privacy_unit", "newly_quarantined", "rejected_codes",
               "class_counts", "outside_guarantee", "reproducible_noise", "exhausted_clients",
               "user_level_epsilon"}
SUMMARY_NAMES = {"summary", "line", "lines"}  # variables that hold a summary or metrics lines
# Functions that read another record's JSON that embeds summary parts (why each is allowed).
ALLOWED = {("deployment/card.py", "render_markdown"),  # the model card's JSON (ModelCard.data)
           ("deployment/card.py", "_noise_text")}  # likewise: a line of the card's Markdown


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _skipped(tree: ast.AST, functions: set[str]) -> set[int]:
    return {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in functions
            for n in ast.walk(f)}


def record_reads(source: str, allowed_functions: frozenset[str] = frozenset()) -> list[tuple]:
    """(line, what) of every read of summary.json / metrics.jsonl around the records."""
    tree = ast.parse(source)
    docstrings, skipped = _docstrings(tree), _skipped(tree, set(allowed_functions))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        key, target = None, None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):  # reads only
            target = node.value
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                key = node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" and node.args \
                and isinstance(node.args[0], ast.Constant):
            key, target = node.args[0].value, node.func.value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings \
                and node.value.endswith((SUMMARY_FILE, METRICS_FILE)):
            found.append((node.lineno, f"the file name {node.value!r} (use run_records)"))
        root = target
        while isinstance(root, ast.Subscript):
            root = root.value
        if isinstance(root, ast.Name) and root.id in SUMMARY_NAMES and key is not None:
            found.append((node.lineno, f"{root.id}[...]"))
        elif key in RECORD_KEYS:
            found.append((node.lineno, f"[{key!r}]"))
    return found


def test_the_grep_catches_todays_patterns():
    """The check itself can fail: each way the modules read these files before the records."""
    for bad in ('x = summary["final"]["accuracy"]', 'summary.get("status")',
                'eps = s["privacy"]["epsilon_max"] + s["rounds_completed"]',
                'q = lines[-1]["quarantined"]', 'p = run / "summary.json"',
                'rows = out.glob("*/metrics.jsonl")', 'd = m.get("dp_events", {})'):
        assert record_reads(bad), bad
    assert not record_reads('"""Reads summary.json."""\nx = summary.final.accuracy')


def test_no_module_reads_a_summary_or_metrics_line_by_key():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in RECORD_MODULES:
                continue
            allowed = frozenset(f for p, f in ALLOWED if p == rel)
            offenders += [f"{rel}:{n}: {what}"
                          for n, what in record_reads(path.read_text(), allowed)]
    assert not offenders, "read these through fedshield/run_records.py:\n" + "\n".join(offenders)
