"""From federation to production, end to end: simulate -> hand-off -> registry -> gate ->
serve on 127.0.0.1 -> valid and invalid requests -> injected drift -> retraining trigger ->
a fine-tuning run from the champion goes through the same gate."""

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fedshield.deployment.registry import list_versions
from fedshield.deployment.retrain import launch_retraining
from fedshield.deployment.serving import create_app
from fedshield.simulations.runner import simulate
from fedshield.tasks import get_task

from fedshield import configio, validation
from tests.config_support import neutral_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on 127.0.0.1, stopped on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federation_to_production(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry = f"sqlite:///{tmp_path}/registry.db"
    config = {"name": "prod", "output_dir": str(tmp_path / "runs"), "task": {"name": "digits"},
              "federation": {"num_clients": 5, "rounds": 4},
              "partition": {"kind": "iid"}, "train": {"lr": 0.1, "batch_size": 16},
              "deployment": {"handoff": True, "registry_uri": registry, "model_name": "prod-digits",
                             "min_accuracy": 0.7, "quantize": False, "drift_window": 60,
                             "drift_patience": 2}}
    config_path = tmp_path / "prod.toml"
    config_path.write_text(configio.to_toml(neutral_config(config)))
    summary = simulate(validation.load(config_path))

    handoff = summary.handoff
    assert handoff.passed, handoff.reasons
    assert handoff.model_uri == "models:/prod-digits/1"
    card = json.loads((tmp_path / "runs" / summary.run_dir.split("/")[-1] / "export" /
                       "model_card.json").read_text())
    assert card["privacy"] is not None and card["metrics"]  # provenance travels with the model

    triggers, retrain = [], []

    def on_trigger(trigger):
        triggers.append(trigger)
        if not retrain:
            retrain.append(launch_retraining(trigger, str(config_path),
                                             "models:/prod-digits@champion",
                                             registry, 2, tmp_path / "retrain"))

    app = create_app("models:/prod-digits@champion", tracking_uri=registry, drift_window=60,
                     drift_threshold=0.2, drift_patience=2, on_trigger=on_trigger)
    task = get_task("digits")
    test = task.load()[1]
    with LiveServer(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").status_code == 200
        meta = client.get("/metadata").json()
        assert "privacy" in json.dumps(meta)
        ok = client.post("/predict", json={"inputs": test.x[:120].tolist()})
        assert ok.status_code == 200
        accuracy = np.mean(np.array(ok.json()["predictions"]) == test.y[:120])
        assert accuracy > 0.7
        bad_shape = client.post("/predict", json={"inputs": [[0.0] * 10]})
        assert bad_shape.status_code == 422 and "expected (batch, 64)" in bad_shape.text
        nan = client.post("/predict", content=b'{"inputs": [[NaN]]}',
                          headers={"content-type": "application/json"})
        assert nan.status_code == 422
        huge = client.post("/predict", content=b"0" * (9 * 2**20),
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413
        # Clean traffic: no trigger. Inverted images (1 - pixel): drift, a trigger after 2 windows.
        for start in range(120, 240, 60):
            client.post("/predict", json={"inputs": test.x[start:start + 60].tolist()})
        assert not triggers
        inverted = (1.0 - test.x).astype(np.float32)
        for start in range(0, 180, 60):
            client.post("/predict", json={"inputs": inverted[start:start + 60].tolist()})
        assert triggers, client.get("/metrics").text
        assert "fedshield_drift_score" in client.get("/metrics").text

    proc = retrain[0]
    assert proc.wait(timeout=400) == 0, (tmp_path / "retrain" / "retrain.log").read_text()[-3000:]
    versions = list_versions(registry, "prod-digits")
    assert len(versions) == 2  # the fine-tuned model went through registry and gate
    trigger = json.loads((tmp_path / "retrain" / "trigger.json").read_text())
    assert "init_weights" in " ".join(trigger["command"])
