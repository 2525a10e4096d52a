"""One-off codemod: fedshield.config (removed) -> fedshield.schema / configio / validation.

Rewrites ``from fedshield.config import ...`` lines and ``fcfg.X`` / ``fconfig.X`` uses of
``from fedshield import config as fcfg`` in the given files (default: every tracked .py file), so
a branch written against fedshield.config still imports after the split. Idempotent; prints the
files it changed. Per file, not per function: each aliased import line (also a function-level one)
gets every module the file uses through the alias; ruff's F401 then names any left unused.
Delete once no branch imports fedshield.config.

    python .ci/migrate_config_imports.py [FILE ...]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCHEMA = {"Config", "TaskConfig", "FederationConfig", "PartitionConfig", "TrainConfig",
          "PrivacyConfig", "CentralDPConfig", "AggregationConfig", "ScreeningConfig",
          "ReputationConfig", "AttackConfig", "SecAggConfig", "DeploymentConfig", "SEED_MAX",
          "INT_MAX"}
CONFIGIO = {"flatten", "unflatten", "to_toml", "to_run_config_overrides", "to_flwr_table",
            "section", "parse_override", "toml_value", "build"}
VALIDATION = {"load", "from_dict", "from_run_config", "validate"}
RENAMED = {"_toml_value": "toml_value"}
# name -> (module, name there)
HOME = {**{n: ("fedshield.schema", n) for n in SCHEMA},
        **{n: ("fedshield.configio", n) for n in CONFIGIO},
        **{n: ("fedshield.validation", n) for n in VALIDATION},
        "_toml_value": ("fedshield.configio", "toml_value"),
        "ConfigError": ("fedshield.errors", "ConfigError"),
        "SECAGG_MODULUS": ("fedshield.privacy.secagg", "SECAGG_MODULUS"),
        "byzantine_count": ("fedshield.simulations.attacks.selection", "byzantine_count"),
        "parse_id_list": ("fedshield.simulations.attacks.selection", "parse_id_list")}
# modules used as ``module.name`` after the rewrite of an aliased import
ALIAS = {"fedshield.schema": "schema", "fedshield.configio": "configio",
         "fedshield.validation": "validation"}

FROM_LINE = re.compile(r"^(?P<indent>[ \t]*)from fedshield\.config import (?P<names>[^#\n]+?)"
                       r"(?P<comment>[ \t]*#[^\n]*)?$", re.M)
ALIAS_LINE = re.compile(r"^(?P<indent>[ \t]*)from fedshield import config as (?P<alias>\w+)"
                        r"(?P<comment>[ \t]*#[^\n]*)?$", re.M)


def _from_lines(indent: str, names: list[str], comment: str) -> str:
    by_module: dict[str, list[str]] = {}
    for name in names:
        if name not in HOME:
            raise SystemExit(f"unknown fedshield.config name {name!r}: migrate it by hand")
        module, new = HOME[name]
        by_module.setdefault(module, []).append(new)
    return "\n".join(f"{indent}from {m} import {', '.join(sorted(set(ns)))}{comment}"
                     for m, ns in sorted(by_module.items()))


def migrate(text: str) -> str:
    """``text`` with every fedshield.config import and aliased use rewritten."""
    text = FROM_LINE.sub(lambda m: _from_lines(
        m["indent"], [n.strip() for n in m["names"].strip("() ").split(",") if n.strip()],
        m["comment"] or ""), text)
    for alias in sorted({m["alias"] for m in ALIAS_LINE.finditer(text)}):
        used = sorted(set(re.findall(rf"\b{alias}\.(\w+)", text)))
        modules: set[str] = set()
        extra: list[str] = []
        for name in used:
            module, new = HOME.get(name, (None, name))
            if module is None:
                raise SystemExit(f"unknown fedshield.config name {alias}.{name}: migrate by hand")
            if module in ALIAS:
                modules.add(module)
                text = re.sub(rf"\b{alias}\.{name}\b", f"{ALIAS[module]}.{new}", text)
            else:
                extra.append(f"from {module} import {new}")
                text = re.sub(rf"\b{alias}\.{name}\b", new, text)
        short = ", ".join(sorted(ALIAS[x] for x in modules))

        def imports(m: re.Match, short: str = short, extra: list[str] = extra,
                    before: str = text) -> str:
            lines = [f"from fedshield import {short}{m['comment'] or ''}"] if short else []
            lines += [e for e in extra if e not in before]
            return "\n".join(m["indent"] + line for line in lines)

        text = ALIAS_LINE.sub(imports, text)
    return text


def main(paths: list[str]) -> None:
    """Rewrite ``paths`` (default: every tracked .py file) in place."""
    if not paths:
        paths = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True,
                               check=True).stdout.split()
    for path in map(Path, paths):
        old = path.read_text()
        new = migrate(old)
        if new != old:
            path.write_text(new)
            print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
