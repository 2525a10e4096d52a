"""Accuracy benchmark: run configs end to end and tabulate final/best test accuracy.

    .venv/bin/python benchmarks/bench_accuracy.py configs/bench-mnist-fedavg.toml \
        [--set key=value ...] [--out runs/bench-accuracy]

Prints a table and writes results.json + results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedshield.simulations.runner import simulate

from fedshield import validation


def run(configs: list[str], overrides: list[str], out: Path) -> list[dict]:
    """Run each config once with the overrides; one result row per config (also written to
    ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in configs:
        cfg = validation.load(path,
                              overrides + [f"output_dir={str(out / 'runs')!r}".replace("'", '"')])
        started = time.perf_counter()
        summary = simulate(cfg)
        rows.append({"config": path, "overrides": overrides, "task": cfg.task.name,
                     "partition": f"{cfg.partition.kind}"
                                  + (f"({cfg.partition.alpha})"
                                     if cfg.partition.kind == "dirichlet" else ""),
                     "clients": cfg.federation.num_clients, "rounds": summary.rounds_completed,
                     "rule": cfg.aggregation.rule, "attack": cfg.attack.name,
                     "final_accuracy": summary.final_accuracy,
                     "best_accuracy": summary.best_accuracy,
                     "epsilon_max": summary.privacy.epsilon_max,
                     "wall_seconds": round(time.perf_counter() - started, 1),
                     "run_dir": summary.run_dir})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    header = ("| config | task | partition | clients | rounds | rule | attack | final acc "
              "| best acc | eps max | wall s |")
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        lines.append(f"| {r['config']} | {r['task']} | {r['partition']} | {r['clients']} | "
                     f"{r['rounds']} | {r['rule']} | {r['attack']} | {r['final_accuracy']:.4f} | "
                     f"{r['best_accuracy']:.4f} | {eps} | {r['wall_seconds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="runs/bench-accuracy")
    args = parser.parse_args()
    run(args.configs, args.overrides, Path(args.out))
