"""HTTP serving on onnxruntime (FastAPI): predict, explain, health, metadata, Prometheus metrics.

Security: a bearer token guards every endpoint but ``/health`` when one is configured, and
``serve`` refuses to bind a non-loopback host without one. Integrity: the artifacts are hashed
before loading and must match the registry (a registered version, or a run folder whose
``handoff.json`` names one); a bare export folder is checked against its own ``export.json``.

Hostile input never gets a 5xx: numbers beyond float32 and model outputs that overflow are 422,
a ``.npy`` header is checked against the body's length and the batch limit before anything is
allocated, a request body must arrive within ``body_timeout`` seconds (else 408 and the
connection is closed), inputs far outside the evaluation range get a warning header (422 with
``strict_inputs``), and metrics label unknown paths as ``other``.
"""

import asyncio
import io
import ipaddress
import json
import logging
import secrets
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fedshield.deployment.artifacts import (
    CARD_JSON,
    EXPORT_JSON,
    ONNX,
    ONNX_INT8,
    REFERENCE_JSON,
    SAFETENSORS,
    build_loaded_model,
    load_weights,
    read_json,
    verify,
)
from fedshield.deployment.drift import DriftMonitor, RetrainTrigger, WindowReport
from fedshield.deployment.explain import integrated_gradients
from fedshield.deployment.export import INPUT_NAME, onnx_session
from fedshield.deployment.reference_stats import Reference
from fedshield.deployment.serving_metrics import CONTENT_TYPE, ServingMetrics
from fedshield.tasks import get_task
from pydantic import AfterValidator, BaseModel, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool

from fedshield.errors import ConfigError

log = logging.getLogger("fedshield.serving")
DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_BODY = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 10.0  # seconds for a whole request body: a stalled client is cut off
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Inputs this far (in units of the evaluation range's width) outside it are flagged: raw 0-255
# pixels against a [0, 1] or [-0.4, 2.8] range are far beyond, honest drift is not.
RANGE_MARGIN = 0.5
RANGE_HEADER = "x-fedshield-input-warning"
MAX_EXPLAIN = 16
MIN_REMOTE_TOKEN = 16
ERRORS_SHOWN = 10
INLINE_BATCH = 8
# A binary batch: the bytes numpy.save writes (probabilities then go in the query string).
NPY_TYPES = ("application/x-npy", "application/octet-stream")


@dataclass
class ServedModel:
    """A verified export ready to serve: its ONNX session, schema, card and drift reference."""
    name: str
    version: str
    folder: Path
    task: str
    input_shape: tuple[int, ...]
    num_classes: int
    sha256: dict[str, str]
    card: dict
    reference: Reference | None
    quantized: bool = False
    model: str = ""  # the task's architecture name ("" = default), from the export metadata
    session: Any = field(default=None, repr=False)
    input_range: dict | None = None  # {"min", "max"} of the evaluation inputs (export.json)
    preprocessing: str = ""


def _registry_hashes_for_run(run_dir: Path,
                             tracking_uri: str | None) -> tuple[str, str, dict[str, str]] | None:
    handoff = run_dir / "handoff.json"
    if not handoff.is_file():
        return None
    from fedshield.deployment.registry import client_for, expected_hashes, get_version

    try:
        record = json.loads(handoff.read_text())
        name, version = str(record["model_name"]), str(record["version"])
        if tracking_uri is None:
            config = tomllib.loads((run_dir / "config.toml").read_text())
            tracking_uri = config.get("deployment", {}).get("registry_uri",
                                                            "sqlite:///.fedshield/registry.db")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run_dir}/handoff.json or config.toml is unreadable ({exc}); serve the "
                          f"registered version instead: --model models:/NAME/VERSION") from None
    mv = get_version(client_for(tracking_uri, create=False), name, version=version)
    return name, str(mv.version), expected_hashes(mv.tags)


