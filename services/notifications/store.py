"""Notifications' tables: one delivery per (event, recipient, channel), rendered when queued; every attempt to
send it; what we know of the person of each need; numbers that replied STOP."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, select

from shared.db import UTCDateTime, table_of
from shared.people import ACCESS_LOG_TABLE
from shared.retention import ANONYMISED, Due, PurgeRule
from shared.signin import USED_TOKEN_TABLE  # sign-in links on the outbox pages: `relais migrate` creates it too


class Delivery(SQLModel, table=True):
    __tablename__ = "delivery"
    __table_args__ = (
        sa.UniqueConstraint("event_id", "recipient", "channel", name="one_message_per_recipient"),
        # The senders' lease: the queued deliveries of a channel, in due order (the status filters use its prefix).
        sa.Index("ix_delivery_due", "status", "channel", "next_attempt_at"),
    )
    id: str = Field(primary_key=True, max_length=32)
    event_id: str = Field(max_length=64)
    need_id: str | None = Field(default=None, index=True, max_length=32)  # None for sign-in links
    referral_id: str | None = Field(default=None, index=True, max_length=32)
    kind: str = Field(index=True, max_length=32)
    channel: str = Field(max_length=8)
    recipient_role: str = Field(max_length=32)
    recipient: str = Field(max_length=254)  # an address: never logged; "" when suppressed for lack of one
    language: str = Field(default="fr", max_length=2)
    subject: str
    body_text: str
    body_html: str | None = None
    reply_to: str | None = Field(default=None, max_length=254)
    status: str = Field(default="queued", max_length=16)
    suppressed_reason: str | None = Field(default=None, max_length=32)
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime = Field(sa_type=UTCDateTime)  # the retry schedule lives here
    leased_until: datetime | None = Field(default=None, sa_type=UTCDateTime)  # a sender is on it until then
    held_reason: str | None = Field(default=None, max_length=16)  # quiet_hours | digest: why it waits
    quiet_timezone: str | None = Field(default=None, max_length=64)  # SMS to the person: retries keep quiet hours
    facts: str | None = None  # JSON: what the message says, to render a digest or an email fallback again
    provider: str | None = Field(default=None, max_length=16)  # smtp | outbox | twilio | brevo
    provider_message_id: str | None = Field(default=None, index=True, max_length=64)  # for delivery receipts
    sms_encoding: str | None = Field(default=None, max_length=8)  # GSM-7 | UCS-2
    sms_segments: int | None = None
    fallback_for: str | None = Field(default=None, max_length=32)  # the failed SMS this email replaces
    digest_of: str | None = Field(default=None, max_length=32)  # sent inside the digest message of this delivery
    created_at: datetime = Field(sa_type=UTCDateTime, index=True)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    correlation_id: str | None = Field(default=None, max_length=64)


class DeliveryAttempt(SQLModel, table=True):
    """One try at sending a delivery, with what came of it."""

    __tablename__ = "delivery_attempt"
    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, max_length=32)
    number: int
    at: datetime = Field(sa_type=UTCDateTime)
    outcome: str = Field(max_length=16)  # sent | retry | failed | suppressed
    error: str | None = None
    retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class NeedPerson(SQLModel, table=True):
    """The person's contact for one need, from `need.recorded`; forgotten when the referral is closed."""

    __tablename__ = "need_person"
    need_id: str = Field(primary_key=True, max_length=32)
    library_id: str = Field(max_length=64)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=20)
    preferred_channel: str = Field(max_length=8)
    language: str = Field(default="fr", max_length=2)
    recorded_at: datetime = Field(sa_type=UTCDateTime)
    # The person had their data erased: the row stays, without address, so nothing is sent to them any more.
    erased_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The person withdrew their consent to messages (need.messages_withdrawn): nothing more goes to them.
    messages_withdrawn_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class NeedReference(SQLModel, table=True):
    """A need's reference (CHA-2611-0042) and library, from `need.recorded`: what the outbox is searched and filtered
    by. Kept when the person's contact is forgotten: it identifies no one."""

    __tablename__ = "need_reference"
    need_id: str = Field(primary_key=True, max_length=32)
    reference: str | None = Field(default=None, index=True, max_length=24)
    library_id: str = Field(index=True, max_length=64)
    # The person's pseudonymous id: a partner's reply by email is sealed with their data key (inbound.py).
    person_id: str | None = Field(default=None, max_length=64)


class ReplyRoute(SQLModel, table=True):
    """Who a handoff went to, from `referral.assigned`: what a reply to its `reponse+TOKEN@` address is checked
    against (the token is bound to the referral and this contact; the sender must be one of the partner's)."""

    __tablename__ = "reply_route"
    referral_id: str = Field(primary_key=True, max_length=32)
    need_id: str = Field(index=True, max_length=32)
    partner_id: str = Field(max_length=64)
    contact_id: str = Field(max_length=64)
    library_id: str = Field(max_length=64)
    category: str = Field(max_length=64)


