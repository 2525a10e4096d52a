"""Serving: FastAPI TestClient on a real digits export, and one real uvicorn on 127.0.0.1."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from fedshield.deployment.artifacts import REFERENCE_JSON
from fedshield.deployment.card import build_card
from fedshield.deployment.export import export_model, onnx_logits, onnx_session
from fedshield.deployment.reference_stats import reference_from_data
from fedshield.deployment.serving import check_exposure, create_app
from fedshield.tasks import get_task
from typer.testing import CliRunner

from fedshield.errors import ConfigError
from tests.deploy_support import make_run_dir, trained_state

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 200_000
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? '
                    r'(-?[0-9.]+(e[-+]?[0-9]+)?|[-+]Inf|NaN)$')


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    task = get_task("digits")
    root = tmp_path_factory.mktemp("serving")
    run = make_run_dir(root, "digits", epsilon_max=2.0)
    export = export_model(task, trained_state("digits"), run / "export", {"run": "serving-test"})
    train, test = task.load()
    reference_from_data(train.x, train.y, (64,), 10, task.feature_names, 10,
                        "train").save(run / "export" / REFERENCE_JSON)
    build_card(run, export, explain_examples=8)
    triggers, log = [], root / "windows.jsonl"
    app = create_app(run, token=TOKEN, max_batch=256, max_body_bytes=MAX_BODY, drift_window=50,
                     drift_patience=2, window_log=log, on_trigger=triggers.append)
    return {"run": run, "export": export, "test": test, "client": TestClient(app),
            "triggers": triggers, "log": log}


def post(client, inputs, headers=AUTH, path="/predict", **extra):
    return client.post(path, json={"inputs": inputs, **extra}, headers=headers)


def test_health_is_open_everything_else_needs_the_token(served):
    c = served["client"]
    assert c.get("/health").json()["status"] == "ok"
    x = served["test"].x[:2].tolist()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = post(c, x, headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/metrics").status_code == 401 and c.get("/metadata").status_code == 401


def test_predict_matches_onnxruntime(served):
    x = served["test"].x[:20]
    r = post(served["client"], x.tolist())
    assert r.status_code == 200
    body = r.json()
    expected = onnx_logits(onnx_session(Path(served["export"].out_dir) / "model.onnx"), x).argmax(1)
    assert body["predictions"] == expected.tolist()
    assert np.allclose(np.sum(body["probabilities"], 1), 1.0, atol=1e-5)
    assert post(served["client"], x[:1].tolist(),
                probabilities=False).json().keys() == {"predictions", "model_version"}


@pytest.mark.parametrize("inputs,fragment", [
    ([[0.0] * 63], "expected (batch, 64)"),
    ([[0.0] * 64, [0.0] * 63], "ragged"),
    ([], "between 1 and 256"),
    ([[0.0] * 64] * 257, "between 1 and 256"),
    ([[0.0] * 63 + ["x"]], "valid number"),
    ([[0.0] * 63 + [True]], "valid number"),
    ([[[0.0] * 64]], "valid number"),
])
def test_invalid_inputs_get_422_saying_what_is_wrong(served, inputs, fragment):
    r = post(served["client"], inputs)
    assert r.status_code == 422
    assert fragment in json.dumps(r.json()["detail"])


def test_non_finite_values_are_422(served):
    body = '{"inputs": [[' + ",".join(["0.0"] * 63 + ["NaN"]) + "]]}"
    r = served["client"].post("/predict", content=body,
                              headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "inputs", 0, 63]
    assert "finite" in r.json()["detail"][0]["msg"]


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def post_npy(client, content, query=""):
    return client.post(f"/predict{query}", content=content,
                       headers=AUTH | {"content-type": "application/x-npy"})


def test_binary_npy_batch_gets_the_json_answer(served):
    x = served["test"].x[:20].astype(np.float32)
    r = post_npy(served["client"], npy_bytes(x))
    assert r.status_code == 200
    assert r.json()["predictions"] == post(served["client"], x.tolist()).json()["predictions"]
    assert post_npy(served["client"], npy_bytes(x[:1]), "?probabilities=false").json().keys() == {
        "predictions", "model_version"}


@pytest.mark.parametrize("content,fragment", [
    (b"not an array", "not a .npy array"),
    (npy_bytes(np.array([{"x": 1}], dtype=object)), "not a .npy array"),  # pickles are never loaded
    (npy_bytes(np.zeros((1, 63), np.float32)), "expected (batch, 64)"),
    (npy_bytes(np.zeros((0, 64), np.float32)), "between 1 and 256"),
    (npy_bytes(np.zeros((257, 64), np.float32)), "between 1 and 256"),
    (npy_bytes(np.array([["a"] * 64])), "dtype <U1"),
    (npy_bytes(np.full((1, 64), np.nan, np.float32)), "NaN or infinity"),
])
def test_invalid_npy_gets_422_saying_what_is_wrong(served, content, fragment):
    r = post_npy(served["client"], content)
    assert r.status_code == 422 and fragment in r.json()["detail"]


def test_oversized_body_is_413(served):
    # within max_batch, over MAX_BODY bytes
    body = json.dumps({"inputs": [[0.123456789] * 64] * 250})
    assert len(body) > MAX_BODY
    r = served["client"].post("/predict", content=body,
                              headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["detail"]


def test_metadata_carries_the_card_and_epsilon(served):
    meta = served["client"].get("/metadata", headers=AUTH).json()
    assert meta["card"]["privacy"]["epsilon_max"] == 2.0
    assert meta["sha256"] == served["export"].sha256 and meta["input_shape"] == [64]


def test_explain_returns_complete_attributions(served):
    x = served["test"].x[:3]
    r = post(served["client"], x.tolist(), path="/explain", target=[1, 2, 3])
    assert r.status_code == 200
    attr = np.array(r.json()["attributions"])
    assert attr.shape == (3, 64) and r.json()["targets"] == [1, 2, 3]
    session = onnx_session(Path(served["export"].out_dir) / "model.onnx")
    gap = onnx_logits(session, x) - onnx_logits(session, np.zeros_like(x))
    assert np.allclose(attr.sum(1), gap[np.arange(3), [1, 2, 3]], rtol=0.05, atol=1e-3)
    assert post(served["client"], x.tolist(), path="/explain", target=[10, 0, 0]).status_code == 422
    assert post(served["client"], [[0.0] * 64] * 17, path="/explain").status_code == 422


def test_metrics_exposition_and_drift(served):
    c, test = served["client"], served["test"]
    for i in range(2):
        assert post(c, test.x[50 * i: 50 * i + 50].tolist()).status_code == 200
    clean = c.get("/metrics", headers=AUTH)
    assert clean.headers["content-type"].startswith("text/plain; version=0.0.4")
    for _ in range(2):
        assert post(c, (1.0 - test.x[:50]).tolist()).status_code == 200
    assert post(c, test.x[:1].tolist(), headers={}).status_code == 401
    text = c.get("/metrics", headers=AUTH).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ .+$", line)
            continue
        assert SAMPLE.match(line), line
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    prefix = 'fedshield_request_duration_seconds_bucket{path="/predict"'
    buckets = [v for k, v in samples.items() if k.startswith(prefix)]
    assert buckets == sorted(buckets)
    assert buckets[-1] == samples['fedshield_request_duration_seconds_count{path="/predict"}']
    assert samples['fedshield_requests_total{path="/predict",code="200"}'] >= 4
    assert samples['fedshield_requests_total{path="/predict",code="401"}'] >= 1
    # latest window: inverted digits
    assert samples['fedshield_drift_score{statistic="psi_mean"}'] > 1.0
    assert samples["fedshield_retrain_triggers_total"] >= 1 and served["triggers"]
    windows = [json.loads(line) for line in served["log"].read_text().splitlines()]
    clean_scores = [w["scores"]["psi_mean"] for w in windows if not w["over_threshold"]]
    assert clean_scores and max(clean_scores) < 0.2


def test_int8_variant_serves(served):
    app = create_app(served["run"], quantized=True)
    r = TestClient(app).post("/predict", json={"inputs": served["test"].x[:50].tolist()})
    fp32 = post(served["client"], served["test"].x[:50].tolist()).json()["predictions"]
    assert r.status_code == 200 and np.mean(np.array(r.json()["predictions"]) == fp32) > 0.9


def test_exposure_rules():
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("localhost", None)
    with pytest.raises(ConfigError, match="without a bearer token"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ConfigError, match="at least 16"):
        check_exposure("192.168.1.5", "short")
    check_exposure("0.0.0.0", TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_on_loopback(served):
    port = free_port()
    env = os.environ | {"FEDSHIELD_SERVE_TOKEN": TOKEN,
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fedshield.commands.deploy", "serve", "--model",
                             str(served["run"]),
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "64",
                             "--drift-window", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not start in 90 s"
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        x = served["test"].x[:4].tolist()
        with httpx.Client(base_url=base, timeout=10.0) as client:
            assert client.post("/predict", json={"inputs": x}).status_code == 401
            ok = client.post("/predict", json={"inputs": x}, headers=AUTH)
            assert ok.status_code == 200 and len(ok.json()["predictions"]) == 4
            bad = client.post("/predict", json={"inputs": [[1.0] * 65]}, headers=AUTH)
            assert bad.status_code == 422 and "expected (batch, 64)" in bad.text
            assert client.post("/predict", json={"inputs": [[0.0] * 64] * 65},
                               headers=AUTH).status_code == 422
            text = client.get("/metrics", headers=AUTH).text
            assert 'fedshield_requests_total{path="/predict",code="200"} 1' in text
            assert client.get("/docs").status_code == 401
            assert client.get(f"/docs?token={TOKEN}").status_code == 200
        monitor = CliRunner().invoke(monitor_app(), [base, "--once", "--token", TOKEN])
        assert monitor.exit_code == 0, monitor.output
        assert "windows scored 1" in monitor.output and re.search(r"\n0 +4 ", monitor.output)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines()
             if line.startswith("{")]
    start = [line for line in lines if line.get("event") == "startup"]
    assert len(start) == 1 and start[0]["url"] == base and start[0]["token"] is True
    assert start[0]["exposure"] == "loopback" and start[0]["docs"] == f"{base}/docs?token=<token>"
    assert start[0]["model"] == served["run"].name and start[0]["version"] == "local"
    access = [line for line in lines if line.get("event") == "access"]
    # one line per request: 1 per /health poll that got through, 7 above, 1 from the monitor
    assert [a["path"] for a in access if a["path"] != "/health"] == [
        "/predict"] * 4 + ["/metrics", "/docs", "/docs", "/drift"]
    assert [a["status"] for a in access if a["path"] == "/predict"] == [401, 200, 422, 422]
    assert TOKEN not in json.dumps(lines)
    assert not any("Uvicorn running" in json.dumps(line) for line in lines)  # ours replaces it
    assert not any(line["logger"] == "uvicorn.access" for line in lines)  # replaced, not doubled


def monitor_app():
    import typer

    from fedshield.commands.predict_monitor import monitor_command

    app = typer.Typer()
    app.command()(monitor_command)
    return app
