"""report.html (deployment/html_report.py): the pure SVG/Markdown helpers, torn and hostile run
folders, the post-run hook and CLI, and the real page in headless Chromium (Debian's ``chromium``:
installed here when missing and possible, else those tests skip saying why)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from fedshield.deployment import html_report as hr

from fedshield.run_records import FederatedEvaluation, MetricsLine, RunSummary
from tests.config_support import neutral_config

SVG = "{http://www.w3.org/2000/svg}"
RUN_SECTIONS = ("overview", "accuracy", "epsilon", "clients", "evaluation", "reference", "card",
                "audit")


def svg_root(markup: str) -> ET.Element:
    """The first <svg> of ``markup`` parsed as XML (so the helpers' output is well-formed)."""
    start, end = markup.index("<svg"), markup.index("</svg>") + len("</svg>")
    return ET.fromstring(markup[start:end])


# --- pure helpers -------------------------------------------------------------------------------
def test_nice_ticks_are_round_steps_covering_the_range():
    assert hr.nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = hr.nice_ticks(3.1, 4.05)
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert ticks[0] <= 3.1 and ticks[-1] >= 4.05 and steps == {0.2}
    assert hr.nice_ticks(2.0, 2.0) == [2.0]
    assert hr.nice_ticks(0.0, float("inf")) == []


def test_linear_scale_maps_the_ends_and_a_flat_domain_to_the_middle():
    s = hr.linear_scale((1.0, 3.0), (100.0, 0.0))  # an SVG y axis runs downwards
    assert (s(1.0), s(2.0), s(3.0)) == (100.0, 50.0, 0.0)
    assert hr.linear_scale((5.0, 5.0), (0.0, 10.0))(5.0) == 5.0


def test_colour_scale_runs_red_yellow_green_and_clips():
    assert hr.colour_scale(0.0, 0.0, 100.0) == "#d73027"
    assert hr.colour_scale(50.0, 0.0, 100.0) == "#fee08b"
    assert hr.colour_scale(100.0, 0.0, 100.0) == "#1a9850"
    assert hr.colour_scale(-5.0, 0.0, 100.0) == "#d73027"
    assert hr.colour_scale(500.0, 0.0, 100.0) == "#1a9850"


def test_line_chart_draws_finite_points_lines_and_the_budget_line():
    a = hr.Series("client 0", ((1, 1.0), (2, 2.0), (3, float("nan"))))
    b = hr.Series("client <1>", ((1, 1.5),))  # one point: a dot, no line
    budget = hr.HLine("budget", 4.0)
    markup = hr.line_chart([a, b], x_label="round", y_label="epsilon", hlines=[budget])
    root = svg_root(markup)
    assert len(root.findall(f"{SVG}polyline")) == 1
    assert len(root.findall(f"{SVG}circle")) == 3  # the NaN point is left out
    (line,) = [x for x in root.findall(f"{SVG}line") if x.get("class") == "hline"]
    # y range 1..4 padded by 5%: the budget sits 0.15/3.3 of the plot height below the top
    top, bottom = 10, 280 - 40
    expected = top + (bottom - top) * (0.15 / 3.3)
    assert float(line.get("y1")) == pytest.approx(expected, abs=0.1)
    assert "client &lt;1&gt;" in markup and "client <1>" not in markup
    assert "no data" in hr.line_chart([hr.Series("x", ())], x_label="a", y_label="b")


def test_heatmap_cells_and_colour_bar_share_the_unit():
    markup = hr.heatmap(["fedavg | iid"], ["none", "alie@0.2"], [[97.5, None]], vmin=0.0,
                        vmax=100.0, unit="%", titles=[["clean", "not run"]])
    root = svg_root(markup)
    cells = [r for r in root.iter(f"{SVG}rect") if "cell" in (r.get("class") or "")]
    assert len(cells) == 2 and cells[1].get("class") == "cell none"
    values = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "val"]
    assert values == ["97.5"]
    assert "100 %" in markup and "0 %" in markup


def test_timeline_has_one_cell_per_client_and_round_with_its_reason():
    cells = {("0", 1): ("accepted", "update accepted"), ("1", 2): ("rejected", "norm <big>")}
    root = svg_root(hr.timeline(["0", "1"], [1, 2], cells))
    rects = [r for r in root.iter(f"{SVG}rect") if "cell" in (r.get("class") or "")]
    assert len(rects) == 4
    states = sorted(r.get("class") for r in rects)
    assert states == ["cell absent", "cell absent", "cell accepted", "cell rejected"]
    tips = [r.find(f"{SVG}title").text for r in rects]
    assert "client 1, round 2: rejected: norm <big>" in tips  # escaped in the file, parsed here


