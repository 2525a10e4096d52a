"""The one validation of a Config: every key, then every check against a registry or another key.

``validate(cfg)`` runs :data:`CHECKS` in order and raises the first problem as a ConfigError that
names the keys and says what to change. Names are asked of the real registries (tasks.TASKS,
simulations.attacks.ATTACKS, server.aggregation RULE_RECORDS, privacy.accounting.ACCOUNTANTS),
never of copied lists, so a new task, attack, rule or accountant is valid without touching this
module. ``load``, ``from_dict`` and ``from_run_config`` are fedshield.configio's readers followed
by ``validate``: the ways to get a Config from outside data.

Layer: above the math layer (it imports the registries of tasks, attacks, rules, accountants and
central DP), below the apps; the schema and configio import nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedshield import configio
from fedshield.errors import ConfigError
from fedshield.privacy import accounting, secagg
from fedshield.schema import Config
from fedshield.server.aggregation.central_dp_rules import central_dp_config_check, check_secagg
from fedshield.server.aggregation.registry import parse_spec
from fedshield.simulations.attacks import ATTACKS
from fedshield.simulations.attacks.selection import byzantine_count, parse_id_list
from fedshield.tasks.base import TASKS, get_task

Check = Callable[[Config], "str | None"]


def _choice(path: str, value: str, names: Any) -> str | None:
    if value in names:
        return None
    return f"{path} = {value!r} is not valid; choose one of {', '.join(names)}"


def task_names() -> list[str]:
    """The registered task names (the registry fills itself on its first lookup)."""
    try:  # a name no task has: get_task imports (registers) every task module, builds nothing
        get_task("\0")
    except ConfigError:
        pass
    return sorted(TASKS)


def _check_task_name(cfg: Config) -> str | None:
    name = cfg.task.name
    if name.startswith("hf:"):
        if name[3:] and name[3:] == name[3:].strip():
            return None
    elif name in task_names():  # membership only: building a task may load its data (adult)
        return None
    return (f"task.name = {name!r} is out of range; expected one of "
            f"{', '.join(task_names())} or hf:<dataset id>")


def _check_accountants(cfg: Config) -> str | None:
    names = accounting.ACCOUNTANTS
    return (_choice("privacy.accountant", cfg.privacy.accountant, names)
            or _choice("central_dp.accountant", cfg.central_dp.accountant, names))


def attack_names() -> tuple[str, ...]:
    """``"none"`` and every attack of the registry, in its order."""
    return ("none", *ATTACKS)


def _check_attack_name(cfg: Config) -> str | None:
    return _choice("attack.name", cfg.attack.name, attack_names())


def _check_rule(cfg: Config) -> str | None:
    """aggregation.rule, asked of the real rule registry; only its canonical spelling, since other
    checks (SecAgg+, central DP) compare rule names literally."""
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


def _check_attack(cfg: Config) -> str | None:
    a, n = cfg.attack, cfg.federation.num_clients
    try:
        ids = parse_id_list(a.byzantine_ids, n)
    except ConfigError as exc:
        return str(exc)
    if a.name == "none":
        if ids or a.byzantine_fraction > 0:
            return ("attack.name = \"none\" but Byzantine clients are set; choose an attack "
                    f"({', '.join(ATTACKS)}) or set attack.byzantine_fraction = 0 "
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
    return central_dp_config_check(cfg) if cfg.central_dp.enabled else None


def _takes_pixels(name: str) -> bool:
    """Whether a task's inputs are images (not features, nor features computed from images)."""
    if name.startswith("hf:"):
        return True  # not built here (it needs the network); the client checks its data
    task = get_task(name)
    return task.is_image and not task.pixel_shape


def _check_augment(cfg: Config) -> str | None:
    if cfg.train.augment != "none" and not _takes_pixels(cfg.task.name):
        return (f"train.augment = {cfg.train.augment!r} shifts images, and task {cfg.task.name!r} "
                f"takes features, not pixels; set train.augment = \"none\"")
    return None


def _check_task_model(cfg: Config) -> str | None:
    if not cfg.task.model or cfg.task.name.startswith("hf:"):
        return None
    try:
        get_task(cfg.task.name, cfg.task.model)  # builds no model and loads no data
    except ConfigError as exc:
        return f'{exc}; or set task.model = "" (the task\'s default model)'
    return None


def data_poisoning_attacks() -> tuple[str, ...]:
    """Attacks that only poison a client's data (every other one rewrites updates after training,
    from the round's plaintext updates, which do not exist under SecAgg+; backdoor's
    model-replacement boost is such a rewrite)."""
    return tuple(name for name, attack in ATTACKS.items() if attack.kind == "data")


def _check_secagg(cfg: Config) -> str | None:
    """SecAgg+ hands the server only the sum of updates: refuse what needs each client's update."""
    s = cfg.secagg
    if not s.enabled:
        return None
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
    if cfg.attack.name != "none" and cfg.attack.name not in data_poisoning_attacks():
        return (why + f"attack.name = {cfg.attack.name!r} rewrites updates from the round's "
                "individual updates; simulate a data-poisoning attack ("
                + ", ".join(data_poisoning_attacks()) + ") or turn secagg off")
    if cfg.federation.fraction_evaluate > 0:
        return ("secagg.enabled = true: client-side evaluation is not implemented in the SecAgg+ "
                "mode (the server evaluates each round on the test split); set "
                "federation.fraction_evaluate = 0")
    fed = cfg.federation
    sampled = secagg.sample_size(fed.num_clients, fed.fraction_train, fed.min_clients)
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
    if s.quantization_range > secagg.max_quantization_range(sampled):
        return (f"secagg.quantization_range = {s.quantization_range}: the sum of {sampled} "
                f"quantized models would overflow Flower's 2**32 mask modulus; lower it below "
                f"{secagg.max_quantization_range(sampled)}")
    return None


# Every check, in the order their problems are reported: names first, then combinations.
CHECKS: tuple[Check, ...] = (
    _check_task_name, _check_accountants, _check_attack_name,
    _check_rule, _check_min_clients, _check_privacy_source, _check_bound_accountant,
    _check_attack, _check_central_dp, _check_augment, _check_task_model, _check_secagg,
)


def validate(cfg: Config) -> Config:
    """Every key of ``cfg`` (also of a Config built directly) and every check of :data:`CHECKS`:
    returns ``cfg`` or raises ConfigError naming the keys and what to change."""
    configio.check_fields(cfg)
    for check in CHECKS:
        problem = check(cfg)
        if problem:
            raise ConfigError(problem)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """A nested dict (a parsed TOML file) over ``Config()``, validated; or ConfigError."""
    return validate(configio.build(data))


def from_run_config(run_config: dict[str, Any]) -> Config:
    """Flower's flat run config (dotted keys) -> a validated Config."""
    return from_dict(configio.unflatten(dict(run_config)))


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config over ``Config()``, apply ``key=value`` overrides, validate."""
    return from_dict(configio.read_toml(path, overrides))
