"""One round of local training on a client: load and validate the local data, open the site's
privacy ledger, train (DP-SGD with client/dp.py when privacy is on, else client/training.py) and
build the reply metrics (client/releases.py decides what may leave under DP).

No Flower message handling here: client/app.py (the plain path) and client/secagg.py (the SecAgg+
path) both call :func:`fit_locally` and encode its result their own way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from fedshield.client.releases import (
    planned_events,
    reply_metrics,
    stats_release,
    training_release,
)
from fedshield.client.timing import note_local
from fedshield.client.training import train_local
from fedshield.client.validation import quality_report, validate_split
from fedshield.privacy.releases import EXACT_MODE
from fedshield.tasks import Split, Task
from flwr.app import Context

from fedshield import configio, schema
from fedshield.records import RELEASED_ROUNDS

DataLoader = Callable[[Context, schema.Config], tuple[Task, Split, Split]]


def identity(context: Context) -> dict[str, int]:
    """The partition id, where the node has one, so the server can report per client."""
    pid = context.node_config.get("partition-id")
    return {} if pid is None else {"partition-id": int(pid)}


def checked_data(context: Context, cfg: schema.Config, load_data: DataLoader):
    """(task, train, validation) from ``load_data``; raises DataValidationError when the local
    data is unusable."""
    task, train, val = load_data(context, cfg)
    validate_split(train, task, "local training data")
    if len(val):
        validate_split(val, task, "local validation data")
    return task, train, val


def client_ledger(cfg: schema.Config, context: Context, run_key: str, server_round: int = 0,
                  released: int | None = None):
    """This client's persistent privacy ledger (see privacy.ledger_scope).

    Its budget belongs to the site's data (:func:`site_key`), not to the federation name the
    coordinator picks: the cap applies to the total over every federation of the site. Raises
    LedgerMissing when the ledger lacks releases of this run that the server received
    (``released``, the message's ``released-rounds``; Ledger.require_run_history)."""
    from fedshield.privacy.ledger import Ledger

    node = context.node_config
    scope = cfg.privacy.ledger_scope
    if scope == "auto":
        scope = "federation" if "data-path" in node else "run"
    owner = cfg.name if scope == "federation" else f"{cfg.name}/runs/{run_key}"
    client = node.get("site-id", f"partition-{node.get('partition-id', context.node_id)}")
    # A simulated run re-partitions its benchmark data: its ledger's data is that run's partition.
    site = site_key(node) if scope == "federation" else f"{owner}/{client}"
    # node-config values are untyped TOML scalars; ledger_path Path()s and str()s them
    ledger_dir = cast(str | Path, node.get("ledger-dir", cfg.privacy.ledger_dir))
    ledger = Ledger.for_client(ledger_dir, owner, cast(str | int, client),
                               cfg.privacy.delta, cfg.privacy.accountant, privacy_cap(cfg, node),
                               site=site)
    if released is not None:
        ledger.require_run_history(run_key, server_round, released)
    elif cfg.federation.fraction_train >= 1.0 and not cfg.central_dp.enabled:
        ledger.require_run_history(run_key, server_round)
    return ledger


def released_rounds(rc: dict) -> int | None:
    """The message's count of this client's releases the server received (None: not said)."""
    value = rc.get(RELEASED_ROUNDS)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def site_key(node_config) -> str:
    """What a site's budget belongs to: its site-id, else a fingerprint of its data path, else its
    partition (simulations). Set by the site in its node config, never by the coordinator."""
    import hashlib
    from pathlib import Path

    if "site-id" in node_config:
        return f"site:{node_config['site-id']}"
    if "data-path" in node_config:
        path = str(Path(str(node_config["data-path"])).expanduser().resolve())
        return f"data:{hashlib.sha256(path.encode()).hexdigest()[:16]}"
    return f"partition:{node_config.get('partition-id', 'none')}"


def privacy_cap(cfg: schema.Config, node_config) -> float:
    """The tighter of the federation's budget and the site's own (node config max-epsilon);
    0 = no budget. A site can lower its cap, never raise the federation's."""
    caps = [c for c in (cfg.privacy.max_epsilon, float(node_config.get("max-epsilon", 0.0)))
            if c > 0]
    return min(caps, default=0.0)


def _train_private(model, data, train_cfg, cfg: schema.Config, context: Context, rc: dict,
                   seed: int, task: Task) -> dict[str, float]:
    from fedshield.client.dp import train_private  # Opacus only when DP is on

    run_key = str(rc.get("run-key", context.run_id))
    server_round = int(rc.get("server-round", 0))
    ledger = client_ledger(cfg, context, run_key, server_round, released_rounds(rc))
    # Under DP the example count is private: release the class histogram once (accounted), and
    # plan sample rate, steps and noise from its noised total (privacy/releases.py).
    release, stats = None, {}
    if cfg.privacy.release_stats != EXACT_MODE:
        release, new = stats_release(data.y, task.num_classes, cfg.privacy, ledger, run_key)
        stats = {**release.to_metrics(new), "num-examples": release.planning_count}
    total_rounds = int(rc.get("num-rounds", 1))
    # The drift-reference histograms, once per run and accounted like the class histogram
    # (client/releases.py); the ServerApp collects the kept release after the last round.
    reference, reference_new = training_release(task, data, cfg, ledger, run_key)
    if reference is not None:  # its event's parameters (the counts go only to the query)
        stats = {**stats, **reference.to_metrics(reference_new)}
    # The plan leaves room for the histogram release, federated evaluation's releases and the
    # drift reference's.
    extra = planned_events(cfg.privacy, cfg.federation.fraction_evaluate, total_rounds, release)
    extra += (reference.event,) if reference is not None else ()
    result = train_private(model, data, train_cfg, cfg.privacy, ledger,
                           total_rounds=total_rounds,
                           server_round=server_round, run_id=run_key, seed=seed,
                           planning_examples=release.planning_count if release else None,
                           extra_events=extra)
    m = result["metrics"]
    return {"epsilon": m["epsilon"], "delta": m["delta"], "noise-multiplier": m["noise_multiplier"],
            "clip-norm": m["max_grad_norm"], "sample-rate": m["sample_rate"],
            "steps": float(m["steps"]), "train-loss": m["train_loss"],
            "train-seconds": m["train_seconds"], **stats}


def round_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The client's seed for one round: augmentation and non-DP shuffling (and DP draws only under
    privacy.reproducible_noise). The server knows all three inputs, so nothing secret may use it."""
    return int(np.random.SeedSequence([run_seed, server_round, partition_id]).generate_state(1)[0])


def fit_locally(context: Context, cfg: schema.Config, load_data: DataLoader,
                weights: dict[str, torch.Tensor] | list[np.ndarray],
                rc: dict) -> tuple[torch.nn.Module, dict]:
    """One round of local training from the global ``weights`` (DP-SGD when privacy is on).

    ``weights`` are named tensors, or unnamed arrays in the model's state_dict order (Flower's
    legacy messages); ``rc`` is the round config (``server-round``, ``train.*``). Returns (trained
    model, metrics); raises DataValidationError or BudgetExhausted when the client must not train.
    """
    started = time.perf_counter()
    task, data, _ = checked_data(context, cfg, load_data)
    train_cfg = configio.section(schema.TrainConfig, configio.unflatten(rc).get("train", {}),
                                 "train.")
    train_cfg = replace(train_cfg, lr=train_cfg.lr_at(int(rc.get("server-round", 1)),
                                                      int(rc.get("num-rounds", 1))))
    model = task.build_model()
    if isinstance(weights, list):
        weights = {name: torch.from_numpy(np.array(a)) for name, a
                   in zip(model.state_dict(), weights, strict=True)}
    model.load_state_dict(weights)
    seed = round_seed(cfg.seed, int(rc.get("server-round", 0)),
                      int(context.node_config.get("partition-id", 0)))
    metrics: dict[str, float] = {}
    loop_started = time.perf_counter()
    if cfg.privacy.enabled:
        metrics.update(_train_private(model, data, train_cfg, cfg, context, rc, seed, task))
    else:
        metrics.update(train_local(model, data, train_cfg, seed))
    loop = float(metrics.get("train-seconds", time.perf_counter() - loop_started))
    exact = {**quality_report(data, task.num_classes), "num-examples": len(data)}
    metrics.update(identity(context))
    metrics["client-seconds"] = time.perf_counter() - started
    # The site's own log line only (client/timing.py): under DP these do not leave in the reply.
    note_local(train_s=loop, client_s=metrics["client-seconds"])
    # Under DP only the DP outputs leave, unless the user opted in (client/releases.py).
    return model, reply_metrics(metrics, cfg.privacy, exact)


