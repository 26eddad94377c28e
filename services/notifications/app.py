"""Notifications service wiring: `bootstrap` builds, once, everything the process needs (settings checked, database,
directory, bus, clock, one sender per channel, the outbox pages, the FastAPI app) into a NotificationsRuntime. The
routers are module-level (api.py's API and the providers' webhooks, web.py) and find it through the dependencies of
deps.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from fastapi import FastAPI
from prometheus_client import Gauge

from services.notifications import api, consumers, inbound, providers, sender, views, web
from services.notifications.store import PURGE_RULES, TABLES
from services.notifications.views import MailSinkFolder
from shared.events import utcnow
from shared.pages import Pages
from shared.service import Service, ServiceRuntime
from shared.settings import Settings

CHANNELS = ("email", "sms")


def check_settings(settings: Settings) -> list[str]:
    """What in these settings keeps notifications from sending, one sentence each naming the variable to fix: a
    malformed RELAIS_SMTP_URL, the chosen SMS provider's missing credentials. (An unset RELAIS_SMTP_URL is left to
    the caller: `relais up` and `relais serve` start an embedded sink, a bare bootstrap refuses it.)"""
    return providers.settings_problems(settings)


@dataclass(frozen=True)
class NotificationsRuntime(ServiceRuntime):
    """The notifications process: its shared service parts, its app, the events that wake each channel's sender, and
    the outbox pages with the sink they show."""

    wake_senders: dict[str, asyncio.Event]  # one event per channel
    pages: Pages
    mail_sink: MailSinkFolder | None  # the embedded sink's messages, shown on the outbox pages (`relais up`)


def bootstrap(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> NotificationsRuntime:
    settings = settings or Settings()
    if not settings.smtp_url:
        raise SystemExit(
            "RELAIS_SMTP_URL is not set: give the SMTP server, e.g. smtp://mailpit:1025 "
            "(`relais up` starts an embedded sink and sets it)"
        )
    if problems := check_settings(settings):
        raise SystemExit("\n".join(problems))  # each says what to set
    service = Service("notifications", settings, TABLES, clock)
    service.purge_rules.extend(PURGE_RULES)
    wakes = {channel: asyncio.Event() for channel in CHANNELS}
    for channel, wake in wakes.items():
        service.background.append(partial(sender.send_forever, service, wake, channel))

    def wake_senders(channels: Iterable[str]) -> None:
        for channel in channels:
            wakes[channel].set()

    consumers.register(service, wake_senders)
    inbound.register(service)
    service.on_scrape.append(_deliveries_gauge(service))
    pages = web.pages_for(service)
    app = service.create_app(
        api.router,
        title="Relais notifications",
        pages=[pages.sign_in_router(), web.router, api.webhooks, inbound.webhooks],
    )
    runtime = NotificationsRuntime(service, app, wakes, pages, web.mail_sink_for(settings))
    app.state.runtime = runtime  # what deps.py gives the routes
    return runtime


def _deliveries_gauge(service: Service) -> Callable[[], None]:
    """relais_deliveries{status,channel} on /metrics: every delivery in the database, counted at scrape time."""
    gauge = Gauge(
        "relais_deliveries", "Deliveries by status and channel", ["status", "channel"], registry=service.metrics
    )

    def update() -> None:
        with service.db.read() as session:
            found = views.deliveries_by_status(session)
        for channel in CHANNELS:
            for status in ("queued", "sent", "delivered", "failed", "suppressed"):
                gauge.labels(status, channel).set(found.get((status, channel), 0))

    return update


def create_app() -> FastAPI:
    return bootstrap().app