def test_markdown_converter_renders_the_card_and_escapes_raw_html():
    text = ("# Model card: x\n\n> **WARNING: noise**\n\n- Task: **digits**, `a<b`\n"
            "- two *em*\n\n| a | b |\n|---|---|\n| 1 | <i>2</i> |\n\n"
            "<script>alert(1)</script>\n![pic](attributions.png)\n")
    out = hr.markdown_to_html(text, image=lambda alt, src: f"[{alt}:{src}]")
    assert "<h3>Model card: x</h3>" in out
    assert "<blockquote><strong>WARNING: noise</strong></blockquote>" in out
    assert "<li>Task: <strong>digits</strong>, <code>a&lt;b</code></li>" in out
    assert "<em>em</em>" in out and "<td>&lt;i&gt;2&lt;/i&gt;</td>" in out
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "[pic:attributions.png]" in out


def test_client_states_map_node_ids_to_partitions_with_the_reasons():
    node = 9_123_456_789_012_345
    lines = [MetricsLine(round=1, epsilon={"0": 1.0, "1": 1.0, "2": 1.0},
                         rejected={"1": "update norm 900 > 20 x median"}),
             MetricsLine(round=2, epsilon={"0": 2.0}, refused={"3": "budget exhausted: spent 9"},
                         quarantined=(node,), newly_quarantined=(node,),
                         node_partitions={str(node): 2}),
             MetricsLine(round=3, epsilon={"0": 3.0}, quarantined=(node,),
                         node_partitions={str(node): 2})]
    cells = hr.client_states(lines)
    assert cells[("0", 1)][0] == "accepted"
    assert cells[("1", 1)] == ("rejected", "update norm 900 > 20 x median")
    assert cells[("3", 2)] == ("refused", "budget exhausted: spent 9")
    assert cells[("2", 2)] == ("quarantined", f"quarantined this round (node id {node})")
    assert cells[("2", 3)] == ("quarantined", f"in quarantine (node id {node})")
    assert ("1", 2) not in cells  # not sampled that round: drawn as absent


