"""What intake answers about a need (the API's JSON, and the body an Idempotency-Key repeats): read models built
from the tables, no rule and no write."""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from services.intake import domain
from services.intake.store import IdempotencyKey, Need, NeedHistory, PersonErasure, needs_of_person
from shared.events import PersonContact
from shared.people import AccessEntry, access_entries
from shared.search import matches
from shared.service import page


class HistoryEntry(BaseModel):
    at: datetime
    event: str
    partner_id: str | None
    detail: str | None
    # referral.declined: why the partner declined (out_of_scope, out_of_territory, capacity, already_followed, other)
    reason_code: str | None = None


HISTORY_FIELDS = {"at", "event", "partner_id", "detail", "reason_code"}


class ConsentRecord(BaseModel):
    """The consent recorded with the need (docs/privacy.md, "Consent")."""

    purposes: list[str]  # "handoff", "messages"
    version: str | None  # of the directory's consent text shown; None for needs recorded before it was kept
    recorded_by: str | None
    recorded_at: datetime | None
    messages_withdrawn_at: datetime | None


class NeedPublic(BaseModel):
    id: str
    reference: str  # what the person reads out on the phone (CHA-2611-0042)
    library_id: str
    category: str
    summary: str
    postal_code: str | None
    urgency: str
    status: str
    partner_id: str | None
    referral_id: str | None
    recorded_at: datetime
    respond_by: datetime
    answered_at: datetime | None
    sla: str
    person_id: str
    person: PersonContact
    consent_record: ConsentRecord | None = None
    # A partner answered (accepted, responded, declined, closed) since the desk last opened the need's page.
    answers_unread: bool = False
    # When the desk last nudged the partner (at most once in 24 hours), and when it closed the need.
    partner_nudged_at: datetime | None = None
    closed_by_desk_at: datetime | None = None
    history: list[HistoryEntry] | None = None


def public(need: Need, history: list[NeedHistory] | None = None) -> NeedPublic:
    return NeedPublic(
        **need.model_dump(
            include={
                "id",
                "reference",
                "library_id",
                "category",
                "summary",
                "postal_code",
                "urgency",
                "status",
                "partner_id",
                "referral_id",
                "recorded_at",
                "respond_by",
                "answered_at",
                "sla",
                "person_id",
                "partner_nudged_at",
                "closed_by_desk_at",
            }
        ),
        answers_unread=domain.has_unread_answers(need.last_answer_at, need.answers_read_at),
        person=PersonContact(
            display_name=need.person_display_name,
            email=need.person_email,
            phone=need.person_phone,
            preferred_channel=need.preferred_channel,
            language=need.language,
        ),
        consent_record=ConsentRecord(
            purposes=[p for p in need.consent_purposes.split(",") if p],
            version=need.consent_version,
            recorded_by=need.consent_recorded_by,
            recorded_at=need.consent_recorded_at,
            messages_withdrawn_at=need.messages_withdrawn_at,
        ),
        history=None if history is None else [HistoryEntry(**h.model_dump(include=HISTORY_FIELDS)) for h in history],
    )


def need_with_history(session: Session, need_id: str) -> tuple[Need, list[NeedHistory]] | None:
    """The need and its history, oldest first; None when there is no such need."""
    need = session.get(Need, need_id)
    if need is None:
        return None
    history = session.exec(
        select(NeedHistory).where(NeedHistory.need_id == need_id).order_by(col(NeedHistory.at), col(NeedHistory.id))
    ).all()
    return need, list(history)


