"""Properties every rule should have: order does not matter, outliers cannot drag robust rules,
and pairwise geometry stays exact for tiny updates on top of large values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fedshield.server.aggregation import RULES, build_aggregator
from fedshield.server.aggregation.distances import (
    centring_pays,
    gram,
    pairwise_sq_distances,
    sq_distances_from_gram,
)
from fedshield.server.aggregation.krum import krum_scores

from fedshield.schema import AggregationConfig

ROBUST = [r for r in RULES if r not in ("fedavg", "fltrust")]
N, F, D = 20, 4, 50


def honest_and_outliers(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N - F honest updates around a common direction, then F updates of norm 1e6."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.ones(D, dtype=torch.float64) / D ** 0.5
    honest = direction + 0.3 * torch.randn(N - F, D, generator=gen, dtype=torch.float64)
    outliers = torch.randn(F, D, generator=gen, dtype=torch.float64)
    outliers = 1e6 * outliers / outliers.norm(dim=1, keepdim=True)
    return torch.cat([honest, outliers]), honest


def config() -> AggregationConfig:
    # cclip's radius must be of the honest scale for its guarantee; trim f per side
    return AggregationConfig(f=F, trim_fraction=0.0, cclip_tau=0.5, cclip_iters=3, flame_noise=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [*RULES, "nnm+cclip", "nnm+median", "bucketing+median"])
def test_order_of_clients_does_not_matter(spec, seed):
    x, _ = honest_and_outliers(seed)
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 9),
                               dtype=x.dtype)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    cfg = config()
    if spec.startswith("bucketing"):
        cfg = dataclasses.replace(cfg, bucket_size=1)  # a bucket of one: identity up to the shuffle
    reference = x[:N - F].mean(dim=0)
    plain = build_aggregator(spec, cfg, N)(x, reference=reference)
    permuted = build_aggregator(spec, cfg, N)(x[perm], reference=reference)
    torch.testing.assert_close(permuted.update, plain.update, rtol=1e-9, atol=1e-9)
    # suspicion comes from float64 distances whose rounding scales with the 1e6 outliers' norm
    torch.testing.assert_close(permuted.suspicion, plain.suspicion[perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [*ROBUST, "nnm+cclip", "bucketing+median", "nnm+krum"])
def test_huge_outliers_do_not_move_robust_rules(spec, seed):
    x, honest = honest_and_outliers(seed)
    cfg = config()
    if spec.startswith("bucketing"):
        cfg = dataclasses.replace(cfg, f=2)  # F = 4 outliers in 10 buckets of 2: below half
    result = build_aggregator(spec, cfg, N, seed=seed)(x)
    assert result.update.norm() <= honest.norm(dim=1).max(), spec
    if spec == "flame":  # random-direction outliers are not a cosine cluster; clipping bounds them
        assert result.info["selected"] >= N // 2 + 1
    elif not spec.startswith("bucketing"):
        assert (result.suspicion[N - F:] > result.suspicion[:N - F].max()).all(), spec


def test_huge_outliers_move_fedavg_and_fltrust_follows_the_reference():
    x, honest = honest_and_outliers(0)
    cfg = config()
    assert build_aggregator("fedavg", cfg, N)(x).update.norm() > 1e4
    reference = honest[:3].mean(dim=0)  # the server's root data points the honest way
    result = build_aggregator("fltrust", cfg, N)(x, reference=reference)
    assert result.update.norm() <= honest.norm(dim=1).max()
    cosine = result.update @ honest.mean(dim=0) / (result.update.norm() * honest.mean(dim=0).norm())
    assert cosine > 0.9


def test_distances_order_tiny_updates_on_large_values():
    """Updates of size 1e-7 riding on values ~1e3: ranks must match exact pairwise differences."""
    rng = np.random.default_rng(0)
    base = 1e3 * rng.normal(size=D)
    spread = np.linspace(1.0, 3.0, N)[:, None] * rng.normal(size=(N, D))
    x = base + 1e-7 * spread
    exact = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    ours = pairwise_sq_distances(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=1e-20)
    assert (np.argsort(ours, axis=1)[:, 1:] == np.argsort(exact, axis=1)[:, 1:]).all()
    exact_scores = torch.from_numpy(exact)
    assert torch.equal(krum_scores(torch.from_numpy(ours), 2).argsort(),
                       krum_scores(exact_scores, 2).argsort())
    # the uncentred formula Flower uses cannot see these differences at all, even in float64
    sq = (x * x).sum(axis=1)
    naive = sq[:, None] + sq[None, :] - 2 * x @ x.T
    assert not np.allclose(naive, exact, rtol=1e-2)


def test_float32_distances_over_several_blocks_keep_krum_order():
    """float32 updates (block products in float32, blocks summed in float64) against float64
    differences of the same values; d spans several column blocks."""
    n, d = 30, 300_000
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(d, generator=gen)
    scale = torch.linspace(1.0, 2.0, n)[:, None]
    x = (common + 1e-3 * scale * torch.randn(n, d, generator=gen)).float()
    x64 = x.double()
    exact = torch.stack([((x64 - row) ** 2).sum(dim=1) for row in x64])
    ours = pairwise_sq_distances(x)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=0.0)
    assert torch.equal(krum_scores(ours, 5).argsort(), krum_scores(exact, 5).argsort())


def test_one_huge_outlier_does_not_blur_honest_distances():
    """A float32 outlier 1e6 times the honest size would dominate a column mean; the honest rows'
    distances must stay those of exact float64 differences, as deltas need no centring."""
    n, d = 20, 50_000
    gen = torch.Generator().manual_seed(3)
    x = 1e-2 * torch.randn(n, d, generator=gen)
    x[0] = 1e4 * torch.randn(d, generator=gen)
    x = x.float()
    g = gram(x, centered=False)
    assert not centring_pays(g)
    x64 = x.double()
    exact = torch.stack([((x64 - row) ** 2).sum(dim=1) for row in x64])
    ours = pairwise_sq_distances(x)
    torch.testing.assert_close(ours[1:, 1:], exact[1:, 1:], rtol=1e-5, atol=0.0)
    assert torch.equal(krum_scores(ours, 4).argsort(), krum_scores(exact, 4).argsort())
    # centring on the mean would carry the outlier's size into every honest row
    centred = sq_distances_from_gram(gram(x, centered=True))
    assert not torch.allclose(centred[1:, 1:], exact[1:, 1:], rtol=1e-5, atol=0.0)


def test_centring_is_chosen_only_when_the_rows_share_a_dominant_part():
    gen = torch.Generator().manual_seed(4)
    deltas = torch.randn(10, 1000, generator=gen, dtype=torch.float64)
    assert not centring_pays(gram(deltas, centered=False))
    assert centring_pays(gram(deltas + 3.0, centered=False))  # mean energy 9 vs spread 1
