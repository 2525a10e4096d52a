"""Server side of the SecAgg+ run mode: Flower's ``SecAggPlusWorkflow`` in its legacy workflow.

Flower 1.42 has secure aggregation only in its legacy-compat path: ``SecAggPlusWorkflow`` runs as
the fit step of ``DefaultWorkflow`` on a ``LegacyContext`` with a legacy ``Strategy``; there is no
Message-API (new-style strategy) version. This module therefore drives that workflow with a
legacy FedAvg and writes the same run folder as the plain path (shared ``RunRecorder``).

What the server sees per round: each sampled client's plaintext metrics (num-examples, train
loss, epsilon, data-quality counts) and masked vectors that are uniformly random mod 2**32; only
their sum, the weighted sum of the clients' updates (trained - global), is ever unmasked. Rules,
screening and reputation that need each client's update are refused by the config
(``secagg.enabled``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from fedshield.privacy.secagg import SECAGG_MODULUS
from fedshield.server.federation_state import FederationState, HoldsFederation, weighted_loss
from fedshield.server.prompt_grid import DelegatingGrid, PromptGrid
from fedshield.server.recording import RunRecorder, train_round_config
from fedshield.server.reference import after_last_round
from flwr.app import Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from fedshield import schema
from fedshield.records import RELEASED_ROUNDS, TrainReport, decode_train_metrics
from fedshield.run_records import RunSummary


class SecAggFedAvg(HoldsFederation, FedAvg):
    """Legacy FedAvg that keeps fedshield's round record and writes a metrics line per round.

    Clients upload updates (trained - global). Under SecAgg+, every result handed to
    ``aggregate_fit`` carries the same unmasked weighted mean of them; the per-client part of a
    result is its metrics. Central DP adds its noise to that sum (clients clipped their updates).
    """

    def __init__(self, cfg: schema.Config) -> None:
        fed = cfg.federation
        super().__init__(fraction_fit=fed.fraction_train, fraction_evaluate=0.0,
                         min_fit_clients=fed.min_clients, min_evaluate_clients=0,
                         min_available_clients=fed.min_clients, accept_failures=True)
        self.cfg = cfg
        self.run: RunRecorder | None = None  # set by run_secagg_federation
        self.names: list[str] = []
        # Reputation is refused with SecAgg+ (it needs individual updates), so it stays None.
        self.federation = FederationState(cfg)
        self._global: NDArrays = []
        self._aggregated = False

    # --- sampling --------------------------------------------------------------------------
    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Sample this round's cohort (Poisson at q under central DP) and send it the model."""
        rnd = self.federation.run_round(server_round)
        self.federation.new_round()
        self._aggregated = False
        self._global = parameters_to_ndarrays(parameters)
        client_manager.num_available()  # Flower wraps it to refresh the node list; wait_for is not
        client_manager.wait_for(self.min_available_clients,
                                timeout=int(self.cfg.federation.round_timeout))
        by_node = {p.node_id: p for p in client_manager.all().values()}
        eligible = [by_node[n] for n in self.federation.eligible(by_node)]
        k, _ = self.num_fit_clients(len(eligible))
        if self.cfg.central_dp.enabled:
            # Poisson at q, as the central accountant assumes; a cohort too small for SecAgg+ is
            # skipped (a function of the draw alone, so it costs no privacy), never topped up.
            chosen = [eligible[i] for i in self.federation.sample_positions(
                len(eligible), k, rnd, amplified=True)]
            if len(chosen) < 3:
                self.round.skipped = (f"the Poisson draw sampled {len(chosen)} clients; SecAgg+ "
                                      "needs 3, so the round is skipped")
                return []
        elif len(eligible) < max(k, 3):
            self.round.skipped = (f"only {len(eligible)} clients can train; SecAgg+ needs "
                                  f"{max(k, 3)}")
            return []
        else:
            # Seeded like the plain path (positions, not 64-bit ids), so a run is reproducible.
            chosen = [eligible[i] for i in self.federation.sample_positions(
                len(eligible), k, rnd, amplified=False)]
        self.round.sampled = [p.node_id for p in chosen]
        assert self.run is not None, "run_secagg_federation sets the run before any round"
        config = {"server-round": rnd, **train_round_config(self.cfg, self.run.folder)}
        released = self.federation.released_rounds  # per node: see FederationState
        return [(p, FitIns(parameters, {**config, RELEASED_ROUNDS: released.get(p.node_id, 0)}))
                for p in chosen]

    def note_error(self, node: int, reason: str) -> None:
        """A client's error reply in any protocol stage: it dropped out of the round."""
        if "BudgetExhausted" in reason:
            self.federation.note_refusal(node, "budget-exhausted", reason)
        elif "DataValidationError" in reason:
            self.federation.note_refusal(node, "invalid-data", reason)
        else:
            self.round.rejected[node] = f"client-error: {reason}"

    # --- aggregation (of the unmasked sum) -------------------------------------------------
    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the clients' metrics and apply the unmasked mean (plus central noise)."""
        for proxy, res in results:
            node = int(proxy.node_id)
            report = decode_train_metrics(res.metrics)  # the update itself is masked
            if isinstance(report, TrainReport):
                problem = self.federation.identity_problem(node, report.partition_id)
                if problem is not None:  # as the plain path without a known mapping: drop the claim
                    self.round.ignored_claims[node] = str(problem)
            if isinstance(report, TrainReport):
                self.round.reports[node] = report
            else:  # its masked update is in the sum (SecAgg+ cannot take it out); its claims not
                self.round.rejected[node] = f"{report} (metrics ignored; the update is in the sum)"
        self.round.accepted = [proxy.node_id for proxy, _ in results
                               if proxy.node_id in self.round.reports]
        self.federation.note_released(n for n, r in self.round.reports.items() if r.dp is not None)
        self.round.aggregation_info = {"clients_summed": float(len(results))}
        mean, _ = super().aggregate_fit(server_round, results, failures)
        if mean is None:
            return None, {}
        self._aggregated = True
        update = torch.from_numpy(np.concatenate([a.ravel() for a in parameters_to_ndarrays(mean)])
                                  .astype(np.float64))
        central = self.federation.central
        if central is not None:  # the sum of clipped updates, over the expected count, plus noise
            update = central.release(update * len(results))
        step, momentum = self.federation.step(update)
        new, start = [], 0
        for g in self._global:
            new.append((g + step[start:start + g.size].numpy().reshape(g.shape)).astype(g.dtype))
            start += g.size
        if not all(np.isfinite(a).all() for a in new if a.dtype.kind == "f"):
            # Never release a non-finite model (after the cast to the model's dtypes).
            self._aggregated = False
            self.round.skipped = "non-finite aggregate: the global model is unchanged"
            return None, {}
        self.federation.commit_momentum(momentum)
        return ndarrays_to_parameters(new), {}

    # --- the end of a round: centralized evaluation, metrics line, checkpoint --------------
    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """The end of a round: server evaluation, metrics line, checkpoint (the legacy
        workflow calls this after each fit round)."""
        if server_round == 0 or self.run is None:  # the workflow's look at the initial model
            return None
        rnd = self.federation.run_round(server_round)
        weights = self.weights(parameters_to_ndarrays(parameters))
        if not self._aggregated and not self.round.skipped:
            self.round.skipped = ("secure aggregation halted (too few clients completed the "
                                  "protocol); the global model is unchanged")
        for node in self.round.sampled:
            if node not in self.round.accepted and node not in self.round.refused:
                self.round.rejected.setdefault(node, "dropped out of the SecAgg+ protocol")
        server_eval = self.run.evaluate_round(weights)
        accepted = [self.round.reports[n] for n in self.round.accepted]
        # Weighted by the example counts the clients' SecAgg+ weights used.
        loss = weighted_loss([r.train_loss for r in accepted],
                             [r.num_examples or 1 for r in accepted])
        self.round.train = {"train-loss": loss} if loss is not None else {}
        self.run.on_round(rnd, weights, self.round.record(rnd, server_eval))
        return server_eval["loss"], {"accuracy": server_eval["accuracy"]}

    def weights(self, arrays: NDArrays) -> dict[str, torch.Tensor]:
        """Unnamed legacy arrays as the model's named tensors."""
        return {n: torch.from_numpy(np.array(a)) for n, a in zip(self.names, arrays, strict=True)}

    # --- state for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        """The federation's state (tensors go to the checkpoint's safetensors file)."""
        return self.federation.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.federation.load_state_dict(state)


