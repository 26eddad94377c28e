"""Notifications' HTTP API (contract: /api/v1/deliveries, for ops) and the SMS providers' webhooks (delivery
receipts and replies, checked by signature or secret, outside /api/v1 because providers hold no bearer token)."""


import hmac
import json
from datetime import datetime, timedelta
from typing import Annotated
from urllib.parse import parse_qs

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlmodel import select

from services.notifications import channels, handlers
from services.notifications.store import Delivery, DeliveryAttempt
from shared.directory import User
from shared.edges import body_limit
from shared.service import Cursor, Service, page

MAX_WEBHOOK_BYTES = 64 * 1024


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


def build_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["deliveries"])
    Ops = Annotated[User, Depends(svc.require("ops"))]

    @router.get("/deliveries", response_model=DeliveryPage)
    def list_deliveries(user: Ops, need_id: str | None = None, referral_id: str | None = None, status: str | None = None,
                        kind: str | None = None, channel: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: Cursor = None) -> DeliveryPage:
        # The contract's kinds; sign-in links (no need, not in the contract) only when asked for by kind=sign_in.
        query = select(Delivery) if kind else select(Delivery).where(Delivery.kind != "sign_in")
        for column, value in ((Delivery.need_id, need_id), (Delivery.referral_id, referral_id),
                              (Delivery.status, status), (Delivery.kind, kind), (Delivery.channel, channel)):
            if value:
                query = query.where(column == value)
        with svc.db.transaction() as session:
            rows, next_cursor = page(query, Delivery.created_at, Delivery.id, limit, cursor, session)
            return DeliveryPage(items=[DeliveryPublic.of(d) for d in rows], next_cursor=next_cursor)

    @router.get("/deliveries/stats", response_model=DeliveryStats)
    def delivery_stats(user: Ops, hours: Annotated[int, Query(ge=1, le=24 * 31)] = 24) -> DeliveryStats:
        """Deliveries created in the last `hours`, counted by channel, kind and status, with SMS segments used and
        the latest failures (for the ops dashboard)."""
        since = svc.clock() - timedelta(hours=hours)
        with svc.db.transaction() as session:
            counted = session.exec(select(Delivery.channel, Delivery.kind, Delivery.status, sa.func.count())
                                   .where(Delivery.created_at >= since)
                                   .group_by(Delivery.channel, Delivery.kind, Delivery.status)).all()
            segments = session.exec(select(sa.func.coalesce(sa.func.sum(Delivery.sms_segments), 0))
                                    .where(Delivery.created_at >= since, Delivery.channel == "sms",
                                           Delivery.status.in_(("sent", "delivered")),
                                           Delivery.provider != "outbox")).one()
            failures = session.exec(select(Delivery).where(Delivery.created_at >= since, Delivery.status == "failed")
                                    .order_by(Delivery.created_at.desc()).limit(10)).all()
        rows: dict[tuple[str, str], dict[str, int]] = {}
        totals: dict[str, int] = {}
        for channel, kind, status, count in counted:
            rows.setdefault((channel, kind), {})[status] = count
            totals[status] = totals.get(status, 0) + count
        return DeliveryStats(
            hours=hours, totals=totals, sms_segments=int(segments),
            rows=[StatsRow(channel=c, kind=k, counts=n) for (c, k), n in sorted(rows.items())],
            latest_failures=[Failure(at=d.sent_at or d.created_at, kind=d.kind, channel=d.channel,
                                     recipient_role=d.recipient_role, attempts=d.attempts, error=d.last_error)
                             for d in failures])

    @router.get("/deliveries/{delivery_id}", response_model=DeliveryDetail)
    def get_delivery(user: Ops, delivery_id: str) -> DeliveryDetail:
        with svc.db.transaction() as session:
            d = session.get(Delivery, delivery_id)
            if d is None:
                raise HTTPException(404, "no such delivery")
            attempts = session.exec(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
                                    .order_by(DeliveryAttempt.number, DeliveryAttempt.id)).all()
            return DeliveryDetail(**DeliveryPublic.of(d).model_dump(),
                                  attempt_log=[AttemptPublic(**a.model_dump()) for a in attempts])

    return router


# --- the SMS providers' webhooks --------------------------------------------------------------------


def build_webhooks(svc: Service) -> APIRouter:
    """POST /webhooks/sms/twilio (X-Twilio-Signature checked with the auth token), and for Brevo
    POST /webhooks/sms/brevo/{secret} (the secret in the webUrl given with each message) or
    POST /webhooks/sms/brevo with `Authorization: Bearer {secret}` (an account webhook for replies)."""
    router = APIRouter()

    async def body_of(request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            raise HTTPException(413, "too large")
        return body

    def apply(provider: str, what) -> None:
        now = svc.clock()
        with svc.db.transaction() as session:
            if isinstance(what, channels.Receipt):
                handlers.on_sms_receipt(session, provider, what.provider_message_id, what.delivered, what.error, now)
            elif isinstance(what, channels.Reply):
                handlers.on_sms_reply(session, provider, what.phone, what.text, now)

    async def handle(provider: str, what) -> None:
        if what is not None:
            await anyio.to_thread.run_sync(apply, provider, what)
            svc.bus.relay.wake()

    @router.post("/webhooks/sms/twilio")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def twilio(request: Request) -> Response:
        s = svc.settings
        if not s.twilio_auth_token:
            raise HTTPException(404, "Twilio is not configured")
        fields = parse_qs((await body_of(request)).decode("utf-8", errors="replace"), keep_blank_values=True)
        params = {name: values[0] for name, values in fields.items()}
        expected = channels.twilio_signature(s.twilio_auth_token, channels.twilio_webhook_url(s), params)
        if not hmac.compare_digest(expected.encode(), request.headers.get("X-Twilio-Signature", "").encode()):
            raise HTTPException(403, "bad X-Twilio-Signature")
        await handle("twilio", channels.read_twilio(params))
        # An empty TwiML answer: nothing is sent back to the person.
        return Response('<?xml version="1.0" encoding="UTF-8"?><Response></Response>', media_type="text/xml")

    async def brevo(request: Request, secret: str) -> Response:
        if not hmac.compare_digest(secret.encode(), channels.brevo_webhook_secret(svc.settings).encode()):
            raise HTTPException(403, "bad webhook secret")
        try:
            body = json.loads(await body_of(request))
        except ValueError:
            raise HTTPException(400, "expected a JSON body") from None
        for item in body if isinstance(body, list) else [body]:
            if isinstance(item, dict):
                await handle("brevo", channels.read_brevo(item))
        return Response(status_code=204)

    @router.post("/webhooks/sms/brevo/{secret}")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def brevo_by_url(request: Request, secret: str) -> Response:
        """The URL given as each message's webUrl: the secret is its last segment."""
        return await brevo(request, secret)

    @router.post("/webhooks/sms/brevo")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def brevo_by_bearer(request: Request) -> Response:
        """An account webhook (replies, unsubscriptions) created with Brevo's bearer-token authentication."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return await brevo(request, token.strip() if scheme.lower() == "bearer" else "")

    return router
