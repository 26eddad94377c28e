"""Referral's inputs besides HTTP: recorded and cancelled needs from intake (each to its one handler, inside
`Bus.process`'s transaction with its tracking row), and the need's clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Histogram
from sqlmodel import Session

from services.referral import handlers
from services.referral.store import next_timer_due
from shared.events import (
    DELIVERIES,
    INBOUND,
    NEEDS,
    REFERRALS,
    DeliveryStreamEvent,
    InboundEvent,
    NeedClosedByDesk,
    NeedEvent,
    NeedNoteAdded,
    NeedRecorded,
    PersonContactAnswered,
    ReferralStreamEvent,
)
from shared.messaging import LINGER_MS
from shared.service import Service

log = logging.getLogger("relais.referral.clock")
# The clock sleeps until its next timer is due, and is woken (within WAKE_GAP_S) when this process sets new timers;
# only a timer another replica set (hours ahead: a reminder at the earliest, which that replica's own clock fires)
# waits for this.
CLOCK_POLL = timedelta(seconds=5)
WAKE_GAP_S = 0.1  # a timer due at once fires at most this late; the timers' lateness target is 1 s


def timer_lag_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "relais_timer_firing_lag_seconds",
        "How late the need's clock fired each timer",
        ["kind"],
        registry=registry,
        buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
    )


def register(svc: Service, clock_wake: asyncio.Event) -> None:
    """The subscriber of the needs stream, and the referrals stream's documentation."""
    svc.bus.documents_publisher(
        REFERRALS,
        ReferralStreamEvent,
        "Routing decisions, partner actions and the 72-hour clock's reminders, escalations, breaches.",
    )

    @svc.bus.subscriber(
        NEEDS,
        "A recorded need is routed to the best candidate partner, or declared unroutable; "
        "a need cancelled by ops has its open referral cancelled and its clock stopped; "
        "the desk's notes, nudges, closes and re-routes reach the partner's referral.",
    )
    async def on_need_event(event: NeedEvent) -> None:
        handler: Callable[[Session, Any], None]
        if event.type == "need.receipt_requested":
            return  # for notifications: the person's receipt
        if isinstance(event, NeedRecorded):
            # None: the person was erased
            details = await svc.personal_data.open_need_async(event, svc.bus.redis_client)
            handler = lambda s, e: handlers.on_need_recorded(s, e, details, svc.directory, svc.clock())  # noqa: E731
        elif event.type == "person.erased":
            handler = lambda s, e: handlers.on_person_erased(s, e, svc.directory, svc.clock())  # noqa: E731
        elif event.type == "need.cancelled":
            handler = lambda s, e: handlers.on_need_cancelled(s, e, svc.directory, svc.clock())  # noqa: E731
        elif isinstance(event, NeedNoteAdded):  # the desk's actions (issue 14, point 8); texts sealed
            text = await anyio.to_thread.run_sync(svc.personal_data.open_text, event.sealed, event.need_id)
            handler = lambda s, e: handlers.on_desk_note(s, e, text, svc.clock())  # noqa: E731
        elif isinstance(event, NeedClosedByDesk):
            reason = None
            if event.sealed is not None:
                reason = await anyio.to_thread.run_sync(svc.personal_data.open_text, event.sealed, event.need_id)
            handler = lambda s, e: handlers.on_closed_by_desk(s, e, reason, svc.directory, svc.clock())  # noqa: E731
        elif event.type == "need.partner_nudged":
            handler = lambda s, e: handlers.on_partner_nudged(s, e, svc.clock())  # noqa: E731
        elif event.type == "need.reroute_requested":
            handler = lambda s, e: handlers.on_reroute_requested(s, e, svc.directory, svc.clock())  # noqa: E731
        else:
            return  # not referral's concern (need.messages_withdrawn: the partner still has the need)
        if await svc.bus.process(handler, event):
            clock_wake.set()  # the need may have new timers: the clock looks again at once

    @svc.bus.subscriber(
        DELIVERIES,
        "The person's OUI or NON by SMS to the question whether the partner contacted them (person.contact_answered) "
        "is recorded on its referral; deliveries' other events are not referral's concern.",
        linger_ms=LINGER_MS,  # mostly delivery.sent, which referral skips: read in batches
    )
    async def on_delivery_event(event: DeliveryStreamEvent) -> None:
        if isinstance(event, PersonContactAnswered):
            await svc.bus.process(lambda s, e: handlers.on_person_contact_answered(s, e, svc.clock()), event)


def register_inbound(svc: Service, clock_wake: asyncio.Event) -> None:
    """The subscriber of partners' replies by email, which notifications received and checked."""

    @svc.bus.subscriber(
        INBOUND,
        "A partner's reply by email to a handoff is applied by the API's rules (accept, decline, respond), kept in the "
        "referral's history otherwise; an out-of-office may escalate to the backup contact at once.",
    )
    async def on_inbound_event(event: InboundEvent) -> None:
        text = None
        if event.sealed is not None:
            text = await anyio.to_thread.run_sync(svc.personal_data.open_text, event.sealed, event.need_id)
        escalates = svc.settings.inbound_away_escalates
        if await svc.bus.process(
            lambda s, e: handlers.on_partner_reply(s, e, text, svc.directory, svc.clock(), escalates), event
        ):
            clock_wake.set()


async def run_clock(svc: Service, clock_wake: asyncio.Event, timer_lag: Histogram) -> None:
    """Fire due timers, then sleep until the next one (or a poll, or a wake-up after new timers)."""
    skip_locked = not svc.db.is_sqlite

    def fire() -> tuple[int, datetime | None]:
        with svc.db.read() as session:
            next_due = next_timer_due(session)
        if next_due is None or next_due > svc.clock():
            return 0, next_due
        with svc.db.transaction() as session:
            return handlers.fire_due_timers(session, svc.clock(), skip_locked, observe_lag), next_due

    def observe_lag(kind: str, seconds: float) -> None:
        timer_lag.labels(kind).observe(max(0.0, seconds))

    while True:
        clock_wake.clear()
        looked_at = time.monotonic()
        try:
            fired, next_due = await anyio.to_thread.run_sync(fire)
        except Exception:  # noqa: BLE001 - a database hiccup must not stop the clock
            log.exception("firing timers failed; retrying")
            fired, next_due = 0, None
        if fired:
            svc.bus.relay.wake()
            continue
        wait = CLOCK_POLL
        if next_due is not None:
            wait = min(wait, max(timedelta(0), next_due - svc.clock()))
        try:
            await asyncio.wait_for(clock_wake.wait(), wait.total_seconds())
        except TimeoutError:
            continue
        # Woken (a need got timers): look again, but at most every WAKE_GAP, so needs routed at tens a second
        # make ten reads of "what is due next?" a second, not one each.
        await asyncio.sleep(max(0.0, WAKE_GAP_S - (time.monotonic() - looked_at)))
