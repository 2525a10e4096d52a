"""fedshield ClientApp: validate local data, train (optionally with DP-SGD), evaluate.

Handlers are thin: they decode the message, call plain functions, and encode the reply. A client
that cannot or must not train (invalid data, privacy budget exhausted) replies with a ``refusal``
record naming the reason, so the server logs it and the round goes on. One round of local
training is client/fit.py; the SecAgg+ protocol messages are client/secagg.py; the "query" after
the last round (the drift-reference counts) is client/reference.py.
"""

from __future__ import annotations

from typing import cast

import torch
from fedshield.client.data import load_client_data
from fedshield.client.fit import (
    DataLoader,
    checked_data,
    client_ledger,
    fit_locally,
    identity,
    privacy_cap,
    round_seed,
    site_key,
)
from fedshield.client.reference import answer_query
from fedshield.client.secagg import secagg_train
from fedshield.privacy.releases import EXACT_MODE, OUTSIDE_KEY
from fedshield.tasks import Task, evaluate
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedshield import validation
from fedshield.errors import BudgetExhausted, DataValidationError
from fedshield.records import (
    EvalReport,
    Refusal,
    TrainReport,
    encode_eval_report,
    encode_refusal,
    encode_train_report,
)

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


def _model_from(msg: Message, task: Task) -> torch.nn.Module:
    model = task.build_model()
    model.load_state_dict(_arrays(msg).to_torch_state_dict())
    return model


def make_client_app(load_data: DataLoader = load_client_data) -> ClientApp:
    """Build the ClientApp; simulations inject a different ``load_data`` (e.g. poisoned data)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = validation.from_run_config(context.run_config)
        if cfg.secagg.enabled:  # Flower's SecAgg+ protocol messages (see client/secagg.py)
            return secagg_train(msg, context, cfg, load_data)
        try:
            model, metrics = fit_locally(context, cfg, load_data,
                                         _arrays(msg).to_torch_state_dict(),
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
        cfg = validation.from_run_config(context.run_config)
        try:
            task, _, val = checked_data(context, cfg, load_data)
        except DataValidationError as exc:
            return refusal(msg, context, "invalid-data", str(exc))
        if not len(val):
            return refusal(msg, context, "no-validation-data",
                           "too few local examples to hold some out")
        if cfg.privacy.enabled and cfg.privacy.release_stats != EXACT_MODE:
            return refusal(msg, context, "not-released",
                           "exact held-out loss and accuracy are outside the DP guarantee; set "
                           'privacy.release_stats = "exact-outside-guarantee" to release them')
        result = evaluate(_model_from(msg, task), val)
        # Under DP only with the opt-in (checked above): exact values, marked as such.
        extra = {OUTSIDE_KEY: 1.0} if cfg.privacy.enabled else {}
        report = EvalReport(num_examples=len(val), accuracy=result["accuracy"],
                            loss=result["loss"], extra=extra)
        return Message(encode_eval_report(report), reply_to=msg)

    @app.query()
    def query_handler(msg: Message, context: Context) -> Message:
        # After the last round: the drift-reference counts (client/reference.py).
        return answer_query(msg, context, validation.from_run_config(context.run_config),
                            load_data)

    return app


app = make_client_app()
