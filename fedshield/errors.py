"""Typed errors. Each message tells the user what is wrong and what to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the record imports this module
    from fedshield.run_records import RunSummary


class FedShieldError(Exception):
    """Base class for every error fedshield raises on purpose."""


class ConfigError(FedShieldError, ValueError):
    """A configuration value is unknown, mistyped, out of range, or unsafe in combination."""


class DataValidationError(FedShieldError, ValueError):
    """Local data failed validation (shape, dtype, label range, NaN...)."""


class BudgetExhausted(FedShieldError):
    """Training would push a client past its privacy budget."""


class TooFewUpdates(FedShieldError):
    """Too few valid updates remain in a round to aggregate safely."""


class StateCorrupted(FedShieldError):
    """A run folder's state file (checkpoint, metrics) is missing, truncated or was altered."""


class RunFailed(FedShieldError):
    """A run ended without ever updating the model: every round failed (too few accepted
    updates, every client refused or errored). Its summary.json says why; nothing was registered."""

    def __init__(self, message: str, summary: RunSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary  # the failed run's summary.json, for callers that go on (grids)
