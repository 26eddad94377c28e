"""The notifications service over real Redis, a real SMTP server (aiosmtpd) and real HTTP servers on loopback
speaking Twilio's and Brevo's APIs. Events are put on the streams as referral and intake would publish them."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
import yaml
from sqlmodel import col, select

from services.notifications import handlers, sender
from services.notifications.providers import smtp
from services.notifications.providers.twilio import twilio_signature
from services.notifications.store import (
    TABLES,
    Delivery,
    DeliveryAttempt,
    NeedPerson,
    SmsSuppression,
    WaitingForPerson,
)
from shared.db import Database, OutboxMessage, ProcessedEvent
from shared.events import (
    STREAM_OF,
    AccessLinkRequested,
    ReferralAccepted,
    ReferralAssigned,
    ReferralBreached,
    ReferralReminderDue,
    new_id,
    utcnow,
)
from shared.messaging import stream_fields
from shared.queues import UNSENT_KEYS, UNSENT_TTL_S
from shared.signin import link_for_request, new_sign_in_request, sign_in_reference
from shared.testing import (
    DESK_EMAIL,
    MailSink,
    clock_start,
    directory_data,
    free_port,
    need_recorded,
    self_signed_certificate,
    wait_for,
)
from tests.helpers import xrange_text

PHONE = "+33612345678"


# --- the outside world ---------------------------------------------------------------------------------


class Sink(MailSink):
    """The test SMTP server, which can also refuse chosen recipients and counts connections."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()
        self.sessions: set[int] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802, ANN001
        self.sessions.add(id(session))
        if address.lower() in self.refuse:
            return f"550 5.1.1 <{address}>: no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def sink():
    s = Sink()
    s.controller.start()
    yield s
    s.controller.stop()


class Provider:
    """An SMS provider's API on loopback: answers each POST with the next scripted (status, headers, body), then
    with `default`; keeps every request."""

    def __init__(self, default: tuple[int, dict, dict]) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict, dict]] = []
        self.default = default
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                provider.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, payload = provider.script.pop(0) if provider.script else provider.default
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def form(self, i: int) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.requests[i]["body"].decode()).items()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def twilio():
    p = Provider((201, {}, {"sid": "SMdefault", "status": "queued"}))
    yield p
    p.close()


@pytest.fixture
def brevo():
    p = Provider((201, {}, {"messageId": 1}))
    yield p
    p.close()


FAST_RETRIES = {"delivery_retry_base_s": 0.02, "delivery_retry_max_s": 0.1}


def with_twilio(settings, sink, twilio):
    return settings.model_copy(
        update={
            "smtp_url": sink.url,
            "sms_provider": "twilio",
            "twilio_account_sid": "AC0123",
            "twilio_auth_token": "tw-token",
            "twilio_from": "+33700000000",
            "twilio_base_url": twilio.url,
            **FAST_RETRIES,
        }
    )


# --- events as the other services publish them -------------------------------------------------------


def publish(settings, *events) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for event in events:
            row = OutboxMessage(
                event_id=event.event_id,
                stream=STREAM_OF[event.type],
                type=event.type,
                payload=event.model_dump_json(),
                created_at=utcnow(),
            )
            client.xadd(settings.key(row.stream), stream_fields(row))
    finally:
        client.close()


def recorded(service, person: dict | None = None, recorded_at: datetime | None = None, need_id: str | None = None):
    return need_recorded(
        service.svc.personal_data,
        need_id=need_id or new_id(),
        library_id="chatelet",
        category="caf",
        postal_code="76000",
        urgency="normal",
        recorded_at=recorded_at or clock_start(),
        person=person,
    )


def referral_fields(need_id: str, referral_id: str | None = None, sequence: int = 1) -> dict:
    return dict(
        need_id=need_id,
        sequence=sequence,
        referral_id=referral_id or new_id(),
        partner_id="caf-76",
        library_id="chatelet",
        category="caf",
    )


def assigned(need_id: str, referral_id: str | None = None) -> ReferralAssigned:
    return ReferralAssigned(
        **referral_fields(need_id, referral_id),
        contact_id="caf-ref",
        respond_by=clock_start() + timedelta(hours=48),
        routed_because="préfixe « 76 » de CAF",
    )


def deliveries(service, **where) -> list[Delivery]:
    with service.svc.db.transaction() as session:
        query = select(Delivery)
        for name, value in where.items():
            query = query.where(getattr(Delivery, name) == value)
        return list(session.exec(query.order_by(col(Delivery.created_at), col(Delivery.id))).all())


def attempts(service, delivery_id: str) -> list[DeliveryAttempt]:
    with service.svc.db.transaction() as session:
        return list(
            session.exec(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(col(DeliveryAttempt.number))
            ).all()
        )


