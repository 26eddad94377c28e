"""Notifications service wiring: settings, database, bus, one sender per channel, API, webhooks, outbox pages."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import asyncio

import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import Gauge
from sqlmodel import select

from services.notifications import api, channels, consumers, pages, sender
from services.notifications.store import TABLES, Delivery
from shared.events import utcnow
from shared.service import Service
from shared.settings import Settings


def build(settings: Settings | None = None, *, clock: Callable[[], datetime] = utcnow) -> Service:
    svc = Service("notifications", settings or Settings(), TABLES, clock)
    if not svc.settings.smtp_url:
        raise SystemExit("RELAIS_SMTP_URL is not set: give the SMTP server, e.g. smtp://mailpit:1025 "
                         "(`relais up` starts an embedded sink and sets it)")
    channels.SmtpTarget.from_url(svc.settings.smtp_url)  # a malformed URL stops the start, with the form to use
    channels.check_sms_settings(svc.settings)  # so does an SMS provider without its credentials
    wakes = {channel: asyncio.Event() for channel in ("email", "sms")}
    for channel, wake in wakes.items():
        svc.background.append(lambda channel=channel, wake=wake: sender.send_forever(svc, wake, channel))
    consumers.register(svc, lambda: [wake.set() for wake in wakes.values()])
    _deliveries_gauge(svc)
    svc.app = svc.create_app(api.build_router(svc), title="Relais notifications",
                             pages=[pages.build_router(svc), api.build_webhooks(svc)])
    return svc


def _deliveries_gauge(svc: Service) -> None:
    """relais_deliveries{status,channel} on /metrics: every delivery in the database, counted at scrape time."""
    gauge = Gauge("relais_deliveries", "Deliveries by status and channel", ["status", "channel"], registry=svc.metrics)

    def update() -> None:
        with svc.db.read() as session:
            found = {(status, channel): n for status, channel, n in session.exec(
                select(Delivery.status, Delivery.channel, sa.func.count()).group_by(Delivery.status, Delivery.channel))}
        for channel in ("email", "sms"):
            for status in ("queued", "sent", "delivered", "failed", "suppressed"):
                gauge.labels(status, channel).set(found.get((status, channel), 0))

    svc.on_scrape.append(update)


def create_app() -> FastAPI:
    return build().app
