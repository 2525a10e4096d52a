"""Epsilon from plain events equals Opacus' own accountants; composition is concatenation."""

import pytest
from fedshield.privacy.accounting import compact, epsilon, make_accountant
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from fedshield.errors import ConfigError

DELTA = 1e-5
OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_epsilon_equals_an_independent_opacus_accountant(name):
    history = [(1.1, 0.01, 300)]
    acc = OPACUS[name]()
    acc.history = list(history)
    assert epsilon(history, DELTA, name) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_two_rounds_compose_like_one_accountant_stepping_both(name):
    round1, round2 = [(1.0, 0.02, 50)], [(1.5, 0.02, 50)]
    stepping = OPACUS[name]()
    for noise, rate, steps in round1 + round2:
        for _ in range(steps):
            stepping.step(noise_multiplier=noise, sample_rate=rate)
    both = epsilon(round1 + round2, DELTA, name)
    assert both == pytest.approx(stepping.get_epsilon(delta=DELTA), rel=1e-9)
    assert both > epsilon(round1, DELTA, name) > 0


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_repeated_rounds_equal_one_long_run(name):
    # 5 separate rounds of the same mechanism are exactly 5x the steps (what one engine would log).
    assert epsilon([(1.0, 0.02, 40)] * 5, DELTA, name) == pytest.approx(
        epsilon([(1.0, 0.02, 200)], DELTA, name), rel=1e-12)


def test_compact_merges_identical_mechanisms_only():
    assert compact([(1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 4), (1.0, 0.2, 0)]) == [(1.0, 0.1, 7),
                                                                                     (2.0, 0.1, 1)]


def test_epsilon_grows_with_steps_and_falls_with_noise():
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(1.0, 0.01, 100)], DELTA) < epsilon([(1.0, 0.01, 400)], DELTA)
    assert epsilon([(2.0, 0.01, 100)], DELTA) < epsilon([(1.0, 0.01, 100)], DELTA)


def test_prv_is_tighter_than_rdp():
    history = [(1.0, 0.01, 1000)]
    assert epsilon(history, DELTA, "prv") < epsilon(history, DELTA, "rdp")


def test_huge_epsilon_falls_back_to_the_rdp_bound_instead_of_exploding():
    # PRV would need minutes and gigabytes here; the RDP bound is returned (still a valid bound).
    history = [(0.2, 0.01, 5000)]
    assert epsilon(history, DELTA, "prv") == epsilon(history, DELTA, "rdp") > 64


@pytest.mark.parametrize("bad", [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1),
                                 ("x", 0.1, 1), (1.0,)])
def test_invalid_events_are_refused(bad):
    with pytest.raises(ConfigError):
        epsilon([bad], DELTA)


def test_gdp_refuses_to_compose_different_mechanisms_and_unknown_names():
    with pytest.raises(ConfigError, match="gdp accountant needs one constant"):
        epsilon([(1.0, 0.01, 10), (2.0, 0.01, 10)], DELTA, "gdp")
    with pytest.raises(ConfigError, match="unknown accountant"):
        make_accountant("moments")
    with pytest.raises(ConfigError, match="delta"):
        epsilon([(1.0, 0.01, 10)], 1.0)


# -- PLD: an independent accountant under every stated epsilon ----------------------------------

def _fresh_pld(history, delta):
    import dp_accounting as dpa
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant()  # its default (finer) grid, built here independently of fedshield
    for noise, rate, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(noise)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp", "pld"])
@pytest.mark.parametrize("history", [[(1.1, 0.01, 300)], [(1.0, 0.02, 50), (1.5, 0.02, 50)],
                                     [(0.8, 1 / 24, 192)]])
def test_a_reported_epsilon_is_never_below_pld(accountant, history):
    from fedshield.privacy.accounting import pld_epsilon, reported_epsilon

    if accountant == "gdp" and len(history) > 1:
        pytest.skip("gdp cannot compose different mechanisms (refused above)")
    stated = reported_epsilon(history, DELTA, accountant)
    assert stated >= pld_epsilon(history, DELTA)
    # fedshield's coarser PLD grid is pessimistic: at or above the fine grid, within 0.1%
    assert stated >= _fresh_pld(history, DELTA)
    assert pld_epsilon(history, DELTA) == pytest.approx(_fresh_pld(history, DELTA), rel=1e-3)


def test_gdp_underestimates_and_the_stated_epsilon_is_pld_then():
    """The default MNIST schedule (q = 1/24, 8 rounds x 24 steps): gdp's noise for eps 3.0 really
    spends more by PLD; the stated epsilon is PLD's, never gdp's."""
    from fedshield.privacy.accounting import pld_epsilon, reported_epsilon, side_by_side
    from fedshield.privacy.planner import MIN_NOISE
    from scipy.optimize import brentq

    rate, steps = 1 / 24, 192
    sigma = brentq(lambda s: epsilon([(s, rate, steps)], DELTA, "gdp") - 3.0, MIN_NOISE, 10)
    truth = pld_epsilon([(sigma, rate, steps)], DELTA)
    assert truth > 3.3  # gdp is not a bound: >10% over
    assert reported_epsilon([(sigma, rate, steps)], DELTA, "gdp") == truth
    both = side_by_side([(sigma, rate, steps)], DELTA, ("prv", "pld"))
    assert both["prv"] == pytest.approx(both["pld"], rel=0.01)  # two tight accountants agree


def test_memoised_epsilons_are_the_libraries_own():
    """The per-process memos (Opacus' per-order RDP, dp_accounting's per-event PLDs) change no
    value: PLD equals a fresh PLDAccountant's over the same events, and the memoised RDP equals
    Opacus' unmemoised function; a repeat is answered from the memo."""
    import dp_accounting as dpa
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from fedshield.privacy.accounting import PLD_DISCRETIZATION, _epsilon, pld_epsilon
    from opacus.accountants.analysis import rdp

    history = [(1.3, 1 / 6, 48), (50.0, 1.0, 1), (20.0, 1.0, 9)]
    acc = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for noise, rate, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(noise)), steps)
    # the same FFT composition in the same order: equal up to float rounding in numpy's FFT
    assert pld_epsilon(history, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    epsilon(history, DELTA, "prv")  # installs the RDP memo
    assert hasattr(rdp._compute_rdp, "cache_info")
    for order in (1.5, 2.0, 12.0):
        assert rdp._compute_rdp(1 / 6, 1.3, order) == rdp._compute_rdp.__wrapped__(1 / 6, 1.3,
                                                                                      order)
    before = _epsilon.cache_info().hits
    assert epsilon(history, DELTA, "prv") == epsilon(list(history), DELTA, "prv")
    assert _epsilon.cache_info().hits > before
    fresh = PRVAccountant()
    fresh.history = list(history)
    assert epsilon(history, DELTA, "prv") == fresh.get_epsilon(delta=DELTA)
