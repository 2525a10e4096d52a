"""Serving that talks: access, drift and trigger log lines, OpenAPI docs behind the token,
``fedshield predict`` on files, ``fedshield monitor --once`` (real digits export, in-process)."""

import csv
import io
import json
import logging

import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from fedshield.deployment.artifacts import REFERENCE_JSON
from fedshield.deployment.card import build_card
from fedshield.deployment.export import export_model
from fedshield.deployment.reference_stats import reference_from_data
from fedshield.deployment.serving import (
    TriggerCooldown,
    create_app,
    load_served_model,
    model_reference,
    startup_info,
)
from fedshield.deployment.serving_logs import LOGGER, JsonFormatter
from fedshield.tasks import get_task
from typer.testing import CliRunner

from fedshield.commands.predict_monitor import (
    monitor_command,
    predict_command,
    render,
    view_from_server,
)
from tests.deploy_support import make_run_dir, trained_state

TOKEN = "logs-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = get_task("digits")
    root = tmp_path_factory.mktemp("serving-logs")
    run = make_run_dir(root, "digits", epsilon_max=2.0)
    export = export_model(task, trained_state("digits"), run / "export", {"run": "logs-test"},
                          quantize=False)
    train, test = task.load()
    reference_from_data(train.x, train.y, (64,), 10, task.feature_names, 10,
                        "train").save(run / "export" / REFERENCE_JSON)
    build_card(run, export, explain_examples=4)
    return {"run": run, "test": test, "served": load_served_model(run), "root": root,
            "names": list(task.feature_names)}