def settled(service, **where) -> Delivery | None:
    """The delivery matching `where` once it left `queued`."""
    found = [d for d in deliveries(service, **where) if d.status != "queued"]
    return found[0] if found else None


def stream_events(settings, stream: str) -> list[dict]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        return xrange_text(client, settings.key(stream))
    finally:
        client.close()


# --- email ---------------------------------------------------------------------------------------------


def test_emails_have_both_parts_reply_to_the_desk_a_message_id_and_share_one_connection(settings, sink, start_service):
    # One connection in the pool: the three messages share it (the next test has several in flight).
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url, "smtp_connections": 1}))
    need = recorded(notif, {"email": "personne@example.org", "preferred_channel": "email", "language": "en"})
    handoff = assigned(need.need_id)
    reminder = ReferralReminderDue(
        **referral_fields(need.need_id, handoff.referral_id, 2),
        contact_id="caf-ref",
        respond_by=handoff.respond_by,
        reminder_number=1,
    )
    publish(settings, need, handoff, reminder)

    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 2 and sink.to("personne@example.org"))
    [d] = deliveries(notif, kind="handoff")
    msg = next(m["message"] for m in sink.to("referent@caf.test.example") if m["subject"].startswith("Nouvelle"))
    assert msg["Reply-To"] == "accueil@chatelet.test.example"
    assert msg["Message-ID"] == f"<{d.id}@localhost>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"
    text, html = msg.get_body(("plain",)).get_content(), msg.get_body(("html",)).get_content()
    assert "/r/" in text and 'href="http://' in html and "Bibliothèque du Châtelet" in text
    assert "Dossier APL" not in text + html  # what the need is about stays in Relais

    [to_person] = sink.to("personne@example.org")
    assert to_person["subject"].startswith("Your request has been passed on: CAF de la Seine-Maritime will contact you")
    assert to_person["message"]["Content-Language"] == "en"
    assert to_person["message"]["Reply-To"] == "accueil@chatelet.test.example"
    assert len(sink.sessions) == 1  # three messages, one SMTP connection


def test_a_handoff_read_before_its_need_reaches_the_person_once_their_contact_arrives(settings, sink, start_service):
    # need.recorded and referral.assigned come on two streams: here the handoff is read first, alone.
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url}))
    need = recorded(notif, {"email": "personne@example.org", "preferred_channel": "email"})
    handoff = assigned(need.need_id)
    publish(settings, handoff)

    assert wait_for(lambda: settled(notif, kind="handoff"))  # the partner's email does not wait for the person
    with notif.svc.db.read() as session:
        [waiting] = session.exec(select(WaitingForPerson).where(WaitingForPerson.need_id == need.need_id)).all()
    assert waiting.event_id == handoff.event_id and not deliveries(notif, kind="person_confirmation")

    publish(settings, need)
    to_person = wait_for(lambda: settled(notif, kind="person_confirmation"))
    assert (to_person.status, to_person.channel, to_person.event_id) == ("sent", "email", handoff.event_id)
    with notif.svc.db.read() as session:
        assert not session.exec(select(WaitingForPerson)).all()
        person = session.get_one(NeedPerson, need.need_id)
    assert (person.email, person.preferred_channel) == ("personne@example.org", "email")
    assert len(sink.to("personne@example.org")) == 1


def test_a_sign_in_link_is_emailed_but_kept_out_of_the_contracts_deliveries_and_events(settings, sink, start_service):
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url}))
    request = new_sign_in_request("intake", "desk", now=notif.svc.clock())
    link = AccessLinkRequested(
        user_id="desk", service="intake", reference=sign_in_reference(settings, request), expires_at=request.expires_at
    )
    publish(settings, link, assigned(new_id()))

    [mail] = wait_for(lambda: sink.to(DESK_EMAIL))
    assert link_for_request(settings, request) in mail["message"].get_body(("plain",)).get_content()
    assert wait_for(lambda: settled(notif, kind="sign_in")).status == "sent"
    assert wait_for(lambda: settled(notif, kind="handoff")).status == "sent"
    ops = notif.client("ops")
    # /deliveries lists the contract's kinds; a sign-in (about no need) only when asked for by its kind.
    assert [d["kind"] for d in ops.get("/deliveries").json()["items"]] == ["handoff"]
    assert [d["kind"] for d in ops.get("/deliveries", params={"kind": "sign_in"}).json()["items"]] == ["sign_in"]
    # Every delivery event carries a need: the sign-in's outcome is not one.
    sent = wait_for(lambda: [e for e in stream_events(settings, "deliveries") if e["type"] == "delivery.sent"])
    assert len(sent) == 1 and json.loads(json.loads(sent[0]["__data__"])["data"])["need_id"]