# --- hostile and torn folders -------------------------------------------------------------------
def write_run(folder: Path, summary: RunSummary, lines: list[MetricsLine]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(summary.to_json())
    (folder / "metrics.jsonl").write_text("".join(m.to_json() + "\n" for m in lines))
    return folder


def test_an_empty_folder_gives_every_section_saying_what_is_missing(tmp_path):
    page = hr.write_report(tmp_path).read_text()
    for sid in RUN_SECTIONS:
        assert f'<section id="{sid}">' in page
    assert "summary.json could not be read" in page
    assert "metrics.jsonl is missing or empty" in page
    assert "no model card" in page and "not audited" in page


def test_torn_files_give_sections_that_say_so(tmp_path):
    (tmp_path / "summary.json").write_text('{"privacy": {"enab')
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": "two"}\n{"round": 3}\n')
    (tmp_path / "audit.json").write_text("not json")
    page = hr.render_report(tmp_path)
    assert "summary.json could not be read" in page and "torn" in page
    assert "metrics.jsonl could not be read" in page and "line 2" in page
    assert "audit.json could not be read" in page


def test_strings_from_the_folder_are_escaped_and_files_outside_it_not_read(tmp_path):
    evil = '<script>alert("x")</script>'
    secret = tmp_path / "secret.md"
    secret.write_text("# SECRET-CONTENT")
    summary = RunSummary.from_dict({"name": evil, "privacy": {"enabled": False},
                                    "handoff": {"card_path": str(secret), "version": "1"}})
    lines = [MetricsLine(round=1, accuracy=0.5, loss=1.0, rejected={"0": f"<img src=x>{evil}"},
                         evaluation=FederatedEvaluation(accuracy={"<b>": 0.5}, mean=0.5))]
    run = write_run(tmp_path / "run", summary, lines)
    page = hr.write_report(run).read_text()
    assert "<script>" not in page and "<img src=x>" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page
    assert "SECRET-CONTENT" not in page  # a card path outside the run folder is ignored
    assert hr.CSP in page


def test_federated_evaluation_distribution_is_drawn_and_absent_says_not_run(tmp_path):
    ev = FederatedEvaluation(accuracy={"0": 0.9, "1": 0.7, "2": 0.8}, mean=0.8, worst=0.7,
                             worst_decile=0.7, spread=0.0816, noise_std=0.01)
    summary = RunSummary.from_dict({"privacy": {"enabled": False}, "num_clients": 3})
    run = write_run(tmp_path / "run", summary, [MetricsLine(round=1, evaluation=ev),
                                                MetricsLine(round=2, evaluation=ev)])
    page = hr.render_report(run)
    body = page[page.index('<section id="evaluation">'):page.index('<section id="card">')]
    assert "80.00%" in body and "70.00%" in body and "8.16 pts" in body
    assert "DP noise std 0.01" in body and "<svg" in body
    bare = write_run(tmp_path / "bare", summary, [MetricsLine(round=1, accuracy=0.5)])
    assert "not run" in hr.render_report(bare)


def test_the_drift_reference_shows_whose_counts_and_its_distance_from_the_truth(tmp_path):
    summary = RunSummary.from_dict({"privacy": {"enabled": True}, "drift_reference": {
        "noise_multiplier": 20.0, "used": ["0", "2"], "refused": {"1": "budget exhausted"}}})
    run = write_run(tmp_path / "run", summary, [MetricsLine(round=1, accuracy=0.5)])

    def body() -> str:
        page = hr.render_report(run)
        return page[page.index('<section id="reference">'):page.index('<section id="card">')]
    assert "2 client(s) (0, 2)" in body() and "noise multiplier 20" in body()
    assert "budget exhausted" in body() and "no hand-off reference" in body()
    (run / hr.EXPORT_DIR).mkdir()
    distance = {"truth": "pooled training data", "features_mean": 0.0123, "features_max": 0.2,
                "labels": 0.004, "server_split": {"features_mean": 0.0456, "features_max": 0.3,
                                                  "labels": 0.0789}}
    (run / hr.EXPORT_DIR / hr.REFERENCE_JSON).write_text(json.dumps(
        {"source": "clients (DP)", "details": "2 clients, noise multiplier 20",
         "distance": distance}))
    assert "0.0123" in body() and "0.0789" in body() and "clients (DP)" in body()
    assert "pooled training data" in body()
    # a reference without a distance (no simulation truth): unknown, said so
    (run / hr.EXPORT_DIR / hr.REFERENCE_JSON).write_text(json.dumps({"source": "server"}))
    assert "unknown" in body()


def test_constants_agree_with_their_homes_and_the_hook_is_registered():
    from fedshield.deployment.artifacts import CARD_MD, REFERENCE_JSON
    from fedshield.deployment.handoff import EXPORT_DIR
    from fedshield.deployment.hooks import install_post_run_hooks
    from fedshield.privacy.audit import AUDIT_JSON
    from fedshield.server import hooks

    assert (hr.CARD_MD, hr.EXPORT_DIR, hr.AUDIT_JSON) == (CARD_MD, EXPORT_DIR, AUDIT_JSON)
    assert hr.REFERENCE_JSON == REFERENCE_JSON
    install_post_run_hooks()
    assert hooks.registered(hr.REPORT_HOOK).run is hr.report_hook


# --- a real tiny run and hand-made grids --------------------------------------------------------
AUDIT = {"format": "fedshield-audit/1", "created_at": "2026-12-01T00:00:00Z",
         "mechanism_digest": "0" * 64, "task": "digits", "client": 0,
         "canaries_in_released_model": False, "procedure": "one-run canary audit",
         "canary": [{"empirical_epsilon": 0.42, "stated_epsilon": 6.0, "delta": 1e-5,
                     "bound": {"canaries": 1000}, "adversary": "update", "accountant": "prv",
                     "unit": "sample-level"}],
         "membership": [], "inversion": []}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """sklearn digits, 4 clients, 2 rounds, DP-SGD on with a budget, one scaling attacker that
    screening rejects and reputation quarantines, the hand-off on (a real model card); plus a
    hand-made audit.json. The report is written by the post-run hook where the ServerApp runs
    the hooks after the hand-off (server/hooks.py POST_RUN_ORDER), else by the hook here."""
    from fedshield.server import hooks
    from fedshield.simulations.runner import simulate

    tmp = tmp_path_factory.mktemp("report")
    cfg = neutral_config({
        "name": "report", "output_dir": str(tmp / "runs"), "task": {"name": "digits"},
        "federation": {"num_clients": 4, "rounds": 2}, "partition": {"kind": "iid"},
        "train": {"lr": 0.5, "batch_size": 32},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_epsilon": 10.0,
                    "ledger_dir": str(tmp / "ledgers")},
        "attack": {"name": "scaling", "byzantine_fraction": 0.25, "scale": 100.0},
        "reputation": {"patience": 1},
        "deployment": {"handoff": True, "registry_uri": f"sqlite:///{tmp}/registry.db"}})
    run = Path(simulate(cfg).run_dir)
    if not hasattr(hooks, "POST_RUN_ORDER"):  # this branch's ServerApp runs only the hand-off
        hooks.registered(hr.REPORT_HOOK).run(run, cfg)
    (run / "audit.json").write_text(json.dumps(AUDIT))
    return run


