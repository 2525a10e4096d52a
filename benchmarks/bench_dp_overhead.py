"""DP-SGD overhead: one round of DP local training vs the same round without DP, per
grad_sample_mode.

Same model, data, batch size and epochs in one process; runs are interleaved and repeated, and the
ratio uses each configuration's fastest run (the least disturbed by other processes on the machine).
Two DP times: the DP-SGD loop alone (``train_seconds``, what the issue's <= 1.5x target is about)
and the whole ``client.dp.train_private`` call (accounting and ledger writes included: about
0.2-0.5 s of PRV accounting per round, which dominates on models that train in well under a
second).

Secure randomness (privacy/randomness.py: DP noise and Poisson masks from AES-256-CTR under a
secret key, 4 Gaussians summed per noise value) is the default; a "seeded" leg reruns the
auto-picked mode with ``privacy.reproducible_noise = true`` (Opacus' seeded draws). ``secure_cost``
is what the secure draws (noise for every parameter, ahead in NoiseAhead's blocks, and the Poisson
mask) add to a step, timed alone (``draws_ms``: CPU time on one thread, fastest of 20 rounds) as a
share of the fastest seeded DP step: steadier on a busy machine than ``secure_cost_loop``, which
compares the two legs' whole loops. Minimum-based on purpose: on a shared machine the fastest run
is the least disturbed one; medians are in the JSON.

Each task runs at ``--batch-size`` (64) and at the batch size of every DP config in configs/ that
trains it (``privacy.enabled`` and the same task and model: e.g. 1024 for
configs/bench-dp-mnist-scattering.toml); each row says which config its batch comes from.

    python benchmarks/bench_dp_overhead.py                      # MnistCNN, TanhCNN (the default
                                                                # run's DP model), ScatterNet +
                                                                # linear on 6,000 MNIST + MLPs
    python benchmarks/bench_dp_overhead.py --tasks digits --repeats 2 --out runs/bench-dp-quick
    python benchmarks/bench_dp_overhead.py --tasks digits mnist-scattering:scatter_linear \
        --modes bk --examples 2000 --repeats 3 --out runs/bench-dp-secure   # secure vs seeded only

A task is a task name, optionally with one of its models: ``mnist:tanh_cnn``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedshield.client.dp import pick_grad_sample_mode, train_private
from fedshield.privacy.ledger import Ledger
from fedshield.privacy.planner import sample_rate
from fedshield.privacy.randomness import (
    BLOCK_VALUES,
    DEFAULT_CIPHER,
    NOISE_SUMMANDS,
    ReproducibleNoiseWarning,
    SecureRandom,
)
from fedshield.tasks import Split, get_task

from fedshield.schema import PrivacyConfig, TrainConfig

MODES = ("bk", "ghost", "hooks", "functorch", "ew")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a config's batch is timed on at least this many batches' worth of examples (Poisson steps)
MIN_BATCHES = 4


def config_batches(name: str, configs: Path = CONFIGS) -> list[tuple[int, str]]:
    """(batch size, config path) of every DP config that trains task ``name`` ("task[:model]"),
    one per distinct batch size, in file-name order."""
    task_name, _, model = name.partition(":")
    found: dict[int, str] = {}
    for path in sorted(configs.glob("*.toml")):
        cfg = tomllib.loads(path.read_text())
        task, train = cfg.get("task", {}), cfg.get("train", {})
        if (task.get("name") == task_name and task.get("model", "") == model
                and cfg.get("privacy", {}).get("enabled") and "batch_size" in train):
            found.setdefault(int(train["batch_size"]), f"configs/{path.name}")
    return sorted(found.items())


def train_plain(model: nn.Module, data: Split, cfg: TrainConfig, seed: int) -> None:
    """The non-private baseline: shuffled mini-batches, plain SGD, same hyper-parameters."""
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    model.train()
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()


def load_examples(task, examples: int) -> Split:
    """The first ``examples`` training examples. ScatterNet features come from the machine's
    feature cache when an earlier run made it (tasks/scattering.py, memory-mapped), else are
    computed for just those (the full 60,000-image cache takes minutes on a small machine)."""
    if task.name == "mnist-scattering":
        from fedshield.tasks.images import load_mnist
        from fedshield.tasks.scattering import J, L, cache_dir

        train = load_mnist()[0]
        # the name cached_scatter gives the full training set's features
        digest = hashlib.sha256(train.x.tobytes()).hexdigest()[:16]
        cache = cache_dir() / f"mnist-train-scattering-J{J}L{L}-{digest}.npy"
        if cache.is_file():
            features = np.load(cache, mmap_mode="r")
            return Split(np.array(features[:examples]), train.y[:examples].copy())
        pixels = train.subset(np.arange(examples))
        return Split(task.from_pixels(pixels.x), pixels.y)
    train, _ = task.load()
    return train.subset(np.arange(min(examples, len(train))))


def draws_ms(model: nn.Module, examples: int, rate: float, steps: int, summands: int,
             repeats: int = 20, cipher: str = DEFAULT_CIPHER) -> float:
    """CPU milliseconds a step spends drawing its DP randomness (noise for ``model``'s parameters
    and the Poisson mask over ``examples``), over a round of ``steps`` (fastest of ``repeats``).
    Thread CPU time on one torch thread: not inflated when other processes preempt this one, and
    no less than the wall time the same draws take on more threads (an upper bound).

    summands = 0: Opacus' seeded draws (torch.normal per tensor, torch.rand per mask). Otherwise
    the secret streams (``cipher``), with noise drawn ahead in NoiseAhead's blocks and that many
    Gaussians summed per value (4 is what training uses; 1 separates the CSPRNG's cost from the
    fix's). Both legs turn the mask into indices, as both samplers do."""
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    numel = sum(math.prod(shape) for shape in shapes)
    per_block = max(1, min(steps, BLOCK_VALUES // numel))
    noise, masks = SecureRandom(cipher), SecureRandom(cipher)
    generator = torch.Generator().manual_seed(0)
    best, threads = float("inf"), torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(repeats):
        start = time.thread_time()
        for step in range(steps):
            if not summands:
                (torch.rand(examples, generator=generator) < rate).nonzero()
                for shape in shapes:
                    torch.normal(0.0, 1.0, size=shape, generator=generator)
                continue
            masks.bernoulli_mask(examples, rate).nonzero()
            if step % per_block == 0:
                noise.gaussian((min(per_block, steps - step), numel), 1.0, summands=summands)
        best = min(best, time.thread_time() - start)
    torch.set_num_threads(threads)
    return best / steps * 1e3


def bench_task(name: str, data: Split, cfg: TrainConfig, modes: tuple[str, ...], repeats: int,
               ledger_dir: Path, batch_from: str) -> list[dict]:
    """Rows for task ``name`` at ``cfg.batch_size`` (which ``batch_from`` names): plain, each DP
    mode, and on the auto-picked mode's row the cost of secure randomness."""
    task_name, _, model_name = name.partition(":")
    task = get_task(task_name).with_model(model_name)
    auto = pick_grad_sample_mode(task.build_model())
    seeded = f"seeded:{auto}"  # the auto mode again, with privacy.reproducible_noise
    legs = (*modes, seeded) if auto in modes else modes
    times: dict[str, list[float]] = {"plain": [], **{m: [] for m in legs}}
    loop: dict[str, list[float]] = {m: [] for m in legs}
    steps: dict[str, int] = {}
    step_min: dict[str, list[float]] = {m: [] for m in legs}
    errors: dict[str, str] = {}
    for rep in range(repeats + 1):  # the first pass warms up and is discarded
        for mode in times:
            if mode in errors:
                continue
            torch.manual_seed(rep)
            model = task.build_model()
            if mode == "plain":
                start = time.perf_counter()
                train_plain(model, data, cfg, rep)
                seconds = time.perf_counter() - start
            else:
                privacy = PrivacyConfig(enabled=True, noise_multiplier=1.0,
                                        delta=1 / (10 * len(data)),
                                        grad_sample_mode=mode.removeprefix("seeded:"),
                                        reproducible_noise=mode == seeded)
                tag = f"{name.replace(':', '-')}-b{cfg.batch_size}-{mode}-{rep}"
                ledger_file = ledger_dir / f"{tag}.json"
                ledger = Ledger(ledger_file, privacy.delta, "prv")
                try:
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ReproducibleNoiseWarning)  # the seeded leg
                        out = train_private(model, data, cfg, privacy, ledger, total_rounds=1,
                                            server_round=1, run_id="bench", seed=rep)
                    seconds = time.perf_counter() - start
                    steps[mode] = out["metrics"]["steps"]
                    if rep > 0:
                        step_min[mode].append(out["metrics"]["step_seconds_min"])
                except Exception as exc:  # noqa: BLE001 — a mode Opacus cannot run is reported
                    errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
            if rep > 0:
                times[mode].append(seconds)
                if mode != "plain":
                    loop[mode].append(out["metrics"]["train_seconds"])
    plain = min(times["plain"])
    batch = {"batch_size": cfg.batch_size, "batch_from": batch_from}
    rows = [{"task": name, "model": type(task.build_model()).__name__, "examples": len(data),
             **batch, "mode": "plain", "seconds_min": plain,
             "seconds_median": statistics.median(times["plain"]),
             "loop_seconds_min": plain, "loop_ratio": 1.0, "ratio": 1.0}]
    for mode in modes:
        if mode in errors:
            rows.append({"task": name, **batch, "mode": mode, "error": errors[mode]})
            continue
        rows.append({"task": name, "model": rows[0]["model"], "examples": len(data), **batch,
                     "mode": mode,
                     "auto_pick": mode == auto, "loop_seconds_min": min(loop[mode]),
                     "loop_ratio": min(loop[mode]) / plain, "seconds_min": min(times[mode]),
                     "seconds_median": statistics.median(times[mode]),
                     "ratio": min(times[mode]) / plain,
                     "ratio_median": statistics.median(times[mode])
                     / statistics.median(times["plain"])})
        if mode == auto and seeded not in errors:
            model, median = task.build_model(), statistics.median
            rate = sample_rate(len(data), cfg.batch_size)
            draws = {k: draws_ms(model, len(data), rate, steps[mode], k)
                     for k in (0, 1, NOISE_SUMMANDS)}
            chacha = draws_ms(model, len(data), rate, steps[mode], NOISE_SUMMANDS,
                              cipher="chacha20")
            step_ms = min(step_min[seeded]) * 1e3  # the fastest seeded step: least disturbed
            rows[-1].update({
                "noise": "secure", "steps": steps[mode], "dp_step_ms": step_ms,
                "draws_ms_seeded": draws[0], "draws_ms_secure": draws[NOISE_SUMMANDS],
                "draws_ms_secure_one_summand": draws[1], "draws_ms_secure_chacha20": chacha,
                # the headline: what secure draws add to a DP step, as a share of it
                "secure_cost": (draws[NOISE_SUMMANDS] - draws[0]) / step_ms,
                "secure_cost_one_summand": (draws[1] - draws[0]) / step_ms,
                "secure_cost_chacha20": (chacha - draws[0]) / step_ms,
                # whole loops, secure vs seeded: the direct measure, but noisy on a busy machine
                "secure_cost_loop": min(loop[mode]) / min(loop[seeded]) - 1,
                "secure_cost_loop_median": median(loop[mode]) / median(loop[seeded]) - 1})
    return rows


def print_row(r: dict) -> None:
    """One console line per row (two for the auto-picked mode: the secure-randomness cost)."""
    where = f"b{r['batch_size']}"
    if "error" in r:
        print(f"{r['task']:14} {where:>5} {r['mode']:10} unsupported: {r['error']}", flush=True)
        return
    mark = "  <- auto" if r.get("auto_pick") else ""
    print(f"{r['task']:14} {where:>5} {r['mode']:10} {r['examples']:>8} "
          f"{r['loop_seconds_min']:>8.2f} {r['loop_ratio']:>12.2f}x {r['seconds_min']:>8.2f} "
          f"{r['ratio']:>12.2f}x{mark}", flush=True)
    if "secure_cost" in r:
        print(f"{'':20} secure randomness ({r['batch_from']}): DP draws "
              f"{r['draws_ms_secure']:.3f} ms a step (1 summand "
              f"{r['draws_ms_secure_one_summand']:.3f}, ChaCha20 "
              f"{r['draws_ms_secure_chacha20']:.3f}) vs {r['draws_ms_seeded']:.3f} seeded; "
              f"DP step {r['dp_step_ms']:.2f} ms: cost {r['secure_cost']:+.1%} (1 summand "
              f"{r['secure_cost_one_summand']:+.1%}); whole loop {r['secure_cost_loop']:+.1%} "
              f"(median {r['secure_cost_loop_median']:+.1%})", flush=True)


def secure_cost_table(rows: list[dict]) -> str:
    """Markdown: the cost of secure randomness per task and batch size (auto-picked mode)."""
    lines = ["| task | model | batch (from) | steps | DP step ms | seeded draws ms | "
             "secure draws ms | secure cost | 1 summand | ChaCha20 | whole loop (min) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "secure_cost" not in r:
            continue
        lines.append(
            f"| {r['task']} | {r['model']} | {r['batch_size']} ({r['batch_from']}) | {r['steps']} "
            f"| {r['dp_step_ms']:.2f} | {r['draws_ms_seeded']:.3f} | {r['draws_ms_secure']:.3f} "
            f"| {r['secure_cost']:+.1%} | {r['secure_cost_one_summand']:+.1%} "
            f"| {r['secure_cost_chacha20']:+.1%} | {r['secure_cost_loop']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark; write results.json and table.md to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mnist", "mnist:tanh_cnn",
                                                      "mnist-scattering:scatter_linear", "digits",
                                                      "adult"],
                        help="task names, optionally task:model (e.g. mnist:tanh_cnn)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--examples", type=int, default=6000,
                        help=f"training examples per task (cap; raised to {MIN_BATCHES} batches of "
                             "the largest batch size timed)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="the common batch size every task runs at")
    parser.add_argument("--config-batches", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each task at the batch size of each DP config in configs/ "
                             "that trains it")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-dp-overhead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # how busy the machine was: a min-based ratio assumes some quiet
    print(f"{'task':14} {'batch':>5} {'mode':10} {'examples':>8} {'loop s':>8} "
          f"{'loop DP/plain':>13} {'call s':>8} {'call DP/plain':>13}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as ledgers:
        for name in args.tasks:
            batches = [(args.batch_size, "--batch-size")]
            if args.config_batches:
                batches += [b for b in config_batches(name) if b[0] != args.batch_size]
            task_name, _, model_name = name.partition(":")
            task = get_task(task_name).with_model(model_name)
            data = load_examples(task, max(args.examples, MIN_BATCHES * max(b for b, _ in batches)))
            for batch, source in batches:
                cfg = TrainConfig(lr=0.05, momentum=0.9, batch_size=batch, local_epochs=args.epochs)
                task_rows = bench_task(name, data, cfg, tuple(args.modes), args.repeats,
                                       Path(ledgers), source)
                for r in task_rows:
                    print_row(r)
                rows += task_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "dp-overhead", "args": vars(args), "torch": torch.__version__,
              "machine": platform.platform(), "threads": args.threads,
              "cpus": os.cpu_count(), "load_average_1_5_15": {"start": load_before,
                                                               "end": os.getloadavg()},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(secure_cost_table(rows))
    print(secure_cost_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
