"""Each rule against a straightforward numpy reference, hand-made cases, validation, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedshield.server.aggregation import PRE_AGGREGATORS, RULES, AggregationResult, build_aggregator
from fedshield.server.aggregation.clipping import cclip, clip
from fedshield.server.aggregation.coordinatewise import median, trimmed_mean
from fedshield.server.aggregation.distances import cosine_distances, pairwise_sq_distances
from fedshield.server.aggregation.flame import flame, majority_cluster
from fedshield.server.aggregation.fltrust import fltrust
from fedshield.server.aggregation.geomed import geomed
from fedshield.server.aggregation.krum import bulyan, krum, multikrum
from fedshield.server.aggregation.mean import fedavg
from fedshield.server.aggregation.preagg import bucketing, nnm

from fedshield.errors import ConfigError
from fedshield.schema import AggregationConfig

CASES = [(n, seed) for n in (5, 11, 20) for seed in (0, 1, 2)]
D = 50


def random_updates(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=(n, 1))


def f_for(n: int) -> int:
    return max((n - 3) // 4, 0)  # the largest f every rule (Bulyan included) accepts


# ---- numpy references: loops and full pairwise differences ----

def ref_sq_dist(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])


def ref_krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    n = len(dist)
    k = min(max(n - f - 2, 1), n - 1)
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


def ref_multikrum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    scores = ref_krum_scores(ref_sq_dist(x), f)
    return x[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


def ref_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    theta, beta = n - 2 * f, n - 4 * f
    dist = ref_sq_dist(x)
    remaining, chosen = list(range(n)), []
    while len(chosen) < theta:
        scores = ref_krum_scores(dist[np.ix_(remaining, remaining)], f)
        chosen.append(remaining.pop(int(np.argmin(scores))))
    sel = x[chosen]
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        col = sel[:, j]
        med = np.median(col)
        out[j] = col[np.argsort(np.abs(col - med), kind="stable")[:beta]].mean()
    return out


def ref_trimmed(x: np.ndarray, trim: int) -> np.ndarray:
    return np.sort(x, axis=0)[trim: len(x) - trim].mean(axis=0)


def ref_geomed(x: np.ndarray, iters: int = 2000) -> np.ndarray:
    z = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def ref_cclip(x: np.ndarray, center: np.ndarray, tau: float, iters: int) -> np.ndarray:
    v = center.copy()
    for _ in range(iters):
        step = np.zeros_like(v)
        for xi in x:
            diff = xi - v
            step += diff * min(1.0, tau / np.linalg.norm(diff))
        v = v + step / len(x)
    return v


def ref_clip(x: np.ndarray, bound: float) -> np.ndarray:
    return np.mean([xi * min(1.0, bound / np.linalg.norm(xi)) for xi in x], axis=0)


def ref_fltrust(x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    total, trust_sum = np.zeros_like(g0), 0.0
    for xi in x:
        trust = max(0.0, xi @ g0 / (np.linalg.norm(xi) * np.linalg.norm(g0)))
        total += trust * xi * np.linalg.norm(g0) / np.linalg.norm(xi)
        trust_sum += trust
    return total / trust_sum


def ref_nnm(x: np.ndarray, f: int) -> np.ndarray:
    dist = ref_sq_dist(x)
    return np.array([x[np.argsort(dist[i], kind="stable")[: len(x) - f]].mean(axis=0)
                     for i in range(len(x))])


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def close(result: AggregationResult | torch.Tensor, expected: np.ndarray, tol: float = 1e-9):
    got = result.update if isinstance(result, AggregationResult) else result
    np.testing.assert_allclose(got.numpy(), expected, rtol=tol, atol=tol)


# ---- agreement with the references ----

@pytest.mark.parametrize("n,seed", CASES)
def test_distances_match_pairwise_differences(n, seed):
    x = random_updates(n, seed)
    np.testing.assert_allclose(pairwise_sq_distances(t(x)).numpy(), ref_sq_dist(x),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,seed", CASES)
def test_fedavg_matches_numpy(n, seed):
    x = random_updates(n, seed)
    w = np.random.default_rng(seed).integers(1, 100, size=n).astype(float)
    close(fedavg(t(x)), x.mean(axis=0))
    close(fedavg(t(x), t(w)), np.average(x, axis=0, weights=w))


@pytest.mark.parametrize("n,seed", CASES)
def test_krum_family_matches_reference(n, seed):
    x, f = random_updates(n, seed), f_for(n)
    close(krum(t(x), f), ref_multikrum(x, f, 1))
    close(multikrum(t(x), f), ref_multikrum(x, f, n - f))
    close(multikrum(t(x), f, 2), ref_multikrum(x, f, 2))
    close(bulyan(t(x), f), ref_bulyan(x, f))


@pytest.mark.parametrize("n,f", [(61, 14), (120, 3), (9, 1)])
def test_bulyan_incremental_selection_matches_fresh_krum_each_round(n, f):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 4))
    x[:f] *= 5
    close(bulyan(t(x), f), ref_bulyan(x, f))


@pytest.mark.parametrize("n,seed", CASES)
def test_coordinatewise_match_numpy(n, seed):
    x = random_updates(n, seed)
    close(median(t(x)), np.median(x, axis=0))
    for trim in range(0, (n - 1) // 2 + 1):
        close(trimmed_mean(t(x), trim), ref_trimmed(x, trim))


@pytest.mark.parametrize("n,seed", CASES)
def test_geomed_matches_converged_weiszfeld(n, seed):
    x = random_updates(n, seed)
    close(geomed(t(x), iters=2000, eps=1e-12, tol=0.0), ref_geomed(x), tol=1e-7)


@pytest.mark.parametrize("n,seed", CASES)
def test_clipping_rules_match_loops(n, seed):
    x = random_updates(n, seed)
    center = np.random.default_rng(seed + 100).normal(size=D) * 0.3
    norms = np.linalg.norm(x, axis=1)
    tau = float(np.median(norms))
    close(cclip(t(x), t(center), tau, iters=3), ref_cclip(x, center, tau, 3))
    close(cclip(t(x), None, tau, iters=1), ref_cclip(x, np.zeros(D), tau, 1))
    close(clip(t(x)), ref_clip(x, float(np.median(norms))))
    close(clip(t(x), 0.7), ref_clip(x, 0.7))


@pytest.mark.parametrize("n,seed", CASES)
def test_fltrust_matches_loop(n, seed):
    x = random_updates(n, seed)
    g0 = x.mean(axis=0) + 0.1 * np.random.default_rng(seed).normal(size=D)
    result = fltrust(t(x), t(g0))
    close(result, ref_fltrust(x, g0))
    cos = x @ g0 / (np.linalg.norm(x, axis=1) * np.linalg.norm(g0))
    np.testing.assert_allclose(result.suspicion.numpy(), 1 - np.clip(cos, 0, 1), atol=1e-12)


@pytest.mark.parametrize("n,seed", CASES)
def test_nnm_matches_loop(n, seed):
    x, f = random_updates(n, seed), f_for(n) + 1
    mixed, membership = nnm(t(x), f)
    close(mixed, ref_nnm(x, f))
    assert membership.tolist() == list(range(n))


def test_bucketing_means_of_its_buckets():
    x = random_updates(11, 0)
    buckets, membership = bucketing(t(x), 3, torch.Generator().manual_seed(5))
    assert buckets.shape == (4, D)
    assert sorted(torch.bincount(membership).tolist()) == [2, 3, 3, 3]
    for b in range(4):
        np.testing.assert_allclose(buckets[b].numpy(), x[membership.numpy() == b].mean(axis=0))


# ---- hand-made cases ----

def test_median_of_one_two_hundred():
    x = torch.tensor([[1.0, 100.0, 2.0], [2.0, 1.0, 100.0], [100.0, 2.0, 1.0]])
    assert median(x).update.tolist() == [2.0, 2.0, 2.0]
    assert median(x[:2]).update.tolist() == [1.5, 50.5, 51.0]  # even n: mean of the middle two


def test_krum_picks_a_member_of_the_tight_cluster():
    cluster = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [1.0, -0.1], [1.05, 0.05]])
    x = torch.cat([cluster, torch.tensor([[50.0, 50.0], [-40.0, 10.0]])])
    result = krum(x, f=2)
    assert int(result.info["first_index"]) < 5
    assert any(torch.equal(result.update, c) for c in cluster)
    assert result.suspicion[5] > 0.9 and result.suspicion[6] > 0.9
    assert multikrum(x, f=2).suspicion[:5].max() < 0.5


def test_trimmed_mean_and_bulyan_drop_extremes():
    x = torch.tensor([[-1000.0], [1.0], [2.0], [3.0], [4.0], [5.0], [1000.0]])
    assert trimmed_mean(x, 1).update.item() == pytest.approx(3.0)
    assert bulyan(x, f=1).update.item() == pytest.approx(3.0)


def test_flame_drops_the_minority_direction_and_noise_is_seeded():
    rng = np.random.default_rng(0)
    honest = np.array([1.0] * D) + 0.2 * rng.normal(size=(8, D))
    attack = -5.0 * np.ones((3, D)) + 0.2 * rng.normal(size=(3, D))
    x = t(np.concatenate([honest, attack]))
    result = flame(x, noise=0.0)
    kept = majority_cluster(cosine_distances(x)).numpy()
    assert (result.suspicion.numpy()[kept] < 0.5).all() and (result.suspicion[8:] > 0.5).all()
    # HDBSCAN may call a few honest updates noise; it must drop every attacker and keep a majority
    assert not kept[8:].any() and kept.sum() >= 11 // 2 + 1
    bound = float(np.median(np.linalg.norm(honest[kept[:8]], axis=1)))
    close(result, ref_clip(honest[kept[:8]], bound))
    noisy = [flame(x, 0.01, torch.Generator().manual_seed(7)).update for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1])
    residual_std = float((noisy[0] - result.update).std())
    assert 0.5 * 0.01 * bound < residual_std < 2.0 * 0.01 * bound


def test_fltrust_zero_trust_gives_zero_update():
    x = -torch.ones(4, 3)
    assert fltrust(x, torch.ones(3)).update.abs().max() == 0


def test_robust_rules_ignore_weights_but_fedavg_uses_them():
    x = t(random_updates(11, 3))
    w = torch.arange(1.0, 12.0)
    cfg = AggregationConfig(f=2)
    for rule in ("krum", "median", "cclip", "geomed"):
        assert torch.equal(build_aggregator(rule, cfg, 11)(x, w).update,
                           build_aggregator(rule, cfg, 11)(x).update)
    assert not torch.allclose(build_aggregator("fedavg", cfg, 11)(x, w).update,
                              build_aggregator("fedavg", cfg, 11)(x).update)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_rule_keeps_dtype_and_scores_in_unit_interval(dtype):
    x = t(random_updates(11, 4)).to(dtype)
    cfg = AggregationConfig(f=2, trim_fraction=0.0)
    untouched = x.clone()
    specs = [*RULES, "nnm+cclip", "bucketing+median", "bucketing+nnm+median"]
    for spec in specs:
        result = build_aggregator(spec, cfg, 11)(x, reference=x[0])
        assert result.update.dtype == dtype and result.update.shape == (D,), spec
        assert result.suspicion.shape == (11,), spec
        assert ((result.suspicion >= 0) & (result.suspicion <= 1)).all(), spec
        assert torch.isfinite(result.update.double()).all(), spec
        assert torch.equal(x, untouched), f"{spec} modified its input"


# ---- specs, validation, state ----

def test_spec_parsing_and_flags():
    cfg = AggregationConfig(f=1)
    assert not build_aggregator("fedavg", cfg, 10).needs_individual_updates
    assert build_aggregator("bucketing+fedavg", cfg, 10).needs_individual_updates
    assert build_aggregator("Bucketing + NNM + median", cfg, 10).name == "bucketing+nnm+median"
    assert set(PRE_AGGREGATORS) == {"bucketing", "nnm"}


@pytest.mark.parametrize("spec,n,f,words", [
    ("bulyan", 10, 2, ["n >= 4f + 3", "n = 10", "f = 2"]),
    ("krum", 6, 2, ["n > 2f + 2", "n = 6", "f = 2"]),
    ("bucketing+krum", 10, 2, ["5 buckets", "n = 5", "f = 2"]),
    ("nosuchrule", 10, 1, ["unknown rule", "krum", "bulyan", "fltrust"]),
    ("krum+median", 10, 1, ["unknown pre-aggregation step 'krum'", "bucketing"]),
    ("cclip+nnm", 10, 1, ["must be followed by a rule"]),
])
def test_validation_errors_say_what_to_change(spec, n, f, words):
    with pytest.raises(ConfigError) as exc:
        build_aggregator(spec, AggregationConfig(f=f), n)
    for word in words:
        assert word in str(exc.value)


def test_trimmed_mean_validation_and_default_f():
    with pytest.raises(ConfigError, match="2 \\* trim < n"):
        build_aggregator("trimmed_mean", AggregationConfig(f=5, trim_fraction=0.0), 10)
    agg = build_aggregator("krum", AggregationConfig(f=-1, byzantine_fraction_assumed=0.25), 20)
    assert agg.resolve_f(20) == 5 and agg(t(random_updates(20, 0))).info["f"] == 5


def test_fltrust_without_reference_explains_root_data():
    agg = build_aggregator("fltrust", AggregationConfig(), 10)
    with pytest.raises(ConfigError, match="root dataset"):
        agg(t(random_updates(10, 0)))


def test_cclip_state_round_trip_continues_identically(tmp_path):
    cfg = AggregationConfig(cclip_tau=1.0, cclip_iters=2)
    rounds = [t(random_updates(11, s) + 3.0) for s in range(3)]
    first = build_aggregator("bucketing+cclip", cfg, 11, seed=3)
    first(rounds[0])
    torch.save(first.state_dict(), tmp_path / "agg.pt")
    expected = [first(r).update for r in rounds[1:]]
    resumed = build_aggregator("bucketing+cclip", cfg, 11, seed=99)
    resumed.load_state_dict(torch.load(tmp_path / "agg.pt"))
    assert all(torch.equal(resumed(r).update, e) for r, e in zip(rounds[1:], expected, strict=True))
    fresh = build_aggregator("bucketing+cclip", cfg, 11, seed=3)
    assert not torch.equal(fresh(rounds[1]).update, expected[0])  # the center matters
    with pytest.raises(ConfigError, match="same aggregation.rule"):
        build_aggregator("cclip", cfg, 11).load_state_dict(first.state_dict())


def test_cclip_adaptive_radius_is_the_median_distance():
    """tau = 0: the radius is the median distance to the center, so outliers far away are clipped
    to it and at least half of the clients pass unclipped."""
    torch.manual_seed(0)
    honest = torch.randn(7, 20, dtype=torch.float64)
    x = torch.cat([honest, 1e4 * torch.ones(3, 20, dtype=torch.float64)])
    result = build_aggregator("cclip", AggregationConfig(cclip_tau=0.0), 10)(x)
    dist = torch.linalg.vector_norm(x, dim=1)
    assert result.info["tau"] == pytest.approx(float(dist.median()), rel=0.2)
    assert result.info["clipped"] <= 5
    assert result.update.norm() <= honest.norm(dim=1).max()
    assert (result.suspicion[7:] > 0.9).all() and (result.suspicion[:7] < 0.9).all()
