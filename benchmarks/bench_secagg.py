"""SecAgg+ overhead: the same federation with secagg.enabled true and false, alternately.

    .venv/bin/python benchmarks/bench_secagg.py [configs/secagg-digits.toml] \
        [--repeats 2] [--set key=value ...] [--out runs/bench-secagg]

Per-round seconds come from each run's metrics.jsonl (round 1 is reported apart: it pays one-off
costs such as data partitioning). Prints a table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedshield.simulations.runner import simulate

from fedshield import validation
from fedshield.run_records import read_metrics


def run(config: str, overrides: list[str], repeats: int, out: Path) -> list[dict]:
    """Run the config with and without SecAgg+, ``repeats`` times each; one row per run."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(repeats):
        for secagg in (True, False):
            cfg = validation.load(config, overrides + [f'output_dir="{out / "runs"}"',
                                                 f"secagg.enabled={str(secagg).lower()}"])
            started = time.perf_counter()
            summary = simulate(cfg)
            wall = time.perf_counter() - started
            assert summary.run_dir is not None  # a simulated run always has its folder
            lines = read_metrics(summary.run_dir)
            # every recorded round is timed; 0.0 stands in as in bench_deployment
            later = [m.seconds or 0.0 for m in lines[1:]] or [lines[0].seconds or 0.0]
            rows.append({"secagg": secagg, "repeat": rep, "clients": cfg.federation.num_clients,
                         "rounds": len(lines), "first_round_s": lines[0].seconds,
                         "median_round_s": statistics.median(later),
                         "wall_s": round(wall, 2), "final_accuracy": summary.final_accuracy,
                         "run_dir": summary.run_dir})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    """Command line: run the SecAgg+ overhead benchmark and write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/secagg-digits.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-secagg")
    args = parser.parse_args()
    rows = run(args.config, args.overrides, args.repeats, Path(args.out))
    print(f"{'mode':<8} {'rep':>3} {'clients':>7} {'rounds':>6} {'round1 s':>9} "
          f"{'median round s':>14} {'wall s':>7} {'accuracy':>8}")
    for r in rows:
        print(f"{'secagg' if r['secagg'] else 'plain':<8} {r['repeat']:>3} {r['clients']:>7} "
              f"{r['rounds']:>6} {r['first_round_s']:>9.2f} {r['median_round_s']:>14.2f} "
              f"{r['wall_s']:>7.1f} {r['final_accuracy']:>8.4f}")
    for mode in (True, False):
        med = statistics.median(r["median_round_s"] for r in rows if r["secagg"] is mode)
        print(f"{'secagg' if mode else 'plain'}: median seconds per round {med:.2f}")


if __name__ == "__main__":
    main()
