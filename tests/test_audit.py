"""The empirical privacy audit: its bound math against hand-computed values, its attacks against
the project's training (digits), and the seed-knowing server as a standing regression test."""

import dataclasses
import json
import math

import numpy as np
import pytest
from fedshield.privacy import audit
from scipy import special
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fedshield import configio, schema
from fedshield.errors import ConfigError
from tests.config_support import neutral_config

# -- the one-run bound ---------------------------------------------------------------------


def brute_p_value(m, r, v, eps, delta):
    """Theorem 5.2 of Steinke et al. written out with math.comb, term by term."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_without_delta_is_the_closed_form(r):
    # P[Binom(r, q) >= r] = q^r = beta  =>  eps = logit(beta^(1/r)); r=100: 3.49297
    q = 0.05 ** (1 / r)
    assert audit.epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    if r == 100:
        assert audit.epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(3.49297, abs=1e-5)


def test_two_of_two_with_delta_matches_the_hand_formula():
    # r = v = 2: tail q^2; alpha = max(pmf(1), (pmf(1) + pmf(0)) / 2) = max(2q(1-q), (1-q^2)/2)
    m, delta, eps = 50, 1e-3, 2.0
    q = special.expit(eps)
    hand = q**2 + 2 * m * delta * max(2 * q * (1 - q), (1 - q**2) / 2)
    assert audit.p_value(m, 2, 2, eps, delta) == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (1000, 100, 100, 3.0, 1e-5), (1000, 200, 150, 1.0, 1e-4), (500, 50, 20, 0.5, 1e-3),
    (100, 100, 0, 1.0, 1e-2), (10, 3, 3, 0.0, 0.0)])
def test_p_value_equals_the_term_by_term_theorem(m, r, v, eps, delta):
    assert audit.p_value(m, r, v, eps, delta) == pytest.approx(brute_p_value(m, r, v, eps, delta),
                                                               rel=1e-9, abs=1e-15)


def test_the_bound_is_the_boundary_and_delta_only_lowers_it():
    m, r, v, delta = 1000, 100, 100, 1e-5
    eps = audit.epsilon_lower_bound(m, r, v, delta)
    assert brute_p_value(m, r, v, eps, delta) < 0.05 <= brute_p_value(m, r, v, eps + 1e-6, delta)
    assert eps < audit.epsilon_lower_bound(m, r, v, 0.0)
    assert audit.epsilon_lower_bound(m, 100, 50, delta) == 0.0  # chance-level guesses: no bound


def test_randomized_response_is_bounded_tightly_and_validly():
    # eps0-randomized response is exactly the worst case the theorem compares with: the bound must
    # exceed eps0 in at most ~5% of trials and come close to eps0 with many guesses.
    rng = np.random.default_rng(0)
    eps0, trials, m = 1.0, 200, 2000
    q = special.expit(eps0)
    bounds = [audit.epsilon_lower_bound(m, m, int(rng.binomial(m, q)), 0.0) for _ in range(trials)]
    assert np.mean(np.array(bounds) > eps0) <= 0.08  # 5% nominal; 8% allows 200-trial spread
    assert 0.8 < np.median(bounds) <= eps0


def test_guesses_take_the_extremes_and_break_ties_by_index():
    g = audit.guesses(np.array([0.0, 5.0, 0.0, -1.0, 3.0]), k_pos=2, k_neg=2)
    assert g.tolist() == [-1, 1, 0, -1, 1]
    with pytest.raises(ConfigError, match="sum to"):
        audit.guesses(np.zeros(3), 2, 2)


def test_one_run_audit_of_perfect_scores_is_bonferroni_corrected():
    included = np.arange(200) % 2 == 0
    bound = audit.one_run_audit(included.astype(float), included, delta=0.0)
    q = (0.05 / len(audit.GUESS_FRACTIONS)) ** (1 / 200)  # all 200 guesses right, beta / 6
    assert (bound.guesses, bound.correct) == (200, 200)
    assert bound.epsilon == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    with pytest.raises(ConfigError, match="NaN"):
        audit.one_run_audit(np.array([np.nan, 1.0]), np.array([True, False]), 0.0)


# -- membership-inference and reconstruction scores ---------------------------------------------


def test_auc_matches_sklearn_and_tpr_at_fpr_counts_false_positives():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400).round(1)
    labels = np.r_[np.ones(300), np.zeros(400)]
    assert audit.roc_auc(members, nonmembers) == pytest.approx(
        roc_auc_score(labels, np.r_[members, nonmembers]), abs=1e-12)
    out = np.arange(1000.0)  # FPR 1e-3 of 1000 non-members admits one: threshold 998
    assert audit.tpr_at_fpr(np.array([998.5, 999.5, 10.0, 997.0]), out, 1e-3) == 0.5
    # 500 non-members: FPR 1e-3 admits none, so the threshold is their max (499)
    assert audit.tpr_at_fpr(np.array([999.5, 498.5]), out[:500], 1e-3) == 0.5


def test_lira_prefers_the_in_distribution_and_logit_confidence_is_stable():
    rng = np.random.default_rng(2)
    inside = rng.random((8, 500)) < 0.5
    shadow = rng.normal(0, 1, (8, 500)) + 2.0 * inside
    member = rng.random(500) < 0.5
    target = rng.normal(0, 1, 500) + 2.0 * member
    scores = audit.lira_scores(target, shadow, inside)
    assert audit.roc_auc(scores[member], scores[~member]) > 0.8
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    phi = audit.logit_confidence(logits, np.array([0, 0]))
    assert phi[0] == pytest.approx(1000 - math.log(2)) and phi[1] == pytest.approx(math.log(0.5))


def test_reconstruction_quality_ignores_batch_order():
    true = np.array([[0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
    recon = true[[2, 0, 1]] + np.array([[0.1, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert np.sort(audit.matched_mse(true, recon)).tolist() == pytest.approx([0, 0, 0.005])
    assert audit.psnr(0.01, 1.0) == pytest.approx(20.0) and audit.psnr(0.0, 1.0) == math.inf


# -- the attacks on the project's training (digits) --------------------------------------------

ROUNDS = 3  # 3 rounds x 2 epochs of ~30 Poisson batches: a canary misses them all w.p. ~0.3%


def digits_cfg(tmp_path, **privacy) -> schema.Config:
    return neutral_config({
        "name": "audit-test", "seed": 0, "task": {"name": "digits"},
        "federation": {"num_clients": 4, "rounds": ROUNDS}, "partition": {"kind": "iid"},
        "train": {"lr": 0.1, "momentum": 0.5, "batch_size": 16, "local_epochs": 2},
        "privacy": {"ledger_dir": str(tmp_path / "ledgers"), "delta": 1e-5, **privacy}})


def seeded(cfg: schema.Config, reproducible: bool) -> schema.Config:
    """``cfg`` with privacy.reproducible_noise where the schema has it (the secure-randomness
    change); before it every run's noise is seeded."""
    if not any(f.name == "reproducible_noise" for f in dataclasses.fields(cfg.privacy)):
        return cfg
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy,
                                                                reproducible_noise=reproducible))


