"""The FastAPI application: upstream's ``/api/jobs`` routes, ``/health`` and a tiny dashboard.

``create_app(settings)`` builds the app; its lifespan opens the flywheel DB and the log store,
marks jobs a dead process left running as failed (``recover_interrupted``) and starts the
embedded runner, so ``findistil serve`` is one process that both answers HTTP and runs jobs.
``BackgroundServer`` runs the app under uvicorn in a thread on a free local port: the
``findistil demo`` command and the tests drive the API over real HTTP through it.

Run it: ``findistil serve --port 8000`` then ``curl localhost:8000/api/jobs``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import uvicorn
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import findistil
from findistil.api.auth import TokenAuth
from findistil.api.deployments import router as deployments_router
from findistil.api.deps import DBDep, RunnerDep
from findistil.api.jobs import router as jobs_router
from findistil.api.logs import router as logs_router
from findistil.api.schemas import HealthResponse, openai_error_body
from findistil.config import Settings, load_settings
from findistil.errors import FindistilError

log = logging.getLogger(__name__)

# A job request is two ids and a handful of split fields (< 1 KiB); anything near this size
# is a mistake or abuse, and is refused before it is parsed.
MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed), on
    every method (a DELETE or GET may carry a body too)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, paths: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}  # path -> its own limit (POST /api/logs takes batches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"].rstrip("/"), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, send, limit)
            return
        # Read the (small) body here, counting, and replay it: a chunked body with no
        # Content-Length is limited too, and the app never sees a partial body.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(scope, send, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        message = f"Request body too large: the limit is {limit} bytes."
        v1 = scope["path"].startswith("/v1/")
        body = openai_error_body(message, "request_too_large") if v1 else {"detail": message}
        await JSONResponse(body, status_code=413)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


EXCERPT_CHARS = 80  # of a rejected value, in a 422 answer


def _excerpt(value: object) -> str:
    """A short, always-encodable rendering of a value a client sent."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field with an excerpt of what was sent, never the whole body (in
    OpenAI's shape under ``/v1``: the first error, ``param`` its field)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if request.url.path.startswith("/v1/") and errors:
        first = errors[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        got = f" (got {_excerpt(first['input'])})" if "input" in first else ""
        message = f"{param or 'body'}: {_excerpt(first.get('msg', ''))}{got}"
        more = f"; {len(errors) - 1} more errors" if len(errors) > 1 else ""
        return JSONResponse(openai_error_body(message + more, "invalid_value", param), 422)
    detail = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": _excerpt(e.get("msg", "")),
            "type": e.get("type", ""),
            **({"input": _excerpt(e["input"])} if "input" in e else {}),
        }
        for e in errors[:20]
    ]
    if len(errors) > 20:
        detail.append({"loc": [], "msg": f"{len(errors) - 20} more errors", "type": "more"})
    return JSONResponse({"detail": detail}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer, but in OpenAI's shape under ``/v1``, and a 405 lists every method of
    the path in ``Allow`` (Starlette names only the first route that matched the path)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_methods_of(request))
    if not request.url.path.startswith("/v1/"):
        return await http_exception_handler(
            request, StarletteHTTPException(exc.status_code, exc.detail, headers)
        )
    body = openai_error_body(str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _methods_of(request: Request) -> list[str]:
    return sorted(
        {
            method
            for route in request.app.router.routes
            if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE
            for method in route.methods or ()
        }
    )


def _findistil_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FindistilError)
    return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)


