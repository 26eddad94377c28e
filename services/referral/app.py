"""Referral service wiring: settings, database, directory, bus, API, partner pages, the ops dashboard."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI

from services.referral import api, consumers, dashboard, web
from services.referral.store import TABLES
from shared.events import utcnow
from shared.service import Service
from shared.settings import Settings


def build(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> Service:
    svc = Service("referral", settings or Settings(), TABLES, clock)
    consumers.register(svc)
    dashboard.register(svc)
    svc.app = svc.create_app(api.build_router(svc), dashboard.build_router(svc), title="Relais referral",
                             pages=[web.build_router(svc)])
    return svc


def create_app() -> FastAPI:
    return build().app