def test_a_server_that_answers_451_twice_is_retried_and_the_message_goes_once(settings, sink, start_service):
    sink.replies = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url, **FAST_RETRIES}))
    publish(settings, assigned(new_id()))  # need.recorded not seen: only the partner is written to

    d = wait_for(lambda: settled(notif, kind="handoff"))
    assert (d.status, d.attempts) == ("sent", 3)
    log = attempts(notif, d.id)
    assert [a.outcome for a in log] == ["retry", "retry", "sent"]
    assert log[0].error is not None and log[0].retry_at is not None
    assert "451" in log[0].error and log[0].retry_at > log[0].at
    assert len(sink.to("referent@caf.test.example")) == 1
    detail = notif.client("ops").get(f"/deliveries/{d.id}").json()
    assert [a["outcome"] for a in detail["attempt_log"]] == ["retry", "retry", "sent"]
    assert (detail["status"], detail["provider"], detail["next_attempt_at"]) == ("sent", "smtp", None)


def test_550_on_one_recipient_fails_that_one_at_once_and_the_others_are_sent(settings, sink, start_service):
    sink.refuse = {"coordination@test.example"}
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url, **FAST_RETRIES}))
    need_id = new_id()
    publish(settings, ReferralBreached(**referral_fields(need_id), contact_id="caf-ref", respond_by=notif.svc.clock()))

    refused = wait_for(lambda: settled(notif, recipient="coordination@test.example"))
    assert (refused.status, refused.attempts) == ("failed", 1) and "550" in refused.last_error
    assert wait_for(lambda: settled(notif, recipient="accueil@chatelet.test.example")).status == "sent"
    assert len(sink.to("accueil@chatelet.test.example")) == 1 and not sink.to("coordination@test.example")
    failed = wait_for(lambda: [e for e in stream_events(settings, "deliveries") if e["type"] == "delivery.failed"])
    assert [json.loads(json.loads(e["__data__"])["data"])["delivery_id"] for e in failed] == [refused.id]
    stats = notif.client("ops").get("/deliveries/stats").json()
    assert (stats["totals"], stats["sms_segments"]) == ({"failed": 1, "sent": 1}, 0)
    assert [(f["recipient_role"], f["attempts"]) for f in stats["latest_failures"]] == [("escalation", 1)]
    assert [
        d["id"]
        for d in notif.client("ops").get("/deliveries", params={"status": "failed", "kind": "breach"}).json()["items"]
    ] == [refused.id]


def test_a_round_of_handoffs_is_sent_once_each_and_its_outcomes_recorded_a_few_messages_per_transaction(
    settings, sink, start_service
):
    handoffs = [assigned(new_id()) for _ in range(12)]
    publish(settings, *handoffs)  # before the service reads: one batch, one transaction queues the twelve
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url}))

    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 12)
    assert wait_for(lambda: all(d.status == "sent" for d in deliveries(notif, kind="handoff")))
    sent = deliveries(notif, kind="handoff")
    assert sorted(str(d.referral_id) for d in sent) == sorted(h.referral_id for h in handoffs)
    log = [attempts(notif, d.id) for d in sent]
    assert all([a.outcome for a in one] == ["sent"] for one in log)
    # One transaction queued the twelve, so at most two rounds lease them (a round's `now` may predate that commit),
    # and each round writes its outcomes sender.RECORD_EVERY (10) at a time: at most four transactions, not twelve.
    assert len({one[0].at for one in log}) <= 4
    assert len(sink.to("referent@caf.test.example")) == 12  # and no message twice


@pytest.mark.postgres  # two senders at once: SKIP LOCKED
def test_a_lease_takes_each_due_delivery_once_oldest_first_and_again_once_its_lease_ran_out_unless_held(settings):
    db = Database(settings.notifications_database_url or "", TABLES)
    now = clock_start()

    def queued(due: datetime, status: str = "queued") -> Delivery:
        return Delivery(
            id=new_id(),
            event_id=new_id(),
            kind="handoff",
            channel="email",
            recipient_role="partner",
            recipient="referent@caf.test.example",
            subject="Nouvelle orientation",
            body_text="Bonjour",
            status=status,
            next_attempt_at=due,
            created_at=now,
        )

    due = [queued(now - timedelta(minutes=m)) for m in (1, 6, 3, 5, 2, 4)]
    with db.transaction() as session:
        session.add_all([*due, queued(now + timedelta(hours=1)), queued(now - timedelta(hours=1), status="sent")])
    try:
        # Two senders at once (replicas: on PostgreSQL the rows one locks are skipped by the other), three each.
        with ThreadPoolExecutor(2) as pool:
            taken = list(pool.map(lambda _: handlers.lease_due_deliveries(db, "email", now=now, limit=3), range(2)))
        leased = [[d for [d] in messages] for messages in taken]
        oldest_first = sorted(due, key=lambda d: d.next_attempt_at)
        assert sorted(map(len, leased)) == [3, 3]
        assert sorted(d.id for one in leased for d in one) == sorted(d.id for d in due)  # each once, none else
        for one in leased:  # each sender's share, oldest first: the three oldest went to one of them
            assert [d.next_attempt_at for d in one] == sorted(d.next_attempt_at for d in one)
        assert {d.id for d in oldest_first[:3]} in [{d.id for d in one} for one in leased]
        assert {(d.attempts, d.leased_until) for one in leased for d in one} == {(1, now + handlers.LEASE)}
        assert handlers.lease_due_deliveries(db, "email", now=now + timedelta(minutes=1)) == []  # all in hand

        later = now + handlers.LEASE + timedelta(seconds=1)  # their sender died: the leases ran out
        held = {oldest_first[0].id}  # but this sender sent that one: its outcome waits to be written
        again = [d for [d] in handlers.lease_due_deliveries(db, "email", now=later, held=held)]
        assert [d.id for d in again] == [d.id for d in oldest_first[1:]]
        assert {(d.attempts, d.leased_until) for d in again} == {(2, later + handlers.LEASE)}
    finally:
        db.dispose()