def load_served_model(model: str | Path, tracking_uri: str | None = None,
                      quantized: bool = False) -> ServedModel:
    """Resolve ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, a run folder or an export folder,
    verify every artifact's sha256, and open the ONNX session."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _load_served_model(model, tracking_uri, quantized)
    except (MlflowException, SQLAlchemyError) as exc:  # corrupt or foreign: no MLflow traceback
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"the registry at {tracking_uri or 'the default URI'} cannot be read "
                          f"({first}); check --registry-uri") from None


def _load_served_model(model: str | Path, tracking_uri: str | None, quantized: bool) -> ServedModel:
    text = str(model)
    if text.startswith("models:/"):
        from fedshield.deployment.registry import resolve

        resolved = resolve(text, tracking_uri or "sqlite:///.fedshield/registry.db")
        name, version = resolved.name, resolved.version
        folder, hashes = resolved.local_dir, resolved.sha256
    else:
        path = Path(text)
        folder = path / "export" if (path / "export" / EXPORT_JSON).is_file() else path
        if not (folder / EXPORT_JSON).is_file():
            raise ConfigError(f"{path} is neither a run folder with export/ nor an export folder "
                              f"(no {EXPORT_JSON}); pass models:/NAME@champion or a handed-off run "
                              "folder")
        registered = _registry_hashes_for_run(path, tracking_uri) if folder != path else None
        if registered:
            name, version, hashes = registered
        else:
            name, version = path.resolve().name, "local"
            hashes = read_json(folder / EXPORT_JSON)["sha256"]
        verify(folder, hashes)
    export = read_json(folder / EXPORT_JSON)
    if quantized and ONNX_INT8 not in hashes:
        raise ConfigError("no int8 model in this export; re-export with deployment.quantize = true")
    card = read_json(folder / CARD_JSON) if (folder / CARD_JSON).is_file() else {}
    has_reference = (folder / REFERENCE_JSON).is_file()
    reference = Reference.load(folder / REFERENCE_JSON) if has_reference else None
    schema = (card.get("data_schema") or {}).get("input") or {}
    rng = export.get("input_range") or schema.get("range")
    served = ServedModel(name, version, folder, export["task"], tuple(export["input_shape"]),
                         export["num_classes"], hashes, card, reference, quantized,
                         export.get("metadata", {}).get("model", ""),
                         input_range=rng if isinstance(rng, dict) else None,
                         preprocessing=str((card.get("task") or {}).get("preprocessing", "")))
    served.session = onnx_session(folder / (ONNX_INT8 if quantized else ONNX))
    return served


def _nested(depth: int) -> Any:
    number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    kind: Any = number
    for _ in range(depth):
        kind = list[kind]
    return kind


def batch_problem(shape: tuple[int, ...], input_shape: tuple[int, ...], limit: int) -> str | None:
    """What is wrong with a batch of this shape, or None when it is servable."""
    if shape[1:] != input_shape:
        return f"inputs have shape {shape}; expected (batch, {', '.join(map(str, input_shape))})"
    if not 1 <= shape[0] <= limit:
        return f"batch of {shape[0]} examples; send between 1 and {limit} per request"
    return None


def request_models(input_shape: tuple[int, ...], max_batch: int,
                   max_explain: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Pydantic request bodies whose validation checks numbers (finite floats) and shape."""

    def shape_check(limit: int) -> Callable[[list], list]:
        def check(value: list) -> list:
            if not value:
                raise ValueError(f"inputs is empty; send between 1 and {limit} examples per "
                                 "request")
            try:
                array = np.asarray(value, dtype=np.float64)  # exact: no overflow before the check
            except ValueError:
                raise ValueError("inputs are ragged; every example must have shape "
                                 f"{input_shape}") from None
            if problem := batch_problem(array.shape, input_shape, limit):
                raise ValueError(problem)
            if array.size and float(np.abs(array).max()) > FLOAT32_MAX:
                raise ValueError(f"inputs contain values beyond float32's range (|x| > "
                                 f"{FLOAT32_MAX:.3g}); the model takes float32: send "
                                 f"preprocessed inputs")
            return value
        return check

    body = _nested(1 + len(input_shape))
    predict = create_model("PredictRequest",
                           inputs=(Annotated[body, AfterValidator(shape_check(max_batch))], ...),
                           probabilities=(bool, True))
    explain = create_model("ExplainRequest",
                           inputs=(Annotated[body, AfterValidator(shape_check(max_explain))], ...),
                           target=(list[Annotated[int, Field(ge=0)]] | None, None))
    return predict, explain