def desk_needs(
    session: Session,
    library_id: str,
    now: datetime,
    *,
    status: str = "",
    category: str = "",
    sla: str = "",
    q: str = "",
    unread: bool = False,
    page: int = 1,
    limit: int,
    overdue_limit: int,
) -> tuple[list[Need], bool]:
    """A page of "Mes demandes" in the desk's order (domain.desk_order), and whether older ones follow. Every overdue
    need stays on the first page, above the newest ones; later pages go back in time."""
    query = select(Need).where(Need.library_id == library_id)
    if status == "waiting":
        query = query.where(col(Need.status).in_(domain.WAITING_FOR_PARTNER))
    elif status:
        query = query.where(Need.status == status)
    if category:
        query = query.where(Need.category == category)
    query = query.where(*matches(Need.search_text, q))
    if unread:
        query = query.where(*_unread())
    if sla == "overdue":
        query = query.where(col(Need.status).in_(domain.WAITING_FOR_PARTNER), Need.respond_by <= now)
    elif sla:
        query = query.where(Need.sla == sla)
    overdue = query.where(col(Need.status).in_(domain.WAITING_FOR_PARTNER), Need.respond_by <= now)
    late = [] if page > 1 else list(session.exec(overdue.order_by(col(Need.respond_by)).limit(overdue_limit)).all())
    newest = list(
        session.exec(
            query.order_by(col(Need.recorded_at).desc(), col(Need.id).desc())
            .offset((page - 1) * limit)
            .limit(limit + 1)
        ).all()
    )
    by_id = {n.id: n for n in [*late, *newest[:limit]]}
    ordered = sorted(by_id.values(), key=lambda n: domain.desk_order(n.status, n.respond_by, n.recorded_at, now))
    return ordered, len(newest) > limit


def _unread() -> tuple:
    """The needs a partner answered since the desk last opened them (domain.has_unread_answers, in SQL)."""
    return (
        col(Need.last_answer_at).is_not(None),
        or_(col(Need.answers_read_at).is_(None), col(Need.last_answer_at) > col(Need.answers_read_at)),
    )


def unread_answers(session: Session, library_id: str) -> int:
    """How many of the library's needs hold partner answers the desk has not read ("Réponses à lire (N)")."""
    return session.exec(select(func.count()).select_from(Need).where(Need.library_id == library_id, *_unread())).one()


def need_page(
    session: Session,
    *,
    own_library: str | None,
    library_id: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
    q: str | None = None,
) -> tuple[list[Need], str | None]:
    """A page of needs for the API, newest first: a desk's (`own_library`) or every library's, filtered, and
    searched (`q`: shared.search)."""
    query = select(Need).where(*matches(Need.search_text, q))
    for library in (own_library, library_id):
        if library:
            query = query.where(Need.library_id == library)
    if status:
        query = query.where(Need.status == status)
    return page(query, Need.recorded_at, Need.id, limit, cursor, session)


# --- a person: what intake holds about them ---------------------------------------------------------------


class ErasurePublic(BaseModel):
    requested_at: datetime
    requested_by: str
    reason: str
    need_ids: list[str]


class PersonPart(BaseModel):
    """Intake's part of a person's export."""

    person_id: str
    person: PersonContact  # as recorded with their newest need
    needs: list[NeedPublic]  # each with its history
    erasure: ErasurePublic | None
    access_log: list[AccessEntry]


def erasure_of(session: Session, person_id: str) -> ErasurePublic | None:
    row = session.get(PersonErasure, person_id)
    if row is None:
        return None
    return ErasurePublic(
        requested_at=row.requested_at,
        requested_by=row.requested_by,
        reason=row.reason,
        need_ids=json.loads(row.need_ids),
    )


def person_part(session: Session, person_id: str) -> PersonPart | None:
    """Everything intake holds about the person; None when no need is theirs."""
    needs = needs_of_person(session, person_id)
    if not needs:
        return None
    shown = []
    for need in needs:
        found = need_with_history(session, need.id)
        assert found is not None  # read in this transaction
        shown.append(public(*found))
    return PersonPart(
        person_id=person_id,
        person=shown[-1].person,
        needs=shown,
        erasure=erasure_of(session, person_id),
        access_log=access_entries(session, [n.id for n in needs]),
    )


def need_of_key(session: Session, user_id: str, key: str) -> Need | None:
    """The need a user's idempotency key recorded, if it did (a need kept offline, then fixed on the form)."""
    seen = session.get(IdempotencyKey, (user_id, key))
    return session.get(Need, seen.need_id) if seen is not None else None
