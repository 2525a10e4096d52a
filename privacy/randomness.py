"""Randomness for DP draws that only the client can know.

The server knows the code, the config and the run's seed, and sees every reply. A DP draw derived
from any of them (the seed, the round, the partition id) can be regenerated and subtracted, and
then the epsilon means nothing against the server. So DP-SGD noise and Poisson sampling masks come
from ``SecureRandom``: an AES-256-CTR keystream (OpenSSL, through ``cryptography``; ChaCha20 on
request) under a 256-bit key drawn from the OS CSPRNG (``secrets``) when the stream is made, i.e.
fresh for every round of every client, and never stored or sent.

Why not a ``torch.Generator`` seeded from the OS: on CPU, ``manual_seed`` keeps only the low 32 bits
of its argument (``manual_seed(1)`` and ``manual_seed(1 + 2**32)`` draw the same numbers, torch
2.13), and mt19937 is not a cryptographic generator: 2**32 candidate seeds are within reach of
a brute-force search that tests each against a reply. Opacus' own ``secure_mode`` needs
torchcsprng, whose last release (0.2.1, 2021) pins torch 1.8.1; pip finds no distribution of it
for this environment (Python 3.11, torch 2.13).

Gaussian noise keeps Opacus' secure-mode defence against floating-point attacks on the sampler
(Holohan & Braghin 2021, arXiv:2107.10138, section 5.1; Opacus ``_generate_noise``): each noise
value is the sum of 2n = 4 standard Gaussians, scaled by std / 2, from 4 distinct Box-Muller pairs
(``SecureRandom.gaussian`` says why distinct). Each Gaussian is a float32 Box-Muller output from
24-bit uniforms, the precision of the ``torch.normal`` draws that Opacus sums.

Cost (benchmarks/bench_dp_overhead.py): most of it is float32 log/sqrt/cos/sin for 4 Gaussians a
value; the keystream is about a seventh. AES-256-CTR beats ChaCha20 here (VAES), fewer bytes per
uniform (3) cost more to unpack than they save, and the mask compares integers instead of floats.

``privacy.reproducible_noise = true`` keeps the old seeded draws for research; such a run's
epsilon does not hold against the server (``warn_reproducible_noise``).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fedshield.errors import ConfigError

# Opacus' secure-mode fix, n = 2: "n = 1 could be easy to break and n > 2 is not really necessary"
NOISE_SUMMANDS = 4
# One round draws at most a few GB. 2**36 bytes stays below ChaCha20's 32-bit block counter (2**32
# blocks of 64 bytes) and far below AES-CTR's birthday bound (2**32 of the 2**64 blocks).
MAX_STREAM_BYTES = 2**36
# AES-256-CTR: its keystream is 2x ChaCha20's speed here (OpenSSL with VAES), whole draws up to 40%
# faster (benchmarks/bench_dp_overhead.py's ChaCha20 column)
CIPHERS = ("aes-256-ctr", "chacha20")
DEFAULT_CIPHER = "aes-256-ctr"

REPRODUCIBLE_NOISE_WARNING = (
    "privacy.reproducible_noise = true: DP-SGD noise and Poisson sampling are derived from the run "
    "seed, the round and the partition id, all known to the server. The server can regenerate the "
    "noise and remove it, so the reported epsilon does NOT hold against the server. Use this for "
    "research on public data only; set privacy.reproducible_noise = false for real data.")


class ReproducibleNoiseWarning(UserWarning):
    """A run draws its DP noise from the seed: its epsilon does not hold against the server."""


def warn_reproducible_noise() -> None:
    """Warn (once per process and call site, Python's default) that DP noise is reproducible."""
    warnings.warn(REPRODUCIBLE_NOISE_WARNING, ReproducibleNoiseWarning, stacklevel=2)


@dataclass
class SecureRandom:
    """Uniforms, Gaussians and Bernoulli masks from a keystream under a secret 256-bit key.

    Every instance draws its own key from the OS CSPRNG, so two instances are independent streams
    (one for noise, one for sampling masks) and none can be recreated later. ``cipher``:
    AES-256-CTR (the default: OpenSSL uses AES-NI/VAES where the CPU has them, constant-time
    bit-sliced code where not) or ChaCha20; either keystream is indistinguishable from random
    bytes without the key.
    """

    cipher: str = DEFAULT_CIPHER
    _encryptor: CipherContext = field(init=False, repr=False)
    _zeros: bytes = field(default=b"", init=False, repr=False)
    bytes_drawn: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.cipher not in CIPHERS:
            raise ConfigError(f"SecureRandom cipher {self.cipher!r} is not one of {CIPHERS}")
        key = secrets.token_bytes(32)
        # A fresh key makes a fixed nonce / initial counter safe: (key, nonce) is never reused.
        if self.cipher == "aes-256-ctr":
            self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        else:
            self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def random_bytes(self, n: int) -> bytearray:
        """``n`` bytes of keystream (the encryption of zeros), in a new writable buffer."""
        if self.bytes_drawn + n > MAX_STREAM_BYTES:
            raise RuntimeError(f"a SecureRandom stream must not draw more than {MAX_STREAM_BYTES} "
                               "bytes; make a new one")
        if len(self._zeros) < n:  # the plaintext, kept between calls (a step draws the same size)
            self._zeros = bytes(n)
        out = bytearray(n)
        self._encryptor.update_into(memoryview(self._zeros)[:n], out)
        self.bytes_drawn += n
        return out

    def _signed24(self, n: int) -> torch.Tensor:
        """(n,) int32, uniform on [-2**23, 2**23): the top 24 bits of each keystream word."""
        if not n:
            return torch.zeros(0, dtype=torch.int32)
        # int32 >> is arithmetic: the top 24 bits, sign included, are one uniform 24-bit integer
        return torch.frombuffer(self.random_bytes(4 * n), dtype=torch.int32).bitwise_right_shift_(8)

    def uniform24(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) float32 uniforms on the grid j / 2**24, j = 1 .. 2**24: in (0, 1], never 0.

        The grid of ``1 - torch.rand`` (what torch's Box-Muller takes the log of), and exact: j
        needs 24 bits, which float32 holds (a midpoint grid (k + 1/2) / 2**24 does not, and rounds
        the top half onto even k, and k = 2**24 - 1 onto 1.0)."""
        return torch.add(self._signed24(n).to(device), float(2**23 + 1)).mul_(2.0 ** -24)

    def standard_normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) float32 N(0, 1) draws by Box-Muller, both outputs of each uniform pair used.

        Pair p's cosine output is value p, its sine output value P + p + 1 (P pairs, cyclically):
        the sines are shifted by one, so that k consecutive chunks of m >= 2 values (``gaussian``
        sums such chunks) never hold both outputs of one pair; see ``gaussian``."""
        return self._box_muller(n, 1.0, device)

    def _box_muller(self, n: int, scale: float, device: torch.device | str) -> torch.Tensor:
        """``standard_normal(n) * scale``, the scale applied to the radius (one pass fewer)."""
        pairs = (n + 1) // 2
        s = self._signed24(2 * pairs).to(device)
        # radius from u = j / 2**24 in (0, 1]; angle 2 pi k / 2**24 - pi, the same grid of angles
        radius = torch.add(s[:pairs], float(2**23 + 1)).mul_(2.0 ** -24).log_()
        radius = radius.mul_(-2.0 * scale * scale).sqrt_()
        angle = torch.mul(s[pairs:], 2 * math.pi * 2.0 ** -24)
        out = torch.empty(2 * pairs, dtype=torch.float32, device=s.device)
        torch.cos(angle, out=out[:pairs]).mul_(radius)
        if pairs:
            torch.sin(angle[:-1], out=out[pairs + 1:]).mul_(radius[:-1])
            out[pairs] = angle[-1].sin() * radius[-1]
        return out[:n]

    def gaussian(self, shape: Sequence[int], std: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 summands: int = NOISE_SUMMANDS) -> torch.Tensor:
        """N(0, std^2) noise of ``shape``: the sum of ``summands`` standard Gaussians per value,
        times std / sqrt(summands) (Opacus' floating-point-attack fix). Fewer than
        NOISE_SUMMANDS only to measure what the fix costs (benchmarks/bench_dp_overhead.py).

        The summands of one value come from ``summands`` distinct Box-Muller pairs, one output of
        each, as in Opacus (the sum of 4 ``torch.normal`` calls, each a vector of Box-Muller
        outputs whose two halves land on different coordinates). The two outputs of ONE pair would
        not do: r cos t + r sin t = sqrt(2) r sin(t + pi/4) is one Box-Muller draw again, so 4
        summands would carry the randomness of 2 (Opacus' n = 1, "easy to break")."""
        if summands != 1 and (summands < 2 or summands % 2):
            raise ConfigError(f"summands = {summands!r}: use 1 or an even number (an odd count "
                              "could put both outputs of one Box-Muller pair into one value)")
        numel = math.prod(shape)
        if std == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        # one value alone would put both outputs of a pair into it: draw two, keep one
        width = max(numel, 2) if summands > 1 else numel
        draws = self._box_muller(summands * width, std / math.sqrt(summands), device)
        noise = draws.view(summands, width).sum(0)[:numel]
        return noise.view(tuple(shape)).to(dtype)

    def bernoulli_mask(self, n: int, rate: float) -> torch.Tensor:
        """(n,) bool: each entry True with probability ``rate`` (Poisson sampling of examples).

        Each entry compares a uniform 53-bit integer k with T = round(rate * 2**53): True with
        probability T / 2**53, ``rate`` to within 2**-54, so the accountant's sample rate is the
        one actually used. Integers, not floats: two tensor operations a mask, and no rounding."""
        if not 0 <= rate <= 1:
            raise ConfigError(f"a Poisson sampling rate must be in [0, 1], got {rate!r}")
        if not n:
            return torch.zeros(0, dtype=torch.bool)
        words = torch.frombuffer(self.random_bytes(8 * n), dtype=torch.int64)
        # arithmetic >> 11: k - 2**52 for a uniform 53-bit k; k < T  <=>  k - 2**52 < T - 2**52
        return words.bitwise_right_shift_(11) < round(rate * 2.0**53) - 2**52


# Noise values drawn at once: a draw's fixed cost (a dozen tensor operations and a cipher call,
# ~0.15 ms on a busy 2-core machine) is paid once for many steps of small models, while the
# 4-summand intermediates (~1 MiB) stay in cache. Measured per step, interleaved, on that machine:
# 2**16 halved digits' draws at batch 16 against 2**18 (0.16 vs 0.33 ms) and cut ScatterNet +
# linear's at batch 64 by a sixth; 2**14 was no better.
BLOCK_VALUES = 2**16


@dataclass
class NoiseAhead:
    """One round's unit-variance DP noise, ``per_step`` values a step, drawn ahead in blocks of
    whole steps and never past ``steps`` (the round's planned steps; later ones draw one by one).

    Drawing ahead is safe: the noise does not depend on the data, and the block never leaves the
    client's process."""

    rng: SecureRandom
    per_step: int
    steps: int
    device: torch.device | str = "cpu"
    _block: torch.Tensor | None = field(default=None, init=False, repr=False)
    _next: int = field(default=0, init=False)

    def step(self) -> torch.Tensor:
        """(per_step,) float32 N(0, 1) values for the next step."""
        if self._block is None or self._next == len(self._block):
            count = max(1, min(self.steps, BLOCK_VALUES // max(self.per_step, 1)))
            self.steps = max(self.steps - count, 0)
            self._block = self.rng.gaussian((count, self.per_step), 1.0, device=self.device)
            self._next = 0
        self._next += 1
        return self._block[self._next - 1]


@dataclass(frozen=True)
class DPStreams:
    """The two secret streams of one client round: noise, and sampling masks, never shared."""

    noise: SecureRandom
    sampling: SecureRandom

    @classmethod
    def fresh(cls) -> DPStreams:
        """Two new streams, each under its own key from the OS CSPRNG."""
        return cls(noise=SecureRandom(), sampling=SecureRandom())
