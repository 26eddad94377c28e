"""The senders: one per channel takes the due deliveries (handlers.lease_due_deliveries: leased, so replicas
never send one twice while it is in hand), sends them through providers/, and records each attempt with what came of
it (handlers.record_send_outcomes, a few messages per transaction).

A sender is three kinds of task on one queue each, so that talking to the provider and writing to the database never
wait for each other: the leaser takes the due deliveries (a short write transaction) whenever fewer than `in_flight`
messages are left to send; `in_flight` workers each send one message at a time (email: one reused SMTP connection
each, RELAIS_SMTP_CONNECTIONS of them); the recorder writes the outcomes, up to RECORD_EVERY per transaction: while
messages are in hand it waits for theirs, and when the last one is out it lingers (RECORD_LINGER_S) for more, so
messages sent one by one are recorded a few at a time. No transaction is open while a message is on the wire: the
leased rows are what keeps replicas (and this sender's next lease) off a message in hand; a sender that stops
records the outcomes it holds before it ends, or their messages would be sent again once their lease ran out.

The schedule lives in the database (`delivery.next_attempt_at`): a retry after backoff, a message held for
quiet hours or for a contact's daily digest all wait there, so a restart forgets none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from functools import partial

import anyio

from services.notifications import handlers, views
from services.notifications.handlers import Outcome
from services.notifications.providers import sms_provider, smtp
from services.notifications.providers.base import SendError
from services.notifications.render import render_email
from services.notifications.store import Delivery
from shared.messaging import LINGER_MS
from shared.queues import LAG_COUNT_CAP, PUSH_BACK_CHECK_S, UNSENT_KEYS, UNSENT_TTL_S

log = logging.getLogger("relais.notifications.sender")


class EmailChannel:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.in_flight = settings.smtp_connections
        self.pool = smtp.SmtpPool(smtp.SmtpTarget.from_url(settings.smtp_url), size=self.in_flight)

    def message(self, batch: list[Delivery]):
        first = batch[0]
        sender = self.settings.mail_from
        if len(batch) == 1 and first.held_reason != "digest":
            return smtp.build_message(
                sender=sender,
                to=first.recipient,
                subject=first.subject,
                text=first.body_text,
                html=first.body_html,
                reply_to=first.reply_to,
                message_id=smtp.message_id(first.id, sender),
                language=first.language,
            )
        items = []
        for d in batch:
            assert d.facts is not None  # a digest's deliveries keep their facts (handlers.queue_for_staff)
            items.append(json.loads(d.facts))
        for item in items:
            item["respond_by"] = datetime.fromisoformat(item["respond_by"])
        items.sort(key=lambda item: item["respond_by"])
        # Digests queued before their facts named the deployment get the render's default.
        named = {"deployment": items[0]["deployment"]} if "deployment" in items[0] else {}
        rendered = render_email("digest", recipient_name=items[0]["recipient_name"], items=items, **named)
        return smtp.build_message(
            sender=sender,
            to=first.recipient,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            reply_to=None,
            message_id=smtp.message_id(f"digest-{first.id}", sender),
        )

    async def send(self, batch: list[Delivery], db) -> Outcome:
        try:
            return Outcome(sent=await self.pool.send(self.message(batch)))
        except SendError as exc:
            return Outcome(error=exc)

    async def close(self) -> None:
        await self.pool.close()


class SmsChannel:
    in_flight = 1  # SMS as before: one request at a time to the provider

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
    with db.read() as session:
        return views.is_suppressed(session, phone)


RECORD_EVERY = 10  # outcomes written per transaction: a crash before it may send these messages again, never more
# When no other message is in hand, the recorder waits this long for more outcomes (or RECORD_EVERY of them): one
# transaction for the messages of a quarter second, not one each (nobody waits for the outcome, only for the email).
RECORD_LINGER_S = LINGER_MS / 1000


async def send_one(svc, out, batch: list[Delivery], channel: str) -> Outcome:
    """Send one message (one delivery, or a digest's), and say what came of it; recorded by `record`."""
    try:
        outcome = await out.send(batch, svc.db)
    except Exception as exc:  # noqa: BLE001 - a bug in one message must not stop the others; retried, then failed
        log.exception("%s delivery %s could not be prepared", channel, batch[0].id)
        outcome = Outcome(error=SendError(f"{type(exc).__name__}: {exc}"))
    if outcome.error is not None:
        log.warning(
            "%s delivery %s (%s) attempt %d failed: %s",
            channel,
            batch[0].id,
            batch[0].kind,
            batch[0].attempts,
            outcome.error,
        )
    return outcome


async def record(svc, sent: list[tuple[list[str], Outcome]]) -> None:
    """Write the outcomes of a few messages in one transaction (the sender then waits once for the database's
    writer, which the consumer's batches also take); if that fails, each message's outcome alone, so one that
    cannot be recorded leaves only its own deliveries leased (sent again after the lease)."""
    now = svc.clock()
    try:
        await anyio.to_thread.run_sync(
            partial(handlers.record_send_outcomes, svc.db, sent, now=now, settings=svc.settings)
        )
    except Exception:
        if len(sent) == 1:
            raise
        for ids, outcome in sent:
            await anyio.to_thread.run_sync(
                partial(handlers.record_send_outcome, svc.db, ids, outcome, now=now, settings=svc.settings)
            )


async def _record_or_say(
    svc, channel: str, sent: list[tuple[list[str], Outcome]], held: dict[str, datetime | None]
) -> None:
    try:
        await record(svc, sent)
    except Exception:  # noqa: BLE001 - their leases free them: sent again after handlers.LEASE
        log.exception("%s sender: %d outcomes could not be recorded", channel, len(sent))
    finally:
        for ids, _ in sent:
            for i in ids:
                held.pop(i, None)


class UnsentGauge:
    """Tells intake how many messages of a channel wait here to be sent (UNSENT_KEYS, in Redis), so that its
    push-back counts them: intake sees the streams, not this database, and under a sustained load this queue was the
    longest of the pipeline (docs/front-desk.md). A task of the sender counts every PUSH_BACK_CHECK_S from the
    moment it leases messages until the count is back to 0 (a COUNT of at most LAG_COUNT_CAP rows of the
    due-deliveries index); an idle sender counts nothing. The figure is kept UNSENT_TTL_S in Redis, so a stopped
    sender's last count goes away (its stream's lag is then what intake sees)."""

    def __init__(self, svc, channel: str) -> None:
        self.svc, self.channel = svc, channel
        self.key = svc.settings.key(UNSENT_KEYS[channel])
        self.backlog = asyncio.Event()  # set by the leaser when it took messages to send

    async def run(self) -> None:
        while True:
            await self.backlog.wait()
            try:
                unsent = await anyio.to_thread.run_sync(
                    partial(handlers.count_unsent, self.svc.db, self.channel, now=self.svc.clock(), cap=LAG_COUNT_CAP)
                )
                await self.svc.bus.redis_client.set(self.key, unsent, ex=UNSENT_TTL_S)
            except Exception as exc:  # noqa: BLE001 - a figure for intake's push-back: the sending goes on without it
                log.debug("%s sender: the count of messages not yet sent was not updated (%s)", self.channel, exc)
            else:
                if not unsent:
                    self.backlog.clear()
            await asyncio.sleep(PUSH_BACK_CHECK_S)


async def send_forever(svc, wake: asyncio.Event, channel: str) -> None:
    out = EmailChannel(svc.settings) if channel == "email" else SmsChannel(svc.settings)
    to_send: asyncio.Queue[list[Delivery]] = asyncio.Queue()
    outcomes: asyncio.Queue[tuple[list[str], Outcome]] = asyncio.Queue()
    room = asyncio.Event()  # set when few messages are left to send: time to lease more
    enough = asyncio.Event()  # set when RECORD_EVERY outcomes wait: the recorder stops lingering
    on_the_wire = 0
    # Leased here and not recorded yet (id -> end of its lease): the next leases leave them alone, even once their
    # lease seems over. Only those are named to the lease (none, but after a clock set forward), so its SQL stays one.
    held: dict[str, datetime | None] = {}
    unsent = UnsentGauge(svc, channel)

    def in_hand() -> bool:
        return bool(on_the_wire or not to_send.empty())

    async def sending() -> None:
        nonlocal on_the_wire
        while True:
            batch = await to_send.get()
            if to_send.qsize() < out.in_flight:
                room.set()
            on_the_wire += 1
            try:
                outcome = await send_one(svc, out, batch, channel)
            finally:
                on_the_wire -= 1
            outcomes.put_nowait(([d.id for d in batch], outcome))
            if outcomes.qsize() >= RECORD_EVERY:
                enough.set()

    async def recording() -> None:
        sent: list[tuple[list[str], Outcome]] = []
        try:
            while True:
                sent.append(await outcomes.get())
                if not in_hand() and outcomes.qsize() + 1 < RECORD_EVERY:
                    enough.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(enough.wait(), RECORD_LINGER_S)
                # RECORD_EVERY outcomes per transaction, or fewer when no other message is in hand.
                while len(sent) < RECORD_EVERY and (not outcomes.empty() or in_hand()):
                    sent.append(await outcomes.get())
                await _record_or_say(svc, channel, sent, held)
                sent = []
                svc.bus.relay.wake(linger=True)  # delivery.sent: nobody waits for it to the second
        finally:  # stopping: the messages already sent are recorded, or they would go again after their lease
            with anyio.CancelScope(shield=True):
                while sent or not outcomes.empty():
                    while not outcomes.empty():
                        sent.append(outcomes.get_nowait())
                    await _record_or_say(svc, channel, sent, held)
                    sent = []

    try:
        async with anyio.create_task_group() as tasks:
            for _ in range(out.in_flight):
                tasks.start_soon(sending)
            tasks.start_soon(recording)
            tasks.start_soon(unsent.run)
            while True:
                wake.clear()
                room.clear()
                now = svc.clock()
                over = [i for i, until in held.items() if until is None or until <= now]
                try:
                    batches = await anyio.to_thread.run_sync(
                        partial(handlers.lease_due_deliveries, svc.db, channel, now=now, held=over)
                    )
                except Exception:  # noqa: BLE001 - the database may be away a moment; leases free what was taken
                    log.exception("%s sender: could not take the due deliveries; trying again in a second", channel)
                    await asyncio.sleep(1)
                    continue
                for batch in batches:
                    held.update((d.id, d.leased_until) for d in batch)
                    to_send.put_nowait(batch)
                if batches:
                    unsent.backlog.set()
                if to_send.qsize() >= out.in_flight:
                    await room.wait()  # the next lease when the workers are about to need it
                if len(batches) >= handlers.BATCH:  # maybe more are due
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), svc.settings.poll_ms / 1000)
                except TimeoutError:
                    pass
    finally:
        with anyio.CancelScope(shield=True):
            await out.close()
