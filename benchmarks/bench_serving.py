"""Serving latency and throughput: onnxruntime vs torch eager, in-process and over HTTP.

In-process: the bare model call (``session.run`` vs ``model(x)`` under ``torch.inference_mode``).
HTTP: the fedshield serving app under uvicorn on 127.0.0.1 in one process, a closed-loop load
generator in another (http.client, keep-alive, pre-serialised bodies: JSON, and the binary
``application/x-npy`` format), so the numbers include parsing, validation, the model call, drift
bookkeeping and the response. The torch server is
the same app with its ONNX session swapped for the torch model, so only the model call differs.
Model: the MNIST CNN (``tasks.get_task("mnist").build_model()``, random init: latency does not
depend on the weights). Both runtimes use one intra-op thread.

    python benchmarks/bench_serving.py [--out runs/bench-serving] [--requests 2000]
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCHES = (1, 32, 256)
FORMATS = ("json", "npy")


def percentiles(seconds: list[float]) -> dict:
    """p50, p99 and mean (ms) and the count of per-call latencies given in seconds."""
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(len(ms))}


def export_mnist(folder: Path) -> None:
    """Export an untrained MNIST CNN (fp32 and int8) to ``folder``: serving cost needs no
    training."""
    import torch
    from fedshield.deployment.export import export_model
    from fedshield.tasks import Split, get_task

    torch.manual_seed(0)
    task = get_task("mnist")
    test = task.load()[1]
    export_model(task, task.build_model().state_dict(), folder, {"bench": "serving"}, quantize=True,
                 test=Split(test.x[:512], test.y[:512]))


class TorchSession:
    """The ``session.run`` interface backed by torch eager, for a like-for-like HTTP comparison."""

    def __init__(self, folder: Path) -> None:
        import torch
        from fedshield.deployment.artifacts import SAFETENSORS, build_loaded_model, load_weights
        from fedshield.tasks import get_task

        torch.set_num_threads(1)
        self.torch = torch
        self.model = build_loaded_model(get_task("mnist"), load_weights(folder / SAFETENSORS))

    def run(self, _outputs, feeds):
        """``InferenceSession.run`` with torch eager: the logits of the one input."""
        with self.torch.inference_mode():
            return [self.model(self.torch.from_numpy(next(iter(feeds.values())))).numpy()]


def in_process(folder: Path, repeats: int) -> list[dict]:
    """Latency of each runtime called in-process, per batch size."""
    import torch
    from fedshield.deployment.export import INPUT_NAME, onnx_session

    rows = []
    runtimes = {"onnxruntime": onnx_session(folder / "model.onnx"),
                "onnxruntime-int8": onnx_session(folder / "model.int8.onnx"),
                "torch-eager": TorchSession(folder)}
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        n = max(20, repeats // batch)
        for name, session in runtimes.items():
            for _ in range(10):
                session.run(None, {INPUT_NAME: x})
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                session.run(None, {INPUT_NAME: x})
                times.append(time.perf_counter() - t0)
            stats = percentiles(times)
            rows.append({"mode": "in-process", "runtime": name, "batch": batch, **stats,
                         "samples_per_s": batch * n / sum(times)})
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def serve_process(folder: str, port: int, runtime: str) -> None:
    """Child process: the serving app under uvicorn."""
    import uvicorn
    from fedshield.deployment.serving import create_app, load_served_model

    served = load_served_model(folder, quantized=runtime == "onnxruntime-int8")
    if runtime == "torch-eager":
        served.session = TorchSession(Path(folder))
    uvicorn.run(create_app(served, max_batch=1024), host="127.0.0.1", port=port, log_level="error",
                access_log=False)


def request_body(batch: int, fmt: str) -> tuple[bytes, dict]:
    """One pre-serialised /predict body: JSON numbers, or the bytes of numpy.save (x-npy)."""
    x = np.random.default_rng(1).standard_normal((batch, 1, 28, 28)).astype(np.float32).round(4)
    if fmt == "json":
        body = json.dumps({"inputs": x.tolist(), "probabilities": False}).encode()
        return body, {"content-type": "application/json"}
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue(), {"content-type": "application/x-npy"}


def client_process(url: str, batch: int, fmt: str, requests: int, out: str) -> None:
    """Child process: closed-loop load generator on one keep-alive connection. Plain http.client:
    a heavier client (httpx) would add its own overhead to every request it times."""
    host, port = url.removeprefix("http://").split(":")
    body, headers = request_body(batch, fmt)
    path = "/predict" if fmt == "json" else "/predict?probabilities=false"
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    times, server = [], []
    for i in range(requests + 50):
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {payload[:300]!r}")
        if i >= 50:  # warm-up
            times.append(elapsed)
            server.append(float(response.getheader("server-timing", "").split("dur=")[1]) / 1e3)
    conn.close()
    Path(out).write_text(json.dumps({"times": times, "server": server, "body_bytes": len(body)}))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, limit: float = 120.0) -> None:
    """Wait until ``url``/health answers, or fail if the server process exits."""
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("server did not become healthy")


def over_http(folder: Path, requests: int, out: Path) -> list[dict]:
    """Client-observed latency of each runtime served over HTTP, per batch and format."""
    rows = []
    for runtime in ("onnxruntime", "onnxruntime-int8", "torch-eager"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(folder),
                                   "--port", str(port), "--runtime", runtime])
        try:
            wait_healthy(url, server)
            for batch, fmt in itertools.product(BATCHES, FORMATS):
                n = max(50, requests // max(1, batch // 8)) if batch > 1 else requests
                result = out / f"client-{runtime}-{batch}-{fmt}.json"
                subprocess.run([sys.executable, __file__, "--client", url, "--batch", str(batch),
                                "--format", fmt, "--requests", str(n), "--result", str(result)],
                               check=True, timeout=600)
                data = json.loads(result.read_text())
                result.unlink()
                stats = percentiles(data["times"])
                inside = percentiles(data["server"])
                rows.append({"mode": f"http-{fmt}", "runtime": runtime, "batch": batch, **stats,
                             "samples_per_s": batch * len(data["times"]) / sum(data["times"]),
                             "server_p50_ms": inside["p50_ms"], "server_p99_ms": inside["p99_ms"],
                             "body_bytes": data["body_bytes"]})
        finally:
            server.terminate()
            server.wait(timeout=20)
    return rows


def table(rows: list[dict]) -> str:
    """Client-observed latency; for HTTP also the time inside the app (Server-Timing header)."""
    lines = [f"{'mode':<11} {'runtime':<17} {'batch':>5} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'samples/s':>10} {'app p50':>8} {'app p99':>8}"]
    for r in rows:
        app = (f"{r['server_p50_ms']:>8.3f} {r['server_p99_ms']:>8.3f}" if "server_p50_ms" in r
               else f"{'-':>8} {'-':>8}")
        lines.append(f"{r['mode']:<11} {r['runtime']:<17} {r['batch']:>5} {r['p50_ms']:>8.3f} "
                     f"{r['p99_ms']:>8.3f} {r['samples_per_s']:>10.0f} {app}")
    return "\n".join(lines)


def main() -> None:
    """Command line: run the benchmark (or, internally, one server or client process)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-serving")
    parser.add_argument("--requests", type=int, default=2000,
                        help="HTTP requests per runtime for batch 1")
    parser.add_argument("--repeats", type=int, default=3000, help="in-process calls for batch 1")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_process(args.serve, args.port, args.runtime)
    if args.client:
        return client_process(args.client, args.batch, args.format, args.requests, args.result)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "model"
    export_mnist(folder)
    rows = in_process(folder, args.repeats) + over_http(folder, args.requests, out)
    report = {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "load_average": os.getloadavg(),
                                        "platform": platform.platform()},
              "command": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(table(rows))
    print(f"load average during the run: {os.getloadavg()}; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
