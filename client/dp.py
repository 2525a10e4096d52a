"""One round of local DP-SGD with Opacus, accounted in the client's persistent ledger.

Each round builds a fresh ``PrivacyEngine``; its accountant records exactly the events of this
round, which are appended to the client's ledger. The cumulative epsilon is recomputed from the
ledger's whole history (every round, every run), so it is right although no engine outlives a round.
The ledger is checked before training (refuse rather than overspend) and written after it.

DP-SGD noise and the Poisson sampling masks come from two secret streams made fresh each round
(privacy/randomness.py), never from the seed, which the server knows: Opacus' optimizer and sampler
are adopted into ``SecureNoise`` / ``SecurePoissonSampler``. ``privacy.reproducible_noise = true``
keeps Opacus' seeded draws (research only; the epsilon then does not hold against the server).
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from itertools import chain, islice

import torch
from fedshield.client.bookkeeping import (
    BookKeepingClipper,
    BookKeepingDPOptimizer,
    supports_bookkeeping,
)
from fedshield.client.training import augmenter, make_optimizer
from fedshield.privacy.accounting import compact
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import check_delta, plan_noise, sample_rate, steps_per_round
from fedshield.privacy.randomness import (
    DPStreams,
    NoiseAhead,
    SecureRandom,
    warn_reproducible_noise,
)
from fedshield.tasks import Split, resolve_device
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedshield.errors import ConfigError
from fedshield.schema import PrivacyConfig, TrainConfig


def dp_compatible(model: nn.Module) -> nn.Module:
    """The model with Opacus-incompatible layers replaced (BatchNorm -> GroupNorm). Apply it where
    the model is built, on server and clients alike, so their state dicts keep the same keys."""
    return ModuleValidator.fix_and_validate(model)


def pick_grad_sample_mode(model: nn.Module) -> str:
    """Fastest correct per-sample-gradient mode for ``model``.

    "bk" (client/bookkeeping.py: one backward pass, Opacus' per-layer rules and ghost norms for
    Linear) whenever Opacus has a rule for every trainable layer; otherwise "hooks" (which falls
    back to functorch for just the unknown layers). Measured on CPU
    (benchmarks/bench_dp_overhead.py) bk beats Opacus' ghost clipping (two backward passes) and
    hooks on MnistCNN and the MLPs.
    """
    return "bk" if supports_bookkeeping(model) else "hooks"


class SecureNoise:
    """Mixin for Opacus' DP optimizers: ``add_noise`` as Opacus', drawing the Gaussian from a
    ``SecureRandom`` instead of a torch.Generator (see ``adopt``)."""

    noise_rng: SecureRandom
    noise_steps: int
    noise_ahead: NoiseAhead | None
    # Opacus' DPOptimizer's, which the class this mixes into provides (annotations only)
    noise_multiplier: float
    max_grad_norm: float
    params: list[torch.nn.Parameter]

    def add_noise(self) -> None:
        """Add the calibrated Gaussian noise to the summed gradients, drawn from ``noise_rng``."""
        # as DPOptimizer(FastGradientClipping).add_noise in Opacus 1.6 (adaptive clipping's
        # multiplier included), with one draw for all parameters (and steps: NoiseAhead)
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        # Opacus sets summed_grad on each parameter at run time; torch's Parameter type lacks it
        sums = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        if not sums:
            return
        for s in sums:
            _check_processed_flag(s)
        sizes = [s.numel() for s in sums]
        if self.noise_ahead is None or self.noise_ahead.per_step != sum(sizes):
            self.noise_ahead = NoiseAhead(self.noise_rng, sum(sizes), self.noise_steps,
                                          sums[0].device)
        noise = self.noise_ahead.step() * (multiplier * self.max_grad_norm)
        for p, s, chunk in zip(self.params, sums, noise.split(sizes), strict=True):
            p.grad = (s + chunk.view_as(s).to(s.device, s.dtype)).view_as(p)
            _mark_as_processed(s)

    @staticmethod
    def adopt(optimizer: DPOptimizer, rng: SecureRandom, steps: int = 1) -> DPOptimizer:
        """``optimizer`` (any Opacus DPOptimizer, BookKeepingDPOptimizer included) drawing its
        noise from ``rng``, ahead for up to ``steps`` steps; nothing else about it changes."""
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"expected an Opacus DPOptimizer, got {type(optimizer).__name__}")
        cls: type = type(optimizer)  # Opacus is untyped: type[Any], which mypy won't hash
        optimizer.__class__ = _secure_class(cls)
        optimizer.noise_rng, optimizer.noise_steps, optimizer.noise_ahead = rng, steps, None
        return optimizer


@functools.cache
def _secure_class(cls: type) -> type:
    if issubclass(cls, SecureNoise):
        return cls
    return type(f"Secure{cls.__name__}", (SecureNoise, cls), {})


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler (each example in each batch with probability sample_rate, for
    ``steps`` batches) drawing its masks from a ``SecureRandom``."""

    rng: SecureRandom

    def __iter__(self):
        for _ in range(self.steps):
            mask = self.rng.bernoulli_mask(self.num_samples, self.sample_rate)
            yield mask.nonzero().reshape(-1).tolist()

    @classmethod
    def adopt(cls, sampler: UniformWithReplacementSampler,
              rng: SecureRandom) -> SecurePoissonSampler:
        """``sampler`` (the one DPDataLoader built) drawing its masks from ``rng``."""
        if type(sampler) is not UniformWithReplacementSampler:
            raise TypeError("expected Opacus' UniformWithReplacementSampler, got "
                            f"{type(sampler).__name__}")
        sampler.__class__ = cls
        sampler.rng = rng
        sampler.generator = None  # nothing seeded is left to draw from
        return sampler