@pytest.mark.slow
def test_without_dp_the_canary_audit_finds_a_large_bound(tmp_path):
    from fedshield.simulations.audit import canary_audit

    (result,) = canary_audit(digits_cfg(tmp_path), canaries=400, audit_seed=0)
    assert result.stated_epsilon == math.inf
    # 200 guesses: a perfect attack certifies logit((0.05/6)^(1/200)) = 3.72
    assert result.bound.correct == result.bound.guesses and result.bound.epsilon > 3.5


@pytest.fixture(scope="module")
def dp_audit(tmp_path_factory):
    from fedshield.simulations.audit import canary_audit

    cfg = seeded(digits_cfg(tmp_path_factory.mktemp("dp"), enabled=True, target_epsilon=2.0), True)
    return {r.adversary: r for r in canary_audit(cfg, canaries=400, audit_seed=0,
                                                 adversaries=("update", "seed-replay"))}


@pytest.mark.slow
def test_with_dp_the_bound_stays_below_the_stated_epsilon(dp_audit):
    result = dp_audit["update"]
    assert result.stated_epsilon == pytest.approx(2.0, rel=0.02)  # the planner spends the target
    assert result.bound.epsilon <= result.stated_epsilon


@pytest.mark.slow
def test_a_server_that_knows_the_seed_regenerates_reproducible_noise(dp_audit):
    # Standing regression test: with seeded noise the server replays the client's training on
    # zeros, subtracts the noise and beats the stated epsilon. Noise from a secret source must
    # make the same adversary fail (next test).
    result = dp_audit["seed-replay"]
    assert result.noise_reproducible
    assert result.bound.epsilon > result.stated_epsilon


