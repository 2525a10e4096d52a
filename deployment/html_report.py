"""``runs/<run>/report.html``: one self-contained page that tells a run's whole story.

``write_report(run_dir)`` draws a finished run from its typed records only (``metrics.jsonl`` and
``summary.json`` through fedshield.run_records, the model card under ``export/``, ``audit.json``
through privacy.audit): accuracy and loss per round, each client's epsilon with the budget line,
each client's accepted / rejected / refused / quarantined timeline with the reasons, the federated
evaluation distribution, the model card and the audit. ``write_grid_report(grid_dir)`` draws a
robustness grid (heatmap + worst-case table) or a privacy sweep (privacy-utility curve) from the
tables simulations/sweeps.py writes.

Why no plotting library and no JavaScript: the page must open anywhere, offline, years later, and
a run folder is untrusted input. Charts are inline SVG from the small pure functions below, every
string read from a file goes through ``html.escape``, and a Content-Security-Policy forbids
scripts and every fetch (a missed escape still cannot run code or phone home). A missing or torn
file gives a section saying what is missing, never an exception.

Standard library plus the core records only (no torch, Flower or MLflow), so
``fedshield report RUN_DIR`` is quick and works in a base install.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedshield.errors import ConfigError, FedShieldError, StateCorrupted
from fedshield.run_records import (
    FederatedEvaluation,
    HandoffSummary,
    MetricsLine,
    RunSummary,
    read_metrics,
    read_summary,
)

if TYPE_CHECKING:
    from fedshield.schema import Config

REPORT_HTML = "report.html"
REPORT_HOOK = "report"  # the post-run hook's name (server/hooks.py), and its summary key
# Where the hand-off leaves the card (deployment.handoff.EXPORT_DIR / deployment.artifacts.CARD_MD;
# not imported: those modules pull torch and MLflow; tests/test_html_report.py checks they agree).
EXPORT_DIR, CARD_MD, HANDOFF_JSON = "export", "model_card.md", "handoff.json"
REFERENCE_JSON = "reference.json"  # deployment.artifacts.REFERENCE_JSON: the drift reference
AUDIT_JSON = "audit.json"  # privacy.audit.AUDIT_JSON (that module imports scipy: read lazily)
# The tables simulations/sweeps.py writes in a grid folder (write_table's JSON copy).
ROBUSTNESS_JSON, WORST_CASE_JSON, SWEEP_JSON = "robustness.json", "worst_case.json", \
    "privacy_sweep.json"
MAX_INLINE_IMAGE = 2_000_000  # bytes: a card picture larger than this is left out, not inlined

# No script runs and nothing is fetched: styles and images are inline (data: URIs) only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
STATE_COLOURS = {"accepted": "#4caf50", "rejected": "#e53935", "refused": "#fb8c00",
                 "quarantined": "#6a1b9a", "absent": "#e0e0e0"}


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML/SVG elements and quoted attributes."""
    return html.escape(str(value), quote=True)


# --- pure SVG helpers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line (or dot cloud, ``dots_only``) of a chart: (x, y) points in data units."""

    label: str
    points: tuple[tuple[float, float], ...]
    colour: str = ""
    dots_only: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class HLine:
    """A horizontal reference line across a chart (a budget, a baseline)."""

    label: str
    y: float
    colour: str = "#b71c1c"


def linear_scale(domain: tuple[float, float],
                 out: tuple[float, float]) -> Callable[[float], float]:
    """Map ``domain`` linearly onto ``out``; a zero-width domain maps to the middle of ``out``."""
    (d0, d1), (r0, r1) = domain, out
    if d1 == d0:
        return lambda _v: (r0 + r1) / 2
    k = (r1 - r0) / (d1 - d0)
    return lambda v: r0 + (v - d0) * k


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    norm = raw / mag  # in [1, 10): round to the nearest of 1, 2, 5, 10
    step = mag * (1 if norm < 1.5 else 2 if norm < 3 else 5 if norm < 7 else 10)
    first = math.floor(lo / step + 1e-9) * step
    ticks: list[float] = []
    k = 0
    while first + k * step <= hi + step * 1e-9 or not ticks or ticks[-1] < hi:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def tick_label(value: float) -> str:
    """A tick's text: no trailing zeros (0.5, 2, 1e-05)."""
    return f"{value:.6g}"


def colour_scale(value: float, vmin: float, vmax: float) -> str:
    """Red (vmin) - yellow - green (vmax) as ``#rrggbb``; values outside are clipped."""
    t = 0.5 if vmax == vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    stops = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))
    (t0, c0), (t1, c1) = (stops[0], stops[1]) if t <= 0.5 else (stops[1], stops[2])
    f = (t - t0) / (t1 - t0)
    return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(c0, c1, strict=True))