def create_app(settings: Settings | None = None, *, start_runner: bool = True) -> FastAPI:
    """The findistil API over ``settings`` (default: ``load_settings()``).

    ``start_runner=False`` serves the API without executing jobs (they stay queued in the
    DB for another process's runner).
    """
    resolved = settings or load_settings()
    app = FastAPI(
        title="findistil",
        version=findistil.__version__,
        description="Data flywheel jobs: upstream-compatible /api/jobs routes plus /health.",
        lifespan=_lifespan(resolved, start_runner),
    )
    _add_middleware(app, resolved)
    app.add_exception_handler(FindistilError, _findistil_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(jobs_router)
    app.include_router(logs_router)
    app.include_router(deployments_router)
    from findistil.api.openai import router as openai_router  # OpenAI-compatible serving

    app.include_router(openai_router)
    app.get("/health", response_model=HealthResponse, tags=["health"])(health)
    # the dashboard's files, from the installed package (offline: nothing from a CDN)
    app.mount("/static", StaticFiles(packages=[("findistil.api", "static")]), name="static")
    app.get("/", response_class=HTMLResponse, response_model=None, include_in_schema=False)(
        dashboard
    )
    return app


def _lifespan(resolved: Settings, start_runner: bool):
    """Open the DB, log store, artefact store, cache and runner on start; close them on exit."""
    from findistil.artifacts import ArtifactStore
    from findistil.flywheel import jobs as service
    from findistil.flywheel.db import open_flywheel_db
    from findistil.flywheel.graph import finish_job_if_done
    from findistil.flywheel.leases import LeaseKeeper
    from findistil.flywheel.runner import make_runner
    from findistil.logstore import open_logstore
    from findistil.students.cache import shared_cache

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The sync routes' thread pool: a few threads answer more requests than anyio's 40,
        # which fight over the GIL (bench/api_load.py: 2 threads 572 req/s on GET /api/jobs
        # at 200 clients, 8 threads 379, 40 threads 294). Model work has its own limiter.
        to_thread.current_default_thread_limiter().total_tokens = resolved.api_threads
        resolved.home.mkdir(parents=True, exist_ok=True)
        app.state.settings = resolved
        app.state.db = db = open_flywheel_db(resolved)
        app.state.store = open_logstore(resolved)
        app.state.artifacts = ArtifactStore(resolved.artifacts_root)
        app.state.student_cache = shared_cache(resolved.student_cache_size)
        from findistil.api.openai import model_batcher

        app.state.batcher = model_batcher(resolved, app.state.student_cache)
        recovered = service.recover_interrupted(db)
        if recovered:
            log.warning("marked %d interrupted job(s) as failed", recovered)
        app.state.runner = make_runner(resolved, db=db) if start_runner else None
        # Every live process reaps expired leases; a runner's keeper does it for the API.
        keeper = getattr(app.state.runner, "keeper", None)
        own_keeper = keeper is None
        if own_keeper:
            keeper = LeaseKeeper(
                db,
                timeout_s=resolved.lease_timeout_s,
                interval_s=resolved.heartbeat_s,
                runner="api",
                after_reap=lambda job_id: finish_job_if_done(db, job_id),
            )
        app.state.keeper = keeper
        if app.state.runner is not None:
            app.state.runner.start()
        if own_keeper:
            keeper.start()
        try:
            yield
        finally:
            if app.state.runner is not None:
                app.state.runner.stop(timeout=30)
            if own_keeper:
                keeper.stop()
            for resource in (app.state.db, app.state.store):
                close = getattr(resource, "close", None) or getattr(resource, "dispose", None)
                if close is not None:
                    close()

    return lifespan


def _add_middleware(app: FastAPI, resolved: Settings) -> None:
    """Starlette runs the last added outermost: CORS, then the Host check, then tokens, then
    the body limit (an unauthenticated upload is refused before it is read)."""
    logs = {"/api/logs": resolved.max_log_batch_bytes}
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES, paths=logs)
    app.add_middleware(TokenAuth, tokens=resolved.all_api_tokens())
    if resolved.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=resolved.trusted_hosts)
    if resolved.cors_origins:  # closed by default: no CORS headers, browsers refuse
        app.add_middleware(
            CORSMiddleware,
            allow_origins=resolved.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux ``/proc``; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def health(request: Request, db: DBDep, runner: RunnerDep) -> JSONResponse:
    """Is the database reachable and the runner alive? 200 when both, else 503."""
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # any driver error means "not reachable"
        database = f"unreachable: {type(exc).__name__}"
    runner_state = "disabled" if runner is None else ("alive" if runner.alive else "stopped")
    ok = database == "ok" and runner_state != "stopped"
    workers = []
    if database == "ok":
        from findistil.flywheel.leases import live_workers

        timeout = request.app.state.settings.lease_timeout_s
        workers = [w for w in live_workers(db, timeout) if w["runner"] != "api"]
    cache = getattr(request.app.state, "student_cache", None)
    batcher = getattr(request.app.state, "batcher", None)
    body = HealthResponse(
        status="ok" if ok else "degraded",
        database=database,
        runner=runner_state,
        runner_kind=getattr(runner, "kind", None),
        workers=workers,
        students=cache.describe() if cache is not None else [],
        rss_mb=_rss_mb(),
        serving=batcher.counts() if batcher is not None else {},
        version=findistil.__version__,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def dashboard() -> HTMLResponse:
    page = resources.files("findistil.api").joinpath("static/index.html")
    return HTMLResponse(page.read_text() if page.is_file() else "<p>findistil API</p>")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread; a context manager.

    Example::

        with BackgroundServer(create_app(settings)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="findistil-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the API server on {self.url} failed to start (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API server on {self.url} did not start in {timeout:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
