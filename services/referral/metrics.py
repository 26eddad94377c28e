"""The gauges referral adds to /metrics: open referrals by SLA state, the need's clock, the streams' queues."""

from __future__ import annotations

from prometheus_client import Gauge

from services.referral import views
from services.referral.dashboard import OVERDUE_TIMER, SLA_STATES, QueueWatch, queue_reports
from shared.service import Service


def register(svc: Service, watch: QueueWatch) -> None:
    """Gauges updated before each scrape (`Service.on_scrape`)."""
    open_referrals = Gauge("relais_open_referrals", "Open referrals by SLA state", ["sla"], registry=svc.metrics)
    stream_length = Gauge("relais_stream_length", "Entries in the stream", ["stream"], registry=svc.metrics)
    dead_letters = Gauge(
        "relais_stream_dead_letters", "Entries in the stream's dead-letter stream", ["stream"], registry=svc.metrics
    )
    pending = Gauge(
        "relais_group_pending",
        "Entries delivered to the group and not yet acknowledged",
        ["stream", "group"],
        registry=svc.metrics,
    )
    lag = Gauge("relais_group_lag", "Entries not yet delivered to the group", ["stream", "group"], registry=svc.metrics)
    oldest = Gauge(
        "relais_group_oldest_pending_seconds",
        "Age of the group's oldest pending entry",
        ["stream", "group"],
        registry=svc.metrics,
    )
    live = Gauge(
        "relais_group_live_consumers",
        "Consumers of the group seen in the last 30 s",
        ["stream", "group"],
        registry=svc.metrics,
    )
    overdue = Gauge(
        "relais_overdue_timers",
        "Timers of the need's clock due more than a minute ago and not fired",
        registry=svc.metrics,
    )

    def database_figures() -> None:
        with svc.db.read() as session:
            counts = views.open_by_sla(session)
            overdue.set(views.overdue_timers(session, svc.clock() - OVERDUE_TIMER))
        for state in SLA_STATES:
            open_referrals.labels(state).set(counts.get(state, 0))

    async def queue_figures() -> None:
        for report in await queue_reports(svc, watch):
            name = report.stream.removeprefix(f"{svc.settings.namespace}:")
            stream_length.labels(name).set(report.length)
            dead_letters.labels(name).set(report.dead_letters)
            for g in report.groups:
                pending.labels(name, g.name).set(g.pending)
                lag.labels(name, g.name).set(g.lag)
                oldest.labels(name, g.name).set((g.oldest_pending_ms or 0) / 1000)
                live.labels(name, g.name).set(g.live_consumers)

    svc.on_scrape += [database_figures, queue_figures]
