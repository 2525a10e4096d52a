"""The experiment configuration schema: dataclasses only, one per TOML section.

``Config()`` is ``configs/default.toml`` resolved, key for key (a test keeps the two equal), so
``Config()``, ``fedshield simulate configs/default.toml`` and ``flwr run .`` are one run. A bare
section (``PrivacyConfig()``, ``TrainConfig(lr=0.1)``) is a building block: its own defaults are
neutral (DP off, plain FedAvg, ...), and ``Config``'s fields say which of them the default run
changes.

Each field's metadata states what a valid value is (``why``) and, declaratively, its range
(``ge``/``gt``/``le``/``lt``, ``also`` for extra allowed values, ``choices``, ``pattern``).
Nothing here checks anything: ``fedshield.configio`` coerces and checks single keys, and
``fedshield.validation.validate`` checks keys against the registries and against each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Seeds feed numpy's SeedSequence, torch.manual_seed and Flower: [0, 2**32) is valid for all.
SEED_MAX = 2**32 - 1
# Ints beyond 2**53 do not survive a JSON/float round trip (Flower's run config, metrics).
INT_MAX = 2**53
# Flower's SecAgg+ mask modulus (privacy/secagg.py SECAGG_MODULUS; a test keeps them equal).
SECAGG_MODULUS = 2**32
# A run name becomes a folder under output_dir and a part of ledger paths: letters, digits and a
# few marks only, no "..", so it can neither escape output_dir nor make the saved config unreadable.
RUN_NAME_PATTERN = r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}"


def setting(default: Any, why: str = "", *, choices: tuple[str, ...] = (), ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            also: tuple[int, ...] = (), pattern: str = "") -> Any:
    """A config field: its default and, as data, what values it accepts (``why`` in words)."""
    meta = {"why": why, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "also": also, "pattern": pattern}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TaskConfig:
    """``[task]``: the dataset and model (names from the task registry, tasks.TASKS)."""

    # mnist (full MNIST, 60k/10k), mnist5k (5,000-digit sample), mnist-scattering (MNIST as fixed
    # ScatterNet features, for DP), digits (sklearn 8x8), adult (UCI), hf:<dataset> (flwr-datasets
    # FederatedDataset, needs internet). Checked against the task registry by validation.
    name: str = setting("mnist", "a registered task or hf:<dataset id>")
    # Model architecture ("" = the task's default; mnist/mnist5k: "cnn" or "tanh_cnn";
    # mnist-scattering: "scatter_linear" or "scatter_cnn").
    model: str = setting("")
    # Validation/test examples used by the server each round (0 = the whole test set).
    eval_examples: int = setting(0, "an integer >= 0", ge=0)


@dataclass(frozen=True)
class FederationConfig:
    """``[federation]``: clients, rounds and sampling."""

    num_clients: int = setting(10, "an integer in [1, 10000]", ge=1, le=10_000)
    rounds: int = setting(5, "an integer >= 1", ge=1, le=100_000)
    fraction_train: float = setting(1.0, "a fraction in (0, 1]", gt=0.0, le=1.0)
    fraction_evaluate: float = setting(0.0, "a fraction in [0, 1]", ge=0.0, le=1.0)
    min_clients: int = setting(2, "an integer >= 1", ge=1)
    # Seconds the server waits for replies in a round.
    round_timeout: float = setting(600.0, "seconds in (0, 604800]", gt=0, le=7 * 86400)
    # Seconds between the ServerApp's pulls for replies (server/prompt_grid.py): Flower's own
    # deployment grid sleeps 3 s between pulls; a shorter wait costs the SuperLink one cheap
    # request per interval while a message exchange is open.
    reply_poll_s: float = setting(0.1, "seconds in (0, 3]", gt=0, le=3.0)
    # inprocess: fedshield's own grid, deterministic, no Ray; ray: Flower's simulation runtime.
    engine: str = setting("inprocess", choices=("inprocess", "ray"))
    # In-process engine: persistent worker processes that train the sampled clients in parallel
    # (simulations/workers.py). 0 = one per CPU core, 1 = every client in the runner's process.
    # The same seed gives the same results for any value.
    workers: int = setting(1, "an integer in [0, 1024] (0 = one per CPU core)", ge=0, le=1024)
    # engine = "ray": the cluster to join ("" starts a local Ray instance; "auto" or
    # "host:port" joins one started with `ray start`), and the Ray resources one client takes.
    ray_address: str = setting("", "\"\", \"auto\" or a Ray address host:port",
                               pattern=r"|auto|ray://\S+|[A-Za-z0-9_.\[\]:-]+:[0-9]+")
    ray_client_cpus: float = setting(1.0, "CPUs per client in (0, 1024]", gt=0, le=1024)
    ray_client_gpus: float = setting(0.0, "GPUs per client in [0, 64]", ge=0, le=64)


@dataclass(frozen=True)
class PartitionConfig:
    """``[partition]``: how the benchmark data is split across simulated clients."""

    # flwr-datasets partitioners: IidPartitioner, DirichletPartitioner, ShardPartitioner.
    kind: str = setting("dirichlet", choices=("iid", "dirichlet", "shards"))
    alpha: float = setting(0.5, "a concentration > 0 (smaller is more skewed)", gt=0)
    shards_per_client: int = setting(2, "an integer >= 1", ge=1)
    min_partition_size: int = setting(10, "an integer >= 0", ge=0)


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: local training on each client (the server sends this table every round)."""

    lr: float = setting(0.05, "a learning rate in (0, 1000]", gt=0, le=1000)
    # Client learning rate across rounds: constant, or cosine decay from lr (round 1) towards 0
    # (round federation.rounds); the decay is what lets FedAvg settle past its constant-lr plateau.
    lr_schedule: str = setting("constant", choices=("constant", "cosine"))
    momentum: float = setting(0.9, "in [0, 1)", ge=0.0, lt=1.0)
    weight_decay: float = setting(0.0, ">= 0", ge=0)
    local_epochs: int = setting(1, "an integer in [1, 10000]", ge=1, le=10_000)
    batch_size: int = setting(32, "an integer in [1, 10000000]", ge=1, le=10_000_000)
    # Cap on optimizer steps per round (0 = no cap); keeps slow clients' rounds bounded.
    max_steps: int = setting(0, "an integer >= 0", ge=0)
    # Data augmentation for image tasks: "shift" moves each training image by up to
    # augment_pixels in x and y (a new draw every step); "none" trains on the data as is.
    augment: str = setting("none", choices=("none", "shift"))
    augment_pixels: float = setting(2.0, "a shift in pixels in (0, 64]", gt=0, le=64)
    # auto = CUDA when this machine has a GPU, else CPU.
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))

    def lr_at(self, server_round: int, total_rounds: int) -> float:
        """The learning rate for ``server_round`` (1-based) of ``total_rounds``."""
        if self.lr_schedule == "constant" or total_rounds <= 1:
            return self.lr
        progress = min(max(server_round - 1, 0), total_rounds) / total_rounds
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP on every client (Opacus DP-SGD)."""

    enabled: bool = setting(False)
    # Give exactly one of noise_multiplier or target_epsilon (then the planner calibrates sigma).
    noise_multiplier: float = setting(0.0, ">= 0 (0 = calibrate from target_epsilon)", ge=0)
    target_epsilon: float = setting(0.0, ">= 0 (0 = use noise_multiplier)", ge=0)
    max_grad_norm: float = setting(1.0, "a per-sample clip norm > 0", gt=0)
    delta: float = setting(1e-5, "a probability in (0, 1), below 1/examples", gt=0.0, lt=1.0)
    # One of privacy.accounting.ACCOUNTANTS (checked against it by validation).
    accountant: str = setting("prv")
    # Per-client budget; a client refuses to train when a round would exceed it. 0 = no limit.
    max_epsilon: float = setting(0.0, ">= 0 (0 = no budget)", ge=0)
    # Where each client keeps its cumulative privacy ledger (a node may override: ledger-dir).
    ledger_dir: str = setting(".fedshield/ledgers")
    # Whose budget a ledger tracks. federation: the client's data across every run of a federation
    # of this name (partner sites); run: one simulated run (benchmark data re-partitioned each run).
    # auto: federation for nodes with their own data (node config data-path), run otherwise.
    ledger_scope: str = setting("auto", choices=("auto", "run", "federation"))
    # Opacus per-sample gradient mode: auto picks the fastest correct one for the model.
    grad_sample_mode: str = setting("auto",
                                    choices=("auto", "bk", "hooks", "ghost", "functorch", "ew"))
    # Research only: derive DP-SGD noise and Poisson sampling from the seed (reproducible, and
    # removable by the server, so the epsilon does not hold against it). Default: secret streams.
    reproducible_noise: bool = setting(False)
    # What a DP client releases besides its update (privacy/releases.py). dp: once per run a
    # Gaussian release of its class histogram, accounted in its ledger; no exact count, loss,
    # quality stat or evaluation metric leaves. exact-outside-guarantee: the exact values are sent,
    # marked as outside the guarantee in replies, metrics and summary. Ignored without DP.
    release_stats: str = setting("dp", choices=("dp", "exact-outside-guarantee"))
    # Noise multiplier of that release (noise std per class count; L2 sensitivity 1). 50 costs
    # eps 0.069 alone at delta 1e-5; planned with the MNIST benchmark's training it raises the
    # DP-SGD noise by 1.0% at eps 0.5, 0.3% at eps 1 and 0.04% at eps 3 (10 raised it by 43% at
    # eps 0.5). A client's noised total has std 50 sqrt(classes).
    stats_noise_multiplier: float = setting(50.0, "a finite noise multiplier > 0", gt=0)
    # Federated evaluation under DP (release_stats = "dp"; privacy/releases.py): once per run the
    # held-out count, and per evaluation the correct count and clipped loss sum, each a Gaussian
    # event (eval_noise_multiplier, 1, 1) in the ledger; DP-SGD is planned to leave room for one
    # count and one evaluation per round. 20 raises the planned DP-SGD noise by 1.2% at eps 3 on
    # the default schedule; a released accuracy then has noise std ~ 28 / held-out examples.
    eval_noise_multiplier: float = setting(20.0, "a finite noise multiplier > 0", gt=0)
    # Each held-out example's cross-entropy is clipped to [0, eval_loss_clip] (the loss sum's
    # sensitivity); the released loss is the clipped mean.
    eval_loss_clip: float = setting(4.0, "a loss bound > 0", gt=0)
    # Noise multiplier of the drift-reference release (privacy/reference.py: the monitored
    # features' and labels' histograms, once per run, accounted in the ledger like the class
    # histogram), made when deployment.reference_source = "clients". Noise std per count is
    # sigma x sqrt(features + 1). 20 costs eps 0.17 alone at delta 1e-5 and raises the default
    # run's planned DP-SGD noise by 0.13% (docs/privacy.md, with the reference's accuracy).
    reference_noise_multiplier: float = setting(20.0, "a finite noise multiplier > 0", gt=0)


@dataclass(frozen=True)
class CentralDPConfig:
    """User-level DP at the server: clip each client update, add Gaussian noise to the aggregate."""

    enabled: bool = setting(False)
    noise_multiplier: float = setting(1.0, ">= 0", ge=0)
    clip_norm: float = setting(1.0, "an update clip norm > 0", gt=0)
    delta: float = setting(1e-5, "a probability in (0, 1)", gt=0.0, lt=1.0)
    # Accountant for the per-client (user-level) epsilon over rounds (floored by PLD); one of
    # privacy.accounting.ACCOUNTANTS.
    accountant: str = setting("prv")
    # Research only: client sampling and central noise from the run seed instead of the OS
    # CSPRNG. The stated epsilon is then not valid against anyone who knows the seed.
    reproducible_noise: bool = setting(False)


@dataclass(frozen=True)
class AggregationConfig:
    """``[aggregation]``: the robust rule and its parameters (server/aggregation RULE_RECORDS)."""

    # A rule name, optionally behind pre-aggregation steps: "fedavg", "krum", "bucketing+cclip"...
    # Checked against the rule registry by validation.
    rule: str = setting("fedavg")
    # Assumed number of Byzantine clients per round; -1 = derive from byzantine_fraction_assumed.
    f: int = setting(-1, "an integer >= 0, or -1 for the default", ge=-1)
    byzantine_fraction_assumed: float = setting(0.2, "a fraction in [0, 0.5)", ge=0.0, lt=0.5)
    # How client-reported num-examples weighs updates: robust rules ignore it (uniform).
    weighting: str = setting("auto", choices=("auto", "examples", "uniform"))
    # Server learning rate and momentum applied to the aggregated delta.
    server_lr: float = setting(1.0, "> 0", gt=0)
    server_momentum: float = setting(0.0, "in [0, 1)", ge=0.0, lt=1.0)
    # Evaluate and release the exponential moving average of the global models (decay per
    # round; 0 = off). Post-processing: no privacy cost. Clients still train the raw model.
    model_ema: float = setting(0.0, "a decay in [0, 1) (0 = off)", ge=0.0, lt=1.0)
    # Trimmed mean: fraction of values cut per side per coordinate (0 = cut f per side).
    trim_fraction: float = setting(0.1, "a fraction in [0, 0.5)", ge=0.0, lt=0.5)
    bucket_size: int = setting(2, "an integer >= 1", ge=1)
    # Centered-clipping radius; 0 = adaptive: the median distance of the round's updates to the
    # center, so half the clients are never clipped whatever the scale of the updates.
    cclip_tau: float = setting(0.0, "a clipping radius >= 0 (0 = adaptive)", ge=0)
    cclip_iters: int = setting(1, "an integer >= 1", ge=1)
    clip_norm: float = setting(0.0, "a norm bound >= 0 (0 = median of update norms)", ge=0)
    # Multi-Krum: updates averaged (0 = n - f).
    multikrum_m: int = setting(0, "an integer >= 0 (0 = n - f)", ge=0)
    # Geometric median (smoothed Weiszfeld): iterations and smoothing distance.
    geomed_iters: int = setting(10, "an integer >= 1", ge=1)
    geomed_eps: float = setting(1e-6, "a smoothing distance > 0", gt=0)
    # FLAME: Gaussian noise std as a multiple of the clip norm (0.001 in the paper; 0 = off).
    flame_noise: float = setting(0.001, ">= 0", ge=0)


@dataclass(frozen=True)
class ScreeningConfig:
    """``[screening]``: per-update checks before aggregation."""

    enabled: bool = setting(True)
    # Reject updates whose norm exceeds this multiple of the round's median norm (0 = off).
    max_norm_ratio: float = setting(20.0, ">= 0", ge=0)
    # Reject updates whose L2 norm exceeds this absolute bound, in every round whatever its size.
    # 0 = the default bound derived from the global model's scale (server/screening.py
    # default_norm_bound: 100 x (||global|| + 0.01 sqrt(d))).
    max_norm: float = setting(0.0, ">= 0 (0 = derived from the model's scale)", ge=0)


@dataclass(frozen=True)
class ReputationConfig:
    """``[reputation]``: per-client suspicion scores and quarantine."""

    enabled: bool = setting(True)
    threshold: float = setting(0.5, "a suspicion score in [0, 1]", ge=0.0, le=1.0)
    patience: int = setting(3, "rounds above threshold before quarantine, >= 1", ge=1)
    # Weight of the past in the per-client suspicion moving average (0 = only the latest round).
    decay: float = setting(0.5, "in [0, 1)", ge=0.0, lt=1.0)


@dataclass(frozen=True)
class AttackConfig:
    """Simulated adversaries (simulation only)."""

    # "none" or a name of simulations.attacks.ATTACKS (checked against it by validation).
    name: str = setting("none")
    byzantine_fraction: float = setting(0.0, "a fraction in [0, 1)", ge=0.0, lt=1.0)
    # Explicit Byzantine partition ids, comma separated ("0,3"); overrides the fraction.
    byzantine_ids: str = setting("")
    # Multiplier of the update for scaling, and the model-replacement boost (~num_clients /
    # server_lr) of backdoor (Bagdasaryan et al. 2020).
    scale: float = setting(10.0, "> 0", gt=0)
    # sign_flip sends -sign_flip_scale * own update (1 = plain sign flipping).
    sign_flip_scale: float = setting(1.0, "> 0", gt=0)
    noise_std: float = setting(1.0, "> 0", gt=0)
    target_label: int = setting(0, "a class index", ge=0)
    # Fraction of a backdoor client's local examples that get the trigger and target_label.
    poison_fraction: float = setting(0.3, "a fraction in (0, 1]", gt=0.0, le=1.0)
    # ipm sends -ipm_epsilon * mean of honest updates; Xie et al. 2020 use 0.1 (and 100).
    ipm_epsilon: float = setting(0.1, "> 0", gt=0)
    # alie's z; 0 = Baruch et al. 2019's z_max from the number of clients and Byzantine clients.
    alie_z: float = setting(0.0, ">= 0 (0 = from the paper's formula)", ge=0)
    # minmax/minsum perturbation (Shejwalkar & Houmansadr 2021): inverse std, unit vector or sign.
    minmax_direction: str = setting("std", choices=("std", "unit", "sign"))


@dataclass(frozen=True)
class SecAggConfig:
    """Flower SecAgg+: the server learns only the (weighted) sum of the sampled clients' updates."""

    enabled: bool = setting(False)
    # Shares of each client's mask keys (the client and its num_shares - 1 nearest neighbours hold
    # one each); 0 = every sampled client. Flower needs at least 3.
    num_shares: int = setting(3, "an integer >= 3, or 0 for all sampled", ge=3, also=(0,))
    # Shares needed to remove a dropped client's masks; higher is more private, less
    # dropout-tolerant.
    reconstruction_threshold: int = setting(2, "an integer >= 2", ge=2)
    # Each value of a client's update times num-examples / max_weight is clipped to
    # [-clipping_range, clipping_range] and quantized to quantization_range levels before masking
    # (Flower's defaults).
    clipping_range: float = setting(8.0, "a bound > 0", gt=0)
    quantization_range: int = setting(4194304, f"an integer in [2, {SECAGG_MODULUS})",
                                      ge=2, lt=SECAGG_MODULUS)
    # Updates are scaled by num-examples / max_weight before clipping (Flower's weighting); a
    # client whose scaled update would leave the clipping range refuses to train.
    max_weight: float = setting(1000.0, "> 0, at least the largest client's example count", gt=0)


