"""server/prompt_grid.py: the ServerApp's prompt reply polling through Flower's public Grid API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fedshield.server.prompt_grid import PromptGrid

from fedshield import validation
from fedshield.errors import ConfigError
from fedshield.run_records import MetricsLine, read_metrics
from tests.config_support import neutral_config


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a sleep of nothing is a busy loop"
        self.sleeps.append(seconds)
        self.now += seconds


def reply(to: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))


class FakeGrid:
    """Message ``i`` is answered on the ``ready[i]``-th pull (never when None); records every
    pull's ids and the clock when it happened."""

    def __init__(self, ready: list[int | None], clock: FakeClock, ids=None) -> None:
        self.ready, self.clock = ready, clock
        self.ids = ids if ids is not None else [f"m{i}" for i in range(len(ready))]
        self.pulls: list[tuple[float, list[str]]] = []
        self.node_to_partition = {7: 0}

    def push_messages(self, messages):
        assert list(messages) == ["a"] * len(self.ready)
        return list(self.ids)

    def pull_messages(self, message_ids):
        message_ids = list(message_ids)
        self.pulls.append((self.clock(), message_ids))
        n = len(self.pulls)
        return [reply(i) for i, r in zip(self.ids, self.ready, strict=True)
                if i in message_ids and r is not None and r <= n]


def prompt(grid: FakeGrid, clock: FakeClock, poll_s: float = 0.1, exchanges=None) -> PromptGrid:
    return PromptGrid(grid, poll_s, None if exchanges is None else exchanges.append, clock=clock,
                      sleep=clock.sleep)


def test_pulls_every_poll_interval_until_every_reply_is_in():
    clock = FakeClock()
    grid = FakeGrid([3, 1, 5], clock)
    exchanges: list[float] = []
    got = prompt(grid, clock, 0.25, exchanges).send_and_receive(["a"] * 3, timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["m0", "m1", "m2"]
    assert len(got) == 3  # each reply once
    # Five pulls, a 0.25 s sleep between two of them and none after the last: never busy.
    assert [t for t, _ in grid.pulls] == [100.0, 100.25, 100.5, 100.75, 101.0]
    assert clock.sleeps == [0.25] * 4
    # Only the unanswered ids are asked for again, in the order they were pushed.
    assert [ids for _, ids in grid.pulls] == [["m0", "m1", "m2"], ["m0", "m2"], ["m0", "m2"],
                                              ["m2"], ["m2"]]
    assert exchanges == [pytest.approx(1.0)]  # push to last pull, for server_seconds


def test_timeout_returns_what_came_in_without_sleeping_past_it():
    clock = FakeClock()
    grid = FakeGrid([2, None], clock)
    got = prompt(grid, clock, 0.4).send_and_receive(["a"] * 2, timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in got] == ["m0"]  # as Flower: the partial set
    assert clock.now == pytest.approx(101.0)  # returned at the deadline, not a poll later
    assert clock.sleeps == pytest.approx([0.4, 0.4, 0.2])  # the last wait is cut to the deadline
    assert len(grid.pulls) == 3


def test_zero_timeout_pulls_nothing_and_no_timeout_waits_as_long_as_it_takes():
    clock = FakeClock()
    grid = FakeGrid([1], clock)
    assert prompt(grid, clock).send_and_receive(["a"], timeout=0.0) == []  # Flower: no pull
    assert grid.pulls == []
    grid = FakeGrid([400], clock)
    got = prompt(grid, clock, 0.1).send_and_receive(["a"])  # timeout None: no limit
    assert len(got) == 1 and len(grid.pulls) == 400 and len(clock.sleeps) == 399


def test_a_message_that_could_not_be_pushed_is_not_waited_for():
    clock = FakeClock()
    grid = FakeGrid([1, None, None], clock, ids=["m0", None, ""])
    got = prompt(grid, clock).send_and_receive(["a"] * 3, timeout=600)
    assert len(got) == 1 and grid.pulls == [(100.0, ["m0"])] and clock.sleeps == []


def test_delegates_the_rest_of_the_grid():
    clock = FakeClock()
    grid = FakeGrid([1], clock)
    wrapped = prompt(grid, clock)
    assert wrapped.node_to_partition == {7: 0}  # the in-process grid's mapping, for sampling
    assert [r.metadata.reply_to_message_id for r in wrapped.pull_messages(["m0"])] == ["m0"]
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


@pytest.mark.parametrize("bad", [0.0, -0.1, 3.01])
def test_poll_interval_is_checked(bad):
    with pytest.raises(ConfigError, match=r"federation.reply_poll_s = .* expected seconds in"):
        validation.from_dict({"federation": {"reply_poll_s": bad}})
    with pytest.raises(ValueError, match="reply_poll_s"):
        PromptGrid(object(), bad)  # type: ignore[arg-type]


def test_metrics_line_carries_the_servers_own_seconds(tmp_path):
    """An in-process run goes through the wrapper: the round's exchanges hold the clients'
    training (run one after another there), so the server's own seconds are at most the round's
    seconds less the clients' own."""
    from fedshield.simulations.runner import simulate

    cfg = neutral_config({"name": "pg", "output_dir": str(tmp_path), "task": {"name": "digits"},
                          "federation": {"num_clients": 2, "rounds": 2, "fraction_evaluate": 1.0},
                          "partition": {"kind": "iid"}, "deployment": {"handoff": False}})
    lines = read_metrics(simulate(cfg).run_dir)
    assert len(lines) == 2
    for line in lines:
        assert line.server_seconds is not None and line.seconds is not None
        # 2 ms: the three values are rounded to 1 ms each in metrics.jsonl
        assert 0 < line.server_seconds <= line.seconds - sum(line.client_seconds.values()) + 2e-3
        assert MetricsLine.from_dict(line.to_dict()).server_seconds == line.server_seconds
