"""Spec strings -> stateful aggregators: "rule" or "pre+...+pre+rule"."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fedshield.errors import ConfigError
from server.aggregation.clipping import cclip, clip
from server.aggregation.coordinatewise import check_trim, median, trimmed_mean
from server.aggregation.flame import flame
from server.aggregation.fltrust import fltrust
from server.aggregation.geomed import geomed
from server.aggregation.krum import (bulyan, check_bulyan, check_krum, check_multikrum, krum,
                                     multikrum)
from server.aggregation.mean import fedavg
from server.aggregation.preagg import bucketing, check_nnm, nnm
from server.aggregation.result import AggregationResult

if TYPE_CHECKING:
    from fedshield.config import AggregationConfig

RULES: dict[str, Callable[..., AggregationResult]] = {
    "fedavg": fedavg,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "geomed": geomed,
    "cclip": cclip,
    "clip": clip,
    "fltrust": fltrust,
    "flame": flame,
}

PRE_AGGREGATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "bucketing": bucketing,
    "nnm": nnm,
}


def parse_spec(spec: str) -> tuple[list[str], str]:
    """"bucketing+nnm+median" -> (["bucketing", "nnm"], "median")."""
    tokens = [t.strip().lower() for t in spec.split("+")]
    *pre, rule = tokens
    if rule not in RULES:
        hint = (" (pre-aggregation steps must be followed by a rule)"
                if rule in PRE_AGGREGATORS else "")
        raise ConfigError(f"aggregation.rule = {spec!r}: unknown rule {rule!r}{hint}; valid rules: "
                          f"{', '.join(RULES)}, optionally after {' / '.join(PRE_AGGREGATORS)}+")
    for name in pre:
        if name not in PRE_AGGREGATORS:
            raise ConfigError(f"aggregation.rule = {spec!r}: unknown pre-aggregation step "
                              f"{name!r}; valid steps: {', '.join(PRE_AGGREGATORS)} "
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
        return math.floor(self.cfg.trim_fraction * rows) if self.cfg.trim_fraction > 0 else f

    def validate(self, n: int) -> None:
        """Raise ConfigError when this spec cannot aggregate n updates."""
        f, rows = self.resolve_f(n), n
        for step in self.pre:
            if step == "nnm":
                check_nnm(rows, f)
            else:
                rows = -(-rows // self.cfg.bucket_size)
        where = (f" (after bucketing {n} clients into {rows} buckets)"
                 if "bucketing" in self.pre else "")
        try:
            if self.rule == "krum":
                check_krum(rows, f)
            elif self.rule == "multikrum":
                check_multikrum(rows, f, self.cfg.multikrum_m or rows - f)
            elif self.rule == "bulyan":
                check_bulyan(rows, f)
            elif self.rule == "trimmed_mean":
                check_trim(rows, self.trim(rows, f))
        except ConfigError as exc:
            raise ConfigError(f"aggregation.rule = {self.name!r}{where}: {exc}") from None

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> AggregationResult:
        n = updates.shape[0]
        f = self.resolve_f(n)
        rows, membership = updates, torch.arange(n)
        for step in self.pre:
            if step == "bucketing":
                rows, inner = bucketing(rows, self.cfg.bucket_size, self.generator)
            else:
                rows, inner = nnm(rows, f)
            membership = inner[membership]
        if self.pre or self.cfg.weighting == "uniform":
            weights = None
        result = self._apply_rule(rows, weights, reference, f)
        if self.rule == "cclip":
            self.center = result.update.detach().clone()
        result.suspicion = result.suspicion[membership].to(torch.float64)
        result.info = {**result.info, "f": float(f), "rows": float(rows.shape[0])}
        return result

    def _apply_rule(self, x: torch.Tensor, weights: torch.Tensor | None,
                    reference: torch.Tensor | None, f: int) -> AggregationResult:
        c, rule = self.cfg, self.rule
        if rule == "fedavg":
            return fedavg(x, weights)
        if rule in ("krum", "bulyan"):
            return RULES[rule](x, f)
        if rule == "multikrum":
            return multikrum(x, f, c.multikrum_m)
        if rule == "median":
            return median(x)
        if rule == "trimmed_mean":
            return trimmed_mean(x, self.trim(x.shape[0], f))
        if rule == "geomed":
            return geomed(x, c.geomed_iters, c.geomed_eps)
        if rule == "cclip":
            same_shape = self.center is not None and self.center.shape == x.shape[1:]
            return cclip(x, self.center if same_shape else None, c.cclip_tau, c.cclip_iters)
        if rule == "clip":
            return clip(x, c.clip_norm)
        if rule == "fltrust":
            return fltrust(x, reference)
        return flame(x, c.flame_noise, self.generator)

    def state_dict(self) -> dict[str, Any]:
        """torch.save-able: the spec, cclip's center and the RNG state."""
        return {"name": self.name, "center": self.center, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"aggregator state is for {state.get('name')!r}, not {self.name!r}; "
                              f"resume with the same aggregation.rule")
        self.center = state["center"]
        self.generator.set_state(state["generator"])


def build_aggregator(spec: str, cfg: AggregationConfig, num_clients: int,
                     seed: int = 0) -> Aggregator:
    return Aggregator(spec, cfg, num_clients, seed)
