"""The default model (ScatterNet + linear) is exported and served on raw 28x28 images.

The ONNX graph holds the linear head; the serving process applies the task's registered
ScatterNet transform (export.json ``pixel_shape``) first, so a user sends normalised images, never
(81, 7, 7) features, and a features-shaped batch is refused.
"""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from fedshield.deployment.artifacts import EXPORT_JSON
from fedshield.deployment.batch_predict import predict_file
from fedshield.deployment.export import export_model
from fedshield.deployment.serving import create_app, load_served_model
from fedshield.tasks import Split, get_task
from fedshield.tasks.images import load_mnist5k
from fedshield.tasks.scattering import CHANNELS, SIDE, scatter

# ONNX Runtime and torch sum the 3,969-term dot products in different orders (float32): logits
# agree to ~1e-5 of their ~10 magnitude; 1e-3 leaves room for any BLAS kernel, not for a bug.
LOGIT_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    task = get_task("mnist-scattering", "scatter_linear")
    train, test = load_mnist5k()  # real MNIST digits, normalised images (1, 28, 28)
    torch.manual_seed(0)
    model = task.build_model()
    pick = np.random.default_rng(0).permutation(len(train))[:600]  # the split is sorted by class
    x, y = torch.from_numpy(scatter(train.x[pick])), torch.from_numpy(train.y[pick])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):  # a few seconds: enough for clearly non-constant predictions
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    shown = np.random.default_rng(1).permutation(len(test))[:64]
    images = np.ascontiguousarray(test.x[shown])
    features = Split(scatter(images), test.y[shown])
    out = tmp_path_factory.mktemp("pixels") / "export"
    export_model(task, model.state_dict(), out, {"run": "pixel-test"}, quantize=False,
                 test=features)
    with torch.no_grad():
        reference = model(torch.from_numpy(features.x)).numpy()
    return {"out": out, "images": images, "labels": features.y, "torch_logits": reference}


def test_export_records_the_image_input(exported):
    meta = json.loads((exported["out"] / EXPORT_JSON).read_text())
    assert meta["input_shape"] == [CHANNELS, SIDE, SIDE]  # what the ONNX graph reads
    assert meta["pixel_shape"] == [1, 28, 28]             # what is served
    assert "Scattering2D" in meta["pixel_transform"]
    assert meta["pixel_range"]["min"] < 0 < meta["pixel_range"]["max"]


def test_served_model_predicts_images_like_the_torch_model(exported):
    served = load_served_model(exported["out"])
    assert served.input_shape == (1, 28, 28) and served.model_shape == (CHANNELS, SIDE, SIDE)
    _, logits = served.logits(exported["images"])
    ref = exported["torch_logits"]
    assert np.abs(logits - ref).max() < LOGIT_TOLERANCE
    assert (logits.argmax(1) == ref.argmax(1)).all()
    assert len(set(ref.argmax(1).tolist())) >= 5          # a real model, not a constant one
    assert (ref.argmax(1) == exported["labels"]).mean() > 0.7


def test_http_predict_takes_images_and_refuses_features(exported):
    client = TestClient(create_app(exported["out"]))
    images = exported["images"][:8]
    r = client.post("/predict", json={"inputs": images.tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == exported["torch_logits"][:8].argmax(1).tolist()
    r = client.post("/predict", json={"inputs": scatter(images[:2]).tolist()})
    assert r.status_code == 422  # features are not silently accepted as images
    assert "1, 28, 28" in r.text or "28" in r.text
    r = client.post("/explain", json={"inputs": images[:1].tolist()})
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["attributions"]).shape == (1, 1, 28, 28)  # over the pixels


def test_batch_predict_on_an_image_file(exported, tmp_path):
    source, out = tmp_path / "batch.npy", tmp_path / "predictions.csv"
    np.save(source, exported["images"])
    result = predict_file(load_served_model(exported["out"]), source, out, chunk=16)
    assert result.rows == 64
    rows = out.read_text().splitlines()[1:]
    predicted = [int(line.split(",")[1]) for line in rows]
    assert predicted == exported["torch_logits"].argmax(1).tolist()
