"""A client's persistent privacy ledger: every privacy event it ever released, in one JSON file.

Epsilon is recomputed from the plain events each time, so it survives restarts, new processes and
new runs of the same federation. Writes are atomic (temp file, fsync, ``os.replace``) and serialised
by an ``fcntl`` lock on a sibling ``.lock`` file (the data file's inode changes on every replace, so
it cannot carry the lock itself). A file that cannot be read is an error, never a silent reset: a
reset would forget privacy already spent.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from fedshield.errors import BudgetExhausted, ConfigError, FedShieldError
from privacy.accounting import ACCOUNTANTS, Event, as_event, epsilon

FORMAT = "fedshield-privacy-ledger"
VERSION = 1


class LedgerCorrupted(FedShieldError):
    """A ledger file exists but cannot be read; fedshield never resets it on its own."""


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(part)) or "_"


def ledger_path(ledger_dir: str | Path, federation_id: str, client_id: str | int) -> Path:
    """Where a client keeps its ledger for one federation: ``<dir>/<federation>/client-<id>.json``."""
    return Path(ledger_dir) / _safe(federation_id) / f"client-{_safe(str(client_id))}.json"


class Ledger:
    """The privacy events of one client, under one (delta, accountant) and an optional budget.

    ``max_epsilon`` = 0 means no budget. A ledger is bound to the delta and accountant it was created
    with: epsilons under different deltas or accountants are not comparable, so reopening it with
    others is refused.
    """

    def __init__(self, path: str | Path, delta: float, accountant: str = "prv",
                 max_epsilon: float = 0.0) -> None:
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta = {delta!r} must be in (0, 1)")
        if max_epsilon < 0:
            raise ConfigError(f"max_epsilon = {max_epsilon!r} must be >= 0 (0 = no budget)")
        self.path = Path(path)
        self.delta = float(delta)
        self.accountant = accountant
        self.max_epsilon = float(max_epsilon)
        self._read()  # fail early on a corrupt or mismatched file

    @classmethod
    def for_client(cls, ledger_dir: str | Path, federation_id: str, client_id: str | int,
                   delta: float, accountant: str = "prv", max_epsilon: float = 0.0) -> "Ledger":
        return cls(ledger_path(ledger_dir, federation_id, client_id), delta, accountant, max_epsilon)

    # -- reading -------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict]:
        """Every recorded event: run_id, round, noise_multiplier, sample_rate, steps, timestamp."""
        return self._read()

    def events(self) -> list[Event]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self._read()]

    def spent(self) -> float:
        return epsilon(self.events(), self.delta, self.accountant)

    def would_spend(self, events: Iterable[Sequence]) -> float:
        """Epsilon if ``events`` were added to the ledger."""
        return epsilon(self.events() + [as_event(e) for e in events], self.delta, self.accountant)

    def check(self, events: Iterable[Sequence]) -> float:
        """Before training: raise BudgetExhausted if ``events`` would exceed the budget; else the
        epsilon they would bring the client to."""
        events = [as_event(e) for e in events]
        after = self.would_spend(events)
        if self.max_epsilon > 0 and after > self.max_epsilon:
            raise BudgetExhausted(
                f"budget exhausted: spent {self.spent():.2f} of {self.max_epsilon} (this round would "
                f"bring it to {after:.2f}); the client refuses to train. Raise privacy.max_epsilon, "
                "add noise, or train fewer steps")
        return after

    def to_metrics(self) -> dict[str, float | int | str]:
        history = self._read()
        return {"epsilon": epsilon(self.events(), self.delta, self.accountant), "delta": self.delta,
                "accountant": self.accountant, "max_epsilon": self.max_epsilon,
                "rounds_recorded": len(history), "steps": sum(e["steps"] for e in history)}

    # -- writing -------------------------------------------------------------------------------

    def record(self, events: Iterable[Sequence], round: int, run_id: str) -> bool:
        """After training: append this round's events. Returns False (and adds nothing) when this
        (run_id, round) is already recorded, so a resumed run never double counts.

        The budget is checked again under the lock: if another process spent the budget meanwhile,
        this raises BudgetExhausted and the caller must not release the update (an unreleased
        update costs no privacy).
        """
        events = [as_event(e) for e in events]
        with self._locked():
            history = self._read()
            if any(e["run_id"] == run_id and e["round"] == round for e in history):
                return False
            known = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in history]
            after = epsilon(known + events, self.delta, self.accountant) if self.max_epsilon > 0 else 0.0
            if after > self.max_epsilon > 0:
                raise BudgetExhausted(
                    f"budget exhausted: spent {epsilon(known, self.delta, self.accountant):.2f} of "
                    f"{self.max_epsilon} (recording round {round} would bring it to {after:.2f}); "
                    "the update must not be sent")
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            history += [{"run_id": run_id, "round": int(round), "noise_multiplier": noise,
                         "sample_rate": rate, "steps": steps, "timestamp": now}
                        for noise, rate, steps in events]
            self._write(history)
        return True

    # -- storage -------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} file")
            events = doc["events"]
            for e in events:
                as_event((e["noise_multiplier"], e["sample_rate"], e["steps"]))
                str(e["run_id"]), int(e["round"])
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise LedgerCorrupted(
                f"privacy ledger {self.path} is unreadable ({exc}); it records privacy already spent, "
                "so fedshield will not reset it. Restore it from a backup, or, if this client's "
                "spending truly starts over, move it away by hand") from None
        if doc.get("delta") != self.delta or doc.get("accountant") != self.accountant:
            raise ConfigError(
                f"privacy ledger {self.path} was created with delta = {doc.get('delta')} and accountant "
                f"= {doc.get('accountant')!r}; this run asks for delta = {self.delta} and accountant = "
                f"{self.accountant!r}. Keep them fixed for a client's lifetime, or use a new federation id")
        return events

    def _write(self, events: list[dict]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "delta": self.delta, "accountant": self.accountant,
               "max_epsilon": self.max_epsilon, "events": events}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
