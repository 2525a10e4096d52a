"""``fedshield privacy audit``: attack what the server sees and compare with the accountant.

Three attacks, each through the project's own training code (client/dp.py ``train_private`` for
DP-SGD, client/training.py ``train_local`` without DP, tasks/ for data and models):

- **One-run canary audit** (white box, the server as adversary). The audited client's data get m
  canaries, each included with probability 1/2. Canary k is the input ``CANARY_SCALE * e_(d+k)``
  on a linear model over the task's features plus m canary features that real data leave at 0, so
  only canary k moves weight column d+k: a data-borne "Dirac" gradient canary whose clipped
  gradient puts ~99.5% of its norm on coordinates nothing else touches (the worst case for DP-SGD).
  The adversary sees every round's update (it sent the global weights) and scores canary k by the
  update on its column along the canary's gradient direction. Two adversaries:
  ``update`` (sees the update only) and ``seed-replay`` (also knows the run seed, as the server
  does: it replays the client's seeded training on all-zero data, whose gradients never touch the
  canary columns, to regenerate the noise and subtract it). With reproducible (seeded) noise the
  replay removes the noise exactly and the bound exceeds the stated epsilon; with noise from a
  secret source it must not.
- **Membership inference** on the final model: loss threshold and LiRA (online, global variance)
  with a few shadow models trained the same way on the server-known data distribution.
- **Gradient inversion** ("inverting gradients", Geiping et al. 2020: cosine distance + total
  variation, box-constrained) of one client update on a small batch, with and without DP.

The orchestration trains one client directly for ``federation.rounds`` rounds (the global model of
each round is the client's previous one: a one-client federation); what the server would see of
this client is its update each round, which is exactly what is attacked.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from fedshield.client.data import load_client_data
from fedshield.client.training import train_local
from fedshield.privacy import audit
from fedshield.privacy.accounting import SAMPLE_LEVEL
from fedshield.privacy.ledger import atomic_write_json
from fedshield.tasks import Split, task_for
from fedshield.tasks.models import mlp
from flwr.app import Context, RecordDict
from torch import nn

from fedshield import configio, schema
from fedshield.errors import ConfigError
from fedshield.run_records import SUMMARY_FILE

CANARY_SCALE = 10.0  # canary input value: its gradient norm is 99.5% on its own column
FPRS = (1e-3, 1e-2)
ADVERSARIES = ("update", "seed-replay")


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed a client trains a round with (as client/app.py ``fit_locally`` derives it): known to
    the server, which knows the run seed, the round and the partition id."""
    return int(np.random.SeedSequence([run_seed, server_round, partition_id]).generate_state(1)[0])


def noise_is_reproducible(privacy_cfg: schema.PrivacyConfig) -> bool:
    """Whether DP-SGD noise comes from the seed (the server can regenerate it). Before the
    secure-randomness change every run is seeded; after it only ``privacy.reproducible_noise``."""
    return bool(getattr(privacy_cfg, "reproducible_noise", True))


@dataclass(frozen=True)
class CanaryAudit:
    """One adversary's one-run canary bound next to the audited training's stated epsilon."""

    adversary: str
    bound: audit.AuditBound
    canaries_included: int
    stated_epsilon: float  # the accountant's (inf without DP)
    delta: float
    accountant: str
    noise_multiplier: float
    rounds: int
    num_examples: int  # the client's examples, canaries included
    noise_reproducible: bool

    def to_dict(self) -> dict:
        """Plain dict with the bound's epsilon also as ``empirical_epsilon``."""
        out = asdict(self)
        out["bound"] = self.bound.to_dict()
        out["empirical_epsilon"] = self.bound.epsilon
        return out


