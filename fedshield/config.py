"""Experiment configuration: one typed schema, validated on load.

A config is a TOML file with one table per section (``[task]``, ``[train]``, ...). Unknown keys and
out-of-range values are refused with the key's full path, before anything starts. The same keys,
flattened with dots (``train.lr``), are Flower's run config (``[tool.flwr.app.config]``), so
``flwr run .`` and ``fedshield simulate`` read one schema.
"""

from __future__ import annotations

import dataclasses
import math
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


TASK_NAMES = frozenset({"mnist", "mnist5k", "digits", "adult"})


@dataclass
class TaskConfig:
    # mnist (full MNIST, 60k/10k), mnist5k (5,000-digit sample), digits (sklearn 8x8), adult (UCI),
    # hf:<dataset> (flwr-datasets FederatedDataset, needs internet).
    name: str = opt("mnist", lambda v: v in TASK_NAMES or v.startswith("hf:"),
                    f"one of {', '.join(sorted(TASK_NAMES))} or hf:<dataset>")
    # Validation/test examples used by the server each round (0 = the whole test set).
    eval_examples: int = opt(0, non_negative, "an integer >= 0")


@dataclass
class FederationConfig:
    num_clients: int = opt(10, lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]")
    rounds: int = opt(5, lambda v: 1 <= v <= 100_000, "an integer >= 1")
    fraction_train: float = opt(1.0, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
    fraction_evaluate: float = opt(0.0, probability, "a fraction in [0, 1]")
    min_clients: int = opt(2, positive, "an integer >= 1")
    # Seconds the server waits for replies in a round.
    round_timeout: float = opt(600.0, positive, "seconds > 0")
    # inprocess: fedshield's own grid, deterministic, no Ray; ray: Flower's simulation runtime.
    engine: str = opt("inprocess", choices=("inprocess", "ray"))


@dataclass
class PartitionConfig:
    # flwr-datasets partitioners: IidPartitioner, DirichletPartitioner, ShardPartitioner.
    kind: str = opt("dirichlet", choices=("iid", "dirichlet", "shards"))
    alpha: float = opt(0.5, positive, "a concentration > 0 (smaller is more skewed)")
    shards_per_client: int = opt(2, positive, "an integer >= 1")
    min_partition_size: int = opt(10, non_negative, "an integer >= 0")


@dataclass
class TrainConfig:
    lr: float = opt(0.05, positive, "a learning rate > 0")
    momentum: float = opt(0.9, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    weight_decay: float = opt(0.0, non_negative, ">= 0")
    local_epochs: int = opt(1, positive, "an integer >= 1")
    batch_size: int = opt(32, positive, "an integer >= 1")
    # Cap on optimizer steps per round (0 = no cap); keeps slow clients' rounds bounded.
    max_steps: int = opt(0, non_negative, "an integer >= 0")


@dataclass
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
    # Where each client keeps its cumulative privacy ledger.
    ledger_dir: str = opt(".fedshield/ledgers")
    # Opacus per-sample gradient mode: auto picks the fastest correct one for the model.
    grad_sample_mode: str = opt("auto", choices=("auto", "hooks", "ghost", "functorch", "ew"))


@dataclass
class CentralDPConfig:
    """User-level DP at the server: clip each client update, add Gaussian noise to the aggregate."""

    enabled: bool = opt(False)
    noise_multiplier: float = opt(1.0, non_negative, ">= 0")
    clip_norm: float = opt(1.0, positive, "an update clip norm > 0")
    delta: float = opt(1e-5, open_unit, "a probability in (0, 1)")


@dataclass
class AggregationConfig:
    # A rule name, optionally behind pre-aggregation steps: "fedavg", "krum", "bucketing+cclip"...
    rule: str = opt("fedavg")
    # Assumed number of Byzantine clients per round; -1 = derive from byzantine_fraction_assumed.
    f: int = opt(-1, lambda v: v >= -1, "an integer >= 0, or -1 for the default")
    byzantine_fraction_assumed: float = opt(0.2, lambda v: 0.0 <= v < 0.5, "a fraction in [0, 0.5)")
    # How client-reported num-examples weighs updates: robust rules ignore it (uniform).
    weighting: str = opt("auto", choices=("auto", "examples", "uniform"))
    # Server learning rate and momentum applied to the aggregated delta.
    server_lr: float = opt(1.0, positive, "> 0")
    server_momentum: float = opt(0.0, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    # Trimmed mean: fraction of values cut per side per coordinate (0 = cut f per side).
    trim_fraction: float = opt(0.1, lambda v: 0.0 <= v < 0.5, "a fraction in [0, 0.5)")
    bucket_size: int = opt(2, positive, "an integer >= 1")
    cclip_tau: float = opt(10.0, positive, "a clipping radius > 0")
    cclip_iters: int = opt(1, positive, "an integer >= 1")
    clip_norm: float = opt(0.0, non_negative, "a norm bound >= 0 (0 = median of update norms)")
    # Multi-Krum: updates averaged (0 = n - f).
    multikrum_m: int = opt(0, non_negative, "an integer >= 0 (0 = n - f)")
    # Geometric median (smoothed Weiszfeld): iterations and smoothing distance.
    geomed_iters: int = opt(10, positive, "an integer >= 1")
    geomed_eps: float = opt(1e-6, positive, "a smoothing distance > 0")
    # FLAME: Gaussian noise std as a multiple of the clip norm (0.001 in the paper; 0 = off).
    flame_noise: float = opt(0.001, non_negative, ">= 0")


@dataclass
class ScreeningConfig:
    enabled: bool = opt(True)
    # Reject updates whose norm exceeds this multiple of the round's median norm (0 = off).
    max_norm_ratio: float = opt(20.0, non_negative, ">= 0")


@dataclass
class ReputationConfig:
    enabled: bool = opt(True)
    threshold: float = opt(0.5, probability, "a suspicion score in [0, 1]")
    patience: int = opt(3, positive, "rounds above threshold before quarantine, >= 1")


@dataclass
class AttackConfig:
    """Simulated adversaries (simulation only)."""

    name: str = opt("none")
    byzantine_fraction: float = opt(0.0, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
    # Explicit Byzantine partition ids, comma separated ("0,3"); overrides the fraction.
    byzantine_ids: str = opt("")
    scale: float = opt(10.0, positive, "> 0")
    noise_std: float = opt(1.0, positive, "> 0")
    target_label: int = opt(0, non_negative, "a class index")


@dataclass
class DeploymentConfig:
    handoff: bool = opt(True)
    registry_uri: str = opt("sqlite:///.fedshield/registry.db")
    model_name: str = opt("")
    min_accuracy: float = opt(0.0, probability, "an accuracy in [0, 1]")
    max_epsilon: float = opt(0.0, non_negative, ">= 0 (0 = no limit)")


@dataclass
class Config:
    name: str = opt("run")
    seed: int = opt(0, non_negative, "an integer >= 0")
    output_dir: str = opt("runs")
    # Resume from the newest checkpoint in this run folder ("" = start fresh).
    resume: str = opt("")
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
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, the shape of Flower's run config."""
        return flatten(self.to_dict())


# Checks across sections; each returns an error message or None. Other modules append theirs.
CROSS_CHECKS: list[Callable[[Config], str | None]] = []


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


CROSS_CHECKS += [_check_min_clients, _check_privacy_source]


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Accept ints for floats and Flower's string run-config values; refuse anything else."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ConfigError(f"{path}: NaN is not a valid value")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
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
        value = _coerce(path, data[name], f.default)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise ConfigError(f"{path} = {value!r} is not valid; choose one of {', '.join(choices)}")
        if check and not check(value):
            raise ConfigError(f"{path} = {value!r} is out of range; expected {f.metadata['why']}")
        kwargs[name] = value
    return cls(**kwargs)


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


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (a parsed TOML file) into a Config, or raise ConfigError."""
    cfg = _build(Config, data, "")
    for check in CROSS_CHECKS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)
    return cfg


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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    return str(v)
