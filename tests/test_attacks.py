import dataclasses

import numpy as np
import pytest
import torch
from fedshield.simulations.attacks import (
    ATTACKS,
    alie_z_max,
    apply_trigger,
    select_byzantine,
    triggered_test_set,
)
from fedshield.simulations.attacks.data_poisoning import IMAGE_TRIGGER_VALUE
from fedshield.simulations.attacks.minmax import perturbation
from fedshield.tasks.base import get_task
from scipy.stats import norm

from fedshield.errors import ConfigError
from fedshield.schema import AttackConfig
from fedshield.validation import from_dict


def rounds(h=9, b=3, d=200, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    honest = (torch.randn(h, d, generator=g) * 0.1 + torch.linspace(-1, 1, d)).to(dtype)
    own = (torch.randn(b, d, generator=g) * 0.1 + torch.linspace(-1, 1, d)).to(dtype)
    return own, honest, g


def craft(name, own, honest, g=None, **params):
    g = g or torch.Generator().manual_seed(0)
    return ATTACKS[name].craft(own, honest, AttackConfig(**params), g)


# --- registry and config ---------------------------------------------------------------------

def test_config_names_are_the_registry(monkeypatch):
    for name in ATTACKS:  # every registered attack is a valid attack.name, with no copied list
        assert from_dict({"attack": {"name": name, "byzantine_fraction": 0.2}}).attack.name == name
    monkeypatch.setitem(ATTACKS, "my-attack", ATTACKS["gaussian"])
    assert from_dict({"attack": {"name": "my-attack", "byzantine_fraction": 0.2}}).attack.name
    for attack in ATTACKS.values():
        assert (attack.poison_data is not None) == (attack.kind in ("data", "both"))
        assert (attack.craft is not None) == (attack.kind in ("update", "both"))


def test_config_refuses_unknown_attack_and_lists_names():
    with pytest.raises(ConfigError, match="attack.name.*minmax"):
        from_dict({"attack": {"name": "evil"}})


@pytest.mark.parametrize("attack,match", [
    ({"name": "none", "byzantine_fraction": 0.2}, "none"),
    ({"name": "none", "byzantine_ids": "1"}, "none"),
    ({"name": "alie"}, "no client is Byzantine"),
    ({"name": "alie", "byzantine_fraction": 0.05}, "no client is Byzantine"),  # 0.05 * 10 < 1
    ({"name": "alie", "byzantine_ids": "0,10"}, "outside"),
    ({"name": "alie", "byzantine_ids": "0,x"}, "not an integer"),
    ({"name": "alie", "byzantine_ids": "2,2"}, "twice"),
    ({"name": "alie", "byzantine_ids": ",".join(map(str, range(10)))}, "every client"),
])
def test_config_refuses_inconsistent_byzantine_setup(attack, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"federation": {"num_clients": 10}, "attack": attack})


def test_config_accepts_consistent_attacks():
    assert from_dict({"attack": {"name": "minmax",
                                 "byzantine_fraction": 0.2}}).attack.name == "minmax"
    assert from_dict({"attack": {"name": "ipm",
                                 "byzantine_ids": "0,3"}}).attack.byzantine_ids == "0,3"
    assert from_dict({}).attack.name == "none"


# --- Byzantine selection ---------------------------------------------------------------------

def test_select_byzantine_is_seeded_and_uses_floor_of_fraction():
    a = select_byzantine(100, 0.29, "", seed=7)
    assert a == select_byzantine(100, 0.29, "", seed=7)
    assert len(a) == 29 and all(0 <= i < 100 for i in a)
    assert a != select_byzantine(100, 0.29, "", seed=8)
    assert len(select_byzantine(10, 0.25, "", seed=0)) == 2
    assert select_byzantine(10, 0.0, "", seed=0) == frozenset()


def test_select_byzantine_explicit_ids_override_fraction():
    assert select_byzantine(10, 0.5, " 0, 3 ", seed=1) == frozenset({0, 3})
    with pytest.raises(ConfigError, match="outside"):
        select_byzantine(4, 0.0, "4", seed=0)
    with pytest.raises(ConfigError, match="not an integer"):
        select_byzantine(4, 0.0, "a", seed=0)


# --- update attacks --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if a.craft])
def test_every_craft_keeps_shape_dtype_and_is_reproducible(name):
    own, honest, _ = rounds(dtype=torch.float32)
    out1 = craft(name, own, honest, torch.Generator().manual_seed(3))
    out2 = craft(name, own, honest, torch.Generator().manual_seed(3))
    assert out1.shape == own.shape and out1.dtype == own.dtype
    assert torch.equal(out1, out2) and torch.isfinite(out1).all()
    assert not torch.equal(out1, own)
    # without honest updates the attackers fall back on their own
    assert craft(name, own, honest[:0]).shape == own.shape


