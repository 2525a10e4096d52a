"""Federated evaluation on a client: the global model on the local held-out split.

Without DP the client reports exact accuracy, loss and example count. Under DP with
``privacy.release_stats = "dp"`` it releases them through the accounted Gaussian mechanism of
privacy/releases.py (noised held-out count once per run, noised correct count and clipped loss
sum each time), every release an event in its ledger (client/releases.py); exact values never
leave. With the opt-in ``"exact-outside-guarantee"`` it sends exact values marked as outside the
guarantee.

No Flower message handling here: client/app.py decodes the message and encodes the reply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fedshield.client.fit import (
    DataLoader,
    checked_data,
    client_ledger,
    identity,
    released_rounds,
)
from fedshield.client.releases import evaluation_release
from fedshield.privacy.releases import EXACT_MODE, OUTSIDE_KEY
from fedshield.tasks import Split, Task, evaluate
from flwr.app import Context
from torch import nn

from fedshield import schema
from fedshield.errors import DataValidationError


@torch.no_grad()
def clipped_counts(model: nn.Module, data: Split, loss_clip: float,
                   batch_size: int = 1024) -> tuple[int, float]:
    """(correct predictions, sum of per-example cross-entropies clipped to [0, loss_clip]): the
    two sums the DP release noises (one example moves them by at most 1 and loss_clip)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        xb = torch.from_numpy(data.x[start:start + batch_size])
        yb = torch.from_numpy(data.y[start:start + batch_size])
        logits = model(xb)
        losses = nn.functional.cross_entropy(logits, yb, reduction="none")
        loss_sum += float(losses.clamp(0.0, loss_clip).sum())
        correct += int((logits.argmax(1) == yb).sum())
    return correct, loss_sum


def evaluate_locally(context: Context, cfg: schema.Config, load_data: DataLoader,
                     model_from: Callable[[Task], nn.Module], rc: dict) -> dict[str, float]:
    """The reply metrics of one evaluation (``model_from(task)`` builds the global model).

    Raises DataValidationError when the local data is unusable or holds no held-out examples,
    BudgetExhausted (or its ledger subclasses) when a DP release would exceed the budget."""
    task, _, val = checked_data(context, cfg, load_data)
    if not len(val):
        raise DataValidationError("too few local examples to hold some out for evaluation")
    model = model_from(task)
    privacy = cfg.privacy
    if privacy.enabled and privacy.release_stats != EXACT_MODE:
        run_key = str(rc.get("run-key", context.run_id))
        server_round = int(rc.get("server-round", 0))
        ledger = client_ledger(cfg, context, run_key, server_round, released_rounds(rc))
        correct, loss_sum = clipped_counts(model, val, privacy.eval_loss_clip)
        release, new, epsilon = evaluation_release(correct, loss_sum, len(val), privacy, ledger,
                                                   run_key, server_round)
        # The cumulative epsilon after this release: the last word on what the client spent
        # (the run's final evaluation comes after its final training reply).
        return {**release.to_metrics(new), "epsilon": epsilon, **identity(context)}
    result = evaluate(model, val)
    # Under DP only with the opt-in (checked above): exact values, marked as such.
    extra = {OUTSIDE_KEY: 1.0} if privacy.enabled else {}
    return {"accuracy": result["accuracy"], "loss": result["loss"],
            "num-examples": float(len(val)), **extra, **identity(context)}
