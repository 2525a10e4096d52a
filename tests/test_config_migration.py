"""The codemod that moves branches off the removed fedshield.config (.ci/migrate_config_imports)."""

import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("migrate", ROOT / ".ci/migrate_config_imports.py")
migrate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(migrate)

OLD = '''from fedshield import config as fcfg
from fedshield.configio import flatten  # noqa: E402
from fedshield.schema import AttackConfig  # noqa: E402
from fedshield.simulations.attacks.selection import byzantine_count  # noqa: E402


def run(cfg: schema.Config) -> str:
    if cfg.secagg.quantization_range > SECAGG_MODULUS:
        raise ConfigError("x")
    return configio.to_toml(validation.load("c.toml"))


def local():
    from fedshield import configio, schema, validation

    return validation.from_dict({}), configio.toml_value(1)
'''
NEW = '''from fedshield import configio, schema, validation
from fedshield.errors import ConfigError
from fedshield.privacy.secagg import SECAGG_MODULUS
from fedshield.configio import flatten  # noqa: E402
from fedshield.schema import AttackConfig  # noqa: E402
from fedshield.simulations.attacks.selection import byzantine_count  # noqa: E402


def run(cfg: schema.Config) -> str:
    if cfg.secagg.quantization_range > SECAGG_MODULUS:
        raise ConfigError("x")
    return configio.to_toml(validation.load("c.toml"))


def local():
    from fedshield import configio, schema, validation
    from fedshield.errors import ConfigError
    from fedshield.privacy.secagg import SECAGG_MODULUS

    return validation.from_dict({}), configio.toml_value(1)
'''


def test_the_codemod_rewrites_imports_and_aliased_uses_and_is_idempotent():
    assert migrate.migrate(OLD) == NEW
    assert migrate.migrate(NEW) == NEW


def test_every_name_it_maps_exists_where_it_points():
    for old, (module, new) in migrate.HOME.items():
        assert hasattr(importlib.import_module(module), new), (old, module, new)


def test_an_unknown_name_stops_it():
    with pytest.raises(SystemExit, match="CROSS_CHECKS"):
        migrate.migrate("from fedshield.config import CROSS_CHECKS\n")
