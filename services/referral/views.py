"""What referral shows of its referrals (the API, the partners' pages, the ops dashboard and its gauges): reads of the
tables (store.py) and of the dead letters in Redis, no rule and no write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Session, col, select

from services.referral import domain
from services.referral.domain import LEFT_PARTNER
from services.referral.store import (
    OPEN_STATUSES,
    ClockTimer,
    NeedCase,
    OpsAction,
    PartnerPause,
    PrivacyIncident,
    Referral,
    ReferralHistory,
    current_referral,
    history_of,
    paused_partners,
)
from shared.db import percentile_of, seconds_between
from shared.directory import Directory
from shared.events import DEAD_LETTER_SUFFIX
from shared.search import matches, query_terms
from shared.service import page


def open_referral_counts(session: Session) -> dict[str, int]:
    rows = session.exec(
        select(Referral.partner_id, sa.func.count())
        .where(col(Referral.status).in_(OPEN_STATUSES))
        .group_by(Referral.partner_id)
    ).all()
    return dict(rows)


LOAD_COUNT_CAP = 10_000  # routing counts a partner's open referrals up to this: enough for any capacity or tie


def open_referrals_of(session: Session, partner_id: str, cap: int = LOAD_COUNT_CAP) -> int:
    """How many referrals `partner_id` holds open, counted off its (partner_id, status, ...) index and at most `cap`:
    routing asks this of a partner with a capacity, or of partners tied on territory (domain.route_need), so routing
    a need costs the same with a thousand open referrals or a million (a GROUP BY over every open referral took
    380 ms per need at a million, docs/benchmarks.md)."""
    return session.exec(_OPEN_REFERRALS, params={"partner_id": partner_id, "cap": cap}).one()


_HELD = (
    select(Referral.id)
    .where(Referral.partner_id == sa.bindparam("partner_id"), col(Referral.status).in_(OPEN_STATUSES))
    .limit(sa.bindparam("cap"))
    .subquery()
)
_OPEN_REFERRALS = select(sa.func.count()).select_from(_HELD)  # built once: routing asks it for each candidate


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
    library_id: str | None = None,
    q: str | None = None,
    only_open_cases: bool = False,
) -> tuple[list[Referral], str | None]:
    """A page of referrals, newest first, filtered by whichever of the arguments are given; `q` searches the need
    (shared.search): with `only_open_cases` (a partner's search), a referral that left the partner is found by its
    need's reference only, as the partner no longer sees the need's case."""
    query = select(Referral)
    for column, value in (
        (Referral.partner_id, partner_id),
        (Referral.need_id, need_id),
        (Referral.status, status),
        (Referral.sla, sla),
        (Referral.library_id, library_id),
    ):
        if value:
            query = query.where(column == value)
    if query_terms(q):
        query = query.join(NeedCase, col(NeedCase.need_id) == Referral.need_id).where(searched(q, only_open_cases))
    return page(query, Referral.created_at, Referral.id, limit, cursor, session)


def _in_case(q: str | None) -> sa.ColumnElement[bool]:
    """A need's words match the search."""
    return sa.and_(*matches(NeedCase.search_text, q))


def _by_reference(q: str | None) -> sa.ColumnElement[bool]:
    """A need's reference matches the search (the expression of the trigram index, migration c7d2e4a8f913)."""
    return sa.and_(*matches(sa.func.lower(sa.func.coalesce(NeedCase.reference, "")), q))


def searched(q: str | None, only_open_cases: bool) -> sa.ColumnElement[bool]:
    """The WHERE clause of a search of referrals joined with their needs (see find_referrals)."""
    if not only_open_cases:
        return _in_case(q)
    return sa.or_(sa.and_(col(Referral.status).not_in(LEFT_PARTNER), _in_case(q)), _by_reference(q))


def routing_preview(
    session: Session, directory: Directory, *, library_id: str, category: str, postal_code: str | None, now: datetime
) -> tuple[domain.RoutingDecision, datetime]:
    """Who would get a need recorded now, and by when they must answer: route_need on the open referrals and pauses
    as they are (what on_need_recorded would decide at this moment; a need has no decline yet)."""
    decision = domain.route_need(
        directory,
        category=category,
        postal_code=postal_code,
        library_id=library_id,
        open_referrals=lambda partner_id: open_referrals_of(session, partner_id),
        paused_partner_ids=paused_partners(session, now),
    )
    return decision, domain.deadline_of(decision, now, directory)


def referral_with_case(session: Session, referral_id: str) -> tuple[Referral, NeedCase, list[ReferralHistory]] | None:
    referral = session.get(Referral, referral_id)
    if referral is None:
        return None
    return referral, session.get_one(NeedCase, referral.need_id), history_of(session, referral_id)


def inbox(
    session: Session,
    *,
    partner_id: str | None,
    status: str,
    offset: int,
    limit: int,
    q: str = "",
    library_id: str = "",
    only_open_cases: bool = False,
    need_ids: list[str] | None = None,
) -> list[tuple[Referral, NeedCase]]:
    """Referrals with their needs: those waiting for their partner's first answer (assigned) first, then soonest
    deadline first; `status` "open" means any open status; `q` searches as find_referrals does (`need_ids`: its
    search_candidates, when found).
    Read as one page per status group (assigned, then the others), each off an index in (status, respond_by), so a
    page costs the same with a million open referrals as with ten."""
    groups: list[sa.ColumnElement[bool]]
    if status == "open":
        groups = [col(Referral.status) == "assigned", col(Referral.status).in_(OPEN_STATUSES[1:])]
    elif status == "all":
        groups = [col(Referral.status) == "assigned", col(Referral.status) != "assigned"]
    else:
        groups = [col(Referral.status) == status]
    found: list[tuple[Referral, NeedCase]] = []
    for in_group in groups:
        if len(found) >= limit:
            break
        query = inbox_scope(
            select(Referral, NeedCase).join(NeedCase, col(NeedCase.need_id) == Referral.need_id).where(in_group),
            partner_id=partner_id,
            library_id=library_id,
            q=q,
            only_open_cases=only_open_cases,
            need_ids=need_ids,
        )
        ordered = query.order_by(col(Referral.respond_by), col(Referral.created_at), col(Referral.id))
        rows = list(session.exec(ordered.offset(offset).limit(limit - len(found))).all())
        found.extend(rows)
        if not rows and offset:  # this group ends before the page: the next group starts at what is left
            before = inbox_scope(
                select(sa.func.count())
                .select_from(Referral)
                .join(NeedCase, col(NeedCase.need_id) == Referral.need_id)
                .where(in_group),
                partner_id=partner_id,
                library_id=library_id,
                q=q,
                only_open_cases=only_open_cases,
                need_ids=need_ids,
            )
            offset = max(0, offset - session.exec(before).one())
        else:
            offset = 0
    return found


def inbox_scope(
    query: Any,
    *,
    partner_id: str | None,
    library_id: str,
    q: str,
    only_open_cases: bool,
    need_ids: list[str] | None = None,
) -> Any:
    """The inbox's filters but its status: whose referrals, from which library, matching the search (`need_ids`:
    among those needs, `search_candidates`)."""
    if partner_id:
        query = query.where(Referral.partner_id == partner_id)
    if library_id:
        query = query.where(Referral.library_id == library_id)
    if query_terms(q):
        query = query.where(searched(q, only_open_cases))
        if need_ids is not None:
            query = query.where(col(Referral.need_id).in_(need_ids))
    return query


# A search matching at most this many needs is run once per inbox page (search_candidates), not once per query.
SEARCH_CANDIDATES = 500


def search_candidates(session: Session, q: str, only_open_cases: bool) -> list[str] | None:
    """The needs a search may find (`searched`'s clauses on the needs alone: their words, and for a partner also
    their reference), when there are at most SEARCH_CANDIDATES of them; None for a broader search or no search. The
    inbox then reads its page and its counts among them by id instead of running the search in each of its queries
    (on PostgreSQL each run reads the trigram indexes again: about 50 ms for a reference among a million needs)."""
    if not query_terms(q):
        return None
    in_case = sa.or_(_in_case(q), _by_reference(q)) if only_open_cases else _in_case(q)
    found = list(session.exec(select(NeedCase.need_id).where(in_case).limit(SEARCH_CANDIDATES + 1)).all())
    return found if len(found) <= SEARCH_CANDIDATES else None


# The inbox counts up to this many referrals in each status and says "10 000+" beyond: an exact count of a million rows
# costs more than the page (docs/benchmarks.md, "Timers at scale").
COUNT_CAP = 10_000


def inbox_counts(
    session: Session,
    *,
    partner_id: str | None,
    statuses: tuple[str, ...],
    q: str = "",
    library_id: str = "",
    only_open_cases: bool = False,
    need_ids: list[str] | None = None,
) -> dict[str, int]:
    """Status -> how many referrals the inbox holds in it (COUNT_CAP + 1: more than COUNT_CAP), with the inbox's
    other filters (its tabs' counts). Each status is counted off an index, up to the cap; the needs are joined only
    for a search (every referral has its need)."""
    counts = {}
    for status in statuses:
        query = select(Referral.id).where(Referral.status == status)
        if query_terms(q):
            query = query.join(NeedCase, col(NeedCase.need_id) == Referral.need_id)
        query = inbox_scope(
            query, partner_id=partner_id, library_id=library_id, q=q, only_open_cases=only_open_cases, need_ids=need_ids
        )
        counts[status] = session.exec(select(sa.func.count()).select_from(query.limit(COUNT_CAP + 1).subquery())).one()
    return counts


def count_to_treat(session: Session, partner_id: str | None) -> int:
    """Referrals waiting for their partner's first move (assigned): a partner's own, or every partner's; up to
    COUNT_CAP + 1 (more than COUNT_CAP)."""
    query = select(Referral.id).where(Referral.status == "assigned")
    if partner_id:
        query = query.where(Referral.partner_id == partner_id)
    return session.exec(select(sa.func.count()).select_from(query.limit(COUNT_CAP + 1).subquery())).one()


def need_and_open_referral(session: Session, need_id: str) -> tuple[NeedCase | None, Referral | None]:
    case = session.get(NeedCase, need_id)
    return case, current_referral(session, need_id) if case else None


# --- the dashboard's queries -------------------------------------------------------------------------------------


def aware(at: datetime) -> datetime:
    """Aggregates lose the column type on SQLite: put the UTC offset back."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def stranded_needs(session: Session, limit: int) -> tuple[list[tuple[NeedCase, list[str]]], int]:
    """Needs no partner holds, oldest deadline first, each with the partners that declined it (ids, in the order
    they declined); and how many there are in all."""
    stranded = col(NeedCase.stranded_since).is_not(None)
    cases = session.exec(
        select(NeedCase)
        .where(stranded)
        .order_by(col(NeedCase.respond_by), col(NeedCase.recorded_at), col(NeedCase.need_id))
        .limit(limit)
    ).all()
    count = session.exec(select(sa.func.count()).select_from(NeedCase).where(stranded)).one()
    declined = declined_by(session, [case.need_id for case in cases])
    return [(case, declined[case.need_id]) for case in cases], count


def declined_by(session: Session, need_ids: list[str]) -> dict[str, list[str]]:
    """Need id -> the partners (ids) that declined it, in the order they did."""
    declined: dict[str, list[str]] = {need_id: [] for need_id in need_ids}
    if not need_ids:
        return declined
    for need_id, partner_id in session.exec(
        select(Referral.need_id, Referral.partner_id)
        .where(col(Referral.need_id).in_(need_ids), Referral.status == "declined")
        .order_by(col(Referral.updated_at), col(Referral.id))
    ).all():
        if partner_id not in declined[need_id]:
            declined[need_id].append(partner_id)
    return declined


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


def alerts_since(
    session: Session, since: datetime, actions: tuple[str, ...], limit: int
) -> list[tuple[Referral, str, datetime]]:
    """(referral, action, when) of the newest `limit` of `actions` (the clock's escalations, breaches) since `since`,
    newest first."""
    rows = session.exec(
        select(Referral, ReferralHistory.action, ReferralHistory.at)
        .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
        .where(col(ReferralHistory.action).in_(actions), ReferralHistory.at >= since)
        .order_by(col(ReferralHistory.at).desc(), col(Referral.id))
        .limit(limit)
    ).all()
    return [(referral, action, aware(at)) for referral, action, at in rows]


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


class PartnerWindow(NamedTuple):
    """A partner's referrals created in the window, counted by the database: how many, how many answered (and in
    time), how many count for the in-time share (answered, or past their deadline unless declined or cancelled), the
    median and 90th percentile of the first answer's time in seconds, and how many were first answered within each
    (low, high) hours bucket asked for."""

    received: int
    answered: int
    in_time: int
    counted: int
    median_seconds: float | None
    p90_seconds: float | None
    answered_within: tuple[int, ...]


def _first_answers(since: datetime, actions: tuple[str, ...]) -> sa.Subquery:
    """referral_id, first_at: the first of `actions` on each referral created since `since`."""
    return (
        sa.select(col(ReferralHistory.referral_id), sa.func.min(ReferralHistory.at).label("first_at"))
        .join(Referral, col(Referral.id) == ReferralHistory.referral_id)
        .where(col(Referral.created_at) >= since, col(ReferralHistory.action).in_(actions))
        .group_by(col(ReferralHistory.referral_id))
        .subquery("first_answer")
    )


def partner_windows(
    session: Session,
    since: datetime,
    now: datetime,
    actions: tuple[str, ...],
    buckets: tuple[tuple[int, int | None], ...],
) -> dict[str, PartnerWindow]:
    """Partner id -> its PartnerWindow for the referrals created since `since` (the first of `actions` answers), in
    one pass over the window."""
    first = _first_answers(since, actions)
    answered = first.c.first_at.is_not(None)
    seconds = seconds_between(session, first.c.first_at, col(Referral.created_at))
    late_unanswered = sa.and_(col(Referral.respond_by) <= now, col(Referral.status).not_in(("declined", "cancelled")))
    within = [
        sa.func.sum(
            sa.case(
                (sa.and_(seconds >= low * 3600, seconds < high * 3600 if high is not None else sa.true()), 1), else_=0
            )
        )
        for low, high in buckets
    ]
    rows = session.execute(
        sa.select(
            col(Referral.partner_id),
            sa.func.count(),
            sa.func.count(first.c.first_at),
            sa.func.sum(sa.case((sa.and_(answered, first.c.first_at <= col(Referral.respond_by)), 1), else_=0)),
            sa.func.sum(sa.case((sa.or_(answered, late_unanswered), 1), else_=0)),
            percentile_of(session, seconds, 50),
            percentile_of(session, seconds, 90),
            *within,
        )
        .select_from(Referral)
        .outerjoin(first, first.c.referral_id == col(Referral.id))
        .where(col(Referral.created_at) >= since)
        .group_by(col(Referral.partner_id))
    ).all()
    return {
        partner_id: PartnerWindow(received, answered, in_time, counted, median, p90, tuple(answered_within))
        for partner_id, received, answered, in_time, counted, median, p90, *answered_within in rows
    }


def referrals_created_since_count(session: Session, since: datetime, at_most: int) -> int:
    """How many referrals were created since `since`, counted off the index up to `at_most`."""
    created = select(Referral.id).where(col(Referral.created_at) >= since).limit(at_most)
    return session.exec(select(sa.func.count()).select_from(created.subquery())).one()


def decline_counts_since(session: Session, since: datetime) -> dict[str, dict[str | None, int]]:
    """Partner id -> the declines since `since` by reason code (None: declined without one)."""
    rows = session.execute(
        sa.select(col(Referral.partner_id), col(Referral.decline_reason), sa.func.count())
        .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
        .where(col(ReferralHistory.action) == "decline", col(ReferralHistory.at) >= since)
        .group_by(col(Referral.partner_id), col(Referral.decline_reason))
    ).all()
    counts: dict[str, dict[str | None, int]] = {}
    for partner_id, code, n in rows:
        counts.setdefault(partner_id, {})[code] = n
    return counts


class ContactCounts(NamedTuple):
    asked: int
    yes: int
    no: int
    no_answer: int


def contact_counts_since(session: Session, since: datetime, unanswered_before: datetime) -> dict[str, ContactCounts]:
    """Partner id -> the person's answers to the contact questions asked since `since`; a question asked before
    `unanswered_before` and still unanswered counts as no answer."""
    answer = col(Referral.person_contacted)
    rows = session.execute(
        sa.select(
            col(Referral.partner_id),
            sa.func.count(),
            sa.func.sum(sa.case((answer == "yes", 1), else_=0)),
            sa.func.sum(sa.case((answer == "no", 1), else_=0)),
            sa.func.sum(
                sa.case((sa.and_(answer.is_(None), col(Referral.contact_question_at) <= unanswered_before), 1), else_=0)
            ),
        )
        .where(col(Referral.contact_question_at) >= since)
        .group_by(col(Referral.partner_id))
    ).all()
    return {partner_id: ContactCounts(*counts) for partner_id, *counts in rows}


def alert_counts_since(session: Session, since: datetime, actions: tuple[str, ...]) -> dict[str, tuple[int, datetime]]:
    """Partner id -> (how many of its referrals had one of `actions` since `since`, the first of them)."""
    rows = session.execute(
        sa.select(
            col(Referral.partner_id), sa.func.count(sa.distinct(col(Referral.id))), sa.func.min(ReferralHistory.at)
        )
        .join(ReferralHistory, col(ReferralHistory.referral_id) == Referral.id)
        .where(col(ReferralHistory.action).in_(actions), col(ReferralHistory.at) >= since)
        .group_by(col(Referral.partner_id))
    ).all()
    return {partner_id: (n, aware(first)) for partner_id, n, first in rows}


class TimerLags(NamedTuple):
    fired: int
    p50_seconds: float | None
    p90_seconds: float | None
    max_seconds: float | None


def timer_lags_since(session: Session, since: datetime) -> TimerLags:
    """The timers fired or found moot since `since`, and how late (never less than 0) they fired."""
    late = seconds_between(session, col(ClockTimer.fired_at), col(ClockTimer.due_at))
    lag = sa.case((late < 0, 0.0), else_=late)
    row = session.execute(
        sa.select(sa.func.count(), percentile_of(session, lag, 50), percentile_of(session, lag, 90), sa.func.max(lag))
        .select_from(ClockTimer)
        .where(col(ClockTimer.fired_at) >= since, col(ClockTimer.outcome).in_(("fired", "moot")))
    ).one()
    return TimerLags(*row)


def needs_per_hour(session: Session, hours: list[datetime]) -> list[int]:
    """How many needs were recorded in each hour starting at `hours` (consecutive)."""
    at = col(NeedCase.recorded_at)
    counts = [sa.func.sum(sa.case((sa.and_(at >= hour, at < hour + timedelta(hours=1)), 1), else_=0)) for hour in hours]
    row = session.execute(sa.select(*counts).where(at >= hours[0])).one()
    return [n or 0 for n in row]


def recent_ops_actions(session: Session, limit: int) -> list[OpsAction]:
    return list(
        session.exec(select(OpsAction).order_by(col(OpsAction.at).desc(), col(OpsAction.id).desc()).limit(limit)).all()
    )


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


# --- the register of confidentiality incidents ----------------------------------------------------------------


def find_privacy_incidents(
    session: Session, *, limit: int, cursor: str | None
) -> tuple[list[PrivacyIncident], str | None]:
    """A page of the register, newest first."""
    return page(select(PrivacyIncident), PrivacyIncident.recorded_at, PrivacyIncident.id, limit, cursor, session)


def privacy_incidents(session: Session, *, offset: int = 0, limit: int | None = None) -> list[PrivacyIncident]:
    """The register, newest first (all of it without `limit`: the CSV export)."""
    query = select(PrivacyIncident).order_by(col(PrivacyIncident.recorded_at).desc(), col(PrivacyIncident.id).desc())
    return list(session.exec(query.offset(offset).limit(limit)).all())


def references(session: Session, need_ids: list[str]) -> dict[str, str]:
    """Need id -> its reference, for those of `need_ids` that have one."""
    if not need_ids:
        return {}
    rows = session.exec(
        select(NeedCase.need_id, NeedCase.reference).where(
            col(NeedCase.need_id).in_(need_ids), col(NeedCase.reference).is_not(None)
        )
    ).all()
    return {need_id: reference for need_id, reference in rows if reference is not None}


def person_erased_at(session: Session, need_ids: list[str]) -> dict[str, datetime]:
    """Need id -> when its person's data was erased, for those of `need_ids` that were."""
    if not need_ids:
        return {}
    rows = session.exec(
        select(NeedCase.need_id, NeedCase.person_erased_at).where(
            col(NeedCase.need_id).in_(need_ids), col(NeedCase.person_erased_at).is_not(None)
        )
    ).all()
    return {need_id: at for need_id, at in rows if at is not None}


def person_cases(
    session: Session, need_ids: list[str]
) -> list[tuple[NeedCase, list[tuple[Referral, list[ReferralHistory]]]]]:
    """The needs referral knows of these ids, each with its referrals (oldest first) and their histories."""
    found = []
    for case in session.exec(
        select(NeedCase).where(col(NeedCase.need_id).in_(need_ids)).order_by(col(NeedCase.recorded_at))
    ).all():
        referrals = session.exec(
            select(Referral)
            .where(Referral.need_id == case.need_id)
            .order_by(col(Referral.created_at), col(Referral.id))
        ).all()
        found.append((case, [(r, history_of(session, r.id)) for r in referrals]))
    return found
