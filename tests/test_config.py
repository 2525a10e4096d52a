import ast
import dataclasses
import re
import sys
import tomllib
from pathlib import Path

import pytest

from fedshield import configio, schema, validation
from fedshield.errors import ConfigError
from tests.config_support import NEUTRAL_NAME, neutral, neutral_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data, message", [
    ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
    ({"nope": 1}, "unknown key nope"),
    ({"federation": {"rounds": 0}}, "federation.rounds = 0 is out of range"),
    ({"federation": {"rounds": "five"}}, "federation.rounds: expected int"),
    ({"partition": {"kind": "random"}}, "partition.kind = 'random' is not valid"),
    ({"privacy": {"delta": 1.5}}, "privacy.delta = 1.5 is out of range"),
    ({"federation": {"num_clients": 3, "min_clients": 5}}, "min_clients = 5 exceeds"),
    ({"task": {"name": "cifar"}}, "task.name = 'cifar' is out of range"),
    ({"train": 3}, "train: expected a table"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        neutral_config(data)


def test_overrides_and_round_trip(tmp_path):
    cfg = validation.load(ROOT / "configs/default.toml",
                          ["federation.rounds=7", "task.name=mnist5k", "task.model=''",
                           "train.lr=0.5"])
    assert (cfg.federation.rounds, cfg.task.name, cfg.train.lr) == (7, "mnist5k", 0.5)
    path = tmp_path / "c.toml"
    path.write_text(configio.to_toml(cfg))
    assert validation.load(path) == cfg
    assert validation.from_run_config(cfg.flat()) == cfg


def test_override_errors():
    with pytest.raises(ConfigError, match="key=value"):
        validation.load(ROOT / "configs/default.toml", ["federation.rounds"])
    with pytest.raises(ConfigError, match="does not exist"):
        validation.load(ROOT / "configs/missing.toml")


def test_every_shipped_config_is_valid():
    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        validation.load(path)


def test_pyproject_run_config_is_the_default_config():
    """`flwr run .` reads [tool.flwr.app.config]; it must equal configs/default.toml resolved."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_config = configio.flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert validation.from_run_config(flwr_config) == validation.load(ROOT / "configs/default.toml")
    assert set(flwr_config) == set(schema.Config().flat())


def test_cosine_schedule_decays_from_lr_towards_zero():
    constant, cosine = schema.TrainConfig(lr=0.1), schema.TrainConfig(lr=0.1, lr_schedule="cosine")
    assert [constant.lr_at(r, 10) for r in (1, 5, 10)] == [0.1] * 3
    lrs = [cosine.lr_at(r, 10) for r in range(1, 11)]
    assert lrs[0] == 0.1 and all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[5] == pytest.approx(0.05)  # halfway: cos(pi/2)
    assert cosine.lr_at(1, 1) == 0.1


def test_clients_train_with_the_rounds_scheduled_lr(monkeypatch):
    import fedshield.client.app as client_app
    from fedshield.tasks import task_for
    from flwr.app import Context, RecordDict

    used = []
    monkeypatch.setattr("fedshield.client.fit.train_local",  # where fit_locally looks it up
                        lambda model, data, cfg, seed: used.append(cfg.lr) or {})
    cfg = neutral_config({"task": {"name": "digits"}, "federation": {"num_clients": 2},
                          "train": {"lr": 0.2, "lr_schedule": "cosine"}})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=cfg.flat())
    weights = task_for(cfg.task).build_model().state_dict()
    rc = {"num-rounds": 4, **configio.flatten({"train": dataclasses.asdict(cfg.train)})}
    for rnd in (1, 3):
        client_app.fit_locally(context, cfg, client_app.load_client_data, weights,
                               rc | {"server-round": rnd})
    assert used == [pytest.approx(cfg.train.lr_at(1, 4)), pytest.approx(cfg.train.lr_at(3, 4))]
    assert used[0] == pytest.approx(0.2) and used[1] < 0.2



# --- hardening: every float finite, bounded ints, safe strings, real registries ---------------
FLOAT_KEYS = [k for k, v in schema.Config().flat().items() if isinstance(v, float)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_refuses_inf_and_nan(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = .* is not a finite number"):
        neutral_config(configio.unflatten({key: value}))


def test_inf_is_refused_from_toml_and_run_config_strings(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = inf\n")
    with pytest.raises(ConfigError, match="train.lr = inf is not a finite number"):
        validation.load(path)
    with pytest.raises(ConfigError, match="screening.max_norm = nan"):
        validation.load(ROOT / "configs/default.toml", ["screening.max_norm=nan"])


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (2**32, False),
                                      (2**64, False), (-1, False)])
def test_seed_must_fit_every_rng(seed, ok):
    if ok:
        assert neutral_config({"seed": seed}).seed == seed
    else:
        with pytest.raises(ConfigError, match=r"seed = -?\d+ is out of range; expected an integer "
                                              r"in \[0, 4294967295\]"):
            neutral_config({"seed": seed})


@pytest.mark.parametrize("rule, message", [
    ("+", "unknown rule ''"), ("", "unknown rule ''"), ("nnm+", "unknown rule ''"),
    ("+krum", "unknown pre-aggregation step ''"), ("krum+nnm", "unknown rule 'nnm'"),
    ("KRUM", "write it as 'krum'"), (" median", "write it as 'median'"),
])
def test_aggregation_rule_is_checked_against_the_rule_registry(rule, message):
    with pytest.raises(ConfigError, match=rf"aggregation.rule = {re.escape(repr(rule))}.*"
                                          rf"{re.escape(message)}"):
        neutral_config({"aggregation": {"rule": rule}})


def test_every_registered_rule_and_step_is_accepted():
    from fedshield.server.aggregation import PRE_AGGREGATORS, RULES

    for rule in RULES:
        assert neutral_config({"aggregation": {"rule": rule}}).aggregation.rule == rule
    for step in PRE_AGGREGATORS:
        neutral_config({"aggregation": {"rule": f"{step}+median"}})


def test_task_name_is_checked_against_the_task_registry(monkeypatch):
    from fedshield.tasks.base import TASKS, get_task

    for name in ("hf:", "hf: x", "", "MNIST", "mnist "):
        with pytest.raises(ConfigError, match="task.name = .* is out of range"):
            neutral_config({"task": {"name": name}})
    assert neutral_config({"task": {"name": "hf:ylecun/mnist"}}).task.name == "hf:ylecun/mnist"
    get_task("digits")  # registers the shipped tasks
    # A newly registered task is valid without touching the config module (no copied list).
    monkeypatch.setitem(TASKS, "my-task", TASKS["digits"])
    get_task.cache_clear()
    try:
        assert neutral_config({"task": {"name": "my-task"}}).task.name == "my-task"
    finally:
        get_task.cache_clear()


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".hidden", "-rf", "", "x" * 101,
                                  "a..b", "tab\tname", "new\nline", "nul\x00", "é"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"^name = "):
        neutral_config({"name": name})


def test_safe_run_names_are_accepted():
    for name in ("default", "nnm+cclip", "eps-3.0_s1", "retrain-20261201-120000", "a=b@c"):
        assert neutral_config({"name": name}).name == name


def test_control_characters_are_refused_in_every_string():
    for key in ("output_dir", "resume", "privacy.ledger_dir", "deployment.model_name"):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)} = .* control character"):
            neutral_config(configio.unflatten({key: "a\x1bb"}))


def test_validate_is_the_one_entry_point_with_one_fixed_list_of_checks(monkeypatch):
    cfg = schema.Config()
    assert validation.validate(cfg) is cfg
    assert isinstance(validation.CHECKS, tuple)  # no list another module could append to
    custom = (*validation.CHECKS, lambda c: "federation.rounds: custom refusal"
              if c.federation.rounds == 7 else None)
    monkeypatch.setattr(validation, "CHECKS", custom)
    with pytest.raises(ConfigError, match="custom refusal"):
        validation.validate(schema.Config(federation=schema.FederationConfig(rounds=7)))
    with pytest.raises(ConfigError, match="custom refusal"):  # the readers run the same checks
        validation.from_dict({"federation": {"rounds": 7}})


# --- the schema: only dataclasses, defaults = configs/default.toml ----------------------------
def test_schema_defaults_are_the_default_config_key_for_key():
    """Config(), `fedshield simulate configs/default.toml` and `flwr run .` are one run."""
    default = validation.load(ROOT / "configs/default.toml").flat()
    assert schema.Config().flat() == default
    assert validation.from_dict({}) == schema.Config()
    # ... and default.toml names every key that differs from a bare section's default.
    given = configio.flatten(tomllib.loads((ROOT / "configs/default.toml").read_text()))
    bare = schema.Config(**{f.name: type(getattr(schema.Config(), f.name))()
                            for f in dataclasses.fields(schema.Config)
                            if dataclasses.is_dataclass(getattr(schema.Config(), f.name))})
    assert {k for k, v in bare.flat().items() if default[k] != v} <= set(given)


def test_the_tests_neutral_base_is_the_bare_sections():
    """tests/config_support's base turns off exactly what Config() adds to the bare sections."""
    bare = {f.name: type(getattr(schema.Config(), f.name))()
            for f in dataclasses.fields(schema.Config)
            if dataclasses.is_dataclass(getattr(schema.Config(), f.name))}
    assert neutral_config({}) == schema.Config(name=NEUTRAL_NAME, **bare)
    assert neutral({"train": {"lr": 0.2}})["train"] == {"lr": 0.2, "momentum": 0.9,
                                                         "batch_size": 32}


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module)
    return out