def test_messages_sent_one_by_one_are_recorded_together_and_a_stopping_sender_records_what_it_holds(
    settings, sink, start_service, monkeypatch
):
    monkeypatch.setattr(sender, "RECORD_LINGER_S", 600.0)  # ten minutes: only RECORD_EVERY outcomes or a stop end it
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url}))
    first, second = assigned(new_id()), assigned(new_id())
    publish(settings, first)
    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 1)
    publish(settings, second)  # sent alone too, while the first one's outcome waits
    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 2)
    time.sleep(1)  # the sink's "250 OK" reaches the sender: both outcomes are in the recorder's hands
    assert [(d.status, d.leased_until is not None) for d in deliveries(notif, kind="handoff")] == [("queued", True)] * 2

    notif.stop()  # the lifespan ends: the sender records what it holds before the database is closed

    handoffs = deliveries(notif, kind="handoff")
    assert [(d.status, d.leased_until) for d in handoffs] == [("sent", None)] * 2  # not sent again after the lease
    log = [attempts(notif, d.id) for d in handoffs]
    assert [[a.outcome for a in one] for one in log] == [["sent"], ["sent"]]
    assert len({one[0].at for one in log}) == 1  # one transaction for the two
    assert len(sink.to("referent@caf.test.example")) == 2


class GatedSink(Sink):
    """Holds each message in DATA until `gate` messages are in DATA at once (or a safety limit passed, which the
    test then reports), and meanwhile takes the notifications database's write lock from another connection: a
    sender that kept a write transaction open while talking SMTP would make that wait, and the gate never open."""

    def __init__(self, gate: int, database: str | None) -> None:  # database: the SQLite file, None on PostgreSQL
        super().__init__()
        self.gate, self.database = gate, database
        self.in_data = self.most_in_data = 0
        self.opened: asyncio.Event | None = None
        self.gate_forced = False
        self.lock_waits: list[str] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001
        if self.opened is None:
            self.opened = asyncio.Event()
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        if self.database is not None:
            await asyncio.to_thread(self._take_write_lock)
        if self.in_data >= self.gate:
            self.opened.set()
        try:
            await asyncio.wait_for(self.opened.wait(), 20)
        except TimeoutError:
            self.gate_forced = True
            self.opened.set()
        self.in_data -= 1
        return await super().handle_DATA(server, session, envelope)

    def _take_write_lock(self) -> None:
        import sqlite3

        assert self.database is not None
        conn = sqlite3.connect(self.database, timeout=20, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            self.lock_waits.append(str(exc))
        finally:
            conn.close()


def test_several_emails_are_in_flight_at_once_each_sent_once_and_recorded_outside_smtp(settings, start_service):
    import sqlalchemy as sa

    handoffs = [assigned(new_id()) for _ in range(12)]
    publish(settings, *handoffs)  # before the service reads: one transaction queues the twelve, one lease takes them
    url = settings.notifications_database_url or ""
    sink = GatedSink(gate=4, database=sa.make_url(url).database if url.startswith("sqlite") else None)
    sink.controller.start()
    try:
        four = settings.model_copy(update={"smtp_url": sink.url, "smtp_connections": 4})
        notif = start_service("notifications", four)
        assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 12, timeout=60)
        assert wait_for(lambda: all(d.status == "sent" for d in deliveries(notif, kind="handoff")), timeout=30)
    finally:
        sink.controller.stop()
    # Four messages were in DATA at once, on four connections, and none waited for the others to be recorded.
    assert (sink.most_in_data, sink.gate_forced, sink.lock_waits) == (4, False, [])
    assert len(sink.sessions) == 4
    sent = deliveries(notif, kind="handoff")
    assert sorted(str(d.referral_id) for d in sent) == sorted(h.referral_id for h in handoffs)
    assert all([a.outcome for a in attempts(notif, d.id)] == ["sent"] for d in sent)
    # Each message once: twelve Message-IDs, one per delivery.
    ids = [m["message"]["Message-ID"] for m in sink.to("referent@caf.test.example")]
    assert sorted(ids) == sorted(f"<{d.id}@localhost>" for d in sent)

    def delivery_sent() -> list[dict]:
        return [e for e in stream_events(settings, "deliveries") if e["type"] == "delivery.sent"]

    assert len(wait_for(lambda: len(delivery_sent()) == 12 and delivery_sent())) == 12  # one event each


