"""Intake's tables: needs as the desk recorded them, their history as the desk may see it, idempotency
keys, and the single-use sign-in links already used on the desk's pages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, select

from services.intake.domain import CountedNeed
from shared.db import UTCDateTime, table_of, upsert
from shared.people import ACCESS_LOG_TABLE
from shared.retention import ANONYMISED, Due, PurgeRule
from shared.signin import USED_TOKEN_TABLE


class Need(SQLModel, table=True):
    __tablename__ = "need"
    __table_args__ = (sa.UniqueConstraint("reference", name="one_need_per_reference"),)
    id: str = Field(primary_key=True, max_length=32)
    # What the person reads out on the phone (CHA-2611-0042): the library's code, the day, a counter (next_reference).
    reference: str = Field(max_length=24)
    library_id: str = Field(index=True, max_length=64)
    category: str = Field(max_length=64)
    summary: str
    postal_code: str | None = Field(default=None, max_length=10)
    urgency: str = Field(default="normal", max_length=10)
    person_id: str = Field(index=True, max_length=32)  # one per person and visit: reports count people apart
    person_display_name: str | None = None
    person_email: str | None = None
    person_phone: str | None = None
    preferred_channel: str = Field(default="none", max_length=8)
    language: str = Field(default="fr", max_length=2)
    recorded_by: str = Field(max_length=64)
    recorded_at: datetime = Field(sa_type=UTCDateTime, index=True)
    respond_by: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(default="recorded", index=True, max_length=16)
    sla: str = Field(default="on_track", max_length=16)
    partner_id: str | None = Field(default=None, max_length=64)
    referral_id: str | None = Field(default=None, max_length=32)
    referral_sequence: int = 0  # of the newest referral event applied to the status
    answered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # the partner's first accept or answer
    cancelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # by ops: recorded in error
    closed_by_desk_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # the person no longer needs help
    partner_nudged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # the desk's last nudge (24 h rule)
    # "À lire": the newest partner answer (accept, respond, decline, close) and when the desk last opened the need.
    last_answer_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    answers_read_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    person_erased_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # at the person's request
    # The consent the desk recorded (docs/privacy.md, "Consent"): the purposes agreed to ("handoff", "messages",
    # comma-separated), the version of the text shown (the directory's `consent`), who recorded it and when.
    consent_purposes: str = Field(default="handoff", max_length=64, sa_column_kwargs={"server_default": "handoff"})
    consent_version: str | None = Field(default=None, max_length=64)
    consent_recorded_by: str | None = Field(default=None, max_length=64)
    consent_recorded_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    messages_withdrawn_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # consent to messages withdrawn
    messages_withdrawn_by: str | None = Field(default=None, max_length=64)
    anonymised_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # by the retention purge
    search_text: str = ""  # shared.search: folded reference, name, email, phone and summary, for `q=`


class ReferenceCounter(SQLModel, table=True):
    """The last number given after a reference's prefix (library code and day, CHA-2611): one row per prefix, taken
    and incremented in the recording transaction (an upsert: replicas on PostgreSQL queue on its row)."""

    __tablename__ = "reference_counter"
    prefix: str = Field(primary_key=True, max_length=16)
    last: int = 0


class NeedHistory(SQLModel, table=True):
    __tablename__ = "need_history"
    id: int | None = Field(default=None, primary_key=True)
    need_id: str = Field(index=True, foreign_key="need.id", max_length=32)
    at: datetime = Field(sa_type=UTCDateTime)
    event: str = Field(max_length=64)
    partner_id: str | None = Field(default=None, max_length=64)
    detail: str | None = None
    reason_code: str | None = Field(default=None, max_length=32)  # a decline's (shared.events.DeclineReasonCode)


# Built once: a line of a need's history, inserted by Core (no unit of work: the flush cost more than the INSERT,
# docs/benchmarks.md). A new need is written the same way, by shared.db.insert_new.
_HISTORY_INSERT = sa.insert(table_of(NeedHistory))


def add_history(
    session: Session,
    need_id: str,
    at: datetime,
    event: str,
    *,
    detail: str | None = None,
    partner_id: str | None = None,
    reason_code: str | None = None,
) -> None:
    """A line of the need's history (the desk's audit), written now by one prebuilt statement (read in the order
    written: by `at`, then `id`); the need it names is flushed first (Session.execute's autoflush)."""
    session.execute(
        _HISTORY_INSERT,
        {
            "need_id": need_id,
            "at": at,
            "event": event,
            "detail": detail,
            "partner_id": partner_id,
            "reason_code": reason_code,
        },
    )


class IdempotencyKey(SQLModel, table=True):
    __tablename__ = "idempotency_key"
    user_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=200)
    request_hash: str = Field(max_length=64)
    need_id: str = Field(max_length=32)
    created_at: datetime = Field(sa_type=UTCDateTime)
    # The JSON body the first 201 carried, stored with the need: a repeat answers exactly it, not the need as it is
    # now. None for keys recorded before it was kept (they answer the need as it is now).
    response_body: str | None = None