@pytest.fixture
def log_lines():
    """The JSON lines fedshield.serving* writes during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict] = []

    def read() -> list[dict]:
        lines[:] = [json.loads(line) for line in stream.getvalue().splitlines()]
        return lines
    yield read
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_startup_line_says_where_what_and_how_exposed(setup):
    served = setup["served"]
    info = startup_info(served, "127.0.0.1", 8123, TOKEN)
    assert (info.url, info.token, info.exposure) == ("http://127.0.0.1:8123", True, "loopback")
    assert info.docs == "http://127.0.0.1:8123/docs?token=<token>"
    text = info.message()
    assert served.name in text and f"version {served.version}" in text and "token on" in text
    assert TOKEN not in text and TOKEN not in json.dumps(vars(info))
    public = startup_info(served, "0.0.0.0", 80, None)
    assert public.exposure == "public" and "no token" in public.message()
    assert startup_info(served, "::1", 9, None).url == "http://[::1]:9"


def test_one_access_line_per_request_never_the_token_or_body(setup, log_lines):
    client = TestClient(create_app(setup["served"], token=TOKEN, max_body_bytes=50_000))
    marker = 0.3217654  # a value of the body: must not reach the log
    x = [[marker] * 64]
    ok = client.post("/predict", json={"inputs": x}, headers=AUTH | {"x-request-id": "req-42"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-42"
    assert client.post("/predict", json={"inputs": x}, headers={}).status_code == 401
    odd = client.get("/health", headers={"x-request-id": "has spaces and\ttabs"})
    assert client.get(f"/docs?token={TOKEN}").status_code == 200
    assert client.get("/no-such-route", headers=AUTH).status_code == 404
    assert client.post("/predict", content=b"0" * 60_000, headers=AUTH).status_code == 413
    access = [line for line in log_lines() if line.get("event") == "access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/predict", 200), ("POST", "/predict", 401), ("GET", "/health", 200),
        ("GET", "/docs", 200), ("GET", "/no-such-route", 404), ("POST", "/predict", 413)]
    assert access[0]["request_id"] == "req-42"
    assert access[2]["request_id"] == odd.headers["x-request-id"] != "has spaces and\ttabs"
    for line in access:
        assert {"time", "method", "path", "status", "latency_ms", "client_ip",
                "request_id"} <= line.keys()
        assert line["latency_ms"] >= 0 and line["time"].endswith("Z")
    text = json.dumps(log_lines())
    assert TOKEN not in text and "Bearer" not in text and str(marker) not in text


def test_drift_windows_and_triggers_are_logged_once_each(setup, log_lines):
    fired, test = [], setup["test"]
    app = create_app(setup["served"], token=TOKEN, drift_window=50, drift_patience=2,
                     trigger_cooldown=3600, on_trigger=fired.append)
    client = TestClient(app)

    def send(x, per_request):
        for i in range(0, len(x), per_request):
            assert client.post("/predict", json={"inputs": x[i:i + per_request].tolist()},
                               headers=AUTH).status_code == 200

    send(test.x[:50], 5)  # ten requests, one window
    send(1.0 - test.x[:100], 50)  # inverted digits: two drifting windows -> trigger
    send(1.0 - test.x[100:200], 25)  # drift persists: the next trigger is in the cooldown
    events = [line for line in log_lines() if line.get("event", "").startswith(("drift",
                                                                                 "retrain"))]
    assert [e["event"] for e in events] == ["drift_window", "drift_window", "drift_window",
                                           "retrain_trigger", "drift_window", "drift_window",
                                           "retrain_trigger_suppressed"]
    clean, first = events[0], events[1]
    assert clean["level"] == "INFO" and not clean["over_threshold"]
    assert clean["statistic"] == "psi_mean" and clean["threshold"] == 0.2
    assert first["level"] == "WARNING" and first["value"] > 0.2 and first["drifted_features"]
    assert all(v > 0.2 for _, v in first["drifted_features"])
    assert events[3]["windows"] == [1, 2] and "psi_mean above 0.2" in events[3]["message"]
    assert "cooldown" in events[6]["message"]
    assert len(fired) == 1  # one fine-tuning run, not one per drifting pair of windows
    state = client.get("/drift", headers=AUTH).json()
    assert (state["windows"], state["triggers"], state["suppressed"]) == (5, 1, 1)
    assert [r["index"] for r in state["recent"]] == [0, 1, 2, 3, 4]
    metrics = client.get("/metrics", headers=AUTH).text
    assert "fedshield_retrain_triggers_suppressed_total 1" in metrics


def test_cooldown_counts_from_the_last_fired_trigger():
    now = [100.0]
    cooldown = TriggerCooldown(60, clock=lambda: now[0])
    assert cooldown.remaining() == 0
    cooldown.fire()
    now[0] = 130.0
    assert cooldown.remaining() == pytest.approx(30)
    now[0] = 161.0
    assert cooldown.remaining() == 0
    assert TriggerCooldown(0).remaining() == 0


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_docs_open_without_token_and_behind_it_with_one(setup, path):
    open_client = TestClient(create_app(setup["served"]))
    assert open_client.get(path).status_code == 200
    guarded = TestClient(create_app(setup["served"], token=TOKEN))
    refused = guarded.get(path)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in refused.json()["detail"]
    assert "?token=<token>" in refused.json()["detail"]
    assert guarded.get(f"{path}?token=wrong").status_code == 401
    assert guarded.get(path, headers=AUTH).status_code == 200
    assert guarded.get(f"{path}?token={TOKEN}").status_code == 200
    # The query token is for the docs only: URLs of predictions end up in proxies' logs.
    assert guarded.post(f"/predict?token={TOKEN}",
                        json={"inputs": [[0.0] * 64]}).status_code == 401


def test_openapi_describes_the_routes_and_the_bearer_scheme(setup):
    client = TestClient(create_app(setup["served"], token=TOKEN))
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert {"/predict", "/explain", "/metadata", "/metrics", "/drift", "/health"} <= set(
        schema["paths"])
    assert "/docs" not in schema["paths"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    page = client.get(f"/docs?token={TOKEN}").text
    assert "swagger" in page.lower() and f"/openapi.json?token={TOKEN}" in page


def test_registry_name_shorthand(tmp_path):
    assert model_reference("fedshield-digits") == "models:/fedshield-digits@champion"
    assert model_reference("fedshield-digits@3") == "models:/fedshield-digits/3"
    assert model_reference("fedshield-digits@staging") == "models:/fedshield-digits@staging"
    assert model_reference("models:/m/2") == "models:/m/2"
    assert model_reference("runs/some-run") == "runs/some-run"
    (tmp_path / "local").mkdir()
    assert model_reference(tmp_path / "local") == str(tmp_path / "local")


def cli(*commands):
    app = typer.Typer()
    for command in commands:
        app.command(command.__name__)(command)
    return app


def run_predict(*args):
    out = CliRunner().invoke(cli(predict_command, monitor_command),
                             ["predict_command", *map(str, args)])
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    return out


def read_predictions(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    predictions = np.array([int(r["prediction"]) for r in rows])
    probabilities = np.array([[float(r[f"probability_{k}"]) for k in range(10)] for r in rows])
    assert [int(r["row"]) for r in rows] == list(range(len(rows)))
    return predictions, probabilities


def server_answer(setup, x):
    client = TestClient(create_app(setup["served"]))
    answers = [client.post("/predict", json={"inputs": x[i:i + 100].tolist()}).json()
               for i in range(0, len(x), 100)]
    return (np.concatenate([a["predictions"] for a in answers]),
            np.concatenate([a["probabilities"] for a in answers]))


@pytest.mark.parametrize("kind", ["npy", "csv", "csv-header"])
def test_predict_file_equals_the_server(setup, tmp_path, kind):
    x = setup["test"].x[:300].astype(np.float32)
    source = tmp_path / f"rows.{kind[:3]}"
    if kind == "npy":
        np.save(source, x)
    else:
        with open(source, "w", newline="") as fh:
            writer = csv.writer(fh)
            if kind == "csv-header":
                writer.writerow(setup["names"])
            writer.writerows([[repr(float(v)) for v in row] for row in x])
    out = run_predict(setup["run"], source, "-o", tmp_path / "out.csv", "--chunk-size", "128",
                      "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[-1])["rows"] == 300
    predictions, probabilities = read_predictions(tmp_path / "out.csv")
    expected, expected_p = server_answer(setup, x)
    # Different batch sizes may change onnxruntime's summation order (last-bit differences),
    # so probabilities agree to float32 rounding and labels wherever the top two are not tied.
    assert np.allclose(probabilities, expected_p, atol=1e-5)
    top2 = np.sort(expected_p, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.mean() > 0.95 and (predictions[clear] == expected[clear]).all()


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


ROW = ",".join(["0.5"] * 64)


@pytest.mark.parametrize("name,content,fragment", [
    ("short.csv", ROW + "\n" + ",".join(["0.5"] * 63) + "\n", "row 1 (line 2) has 63 columns"),
    ("nan.csv", ROW + "\n" + ROW + "\n" + ",".join(["0.5"] * 5 + ["nan"] + ["0.5"] * 58),
     "row 2, column 5 ('pixel_0_5') is NaN"),
    ("inf.csv", ",".join(["inf"] + ["0.5"] * 63), "row 0, column 0 ('pixel_0_0') is infinite"),
    ("word.csv", ROW + "\n" + ",".join(["0.5"] * 10 + ["abc"] + ["0.5"] * 53),
     "row 1, column 10 ('pixel_1_2') is 'abc', not a number"),
    ("empty.csv", "", "has no data rows"),
    ("header-only.csv", ",".join(f"pixel_{i // 8}_{i % 8}" for i in range(64)) + "\n",
     "has no data rows"),
    ("order.csv", ",".join(f"pixel_{i % 8}_{i // 8}" for i in range(64)) + "\n" + ROW,
     "header column 1 is 'pixel_1_0'"),
    ("binary.csv", bytes(range(256)) * 4, "is not a text CSV"),
    ("long.csv", '"' + "1" * 200_000 + '"', "is not a readable CSV"),  # over csv's field limit
    ("rows.txt", ROW, "unknown input type '.txt'"),
    ("huge.csv", ",".join(["1e39"] + ["0.5"] * 63), "beyond float32's range"),
])
def test_bad_csv_files_are_clear_errors(setup, tmp_path, name, content, fragment):
    source = write(tmp_path / name, content)
    out = run_predict(setup["run"], source, "-o", tmp_path / "out.csv")
    assert out.exit_code != 0 and fragment in out.output, out.output
    assert "Traceback" not in out.output and not (tmp_path / "out.csv").exists()


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def with_nan(row: int, col: int) -> np.ndarray:
    x = np.full((5, 64), 0.5, np.float32)
    x[row, col] = np.nan
    return x


@pytest.mark.parametrize("content,fragment", [
    (npy_bytes(np.zeros((4, 63), np.float32)), "has shape (4, 63)"),
    (npy_bytes(np.zeros((0, 64), np.float32)), "is empty (0 rows)"),
    (npy_bytes(with_nan(3, 7)), "row 3, column 7 ('pixel_0_7') is NaN"),
    (npy_bytes(np.array([{"x": 1}], dtype=object)), "Python objects"),
    (npy_bytes(np.array([["a"] * 64])), "dtype <U1"),
    (npy_bytes(np.zeros((4, 64), np.float32))[:-10], "truncated"),
    (b"not an array at all", "is not a .npy array"),
])
def test_bad_npy_files_are_clear_errors(setup, tmp_path, content, fragment):
    source = write(tmp_path / "rows.npy", content)
    out = run_predict(setup["run"], source, "-o", tmp_path / "out.csv")
    assert out.exit_code != 0 and fragment in out.output, out.output
    assert "Traceback" not in out.output and not (tmp_path / "out.csv").exists()


def test_unpreprocessed_rows_warn_or_fail_with_strict_inputs(setup, tmp_path):
    x = setup["test"].x[:10] * 16.0  # raw 0-16 pixel values instead of pixel/16
    source = tmp_path / "raw.npy"
    np.save(source, x.astype(np.float32))
    out = run_predict(setup["run"], source, "-o", tmp_path / "out.csv")
    assert out.exit_code == 0 and "warning:" in out.output and "far outside" in out.output
    strict = run_predict(setup["run"], source, "-o", tmp_path / "strict.csv", "--strict-inputs")
    assert strict.exit_code != 0 and "row 0, column" in strict.output
    assert not (tmp_path / "strict.csv").exists()


def test_monitor_once_prints_the_drift_table(setup, tmp_path):
    log = tmp_path / "windows.jsonl"
    client = TestClient(create_app(setup["served"], token=TOKEN, drift_window=40,
                                   drift_patience=2, window_log=log))
    test = setup["test"]
    for x in (test.x[:40], 1.0 - test.x[:40], 1.0 - test.x[40:80], test.x[80:100]):
        assert client.post("/predict", json={"inputs": x.tolist()},
                           headers=AUTH).status_code == 200
    state = client.get("/drift", headers=AUTH).json()
    text = render(view_from_server("http://x", state), state["statistic"], color=False)
    lines = text.splitlines()
    assert setup["served"].name in lines[0] and "next window 20/40" in text
    header = next(i for i, line in enumerate(lines) if line.startswith("window "))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and rows[0][6] == "ok"
    assert rows[1][6:8] == ["DRIFT", "1/2"] and rows[2][6] == "TRIGGER"
    assert "\x1b[" not in text
    out = CliRunner().invoke(cli(monitor_command), [str(log), "--once", "--patience", "2"])
    assert out.exit_code == 0, out.output
    assert "TRIGGER" in out.output and "retrain trigger windows [1, 2]" in out.output
    missing = CliRunner().invoke(cli(monitor_command), [str(tmp_path / "nope.jsonl"), "--once"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