@dataclass(frozen=True)
class MembershipInference:
    """One membership-inference attack's scores on the final model."""

    attack: str  # "loss" or "lira"
    auc: float
    tpr_at_fpr: dict[str, float]
    members: int
    nonmembers: int
    shadows: int
    stated_epsilon: float

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready but for an infinite stated epsilon)."""
        return asdict(self)


@dataclass(frozen=True)
class Inversion:
    """Gradient inversion of one update: reconstruction quality against the data-mean baseline."""

    private: bool
    batch: int
    mse: float
    psnr: float
    baseline_psnr: float  # the per-feature data mean as the "reconstruction": what no attack gets
    noise_multiplier: float
    iterations: int

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready but for an infinite stated epsilon)."""
        return asdict(self)


@dataclass(frozen=True)
class AuditReport:
    """Every attack's results for one audited client."""

    task: str
    client: int
    canary: list[CanaryAudit] = field(default_factory=list)
    membership: list[MembershipInference] = field(default_factory=list)
    inversion: list[Inversion] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict of every result."""
        return {"task": self.task, "client": self.client,
                "canary": [c.to_dict() for c in self.canary],
                "membership": [m.to_dict() for m in self.membership],
                "inversion": [i.to_dict() for i in self.inversion]}


# -- shared plumbing -------------------------------------------------------------------------


def client_split(cfg: schema.Config, client: int) -> Split:
    """The audited client's local training data, exactly as its ClientApp loads it."""
    if not 0 <= client < cfg.federation.num_clients:
        raise ConfigError(f"--client {client} is not a partition id in [0, "
                          f"{cfg.federation.num_clients}); pick one of the federation's clients")
    context = Context(run_id=0, node_id=client, state=RecordDict(), run_config={},
                      node_config={"partition-id": client,
                                   "num-partitions": cfg.federation.num_clients})
    _, train, _ = load_client_data(context, cfg)
    return train


class _Trainer:
    """One client's rounds, private or not, each with its own throwaway ledger (the audit measures
    the mechanism; it must not spend a real client's budget)."""

    def __init__(self, cfg: schema.Config, client: int, ledger_dir: Path, name: str,
                 privacy_cfg: schema.PrivacyConfig | None = None) -> None:
        self.cfg, self.client = cfg, client
        self.privacy = privacy_cfg or cfg.privacy
        # Canary and replay inputs are not images: no augmentation (it would also draw randomness).
        self.train_cfg = replace(cfg.train, augment="none")
        self.ledger = None
        if self.privacy.enabled:
            from fedshield.privacy.ledger import Ledger

            self.ledger = Ledger.for_client(ledger_dir, f"audit-{name}", client,
                                            self.privacy.delta, self.privacy.accountant, 0.0)
        self.last: dict = {}

    def round(self, model: nn.Module, data: Split, server_round: int, rounds: int) -> None:
        train_cfg = replace(self.train_cfg, lr=self.train_cfg.lr_at(server_round, rounds))
        seed = client_seed(self.cfg.seed, server_round, self.client)
        if self.ledger is None:
            self.last = train_local(model, data, train_cfg, seed)
            return
        from fedshield.client.dp import train_private  # Opacus only when DP is on

        self.last = train_private(model, data, train_cfg, self.privacy, self.ledger,
                                  total_rounds=rounds, server_round=server_round, run_id="audit",
                                  seed=seed)["metrics"]

    @property
    def stated(self) -> tuple[float, float]:
        """(epsilon spent so far, noise multiplier); (inf, 0) without DP."""
        if self.ledger is None:
            return math.inf, 0.0
        return float(self.last["epsilon"]), float(self.last["noise_multiplier"])


# -- one-run canary audit ----------------------------------------------------------------------


