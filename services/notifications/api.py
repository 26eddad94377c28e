"""Notifications' HTTP API (contract: /api/v1/deliveries, for ops; module-level routes on deps.py) and the SMS
providers' webhooks (delivery receipts and replies, checked by signature or secret, outside /api/v1 because providers
hold no bearer token): parse, authorise, call one handler or read a view, render."""

import re
from datetime import datetime, timedelta
from functools import partial
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel

from services.notifications import deps, handlers, views
from services.notifications.commands import RecordSmsReceipt, RecordSmsReply
from services.notifications.providers import SMS_PROVIDERS
from services.notifications.providers.base import Receipt, Reply, Report
from services.notifications.store import Delivery
from shared.people import AccessEntry, AccessLogPage, access_entries
from shared.search import MAX_QUERY
from shared.service import Cursor


class DeliveryPublic(BaseModel):
    # the contract's fields
    id: str
    need_id: str | None
    referral_id: str | None
    kind: str
    channel: str
    recipient_role: str
    status: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    # additions
    last_error: str | None
    suppressed_reason: str | None  # no_channel | no_address | opted_out | need_cancelled
    held_reason: str | None  # quiet_hours | digest, while queued
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    provider: str | None
    sms_encoding: str | None
    sms_segments: int | None
    fallback_for: str | None
    digest_of: str | None

    @classmethod
    def of(cls, d: Delivery) -> "DeliveryPublic":
        data = d.model_dump()
        if d.status != "queued":
            data["next_attempt_at"], data["held_reason"] = None, None
        return cls(**data)


class AttemptPublic(BaseModel):
    number: int
    at: datetime
    outcome: str
    error: str | None
    retry_at: datetime | None


class DeliveryDetail(DeliveryPublic):
    attempt_log: list[AttemptPublic]


class StatsRow(BaseModel):
    channel: str
    kind: str
    counts: dict[str, int]


class Failure(BaseModel):
    at: datetime
    kind: str
    channel: str
    recipient_role: str
    attempts: int
    error: str | None


class DeliveryStats(BaseModel):
    hours: int
    rows: list[StatsRow]
    totals: dict[str, int]
    sms_segments: int  # sent through a provider (not the outbox): what the operator bills
    latest_failures: list[Failure]


class DeliveryPage(BaseModel):
    items: list[DeliveryPublic]
    next_cursor: str | None


router = APIRouter(tags=["deliveries"])


