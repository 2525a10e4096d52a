"""Randomness for DP draws that only the client can know.

The server knows the code, the config and the run's seed, and sees every reply. A DP draw derived
from any of them (the seed, the round, the partition id) can be regenerated and subtracted, and
then the epsilon means nothing against the server. So DP-SGD noise and Poisson sampling masks come
from ``SecureRandom``: a ChaCha20 keystream (OpenSSL, through ``cryptography``) under a 256-bit key
drawn from the OS CSPRNG (``secrets``) when the stream is made, i.e. fresh for every round of
every client, and never stored or sent.

Why not a ``torch.Generator`` seeded from the OS: on CPU, ``manual_seed`` keeps only the low 32 bits
of its argument (``manual_seed(1)`` and ``manual_seed(1 + 2**32)`` draw the same numbers, torch
2.13), and mt19937 is not a cryptographic generator: 2**32 candidate seeds are within reach of
a brute-force search that tests each against a reply. Opacus' own ``secure_mode`` needs
torchcsprng, whose last release (0.2.1, 2021) pins torch 1.8.1; pip finds no distribution of it
for this environment (Python 3.11, torch 2.13).

Gaussian noise keeps Opacus' secure-mode defence against floating-point attacks on the sampler
(Holohan & Braghin 2021, arXiv:2107.10138, section 5.1; Opacus ``_generate_noise``): each noise
value is the sum of 2n = 4 standard Gaussians, scaled by std / 2. Each Gaussian is a float32
Box-Muller draw from 24-bit uniforms, the precision of the ``torch.normal`` draws that Opacus sums.

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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Opacus' secure-mode fix, n = 2: "n = 1 could be easy to break and n > 2 is not really necessary"
NOISE_SUMMANDS = 4
# ChaCha20's block counter is 32 bits: 2**32 blocks of 64 bytes under one key and nonce. One round
# draws at most a few GB; a stream refuses long before the counter could wrap.
MAX_STREAM_BYTES = 2**36

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
    """Uniforms, Gaussians and Bernoulli masks from a ChaCha20 keystream with a secret key.

    Every instance draws its own 256-bit key from the OS CSPRNG, so two instances are independent
    streams (one for noise, one for sampling masks) and none can be recreated later.
    """

    _encryptor: object = field(init=False, repr=False)
    _zeros: bytes = field(default=b"", init=False, repr=False)
    bytes_drawn: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        # A fresh key makes a fixed nonce safe: (key, nonce) is never reused.
        cipher = Cipher(algorithms.ChaCha20(secrets.token_bytes(32), bytes(16)), mode=None)
        self._encryptor = cipher.encryptor()

    def random_bytes(self, n: int) -> bytearray:
        """``n`` bytes of keystream (the encryption of zeros), in a new writable buffer."""
        if self.bytes_drawn + n > MAX_STREAM_BYTES:
            raise RuntimeError(f"a SecureRandom stream must not draw more than {MAX_STREAM_BYTES} "
                               "bytes (ChaCha20's block counter); make a new one")
        if len(self._zeros) < n:  # the plaintext, kept between calls (a step draws the same size)
            self._zeros = bytes(n)
        out = bytearray(n)
        self._encryptor.update_into(memoryview(self._zeros)[:n], out)
        self.bytes_drawn += n
        return out

    def uniform24(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) float32 uniforms in (0, 1): (k + 1/2) / 2**24 for 24-bit k, never 0 or 1."""
        words = torch.frombuffer(self.random_bytes(4 * n), dtype=torch.int32) if n else \
            torch.zeros(0, dtype=torch.int32)
        # int32 >> is arithmetic: the mask keeps the top 24 bits non-negative
        k = (words.to(device) >> 8) & 0xFFFFFF
        return k.to(torch.float32).add_(0.5).mul_(2.0 ** -24)

    def uniform53(self, n: int) -> torch.Tensor:
        """(n,) float64 uniforms in (0, 1) on the CPU, 53-bit resolution."""
        words = torch.frombuffer(self.random_bytes(8 * n), dtype=torch.int64) if n else \
            torch.zeros(0, dtype=torch.int64)
        k = (words >> 11) & ((1 << 53) - 1)
        return k.to(torch.float64).add_(0.5).mul_(2.0 ** -53)

    def standard_normal(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) float32 N(0, 1) draws by Box-Muller (both outputs of each uniform pair are used)."""
        pairs = (n + 1) // 2
        u = self.uniform24(2 * pairs, device)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float32, device=u.device)
        torch.mul(radius, torch.cos(angle), out=out[:pairs])
        torch.mul(radius, angle.sin_(), out=out[pairs:])
        return out[:n]

    def gaussian(self, shape: Sequence[int], std: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 summands: int = NOISE_SUMMANDS) -> torch.Tensor:
        """N(0, std^2) noise of ``shape``: the sum of ``summands`` standard Gaussians per value,
        times std / sqrt(summands) (Opacus' floating-point-attack fix). Fewer than
        NOISE_SUMMANDS only to measure what the fix costs (benchmarks/bench_dp_overhead.py)."""
        numel = math.prod(shape)
        if std == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        draws = self.standard_normal(summands * numel, device).view(summands, numel)
        noise = draws.sum(0).mul_(std / math.sqrt(summands))
        return noise.view(tuple(shape)).to(dtype)

    def bernoulli_mask(self, n: int, rate: float) -> torch.Tensor:
        """(n,) bool: each entry True with probability ``rate`` (Poisson sampling of examples).

        53-bit uniforms: the inclusion probability is ``rate`` to within 2**-53, so the accountant's
        sample rate is the one actually used."""
        return self.uniform53(n) < rate


# Noise values drawn at once (1 MiB of float32): a draw's fixed cost (a dozen tensor operations
# and a cipher call, ~0.15 ms on a busy 2-core machine) is paid once for many steps of small models.
BLOCK_VALUES = 2**18


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
        return cls(noise=SecureRandom(), sampling=SecureRandom())