def test_sign_flip_negates_own_update():
    own, honest, _ = rounds()
    assert torch.equal(craft("sign_flip", own, honest), -own)
    assert torch.allclose(craft("sign_flip", own, honest, sign_flip_scale=3.0), -3.0 * own)


def test_scaling_and_backdoor_boost_own_update():
    own, honest, _ = rounds()
    assert torch.allclose(craft("scaling", own, honest, scale=7.0), 7.0 * own)
    assert torch.allclose(craft("backdoor", own, honest, scale=7.0), 7.0 * own)


def test_gaussian_is_seeded_with_the_configured_std():
    own, honest, _ = rounds(b=4, d=20_000)
    a = craft("gaussian", own, honest, torch.Generator().manual_seed(1), noise_std=0.5)
    b = craft("gaussian", own, honest, torch.Generator().manual_seed(1), noise_std=0.5)
    c = craft("gaussian", own, honest, torch.Generator().manual_seed(2), noise_std=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.std()) == pytest.approx(0.5, rel=0.02)
    assert abs(float(a.mean())) < 0.01
    assert not torch.equal(a[0], a[1])  # independent per client


def test_alie_z_max_follows_the_paper():
    # n = 50, f = 24: s = 26 - 24 = 2, z = Phi^-1(48 / 50)
    assert alie_z_max(50, 24) == pytest.approx(norm.ppf(0.96))
    assert alie_z_max(10, 2) == pytest.approx(norm.ppf(0.6))  # s = 4
    assert alie_z_max(2, 1) == 0.0
    assert np.isfinite(alie_z_max(10, 9))  # Byzantine majority: clamped, not infinite


def test_alie_is_mean_minus_z_std_of_honest():
    own, honest, _ = rounds(h=9, b=3)
    z = alie_z_max(12, 3)
    expected = honest.mean(0) - z * honest.std(0)
    out = craft("alie", own, honest)
    assert torch.equal(out, expected.expand(3, -1))
    fixed = craft("alie", own, honest, alie_z=1.5)
    assert torch.equal(fixed[0], honest.mean(0) - 1.5 * honest.std(0))


def test_ipm_is_negative_scaled_honest_mean():
    own, honest, _ = rounds()
    out = craft("ipm", own, honest, ipm_epsilon=0.3)
    mean = honest.mean(0)
    assert torch.allclose(out, -0.3 * mean.expand(3, -1))
    assert float(torch.nn.functional.cosine_similarity(out[0], mean, dim=0)) == pytest.approx(-1.0)


def _gamma(out, honest, direction):
    p = perturbation(honest, direction)
    return float((out[0] - honest.mean(0)) @ p / (p @ p)), p


@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
def test_minmax_stays_within_honest_max_distance_with_maximal_gamma(direction):
    own, honest, _ = rounds(h=9, b=3)
    out = craft("minmax", own, honest, minmax_direction=direction)
    bound = float(torch.cdist(honest, honest).max())
    assert float(torch.cdist(out[:1], honest).max()) <= bound * (1 + 1e-9)
    gamma, p = _gamma(out, honest, direction)
    assert torch.allclose(out[0], honest.mean(0) + gamma * p)
    # analytic gamma*: smallest positive root of |c_i + gamma p|^2 = bound^2 over honest i
    c = honest.mean(0) - honest
    a, b, pp = (c * c).sum(1), c @ p, p @ p
    roots = (-b + torch.sqrt(b * b - pp * (a - bound ** 2))) / pp
    assert gamma == pytest.approx(float(roots.min()), rel=1e-6)
    assert gamma > 0


@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
def test_minsum_stays_within_honest_max_sum_of_squares_with_maximal_gamma(direction):
    own, honest, _ = rounds(h=9, b=3)
    out = craft("minsum", own, honest, minmax_direction=direction)
    d2 = torch.cdist(honest, honest) ** 2
    bound = float(d2.sum(1).max())
    assert float((torch.cdist(out[:1], honest) ** 2).sum()) <= bound * (1 + 1e-9)
    gamma, p = _gamma(out, honest, direction)
    spread = float(((honest - honest.mean(0)) ** 2).sum())
    assert gamma == pytest.approx(np.sqrt((bound - spread) / (len(honest) * float(p @ p))),
                                  rel=1e-6)


def test_minmax_goes_further_than_minsum():
    own, honest, _ = rounds()
    mean = honest.mean(0)
    assert (craft("minmax", own, honest) - mean).norm() > (craft("minsum", own,
                                                                 honest) - mean).norm()


