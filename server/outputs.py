"""The run folder: ``runs/<name>-<timestamp>/`` with config, metrics, summary, plots and weights."""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedshield import configio, schema
from fedshield.errors import StateCorrupted

log = logging.getLogger("fedshield.outputs")

VERSIONED = ("fedshield", "flwr", "flwr-datasets", "torch", "opacus", "numpy")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def new_run_dir(cfg: schema.Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    path, k = base, 1
    while path.exists():  # two runs in the same second
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: schema.Config) -> None:
        (self.path / "config.toml").write_text(configio.to_toml(cfg))

    def append_metrics(self, line: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        """The metrics lines, one per round. A torn last line (a crash mid-append: no final
        newline) is dropped with a warning; any other unreadable line, or rounds out of order,
        is StateCorrupted: the results cannot be trusted, so nothing continues from them."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise StateCorrupted(f"{path} is not UTF-8 text (corrupted); restore it from a backup "
                                 "or start a new run") from None
        lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
        rows: list[dict] = []
        for k, (number, line) in enumerate(lines):
            row = _metrics_row(line)
            if row is None and k == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: dropping the torn last line %d (the run stopped while writing "
                            "it); that round will be redone on resume", path, number)
                break
            if row is None:
                raise StateCorrupted(f"{path}: line {number} is not a metrics record (corrupted "
                                     "or edited); restore it from a backup or start a new run")
            if rows and row["round"] <= rows[-1]["round"]:
                raise StateCorrupted(f"{path}: line {number} is round {row['round']} after round "
                                     f"{rows[-1]['round']}; the file was edited or two runs wrote "
                                     "to it. Start a new run")
            rows.append(row)
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """On resume, drop lines of rounds after the checkpoint (they will be redone)."""
        kept = [m for m in self.read_metrics() if m["round"] <= last_round]
        (self.path / "metrics.jsonl").write_text(
            "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))

    def save_weights(self, name: str, state: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        path = self.path / name
        save_file({k.removeprefix("_module."): v.contiguous() for k, v in state.items()},
                  str(path), metadata={k: str(v) for k, v in meta.items()})
        return path

    def plot(self) -> Path | None:
        rows = [m for m in self.read_metrics() if m.get("accuracy") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [m["round"] for m in rows]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(rounds, [m["accuracy"] for m in rows], "o-", color="tab:blue", label="accuracy")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(rounds, [m["loss"] for m in rows], "s--", color="tab:red", label="loss")
        ax2.set_ylabel("test loss", color="tab:red")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "accuracy.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def _metrics_row(line: str) -> dict | None:
    """One parsed metrics line, or None when it is not a JSON object with an integer round."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("round"), int) \
        and not isinstance(row["round"], bool)
    return row if ok else None
