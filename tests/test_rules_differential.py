"""Every rule against a straightforward float64 reference (loops, exact pairwise differences), on
random, duplicated, huge-outlier and tiny-on-large inputs, in float32 and float64.

The reference sees exactly the values the rule sees (the inputs rounded to the dtype, then widened
to float64), so the only differences allowed are the rule's own rounding. Tolerances are derived
from that rounding, never from the kernel that happens to run: see ``tolerance``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from fedshield.server.aggregation import RULES, build_aggregator
from fedshield.server.aggregation.distances import norms
from fedshield.server.aggregation.geomed import geomed
from fedshield.server.aggregation.krum import bulyan
from fedshield.server.aggregation.registry import (
    CENTRAL_DP_REFUSALS,
    MEAN_OF_CLIPPED_RULES,
    RULE_RECORDS,
)
from fedshield.server.aggregation.result import excess_over_median
from fedshield.server.reputation import Reputation
from sklearn.cluster import HDBSCAN

from fedshield.errors import ConfigError
from fedshield.schema import AggregationConfig
from tests.test_aggregation import (
    ref_bulyan,
    ref_fltrust,
    ref_multikrum,
    ref_sq_dist,
)

N, F, D = 11, 2, 40
FAMILIES = ["random", "duplicated", "huge_outlier", "tiny_on_large"]
DTYPES = [torch.float32, torch.float64]
SPECS = [*RULES, "nnm+krum", "nnm+median", "nnm+cclip"]


def family(name: str, dtype: torch.dtype, seed: int) -> np.ndarray:
    """(N, D) float64 values exactly representable in ``dtype``; honest rows first."""
    rng = np.random.default_rng(seed)
    if name == "random":
        x = rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, size=(N, 1))
    elif name == "duplicated":  # clients sending identical updates; 6 of 11 are one row
        distinct = rng.normal(size=(5, D))
        x = distinct[[0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4]]
    elif name == "huge_outlier":  # F rows of norm 1e6 in fixed random directions
        x = np.ones(D) / math.sqrt(D) + 0.3 * rng.normal(size=(N, D))
        out = rng.normal(size=(F, D))
        x[N - F:] = 1e6 * out / np.linalg.norm(out, axis=1, keepdims=True)
    else:  # tiny_on_large: a common part 1e3, differences ~1e-10 (f64) / ~1e-5 (f32) relative
        tiny = 1e-7 if dtype == torch.float64 else 1e-2
        x = 1e3 * rng.normal(size=D) + tiny * rng.normal(size=(N, D))
    return torch.from_numpy(x).to(dtype).double().numpy()


def honest_rows(name: str, x: np.ndarray) -> np.ndarray:
    return x[: N - F] if name == "huge_outlier" else x


def tolerance(spec: str, name: str, x: np.ndarray, dtype: torch.dtype) -> float:
    """Absolute tolerance on each coordinate of the aggregate.

    A rule computing in ``dtype`` may err by the worst case of a sum of N terms, N eps |term|, plus
    the final rounding to the dtype (2 eps): (N + 2) eps times the largest entry of the rows it
    weighs. fedavg weighs the outliers; the robust rules give them weight ~0 (geomed ~1e-6, whose
    product with 1e6 is again of the honest size). FLTrust rescales every row to the reference's
    norm, so it is of the honest size too.
    """
    eps = torch.finfo(dtype).eps
    rows = x if spec == "fedavg" else honest_rows(name, x)
    return (N + 2) * eps * float(np.abs(rows).max())


# ---- float64 references: loops and exact differences ----
# (Krum, Multi-Krum, Bulyan and FLTrust: the loop versions of test_aggregation.py, imported above)


def ref_geomed(x: np.ndarray, eps: float = 1e-6, iters: int = 100_000) -> np.ndarray:
    """Smoothed Weiszfeld in float64 from the coordinate-wise median, run until it stops moving."""
    z = np.median(x, axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), eps)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(new - z) <= 1e-15 * max(np.linalg.norm(z), 1e-300):
            return new
        z = new
    return z


def ref_cclip(x: np.ndarray, iters: int) -> np.ndarray:
    """Centered clipping from 0 with the adaptive radius: the median distance to the center."""
    v = np.zeros(x.shape[1])
    for _ in range(iters):
        dist = np.linalg.norm(x - v, axis=1)
        tau = np.median(dist)
        v = v + np.mean([(xi - v) * min(1.0, tau / di) if di > 0 else 0 * xi
                         for xi, di in zip(x, dist, strict=True)], axis=0)
    return v


def ref_clip(x: np.ndarray) -> np.ndarray:
    bound = np.median(np.linalg.norm(x, axis=1))
    return np.mean([xi * min(1.0, bound / np.linalg.norm(xi)) for xi in x], axis=0)


def ref_flame(x: np.ndarray) -> np.ndarray:
    n = len(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distance = ref_sq_dist(unit) / 2  # 1 - cos without cancellation
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit(distance).labels_
    keep = labels == np.bincount(labels[labels >= 0]).argmax() if (labels >= 0).any() else \
        np.ones(n, dtype=bool)
    return ref_clip(x[keep])


def ref_nnm(x: np.ndarray, f: int) -> np.ndarray:
    dist = ref_sq_dist(x)
    return np.array([x[np.argsort(dist[i], kind="stable")[: len(x) - f]].mean(axis=0)
                     for i in range(len(x))])


def reference(spec: str, x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    if spec.startswith("nnm+"):
        return reference(spec[4:], ref_nnm(x, F), g0)
    return {
        "fedavg": lambda: x.mean(axis=0),
        "krum": lambda: ref_multikrum(x, F, 1),
        "multikrum": lambda: ref_multikrum(x, F, len(x) - F),
        "bulyan": lambda: ref_bulyan(x, F),
        "median": lambda: np.median(x, axis=0),
        "trimmed_mean": lambda: np.sort(x, axis=0)[F: len(x) - F].mean(axis=0),
        "geomed": lambda: ref_geomed(x),
        "cclip": lambda: ref_cclip(x, 3),
        "clip": lambda: ref_clip(x),
        "fltrust": lambda: ref_fltrust(x, g0),
        "flame": lambda: ref_flame(x),
    }[spec]()


def config() -> AggregationConfig:
    # trim f per side; adaptive cclip radius, 3 iterations; FLAME without noise; geomed run to
    # its rounding (the defaults' accuracy is tested on its own below)
    return AggregationConfig(f=F, trim_fraction=0.0, cclip_tau=0.0, cclip_iters=3,
                             flame_noise=0.0, geomed_iters=100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", [s for s in SPECS if s != "bulyan"])  # n >= 4f + 3: below
def test_rule_matches_float64_reference(spec, name, dtype):
    for seed in (0, 1):
        x = family(name, dtype, seed)
        g0 = honest_rows(name, x).mean(axis=0)  # FLTrust's server update points the honest way
        cfg = dataclasses.replace(config(), geomed_eps=1e-6)
        result = build_aggregator(spec, cfg, N)(torch.from_numpy(x).to(dtype),
                                                reference=torch.from_numpy(g0).to(dtype))
        assert result.update.dtype == dtype
        expected = reference(spec, x, g0)
        tol = tolerance(spec, name, x, dtype)
        if spec.endswith("geomed"):
            # geomed stops once a step moves it by < 1e-6 of the honest scale (the median
            # distance to it); Weiszfeld contracts, so the rest of the way is < 10 such steps
            honest = honest_rows(name, x)
            tol += 1e-5 * float(np.median(np.linalg.norm(honest - expected, axis=1)))
        np.testing.assert_allclose(result.update.double().numpy(), expected, rtol=0, atol=tol,
                                   err_msg=f"{spec} {name} {dtype} seed {seed}")
        assert ((result.suspicion >= 0) & (result.suspicion <= 1)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FAMILIES)
def test_bulyan_matches_float64_reference(name, dtype):
    n, f = 15, 3  # n >= 4f + 3
    rng = np.random.default_rng(7)
    base = family(name, dtype, 3)
    x = np.concatenate([base, base[rng.integers(0, N - F, size=n - N)]])  # more honest rows
    x = x[np.r_[0:N - F, N:n, N - F:N]]  # honest first, outliers last
    x = torch.from_numpy(x).to(dtype).double().numpy()
    got = bulyan(torch.from_numpy(x).to(dtype), f).update.double().numpy()
    eps = torch.finfo(dtype).eps
    tol = (n + 2) * eps * float(np.abs(x[: n - F]).max())
    np.testing.assert_allclose(got, ref_bulyan(x, f), rtol=0, atol=tol)


# ---- inputs that used to break rules ----

@pytest.mark.parametrize("n", range(5, 12))
def test_flame_accepts_float32_updates_for_any_n(n):
    """float32 GEMM rounding made 1 - cos asymmetric (2.5e-6) and HDBSCAN refused it."""
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(2000, generator=gen) + 0.3 * torch.randn(n, 2000, generator=gen)).float()
        result = build_aggregator("flame", AggregationConfig(f=0, flame_noise=0.0), n)(x)
        assert result.info["selected"] >= n // 2 + 1
        assert torch.isfinite(result.update).all()


def test_bulyan_and_norms_survive_a_finite_float32_row_of_1e19():
    """Its squared norm (1e38 x d) overflows float32; distances are then taken in float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1000, generator=gen)
    x[0] = 1e19
    result = bulyan(x, 1)
    assert result.update.abs().max() < 10 and result.suspicion[0] > 0.999
    expected = np.linalg.norm(x.double().numpy(), axis=1)
    np.testing.assert_allclose(norms(x)[0].item(), expected[0], rtol=1e-12)  # float64 path
    np.testing.assert_allclose(norms(x).numpy(), expected, rtol=64 * 1.2e-7)  # see SUM_BLOCK
    huge = torch.full((2, 100), 1e200, dtype=torch.float64)  # beyond float64's squares too
    np.testing.assert_allclose(norms(huge).numpy(), 1e201, rtol=1e-12)


