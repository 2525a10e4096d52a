"""The server cannot regenerate a client's DP-SGD noise (issue 14, point 2), unless the run opts in.

The adversary is the honest-but-curious server: it knows the code, the config, the run seed, the
global weights it sent and every reply (weights, num-examples, partition id). Its attack replays
the client's round with the same seed on zeros, which regenerates the noise when the noise is
seeded; subtracting it from the reply leaves the noise-free clipped gradient sum.

The model is a bias-free linear layer on 50,000 features (500,000 weights): on all-zero inputs its
per-sample gradients are exactly zero, so a round on zeros releases nothing but its noise. That
gives the real noise exactly (the client's own zero-data round) and the attacker's replay.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from fedshield.client.app import round_seed
from fedshield.client.dp import SecureNoise, SecurePoissonSampler, train_private
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.randomness import (
    NOISE_SUMMANDS,
    DPStreams,
    NoiseAhead,
    ReproducibleNoiseWarning,
    SecureRandom,
)
from fedshield.tasks import Split
from torch import nn

from fedshield.schema import PrivacyConfig, TrainConfig

FEATURES, CLASSES, EXAMPLES = 50_000, 10, 64
COORDS = FEATURES * CLASSES
# Under independence a sample correlation over COORDS values has std 1/sqrt(COORDS) = 0.0014, so
# |corr| < 0.01 fails by chance with probability ~1e-12 (7 sigma): the bound cannot flake.
UNCORRELATED = 0.01
TRAIN = TrainConfig(lr=1.0, momentum=0.0, batch_size=16, local_epochs=1, max_steps=2)
RUN_SEED, ROUND, PARTITION = 7, 3, 2  # all three are known to the server


def privacy(reproducible: bool) -> PrivacyConfig:
    return PrivacyConfig(enabled=True, noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-3,
                         accountant="rdp", grad_sample_mode="bk", reproducible_noise=reproducible)


def global_model() -> nn.Module:
    torch.manual_seed(0)  # the weights the server sent: known to it
    return nn.Linear(FEATURES, CLASSES, bias=False)


def real_data() -> Split:
    rng = np.random.default_rng(1)
    return Split(rng.standard_normal((EXAMPLES, FEATURES), dtype=np.float32),
                 rng.integers(0, CLASSES, EXAMPLES))


def zeros() -> Split:
    return Split(np.zeros((EXAMPLES, FEATURES), np.float32), np.zeros(EXAMPLES, np.int64))


def one_round(data: Split, cfg: PrivacyConfig, ledger_file) -> torch.Tensor:
    """The update (new - global weights) of one client round through client.dp.train_private."""
    model = global_model()
    before = model.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReproducibleNoiseWarning)
        out = train_private(model, data, TRAIN, cfg, Ledger(ledger_file, cfg.delta, "rdp"),
                            total_rounds=5, server_round=ROUND, run_id="r",
                            seed=round_seed(RUN_SEED, ROUND, PARTITION))
    return (out["state_dict"]["weight"] - before).flatten()


def server_replay_on_zeros(cfg: PrivacyConfig, tmp_path) -> torch.Tensor:
    """The attack: the client's round again, same code, config and seed, on zero data."""
    return one_round(zeros(), cfg, tmp_path / "attacker.json")


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


def noise_free_bound(cfg: PrivacyConfig) -> float:
    """Largest norm of a round's noise-free update: each step adds at most EXAMPLES clipped
    gradients of norm <= C, scaled by lr / batch_size."""
    return TRAIN.max_steps * EXAMPLES * cfg.max_grad_norm * TRAIN.lr / TRAIN.batch_size


def noise_norm(cfg: PrivacyConfig) -> float:
    """Expected norm of a round's noise in the update: sigma C sqrt(d) lr / B per step."""
    sigma_c = cfg.noise_multiplier * cfg.max_grad_norm
    per_step = sigma_c * math.sqrt(COORDS) * TRAIN.lr / TRAIN.batch_size
    return per_step * math.sqrt(TRAIN.max_steps)


def test_replaying_the_round_on_zeros_regenerates_nothing_of_the_real_noise(tmp_path):
    cfg = privacy(reproducible=False)
    real_noise = one_round(zeros(), cfg, tmp_path / "client.json")  # zero data: the update is noise
    replay = server_replay_on_zeros(cfg, tmp_path)
    assert real_noise.numel() == COORDS >= 100_000
    assert real_noise.norm() == pytest.approx(noise_norm(cfg), rel=0.01)  # noise is really there
    assert abs(correlation(replay, real_noise)) < UNCORRELATED

    # With real data, subtracting the replay leaves noise (about sqrt(2) x its norm), not the
    # gradient sum, whose norm is at most noise_free_bound.
    update = one_round(real_data(), cfg, tmp_path / "client-real.json")
    residual = (update - replay).norm()
    assert residual == pytest.approx(math.sqrt(2) * noise_norm(cfg), rel=0.02)
    assert residual > 10 * noise_free_bound(cfg)


