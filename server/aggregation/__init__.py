"""Robust aggregation rules as pure math on an (n, d) tensor of client updates.

Each rule in RULES takes the updates (deltas from the global model, any float dtype) and returns an
AggregationResult: the (d,) aggregate in the input dtype, a per-client suspicion in [0, 1] (the
rule's own evidence, in input order) and a few numbers in ``info``. Pairwise geometry is computed
in float64 from one Gram matrix (see distances.py). No Flower imports here: the strategy adapter
flattens ArrayRecords once and calls an Aggregator.

Weights: robust rules ignore the client-reported example counts and weigh clients uniformly,
because a client can lie about num-examples to dominate a weighted rule. Only plain fedavg uses
them; it is also the only rule that needs no individual updates (a sum, SecAgg-compatible).

Updates must be finite: server screening rejects NaN/Inf before aggregation (one inf would
poison the Gram matrix every distance-based rule starts from). Any finite float32 input works
(overflowing squares are redone in float64, see distances.py).

Suspicion ignores rounding: a score within the rounding bound of the round's median (or of a
clipping radius) is 0, the bound scaled by the rows' size and the dtype's eps (result.py).

Each rule is a record (registry.RULE_RECORDS): apply, check(rows, f, cfg), whether it is a mean of
clipped updates and, if not, why central DP refuses it. Every rule that votes among the clients
refuses n <= 2f for the f it assumes; fedavg and fltrust take no f (their docstrings say why).

Specs: "rule" or "pre+...+rule", pre-steps applied left to right, e.g. "bucketing+nnm+median".
Suspicion of a bucket goes to all its members.

Rules: fedavg, krum, multikrum, bulyan, median, trimmed_mean, geomed, cclip (stateful: centred on
the previous aggregate), clip, fltrust (needs the server's reference update), flame.
"""

from fedshield.server.aggregation.registry import (
                                         CENTRAL_DP_REFUSALS,
                                         MEAN_OF_CLIPPED_RULES,
                                         PRE_AGGREGATORS,
                                         PRE_STEPS,
                                         RULE_RECORDS,
                                         RULES,
                                         Aggregator,
                                         PreStep,
                                         Rule,
                                         RuleInputs,
                                         build_aggregator,
                                         parse_spec,
)
from fedshield.server.aggregation.result import AggregationResult

__all__ = ["AggregationResult", "Aggregator", "CENTRAL_DP_REFUSALS", "MEAN_OF_CLIPPED_RULES",
           "PRE_AGGREGATORS", "PRE_STEPS", "PreStep", "RULES", "RULE_RECORDS", "Rule", "RuleInputs",
           "build_aggregator", "parse_spec"]
