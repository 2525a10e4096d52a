"""Central DP: clipping, calibrated noise, user-level epsilon, and refusals where the guarantee
breaks."""

import pytest
import torch
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.central import (
    add_central_noise,
    clip_updates,
    fixed_denominator_mean,
    user_level_epsilon,
)
from fedshield.server.aggregation.central_dp_rules import check_central_dp, check_secagg

from fedshield.errors import ConfigError
from fedshield.schema import CentralDPConfig
from tests.config_support import neutral_config

ON = CentralDPConfig(enabled=True, noise_multiplier=1.0, clip_norm=1.0)


def test_clip_updates_bounds_norms_and_counts_clipped():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [0.0, -10.0]], dtype=torch.float64)
    clipped, count = clip_updates(updates, clip_norm=1.0)
    norms = torch.linalg.vector_norm(clipped, dim=1)
    assert count == 2
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(clipped[1], updates[1])  # small updates untouched
    # direction kept
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_one_client_moves_the_fixed_denominator_mean_by_at_most_c_over_expected():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(10, 50, generator=gen, dtype=torch.float64) * 5
    c, expected = 1.0, 8.0
    with_all = fixed_denominator_mean(clip_updates(updates, c)[0], expected)
    without_one = fixed_denominator_mean(clip_updates(updates[1:], c)[0], expected)
    assert torch.linalg.vector_norm(with_all - without_one) <= c / expected + 1e-12


def test_central_noise_has_the_stated_std():
    c, sigma, expected, d = 2.0, 1.5, 10.0, 200_000
    mean = torch.full((d,), 0.25, dtype=torch.float64)
    noisy = add_central_noise(mean, c, sigma, expected, torch.Generator().manual_seed(7))
    noise = noisy - mean
    stated = sigma * c / expected  # 0.3
    # Sample std of 200k Gaussians is within ~0.5% of the truth with overwhelming probability.
    assert noise.std().item() == pytest.approx(stated, rel=0.01)
    assert abs(noise.mean().item()) < 5 * stated / d ** 0.5
    again = add_central_noise(mean, c, sigma, expected, torch.Generator().manual_seed(7))
    assert torch.equal(noisy, again)  # the same generator state draws the same noise


def test_user_level_epsilon_is_the_subsampled_gaussian_over_rounds():
    assert user_level_epsilon(1.0, 0.1, 100, 1e-5, "rdp") == epsilon([(1.0, 0.1, 100)], 1e-5, "rdp")
    assert user_level_epsilon(1.0, 0.1, 200, 1e-5, "rdp") > user_level_epsilon(1.0, 0.1, 100, 1e-5,
                                                                               "rdp")


@pytest.mark.parametrize("rule", ["fedavg", "clip", "FedAvg"])
def test_means_of_clipped_updates_are_allowed(rule):
    check_central_dp(rule, ON, secagg=False, weighting="uniform")
    check_central_dp(rule, ON, secagg=True)
    check_secagg(rule)


def test_krum_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as exc:
        check_central_dp("krum", ON, secagg=False)
    assert str(exc.value) == (
        "central DP noise is calibrated for the mean of clipped updates; krum selects one client's "
        "update, so one client can change the output by up to 2C and the stated epsilon would be "
        "wrong. Use aggregation.rule = \"fedavg\" or \"clip\" with central DP, or turn central DP "
        "off.")


@pytest.mark.parametrize("rule",
                         ["multikrum", "bulyan", "median", "trimmed_mean", "geomed", "fltrust",
                                  "flame", "cclip", "bucketing+fedavg", "nnm+clip",
                          "something_new"])
def test_other_rules_and_preaggregation_are_refused(rule):
    with pytest.raises(ConfigError,
                       match="calibrated for the mean of clipped updates.*turn central DP off"):
        check_central_dp(rule, ON, secagg=False)
    with pytest.raises(ConfigError, match="secure aggregation only reveals the sum"):
        check_secagg(rule)


