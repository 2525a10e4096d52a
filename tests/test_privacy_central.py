"""Central DP: clipping, calibrated noise, user-level epsilon, and refusals where the guarantee breaks."""

import pytest
import torch

from fedshield.config import CentralDPConfig
from fedshield.errors import ConfigError
from privacy.accounting import epsilon
from privacy.central import (add_central_noise, check_central_dp, check_secagg, clip_updates,
                             fixed_denominator_mean, user_level_epsilon)

ON = CentralDPConfig(enabled=True, noise_multiplier=1.0, clip_norm=1.0)


def test_clip_updates_bounds_norms_and_counts_clipped():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [0.0, -10.0]], dtype=torch.float64)
    clipped, count = clip_updates(updates, clip_norm=1.0)
    norms = torch.linalg.vector_norm(clipped, dim=1)
    assert count == 2
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(clipped[1], updates[1])  # small updates untouched
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8], dtype=torch.float64))  # direction kept


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
    assert torch.equal(noisy, again)  # reproducible from the seed


def test_user_level_epsilon_is_the_subsampled_gaussian_over_rounds():
    assert user_level_epsilon(1.0, 0.1, 100, 1e-5, "rdp") == epsilon([(1.0, 0.1, 100)], 1e-5, "rdp")
    assert user_level_epsilon(1.0, 0.1, 200, 1e-5, "rdp") > user_level_epsilon(1.0, 0.1, 100, 1e-5, "rdp")


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
        "wrong. Use aggregation.rule = \"fedavg\" or \"clip\" with central DP, or turn central DP off.")


@pytest.mark.parametrize("rule", ["multikrum", "bulyan", "median", "trimmed_mean", "geomed", "fltrust",
                                  "flame", "cclip", "bucketing+fedavg", "nnm+clip", "something_new"])
def test_other_rules_and_preaggregation_are_refused(rule):
    with pytest.raises(ConfigError, match="calibrated for the mean of clipped updates.*turn central DP off"):
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
    from fedshield import config as fcfg
    from privacy.central import central_dp_config_check

    with pytest.raises(ConfigError, match="median"):
        fcfg.from_dict({"central_dp": {"enabled": True}, "aggregation": {"rule": "median"}})
    with pytest.raises(ConfigError, match="weighting"):
        fcfg.from_dict({"central_dp": {"enabled": True},
                        "aggregation": {"rule": "fedavg", "weighting": "examples"}})
    good = fcfg.from_dict({"central_dp": {"enabled": True}, "aggregation": {"rule": "fedavg",
                                                                            "weighting": "uniform"}})
    assert central_dp_config_check(good) is None
