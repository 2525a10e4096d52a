"""Central (user-level) DP, written once for both run modes (plain and SecAgg+).

One mechanism object holds what the accountant's statement depends on: Poisson client sampling at
``q = federation.fraction_train``, clipping in float64, the fixed denominator (the expected
cohort ``q * num_clients``), Gaussian noise of std ``sigma * C`` on the sum, and the epsilon
accounted for exactly that sampling. The math is privacy/central.py's; this class only binds it
to one run's configuration and keeps the noise generator's state for checkpoints.

The plain strategy clips the updates itself (:meth:`CentralDP.aggregate`); under SecAgg+ the
clients clip and the server only sees the sum (:meth:`CentralDP.release`).
"""

from __future__ import annotations

import torch
from fedshield.privacy.central import (
    NoiseSource,
    add_central_noise,
    clip_updates,
    expected_clients,
    fixed_denominator_mean,
    noise_generator,
    poisson_sample,
    sampling_rng,
    user_level_epsilon,
)
from fedshield.server.aggregation import AggregationResult

from fedshield.schema import Config


class CentralDP:
    """The central-DP mechanism of one run: sampler, clipped noisy mean and its accountant."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.central_dp
        self.seed = cfg.seed
        # The Poisson rate the sampler draws with is the rate the accountant uses.
        self.rate = cfg.federation.fraction_train
        self.expected = expected_clients(self.rate, cfg.federation.num_clients)
        self.generator = noise_generator(cfg.central_dp, cfg.seed)  # secret unless opted out

    def sample(self, num_eligible: int, server_round: int) -> list[int]:
        """Positions of this round's cohort: Poisson at q, as accounted, never topped up to
        min_clients (that would raise the inclusion probability above q)."""
        rng = sampling_rng(self.cfg, self.seed, server_round)
        return poisson_sample(num_eligible, self.rate, rng)

    def release(self, clipped_sum: torch.Tensor) -> torch.Tensor:
        """The released update from the sum of clipped updates: over the expected (not actual)
        cohort, plus noise calibrated to one client's contribution C."""
        mean = fixed_denominator_mean(clipped_sum.unsqueeze(0), self.expected)
        return add_central_noise(mean, self.cfg.clip_norm,
                                 self.cfg.noise_multiplier, self.expected, self._noise_source())

    def _noise_source(self) -> NoiseSource:
        """The seeded stream under the reproducible opt-in; else a fresh secret stream per release,
        so no stream ever nears its byte limit (privacy/randomness.py MAX_STREAM_BYTES) in a long
        run, and no key outlives its round."""
        if isinstance(self.generator, torch.Generator):
            return self.generator
        return noise_generator(self.cfg, self.seed)

    def aggregate(self, deltas: torch.Tensor) -> AggregationResult:
        """The noisy clipped mean of ``(n, d)`` client updates (the plain path).

        Config validation allowed only rules that are a mean of clipped updates ("fedavg",
        "clip"), so this replaces the rule: clip with the central-DP bound (float64: norms <= C
        exactly), fixed denominator, noise on the sum."""
        clipped, n_clipped = clip_updates(deltas, self.cfg.clip_norm)
        noisy = self.release(clipped.sum(dim=0))
        # No per-client evidence leaves the DP mechanism; reputation sees screening rejections
        # only.
        suspicion = torch.zeros(len(deltas), dtype=torch.float64)
        return AggregationResult(noisy, suspicion, {"clipped": float(n_clipped)})

    def epsilon(self, rounds: int) -> float:
        """User-level epsilon after ``rounds`` rounds of this mechanism (PLD-floored)."""
        return user_level_epsilon(self.cfg.noise_multiplier, self.rate, rounds, self.cfg.delta,
                                  self.cfg.accountant)

    def state_dict(self) -> torch.Tensor | None:
        """The reproducible generator's state (a checkpoint resumes the same stream); None for
        secret noise: its key never leaves the process, and a resumed run draws fresh noise, so
        a redone round never reuses a released round's draw."""
        if isinstance(self.generator, torch.Generator):
            return self.generator.get_state()
        return None

    def load_state_dict(self, state: torch.Tensor | None) -> None:
        """Restore :meth:`state_dict`'s generator state (nothing to restore for secret noise)."""
        if state is not None and isinstance(self.generator, torch.Generator):
            self.generator.set_state(state)