def test_simulate_writes_the_report_through_the_post_run_hook(real_run):
    from fedshield.server import hooks

    if not hasattr(hooks, "POST_RUN_ORDER"):
        pytest.skip("the ServerApp here runs only the hand-off hook; server/hooks.py's "
                    "POST_RUN_ORDER (the MLflow tracking branch) runs the report after it")
    summary = json.loads((real_run / "summary.json").read_text())
    assert Path(summary["post_run"]["report"]["path"]) == real_run / hr.REPORT_HTML


def test_the_report_command_rebuilds_a_run_and_refuses_a_non_run(real_run, tmp_path):
    from typer.testing import CliRunner

    from fedshield.cli import app

    (real_run / hr.REPORT_HTML).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(real_run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(real_run / hr.REPORT_HTML)
    page = (real_run / hr.REPORT_HTML).read_text()
    assert "Model card: report" in page and "0.42" in page  # the card and the audit
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "neither summary.json" in bad.output


@pytest.fixture(scope="module")
def grids(tmp_path_factory) -> dict[str, Path]:
    """A robustness grid and a privacy sweep folder as simulations/sweeps.py writes them."""
    tmp = tmp_path_factory.mktemp("grids")
    rob, sweep = tmp / "robustness", tmp / "sweep"
    rob.mkdir()
    sweep.mkdir()
    rows = [{"rule": r, "partition": "iid", "attack": a, "byzantine_fraction": f,
             "final_accuracy": acc, "true_quarantine_rate": tq, "false_quarantine_rate": 0.0,
             "status": "completed", "run_dir": None}
            for r, a, f, acc, tq in [("fedavg", "none", 0.0, 0.95, None),
                                     ("fedavg", "alie", 0.2, 0.31, 0.0),
                                     ("nnm+cclip", "none", 0.0, 0.94, None),
                                     ("nnm+cclip", "alie", 0.2, 0.90, 1.0)]]
    (rob / "robustness.json").write_text(json.dumps(rows))
    worst = [{"rule": "fedavg", "partition": "iid", "byzantine_fraction": 0.2,
              "no_attack_accuracy": 0.95, "worst_accuracy": 0.31, "worst_attack": "alie"}]
    (rob / "worst_case.json").write_text(json.dumps(worst))
    points = [{"target_epsilon": e, "seed": 0, "final_accuracy": a, "epsilon_max": s,
               "epsilon_label": "sample-level, per client" if s else None, "run_dir": None}
              for e, a, s in [(1.0, 0.80, 0.99), (3.0, 0.90, 2.98), (float("inf"), 0.96, None)]]
    (sweep / "privacy_sweep.json").write_text(json.dumps(points))
    return {"robustness": rob, "sweep": sweep}


def test_grid_reports_draw_the_heatmap_worst_cases_and_privacy_utility(grids):
    rob = hr.write_grid_report(grids["robustness"]).read_text()
    assert '<section id="heatmap">' in rob and '<section id="worst-case">' in rob
    assert ">31.0<" in rob and ">90.0<" in rob and "true_quarantine_rate 1" in rob
    sweep = hr.write_grid_report(grids["sweep"]).read_text()
    assert '<section id="privacy-utility">' in sweep and "non-private" in sweep
    assert hr.is_grid(grids["sweep"]) and not hr.is_grid(grids["sweep"].parent)


def test_the_report_command_recognises_a_grid_folder(grids):
    from typer.testing import CliRunner

    from fedshield.cli import app

    result = CliRunner().invoke(app, ["report", str(grids["robustness"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"path": str(grids["robustness"] / hr.REPORT_HTML),
                                         "kind": "grid"}


# --- headless Chromium ----------------------------------------------------------------------
def _install_chromium() -> str:
    """Debian's chromium: already there, or installed with apt-get when root (10 min cap)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed and cannot be here (needs root and "
                    "apt-get): `apt-get install chromium` to run the browser tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       env=env, capture_output=True, timeout=600, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"`apt-get install chromium` failed ({type(exc).__name__}): no browser here")
    return shutil.which("chromium") or pytest.skip("apt-get ran but no chromium is on PATH")


@pytest.fixture(scope="module")
def chromium():
    """Run headless Chromium on a file: (stdout, console messages), a fresh profile each time."""
    binary = _install_chromium()

    def run(page: Path, *args: str) -> tuple[str, list[str]]:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                 f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
                 page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        # Chromium logs every console message (errors, CSP violations, blocked fetches) as a
        # CONSOLE line; the page runs no script, so any such line is a problem.
        return done.stdout, [x for x in done.stderr.splitlines() if ":CONSOLE" in x]

    return run


def png_pixels(path: Path) -> tuple[int, int, list[int]]:
    """Width, height and the grey levels of an 8-bit RGB(A) PNG (zlib: no PIL needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + n
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6), "Chromium writes 8-bit RGB(A)"
    bpp = 3 if colour == 2 else 4
    raw, stride, prev, grey = zlib.decompress(b"".join(chunks)), width * bpp, bytearray(), []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        prev = prev or bytearray(stride)
        for i in range(stride):  # undo the PNG filters
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pred = (0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else
                    b if abs(p - b) <= abs(p - c) else c)[f]
            line[i] = (line[i] + pred) & 0xFF
        grey += [sum(line[i:i + 3]) // 3 for i in range(0, stride, bpp * 4)]  # every 4th pixel
        prev = line
    return width, height, grey


def variance(values: list[int]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def test_the_console_check_and_the_blank_check_can_fail(chromium, tmp_path):
    """Controls: a page that fetches and runs a script logs CONSOLE lines; a blank page's
    screenshot has no variance. So the checks below are not vacuous."""
    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                   f'content="{hr.CSP}"></head><body><img src="http://192.0.2.1/x.png">'
                   '<script>console.error("x")</script></body></html>')
    _, console = chromium(bad, "--dump-dom")
    assert len(console) >= 2
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shot = tmp_path / "blank.png"
    chromium(blank, f"--screenshot={shot}", "--window-size=400,300")
    assert variance(png_pixels(shot)[2]) < 1.0


def test_the_run_report_in_chromium(chromium, real_run, tmp_path):
    page = hr.write_report(real_run)
    dom, console = chromium(page, "--dump-dom")
    assert console == []
    for sid in RUN_SECTIONS:
        assert f'<section id="{sid}">' in dom
    for sid in ("accuracy", "epsilon", "clients"):
        section = dom[dom.index(f'<section id="{sid}">'):]
        assert section.index("<svg") < section.index("</section>"), f"{sid} has no chart"
    assert "budget (privacy.max_epsilon)" in dom and "sample-level" in dom
    assert 'class="cell quarantined"' in dom  # the scaling attacker, caught by reputation
    shot = tmp_path / "report.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1280,1800", "--hide-scrollbars")
    width, height, grey = png_pixels(shot)
    assert (width, height) == (1280, 1800)
    # Text, charts and the header: far from one flat colour (a blank page is ~0).
    assert variance(grey) > 100.0
    if os.environ.get("FEDSHIELD_REPORT_SCREENSHOT"):  # how docs/images/report.png is made
        shutil.copy(shot, os.environ["FEDSHIELD_REPORT_SCREENSHOT"])


def test_the_grid_reports_in_chromium(chromium, grids):
    for folder, sections in ((grids["robustness"], ("heatmap", "worst-case", "cells")),
                             (grids["sweep"], ("privacy-utility", "cells"))):
        dom, console = chromium(hr.write_grid_report(folder), "--dump-dom")
        assert console == []
        for sid in sections:
            assert f'<section id="{sid}">' in dom
