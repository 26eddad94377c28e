"""Referral service wiring: `bootstrap` builds, once, everything the service runs on (settings, database, directory,
bus, clock, the clock's wake-up and lag histogram, the queue snapshots, the pages, the FastAPI app) into a
`ReferralRuntime`. The routers are module-level (api.py, web.py, dashboard_pages.py) and find it through the
dependencies of deps.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from prometheus_client import Histogram

from services.referral import api, consumers, dashboard_pages, metrics, web
from services.referral.dashboard import QueueWatch
from services.referral.store import TABLES
from shared.events import utcnow
from shared.pages import Pages
from shared.service import Service
from shared.settings import Settings


class ReferralRuntime(Service):
    """Referral's process: the shared service basics plus what referral adds, all built in the constructor."""

    clock_wake: asyncio.Event  # set when a need got timers: the clock looks again before its next poll
    timer_lag: Histogram
    queue_watch: QueueWatch  # recent queue reports, for "pending growing"
    pages: Pages
    app: FastAPI

    def __init__(self, settings: Settings, clock: Callable[[], datetime]) -> None:
        super().__init__("referral", settings, TABLES, clock)
        self.clock_wake = asyncio.Event()
        self.timer_lag = consumers.timer_lag_histogram(self.metrics)
        self.queue_watch = QueueWatch()
        self.pages = web.pages_for(self)
        consumers.register(self, self.clock_wake)
        self.background.append(lambda: consumers.run_clock(self, self.clock_wake, self.timer_lag))
        metrics.register(self, self.queue_watch)
        self.openapi_refiners.append(api.directory_ids(self))
        self.app = self.create_app(
            api.router,
            api.dashboard_router,
            title="Relais referral",
            pages=[self.pages.sign_in_router(), dashboard_pages.router, web.router],
        )
        self.app.state.runtime = self  # what deps.get_runtime gives the routers


def bootstrap(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> ReferralRuntime:
    return ReferralRuntime(settings or Settings(), clock)


def create_app() -> FastAPI:
    return bootstrap().app
