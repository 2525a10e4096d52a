"""Request counters, latency histograms and drift gauges in the Prometheus text format (0.0.4)."""

from __future__ import annotations

import threading
from collections import defaultdict

# Seconds; fine resolution below 10 ms where a small model's requests land.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


class ServingMetrics:
    """Counters keyed by route path; callers pass bounded labels (serving.path_label)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.predictions: dict[int, int] = defaultdict(int)
        self.drift: dict[str, float] = {}
        self.drift_windows = 0
        self.retrain_triggers = 0
        self.suppressed_triggers = 0
        self.input_warnings = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        with self._lock:
            self.requests[(path, status)] += 1
            counts = self.buckets[path]
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[path] += seconds
            self.latency_count[path] += 1

    def observe_predictions(self, classes) -> None:
        """Count the predicted classes of one request."""
        with self._lock:
            for c in classes:
                self.predictions[int(c)] += 1

    def observe_input_warning(self) -> None:
        """Count a request whose inputs were outside the evaluation range."""
        with self._lock:
            self.input_warnings += 1

    def observe_window(self, scores: dict, triggered: bool, suppressed: bool = False) -> None:
        """Keep the scores of the latest full drift window; count its trigger, fired or
        suppressed by the cooldown."""
        with self._lock:
            self.drift = {k: v for k, v in scores.items() if isinstance(v, float)}
            self.drift_windows += 1
            self.retrain_triggers += int(triggered)
            self.suppressed_triggers += int(suppressed)

    def render(self, model_labels: dict[str, str]) -> str:
        """The counters in Prometheus' text format."""
        with self._lock:
            out = ["# HELP fedshield_model_info Model being served.", "# TYPE fedshield_model_info "
                                                                      "gauge",
                   f"fedshield_model_info{_labels(**model_labels)} 1",
                   "# HELP fedshield_requests_total HTTP requests by path and status code.",
                   "# TYPE fedshield_requests_total counter"]
            out += [f"fedshield_requests_total{_labels(path=p, code=str(s))} {n}"
                    for (p, s), n in sorted(self.requests.items())]
            out += ["# HELP fedshield_request_duration_seconds Request latency.",
                    "# TYPE fedshield_request_duration_seconds histogram"]
            for path in sorted(self.buckets):
                # strict: one count per latency bucket, by construction
                for bound, n in zip(LATENCY_BUCKETS, self.buckets[path], strict=True):
                    le = _labels(path=path, le=repr(bound))
                    out.append(f"fedshield_request_duration_seconds_bucket{le} {n}")
                le = _labels(path=path, le="+Inf")
                out.append(f"fedshield_request_duration_seconds_bucket{le} "
                           f"{self.latency_count[path]}")
                out.append(f"fedshield_request_duration_seconds_sum{_labels(path=path)} "
                           f"{self.latency_sum[path]!r}")
                out.append(f"fedshield_request_duration_seconds_count{_labels(path=path)} "
                           f"{self.latency_count[path]}")
            out += ["# HELP fedshield_predictions_total Predicted classes.",
                    "# TYPE fedshield_predictions_total counter"]
            out += [f"fedshield_predictions_total{_labels(label=str(c))} {n}" for c,
                    n in sorted(self.predictions.items())]
            out += ["# HELP fedshield_drift_score Drift scores of the latest full window against "
                    "the reference.",
                    "# TYPE fedshield_drift_score gauge"]
            out += [f"fedshield_drift_score{_labels(statistic=k)} {v!r}" for k,
                    v in sorted(self.drift.items())]
            out += ["# HELP fedshield_drift_windows_total Full windows scored.",
                    "# TYPE fedshield_drift_windows_total counter",
                    f"fedshield_drift_windows_total {self.drift_windows}",
                    "# HELP fedshield_retrain_triggers_total Retraining triggers fired.",
                    "# TYPE fedshield_retrain_triggers_total counter",
                    f"fedshield_retrain_triggers_total {self.retrain_triggers}",
                    "# HELP fedshield_retrain_triggers_suppressed_total Retraining triggers "
                    "suppressed by the cooldown.",
                    "# TYPE fedshield_retrain_triggers_suppressed_total counter",
                    f"fedshield_retrain_triggers_suppressed_total {self.suppressed_triggers}",
                    "# HELP fedshield_input_range_warnings_total Batches far outside the input "
                    "range.",
                    "# TYPE fedshield_input_range_warnings_total counter",
                    f"fedshield_input_range_warnings_total {self.input_warnings}"]
        return "\n".join(out) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Samples of a text exposition: ``name{labels}`` -> value (used by the monitor CLI and
    tests)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples
