"""Intake service wiring: settings, database, bus, API, the desk's pages, and the request size limit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import json

from fastapi import FastAPI

from services.intake import api, consumers, web
from services.intake.store import TABLES
from shared.events import utcnow
from shared.service import Service
from shared.settings import Settings

MAX_BODY_BYTES = 64 * 1024  # a need is a few hundred bytes; 64 KiB leaves room and stops abuse early


class BodySizeLimit:
    """Answers 413 to a request whose body is over `max_bytes`, declared (Content-Length) or streamed (chunked),
    without reading the rest of it."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.refuse(send)
        received, started, refused = 0, False, False

        async def counted_receive():
            nonlocal received, started, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        started = True
                        await self.refuse(send)
            # The application sees the client gone; what it answers is dropped (FastAPI would say 400).
            return {"type": "http.disconnect"} if refused else message

        async def tracked_send(message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def build(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> Service:
    svc = Service("intake", settings or Settings(), TABLES, clock)
    consumers.register(svc)
    svc.app = svc.create_app(api.build_router(svc), title="Relais intake", pages=[web.build_router(svc)])
    svc.app.add_middleware(BodySizeLimit)
    return svc


def create_app() -> FastAPI:
    return build().app
