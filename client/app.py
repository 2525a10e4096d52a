"""fedshield ClientApp: validate local data, train (optionally with DP-SGD), evaluate (under DP
through accounted releases, client/evaluate.py).

Handlers are thin: they decode the message, call plain functions, and encode the reply. A client
that cannot or must not train (invalid data, privacy budget exhausted) replies with a ``refusal``
record naming the reason, so the server logs it and the round goes on. One round of local
training is client/fit.py; the SecAgg+ protocol messages are client/secagg.py; the "query" after
the last round (the drift-reference counts) is client/reference.py.
"""

from __future__ import annotations

import functools
import time
from typing import Any, cast

import torch
from fedshield.client.data import load_client_data
from fedshield.client.evaluate import evaluate_locally
from fedshield.client.fit import (
    DataLoader,
    client_ledger,
    fit_locally,
    identity,
    privacy_cap,
    round_seed,
    site_key,
)
from fedshield.client.reference import answer_query
from fedshield.client.secagg import secagg_train
from fedshield.client.timing import note_message
from fedshield.tasks import Task
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedshield import schema, validation
from fedshield.errors import BudgetExhausted, DataValidationError
from fedshield.records import (
    EvalReport,
    Refusal,
    TrainReport,
    array_views,
    encode_eval_report,
    encode_refusal,
    encode_train_report,
)

# Validated run configs kept per process (one per run the process serves at a time).
RUN_CONFIGS_KEPT = 8

# Re-exported: callers and tests import these from client.app (their home is client/fit.py).
__all__ = ["DataLoader", "client_ledger", "fit_locally", "make_client_app", "privacy_cap",
           "round_seed", "site_key"]


def refusal(msg: Message, context: Context, code: str, reason: str) -> Message:
    """The reply of a client that must not train or evaluate: a code and a reason."""
    pid = identity(context).get("partition-id")
    return Message(encode_refusal(Refusal(code, reason, pid)), reply_to=msg)


def round_config(msg: Message) -> dict:
    """The message's round config (``server-round``, ``train.*``), empty when absent."""
    return dict(msg.content["config"]) if "config" in msg.content else {}


def _arrays(msg: Message) -> ArrayRecord:
    # the server's train and evaluate messages carry the model as the ArrayRecord "arrays"
    return cast(ArrayRecord, msg.content["arrays"])


def global_weights(msg: Message) -> dict[str, torch.Tensor]:
    """The message's global model as writable tensors: one copy of each array's bytes
    (``to_torch_state_dict`` would np.load each, parsing its .npy header every time: more than
    a small model's training step costs)."""
    return {name: torch.from_numpy(view.copy()) for name, view
            in array_views(_arrays(msg)).items()}


def _model_from(msg: Message, task: Task) -> torch.nn.Module:
    model = task.build_model()
    model.load_state_dict(global_weights(msg))
    return model


@functools.lru_cache(maxsize=RUN_CONFIGS_KEPT)
def _config_of(items: tuple[tuple[str, type, Any], ...]) -> schema.Config:
    return validation.from_run_config({key: value for key, _, value in items})


def run_config(context: Context) -> schema.Config:
    """The validated Config of the node's run config. Validating ~100 keys costs more than a
    small client's training, and every message of a run carries the same ones: a run's Config
    (frozen) is built once per process (an invalid one raises ConfigError every time)."""
    # typed: 1, 1.0 and True hash alike but do not validate alike
    key = tuple(sorted((k, type(v), v) for k, v in context.run_config.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable value (never from Flower's scalar run config)
        return validation.from_run_config(context.run_config)
    return _config_of(key)


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def make_client_app(load_data: DataLoader = load_client_data) -> ClientApp:
    """Build the ClientApp; simulations inject a different ``load_data`` (e.g. poisoned data)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.time()  # for the timing line (client/timing.py)
        reply = _train(msg, context)
        note_message("train", msg.metadata.created_at, msg.metadata.run_id,
                     str(round_config(msg).get("server-round", "")), started)
        return reply

    def _train(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        if cfg.secagg.enabled:  # Flower's SecAgg+ protocol messages (see client/secagg.py)
            return secagg_train(msg, context, cfg, load_data)
        try:
            model, metrics = fit_locally(context, cfg, load_data, global_weights(msg),
                                         round_config(msg))
        except DataValidationError as exc:
            return refusal(msg, context, "invalid-data", str(exc))
        except BudgetExhausted as exc:  # also a lost ledger or a repeated release (their codes)
            return refusal(msg, context, getattr(exc, "code", "budget-exhausted"), str(exc))
        arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        return Message(encode_train_report(TrainReport.from_metrics(arrays, metrics)),
                       reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        started = time.time()  # for the timing line (client/timing.py)
        reply = _evaluate(msg, context)
        note_message("evaluate", msg.metadata.created_at, msg.metadata.run_id,
                     str(round_config(msg).get("server-round", "")), started)
        return reply

    def _evaluate(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        try:
            metrics = evaluate_locally(context, cfg, load_data,
                                       lambda task: _model_from(msg, task), round_config(msg))
        except DataValidationError as exc:
            return refusal(msg, context, "invalid-data", str(exc))
        except BudgetExhausted as exc:  # the release would exceed the budget: nothing is sent
            return refusal(msg, context, getattr(exc, "code", "budget-exhausted"), str(exc))
        m = dict(metrics)
        report = EvalReport(num_examples=int(m.pop("num-examples")), accuracy=m.pop("accuracy"),
                            loss=m.pop("loss"),
                            partition_id=_int_or_none(m.pop("partition-id", None)),
                            extra=m)
        return Message(encode_eval_report(report), reply_to=msg)

    @app.query()
    def query_handler(msg: Message, context: Context) -> Message:
        # After the last round: the drift-reference counts (client/reference.py).
        return answer_query(msg, context, run_config(context),
                            load_data)

    return app


app = make_client_app()
