"""What every service refuses at its door, before a route runs: bodies larger than the route takes, NUL bytes and
lone surrogates in paths, query strings and bodies, JSON nested too deeply; and what it does with an error no
route expected (logged as one JSON line, answered as a JSON 500 naming the correlation id).

Two pure ASGI middlewares, wired by `Service.create_app`: `EdgeGuard` outermost (it also sets the request's
correlation id, so every answer and log line carries one), `UnexpectedErrors` innermost, next to the routes.
A route that takes larger bodies than `MAX_BODY_BYTES` says so with `@body_limit(n)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.routing import Match

from shared.logs import current_correlation_id, log_context, new_correlation_id, valid_correlation_id

log = logging.getLogger("relais.http")

MAX_BODY_BYTES = 64 * 1024  # any route's, unless it says otherwise: our largest body (a need, a reply) is a few kB
MAX_JSON_DEPTH = 32  # our deepest body is 3 levels; anything far deeper is an attack on the parser

Scope = dict[str, Any]


def body_limit(max_bytes: int) -> Callable:
    """Decorate a route's endpoint: its bodies may be up to `max_bytes` (more, or less, than MAX_BODY_BYTES)."""

    def mark(endpoint: Callable) -> Callable:
        endpoint.max_body_bytes = max_bytes  # type: ignore[attr-defined]  # a mark on the function (mypy types none), read with getattr
        return endpoint

    return mark


def unsafe_text(value: str) -> str | None:
    """Why a text cannot be stored (PostgreSQL refuses NUL; a lone surrogate is no character), or None."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def _problems_in(value: Any, loc: list) -> Iterable[dict]:
    """Pydantic-shaped errors for every unsafe string (keys included) in a decoded JSON document; raises
    _TooDeep past MAX_JSON_DEPTH. Iterative: a deep document must not exhaust the stack here either."""
    stack = [(value, loc)]
    while stack:
        node, where = stack.pop()
        if len(where) > MAX_JSON_DEPTH + 1:
            raise _TooDeep
        if isinstance(node, str):
            if reason := unsafe_text(node):
                yield {"loc": where, "msg": reason, "type": "string_unicode"}
        elif isinstance(node, dict):
            for key, item in node.items():
                if reason := unsafe_text(key):
                    yield {
                        "loc": [*where, key.encode("utf-8", "backslashreplace").decode()],
                        "msg": f"key {reason}",
                        "type": "string_unicode",
                    }
                    continue
                stack.append((item, [*where, key]))
        elif isinstance(node, list):
            stack.extend((item, [*where, i]) for i, item in enumerate(node))


class _TooDeep(Exception):
    pass


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _answer(send, status: int, detail: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}, ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class EdgeGuard:
    """Outermost: the correlation id, then the request's target and body, refused with 4xx before any route reads
    them. A body is read (up to its route's limit, counted chunk by chunk, so a chunked body is bounded too), checked,
    then handed to the app as if it came from the client."""

    def __init__(self, app, routes: Callable[[], list]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        correlation_id = valid_correlation_id(headers.get("x-correlation-id")) or new_correlation_id()
        # Starlette's Request reads the header again: give it the one we keep, never the caller's raw value.
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-correlation-id"]
        scope["headers"].append((b"x-correlation-id", correlation_id.encode()))

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-correlation-id"]
                if message["status"] == 405:  # the router names the methods of one route; a path may have several
                    headers = [h for h in headers if h[0].lower() != b"allow"] + [(b"allow", self.allowed(scope))]
                message["headers"] = [*headers, (b"x-correlation-id", correlation_id.encode())]
            await send(message)

        with log_context(correlation_id=correlation_id):
            await self.guarded(scope, receive, send_with_id, headers)

    async def guarded(self, scope: Scope, receive, send, headers: dict[str, str]) -> None:
        if problems := self.target_problems(scope):
            await _answer(send, 422, problems)
            return
        limit = self.limit_for(scope)
        declared = headers.get("content-length")
        if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > limit):
            await _answer(send, 413, f"request body too large: at most {limit} bytes", [(b"connection", b"close")])
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and declared is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        body, rest = bytearray(), None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                rest = message  # the client went away: the app learns it on its first receive
                break
            body += message.get("body", b"")
            if len(body) > limit:
                await _answer(send, 413, f"request body too large: at most {limit} bytes", [(b"connection", b"close")])
                return
            if not message.get("more_body", False):
                break
        content_type = headers.get("content-type", "")
        if body and _is_json(content_type):
            refused = self.json_problems(bytes(body))
        elif body and content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            refused = self.form_problems(bytes(body))
        else:
            refused = None
        if refused is not None:
            await _answer(send, *refused)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return rest or {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def allowed(self, scope: Scope) -> bytes:
        methods = [
            method
            for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in self.routes())
        ]
        return ", ".join(methods).encode()

    def limit_for(self, scope: Scope) -> int:
        for route in self.routes():
            match, child = route.matches(scope)
            if match == Match.FULL:  # an included router answers with its route's endpoint in the child scope
                endpoint = child.get("endpoint") or getattr(route, "endpoint", None)
                return getattr(endpoint, "max_body_bytes", MAX_BODY_BYTES)
        return MAX_BODY_BYTES

    @staticmethod
    def target_problems(scope: Scope) -> list[dict]:
        problems = []
        if reason := unsafe_text(scope["path"]):
            problems.append({"loc": ["path"], "msg": reason, "type": "string_unicode"})
        # Decoded as Starlette decodes it, so what is checked is what the route will be given.
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if reason := unsafe_text(value) or unsafe_text(name):
                problems.append(
                    {"loc": ["query", name.replace("\x00", "\\x00")], "msg": reason, "type": "string_unicode"}
                )
        return problems

    @staticmethod
    def json_problems(body: bytes) -> tuple[int, Any] | None:
        try:
            document = json.loads(body)
        except RecursionError:
            return 400, f"JSON nested too deeply: at most {MAX_JSON_DEPTH} levels"
        except ValueError:
            return None  # not JSON: the route's own validation names it (422 json_invalid)
        try:
            problems = list(_problems_in(document, ["body"]))
        except _TooDeep:
            return 400, f"JSON nested too deeply: at most {MAX_JSON_DEPTH} levels"
        return (422, problems) if problems else None

    @staticmethod
    def form_problems(body: bytes) -> tuple[int, Any] | None:
        fields = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        problems = [
            {"loc": ["body", name.replace("\x00", "\\x00")], "msg": reason, "type": "string_unicode"}
            for name, value in fields
            if (reason := unsafe_text(value) or unsafe_text(name))
        ]
        return (422, problems) if problems else None


class UnexpectedErrors:
    """Innermost: an exception no route handled is logged here, through the JSON logs and their masking (not
    printed raw by the server), and answered as a JSON 500 naming the correlation id to quote to ops."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - the one place that catches them all
            correlation_id = current_correlation_id()
            log.exception("unexpected error in %s %s", scope["method"], route_of(scope))
            if not started:
                await _answer(send, 500, f"internal error; quote {correlation_id} to ops")


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"  # the template: no id or token in it
