"""Wiring simulated adversaries into a federation, on any engine.

Byzantine clients run the honest ClientApp on poisoned data (data attacks); after each training
round a reply hook on the server's strategy replaces their updates with crafted ones, seeing the
honest updates of the round (update attacks, omniscient as in the literature). The hook sits on
``aggregate_train`` (server.hooks), so it runs in-process, on Ray and under ``flwr run`` alike.
Honest code paths are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from fedshield.client.app import make_client_app
from fedshield.client.data import load_client_data
from fedshield.server.flat import flatten, stack, unflatten
from fedshield.server.hooks import ATTACK, ReplyHook, register_reply_hook
from fedshield.simulations.attacks import ATTACKS, select_byzantine, triggered_test_set
from fedshield.tasks import Split, Task, task_for
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedshield.schema import Config

ReplyFilter = ReplyHook  # (sent, replies) -> replies; the old grid-level name
ClientLoader = Callable[[Context, Config], tuple[Task, Split, Split]]


def byzantine_ids(cfg: Config) -> frozenset[int]:
    """The partition ids of the run's Byzantine clients (explicit ids, else drawn with the seed)."""
    return select_byzantine(cfg.federation.num_clients, cfg.attack.byzantine_fraction,
                            cfg.attack.byzantine_ids, cfg.seed)


def _poisoned_loader(cfg: Config) -> ClientLoader:
    attack = ATTACKS[cfg.attack.name]
    poison_data = attack.poison_data
    assert poison_data is not None  # only called for attacks that poison data

    def load(context: Context, run_cfg: Config) -> tuple[Task, Split, Split]:
        task, train, val = load_client_data(context, run_cfg)
        rng = np.random.default_rng([cfg.seed, int(context.node_config["partition-id"])])
        x, y = poison_data(train.x, train.y, task.num_classes, cfg.attack, rng)
        return task, Split(x, y), val

    return load


def adversarial_apps(cfg: Config, client_apps: dict[int, ClientApp]
                     ) -> tuple[dict[int, ClientApp], ReplyFilter | None]:
    """(client apps with Byzantine ones swapped in, the run's reply hook or None).

    The in-process engine's per-partition apps; the reply hook is :func:`attack_reply_hook`."""
    attack = ATTACKS[cfg.attack.name]
    byz = byzantine_ids(cfg)
    apps = dict(client_apps)
    if attack.poison_data is not None:
        poisoned = make_client_app(load_data=_poisoned_loader(cfg))
        apps.update({pid: poisoned for pid in byz})
    return apps, attack_reply_hook(cfg)


def simulated_client_data(context: Context, run_cfg: Config) -> tuple[Task, Split, Split]:
    """A client's data as the run config's simulated attack has it: poisoned on a Byzantine
    partition of a data attack, honest otherwise. One ClientApp for every node, for engines
    that run a single ClientApp (Flower's Ray backend, ``flwr run``)."""
    attack = ATTACKS.get(run_cfg.attack.name)
    pid = int(context.node_config["partition-id"])
    if attack is None or attack.poison_data is None or pid not in byzantine_ids(run_cfg):
        return load_client_data(context, run_cfg)
    return _poisoned_loader(run_cfg)(context, run_cfg)


def attack_reply_hook(cfg: Config) -> ReplyFilter | None:
    """The omniscient attacker of an update attack (None for a data-only attack): it sees the
    round's honest updates and replaces the Byzantine ones with crafted ones. The ServerApp
    installs it on the strategy (server.hooks), so it runs on every engine."""
    craft = ATTACKS[cfg.attack.name].craft
    if craft is None:
        return None
    byz = byzantine_ids(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)

    def reply_hook(sent: list[Message], replies: list[Message]) -> list[Message]:
        if not sent or not replies:
            return replies
        by_id = {m.metadata.message_id: m for m in sent}
        global_arrays = {k: v.numpy() for k, v in _arrays(sent[0]).items()}
        names = list(global_arrays)
        trained = [r for r in replies if not r.has_error() and "arrays" in r.content
                   and "refusal" not in r.content]
        is_byz = [int(cast(int, r.content["metrics"].get("partition-id", -1))) in byz
                  for r in trained]
        bad = [r for r, b in zip(trained, is_byz, strict=True) if b]
        if not bad:
            return replies
        good = [r for r, b in zip(trained, is_byz, strict=True) if not b]
        g = torch.from_numpy(flatten(global_arrays, names))

        def deltas(msgs: list[Message]) -> torch.Tensor:
            arrays = [{k: v.numpy() for k, v in _arrays(m).items()} for m in msgs]
            return torch.from_numpy(stack(arrays, names)) - g if msgs else torch.zeros(0, len(g))

        crafted = craft(deltas(bad), deltas(good), cfg.attack, generator) + g
        swapped = {}
        # strict: an attack returns one row per Byzantine update (base.Craft)
        for reply, vector in zip(bad, crafted, strict=True):
            arrays = unflatten(vector.numpy(), global_arrays)
            content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.array(v))
                                                         for k, v in arrays.items()}),
                                  "metrics": reply.content["metrics"]})
            swapped[id(reply)] = Message(content,
                                         reply_to=by_id[reply.metadata.reply_to_message_id])
        return [swapped.get(id(r), r) for r in replies]

    return reply_hook


def install_attack_hook() -> None:
    """Register :func:`attack_reply_hook` with the ServerApp's reply-hook registry."""
    register_reply_hook(ATTACK, attack_reply_hook)


def _arrays(message: Message) -> ArrayRecord:
    return cast(ArrayRecord, message.content["arrays"])


def backdoor_success(cfg: Config, model: torch.nn.Module) -> float:
    """Fraction of triggered test images (true label != target) classified as the target."""
    task = task_for(cfg.task)
    _, test = task.load()
    x = triggered_test_set(test.x, test.y, cfg.attack.target_label, task.is_image)
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(torch.from_numpy(x[i:i + 1024])).argmax(1)
                           for i in range(0, len(x), 1024)])
    return float((preds == cfg.attack.target_label).float().mean())
