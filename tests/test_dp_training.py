"""DP-SGD rounds on real data (sklearn digits): accounted, refused at the budget, and still
learning."""

import numpy as np
import pytest
import torch
from fedshield.client.dp import pick_grad_sample_mode, train_private
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.ledger import Ledger
from fedshield.tasks import evaluate, get_task
from fedshield.tasks.models import MnistCNN

from fedshield.errors import BudgetExhausted
from fedshield.schema import PrivacyConfig, TrainConfig

DELTA = 1e-4
TRAIN = TrainConfig(lr=0.1, momentum=0.9, batch_size=32, local_epochs=1)


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    train, test = task.load()
    return task, train, test


def test_two_rounds_are_accounted_exactly_and_the_model_learns(digits, tmp_path):
    task, train, test = digits
    torch.manual_seed(0)
    model = task.build_model()
    before = evaluate(model, test)["accuracy"]
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    ledger = Ledger(tmp_path / "c0.json", DELTA, "prv")
    results = [train_private(model, train, TRAIN, cfg, ledger, total_rounds=2, server_round=r,
                             run_id="run", seed=r) for r in (1, 2)]

    logged = [e for r in results for e in r["events"]]
    assert [e[2] for e in logged] == [results[0]["metrics"]["steps"]] * 2
    eps1, eps2 = (r["metrics"]["epsilon"] for r in results)
    assert eps1 == pytest.approx(epsilon(logged[:1], DELTA, "prv"), rel=1e-9)
    assert eps2 == pytest.approx(epsilon(logged, DELTA, "prv"), rel=1e-9)
    assert 0 < eps1 < eps2 == pytest.approx(Ledger(tmp_path / "c0.json", DELTA, "prv").spent())
    m = results[1]["metrics"]
    assert m["sample_rate"] == 1 / 45 and m["steps"] == 45 and m["grad_sample_mode"] == "bk"
    assert m["noise_multiplier"] == 1.0 and m["max_grad_norm"] == 1.0 and m["train_loss"] > 0

    state = results[1]["state_dict"]
    assert not any("_module" in k for k in state)
    fresh = task.build_model()
    fresh.load_state_dict(state)  # plain keys: loads into an unwrapped model
    after = evaluate(fresh, test)["accuracy"]
    assert after > before + 0.3, (before, after)


def test_target_epsilon_is_planned_over_the_whole_schedule(digits, tmp_path):
    task, train, _ = digits
    cfg = PrivacyConfig(enabled=True, target_epsilon=2.0, delta=DELTA, accountant="rdp",
                        grad_sample_mode="hooks")
    ledger = Ledger(tmp_path / "c1.json", DELTA, "rdp")
    model = task.build_model()
    out = train_private(model, train, TRAIN, cfg, ledger, total_rounds=3, server_round=1,
                        run_id="r", seed=0)
    # After 1 of 3 planned rounds, epsilon is well below target; all 3 would spend it.
    full = epsilon([out["events"][0]] * 3, DELTA, "rdp")
    assert out["metrics"]["epsilon"] < full and full == pytest.approx(2.0, rel=0.01) and full <= 2.0
    assert out["metrics"]["grad_sample_mode"] == "hooks"


def test_a_client_at_its_budget_refuses_before_training(digits, tmp_path):
    task, train, _ = digits
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=DELTA, accountant="rdp",
                        max_epsilon=1.5)
    ledger = Ledger(tmp_path / "c2.json", DELTA, "rdp", max_epsilon=1.5)
    model = task.build_model()
    spent = []
    with pytest.raises(BudgetExhausted,
                       match=r"budget exhausted: spent .* of 1.5 .*refuses to train"):
        for r in range(1, 20):
            spent.append(train_private(model, train, TRAIN, cfg, ledger, total_rounds=20,
                                       server_round=r, run_id="r", seed=r)["metrics"]["epsilon"])
    assert spent and max(spent) <= 1.5 and ledger.spent() == spent[-1]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExhausted):
        train_private(model, train, TRAIN, cfg, ledger, total_rounds=20, server_round=99,
                      run_id="r")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # untouched


def test_auto_mode_picks_bookkeeping_for_known_layers_and_hooks_otherwise():
    assert pick_grad_sample_mode(MnistCNN()) == "bk"
    assert pick_grad_sample_mode(get_task("digits").build_model()) == "bk"

    class Scale(torch.nn.Module):  # a layer Opacus has no per-sample gradient rule for
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    assert pick_grad_sample_mode(torch.nn.Sequential(torch.nn.Linear(4, 4), Scale())) == "hooks"


def test_empty_poisson_batches_still_step_and_stay_finite(digits, tmp_path):
    task, train, _ = digits
    tiny = train.subset(np.arange(10))  # q = 0.1: about a third of the batches are empty
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-3, accountant="rdp")
    out = train_private(task.build_model(), tiny,
                        TrainConfig(lr=0.01, batch_size=1, local_epochs=3), cfg,
                        Ledger(tmp_path / "c3.json", 1e-3, "rdp"), total_rounds=1, server_round=1,
                        run_id="r", seed=0)
    assert out["metrics"]["steps"] == 30  # every sampled batch, empty or not, is a released step
    assert np.isfinite(out["metrics"]["train_loss"])
    assert all(torch.isfinite(v).all() for v in out["state_dict"].values())


def test_augmented_dp_round_on_mnist_images_is_accounted_like_a_plain_one(tmp_path):
    """Shift augmentation transforms each example before clipping: same events, same epsilon."""
    task = get_task("mnist5k")
    train = task.load()[0]
    train = type(train)(train.x[:512], train.y[:512])
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    out = {}
    for augment in ("none", "shift"):
        ledger = Ledger(tmp_path / f"{augment}.json", DELTA, "prv")
        out[augment] = train_private(task.build_model(), train,
                                     TrainConfig(batch_size=64, augment=augment),
                                     cfg, ledger, total_rounds=1, server_round=1, run_id="r",
                                     seed=3)
    assert out["shift"]["events"] == out["none"]["events"]
    assert out["shift"]["metrics"]["epsilon"] == out["none"]["metrics"]["epsilon"]
    assert out["shift"]["metrics"]["train_loss"] != out["none"]["metrics"]["train_loss"]