@dataclass(frozen=True)
class DeploymentConfig:
    """``[deployment]``: the hand-off after the last round (export, card, registry, gates)."""

    handoff: bool = setting(True)
    registry_uri: str = setting("sqlite:///.fedshield/registry.db")
    model_name: str = setting("")
    min_accuracy: float = setting(0.0, "an accuracy in [0, 1]", ge=0.0, le=1.0)
    max_epsilon: float = setting(0.0, ">= 0 (0 = no limit)", ge=0)
    # Which run weights to deploy: the last round's or the best-by-validation ones.
    weights: str = setting("final", choices=("final", "best"))
    # Gate: largest |torch - onnxruntime| logit difference accepted on the test inputs.
    parity_tolerance: float = setting(1e-4, "a tolerance > 0", gt=0)
    # Gate: largest accuracy drop under the run's robustness check (summary.json); 0 = no limit.
    max_accuracy_drop: float = setting(0.0, "an accuracy difference in [0, 1] (0 = no limit)",
                                       ge=0.0, le=1.0)
    # Also export an int8 (dynamic quantisation) ONNX model and measure its accuracy.
    quantize: bool = setting(True)
    # Test examples used for the Integrated Gradients explanations in the model card.
    explain_examples: int = setting(64, "an integer >= 1", ge=1)
    # Drift monitor: examples per window, PSI threshold, windows over threshold before retraining.
    drift_window: int = setting(200, "an integer >= 1", ge=1)
    drift_threshold: float = setting(0.2, "a PSI threshold > 0 (0.1 small, 0.25 large drift)",
                                     gt=0)
    drift_patience: int = setting(3, "an integer >= 1", ge=1)
    # Bins per feature of the drift reference histograms.
    reference_bins: int = setting(10, "an integer in [2, 1000]", ge=2, le=1000)
    # Where the drift reference comes from. clients: each client releases its histograms once per
    # run (under DP noised at privacy.reference_noise_multiplier and accounted in its ledger) and
    # the ServerApp collects them after the last round; server: the server's evaluation split.
    reference_source: str = setting("server", choices=("clients", "server"))


