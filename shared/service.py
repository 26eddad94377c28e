"""What every service process has: settings, its database, the directory, the bus, and the HTTP basics
(bearer-token auth, /healthz, /readyz, /metrics, list pagination). Each service's app.py builds one."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from faststream.redis.prometheus import RedisPrometheusMiddleware
from faststream.specification import AsyncAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlmodel import col, select

from shared import openapi
from shared.db import Database, OutboxMessage
from shared.directory import Directory, User, load_directory
from shared.edges import EdgeGuard, UnexpectedErrors, route_of
from shared.events import utcnow
from shared.logs import EventLogContext
from shared.messaging import Bus
from shared.migrations import check_current
from shared.openapi import error_responses  # noqa: F401 - routes declare their own statuses (409) with it
from shared.people import access_log_rule
from shared.personal_data import PersonalData
from shared.retention import PurgeReport, PurgeRule, purge_daily, run_purge, technical_rules
from shared.settings import ServiceName, Settings, weak_secret

log = logging.getLogger("relais.service")
http_log = logging.getLogger("relais.http")

INTERNAL_USER_ID = "relais-internal"  # the services' own credential, when no person is named as the actor
ACTOR_HEADER = "X-Relais-Actor"  # with the internal credential: the ops user on whose behalf a service calls
QUIET_PATHS = ("/metrics", "/healthz", "/readyz", "/static/")  # probes and assets: not logged per request


def internal_token(settings: Settings) -> str:
    """The bearer token one service uses to call another's ops API: RELAIS_INTERNAL_TOKEN when set, else derived
    from the shared secret key with a purpose string of its own (so it changes when the key does). Accepted as
    role ops by `Service.require`, only when `internal_token_refused` finds nothing to object."""
    if settings.internal_token:
        return settings.internal_token
    return hmac.new(settings.signing_key.encode(), b"relais-internal-ops", hashlib.sha256).hexdigest()


def internal_token_refused(settings: Settings) -> str | None:
    """Why the internal credential is not accepted, or None: a key (or token) anyone could know would let anyone
    compute it. A key generated into the data dir is only for the demo; production sets its own."""
    if settings.internal_token:
        why = weak_secret(settings.internal_token)
        return f"RELAIS_INTERNAL_TOKEN {why}" if why else None
    if settings.secret_key is None:
        return None if settings.demo else "RELAIS_SECRET_KEY is not set (outside the demo)"
    why = weak_secret(settings.secret_key)
    return f"RELAIS_SECRET_KEY {why}" if why else None


class RequestMeasure:
    """Counts, times and logs each HTTP request (`relais_http_requests`, `relais_http_request_seconds`, one
    `relais.http` line, under EdgeGuard's correlation id). Plain ASGI, not Starlette's BaseHTTPMiddleware: that one
    runs the rest of the app in a task group fed through memory streams, a few percent of intake's CPU per request
    (docs/benchmarks.md)."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, answered = time.perf_counter(), False

        async def send_seen(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":  # measured when the answer starts, as it is sent
                answered = True
                self.measured(scope, message["status"], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            if not answered:  # UnexpectedErrors answers an error itself: only a request torn down mid-way
                self.measured(scope, 500, time.perf_counter() - start)

    def measured(self, scope, status: int, elapsed: float) -> None:
        path: str = scope["path"]
        route = route_of(scope)  # the template: no token in it
        if route != "unmatched" and path.startswith("/api/v1/"):
            route = "/api/v1" + route  # FastAPI keeps an included router's paths without its prefix: put it back
        service = self.service
        service.http_requests.labels(service.name, scope["method"], route, status).inc()
        service.http_seconds.labels(service.name, route).observe(elapsed)
        if not path.startswith(QUIET_PATHS):
            http_log.info("%s %s %s", scope["method"], route, status, extra={"duration_ms": round(elapsed * 1000, 1)})


class Service:
    def __init__(
        self, name: ServiceName, settings: Settings, tables: list, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.name, self.settings, self.clock = name, settings, clock
        self.directory: Directory = load_directory(settings.directory)
        self.db = Database(settings.database_url(name), tables)
        self.bus = Bus(
            settings,
            name,
            self.db,
            lambda: self.directory.retention.technical_rows or settings.technical_retention,
        )
        # The retention purge's registry: the technical rows here, the service's own rules added by its bootstrap.
        self.purge_rules: list[PurgeRule] = [
            *technical_rules(timedelta(seconds=settings.stream_max_age_s)),
            access_log_rule(),  # every service keeps one (shared.people)
        ]
        self.personal_data = PersonalData(settings)  # the persons' data keys: seal and open need.recorded
        self.background: list[Callable[[], Any]] = []  # coroutine functions run for the app's lifetime
        self.on_scrape: list[Callable[[], Any]] = []  # update gauges before /metrics answers (sync or async)
        self.openapi_refiners: list[Callable[[dict], None]] = []  # what the OpenAPI document learns from the directory
        self.metrics = CollectorRegistry()
        # Messages consumed and failed per stream (faststream_received_*), innermost: it sees the handler's
        # exceptions before ReliableDelivery turns them into a retry or a dead letter. The log context is
        # outermost, so ReliableDelivery's own log lines carry the event's need and correlation ids too.
        self.bus.broker.add_middleware(RedisPrometheusMiddleware(registry=self.metrics, app_name=name))
        self.bus.broker.insert_middleware(EventLogContext)
        self.http_requests = Counter(
            "relais_http_requests", "HTTP requests", ["service", "method", "route", "status"], registry=self.metrics
        )
        self.http_seconds = Histogram(
            "relais_http_request_seconds", "HTTP request duration", ["service", "route"], registry=self.metrics
        )
        if refused := internal_token_refused(settings):
            log.warning(
                "%s: the services' internal ops credential is refused: %s; the dashboard cannot read the other "
                "services' figures until it is fixed (see docs/security.md)",
                name,
                refused,
            )
        self.internal_token_ok = refused is None
        self.background.append(
            partial(purge_daily, name, lambda now: self.purge(now), lambda: self.directory, self.clock)
        )
        self.outbox_backlog = Gauge(
            "relais_outbox_backlog", "Events committed but not yet published", ["service"], registry=self.metrics
        )

    def purge(self, now: datetime | None = None, *, dry_run: bool = False) -> PurgeReport:
        """Run the retention purge now (the daily loop and `relais purge` call it); see shared/retention.py."""
        return run_purge(
            self.db,
            self.name,
            self.purge_rules,
            self.directory,
            now or self.clock(),
            technical_fallback=self.settings.technical_retention,
            dry_run=dry_run,
        )

    def reload_directory(self) -> None:
        """SIGHUP: load the directory again; a bad file keeps the old one (and says why in the log)."""
        try:
            self.directory = load_directory(self.settings.directory)
            log.info("%s: directory reloaded from %s", self.name, self.settings.directory)
        except Exception as exc:  # noqa: BLE001
            log.error("%s: directory NOT reloaded, keeping the previous one: %s", self.name, exc)

    def asyncapi(self) -> dict:
        # FastStream 0.7's AsyncAPI is a factory: the document is its to_specification().
        spec = AsyncAPI(self.bus.broker, title=f"Relais {self.name} events", version="1.0.0").to_specification()
        return spec.to_jsonable()

    # --- auth ---

    def caller(self, credentials: HTTPAuthorizationCredentials | None, actor: str | None = None) -> User:
        if (
            credentials
            and self.internal_token_ok
            and hmac.compare_digest(credentials.credentials.encode(), internal_token(self.settings).encode())
        ):
            return self.internal_caller(actor)
        user = self.directory.user_by_token(credentials.credentials) if credentials else None
        if user is None:
            raise HTTPException(401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return user

    def require(self, *roles: str) -> Callable[..., Awaitable[User]]:
        """A dependency giving the signed-in user, 401 without a known token, 403 when their role may not call."""

        async def dependency(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
        ) -> User:
            user = self.caller(credentials, request.headers.get(ACTOR_HEADER))
            if user.role not in roles:
                raise HTTPException(403, f"role {user.role} may not do this")
            return user

        return dependency

    def internal_caller(self, actor: str | None) -> User:
        """Another Relais service, acting for the ops user it names (recorded as the actor) or for itself."""
        named = self.directory.user(actor) if actor else None
        if named is not None and named.role == "ops":
            return named
        return User(id=INTERNAL_USER_ID, role="ops")

    def outbox_state(self) -> dict:
        """How many events wait in this service's outbox, and since when."""
        with self.db.transaction() as session:
            count, oldest = session.exec(
                select(sa.func.count(), sa.func.min(OutboxMessage.created_at)).where(
                    col(OutboxMessage.published_at).is_(None)
                )
            ).one()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=utcnow().tzinfo)  # SQLite's aggregate skips the column type
        age = (utcnow() - oldest).total_seconds() if oldest else None
        return {"service": self.name, "backlog": count, "oldest_at": oldest, "oldest_age_seconds": age}

    # --- the FastAPI app ---

    def create_app(self, *routers, title: str, pages: Sequence[APIRouter] = ()) -> FastAPI:
        """`routers` are JSON APIs, mounted under /api/v1; `pages` are web pages (shared.pages), mounted at the root
        with /static."""

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            # `relais migrate` runs before start; an empty database (first start, tests) is migrated here.
            check_current(self.name, self.db.engine, self.db.url)
            await self.bus.start()
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tasks:
                    for run in self.background:
                        tasks.start_soon(run)
                    _on_sighup(self.reload_directory)
                    try:
                        yield
                    finally:
                        tasks.cancel_scope.cancel()
                        scope.cancel()
            await self.bus.stop()
            self.db.dispose()

        app = FastAPI(title=title, version="1.0.0", lifespan=lifespan)
        from shared import sessions

        for router in (*routers, self.ops_router(), sessions.api_router(self)):
            app.include_router(router, prefix="/api/v1")
        openapi.install(app, self.openapi_refiners)
        self._openapi_follows_directory(app)
        if pages:
            from shared.pages import mount

            mount(app, pages, self)

        app.add_middleware(UnexpectedErrors)  # innermost: next to the routes

        app.add_middleware(RequestMeasure, service=self)
        app.add_middleware(EdgeGuard, routes=lambda: app.routes)  # outermost: refuses before anything reads

        @app.exception_handler(RequestValidationError)
        async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
            # FastAPI decodes a JSON body before it runs the route's dependencies: without this, a malformed body
            # sent with no token (or an unknown one) got 422 where the contract says 401.
            if request.url.path.startswith("/api/v1/") and any(e.get("type") == "json_invalid" for e in exc.errors()):
                try:
                    self.caller(await _bearer(request), request.headers.get(ACTOR_HEADER))
                except HTTPException as denied:
                    return JSONResponse(
                        {"detail": denied.detail}, status_code=denied.status_code, headers=denied.headers
                    )
            return await request_validation_exception_handler(request, exc)

        @app.get("/healthz", include_in_schema=False)
        def healthz() -> dict:
            return {"status": "ok", "service": self.name}

        @app.get("/readyz", include_in_schema=False)
        async def readyz() -> JSONResponse:
            problems = {}
            try:
                await anyio.to_thread.run_sync(self.db.ping)
            except Exception as exc:  # noqa: BLE001
                problems["database"] = str(exc)
            try:
                await self.bus.redis_client.ping()
            except Exception as exc:  # noqa: BLE001
                problems["redis"] = str(exc)
            if stopped := self.bus.stopped_subscribers():  # the bus restarts them when it can (Bus.heal)
                problems["subscribers"] = "stopped: " + ", ".join(stopped)
            if problems:
                return JSONResponse({"status": "unavailable", "detail": problems}, status_code=503)
            return JSONResponse({"status": "ready", "service": self.name})

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            self.outbox_backlog.labels(self.name).set(await anyio.to_thread.run_sync(self.db.outbox_backlog))
            for update in self.on_scrape:
                try:
                    if inspect.iscoroutinefunction(update):
                        await update()
                    else:
                        await anyio.to_thread.run_sync(update)
                except Exception:  # noqa: BLE001 - one failing figure must not hide the others
                    log.exception("%s: a metrics update failed", self.name)
            return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

        @app.get("/asyncapi.json", include_in_schema=False)
        def asyncapi() -> dict:
            return self.asyncapi()

        return app

    def _openapi_follows_directory(self, app: FastAPI) -> None:
        """The document lists the directory's ids: it is built again once SIGHUP loaded another directory."""
        build, built_for = app.openapi, [self.directory]

        def openapi() -> dict:
            if self.directory is not built_for[0]:
                built_for[0], app.openapi_schema = self.directory, None
            return build()

        app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document

    def ops_router(self) -> APIRouter:
        """What every service tells ops about itself, as JSON (the dashboard reads it)."""
        router = APIRouter(tags=["ops"])

        @router.get("/ops/outbox")
        async def outbox(user: User = Depends(self.require("ops"))) -> dict:
            """Events committed but not yet published to Redis: a backlog that grows means the relay is stuck."""
            return await anyio.to_thread.run_sync(self.outbox_state)

        return router


_bearer = HTTPBearer(auto_error=False)


def _on_sighup(callback: Callable[[], None]) -> None:
    try:
        import asyncio

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread (tests running the app in a thread): no reload by signal


# --- lists: newest first, opaque cursor -----------------------------------------------------------


CURSOR_PATTERN = r"^[0-9]{1,16}-[A-Za-z0-9]{1,64}$"  # microseconds since 1970, "-", the id: any such is a position
Cursor = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page")]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(at: datetime, id_: str) -> str:
    return f"{(at - _EPOCH) // timedelta(microseconds=1)}-{id_}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (time, id) that `encode_cursor` wrote, or 422 for anything else (the pattern is checked here too: the web
    pages take cursors without FastAPI's validation)."""
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise HTTPException(
            422, [{"loc": ["query", "cursor"], "msg": "not a cursor from a previous page", "type": "value_error"}]
        )
    micros, id_ = cursor.split("-", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), id_


def page(query, created_col, id_col, limit: int, cursor: str | None, session) -> tuple[list, str | None]:
    """Run `query` newest first from `cursor`; returns (rows, next_cursor)."""
    if cursor:
        at, id_ = decode_cursor(cursor)
        query = query.where((created_col < at) | ((created_col == at) & (id_col < id_)))
    rows = session.exec(query.order_by(created_col.desc(), id_col.desc()).limit(limit + 1)).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(getattr(last, created_col.key), getattr(last, id_col.key))
    return rows, next_cursor


def field_error(field: str, message: str, where: str = "body") -> HTTPException:
    """A 422 in FastAPI's own shape, naming the failing field."""
    path = [where, *field.split(".")]
    return HTTPException(422, [{"loc": path, "msg": message, "type": "value_error"}])


@dataclass(frozen=True)
class ServiceRuntime:
    """What a service's `bootstrap` builds once: its shared parts (database, directory, bus, auth, HTTP basics) and
    its FastAPI app. A service adds its own parts as the fields of a frozen subclass (referral: the clock's wake-up,
    the queue snapshots, the pages; notifications: the senders' wake-up events); nothing is set on it afterwards."""

    service: Service
    app: FastAPI

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.service.clock

    @property
    def db(self) -> Database:
        return self.service.db

    @property
    def bus(self) -> Bus:
        return self.service.bus

    @property
    def directory(self) -> Directory:
        return self.service.directory  # SIGHUP loads it again

    @property
    def personal_data(self) -> PersonalData:
        return self.service.personal_data

    def reload_directory(self) -> None:
        self.service.reload_directory()