def resolve_noise(privacy_cfg: PrivacyConfig, rate: float, total_steps: int,
                  extra_events: tuple = ()) -> float:
    """The configured noise multiplier, or the one planned to spend target_epsilon over all steps
    together with ``extra_events`` (the client's statistics release)."""
    if privacy_cfg.noise_multiplier > 0:
        return privacy_cfg.noise_multiplier
    if privacy_cfg.target_epsilon > 0:
        return plan_noise(privacy_cfg.target_epsilon, privacy_cfg.delta, rate, total_steps,
                          privacy_cfg.accountant, tuple(extra_events))
    raise ConfigError("privacy: set privacy.noise_multiplier or privacy.target_epsilon (> 0)")


class _PlannedLengthLoader(DataLoader):
    """A loader that claims the planned number of batches per epoch: Opacus derives its Poisson
    rate as 1 / len(loader), and that rate must come from the released (noised) example count,
    not from the exact one (privacy/releases.py)."""

    def __init__(self, *args, batches: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._planned_batches = batches

    def __len__(self) -> int:
        return self._planned_batches


def train_private(model: nn.Module, data: Split, train_cfg: TrainConfig, privacy_cfg: PrivacyConfig,
                  ledger: Ledger, *, total_rounds: int, server_round: int, run_id: str,
                  seed: int = 0, planning_examples: int | None = None,
                  extra_events: tuple = ()) -> dict:
    """Train ``model`` in place for one round of DP-SGD and record the privacy spent.

    ``total_rounds`` is the federation's number of rounds (used to plan sigma from target_epsilon).
    ``seed`` drives augmentation only, unless ``privacy.reproducible_noise`` opts the DP draws in.
    Raises BudgetExhausted before training when the round would exceed ``privacy.max_epsilon``.
    Returns ``{"state_dict": plain state dict (no ``_module.`` prefix), "events": [(noise,
    sample_rate, steps)], "metrics": {...}}``; metrics carry the cumulative epsilon.

    ``planning_examples``: the example count the sample rate, steps, planned noise and gradient
    scale come from (the client's noised released count; default the exact count).
    ``extra_events``: the client's other releases (its histogram, federated evaluation's
    planned ones) that the planned noise must leave room for.
    """
    # A noised count below one batch (small clients, see privacy.stats_noise_multiplier) plans
    # full-batch Poisson sampling, q = 1: still exactly what is accounted.
    n = max(planning_examples, train_cfg.batch_size) if planning_examples else len(data)
    # "delta << 1/n" is about the real data set: the exact count. A refusal tells the server the
    # one bit "n >= 1/delta", never n itself (docs/privacy.md, known limits).
    check_delta(privacy_cfg.delta, len(data), private_count=True)
    rate = sample_rate(n, train_cfg.batch_size)
    planned_steps = steps_per_round(n, train_cfg.batch_size, train_cfg.local_epochs,
                                    train_cfg.max_steps)
    noise = resolve_noise(privacy_cfg, rate, total_rounds * planned_steps, extra_events)
    history = ledger.events()
    # A second release of (run, round) is a new ledger event when its noise is fresh (OS CSPRNG);
    # with noise derived from the run it would repeat the draw, so it is refused.
    repeat_ok = not privacy_cfg.reproducible_noise
    projected = ledger.check([(noise, rate, planned_steps)], run_id=run_id, round=server_round,
                             repeat_ok=repeat_ok)

    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors[0]}; build it through "
                          "fedshield.client.dp.dp_compatible (e.g. BatchNorm -> GroupNorm)")
    mode = privacy_cfg.grad_sample_mode
    if mode == "auto":
        mode = pick_grad_sample_mode(model)

    device = resolve_device(train_cfg.device)
    model.to(device)
    reproducible = privacy_cfg.reproducible_noise
    # Seeded generators only in the research opt-in; otherwise Opacus gets none (both of its
    # draws are replaced by secret streams below).
    generator = torch.Generator().manual_seed(seed) if reproducible else None
    loader = _PlannedLengthLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                                  batch_size=train_cfg.batch_size, generator=generator,
                                  batches=round(1 / rate))
    optimizer = make_optimizer(model, train_cfg)
    with warnings.catch_warnings():
        # Opacus' warning is about its own seeded RNG: replaced below, or opted into and warned
        # about in our words (warn_reproducible_noise).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # said in the docs
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        engine = PrivacyEngine(accountant=privacy_cfg.accountant)
        private = engine.make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=noise, max_grad_norm=privacy_cfg.max_grad_norm, poisson_sampling=True,
            # bk keeps Opacus' ghost-mode optimizer (noise on the clipped sum in p.grad) and
            # replaces its two backward passes; the ghost wrapper's own hooks are removed
            grad_sample_mode="ghost" if mode == "bk" else mode,
            # Opacus draws the noise on the parameters' device, so the generator must live there.
            noise_generator=None if not reproducible else generator if device.type == "cpu" else
            torch.Generator(device=device).manual_seed(seed))
    if mode in ("ghost", "bk"):
        dp_model, dp_optimizer, criterion, dp_loader = private
    else:
        (dp_model, dp_optimizer, dp_loader), criterion = private, nn.CrossEntropyLoss()
    # Opacus divides the noisy sum by int(len(dataset) * rate), a function of the exact count:
    # the same formula on the planning count keeps the released scale private.
    dp_optimizer.expected_batch_size = int(n * rate)
    if dp_loader.sample_rate != rate or len(dp_loader) * train_cfg.local_epochs < planned_steps:
        raise RuntimeError(f"Opacus samples at {dp_loader.sample_rate} for {len(dp_loader)} steps "
                           f"an epoch; the planner assumed {rate} for {planned_steps} steps a "
                           "round")

    clipper = None
    if mode == "bk":
        dp_model.remove_hooks()  # disabled hooks would still wrap every layer in autograd nodes
        clipper = BookKeepingClipper(model, privacy_cfg.max_grad_norm)
        dp_optimizer = BookKeepingDPOptimizer.adopt(dp_optimizer)
    if reproducible:
        warn_reproducible_noise()
    else:  # a fresh secret key per stream, per round: nothing the server knows derives them
        streams = DPStreams.fresh()
        dp_optimizer = SecureNoise.adopt(dp_optimizer, streams.noise, steps=planned_steps)
        SecurePoissonSampler.adopt(dp_loader.batch_sampler, streams.sampling)
    augment = augmenter(train_cfg, seed)  # per example, before clipping: sensitivity unchanged
    steps, loss_sum, seen, started = 0, 0.0, 0, time.perf_counter()
    step_seconds, last = [], started  # per step, batch sampling included (for benchmarks)
    batches = chain.from_iterable(dp_loader for _ in range(train_cfg.local_epochs))
    with warnings.catch_warnings():
        # Opacus' hooks fire on the first layer although inputs need no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for xb, yb in islice(batches, planned_steps):
                xb, yb = augment(xb.to(device)), yb.to(device)
                # bk sets every p.grad afresh: dropping the old ones beats zeroing them
                dp_optimizer.zero_grad(set_to_none=clipper is not None)
                if clipper is not None:
                    loss = clipper.backward(dp_model, xb, yb).mean()
                else:
                    loss = criterion(dp_model(xb), yb)
                    loss.backward()
                dp_optimizer.step()
                steps += 1
                step_seconds.append(time.perf_counter() - last)
                last = time.perf_counter()
                # Poisson batches can be empty (their loss is NaN; the step is still noise)
                if len(yb):
                    loss_sum += float(loss.item()) * len(yb)
                    seen += len(yb)
        finally:
            if clipper is not None:
                clipper.remove()
            dp_model.cleanup()  # remove Opacus hooks so the caller's model is plain again
            model.to("cpu")  # weights travel as CPU arrays
    train_seconds = time.perf_counter() - started
    events = list(engine.accountant.history)  # what Opacus accounted: [(noise, rate, steps)]
    if compact(events) != [(noise, rate, steps)]:
        raise RuntimeError(f"Opacus accounted {events}, training took {steps} steps at {noise}, "
                           f"{rate}")
    # Raises (the update is then never sent) rather than release anything unrecorded.
    ledger.record(events, round=server_round, run_id=run_id, repeat_ok=repeat_ok)
    # Unless another writer or an earlier record of this round intervened, the cumulative epsilon is
    # the one projected before training (PRV costs 0.2-1 s per evaluation, so it is not redone).
    epsilon = projected if ledger.events() == history + compact(events) else ledger.spent()

    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "events": events,
        "metrics": {
            "epsilon": epsilon, "delta": privacy_cfg.delta, "accountant": privacy_cfg.accountant,
            "noise_multiplier": noise, "max_grad_norm": privacy_cfg.max_grad_norm,
            "sample_rate": rate, "steps": steps, "num_examples": n,
            "train_loss": loss_sum / max(seen, 1), "grad_sample_mode": mode,
            "train_seconds": train_seconds,  # the DP-SGD loop alone, without accounting
            # the least disturbed step on a busy machine; the median is the typical one
            "step_seconds_min": min(step_seconds, default=0.0),
            "step_seconds_median": statistics.median(step_seconds) if step_seconds else 0.0,
            "noise_source": "seed" if reproducible else "os-csprng",
        },
    }