def npy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of ``.npy`` bytes; ValueError when malformed.

    Only the header is parsed: ``np.load`` would allocate whatever the header claims (10^12 rows)
    before noticing that the body is a few bytes long."""
    from numpy.lib import format as npy

    buffer = io.BytesIO(raw)
    try:
        version = npy.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:  # noqa: BLE001 — numpy's header parser raises SyntaxError,
        # tokenize.TokenError, ValueError, ... on hostile bytes; all mean "not a .npy array"
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(first) from None
    return tuple(int(n) for n in shape), bool(fortran), dtype, buffer.tell()


def npy_inputs(raw: bytes, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """A binary batch (the bytes of ``numpy.save``: nothing to parse, unlike a JSON body of 784
    floats), checked like a JSON one; never unpickles, never allocates before the checks."""
    expected = f"a float32 batch shaped (batch, {', '.join(map(str, input_shape))})"
    try:
        shape, fortran, dtype, offset = npy_header(raw)
    except ValueError as exc:
        raise HTTPException(422, f"body is not a .npy array ({exc}); send the bytes of "
                                 f"numpy.save(file, batch) for {expected}") from None
    if dtype.hasobject:
        raise HTTPException(422, "body is not a .npy array of numbers: it holds Python objects "
                                 f"(a pickle, never loaded); send {expected}")
    if dtype.kind not in "fiu" or dtype.subdtype is not None:
        raise HTTPException(422, f"inputs have dtype {dtype.str}; send float32 numbers")
    if problem := batch_problem(shape, input_shape, limit):
        raise HTTPException(422, problem)
    count = int(np.prod(shape, dtype=np.int64))  # bounded: shape passed the batch checks
    if len(raw) - offset != count * dtype.itemsize:
        raise HTTPException(422, f".npy header says {shape} {dtype.str} ({count * dtype.itemsize} "
                                 f"bytes) but the body holds {len(raw) - offset} data bytes; send "
                                 f"a complete array")
    x = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    x = x.reshape(shape[::-1]).T if fortran else x.reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused below
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise HTTPException(422, f"inputs contain NaN or infinity, or values beyond float32's "
                                 f"range (|x| > {FLOAT32_MAX:.3g}); send finite float32 numbers")
    return x


def range_problem(x: np.ndarray, input_range: dict | None, preprocessing: str = "") -> str | None:
    """Why a batch looks unpreprocessed (far outside the evaluation range), or None."""
    if not input_range or not x.size:
        return None
    try:
        lo, hi = float(input_range["min"]), float(input_range["max"])
    except (KeyError, TypeError, ValueError):
        return None
    margin = RANGE_MARGIN * max(hi - lo, 1e-6)
    seen_lo, seen_hi = float(x.min()), float(x.max())
    if lo - margin <= seen_lo and seen_hi <= hi + margin:
        return None
    hint = f"; the model expects inputs preprocessed as: {preprocessing}" if preprocessing else ""
    return (f"inputs span [{seen_lo:.4g}, {seen_hi:.4g}], far outside the evaluation range "
            f"[{lo:.4g}, {hi:.4g}]{hint}")


def header_safe(text: str, limit: int = 400) -> str:
    """An HTTP header value: printable ASCII only (a header cannot carry arbitrary text)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


