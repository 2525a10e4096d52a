"""A client's persistent privacy ledger: every privacy event it ever released, in one JSON file.

Epsilon is recomputed from the plain events each time, so it survives restarts, new processes and
new runs of the same federation. Writes are atomic (temp file, fsync, ``os.replace``) and serialised
by an ``fcntl`` lock on the site manifest's sibling ``.lock`` file (a data file's inode changes on
every replace, so it cannot carry the lock itself). A file that cannot be read is an error, never a
silent reset: a reset would forget privacy already spent.

Every release is an event: a second release of the same (run, round) is either refused or recorded
as a new event (``release`` 1, 2, ...); it is never sent unrecorded.

A site manifest (``site-manifest.json`` in the ledger directory) lists every ledger the site holds,
with its event count and the hash chain's head over its events, so a deleted or truncated ledger
is detected and refused. The manifest also names each ledger's *site*: the data it spends (a site
id, a data fingerprint or a partition), so a budget applies to the total over every federation of
that site and renaming a federation cannot reset it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedshield.privacy.accounting import (
    ACCOUNTANTS,
    Event,
    as_event,
    check_bound_accountant,
    reported_epsilon,
)

from fedshield.errors import BudgetExhausted, ConfigError

FORMAT = "fedshield-privacy-ledger"
VERSION = 1
MANIFEST = "site-manifest.json"
MANIFEST_FORMAT = "fedshield-site-manifest"


class LedgerCorrupted(BudgetExhausted):
    """A ledger file exists but cannot be read; fedshield never resets it on its own. The client
    refuses to train: it cannot know what it has spent."""

    code = "ledger-corrupted"


class LedgerMissing(LedgerCorrupted):
    """A ledger the site manifest lists is gone or shorter than recorded: a refusal, not a reset."""

    code = "ledger-missing"


class AlreadyReleased(BudgetExhausted):
    """This (run, round) was released before and a second release would reuse its noise."""

    code = "already-released"


def chain(events: Sequence[dict[str, Any]], head: str = "") -> str:
    """Hash chain over events (canonical JSON): the manifest keeps its head to detect truncation."""
    for event in events:
        body = json.dumps(event, sort_keys=True, separators=(",", ":"))
        head = hashlib.sha256((head + body).encode()).hexdigest()
    return head


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(part)) or "_"


def ledger_path(ledger_dir: str | Path, federation_id: str, client_id: str | int) -> Path:
    """Where a client keeps its ledger for one federation:
    ``<dir>/<federation>/client-<id>.json``."""
    return Path(ledger_dir) / _safe(federation_id) / f"client-{_safe(str(client_id))}.json"


class Ledger:
    """The privacy events of one client, under one (delta, accountant) and an optional budget.

    ``max_epsilon`` = 0 means no budget; it caps the total over every ledger of the same ``site``
    listed in the manifest under ``root`` (default: the file's folder). A ledger is bound to the
    delta and accountant it was created with: epsilons under different deltas or accountants are
    not comparable, so reopening it with others is refused. Stated epsilons are
    :func:`privacy.accounting.reported_epsilon`: never below PLD's.
    """

    def __init__(self, path: str | Path, delta: float, accountant: str = "prv",
                 max_epsilon: float = 0.0, *, root: str | Path | None = None,
                 site: str | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {accountant!r}; choose one of "
                              f"{', '.join(ACCOUNTANTS)}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta = {delta!r} must be in (0, 1)")
        if max_epsilon < 0:
            raise ConfigError(f"max_epsilon = {max_epsilon!r} must be >= 0 (0 = no budget)")
        if max_epsilon > 0:
            check_bound_accountant(accountant, "a privacy budget (privacy.max_epsilon)")
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        try:
            self.key = self.path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise ConfigError(
                f"ledger {self.path} is not inside its ledger directory {self.root}") from None
        self.site = site or self.key
        self.delta = float(delta)
        self.accountant = accountant
        self.max_epsilon = float(max_epsilon)
        # This ledger's epsilon right after the last ``record`` when its budget check computed
        # it (a budget, no other ledger of the site), else None: spares callers a recomputation
        # (PRV costs 0.2-1 s).
        self.recorded_epsilon: float | None = None
        self._read()  # fail early on a corrupt, deleted, truncated or mismatched file

    @classmethod
    def for_client(cls, ledger_dir: str | Path, federation_id: str, client_id: str | int,
                   delta: float, accountant: str = "prv", max_epsilon: float = 0.0,
                   site: str | None = None) -> Ledger:
        """The ledger of one client of one federation, under ``ledger_dir`` (see ledger_path)."""
        return cls(ledger_path(ledger_dir, federation_id, client_id), delta, accountant,
                   max_epsilon, root=ledger_dir, site=site)

    # -- reading -------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every recorded event: run_id, round, release, noise_multiplier, sample_rate, steps,
        timestamp."""
        return self._read()

    def events(self) -> list[Event]:
        """Every event recorded in this ledger, read (and verified) from disk."""
        return [_event(e) for e in self._read()]

    def spent(self) -> float:
        """Epsilon spent by this ledger's events (its accountant's, floored by PLD)."""
        return reported_epsilon(self.events(), self.delta, self.accountant)

    def site_events(self) -> list[Event]:
        """Every event of this ledger's site, over all its federations' ledgers (the total the
        budget applies to)."""
        return self.events() + [ev for other in self._site_ledgers() for ev in map(_event, other)]

    def site_spent(self) -> float:
        """Epsilon spent by every event of this ledger's site: the total its budget caps."""
        return reported_epsilon(self.site_events(), self.delta, self.accountant)

    def releases(self, run_id: str, round: int) -> int:
        """How many times (run_id, round) was released."""
        return sum(e["run_id"] == run_id and e["round"] == round for e in self._read())

    def would_spend(self, events: Iterable[Sequence[float]]) -> float:
        """Epsilon of this ledger if ``events`` were added to it."""
        return reported_epsilon(self.events() + [as_event(e) for e in events], self.delta,
                                self.accountant)

    def check(self, events: Iterable[Sequence[float]], *, run_id: str | None = None, round: int = 0,
              repeat_ok: bool = False) -> float:
        """Before training: raise BudgetExhausted if ``events`` would take the site past its budget,
        AlreadyReleased if (run_id, round) was released and ``repeat_ok`` is False (the caller's
        noise would repeat); else the epsilon this ledger would reach."""
        events = [as_event(e) for e in events]
        if run_id is not None and not repeat_ok and self.releases(run_id, round):
            raise AlreadyReleased(_repeat_message(run_id, round))
        after = self.would_spend(events)
        if self.max_epsilon > 0:
            site_after = after if not self._site_ledgers() else reported_epsilon(
                self.site_events() + events, self.delta, self.accountant)
            if site_after > self.max_epsilon:
                raise BudgetExhausted(
                    f"budget exhausted: spent {self.site_spent():.2f} of {self.max_epsilon} (this "
                    f"round would bring it to {site_after:.2f}); the client refuses to train. "
                    "Raise privacy.max_epsilon, add noise, or train fewer steps"
                    + _site_note(self.site, len(self._site_ledgers())))
        return after

    def require_run_history(self, run_id: str, round: int, released: int | None = None) -> None:
        """Refuse to go on with a run whose earlier releases this ledger lacks: it was lost or
        replaced, so its spending is unknown.

        ``released``: in how many rounds of the run the server received this client's DP
        release (the train message says); the ledger must hold at least that many of the run's
        rounds. A client that missed rounds (offline, restarted) is not refused. Without it
        (None: a server that does not say), round > 1 of a run the ledger holds nothing of is
        refused, for clients that train every round."""
        held = len({e["round"] for e in self._read() if e["run_id"] == run_id})
        if released is None:
            if round > 1 and not held:
                raise LedgerMissing(
                    f"asked to train round {round} of run {run_id!r}, but privacy ledger "
                    f"{self.path} holds no event of that run although every client trains every "
                    "round: the ledger was deleted or replaced. Restore the ledger directory "
                    "from its backup; fedshield will not start the count over")
        elif held < released:
            raise LedgerMissing(
                f"the server received this client's DP releases in {released} round(s) of run "
                f"{run_id!r}, but privacy ledger {self.path} holds {held}: the ledger was deleted, "
                "truncated or replaced. Restore the ledger directory from its backup; fedshield "
                "will not start the count over")

    def to_metrics(self) -> dict[str, float | int | str]:
        """This ledger's epsilons (own and site-wide, accountant and PLD) for a metrics line."""
        history = self._read()
        from fedshield.privacy.accounting import pld_epsilon

        events = self.events()
        return {"epsilon": reported_epsilon(events, self.delta, self.accountant),
                "epsilon_pld": pld_epsilon(events, self.delta), "site": self.site,
                "site_epsilon": self.site_spent(), "unit": "sample-level, per client, add/remove",
                "delta": self.delta, "accountant": self.accountant, "max_epsilon": self.max_epsilon,
                "rounds_recorded": len(history), "steps": sum(e["steps"] for e in history)}

    # -- writing -------------------------------------------------------------------------------

    def record(self, events: Iterable[Sequence[float]], round: int, run_id: str, *,
               repeat_ok: bool = False) -> int:
        """After training, before the update is sent: append this release's events; returns its
        release number (0 for the first release of (run_id, round)).

        A second release of (run_id, round) is recorded as a new event when ``repeat_ok`` (fresh
        noise), else refused with AlreadyReleased. The budget is checked again under the lock: if
        another process spent the budget meanwhile, this raises BudgetExhausted. Either way the
        caller must not release the update (an unreleased update costs no privacy).
        """
        events = [as_event(e) for e in events]
        self.recorded_epsilon = None
        with self._locked():
            history = self._read()
            release: int = sum(e["run_id"] == run_id and e["round"] == round for e in history)
            if release and not repeat_ok:
                raise AlreadyReleased(_repeat_message(run_id, round))
            after = None
            if self.max_epsilon > 0:
                known = [_event(e) for e in history]
                others = [ev for other in self._site_ledgers() for ev in map(_event, other)]
                after = reported_epsilon(known + others + events, self.delta, self.accountant)
                if after > self.max_epsilon:
                    spent = reported_epsilon(known + others, self.delta, self.accountant)
                    raise BudgetExhausted(
                        f"budget exhausted: spent {spent:.2f} of {self.max_epsilon} (recording "
                        f"round {round} would bring it to {after:.2f}); the update must not be "
                        "sent")
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            history += [{"run_id": run_id, "round": int(round), "release": release,
                         "noise_multiplier": noise, "sample_rate": rate, "steps": steps,
                         "timestamp": now} for noise, rate, steps in events]
            self._write(history)
            self._register(history)
            if after is not None and not others:
                self.recorded_epsilon = after
        return release

    # -- storage -------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        """The site manifest (hash chains of every ledger) under this ledger's root."""
        return self.root / MANIFEST

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # One lock per ledger directory: a site's ledgers share one budget.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.manifest_path.with_name(MANIFEST + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        entry = read_manifest(self.root).get(self.key)
        if not self.path.exists():
            if entry and entry["events"]:
                raise LedgerMissing(
                    f"privacy ledger {self.path} is gone, but the site manifest "
                    f"{self.manifest_path} lists it with {entry['events']} events: it records "
                    "privacy already spent, so "
                    "fedshield will not start the count over. Restore it from the backup of the "
                    "ledger directory")
            return []
        doc = read_ledger_file(self.path)
        events: list[dict[str, Any]] = doc["events"]
        if entry:
            verify_against(self.path, events, entry)
        if doc.get("delta") != self.delta or doc.get("accountant") != self.accountant:
            raise ConfigError(
                f"privacy ledger {self.path} was created with delta = {doc.get('delta')} and "
                f"accountant = {doc.get('accountant')!r}; this run asks for delta = {self.delta} "
                f"and accountant = {self.accountant!r}. Keep them fixed for a client's lifetime, "
                "or use a new federation id")
        return events

    def _site_ledgers(self) -> list[list[dict[str, Any]]]:
        """The events of every other ledger of this site listed in the manifest (verified)."""
        out = []
        for key, entry in read_manifest(self.root).items():
            if key == self.key or entry.get("site") != self.site:
                continue
            path = self.root / key
            if not path.exists():
                raise LedgerMissing(
                    f"privacy ledger {path} of site {self.site!r} is gone, but the site manifest "
                    f"{self.manifest_path} lists it with {entry['events']} events; the site's "
                    "budget counts it. Restore it from the backup of the ledger directory")
            events = read_ledger_file(path)["events"]
            verify_against(path, events, entry)
            out.append(events)
        return out

    def _register(self, history: list[dict[str, Any]]) -> None:
        """Under the lock, after the ledger is written: its count and chain head in the manifest."""
        doc = _manifest_doc(self.root)
        doc["ledgers"][self.key] = {"site": self.site, "events": len(history),
                                    "head": chain(history)}
        atomic_write_json(self.manifest_path, doc)

    def _write(self, events: list[dict[str, Any]]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "delta": self.delta,
               "accountant": self.accountant, "max_epsilon": self.max_epsilon, "site": self.site,
               "events": events}
        atomic_write_json(self.path, doc)


def _event(e: dict[str, Any]) -> Event:
    return (e["noise_multiplier"], e["sample_rate"], e["steps"])


def _repeat_message(run_id: str, round: int) -> str:
    return (f"round {round} of run {run_id!r} was already released by this client, and its noise "
            "is derived from the run (privacy.reproducible_noise): a second release would repeat "
            "the noise draw, so the difference of the two updates would be noise-free. The client "
            "refuses; the server should go on with the next round")


def _site_note(site: str, others: int) -> str:
    return (f" (site {site!r}: the budget covers this and {others} other federation ledger(s))"
            if others else "")


def read_ledger_file(path: Path) -> dict[str, Any]:
    """A ledger file's document, its events validated; LedgerCorrupted if unreadable."""
    try:
        doc: dict[str, Any] = json.loads(Path(path).read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        for e in doc["events"]:
            as_event(_event(e))
            str(e["run_id"]), int(e["round"])
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise LedgerCorrupted(
            f"privacy ledger {path} is unreadable ({exc}); it records privacy already spent, "
            "so fedshield will not reset it. Restore it from a backup, or, if this client's "
            "spending truly starts over, move it away by hand") from None
    return doc


def verify_against(path: Path, events: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """The ledger holds at least the manifest's events, unchanged (its chain passes the head)."""
    count = int(entry["events"])
    if len(events) < count or chain(events[:count]) != entry["head"]:
        raise LedgerMissing(
            f"privacy ledger {path} holds {len(events)} events, but the site manifest lists "
            f"{count} with another hash: it was truncated or altered, so the privacy it records "
            "as spent cannot be trusted. Restore it from the backup of the ledger directory")


def _manifest_doc(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "version": 1, "ledgers": {}}
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("ledgers"), dict):
            raise ValueError(f"not a {MANIFEST_FORMAT} file")
        for entry in doc["ledgers"].values():
            int(entry["events"]), str(entry["head"]), str(entry["site"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerCorrupted(
            f"site manifest {path} is unreadable ({exc}); it is how fedshield knows which ledgers "
            "this site holds, so it will not rebuild it. Restore it from the backup of the ledger "
            "directory") from None
    return doc


def read_manifest(root: str | Path) -> dict[str, dict[str, Any]]:
    """The ledgers a site holds: relative path -> {site, events, head}."""
    ledgers: dict[str, dict[str, Any]] = _manifest_doc(Path(root))["ledgers"]
    return ledgers


def atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON: a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# -- a site's spend, for `fedshield privacy ledger` ---------------------------------------------

def site_report(ledger_dir: str | Path) -> dict[str, Any]:
    """Every ledger in ``ledger_dir`` (those the manifest lists, and older unlisted files), grouped
    by site: each one's events and epsilon (its accountant's, floored by PLD, and PLD alone), and
    per site the total over all its federations, the one its budget applies to. Damaged or deleted
    ledgers are reported with their problem, never skipped."""
    from fedshield.privacy.accounting import pld_epsilon

    root = Path(ledger_dir)
    manifest = read_manifest(root) if (root / MANIFEST).exists() else {}
    keys = set(manifest) | {p.relative_to(root).as_posix() for p in root.rglob("*.json")
                            if p.name != MANIFEST}
    sites: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        entry, path = manifest.get(key), root / key
        row: dict[str, Any] = {"ledger": key, "federation": str(Path(key).parent),
                               "listed": entry is not None}
        try:
            if not path.exists():
                assert entry is not None  # keys not in the manifest come from files that exist
                raise LedgerMissing(f"deleted: the manifest lists {entry['events']} events")
            doc = read_ledger_file(path)
            if doc.get("format") != FORMAT:
                continue
            if entry:
                verify_against(path, doc["events"], entry)
            events = [_event(e) for e in doc["events"]]
            row.update(delta=doc["delta"], accountant=doc["accountant"], events=len(events),
                       runs=len({e["run_id"] for e in doc["events"]}),
                       epsilon=reported_epsilon(events, doc["delta"], doc["accountant"]),
                       epsilon_pld=pld_epsilon(events, doc["delta"]), problem="")
            site = (entry or {}).get("site") or doc.get("site") or key
        except LedgerCorrupted as exc:
            row.update(events=None, epsilon=None, problem=str(exc))
            events, site = [], (entry or {}).get("site", key)
        group = sites.setdefault(site, {"site": site, "ledgers": [], "_events": [],
                                        "_deltas": set(), "_accountants": set()})
        group["ledgers"].append(row)
        group["_events"] += events
        if row.get("delta"):
            group["_deltas"].add(row["delta"])
            group["_accountants"].add(row["accountant"])
    out = []
    for group in sites.values():
        # Composed at the smallest delta any of its ledgers uses (the strictest statement).
        delta = min(group.pop("_deltas"), default=1e-5)
        accountants = group.pop("_accountants")
        accountant = accountants.pop() if len(accountants) == 1 else "prv"
        events = group.pop("_events")
        group.update(delta=delta, accountant=accountant,
                     total_epsilon=reported_epsilon(events, delta, accountant),
                     total_epsilon_pld=pld_epsilon(events, delta),
                     complete=all(not r["problem"] for r in group["ledgers"]))
        out.append(group)
    return {"ledger_dir": str(root), "unit": "sample-level, per client, add/remove",
            "sites": out}
