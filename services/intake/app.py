"""Intake service wiring: settings, database, bus, API, and the desk's pages (request sizes are limited by
shared.edges, like every service's)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI

from services.intake import api, consumers, web
from services.intake.store import TABLES
from shared.events import utcnow
from shared.service import Service
from shared.settings import Settings


def build(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> Service:
    svc = Service("intake", settings or Settings(), TABLES, clock)
    consumers.register(svc)
    svc.app = svc.create_app(api.build_router(svc), title="Relais intake", pages=[web.build_router(svc)])
    return svc


def create_app() -> FastAPI:
    return build().app
