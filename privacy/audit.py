"""Empirical privacy auditing: the math, on plain arrays (no torch, no Flower).

- One-run canary audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
  Run", Theorem 5.2 / Algorithm 2): m canaries, each included independently with probability 1/2;
  the auditor guesses "in" for the k+ highest scores and "out" for the k- lowest and abstains on the
  rest. Under (eps, delta)-DP the number of correct guesses out of r is, up to a delta term, no
  more likely than under Binomial(r, e^eps / (1 + e^eps)). The largest eps that this rejects at
  confidence 1 - beta is an empirical lower bound on the mechanism's epsilon.
- Membership-inference scores: AUC, TPR at a fixed FPR, LiRA's likelihood ratio from shadows.
- Reconstruction quality for gradient inversion: MSE and PSNR after matching examples.
- ``AuditRecord``: what an audit leaves in a run folder (``audit.json``) for the model card, with
  a digest of the audited mechanism's settings so a card can tell whether it audited its run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from fedshield.errors import ConfigError

# k as fractions of m tried by `one_run_audit`; Bonferroni over them keeps the confidence honest
# (picking the best k after seeing the guesses would otherwise inflate the bound).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MAX_EPSILON = 100.0  # search ceiling; no finite number of guesses certifies more


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] for an (eps, delta)-DP mechanism audited with m canaries.

    Steinke et al. Theorem 5.2: P[Binom(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Binom(r, q)
    < v] / i, with q = e^eps / (1 + e^eps), the accuracy of eps-randomized response.
    """
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if eps < 0 or not 0 <= delta <= 1:
        raise ConfigError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = float(special.expit(eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v-1), ..., pmf(0)
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest eps whose (eps, delta)-DP would make >= v correct of r guesses less likely than
    ``beta``: with confidence 1 - beta the mechanism is not (eps', delta)-DP for any eps' below it.
    0 when even eps = 0 explains the guesses."""
    if not 0 < beta < 1:
        raise ConfigError(f"beta = {beta} must be in (0, 1) (0.05 = 95% confidence)")

    def gap(eps: float) -> float:
        return p_value(m, r, v, eps, delta) - beta

    if gap(0.0) >= 0:
        return 0.0
    if gap(MAX_EPSILON) < 0:
        return MAX_EPSILON
    # p_value rises with eps; the root is the boundary. xtol keeps the answer below it by < 1e-9.
    root = optimize.brentq(gap, 0.0, MAX_EPSILON, xtol=1e-10)
    return max(root - 1e-9, 0.0)


def guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 (abstain) otherwise.

    Ties are broken by canary index, which is independent of inclusion (the inclusion bits are
    drawn independently per canary), so tie-breaking leaks nothing into the guesses."""
    scores = np.asarray(scores, dtype=np.float64)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(scores):
        raise ConfigError(f"k+ = {k_pos} and k- = {k_neg} must be >= 0 and sum to <= {len(scores)}")
    order = np.lexsort((np.arange(len(scores)), scores))  # ascending score, then index
    out = np.zeros(len(scores), dtype=np.int64)
    out[order[:k_neg]] = -1
    if k_pos:
        out[order[len(scores) - k_pos:]] = 1
    return out


@dataclass(frozen=True)
class AuditBound:
    """An empirical epsilon lower bound and the guesses it came from."""

    epsilon: float  # lower bound at `confidence`
    canaries: int  # m
    guesses: int  # r (non-abstentions)
    correct: int  # v
    k_pos: int
    k_neg: int
    delta: float
    confidence: float

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def one_run_audit(scores: np.ndarray, included: np.ndarray, delta: float,
                  confidence: float = 0.95,
                  fractions: tuple[float, ...] = GUESS_FRACTIONS) -> AuditBound:
    """The best bound over k = fraction * m guesses (half "in", half "out"), Bonferroni-corrected
    across the fractions so the reported bound holds at ``confidence``."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ConfigError(f"scores {scores.shape} and inclusion bits {included.shape} must be two "
                          "equal-length, non-empty vectors")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("canary scores contain NaN/Inf; the attack diverged (lower its step)")
    m = len(scores)
    if m < 2:
        raise ConfigError(f"{m} canary: the audit needs at least 2 (use hundreds or more)")
    beta = (1 - confidence) / len(fractions)
    truth = np.where(included, 1, -1)
    best = None
    for fraction in fractions:
        half = min(max(int(fraction * m) // 2, 1), m // 2)
        g = guesses(scores, half, half)
        r, v = int(np.count_nonzero(g)), int(np.sum(g == truth))
        bound = AuditBound(epsilon_lower_bound(m, r, v, delta, beta), m, r, v, half, half,
                           delta, confidence)
        if best is None or bound.epsilon > best.epsilon:
            best = bound
    assert best is not None
    return best


# -- membership inference --------------------------------------------------------------------


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P[member score > non-member score] (+ half the ties): the Mann-Whitney AUC."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if not len(members) or not len(nonmembers):
        raise ConfigError("AUC needs at least one member and one non-member score")
    ranks = stats.rankdata(np.concatenate([members, nonmembers]))
    n1, n0 = len(members), len(nonmembers)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """The highest true-positive rate of a threshold "score > t" whose false-positive rate on
    ``nonmembers`` is at most ``fpr``. With fewer than 1/fpr non-members only t above every
    non-member qualifies (the measured FPR is then 0)."""
    members, nonmembers = np.asarray(members, float), np.sort(np.asarray(nonmembers, float))[::-1]
    if not len(members) or not len(nonmembers):
        raise ConfigError("TPR at FPR needs at least one member and one non-member score")
    allowed = int(math.floor(fpr * len(nonmembers) + 1e-9))  # false positives the FPR permits
    if allowed >= len(nonmembers):
        return 1.0
    threshold = nonmembers[allowed]  # "> threshold" admits at most `allowed` non-members
    return float(np.mean(members > threshold))


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic log(p_y / (1 - p_y)), computed stably from logits: z_y - logsumexp(z_!y)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return true - special.logsumexp(others, axis=1)


def lira_scores(target: np.ndarray, shadow: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022) with a global variance per side (the paper's choice for
    few shadows): log N(target; mu_in, sd_in) - log N(target; mu_out, sd_out) per example.

    ``target`` (n,): statistic on the attacked model; ``shadow`` (K, n): on each shadow model;
    ``inside`` (K, n): whether the example was in that shadow's training set. Where an example has
    no in (or out) shadow, its mean is the other side's shifted by the average in-out gap."""
    target, shadow = np.asarray(target, float), np.asarray(shadow, float)
    inside = np.asarray(inside, bool)
    if shadow.ndim != 2 or shadow.shape != inside.shape or shadow.shape[1] != len(target):
        raise ConfigError(f"shadow statistics {shadow.shape}, inclusion {inside.shape} and target "
                          f"({len(target)},) do not match")
    if not inside.any() or inside.all():
        raise ConfigError("LiRA needs shadows that include and exclude examples (>= 2 shadows)")
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (shadow * inside).sum(0) / n_in, np.nan)
        mu_out = np.where(n_out > 0, (shadow * ~inside).sum(0) / n_out, np.nan)
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    sd_in = max(float(np.std((shadow - mu_in)[inside])), 1e-6)
    sd_out = max(float(np.std((shadow - mu_out)[~inside])), 1e-6)
    return stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)


