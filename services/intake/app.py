"""Intake service wiring: `bootstrap` builds, once, everything the process needs (settings, database, directory,
bus, clock, the desk's pages, the FastAPI app) into an IntakeRuntime. The routers are module-level (api.py, web.py)
and find it through the dependencies of deps.py. Request sizes are limited by shared.edges, like every service's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI

from services.intake import api, consumers, web
from services.intake.store import PURGE_RULES, TABLES
from shared.events import NEEDS, REFERRALS, utcnow
from shared.pages import Pages
from shared.queues import UNSENT_KEYS, PushBack
from shared.service import Service, ServiceRuntime
from shared.settings import Settings


@dataclass(frozen=True)
class IntakeRuntime(ServiceRuntime):
    """The intake process: its shared service parts, its app, the desk's pages, and whether to push back."""

    pages: Pages
    push_back: PushBack  # 429 on new needs while the pipeline lags past RELAIS_INTAKE_MAX_BACKLOG


def bootstrap(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> IntakeRuntime:
    service = Service("intake", settings or Settings(), TABLES, clock)
    service.purge_rules.extend(PURGE_RULES)
    consumers.register(service)
    service.openapi_refiners.append(api.directory_ids(service))
    pages = web.pages_for(service)
    app = service.create_app(api.router, title="Relais intake", pages=[pages.sign_in_router(), web.router])
    push_back = PushBack(
        lambda: service.bus.redis_client,
        [service.settings.key(NEEDS), service.settings.key(REFERRALS)],  # routing, then the handoffs' queueing
        service.db.outbox_backlog,
        bound=service.settings.intake_max_backlog,
        retry_after_s=service.settings.intake_retry_after_s,
        unsent_keys=[service.settings.key(key) for key in UNSENT_KEYS.values()],  # notifications' queue
    )
    runtime = IntakeRuntime(service, app, pages, push_back)
    app.state.runtime = runtime  # what deps.py gives the routes
    return runtime


def create_app() -> FastAPI:
    return bootstrap().app