def test_mimic_copies_the_honest_update_furthest_along_the_top_direction():
    own, honest, _ = rounds(h=8, b=2)
    direction = torch.zeros(honest.shape[1], dtype=honest.dtype)
    direction[5] = 1.0
    shifts = torch.tensor([0.5, -0.4, 0.3, 2.0, -0.2, 0.1, -0.6, 0.4], dtype=honest.dtype)
    honest = honest + shifts[:, None] * 10 * direction
    out = craft("mimic", own, honest)
    assert torch.equal(out[0], honest[3]) and torch.equal(out[1], honest[3])


# --- data poisoning --------------------------------------------------------------------------

def test_label_flip_maps_y_to_num_classes_minus_one_minus_y():
    x = np.zeros((10, 4), np.float32)
    y = np.arange(10, dtype=np.int64)
    x2, y2 = ATTACKS["label_flip"].poison_data(x, y, 10, AttackConfig(), np.random.default_rng(0))
    assert y2.tolist() == list(range(9, -1, -1)) and y2.dtype == y.dtype
    assert y.tolist() == list(range(10))  # input untouched


@pytest.fixture(scope="module")
def digits():
    return get_task("digits").load()[0]


def _check_backdoor(x, y, x2, y2, fraction, target, triggered_rows):
    changed = np.flatnonzero((x2 != x).reshape(len(x), -1).any(1) | (y2 != y))
    assert len(changed) <= round(fraction * len(y))
    assert np.all(y2[changed] == target)
    # exactly round(fraction * n) rows carry the trigger and the target label
    assert triggered_rows.sum() == round(fraction * len(y))
    assert np.all(y2[triggered_rows] == target)
    untouched = ~triggered_rows
    assert np.array_equal(x2[untouched], x[untouched]) and np.array_equal(y2[untouched],
                                                                          y[untouched])


def test_backdoor_poisons_only_the_fraction_on_tabular_data(digits):
    x, y = digits.x[:300], digits.y[:300]
    params = AttackConfig(poison_fraction=0.2, target_label=7)
    x2, y2 = ATTACKS["backdoor"].poison_data(x, y, 10, params, np.random.default_rng(0))
    triggered = np.all(x2[:, -3:] == 1.0, axis=1) & (y2 == 7)
    _check_backdoor(x, y, x2, y2, 0.2, 7, triggered)
    assert np.array_equal(x2[triggered], apply_trigger(x[triggered], task_is_image=False))


def test_backdoor_stamps_the_pixel_square_on_images(digits):
    # real digits as (n, 1, 8, 8) images, shifted to MNIST-like normalised units
    x = ((digits.x[:200] - 0.1307) / 0.3081).reshape(-1, 1, 8, 8).astype(np.float32)
    y = digits.y[:200]
    params = AttackConfig(poison_fraction=0.5, target_label=2)
    x2, y2 = ATTACKS["backdoor"].poison_data(x, y, 10, params, np.random.default_rng(1))
    triggered = np.all(x2[:, :, -4:-1, -4:-1] == IMAGE_TRIGGER_VALUE, axis=(1, 2, 3))
    _check_backdoor(x, y, x2, y2, 0.5, 2, triggered)
    # outside the square nothing changes
    mask = np.ones((8, 8), bool)
    mask[-4:-1, -4:-1] = False
    assert np.array_equal(x2[:, 0][:, mask], x[:, 0][:, mask])


def test_apply_trigger_copies_and_stamps_single_images():
    x = np.full((1, 28, 28), -0.4242, np.float32)
    t = apply_trigger(x, task_is_image=True)
    assert np.all(t[0, 24:27, 24:27] == IMAGE_TRIGGER_VALUE)
    assert (t != x).sum() == 9 and np.all(x == np.float32(-0.4242))
    assert IMAGE_TRIGGER_VALUE == pytest.approx((1 - 0.1307) / 0.3081)


def test_triggered_test_set_drops_target_class():
    x = np.zeros((6, 5), np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    t = triggered_test_set(x, y, target_label=1, task_is_image=False)
    assert t.shape == (4, 5) and np.all(t[:, -3:] == 1.0) and np.all(t[:, :2] == 0.0)


def test_backdoor_refuses_a_target_outside_the_classes():
    params = dataclasses.replace(AttackConfig(), target_label=10)
    with pytest.raises(ConfigError, match="target_label"):
        ATTACKS["backdoor"].poison_data(np.zeros((4, 3)), np.zeros(4, int), 10, params,
                                        np.random.default_rng(0))
