"""benchmarks/bench_deployment.py's pure parts: the config it runs and the round split."""

from __future__ import annotations

import pytest
from fedshield.benchmarks.bench_deployment import (
    overrides,
    run_config_string,
    split_rounds,
    table,
    target_s,
)

from fedshield import validation
from fedshield.run_records import MetricsLine


def timing(kind: str, rnd: int, created: float, start: float, handler: tuple[float, float],
           **local: float) -> dict:
    return {"kind": kind, "run": 1, "round": str(rnd), "created": created,
            "process_start": start, "handler_start": handler[0], "handler_end": handler[1],
            **local}


def test_split_rounds_follows_the_last_client_of_each_exchange():
    # Round 2 (round 1 is start-up and left out): started at 100.0, 10 s, 1.5 s of server work.
    lines = [MetricsLine(round=1, seconds=30.0, server_seconds=5.0),
             MetricsLine(round=2, seconds=10.0, server_seconds=1.5)]
    timings = [
        timing("train", 1, 0.0, 1.0, (2.0, 3.0), client_s=1.0, train_s=0.9),
        # two clients; the second finishes last and decides the train exchange
        timing("train", 2, 100.2, 101.0, (101.5, 101.7), client_s=0.2, train_s=0.15),
        timing("train", 2, 100.2, 102.0, (102.4, 103.0), client_s=0.6, train_s=0.5),
        timing("evaluate", 2, 104.0, 105.0, (105.1, 105.3)),
        timing("evaluate", 2, 104.0, 105.5, (106.0, 106.1)),  # the last evaluation: 0.1 s
    ]
    split = split_rounds(lines, timings)
    assert split["deliver_s"] == pytest.approx(1.8)  # created 100.2 -> acquired 102.0
    assert split["startup_s"] == pytest.approx(0.4)
    assert split["handler_s"] == pytest.approx(0.6)
    assert split["eval_handler_s"] == pytest.approx(0.1)
    assert split["return_s"] == pytest.approx(10.0 - (103.0 - 100.2))
    assert split["server_s"] == 1.5
    assert split["fedshield_s"] == pytest.approx(0.6 + 0.1 + 1.5)
    assert split["flower_s"] == pytest.approx(10.0 - 2.2)
    assert split["client_own_s"] == pytest.approx(0.4)  # median of both clients' 0.2 and 0.6
    assert split["train_s"] == pytest.approx(0.325)
    assert target_s(split) == pytest.approx(8.8)  # Flower's 7.8 s + 1 s is above 8 s


def test_split_rounds_without_server_seconds_or_evaluation_leaves_the_shares_out():
    """Lines from before server_seconds (or a run without evaluation) still split the train
    exchange; Flower's and fedshield's shares need the server's own seconds."""
    lines = [MetricsLine(round=1, seconds=3.0), MetricsLine(round=2, seconds=4.0)]
    split = split_rounds(lines, [timing("train", 2, 10.0, 11.0, (11.5, 12.0))])
    assert split["handler_s"] == pytest.approx(0.5) and split["eval_handler_s"] == 0.0
    assert "flower_s" not in split and "fedshield_s" not in split
    assert target_s(split) is None
    assert split_rounds(lines, []) == {}  # no timing lines (e.g. the wrong run): nothing


def test_dp_flag_keeps_the_default_runs_dp_and_plain_runs_have_none(tmp_path):
    plain = validation.from_dict(overrides("mnist5k", 3, 3, tmp_path))
    dp = validation.from_dict(overrides("mnist5k", 3, 3, tmp_path, dp=True))
    assert not plain.privacy.enabled
    assert dp.privacy.enabled and dp.privacy.target_epsilon == 3.0 and dp.privacy.max_epsilon
    assert dp.federation.fraction_evaluate == 1.0  # both exchanges, as in the plain run
    polled = overrides("digits", 1, 1, tmp_path, reply_poll_s=3.0)
    assert "federation.reply_poll_s=3.0" in run_config_string("digits", 1, 1, tmp_path,
                                                              reply_poll_s=3.0)
    assert validation.from_dict(polled).federation.reply_poll_s == 3.0
    with pytest.raises(Exception, match="reply_poll_s"):
        validation.from_dict(overrides("digits", 1, 1, tmp_path, reply_poll_s=5.0))


def test_table_has_the_headline_columns_first():
    text = table([{"mode": "deployment", "sites": 3, "round_s": 7.25, "flower_s": 5.0,
                   "fedshield_s": 2.25, "client_own_s": 0.02}])
    header, _, row = text.splitlines()
    assert header.split(" | ")[:6] == ["mode", "sites", "round", "Flower's share",
                                       "fedshield's share", "client's own time"]
    assert row.split(" | ")[:7] == ["deployment", "3", "7.25", "5", "2.25", "0.02", "-"]


def test_a_timing_line_carries_its_own_messages_local_seconds_only(capsys):
    """The site's log line (client/timing.py) is where the benchmark reads the client's own time
    and training loop under DP; one message's seconds never reach the next message's line."""
    from fedshield.client import timing as client_timing

    client_timing.begin_task(50.0)  # as the long-lived worker does while it serves a task
    try:
        client_timing.note_local(train_s=0.5, client_s=0.75)
        client_timing.note_message("train", 40.0, 9, "2", 51.0)
        client_timing.note_message("evaluate", 41.0, 9, "2", 52.0)
    finally:
        client_timing.begin_task(None)
    train, evaluate = client_timing.parse_log(capsys.readouterr().err)
    assert (train["kind"], train["round"], train["process_start"]) == ("train", "2", 50.0)
    assert (train["train_s"], train["client_s"]) == (0.5, 0.75)
    assert evaluate["kind"] == "evaluate" and "train_s" not in evaluate