class ErrorWatch(DelegatingGrid):
    """Delegates to ``grid`` and reports every error reply (node id, reason): the legacy
    workflow keeps failures without their node ids."""

    def __init__(self, grid: Grid, on_error: Callable[[int, str], None]) -> None:
        super().__init__(grid)
        self._on_error = on_error

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated; error replies are reported."""
        return self._watch(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Delegated; error replies are reported."""
        return self._watch(self._grid.send_and_receive(messages, timeout=timeout))

    def _watch(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                # Flower's Error.reason is optional; a reason-less error is still a dropout
                self._on_error(reply.metadata.src_node_id, reply.error.reason or "")
        return replies


def secagg_workflow(cfg: schema.Config) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the configured protocol parameters."""
    s = cfg.secagg
    return SecAggPlusWorkflow(
        num_shares=s.num_shares or 1,  # Flower reads 1 as "every sampled client"
        reconstruction_threshold=s.reconstruction_threshold,
        max_weight=s.max_weight, clipping_range=s.clipping_range,
        quantization_range=s.quantization_range, modulus_range=SECAGG_MODULUS,
        timeout=cfg.federation.round_timeout)


def run_secagg_federation(grid: Grid, cfg: schema.Config, reporter=None,
                          run_dir: str | None = None) -> RunSummary:
    """Train for ``cfg.federation.rounds`` SecAgg+ rounds; returns the summary (summary.json)."""
    strategy = SecAggFedAvg(cfg)
    grid = PromptGrid(grid, cfg.federation.reply_poll_s, strategy.federation.note_exchange)
    run = RunRecorder(cfg, strategy, reporter, run_dir)
    strategy.run, strategy.names = run, list(run.initial_weights)
    strategy.initial_parameters = ndarrays_to_parameters(
        [v.numpy() for v in run.initial_weights.values()])
    strategy.federation.resume_after(run.start_round - 1)
    remaining = cfg.federation.rounds - (run.start_round - 1)
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                run_config=cfg.flat()),
        config=ServerConfig(num_rounds=remaining, round_timeout=cfg.federation.round_timeout),
        strategy=strategy, client_manager=SimpleClientManager())
    if remaining > 0:
        DefaultWorkflow(fit_workflow=secagg_workflow(cfg))(ErrorWatch(grid, strategy.note_error),
                                                           context)
    final = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                             keep_input=True) if remaining > 0 else \
        strategy.initial_parameters
    after_last_round(grid, cfg, run.folder, strategy)  # the clients' drift-reference counts
    return run.finish(strategy.weights(parameters_to_ndarrays(final)), stopped="")
