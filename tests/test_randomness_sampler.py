"""privacy/randomness.py's sampler: structure, grids, ciphers and statistics of the secret draws.

Statistical tolerances are sized from the sample (stated at each check) so that a correct sampler
fails by chance with probability below about 1e-6; the structural checks are exact. Nothing here
depends on BLAS or thread count: the draws are elementwise float32 math on the CPU.
"""

import math
import random

import numpy as np
import pytest
import torch
from fedshield.privacy.randomness import (
    CIPHERS,
    DEFAULT_CIPHER,
    NOISE_SUMMANDS,
    DPStreams,
    NoiseAhead,
    SecureRandom,
)
from scipy import stats

from fedshield.errors import ConfigError

N = 1_000_000
# word whose top 24 bits give s = 2**23 - 1: u = 1 exactly, so the Box-Muller radius is 0
ZERO_RADIUS = 0x7FFFFFFF
LIVE_RADIUS = 0x00000000  # s = 0: u = (2**23 + 1) / 2**24, radius ~1.18
EIGHTH_TURN = (2**21) << 8  # s = 2**21: angle pi / 4, cos and sin both ~0.707


def scripted(words: list[int]) -> SecureRandom:
    """A SecureRandom whose keystream is ``words`` (int32 little-endian), to test the layout."""
    rng = SecureRandom()
    data = np.array(words, dtype=np.uint32).astype("<u4").tobytes()
    rng.random_bytes = lambda n: bytearray(data[:n])  # type: ignore[method-assign]
    return rng


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


@pytest.mark.parametrize("values", [1, 2, 3, 7, 64])
def test_each_noise_value_sums_one_output_of_four_distinct_box_muller_pairs(values):
    """Opacus' fix sums 4 independent draws. Both outputs of one pair in one value would make it
    r (cos t + sin t) = sqrt(2) r sin(t + pi / 4): one draw, not two (the pre-fix layout did this).
    With only pair p's radius non-zero, exactly two values are non-zero: p's two outputs landed in
    different values, so every value's 4 summands come from 4 different pairs."""
    width = max(values, 2)
    pairs = NOISE_SUMMANDS * width // 2
    for live in range(pairs):
        radius = [LIVE_RADIUS if p == live else ZERO_RADIUS for p in range(pairs)]
        rng = scripted(radius + [EIGHTH_TURN] * pairs)
        noise = rng.gaussian((values,), 1.0)
        if values == 1:  # one value is drawn as two and one kept: each pair feeds it at most once
            assert noise.abs().item() < 1.0
            continue
        assert int((noise != 0).sum()) == 2, live
        # the value it feeds gets sqrt(2 ln 2) * cos(pi / 4) / 2 (the sum's 1/sqrt(4))
        expected = math.sqrt(2 * math.log(2)) * math.cos(math.pi / 4) / 2
        torch.testing.assert_close(noise[noise != 0].abs(), torch.full((2,), expected),
                                   rtol=1e-5, atol=0)


def test_uniforms_are_exact_on_the_grid_j_over_2_to_the_24_with_both_ends():
    # s = -2**23 (word 0x80000000) is j = 1; s = 2**23 - 1 is j = 2**24, i.e. 1.0; s = 2**22 is the
    # odd j = 2**23 + 2**22 + 1 in the top half, which a midpoint grid (k + 1/2) / 2**24 rounds away
    words = [0x80000000, ZERO_RADIUS, (2**22) << 8, 0x000000FF]
    u = scripted(words).uniform24(4).double() * 2**24
    assert u.tolist() == [1.0, 2.0**24, 2.0**23 + 2**22 + 1, 2.0**23 + 1]
    drawn = SecureRandom().uniform24(N).double() * 2**24
    assert torch.equal(drawn, drawn.round()) and drawn.min() >= 1 and drawn.max() <= 2**24
    # 1e6 uniforms: mean 1/2 with std 2.9e-4; 6 sigma
    assert abs(drawn.mean().item() / 2**24 - 0.5) < 1.8e-3


@pytest.mark.parametrize("cipher", CIPHERS)
def test_gaussian_noise_is_normal_with_the_asked_std_for_each_cipher(cipher):
    rng = SecureRandom(cipher)
    noise = rng.gaussian((N,), 2.5).double()
    # mean's std 2.5e-3, std's relative std 7e-4: 6-sigma tolerances
    assert abs(noise.mean().item()) < 0.015 and noise.std().item() == pytest.approx(2.5, rel=4.2e-3)
    # Kolmogorov-Smirnov against N(0, 2.5^2): p < 1e-6 happens by chance once in a million runs
    assert stats.kstest(noise.numpy(), "norm", args=(0, 2.5)).pvalue > 1e-6
    # fourth moment 3 sigma^4 (kurtosis of a Gaussian): std of the estimate ~ 0.0245 * 3; 6 sigma
    assert (noise / 2.5).pow(4).mean().item() == pytest.approx(3.0, abs=0.45)
    assert rng.bytes_drawn == 4 * NOISE_SUMMANDS * N


def test_neighbouring_values_are_independent_not_just_uncorrelated():
    """Neighbours share Box-Muller pairs (a pair's cosine feeds value j, its sine value j + 1),
    which is sound because r cos t and r sin t are independent. A shared radius would show as
    correlated squares; under independence the sample correlation has std 1e-3, bound 6 sigma."""
    noise = SecureRandom().gaussian((N,), 1.0)
    for lag in (1, 2, 3):
        assert abs(correlation(noise[:-lag], noise[lag:])) < 0.006
        assert abs(correlation(noise[:-lag] ** 2, noise[lag:] ** 2)) < 0.006
    # the sign pattern of neighbours: each of the 4 quadrants with probability 1/4 (std 4.3e-4)
    quadrant = (noise[:-1] > 0).long() * 2 + (noise[1:] > 0).long()
    counts = torch.bincount(quadrant, minlength=4).double() / (N - 1)
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=2.6e-3)