# -- reconstruction quality ------------------------------------------------------------------


def matched_mse(true: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-example MSE after pairing reconstructions with true examples (Hungarian matching on
    MSE): gradients of a batch say nothing about its order."""
    true = np.asarray(true, float).reshape(len(true), -1)
    recon = np.asarray(recon, float).reshape(len(recon), -1)
    if true.shape != recon.shape:
        raise ConfigError(f"{recon.shape[0]} reconstructions of shape {recon.shape[1:]} for "
                          f"{true.shape[0]} examples of shape {true.shape[1:]}")
    cost = ((true[:, None, :] - recon[None, :, :]) ** 2).mean(-1)
    rows, cols = optimize.linear_sum_assignment(cost)
    return cost[rows, cols]


def psnr(mse: float, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of a reconstruction with this MSE (inf when exact)."""
    if data_range <= 0:
        raise ConfigError(f"data_range = {data_range} must be > 0")
    return math.inf if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


# -- the audit record a run folder keeps (read by the model card) ------------------------------

AUDIT_JSON = "audit.json"  # in the run folder, beside summary.json
AUDIT_FORMAT = "fedshield-audit/1"
# The config sections that define the audited mechanism (and the top-level seed). A card compares
# their digest with its run's: an audit of other settings is no evidence about this model.
MECHANISM_SECTIONS = ("task", "federation", "partition", "train", "privacy")
# Keys of those sections that change where things are kept, not what is computed.
NOT_MECHANISM = {"privacy": ("ledger_dir",)}


def mechanism_digest(config: Mapping[str, Any]) -> str:
    """sha256 of the mechanism's settings in a config table (as config.toml holds it): the same
    for an audit and a run exactly when they train with the same data, schedule and privacy."""
    picked: dict[str, Any] = {"seed": config.get("seed")}
    for section in MECHANISM_SECTIONS:
        table = dict(config.get(section) or {})
        for key in NOT_MECHANISM.get(section, ()):
            table.pop(key, None)
        picked[section] = table
    blob = json.dumps(_jsonable(picked), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Strict-JSON form: tuples as lists, non-finite floats as the strings "inf"/"-inf"/"nan"."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _floats(value: Any) -> Any:
    """Inverse of ``_jsonable`` for the strings it writes."""
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


@dataclass(frozen=True)
class AuditRecord:
    """What ``fedshield privacy audit --run-dir`` leaves in a run folder (``audit.json``).

    ``canary``, ``membership``, ``inversion``: the attacks' results as their records' ``to_dict``
    (simulations/audit.py). ``canaries_in_released_model``: whether canaries were in the training
    data of the model the run hands off (the audit trains separately: False)."""

    created_at: str
    mechanism_digest: str
    task: str
    client: int
    canaries_in_released_model: bool
    procedure: str
    canary: tuple[dict, ...] = ()
    membership: tuple[dict, ...] = ()
    inversion: tuple[dict, ...] = ()
    format: str = AUDIT_FORMAT

    def to_json(self) -> str:
        """Strict JSON (an infinite stated epsilon is the string "inf")."""
        return json.dumps(_jsonable(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> AuditRecord:
        """Parse ``audit.json``; ConfigError saying what is wrong when it is not one."""
        try:
            doc = _floats(json.loads(text))
        except ValueError as exc:
            raise ConfigError(f"audit record is not JSON ({exc}); rerun fedshield privacy audit "
                              "--run-dir") from None
        if not isinstance(doc, dict) or doc.get("format") != AUDIT_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else None
            raise ConfigError(f"audit record format {got!r} is not {AUDIT_FORMAT!r}; rerun "
                              "fedshield privacy audit --run-dir")
        try:
            results = {k: tuple(dict(r) for r in doc.get(k) or ())
                       for k in ("canary", "membership", "inversion")}
            record = cls(str(doc["created_at"]), str(doc["mechanism_digest"]), str(doc["task"]),
                         int(doc["client"]), bool(doc["canaries_in_released_model"]),
                         str(doc["procedure"]), results["canary"], results["membership"],
                         results["inversion"])
            for c in record.canary:  # what the card reads of each canary result
                float(c["empirical_epsilon"]), float(c["stated_epsilon"]), float(c["delta"])
                int(c["bound"]["canaries"]), str(c["adversary"]), str(c["accountant"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"audit record is missing or mangles {exc}; rerun fedshield privacy "
                              "audit --run-dir") from None
        return record