def _finite(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def line_chart(series: Sequence[Series], *, x_label: str, y_label: str,
               hlines: Sequence[HLine] = (), y_range: tuple[float, float] | None = None,
               width: int = 560, height: int = 280, max_legend: int = 12) -> str:
    """An SVG line chart of ``series`` (non-finite points left out) with reference ``hlines``;
    each line and dot has a ``<title>`` (hover text). A chart without data says so."""
    pts = [p for s in series for p in _finite(s.points)]
    if not pts:
        return '<p class="missing">no data to draw</p>'
    ys = [y for _, y in pts] + [h.y for h in hlines if math.isfinite(h.y)]
    xs = [x for x, _ in pts]
    y_lo, y_hi = y_range if y_range else (min(ys), max(ys))
    if not y_range:  # a little headroom so lines do not sit on the frame
        pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    left, right, top, bottom = 56, 12, 10, 40
    sx = linear_scale((min(xs), max(xs)), (left, width - right))
    sy = linear_scale((y_lo, y_hi), (height - bottom, top))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<title>{esc(y_label)} against {esc(x_label)}</title>']
    for t in nice_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            y = sy(t)
            out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                       f'y2="{y:.1f}"/><text class="tick" x="{left - 4}" y="{y + 3:.1f}" '
                       f'text-anchor="end">{esc(tick_label(t))}</text>')
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 12 else nice_ticks(min(xs), max(xs), 8)
    for t in x_ticks:
        if min(xs) <= t <= max(xs):
            out.append(f'<text class="tick" x="{sx(t):.1f}" y="{height - bottom + 14}" '
                       f'text-anchor="middle">{esc(tick_label(t))}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{width - left - right}" '
               f'height="{height - top - bottom}"/>')
    out.append(f'<text class="axis" x="{(left + width - right) / 2:.1f}" y="{height - 6}" '
               f'text-anchor="middle">{esc(x_label)}</text>')
    out.append(f'<text class="axis" transform="translate(12,{(top + height - bottom) / 2:.1f}) '
               f'rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
    for h in hlines:
        if math.isfinite(h.y) and y_lo <= h.y <= y_hi:
            y = sy(h.y)
            out.append(f'<line class="hline" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="{esc(h.colour)}"><title>{esc(h.label)}: '
                       f'{esc(tick_label(h.y))}</title></line><text class="hlabel" '
                       f'x="{width - right - 4}" y="{y - 4:.1f}" text-anchor="end" '
                       f'fill="{esc(h.colour)}">{esc(h.label)}</text>')
    for i, s in enumerate(series):
        colour = esc(s.colour or PALETTE[i % len(PALETTE)])
        points = _finite(s.points)
        if not s.dots_only and len(points) > 1:
            dash = ' stroke-dasharray="5,3"' if s.dashed else ""
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            out.append(f'<polyline class="series" points="{coords}" stroke="{colour}"{dash}>'
                       f'<title>{esc(s.label)}</title></polyline>')
        for x, y in points:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                       f'<title>{esc(s.label)}: {esc(tick_label(x))}, {esc(f"{y:.4g}")}'
                       f'</title></circle>')
    out.append("</svg>")
    return "".join(out) + legend(series, max_legend)


def legend(series: Sequence[Series], max_items: int = 12) -> str:
    """The chart's key (HTML): at most ``max_items`` entries, then how many more there are."""
    items = []
    for i, s in enumerate(series[:max_items]):
        colour = esc(s.colour or PALETTE[i % len(PALETTE)])
        items.append(f'<span class="key"><i style="background:{colour}"></i>{esc(s.label)}'
                     "</span>")
    if len(series) > max_items:
        items.append(f'<span class="key">... and {len(series) - max_items} more (hover a line '
                     "for its name)</span>")
    return f'<div class="legend">{"".join(items)}</div>' if len(series) > 1 else ""


def heatmap(row_labels: Sequence[str], col_labels: Sequence[str],
            values: Sequence[Sequence[float | None]], *, vmin: float, vmax: float, unit: str,
            titles: Sequence[Sequence[str]] | None = None, cell: int = 54) -> str:
    """An SVG heatmap: ``values[i][j]`` (None: not run) for row i, column j, cells labelled and
    coloured in the same ``unit`` as the colour bar, with ``titles`` as each cell's hover text."""
    if not row_labels or not col_labels:
        return '<p class="missing">no data to draw</p>'
    left = 12 + 7 * max(len(r) for r in row_labels)
    top = 12 + 6 * max(len(c) for c in col_labels)
    width, height = left + cell * len(col_labels) + 90, top + 26 * len(row_labels) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img"><title>heatmap '
           f'({esc(unit)})</title>']
    for j, c in enumerate(col_labels):
        x = left + cell * j + cell / 2
        out.append(f'<text class="tick" transform="translate({x:.1f},{top - 4}) rotate(-45)">'
                   f'{esc(c)}</text>')
    for i, r in enumerate(row_labels):
        y = top + 26 * i
        out.append(f'<text class="tick" x="{left - 4}" y="{y + 17}" text-anchor="end">'
                   f'{esc(r)}</text>')
        for j in range(len(col_labels)):
            v = values[i][j]
            x = left + cell * j
            tip = esc(titles[i][j]) if titles else ""
            if v is None or not math.isfinite(v):
                out.append(f'<rect class="cell none" x="{x}" y="{y}" width="{cell - 2}" '
                           f'height="24"><title>{tip or "not run"}</title></rect>')
                continue
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell - 2}" height="24" '
                       f'fill="{colour_scale(v, vmin, vmax)}"><title>{tip}</title></rect>'
                       f'<text class="val" x="{x + (cell - 2) / 2:.1f}" y="{y + 16}" '
                       f'text-anchor="middle">{esc(f"{v:.1f}")}</text>')
    bar_x, steps = width - 70, 10
    bar_h = max(26 * len(row_labels), 60)
    for k in range(steps):
        v = vmax - (vmax - vmin) * (k + 0.5) / steps
        out.append(f'<rect x="{bar_x}" y="{top + bar_h * k / steps:.1f}" width="14" '
                   f'height="{bar_h / steps + 0.5:.1f}" fill="{colour_scale(v, vmin, vmax)}"/>')
    out.append(f'<text class="tick" x="{bar_x + 18}" y="{top + 8}">{esc(tick_label(vmax))} '
               f'{esc(unit)}</text><text class="tick" x="{bar_x + 18}" y="{top + bar_h}">'
               f'{esc(tick_label(vmin))} {esc(unit)}</text></svg>')
    return "".join(out)


