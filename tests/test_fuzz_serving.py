"""Hostile HTTP input against the real serving app: never a 5xx, never NaN in a response.

Over 500 requests (random bytes, wrong content types, huge/negative/NaN numbers, wrong shapes,
npy headers that lie, unicode garbage, unknown routes and methods) through the in-process ASGI
client, then raw sockets against a real uvicorn on 127.0.0.1: malformed HTTP, lying
Content-Length, and slowloris connections that stall mid-body and must be closed.
"""

import io
import json
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import HTTPException
from fastapi.testclient import TestClient
from fedshield.deployment.card import build_card
from fedshield.deployment.export import export_model
from fedshield.deployment.serving import (
    RANGE_HEADER,
    create_app,
    header_deadline_protocol,
    npy_inputs,
)
from fedshield.tasks import get_task
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.deploy_support import make_run_dir, trained_state

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = AUTH | {"content-type": "application/json"}
NPY = AUTH | {"content-type": "application/x-npy"}
F4 = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }"  # a .npy header
MAX_BATCH = 32
BODY_TIMEOUT = 1.0
ROUTES = ["/predict", "/explain", "/metadata", "/metrics", "/health"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    task = get_task("digits")
    root = tmp_path_factory.mktemp("fuzz")
    run = make_run_dir(root, "digits")
    export = export_model(task, trained_state("digits"), run / "export", {"run": "fuzz"},
                          quantize=False)
    build_card(run, export, explain_examples=4)
    app = create_app(run / "export", token=TOKEN, max_batch=MAX_BATCH, max_body_bytes=300_000,
                     body_timeout=BODY_TIMEOUT)
    return {"run": run, "app": app, "client": TestClient(app, raise_server_exceptions=False),
            "test": task.load()[1]}


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_with_header(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy file whose header says whatever we like (shape, dtype, order)."""
    text = header.encode("latin1")
    prefix, size = (b"\x93NUMPY\x01\x00", "<H") if version == 1 else (b"\x93NUMPY\x02\x00", "<I")
    pad = (64 - (len(prefix) + struct.calcsize(size) + len(text) + 1) % 64) % 64
    return prefix + struct.pack(size, len(text) + pad + 1) + text + b" " * pad + b"\n" + data


HOSTILE_NUMBERS = ["1e39", "-1e39", "1e400", "-1e400", "3.4e38", "-3.4e38", "1e308", "NaN",
                   "Infinity", "-Infinity", "nan", "inf", "1e-400", "-0", "0x10", "1_000", "+1",
                   ".5", "1.", "01", "99999999999999999999999999999999", "true", "null", '"1"',
                   "[]", "{}"]
CONTENT_TYPES = ["application/json", "application/x-npy", "application/octet-stream",
                 "text/plain", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "", "\u00ff/\u00fe",
                 "application/x-www-form-urlencoded", "image/png"]
GARBAGE_TEXT = ["\u0000", "\ud7ff", "\U0001f600", "\u202e", "\ufeff", "é", "\\", '"', "\x1b[31m"]


def json_number_bodies(rng: random.Random) -> list[bytes]:
    bodies = []
    for number in HOSTILE_NUMBERS:
        for probabilities in ("true", "false"):
            row = ["0.5"] * 63 + [number]
            rng.shuffle(row)
            text = f'{{"inputs": [[{",".join(row)}]], "probabilities": {probabilities}}}'
            bodies.append(text.encode())
    return bodies


def json_shape_bodies(rng: random.Random) -> list[bytes]:
    shapes = [[], [[]], [[[]]], 0.5, "x", None, {"a": 1}, [[0.1] * 64] * (MAX_BATCH + 1),
              [[0.1] * 64, [0.1] * 10], [[[0.1] * 64]], [[0.1] * 65], [[0.1] * 8] * 8,
              [[[[0.0]]]] * 3, [[True] * 64], [["0.1"] * 64], [[None] * 64]]
    bodies = [json.dumps({"inputs": s}).encode() for s in shapes]
    bodies += [b"", b"{", b"[", b"null", b"[]", b"{}", b'{"inputs": ', b'{"inputs": [[1,2,3' * 50,
               b'{"inputs": [[0.1]], "inputs": 3}', b'{"probabilities": "yes", "inputs": [[0.1]]}',
               b'{"inputs": [[0.1' + b"]" * 5000, b"[" * 5000 + b"]" * 5000,
               b'{"inputs":' + b"[" * 3000]
    for _ in range(20):
        depth = rng.randint(0, 5)
        value = [rng.uniform(-1e6, 1e6) for _ in range(rng.choice([1, 63, 64, 65]))]
        for _ in range(depth):
            value = [value] * rng.randint(0, 3)
        bodies.append(json.dumps({"inputs": value}).encode())
    for text in GARBAGE_TEXT:
        bodies.append(json.dumps({"inputs": [[text] * 64]}).encode())
        bodies.append(('{"inputs": [[' + text + ']]}').encode("utf-8", "surrogatepass"))
    bodies.append(b'{"inputs": [[\xff\xfe\xfd]]}')
    bodies.append("{\"inputs\": [[0.1]]}".encode("utf-16"))
    return bodies


def npy_bodies(rng: random.Random) -> list[bytes]:
    good = np.full((2, 64), 0.5, np.float32)
    raw = npy(good)
    bodies = [raw[:k] for k in (0, 5, 8, 10, 40, 127, 128, len(raw) - 1)]  # truncated
    bodies += [raw + b"\x00" * 7, raw[:-3] + b"xyz"[: rng.randint(0, 3)]]
    for shape in ["(1000000000000, 64)", "(2, 1000000000000)", "(10**12, 64)", "(-1, 64)",
                  "(2, -64)", "()", "(64,)", "(1, 8, 8)", "(2, 64, 1)",
                  "(18446744073709551615, 64)", "(2.5, 64)", "'x'"]:
        bodies.append(npy_with_header(F4 % shape))
        bodies.append(npy_with_header(F4 % shape, b"\x00" * 512, version=2))
    for descr in ["|O", "<c8", "|b1", "<U8", "|V4", "[('a', '<f4')]", "<M8[s]", ">f8", "<f2", "|u1",
                  "<i8", "'<f4'", "<f4, (2,)", "bogus", "<f16"]:
        quoted = descr if descr.startswith("[") else repr(descr)
        header = f"{{'descr': {quoted}, 'fortran_order': False, 'shape': (1, 64), }}"
        bodies.append(npy_with_header(header, b"\x00" * 64 * 8))
    fortran = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 64), }"
    bodies.append(npy_with_header(fortran, good.tobytes()))
    bodies.append(npy_with_header("{'descr': '<f4', 'shape': (2, 64), }", good.tobytes()))
    bodies.append(npy_with_header("__import__('os').system('true')", good.tobytes()))
    bodies.append(npy_with_header(F4.replace("}", "'x': 1}") % "(2, 64)", good.tobytes()))
    bodies.append(raw[:10] + b"\x00" + raw[11:])  # a NUL in the header (found by hypothesis)
    bodies.append(b"\x93NUMPY\x03\x00" + b"\xff" * 100)
    bodies.append(b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 200)
    for values in (np.full((1, 64), 1e39), np.full((1, 64), -np.inf), np.full((1, 64), np.nan),
                   np.full((1, 64), 3.4e38, np.float32), np.full((1, 64), 255, np.uint8),
                   np.full((1, 64), np.iinfo(np.int64).max, np.int64)):
        bodies.append(npy(values))
    bodies.append(npy(np.array([{"x": 1}], dtype=object)))
    for _ in range(20):
        blob = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        bodies.append(bytes(blob))
    return bodies


def hostile_requests(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for body in json_number_bodies(rng) + json_shape_bodies(rng):
        for path in ("/predict", "/explain"):
            requests.append({"method": "POST", "url": path, "content": body,
                             "headers": AUTH | {"content-type": "application/json"}})
    for body in npy_bodies(rng):
        for ctype in ("application/x-npy", "application/octet-stream"):
            query = rng.choice(["", "?probabilities=false", "?probabilities=maybe",
                                "?probabilities=%ff"])
            requests.append({"method": "POST", "url": "/predict" + query, "content": body,
                             "headers": AUTH | {"content-type": ctype}})
    for _ in range(120):  # random bytes under random content types, paths and methods
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 16, 300, 5000])))
        ctype = rng.choice(CONTENT_TYPES)
        headers = AUTH | ({"content-type": ctype.encode("latin1", "replace")} if ctype else {})
        requests.append({"method": rng.choice(["POST", "POST", "PUT", "GET"]),
                         "url": rng.choice(ROUTES), "content": body, "headers": headers})
    weird_paths = ["/", "/predict/", "/PREDICT", "/predict%00", "/../etc/passwd",
                   "/metrics?x=" + "a" * 3000, "/%ff%fe", "/docs", "/openapi.json",
                   "/" + "x" * 4000, "/health/../predict", "//predict", "/\u00e9t\u00e9",
                   "/predict;x=1",
                   "/metrics/other"] + [f"/random-{i}" for i in range(40)]
    for path in weird_paths:
        requests.append({"method": rng.choice(["GET", "POST"]), "url": path, "headers": AUTH})
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "GET"):
        for path in ROUTES:
            requests.append({"method": method, "url": path, "headers": AUTH})
    for auth in ("Bearer " + "\u00e9" * 10, "Bearer", "", "Basic Zm9vOmJhcg==",
                 "Bearer " + "x" * 10000, "Bearer \x00", TOKEN):
        requests.append({"method": "POST", "url": "/predict", "json": {"inputs": [[0.5] * 64]},
                         "headers": {"authorization": auth.encode("utf-8")}})
    return requests


def no_nan(text: str) -> None:
    def refuse(token):
        raise AssertionError(f"non-finite {token} in a response")
    json.loads(text, parse_constant=refuse)


def test_500_hostile_requests_never_get_a_5xx(served):
    client, requests = served["client"], hostile_requests()
    assert len(requests) >= 500
    statuses = []
    for spec in requests:
        spec = dict(spec)
        response = client.request(spec.pop("method"), spec.pop("url"), **spec)
        statuses.append(response.status_code)
        assert response.status_code < 500, (spec.get("content", b"")[:200], response.text[:500])
        is_json = response.headers.get("content-type", "").startswith("application/json")
        if is_json and response.content:
            no_nan(response.text)
    # The fuzzing reached past the transport: most requests were refused for their content.
    assert statuses.count(422) > 200 and statuses.count(404) >= 40
    # Metrics labels stay bounded: every unknown path is counted as "other".
    text = client.get("/metrics", headers=AUTH).text
    paths = {line.split('path="')[1].split('"')[0]
             for line in text.splitlines() if 'path="' in line}
    assert paths <= {"/predict", "/explain", "/metadata", "/metrics", "/health", "other"}
    assert 'fedshield_requests_total{path="other",code="404"}' in text


@pytest.mark.parametrize("probabilities", [True, False])
def test_float32_overflow_is_422_with_a_clear_message(served, probabilities):
    flag = str(probabilities).lower()
    body = '{"inputs": [[' + ",".join(["0.5"] * 63 + ["1e39"]) + f']], "probabilities": {flag}}}'
    r = served["client"].post("/predict", content=body, headers=JSON)
    assert r.status_code == 422 and "float32" in r.text
    huge = np.full((1, 64), 3.0e38, np.float32)  # finite float32 whose logits overflow
    r = served["client"].post("/predict", content=npy(huge), headers=NPY)
    assert r.status_code == 422 and "overflow" in r.text


def test_npy_header_claiming_a_trillion_rows_is_refused_before_allocation(served):
    body = npy_with_header(F4 % "(1000000000000, 64)", b"\x00" * 256)
    start = time.perf_counter()
    r = served["client"].post("/predict", content=body, headers=NPY)
    assert r.status_code == 422 and f"between 1 and {MAX_BATCH}" in r.text
    assert time.perf_counter() - start < 5.0  # no 4 TB allocation attempted
    short = npy_with_header(F4 % "(2, 64)", b"\x00" * 100)
    r = served["client"].post("/predict", content=short, headers=NPY)
    assert r.status_code == 422 and "data bytes" in r.text


def test_fortran_order_npy_is_read_correctly(served):
    x = served["test"].x[:3].astype(np.float32)
    c_order = served["client"].post("/predict", content=npy(x), headers=NPY)
    fortran = served["client"].post("/predict", content=npy(np.asfortranarray(x)), headers=NPY)
    assert c_order.status_code == fortran.status_code == 200
    assert c_order.json()["predictions"] == fortran.json()["predictions"]


def test_unpreprocessed_inputs_get_a_warning_or_422_in_strict_mode(served):
    raw_pixels = (served["test"].x[:4] * 16.0).tolist()  # digits are served as pixel/16 in [0, 1]
    preprocessed = served["test"].x[:4].tolist()
    ok = served["client"].post("/predict", json={"inputs": preprocessed}, headers=AUTH)
    assert ok.status_code == 200 and RANGE_HEADER not in ok.headers
    warned = served["client"].post("/predict", json={"inputs": raw_pixels}, headers=AUTH)
    assert warned.status_code == 200
    assert "outside the evaluation range" in warned.headers[RANGE_HEADER]
    assert "pixel/16" in warned.headers[RANGE_HEADER]  # says which preprocessing the model expects
    text = served["client"].get("/metrics", headers=AUTH).text
    assert "fedshield_input_range_warnings_total 0" not in text
    strict = TestClient(create_app(served["run"] / "export", strict_inputs=True))
    refused = strict.post("/predict", json={"inputs": raw_pixels})
    assert refused.status_code == 422 and "pixel/16" in refused.json()["detail"]
    assert strict.post("/predict", json={"inputs": preprocessed}).status_code == 200


class LiveServer:
    """The app under a real uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                timeout_keep_alive=2, http=header_deadline_protocol(BODY_TIMEOUT))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or ``wait`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1."):
        return None  # closed without an answer: refused at the transport, never a 5xx
    return int(reply.split(b" ", 2)[1])


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"0\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
]


def test_raw_http_garbage_against_real_uvicorn(served):
    with LiveServer(served["app"]) as live:
        for data in RAW_REQUESTS:
            status = status_of(raw_exchange(live.port, data, wait=3.0))
            assert status is None or status < 500, (data[:80], status)


def test_slowloris_connections_are_closed_after_the_body_timeout(served):
    """Connections that stall mid-body get 408 and are closed after BODY_TIMEOUT seconds."""
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
            b'{"inputs": [[')
    with LiveServer(served["app"]) as live:
        socks = []
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(head)
            socks.append(sock)
        start = time.monotonic()
        try:
            for sock in socks:
                reply = b""
                while chunk := sock.recv(65536):  # EOF: the server closed the connection
                    reply += chunk
                assert status_of(reply) == 408 and b"not received within" in reply
            elapsed = time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()
        # Closed by the body timeout (1 s), not by the client's own 10 s socket timeout.
        assert elapsed < BODY_TIMEOUT + 4.0
        # The server still answers afterwards.
        health = raw_exchange(live.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2.0)
        assert status_of(health) == 200


def test_connections_trickling_headers_are_closed(served):
    """Classic slowloris: headers that never complete; uvicorn alone would keep them open."""
    with LiveServer(served["app"]) as live:
        socks = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(5)]
        start = time.monotonic()
        try:
            for i, sock in enumerate(socks):
                if i % 2:  # odd ones send part of a request line and headers, even ones nothing
                    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            for sock in socks:
                assert sock.recv(65536) == b""  # EOF: closed by the server, no answer needed
            elapsed = time.monotonic() - start
        finally:
            for sock in socks:
                sock.close()
        assert elapsed < BODY_TIMEOUT + 4.0
        health = raw_exchange(live.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2.0)
        assert status_of(health) == 200


VALID_NPY = npy(np.full((2, 64), 0.5, np.float32))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=600),
                 st.builds(lambda cut, junk: VALID_NPY[:cut] + junk,
                           st.integers(0, len(VALID_NPY)), st.binary(max_size=64)),
                 st.builds(lambda pos, byte: VALID_NPY[:pos] + bytes([byte]) + VALID_NPY[pos + 1:],
                           st.integers(0, len(VALID_NPY) - 1), st.integers(0, 255))))
def test_npy_decoding_only_ever_refuses_with_422(raw):
    """Any bytes at all: a finite float32 batch of the right shape, or a 422, nothing else."""
    try:
        x = npy_inputs(raw, (64,), MAX_BATCH)
    except HTTPException as exc:
        assert exc.status_code == 422 and isinstance(exc.detail, str)
        return
    assert x.dtype == np.float32 and x.shape[1:] == (64,) and 1 <= len(x) <= MAX_BATCH
    assert np.isfinite(x).all()


JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.text(max_size=8)
               | st.floats(allow_nan=False, allow_infinity=False)
               | st.sampled_from([1e39, -1e39, 3.4e38, 1e308]))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (st.lists(children, max_size=66)
                      | st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=200)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(inputs=JSON_VALUES, path=st.sampled_from(["/predict", "/explain"]))
def test_any_json_body_gets_an_answer_below_500(served, inputs, path):
    r = served["client"].post(path, json={"inputs": inputs}, headers=AUTH)
    assert r.status_code in (200, 422), r.text[:300]
    no_nan(r.text)
