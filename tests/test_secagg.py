"""SecAgg+ run mode: end to end on digits, what the server can see, and refused configurations."""

import json
from pathlib import Path

import fedshield.simulations.runner as runner
import numpy as np
import pytest
import torch
from fedshield.client.secagg import clip_to
from fedshield.privacy.central import user_level_epsilon
from fedshield.server.secagg import SecAggFedAvg
from fedshield.simulations.attacks import ATTACKS
from fedshield.simulations.grid import InProcessGrid
from fedshield.simulations.runner import simulate
from fedshield.tasks import get_task
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.torch import load_file

from fedshield.errors import ConfigError
from tests.config_support import neutral_config

# Robust rules, screening and reputation need individual updates: off in every SecAgg+ run.
SUM_ONLY = {"screening": {"enabled": False}, "reputation": {"enabled": False}}


def lines_of(summary):
    text = (Path(summary.run_dir) / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def flat(weights):
    return torch.cat([weights[k].flatten().double() for k in sorted(weights)])


def final_model(summary):
    return load_file(str(Path(summary.run_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same federation (digits, 5 clients, 3 rounds) plain and under SecAgg+, recording every
    reply the server receives and every result its strategy aggregates."""
    tmp = tmp_path_factory.mktemp("secagg")
    base = {"name": "sa", "seed": 0, "output_dir": str(tmp), "task": {"name": "digits"},
            "federation": {"num_clients": 5, "rounds": 3},
            "partition": {"kind": "dirichlet", "alpha": 1.0},
            "train": {"lr": 0.1, "batch_size": 16}, "deployment": {"handoff": False}, **SUM_ONLY}
    replies, aggregated = [], []

    class RecordingGrid(InProcessGrid):
        def pull_messages(self, message_ids):
            out = list(super().pull_messages(message_ids))
            replies.extend(out)
            return out

    original = SecAggFedAvg.aggregate_fit

    def spying_aggregate_fit(self, server_round, results, failures):
        aggregated.append([parameters_to_ndarrays(res.parameters) for _, res in results])
        return original(self, server_round, results, failures)

    plain = simulate(neutral_config(base))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "InProcessGrid", RecordingGrid)
        mp.setattr(SecAggFedAvg, "aggregate_fit", spying_aggregate_fit)
        cfg = neutral_config({**base, "secagg": {"enabled": True}})
        secure = simulate(cfg)
    return {"cfg": cfg, "plain": plain, "secure": secure, "replies": replies,
            "aggregated": aggregated, "base": base}


def test_secagg_run_learns_like_plain_fedavg(runs):
    plain, secure = runs["plain"], runs["secure"]
    accs = [m["accuracy"] for m in lines_of(secure)]
    assert [m["round"] for m in lines_of(secure)] == [1, 2, 3]
    assert accs[-1] > accs[0] + 0.05 and accs[-1] > 0.7, accs
    assert secure.final.accuracy == pytest.approx(plain.final.accuracy, abs=0.02)
    # Same seeds, same local training: the models differ only by SecAgg+'s stochastic
    # quantization (measured: 5e-5 to 3e-4 of the distance trained), not by another average
    # (an unweighted mean of the same clients lands 3e-2 away).
    torch.manual_seed(0)
    start = flat(get_task("digits").build_model().state_dict())
    a, b = flat(final_model(plain)), flat(final_model(secure))
    assert float((a - b).norm() / (a - start).norm()) < 5e-3
    assert secure.secagg is True and plain.secagg is False
    saved = json.loads((Path(secure.run_dir) / "summary.json").read_text())
    assert saved["secagg"] is True and saved["rounds_completed"] == 3
    for line in lines_of(secure):
        assert line["sampled"] == 5 and line["accepted"] == 5 and not line["rejected"]
        assert line["seconds"] > 0 and line["loss"] is not None


def test_server_only_ever_holds_masked_vectors_and_the_sum(runs):
    """Every reply the server received: no plaintext weights, and the stage-2 uploads are masked.

    Unmasked, a client's upload is its quantized, weight-scaled model: integers in
    [0, quantization_range]. Masked with Flower's pairwise and private masks it is uniform on
    [0, 2**32), so almost no entry stays inside that range (about 1 in 1024)."""
    q_range = runs["cfg"].secagg.quantization_range
    uploads = []
    for reply in runs["replies"]:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())  # no weights
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:
            uploads.append(np.concatenate([bytes_to_ndarray(b).ravel()
                                           for b in configs[Key.MASKED_PARAMETERS]]))
    assert len(uploads) == 5 * 3  # one per client per round
    for vector in uploads:
        assert np.mean(vector > q_range) > 0.99
    # The strategy receives one model per round, the unmasked average, once per client.
    assert len(runs["aggregated"]) == 3
    for results in runs["aggregated"]:
        assert len(results) == 5
        for arrays in results[1:]:
            assert all(np.array_equal(x, y) for x, y in zip(arrays, results[0], strict=True))


def test_resume_continues_a_secagg_run(runs):
    """Stopped after round 2 of 3, resumed from its checkpoint: it ends where the uninterrupted
    3-round run ended (up to quantization)."""
    base = {**runs["base"], "secagg": {"enabled": True}}
    part = simulate(neutral_config({**base, "federation": {"num_clients": 5, "rounds": 2}}))
    resumed = simulate(neutral_config({**base, "resume": part.run_dir}))
    lines = lines_of(resumed)
    assert [m["round"] for m in lines] == [1, 2, 3] and lines[-1]["accepted"] == 5
    torch.manual_seed(0)
    start = flat(get_task("digits").build_model().state_dict())
    a, b = flat(final_model(runs["secure"])), flat(final_model(resumed))
    assert float((a - b).norm() / (a - start).norm()) < 5e-3


def test_clients_clip_their_own_update():
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    clipped = clip_to(big, 0.5)

    def norm(arrays):
        return float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in arrays)))

    assert norm(clipped) == pytest.approx(0.5, rel=1e-5)
    assert all(c.shape == b.shape and c.dtype == b.dtype for c, b in zip(clipped, big, strict=True))
    ratio = clipped[0] / big[0]
    assert np.allclose(ratio, ratio.flat[0])  # same direction
    small = [a * 1e-3 for a in big]
    assert all(np.array_equal(c, s) for c, s in zip(clip_to(small, 0.5), small, strict=True))


def test_central_dp_noise_is_added_to_the_secure_sum(small_cfg):
    """Central DP under SecAgg+: clients clip (C = 0.5), the server adds N(0, (sigma C)^2) to the
    unmasked sum and divides by the 5 expected clients. With sigma = 1 the noise dominates one
    round's step: its norm is sigma C / 5 * sqrt(d), give or take the clipped mean (<= C)."""
    cfg = small_cfg(federation={"rounds": 1}, secagg={"enabled": True},
                    central_dp={"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5},
                    aggregation={"weighting": "uniform"}, **SUM_ONLY)
    summary = simulate(cfg)
    torch.manual_seed(cfg.seed)
    start = flat(get_task("digits").build_model().state_dict())
    step = float((flat(final_model(summary)) - start).norm())
    noise = 1.0 * 0.5 / 5 * np.sqrt(len(start))
    assert noise - 0.5 - 0.3 < step < noise + 0.5 + 0.3, (step, noise)
    (line,) = lines_of(summary)
    assert line["central_epsilon"] == pytest.approx(
        user_level_epsilon(1.0, 1.0, 1, cfg.central_dp.delta, cfg.central_dp.accountant))


def test_a_client_that_must_not_train_drops_out_and_the_rest_is_summed(small_cfg, nan_client):
    """Client 2 holds NaNs: it refuses in the masking stage, its neighbours' key shares remove
    its masks, and the other four clients' sum is still recovered."""
    summary = simulate(small_cfg(federation={"rounds": 2}, secagg={"enabled": True}, **SUM_ONLY))
    for line in lines_of(summary):
        assert line["accepted"] == 4 and not line["skipped"]
        (reason,) = line["refused"].values()
        assert "invalid-data" in reason and "NaN" in reason
    assert lines_of(summary)[-1]["accuracy"] > 0.5


# --- refused configurations ------------------------------------------------------------------
def secagg_cfg(**sections):
    data = {"task": {"name": "digits"}, "federation": {"num_clients": 5},
            "secagg": {"enabled": True}, **SUM_ONLY}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def test_the_sum_only_configurations_are_accepted():
    assert neutral_config(secagg_cfg()).secagg.enabled
    assert neutral_config(secagg_cfg(privacy={"enabled": True, "noise_multiplier": 1.0}))
    assert neutral_config(secagg_cfg(central_dp={"enabled": True},
                                     aggregation={"weighting": "uniform"}))
    assert neutral_config(secagg_cfg(aggregation={"rule": "clip", "clip_norm": 1.0}))


SUM_ONLY_WHY = "only sees the SUM of updates under SecAgg+"


@pytest.mark.parametrize("sections, reason", [
    ({"aggregation": {"rule": "krum"}}, "only reveals the sum of updates, but 'krum' needs each"),
    ({"aggregation": {"rule": "median"}}, "only reveals the sum of updates, but 'median' needs"),
    ({"aggregation": {"rule": "bucketing+fedavg"}}, "'bucketing+fedavg' needs each client's"),
    ({"aggregation": {"rule": "clip", "clip_norm": 0.0}}, "set aggregation.clip_norm > 0"),
    ({"screening": {"enabled": True}}, "screening.enabled = false"),
    ({"reputation": {"enabled": True}}, "reputation.enabled = false"),
    ({"secagg": {"num_shares": 7}}, "exceeds the 5 clients sampled per round"),
    ({"secagg": {"num_shares": 3, "reconstruction_threshold": 3}}, "must be below the 3 shares"),
    ({"federation": {"num_clients": 2, "min_clients": 2}}, "at least 3 clients per round"),
    ({"secagg": {"quantization_range": 2**31}}, "overflow"),
    ({"federation": {"fraction_evaluate": 0.5}}, "set federation.fraction_evaluate = 0"),
])
def test_combinations_that_need_individual_updates_are_refused(sections, reason):
    with pytest.raises(ConfigError) as err:
        neutral_config(secagg_cfg(**sections))
    assert reason in str(err.value) and str(err.value).startswith("secagg")
    if "enabled = false" in reason or "clip_norm" in reason:
        assert SUM_ONLY_WHY in str(err.value)


@pytest.mark.parametrize("name", sorted(set(ATTACKS)))
def test_attacks_that_rewrite_updates_are_refused(name):
    attack = {"name": name, "byzantine_ids": "1"}
    if ATTACKS[name].craft is None:
        assert neutral_config(secagg_cfg(attack=attack)).attack.name == name
    else:
        with pytest.raises(ConfigError, match=f"attack.name = '{name}' rewrites updates"):
            neutral_config(secagg_cfg(attack=attack))