def test_schema_and_configio_are_core_modules():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert {m.split(".")[0] for m in _imports("fedshield.schema")} <= stdlib
    upper = {m for m in _imports("fedshield.configio") if m.split(".")[0] not in stdlib}
    assert upper <= {"fedshield.errors", "fedshield.schema"}, upper
    from fedshield.privacy.secagg import SECAGG_MODULUS

    assert schema.SECAGG_MODULUS == SECAGG_MODULUS  # the schema's bound on quantization_range


def test_removed_and_registry_backed_keys():
    # Read nowhere (issue 17 will add client DP drift references): refused, never ignored.
    with pytest.raises(ConfigError, match="unknown key deployment.reference_noise_multiplier"):
        validation.from_dict({"deployment": {"reference_noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="privacy.accountant = 'pld' is not valid; choose one "
                                          "of prv, rdp, gdp"):
        validation.from_dict({"privacy": {"accountant": "pld"}})
    with pytest.raises(ConfigError, match="central_dp.accountant = 'x' is not valid"):
        validation.from_dict({"central_dp": {"accountant": "x"}})
    # The default run's model is the ScatterNet task's: another task says which model it wants.
    with pytest.raises(ConfigError, match="task.model = 'scatter_linear' is not a model of task "
                                          "'digits'.*set task.model = \"\""):
        validation.from_dict({"task": {"name": "digits"}})
    assert validation.from_dict({"task": {"name": "digits", "model": ""}}).task.model == ""


def test_augment_is_refused_for_tasks_whose_inputs_are_not_pixels():
    for task in ("digits", "mnist-scattering"):
        with pytest.raises(ConfigError, match="train.augment = 'shift' shifts images"):
            neutral_config({"task": {"name": task}, "train": {"augment": "shift"}})
    assert neutral_config({"train": {"augment": "shift"}}).train.augment == "shift"


# --- pre-flight --------------------------------------------------------------------------------
def digits(tmp_path, **sections):
    data = {"output_dir": str(tmp_path / "runs"), "task": {"name": "digits"},
            "federation": {"num_clients": 5}, "partition": {"kind": "iid"},
            "privacy": {"ledger_dir": str(tmp_path / "ledgers")}, "deployment": {"handoff": False}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return neutral_config(data)


def test_preflight_partition_sizes_are_what_the_clients_load(tmp_path):
    from fedshield.client.data import LOCAL_VAL_FRACTION, load_client_data
    from fedshield.server.preflight import VAL_FRACTION, preflight
    from flwr.app import Context, RecordDict

    assert VAL_FRACTION == LOCAL_VAL_FRACTION
    n = 30
    cfg = digits(tmp_path, partition={"kind": "dirichlet", "alpha": 0.3, "min_partition_size": 0},
                 federation={"num_clients": n})
    report = preflight(cfg)
    loaded = []
    for pid in range(n):
        ctx = Context(run_id=1, node_id=pid, state=RecordDict(), run_config=cfg.flat(),
                      node_config={"partition-id": pid, "num-partitions": n})
        loaded.append(len(load_client_data(ctx, cfg)[1]))
    assert report.train_sizes == tuple(loaded)
    assert min(loaded) < 20 <= max(loaded)  # both sides of the hold-out rule are exercised


def test_preflight_refuses_a_dp_batch_larger_than_a_partition(tmp_path):
    """The issue's new-user case: mnist5k over 50 clients with a DP batch of 256."""
    from fedshield.server.preflight import partition_problem, preflight

    cfg = validation.load(ROOT / "configs/default.toml",
                    ["task.name=mnist5k", "task.model=''", "train.batch_size=256",
                     "federation.num_clients=50",
                     f"output_dir={str(tmp_path)!r}"])
    with pytest.raises(ConfigError, match=r"train.batch_size = 256 exceeds the \d+ training "
                                          r"examples of client \d+.*Lower train.batch_size"):
        preflight(cfg)
    assert partition_problem((30, 40), 30, private=True) is None
    assert "at most 29" in partition_problem((29, 40), 30, private=True)
    assert partition_problem((29, 40), 30, private=False) is None
    assert "no training examples" in partition_problem((0, 40), 1, private=False)


def test_preflight_notes_a_large_batch_without_dp_and_only_warns_in_the_serverapp(tmp_path):
    from fedshield.server.preflight import preflight

    report = preflight(digits(tmp_path, train={"batch_size": 1000}))
    assert len(report.notes) == 1 and "whole partition as one batch" in report.notes[0]
    private = digits(tmp_path, train={"batch_size": 1000},
                     privacy={"enabled": True, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="train.batch_size = 1000 exceeds"):
        preflight(private)
    assert "would refuse to train" in preflight(private, partitions="warn").notes[0]
    assert preflight(private, partitions="off").train_sizes == ()


def test_preflight_refuses_what_would_fail_later(tmp_path):
    from dataclasses import replace

    from fedshield.server.preflight import preflight

    good = digits(tmp_path)
    with pytest.raises(ConfigError, match="init_weights = .* does not exist"):
        preflight(replace(good, init_weights=str(tmp_path / "none.safetensors")))
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="does not fit the model"):
        preflight(replace(good, init_weights=str(tmp_path / "other.safetensors")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir = .* is a file"):
        preflight(replace(good, output_dir=str(tmp_path / "file")))
    # A Config built directly (bypassing load) is validated all the same.
    with pytest.raises(ConfigError, match="train.lr = inf"):
        preflight(replace(good, train=replace(good.train, lr=float("inf"))))
    with pytest.raises(ConfigError, match="name = '../up'"):
        preflight(replace(good, name="../up"))
    with pytest.raises(ConfigError, match="attack.target_label = 12 is not a class"):
        preflight(replace(good, attack=replace(good.attack, name="label_flip", target_label=12,
                                               byzantine_fraction=0.2)))


def test_the_serverapp_runs_preflight_before_training(monkeypatch, tmp_path):
    """ServerApp main (what `flwr run` starts) raises on a config that cannot run, so Flower marks
    the run failed; nothing trains. Here: a model that does not fit the task is refused even when
    the cross-check is bypassed, by the forward pass."""
    import fedshield.server.app as server_app
    from fedshield.tasks import get_task
    from flwr.app import Context, RecordDict

    monkeypatch.setattr(server_app, "run_federation", lambda *a: pytest.fail("training started"))
    cfg = digits(tmp_path)
    digits_task = get_task("digits")
    mnist_model = get_task("mnist").build_model
    monkeypatch.setattr("fedshield.tasks.task_for", lambda task_cfg: digits_task.__class__(
        **{**digits_task.__dict__, "build_model": mnist_model}))
    app = server_app.build_server_app()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=cfg.flat())
    with pytest.raises(ConfigError, match="does not fit task.name = 'digits'"):
        app(None, context)
