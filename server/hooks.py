"""Post-run hooks: what runs after the last round, registered by the layer above the ServerApp.

The ServerApp (apps layer) must not import deployment/ (orchestration layer), and a base install
without the ``[deploy]`` extra must still finish a run. So the hand-off is a hook: orchestration
(``simulations.runner``, the Flower component ``fedshield.flower:serverapp``) registers it through
``deployment.hooks.install_post_run_hooks`` when the extra is importable, or registers why it is
not; the ServerApp only calls :func:`run_post_run_hook`.

Why a process-wide registry rather than an argument: Flower builds the ServerApp in its own
process from the component string, and the secure-aggregation path shares ``RunRecorder``; a
registry filled before ``main`` runs reaches both without threading a parameter through them.

Reply hooks (below) use the same registry pattern for the one simulation-only server-side step:
the omniscient attacker that rewrites the Byzantine replies of a round before aggregation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message, MetricRecord

    from fedshield.schema import Config

HANDOFF = "handoff"  # the summary key, and the hook that `deployment.handoff = true` asks for
REPORT = "report"  # runs/<run>/report.html (deployment/html_report.py)
TRACKING = "tracking"  # the run logged to MLflow (deployment/tracking.py)
# The order the hooks run in after the summary is written: the hand-off first (the report shows
# its model card), then the report, then tracking (it logs the card and report.html as
# artifacts). Hooks not named here run after these, in the order they were registered.
POST_RUN_ORDER = (HANDOFF, REPORT, TRACKING)

log = logging.getLogger("flwr")  # Flower's console logger: the note shows wherever the run logs

PostRun = Callable[[Path, "Config"], dict]


@dataclass(frozen=True)
class PostRunHook:
    """A registered hook: ``run`` is None when it is unavailable, and ``skipped`` says why."""

    name: str
    run: PostRun | None
    skipped: str = ""


_HOOKS: dict[str, PostRunHook] = {}
_NOTED: set[str] = set()  # unavailable hooks already noted in this process

NOT_REGISTERED = ("no hand-off hook is registered in this process: run through `fedshield "
                  "simulate`, or point Flower's serverapp component at fedshield.flower:serverapp")


def register_post_run(name: str, run: PostRun) -> None:
    """Register (or replace) the hook ``name``; its result dict goes to ``summary[name]``."""
    _HOOKS[name] = PostRunHook(name, run)


def mark_unavailable(name: str, reason: str) -> None:
    """Record that hook ``name`` cannot run here (e.g. a missing extra) and why, for the note."""
    _HOOKS[name] = PostRunHook(name, None, reason)


def unregister_post_run(name: str) -> None:
    """Forget hook ``name`` (tests, or an embedding application that hands off itself)."""
    _HOOKS.pop(name, None)


def registered(name: str) -> PostRunHook | None:
    """The hook registered under ``name``, if any."""
    return _HOOKS.get(name)


def after_handoff() -> list[str]:
    """The registered hooks that run after the hand-off, in :data:`POST_RUN_ORDER`."""
    named = [n for n in POST_RUN_ORDER if n in _HOOKS]
    return [n for n in named + [n for n in _HOOKS if n not in named] if n != HANDOFF]


def run_after_handoff(run_dir: Path, cfg: Config) -> dict[str, dict]:
    """Run every hook after the hand-off (report, tracking, ...), each on the run folder as the
    hand-off left it; their results by name. A hook unavailable here (e.g. MLflow not installed)
    is noted once per process, not once per run: a grid of runs would repeat it otherwise."""
    out = {}
    for name in after_handoff():
        hook = _HOOKS[name]
        if hook.run is None:
            if name not in _NOTED:
                _NOTED.add(name)
                log.warning("%s skipped: %s", name, hook.skipped)
            out[name] = {"skipped": hook.skipped}
        else:
            out[name] = run_post_run_hook(name, run_dir, cfg)
    return out


def run_post_run_hook(name: str, run_dir: Path, cfg: Config) -> dict:
    """Run hook ``name`` on a finished run folder and return what goes into the summary.

    ``{"skipped": why}`` when it is unavailable, ``{"error": ...}`` when it failed: the run's own
    results are already on disk, so a hook never fails the run."""
    hook = _HOOKS.get(name)
    label = "hand-off" if name == HANDOFF else name
    if hook is None or hook.run is None:
        reason = hook.skipped if hook is not None else NOT_REGISTERED
        log.warning("%s skipped: %s", label, reason)
        return {"skipped": reason}
    try:
        return hook.run(run_dir, cfg)
    except Exception as exc:  # noqa: BLE001 — any failure: keep the run, say what went wrong
        log.warning("%s failed: %s: %s", label, type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


# --- reply hooks: a simulation's view of a round's replies just before aggregation -----------
# Why here and not in the grid: a hook on the strategy runs on every engine (the in-process
# grid, Flower's Ray backend, `flwr run`), because every engine ends a round in
# ``Strategy.aggregate_train``. Only simulations/ registers one (the omniscient attacker); the
# ServerApp installs it when the run config asks for a simulated attack (``attack.name``), and
# refuses such a config where nothing is registered, e.g. on a real SuperLink.

ATTACK = "attack"  # the reply hook that `attack.name != "none"` asks for

# (train messages sent this round, their replies) -> the replies the strategy aggregates
ReplyHook = Callable[[list["Message"], list["Message"]], list["Message"]]
# a run's config -> its hook, or None when the run needs none (e.g. a data-only attack)
ReplyHookFactory = Callable[["Config"], "ReplyHook | None"]

_REPLY_HOOKS: dict[str, ReplyHookFactory] = {}

NO_ATTACK_HOOK = ("attack.name = {name!r} asks for a simulated attack, but no attack hook is "
                  "registered in this process: simulated attacks run only through `fedshield "
                  "simulate` or Flower's simulation runtime with the components in "
                  "fedshield.simulations.flower_apps; set attack.name = \"none\" for a real "
                  "federation")


def register_reply_hook(name: str, factory: ReplyHookFactory) -> None:
    """Register (or replace) the reply hook ``name``; the ServerApp calls ``factory(cfg)``."""
    _REPLY_HOOKS[name] = factory


def unregister_reply_hook(name: str) -> None:
    """Forget reply hook ``name`` (tests)."""
    _REPLY_HOOKS.pop(name, None)


class _Sends(Protocol):
    """A strategy that keeps the round's train messages (ShieldStrategy's ``_sent``)."""

    _sent: list[Message]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...


def install_reply_hooks(strategy: _Sends, cfg: Config) -> None:
    """Wrap ``strategy.aggregate_train`` with the hook the config asks for (none: unchanged).

    Raises ConfigError when ``cfg`` asks for a simulated attack and none is registered: a run
    that silently trained without its adversary would report a robustness it never tested."""
    from fedshield.errors import ConfigError

    if cfg.attack.name == "none":
        return
    factory = _REPLY_HOOKS.get(ATTACK)
    if factory is None:
        raise ConfigError(NO_ATTACK_HOOK.format(name=cfg.attack.name))
    hook = factory(cfg)
    if hook is None:
        return
    log.warning("simulated attack %r: Byzantine replies are replaced before aggregation",
                cfg.attack.name)
    inner = strategy.aggregate_train

    def aggregate_train(server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return inner(server_round, hook(list(strategy._sent), list(replies)))

    strategy.aggregate_train = aggregate_train  # type: ignore[method-assign]
