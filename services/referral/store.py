"""Referral's tables: the needs it routes (the facts it was told), the referrals, and their history; the queries
the handlers, the API, the pages and the dashboard run on them; and the dead letters read from Redis."""

from __future__ import annotations

from datetime import UTC, date, datetime

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Field, Session, SQLModel, col, select

from shared.db import UTCDateTime, table_of
from shared.events import DEAD_LETTER_SUFFIX
from shared.service import page
from shared.signin import USED_TOKEN_TABLE  # sign-in links on the partner pages are single use

OPEN_STATUSES = ("assigned", "accepted", "responded")


class NeedCase(SQLModel, table=True):
    """A need as referral knows it from `need.recorded`; its clock (`respond_by`) is fixed at first routing."""

    __tablename__ = "need_case"
    need_id: str = Field(primary_key=True, max_length=32)
    library_id: str = Field(max_length=64)
    category: str = Field(max_length=64)
    summary: str
    postal_code: str | None = Field(default=None, max_length=10)
    urgency: str = Field(max_length=10)
    person_display_name: str | None = None
    person_email: str | None = None
    person_phone: str | None = None
    preferred_channel: str = Field(default="none", max_length=8)
    language: str = Field(default="fr", max_length=2)
    recorded_at: datetime = Field(sa_type=UTCDateTime)
    respond_by: datetime | None = Field(default=None, sa_type=UTCDateTime)
    correlation_id: str | None = Field(default=None, max_length=64)
    sequence: int = 0  # of the last event emitted about this need

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence


class Referral(SQLModel, table=True):
    __tablename__ = "referral"
    id: str = Field(primary_key=True, max_length=32)
    need_id: str = Field(index=True, foreign_key="need_case.need_id", max_length=32)
    partner_id: str = Field(index=True, max_length=64)
    contact_id: str = Field(max_length=64)
    library_id: str = Field(max_length=64)
    category: str = Field(max_length=64)
    status: str = Field(default="assigned", index=True, max_length=16)
    sla: str = Field(default="on_track", index=True, max_length=16)
    respond_by: datetime = Field(sa_type=UTCDateTime, index=True)
    routed_because: str
    created_at: datetime = Field(sa_type=UTCDateTime, index=True)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class ReferralHistory(SQLModel, table=True):
    __tablename__ = "referral_history"
    id: int | None = Field(default=None, primary_key=True)
    referral_id: str = Field(index=True, foreign_key="referral.id", max_length=32)
    at: datetime = Field(sa_type=UTCDateTime)
    action: str = Field(max_length=32)
    actor: str = Field(max_length=64)
    detail: str | None = None


class ClockTimer(SQLModel, table=True):
    """A durable timer of a need's clock; fired (or found moot) once, in the transaction that emits its event."""

    __tablename__ = "clock_timer"
    __table_args__ = (sa.UniqueConstraint("need_id", "kind", "number", name="one_timer_per_step"),)
    id: int | None = Field(default=None, primary_key=True)
    need_id: str = Field(foreign_key="need_case.need_id", max_length=32)
    kind: str = Field(max_length=16)
    number: int = 0
    due_at: datetime = Field(sa_type=UTCDateTime, index=True)
    fired_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    outcome: str | None = Field(default=None, max_length=16)  # "fired" or "moot" (the clock had stopped)


class PartnerPause(SQLModel, table=True):
    """Ops paused a partner until a date: routing skips it meanwhile."""

    __tablename__ = "partner_pause"
    partner_id: str = Field(primary_key=True, max_length=64)
    until: datetime = Field(sa_type=UTCDateTime)
    reason: str
    paused_by: str = Field(max_length=64)
    paused_at: datetime = Field(sa_type=UTCDateTime)


class OpsAction(SQLModel, table=True):
    """What ops did from the dashboard or the API, by whom and why."""

    __tablename__ = "ops_action"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=64)
    action: str = Field(max_length=32)
    target: str = Field(max_length=200)
    reason: str


