"""Experiment configuration: one typed schema, validated on load.

A config is a TOML file with one table per section (``[task]``, ``[train]``, ...). Unknown keys and
out-of-range values are refused with the key's full path, before anything starts. The same keys,
flattened with dots (``train.lr``), are Flower's run config (``[tool.flwr.app.config]``), so
``flwr run .`` and ``fedshield simulate`` read one schema.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedshield.errors import ConfigError

Check = Callable[[Any], bool]


def opt(default: Any, check: Check | None = None, why: str = "", choices: tuple = ()) -> Any:
    """A config field with a validity check; ``why`` says what a valid value is."""
    meta = {"check": check, "why": why, "choices": choices}
    return field(default=default, metadata=meta)


def positive(v: Any) -> bool:
    return v > 0


def non_negative(v: Any) -> bool:
    return v >= 0


def probability(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def open_unit(v: Any) -> bool:
    return 0.0 < v < 1.0


# Seeds feed numpy's SeedSequence, torch.manual_seed and Flower: [0, 2**32) is valid for all.
SEED_MAX = 2**32 - 1
# Ints beyond 2**53 do not survive a JSON/float round trip (Flower's run config, metrics).
INT_MAX = 2**53


def seed_range(v: Any) -> bool:
    return 0 <= v <= SEED_MAX


# A run name becomes a folder under output_dir and a part of ledger paths: letters, digits and
# a few marks only, so it can neither escape output_dir nor make the saved config unreadable.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}")


def safe_name(v: Any) -> bool:
    return RUN_NAME.fullmatch(v) is not None and ".." not in v


def known_task(v: Any) -> bool:
    """A task of the real registry (tasks.TASKS), or ``hf:<dataset id or folder>``."""
    if v.startswith("hf:"):
        return bool(v[3:]) and v[3:] == v[3:].strip()
    from tasks.base import TASKS, get_task  # noqa: PLC0415 (tasks import config)

    try:  # a name no task has: get_task imports (registers) every task module, builds nothing
        get_task.__wrapped__("\0")
    except ConfigError:
        pass
    return v in TASKS  # membership only: building a task may load its data (adult)


# The shipped task names, for messages and docs; the check itself asks the registry.
TASK_NAMES = frozenset({"mnist", "mnist5k", "mnist-scattering", "digits", "adult"})
# Tasks whose inputs are features, not pixels: image augmentation makes no sense on them.
FEATURE_TASKS = frozenset({"digits", "adult", "mnist-scattering"})


@dataclass(frozen=True)
class TaskConfig:
    # mnist (full MNIST, 60k/10k), mnist5k (5,000-digit sample), mnist-scattering (MNIST as fixed
    # ScatterNet features, for DP), digits (sklearn 8x8), adult (UCI), hf:<dataset> (flwr-datasets
    # FederatedDataset, needs internet).
    name: str = opt("mnist", known_task,
                    f"one of {', '.join(sorted(TASK_NAMES))} or hf:<dataset id>")
    # Model architecture ("" = the task's default; mnist/mnist5k: "cnn" or "tanh_cnn";
    # mnist-scattering: "scatter_linear" or "scatter_cnn").
    model: str = opt("")
    # Validation/test examples used by the server each round (0 = the whole test set).
    eval_examples: int = opt(0, non_negative, "an integer >= 0")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = opt(10, lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]")
    rounds: int = opt(5, lambda v: 1 <= v <= 100_000, "an integer >= 1")
    fraction_train: float = opt(1.0, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
    fraction_evaluate: float = opt(0.0, probability, "a fraction in [0, 1]")
    min_clients: int = opt(2, positive, "an integer >= 1")
    # Seconds the server waits for replies in a round.
    round_timeout: float = opt(600.0, lambda v: 0 < v <= 7 * 86400, "seconds in (0, 604800]")
    # inprocess: fedshield's own grid, deterministic, no Ray; ray: Flower's simulation runtime.
    engine: str = opt("inprocess", choices=("inprocess", "ray"))


@dataclass(frozen=True)
class PartitionConfig:
    # flwr-datasets partitioners: IidPartitioner, DirichletPartitioner, ShardPartitioner.
    kind: str = opt("dirichlet", choices=("iid", "dirichlet", "shards"))
    alpha: float = opt(0.5, positive, "a concentration > 0 (smaller is more skewed)")
    shards_per_client: int = opt(2, positive, "an integer >= 1")
    min_partition_size: int = opt(10, non_negative, "an integer >= 0")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = opt(0.05, lambda v: 0 < v <= 1000, "a learning rate in (0, 1000]")
    # Client learning rate across rounds: constant, or cosine decay from lr (round 1) towards 0
    # (round federation.rounds); the decay is what lets FedAvg settle past its constant-lr plateau.
    lr_schedule: str = opt("constant", choices=("constant", "cosine"))
    momentum: float = opt(0.9, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    weight_decay: float = opt(0.0, non_negative, ">= 0")
    local_epochs: int = opt(1, lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]")
    batch_size: int = opt(32, lambda v: 1 <= v <= 10_000_000, "an integer in [1, 10000000]")
    # Cap on optimizer steps per round (0 = no cap); keeps slow clients' rounds bounded.
    max_steps: int = opt(0, non_negative, "an integer >= 0")
    # Data augmentation for image tasks: "shift" moves each training image by up to
    # augment_pixels in x and y (a new draw every step); "none" trains on the data as is.
    augment: str = opt("none", choices=("none", "shift"))
    augment_pixels: float = opt(2.0, lambda v: 0 < v <= 64, "a shift in pixels in (0, 64]")
    # auto = CUDA when this machine has a GPU, else CPU.
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))

    def lr_at(self, server_round: int, total_rounds: int) -> float:
        """The learning rate for ``server_round`` (1-based) of ``total_rounds``."""
        if self.lr_schedule == "constant" or total_rounds <= 1:
            return self.lr
        progress = min(max(server_round - 1, 0), total_rounds) / total_rounds
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP on every client (Opacus DP-SGD)."""

    enabled: bool = opt(False)
    # Give exactly one of noise_multiplier or target_epsilon (then the planner calibrates sigma).
    noise_multiplier: float = opt(0.0, non_negative, ">= 0 (0 = calibrate from target_epsilon)")
    target_epsilon: float = opt(0.0, non_negative, ">= 0 (0 = use noise_multiplier)")
    max_grad_norm: float = opt(1.0, positive, "a per-sample clip norm > 0")
    delta: float = opt(1e-5, open_unit, "a probability in (0, 1), below 1/examples")
    accountant: str = opt("prv", choices=("prv", "rdp", "gdp"))
    # Per-client budget; a client refuses to train when a round would exceed it. 0 = no limit.
    max_epsilon: float = opt(0.0, non_negative, ">= 0 (0 = no budget)")
    # Where each client keeps its cumulative privacy ledger (a node may override: ledger-dir).
    ledger_dir: str = opt(".fedshield/ledgers")
    # Whose budget a ledger tracks. federation: the client's data across every run of a federation
    # of this name (partner sites); run: one simulated run (benchmark data re-partitioned each run).
    # auto: federation for nodes with their own data (node config data-path), run otherwise.
    ledger_scope: str = opt("auto", choices=("auto", "run", "federation"))
    # Opacus per-sample gradient mode: auto picks the fastest correct one for the model.
    grad_sample_mode: str = opt("auto", choices=("auto", "bk", "hooks", "ghost", "functorch", "ew"))
    # Research only: derive DP-SGD noise and Poisson sampling from the seed (reproducible, and
    # removable by the server, so the epsilon does not hold against it). Default: secret streams.
    reproducible_noise: bool = opt(False)
    # What a DP client releases besides its update (privacy/releases.py). dp: once per run a
    # Gaussian release of its class histogram, accounted in its ledger; no exact count, loss,
    # quality stat or evaluation metric leaves. exact-outside-guarantee: the exact values are sent,
    # marked as outside the guarantee in replies, metrics and summary. Ignored without DP.
    release_stats: str = opt("dp", choices=("dp", "exact-outside-guarantee"))
    # Noise multiplier of that release (noise std per class count; L2 sensitivity 1). 50 costs
    # eps 0.069 alone at delta 1e-5; planned with the MNIST benchmark's training it raises the
    # DP-SGD noise by 1.0% at eps 0.5, 0.3% at eps 1 and 0.04% at eps 3 (10 raised it by 43% at
    # eps 0.5). A client's noised total has std 50 sqrt(classes).
    stats_noise_multiplier: float = opt(50.0, lambda v: math.isfinite(v) and v > 0,
                                        "a finite noise multiplier > 0")