class BodyLimit:
    """Pure ASGI middleware: 413 when a request body exceeds ``max_bytes``; 408 (and the connection
    closed) when the whole body has not arrived within ``timeout`` seconds (slowloris)."""

    def __init__(self, app, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def _reject(self, send, status: int = 413, detail: str = "") -> None:
        detail = detail or f"request body exceeds {self.max_bytes} bytes; send smaller batches"
        body = json.dumps({"detail": detail}).encode()
        # "connection: close": the rest of the body is never read, so the connection can't be reused
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        """ASGI entry point: pass non-HTTP scopes through, bound the body of HTTP requests."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        chunks, total, more = [], 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                why = f"request body not received within {self.timeout:g} s; send it at once"
                return await self._reject(send, 408, why)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._reject(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


KNOWN_PATHS = frozenset({"/health", "/metadata", "/predict", "/explain", "/metrics"})


def path_label(path: str) -> str:
    """A bounded metrics label: the known routes, everything else "other" (a label per unknown
    URL would let any client grow the metrics without bound)."""
    return path if path in KNOWN_PATHS else "other"


class RequestMetrics:
    """Pure ASGI middleware: count requests and time them by route and status."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        """ASGI entry point: pass non-HTTP scopes through, count and time HTTP requests."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                took = (time.perf_counter() - start) * 1e3
                message["headers"] = [*message.get("headers", []), (b"server-timing",
                                                                    f"app;dur={took:.3f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            took = time.perf_counter() - start
            self.metrics.observe_request(path_label(scope["path"]), status[0], took)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing what is wrong and where, without echoing the (possibly huge or non-finite)
    input."""
    errors = exc.errors()
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in errors[:ERRORS_SHOWN]]
    return JSONResponse({"detail": detail, "errors": len(errors)}, status_code=422)


def bearer_guard(token: str | None) -> Callable:
    """A FastAPI dependency refusing requests without ``Authorization: Bearer TOKEN`` (no token:
    it accepts every request)."""
    expected = f"Bearer {token}".encode() if token else None

    async def guard(request: Request) -> None:  # async: a sync dependency costs a thread hop
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token; send 'Authorization: Bearer "
                                     "<token>'",
                                headers={"WWW-Authenticate": "Bearer"})
    return guard


def create_app(model: str | Path | ServedModel, token: str | None = None,
               max_batch: int = DEFAULT_MAX_BATCH,
               max_body_bytes: int = DEFAULT_MAX_BODY, tracking_uri: str | None = None,
               quantized: bool = False,
               drift_window: int = 200, drift_threshold: float = 0.2, drift_patience: int = 3,
               window_log: str | Path | None = None,
               on_trigger: Callable[[RetrainTrigger], None] | None = None,
               budget_remaining: Callable[[], bool] | None = None,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, strict_inputs: bool = False) -> FastAPI:
    """The serving app. ``model``: a registry reference, a run or export folder, or a loaded model.

    ``strict_inputs``: refuse (422) batches far outside the evaluation input range instead of
    answering with an ``x-fedshield-input-warning`` header.

    Served batches feed a DriftMonitor when the export has a drift reference; each full window is
    appended to ``window_log`` (JSONL, read by ``fedshield monitor``) and retraining triggers go to
    ``on_trigger``.
    """
    served = model if isinstance(model, ServedModel) else load_served_model(model, tracking_uri,
                                                                            quantized)
    metrics = ServingMetrics()
    lock = threading.Lock()
    torch_model = build_loaded_model(get_task(served.task, served.model),
                                     load_weights(served.folder / SAFETENSORS))
    is_image = len(served.input_shape) == 3
    PredictRequest, ExplainRequest = request_models(served.input_shape, max_batch, MAX_EXPLAIN)

    def log_window(report: WindowReport) -> None:
        metrics.observe_window(report.scores, report.note.startswith("retraining triggered"))
        if window_log:
            with open(window_log, "a") as fh:
                fh.write(json.dumps(report.to_dict()) + "\n")

    monitor = None
    if served.reference is not None:
        monitor = DriftMonitor(served.reference, drift_window, drift_threshold, drift_patience,
                               budget_remaining=budget_remaining, on_trigger=on_trigger,
                               on_window=log_window)

    guard = [Depends(bearer_guard(token))]
    app = FastAPI(title=f"fedshield model {served.name}", version=str(served.version),
                  docs_url=None, redoc_url=None, openapi_url=None)
    # Starlette types handlers as taking any Exception; this one is registered for its subclass
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.state.served, app.state.monitor, app.state.metrics = served, monitor, metrics
    labels = {"name": served.name, "version": served.version, "task": served.task,
              "variant": "int8" if served.quantized else "fp32"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "version": served.version}

    @app.get("/metadata", dependencies=guard)
    async def metadata() -> dict:
        return {"model": served.name, "version": served.version, "variant": labels["variant"],
                "input_shape": list(served.input_shape), "num_classes": served.num_classes,
                "sha256": served.sha256, "card": served.card}

    def check_range(x: np.ndarray) -> dict[str, str]:
        """Headers for the response: a warning when the inputs look unpreprocessed."""
        problem = range_problem(x, served.input_range, served.preprocessing)
        if problem is None:
            return {}
        metrics.observe_input_warning()
        if strict_inputs:
            raise HTTPException(422, problem)
        log.warning("input range: %s", problem)
        return {RANGE_HEADER: header_safe(problem)}

    def refuse_overflow(values: np.ndarray, what: str) -> None:
        if not np.isfinite(values).all():
            rng = served.input_range
            shown = f" [{rng['min']:.4g}, {rng['max']:.4g}]" if rng else ""
            raise HTTPException(422, f"these inputs make the model's {what} overflow (inf/NaN); "
                                     f"send inputs in the model's range{shown}")

    @app.post("/predict", dependencies=guard)
    async def predict(request: Request, probabilities: bool = True) -> JSONResponse:
        raw = await request.body()
        if request.headers.get("content-type", "").split(";")[0].strip() in NPY_TYPES:
            x = npy_inputs(raw, served.input_shape, max_batch)
        else:
            # Parsed and validated in one pass by pydantic-core (about half the time of json +
            # validate).
            try:
                body: Any = PredictRequest.model_validate_json(raw)  # fields made at run time
            except ValidationError as exc:
                errors = [e | {"loc": ("body", *e["loc"])} for e in exc.errors()]
                raise RequestValidationError(errors) from None
            x, probabilities = np.asarray(body.inputs, dtype=np.float32), body.probabilities
        headers = check_range(x)
        if len(x) <= INLINE_BATCH:  # microseconds: a thread hop would cost more than the call
            logits = served.session.run(None, {INPUT_NAME: x})[0]
        else:  # keep the event loop (and /health) responsive during big batches
            logits = (await run_in_threadpool(served.session.run, None, {INPUT_NAME: x}))[0]
        refuse_overflow(logits, "logits")  # finite float32 inputs can still overflow the logits
        classes = logits.argmax(1)
        metrics.observe_predictions(classes)
        if monitor is not None:
            with lock:
                monitor.observe(x, classes)
        out: dict[str, Any] = {"predictions": classes.tolist(), "model_version": served.version}
        if probabilities:
            shifted = np.exp(logits - logits.max(1, keepdims=True))
            out["probabilities"] = (shifted / shifted.sum(1, keepdims=True)).tolist()
        return JSONResponse(out, headers=headers)

    @app.post("/explain", dependencies=guard)
    def explain(body: ExplainRequest) -> JSONResponse:  # type: ignore[valid-type]
        request: Any = body  # a model built at run time (request_models): mypy sees no fields
        x = np.asarray(request.inputs, dtype=np.float32)
        target = None
        if request.target is not None:
            if len(request.target) != len(x) or max(request.target) >= served.num_classes:
                raise HTTPException(422, f"target needs one class in [0, {served.num_classes - 1}] "
                                         "per example")
            target = np.asarray(request.target)
        headers = check_range(x)
        with np.errstate(over="ignore", invalid="ignore"):
            attributions, targets = integrated_gradients(torch_model, x, is_image, target)
        refuse_overflow(np.asarray(attributions), "attributions")
        return JSONResponse({"method": "integrated_gradients",
                             "baseline": "black image" if is_image else "zeros",
                             "targets": targets.tolist(), "attributions": attributions.tolist()},
                            headers=headers)

    @app.get("/metrics", dependencies=guard)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(labels), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: 413s are counted too
    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (localhost or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a strong bearer token."""
    if is_loopback(host):
        return
    if not token or len(token) < MIN_REMOTE_TOKEN:
        raise ConfigError(f"refusing to serve on {host} without a bearer token of at least "
                          f"{MIN_REMOTE_TOKEN} characters; pass --token (or "
                          "FEDSHIELD_SERVE_TOKEN), or bind 127.0.0.1")


def header_deadline_protocol(seconds: float) -> Any:
    """uvicorn's httptools protocol with a deadline on request headers.

    uvicorn only times out idle keep-alive connections: a client that opens a connection and
    trickles its headers (classic slowloris) would hold it forever. Falls back to uvicorn's own
    choice when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class HeaderDeadline(HttpToolsProtocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()  # also bounds a connection that never sends a byte

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request on a keep-alive connection
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
          **app_options: Any) -> None:
    """Run the serving app under uvicorn (blocks)."""
    import uvicorn

    check_exposure(host, token)
    app = create_app(model, token=token, **app_options)
    # Idle keep-alive connections are closed after 5 s, headers and bodies that stall after
    # body_timeout (HeaderDeadline, BodyLimit).
    timeout = float(app_options.get("body_timeout", DEFAULT_BODY_TIMEOUT))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_keep_alive=5, http=header_deadline_protocol(timeout))
