"""Notifications' tables: one delivery per (event, recipient, channel), rendered when queued; every attempt to
send it; what we know of the person of each need; numbers that replied STOP."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel

from shared.db import UTCDateTime, table_of
from shared.people import ACCESS_LOG_TABLE
from shared.signin import USED_TOKEN_TABLE  # sign-in links on the outbox pages: `relais migrate` creates it too


class Delivery(SQLModel, table=True):
    __tablename__ = "delivery"
    __table_args__ = (sa.UniqueConstraint("event_id", "recipient", "channel", name="one_message_per_recipient"),)
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
    status: str = Field(default="queued", index=True, max_length=16)
    suppressed_reason: str | None = Field(default=None, max_length=32)
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime = Field(sa_type=UTCDateTime, index=True)  # the retry schedule lives here
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


class NeedReference(SQLModel, table=True):
    """A need's reference (CHA-2611-0042) and library, from `need.recorded`: what the outbox is searched and filtered
    by. Kept when the person's contact is forgotten: it identifies no one."""

    __tablename__ = "need_reference"
    need_id: str = Field(primary_key=True, max_length=32)
    reference: str | None = Field(default=None, index=True, max_length=24)
    library_id: str = Field(index=True, max_length=64)


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
    USED_TOKEN_TABLE,
    ACCESS_LOG_TABLE,
]


def lock_person_of(session: Session, need_id: str) -> None:
    """Serialize the handlers that read and write one need's person (need.recorded and the referral events
    arrive on two streams, handled at once): on PostgreSQL a transaction lock on the need; SQLite's writers are
    serialized already (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"need_person:{need_id}"})