def test_examples_weighted_fedavg_is_refused_and_disabled_central_dp_checks_nothing():
    with pytest.raises(ConfigError, match="weighting = \"uniform\""):
        check_central_dp("fedavg", ON, weighting="examples")
    check_central_dp("krum", CentralDPConfig(enabled=False))


def test_clip_norm_must_be_positive():
    with pytest.raises(ConfigError):
        clip_updates(torch.zeros(2, 3), 0.0)


def test_config_check_reports_the_problem_for_a_whole_config():
    """Loading a config runs the check: a wrong central-DP combination never starts."""
    from fedshield.server.aggregation.central_dp_rules import central_dp_config_check

    with pytest.raises(ConfigError, match="median"):
        neutral_config({"central_dp": {"enabled": True}, "aggregation": {"rule": "median"}})
    with pytest.raises(ConfigError, match="weighting"):
        neutral_config({"central_dp": {"enabled": True},
                        "aggregation": {"rule": "fedavg", "weighting": "examples"}})
    good = neutral_config({"central_dp": {"enabled": True}, "aggregation": {"rule": "fedavg",
                                                                            "weighting": "uniform"},
                           "screening": {"max_norm_ratio": 0.0}})
    assert central_dp_config_check(good) is None


# -- sampling as accounted, secure randomness, float64 clipping, screening ---------------------

def central_cfg(**central):

    return neutral_config({"task": {"name": "digits"},
                           "federation": {"num_clients": 10, "fraction_train": 0.1,
                                          "min_clients": 2},
                           "central_dp": {"enabled": True, **central},
                           "aggregation": {"rule": "fedavg", "weighting": "uniform"},
                           "screening": {"max_norm_ratio": 0.0}})


class Grid:
    def __init__(self, n):
        self.ids = [10**12 + 7 * i for i in range(n)]  # 64-bit-like node ids

    def get_node_ids(self):
        return self.ids


def test_the_accounted_rate_is_the_samplers_inclusion_frequency():
    """The issue's case: 10 clients, fraction 0.1, min_clients 2. The fixed-size sampler took
    max(2, 1) clients (a true rate of 0.2, eps 15.45 stated as 7.06); Poisson at q = 0.1 is
    accounted at 0.1 and never topped up to min_clients."""
    from fedshield.server.strategy import ShieldStrategy

    strategy = ShieldStrategy(central_cfg())
    grid, rounds = Grid(10), 20_000
    counts = dict.fromkeys(grid.ids, 0)
    sizes = []
    for r in range(1, rounds + 1):
        cohort = strategy.sample(grid, r, strategy.fraction_train)
        sizes.append(len(cohort))
        for node in cohort:
            counts[node] += 1
    freq = sum(counts.values()) / (rounds * len(grid.ids))
    # 200,000 Bernoulli(0.1) draws: std 6.7e-4, so 0.003 is 4.5 std
    assert freq == pytest.approx(0.1, abs=0.003)
    assert all(c / rounds == pytest.approx(0.1, abs=0.012) for c in counts.values())  # 5.6 std
    assert min(sizes) == 0 and sum(s < 2 for s in sizes) > rounds / 2  # below min_clients: kept
    stated = strategy.user_level_epsilon(100)
    assert stated == user_level_epsilon(1.0, 0.1, 100, 1e-5, "prv")


def test_stated_user_level_epsilon_matches_a_fresh_dp_accounting_computation():
    import dp_accounting as dpa
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
    from fedshield.server.strategy import ShieldStrategy

    stated = ShieldStrategy(central_cfg()).user_level_epsilon(100)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0)), 100)
    pld, rdp = PLDAccountant(), RdpAccountant()
    pld.compose(event)
    rdp.compose(event)
    assert stated == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)
    assert pld.get_epsilon(1e-5) <= stated * 1.0005  # never below PLD (its grid: < 5e-4 apart)
    assert stated <= rdp.get_epsilon(1e-5)


