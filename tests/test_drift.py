"""Drift statistics, the windowed monitor and its trigger, and DP reference histograms."""

import numpy as np
import pytest
from fedshield.deployment.drift import (
    DriftMonitor,
    js_distance,
    ks_binned,
    psi,
    replay_windows,
    window_scores,
)
from fedshield.deployment.reference_stats import (
    Reference,
    fixed_edges,
    histograms,
    image_summary_features,
    merge_histograms,
    monitored_features,
    reference_from_data,
)
from fedshield.privacy.reference import reference_sensitivity, release_reference
from fedshield.tasks import get_task
from scipy import stats


def client_histograms(x, y, input_shape, num_classes, edges, sigma, rng):
    """One client's DP release of its monitored features' histograms (privacy/reference.py)."""
    return release_reference(monitored_features(x, input_shape), y, num_classes, edges, sigma,
                             rng)


def test_psi_matches_its_formula_and_is_zero_without_change():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    assert psi(p, p) == pytest.approx(0.0)
    assert psi(p, q) == pytest.approx(0.3 * np.log(0.2 / 0.5) * -1 * 2)  # (q-p)ln(q/p) summed
    assert psi(p, q) == pytest.approx(psi(q, p))  # symmetric


def test_js_distance_bounds():
    p = np.array([1.0, 0.0, 0.0])
    assert js_distance(p, p) == pytest.approx(0.0)
    assert js_distance(p, np.array([0.0, 0.0, 1.0])) == pytest.approx(1.0)  # disjoint, base 2


def test_binned_ks_matches_scipy_on_fine_bins():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 4000), rng.normal(0.3, 1, 4000)
    edges = np.linspace(-6, 6, 2001)
    pa, pb = np.histogram(a, edges)[0] / len(a), np.histogram(b, edges)[0] / len(b)
    assert ks_binned(pa, pb) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=0.005)


def test_psi_separates_shifted_normals():
    rng = np.random.default_rng(1)
    feats_ref = rng.normal(0, 1, (5000, 1))
    edges = fixed_edges(feats_ref, 10)
    ref = Reference(edges, histograms(feats_ref, edges) / 5000, np.array([0.5, 0.5]), ("x",), (1,),
                    "test")
    same = window_scores(ref, rng.normal(0, 1, (500, 1)), np.zeros(500))
    shifted = window_scores(ref, rng.normal(1, 1, (500, 1)), np.zeros(500))
    assert same["psi_mean"] < 0.05 < 0.25 < shifted["psi_mean"]


@pytest.fixture(scope="module")
def digits_reference():
    task = get_task("digits")
    train, test = task.load()
    ref = reference_from_data(train.x, train.y, task.input_shape, 10, task.feature_names, 10,
                              "train split")
    return ref, test


def shifted_right(x):
    return np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)


def test_clean_held_out_digits_do_not_trigger(digits_reference):
    ref, test = digits_reference
    monitor = DriftMonitor(ref, window=100, threshold=0.2, patience=2)
    for start in range(0, 300, 50):
        monitor.observe(test.x[start:start + 50], test.y[start:start + 50])
    assert len(monitor.reports) == 3
    assert all(r.scores["psi_mean"] < 0.2 and not r.over_threshold for r in monitor.reports)
    assert monitor.triggers == []


@pytest.mark.parametrize("corrupt", [lambda x: 1.0 - x, shifted_right], ids=["inverted", "shifted"])
def test_drifted_digits_trigger_after_patience_windows(digits_reference, corrupt):
    ref, test = digits_reference
    fired = []
    monitor = DriftMonitor(ref, window=100, threshold=0.2, patience=3, on_trigger=fired.append)
    monitor.observe(test.x[:100], test.y[:100])  # one clean window first
    for k in range(6):  # 50 drifted examples at a time: windows 1, 2, 3 complete at k = 1, 3, 5
        monitor.observe(corrupt(test.x[50 * k: 50 * k + 50]), test.y[50 * k: 50 * k + 50])
        assert len(fired) == (1 if k == 5 else 0)
    assert [r.over_threshold for r in monitor.reports] == [False, True, True, True]
    assert len(fired) == 1 and fired[0].windows == [1, 2, 3]
    assert all(s > 0.2 for s in fired[0].scores) and fired[0].statistic == "psi_mean"
    assert "retraining triggered" in monitor.reports[-1].note


def test_trigger_blocked_without_privacy_budget(digits_reference):
    ref, test = digits_reference
    monitor = DriftMonitor(ref, window=50, threshold=0.2, patience=2,
                           budget_remaining=lambda: False)
    monitor.observe(1.0 - test.x[:150], test.y[:150])
    assert monitor.triggers == []
    assert "no privacy budget" in monitor.reports[1].note