class HeldSink(Sink):
    """Holds every message in DATA until the test releases them (at most 60 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001
        await asyncio.to_thread(self.released.wait, 60)
        return await super().handle_DATA(server, session, envelope)


def test_a_sender_with_messages_waiting_tells_intakes_push_back_how_many_until_they_are_sent(settings, start_service):
    # Intake sees the streams, not notifications' database: the messages queued here and not yet sent are counted
    # for its push-back through Redis (shared.queues.UNSENT_KEYS), while there are more than one lease takes.
    handoffs = [assigned(new_id()) for _ in range(handlers.BATCH + 10)]
    publish(settings, *handoffs)
    held = HeldSink()
    held.controller.start()
    r = redis.Redis.from_url(settings.redis_url)
    key = settings.key(UNSENT_KEYS["email"])
    try:
        notif = start_service(
            "notifications", settings.model_copy(update={"smtp_url": held.url, "smtp_connections": 1})
        )
        assert wait_for(lambda: r.get(key) == str(len(handoffs)).encode(), timeout=30)  # one on the wire: none sent
        assert 0 < r.ttl(key) <= UNSENT_TTL_S
        held.released.set()
        assert wait_for(lambda: len(held.to("referent@caf.test.example")) == len(handoffs), timeout=60)
        assert wait_for(lambda: r.get(key) == b"0", timeout=30)  # all recorded as sent
        assert all(d.status == "sent" for d in deliveries(notif, kind="handoff"))
    finally:
        held.released.set()
        held.controller.stop()
        r.close()


def test_an_event_wakes_only_the_senders_of_the_channels_it_queued_a_message_on(
    settings, sink, twilio, start_service, monkeypatch
):
    # Each woken sender leases (a write transaction): waking both after every event made three empty leases of the
    # four a need caused. No poll here: only a wake-up makes a sender lease after its first lease at start.
    leases: Counter[str] = Counter()
    lease = handlers.lease_due_deliveries

    def counted(db, channel: str, **options):  # noqa: ANN001
        leases[channel] += 1
        return lease(db, channel, **options)

    monkeypatch.setattr(handlers, "lease_due_deliveries", counted)
    notif = start_service("notifications", with_twilio(settings, sink, twilio).model_copy(update={"poll_ms": 600_000}))
    assert wait_for(lambda: leases == {"email": 1, "sms": 1})

    def processed(event) -> bool:
        with notif.svc.db.read() as session:
            return session.get(ProcessedEvent, ("notifications", event.event_id)) is not None

    quiet = recorded(notif)  # no contact for the person: nothing to send (a message recorded as suppressed)
    publish(settings, quiet)
    assert wait_for(lambda: processed(quiet))
    assert leases == {"email": 1, "sms": 1}
    publish(settings, assigned(quiet.need_id))  # the partner's email
    assert wait_for(lambda: settled(notif, kind="handoff"))
    assert leases == {"email": 2, "sms": 1}
    texted = recorded(notif, {"phone": PHONE, "preferred_channel": "sms"})  # the person's SMS, with the partner's email
    publish(settings, texted, assigned(texted.need_id))
    sms = wait_for(lambda: settled(notif, kind="person_confirmation", need_id=texted.need_id))
    assert (sms.channel, sms.status) == ("sms", "sent")
    assert wait_for(lambda: len(deliveries(notif, kind="handoff", status="sent")) == 2)
    assert leases == {"email": 3, "sms": 2}


# --- SMS -----------------------------------------------------------------------------------------------


def signed_twilio_post(notif, params: dict[str, str], token: str = "tw-token") -> httpx.Response:
    url = f"{notif.url}/webhooks/sms/twilio"
    return httpx.post(url, data=params, headers={"X-Twilio-Signature": twilio_signature(token, url, params)})


def test_twilio_500_then_201_a_receipt_and_a_stop_reply(settings, sink, twilio, start_service):
    twilio.script = [
        (500, {}, {"code": 20500, "message": "Internal Server Error"}),
        (201, {}, {"sid": "SM0001", "status": "queued"}),
    ]
    notif = start_service("notifications", with_twilio(settings, sink, twilio))
    need = recorded(notif, {"phone": PHONE, "preferred_channel": "sms"})  # recorded just now: the person is at the desk
    handoff = assigned(need.need_id)
    publish(settings, need, handoff)

    sms = wait_for(lambda: settled(notif, kind="person_confirmation"))
    assert (sms.status, sms.channel, sms.attempts, sms.provider_message_id) == ("sent", "sms", 2, "SM0001")
    assert [a.outcome for a in attempts(notif, sms.id)] == ["retry", "sent"]
    assert (sms.sms_encoding, sms.sms_segments) == ("GSM-7", 2)
    request = twilio.requests[1]
    assert request["path"] == "/2010-04-01/Accounts/AC0123/Messages.json"
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(b"AC0123:tw-token").decode()
    form = twilio.form(1)
    assert (form["To"], form["From"]) == (PHONE, "+33700000000")
    assert form["StatusCallback"] == f"{notif.url}/webhooks/sms/twilio"
    assert form["Body"] == sms.body_text and "Chatelet" in form["Body"]

    receipt = {"MessageSid": "SM0001", "MessageStatus": "delivered", "To": PHONE, "AccountSid": "AC0123"}
    assert signed_twilio_post(notif, receipt, token="not-the-token").status_code == 403
    assert signed_twilio_post(notif, receipt).status_code == 200
    assert deliveries(notif, id=sms.id)[0].status == "delivered"

    assert (
        signed_twilio_post(
            notif, {"MessageSid": "SM9", "From": PHONE, "To": "+33700000000", "Body": "Stop"}
        ).status_code
        == 200
    )
    publish(settings, ReferralAccepted(**referral_fields(need.need_id, handoff.referral_id, 2)))
    answered = wait_for(lambda: settled(notif, kind="partner_answered", recipient_role="person"))
    assert (answered.status, answered.suppressed_reason) == ("suppressed", "opted_out")
    assert wait_for(lambda: sink.to("accueil@chatelet.test.example"))  # the desk is told as usual
    assert len(twilio.requests) == 2


def test_brevo_429_with_retry_after_a_receipt_and_an_arret_reply(settings, sink, brevo, start_service):
    brevo.script = [
        (429, {"Retry-After": "1"}, {"code": "too_many_requests", "message": "slow down"}),
        (201, {}, {"messageId": 4242}),
    ]
    notif = start_service(
        "notifications",
        settings.model_copy(
            update={
                "smtp_url": sink.url,
                "sms_provider": "brevo",
                "brevo_api_key": "xkeysib-test",
                "brevo_base_url": brevo.url,
                "sms_webhook_secret": "hook-secret",
                **FAST_RETRIES,
            }
        ),
    )
    need = recorded(notif, {"phone": PHONE, "preferred_channel": "sms"})
    publish(settings, need, assigned(need.need_id))

    sms = wait_for(lambda: settled(notif, kind="person_confirmation"), 20)
    assert (sms.status, sms.attempts, sms.provider, sms.provider_message_id) == ("sent", 2, "brevo", "4242")
    first = attempts(notif, sms.id)[0]
    assert first.outcome == "retry" and first.retry_at is not None
    assert first.retry_at - first.at >= timedelta(seconds=1)  # Retry-After honoured
    request = brevo.requests[1]
    assert request["path"] == "/v3/transactionalSMS/send" and request["headers"]["api-key"] == "xkeysib-test"
    body = json.loads(request["body"])
    assert (body["recipient"], body["type"], body["sender"]) == ("33612345678", "transactional", "Relais")
    assert body["webUrl"] == f"{notif.url}/webhooks/sms/brevo/hook-secret"

    assert httpx.post(f"{notif.url}/webhooks/sms/brevo/wrong", json={}).status_code == 403
    r = httpx.post(body["webUrl"], json={"id": 1, "to": "33612345678", "messageId": 4242, "msg_status": "delivered"})
    assert r.status_code == 204
    assert deliveries(notif, id=sms.id)[0].status == "delivered"

    r = httpx.post(
        f"{notif.url}/webhooks/sms/brevo",
        headers={"Authorization": "Bearer hook-secret"},
        json={"event": "replied", "from": "33612345678", "reply": "ARRÊT"},
    )
    assert r.status_code == 204
    with notif.svc.db.transaction() as session:
        assert session.get(SmsSuppression, PHONE).source == "brevo"


def test_a_400_fails_the_sms_at_once_and_the_person_gets_an_email_instead(settings, sink, twilio, start_service):
    twilio.script = [(400, {}, {"code": 21211, "message": f"The 'To' number {PHONE} is not a valid phone number."})]
    notif = start_service("notifications", with_twilio(settings, sink, twilio))
    need = recorded(notif, {"phone": PHONE, "email": "personne@example.org", "preferred_channel": "sms"})
    publish(settings, need, assigned(need.need_id))

    sms = wait_for(lambda: settled(notif, kind="person_confirmation", channel="sms"))
    assert (sms.status, sms.attempts) == ("failed", 1) and "21211" in sms.last_error
    mail = wait_for(lambda: settled(notif, kind="person_confirmation", channel="email"))
    assert (mail.status, mail.fallback_for) == ("sent", sms.id)
    [received] = wait_for(lambda: sink.to("personne@example.org"))
    assert received["subject"].startswith("Votre demande est transmise : CAF de la Seine-Maritime vous contactera")
    [failed] = wait_for(lambda: [e for e in stream_events(settings, "deliveries") if e["type"] == "delivery.failed"])
    error = json.loads(json.loads(failed["__data__"])["data"])["error"]
    assert "21211" in error and PHONE not in error and "[phone]" in error  # the provider's words, the number masked
    assert PHONE in sms.last_error  # kept for ops in notifications' own database
    assert len(twilio.requests) == 1


# --- once, whatever the replicas -------------------------------------------------------------------------


@pytest.mark.postgres  # unique constraints between replicas
def test_the_same_event_delivered_to_two_replicas_makes_one_message(settings, sink, start_service):
    settings = settings.model_copy(update={"smtp_url": sink.url})
    one = start_service("notifications", settings)
    two = start_service("notifications", settings.model_copy(update={"notifications_port": free_port()}))
    event = assigned(new_id())
    publish(settings, event, event)  # redelivered: two entries, one event id, one consumer group

    assert wait_for(lambda: sink.to("referent@caf.test.example"))
    client = redis.Redis.from_url(settings.redis_url)
    key = settings.key("referrals")
    last = client.xinfo_stream(key)["last-generated-id"]
    assert wait_for(lambda: (g := client.xinfo_groups(key)[0])["pending"] == 0 and g["last-delivered-id"] == last)
    client.close()

    # And the two replicas racing on one event in the same instant: one of them does it.
    race = assigned(new_id())
    barrier, done = threading.Barrier(2), []

    def handle(replica) -> None:
        svc = replica.svc
        barrier.wait()
        done.append(
            asyncio.run(
                svc.bus.process(
                    lambda s, e: handlers.on_referral_event(s, e, svc.directory, svc.clock(), lambda e: "http://lien"),
                    race,
                )
            )
        )

    threads = [threading.Thread(target=handle, args=(r,)) for r in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == [False, True]
    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 2)
    assert len(deliveries(one, kind="handoff")) == 2
    assert len(sink.to("referent@caf.test.example")) == 2


# --- time: quiet hours and digests, with the service's clock set by the test -----------------------------


@pytest.mark.postgres  # due times compared in SQL
def test_quiet_hours_and_the_daily_digest_wait_in_the_database_for_their_time(settings, sink, start_service, tmp_path):
    data = directory_data()
    data["partners"][0]["contacts"][0]["digest_at"] = "08:30"
    directory = tmp_path / "digest.yaml"
    directory.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    paris = ZoneInfo("Europe/Paris")
    now = [datetime(2026, 11, 23, 7, 0, tzinfo=paris).astimezone(UTC)]  # a Monday, 7 h in Paris
    notif = start_service(
        "notifications",
        settings.model_copy(update={"smtp_url": sink.url, "directory": directory}),
        clock=lambda: now[0],
    )  # the service's clock is the test's to move

    need = recorded(notif, {"phone": PHONE, "preferred_channel": "sms"}, recorded_at=now[0] - timedelta(hours=1))
    first, second = assigned(need.need_id), assigned(new_id())
    reminder = ReferralReminderDue(
        **referral_fields(new_id()), contact_id="caf-ref", respond_by=now[0] + timedelta(hours=10), reminder_number=1
    )
    publish(settings, need, first, second, reminder)

    # A reminder is never held back by a digest.
    [sent] = wait_for(lambda: sink.to("referent@caf.test.example"))
    assert sent["subject"].startswith("Relance")
    held = wait_for(
        lambda: [d for d in deliveries(notif, kind="handoff")] if len(deliveries(notif, kind="handoff")) == 2 else None
    )
    assert {(d.status, d.held_reason) for d in held} == {("queued", "digest")}
    assert {d.next_attempt_at for d in held} == {datetime(2026, 11, 23, 8, 30, tzinfo=paris)}
    [sms] = wait_for(lambda: deliveries(notif, kind="person_confirmation"))
    assert (sms.status, sms.held_reason) == ("queued", "quiet_hours")
    assert sms.next_attempt_at == datetime(2026, 11, 23, 8, 0, tzinfo=paris)

    now[0] = datetime(2026, 11, 23, 8, 1, tzinfo=paris).astimezone(UTC)
    assert wait_for(lambda: settled(notif, kind="person_confirmation")).status == "sent"  # the outbox provider
    assert [d.status for d in deliveries(notif, kind="handoff")] == ["queued", "queued"]

    now[0] = datetime(2026, 11, 23, 8, 31, tzinfo=paris).astimezone(UTC)
    assert wait_for(lambda: len(sink.to("referent@caf.test.example")) == 2)
    digest = sink.to("referent@caf.test.example")[1]
    assert digest["subject"].startswith("2 nouvelles demandes à traiter")
    text = digest["message"].get_body(("plain",)).get_content()
    assert first.referral_id in text and second.referral_id in text
    # The sink has the message before the sender records the outcome: wait for the record too.
    sent_handoffs = wait_for(
        lambda: (
            [d for d in deliveries(notif, kind="handoff") if d.status == "sent"]
            if {d.status for d in deliveries(notif, kind="handoff")} == {"sent"}
            else None
        )
    )
    assert sent_handoffs, [(d.status, d.held_reason) for d in deliveries(notif, kind="handoff")]
    assert len(sent_handoffs) == 2 and len({d.digest_of for d in sent_handoffs}) == 1


# --- the SMTP connection: STARTTLS or TLS, authentication, one connection reused -------------------------


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    import shutil

    assert shutil.which("openssl"), "the openssl command makes the test certificate: install Debian's openssl"
    return self_signed_certificate(tmp_path)


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_the_pool_speaks_starttls_or_tls_logs_in_and_reuses_its_connection(scheme, certificate):
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001
        logins.append(auth_data.login)
        return AuthResult(success=auth_data.login == b"relais" and auth_data.password == b"p@ss/word")

    sink = Sink()
    # aiosmtpd counts only STARTTLS as TLS for AUTH; on an smtps port the whole connection is TLS already.
    options: dict[str, Any] = (
        {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
        if scheme == "smtp"
        else {"ssl_context": context, "auth_require_tls": False}
    )

    def serve() -> None:
        sink.controller = Controller(sink, hostname="127.0.0.1", port=sink.port, authenticator=authenticator, **options)
        sink.controller.start()

    serve()
    try:
        query = f"?cafile={cert}" + ("&starttls=require" if scheme == "smtp" else "")
        pool = smtp.SmtpPool(smtp.SmtpTarget.from_url(f"{scheme}://relais:p%40ss%2Fword@127.0.0.1:{sink.port}{query}"))

        def message(n: int):
            return smtp.build_message(
                sender="Relais <relais@example.org>",
                to="a@example.org",
                subject=f"n°{n}",
                text="texte",
                html="<p>html</p>",
                message_id=f"<{n}@example.org>",
            )

        for n in range(3):
            assert (await pool.send(message(n))).provider == "smtp"
        assert pool.connections_opened == 1 and logins == [b"relais"]

        # The server goes away and comes back: the next message opens a new connection by itself.
        sink.controller.stop()
        serve()
        await pool.send(message(3))
        assert pool.connections_opened == 2
        await pool.close()
    finally:
        sink.controller.stop()
    assert [m["subject"] for m in sink.messages] == ["n°0", "n°1", "n°2", "n°3"]


def test_every_email_names_the_deployment_fits_a_phone_and_says_why_it_was_sent(
    settings, sink, start_service, tmp_path
):
    data = directory_data()
    data["deployment"] = {"name": "France Services de Seine-Maritime", "theme": "dsfr"}
    data["libraries"][0]["contacts"][0]["phone"] = "0235123456"
    directory = tmp_path / "deployment.yaml"
    directory.write_text(yaml.safe_dump(data, allow_unicode=True))
    notif = start_service("notifications", settings.model_copy(update={"smtp_url": sink.url, "directory": directory}))
    need = recorded(notif, {"email": "personne@example.org", "preferred_channel": "email"})
    publish(settings, need, assigned(need.need_id))

    assert wait_for(lambda: sink.to("referent@caf.test.example") and sink.to("personne@example.org"))
    why = {
        "referent@caf.test.example": "parce que l'annuaire vous nomme référent de CAF de la Seine-Maritime",
        "personne@example.org": "parce que vous avez accepté, à l'accueil de Bibliothèque du Châtelet",
    }
    for address, reason in why.items():
        [mail] = sink.to(address)
        text = mail["message"].get_body(("plain",)).get_content()
        html = mail["message"].get_body(("html",)).get_content()
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
        assert "max-width: 36rem" in html and "font-size: 16px" in html
        for part in (text, " ".join(html.split())):
            assert "France Services de Seine-Maritime" in part and reason in part.replace("&#39;", "'")
    person_text = sink.to("personne@example.org")[0]["message"].get_body(("plain",)).get_content()
    assert "appelez le 02 35 12 34 56" in person_text  # the desk's number as France writes it
