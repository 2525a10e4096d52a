"""Export (safetensors + ONNX + int8), model card and explanations on real digits / Adult models."""

import json

import numpy as np
import pytest
import torch
from fedshield.deployment.artifacts import (
    ONNX,
    ONNX_DATA,
    ONNX_INT8,
    SAFETENSORS,
    sha256_file,
    strip_prefix,
)
from fedshield.deployment.card import build_card
from fedshield.deployment.explain import attribution_picture, integrated_gradients
from fedshield.deployment.export import ExportResult, export_model, onnx_logits, onnx_session
from fedshield.tasks import get_task
from safetensors import safe_open

from tests.deploy_support import make_run_dir, trained_state


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    state = {f"_module.{k}": v for k, v in trained_state("digits").items()}
    out = tmp_path_factory.mktemp("export") / "digits"
    return export_model(get_task("digits"), state, out, {"run": "test", "rounds": 3})


def test_onnx_matches_torch_on_test_inputs(digits_export):
    parity = digits_export.parity
    assert parity["examples"] == len(get_task("digits").load()[1])
    assert parity["max_abs_diff"] < 1e-4
    assert parity["argmax_agreement"] == 1.0
    assert parity["onnx_accuracy"] == pytest.approx(parity["torch_accuracy"])
    assert parity["onnx_accuracy"] > 0.7  # a trained model, not chance (0.1)


def test_onnx_has_dynamic_batch_and_sidecar(digits_export, tmp_path):
    out = digits_export.out_dir
    session = onnx_session(f"{out}/{ONNX}")
    x = get_task("digits").load()[1].x
    assert onnx_logits(session, x[:1]).shape == (1, 10)
    assert onnx_logits(session, x[:37]).shape == (37, 10)
    assert digits_export.sizes[ONNX_DATA] > digits_export.sizes[ONNX]  # weights live in the sidecar


def test_every_artifact_hashed_and_recorded(digits_export):
    out = digits_export.out_dir
    assert set(digits_export.sha256) == {SAFETENSORS, ONNX, ONNX_DATA, ONNX_INT8}
    for name, digest in digits_export.sha256.items():
        assert sha256_file(f"{out}/{name}") == digest
    assert ExportResult.load(out).sha256 == digits_export.sha256


def test_module_prefix_stripped_and_metadata_kept(digits_export):
    with safe_open(f"{digits_export.out_dir}/{SAFETENSORS}", "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and not any(k.startswith("_module.") for k in keys)
    assert meta["task"] == "digits" and meta["rounds"] == "3"
    assert strip_prefix({"_module.a.weight": 1, "b": 2}) == {"a.weight": 1, "b": 2}


def test_int8_accuracy_measured_and_smaller(digits_export):
    int8 = digits_export.int8
    assert int8["size_int8_bytes"] < int8["size_fp32_bytes"]
    x, y = get_task("digits").load()[1].x, get_task("digits").load()[1].y
    measured = (onnx_logits(onnx_session(f"{digits_export.out_dir}/{ONNX_INT8}"),
                            x).argmax(1) == y).mean()
    assert int8["accuracy"] == pytest.approx(measured)
    assert abs(int8["accuracy"] - digits_export.accuracy) < 0.05


def test_wrong_task_weights_are_refused(tmp_path):
    from fedshield.errors import FedShieldError

    with pytest.raises(FedShieldError, match="do not fit"):
        export_model(get_task("digits"), trained_state("digits") | {"extra": torch.zeros(1)},
                     tmp_path)


def test_card_has_privacy_rounds_hashes_and_feature_importance(digits_export, tmp_path):
    run = make_run_dir(tmp_path, "digits", epsilon_max=2.5, rounds=4)
    card = build_card(run, digits_export, explain_examples=32)
    data = json.loads(card.json_path.read_text())
    assert data["privacy"]["enabled"] and data["privacy"]["epsilon_max"] == 2.5
    assert data["privacy"]["delta"] == 1e-5 and data["privacy"]["accountant"] == "prv"
    assert [r["round"] for r in data["metrics"]["per_round"]] == [1, 2, 3, 4]
    assert data["artifacts"]["sha256"] == digits_export.sha256
    assert data["data_schema"]["input"]["shape"] == ["batch", 64]
    expl = data["explanations"]
    assert expl["num_features"] == 64 and len(expl["feature_importance"]) == 15
    scores = [f["importance"] for f in expl["feature_importance"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    md = card.md_path.read_text()
    assert "Per-client epsilon: max **2.5**" in md and "| 4 |" in md
    assert digits_export.sha256[ONNX] in md


def test_adult_card_ranks_every_feature(tmp_path):
    task = get_task("adult")
    run = make_run_dir(tmp_path, "adult", privacy=False, epochs=1)
    export = export_model(task, trained_state("adult", 1), tmp_path / "export", quantize=False)
    assert export.parity["max_abs_diff"] < 1e-4 and export.int8 is None
    card = build_card(run, export, explain_examples=64)
    expl = card.data["explanations"]
    assert expl["num_features"] == len(task.feature_names) == 108
    assert {f["feature"] for f in expl["feature_importance"]} <= set(task.feature_names)
    assert "No sample-level differential privacy" in card.md_path.read_text()


def test_integrated_gradients_complete_and_image_picture(tmp_path):
    torch.manual_seed(0)
    task = get_task("mnist5k")
    model = task.build_model().eval()
    test = task.load()[1]
    x = test.x[:3]
    attr, target = integrated_gradients(model, x, is_image=True, steps=64)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        base = model(torch.full_like(torch.from_numpy(x), float(x.min())))
    gap = (logits - base)[np.arange(3), target].numpy()
    # Completeness: attributions sum to f(x) - f(baseline) for the explained class.
    assert np.allclose(attr.reshape(3, -1).sum(1), gap, rtol=0.05, atol=1e-3)
    png = attribution_picture(model, test.x[:4], test.y[:4], tmp_path / "ig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("attack,shown", [({"name": "none", "byzantine_fraction": 0.0}, "none"),
                                          ("none", "none"), ({"name": ""}, "none"),
                                          ({"name": "alie", "byzantine_fraction": 0.2}, "alie")])
def test_card_states_the_noise_used_and_the_attack_run(digits_export, tmp_path, attack, shown):
    run = make_run_dir(tmp_path, "digits", noise_used=[1.91, 1.06, 1.5], attack=attack)
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"]["noise_multiplier"] = 0.0  # configured 0: planned from the target epsilon
    (run / "summary.json").write_text(json.dumps(summary))
    card = build_card(run, digits_export, explain_examples=4)
    md = card.md_path.read_text()
    assert f"- Attack simulated: {shown}\n" in md
    assert card.data["attack"]["simulated"] == (shown != "none")
    assert card.data["attack"]["name"] == shown
    assert "Noise multiplier used 1.06-1.91 (3 values)" in md and "Noise multiplier 0" not in md
    assert card.data["privacy"]["noise_multipliers_used"] == [1.06, 1.5, 1.91]
    assert "EPSILON NOT VALID" not in md and card.data["privacy_warning"] == ""
    rng = card.data["data_schema"]["input"]["range"]
    assert rng == {"min": 0.0, "max": 1.0}  # digits are pixel/16