@dataclass(frozen=True)
class TrackingConfig:
    """``[tracking]``: every run (and every grid, its cells as child runs) logged to MLflow
    after it ends: the config as params, per-round metrics, the run folder's files as artifacts
    (deployment/tracking.py). A tracking failure warns and never fails the run."""

    enabled: bool = setting(False)
    # The MLflow tracking store; "" = deployment.registry_uri, so `mlflow ui` on that store shows
    # the tracked runs beside the registered models (a registered version's run IS its run).
    uri: str = setting("", "\"\" or an MLflow tracking URI, e.g. "
                       "\"sqlite:///.fedshield/registry.db\" or \"http://127.0.0.1:5000\"",
                       pattern=r"|[A-Za-z][A-Za-z0-9+.-]*://\S+")
    experiment: str = setting("fedshield", "a non-empty MLflow experiment name",
                              pattern=r"\S.{0,249}")


def _default(section: Any) -> Any:
    """A ``Config`` field whose default is ``section`` (a frozen, hence shareable, instance)."""
    return field(default_factory=lambda: section)


@dataclass(frozen=True)
class Config:
    """One experiment: ``configs/default.toml`` by default (DP ScatterNet MNIST, nnm+cclip)."""

    # Names the run folder inside output_dir (and the clients' ledgers), so it must stay there.
    name: str = setting("default", "1-100 letters, digits or _ . + = @ - (not starting with "
                        "'.' or '-', no '..'), e.g. \"my-run\"", pattern=RUN_NAME_PATTERN)
    seed: int = setting(0, f"an integer in [0, {SEED_MAX}]", ge=0, le=SEED_MAX)
    output_dir: str = setting("runs")
    # Resume from the newest checkpoint in this run folder ("" = start fresh).
    resume: str = setting("")
    # Start from these global weights (safetensors, e.g. the champion when fine-tuning;
    # "" = random init).
    init_weights: str = setting("")
    # Tramer & Boneh's ScatterNet + linear on full MNIST: the most accurate DP model measured.
    task: TaskConfig = _default(TaskConfig(name="mnist-scattering", model="scatter_linear"))
    # Every client evaluates the global model on its held-out data each round (federated
    # evaluation). Under DP its cost is planned for every round whatever the fraction (a client
    # cannot know in advance when it is asked), so a smaller fraction would save no epsilon and
    # only a forward pass per client; all clients give the whole distribution. One worker
    # process per CPU core.
    federation: FederationConfig = _default(FederationConfig(rounds=16, fraction_evaluate=1.0,
                                                             workers=0))
    partition: PartitionConfig = _default(PartitionConfig())
    train: TrainConfig = _default(TrainConfig(lr=2.0, momentum=0.5, batch_size=1024))
    # Every client trains with DP-SGD, planned to spend exactly eps 3 and capped there.
    privacy: PrivacyConfig = _default(PrivacyConfig(enabled=True, target_epsilon=3.0,
                                                    max_epsilon=3.0))
    central_dp: CentralDPConfig = _default(CentralDPConfig())
    # The best worst case over the attacks measured on MNIST (README, robustness).
    aggregation: AggregationConfig = _default(AggregationConfig(rule="nnm+cclip"))
    screening: ScreeningConfig = _default(ScreeningConfig())
    reputation: ReputationConfig = _default(ReputationConfig())
    attack: AttackConfig = _default(AttackConfig())
    secagg: SecAggConfig = _default(SecAggConfig())
    # The drift reference from the clients' DP histograms (server/reference.py).
    deployment: DeploymentConfig = _default(DeploymentConfig(min_accuracy=0.8, max_epsilon=3.0,
                                                             reference_source="clients"))
    # Every run logged to MLflow, in the registry's store (`mlflow ui` shows them).
    tracking: TrackingConfig = _default(TrackingConfig(enabled=True))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, one per section (the shape of the TOML file)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys (``train.lr``), the shape of Flower's run config."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{sub}": v for sub, v in value.items()})
            else:
                out[key] = value
        return out