def _canary_model(features: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # initialisation is seeded in fedshield; the adversary knows it anyway
    return mlp(features, classes, hidden=())


def _weight(model: nn.Module) -> torch.Tensor:
    """The weight of the canary model's one layer (mlp with hidden=(): Sequential(Linear))."""
    return cast(nn.Linear, cast(nn.Sequential, model)[0]).weight


def _canary_directions(model: nn.Module, canary_x: torch.Tensor, canary_y: torch.Tensor,
                       first: int) -> np.ndarray:
    """(classes, m): minus each canary's loss gradient on its own weight column, unit length:
    where an SGD step on canary k moves column first + k."""
    weight = _weight(model)
    loss = nn.functional.cross_entropy(model(canary_x), canary_y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [weight])
    cols = -grad[:, first:].double().numpy()  # canary k's gradient touches only column first + k
    return cols / np.maximum(np.linalg.norm(cols, axis=0, keepdims=True), 1e-12)


def _columns(model: nn.Module, first: int) -> np.ndarray:
    return _weight(model).detach()[:, first:].double().numpy().copy()


def canary_audit(cfg: schema.Config, canaries: int = 1000, client: int = 0,
                 adversaries: tuple[str, ...] | None = None, audit_seed: int | None = None,
                 workdir: str | Path | None = None) -> list[CanaryAudit]:
    """Train the client with ``canaries`` canaries for ``federation.rounds`` rounds and bound
    epsilon from each adversary's guesses. ``adversaries`` defaults to ``update``, plus
    ``seed-replay`` when the noise is reproducible from the seed (the server's real capability)."""
    if canaries < 2:
        raise ConfigError(f"--canaries {canaries}: the audit needs at least 2 (hundreds or more)")
    if adversaries is None:
        adversaries = ADVERSARIES if (cfg.privacy.enabled
                                      and noise_is_reproducible(cfg.privacy)) else ("update",)
    unknown = sorted(set(adversaries) - set(ADVERSARIES))
    if unknown:
        raise ConfigError(f"unknown adversary {unknown[0]!r}; choose from {', '.join(ADVERSARIES)}")
    if "seed-replay" in adversaries and not cfg.privacy.enabled:
        raise ConfigError("the seed-replay adversary removes DP noise: it needs privacy.enabled")
    task = task_for(cfg.task)
    real = client_split(cfg, client)
    x = real.x.reshape(len(real), -1).astype(np.float32)
    d, m = x.shape[1], canaries
    # The auditor's coins: secret from the training (fresh entropy unless a test fixes them).
    rng = np.random.default_rng(audit_seed)
    included = rng.random(m) < 0.5
    canary_y = rng.integers(task.num_classes, size=m)
    canary_x = np.zeros((m, d + m), dtype=np.float32)
    canary_x[np.arange(m), d + np.arange(m)] = CANARY_SCALE
    data = Split(np.concatenate([np.hstack([x, np.zeros((len(x), m), np.float32)]),
                                 canary_x[included]]),
                 np.concatenate([real.y, canary_y[included]]).astype(np.int64))
    # What the seed-knowing server replays: same size (same Poisson draws), zero inputs (no
    # gradient on any canary column), so those columns of its update are the noise alone.
    zeros = Split(np.zeros_like(data.x), np.zeros_like(data.y))
    rounds = cfg.federation.rounds
    cx, cy = torch.from_numpy(canary_x), torch.from_numpy(canary_y.astype(np.int64))

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        trainer = _Trainer(cfg, client, Path(tmp), "canary")
        replayer = _Trainer(cfg, client, Path(tmp), "replay")
        model = _canary_model(d + m, task.num_classes, cfg.seed)
        scores = {a: np.zeros(m) for a in adversaries}
        for r in range(1, rounds + 1):
            start = {k: v.clone() for k, v in model.state_dict().items()}
            direction = _canary_directions(model, cx, cy, d)
            before = _columns(model, d)
            trainer.round(model, data, r, rounds)
            update = _columns(model, d) - before
            if "update" in scores:
                scores["update"] += np.einsum("cm,cm->m", update, direction)
            if "seed-replay" in scores:
                replay = _canary_model(d + m, task.num_classes, cfg.seed)
                replay.load_state_dict(start)
                replayer.round(replay, zeros, r, rounds)
                noise = _columns(replay, d) - before
                scores["seed-replay"] += np.einsum("cm,cm->m", update - noise, direction)
        stated, sigma = trainer.stated
    return [CanaryAudit(a, audit.one_run_audit(scores[a], included, cfg.privacy.delta),
                        int(included.sum()), stated, cfg.privacy.delta, cfg.privacy.accountant,
                        sigma, rounds, len(data), noise_is_reproducible(cfg.privacy))
            for a in adversaries]


# -- membership inference -----------------------------------------------------------------------


@torch.no_grad()
def _confidences(model: nn.Module, data: Split) -> tuple[np.ndarray, np.ndarray]:
    """(LiRA statistic, per-example loss) of ``model`` on ``data``."""
    model.eval()
    logits = model(torch.from_numpy(data.x)).double()
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(data.y), reduction="none")
    return audit.logit_confidence(logits.numpy(), data.y), loss.numpy()


