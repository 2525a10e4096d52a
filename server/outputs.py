"""The run folder: ``runs/<name>-<timestamp>/`` with config, metrics, summary, plots and weights."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedshield import configio, schema
from fedshield.run_records import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsLine,
    RunSummary,
    read_metrics,
    read_summary,
)

VERSIONED = ("fedshield", "flwr", "flwr-datasets", "torch", "opacus", "numpy")


def library_versions() -> dict[str, str]:
    """The versions of Python and the libraries that decide a run's results."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def new_run_dir(cfg: schema.Config) -> Path:
    """A new, empty ``<output_dir>/<name>-<timestamp>`` folder (suffixed if that one exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path, k = base, 1
    while path.exists():  # two runs in the same second
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


class RunFolder:
    """A run folder: writes and reads its files through their typed records."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: schema.Config) -> None:
        """Write the run's config.toml (what a resume and the model card read)."""
        (self.path / "config.toml").write_text(configio.to_toml(cfg))

    def append_metrics(self, line: MetricsLine) -> None:
        """Append one round's line to metrics.jsonl."""
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(line.to_json() + "\n")

    def read_metrics(self) -> list[MetricsLine]:
        """The metrics lines, one per round (see fedshield.run_records.read_metrics)."""
        return read_metrics(self.path)

    def truncate_metrics(self, last_round: int) -> None:
        """On resume, drop lines of rounds after the checkpoint (they will be redone)."""
        kept = [m for m in self.read_metrics() if m.round <= last_round]
        (self.path / METRICS_FILE).write_text("".join(m.to_json() + "\n" for m in kept))

    def write_summary(self, summary: RunSummary) -> None:
        """Write summary.json whole (a crash never leaves half a summary)."""
        _atomic_write(self.path / SUMMARY_FILE, summary.to_json())

    def read_summary(self) -> RunSummary:
        """summary.json as a record; StateCorrupted if it is missing, torn or edited."""
        return read_summary(self.path)

    def save_weights(self, name: str, state: dict[str, torch.Tensor],
                     meta: Mapping[str, object]) -> Path:
        """Save weights as safetensors (Opacus' ``_module.`` prefix removed)."""
        path = self.path / name
        save_file({k.removeprefix("_module."): v.contiguous() for k, v in state.items()},
                  str(path), metadata={k: str(v) for k, v in meta.items()})
        return path

    def plot(self) -> Path | None:
        """Plot accuracy and loss per round to accuracy.png (None when no round was scored)."""
        rows = [m for m in self.read_metrics() if m.accuracy is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [m.round for m in rows]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        # rows are the scored rounds; a round without a loss is a gap (NaN, as matplotlib
        # draws None)
        accuracy = [float("nan") if m.accuracy is None else m.accuracy for m in rows]
        loss = [float("nan") if m.loss is None else m.loss for m in rows]
        ax.plot(rounds, accuracy, "o-", color="tab:blue", label="accuracy")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(rounds, loss, "s--", color="tab:red", label="loss")
        ax2.set_ylabel("test loss", color="tab:red")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "accuracy.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a torn file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