class PersonErasure(SQLModel, table=True):
    """A person asked for their data to be erased: who asked on their behalf, why, when, and which needs."""

    __tablename__ = "person_erasure"
    person_id: str = Field(primary_key=True, max_length=32)
    requested_at: datetime = Field(sa_type=UTCDateTime)
    requested_by: str = Field(max_length=64)
    reason: str
    need_ids: str  # JSON list of the needs erased


TABLES = [
    table_of(Need),
    table_of(NeedHistory),
    table_of(IdempotencyKey),
    table_of(PersonErasure),
    table_of(ReferenceCounter),
    USED_TOKEN_TABLE,
    ACCESS_LOG_TABLE,
]


def next_reference(session: Session, prefix: str) -> str:
    """The next reference after `prefix` (CHA-2611 -> CHA-2611-0042), counted in this transaction. One upsert: on
    PostgreSQL a concurrent recording with the same prefix waits for this transaction's row lock, then counts on."""
    counted = upsert(
        session, table_of(ReferenceCounter), "prefix", {"prefix": prefix, "last": 1}, add="last", returning="last"
    )
    number = counted.scalar_one()
    return f"{prefix}-{number:04d}"


def needs_of_person(session: Session, person_id: str) -> list[Need]:
    """The person's needs, oldest first."""
    return list(
        session.exec(
            select(Need).where(Need.person_id == person_id).order_by(col(Need.recorded_at), col(Need.id))
        ).all()
    )


def counted_needs(session: Session, library_id: str, start: datetime, end: datetime) -> list[CountedNeed]:
    """The needs a library recorded in [start, end) that count in its figures (not those cancelled as errors)."""
    # SQLModel's select() is annotated for at most 4 columns (it takes any number): 5 here.
    rows = session.exec(
        select(Need.person_id, Need.category, Need.status, Need.sla, Need.respond_by).where(  # type: ignore[call-overload]
            Need.library_id == library_id,
            Need.recorded_at >= start,
            Need.recorded_at < end,
            col(Need.cancelled_at).is_(None),
        )
    ).all()
    return [CountedNeed(*row) for row in rows]


# --- retention (shared/retention.py): what the daily purge anonymises here ---------------------------------------


def _last_event_at() -> Any:
    """When the last thing happened to the need (its newest history row; the recording at least)."""
    newest = (
        select(sa.func.max(NeedHistory.at)).where(col(NeedHistory.need_id) == col(Need.id)).correlate(Need)
    ).scalar_subquery()
    return sa.func.coalesce(newest, col(Need.recorded_at))


def _needs_due(period: str, closed: bool) -> Any:
    def due(session: Session, when: Due) -> Sequence[Any]:
        status = col(Need.status) == "closed" if closed else col(Need.status) != "closed"
        return session.exec(
            select(Need.id).where(
                col(Need.anonymised_at).is_(None),
                status,
                when.older_than(period, col(Need.library_id), _last_event_at()),
            )
        ).all()

    return due


def anonymise_needs(session: Session, ids: Sequence[Any], now: datetime) -> None:
    """Identity and free text replaced by the marker; what the figures count stays (category, library, partner,
    dates, status, SLA, the consent's purposes and version). The idempotency keys' stored answers go too."""
    session.exec(
        sa.update(Need)
        .where(col(Need.id).in_(ids))
        .values(
            summary=ANONYMISED,
            person_display_name=sa.case((col(Need.person_display_name).is_(None), None), else_=ANONYMISED),
            person_email=None,
            person_phone=None,
            postal_code=None,
            search_text=sa.func.lower(
                col(Need.reference)
            ),  # shared.search.fold of the reference (ASCII): found by it only
            anonymised_at=now,
        )
    )
    session.exec(
        sa.update(NeedHistory)
        .where(col(NeedHistory.need_id).in_(ids), col(NeedHistory.detail).is_not(None))
        .values(detail=ANONYMISED)
    )
    session.exec(sa.delete(IdempotencyKey).where(col(IdempotencyKey.need_id).in_(ids)))
    for need_id in ids:
        add_history(session, need_id, now, "need.anonymised")


# One line per kind of row retention removes; shared.service.Service runs them after the technical rows.
PURGE_RULES = [
    PurgeRule(
        "needs closed or cancelled, anonymised", "closed_needs", _needs_due("closed_needs", True), anonymise_needs
    ),
    PurgeRule("needs never closed, anonymised", "open_needs", _needs_due("open_needs", False), anonymise_needs),
]