def test_float32_norms_are_accumulated_in_float64_precision():
    """torch's float32 vector_norm of a constant row at d = 1e6 is off 3.6e-4 relative."""
    x = torch.full((2, 1_000_000), 0.1)
    exact = np.linalg.norm(x.double().numpy(), axis=1)
    # bound: runs of 64 squares in float32, <= 64 eps = 7.6e-6 worst case
    np.testing.assert_allclose(norms(x).numpy(), exact, rtol=64 * 1.2e-7)


def test_geomed_defaults_are_robust_to_the_outliers_size():
    """5 of 25 identical rows at 1e9x the honest norm: with the config defaults (10 steps) the
    error against a float64 Weiszfeld run to convergence is within the stopping tolerance."""
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(20, 100))
    outliers = np.tile(1e9 * np.linalg.norm(honest, axis=1).mean() * np.ones(100) / 10, (5, 1))
    x = np.vstack([honest, outliers])
    truth = ref_geomed(x)
    cfg = AggregationConfig()
    for dtype in DTYPES:
        xt = torch.from_numpy(x).to(dtype)
        result = geomed(xt, cfg.geomed_iters, cfg.geomed_eps)
        error = np.linalg.norm(result.update.double().numpy() - truth)
        honest_scale = float(np.median(np.linalg.norm(x - truth, axis=1)))
        assert error <= 1e-4 * honest_scale, (dtype, error)  # was 627 from the mean's start
        assert (result.suspicion[20:] > 0.99).all()


