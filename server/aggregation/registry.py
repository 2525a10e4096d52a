"""Spec strings -> stateful aggregators: "rule" or "pre+...+pre+rule".

Each rule is one ``Rule`` record in RULE_RECORDS: its bare math function, how to apply it, how to
check that it can aggregate ``rows`` updates with f assumed bad ones, and the facts central DP
needs (whether its output is a mean of clipped updates, and if not, why central DP refuses it).
Adding a rule is one file plus one record (CONTRIBUTING.md); nothing else binds rules by name.
RULES (name -> bare function, for callers that want the math) is derived from the records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from fedshield.server.aggregation.clipping import cclip, check_cclip, check_clip, clip
from fedshield.server.aggregation.coordinatewise import (
    check_median,
    check_trim,
    median,
    trimmed_mean,
)
from fedshield.server.aggregation.flame import check_flame, flame
from fedshield.server.aggregation.fltrust import fltrust
from fedshield.server.aggregation.geomed import check_geomed, geomed
from fedshield.server.aggregation.krum import (
    bulyan,
    check_bulyan,
    check_krum,
    check_multikrum,
    krum,
    multikrum,
)
from fedshield.server.aggregation.mean import fedavg
from fedshield.server.aggregation.preagg import bucketing, check_nnm, nnm
from fedshield.server.aggregation.result import AggregationResult

from fedshield.errors import ConfigError

if TYPE_CHECKING:
    from fedshield.schema import AggregationConfig


@dataclass
class RuleInputs:
    """What one call of a rule may use besides the (rows, d) updates."""
    cfg: AggregationConfig
    f: int
    weights: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    center: torch.Tensor | None = None  # cclip's previous aggregate (None: start at 0)
    generator: torch.Generator | None = None


def trim_for(cfg: AggregationConfig, rows: int, f: int) -> int:
    """Values trimmed per side: trim_fraction of the rows, or f when trim_fraction = 0."""
    return math.floor(cfg.trim_fraction * rows) if cfg.trim_fraction > 0 else f


def _no_check(rows: int, f: int, cfg: AggregationConfig) -> None:
    """fedavg and fltrust assume nothing about f (see their docstrings)."""


@dataclass(frozen=True)
class Rule:
    """One aggregation rule and its facts.

    ``check(rows, f, cfg)`` raises ConfigError when the rule cannot aggregate ``rows`` updates of
    which f may be Byzantine. ``mean_of_clipped``: the output is a mean of updates clipped to a
    fixed norm, so one client moves it by at most C / expected (what central DP's noise is
    calibrated for); otherwise ``central_dp_refusal`` says why central DP refuses the rule.
    """
    name: str
    function: Callable[..., AggregationResult]  # the bare math, as RULES lists it
    apply: Callable[[torch.Tensor, RuleInputs], AggregationResult]
    check: Callable[[int, int, AggregationConfig], None]
    mean_of_clipped: bool = False
    central_dp_refusal: str | None = None
    stateful: bool = False  # keeps the previous aggregate (cclip's center)
    uses_weights: bool = False  # weighs by client-reported example counts

    def __post_init__(self) -> None:
        if self.mean_of_clipped == (self.central_dp_refusal is not None):
            raise ValueError(f"rule {self.name!r}: a rule is either a mean of clipped updates or "
                             f"has a reason why central DP refuses it, not both or neither")


@dataclass(frozen=True)
class PreStep:
    """A pre-aggregation step: (rows, d) -> (rows_after, d) mixed rows plus membership."""
    name: str
    apply: Callable[[torch.Tensor, RuleInputs], tuple[torch.Tensor, torch.Tensor]]
    check: Callable[[int, int, AggregationConfig], None]
    rows_after: Callable[[int, AggregationConfig], int]


def _same_shape_center(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor | None:
    return center if center is not None and center.shape == x.shape[1:] else None


RULE_RECORDS: dict[str, Rule] = {r.name: r for r in (
    Rule("fedavg", fedavg, lambda x, a: fedavg(x, a.weights), _no_check, mean_of_clipped=True,
         uses_weights=True),
    Rule("krum", krum, lambda x, a: krum(x, a.f), lambda n, f, c: check_krum(n, f),
         central_dp_refusal="krum selects one client's update, so one client can change the "
                            "output by up to 2C"),
    Rule("multikrum", multikrum, lambda x, a: multikrum(x, a.f, a.cfg.multikrum_m),
         lambda n, f, c: check_multikrum(n, f, c.multikrum_m or n - f),
         central_dp_refusal="multikrum averages a data-dependent selection, so one client changes "
                            "which updates are averaged and moves the output by more than "
                            "C / expected"),
    Rule("bulyan", bulyan, lambda x, a: bulyan(x, a.f), lambda n, f, c: check_bulyan(n, f),
         central_dp_refusal="bulyan selects and trims updates by their values, so one client "
                            "changes the selection"),
    Rule("median", median, lambda x, a: median(x, a.f), lambda n, f, c: check_median(n, f),
         central_dp_refusal="the coordinate-wise median is not a sum, its sensitivity to one "
                            "client is not C / expected"),
    Rule("trimmed_mean", trimmed_mean,
         lambda x, a: trimmed_mean(x, trim_for(a.cfg, x.shape[0], a.f)),
         lambda n, f, c: check_trim(n, trim_for(c, n, f)),
         central_dp_refusal="trimmed_mean drops updates by their values, so one client changes "
                            "which are kept"),
    Rule("geomed", geomed, lambda x, a: geomed(x, a.cfg.geomed_iters, a.cfg.geomed_eps, f=a.f),
         lambda n, f, c: check_geomed(n, f),
         central_dp_refusal="the geometric median is not a sum of clipped updates; its "
                            "sensitivity is not C / expected"),
    Rule("cclip", cclip, lambda x, a: cclip(x, _same_shape_center(x, a.center), a.cfg.cclip_tau,
                                            a.cfg.cclip_iters, f=a.f),
         lambda n, f, c: check_cclip(n, f), stateful=True,
         central_dp_refusal="centered clipping iterates around a data-dependent centre, so its "
                            "sensitivity is not C / expected"),
    Rule("clip", clip, lambda x, a: clip(x, a.cfg.clip_norm, f=a.f),
         lambda n, f, c: check_clip(n, f), mean_of_clipped=True),
    Rule("fltrust", fltrust, lambda x, a: fltrust(x, a.reference), _no_check,
         central_dp_refusal="fltrust weighs updates by their similarity to a server update, so "
                            "weights are unbounded"),
    Rule("flame", flame, lambda x, a: flame(x, a.cfg.flame_noise, a.generator, f=a.f),
         lambda n, f, c: check_flame(n, f),
         central_dp_refusal="flame clusters and re-clips by data-dependent norms, so one client "
                            "changes the output by more than C / expected"),
)}

RULES: dict[str, Callable[..., AggregationResult]] = {
    n: r.function for n, r in RULE_RECORDS.items()}

PRE_STEPS: dict[str, PreStep] = {s.name: s for s in (
    PreStep("bucketing", lambda x, a: bucketing(x, a.cfg.bucket_size, a.generator),
            lambda n, f, c: None, lambda n, c: -(-n // c.bucket_size)),
    PreStep("nnm", lambda x, a: nnm(x, a.f), lambda n, f, c: check_nnm(n, f), lambda n, c: n),
)}

PRE_AGGREGATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "bucketing": bucketing,
    "nnm": nnm,
}

# Central DP's facts about each rule, from the records (central_dp_rules.py makes the refusals).
MEAN_OF_CLIPPED_RULES = frozenset(n for n, r in RULE_RECORDS.items() if r.mean_of_clipped)
CENTRAL_DP_REFUSALS = {n: r.central_dp_refusal for n, r in RULE_RECORDS.items()
                       if r.central_dp_refusal is not None}


def parse_spec(spec: str) -> tuple[list[str], str]:
    """"bucketing+nnm+median" -> (["bucketing", "nnm"], "median")."""
    tokens = [t.strip().lower() for t in spec.split("+")]
    *pre, rule = tokens
    if rule not in RULE_RECORDS:
        hint = (" (pre-aggregation steps must be followed by a rule)"
                if rule in PRE_STEPS else "")
        raise ConfigError(f"aggregation.rule = {spec!r}: unknown rule {rule!r}{hint}; valid rules: "
                          f"{', '.join(RULE_RECORDS)}, optionally after {' / '.join(PRE_STEPS)}+")
    for name in pre:
        if name not in PRE_STEPS:
            raise ConfigError(f"aggregation.rule = {spec!r}: unknown pre-aggregation step "
                              f"{name!r}; valid steps: {', '.join(PRE_STEPS)} "
                              f"(they come before the rule, e.g. \"bucketing+krum\")")
    return pre, rule


class Aggregator:
    """A spec string bound to its config; keeps cclip's center and the bucketing/noise RNG.

    f is aggregation.f, or floor(byzantine_fraction_assumed * n) for the n updates of the round.
    After bucketing the rule sees ceil(n / bucket_size) buckets and still assumes f bad ones: each
    Byzantine client can spoil one bucket.

    Robust rules ignore ``weights``: example counts are client-reported, so a Byzantine client
    could claim a huge count to dominate a weighted rule. Only plain fedavg uses them (and only
    with aggregation.weighting = "auto" or "examples").
    """

    def __init__(self, spec: str, cfg: AggregationConfig, num_clients: int, seed: int = 0):
        self.pre, self.rule = parse_spec(spec)
        self.record = RULE_RECORDS[self.rule]
        self.steps = [PRE_STEPS[p] for p in self.pre]
        self.name = "+".join([*self.pre, self.rule])
        self.cfg = cfg
        self.seed = seed
        self.needs_individual_updates = bool(self.pre) or self.rule != "fedavg"
        self.generator = torch.Generator().manual_seed(seed)
        self.center: torch.Tensor | None = None
        self.validate(num_clients)

    def resolve_f(self, n: int) -> int:
        """aggregation.f, or floor(byzantine_fraction_assumed * n) when f = -1."""
        if self.cfg.f >= 0:
            return self.cfg.f
        return math.floor(self.cfg.byzantine_fraction_assumed * n)

    def trim(self, rows: int, f: int) -> int:
        """Values trimmed per side: trim_fraction of the rows, or f when trim_fraction = 0."""
        return trim_for(self.cfg, rows, f)

    def validate(self, n: int) -> None:
        """Raise ConfigError when this spec cannot aggregate n updates."""
        f, rows = self.resolve_f(n), n
        try:
            for step in self.steps:
                step.check(rows, f, self.cfg)
                rows = step.rows_after(rows, self.cfg)
        except ConfigError as exc:
            raise ConfigError(f"aggregation.rule = {self.name!r}: {exc}") from None
        where = (f" (after bucketing {n} clients into {rows} buckets)"
                 if "bucketing" in self.pre else "")
        try:
            self.record.check(rows, f, self.cfg)
        except ConfigError as exc:
            raise ConfigError(f"aggregation.rule = {self.name!r}{where}: {exc}") from None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> AggregationResult:
        """Aggregate one round's (n, d) updates: pre-steps, then the rule; suspicion per client."""
        n = updates.shape[0]
        f = self.resolve_f(n)
        inputs = RuleInputs(self.cfg, f, reference=reference, center=self.center,
                            generator=self.generator)
        rows, membership = updates, torch.arange(n)
        for step in self.steps:
            rows, inner = step.apply(rows, inputs)
            membership = inner[membership]
        if not self.pre and self.cfg.weighting != "uniform":
            inputs.weights = weights
        result = self.record.apply(rows, inputs)
        if self.record.stateful:
            self.center = result.update.detach().clone()
        result.suspicion = result.suspicion[membership].to(torch.float64)
        result.info = {**result.info, "f": float(f), "rows": float(rows.shape[0])}
        return result

    def state_dict(self) -> dict[str, Any]:
        """torch.save-able: the spec, cclip's center and the RNG state."""
        return {"name": self.name, "center": self.center, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved; refuses the state of another spec."""
        if state.get("name") != self.name:
            raise ConfigError(f"aggregator state is for {state.get('name')!r}, not {self.name!r}; "
                              f"resume with the same aggregation.rule")
        self.center = state["center"]
        self.generator.set_state(state["generator"])


def build_aggregator(spec: str, cfg: AggregationConfig, num_clients: int,
                     seed: int = 0) -> Aggregator:
    """The Aggregator for ``spec``, validated for ``num_clients`` updates a round."""
    return Aggregator(spec, cfg, num_clients, seed)