def membership_inference(cfg: schema.Config, shadows: int = 4, pool_size: int = 2000,
                         audit_seed: int | None = None,
                         workdir: str | Path | None = None) -> list[MembershipInference]:
    """Train a target on a random half of a pool from the task's data and ``shadows`` shadows on
    other random halves (the server knows the data distribution), all as the client would train
    (``federation.rounds`` rounds, DP-SGD when privacy is on); attack the target's final model."""
    if shadows < 2:
        raise ConfigError(f"--shadows {shadows}: LiRA needs at least 2 shadow models")
    task = task_for(cfg.task)
    train, test = task.load()
    rng = np.random.default_rng(audit_seed)
    pool_x = np.concatenate([train.x, test.x])
    pool_y = np.concatenate([train.y, test.y])
    pick = rng.permutation(len(pool_y))[:pool_size]
    pool = Split(pool_x[pick], pool_y[pick])
    half = len(pool) // 2  # every model trains on exactly half: one noise plan for all

    def trained_on(mask: np.ndarray, model_id: int, tmp: Path) -> tuple[nn.Module, float]:
        torch.manual_seed(int(rng.integers(2**31)))
        model = task.build_model()
        # Each model trains as its own client id, so no two share their (seeded) training draws.
        trainer = _Trainer(cfg, model_id, tmp, f"mia-{model_id}")
        for r in range(1, cfg.federation.rounds + 1):
            trainer.round(model, pool.subset(np.flatnonzero(mask)), r, cfg.federation.rounds)
        return model, trainer.stated[0]

    def random_half() -> np.ndarray:
        mask = np.zeros(len(pool), dtype=bool)
        mask[rng.permutation(len(pool))[:half]] = True
        return mask

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        target_in = random_half()
        target, stated = trained_on(target_in, 0, Path(tmp))
        target_phi, target_loss = _confidences(target, pool)
        inside = np.stack([random_half() for _ in range(shadows)])
        shadow_phi = np.stack([_confidences(trained_on(inside[k], k + 1, Path(tmp))[0], pool)[0]
                               for k in range(shadows)])
    results = []
    for name, score in (("loss", -target_loss),
                        ("lira", audit.lira_scores(target_phi, shadow_phi, inside))):
        members, nonmembers = score[target_in], score[~target_in]
        results.append(MembershipInference(
            name, audit.roc_auc(members, nonmembers),
            {f"{f:g}": audit.tpr_at_fpr(members, nonmembers, f) for f in FPRS},
            int(target_in.sum()), int((~target_in).sum()), shadows if name == "lira" else 0,
            stated))
    return results


# -- gradient inversion ---------------------------------------------------------------------------


def _total_variation(x: torch.Tensor, side: int) -> torch.Tensor:
    img = x.reshape(len(x), side, side)
    return ((img[:, 1:, :] - img[:, :-1, :]).abs().mean()
            + (img[:, :, 1:] - img[:, :, :-1]).abs().mean())


