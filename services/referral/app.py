"""Referral service wiring: `bootstrap` builds, once, everything the process needs (settings, database, directory,
bus, clock, the clock's wake-up and lag histogram, the queue snapshots, the pages, the FastAPI app) into a
ReferralRuntime. The routers are module-level (api.py, web.py, dashboard_pages.py) and find it through the
dependencies of deps.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI
from prometheus_client import Histogram

from services.referral import api, consumers, dashboard_pages, metrics, person_pages, web
from services.referral.dashboard import FiguresReuse, QueueWatch
from services.referral.store import PURGE_RULES, TABLES
from shared.events import utcnow
from shared.pages import Pages
from shared.service import Service, ServiceRuntime
from shared.settings import Settings


@dataclass(frozen=True)
class ReferralRuntime(ServiceRuntime):
    """The referral process: its shared service parts, its app, and what referral adds."""

    clock_wake: asyncio.Event  # set when a need got timers: the clock looks again before its next poll
    timer_lag: Histogram
    queue_watch: QueueWatch  # recent queue reports, for "pending growing"
    figures_reuse: FiguresReuse  # the dashboard's last database figures, when they are slow to compute
    pages: Pages


def bootstrap(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> ReferralRuntime:
    service = Service("referral", settings or Settings(), TABLES, clock)
    service.purge_rules.extend(PURGE_RULES)
    clock_wake = asyncio.Event()
    timer_lag = consumers.timer_lag_histogram(service.metrics)
    queue_watch = QueueWatch()
    pages = web.pages_for(service)
    consumers.register(service, clock_wake)
    consumers.register_inbound(service, clock_wake)  # partners' replies by email
    service.background.append(lambda: consumers.run_clock(service, clock_wake, timer_lag))
    metrics.register(service, queue_watch)
    service.openapi_refiners.append(api.directory_ids(service))
    app = service.create_app(
        api.router,
        api.dashboard_router,
        api.people_router,
        title="Relais referral",
        pages=[pages.sign_in_router(), dashboard_pages.router, web.router, person_pages.router],
    )
    runtime = ReferralRuntime(service, app, clock_wake, timer_lag, queue_watch, FiguresReuse(), pages)
    app.state.runtime = runtime  # what deps.py gives the routes
    service.background.append(lambda: runtime.figures_reuse.start(runtime))  # a large window's, before anyone asks
    return runtime


def create_app() -> FastAPI:
    return bootstrap().app