@router.get("/deliveries", response_model=DeliveryPage)
def list_deliveries(
    user: deps.OpsUser,
    session: deps.ReadSessionDep,
    need_id: str | None = None,
    referral_id: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    channel: str | None = None,
    library_id: str | None = None,
    q: Annotated[
        str | None,
        Query(
            max_length=MAX_QUERY,
            description="Search: every word in the need's reference (CHA-2611-0042) or in the address the message "
            "went to (an email; a phone in any written form). Names and summaries are searched in intake.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> DeliveryPage:
    """A page of deliveries (ops), newest first, filtered; `library_id`: the messages about that library's needs."""
    filters = dict(need_id=need_id, referral_id=referral_id, status=status, kind=kind, channel=channel)
    rows, next_cursor = views.delivery_page(session, filters, limit, cursor, q=q, library_id=library_id or "")
    return DeliveryPage(items=[DeliveryPublic.of(d) for d in rows], next_cursor=next_cursor)


@router.get("/deliveries/stats", response_model=DeliveryStats)
def delivery_stats(
    user: deps.OpsUser,
    session: deps.ReadSessionDep,
    clock: deps.ClockDep,
    hours: Annotated[int, Query(ge=1, le=24 * 31)] = 24,
) -> DeliveryStats:
    """Deliveries created in the last `hours`, counted by channel, kind and status, with SMS segments used and
    the latest failures (for the ops dashboard)."""
    counted, segments, failures = views.delivery_counts(session, clock() - timedelta(hours=hours))
    rows: dict[tuple[str, str], dict[str, int]] = {}
    totals: dict[str, int] = {}
    for channel, kind, status, count in counted:
        rows.setdefault((channel, kind), {})[status] = count
        totals[status] = totals.get(status, 0) + count
    return DeliveryStats(
        hours=hours,
        totals=totals,
        sms_segments=segments,
        rows=[StatsRow(channel=c, kind=k, counts=n) for (c, k), n in sorted(rows.items())],
        latest_failures=[
            Failure(
                at=d.sent_at or d.created_at,
                kind=d.kind,
                channel=d.channel,
                recipient_role=d.recipient_role,
                attempts=d.attempts,
                error=d.last_error,
            )
            for d in failures
        ],
    )


@router.get("/deliveries/{delivery_id}", response_model=DeliveryDetail)
def get_delivery(user: deps.OpsUser, session: deps.ReadSessionDep, delivery_id: str) -> DeliveryDetail:
    found = views.delivery_with_attempts(session, delivery_id)
    if found is None:
        raise HTTPException(404, "no such delivery")
    d, attempts = found
    return DeliveryDetail(
        **DeliveryPublic.of(d).model_dump(), attempt_log=[AttemptPublic(**a.model_dump()) for a in attempts]
    )


# --- the SMS providers' webhooks --------------------------------------------------------------------


def sms_report(runtime: deps.RuntimeDep, db: deps.DatabaseDep, clock: deps.ClockDep) -> Report:
    """What a provider's webhook read (providers/), as a command (RecordSmsReceipt, RecordSmsReply) for its one
    handler: the dependency each provider's webhook takes its Report from."""

    def command(provider: str, what: Receipt | Reply) -> RecordSmsReceipt | RecordSmsReply:
        if isinstance(what, Receipt):
            return RecordSmsReceipt(provider, what.provider_message_id, what.delivered, what.error)
        return RecordSmsReply(provider, what.phone, what.text)

    async def report(provider: str, what: Receipt | Reply | None) -> None:
        if what is None:
            return
        cmd = command(provider, what)
        if isinstance(cmd, RecordSmsReceipt):
            await anyio.to_thread.run_sync(partial(handlers.record_sms_receipt, db, cmd, now=clock()))
        else:
            await anyio.to_thread.run_sync(partial(handlers.record_sms_reply, db, cmd, now=clock()))
        runtime.bus.relay.wake()

    return report


# Every registered SMS provider's webhooks, each checked by the provider's signature or secret.
# --- a person's part (intake assembles the export and the access log) ---


class PersonDelivery(BaseModel):
    """A message about one of the person's needs, with its text as rendered; the address only when it is the
    person's own (staff addresses are not about them)."""

    id: str
    need_id: str | None
    referral_id: str | None
    kind: str
    channel: str
    recipient_role: str
    recipient: str | None
    status: str
    suppressed_reason: str | None
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    subject: str
    body_text: str


class PersonContactKept(BaseModel):
    need_id: str
    email: str | None
    phone: str | None
    preferred_channel: str
    language: str
    erased_at: datetime | None


class PersonPart(BaseModel):
    service: Literal["notifications"] = "notifications"
    contacts: list[PersonContactKept]
    deliveries: list[PersonDelivery]
    access_log: list[AccessEntry]


# A partner's signed link to the referral (or a sign-in link) in a message is a credential: the person's copy
# keeps the path's shape, not the token.
CREDENTIAL_LINK = re.compile(r"(/(?:r|connexion)/)[A-Za-z0-9_.\-]+")


def without_credentials(text: str) -> str:
    return CREDENTIAL_LINK.sub(lambda m: m.group(1) + "••••••", text)


@router.get("/people/{person_id}/export", tags=["people"], response_model=PersonPart)
def export_person_part(
    person_id: str,
    user: deps.OpsUser,
    session: deps.ReadSessionDep,
    need_id: Annotated[list[str], Query(max_length=200)],
) -> PersonPart:
    """What notifications holds about the person of these needs (intake knows which are theirs): the contact kept
    for each, every message about them with its text, and who looked at their messages here."""
    contacts, deliveries = views.person_messages(session, need_id)
    return PersonPart(
        contacts=[PersonContactKept(**c.model_dump()) for c in contacts],
        deliveries=[
            PersonDelivery(
                **{
                    **d.model_dump(),
                    "recipient": d.recipient if d.recipient_role == "person" else None,
                    "body_text": without_credentials(d.body_text),
                }
            )
            for d in deliveries
        ],
        access_log=access_entries(session, need_id),
    )


@router.get("/people/{person_id}/access-log", tags=["people"], response_model=AccessLogPage)
def person_access_log(
    person_id: str,
    user: deps.OpsUser,
    session: deps.ReadSessionDep,
    need_id: Annotated[list[str], Query(max_length=200)],
) -> AccessLogPage:
    """Who read these needs' messages to the person on the outbox pages, newest first."""
    return AccessLogPage(items=access_entries(session, need_id))


webhooks = APIRouter()
for kind in SMS_PROVIDERS.values():
    if kind.webhooks is not None:
        webhooks.include_router(kind.webhooks(sms_report))
