"""Persistent parallel workers (simulations/workers.py): scheduling, results independent of the
number of workers, failures, clean-up."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch
from fedshield.simulations import runner
from fedshield.simulations.grid import InProcessGrid
from fedshield.simulations.runner import simulate
from fedshield.simulations.workers import (
    WorkerPool,
    _shared_records,
    _without,
    expected_cost,
    resolve_workers,
    schedule,
    threads_per_worker,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedshield.errors import RunFailed
from tests.config_support import neutral_config
from tests.worker_support import failing_factory, toy_apps


# --- the pure parts -------------------------------------------------------------------------
def test_schedule_is_greedy_longest_first():
    # sorted: 0 (5), 2 (4), 4 (3), 3 (2), 1 (1); each to the least-loaded worker, ties to the lower
    assert schedule([5, 1, 4, 2, 3], 2) == [[0, 3, 1], [2, 4]]
    assert schedule([1, 1, 1], 1) == [[0, 1, 2]]
    assert schedule([2.0], 3) == [[0], [], []]
    assert schedule([], 2) == [[], []]
    with pytest.raises(ValueError, match="at least one"):
        schedule([1.0], 0)


@pytest.mark.parametrize("seed", range(20))
def test_schedule_places_every_job_once_within_graham_bound(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 50, size=int(rng.integers(1, 9))).tolist()
    workers = int(rng.integers(1, 4))
    plan = schedule(costs, workers)
    assert sorted(j for jobs in plan for j in jobs) == list(range(len(costs)))
    makespan = max(sum(costs[j] for j in jobs) for jobs in plan)
    # the optimum is at least the mean load and the largest job; LPT <= 4/3 OPT (Graham 1969)
    best = min(max(sum(c for c, w in zip(costs, assign, strict=True) if w == k)
                   for k in range(workers))
               for assign in np.ndindex(*([workers] * len(costs))))
    assert makespan <= 4 / 3 * best + 1e-9


def test_expected_cost_counts_examples_processed():
    assert expected_cost(100, 32, 1, 0) == 100  # one epoch: every example once
    assert expected_cost(100, 32, 2, 0) == 200
    assert expected_cost(100, 32, 5, 3) == 96  # capped at max_steps x batch_size
    assert expected_cost(0, 32, 1, 0) == 0


def test_worker_and_thread_counts():
    assert resolve_workers(0, cores=6) == 6 and resolve_workers(3, cores=6) == 3
    assert threads_per_worker(2, cores=16) == 8 and threads_per_worker(3, cores=2) == 1
    with pytest.raises(ValueError, match="0 \\(one per core\\)"):
        resolve_workers(-1)


# --- results independent of the number of workers --------------------------------------------
TIMING = ("seconds",)  # wall-clock metrics (client-seconds, train-seconds) differ run to run


def _run(cfg, tmp_path):
    """(replies per round as (node, metrics without timings, arrays), final weights, lines)."""
    seen: list = []
    pools: set = set()

    class RecordingGrid(InProcessGrid):
        def pull_messages(self, message_ids):
            out = list(super().pull_messages(message_ids))
            seen.extend(out)
            pools.add(self._pool.size if self._pool else 1)
            return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "InProcessGrid", RecordingGrid)
        summary = simulate(cfg)
    replies = []
    for r in seen:
        assert not r.has_error(), r.error
        metrics = {k: v for k, v in r.content["metrics"].items()
                   if not any(t in k for t in TIMING)}
        arrays = {k: v.numpy() for k, v in r.content["arrays"].items()} \
            if "arrays" in r.content else {}
        replies.append((r.metadata.src_node_id, metrics, arrays))
    # wall-clock fields (seconds, the line's timestamp) differ run to run
    lines = [{k: v for k, v in line.to_dict().items() if "seconds" not in k and k != "timestamp"}
             for line in runner.RunFolder(summary.run_dir).read_metrics()]
    assert pools == {cfg.federation.workers}  # the replies came from that many processes
    return replies, load_file(os.path.join(summary.run_dir, "model.safetensors")), lines


CASES = {
    "fedavg": {},
    "dp-reproducible-noise": {"privacy": {"enabled": True, "noise_multiplier": 1.0,
                                          "reproducible_noise": True,
                                          "release_stats": "exact-outside-guarantee"}},
    "alie": {"attack": {"name": "alie", "byzantine_ids": "1"},
             "aggregation": {"rule": "trimmed_mean"}},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore::UserWarning")  # reproducible noise warns, as it should
def test_one_or_two_workers_give_the_same_run_bit_for_bit(case, tmp_path):
    base = {"name": "w", "seed": 3, "task": {"name": "digits"},
            "federation": {"num_clients": 6, "rounds": 2},
            "partition": {"kind": "dirichlet", "alpha": 1.0},
            "train": {"lr": 0.1, "batch_size": 16, "max_steps": 6},
            "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
            "deployment": {"handoff": False}}
    for key, section in CASES[case].items():
        base[key] = {**base.get(key, {}), **section}
    runs = {}
    threads = torch.get_num_threads()
    try:
        # each client step on as many threads as a worker of two gets (bit equality needs it)
        torch.set_num_threads(threads_per_worker(2))
        for n in (1, 2):
            cfg = neutral_config({**base, "output_dir": str(tmp_path / f"runs{n}"),
                                  "federation": {**base["federation"], "workers": n}})
            runs[n] = _run(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    (replies1, weights1, lines1), (replies2, weights2, lines2) = runs[1], runs[2]
    assert len(replies1) == 12 and len(replies2) == len(replies1)
    for (node1, m1, a1), (node2, m2, a2) in zip(replies1, replies2, strict=True):
        assert node1 == node2 and m1 == m2
        assert ("epsilon" in m1) == (case == "dp-reproducible-noise")
        assert a1.keys() == a2.keys()
        for k in a1:
            assert a1[k].tobytes() == a2[k].tobytes(), k
    assert weights1.keys() == weights2.keys()
    for k in weights1:
        assert weights1[k].tobytes() == weights2[k].tobytes(), k
    assert lines1 == lines2
    assert not mp.active_children()  # the run's workers are gone


# --- failures and clean-up on a toy federation -------------------------------------------------
IDENTITY = (1, 7, 1)


def _messages(pids: list[int]) -> tuple[list[Message], list[Context]]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = IDENTITY
    arrays = ArrayRecord({"w": Array(np.full(4, 0.5, dtype=np.float32))})
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({"server-round": 1})})
    messages, contexts = [], []
    for pid in pids:
        msg = Message(content, 100 + pid, "train", group_id="1")
        msg.metadata.__dict__["_message_id"] = f"m{pid}"
        messages.append(msg)
        contexts.append(Context(run_id=7, node_id=100 + pid, node_config={"partition-id": pid},
                                state=RecordDict(), run_config={}))
    return messages, contexts


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(toy_apps, 2, 1, IDENTITY) as p:
        yield p


def test_the_model_travels_by_shared_memory_not_in_the_message():
    messages, _ = _messages([0, 0])
    shared = _shared_records(messages)
    assert list(shared) == ["arrays"]
    light = _without(messages[0], frozenset(shared))
    assert "arrays" not in light.content and "arrays" in messages[0].content
    assert light.metadata.message_id == messages[0].metadata.message_id


def test_a_crash_and_an_exception_give_error_replies_and_the_round_goes_on(pool):
    messages, contexts = _messages([0, 1, 2])
    # costs put 0 alone on worker 0, then 2 and 1 (in that order) on worker 1
    out = pool.deliver(messages, contexts, [0, 1, 2], [3.0, 1.0, 2.0], timeout=120)
    (ok, ctx0), (crashed, _), (raised, _) = out
    assert not ok.has_error() and ok.content["metrics"]["sum"] == 2.0
    assert ok.metadata.reply_to_message_id == "m0" and "seen" in ctx0.state
    assert crashed.has_error() and "died" in crashed.error.reason
    assert "SIGKILL" in crashed.error.reason and "partition 1" in crashed.error.reason
    assert raised.has_error() and "RuntimeError: client 2 is broken" in raised.error.reason
    # the dead worker is started again for the next round
    again = pool.deliver(*_messages([0, 0]), [0, 0], [1.0, 1.0], timeout=120)
    assert all(not r.has_error() for r, _ in again)
    assert len({r.content["metrics"]["pid"] for r, _ in again}) == 2
    assert pool.restarts >= 1 and len(pool.pids) == 2


def test_the_run_config_travels_once_a_round_and_an_apps_change_comes_back(pool):
    messages, contexts = _messages([0, 4, 4])
    for context in contexts:
        context.run_config = {"k": 1.5}
    contexts[2].run_config = {"k": 2.5}  # not the round's: it travels with its job
    (_, kept), (r4, changed), (r4b, own) = pool.deliver(messages, contexts, [0, 4, 4],
                                                        [3.0, 1.0, 1.0], timeout=120)
    assert r4.content["metrics"]["k"] == 1.5 and r4b.content["metrics"]["k"] == 2.5
    assert kept.run_config is contexts[0].run_config  # unchanged: the parent's own
    assert changed.run_config == {"k": 1.5, "seen": 4.0}
    assert own.run_config == {"k": 2.5, "seen": 4.0}
    assert contexts[1].run_config == {"k": 1.5}  # each client changed its own copy


def test_a_round_past_its_timeout_gives_error_replies_not_a_hang(pool):
    started = time.monotonic()
    messages, contexts = _messages([0, 3])
    (ok, _), (slow, _) = pool.deliver(messages, contexts, [0, 3], [1.0, 1.0], timeout=3)
    assert time.monotonic() - started < 30
    assert not ok.has_error()
    assert slow.has_error() and "round timeout" in slow.error.reason


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_workers_are_stopped_on_keyboard_interrupt_mid_round():
    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    pids = []
    try:
        with pytest.raises(KeyboardInterrupt), WorkerPool(toy_apps, 2, 1, IDENTITY) as p:
            p.deliver(*_messages([0]), [0], [1.0], timeout=120)  # ready, and answering
            pids = p.pids
            signal.alarm(2)
            p.deliver(*_messages([3, 3]), [3, 3], [1.0, 1.0], timeout=120)  # sleeping clients
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)
    assert not [c for c in mp.active_children() if c.pid in pids]


def test_a_worker_that_cannot_start_is_a_clear_run_failure():
    before = set(mp.active_children())
    with pytest.raises(RunFailed, match="could not build its client apps: OSError: no data here"):
        with WorkerPool(failing_factory, 1, 1, IDENTITY) as p:
            p.deliver(*_messages([0]), [0], [1.0], timeout=60)
    assert set(mp.active_children()) <= before