class InboundMail(SQLModel, table=True):
    """Every message received on the reply addresses (SMTP listener or a provider's webhook), with what was made of
    it: nothing received is lost, even what was not taken as an answer."""

    __tablename__ = "inbound_mail"
    id: str = Field(primary_key=True, max_length=32)
    received_at: datetime = Field(sa_type=UTCDateTime, index=True)
    source: str = Field(max_length=16)  # smtp | mailgun
    referral_id: str | None = Field(default=None, index=True, max_length=32)
    need_id: str | None = Field(default=None, index=True, max_length=32)
    sender: str = Field(max_length=254)  # the envelope or From address (a partner's, when it is taken)
    contact_id: str | None = Field(default=None, max_length=64)
    subject: str = ""
    text: str | None = None  # the reply's new text (quoted history and signature stripped)
    # answer | auto_reply | bounce | no_token | bad_token | unknown_sender | unauthenticated
    verdict: str = Field(max_length=32)
    intent: str | None = Field(default=None, max_length=16)  # accept | decline | respond | out_of_office
    outcome: str | None = Field(default=None, max_length=16)  # referral's (referral.reply_recorded)


class WaitingForPerson(SQLModel, table=True):
    """A referral event that concerns the person, read before its need's `need.recorded` (two streams, two
    orders): it is handled for the person as soon as their contact arrives."""

    __tablename__ = "waiting_for_person"
    event_id: str = Field(primary_key=True, max_length=64)
    need_id: str = Field(index=True, max_length=32)
    payload: str


class SmsSuppression(SQLModel, table=True):
    """A number that replied STOP (or ARRET): no SMS goes to it until it replies START."""

    __tablename__ = "sms_suppression"
    phone: str = Field(primary_key=True, max_length=20)
    at: datetime = Field(sa_type=UTCDateTime)
    source: str = Field(max_length=16)  # twilio | brevo | provider (an opted-out error)


TABLES = [
    table_of(Delivery),
    table_of(DeliveryAttempt),
    table_of(NeedPerson),
    table_of(NeedReference),
    table_of(WaitingForPerson),
    table_of(SmsSuppression),
    table_of(ReplyRoute),
    table_of(InboundMail),
    USED_TOKEN_TABLE,
    ACCESS_LOG_TABLE,
]


def lock_person_of(session: Session, need_id: str) -> None:
    """Serialize the handlers that read and write one need's person (need.recorded and the referral events
    arrive on two streams, handled at once): on PostgreSQL a transaction lock on the need; SQLite's writers are
    serialized already (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"need_person:{need_id}"})


# --- retention (shared/retention.py): what the daily purge removes here ------------------------------------------


def _bodies_due(session: Session, when: Due) -> Sequence[Any]:
    # A delivery does not know its desk: the shortest period of any jurisdiction applies (kept no longer than any).
    return session.exec(
        select(Delivery.id).where(
            col(Delivery.status) != "queued",
            col(Delivery.body_text) != ANONYMISED,
            col(Delivery.created_at) < when.shortest_cutoff("message_bodies"),
        )
    ).all()


def forget_bodies(session: Session, ids: Sequence[Any], now: datetime) -> None:
    """The texts of the message, what it was rendered from, and the person's address on it go; the delivery stays
    (kind, channel, role, status, dates) for the figures."""
    session.exec(
        sa.update(Delivery)
        .where(col(Delivery.id).in_(ids))
        .values(
            subject=ANONYMISED,
            body_text=ANONYMISED,
            body_html=None,
            facts=None,
            recipient=sa.case((col(Delivery.recipient_role) == "person", ANONYMISED), else_=col(Delivery.recipient)),
        )
    )


def _people_due(session: Session, when: Due) -> Sequence[Any]:
    return session.exec(
        select(NeedPerson.need_id).where(
            when.older_than("open_needs", col(NeedPerson.library_id), col(NeedPerson.recorded_at))
        )
    ).all()


def forget_people(session: Session, need_ids: Sequence[Any], now: datetime) -> None:
    """A person's contact is forgotten when their need closes; one whose need never closed goes after open_needs."""
    session.exec(sa.delete(NeedPerson).where(col(NeedPerson.need_id).in_(need_ids)))
    session.exec(sa.delete(WaitingForPerson).where(col(WaitingForPerson.need_id).in_(need_ids)))


def _replies_due(session: Session, when: Due) -> Sequence[Any]:
    return session.exec(
        select(InboundMail.id).where(
            col(InboundMail.text).is_not(None), col(InboundMail.received_at) < when.shortest_cutoff("message_bodies")
        )
    ).all()


def forget_replies(session: Session, ids: Sequence[Any], now: datetime) -> None:
    """A reply's words and subject go; the row stays (when, where from, what was made of it)."""
    session.exec(sa.update(InboundMail).where(col(InboundMail.id).in_(ids)).values(text=None, subject=""))


# One line per kind of row retention removes; shared.service.Service runs them after the technical rows.
PURGE_RULES = [
    PurgeRule("email and SMS texts, deleted", "message_bodies", _bodies_due, forget_bodies),
    PurgeRule("texts of partners' replies by email, deleted", "message_bodies", _replies_due, forget_replies),
    PurgeRule("contacts of people whose need never closed, deleted", "open_needs", _people_due, forget_people),
]