class PrivacyIncident(SQLModel, table=True):
    """One entry of the register of confidentiality incidents (fields: domain.PrivacyIncidentFacts)."""

    __tablename__ = "privacy_incident"
    id: str = Field(primary_key=True, max_length=32)
    recorded_at: datetime = Field(sa_type=UTCDateTime, index=True)
    recorded_by: str = Field(max_length=64)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    nature: str = Field(max_length=16)
    information_description: str
    circumstances: str
    occurred_from: date
    occurred_until: date | None = None
    known_at: date
    people_count: int
    people_count_is_estimate: bool = False
    people_categories: str
    records_count: int | None = None
    consequences: str
    risk_assessment: str
    serious_risk: bool = False
    authority: str | None = None
    authority_notified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    people_notified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    people_notice_description: str | None = None
    notification_note: str | None = None
    measures: str
    status: str = Field(default="open", max_length=8)


TABLES = [
    table_of(NeedCase),
    table_of(Referral),
    table_of(ReferralHistory),
    table_of(ClockTimer),
    table_of(PartnerPause),
    table_of(OpsAction),
    table_of(PrivacyIncident),
    USED_TOKEN_TABLE,
]


def open_referral_counts(session: Session) -> dict[str, int]:
    rows = session.exec(
        select(Referral.partner_id, sa.func.count())
        .where(col(Referral.status).in_(OPEN_STATUSES))
        .group_by(Referral.partner_id)
    ).all()
    return dict(rows)


def partners_who_declined(session: Session, need_id: str) -> set[str]:
    return set(
        session.exec(
            select(Referral.partner_id).where(Referral.need_id == need_id, Referral.status == "declined")
        ).all()
    )


def lock_referral(session: Session, referral_id: str) -> Referral | None:
    """The referral, locked for this transaction (SQLite's BEGIN IMMEDIATE already serialises writers)."""
    return session.exec(select(Referral).where(Referral.id == referral_id).with_for_update()).first()


def history_of(session: Session, referral_id: str) -> list[ReferralHistory]:
    return list(
        session.exec(
            select(ReferralHistory)
            .where(ReferralHistory.referral_id == referral_id)
            .order_by(col(ReferralHistory.at), col(ReferralHistory.id))
        ).all()
    )


def current_referral(session: Session, need_id: str) -> Referral | None:
    """The need's open referral, if any (there is at most one)."""
    return session.exec(
        select(Referral)
        .where(Referral.need_id == need_id, col(Referral.status).in_(OPEN_STATUSES))
        .order_by(col(Referral.created_at).desc())
    ).first()


def due_timers(session: Session, now: datetime, skip_locked: bool, limit: int = 100) -> list[ClockTimer]:
    query = (
        select(ClockTimer)
        .where(col(ClockTimer.fired_at).is_(None), ClockTimer.due_at <= now)
        .order_by(col(ClockTimer.due_at), col(ClockTimer.id))
        .limit(limit)
    )
    if skip_locked:  # replicas share the due timers; each row is fired by exactly one of them
        query = query.with_for_update(skip_locked=True)
    return list(session.exec(query).all())


def next_timer_due(session: Session) -> datetime | None:
    return session.exec(select(sa.func.min(ClockTimer.due_at)).where(col(ClockTimer.fired_at).is_(None))).one()


def paused_partners(session: Session, now: datetime) -> set[str]:
    return set(session.exec(select(PartnerPause.partner_id).where(PartnerPause.until > now)).all())


def active_pauses(session: Session, now: datetime) -> dict[str, PartnerPause]:
    """Partner id -> its pause, for partners paused at `now`."""
    return {p.partner_id: p for p in session.exec(select(PartnerPause).where(PartnerPause.until > now)).all()}


def find_referrals(
    session: Session,
    *,
    limit: int,
    cursor: str | None,
    partner_id: str | None = None,
    need_id: str | None = None,
    status: str | None = None,
    sla: str | None = None,
) -> tuple[list[Referral], str | None]:
    """A page of referrals, newest first, filtered by whichever of the arguments are given."""
    query = select(Referral)
    for column, value in (
        (Referral.partner_id, partner_id),
        (Referral.need_id, need_id),
        (Referral.status, status),
        (Referral.sla, sla),
    ):
        if value:
            query = query.where(column == value)
    return page(query, Referral.created_at, Referral.id, limit, cursor, session)