@pytest.mark.slow
def test_secret_noise_defeats_the_seed_replay(tmp_path):
    if not any(f.name == "reproducible_noise" for f in dataclasses.fields(schema.PrivacyConfig)):
        pytest.skip("privacy.reproducible_noise not in the schema yet: every run's noise is seeded")
    from fedshield.simulations.audit import canary_audit

    cfg = seeded(digits_cfg(tmp_path, enabled=True, target_epsilon=2.0), False)
    (result,) = canary_audit(cfg, canaries=400, audit_seed=0, adversaries=("seed-replay",))
    assert not result.noise_reproducible
    assert result.bound.epsilon <= result.stated_epsilon


@pytest.mark.slow
def test_membership_inference_finds_members_of_an_overfit_model(tmp_path):
    from fedshield.simulations.audit import membership_inference

    cfg = digits_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, federation=schema.FederationConfig(num_clients=4, rounds=2),
                              train=dataclasses.replace(cfg.train, local_epochs=10, momentum=0.9))
    loss, lira = membership_inference(cfg, shadows=4, pool_size=200, audit_seed=0)
    assert (loss.attack, lira.attack) == ("loss", "lira")
    assert loss.members + loss.nonmembers == 200 and lira.shadows == 4
    # 100 examples, 20 epochs: memorised. AUC 0.67-0.78 over auditor seeds 0-2; chance is 0.5
    # with a standard deviation of 0.04 at 100 members / 100 non-members.
    assert loss.auc > 0.62 and lira.auc > 0.62
    assert 0.0 <= lira.tpr_at_fpr["0.001"] <= 1.0


@pytest.mark.slow
def test_gradient_inversion_reconstructs_without_dp_and_not_with_it(tmp_path):
    from fedshield.simulations.audit import gradient_inversion

    cfg = digits_cfg(tmp_path, enabled=True, target_epsilon=2.0)
    clear, private = gradient_inversion(cfg, batch=2, iterations=150, audit_seed=0)
    assert (clear.private, private.private) == (False, True) and private.noise_multiplier > 0
    assert clear.psnr > clear.baseline_psnr + 6  # clearly better than the data mean
    assert private.psnr < clear.psnr - 6


# -- the command -------------------------------------------------------------------------------


def write_cfg(tmp_path) -> str:
    path = tmp_path / "audit.toml"
    path.write_text(configio.to_toml(digits_cfg(tmp_path)))
    return str(path)


@pytest.mark.slow
def test_the_command_prints_the_bound_next_to_the_stated_epsilon_as_json(tmp_path):
    from fedshield.cli import app

    out = CliRunner().invoke(app, ["privacy", "audit", write_cfg(tmp_path), "--canaries", "40",
                                   "--attacks", "canary", "--seed", "0", "--json",
                                   "--set", "federation.rounds=1"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    (canary,) = report["canary"]
    assert canary["stated_epsilon"] == "inf" and canary["empirical_epsilon"] > 0
    assert report["membership"] == [] and report["inversion"] == []


@pytest.mark.parametrize("args,message", [(["--canaries", "1"], "at least 2"),
                                          (["--attacks", "dlg"], "choose from"),
                                          (["--client", "9"], "partition id")])
def test_the_command_refuses_bad_input_clearly(tmp_path, args, message):
    from fedshield.cli import app

    out = CliRunner().invoke(app, ["privacy", "audit", write_cfg(tmp_path), *args])
    assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output


@pytest.mark.slow
def test_the_privacy_sweep_reports_the_audit_bound_next_to_the_stated_epsilon(small_cfg, tmp_path):
    """Issue 14: the sweep table has an audit column; the bound never exceeds the stated epsilon
    under DP and is large without DP (the attack works)."""
    from fedshield.simulations.sweeps import privacy_sweep

    base = small_cfg(federation={"rounds": 2}, partition={"kind": "iid"},
                     privacy={"delta": 1e-4})
    private, public = privacy_sweep(base, [2.0, float("inf")], [0], tmp_path / "sweep",
                                    audit_canaries=400)
    assert 0.0 <= private["audit_epsilon_lower_bound"] <= private["epsilon_max"]
    assert public["audit_epsilon_lower_bound"] > 2.0
    table = (tmp_path / "sweep" / "privacy_sweep.md").read_text()
    assert "audit_epsilon_lower_bound" in table
