"""Referral's tables: the needs it routes (the facts it was told), the referrals, their history, the clock's timers,
the pauses and the ops log; and the queries its handlers and its clock run on them (the reads for the API, the pages
and the dashboard are in views.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, select

from shared.db import UTCDateTime, insert_new, table_of
from shared.migrations import POSTGRESQL_ONLY_INDEXES
from shared.people import ACCESS_LOG_TABLE
from shared.retention import ANONYMISED, Due, PurgeRule
from shared.signin import USED_TOKEN_TABLE  # sign-in links on the partner pages are single use

OPEN_STATUSES = ("assigned", "accepted", "responded")


class NeedCase(SQLModel, table=True):
    """A need as referral knows it from `need.recorded`; its clock (`respond_by`) is fixed at first routing."""

    __tablename__ = "need_case"
    # pg_trgm indexes for the search's LIKE, made by migration c7d2e4a8f913 on PostgreSQL only
    __table_args__ = {"info": {POSTGRESQL_ONLY_INDEXES: ("ix_need_case_search_trgm", "ix_need_case_reference_trgm")}}
    need_id: str = Field(primary_key=True, max_length=32)
    reference: str | None = Field(default=None, index=True, max_length=24)  # intake's (CHA-2611-0042); None: older
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
    person_erased_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # at the person's request
    # No partner holds the need (unroutable at recording, or declined by every candidate) until ops assign it: since
    # when, why (domain.STRANDED_CAUSES) and the routing rule's words. Cleared when it is assigned or cancelled.
    stranded_since: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    stranded_cause: str | None = Field(default=None, max_length=32)
    stranded_reason: str | None = None
    search_text: str = ""  # shared.search: folded reference, name, email, phone and summary, for `q=`

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence


class Referral(SQLModel, table=True):
    __tablename__ = "referral"
    # The list's filters, newest first (keyset pages), and the inbox's order (first answer awaited, then deadline),
    # each with the partner first for a partner's own: a page is read off an index, not sorted out of a million rows.
    __table_args__ = (
        sa.Index("ix_referral_partner_created", "partner_id", "created_at", "id"),
        sa.Index("ix_referral_status_created", "status", "created_at", "id"),
        sa.Index("ix_referral_sla_created", "sla", "created_at", "id"),
        sa.Index("ix_referral_inbox", "status", "respond_by", "created_at", "id"),
        sa.Index("ix_referral_partner_inbox", "partner_id", "status", "respond_by", "created_at", "id"),
    )
    id: str = Field(primary_key=True, max_length=32)
    need_id: str = Field(index=True, foreign_key="need_case.need_id", max_length=32)
    partner_id: str = Field(max_length=64)
    contact_id: str = Field(max_length=64)
    library_id: str = Field(max_length=64)
    category: str = Field(max_length=64)
    status: str = Field(default="assigned", max_length=16)
    sla: str = Field(default="on_track", max_length=16)
    respond_by: datetime = Field(sa_type=UTCDateTime, index=True)
    routed_because: str
    created_at: datetime = Field(sa_type=UTCDateTime, index=True)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    decline_reason: str | None = Field(default=None, max_length=32)  # domain.DECLINE_REASON_CODES, once declined
    # The person's answer to "were you contacted?" (issue 16): asked once, some days after the partner's first answer.
    contact_question_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # when it was asked
    person_contacted: str | None = Field(default=None, max_length=3)  # yes | no; None: not asked or no answer (yet)
    person_contacted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ReferralHistory(SQLModel, table=True):
    __tablename__ = "referral_history"
    __table_args__ = (sa.Index("ix_referral_history_action_at", "action", "at"),)  # the clock's alerts, declines since
    id: int | None = Field(default=None, primary_key=True)
    referral_id: str = Field(index=True, foreign_key="referral.id", max_length=32)
    at: datetime = Field(sa_type=UTCDateTime)
    action: str = Field(max_length=32)
    actor: str = Field(max_length=64)
    detail: str | None = None


class ClockTimer(SQLModel, table=True):
    """A durable timer of a need's clock; fired (or found moot) once, in the transaction that emits its event."""

    __tablename__ = "clock_timer"
    __table_args__ = (
        sa.UniqueConstraint("need_id", "kind", "number", name="one_timer_per_step"),
        # The clock's only reads: the unfired timers by due time. Fired ones (nearly all rows, in time) are not in it.
        sa.Index(
            "ix_clock_timer_unfired_due",
            "due_at",
            "id",
            postgresql_where=sa.text("fired_at IS NULL"),
            sqlite_where=sa.text("fired_at IS NULL"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    need_id: str = Field(foreign_key="need_case.need_id", max_length=32)
    kind: str = Field(max_length=16)
    number: int = 0
    due_at: datetime = Field(sa_type=UTCDateTime)
    fired_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    outcome: str | None = Field(default=None, max_length=16)  # "fired" or "moot" (the clock had stopped)
    referral_id: str | None = Field(default=None, max_length=32)  # the referral a contact_question is about


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
    ACCESS_LOG_TABLE,
]


# The rows routing and the clock write most (history lines, timers; a new case and referral: shared.db.insert_new),
# each by one statement built once: no unit of work (SQLModel's constructor and the flush cost more than the INSERT,
# docs/benchmarks.md). Written at once, in the order of the calls; `Session.execute` flushes the pending ORM changes
# first (autoflush), so the need or referral a row refers to is written before it.
_HISTORY_INSERT = sa.insert(table_of(ReferralHistory))
_TIMERS_INSERT = sa.insert(table_of(ClockTimer))
_PAUSED = select(PartnerPause.partner_id).where(PartnerPause.until > sa.bindparam("now"))


def add_history(
    session: Session, referral_id: str, at: datetime, action: str, actor: str, detail: str | None = None
) -> None:
    """A line of the referral's history, written now (read in the order written: by `at`, then `id`)."""
    session.execute(
        _HISTORY_INSERT,
        {"referral_id": referral_id, "at": at, "action": action, "actor": actor, "detail": detail},
    )


def keep_case(session: Session, case: NeedCase) -> None:
    """Write the case's new state: a new case (need.recorded's, never added to the session) now, by one INSERT; a
    case read from the database with the session's next flush."""
    if sa.inspect(case).transient:
        insert_new(session, case)
    else:
        session.add(case)


def add_clock_timers(
    session: Session, need_id: str, timers: Sequence[tuple[str, int, datetime]], referral_id: str | None = None
) -> None:
    """The need's clock timers (kind, number, due_at), written now in one statement."""
    if timers:
        session.execute(
            _TIMERS_INSERT,
            [
                {"need_id": need_id, "kind": kind, "number": number, "due_at": due_at, "referral_id": referral_id}
                for kind, number, due_at in timers
            ],
        )


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


def lock_need_case(session: Session, need_id: str) -> NeedCase | None:
    """The need, locked for this transaction (its sequence and its stranded state move)."""
    return session.exec(select(NeedCase).where(NeedCase.need_id == need_id).with_for_update()).first()


def has_clock_timers(session: Session, need_id: str) -> bool:
    return session.exec(select(ClockTimer.id).where(ClockTimer.need_id == need_id).limit(1)).first() is not None


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
    """The soonest unfired timer's due time: the first entry of the partial index."""
    return session.exec(
        select(ClockTimer.due_at).where(col(ClockTimer.fired_at).is_(None)).order_by(col(ClockTimer.due_at)).limit(1)
    ).first()


def paused_partners(session: Session, now: datetime) -> set[str]:
    return set(session.exec(_PAUSED, params={"now": now}).all())


# --- the register of confidentiality incidents ----------------------------------------------------------------


def lock_privacy_incident(session: Session, incident_id: str) -> PrivacyIncident | None:
    return session.exec(select(PrivacyIncident).where(PrivacyIncident.id == incident_id).with_for_update()).first()


# --- retention (shared/retention.py): what the daily purge anonymises here ---------------------------------------


def _need_ended() -> Any:
    """The need is over for referral as for intake: its newest referral was closed, or cancelled and not followed
    by another (the need cancelled). A need declined by all, or never routed, is not over."""
    newest = (
        select(Referral.status)
        .where(col(Referral.need_id) == col(NeedCase.need_id))
        .order_by(col(Referral.created_at).desc(), col(Referral.id).desc())
        .limit(1)
        .correlate(NeedCase)
        .scalar_subquery()
    )
    return newest.in_(("closed", "cancelled"))


def _last_event_at() -> Any:
    newest = (
        (select(sa.func.max(Referral.updated_at)).where(col(Referral.need_id) == col(NeedCase.need_id)))
        .correlate(NeedCase)
        .scalar_subquery()
    )
    return sa.func.coalesce(newest, col(NeedCase.recorded_at))


def _cases_due(period: str, ended: bool) -> Any:
    def due(session: Session, when: Due) -> Sequence[Any]:
        over = _need_ended()
        return session.exec(
            select(NeedCase.need_id).where(
                col(NeedCase.summary) != ANONYMISED,
                over if ended else sa.not_(sa.func.coalesce(over, False)),
                when.older_than(period, col(NeedCase.library_id), _last_event_at()),
            )
        ).all()

    return due


def anonymise_cases(session: Session, need_ids: Sequence[Any], now: datetime) -> None:
    """The person's identity, the summary and the texts of the referrals' history (reasons, messages) replaced by
    the marker; partners, categories, statuses and dates stay for the figures."""
    session.exec(
        sa.update(NeedCase)
        .where(col(NeedCase.need_id).in_(need_ids))
        .values(
            summary=ANONYMISED,
            person_display_name=sa.case((col(NeedCase.person_display_name).is_(None), None), else_=ANONYMISED),
            person_email=None,
            person_phone=None,
            postal_code=None,
            search_text=sa.func.coalesce(
                sa.func.lower(col(NeedCase.reference)), ""
            ),  # the fold of the reference (ASCII): found by it only
        )
    )
    referrals = select(Referral.id).where(col(Referral.need_id).in_(need_ids))
    session.exec(
        sa.update(ReferralHistory)
        .where(col(ReferralHistory.referral_id).in_(referrals), col(ReferralHistory.detail).is_not(None))
        .values(detail=ANONYMISED)
    )


# One line per kind of row retention removes; shared.service.Service runs them after the technical rows.
PURGE_RULES = [
    PurgeRule(
        "needs closed or cancelled, anonymised", "closed_needs", _cases_due("closed_needs", True), anonymise_cases
    ),
    PurgeRule("needs never closed, anonymised", "open_needs", _cases_due("open_needs", False), anonymise_cases),
]