def timeline(clients: Sequence[str], rounds: Sequence[int],
             cells: Mapping[tuple[str, int], tuple[str, str]], cell: int = 20) -> str:
    """An SVG grid: one row per client, one column per round, coloured by the client's state that
    round (``cells[(client, round)] = (state, why)``; missing: absent) with the why as hover."""
    if not clients or not rounds:
        return '<p class="missing">no data to draw</p>'
    left, top = 12 + 7 * max(len(f"client {c}") for c in clients), 22
    width = left + cell * len(rounds) + 10
    height = top + cell * len(clients) + 6
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">'
           "<title>client states per round</title>"]
    label_every = max(1, math.ceil(len(rounds) / 20))
    for j, r in enumerate(rounds):
        if j % label_every == 0:
            out.append(f'<text class="tick" x="{left + cell * j + cell / 2:.1f}" y="{top - 6}" '
                       f'text-anchor="middle">{esc(r)}</text>')
    for i, c in enumerate(clients):
        y = top + cell * i
        out.append(f'<text class="tick" x="{left - 4}" y="{y + cell - 5}" text-anchor="end">'
                   f'client {esc(c)}</text>')
        for j, r in enumerate(rounds):
            state, why = cells.get((c, r), ("absent", "not sampled, or no reply"))
            colour = STATE_COLOURS.get(state, STATE_COLOURS["absent"])
            out.append(f'<rect class="cell {esc(state)}" x="{left + cell * j}" y="{y}" '
                       f'width="{cell - 2}" height="{cell - 2}" fill="{colour}"><title>client '
                       f'{esc(c)}, round {esc(r)}: {esc(state)}{": " if why else ""}{esc(why)}'
                       "</title></rect>")
    out.append("</svg>")
    keys = "".join(f'<span class="key"><i style="background:{v}"></i>{esc(k)}</span>'
                   for k, v in STATE_COLOURS.items())
    return "".join(out) + f'<div class="legend">{keys}</div>'


# --- a small, escaping Markdown converter (the model card) --------------------------------------
_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\*(\S(?:.*?\S)?)\*")


def _inline(text: str) -> str:
    """Inline Markdown (code, bold, italics) of one line, every character escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(esc(text[pos:m.start()]))
        code, bold, em = m.groups()
        out.append(f"<code>{esc(code)}</code>" if code is not None else
                   f"<strong>{_inline(bold)}</strong>" if bold is not None else
                   f"<em>{_inline(em)}</em>")
        pos = m.end()
    return "".join(out) + esc(text[pos:])


_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def markdown_to_html(text: str, image: Callable[[str, str], str] | None = None) -> str:
    """The Markdown the model card uses (headings, paragraphs, ``-`` lists, ``>`` quotes, pipe
    tables, code/bold/italics, images) as HTML. Everything is escaped: raw HTML in the input is
    shown as text, never passed through. ``image(alt, src)`` renders an image line (default: its
    alt text, since the page fetches nothing)."""
    blocks: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
            continue
        if m := _HEADING.match(line):
            level = len(m.group(1))
            blocks.append(f"<h{level + 2}>{_inline(m.group(2))}</h{level + 2}>")  # under the h2s
            i += 1
        elif line.lstrip().startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:].strip())}</li>")
                i += 1
            blocks.append(f"<ul>{''.join(items)}</ul>")
        elif line.startswith(">"):
            quoted = []
            while i < len(lines) and lines[i].startswith(">"):
                quoted.append(lines[i][1:].strip())
                i += 1
            blocks.append(f"<blockquote>{_inline(' '.join(quoted))}</blockquote>")
        elif line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            head = _cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            blocks.append(table(head, rows, inline=True))
        elif m := _IMAGE.match(line.strip()):
            blocks.append(image(m.group(1), m.group(2)) if image else
                          f'<p class="missing">[image: {esc(m.group(1))}]</p>')
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not _block_start(lines, i):
                para.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(blocks)


def _block_start(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(_HEADING.match(line) or line.lstrip().startswith(("- ", "* ", ">", "|"))
                or _IMAGE.match(line.strip()))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], inline: bool = False,
          cls: str = "") -> str:
    """An HTML table; cells are escaped text (``inline``: with Markdown code/bold/italics)."""
    cell = _inline if inline else esc
    out = [f'<table class="{esc(cls)}"><thead><tr>'
           + "".join(f"<th>{cell(str(h))}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(str(c))}</td>" for c in r) + "</tr>")
    return "".join(out) + "</tbody></table>"


# --- reading the run folder ---------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """A file's typed content, or why it could not be read (``problem``)."""

    value: Any = None
    problem: str = ""