def test_standard_normal_is_standard_and_its_two_halves_independent():
    z = SecureRandom().standard_normal(N + 1)  # odd: the last sine output is dropped
    assert z.shape == (N + 1,)
    assert abs(z.mean().item()) < 0.006 and z.double().std().item() == pytest.approx(1, rel=4.2e-3)
    half = (N + 2) // 2  # cosines, then sines shifted by one pair
    assert abs(correlation(z[:half - 1], z[half:])) < 0.006
    assert abs(correlation(z[:half - 1] ** 2, z[half:] ** 2)) < 0.006


def test_draws_do_not_follow_any_seed_and_bytes_never_repeat():
    draws = []
    for _ in range(2):  # everything a run seeds, seeded alike before each stream is made
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        draws.append(SecureRandom().gaussian((200_000,), 1.0))
    # |corr| over 2e5 pairs under independence: std 2.2e-3; 6 sigma
    assert abs(correlation(*draws)) < 0.014
    rng = SecureRandom()
    blocks = [bytes(rng.random_bytes(16)) for _ in range(10_000)]
    assert len(set(blocks)) == len(blocks)  # a repeat of 128 bits: probability ~2**-101
    streams = DPStreams.fresh()
    assert streams.noise.random_bytes(32) != streams.sampling.random_bytes(32)


def test_the_default_keystream_is_aes_256_ctr_from_a_zero_counter(monkeypatch):
    """With the OS key pinned, the stream equals AES-256 in ECB on the counter blocks 0, 1, 2
    (what CTR encrypts): the default stream is AES-CTR under the key from ``secrets``."""
    import fedshield.privacy.randomness as randomness
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    monkeypatch.setattr(randomness.secrets, "token_bytes", lambda n: key[:n])
    rng = SecureRandom()
    assert rng.cipher == DEFAULT_CIPHER == "aes-256-ctr"
    counters = b"".join(i.to_bytes(16, "big") for i in range(3))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert bytes(rng.random_bytes(48)) == ecb.update(counters) + ecb.finalize()
    monkeypatch.undo()
    # unpinned, each stream's key is its own
    assert bytes(SecureRandom().random_bytes(48)) != bytes(SecureRandom().random_bytes(48))


def test_bernoulli_masks_sample_exactly_at_the_rate():
    rng = SecureRandom()
    for rate in (0.001, 0.02, 0.5, 0.9):
        mask = rng.bernoulli_mask(N, rate)
        sd = math.sqrt(N * rate * (1 - rate))  # binomial; 6 sigma
        assert mask.dtype == torch.bool and abs(int(mask.sum()) - N * rate) < 6 * sd, rate
    assert not rng.bernoulli_mask(N, 0.0).any() and rng.bernoulli_mask(N, 1.0).all()
    assert rng.bernoulli_mask(0, 0.5).shape == (0,)
    # threshold: k - 2**52 < T - 2**52 with T = rate * 2**53 (here 2**51): the words just below
    # and at the threshold (k = T - 1, T) go either side
    t = 2**51
    below, at = ((t - 1 - 2**52) << 11) % 2**64, ((t - 2**52) << 11) % 2**64
    words = np.array([below, at], dtype=np.uint64).astype("<u8").tobytes()
    scripted_rng = SecureRandom()
    scripted_rng.random_bytes = lambda n: bytearray(words[:n])  # type: ignore[method-assign]
    assert scripted_rng.bernoulli_mask(2, 0.25).tolist() == [True, False]
    # consecutive masks are fresh: agreement of two rate-1/2 masks is 1/2 (std 5e-4); 6 sigma
    a, b = rng.bernoulli_mask(N, 0.5), rng.bernoulli_mask(N, 0.5)
    assert abs((a == b).double().mean().item() - 0.5) < 3e-3


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="cipher 'rc4' is not one of"):
        SecureRandom("rc4")
    with pytest.raises(ConfigError, match="rate must be in"):
        SecureRandom().bernoulli_mask(10, 1.5)
    with pytest.raises(ConfigError, match="use 1 or an even number"):
        SecureRandom().gaussian((10,), 1.0, summands=3)
    one = SecureRandom().gaussian((10_000,), 1.0, summands=1)  # the benchmark's one-summand leg
    assert one.double().std().item() == pytest.approx(1.0, rel=0.06)


def test_noise_ahead_serves_fresh_unit_noise_for_every_step_of_a_round():
    rng = SecureRandom()
    ahead = NoiseAhead(rng, per_step=39_700, steps=20)  # ScatterNet + linear's parameter count
    steps = torch.stack([ahead.step() for _ in range(20)])
    # whole steps a block (BLOCK_VALUES), and nothing drawn beyond the 20 planned steps
    assert rng.bytes_drawn == 20 * 39_700 * 4 * NOISE_SUMMANDS
    assert steps.double().std().item() == pytest.approx(1.0, rel=0.01)
    # no step repeats another: within a block and across blocks (steps 5 and 6 straddle one)
    for i, j in ((0, 1), (5, 6), (0, 19)):
        assert abs(correlation(steps[i], steps[j])) < 0.03  # std 5e-3 over 39,700; 6 sigma