def invert_gradient(model: nn.Module, observed: list[torch.Tensor], labels: torch.Tensor,
                    shape: tuple[int, ...], bounds: tuple[float, float], iterations: int,
                    tv_weight: float, seed: int) -> torch.Tensor:
    """Inputs whose batch gradient points where ``observed`` does (1 - cosine over all parameters,
    plus total variation), Adam inside the data's box. Labels are taken as known (as Geiping et
    al. assume; they can be read off the last layer's gradient for small batches)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    guess = (lo + (hi - lo) * torch.rand((len(labels), *shape), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([guess], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [iterations // 2, 3 * iterations // 4], 0.1)
    flat_obs = torch.cat([g.reshape(-1) for g in observed])
    params = [p for p in model.parameters() if p.requires_grad]
    numel = int(np.prod(shape))
    side = math.isqrt(numel)
    for _ in range(iterations):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(guess), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        objective = 1 - nn.functional.cosine_similarity(flat, flat_obs, dim=0)
        if tv_weight > 0 and side * side == numel:
            objective = objective + tv_weight * _total_variation(guess, side)
        objective.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            guess.clamp_(lo, hi)
    return guess.detach()


def gradient_inversion(cfg: schema.Config, batch: int = 4, client: int = 0, iterations: int = 300,
                       tv_weight: float = 1e-2, audit_seed: int | None = None,
                       workdir: str | Path | None = None) -> list[Inversion]:
    """Invert the client's round-1 update on a batch of ``batch`` of its examples: one local step
    on the task's model from its seeded initialisation, without DP and (when privacy is on) with
    DP-SGD at the noise multiplier the client's real schedule uses."""
    task = task_for(cfg.task)
    real = client_split(cfg, client)
    if batch < 1 or batch > len(real):
        raise ConfigError(f"--inversion-batch {batch} must be in [1, {len(real)}]")
    rng = np.random.default_rng(audit_seed)
    secret = real.subset(np.sort(rng.permutation(len(real))[:batch]))
    step = replace(cfg.train, batch_size=batch, local_epochs=1, max_steps=1, weight_decay=0.0,
                   augment="none")
    shape = tuple(real.x.shape[1:])
    bounds = (float(real.x.min()), float(real.x.max()))
    data_range = bounds[1] - bounds[0]
    baseline = audit.psnr(float(np.mean((secret.x - real.x.mean(0)) ** 2)), data_range)
    settings = [(False, schema.PrivacyConfig())]
    if cfg.privacy.enabled:
        settings.append((True, replace(cfg.privacy, noise_multiplier=_client_noise(cfg, len(real)),
                                       target_epsilon=0.0, max_epsilon=0.0)))
    out = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for private, privacy in settings:
            torch.manual_seed(cfg.seed)
            model = task.build_model()
            if private:
                from fedshield.client.dp import dp_compatible

                model = dp_compatible(model)
            start = [p.detach().clone() for p in model.parameters()]
            trainer = _Trainer(replace(cfg, train=step), client, Path(tmp),
                               f"inversion-{private}", privacy)
            trainer.round(model, secret, 1, 1)
            # The server sent `start` and knows the lr: one SGD step's update is -lr * gradient.
            observed = [(s - p.detach()) / step.lr
                        for s, p in zip(start, model.parameters(), strict=True)]
            with torch.no_grad():
                for p, s in zip(model.parameters(), start, strict=True):
                    p.copy_(s)
            recon = invert_gradient(model, observed, torch.from_numpy(secret.y), shape, bounds,
                                    iterations, tv_weight, seed=int(rng.integers(2**31)))
            mse = float(np.mean(audit.matched_mse(secret.x, recon.numpy())))
            out.append(Inversion(private, batch, mse, audit.psnr(mse, data_range), baseline,
                                 trainer.stated[1], iterations))
    return out


