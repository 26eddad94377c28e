"""The senders: one loop per channel takes the due deliveries (leased, so replicas never send one twice while
it is in hand), sends them, and records each attempt with what came of it.

The schedule lives in the database (`delivery.next_attempt_at`): a retry after backoff, a message held for
quiet hours or for a contact's daily digest all wait there, so a restart forgets none of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
from sqlmodel import select

from services.notifications import domain, handlers
from services.notifications.providers import sms_provider, smtp
from services.notifications.providers.base import SendError, Sent
from services.notifications.render import render_email
from services.notifications.store import Delivery, DeliveryAttempt, SmsSuppression
from shared.db import emit
from shared.events import DeliveryFailed, DeliverySent

log = logging.getLogger("relais.notifications.sender")

LEASE = timedelta(minutes=2)  # a sender that died mid-send frees its deliveries after this
REDACT_AFTER_SENDING = {"sign_in"}  # the body holds a credential: keep it only until it is sent
BATCH = 50


@dataclass(frozen=True)
class Outcome:
    sent: Sent | None = None
    error: SendError | None = None
    suppressed: str | None = None


def lease_due(db, now: datetime, channel: str, limit: int = BATCH) -> list[list[Delivery]]:
    """Take the due queued deliveries of `channel` for this sender, as messages to send: one delivery each,
    except a contact's digest, where every handoff held for the slot goes in one email."""
    with db.transaction() as session:
        query = (select(Delivery).where(Delivery.status == "queued", Delivery.channel == channel,
                                        Delivery.next_attempt_at <= now)
                 .where((Delivery.leased_until.is_(None)) | (Delivery.leased_until < now))
                 .order_by(Delivery.next_attempt_at).limit(limit))
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        due = list(session.exec(query).all())
        for d in due:
            d.leased_until, d.attempts = now + LEASE, d.attempts + 1
            session.add(d)
    messages: list[list[Delivery]] = []
    digests: dict[str, list[Delivery]] = {}
    for d in due:
        if d.held_reason == "digest":
            digests.setdefault(d.recipient.lower(), []).append(d)
        else:
            messages.append([d])
    return messages + list(digests.values())


def record_outcome(db, ids: list[str], now: datetime, outcome: Outcome, settings) -> None:
    """Write the attempt and move each delivery on: sent, suppressed, failed (with delivery.failed and, for
    an SMS to the person, an email instead), or queued again for a later try."""
    with db.transaction() as session:
        for d in (session.get(Delivery, i) for i in ids):
            d.leased_until = None
            attempt = DeliveryAttempt(delivery_id=d.id, number=d.attempts, at=now, outcome="sent")
            error = outcome.error
            if outcome.sent is not None:
                d.status, d.sent_at, d.last_error = "sent", now, None
                d.provider, d.provider_message_id = outcome.sent.provider, outcome.sent.provider_message_id
                d.digest_of = ids[0] if len(ids) > 1 else None
                if d.kind in REDACT_AFTER_SENDING:
                    d.body_text, d.body_html = "(lien de connexion envoyé, effacé)", None
                if d.need_id is not None:  # delivery events are about a need; a sign-in link is not
                    emit(session, DeliverySent(**handlers.event_fields(d, now)))
            elif outcome.suppressed or (error is not None and error.opted_out):
                d.status, d.suppressed_reason = "suppressed", outcome.suppressed or "opted_out"
                attempt.outcome, attempt.error = "suppressed", str(error) if error else d.suppressed_reason
                if error is not None:
                    handlers.opt_out(session, d.recipient, d.provider or settings.sms_provider, now)
            else:
                d.last_error = attempt.error = str(error)[:2000]
                if error.permanent or d.attempts >= settings.delivery_max_attempts:
                    d.status, attempt.outcome = "failed", "failed"
                    if d.need_id is not None:
                        emit(session, DeliveryFailed(**handlers.event_fields(d, now), error=d.last_error))
                    handlers.fall_back_to_email(session, d, now)
                else:
                    retry_at = now + domain.retry_delay(d.attempts, settings.delivery_retry_base_s,
                                                        settings.delivery_retry_max_s, error.retry_after_s)
                    if d.quiet_timezone:
                        retry_at, d.held_reason = handlers.quiet_time(d, retry_at)
                    d.next_attempt_at, attempt.outcome, attempt.retry_at = retry_at, "retry", retry_at
            session.add(d)
            session.add(attempt)


