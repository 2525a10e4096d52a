import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedshield import config as fcfg
from fedshield.errors import ConfigError

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
        fcfg.from_dict(data)


def test_overrides_and_round_trip(tmp_path):
    cfg = fcfg.load(ROOT / "configs/default.toml", ["federation.rounds=7", "task.name=mnist5k",
                                                    "train.lr=0.5"])
    assert (cfg.federation.rounds, cfg.task.name, cfg.train.lr) == (7, "mnist5k", 0.5)
    path = tmp_path / "c.toml"
    path.write_text(fcfg.to_toml(cfg))
    assert fcfg.load(path) == cfg
    assert fcfg.from_run_config(cfg.flat()) == cfg


def test_override_errors():
    with pytest.raises(ConfigError, match="key=value"):
        fcfg.load(ROOT / "configs/default.toml", ["federation.rounds"])
    with pytest.raises(ConfigError, match="does not exist"):
        fcfg.load(ROOT / "configs/missing.toml")


def test_every_shipped_config_is_valid():
    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        fcfg.load(path)


def test_pyproject_run_config_is_the_default_config():
    """`flwr run .` reads [tool.flwr.app.config]; it must equal configs/default.toml resolved."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_config = fcfg.flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert fcfg.from_run_config(flwr_config) == fcfg.load(ROOT / "configs/default.toml")
    assert set(flwr_config) == set(fcfg.Config().flat())


def test_cosine_schedule_decays_from_lr_towards_zero():
    constant, cosine = fcfg.TrainConfig(lr=0.1), fcfg.TrainConfig(lr=0.1, lr_schedule="cosine")
    assert [constant.lr_at(r, 10) for r in (1, 5, 10)] == [0.1] * 3
    lrs = [cosine.lr_at(r, 10) for r in range(1, 11)]
    assert lrs[0] == 0.1 and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert lrs[5] == pytest.approx(0.05)  # halfway: cos(pi/2)
    assert cosine.lr_at(1, 1) == 0.1


def test_clients_train_with_the_rounds_scheduled_lr(monkeypatch):
    from flwr.app import Context, RecordDict

    import client.app as client_app
    from tasks import task_for

    used = []
    monkeypatch.setattr(client_app, "train_local", lambda model, data, cfg, seed: used.append(cfg.lr) or {})
    cfg = fcfg.from_dict({"task": {"name": "digits"}, "federation": {"num_clients": 2},
                          "train": {"lr": 0.2, "lr_schedule": "cosine"}})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=cfg.flat())
    weights = task_for(cfg.task).build_model().state_dict()
    rc = {"num-rounds": 4, **fcfg.flatten({"train": dataclasses.asdict(cfg.train)})}
    for rnd in (1, 3):
        client_app.fit_locally(context, cfg, client_app.load_client_data, weights, rc | {"server-round": rnd})
    assert used == [pytest.approx(cfg.train.lr_at(1, 4)), pytest.approx(cfg.train.lr_at(3, 4))]
    assert used[0] == pytest.approx(0.2) and used[1] < 0.2