@dataclass(frozen=True)
class CentralDPConfig:
    """User-level DP at the server: clip each client update, add Gaussian noise to the aggregate."""

    enabled: bool = opt(False)
    noise_multiplier: float = opt(1.0, non_negative, ">= 0")
    clip_norm: float = opt(1.0, positive, "an update clip norm > 0")
    delta: float = opt(1e-5, open_unit, "a probability in (0, 1)")
    # Accountant for the per-client (user-level) epsilon over rounds (floored by PLD).
    accountant: str = opt("prv", choices=("prv", "rdp", "gdp"))
    # Research only: client sampling and central noise from the run seed instead of the OS
    # CSPRNG. The stated epsilon is then not valid against anyone who knows the seed.
    reproducible_noise: bool = opt(False)


@dataclass(frozen=True)
class AggregationConfig:
    # A rule name, optionally behind pre-aggregation steps: "fedavg", "krum", "bucketing+cclip"...
    rule: str = opt("fedavg")  # checked against the rule registry by _check_rule
    # Assumed number of Byzantine clients per round; -1 = derive from byzantine_fraction_assumed.
    f: int = opt(-1, lambda v: v >= -1, "an integer >= 0, or -1 for the default")
    byzantine_fraction_assumed: float = opt(0.2, lambda v: 0.0 <= v < 0.5, "a fraction in [0, 0.5)")
    # How client-reported num-examples weighs updates: robust rules ignore it (uniform).
    weighting: str = opt("auto", choices=("auto", "examples", "uniform"))
    # Server learning rate and momentum applied to the aggregated delta.
    server_lr: float = opt(1.0, positive, "> 0")
    server_momentum: float = opt(0.0, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    # Evaluate and release the exponential moving average of the global models (decay per
    # round; 0 = off). Post-processing: no privacy cost. Clients still train the raw model.
    model_ema: float = opt(0.0, lambda v: 0.0 <= v < 1.0, "a decay in [0, 1) (0 = off)")
    # Trimmed mean: fraction of values cut per side per coordinate (0 = cut f per side).
    trim_fraction: float = opt(0.1, lambda v: 0.0 <= v < 0.5, "a fraction in [0, 0.5)")
    bucket_size: int = opt(2, positive, "an integer >= 1")
    # Centered-clipping radius; 0 = adaptive: the median distance of the round's updates to the
    # center, so half the clients are never clipped whatever the scale of the updates.
    cclip_tau: float = opt(0.0, non_negative, "a clipping radius >= 0 (0 = adaptive)")
    cclip_iters: int = opt(1, positive, "an integer >= 1")
    clip_norm: float = opt(0.0, non_negative, "a norm bound >= 0 (0 = median of update norms)")
    # Multi-Krum: updates averaged (0 = n - f).
    multikrum_m: int = opt(0, non_negative, "an integer >= 0 (0 = n - f)")
    # Geometric median (smoothed Weiszfeld): iterations and smoothing distance.
    geomed_iters: int = opt(10, positive, "an integer >= 1")
    geomed_eps: float = opt(1e-6, positive, "a smoothing distance > 0")
    # FLAME: Gaussian noise std as a multiple of the clip norm (0.001 in the paper; 0 = off).
    flame_noise: float = opt(0.001, non_negative, ">= 0")


@dataclass(frozen=True)
class ScreeningConfig:
    enabled: bool = opt(True)
    # Reject updates whose norm exceeds this multiple of the round's median norm (0 = off).
    max_norm_ratio: float = opt(20.0, non_negative, ">= 0")
    # Reject updates whose L2 norm exceeds this absolute bound, in every round whatever its size.
    # 0 = the default bound derived from the global model's scale (server/screening.py
    # default_norm_bound: 100 x (||global|| + 0.01 sqrt(d))).
    max_norm: float = opt(0.0, non_negative, ">= 0 (0 = derived from the model's scale)")


@dataclass(frozen=True)
class ReputationConfig:
    enabled: bool = opt(True)
    threshold: float = opt(0.5, probability, "a suspicion score in [0, 1]")
    patience: int = opt(3, positive, "rounds above threshold before quarantine, >= 1")
    # Weight of the past in the per-client suspicion moving average (0 = only the latest round).
    decay: float = opt(0.5, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


# Names in simulations.attacks.ATTACKS (a test keeps the two equal; config must not import
# simulations).
ATTACK_NAMES = ("none", "label_flip", "backdoor", "sign_flip", "gaussian", "scaling", "alie", "ipm",
                "minmax", "minsum", "mimic")


@dataclass(frozen=True)
class AttackConfig:
    """Simulated adversaries (simulation only)."""

    name: str = opt("none", choices=ATTACK_NAMES)
    byzantine_fraction: float = opt(0.0, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
    # Explicit Byzantine partition ids, comma separated ("0,3"); overrides the fraction.
    byzantine_ids: str = opt("")
    # Multiplier of the update for scaling, and the model-replacement boost (~num_clients /
    # server_lr) of backdoor (Bagdasaryan et al. 2020).
    scale: float = opt(10.0, positive, "> 0")
    # sign_flip sends -sign_flip_scale * own update (1 = plain sign flipping).
    sign_flip_scale: float = opt(1.0, positive, "> 0")
    noise_std: float = opt(1.0, positive, "> 0")
    target_label: int = opt(0, non_negative, "a class index")
    # Fraction of a backdoor client's local examples that get the trigger and target_label.
    poison_fraction: float = opt(0.3, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
    # ipm sends -ipm_epsilon * mean of honest updates; Xie et al. 2020 use 0.1 (and 100).
    ipm_epsilon: float = opt(0.1, positive, "> 0")
    # alie's z; 0 = Baruch et al. 2019's z_max from the number of clients and Byzantine clients.
    alie_z: float = opt(0.0, non_negative, ">= 0 (0 = from the paper's formula)")
    # minmax/minsum perturbation (Shejwalkar & Houmansadr 2021): inverse std, unit vector or sign.
    minmax_direction: str = opt("std", choices=("std", "unit", "sign"))


# Flower's SecAgg+ masks live in [0, 2**32): the quantized sum of all clients must fit there.
SECAGG_MODULUS = 2**32


@dataclass(frozen=True)
class SecAggConfig:
    """Flower SecAgg+: the server learns only the (weighted) sum of the sampled clients' updates."""

    enabled: bool = opt(False)
    # Shares of each client's mask keys (the client and its num_shares - 1 nearest neighbours hold
    # one each); 0 = every sampled client. Flower needs at least 3.
    num_shares: int = opt(3, lambda v: v == 0 or v >= 3, "an integer >= 3, or 0 for all sampled")
    # Shares needed to remove a dropped client's masks; higher is more private, less
    # dropout-tolerant.
    reconstruction_threshold: int = opt(2, lambda v: v >= 2, "an integer >= 2")
    # Each value of a client's update times num-examples / max_weight is clipped to
    # [-clipping_range, clipping_range] and quantized to quantization_range levels before masking
    # (Flower's defaults).
    clipping_range: float = opt(8.0, positive, "a bound > 0")
    quantization_range: int = opt(4194304, lambda v: 2 <= v < SECAGG_MODULUS,
                                  f"an integer in [2, {SECAGG_MODULUS})")
    # Updates are scaled by num-examples / max_weight before clipping (Flower's weighting); a
    # client whose scaled update would leave the clipping range refuses to train.
    max_weight: float = opt(1000.0, positive, "> 0, at least the largest client's example count")


@dataclass(frozen=True)
class DeploymentConfig:
    handoff: bool = opt(True)
    registry_uri: str = opt("sqlite:///.fedshield/registry.db")
    model_name: str = opt("")
    min_accuracy: float = opt(0.0, probability, "an accuracy in [0, 1]")
    max_epsilon: float = opt(0.0, non_negative, ">= 0 (0 = no limit)")
    # Which run weights to deploy: the last round's or the best-by-validation ones.
    weights: str = opt("final", choices=("final", "best"))
    # Gate: largest |torch - onnxruntime| logit difference accepted on the test inputs.
    parity_tolerance: float = opt(1e-4, positive, "a tolerance > 0")
    # Gate: largest accuracy drop under the run's robustness check (summary.json); 0 = no limit.
    max_accuracy_drop: float = opt(0.0, probability,
                                   "an accuracy difference in [0, 1] (0 = no limit)")
    # Also export an int8 (dynamic quantisation) ONNX model and measure its accuracy.
    quantize: bool = opt(True)
    # Test examples used for the Integrated Gradients explanations in the model card.
    explain_examples: int = opt(64, positive, "an integer >= 1")
    # Drift monitor: examples per window, PSI threshold, windows over threshold before retraining.
    drift_window: int = opt(200, positive, "an integer >= 1")
    drift_threshold: float = opt(0.2, positive, "a PSI threshold > 0 (0.1 small, 0.25 large drift)")
    drift_patience: int = opt(3, positive, "an integer >= 1")
    # Bins per feature of the drift reference histograms, and the Gaussian noise multiplier each
    # client uses for its DP reference histograms (0 = no noise: only for server-held data).
    reference_bins: int = opt(10, lambda v: 2 <= v <= 1000, "an integer in [2, 1000]")
    reference_noise_multiplier: float = opt(1.0, non_negative, ">= 0")


@dataclass(frozen=True)
class Config:
    # Names the run folder inside output_dir (and the clients' ledgers), so it must stay there.
    name: str = opt("run", safe_name, "1-100 letters, digits or _ . + = @ - (not starting with "
                    "'.' or '-', no '..'), e.g. \"my-run\"")
    seed: int = opt(0, seed_range, f"an integer in [0, {SEED_MAX}]")
    output_dir: str = opt("runs")
    # Resume from the newest checkpoint in this run folder ("" = start fresh).
    resume: str = opt("")
    # Start from these global weights (safetensors, e.g. the champion when fine-tuning;
    # "" = random init).
    init_weights: str = opt("")
    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, the shape of Flower's run config."""
        return flatten(self.to_dict())


# Checks across sections; each returns an error message or None. Other modules append theirs.
CROSS_CHECKS: list[Callable[[Config], str | None]] = []


def _check_rule(cfg: Config) -> str | None:
    """aggregation.rule, asked of the real rule registry; only its canonical spelling, since other
    checks (SecAgg+, central DP) compare rule names literally."""
    from server.aggregation.registry import parse_spec  # noqa: PLC0415 (it imports config)

    spec = cfg.aggregation.rule
    try:
        pre, rule = parse_spec(spec)
    except ConfigError as exc:
        return str(exc)
    canonical = "+".join([*pre, rule])
    if spec != canonical:
        return f"aggregation.rule = {spec!r}: write it as {canonical!r} (lower case, no spaces)"
    return None


def _check_min_clients(cfg: Config) -> str | None:
    if cfg.federation.min_clients > cfg.federation.num_clients:
        return (f"federation.min_clients = {cfg.federation.min_clients} exceeds "
                f"federation.num_clients = {cfg.federation.num_clients}; lower min_clients")
    return None


def _check_privacy_source(cfg: Config) -> str | None:
    p = cfg.privacy
    if p.enabled and (p.noise_multiplier > 0) == (p.target_epsilon > 0):
        return ("privacy: give exactly one of privacy.noise_multiplier (> 0) or "
                "privacy.target_epsilon (> 0) when privacy.enabled = true")
    return None


def _check_bound_accountant(cfg: Config) -> str | None:
    # gdp is a CLT approximation: planned or capped with it, a client overspends (3.0 -> 3.60).
    p = cfg.privacy
    if p.enabled and p.accountant == "gdp" and (p.target_epsilon > 0 or p.max_epsilon > 0):
        return ('privacy.accountant = "gdp" is an approximation, not an upper bound (a planned '
                "eps 3.0 really spends 3.60 on the default schedule), so it cannot plan "
                'privacy.target_epsilon or enforce privacy.max_epsilon. Use accountant = "prv"')
    return None


def parse_id_list(text: str, num_clients: int, key: str = "attack.byzantine_ids") -> list[int]:
    """``"0,3"`` -> ``[0, 3]``; ids must be distinct integers in [0, num_clients)."""
    ids = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            ids.append(int(part))
        except ValueError:
            raise ConfigError(f"{key} = {text!r}: {part!r} is not an integer; "
                              'write comma-separated client ids, e.g. "0,3"') from None
    bad = [i for i in ids if not 0 <= i < num_clients]
    if bad:
        raise ConfigError(f"{key} = {text!r}: id {bad[0]} is outside [0, {num_clients}) "
                          f"(federation.num_clients = {num_clients})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key} = {text!r} lists a client twice")
    return ids


def byzantine_count(num_clients: int, fraction: float) -> int:
    # The epsilon keeps 0.29 * 100 at 29 despite float rounding; never more than the fraction says.
    return math.floor(fraction * num_clients + 1e-9)


def _check_attack(cfg: Config) -> str | None:
    a, n = cfg.attack, cfg.federation.num_clients
    try:
        ids = parse_id_list(a.byzantine_ids, n)
    except ConfigError as exc:
        return str(exc)
    if a.name == "none":
        if ids or a.byzantine_fraction > 0:
            return ("attack.name = \"none\" but Byzantine clients are set; choose an attack "
                    f"({', '.join(ATTACK_NAMES[1:])}) or set attack.byzantine_fraction = 0 "
                    "and attack.byzantine_ids = \"\"")
        return None
    if not ids and byzantine_count(n, a.byzantine_fraction) == 0:
        return (f"attack.name = {a.name!r} but no client is Byzantine "
                f"(attack.byzantine_fraction = {a.byzantine_fraction} of {n} clients); raise "
                "attack.byzantine_fraction or list attack.byzantine_ids")
    if len(ids) >= n:
        return "attack: every client would be Byzantine; leave at least one honest client"
    return None


def _check_central_dp(cfg: Config) -> str | None:
    if not cfg.central_dp.enabled:
        return None
    from privacy.central import central_dp_config_check  # noqa: PLC0415 (privacy imports config)

    return central_dp_config_check(cfg)


def _check_augment(cfg: Config) -> str | None:
    if cfg.train.augment != "none" and cfg.task.name in FEATURE_TASKS:
        return (f"train.augment = {cfg.train.augment!r} shifts images, and task {cfg.task.name!r} "
                f"takes features, not pixels; set train.augment = \"none\"")
    return None


def _check_task_model(cfg: Config) -> str | None:
    if not cfg.task.model or cfg.task.name.startswith("hf:"):
        return None
    from tasks import get_task  # noqa: PLC0415 (tasks import config)

    try:
        get_task(cfg.task.name, cfg.task.model)  # builds no model and loads no data
    except ConfigError as exc:
        return str(exc)
    return None


CROSS_CHECKS += [_check_rule, _check_min_clients, _check_privacy_source, _check_bound_accountant,
                 _check_attack, _check_central_dp,
                 _check_augment, _check_task_model]

# Attacks the simulator applies only by poisoning a client's data; every other attack rewrites
# updates after training, from the round's plaintext updates, which do not exist under SecAgg+
# (backdoor's model-replacement boost is such a rewrite).
DATA_POISONING_ATTACKS = ("none", "label_flip")


def secagg_sample_size(fed: FederationConfig) -> int:
    """Clients Flower's legacy FedAvg samples per round (``max(int(n * fraction), min)``)."""
    return min(fed.num_clients, max(int(fed.num_clients * fed.fraction_train), fed.min_clients))


def _check_secagg(cfg: Config) -> str | None:
    """SecAgg+ hands the server only the sum of updates: refuse what needs each client's update."""
    s = cfg.secagg
    if not s.enabled:
        return None
    from privacy.central import check_secagg  # noqa: PLC0415 (privacy imports config)

    try:  # the rules that need individual updates (one list, shared with central DP)
        check_secagg(cfg.aggregation.rule)
    except ConfigError as exc:
        return f"secagg.enabled = true: {exc}"
    why = "secagg.enabled = true: the server only sees the SUM of updates under SecAgg+, but "
    if cfg.aggregation.rule == "clip" and cfg.aggregation.clip_norm <= 0:
        return (why + "aggregation.clip_norm = 0 clips to the median of the clients' update "
                "norms; set aggregation.clip_norm > 0 (clients then clip their own update)")
    if cfg.screening.enabled:
        return (why + "screening.enabled = true checks each client's update; set "
                "screening.enabled = false or turn secagg off")
    if cfg.reputation.enabled:
        return (why + "reputation.enabled = true scores each client's update; set "
                "reputation.enabled = false or turn secagg off")
    if cfg.attack.name not in DATA_POISONING_ATTACKS:
        return (why + f"attack.name = {cfg.attack.name!r} rewrites updates from the round's "
                "individual updates; simulate a data-poisoning attack ("
                + ", ".join(DATA_POISONING_ATTACKS[1:]) + ") or turn secagg off")
    if cfg.federation.fraction_evaluate > 0:
        return ("secagg.enabled = true: client-side evaluation is not implemented in the SecAgg+ "
                "mode (the server evaluates each round on the test split); set "
                "federation.fraction_evaluate = 0")
    sampled = secagg_sample_size(cfg.federation)
    if sampled < 3:
        return (f"secagg.enabled = true needs at least 3 clients per round; {sampled} are sampled "
                "(raise federation.num_clients, fraction_train or min_clients)")
    shares = s.num_shares or sampled
    if shares > sampled:
        return (f"secagg.num_shares = {s.num_shares} exceeds the {sampled} clients sampled per "
                "round (federation.num_clients x fraction_train); lower num_shares or use 0 (all)")
    if s.reconstruction_threshold >= shares:
        return (f"secagg.reconstruction_threshold = {s.reconstruction_threshold} must be below "
                f"the {shares} shares (secagg.num_shares), else no client may drop out; lower it")
    if sampled * s.quantization_range > SECAGG_MODULUS:
        return (f"secagg.quantization_range = {s.quantization_range}: the sum of {sampled} "
                f"quantized models would overflow Flower's 2**32 mask modulus; lower it below "
                f"{SECAGG_MODULUS // sampled}")
    return None


CROSS_CHECKS.append(_check_secagg)


def _check_releases(cfg: Config) -> str | None:
    """Client evaluation sends exact held-out loss and accuracy: under DP only by opt-in."""
    if (cfg.privacy.enabled and cfg.privacy.release_stats == "dp"
            and cfg.federation.fraction_evaluate > 0):
        return ("federation.fraction_evaluate > 0 with privacy.enabled = true: client evaluation "
                "sends exact loss and accuracy on the clients' held-out data, which the DP "
                "guarantee does not cover. Set federation.fraction_evaluate = 0 (the server "
                "evaluates on its test split), or opt in with privacy.release_stats = "
                '"exact-outside-guarantee" (those values are then marked outside the guarantee)')
    return None


CROSS_CHECKS.append(_check_releases)


# Control characters (C0, DEL, C1) have no use in any config string, and a name or path holding
# one makes logs, folders and the saved config.toml misleading or unreadable.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _coerce(path: str, value: Any, default: Any, why: str = "") -> Any:
    """Accept ints for floats and Flower's string run-config values; refuse anything else."""
    kind = type(default)
    expected = f"; expected {why}" if why else ""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_MAX:
                raise ConfigError(f"{path} = {value} is out of range{expected} "
                                  f"(at most 2**53 in any case)")
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # inf/NaN pass every "> 0" check and then break training, accounting or screening
            # silently (every update rejected, epsilon spent): refuse them for every float.
            if not math.isfinite(value):
                raise ConfigError(f"{path} = {value!r} is not a finite number{expected}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            bad = CONTROL.search(value)
            if bad:
                raise ConfigError(f"{path} = {value!r} contains the control character "
                                  f"{bad.group()!r}; remove it")
            return value
    raise ConfigError(f"{path}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} ({where} accepts: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        path = prefix + name
        if f.default_factory is not dataclasses.MISSING:  # a sub-table
            sub_cls = type(f.default_factory())  # type: ignore[misc]
            kwargs[name] = _build(sub_cls, data.get(name, {}), path + ".")
            continue
        if name not in data:
            continue
        value = _coerce(path, data[name], f.default, f.metadata.get("why", ""))
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise ConfigError(f"{path} = {value!r} is not valid; choose one of "
                              f"{', '.join(choices)}")
        if check and not check(value):
            raise ConfigError(f"{path} = {value!r} is out of range; expected {f.metadata['why']}")
        kwargs[name] = value
    return cls(**kwargs)


def section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Validate one section (e.g. the ``train`` table a server sends with a round)."""
    return _build(cls, data, prefix)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is a value, not a table")
        node[leaf] = value
    return tree


def validate(cfg: Config) -> Config:
    """The one entry point for cross-section checks (every ``CROSS_CHECKS`` entry, in order):
    returns ``cfg`` or raises ConfigError naming the keys and what to change."""
    for check in CROSS_CHECKS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (a parsed TOML file) into a Config, or raise ConfigError."""
    return validate(_build(Config, data, ""))


def from_run_config(run_config: dict[str, Any]) -> Config:
    """Flower's flat run config (dotted keys) -> Config."""
    return from_dict(unflatten(dict(run_config)))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set federation.rounds=3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    flat = flatten(data)
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = value
    return from_dict(unflatten(flat))


def to_toml(cfg: Config) -> str:
    """Serialise a resolved config (round-trips through ``load``)."""
    lines: list[str] = []
    tree = cfg.to_dict()
    for key, value in tree.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml_string(v: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    out = v.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    return str(v)


def to_run_config_overrides(cfg: Config) -> str:
    """Every key of ``cfg`` as ``flwr run --run-config "k=v ..."``: the run then does not depend on
    the defaults in pyproject.toml."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in cfg.flat().items())


def to_flwr_table(cfg: Config) -> str:
    """The ``[tool.flwr.app.config]`` body for pyproject.toml (``flwr run .`` reads it)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in cfg.flat().items())


if __name__ == "__main__":  # python -m fedshield.config CONFIG > prints the pyproject table body
    import sys

    print(to_flwr_table(load(sys.argv[1])), end="")