# ---- n <= 2f ----

@pytest.mark.parametrize("rule", ["median", "geomed", "cclip", "clip", "flame"])
def test_honest_majority_rules_refuse_n_at_most_2f(rule):
    with pytest.raises(ConfigError) as exc:
        build_aggregator(rule, AggregationConfig(f=5), 10)
    assert "n > 2f" in str(exc.value) and "n = 10" in str(exc.value)
    assert "aggregation.f" in str(exc.value)
    build_aggregator(rule, AggregationConfig(f=4), 10)  # 10 > 8 is accepted


def test_every_rule_record_states_its_central_dp_facts():
    assert MEAN_OF_CLIPPED_RULES == {"fedavg", "clip"}
    assert set(CENTRAL_DP_REFUSALS) == set(RULE_RECORDS) - MEAN_OF_CLIPPED_RULES
    assert set(RULE_RECORDS) == set(RULES)


# ---- suspicion and rounding ----

def ulp_jitter(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with each entry moved by at most 2 units in the last place (rounding, not evidence)."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(-2, 3, x.shape, generator=gen).to(x.dtype)
    return x * (1 + steps * torch.finfo(x.dtype).eps / 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [s for s in SPECS if s not in ("fltrust", "flame")])
def test_rows_equal_up_to_rounding_are_not_suspicious(spec, dtype):
    """Rows that differ only by rounding all score 0 (fltrust scores 1 - cos, flame membership)."""
    base = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.stack([ulp_jitter(base.to(dtype), s) for s in range(N)])
    result = build_aggregator(spec, config(), N)(x)
    assert torch.equal(result.suspicion, torch.zeros(N, dtype=torch.float64)), spec


def test_excess_over_median_tolerates_rounding_but_not_evidence():
    scores = torch.tensor([0.0, 1e-30, 2e-30, 0.0, 1e-29, 5.0], dtype=torch.float64)
    plain = excess_over_median(scores)  # no noise bound: rounding at 1e-30 is "fully suspicious"
    assert plain[4] == pytest.approx(0.85)  # median 1.5e-30: (1e-29 - 1.5e-30) / 1e-29
    floor = excess_over_median(scores, noise=1e-20)
    assert floor[:5].tolist() == [0.0] * 5 and floor[5] == pytest.approx(1.0)
    # twice the median: 0.5, less the relative tolerance (8 eps of the median)
    assert excess_over_median(torch.tensor([1.0, 1.0, 2.0, 1.0])).tolist() == pytest.approx(
        [0, 0, 0.5, 0], abs=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_only_rounds_quarantine_no_one(dtype):
    """30 honest-only rounds through reputation (config defaults: threshold 0.5, patience 3,
    decay 0.5), for every rule, with and without NNM: 0 honest clients quarantined."""
    specs = [s for s in SPECS if s != "fltrust"] + ["nnm+multikrum", "bucketing+median"]
    cfg = dataclasses.replace(config(), geomed_iters=10, cclip_iters=1)
    quarantined = {}
    for spec in specs:
        agg = build_aggregator(spec, cfg, N, seed=0)
        rep = Reputation(threshold=0.5, patience=3, decay=0.5)
        gen = torch.Generator().manual_seed(11)
        direction = torch.randn(200, generator=gen, dtype=torch.float64)
        for rnd in range(1, 31):
            x = (direction + 0.5 * torch.randn(N, 200, generator=gen, dtype=torch.float64))
            result = agg(x.to(dtype))
            rep.update(rnd, list(range(N)), result.suspicion.tolist())
        quarantined[spec] = sorted(rep.quarantined)
    wrong = {s: q for s, q in quarantined.items() if q}
    assert not wrong, wrong


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_rounds_quarantine_the_outliers_and_no_honest_client(dtype):
    """20 rounds of 16 honest clients and 4 at norm 1e6 (the case that was red on AMD EPYC for
    nnm+krum): every rule quarantines the 4 and no honest client. Before the fix, measured:
    cclip (tau 0.5) quarantined 16 of 16 honest clients, flame 5 (and crashed in float32)."""
    n, f, d = 20, 4, 50
    cfg = AggregationConfig(f=f, trim_fraction=0.0, cclip_tau=0.5, cclip_iters=3, flame_noise=0.0)
    # fltrust is left out: its suspicion is 1 - ReLU(cos) to the server's update, an absolute
    # distrust (0.6-0.7 for these honest clients), not an excess over the round's typical client
    specs = [s for s in SPECS if s not in ("fedavg", "fltrust")] + ["nnm+multikrum"]
    direction = torch.ones(d, dtype=torch.float64) / d ** 0.5
    outcome = {}
    for spec in specs:
        agg = build_aggregator(spec, cfg, n, seed=0)
        rep = Reputation(threshold=0.5, patience=3, decay=0.5)
        gen = torch.Generator().manual_seed(5)
        for rnd in range(1, 21):
            honest = direction + 0.3 * torch.randn(n - f, d, generator=gen, dtype=torch.float64)
            out = torch.randn(f, d, generator=gen, dtype=torch.float64)
            x = torch.cat([honest, 1e6 * out / out.norm(dim=1, keepdim=True)])
            rep.update(rnd, list(range(n)), agg(x.to(dtype)).suspicion.tolist())
        outcome[spec] = sorted(rep.quarantined)
    wrong = {s: q for s, q in outcome.items() if q != list(range(n - f, n))}
    assert not wrong, wrong