def _client_noise(cfg: schema.Config, n: int) -> float:
    """The noise multiplier the client uses per step over its real schedule."""
    from fedshield.client.dp import resolve_noise
    from fedshield.privacy.planner import sample_rate, steps_per_round

    t = cfg.train
    rate = sample_rate(n, t.batch_size)
    steps = steps_per_round(n, t.batch_size, t.local_epochs, t.max_steps)
    return resolve_noise(cfg.privacy, rate, cfg.federation.rounds * steps)


ATTACKS = ("canary", "mia", "inversion")


def run_audit(cfg: schema.Config, canaries: int = 1000, client: int = 0, shadows: int = 4,
              attacks: tuple[str, ...] = ATTACKS, audit_seed: int | None = None,
              inversion_batch: int = 4, inversion_iterations: int = 300) -> AuditReport:
    """Every requested attack on ``cfg``'s training, as one report."""
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown or not attacks:
        raise ConfigError(f"--attacks: choose from {', '.join(ATTACKS)} (got "
                          f"{', '.join(unknown) or 'none'})")
    return AuditReport(
        cfg.task.name, client,
        canary=canary_audit(cfg, canaries, client, audit_seed=audit_seed)
        if "canary" in attacks else [],
        membership=membership_inference(cfg, shadows, audit_seed=audit_seed)
        if "mia" in attacks else [],
        inversion=gradient_inversion(cfg, inversion_batch, client, inversion_iterations,
                                     audit_seed=audit_seed) if "inversion" in attacks else [])


# -- the record a run folder keeps (its model card shows it) ----------------------------------

def procedure(report: AuditReport, cfg: schema.Config) -> str:
    """What was audited, in words the card prints."""
    training = "DP-SGD" if cfg.privacy.enabled else "training (no DP)"
    parts = []
    if report.canary:
        parts.append(
            f"one-run canary audit (Steinke, Nasr & Jagielski 2023) of client {report.client}'s "
            f"{training} with this config's settings, schedule ({cfg.federation.rounds} rounds) "
            "and data, in a separate training: a linear model over the task's features plus "
            f"{report.canary[0].bound.canaries} canary features, each Dirac canary included with "
            "probability 1/2; the adversary sees the client's update every round")
    if report.membership:
        parts.append("membership inference on the final model of a separate training on half "
                     "of the task's data, with shadow models")
    if report.inversion:
        parts.append(f"gradient inversion of client {report.client}'s first update")
    return "; ".join(parts) + ". Throwaway ledgers: no client budget is spent"


def audit_record(report: AuditReport, cfg: schema.Config) -> audit.AuditRecord:
    """``report`` as the record a run folder keeps, with the digest of ``cfg``'s mechanism."""
    table = tomllib.loads(configio.to_toml(cfg))  # what the run's config.toml holds for this cfg
    return audit.AuditRecord(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        mechanism_digest=audit.mechanism_digest(table), task=report.task, client=report.client,
        # The audit trains its own model: the run's (handed-off) model never sees a canary.
        canaries_in_released_model=False, procedure=procedure(report, cfg),
        canary=tuple({**c.to_dict(), "unit": SAMPLE_LEVEL} for c in report.canary),
        membership=tuple(m.to_dict() for m in report.membership),
        inversion=tuple(i.to_dict() for i in report.inversion))


def write_run_audit(run_dir: str | Path, report: AuditReport, cfg: schema.Config) -> Path:
    """Write ``run_dir/audit.json`` (atomically); the run's model card reads it."""
    run = Path(run_dir)
    if not (run / SUMMARY_FILE).is_file():
        raise ConfigError(f"--run-dir {run}: no summary.json there; pass the folder of a finished "
                          "run (runs/<name>)")
    path = run / audit.AUDIT_JSON
    atomic_write_json(path, json.loads(audit_record(report, cfg).to_json()))
    return path


__all__ = ["AuditReport", "CanaryAudit", "Inversion", "MembershipInference", "canary_audit",
           "audit_record", "client_seed", "gradient_inversion", "membership_inference", "run_audit",
           "write_run_audit"]