def test_replay_of_logged_windows_counts_consecutive_only():
    logged = [{"index": i, "scores": {"psi_mean": v}} for i, v in enumerate([0.3, 0.1, 0.3, 0.4,
                                                                             0.5, 0.6])]
    fired = replay_windows(logged, "psi_mean", 0.2, 3)
    assert [t.windows for t in fired] == [[2, 3, 4]]


def test_prediction_drift_seen_in_class_mix(digits_reference):
    ref, test = digits_reference
    only_zeros = np.zeros(200, dtype=np.int64)
    assert window_scores(ref, monitored_features(test.x[:200], (64,)),
                         only_zeros)["prediction_psi"] > 1.0
    assert window_scores(ref, monitored_features(test.x[:200], (64,)),
                         test.y[:200])["prediction_psi"] < 0.1


def test_image_summary_features_see_inversion():
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    x[1, :, :7, :] = 1.0  # top band bright
    f = image_summary_features(x)
    assert f.shape == (2, 9)
    assert f[1, 0] == pytest.approx(0.25) and f[1, 1] == pytest.approx(1.0) and f[1, 2] == 0.0


def test_dp_histogram_noise_has_the_stated_std_and_event():
    task = get_task("digits")
    train, _ = task.load()
    edges = fixed_edges(monitored_features(train.x, (64,)), 10)
    exact = histograms(monitored_features(train.x[:200], (64,)), edges)
    sigma = 0.7
    rng = np.random.default_rng(0)
    draws = [client_histograms(train.x[:200], train.y[:200], (64,), 10, edges, sigma,
                               rng) for _ in range(40)]
    noise = np.stack([d.feature_counts - exact for d in draws])
    # add/remove one example moves one count in each of the 64 + 1 histograms
    expected_std = sigma * np.sqrt(65)
    assert reference_sensitivity(64) == pytest.approx(np.sqrt(65))
    assert draws[0].noise_std == pytest.approx(expected_std)
    assert noise.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise.mean()) < 0.1 * expected_std
    assert draws[0].event == (0.7, 1.0, 1)


def test_event_composes_as_one_gaussian_mechanism_in_opacus():
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, delta = 1.0, 1e-5

    def gaussian_delta(eps):  # exact (Balle & Wang 2018), sensitivity 1, std sigma
        return (stats.norm.cdf(0.5 / sigma - eps * sigma)
                - np.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma))

    event = client_histograms(np.zeros((5, 64)), np.zeros(5, dtype=int), (64,), 10,
                              fixed_edges(np.zeros((5, 64)), 4), sigma,
                              np.random.default_rng(0)).event
    prv = PRVAccountant()
    prv.history = [event]
    eps = prv.get_epsilon(delta)
    assert gaussian_delta(eps) <= delta < gaussian_delta(eps - 0.05)
    rdp = RDPAccountant()
    rdp.history = [event]
    assert rdp.get_epsilon(delta) >= eps  # RDP is looser, never tighter


def test_merged_client_histograms_approach_the_clean_reference():
    task = get_task("digits")
    train, _ = task.load()
    feats = monitored_features(train.x, (64,))
    edges = fixed_edges(feats, 10)
    rng = np.random.default_rng(0)
    parts = [client_histograms(train.x[idx], train.y[idx], (64,), 10, edges, 0.5, rng)
             for idx in np.array_split(np.arange(len(train)), 4)]
    merged = merge_histograms(parts, edges, task.feature_names, (64,))
    clean = histograms(feats, edges) / len(train)
    assert np.allclose(merged.probs.sum(1), 1.0) and (merged.probs >= 0).all()
    total_variation = 0.5 * np.abs(clean - merged.probs).sum(1)
    # What the Gaussian noise alone explains: 0.5 * bins * E|N(0, std)| / n.
    noise_tv = 0.5 * 10 * np.sqrt(2 / np.pi) * merged.noise_std / len(train)
    assert 0.3 * noise_tv < total_variation.mean() < 1.5 * noise_tv
    # The noisy reference still tells clean held-out digits from inverted ones.
    _, test = task.load()
    clean_score = window_scores(merged, monitored_features(test.x[:200], (64,)),
                                test.y[:200])["psi_mean"]
    inverted_score = window_scores(merged, monitored_features(1 - test.x[:200], (64,)),
                                   test.y[:200])["psi_mean"]
    assert clean_score < 0.2 < 1.0 < inverted_score
    assert np.abs(merged.class_priors - np.bincount(train.y) / len(train)).max() < 0.03
    # sqrt(4 clients) * per-client std
    assert merged.noise_std == pytest.approx(0.5 * np.sqrt(65) * 2)
    restored = Reference.from_json(merged.to_json())
    assert np.array_equal(restored.edges, merged.edges) and np.allclose(restored.probs,
                                                                        merged.probs)
