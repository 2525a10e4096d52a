import json

import numpy as np
import pytest
from fedshield.server.reputation import Reputation, detection_rate, false_quarantine_rate

from fedshield.schema import ReputationConfig


def test_persistently_suspicious_client_is_quarantined_after_patience_rounds():
    rep = Reputation(threshold=0.5, patience=3, decay=0.5)
    rng = np.random.default_rng(0)
    reported = {}
    for rnd in range(1, 11):
        honest = rng.uniform(0.0, 0.6, size=4)  # noisy, sometimes above threshold for one round
        newly = rep.update(rnd, [0, 1, 2, 3, 9], [*honest, 1.0])
        for c in newly:
            reported[c] = rnd
    assert reported == {9: 3}
    assert rep.quarantined == {9}
    assert rep.scores[9] == 1.0 and all(rep.scores[c] < 0.5 for c in range(4))


def test_only_participating_rounds_count_and_a_good_round_resets_the_streak():
    rep = Reputation(threshold=0.5, patience=2, decay=0.0)  # decay 0: score = latest suspicion
    assert rep.update(1, [7], [0.9]) == []
    assert rep.update(2, [1], [0.1]) == []  # 7 absent: streak kept
    assert rep.update(3, [7], [0.2]) == []  # reset
    assert rep.update(4, [7], [0.8]) == []
    assert rep.update(5, [7], [0.8]) == [7]
    assert rep.update(6, [7], [0.9]) == []  # reported once
    assert rep.quarantined_at == {7: 5}


def test_moving_average_smooths_one_bad_round():
    rep = Reputation(threshold=0.5, patience=1, decay=0.8)
    rep.update(1, [3], [0.1])
    assert rep.update(2, [3], [1.0]) == []  # 0.8 * 0.1 + 0.2 * 1.0 = 0.28
    assert rep.scores[3] == pytest.approx(0.28)


def test_screening_rejections_count_as_full_suspicion():
    rep = Reputation(threshold=0.5, patience=2)
    rep.update(1, [0, 1], [0.0, 0.0], rejected=[2])
    assert rep.update(2, [0, 1], [0.0, 0.0], rejected=[2]) == [2]
    assert rep.scores[2] == 1.0


def test_invalid_inputs_are_refused():
    rep = Reputation(threshold=0.5, patience=2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        rep.update(1, [0], [1.5])
    with pytest.raises(ValueError, match="suspicion values"):
        rep.update(1, [0, 1], [0.5])
    rep.update(1, [0], [0.5])
    with pytest.raises(ValueError, match="already recorded"):
        rep.update(1, [0], [0.5])


def test_state_dict_round_trips_through_json_and_resumes_identically():
    cfg = ReputationConfig(threshold=0.4, patience=3, decay=0.3)
    a = Reputation.from_config(cfg)
    rng = np.random.default_rng(1)
    for rnd in range(1, 5):
        a.update(rnd, [0, 1, 5], rng.uniform(0, 1, 3), rejected=[8] if rnd % 2 else [])
    b = Reputation(threshold=0.9, patience=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert b.scores == a.scores and b.quarantined == a.quarantined
    for rnd in range(5, 9):
        s = rng.uniform(0.3, 1, 4)
        assert a.update(rnd, [0, 1, 5, 8], s) == b.update(rnd, [0, 1, 5, 8], s)
    assert a.state_dict() == b.state_dict()


def test_quarantine_metrics():
    assert false_quarantine_rate({1, 2, 7}, {7, 8}, num_clients=10) == pytest.approx(2 / 8)
    assert false_quarantine_rate(set(), {7}, num_clients=10) == 0.0
    assert detection_rate({1, 2, 7}, {7, 8}) == 0.5
    assert detection_rate(set(), set()) == 1.0