def referral_with_case(session: Session, referral_id: str) -> tuple[Referral, NeedCase, list[ReferralHistory]] | None:
    referral = session.get(Referral, referral_id)
    if referral is None:
        return None
    return referral, session.get_one(NeedCase, referral.need_id), history_of(session, referral_id)


def inbox(
    session: Session, *, partner_id: str | None, status: str, offset: int, limit: int
) -> list[tuple[Referral, NeedCase]]:
    """Referrals with their needs, soonest deadline first; `status` "open" means any open status."""
    query = select(Referral, NeedCase).join(NeedCase, col(NeedCase.need_id) == Referral.need_id)
    if partner_id:
        query = query.where(Referral.partner_id == partner_id)
    query = query.where(col(Referral.status).in_(OPEN_STATUSES) if status == "open" else Referral.status == status)
    query = (
        query.order_by(col(Referral.respond_by), col(Referral.created_at), col(Referral.id)).offset(offset).limit(limit)
    )
    return list(session.exec(query).all())


def need_and_open_referral(session: Session, need_id: str) -> tuple[NeedCase | None, Referral | None]:
    case = session.get(NeedCase, need_id)
    return case, current_referral(session, need_id) if case else None


# --- the dashboard's queries -------------------------------------------------------------------------------------


def aware(at: datetime) -> datetime:
    """Aggregates lose the column type on SQLite: put the UTC offset back."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def open_by_sla(session: Session) -> dict[str, int]:
    """Open referrals counted by SLA state (the dashboard and the /metrics gauge)."""
    return dict(
        session.exec(
            select(Referral.sla, sa.func.count()).where(col(Referral.status).in_(OPEN_STATUSES)).group_by(Referral.sla)
        ).all()
    )


def overdue_timers(session: Session, due_before: datetime) -> int:
    """Unfired timers due before `due_before` (the dashboard and the /metrics gauge)."""
    return session.exec(
        select(sa.func.count())
        .select_from(ClockTimer)
        .where(col(ClockTimer.fired_at).is_(None), ClockTimer.due_at < due_before)
    ).one()


def due_soon(session: Session, now: datetime, until: datetime, limit: int) -> list[Referral]:
    """Referrals waiting for a first answer, due between now and `until`, soonest first."""
    return list(
        session.exec(
            select(Referral)
            .where(
                Referral.status == "assigned",
                col(Referral.sla).not_in(("met", "breached")),
                Referral.respond_by > now,
                Referral.respond_by <= until,
            )
            .order_by(col(Referral.respond_by), col(Referral.id))
            .limit(limit)
        ).all()
    )


def breaches_since(session: Session, since: datetime, limit: int) -> tuple[list[tuple[Referral, datetime]], int]:
    """The newest breaches since `since` (referral, when), and how many there are in all."""
    query = (
        select(Referral, ReferralHistory.at)
        .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
        .where(ReferralHistory.action == "breach", ReferralHistory.at >= since)
    )
    rows = session.exec(query.order_by(col(ReferralHistory.at).desc(), Referral.id).limit(limit)).all()
    return list(rows), session.exec(select(sa.func.count()).select_from(query.subquery())).one()


def first_actions(session: Session, since: datetime, actions: tuple[str, ...]) -> dict[str, datetime]:
    """Referral id -> the first time one of `actions` was done on it, for referrals created since `since`."""
    rows = session.exec(
        select(ReferralHistory.referral_id, sa.func.min(ReferralHistory.at))
        .join(Referral, col(Referral.id) == ReferralHistory.referral_id)
        .where(Referral.created_at >= since, col(ReferralHistory.action).in_(actions))
        .group_by(ReferralHistory.referral_id)
    ).all()
    return {referral_id: aware(at) for referral_id, at in rows}


def waiting_by_partner(session: Session) -> dict[str, tuple[int, datetime]]:
    """Partner id -> (referrals waiting for a first answer, the oldest one's creation)."""
    return {
        pid: (n, aware(oldest))
        for pid, n, oldest in session.exec(
            select(Referral.partner_id, sa.func.count(), sa.func.min(Referral.created_at))
            .where(Referral.status == "assigned")
            .group_by(Referral.partner_id)
        ).all()
    }


def last_action_by_partner(session: Session, actions: tuple[str, ...]) -> dict[str, datetime]:
    return {
        pid: aware(at)
        for pid, at in session.exec(
            select(Referral.partner_id, sa.func.max(ReferralHistory.at))
            .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
            .where(col(ReferralHistory.action).in_(actions))
            .group_by(Referral.partner_id)
        ).all()
    }


def referrals_created_since(session: Session, since: datetime) -> list[Referral]:
    return list(session.exec(select(Referral).where(Referral.created_at >= since)).all())


def declines_since(session: Session, since: datetime) -> list[tuple[str, str | None]]:
    """(partner id, the decline's recorded reason) of each decline since `since`."""
    return list(
        session.exec(
            select(Referral.partner_id, ReferralHistory.detail)
            .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
            .where(ReferralHistory.action == "decline", ReferralHistory.at >= since)
        ).all()
    )


def timers_settled_since(session: Session, since: datetime) -> list[tuple[datetime, datetime]]:
    """(due, fired) of each timer fired or found moot since `since`."""
    rows = session.exec(
        select(ClockTimer.due_at, ClockTimer.fired_at).where(
            col(ClockTimer.fired_at) >= since, col(ClockTimer.outcome).in_(("fired", "moot"))
        )
    ).all()
    return [(due, fired) for due, fired in rows if fired is not None]  # all of them: fired_at >= since


def needs_recorded_since(session: Session, since: datetime) -> list[datetime]:
    return [aware(at) for at in session.exec(select(NeedCase.recorded_at).where(NeedCase.recorded_at >= since)).all()]


def recent_ops_actions(session: Session, limit: int) -> list[OpsAction]:
    return list(
        session.exec(select(OpsAction).order_by(col(OpsAction.at).desc(), col(OpsAction.id).desc()).limit(limit)).all()
    )


# --- the register of confidentiality incidents ----------------------------------------------------------------


def lock_privacy_incident(session: Session, incident_id: str) -> PrivacyIncident | None:
    return session.exec(select(PrivacyIncident).where(PrivacyIncident.id == incident_id).with_for_update()).first()


def find_privacy_incidents(
    session: Session, *, limit: int, cursor: str | None
) -> tuple[list[PrivacyIncident], str | None]:
    """A page of the register, newest first."""
    return page(select(PrivacyIncident), PrivacyIncident.recorded_at, PrivacyIncident.id, limit, cursor, session)


def privacy_incidents(session: Session, *, offset: int = 0, limit: int | None = None) -> list[PrivacyIncident]:
    """The register, newest first (all of it without `limit`: the CSV export)."""
    query = select(PrivacyIncident).order_by(col(PrivacyIncident.recorded_at).desc(), col(PrivacyIncident.id).desc())
    return list(session.exec(query.offset(offset).limit(limit)).all())


# --- dead letters (Redis) ----------------------------------------------------------------------------------------


class DeadLetter(BaseModel):
    id: str
    type: str | None
    event_id: str | None
    need_id: str | None
    group: str | None
    error: str | None
    failed_at: str | None


async def dead_letters(redis, stream_key: str, *, limit: int = 50, entry_id: str | None = None) -> list[DeadLetter]:
    """The stream's dead letters, newest first (or the one entry `entry_id`)."""
    key = stream_key + DEAD_LETTER_SUFFIX
    entries = (
        await redis.xrevrange(key, count=limit)
        if entry_id is None
        else await redis.xrange(key, min=entry_id, max=entry_id)
    )

    def field(fields: dict, name: str) -> str | None:
        value = fields.get(name.encode())
        return value.decode(errors="replace") if value is not None else None

    return [
        DeadLetter(
            id=i.decode(),
            type=field(f, "type"),
            event_id=field(f, "event_id"),
            need_id=field(f, "need_id"),
            group=field(f, "dlq_group"),
            error=field(f, "dlq_error"),
            failed_at=field(f, "dlq_failed_at"),
        )
        for i, f in entries
    ]


async def dead_letter_count(redis, stream_key: str) -> int:
    return await redis.xlen(stream_key + DEAD_LETTER_SUFFIX)
