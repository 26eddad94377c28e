"""Intake's use cases, one handler per command (`commands.py`: RecordNeed, CancelNeed) and per event consumed (the
referral stream's): the rules, the state change, the events through the outbox and the history row, in one
transaction. api.py and web.py parse, authorise, call one handler and render; consumers.py hands it the event."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from services.intake import domain
from services.intake.commands import (
    AddNote,
    CancelNeed,
    CloseNeed,
    ErasePerson,
    MarkAnswersRead,
    NudgePartner,
    RecordNeed,
    RerouteNeed,
    SendReceipt,
    WithdrawMessagesConsent,
)
from services.intake.store import (
    IdempotencyKey,
    Need,
    NeedHistory,
    PersonErasure,
    add_history,
    needs_of_person,
    next_reference,
)
from services.intake.views import public
from shared import deadlines
from shared.db import Database, emit, insert_new, table_of
from shared.directory import Directory
from shared.events import (
    NeedCancelled,
    NeedClosedByDesk,
    NeedMessagesWithdrawn,
    NeedNoteAdded,
    NeedPartnerNudged,
    NeedPersonalData,
    NeedRecorded,
    NeedRerouteRequested,
    NeedUnroutable,
    PersonErased,
    ReceiptRequested,
    ReferralAssigned,
    ReferralClosed,
    ReferralEvent,
    new_id,
)
from shared.people import ERASED
from shared.personal_data import PersonalData


@dataclass(frozen=True)
class Recorded:
    id: str  # the need's
    response_body: str  # the JSON of the 201 that recorded it: a repeat with its Idempotency-Key answers exactly it


class KeyReused(Exception):
    """An Idempotency-Key already used for another request; `need_id` is what it recorded."""

    def __init__(self, need_id: str) -> None:
        super().__init__(need_id)
        self.need_id = need_id


class UnknownNeed(LookupError):
    """No such need (or, for `same_person_as`, none at the recording library)."""


class AlreadyClosed(Exception):
    """The need is closed or cancelled already: there is nothing to cancel."""


# --- command handlers -----------------------------------------------------------------------------------


def record_need(
    db: Database, cmd: RecordNeed, *, directory: Directory, now: datetime, personal_data: PersonalData
) -> Recorded:
    """Record the need with the deadline the directory gives it, its history and need.recorded in the outbox, in one
    transaction (a thread's work: it blocks on the database). With a key, a repeat of the same request answers what
    the first answered (the need as it was recorded, whatever happened to it since), even when the repeats race;
    the same key with another request raises KeyReused. The event carries the person's identity and the summary
    sealed with the person's data key, which this creates in Redis for their first need, before the commit (so
    before the relay can publish the event): a redis.RedisError then records nothing."""

    def replayed(session: Session) -> Recorded | None:
        if cmd.idempotency_key is None:
            return None
        seen = session.execute(_KEY_SEEN, {"user_id": cmd.recorded_by, "key": cmd.idempotency_key}).first()
        if seen is None:
            return None
        if seen.request_hash != cmd.request_hash:
            raise KeyReused(seen.need_id)
        if seen.response_body is None:  # a key kept before its answer was: the need as it is now
            return Recorded(seen.need_id, public(session.get_one(Need, seen.need_id)).model_dump_json())
        return Recorded(seen.need_id, seen.response_body)

    try:
        with db.transaction() as session:
            if (earlier := replayed(session)) is not None:
                return earlier
            need = _new_need(session, cmd, directory, now, personal_data)
            recorded = Recorded(need.id, public(need).model_dump_json())
            if cmd.idempotency_key is not None:
                key = {"user_id": cmd.recorded_by, "key": cmd.idempotency_key, "request_hash": cmd.request_hash or ""}
                answered = {"need_id": need.id, "created_at": now, "response_body": recorded.response_body}
                session.execute(_ADD_KEY, key | answered)
    except IntegrityError:  # the same key committed concurrently: answer what it answered
        with db.read() as session:
            earlier = replayed(session)
        if earlier is None:
            raise
        return earlier
    return recorded


# Built once: the key a request came with, as already seen, and as recorded with its answer.
_KEYS = table_of(IdempotencyKey)
_KEY_SEEN = sa.select(_KEYS).where(_KEYS.c.user_id == sa.bindparam("user_id"), _KEYS.c.key == sa.bindparam("key"))
_ADD_KEY = sa.insert(_KEYS)


def _new_need(
    session: Session, cmd: RecordNeed, directory: Directory, now: datetime, personal_data: PersonalData
) -> Need:
    person_id = None
    if cmd.same_person_as is not None:
        earlier = session.get(Need, cmd.same_person_as)
        if earlier is None or earlier.library_id != cmd.library_id:
            raise UnknownNeed(cmd.same_person_as)
        # An erased person's id is closed: a need brought again is recorded for a new person, erasable on its own.
        person_id = earlier.person_id if earlier.person_erased_at is None else None
    respond_by = deadlines.expected_respond_by(
        directory, category=cmd.category, postal_code=cmd.postal_code, library_id=cmd.library_id, recorded_at=now
    )
    library = directory.library(cmd.library_id)
    assert library is not None  # validate_need checked it
    reference = next_reference(session, domain.reference_prefix(library.reference_code, now, library.zoneinfo))
    need = Need(
        id=new_id(),
        reference=reference,
        library_id=cmd.library_id,
        category=cmd.category,
        summary=cmd.summary,
        postal_code=cmd.postal_code,
        urgency=cmd.urgency,
        person_id=person_id or new_id(),
        person_display_name=cmd.person.display_name,
        person_email=cmd.person.email,
        person_phone=cmd.person.phone,
        preferred_channel=cmd.person.preferred_channel,
        language=cmd.person.language,
        recorded_by=cmd.recorded_by,
        recorded_at=now,
        respond_by=respond_by,
        consent_purposes=",".join(cmd.consent_purposes),
        consent_version=cmd.consent_version,
        consent_recorded_by=cmd.recorded_by,
        consent_recorded_at=now,
        search_text=domain.need_search_text(
            reference, cmd.person.display_name, cmd.person.email, cmd.person.phone, cmd.summary
        ),
    )
    insert_new(session, need)
    add_history(session, need.id, now, "need.recorded")
    emit(
        session,
        NeedRecorded(
            need_id=need.id,
            library_id=need.library_id,
            category=need.category,
            postal_code=need.postal_code,
            urgency=need.urgency,
            recorded_at=now,
            reference=need.reference,
            person_id=need.person_id,
            preferred_channel=cmd.person.preferred_channel,
            language=cmd.person.language,
            sealed=personal_data.seal_need(
                need.person_id,
                need.id,
                NeedPersonalData(
                    summary=need.summary,
                    display_name=cmd.person.display_name,
                    email=cmd.person.email,
                    phone=cmd.person.phone,
                ),
            ),
            correlation_id=cmd.correlation_id,
            occurred_at=now,
        ),
    )
    return need


def cancel_need(db: Database, cmd: CancelNeed, *, now: datetime) -> Need:
    """Ops withdraw a need recorded in error: it is closed here at once, its history says why (the desk's audit),
    and referral cancels its open referral and stops its clock (need.cancelled names the actor). It no longer counts
    in the library's figures."""
    with db.transaction() as session:
        need = session.get(Need, cmd.need_id)
        if need is None:
            raise UnknownNeed(cmd.need_id)
        if need.cancelled_at is not None or need.status == "closed":
            raise AlreadyClosed(need.id)
        need.status, need.cancelled_at = "closed", now
        session.add(need)
        add_history(session, need.id, now, "need.cancelled", detail=cmd.reason)
        emit(
            session,
            NeedCancelled(
                need_id=need.id, library_id=need.library_id, reason=cmd.reason, actor=cmd.actor, occurred_at=now
            ),
        )
    return need


class NoAddress(Exception):
    """The person gave no address for this channel (or their data was erased): nothing can be sent to them."""


def send_receipt(db: Database, cmd: SendReceipt, *, now: datetime) -> Need:
    """Ask notifications to send the person their receipt (need.receipt_requested, ids and the need's facts only),
    and say so in the need's history (the channel, never the address)."""
    with db.transaction() as session:
        need = session.get(Need, cmd.need_id)
        if need is None or need.library_id != cmd.library_id:
            raise UnknownNeed(cmd.need_id)
        address = need.person_email if cmd.channel == "email" else need.person_phone if cmd.channel == "sms" else None
        if not address or need.person_erased_at is not None:
            raise NoAddress(cmd.channel)
        add_history(session, need.id, now, f"receipt.sent_{cmd.channel}")
        emit(
            session,
            ReceiptRequested(
                need_id=need.id,
                library_id=need.library_id,
                reference=need.reference,
                category=need.category,
                channel="email" if cmd.channel == "email" else "sms",
                status=need.status,
                partner_id=need.partner_id,
                respond_by=need.respond_by,
                actor=cmd.actor,
                occurred_at=now,
            ),
        )
    return need


@dataclass(frozen=True)
class Erasure:
    erasure: PersonErasure
    done_now: bool  # False: the person's data had been erased already, nothing was changed


def erase_person(db: Database, cmd: ErasePerson, *, now: datetime, personal_data: PersonalData) -> Erasure:
    """Erase what identifies the person and what was written about their needs: the name becomes the marker, the
    addresses go, the summary and every text of the history become the marker, the first answers kept for an
    Idempotency-Key go. What the figures count stays (library, category, dates, status, partner). The erasure row
    keeps who asked and why; person.erased (ids only) tells the other services. The person's data key is deleted
    first, in the transaction (crypto-shredding: every sealed copy, in a stream, a dead letter or an outbox row,
    becomes unreadable); a redis.RedisError then records nothing. A second request changes nothing."""
    try:
        return _erase_person(db, cmd, now, personal_data)
    except IntegrityError:  # the same erasure committed concurrently (PostgreSQL): it is done
        with db.read() as session:
            return Erasure(session.get_one(PersonErasure, cmd.person_id), done_now=False)


def _erase_person(db: Database, cmd: ErasePerson, now: datetime, personal_data: PersonalData) -> Erasure:
    with db.transaction() as session:
        if (earlier := session.get(PersonErasure, cmd.person_id, with_for_update=True)) is not None:
            return Erasure(earlier, done_now=False)
        needs = needs_of_person(session, cmd.person_id)
        if not needs:
            raise UnknownNeed(cmd.person_id)
        need_ids = [n.id for n in needs]
        erasure = PersonErasure(
            person_id=cmd.person_id,
            requested_at=now,
            requested_by=cmd.actor,
            reason=cmd.reason,
            need_ids=json.dumps(need_ids),
        )
        session.add(erasure)
        for need in needs:
            need.summary, need.person_display_name = ERASED, ERASED
            need.person_email = need.person_phone = None
            need.person_erased_at = now
            need.search_text = domain.need_search_text(need.reference, None, None, None, None)
            session.add(need)
            add_history(session, need.id, now, "person.erased", detail=cmd.actor)
        for row in session.exec(select(NeedHistory).where(col(NeedHistory.need_id).in_(need_ids))).all():
            if row.detail is not None and row.event != "person.erased":
                row.detail = ERASED
                session.add(row)
        for key in session.exec(select(IdempotencyKey).where(col(IdempotencyKey.need_id).in_(need_ids))).all():
            key.response_body = None  # held the person's details as first answered; a repeat answers the need now
            session.add(key)
        personal_data.forget(cmd.person_id, now)
        emit(
            session,
            PersonErased(
                need_id=need_ids[0],
                person_id=cmd.person_id,
                need_ids=tuple(need_ids),
                erased_at=now,
                actor=cmd.actor,
                occurred_at=now,
            ),
        )
    return Erasure(erasure, done_now=True)


def withdraw_messages_consent(db: Database, cmd: WithdrawMessagesConsent, *, now: datetime) -> bool:
    """The person withdraws their consent to messages: recorded on the need (who, when) with a history row, and
    need.messages_withdrawn tells notifications to send them nothing more. The need and its handoff go on. False when
    there was nothing to withdraw (never given, or withdrawn already): nothing changes."""
    with db.transaction() as session:
        need = session.get(Need, cmd.need_id)
        if need is None or (cmd.library is not None and need.library_id != cmd.library):
            raise UnknownNeed(cmd.need_id)
        if need.messages_withdrawn_at is not None or "messages" not in need.consent_purposes.split(","):
            return False
        need.messages_withdrawn_at, need.messages_withdrawn_by = now, cmd.actor
        session.add(need)
        add_history(session, need.id, now, "need.messages_withdrawn")
        emit(
            session,
            NeedMessagesWithdrawn(need_id=need.id, library_id=need.library_id, actor=cmd.actor, occurred_at=now),
        )
    return True


# --- the desk's actions on a need (issue 14, point 8) ---------------------------------------------------------


def _desk_need(session: Session, need_id: str, library: str | None) -> Need:
    """The need, locked for the action, if the actor may act on it (a desk: its own library's; ops: any)."""
    need = session.exec(select(Need).where(Need.id == need_id).with_for_update()).first()
    if need is None or (library is not None and need.library_id != library):
        raise UnknownNeed(need_id)
    return need


def add_note(db: Database, cmd: AddNote, *, now: datetime, personal_data: PersonalData) -> Need:
    """A note for the partner holding the need: kept in the need's history (the desk sees what it wrote), and
    need.note_added carries it sealed with the person's data key to referral, which shows it on the partner's page
    and has the contact emailed. Raises UnknownNeed, domain.Refusal; a redis.RedisError records nothing."""
    with db.transaction() as session:
        need = _desk_need(session, cmd.need_id, cmd.library)
        domain.check_note(need.status, need.person_erased_at is not None)
        add_history(session, need.id, now, "need.note_added", detail=cmd.text)
        emit(
            session,
            NeedNoteAdded(
                need_id=need.id,
                library_id=need.library_id,
                note_id=new_id(),
                actor=cmd.actor,
                sealed=personal_data.seal_text(need.person_id, need.id, cmd.text),
                occurred_at=now,
            ),
        )
    return need


def nudge_partner(db: Database, cmd: NudgePartner, *, now: datetime) -> Need:
    """Ask the partner holding the need for news (referral emails its contact), at most once in 24 hours.
    Raises UnknownNeed, domain.Refusal (`too_soon` says from when)."""
    with db.transaction() as session:
        need = _desk_need(session, cmd.need_id, cmd.library)
        domain.check_nudge(need.status, need.partner_nudged_at, now)
        assert need.partner_id is not None  # held by a partner (check_nudge)
        need.partner_nudged_at = now
        session.add(need)
        add_history(session, need.id, now, "need.partner_nudged", partner_id=need.partner_id)
        emit(
            session,
            NeedPartnerNudged(
                need_id=need.id,
                library_id=need.library_id,
                partner_id=need.partner_id,
                actor=cmd.actor,
                occurred_at=now,
            ),
        )
    return need


def close_need(db: Database, cmd: CloseNeed, *, now: datetime, personal_data: PersonalData) -> Need:
    """The person no longer needs help: the need is closed at once (it still counts in the figures), its history
    says why, and need.closed_by_desk (the reason sealed) has referral end the referral and stop the clock.
    Raises UnknownNeed, domain.Refusal; a redis.RedisError records nothing."""
    with db.transaction() as session:
        need = _desk_need(session, cmd.need_id, cmd.library)
        domain.check_open(need.status, need.person_erased_at is not None)
        erased = need.person_erased_at is not None
        need.status, need.closed_by_desk_at = "closed", now
        session.add(need)
        add_history(session, need.id, now, "need.closed_by_desk", detail=ERASED if erased else cmd.reason)
        emit(
            session,
            NeedClosedByDesk(
                need_id=need.id,
                library_id=need.library_id,
                actor=cmd.actor,
                sealed=None if erased else personal_data.seal_text(need.person_id, need.id, cmd.reason),
                occurred_at=now,
            ),
        )
    return need


def reroute_need(db: Database, cmd: RerouteNeed, *, now: datetime) -> Need:
    """After a decline left the need with no partner, ask referral to route it again (those that declined stay
    excluded); the answer (a partner, or none still) comes back as referral events. Raises UnknownNeed,
    domain.Refusal."""
    with db.transaction() as session:
        need = _desk_need(session, cmd.need_id, cmd.library)
        declined = (
            session.exec(
                select(NeedHistory.id).where(NeedHistory.need_id == need.id, NeedHistory.event == "referral.declined")
            ).first()
            is not None
        )
        domain.check_reroute(need.status, need.person_erased_at is not None, declined)
        add_history(session, need.id, now, "need.reroute_requested")
        emit(
            session, NeedRerouteRequested(need_id=need.id, library_id=need.library_id, actor=cmd.actor, occurred_at=now)
        )
    return need


def mark_answers_read(db: Database, cmd: MarkAnswersRead, *, now: datetime) -> bool:
    """The desk opened the need: its partner answers are read. False (nothing written) when none was unread."""
    with db.transaction() as session:
        need = session.get(Need, cmd.need_id)
        if need is None or need.library_id != cmd.library:
            return False
        if not domain.has_unread_answers(need.last_answer_at, need.answers_read_at):
            return False
        need.answers_read_at = max(now, need.last_answer_at or now)
        session.add(need)
    return True


# --- event handlers (called by consumers.py through Bus.process, once per event) ---------------------------


# The need's handoff state, which referral's events move: read and written by Core (no ORM object for an event).
_NEEDS = table_of(Need)
_HANDOFF_STATE = sa.select(
    _NEEDS.c.id,
    _NEEDS.c.status,
    _NEEDS.c.sla,
    _NEEDS.c.referral_sequence,
    _NEEDS.c.answered_at,
    _NEEDS.c.last_answer_at,
    _NEEDS.c.cancelled_at,
    _NEEDS.c.closed_by_desk_at,
    _NEEDS.c.person_erased_at,
    _NEEDS.c.partner_id,
    _NEEDS.c.referral_id,
    _NEEDS.c.respond_by,
).where(_NEEDS.c.id == sa.bindparam("need_id"))


def on_referral_event(session: Session, event: ReferralEvent | NeedUnroutable) -> None:
    """Keep the desk's view of the handoff in step with the referral service."""
    need = session.execute(_HANDOFF_STATE, {"need_id": event.need_id}).first()
    if need is None:
        return  # a need from another deployment sharing the namespace would be a bug; nothing to update
    if event.type in ("referral.note_added", "referral.nudged", "referral.reply_recorded") or (
        isinstance(event, ReferralClosed) and event.by_desk
    ):
        return  # the desk's own actions, already in the need's history
    detail = next(
        (
            text
            for name in ("reason", "routed_because", "outcome", "message", "person_contacted")
            if (text := getattr(event, name, None))
        ),
        None,
    )
    if need.person_erased_at is not None and detail is not None:
        detail = ERASED  # an event written before it heard of the erasure may still carry a text
    add_history(
        session,
        need.id,
        event.occurred_at,
        event.type,
        partner_id=getattr(event, "partner_id", None),
        detail=detail,
        reason_code=getattr(event, "reason_code", None),
    )
    changes: dict[str, Any] = {"sla": domain.next_sla(need.sla, event.type)}
    if event.type in ("referral.accepted", "referral.responded") and need.answered_at is None:
        changes["answered_at"] = event.occurred_at
    if event.type in domain.ANSWER_EVENTS and (need.last_answer_at is None or event.occurred_at > need.last_answer_at):
        changes["last_answer_at"] = event.occurred_at  # "à lire" until the desk opens the need
    # Retried events can arrive out of order: the newest referral decision (by sequence) sets the status.
    status = domain.status_after(event.type, getattr(event, "reassigned", False))
    if need.cancelled_at is not None or need.closed_by_desk_at is not None:
        status = None  # cancelled by ops or closed by the desk: stays closed, whatever referral decided before
    if status and event.sequence > need.referral_sequence:
        changes.update(status=status, referral_sequence=event.sequence)
        if isinstance(event, ReferralAssigned):
            changes.update(partner_id=event.partner_id, referral_id=event.referral_id, respond_by=event.respond_by)
        elif status in ("recorded", "unroutable"):
            changes.update(partner_id=None, referral_id=None)
    changed = {name: value for name, value in changes.items() if value != getattr(need, name)}
    if changed:  # only what moved: the desk's own changes to the need (a nudge, a close) are left as they are
        session.execute(sa.update(_NEEDS).where(_NEEDS.c.id == need.id).values(changed))
