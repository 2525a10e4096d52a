"""Config I/O: TOML files, ``--set key=value`` overrides and Flower's flat run config <-> Config.

Everything here is per key: unknown keys, types (ints for floats, Flower's strings for bools) and
each key's declared range (``fedshield.schema`` metadata) are refused with the key's full path.
What needs a registry or another key is ``fedshield.validation``'s; its ``load``, ``from_dict``
and ``from_run_config`` are this module's readers followed by ``validate``, and are the ones to
call: a Config from :func:`build` alone has not been cross-checked.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import tomllib
from pathlib import Path
from typing import Any

from fedshield.errors import ConfigError
from fedshield.schema import INT_MAX, Config

# Control characters (C0, DEL, C1) have no use in any config string, and a name or path holding
# one makes logs, folders and the saved config.toml misleading or unreadable.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def coerce(path: str, value: Any, default: Any, why: str = "") -> Any:
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


# Schema metadata key -> how a value must compare with the bound.
BOUNDS = (("ge", operator.ge), ("gt", operator.gt), ("le", operator.le), ("lt", operator.lt))


def in_range(value: Any, meta: Any) -> bool:
    """Whether ``value`` is inside a field's declared range (schema metadata ge/gt/le/lt/...)."""
    if value in meta.get("also", ()):
        return True
    if not all(meta.get(name) is None or holds(value, meta[name]) for name, holds in BOUNDS):
        return False
    pattern = meta.get("pattern")
    return not pattern or re.fullmatch(pattern, value) is not None


def check_value(path: str, value: Any, meta: Any) -> None:
    """Refuse a (coerced) value outside its field's choices or range, naming the key."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path} = {value!r} is not valid; choose one of {', '.join(choices)}")
    if not in_range(value, meta):
        raise ConfigError(f"{path} = {value!r} is out of range; expected {meta['why']}")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every key of a Config (or one section) built directly, checked as :func:`build` would."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
            continue
        checked = coerce(prefix + f.name, value, f.default, f.metadata.get("why", ""))
        check_value(prefix + f.name, checked, f.metadata)


def _build(cls: type, data: Any, prefix: str, base: Any) -> Any:
    """``base`` (an instance of ``cls``) with the keys of ``data`` coerced, checked, replaced."""
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
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):  # a sub-table: missing keys keep Config()'s values
            kwargs[name] = _build(type(current), data.get(name, {}), path + ".", current)
            continue
        if name not in data:
            continue
        value = coerce(path, data[name], f.default, f.metadata.get("why", ""))
        check_value(path, value, f.metadata)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs)


def build(data: dict[str, Any]) -> Config:
    """A nested dict (a parsed TOML file) over ``Config()``, checked per key only (no
    cross-checks: use ``fedshield.validation.from_dict``)."""
    cfg: Config = _build(Config, data, "", Config())
    return cfg


def section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """One section checked per key (e.g. the ``train`` table a server sends with a round); missing
    keys keep the default run's values (``Config()``'s section named by ``prefix``)."""
    base = getattr(Config(), prefix.rstrip("."), None)
    return _build(cls, data, prefix, base if isinstance(base, cls) else cls())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested tables; refuses a key that is both a value and a table."""
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


def read_toml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A TOML config file as nested tables, with ``key=value`` overrides applied (not checked)."""
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
    return unflatten(flat)


def to_toml(cfg: Config) -> str:
    """Serialise a resolved config (every key; round-trips through ``validation.load``)."""
    lines: list[str] = []
    tree = cfg.to_dict()
    for key, value in tree.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml_string(v: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    out = v.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", out) + '"'


def toml_value(v: Any) -> str:
    """One value as TOML (strings escaped, floats exact)."""
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
    return " ".join(f"{key}={toml_value(value)}" for key, value in cfg.flat().items())


def to_flwr_table(cfg: Config) -> str:
    """The ``[tool.flwr.app.config]`` body for pyproject.toml (``flwr run .`` reads it)."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in cfg.flat().items())
