"""What the serving process says: the start-up line, access logs, drift and trigger lines.

Everything goes through the ``logging`` module under ``fedshield.serving`` (``.access`` for one
line per request, ``.drift`` for windows and triggers), formatted as one JSON object per line
(``json``, the default: a log shipper reads it) or as readable text (``text``). uvicorn's own
loggers get the same handler; its access log stays off, so every request is logged once.

An access line carries time, method, path (never the query string: ``/docs?token=`` would leak
the token), status, latency, client address and request id; never a body or a header.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass

from fedshield.deployment.drift import RetrainTrigger, WindowReport

LOGGER = "fedshield.serving"
ACCESS_LOGGER = LOGGER + ".access"
DRIFT_LOGGER = LOGGER + ".drift"
FORMATS = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")
REQUEST_ID_HEADER = "x-request-id"
# A caller's own request id is kept when it is short and plain (it is echoed in a header and a
# log line: no control characters, no unbounded length); anything else gets a fresh one.
_CALLER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# A record's own attributes; whatever else it carries came in ``extra=`` and goes in the JSON.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message",
                                                                                "asctime"}


def request_id(given: str | None) -> str:
    """The caller's ``x-request-id`` when it is safe to echo, else a fresh random one."""
    if given and _CALLER_ID.match(given):
        return given
    return uuid.uuid4().hex[:16]


def utc_time(now: float) -> str:
    """ISO 8601 UTC time with milliseconds of a ``time.time()`` value."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line = {"time": utc_time(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        line |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str = "info", fmt: str = "json") -> logging.Handler:
    """Send fedshield's and uvicorn's records to stderr in ``fmt`` at ``level``; returns the
    handler (installed once: calling again replaces it rather than doubling every line)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name("fedshield-serving")
    for name in (LOGGER, "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if h.get_name() != "fedshield-serving"]
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger(LOGGER).setLevel(level.upper())
    # uvicorn says "Uvicorn running on ..." at info: our start-up line replaces it. Its warnings
    # and errors (a port in use, an exception in the app) still come through, formatted alike.
    logging.getLogger("uvicorn").setLevel(max(logging.WARNING, logging.getLevelName(
        level.upper())))
    return handler


@dataclass(frozen=True)
class StartupInfo:
    """What ``fedshield serve`` is doing, logged once the socket is bound."""
    url: str
    model: str
    version: str
    variant: str
    token: bool
    exposure: str  # "loopback" (this machine only) or "public" (reachable from the network)
    docs: str

    def message(self) -> str:
        """The start-up line a person reads."""
        token = "token on" if self.token else "no token"
        return (f"serving {self.model} version {self.version} ({self.variant}) at {self.url}; "
                f"{token}, {self.exposure}; docs at {self.docs}")


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 addresses in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def log_startup(info: StartupInfo) -> None:
    """The start-up line (fields too, for the JSON format)."""
    logging.getLogger(LOGGER).info(info.message(), extra={"event": "startup", **asdict(info)})


@dataclass(frozen=True)
class AccessRecord:
    """One request as the access log records it."""
    method: str
    path: str
    status: int
    latency_ms: float
    client_ip: str
    request_id: str


def log_access(record: AccessRecord) -> None:
    """One access line; the message is readable, the fields are for the JSON format."""
    text = (f"{record.client_ip} {record.method} {record.path} {record.status} "
            f"{record.latency_ms:.2f} ms id={record.request_id}")
    logging.getLogger(ACCESS_LOGGER).info(text, extra={"event": "access", **asdict(record)})


def drifted_features(scores: dict, threshold: float) -> list[list]:
    """The window's top features whose own PSI exceeds ``threshold`` ([[name, psi], ...])."""
    return [[str(name), round(float(value), 4)] for name, value in scores.get("top_features", [])
            if float(value) > threshold]


def log_window(report: WindowReport, statistic: str, threshold: float, patience: int) -> None:
    """One line per full drift window: info when clean, warning when over the threshold (a
    trigger it fires, or that the cooldown suppresses, gets a line of its own: log_trigger)."""
    value = float(report.scores[statistic])
    # A clean window's top features are noise, not drift: named only when the window drifts.
    drifted = drifted_features(report.scores, threshold) if report.over_threshold else []
    state = f"under {threshold:g}"
    if report.over_threshold:
        # The policy's streak resets when a trigger fires: show how far along it is otherwise.
        state = f"over {threshold:g}" + (f" ({report.streak} of {patience} windows in a row)"
                                         if report.streak else "")
    text = f"drift window {report.index} ({report.examples} examples): {statistic} {value:.4f} "
    text += state
    if drifted:
        text += "; drifted features: " + ", ".join(f"{n} ({v:.3f})" for n, v in drifted)
    if report.note and not report.note.startswith("retraining trigger"):
        text += f"; {report.note}"  # e.g. no privacy budget remains
    fields = {"event": "drift_window", "window": report.index, "examples": report.examples,
              "statistic": statistic, "value": round(value, 6), "threshold": threshold,
              "over_threshold": report.over_threshold, "streak": report.streak,
              "drifted_features": drifted, "note": report.note}
    level = logging.WARNING if report.over_threshold else logging.INFO
    logging.getLogger(DRIFT_LOGGER).log(level, text, extra=fields)


def log_trigger(trigger: RetrainTrigger, fired: bool, note: str) -> None:
    """One line per retraining trigger: fired (warning) or suppressed by the cooldown (info)."""
    text = f"retraining trigger fired: {trigger.reason}" if fired else note
    fields = {"event": "retrain_trigger" if fired else "retrain_trigger_suppressed",
              "statistic": trigger.statistic, "threshold": trigger.threshold,
              "windows": trigger.windows, "scores": [round(v, 6) for v in trigger.scores]}
    logging.getLogger(DRIFT_LOGGER).log(logging.WARNING if fired else logging.INFO, text,
                                        extra=fields)
