"""CONTRIBUTING's recipes work: a rule, an attack and a task are each one file plus one registry
line, and then pass the real validation and run in a real (1-round, digits) federation.

The files are tests/fixtures/extension/toy_*.py; each "registry line" below is the line
CONTRIBUTING.md tells a contributor to add, applied with monkeypatch so it is undone afterwards.
"""

import importlib
import json
import sys
from pathlib import Path

import pytest
from fedshield.server.aggregation.registry import RULE_RECORDS, Rule
from fedshield.simulations.attacks import ATTACKS, Attack
from fedshield.simulations.runner import simulate
from fedshield.tasks.base import TASKS, get_task

from fedshield import validation
from fedshield.errors import ConfigError
from tests.config_support import neutral
from tests.fixtures.extension import toy_attack, toy_rule

TOY_TASK = "tests.fixtures.extension.toy_task"


@pytest.fixture
def toy_rule_registered(monkeypatch):
    toy_rule.CALLS.clear()
    # The registry line (a contributor adds it to RULE_RECORDS in server/aggregation/registry.py):
    monkeypatch.setitem(RULE_RECORDS, "toy_mean", Rule(
        "toy_mean", toy_rule.toy_mean, lambda x, a: toy_rule.toy_mean(x, a.f),
        lambda n, f, c: toy_rule.check_toy_mean(n, f),
        central_dp_refusal="toy_mean is not clipped, so one client can move it arbitrarily far"))
    return toy_rule


@pytest.fixture
def toy_attack_registered(monkeypatch):
    toy_attack.CALLS.clear()
    # The registry line (a contributor adds it to ATTACKS in simulations/attacks/__init__.py):
    monkeypatch.setitem(ATTACKS, "zero_update", Attack(
        "zero_update", "update", "every Byzantine client sends 0", craft=toy_attack.zero_update))
    return toy_attack


@pytest.fixture
def toy_task_registered():
    # The registry line for a task is the module's name in get_task's import line; importing the
    # fixture module has the same effect (its @register runs).
    module = importlib.import_module(TOY_TASK)
    yield module
    TASKS.pop(module.NAME, None)
    sys.modules.pop(TOY_TASK, None)
    get_task.cache_clear()


def digits_cfg(tmp_path, **sections):
    """One round of a 5-client digits federation, DP-SGD on (the default), no hand-off."""
    data = neutral({"name": "ext", "seed": 0, "output_dir": str(tmp_path / "runs"),
                    "task": {"name": "digits"},
                    "federation": {"num_clients": 5, "rounds": 1},
                    "partition": {"kind": "dirichlet", "alpha": 1.0},
                    "train": {"lr": 0.1, "batch_size": 16},
                    "privacy": {"enabled": True, "target_epsilon": 3.0,
                                "ledger_dir": str(tmp_path / "ledgers")},
                    "deployment": {"handoff": False}})
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def metrics(summary):
    return [json.loads(x) for x in
            (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_unregistered_names_are_refused_by_validation(tmp_path):
    """Before the registry lines the same configs are refused: the registries are what validation
    asks, not a copied list."""
    with pytest.raises(ConfigError, match="toy_mean"):
        validation.from_dict(digits_cfg(tmp_path, aggregation={"rule": "toy_mean"}))
    with pytest.raises(ConfigError, match="toy-digits"):
        validation.from_dict(digits_cfg(tmp_path, task={"name": "toy-digits"}))
    with pytest.raises(ConfigError, match="zero_update"):
        validation.from_dict(digits_cfg(tmp_path,
                                        attack={"name": "zero_update", "byzantine_ids": "0"}))


def test_a_new_rule_and_task_run_a_federation(tmp_path, toy_rule_registered, toy_task_registered):
    cfg = validation.from_dict(digits_cfg(tmp_path, task={"name": toy_task_registered.NAME},
                                    aggregation={"rule": "nnm+toy_mean", "f": 1}))
    summary = simulate(cfg)
    assert toy_rule_registered.CALLS == [5]  # one round, all 5 clients, after nnm
    [line] = metrics(summary)
    assert line["round"] == 1 and line["accepted"] == 5
    assert summary.rounds_completed == 1
    # The task's model is the toy one: a single 64 -> 10 linear layer.
    assert [tuple(p.shape) for p in get_task(toy_task_registered.NAME).build_model().parameters()] \
        == [(10, 64), (10,)]


def test_a_new_rule_is_checked_like_the_shipped_ones(tmp_path, toy_rule_registered):
    """The record's check runs in pre-flight: f = 2 of 4 clients is refused with the rule's
    reason, before any run folder exists; central DP refuses it with the record's reason."""
    cfg = validation.from_dict(digits_cfg(tmp_path, federation={"num_clients": 4},
                                    aggregation={"rule": "toy_mean", "f": 2}))
    with pytest.raises(ConfigError, match="toy_mean needs more than 2f = 4 updates"):
        simulate(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="central DP .*toy_mean"):
        validation.from_dict(digits_cfg(tmp_path, aggregation={"rule": "toy_mean"},
                                  central_dp={"enabled": True}))


def test_a_new_attack_runs_in_a_federation(tmp_path, toy_attack_registered):
    cfg = validation.from_dict(digits_cfg(tmp_path, attack={"name": "zero_update",
                                                      "byzantine_ids": "0"}))
    summary = simulate(cfg)
    assert toy_attack_registered.CALLS == [(1, 4)]  # one round: 1 Byzantine, 4 honest updates
    assert list(summary.attack_report.byzantine_ids) == [0]