class EmailChannel:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.pool = smtp.SmtpPool(smtp.SmtpTarget.from_url(settings.smtp_url))

    def message(self, batch: list[Delivery]):
        first = batch[0]
        sender = self.settings.mail_from
        if len(batch) == 1 and first.held_reason != "digest":
            return smtp.build_message(sender=sender, to=first.recipient, subject=first.subject,
                                          text=first.body_text, html=first.body_html, reply_to=first.reply_to,
                                          message_id=smtp.message_id(first.id, sender), language=first.language)
        items = [json.loads(d.facts) for d in batch]
        for item in items:
            item["respond_by"] = datetime.fromisoformat(item["respond_by"])
        items.sort(key=lambda item: item["respond_by"])
        rendered = render_email("digest", recipient_name=items[0]["recipient_name"], items=items)
        return smtp.build_message(sender=sender, to=first.recipient, subject=rendered.subject, text=rendered.text,
                                      html=rendered.html, reply_to=None, message_id=smtp.message_id(
                                          f"digest-{first.id}", sender))

    async def send(self, batch: list[Delivery], db) -> Outcome:
        try:
            return Outcome(sent=await self.pool.send(self.message(batch)))
        except SendError as exc:
            return Outcome(error=exc)

    async def close(self) -> None:
        await self.pool.close()


class SmsChannel:
    def __init__(self, settings) -> None:
        self.provider = sms_provider(settings)

    async def send(self, batch: list[Delivery], db) -> Outcome:
        [d] = batch
        if await anyio.to_thread.run_sync(is_suppressed, db, d.recipient):  # STOP came after it was queued
            return Outcome(suppressed="opted_out")
        try:
            return Outcome(sent=await self.provider.send(d.recipient, d.body_text, d.id))
        except SendError as exc:
            return Outcome(error=exc)

    async def close(self) -> None:
        await self.provider.close()


def is_suppressed(db, phone: str) -> bool:
    with db.transaction() as session:
        return session.get(SmsSuppression, phone) is not None


async def send_one(svc, out, batch: list[Delivery], channel: str) -> None:
    try:
        outcome = await out.send(batch, svc.db)
    except Exception as exc:  # noqa: BLE001 - a bug in one message must not stop the others; retried, then failed
        log.exception("%s delivery %s could not be prepared", channel, batch[0].id)
        outcome = Outcome(error=SendError(f"{type(exc).__name__}: {exc}"))
    if outcome.error is not None:
        log.warning("%s delivery %s (%s) attempt %d failed: %s", channel, batch[0].id, batch[0].kind,
                    batch[0].attempts, outcome.error)
    await anyio.to_thread.run_sync(record_outcome, svc.db, [d.id for d in batch], svc.clock(), outcome, svc.settings)


async def send_forever(svc, wake: asyncio.Event, channel: str) -> None:
    out = EmailChannel(svc.settings) if channel == "email" else SmsChannel(svc.settings)
    try:
        while True:
            wake.clear()
            try:
                batches = await anyio.to_thread.run_sync(lease_due, svc.db, svc.clock(), channel)
                for batch in batches:
                    await send_one(svc, out, batch, channel)
            except Exception:  # noqa: BLE001 - the database may be away a moment; leases free what was taken
                log.exception("%s sender: a round failed; trying again in a second", channel)
                await asyncio.sleep(1)
                continue
            if batches:
                svc.bus.relay.wake()
                continue
            try:
                await asyncio.wait_for(wake.wait(), svc.settings.poll_ms / 1000)
            except TimeoutError:
                pass
    finally:
        with anyio.CancelScope(shield=True):
            await out.close()