def test_with_reproducible_noise_the_same_attack_recovers_the_noise(tmp_path):
    """Standing regression test that the attack works when it should: if this stops passing,
    the attack above no longer tests anything."""
    cfg = privacy(reproducible=True)
    real_noise = one_round(zeros(), cfg, tmp_path / "client.json")
    replay = server_replay_on_zeros(cfg, tmp_path)
    assert correlation(replay, real_noise) > 0.9999
    torch.testing.assert_close(replay, real_noise, rtol=0, atol=1e-6)

    # With real data the noise is 10x what the gradients can contribute, and the replay removes it:
    # what is left is the noise-free clipped gradient sum (non-zero, within its bound).
    update = one_round(real_data(), cfg, tmp_path / "client-real.json")
    assert update.norm() > 10 * noise_free_bound(cfg)
    residual = (update - replay).norm()
    assert 0.1 < residual <= noise_free_bound(cfg)


def test_reproducible_noise_warns_and_secure_rounds_say_where_their_noise_came_from(tmp_path):
    data = zeros().subset(np.arange(32))
    model = nn.Linear(FEATURES, CLASSES, bias=False)
    kwargs = dict(total_rounds=1, server_round=1, run_id="r", seed=0)
    with pytest.warns(ReproducibleNoiseWarning, match="does NOT hold against the server"):
        out = train_private(model, data, TRAIN, privacy(True),
                            Ledger(tmp_path / "a.json", 1e-3, "rdp"), **kwargs)
    assert out["metrics"]["noise_source"] == "seed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither our warning nor Opacus' "Secure RNG turned off"
        out = train_private(model, data, TRAIN, privacy(False),
                            Ledger(tmp_path / "b.json", 1e-3, "rdp"), **kwargs)
    assert out["metrics"]["noise_source"] == "os-csprng"


def test_secure_gaussian_has_the_asked_std_and_sums_four_draws_per_value():
    rng = SecureRandom()
    noise = rng.gaussian((1000, 1000), 3.0).double()
    # 1e6 draws: the mean's std is 3e-3 and the std's relative std ~7e-4; 5-sigma tolerances
    assert abs(noise.mean().item()) < 0.015 and noise.std().item() == pytest.approx(3.0, rel=4e-3)
    inside = (noise.abs() < 3.0).double().mean().item()  # P(|Z| < 1) for a Gaussian
    assert inside == pytest.approx(0.682689, abs=0.0025)
    # Opacus' floating-point-attack fix: 2n = 4 Gaussians (4 x 4 bytes of keystream) per value
    assert NOISE_SUMMANDS == 4 and rng.bytes_drawn == 4 * NOISE_SUMMANDS * noise.numel()
    assert torch.equal(rng.gaussian((3, 2), 0.0), torch.zeros(3, 2))
    assert rng.gaussian((5,), 1.0, dtype=torch.float64).dtype == torch.float64


def test_streams_are_fresh_independent_and_masks_sample_at_the_rate():
    streams = [DPStreams.fresh() for _ in range(2)]
    draws = [s.noise.standard_normal(COORDS) for s in streams]
    draws.append(streams[0].sampling.standard_normal(COORDS))
    for i in range(3):
        for j in range(i):
            assert abs(correlation(draws[i], draws[j])) < UNCORRELATED
    mask = SecureRandom().bernoulli_mask(1_000_000, 0.02)
    # binomial(1e6, 0.02): std 140 of 20,000 inclusions; 5 sigma
    assert abs(int(mask.sum()) - 20_000) < 700
    u = SecureRandom().uniform24(1_000_000)
    assert 0 < u.min() and u.max() <= 1


def test_adoption_replaces_opacus_draws_and_refuses_what_it_does_not_know():
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    model = nn.Linear(10, 2)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=4)
    rng = SecureRandom()
    adopted = SecureNoise.adopt(opt, rng)
    assert adopted is opt and isinstance(opt, DPOptimizer) and isinstance(opt, SecureNoise)
    for p in model.parameters():
        p.grad_sample = torch.zeros(4, *p.shape)
    opt.step()
    assert rng.bytes_drawn == 4 * NOISE_SUMMANDS * 22  # all 22 noise values from the secret stream
    with pytest.raises(TypeError, match="DPOptimizer"):
        SecureNoise.adopt(torch.optim.SGD(model.parameters(), lr=0.1), rng)

    sampler = UniformWithReplacementSampler(num_samples=100, sample_rate=0.1, steps=3,
                                            generator=torch.Generator().manual_seed(0))
    SecurePoissonSampler.adopt(sampler, SecureRandom())
    assert sampler.generator is None and len(list(sampler)) == 3
    with pytest.raises(TypeError, match="UniformWithReplacementSampler"):
        SecurePoissonSampler.adopt(sampler, SecureRandom())  # already adopted


def test_noise_is_drawn_ahead_for_the_planned_steps_only():
    rng = SecureRandom()
    ahead = NoiseAhead(rng, per_step=10_000, steps=5)
    draws = [ahead.step() for _ in range(6)]
    # the 5 planned steps in one block, then the unplanned 6th alone: nothing drawn to waste
    assert rng.bytes_drawn == 6 * 10_000 * 4 * NOISE_SUMMANDS
    stacked = torch.stack(draws).double()
    assert stacked.shape == (6, 10_000) and stacked.std().item() == pytest.approx(1.0, rel=0.01)
    # consecutive steps are independent draws, not one block reused
    assert all(abs(correlation(a, b)) < 0.05 for a, b in zip(draws, draws[1:], strict=False))