def _load(read: Callable[[], Any]) -> Loaded:
    try:
        return Loaded(read())
    except (FedShieldError, OSError, ValueError) as exc:  # StateCorrupted, ConfigError, IO
        return Loaded(problem=str(exc))


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves inside ``folder`` (a run folder's files may name any path)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for a table cell ("-" when not recorded)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def pct(value: float | None) -> str:
    """An accuracy (a fraction) as a percentage for a table cell."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def client_states(lines: Sequence[MetricsLine]) -> dict[tuple[str, int], tuple[str, str]]:
    """Each (partition id, round)'s state and why: quarantined > rejected > refused > accepted.

    A client counts as accepted in a round when it replied (its epsilon, DP event, histogram or
    time is on the line) and was neither rejected nor refused. Quarantine lists may hold node ids:
    ``node_partitions`` maps them to partition ids."""
    cells: dict[tuple[str, int], tuple[str, str]] = {}
    for m in lines:
        def pid(node: int, m: MetricsLine = m) -> str:
            return str(m.node_partitions.get(str(node), node))

        replied = set(m.epsilon) | set(m.dp_events) | set(m.class_counts) | set(m.client_seconds)
        for c in replied:
            cells[(c, m.round)] = ("accepted", "update accepted")
        for c, why in m.refused.items():
            cells[(c, m.round)] = ("refused", why)
        for c, why in m.rejected.items():
            cells[(c, m.round)] = ("rejected", why)
        new = {pid(n) for n in m.newly_quarantined}
        for n in m.quarantined:
            c = pid(n)
            why = "quarantined this round" if c in new else "in quarantine"
            if n != int(c):
                why += f" (node id {n})"
            cells[(c, m.round)] = ("quarantined", why)
    return cells


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in ids) or "none"


def _client_order(keys: Iterable[str]) -> list[str]:
    return sorted(set(keys), key=lambda k: (0, int(k), "") if k.lstrip("-").isdigit()
                  else (1, 0, k))


# --- the run report's sections ------------------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """What a run report is drawn from."""

    run_dir: Path
    metrics: Loaded
    summary: Loaded


def _missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def _lines(files: RunFiles) -> list[MetricsLine] | str:
    if files.metrics.problem:
        return _missing(f"metrics.jsonl could not be read: {files.metrics.problem}")
    if not files.metrics.value:
        return _missing("metrics.jsonl is missing or empty: no round was recorded")
    return files.metrics.value


def section_overview(files: RunFiles) -> str:
    """The run's name, status, task, federation, final and best accuracy, privacy label."""
    s: RunSummary | None = files.summary.value
    if s is None:
        return _missing(f"summary.json could not be read: {files.summary.problem}")
    attack = s.attack.get("name") if isinstance(s.attack, Mapping) else s.attack
    rows = [("status", s.status or "-"), ("failure", s.failure or "-"), ("task", s.task or "-"),
            ("rounds", f"{fmt(s.rounds_completed)} of {fmt(s.rounds)}"),
            ("clients", fmt(s.num_clients)),
            ("aggregation rule", s.strategy or "-"), ("attack", attack or "none"),
            ("final accuracy", pct(s.final_accuracy)),
            ("best accuracy", f"{pct(s.best_accuracy)} (round {s.best.round})" if s.best else "-"),
            ("privacy", s.privacy.label or ("sample-level DP" if s.privacy.enabled else "no DP")),
            ("stopped early", s.stopped_early or "no"), ("wall time", f"{fmt(s.wall_seconds)} s"),
            ("seed", fmt(s.seed))]
    if s.privacy.outside_guarantee:
        rows.append(("OUTSIDE the DP guarantee", ", ".join(s.privacy.outside_guarantee)))
    handoff = _handoff(files)
    if handoff is not None:
        verdict = (f"{handoff.model_name} v{handoff.version}: "
                   + ("passed the gate" if handoff.passed else
                      "did not pass the gate: " + "; ".join(handoff.reasons or ()))
                   if handoff.version else handoff.error or handoff.skipped or "-")
        rows.append(("hand-off", verdict))
    return table(("", ""), rows, cls="kv")


def _handoff(files: RunFiles) -> HandoffSummary | None:
    s: RunSummary | None = files.summary.value
    if s is not None and s.handoff is not None:
        return s.handoff
    path = files.run_dir / HANDOFF_JSON  # the hook's result before the summary holds it
    loaded = _load(lambda: HandoffSummary.from_dict(json.loads(path.read_text()), HANDOFF_JSON))
    return loaded.value if path.is_file() else None


def section_accuracy(files: RunFiles) -> str:
    """Server-side test accuracy (%) and loss per round."""
    lines = _lines(files)
    if isinstance(lines, str):
        return lines
    acc = Series("test accuracy (server)", tuple((m.round, 100 * m.accuracy) for m in lines
                                                 if m.accuracy is not None))
    loss = Series("test loss (server)", tuple((m.round, m.loss) for m in lines
                                              if m.loss is not None), colour=PALETTE[1])
    failed = [str(m.round) for m in lines if not m.aggregated]
    note = (_missing(f"rounds that produced no new model: {', '.join(failed)}") if failed else "")
    return ('<div class="row">'
            + f'<div>{line_chart([acc], x_label="round", y_label="accuracy (%)")}</div>'
            + f'<div>{line_chart([loss], x_label="round", y_label="loss (cross-entropy)")}</div>'
            + "</div>" + note)


def section_epsilon(files: RunFiles) -> str:
    """Each client's cumulative epsilon per round, with the run's budget and target lines."""
    lines = _lines(files)
    if isinstance(lines, str):
        return lines
    s: RunSummary | None = files.summary.value
    privacy = s.privacy if s else None
    clients = _client_order(c for m in lines for c in m.epsilon)
    unit = next((m.privacy_unit.epsilon for m in lines if m.privacy_unit), None) or (
        privacy.unit if privacy else None) or "unit not recorded"
    if not clients:
        enabled = privacy.enabled if privacy else None
        return _missing("no client reported an epsilon: "
                        + ("sample-level DP was off in this run" if enabled is False else
                           "no DP events were recorded"))
    series = [Series(f"client {c}", tuple((m.round, m.epsilon[c]) for m in lines
                                          if c in m.epsilon)) for c in clients]
    hlines = []
    if privacy and privacy.max_epsilon:
        hlines.append(HLine("budget (privacy.max_epsilon)", privacy.max_epsilon))
    if privacy and privacy.target_epsilon:
        hlines.append(HLine("target epsilon", privacy.target_epsilon, "#e65100"))
    central = [(m.round, m.central_epsilon) for m in lines if m.central_epsilon is not None]
    if central:
        series.append(Series("central (user-level) epsilon", tuple(central), "#000", dashed=True))
    head = (f'<p>Unit: <b>{esc(unit)}</b>'
            + (f"; {esc(privacy.label)}" if privacy and privacy.label else "")
            + ("; no budget line: privacy.max_epsilon and target_epsilon are unset"
               if not hlines else "") + "</p>")
    return head + line_chart(series, x_label="round", y_label="epsilon (cumulative)",
                             hlines=hlines)


def section_clients(files: RunFiles) -> str:
    """The accepted / rejected / refused / quarantined timeline per client, with the reasons."""
    lines = _lines(files)
    if isinstance(lines, str):
        return lines
    s: RunSummary | None = files.summary.value
    cells = client_states(lines)
    known = [c for c, _ in cells]
    if s and s.num_clients:
        known += [str(k) for k in range(s.num_clients)]
    clients = _client_order(known)
    rounds = [m.round for m in lines]
    counts = table(("round", "sampled", "accepted", "rejected", "refused", "quarantined"),
                   [(m.round, m.sampled, m.accepted, len(m.rejected), len(m.refused),
                     len(m.quarantined)) for m in lines])
    reasons = sorted(((r, c, st, why) for (c, r), (st, why) in cells.items()
                      if st in ("rejected", "refused", "quarantined")),
                     key=lambda t: (t[0], _client_order([t[1]])))
    why = (table(("round", "client", "state", "reason"), reasons, cls="reasons") if reasons
           else "<p>No client was rejected, refused or quarantined.</p>")
    attack = s.attack_report if s else None
    caught = (f"<p>Simulated attackers (partition ids): <b>{esc(_ids(attack.byzantine_ids))}"
              f"</b>; quarantined: <b>{esc(_ids(attack.quarantined))}</b>; detection rate "
              f"{esc(fmt(attack.detection_rate))}, false quarantine rate "
              f"{esc(fmt(attack.false_quarantine_rate))}.</p>") if attack else ""
    return (timeline(clients, rounds, cells) + "<p>Client ids are partition ids. Hover a cell "
            "for its reason.</p>" + caught + why + "<details><summary>counts per round</summary>"
            + counts + "</details>")


def section_evaluation(files: RunFiles) -> str:
    """The federated evaluation: each client's accuracy on its own held-out data, per round, and
    the distribution (mean, worst, worst 10%, spread)."""
    lines = _lines(files)
    if isinstance(lines, str):
        return lines
    rounds = [(m.round, m.evaluation) for m in lines
              if m.evaluation is not None and m.evaluation.accuracy]
    if not rounds:
        return _missing("federated evaluation: not run (federation.fraction_evaluate = 0, or no "
                        "client evaluated)")

    def stat(label: str, pick: Callable[[FederatedEvaluation], float | None], colour: str,
             dashed: bool = False) -> Series:
        return Series(label, tuple((r, 100 * v) for r, ev in rounds if (v := pick(ev)) is not None),
                      colour, dashed=dashed)

    clients = _client_order(c for _, ev in rounds for c in ev.accuracy)
    dots = [Series(f"client {c}", tuple((r, 100 * ev.accuracy[c]) for r, ev in rounds
                                        if c in ev.accuracy), colour="#90a4ae", dots_only=True)
            for c in clients]
    stats = [stat("mean", lambda ev: ev.mean, PALETTE[0]),
             stat("worst client", lambda ev: ev.worst, PALETTE[3]),
             stat("worst 10%", lambda ev: ev.worst_decile, PALETTE[1], dashed=True)]
    rows = [(r, len(ev.accuracy), pct(ev.mean), pct(ev.worst), pct(ev.worst_decile),
             "-" if ev.spread is None else f"{100 * ev.spread:.2f} pts",
             "exact" if ev.noise_std is None else f"DP noise std {fmt(ev.noise_std)}")
            for r, ev in rounds]
    last_round, last = rounds[-1]
    per_client = table(("client", "accuracy"), [(c, pct(last.accuracy[c])) for c in
                                                _client_order(last.accuracy)])
    return (line_chart([*stats, *dots], x_label="round", y_label="client accuracy (%)",
                       max_legend=3)
            + table(("round", "clients", "mean", "worst", "worst 10%", "spread (std)",
                     "release"), rows)
            + f"<details><summary>each client, round {last_round}</summary>{per_client}"
            "</details>")


def section_reference(files: RunFiles) -> str:
    """The drift reference: whose DP counts were merged (summary's ``drift_reference``), who
    refused or was rejected and why, and the hand-off's reference (export/reference.json): how
    it was built and, in a simulation, its distance from the true pooled histograms."""
    s: RunSummary | None = files.summary.value
    out: list[str] = []
    collected = s.drift_reference if s is not None else None
    if collected is None:
        out.append(_missing("no client drift-reference query in summary.json "
                            "(deployment.reference_source = \"server\", or the run ended early)"))
    else:
        release = ("exact counts (no client DP)" if not collected.noise_multiplier else
                   f"Gaussian noise multiplier {collected.noise_multiplier:g}, accounted in each "
                   "client's ledger")
        used = _labels(collected.used)
        out.append(f"<p>Counts from {len(collected.used)} client(s) ({esc(used)}): "
                   f"{esc(release)}.</p>")
        missing = [(c, "refused", why) for c, why in collected.refused.items()] + \
            [(c, "rejected", why) for c, why in collected.rejected.items()]
        if missing:
            out.append(table(("client", "outcome", "reason"), missing))
    path = files.run_dir / EXPORT_DIR / REFERENCE_JSON
    if not path.is_file():
        out.append(_missing(f"no hand-off reference: {path.relative_to(files.run_dir)} does not "
                            "exist (deployment.handoff = false, or the hand-off failed)"))
        return "".join(out)
    ref = json.loads(path.read_text())
    out.append(f"<p>Reference: {esc(ref.get('source', '-'))}; built from "
               f"{esc(ref.get('details') or '-')}.</p>")
    dist = ref.get("distance")
    if not isinstance(dist, dict):
        out.append(_missing("distance from the true pooled histograms: unknown (only a "
                            "simulation knows the clients' pooled data)"))
        return "".join(out)
    rows = [("this reference", fmt(dist.get("features_mean")), fmt(dist.get("features_max")),
             fmt(dist.get("labels")))]
    server = dist.get("server_split")
    if isinstance(server, dict):
        rows.append(("server's evaluation split (comparison)", fmt(server.get("features_mean")),
                     fmt(server.get("features_max")), fmt(server.get("labels"))))
    out.append(f"<p>Total-variation distance from the true pooled histograms "
               f"({esc(dist.get('truth', '-'))}):</p>")
    out.append(table(("reference", "features (mean)", "features (max)", "labels"), rows))
    return "".join(out)


def _labels(labels: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(_client_order(labels)[:limit])
    return shown + (f", ... ({len(labels) - limit} more)" if len(labels) > limit else "")


def _card_path(files: RunFiles) -> Path:
    """The card the hand-off recorded when it lies inside the run folder, else export/'s."""
    handoff = _handoff(files)
    recorded = Path(handoff.card_path) if handoff and handoff.card_path else None
    if recorded is not None and recorded.is_file() and _inside(recorded, files.run_dir):
        return recorded
    return files.run_dir / EXPORT_DIR / CARD_MD


def section_card(files: RunFiles) -> str:
    """The model card (export/model_card.md) as HTML, its picture inlined."""
    path = _card_path(files)
    if not path.is_file():
        handoff = _handoff(files)
        why = (handoff.error or handoff.skipped) if handoff else None
        return _missing(f"no model card: {path.relative_to(files.run_dir)} does not exist ("
                        + (why or "the hand-off did not run: deployment.handoff = false, or it "
                           "has not finished") + ")")
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return _missing(f"the model card could not be read: {exc}")

    def image(alt: str, src: str) -> str:
        picture = path.parent / src
        if (picture.suffix.lower() == ".png" and _inside(picture, files.run_dir)
                and picture.is_file() and picture.stat().st_size <= MAX_INLINE_IMAGE):
            data = base64.b64encode(picture.read_bytes()).decode()
            return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
        return _missing(f"[image {alt}: {src} not inlined (missing, not a PNG, outside the run "
                        "folder or too large)]")

    return f'<div class="card">{markdown_to_html(text, image)}</div>'


def section_audit(files: RunFiles) -> str:
    """The empirical privacy audit (audit.json): each canary bound against the stated epsilon,
    membership inference and gradient inversion."""
    path = files.run_dir / AUDIT_JSON
    if not path.is_file():
        return _missing("not audited: no audit.json in the run folder (`fedshield privacy audit "
                        "--run-dir RUN` records one)")
    from fedshield.privacy.audit import AuditRecord  # scipy: only when there is an audit

    loaded = _load(lambda: AuditRecord.from_json(path.read_text()))
    if loaded.problem:
        return _missing(f"audit.json could not be read: {loaded.problem}")
    record = loaded.value
    out = [f"<p>Audited client {esc(record.client)} on {esc(record.task)}, "
           f"{esc(record.created_at)}: {esc(record.procedure)}. Canaries in the released model: "
           f"<b>{'yes' if record.canaries_in_released_model else 'none'}</b>.</p>"]
    if record.canary:
        rows = []
        for c in record.canary:
            bound, stated = float(c["empirical_epsilon"]), float(c["stated_epsilon"])
            rows.append((c.get("adversary", "-"), fmt(bound, 4), fmt(stated, 4),
                         "holds" if bound <= stated else "EXCEEDS the stated epsilon",
                         c.get("unit", "-"), fmt(float(c["delta"])), c.get("accountant", "-"),
                         c["bound"].get("canaries", "-")))
        out.append(table(("adversary", "empirical lower bound", "stated epsilon", "verdict",
                          "unit", "delta", "accountant", "canaries"), rows))
    for m in record.membership:
        out.append(f"<p>Membership inference ({esc(m.get('attack'))}): AUC "
                   f"{esc(fmt(m.get('auc')))}</p>")
    for i in record.inversion:
        out.append(f"<p>Gradient inversion ({'with' if i.get('private') else 'without'} DP): "
                   f"PSNR {esc(fmt(i.get('psnr')))} dB vs data-mean baseline "
                   f"{esc(fmt(i.get('baseline_psnr')))} dB</p>")
    return "".join(out)


RUN_SECTIONS: tuple[tuple[str, str, Callable[[RunFiles], str]], ...] = (
    ("overview", "Overview", section_overview),
    ("accuracy", "Accuracy and loss per round", section_accuracy),
    ("epsilon", "Privacy spent per client", section_epsilon),
    ("clients", "Client timeline: accepted, rejected, refused, quarantined", section_clients),
    ("evaluation", "Federated evaluation (each client's held-out data)", section_evaluation),
    ("reference", "Drift reference (the clients' DP histograms)", section_reference),
    ("card", "Model card", section_card),
    ("audit", "Privacy audit", section_audit),
)


def _guarded(render: Callable[[Any], str], arg: Any) -> str:
    """A section's HTML; a file whose content does not fit the drawing says so instead."""
    try:
        return render(arg)
    except (FedShieldError, OSError, ValueError, TypeError, KeyError, AttributeError,
            IndexError) as exc:
        return _missing(f"this section could not be drawn from the files: "
                        f"{type(exc).__name__}: {exc}")


def page(title: str, subtitle: str, sections: Iterable[tuple[str, str, str]]) -> str:
    """The whole HTML document: ``sections`` are (id, heading, body HTML)."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(h.split(":")[0].split(" (")[0])}</a>'
                  for i, h, _ in sections)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{b}</section>'
                   for i, h, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p><nav>{nav}</nav></header>"
            f"<main>{body}</main></body></html>\n")


def render_report(run_dir: str | Path) -> str:
    """The report page of a run folder (never raises for a missing or torn file)."""
    run = Path(run_dir)
    files = RunFiles(run, _load(lambda: read_metrics(run)), _load(lambda: read_summary(run)))
    name = files.summary.value.name if files.summary.value and files.summary.value.name else \
        run.name
    sections = [(i, h, _guarded(f, files)) for i, h, f in RUN_SECTIONS]
    return page(f"fedshield run: {name}", f"{run.resolve()} - report written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", sections)


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` and return its path; ConfigError if there is no folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder: pass a run folder (runs/<name>-<timestamp>)")
    path = run / REPORT_HTML
    _write(path, render_report(run))
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a reader never sees half a page
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def report_hook(run_dir: Path, cfg: Config) -> dict:
    """The post-run hook (server/hooks.py): write report.html; the summary gets its path."""
    del cfg  # the report reads only the run folder's files
    return {"path": str(write_report(run_dir))}


# --- grid reports -------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise StateCorrupted(f"{path.name} is not a list of table rows (JSON objects)")
    return rows


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _column(r: dict) -> str:
    frac = _num(r.get("byzantine_fraction")) or 0.0
    return str(r.get("attack")) if r.get("attack") == "none" or not frac else \
        f"{r.get('attack')}@{frac:g}"


def section_heatmap(rows: list[dict]) -> str:
    """Final test accuracy (%) per (rule, partition) x attack@fraction."""
    y_labels = list(dict.fromkeys(f"{r.get('rule')} | {r.get('partition')}" for r in rows))
    x_labels = list(dict.fromkeys(_column(r) for r in rows))
    values: list[list[float | None]] = [[None] * len(x_labels) for _ in y_labels]
    titles = [[""] * len(x_labels) for _ in y_labels]
    for r in rows:
        i = y_labels.index(f"{r.get('rule')} | {r.get('partition')}")
        j = x_labels.index(_column(r))
        acc = _num(r.get("final_accuracy"))
        values[i][j] = None if acc is None else 100 * acc
        extra = [f"{k} {fmt(_num(r.get(k)))}" for k in
                 ("detection_rate", "true_quarantine_rate", "false_quarantine_rate",
                  "backdoor_success") if _num(r.get(k)) is not None]
        titles[i][j] = (f"{y_labels[i]}, {x_labels[j]}: accuracy {pct(acc)}, status "
                        f"{r.get('status', '-')}" + (", " + ", ".join(extra) if extra else ""))
    return ("<p>Final test accuracy in %, cells and colour bar alike. Hover a cell for its "
            "attacker detection.</p>"
            + heatmap(y_labels, x_labels, values, vmin=0.0, vmax=100.0, unit="%", titles=titles))


def _generic_table(rows: list[dict], drop: Sequence[str] = ("run_dir",)) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in drop]

    def cell(k: str, v: Any) -> str:
        if "accuracy" in k and _num(v) is not None:
            return pct(_num(v))
        return fmt(v) if isinstance(v, float) or v is None else str(v)

    return table(keys, [[cell(k, r.get(k)) for k in keys] for r in rows])


def section_privacy_utility(rows: list[dict]) -> str:
    """Final accuracy (%) against the epsilon spent (mean over seeds), with the no-DP line."""
    by_target: dict[float, list[dict]] = {}
    for r in rows:
        target = _num(r.get("target_epsilon"))
        if target is not None:
            by_target.setdefault(target, []).append(r)
    points, baseline = [], []
    for target, rs in sorted(by_target.items()):
        accs = [a for r in rs if (a := _num(r.get("final_accuracy"))) is not None]
        if not accs:
            continue
        if math.isinf(target):
            baseline += accs
            continue
        spent = [e for r in rs if (e := _num(r.get("epsilon_max"))) is not None]
        x = sum(spent) / len(spent) if spent else target
        points.append((x, 100 * sum(accs) / len(accs)))
    hlines = [HLine("non-private", 100 * sum(baseline) / len(baseline), "#616161")] \
        if baseline else []
    unit = next((str(r["epsilon_label"]) for r in rows if r.get("epsilon_label")), "")
    return (f"<p>Each point: mean over seeds of the final test accuracy against the epsilon "
            f"spent (max over clients). {esc(unit)}</p>"
            + line_chart([Series("DP runs", tuple(points))], x_label="epsilon spent",
                         y_label="final accuracy (%)", hlines=hlines)
            + _generic_table(rows))


def section_cells(grid: Path, rows: list[dict]) -> str:
    """Links to each grid cell's own report (when it lies inside the grid folder)."""
    items = []
    for r in rows:
        run = Path(str(r.get("run_dir") or ""))
        report = run / REPORT_HTML
        label = " ".join(f"{k}={r[k]}" for k in ("rule", "partition", "attack",
                                                 "byzantine_fraction", "target_epsilon", "seed")
                         if k in r)
        if r.get("run_dir") and report.is_file() and _inside(report, grid):
            href = report.resolve().relative_to(grid.resolve()).as_posix()
            items.append(f'<li><a href="{esc(href)}">{esc(label)}</a></li>')
        else:
            items.append(f"<li>{esc(label)}: no report.html in the grid folder</li>")
    return f"<ul>{''.join(items)}</ul>" if items else _missing("no cells")


def render_grid_report(grid_dir: str | Path) -> str:
    """The report page of a grid folder: robustness (heatmap, worst cases) or privacy sweep."""
    grid = Path(grid_dir)
    sections: list[tuple[str, str, str]] = []
    if (grid / ROBUSTNESS_JSON).is_file():
        rows = _load(lambda: _read_rows(grid / ROBUSTNESS_JSON))
        kind = "robustness grid"
        if rows.problem:
            sections.append(("heatmap", "Robustness heatmap", _missing(rows.problem)))
        else:
            sections.append(("heatmap", "Robustness heatmap",
                             _guarded(section_heatmap, rows.value)))
        worst = _load(lambda: _read_rows(grid / WORST_CASE_JSON))
        sections.append(("worst-case", "Worst case over attacks",
                         _missing(f"{WORST_CASE_JSON} could not be read: {worst.problem}")
                         if worst.problem else _guarded(_generic_table, worst.value)))
        if not rows.problem:
            sections.append(("all-cells", "Every cell", _guarded(_generic_table, rows.value)))
    elif (grid / SWEEP_JSON).is_file():
        rows = _load(lambda: _read_rows(grid / SWEEP_JSON))
        kind = "privacy sweep"
        sections.append(("privacy-utility", "Privacy-utility curve",
                         _missing(rows.problem) if rows.problem else
                         _guarded(section_privacy_utility, rows.value)))
    else:
        kind = "grid"
        rows = Loaded(problem="no grid table")
        sections.append(("grid", "Grid", _missing(
            f"neither {ROBUSTNESS_JSON} nor {SWEEP_JSON} is in {grid}: point at the --out folder "
            "of `fedshield robustness` or `fedshield privacy sweep`")))
    if not rows.problem:
        sections.append(("cells", "Each cell's report", _guarded(
            lambda r: section_cells(grid, r), rows.value)))
    return page(f"fedshield {kind}: {grid.name}", f"{grid.resolve()} - report written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", sections)


def is_grid(folder: str | Path) -> bool:
    """Whether ``folder`` is a grid's output folder (it holds a grid table) rather than a run."""
    return any((Path(folder) / name).is_file() for name in (ROBUSTNESS_JSON, SWEEP_JSON))


def write_grid_report(grid_dir: str | Path) -> Path:
    """Write ``<grid_dir>/report.html`` and return its path; ConfigError if there is no folder."""
    grid = Path(grid_dir)
    if not grid.is_dir():
        raise ConfigError(f"{grid} is not a folder: pass the --out folder of a grid")
    path = grid / REPORT_HTML
    _write(path, render_grid_report(grid))
    return path


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#212121;
background:#fafafa}
header{background:#263238;color:#eceff1;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 8px;color:#b0bec5;font-size:12px}
nav a{color:#80cbc4;margin-right:14px;text-decoration:none;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:16px 0;
padding:8px 18px 14px}
h2{font-size:17px;border-bottom:1px solid #eee;padding-bottom:6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #e0e0e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}table.kv td:first-child{font-weight:600;background:#fafafa}
table.kv thead{display:none}
.missing{color:#8d6e63;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:16px}
svg.chart{font-size:11px;background:#fff;max-width:100%;height:auto}
svg .grid{stroke:#eee}svg .frame{fill:none;stroke:#bdbdbd}
svg .series{fill:none;stroke-width:2}svg .hline{stroke-width:1.5;stroke-dasharray:6,4}
svg .tick{fill:#616161}svg .axis{fill:#424242;font-size:12px}svg .hlabel{font-size:11px}
svg .val{font-size:10px;fill:#212121}svg .cell.none{fill:#f5f5f5;stroke:#e0e0e0}
.legend{margin:2px 0 8px}.key{display:inline-block;margin-right:12px;font-size:12px}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.card{border-left:3px solid #80cbc4;padding-left:12px}.card img{max-width:100%}
blockquote{background:#fff3e0;border-left:4px solid #fb8c00;margin:8px 0;padding:6px 10px}
code{background:#f5f5f5;padding:0 3px;border-radius:3px;font-size:12px;word-break:break-all}
details{margin:6px 0}
"""
