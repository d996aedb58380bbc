"""`sluice serve`: the OpenAI-compatible HTTP server and the processes behind it.

Topology (vLLM V1's): this process binds the port and spawns the engine core process; then
either serves HTTP itself or spawns `--api-server-count` API processes that share the port.
Every API process tokenizes and detokenizes; only the core process runs the model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

import sluice
from sluice.config import DEFAULT_MODEL, EngineConfig
from sluice.engine.arg_utils import engine_config, json_object
from sluice.engine.async_llm import AsyncLLM
from sluice.engine.core_proc import remove_address, start_engine_cores
from sluice.entrypoints.openai.anthropic import add_messages_routes
from sluice.entrypoints.openai.dashboard import add_dashboard_routes
from sluice.entrypoints.openai.engine_routes import add_engine_routes
from sluice.entrypoints.openai.lora_routes import (
    LoRARegistry,
    add_lora_args,
    add_lora_routes,
    check_lora_args,
    runtime_update_enabled,
)
from sluice.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    OpenAIModel,
    validation_error_to_api_error,
)
from sluice.entrypoints.openai.chat_template import CONTENT_FORMATS
from sluice.entrypoints.openai.connections import RateLimitedLoopErrors, read_deadline_protocol
from sluice.entrypoints.openai.serving import (
    DEFAULT_MAX_NUM_SEQS_PER_REQUEST,
    RETRY_AFTER_S,
    ChatOptions,
    OpenAIServing,
    api_error_from_exception,
)
from sluice.entrypoints.openai.reasoning import REASONING_PARSERS
from sluice.entrypoints.openai.pooling_routes import add_pooling_routes
from sluice.entrypoints.openai.responses import add_responses_routes
from sluice.entrypoints.openai.tool_calls import TOOL_PARSERS
from sluice.metrics.http import MULTIPROC_ENV, HttpMetrics, HttpMetricsMiddleware

logger = logging.getLogger("sluice")

ALWAYS_PUBLIC = ("/health", "/version")
PROBES = ("/health", "/version", "/metrics")  # answered even beyond --limit-concurrency
BODY_METHODS = ("POST", "PUT", "PATCH")
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, passed on to the request's span
ENGINE_DEAD_EXIT_DELAY_S = 1.0  # lets the 5xx answers of in-flight requests reach their clients


# ---- the HTTP app -------------------------------------------------------------------------
class ServerState:
    """What the gatekeeper and the routes share in one API process."""

    def __init__(self, engine: AsyncLLM, serving: OpenAIServing, api_keys: list[str], public_paths: set[str],
                 request_id_headers: bool = False, root_path: str = "") -> None:
        self.engine = engine
        self.request_id_headers = request_id_headers  # --enable-request-id-headers
        self.serving = serving
        self.api_keys = [key.encode() for key in api_keys]
        self.public_paths = public_paths
        self.root_path = root_path.rstrip("/")
        self.draining = False
        self.http_metrics = HttpMetrics()

    def route_path(self, scope: dict) -> str:
        """The path the routes see: a --root-path prefix, when the proxy kept it, comes off."""
        path = scope["path"]
        if self.root_path and (path == self.root_path or path.startswith(self.root_path + "/")):
            return path[len(self.root_path):] or "/"
        return path

    def authorized(self, scope: dict) -> bool:
        if not self.api_keys or self.route_path(scope) in self.public_paths:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"x-api-key", b"")  # how Anthropic's clients send the key
            if not token:
                return False
        # Compare with every key, constant time each, so timing reveals neither key nor match.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.api_keys]
        return any(matches)

    async def health(self) -> Response:
        if not self.engine.alive:
            return error_response(APIError(f"the engine core is dead: {self.engine.client.dead_reason}", 503))
        return Response(status_code=200)


class Gatekeeper:
    """ASGI middleware: 503 while draining, 401 without a valid key (deny by default).

    Pure ASGI rather than BaseHTTPMiddleware, which would break disconnect detection of streams.
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            if self.state.draining:
                error = APIError("the server is shutting down", 503, headers={"Retry-After": str(RETRY_AFTER_S)})
                return await error_response(error)(scope, receive, send)
            if not self.state.authorized(scope):
                error = APIError("missing or invalid API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                                 401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests in progress in this API process; beyond it a 503
    at once, so an overloaded server sheds load instead of queueing connections. Probes are
    exempt, so an orchestrator still sees a live server."""

    def __init__(self, app, limit: int | None) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.limit is None or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        if self.in_progress >= self.limit:
            error = APIError(f"the server is at its limit of {self.limit} concurrent requests "
                             "(--limit-concurrency); retry later", 503, code="concurrency_limit",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
            return await error_response(error)(scope, receive, send)
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class BodyGuard:
    """ASGI middleware: reads a request body in full before the app sees it, refusing it (413)
    as soon as it passes `max_bytes` (at once when Content-Length says so), and a body that is
    not JSON (415), all before any parsing."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self.too_large(f"{int(declared)} bytes"))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await error_response(self.too_large(f"more than {self.max_bytes} bytes"))(scope, receive, send)
            if not message.get("more_body", False):
                break
        content_type = headers.get("content-type")
        if size and content_type and not is_json_media_type(content_type):
            error = APIError(f"Content-Type must be application/json, got {content_type!r}", 415)
            return await error_response(error)(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def too_large(self, size: str) -> APIError:
        return APIError(f"the request body has {size}; this server takes at most {self.max_bytes} "
                        "(--max-request-body-bytes)", 413)


def is_json_media_type(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def as_api_error(exc: Exception) -> APIError:
    """Engine-side failures in OpenAI's error shape; anything unexpected is a real 500."""
    error = api_error_from_exception(exc)
    if error is None:
        logger.error("internal error", exc_info=exc)
        error = APIError(f"internal server error: {type(exc).__name__}", 500)
    return error


async def run_until_disconnect(request: Request, work) -> Response:
    """Run `work`, cancelling it if the client goes away first (that aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return task.result()


def build_app(state: ServerState, args: argparse.Namespace | None = None) -> FastAPI:
    docs = not (args and args.disable_fastapi_docs)
    app = FastAPI(title="sluice", version=sluice.__version__, openapi_url="/openapi.json" if docs else None,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.root_path = state.root_path  # routes answer with and without the prefix
    app.state.sluice = state
    serving = state.serving

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_to_api_error(exc))

    @app.exception_handler(APIError)
    async def _refused(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(http_exception_to_api_error(exc, request))

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    async def respond(request: Request, produce, request_id: str = "") -> Response:
        """request_id: answered as X-Request-Id with --enable-request-id-headers."""
        async def work() -> Response:
            try:
                result = await produce
            except Exception as exc:
                return error_response(as_api_error(exc))
            if isinstance(result, dict):
                response = JSONResponse(result)
            else:
                response = StreamingResponse(result, media_type="text/event-stream")
            if state.request_id_headers:
                response.headers["X-Request-Id"] = request_id
            return response

        return await run_until_disconnect(request, work())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request_id = base_request_id(body, request)
        return await respond(request, serving.chat(body, trace_headers(request), request_id), request_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        request_id = base_request_id(body, request)
        return await respond(request, serving.completions(body, trace_headers(request), request_id), request_id)

    @app.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return serving.model(model)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        return await respond(request, serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        return await respond(request, serving.detokenize(body))

    @app.get("/health")
    async def health() -> Response:
        return await state.health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": sluice.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await state.engine.metrics_text() + state.http_metrics.render()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    add_engine_routes(app, state, respond, trace_headers, bool(args and args.enable_sleep_mode))
    add_responses_routes(app, serving, respond, trace_headers)
    add_messages_routes(app, serving, respond, trace_headers)
    add_pooling_routes(app, serving, respond)
    if not (args and args.disable_dashboard):
        add_dashboard_routes(app, state)
    if serving.lora is not None and args is not None and runtime_update_enabled(args):
        add_lora_routes(app, serving.lora)
    return app


def http_exception_to_api_error(exc: HTTPException, request: Request) -> APIError:
    """Routing and body-parsing failures (404, 405, undecodable bodies) in OpenAI's shape, saying
    what was wrong where FastAPI's own detail does not."""
    cause = exc.__cause__
    message = str(exc.detail)
    if isinstance(cause, UnicodeDecodeError):
        message = f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        message = "the request body's JSON is nested too deeply"
    elif exc.status_code == 404:
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    return APIError(message, exc.status_code, headers=exc.headers)


def base_request_id(body: ChatCompletionRequest | CompletionRequest, request: Request) -> str:
    """The caller's X-Request-Id, else the body's request_id, else a new one (vLLM's order); the
    response id is it with a `chatcmpl-` / `cmpl-` prefix."""
    return request.headers.get("X-Request-Id") or body.request_id or uuid.uuid4().hex


def trace_headers(request: Request) -> dict[str, str] | None:
    """The W3C trace context a client sent, so the request's span joins its trace."""
    found = {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
    return found or None


# ---- one API process ------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains: new requests get 503, in-flight ones get up
    to `shutdown_timeout` s, then the rest are aborted. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Unlike uvicorn's, never re-raises the signal afterwards: a drained server exits 0.
        if self.state.draining or self.loop is None:
            self.force_exit = self.should_exit = True
            return
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        engine = self.state.engine
        logger.info("shutting down: waiting up to %.0f s for %d requests", self.shutdown_timeout, engine.num_in_flight)
        deadline = time.monotonic() + self.shutdown_timeout
        while engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            logger.warning("aborting %d requests still running after %.0f s", engine.num_in_flight, self.shutdown_timeout)
            engine.abort_all()
            deadline = time.monotonic() + 5
            while engine.num_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True

    async def exit_when_engine_dies(self) -> None:
        while self.state.engine.alive:
            await asyncio.sleep(0.1)
        await asyncio.sleep(ENGINE_DEAD_EXIT_DELAY_S)
        logger.error("exiting: the engine core is dead")
        self.exit_code = 1
        self.should_exit = True


class AccessLogFilter(logging.Filter):
    def __init__(self, paths: set[str]) -> None:
        super().__init__()
        self.paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        path = args[2] if isinstance(args, tuple) and len(args) >= 3 else ""
        return str(path).split("?", 1)[0] not in self.paths


async def serve_http(args: argparse.Namespace, cores: list[tuple[str, int]], sock: socket.socket) -> int:
    """Run one API process until shutdown; returns its exit code. cores: (address, pid) of each engine core."""
    engine = await AsyncLLM.connect(engine_config(args), cores)
    chat = ChatOptions(
        chat_template=read_chat_template(args), content_format=args.chat_template_content_format,
        response_role=args.response_role, default_template_kwargs=args.default_chat_template_kwargs or {},
        tool_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
    )
    serving = OpenAIServing(
        engine, served_model_names(args), max_n=args.max_n_sequences, chat=chat,
        log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
        force_include_usage=args.enable_force_include_usage, prompt_tokens_details=args.enable_prompt_tokens_details,
        max_num_seqs_per_request=args.max_num_seqs_per_request, max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens,
    )
    if args.enable_lora:
        serving.lora = LoRARegistry(engine, serving.served_model_names[0], args.lora_allowed_dirs)
        await serving.lora.add_modules(args.lora_modules or [])
    OpenAIModel.strict_fields = args.strict_request_fields
    public = set(ALWAYS_PUBLIC) | set(split_list(args.public_endpoints))
    state = ServerState(engine, serving, api_keys(args), public, args.enable_request_id_headers, args.root_path)
    max_body = args.max_request_body_bytes or default_max_request_body_bytes(engine.input_processor.max_prompt_chars)
    app = BodyGuard(build_app(state, args), max_body)
    # CORS outside the gatekeeper: a browser's preflight carries no API key.
    app = cors(Gatekeeper(ConcurrencyLimit(app, args.limit_concurrency), state), args)
    config = uvicorn.Config(
        HttpMetricsMiddleware(app, state.http_metrics), log_level=args.uvicorn_log_level,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs, timeout_graceful_shutdown=5, timeout_keep_alive=args.timeout_keep_alive,
        http=read_deadline_protocol(args.timeout_request_read), access_log=not args.disable_uvicorn_access_log,
    )
    asyncio.get_running_loop().set_exception_handler(RateLimitedLoopErrors())
    logger.info("HTTP limits: request bodies up to %d bytes, %s s to send a request, %s s keep-alive, %s concurrent "
                "requests", max_body, args.timeout_request_read, args.timeout_keep_alive,
                args.limit_concurrency or "unlimited")
    quiet = set(split_list(args.disable_access_log_for_endpoints))
    if quiet:
        logging.getLogger("uvicorn.access").addFilter(AccessLogFilter(quiet))
    server = DrainingServer(config, state, args.shutdown_timeout)
    server.loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(server.exit_when_engine_dies())
    logger.info("serving %s on %s", ", ".join(serving.served_model_names), listening_on(args, sock))
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        engine.close()
    return server.exit_code


def default_max_request_body_bytes(max_prompt_chars: int) -> int:
    """Room for the longest prompt that can fit max_model_len, every character escaped as JSON's
    six-byte \\uXXXX, plus 1 MiB for the rest of the body (messages, tools, schemas)."""
    return 6 * max_prompt_chars + (1 << 20)


def run_api_process(args: argparse.Namespace, cores: list[tuple[str, int]], sock: socket.socket) -> None:
    """Entry point of each of the --api-server-count processes."""
    configure_logging()
    raise SystemExit(asyncio.run(serve_http(args, cores, sock)))


# ---- the launcher ---------------------------------------------------------------------------
def run_server(args: argparse.Namespace, config: EngineConfig) -> int:
    """Bind, start the core, serve; returns the exit code (non-zero if the core died)."""
    sock = bind_unix_socket(args.uds) if args.uds else bind_socket(args.host, args.port)
    started = start_engine_cores(config)
    cores = [(address, process.pid) for process, address in started]
    try:
        if args.api_server_count == 1:
            return asyncio.run(serve_http(args, cores, sock))
        return run_api_processes(args, cores, sock)
    finally:
        for process, address in started:
            process.terminate()
        for process, address in started:
            process.join(10)
            if process.is_alive():
                process.kill()
            remove_address(address)
        if args.uds:
            with contextlib.suppress(OSError):
                os.unlink(args.uds)


def run_api_processes(args: argparse.Namespace, cores: list[tuple[str, int]], sock: socket.socket) -> int:
    """Spawn the API processes, sharing one folder for their HTTP metrics (the core's are its own)."""
    if os.environ.get(MULTIPROC_ENV):
        return _run_api_processes(args, cores, sock)
    folder = tempfile.mkdtemp(prefix="sluice-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        return _run_api_processes(args, cores, sock)
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def _run_api_processes(args: argparse.Namespace, cores: list[tuple[str, int]], sock: socket.socket) -> int:
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=run_api_process, args=(args, cores, sock), name=f"sluice-api-{i}")
        for i in range(args.api_server_count)
    ]
    for worker in workers:
        worker.start()

    def forward(sig: int, frame) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C already reaches each worker directly
    while any(w.is_alive() for w in workers):
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=1.0)
        if any(w.exitcode not in (None, 0) for w in workers):
            forward(signal.SIGTERM, None)  # one failed: take the rest down so the orchestrator restarts us
    return max(abs(w.exitcode or 0) for w in workers)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_unix_socket(path: str) -> socket.socket:
    """--uds: listen on a Unix domain socket instead of TCP (a stale socket file is replaced)."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise SystemExit(f"--uds {path}: exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def listening_on(args: argparse.Namespace, sock: socket.socket) -> str:
    if args.uds:
        return f"unix:{args.uds}"
    scheme = "https" if args.ssl_certfile else "http"
    return f"{scheme}://{args.host}:{sock.getsockname()[1]}{args.root_path}"


def cors(app, args: argparse.Namespace):
    """FastAPI's CORSMiddleware when --allowed-origins names any origin; else no CORS headers at
    all, so browsers refuse cross-origin calls (and preflights get no special answer)."""
    origins = json_or_split(args.allowed_origins)
    if not origins:
        return app
    return CORSMiddleware(app, allow_origins=origins, allow_methods=json_or_split(args.allowed_methods),
                          allow_headers=json_or_split(args.allowed_headers), allow_credentials=args.allow_credentials)


# ---- flags -------------------------------------------------------------------------------
def json_or_split(value: str | None) -> list[str]:
    """vLLM's CORS flags take a JSON list ('["*"]'); a plain 'a,b' works too."""
    if not value:
        return []
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except ValueError as exc:
            raise SystemExit(f"not a JSON list: {value!r} ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise SystemExit(f"expected a JSON list of strings, got {value!r}")
        return items
    return split_list([value])


def split_list(values: list[str] | None) -> list[str]:
    """Flags that take 'a,b' or several values or both."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = split_list(args.api_key)
    if not keys and os.environ.get("SLUICE_API_KEY"):
        keys = split_list([os.environ["SLUICE_API_KEY"]])
    return keys


def served_model_names(args: argparse.Namespace) -> list[str]:
    return args.served_model_name or [args.model or DEFAULT_MODEL]


def read_chat_template(args: argparse.Namespace) -> str | None:
    """--chat-template takes a file path or the template text itself."""
    template = args.chat_template
    if template and os.path.isfile(template):
        with open(template) as f:
            return f.read()
    return template


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `sluice serve` beyond the engine's; vLLM's spellings where vLLM has them."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health and /version; "
                            "repeat or comma-separate for several keys (default: $SLUICE_API_KEY)")
    group.add_argument("--public-endpoints", action="append", default=None, metavar="PATHS",
                       help="comma-separated paths that need no API key besides /health and /version, e.g. /metrics")
    group.add_argument("--ssl-keyfile", default=None, help="TLS private key file (PEM)")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file (PEM); enables https")
    group.add_argument("--ssl-ca-certs", default=None, help="CA bundle for verifying client certificates")
    group.add_argument("--ssl-cert-reqs", type=int, default=0,
                       help="client certificate policy: 0 none, 1 optional, 2 required (ssl.CERT_*)")
    group.add_argument("--chat-template", default=None, help="chat template file or text (default: the model's)")
    group.add_argument("--max-n-sequences", type=int, default=16, help="largest n (completions per request) accepted")
    group.add_argument("--enable-log-requests", action="store_true",
                       help="log each request's parameters and prompt (cut at --max-log-len)")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="characters of prompt logged with --enable-log-requests (default: all)")
    group.add_argument("--disable-access-log-for-endpoints", action="append", default=None, metavar="PATHS",
                       help="comma-separated paths left out of the access log, e.g. /health,/metrics")
    group.add_argument("--disable-dashboard", action="store_true",
                       help="leave out /dashboard, the live engine page (behind the API key like other routes)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may run after SIGTERM/SIGINT before they are aborted")
    group.add_argument("--api-server-count", type=int, default=1, help="API processes sharing the port and one engine core")
    group.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    group.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help='how tool calls are found in output for tool_choice "auto": hermes (<tool_call> blocks) '
                            'or json (the output is the call); without it "auto" is refused')
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM compatibility: --tool-call-parser alone enables tool_choice \"auto\"")
    group.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                       help='leave tools out of the chat template when tool_choice is "none"')
    # vLLM launch flags with nothing (yet) behind them, so that copied launch lines start or fail clearly.
    group.add_argument("--disable-log-requests", action="store_true",
                       help="accepted (vLLM's older spelling): requests are logged only with --enable-log-requests")
    # limits: no client, with or without a key, can stall or exhaust the server
    group.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open between requests")
    group.add_argument("--timeout-request-read", type=float, default=30.0,
                       help="seconds a client has, from connecting or from the end of the previous response, to send "
                            "a whole request (headers and body); slower connections are closed")
    group.add_argument("--limit-concurrency", type=int, default=None,
                       help="requests in progress per API process beyond which new ones get a 503 at once "
                            "(/health, /version and /metrics are exempt; default: no limit)")
    group.add_argument("--max-request-body-bytes", type=int, default=None,
                       help="largest request body (413 beyond it, refused while reading); default: room for "
                            "max_model_len tokens of text, JSON-escaped, plus 1 MiB")
    group.add_argument("--max-num-seqs-per-request", type=int, default=DEFAULT_MAX_NUM_SEQS_PER_REQUEST,
                       help="most sequences (prompts x n) one request may ask for (400 beyond it)")
    add_request_args(parser)
    add_lora_args(parser)


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """How request bodies are read and answered (vLLM's flags)."""
    group = parser.add_argument_group("requests")
    group.add_argument("--strict-request-fields", action="store_true",
                       help="refuse unknown request fields with a 400 naming them (default: accepted, a warning "
                            "logged once per field name, as vLLM does)")
    group.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                       help="how message content reaches the chat template: 'string' (text parts joined), "
                            "'openai' (a list of parts), or 'auto' (read from the template)")
    group.add_argument("--response-role", default="assistant",
                       help="the role of generated messages when add_generation_prompt is true")
    group.add_argument("--default-chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                       help='chat template arguments for every request, e.g. \'{"enable_thinking": false}\'; '
                            "a request's chat_template_kwargs override them")
    group.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split <think> output into reasoning_content (deepseek_r1, qwen3)")
    group.add_argument("--enable-request-id-headers", action="store_true",
                       help="answer with an X-Request-Id header (the caller's, else the response id)")
    group.add_argument("--enable-force-include-usage", action="store_true",
                       help="send usage on every stream, as if stream_options.include_usage were true")
    group.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details.cached_tokens (prefix-cache hits)")

    group = parser.add_argument_group("server: HTTP surface")
    group.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                       help='origins allowed cross-origin calls, a JSON list (\'["https://app.example"]\', '
                            '\'["*"]\') or comma-separated (default: none, no cross-origin access)')
    group.add_argument("--allowed-methods", default='["*"]', metavar="METHODS",
                       help="HTTP methods allowed cross-origin (with --allowed-origins)")
    group.add_argument("--allowed-headers", default='["*"]', metavar="HEADERS",
                       help="request headers allowed cross-origin (with --allowed-origins)")
    group.add_argument("--allow-credentials", action="store_true",
                       help="let cross-origin calls carry credentials (cookies, Authorization)")
    group.add_argument("--root-path", default="", metavar="PATH",
                       help="path prefix the server is mounted under behind a proxy, e.g. /llm; routes "
                            "answer with and without it")
    group.add_argument("--uds", default=None, metavar="PATH",
                       help="serve on this Unix domain socket instead of --host/--port")
    group.add_argument("--disable-uvicorn-access-log", action="store_true", help="no per-request access log lines")
    group.add_argument("--disable-fastapi-docs", action="store_true",
                       help="no /docs, /redoc or /openapi.json")
    group.add_argument("--enable-sleep-mode", action="store_true",
                       help="add POST /sleep, POST /wake_up and GET /is_sleeping: an idle engine gives its "
                            "memory back (weights to a disk-backed file, KV cache dropped) until woken")


def check_server_args(args: argparse.Namespace) -> None:
    check_lora_args(args)
    if args.disable_log_requests and args.enable_log_requests:
        raise SystemExit("--disable-log-requests and --enable-log-requests contradict each other; give one")
    if args.api_server_count < 1:
        raise SystemExit(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.max_n_sequences < 1:
        raise SystemExit(f"--max-n-sequences must be >= 1, got {args.max_n_sequences}")
    if args.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for flag in ("timeout_keep_alive", "timeout_request_read", "limit_concurrency", "max_request_body_bytes",
                 "max_num_seqs_per_request"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.root_path and not args.root_path.startswith("/"):
        raise SystemExit(f"--root-path must start with '/', got {args.root_path!r}")
    if args.uds and args.ssl_certfile:
        raise SystemExit("--uds serves plain HTTP on a local socket; leave out --ssl-certfile")
    for flag in ("allowed_origins", "allowed_methods", "allowed_headers"):
        json_or_split(getattr(args, flag))  # exits naming the bad value
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise SystemExit("--ssl-keyfile and --ssl-certfile must be given together")
    for path in (args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs):
        if path and not os.path.isfile(path):
            raise SystemExit(f"TLS file not found: {path}")


if __name__ == "__main__":  # `python -m sluice.entrypoints.openai.api_server MODEL [flags]`, like vLLM's module
    from sluice.entrypoints.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
