"""Persistent worker processes for the in-process engine (``federation.workers``).

A :class:`WorkerPool` starts N processes once per run (``spawn``: torch and ``fork`` do not mix).
Each builds the run's ClientApps and loads the task's data once, then, every round, receives:

- the round's broadcast arrays (the global model) once, through one shared-memory block
  (``multiprocessing.shared_memory``), not pickled per client;
- its clients' messages without those arrays, and each client's Context (its run config, the
  same for every node of a run, once per round instead of once per client).

It calls the real ClientApp with the real Message, one client after another, and sends each reply
back with the Context (the parent owns every Context, so a client may train on a different worker
next round). Nothing in a worker depends on which worker it is: a client's randomness comes from
(seed, round, partition id) (client/fit.py ``round_seed``) or from secret streams, so the replies
are the same for any N, bit for bit, with the same torch thread count per client step.

Failures: a ClientApp that raises gives an error reply (as in the sequential grid); a worker that
dies (OOM kill, segfault) gives error replies for the clients it had not answered and is started
again for the next round; a round past its timeout kills the workers still busy. Workers ignore
Ctrl-C (the parent stops them) and exit when the parent's end of their pipe closes.

The pure parts (``resolve_workers``, ``threads_per_worker``, ``expected_cost``, ``schedule``) have
no process or Flower code in them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import heapq
import math
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, cast

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedshield.errors import RunFailed
from fedshield.schema import Config

if TYPE_CHECKING:  # the grid imports this module
    from fedshield.simulations.grid import ReplyFilter

# Builds the ClientApps (partition id -> app) inside a worker: must be picklable (a module-level
# function or a functools.partial of one), since spawned workers import it by name.
AppsFactory = Callable[[], dict[int, ClientApp]]

# Seconds a worker may take to import torch, build its apps and load its data.
START_TIMEOUT = 300.0
# Seconds to wait for a worker to exit after it was asked to, before it is killed.
STOP_TIMEOUT = 10.0
# Native thread pools of a worker (set before it imports numpy or torch): one worker's BLAS
# must not take every core on its own.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- pure parts ----------------------------------------------------------------------------
def resolve_workers(requested: int, cores: int | None = None) -> int:
    """The number of worker processes ``federation.workers = requested`` means (0 = one per
    core this process may use)."""
    if requested < 0:
        raise ValueError(f"workers = {requested}: use 0 (one per core) or a positive count")
    return requested or available_cores(cores)


def available_cores(cores: int | None = None) -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if cores is not None:
        return max(1, cores)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch intra-op threads for each of ``workers`` processes, so workers x threads <= cores."""
    return max(1, available_cores(cores) // max(1, workers))


def expected_cost(examples: int, batch_size: int, local_epochs: int, max_steps: int) -> float:
    """Examples a client processes in one round: local_epochs x its examples, capped at
    max_steps x batch_size (0 = no cap); what its training time grows with."""
    steps = local_epochs * math.ceil(examples / batch_size)
    if max_steps:
        steps = min(steps, max_steps)
    return float(min(steps * batch_size, local_epochs * examples))


def schedule(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Greedy longest-first (LPT): job indices per worker, so the slowest worker finishes early.

    Jobs in order of decreasing cost (ties: lower index first) each go to the worker with the
    least cost so far (ties: lower worker). Each worker's list keeps the order it received them.
    LPT's makespan is at most 4/3 of the optimum (Graham 1969)."""
    if workers < 1:
        raise ValueError(f"workers = {workers}: need at least one")
    plan: list[list[int]] = [[] for _ in range(workers)]
    loads = [(0.0, w) for w in range(workers)]  # a heap of (load, worker)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, w = heapq.heappop(loads)
        plan[w].append(job)
        heapq.heappush(loads, (load + float(costs[job]), w))
    return plan


# --- what travels between the parent and a worker -------------------------------------------
@dataclass(frozen=True)
class Job:
    """One client's message for a worker: the message without the broadcast records, and its
    Context, whose run config travels once per round and worker when it is the round's
    (``shared_config``; a Context's ~100 run-config keys cost more to pickle both ways than a
    small client's training step)."""

    index: int  # position in the round's messages (replies go back in this order)
    partition_id: int
    message: Message
    context: Context
    shared_config: bool = False  # context.run_config is left out: it is the round's


def _slim(context: Context, run_config: dict) -> tuple[Context, bool]:
    """``context`` without its run config when that equals the round's, and whether it was
    left out."""
    if context.run_config != run_config:
        return context, False
    out = copy.copy(context)
    out.run_config = {}
    return out, True


@dataclass(frozen=True)
class ArraySlot:
    """Where one Array of a broadcast ArrayRecord lies in the round's shared-memory block."""

    record: str  # the content key of its ArrayRecord ("arrays")
    name: str
    dtype: str
    shape: tuple[int, ...]
    stype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Broadcast:
    """The round's shared ArrayRecords: a shared-memory block and the slots in it."""

    shm_name: str
    slots: tuple[ArraySlot, ...]

    @property
    def records(self) -> frozenset[str]:
        """The content keys these slots restore."""
        return frozenset(s.record for s in self.slots)


def _write_broadcast(records: dict[str, ArrayRecord]) -> tuple[SharedMemory | None, Broadcast]:
    """Copy ``records``' serialised arrays once into a new shared-memory block."""
    slots, offset = [], 0
    for key, record in records.items():
        for name, arr in record.items():
            slots.append(ArraySlot(key, name, arr.dtype, tuple(arr.shape), arr.stype, offset,
                                   len(arr.data)))
            offset += len(arr.data)
    if not offset:
        return None, Broadcast("", tuple(slots))
    shm = SharedMemory(create=True, size=offset)
    for slot in slots:
        buf = shm.buf  # typeshed: Optional (None once closed)
        buf[slot.offset:slot.offset + slot.nbytes] = records[slot.record][slot.name].data  # type: ignore[index]
    return shm, Broadcast(shm.name, tuple(slots))


def _read_broadcast(broadcast: Broadcast) -> dict[str, ArrayRecord]:
    """The broadcast ArrayRecords, rebuilt from the shared block (one copy per worker)."""
    if not broadcast.slots:
        return {}
    arrays: dict[str, dict[str, Array]] = {}
    shm = SharedMemory(name=broadcast.shm_name) if broadcast.shm_name else None
    try:
        for s in broadcast.slots:
            data = bytes(shm.buf[s.offset:s.offset + s.nbytes]) if shm else b""  # type: ignore[index]
            arrays.setdefault(s.record, {})[s.name] = Array(dtype=s.dtype, shape=s.shape,
                                                            stype=s.stype, data=data)
    finally:
        if shm is not None:
            shm.close()
    return {key: ArrayRecord(array_dict=named) for key, named in arrays.items()}


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """The error reply Flower's runtime gives for a client that could not answer."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


# --- the worker process ----------------------------------------------------------------------
def _worker_main(conn: Connection, factory: AppsFactory, threads: int,
                 identity: tuple[int, int, int]) -> None:
    """A worker's life: build the apps, then answer rounds until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(threads)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity
    try:
        apps = factory()
    except BaseException:  # noqa: BLE001 — sent to the parent, which raises RunFailed
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if command is None:
            return
        try:
            _answer(conn, apps, *command)
        except OSError:  # BrokenPipeError: the parent is gone
            return


def _answer(conn: Connection, apps: dict[int, ClientApp], broadcast: Broadcast,
            run_config: dict, jobs: list[Job]) -> None:
    """Answer one round's jobs, one reply at a time (a crash loses only the unanswered). Each
    reply goes back with its Context, without the run config unless the app changed it."""
    shared = _read_broadcast(broadcast)
    for job in jobs:
        msg, context = job.message, job.context
        for key, record in shared.items():  # read-only for the apps (as on a real node)
            msg.content[key] = record
        if job.shared_config:  # each client its own copy, as in its own process
            context.run_config = dict(run_config)
        try:
            reply = apps[job.partition_id](msg, context)
        except Exception as exc:  # noqa: BLE001 — reported to the server like Flower does
            reply = error_reply(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                f"{type(exc).__name__}: {exc}")
        back, unchanged = _slim(context, run_config) if job.shared_config else (context, False)
        conn.send(("reply", job.index, reply, back, unchanged))
    conn.send(("done",))


# --- the pool --------------------------------------------------------------------------------
@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """THREAD_ENV set to ``threads`` while workers are spawned (a child copies the environment
    when it starts)."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WorkerPool:
    """N persistent worker processes that answer a round's messages (see the module docstring).

    Use it as a context manager (or call :meth:`close`): the processes are always stopped."""

    def __init__(self, factory: AppsFactory, workers: int, threads: int,
                 identity: tuple[int, int, int], start_timeout: float = START_TIMEOUT) -> None:
        """``identity``: Flower's (task id, run id, node id) of the sender the replies answer."""
        if workers < 1:
            raise ValueError(f"a WorkerPool needs at least one worker, not {workers}")
        self.size, self.threads = workers, threads
        self._factory, self._identity = factory, identity
        self._start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers
        self.restarts = 0
        self._starting: set[int] = set()
        self._in_round = False
        self._start(range(workers))

    # --- life cycle ------------------------------------------------------------------------
    def _start(self, slots: Sequence[int]) -> None:
        """Spawn workers in ``slots``; they get ready (import, build apps, load data) while the
        server starts, and :meth:`_await_ready` waits for them before their first round."""
        with _thread_env(self.threads):
            for w in slots:
                parent, child = self._ctx.Pipe()
                proc = self._ctx.Process(target=_worker_main, name=f"fedshield-worker-{w}",
                                         args=(child, self._factory, self.threads,
                                               self._identity), daemon=True)
                proc.start()
                child.close()
                self._workers[w] = _Worker(proc, parent)
                self._starting.add(w)

    def _await_ready(self) -> None:
        """Wait for the workers started last to report ready; RunFailed when one cannot."""
        deadline = time.monotonic() + self._start_timeout
        for w in sorted(self._starting):
            worker = self._workers[w]
            assert worker is not None
            reply = self._recv(worker, deadline)
            if reply is None or reply[0] != "ready":
                alive = worker.process.is_alive()
                self.close()
                if reply is not None:  # ("failed", traceback): the factory raised
                    last = reply[1].strip().splitlines()[-1]
                    raise RunFailed(f"worker process {w} could not build its client apps: "
                                    f"{last}\n{reply[1]}")
                if alive:
                    raise RunFailed(f"worker process {w} was not ready within "
                                    f"{self._start_timeout:.0f} s (importing torch and loading "
                                    "the data); the machine may be overloaded: use fewer "
                                    "federation.workers")
                raise RunFailed(
                    f"worker process {w} exited with code {worker.process.exitcode} before it "
                    "was ready (its error is in the log above). Workers are spawned and import "
                    "the main module: a script that runs a federation needs "
                    "`if __name__ == \"__main__\":` around it. Or set federation.workers = 1 to "
                    "run the clients in this process.")
        self._starting.clear()

    @staticmethod
    def _recv(worker: _Worker, deadline: float) -> tuple | None:
        """The worker's next message, or None when it died or the deadline passed."""
        ready = wait([worker.conn, worker.process.sentinel], max(0.0, deadline - time.monotonic()))
        if worker.conn not in ready:
            return None
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        """Stop every worker: ask and wait up to STOP_TIMEOUT, then kill; at once when a round
        was interrupted (Ctrl-C, an error in the server) and the workers are still training."""
        for worker in self._workers:
            if worker is not None:
                if self._in_round:
                    worker.process.kill()
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(None)
        self._starting.clear()
        self._in_round = False
        deadline = time.monotonic() + STOP_TIMEOUT
        for w, worker in enumerate(self._workers):
            if worker is None:
                continue
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
            self._workers[w] = None

    def __enter__(self) -> WorkerPool:
        """The pool itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the workers, also on an exception or KeyboardInterrupt."""
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.process.pid for w in self._workers if w is not None and w.process.is_alive()]

    # --- a round ---------------------------------------------------------------------------
    def deliver(self, messages: Sequence[Message], contexts: Sequence[Context],
                partition_ids: Sequence[int], costs: Sequence[float],
                timeout: float) -> list[tuple[Message, Context]]:
        """Each message's (reply, updated context), in the order of ``messages``.

        ArrayRecords that every message shares (the global model) go through shared memory once;
        the rest of each message is pickled. Clients are spread by :func:`schedule` on ``costs``.
        """
        if not messages:
            return []
        for w, worker in enumerate(self._workers):
            if worker is not None and not worker.process.is_alive():  # died between rounds
                worker.process.join()
                worker.conn.close()
                self._workers[w] = None
                self.restarts += 1
        self._start([w for w, worker in enumerate(self._workers) if worker is None])
        self._await_ready()
        self._in_round = True
        shm, broadcast = _write_broadcast(_shared_records(messages))
        try:
            return self._run_round(messages, contexts, partition_ids, costs, timeout, broadcast)
        finally:
            self._in_round = False
            if shm is not None:
                shm.close()
                shm.unlink()

    def _run_round(self, messages, contexts, partition_ids, costs, timeout: float,
                   broadcast: Broadcast) -> list[tuple[Message, Context]]:
        results: dict[int, tuple[Message, Context]] = {}
        busy: dict[int, set[int]] = {}
        run_config = dict(contexts[0].run_config)  # the round's (every node's, in a run)
        for w, indices in enumerate(schedule(costs, self.size)):
            if not indices:
                continue
            jobs = [Job(i, int(partition_ids[i]), _without(messages[i], broadcast.records),
                        *_slim(contexts[i], run_config)) for i in indices]
            worker = self._workers[w]
            assert worker is not None  # started above
            try:
                worker.conn.send((broadcast, run_config, jobs))
            except (OSError, ValueError):  # died since the check: its jobs get error replies
                pass
            busy[w] = set(indices)
        deadline = time.monotonic() + timeout
        while busy:
            live = {self._workers[w].conn: w for w in busy}  # type: ignore[union-attr]
            ready = wait(list(live), max(0.0, deadline - time.monotonic()))
            if not ready:  # the round's time is up: stop the workers still training
                for w in list(busy):
                    self._fail(w, busy.pop(w), messages, contexts, results,
                               ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                               f"no reply within the round timeout ({timeout:g} s); raise "
                               "federation.round_timeout or train less per round")
                break
            for conn in ready:
                w = live[conn]
                try:
                    item = conn.recv()  # type: ignore[union-attr,call-arg]
                except (EOFError, OSError):
                    self._fail(w, busy.pop(w), messages, contexts, results,
                               ErrorCode.CLIENT_APP_CRASHED, None)
                    continue
                if item[0] == "reply":
                    _, index, reply, context, unchanged = item
                    if unchanged:  # the run config the job went without
                        cast(Context, context).run_config = contexts[index].run_config
                    results[index] = (cast(Message, reply), cast(Context, context))
                    busy[w].discard(index)
                elif item[0] == "done":
                    busy.pop(w)
        return [results[i] for i in range(len(messages))]

    def _fail(self, w: int, indices: set[int], messages, contexts, results, code: int,
              reason: str | None) -> None:
        """Error replies for a worker's unanswered clients; the worker is stopped (and started
        again at the next round)."""
        worker = self._workers[w]
        assert worker is not None
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        exitcode = worker.process.exitcode
        worker.conn.close()
        self._workers[w] = None
        self.restarts += 1
        for i in sorted(indices):
            why = reason or (
                f"worker process {w} (pid {worker.process.pid}) died with exit code {exitcode}"
                f"{_signal_name(exitcode)} before it answered partition "
                f"{partition_of(contexts[i])}; the round goes on without its clients. A kill by "
                "signal 9 is often the out-of-memory killer: use fewer federation.workers or a "
                "smaller model")
            results[i] = (error_reply(messages[i], code, why), contexts[i])


def partition_of(context: Context) -> Any:
    """A client's partition id, for error messages."""
    return context.node_config.get("partition-id", context.node_id)


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""


def _shared_records(messages: Sequence[Message]) -> dict[str, ArrayRecord]:
    """The ArrayRecords every message carries as one same object (what a strategy broadcasts)."""
    first = messages[0].content
    out = {}
    for key, record in first.array_records.items():
        if all(key in m.content.array_records and m.content.array_records[key] is record
               for m in messages):
            out[key] = record
    return out


def _without(msg: Message, keys: frozenset[str]) -> Message:
    """A shallow copy of ``msg`` whose content lacks ``keys`` (they travel by shared memory)."""
    if not keys:
        return msg
    out = copy.copy(msg)
    out.content = RecordDict({k: v for k, v in msg.content.items() if k not in keys})
    return out


# --- fedshield's federation in a pool --------------------------------------------------------
def federation_apps(cfg: Config, make_app: Callable[[], ClientApp] | None = None
                    ) -> tuple[dict[int, ClientApp], ReplyFilter | None]:
    """The run's ClientApps (partition id -> app, Byzantine ones swapped in) and the attack's
    reply filter (None without an update attack); ``make_app`` builds an honest app."""
    if make_app is None:
        from fedshield.client.app import make_client_app

        make_app = make_client_app
    apps = {pid: make_app() for pid in range(cfg.federation.num_clients)}
    if cfg.attack.name == "none":
        return apps, None
    from fedshield.simulations.adversary import adversarial_apps

    return adversarial_apps(cfg, apps)


def worker_apps(cfg: Config) -> dict[int, ClientApp]:
    """A worker's apps, with the task's data and partitions loaded once (cached per process)."""
    from fedshield.tasks import task_for
    from fedshield.tasks.partition import cached_partitions

    apps, _ = federation_apps(cfg)  # the reply filter runs in the parent, on all replies
    task_for(cfg.task).load()
    cached_partitions(cfg.task.name, cfg.federation.num_clients, cfg.partition, cfg.seed)
    return apps


def client_costs(cfg: Config) -> Callable[[int], float]:
    """Partition id -> :func:`expected_cost` of its round (from its local training split)."""
    from fedshield.client.data import LOCAL_VAL_FRACTION
    from fedshield.tasks.partition import cached_partitions

    parts = cached_partitions(cfg.task.name, cfg.federation.num_clients, cfg.partition, cfg.seed)
    t = cfg.train
    costs = {}
    for pid, idx in enumerate(parts):
        # client/data.py holds out LOCAL_VAL_FRACTION of 20 or more examples
        n = len(idx) - (int(len(idx) * LOCAL_VAL_FRACTION) if len(idx) >= 20 else 0)
        costs[pid] = expected_cost(n, t.batch_size, t.local_epochs, t.max_steps)
    return costs.__getitem__


@contextlib.contextmanager
def federation_pool(cfg: Config, run_id: int) -> Iterator[WorkerPool | None]:
    """The run's pool, stopped on the way out (None when the clients run in this process:
    ``federation.workers = 1``, a one-core machine, or SecAgg+, whose protocol stays
    sequential)."""
    n = resolve_workers(cfg.federation.workers)
    if n <= 1 or cfg.secagg.enabled:
        yield None
        return
    from flwr.common.constant import SUPERLINK_NODE_ID

    with WorkerPool(functools.partial(worker_apps, cfg), n, threads_per_worker(n),
                    (1, run_id, SUPERLINK_NODE_ID)) as pool:
        yield pool