def test_central_noise_and_sampling_cannot_be_regenerated_from_the_config():
    """What a participant has (config, seed, code) regenerates nothing: |corr| < 0.01 over 1e6
    coordinates (independent draws: std 1e-3, so 0.01 is 10 std)."""
    from fedshield.privacy.central import (
        add_central_noise,
        noise_generator,
        poisson_sample,
        sampling_rng,
    )

    cfg = central_cfg()
    zeros = torch.zeros(1_000_000, dtype=torch.float64)
    real = add_central_noise(zeros, 1.0, 1.0, 1.0, noise_generator(cfg.central_dp, cfg.seed))
    guess = torch.randn(1_000_000, generator=torch.Generator().manual_seed(cfg.seed),
                        dtype=torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([real, guess]))[0, 1])) < 0.01
    # Not a 32-bit-seeded torch generator either (2**32 seeds are a brute-force search away).
    assert not isinstance(noise_generator(cfg.central_dp, cfg.seed), torch.Generator)
    assert real.std().item() == pytest.approx(1.0, rel=0.01)  # N(0, 1): std error ~7e-4
    a = poisson_sample(10_000, 0.5, sampling_rng(cfg.central_dp, cfg.seed, 1))
    b = poisson_sample(10_000, 0.5, sampling_rng(cfg.central_dp, cfg.seed, 1))
    assert a != b  # two servers with the same config draw different cohorts
    research = central_cfg(reproducible_noise=True).central_dp  # the explicit opt-in
    assert torch.equal(torch.randn(5, generator=noise_generator(research, 3)),
                       torch.randn(5, generator=noise_generator(research, 3)))
    assert poisson_sample(100, 0.5, sampling_rng(research, 3, 1)) == poisson_sample(
        100, 0.5, sampling_rng(research, 3, 1))


def test_central_clipping_is_float64_and_never_exceeds_c_at_a_million_coordinates():
    import math

    import numpy as np

    gen = torch.Generator().manual_seed(1)
    d, c = 1_000_000, 1.0
    # norms ~1e-3 (kept), ~3, ~1e3 and ~2 (clipped): randn(d) has norm ~sqrt(d) = 1e3
    updates = torch.randn(4, d, generator=gen) * torch.tensor([[1e-6], [3e-3], [1.0], [2e-3]])
    updates = updates.float()  # replies arrive as float32
    clipped, count = clip_updates(updates, c)
    assert clipped.dtype == torch.float64 and count == 3
    for row in clipped.numpy():
        exact = math.sqrt(math.fsum(float(x) ** 2 for x in row[::1]))  # correctly rounded sum
        assert exact <= c and float(np.linalg.norm(row)) <= c
    # float32 clipping, as before, overshoots C at this size (why float64 is needed)
    norms32 = torch.linalg.vector_norm(updates, dim=1, keepdim=True)
    f32 = updates * torch.clamp(c / norms32, max=1.0)
    over = [math.sqrt(math.fsum(float(x) ** 2 for x in row)) for row in f32[1:].double().numpy()]
    assert max(over) > c * (1 + 1e-7)


def test_norm_ratio_screening_with_central_dp_is_refused_with_the_reason():

    with pytest.raises(ConfigError, match="2C / expected"):
        neutral_config({"central_dp": {"enabled": True},
                        "aggregation": {"rule": "fedavg", "weighting": "uniform"}})
    cfg = central_cfg()
    assert cfg.screening.enabled and cfg.screening.max_norm_ratio == 0  # per-update checks stay


def test_gdp_cannot_plan_or_cap_a_budget():
    from fedshield.privacy.ledger import Ledger

    for privacy in ({"target_epsilon": 3.0}, {"noise_multiplier": 1.0, "max_epsilon": 3.0}):
        with pytest.raises(ConfigError, match="not an upper bound"):
            neutral_config({"privacy": {"enabled": True, "accountant": "gdp", **privacy}})
    with pytest.raises(ConfigError, match="not an upper bound"):
        Ledger("/tmp/never-written.json", 1e-5, "gdp", max_epsilon=3.0)
