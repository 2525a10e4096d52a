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
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
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
from fedshield.deployment.serving_logs import (
    REQUEST_ID_HEADER,
    AccessRecord,
    StartupInfo,
    base_url,
    configure_logging,
    log_access,
    log_startup,
    log_trigger,
    log_window,
    request_id,
)
from fedshield.deployment.serving_metrics import CONTENT_TYPE, ServingMetrics
from fedshield.tasks import get_task
from pydantic import AfterValidator, BaseModel, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool

from fedshield.errors import ConfigError, FedShieldError

log = logging.getLogger("fedshield.serving")
API_DESCRIPTION = (
    "Predictions, explanations and drift monitoring of a federated model (fedshield serve). "
    "When the server has a token, every route but /health needs the header "
    "`Authorization: Bearer <token>` (the Authorize button here); a browser opens these docs "
    "as /docs?token=<token>. POST /predict takes JSON `{\"inputs\": [...], "
    "\"probabilities\": true}` or the bytes of numpy.save with Content-Type: application/x-npy.")
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
    # Set when the export is served on images (export.json pixel_shape): the task's registered
    # transform from images (input_shape) to the ONNX model's inputs (model_shape).
    transform: Any = field(default=None, repr=False)
    model_shape: tuple[int, ...] = ()

    def model_inputs(self, x: np.ndarray) -> np.ndarray:
        """The ONNX model's inputs for served inputs ``x`` (the transform, when there is one)."""
        if self.transform is None:
            return x
        with torch.no_grad():
            return self.transform(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def logits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model inputs, logits) of served inputs ``x``; the drift monitor reads the former."""
        z = self.model_inputs(x)
        return z, self.session.run(None, {INPUT_NAME: z})[0]


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


# A bare registry name, optionally @VERSION or @ALIAS (the short form of models:/...).
REGISTRY_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(@(?P<at>[A-Za-z0-9_.-]+))?$")


def model_reference(model: str | Path) -> str:
    """``models:/...`` and existing paths as given; a bare registry name as a registry reference:
    ``NAME`` -> ``models:/NAME@champion``, ``NAME@3`` -> ``models:/NAME/3``, ``NAME@ALIAS`` ->
    ``models:/NAME@ALIAS``."""
    text = str(model)
    match = REGISTRY_NAME.match(text)
    if text.startswith("models:/") or Path(text).exists() or not match:
        return text
    at = match["at"] or "champion"
    return f"models:/{match['name']}/{at}" if at.isdigit() else f"models:/{match['name']}@{at}"


def _load_served_model(model: str | Path, tracking_uri: str | None, quantized: bool) -> ServedModel:
    text = model_reference(model)
    if text != str(model):
        try:
            return _load_served_model(text, tracking_uri, quantized)
        except FedShieldError as exc:
            raise type(exc)(f"{exc} ({model} is no folder here, so it was read as the registry "
                            f"reference {text})") from None
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
    if export.get("pixel_shape"):  # served on images: this process applies the task's transform
        task = get_task(served.task, served.model)
        if task.pixel_module is None:
            raise ConfigError(f"{folder}/{EXPORT_JSON} says the model is served on images "
                              f"{export['pixel_shape']}, but task {served.task!r} registers no "
                              "image transform here; serve it with the fedshield version that "
                              "exported it")
        served.model_shape, served.input_shape = served.input_shape, tuple(export["pixel_shape"])
        served.transform = task.pixel_module().eval()
        served.input_range = export.get("pixel_range")
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


def accepted_range(input_range: dict | None) -> tuple[float, float, float, float] | None:
    """(evaluation min, max, lowest and highest value accepted without a warning), or None when
    the export records no usable range."""
    if not input_range:
        return None
    try:
        lo, hi = float(input_range["min"]), float(input_range["max"])
    except (KeyError, TypeError, ValueError):
        return None
    margin = RANGE_MARGIN * max(hi - lo, 1e-6)
    return lo, hi, lo - margin, hi + margin


def range_problem(x: np.ndarray, input_range: dict | None, preprocessing: str = "") -> str | None:
    """Why a batch looks unpreprocessed (far outside the evaluation range), or None."""
    bounds = accepted_range(input_range)
    if bounds is None or not x.size:
        return None
    lo, hi, low_ok, high_ok = bounds
    seen_lo, seen_hi = float(x.min()), float(x.max())
    if low_ok <= seen_lo and seen_hi <= high_ok:
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


# The docs pages are counted as "other": they are not traffic worth a label of their own.
KNOWN_PATHS = frozenset({"/health", "/metadata", "/predict", "/explain", "/metrics", "/drift"})


def path_label(path: str) -> str:
    """A bounded metrics label: the known routes, everything else "other" (a label per unknown
    URL would let any client grow the metrics without bound)."""
    return path if path in KNOWN_PATHS else "other"


class RequestMetrics:
    """Pure ASGI middleware: count, time and log every request (one access line each, under a
    request id echoed in ``x-request-id``)."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        """ASGI entry point: pass non-HTTP scopes through, count, time and log HTTP requests."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"")
        rid = request_id(given.decode("latin-1"))

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                took = (time.perf_counter() - start) * 1e3
                message["headers"] = [*message.get("headers", []),
                                      (b"server-timing", f"app;dur={took:.3f}".encode()),
                                      (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            took = time.perf_counter() - start
            self.metrics.observe_request(path_label(scope["path"]), status[0], took)
            client = scope.get("client") or ("-", 0)
            # The path as routed, never the query string (it may carry ?token=), never a body;
            # printable ASCII only, so a crafted path cannot forge a line of the text format.
            log_access(AccessRecord(scope["method"], header_safe(scope["path"], 200), status[0],
                                    round(took * 1e3, 3), str(client[0]), rid))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing what is wrong and where, without echoing the (possibly huge or non-finite)
    input."""
    errors = exc.errors()
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in errors[:ERRORS_SHOWN]]
    return JSONResponse({"detail": detail, "errors": len(errors)}, status_code=422)


TOKEN_HINT = "send the header 'Authorization: Bearer <token>'"
DOCS_TOKEN_HINT = (TOKEN_HINT + ", or in a browser open /docs?token=<token> (accepted on /docs "
                   "and /openapi.json only)")


def bearer_guard(token: str | None, query: bool = False) -> Callable:
    """A FastAPI dependency refusing requests without ``Authorization: Bearer TOKEN`` (no token:
    it accepts every request). ``query``: ``?token=TOKEN`` is accepted too (the docs pages, which
    a browser opens without headers; never /predict, whose URLs proxies log)."""
    expected = f"Bearer {token}".encode() if token else None
    # Declared for the OpenAPI document only (Swagger's "Authorize" button); checked below.
    scheme = HTTPBearer(auto_error=False, description="The serve --token value.")

    async def guard(request: Request, _: Annotated[Any, Security(scheme)] = None) -> None:
        # async: a sync dependency costs a thread hop
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if query and "token" in request.query_params:
            given = f"Bearer {request.query_params['token']}".encode()
        if not secrets.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token; "
                                     + (DOCS_TOKEN_HINT if query else TOKEN_HINT),
                                headers={"WWW-Authenticate": "Bearer"})
    return guard


class TriggerCooldown:
    """At most one retraining trigger per ``seconds``: drift that persists fires a trigger every
    ``patience`` windows, and each would start another fine-tuning run of the same drift."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds < 0:
            raise ConfigError(f"retraining cooldown is {seconds} s; pass 0 (none) or more")
        self.seconds, self.clock = seconds, clock
        self.last: float | None = None

    def remaining(self) -> float:
        """Seconds until a trigger may fire again (0: now)."""
        if self.last is None:
            return 0.0
        return max(0.0, self.seconds - (self.clock() - self.last))

    def fire(self) -> None:
        """A trigger fired now: the cooldown starts."""
        self.last = self.clock()


RECENT_WINDOWS = 50  # windows /drift returns (the full history is in --window-log)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of a batch of logits (the same numbers /predict and
    ``fedshield predict`` return)."""
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def create_app(model: str | Path | ServedModel, token: str | None = None,
               max_batch: int = DEFAULT_MAX_BATCH,
               max_body_bytes: int = DEFAULT_MAX_BODY, tracking_uri: str | None = None,
               quantized: bool = False,
               drift_window: int = 200, drift_threshold: float = 0.2, drift_patience: int = 3,
               window_log: str | Path | None = None,
               on_trigger: Callable[[RetrainTrigger], None] | None = None,
               budget_remaining: Callable[[], bool] | None = None,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, strict_inputs: bool = False,
               trigger_cooldown: float = 0.0) -> FastAPI:
    """The serving app. ``model``: a registry reference, a run or export folder, or a loaded model.

    ``strict_inputs``: refuse (422) batches far outside the evaluation input range instead of
    answering with an ``x-fedshield-input-warning`` header.

    Served batches feed a DriftMonitor when the export has a drift reference; each full window is
    logged (``fedshield.serving.drift``), appended to ``window_log`` (JSONL) and kept for
    ``GET /drift`` (read by ``fedshield monitor``). Retraining triggers go to ``on_trigger``, at
    most one per ``trigger_cooldown`` seconds (the others are logged as suppressed).
    """
    served = model if isinstance(model, ServedModel) else load_served_model(model, tracking_uri,
                                                                            quantized)
    metrics = ServingMetrics()
    lock = threading.Lock()
    torch_model = build_loaded_model(get_task(served.task, served.model),
                                     load_weights(served.folder / SAFETENSORS))
    if served.transform is not None:  # explanations over the pixels a user sent
        torch_model = torch.nn.Sequential(served.transform, torch_model).eval()
    is_image = len(served.input_shape) == 3
    PredictRequest, ExplainRequest = request_models(served.input_shape, max_batch, MAX_EXPLAIN)
    cooldown = TriggerCooldown(trigger_cooldown)
    seen = [0]  # examples fed to the monitor (the part of a window still filling is derived)
    monitor: DriftMonitor | None = None

    def on_window(report: WindowReport) -> None:
        """One full window: decide the trigger (cooldown), log it, count it, append it."""
        assert monitor is not None  # only the monitor calls this
        fired = suppressed = False
        if report.note.startswith("retraining triggered"):
            trigger, wait = monitor.triggers[-1], cooldown.remaining()
            if wait > 0:
                suppressed = True
                report.note = (f"retraining trigger suppressed by the cooldown ({wait:.0f} s "
                               f"left of {cooldown.seconds:g} s): {trigger.reason}")
            else:
                fired = True
                cooldown.fire()
        log_window(report, monitor.policy.statistic, monitor.policy.threshold,
                   monitor.policy.patience)
        if fired or suppressed:
            log_trigger(monitor.triggers[-1], fired, report.note)
        metrics.observe_window(report.scores, fired, suppressed)
        if window_log:
            with open(window_log, "a") as fh:
                fh.write(json.dumps(report.to_dict()) + "\n")
        if fired and on_trigger is not None:
            on_trigger(monitor.triggers[-1])

    if served.reference is not None:
        monitor = DriftMonitor(served.reference, drift_window, drift_threshold, drift_patience,
                               budget_remaining=budget_remaining, on_window=on_window)

    guard = [Depends(bearer_guard(token))]
    docs_guard = [Depends(bearer_guard(token, query=True))]
    app = FastAPI(title=f"fedshield model {served.name}", version=str(served.version),
                  description=API_DESCRIPTION, docs_url=None, redoc_url=None, openapi_url=None)
    # Starlette types handlers as taking any Exception; this one is registered for its subclass
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.state.served, app.state.monitor, app.state.metrics = served, monitor, metrics
    labels = {"name": served.name, "version": served.version, "task": served.task,
              "variant": "int8" if served.quantized else "fp32"}

    @app.get("/openapi.json", dependencies=docs_guard, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=docs_guard, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # The page fetches the schema from the browser, without headers: it passes the token on
        # in the query when it came that way (the same token, already in the address bar).
        given = request.query_params.get("token") if token else None
        url = "/openapi.json" + (f"?token={quote(given, safe='')}" if given else "")
        return get_swagger_ui_html(openapi_url=url, title=f"{app.title} - API docs")

    @app.get("/drift", dependencies=guard)
    async def drift() -> dict:
        """The drift monitor's state and its latest windows (``fedshield monitor URL``)."""
        out: dict[str, Any] = {"model": served.name, "version": served.version,
                               "monitoring": monitor is not None}
        if monitor is None:
            out["reason"] = "this export has no drift reference (export/reference.json)"
            return out
        with lock:
            reports = [r.to_dict() for r in monitor.reports[-RECENT_WINDOWS:]]
            windows = len(monitor.reports)
            buffered = seen[0] - windows * monitor.window
        return out | {"statistic": monitor.policy.statistic, "threshold": monitor.policy.threshold,
                      "patience": monitor.policy.patience, "window": monitor.window,
                      "buffered": buffered, "windows": windows,
                      "triggers": metrics.retrain_triggers,
                      "suppressed": metrics.suppressed_triggers,
                      "cooldown_s": cooldown.seconds, "recent": reports}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "version": served.version}

    @app.get("/metadata", dependencies=guard)
    async def metadata() -> dict:
        return {"model": served.name, "version": served.version, "variant": labels["variant"],
                "input_shape": list(served.input_shape), "num_classes": served.num_classes,
                # what the ONNX graph reads (differs when this process applies the transform)
                "model_input_shape": list(served.model_shape or served.input_shape),
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
            z, logits = served.logits(x)
        else:  # keep the event loop (and /health) responsive during big batches
            z, logits = await run_in_threadpool(served.logits, x)
        refuse_overflow(logits, "logits")  # finite float32 inputs can still overflow the logits
        classes = logits.argmax(1)
        metrics.observe_predictions(classes)
        if monitor is not None:
            with lock:
                seen[0] += len(x)
                monitor.observe(z, classes)  # the reference is over the model's inputs
        out: dict[str, Any] = {"predictions": classes.tolist(), "model_version": served.version}
        if probabilities:
            out["probabilities"] = softmax(logits).tolist()
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


def startup_info(served: ServedModel, host: str, port: int, token: str | None) -> StartupInfo:
    """What the start-up line says (the token's presence, never the token)."""
    url = base_url(host, port)
    return StartupInfo(url, served.name, str(served.version),
                       "int8" if served.quantized else "fp32", bool(token),
                       "loopback" if is_loopback(host) else "public",
                       url + "/docs" + ("?token=<token>" if token else ""))


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
          log_level: str = "info", log_format: str = "json", **app_options: Any) -> None:
    """Run the serving app under uvicorn (blocks); log a start-up line once the port is bound."""
    import uvicorn

    check_exposure(host, token)
    configure_logging(log_level, log_format)
    app = create_app(model, token=token, **app_options)
    # Idle keep-alive connections are closed after 5 s, headers and bodies that stall after
    # body_timeout (HeaderDeadline, BodyLimit).
    timeout = float(app_options.get("body_timeout", DEFAULT_BODY_TIMEOUT))
    # log_config=None: uvicorn keeps the handlers configure_logging installed; access_log=False:
    # RequestMetrics writes the one access line per request.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_keep_alive=5, http=header_deadline_protocol(timeout))

    class Announcing(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # the bound port: --port 0 picks a free one
                bound = self.servers[0].sockets[0].getsockname()[1]
                log_startup(startup_info(app.state.served, host, int(bound), token))

    Announcing(config).run()
