"""Averaging of the global models over rounds (aggregation.model_ema): math and end to end."""

import json
from pathlib import Path

import pytest
import torch
from fedshield.server.averaging import ModelAverage, ema_decay, ema_update
from fedshield.simulations.runner import simulate
from fedshield.tasks import evaluate, get_task
from safetensors.torch import load_file


def test_first_models_are_a_plain_mean_then_the_decay_takes_over():
    assert [ema_decay(0.75, t) for t in (1, 2, 3, 4, 5, 6)] == [0.0, 0.5, 2 / 3, 0.75, 0.75, 0.75]
    models = [{"w": torch.full((2,), float(v)),
               "steps": torch.tensor(v)} for v in (1, 2, 6, 10, 20)]
    avg = None
    for t, m in enumerate(models, start=1):
        avg = ema_update(avg, m, 0.75, t)
    # mean of 1, 2, 6 = 3; then 0.75 * 3 + 0.25 * 10 = 4.75; then 0.75 * 4.75 + 0.25 * 20 = 8.5625
    assert torch.equal(avg["w"], torch.full((2,), 8.5625, dtype=torch.float64))
    assert avg["steps"].item() == 20  # not a float: the newest value


def test_average_keeps_float64_and_returns_the_models_dtypes():
    avg = ModelAverage(0.999)
    ulp = 2.0 ** -23  # float32 spacing at 1: the mean 1 + ulp / 2 exists only in float64
    for t in range(1, 2001):
        out = avg.update({"w": torch.tensor([1.0 + ulp * (t % 2)], dtype=torch.float32)})
    assert avg.average["w"].dtype == torch.float64 and out["w"].dtype == torch.float32
    assert abs(avg.average["w"].item() - (1.0 + ulp / 2)) < ulp / 8


def test_off_returns_the_raw_model_and_bad_decay_is_refused():
    raw = {"w": torch.ones(3)}
    avg = ModelAverage(0.0)
    assert avg.update(raw) is raw and avg.current(raw) is raw and avg.average is None
    with pytest.raises(ValueError, match="must be in"):
        ModelAverage(1.0)
    with pytest.raises(ValueError, match="changed names"):
        ema_update({"w": torch.ones(1)}, {"v": torch.ones(1)}, 0.5, 2)


def test_state_round_trips():
    a, b = ModelAverage(0.5), ModelAverage(0.5)
    for v in (1.0, 3.0):
        a.update({"w": torch.tensor([v])})
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.update({"w": torch.tensor([9.0])})["w"],
                       b.update({"w": torch.tensor([9.0])})["w"])


def final_weights(summary):
    return load_file(str(Path(summary.run_dir) / "model.safetensors"))


def test_released_model_is_the_average_and_clients_train_the_raw_one(small_cfg):
    """Three rounds with model_ema = 0.9 release the mean of the three raw global models (the
    raw runs of 1, 2 and 3 rounds); the checkpoint keeps the raw model, so training is unchanged;
    a run stopped after round 2 and resumed releases the same average."""
    raw = [final_weights(simulate(small_cfg(name=f"raw{r}", federation={"rounds": r})))
           for r in (1, 2, 3)]
    ema = small_cfg(name="ema", aggregation={"model_ema": 0.9})
    summary = simulate(ema)
    released = final_weights(summary)
    for k in released:
        mean = sum(w[k].double() for w in raw) / 3
        assert torch.allclose(released[k].double(), mean, atol=1e-6), k
    checkpoint = json.loads((Path(summary.run_dir) / "checkpoint.json").read_text())
    raw_ckpt = load_file(str(Path(summary.run_dir) / checkpoint["weights"]))
    assert all(torch.equal(raw_ckpt[f"weights/{k}"], raw[2][k]) for k in released)
    task = get_task("digits")
    model = task.build_model()
    model.load_state_dict(released)
    assert evaluate(model, task.load()[1])["accuracy"] == pytest.approx(summary.final.accuracy)

    part = simulate(small_cfg(name="part", aggregation={"model_ema": 0.9},
                              federation={"rounds": 2}))
    resumed = simulate(small_cfg(name="part", resume=part.run_dir, aggregation={"model_ema": 0.9}))
    assert all(torch.allclose(final_weights(resumed)[k], released[k], atol=1e-7) for k in released)
