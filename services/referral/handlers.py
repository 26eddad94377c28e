"""Referral's application layer: one handler per command (`commands.py`) and per event it consumes.

A handler does the whole use case: the rules (domain.py), the state change (store.py), the events through the
outbox (`shared.db.emit`, in the same transaction) and the `ops_action` row where ops acted. Adapters (api.py,
web.py, dashboard_pages.py, consumers.py) parse and authorise, then call `handle(command, deps)` or, for an event,
its handler inside `Bus.process`'s transaction."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import replace as dataclass_replace
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.referral import domain
from services.referral.commands import (
    AcceptReferral,
    AssignNeed,
    CancelNeed,
    CancelReferral,
    CloseReferral,
    DeclineReferral,
    EscalateReferral,
    PausePartner,
    ReassignReferral,
    RecordPersonContacted,
    RecordPrivacyIncident,
    ReplayDeadLetters,
    RespondToReferral,
    ResumePartner,
    RevokeSessions,
    UpdatePrivacyIncident,
)
from services.referral.domain import INCIDENT_FIELDS, PrivacyIncidentFacts, Problem
from services.referral.store import (
    ClockTimer,
    NeedCase,
    OpsAction,
    PartnerPause,
    PrivacyIncident,
    Referral,
    ReferralHistory,
    add_clock_timers,
    add_history,
    current_referral,
    due_timers,
    has_clock_timers,
    history_of,
    keep_case,
    lock_need_case,
    lock_privacy_incident,
    lock_referral,
    partners_who_declined,
    paused_partners,
)
from services.referral.views import open_referrals_of
from shared import deadlines
from shared.db import Database, emit, insert_new
from shared.directory import Directory
from shared.events import (
    STREAMS,
    NeedCancelled,
    NeedClosedByDesk,
    NeedNoteAdded,
    NeedPartnerNudged,
    NeedPersonalData,
    NeedRecorded,
    NeedRerouteRequested,
    NeedUnroutable,
    PartnerReplyReceived,
    PersonContactAnswered,
    PersonErased,
    ReferralAccepted,
    ReferralAssigned,
    ReferralBreached,
    ReferralCancelled,
    ReferralClosed,
    ReferralContactQuestionDue,
    ReferralDeclined,
    ReferralEscalated,
    ReferralNoteAdded,
    ReferralNudged,
    ReferralPersonContacted,
    ReferralPersonErased,
    ReferralReminderDue,
    ReferralReplyRecorded,
    ReferralResponded,
    ReplyOutcome,
    new_id,
)
from shared.messaging import replay
from shared.people import ERASED
from shared.service import ACTOR_HEADER, internal_token
from shared.sessions import revoke_user_sessions
from shared.settings import Settings

REMOTE_TIMEOUT = 9.0  # seconds for intake to cancel a need


def on_need_recorded(
    session: Session, event: NeedRecorded, details: NeedPersonalData | None, directory: Directory, now: datetime
) -> None:
    """Route a recorded need. `details` is what the event sealed (consumers.py opens it), None when the person was
    erased before the event was read: the need is routed all the same (figures count it), with the marker for
    its summary and name and no way to reach the person."""
    erased = details is None
    if details is None:
        details = NeedPersonalData(summary=ERASED, display_name=ERASED)
    case = NeedCase(
        need_id=event.need_id,
        reference=event.reference,
        library_id=event.library_id,
        category=event.category,
        summary=details.summary,
        postal_code=event.postal_code,
        urgency=event.urgency,
        person_display_name=details.display_name,
        person_email=details.email,
        person_phone=details.phone,
        preferred_channel="none" if erased else event.preferred_channel,
        language=event.language,
        recorded_at=event.recorded_at,
        correlation_id=event.correlation_id,
        search_text=domain.case_search_text(
            event.reference,
            None if erased else details.display_name,
            details.email,
            details.phone,
            None if erased else details.summary,
        ),
    )
    route(session, case, directory, now)  # writes the case (store.keep_case), once, with its deadline and sequence


def route(
    session: Session,
    case: NeedCase,
    directory: Directory,
    now: datetime,
    actor: str = "system",
    partner_id: str | None = None,
    contact_id: str | None = None,
) -> Referral | None:
    """Hand the need to the best candidate partner (or to `partner_id`, chosen by ops), or declare it unroutable:
    then it is stranded (no partner holds it) until ops assign it (`assign_need`)."""
    stranded = case.stranded_since is not None
    if partner_id is None:
        # A case not yet written (need.recorded's) has no referral yet, so none declined: no query.
        just_recorded = sa.inspect(case).transient
        decision = domain.route_need(
            directory,
            category=case.category,
            postal_code=case.postal_code,
            library_id=case.library_id,
            open_referrals=lambda partner_id: open_referrals_of(session, partner_id),
            excluded_partner_ids=set() if just_recorded else partners_who_declined(session, case.need_id),
            paused_partner_ids=paused_partners(session, now),
        )
    else:
        decision = domain.assign_by_hand(directory, partner_id, actor, contact_id, stranded=stranded)
    if decision.partner is None:
        if case.respond_by is None:  # stranded at recording: the deadline intake gave it is the need's all the same
            case.respond_by = deadlines.expected_respond_by(
                directory,
                category=case.category,
                postal_code=case.postal_code,
                library_id=case.library_id,
                recorded_at=case.recorded_at,
            )
        case.stranded_since = case.stranded_since or now
        case.stranded_cause, case.stranded_reason = decision.cause, decision.reason
        unroutable = NeedUnroutable(
            need_id=case.need_id,
            library_id=case.library_id,
            category=case.category,
            reason=decision.reason,
            occurred_at=now,
            correlation_id=case.correlation_id,
            sequence=case.next_sequence(),
        )
        keep_case(session, case)
        emit(session, unroutable)
        return None
    # The case's new state (its deadline, no longer stranded, the event's sequence number) is all set before its
    # first write below: it is written once (inserted, for need.recorded), not inserted then updated. The referral
    # and the timers are Core inserts (store.py).
    timers: list[domain.ClockTimer] | None = None
    if case.respond_by is None:  # the clock belongs to the need: set at the first routing, kept after
        timers = domain.clock_timers(case.recorded_at, decision.partner)
        case.respond_by = timers[-1].due_at
    elif not has_clock_timers(session, case.need_id):  # stranded at recording: its deadline is kept
        timers = domain.clock_timers_until(case.recorded_at, decision.partner, case.respond_by, now)
    case.stranded_since = case.stranded_cause = case.stranded_reason = None
    assert decision.contact is not None  # a partner comes with its contact
    referral = Referral(
        id=new_id(),
        need_id=case.need_id,
        partner_id=decision.partner.id,
        contact_id=decision.contact.id,
        library_id=case.library_id,
        category=case.category,
        respond_by=case.respond_by,
        routed_because=decision.reason,
        created_at=now,
        updated_at=now,
    )
    assigned = ReferralAssigned(
        **referral_event_fields(referral, case, actor, now),
        contact_id=referral.contact_id,
        respond_by=referral.respond_by,
        routed_because=decision.reason,
    )
    keep_case(session, case)
    if timers:
        add_clock_timers(session, case.need_id, timers)
    insert_new(session, referral)
    add_history(session, referral.id, now, "assigned", actor, decision.reason)
    emit(session, assigned)
    return referral


def referral_event_fields(referral: Referral, case: NeedCase, actor: str, now: datetime) -> dict:
    """What every referral event carries, the need's next sequence number included (so: once per event)."""
    return dict(
        need_id=referral.need_id,
        referral_id=referral.id,
        partner_id=referral.partner_id,
        library_id=referral.library_id,
        category=referral.category,
        actor=actor,
        occurred_at=now,
        correlation_id=case.correlation_id,
        sequence=case.next_sequence(),
    )


def transition(
    session: Session,
    referral_id: str,
    action: str,
    actor: str,
    now: datetime,
    directory: Directory,
    text: str | None = None,
    partner_id: str | None = None,
    reason_code: str | None = None,
) -> Referral | None:
    """Move a referral by a partner's or ops' action, with its history and event; None when there is no such referral.
    Raises domain.TransitionRefused when the action is not allowed from the current status. A decline's
    `reason_code` is kept on the referral and carried by its event (the history keeps the partner's words)."""
    referral = lock_referral(session, referral_id)
    if referral is None:
        return None
    referral.status = domain.next_status(referral.status, action)
    referral.sla = domain.sla_after(referral.sla, action)
    referral.updated_at = now
    if action == "decline":
        referral.decline_reason = reason_code or domain.DECLINE_WITHOUT_CODE
    session.add(referral)
    case = session.get_one(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
    if case.person_erased_at is not None and text:
        text = ERASED  # written after the person's erasure: kept nowhere, carried by no event
    add_history(
        session,
        referral.id,
        now,
        action,
        actor,
        text if partner_id is None else f"{partner_id} : {text or ''}".strip(" :"),
    )
    common = referral_event_fields(referral, case, actor, now)
    session.add(case)
    if action in ("accept", "respond"):
        _schedule_contact_question(session, referral, case, directory, now)
    if action == "accept":
        emit(session, ReferralAccepted(**common))
    elif action == "respond":
        emit(session, ReferralResponded(**common, message=text or ""))
    elif action == "close":
        pending = session.exec(
            select(ClockTimer.id).where(
                ClockTimer.referral_id == referral.id,
                ClockTimer.kind == domain.CONTACT_QUESTION,
                col(ClockTimer.fired_at).is_(None),
            )
        ).first()
        emit(session, ReferralClosed(**common, outcome=text or "", contact_question_pending=pending is not None))
    elif action == "desk_close":  # the desk's reason stays here: it travelled sealed
        emit(session, ReferralClosed(**common, outcome="", by_desk=True))
    elif action == "decline":
        emit(session, ReferralDeclined(**common, reason=text or "", reason_code=referral.decline_reason))
        session.flush()
        if case.person_erased_at is None:  # an erased person's need goes to no other partner
            route(session, case, directory, now)
    elif action == "cancel":
        emit(session, ReferralCancelled(**common, reason=text or ""))
    elif action == "reassign":
        emit(session, ReferralCancelled(**common, reason=text or "", reassigned=True))
        session.flush()
        route(session, case, directory, now, actor=actor, partner_id=partner_id)
    return referral


def _schedule_contact_question(
    session: Session, referral: Referral, case: NeedCase, directory: Directory, now: datetime
) -> None:
    """At the partner's first answer (accept or respond), the timer that will ask the person whether they were
    contacted: one per referral (a later answer schedules nothing more), numbered by the need's sequence so that
    a need's second referral gets its own row."""
    partner = directory.partner(referral.partner_id)
    if partner is None or referral.contact_question_at is not None:
        return
    scheduled = session.exec(
        select(ClockTimer.id).where(ClockTimer.referral_id == referral.id, ClockTimer.kind == domain.CONTACT_QUESTION)
    ).first()
    if scheduled is None:
        # numbered by the sequence of the event this answer emits (numbered above): unique within the need
        question = (domain.CONTACT_QUESTION, case.sequence, domain.contact_question_due(now, partner))
        add_clock_timers(session, case.need_id, [question], referral_id=referral.id)


def on_need_cancelled(session: Session, event: NeedCancelled, directory: Directory, now: datetime) -> None:
    """A need recorded in error: cancel its open referral (referral.cancelled tells intake and the partner's
    pages) and stop its clock."""
    case = lock_need_case(session, event.need_id)  # before an ops assignment can give it a partner
    if case is None:  # its need.recorded is still being retried: so is this, until it has been routed
        raise LookupError(f"need {event.need_id} is not known here yet")
    if case.stranded_since is not None:  # nobody held it: nobody is left to tell, and it leaves ops' list
        case.stranded_since = case.stranded_cause = case.stranded_reason = None
        session.add(case)
    referral = current_referral(session, event.need_id)
    if referral is not None:
        transition(session, referral.id, "cancel", event.actor, now, directory, event.reason)
    _stop_clock(session, event.need_id, now, "cancelled")


def _stop_clock(session: Session, need_id: str, now: datetime, outcome: str) -> None:
    for timer in session.exec(
        select(ClockTimer).where(ClockTimer.need_id == need_id, col(ClockTimer.fired_at).is_(None))
    ).all():
        timer.fired_at, timer.outcome = now, outcome
        session.add(timer)


def _known_case(session: Session, event: Any) -> NeedCase:
    case = lock_need_case(session, event.need_id)
    if case is None:  # its need.recorded is still being retried: so is this, until it has been routed
        raise LookupError(f"need {event.need_id} is not known here yet")
    return case


def on_desk_note(session: Session, event: NeedNoteAdded, text: str | None, now: datetime) -> None:
    """The desk's note for the partner: kept in the history of the referral holding the need (the partner's page
    shows it), and referral.note_added has the contact emailed a link. `text` is what the event sealed, None when
    the person was erased since (nothing is kept then). With no partner holding the need any more, it stays on the
    last referral, for the record, and nobody is emailed."""
    case = _known_case(session, event)
    if text is None or case.person_erased_at is not None:
        return
    referral = current_referral(session, event.need_id)
    if referral is None:
        referral = session.exec(
            select(Referral).where(Referral.need_id == event.need_id).order_by(col(Referral.created_at).desc())
        ).first()
        if referral is not None:
            add_history(session, referral.id, now, "desk_note", event.actor, text)
        return
    add_history(session, referral.id, now, "desk_note", event.actor, text)
    referral.updated_at = now
    session.add(referral)
    emit(
        session,
        ReferralNoteAdded(**referral_event_fields(referral, case, event.actor, now), contact_id=referral.contact_id),
    )
    session.add(case)  # its sequence moved


def on_partner_nudged(session: Session, event: NeedPartnerNudged, now: datetime) -> None:
    """The desk asks for news: the partner holding the need, if it has not answered yet, gets an email
    (referral.nudged). Nothing happens when the need moved on meanwhile (answered, closed, declined)."""
    case = _known_case(session, event)
    referral = current_referral(session, event.need_id)
    if referral is None or referral.status not in ("assigned", "accepted"):
        return
    add_history(session, referral.id, now, "desk_nudge", event.actor)
    emit(
        session,
        ReferralNudged(
            **referral_event_fields(referral, case, event.actor, now),
            contact_id=referral.contact_id,
            respond_by=referral.respond_by,
        ),
    )
    session.add(case)


def on_closed_by_desk(
    session: Session, event: NeedClosedByDesk, reason: str | None, directory: Directory, now: datetime
) -> None:
    """The person no longer needs help: the open referral is closed by the desk (its reason in the history, which
    the partner's page shows; referral.closed with `by_desk`), the clock stops, and a need nobody held leaves ops'
    "Sans partenaire". `reason` is what the event sealed (None: the person was erased since, or before)."""
    case = _known_case(session, event)
    if case.stranded_since is not None:
        case.stranded_since = case.stranded_cause = case.stranded_reason = None
        session.add(case)
    referral = current_referral(session, event.need_id)
    if referral is not None:
        transition(session, referral.id, "desk_close", event.actor, now, directory, reason or ERASED)
    _stop_clock(session, event.need_id, now, "cancelled")


def on_reroute_requested(session: Session, event: NeedRerouteRequested, directory: Directory, now: datetime) -> None:
    """After a decline left the need with no partner, route it again: those that declined stay excluded (route),
    the deadline is kept. Nothing when a partner holds it meanwhile (ops assigned it) or the person was erased."""
    case = _known_case(session, event)
    if case.stranded_since is None or case.person_erased_at is not None:
        return
    route(session, case, directory, now, actor=event.actor)


def on_person_erased(session: Session, event: PersonErased, directory: Directory, now: datetime) -> None:
    """The person's data was erased: the need's summary and the person's details become the marker, and so does
    every text of its referrals' histories (answers, reasons, outcomes); its clock stops; the partner holding it
    is told (referral.person_erased). Statuses, dates, partners and categories stay for the figures."""
    cases = [session.get(NeedCase, need_id, with_for_update=True) for need_id in event.need_ids]
    if any(case is None for case in cases):  # a need.recorded still being retried: so is this, until it is here
        raise LookupError(f"a need of person.erased {event.event_id} is not known here yet")
    for case in cases:
        assert case is not None  # checked above
        if case.person_erased_at is not None:
            continue
        case.summary, case.person_display_name = ERASED, ERASED
        case.person_email = case.person_phone = None
        case.person_erased_at = event.erased_at
        case.search_text = domain.case_search_text(case.reference, None, None, None, None)
        session.add(case)
        referral_ids = list(session.exec(select(Referral.id).where(Referral.need_id == case.need_id)).all())
        for row in session.exec(
            select(ReferralHistory).where(col(ReferralHistory.referral_id).in_(referral_ids))
        ).all():
            if row.detail is not None:
                row.detail = ERASED
                session.add(row)
        for timer in session.exec(
            select(ClockTimer).where(ClockTimer.need_id == case.need_id, col(ClockTimer.fired_at).is_(None))
        ).all():
            timer.fired_at, timer.outcome = now, "erased"
            session.add(timer)
        if (referral := current_referral(session, case.need_id)) is not None:
            add_history(session, referral.id, now, "person_erased", event.actor)
            emit(
                session,
                ReferralPersonErased(
                    **referral_event_fields(referral, case, event.actor, now),
                    contact_id=referral.contact_id,
                    erased_at=event.erased_at,
                ),
            )
            session.add(case)  # its sequence moved


def fire_due_timers(
    session: Session, now: datetime, skip_locked: bool, observe_lag: Callable[[str, float], None] | None = None
) -> int:
    """Fire every due timer once: emit its event and move the SLA, or mark it moot if the clock stopped.
    `observe_lag(kind, seconds)` is told how late each timer fired."""
    fired = 0
    for timer in due_timers(session, now, skip_locked):
        if timer.kind == domain.CONTACT_QUESTION:
            if observe_lag is not None:
                observe_lag(timer.kind, (now - timer.due_at).total_seconds())
            fired += _ask_whether_contacted(session, timer, now)
            continue
        referral = current_referral(session, timer.need_id)
        timer.fired_at = now
        if observe_lag is not None:
            observe_lag(timer.kind, (now - timer.due_at).total_seconds())
        if referral is None or not domain.timer_fires(referral.status, referral.sla):
            timer.outcome = "moot"
            session.add(timer)
            continue
        timer.outcome = "fired"
        referral.sla = domain.SLA_AFTER_TIMER[timer.kind]
        referral.updated_at = now
        session.add_all([timer, referral])
        add_history(
            session,
            referral.id,
            now,
            timer.kind,
            "system",
            f"{timer.kind} {timer.number}" if timer.number else timer.kind,
        )
        case = session.get_one(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
        common = dict(
            referral_event_fields(referral, case, "system", now),
            contact_id=referral.contact_id,
            respond_by=referral.respond_by,
        )
        session.add(case)
        if timer.kind == "reminder":
            emit(session, ReferralReminderDue(**common, reminder_number=timer.number))
        elif timer.kind == "escalation":
            emit(session, ReferralEscalated(**common))
        else:
            emit(session, ReferralBreached(**common))
        fired += 1
    return fired


def escalate_now(session: Session, referral: Referral, now: datetime, actor: str, detail: str) -> bool:
    """Fire the need's escalation timer now (the backup contact and the coordinators are told by
    referral.escalated), if the need still waits for its first answer and the clock has not escalated yet."""
    if not domain.timer_fires(referral.status, referral.sla):
        return False
    timer = session.exec(
        select(ClockTimer).where(
            ClockTimer.need_id == referral.need_id, ClockTimer.kind == "escalation", col(ClockTimer.fired_at).is_(None)
        )
    ).first()
    if timer is None:
        return False
    timer.fired_at, timer.outcome = now, "fired"
    referral.sla, referral.updated_at = domain.SLA_AFTER_TIMER["escalation"], now
    session.add_all([timer, referral])
    add_history(session, referral.id, now, "escalation", actor, detail)
    case = session.get_one(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
    emit(
        session,
        ReferralEscalated(
            **referral_event_fields(referral, case, actor, now),
            contact_id=referral.contact_id,
            respond_by=referral.respond_by,
        ),
    )
    session.add(case)
    return True


def _ask_whether_contacted(session: Session, timer: ClockTimer, now: datetime) -> int:
    """The contact question's timer: once, referral.contact_question_due has notifications ask the person on their
    channel; moot when the referral went elsewhere, the desk closed it, the person was erased or it was asked."""
    timer.fired_at = now
    referral = lock_referral(session, timer.referral_id) if timer.referral_id else None
    case = session.get(NeedCase, timer.need_id, with_for_update=True)
    closed_by_desk = referral is not None and (
        session.exec(
            select(ReferralHistory.id).where(
                ReferralHistory.referral_id == referral.id, ReferralHistory.action == "desk_close"
            )
        ).first()
        is not None
    )
    if (
        referral is None
        or case is None
        or not domain.contact_question_goes(
            referral.status, closed_by_desk, referral.contact_question_at, case.person_erased_at is not None
        )
    ):
        timer.outcome = "moot"
        session.add(timer)
        return 0
    timer.outcome = "fired"
    referral.contact_question_at = now
    session.add_all([timer, referral])
    add_history(session, referral.id, now, "contact_question", "system")
    emit(
        session,
        ReferralContactQuestionDue(
            **referral_event_fields(referral, case, "system", now), referral_closed=referral.status == "closed"
        ),
    )
    session.add(case)
    return 1


def _record_person_contacted(session: Session, referral_id: str, answer: str, channel: str, now: datetime) -> bool:
    """The person's answer on the referral, its history line and referral.person_contacted (a "no" alerts the desk
    and the coordinator). False, and nothing recorded, when no question was asked or it was answered already."""
    if answer not in domain.PERSON_CONTACTED_ANSWERS:
        raise Refused("answer", "the answer is yes or no")
    referral = lock_referral(session, referral_id)
    if referral is None:
        raise NotFound("no such referral")
    if not domain.person_answer_counts(referral.contact_question_at, referral.person_contacted):
        return False
    case = session.get_one(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
    referral.person_contacted, referral.person_contacted_at = answer, now
    session.add(referral)
    add_history(session, referral.id, now, "person_contacted", "person", f"{answer} ({channel})")
    emit(
        session,
        ReferralPersonContacted(
            **referral_event_fields(referral, case, "person", now),
            person_contacted=answer,
            channel=channel,
            reference=case.reference,
        ),
    )
    session.add(case)
    return True


# --- a partner's reply by email (notifications received it: services/notifications/inbound.py) -------------------


def on_partner_reply(
    session: Session,
    event: PartnerReplyReceived,
    text: str | None,
    directory: Directory,
    now: datetime,
    away_escalates: bool = True,
) -> ReplyOutcome:
    """Apply a partner's reply by the API's rules: the first line's acceptance accepts, a decline declines with its
    reason code, anything else is the `respond` message. What no transition allows (a second answer, an unclear
    line after an acceptance) is kept in the referral's history, where the desk and the coordinator read it: nothing
    is lost. A referral that has left the partner takes nothing (notifications answers the sender politely). An
    out-of-office is recorded and, with `away_escalates`, escalates to the backup contact at once. `text` is what the
    event sealed (None: an out-of-office, or the person was erased). referral.reply_recorded says what was done."""
    referral = lock_referral(session, event.referral_id)
    if referral is None:  # notifications knew it from referral.assigned: this replica is only behind
        raise LookupError(f"referral {event.referral_id} is not known here yet")
    actor = f"email:{event.contact_id}"
    current = current_referral(session, referral.need_id)
    outcome: ReplyOutcome
    if referral.partner_id != event.partner_id or current is None or current.id != referral.id:
        outcome = "left_partner"
    elif event.intent == "out_of_office":
        add_history(session, referral.id, now, "out_of_office", actor)
        if away_escalates:
            escalate_now(session, referral, now, "system", "escalation (out-of-office reply)")
        outcome = "away"
    else:
        words = text if text is not None else ERASED
        status = referral.status
        if event.intent == "accept" and status == "assigned":
            transition(session, referral.id, "accept", actor, now, directory)
            if text:
                add_history(session, referral.id, now, "email_reply", actor, words)
            outcome = "accepted"
        elif event.intent == "decline" and status in ("assigned", "accepted"):
            transition(
                session, referral.id, "decline", actor, now, directory, text or None, reason_code=event.reason_code
            )
            outcome = "declined"
        elif event.intent != "accept" and status in ("assigned", "accepted") and words.strip():
            transition(session, referral.id, "respond", actor, now, directory, words)
            outcome = "responded"
        else:
            detail = words if text else f"({event.intent})"
            add_history(session, referral.id, now, "email_reply", actor, detail)
            outcome = "noted"
    session.flush()
    case = session.get_one(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
    emit(
        session,
        ReferralReplyRecorded(
            **referral_event_fields(referral, case, actor, now),
            reply_id=event.reply_id,
            contact_id=event.contact_id,
            outcome=outcome,
        ),
    )
    session.add(case)
    return outcome


def on_person_contact_answered(session: Session, event: PersonContactAnswered, now: datetime) -> None:
    """OUI or NON by SMS, read by notifications: recorded like an answer by the email's link."""
    try:
        _record_person_contacted(session, event.referral_id, event.answer, event.channel, now)
    except NotFound:
        return  # a referral of another deployment sharing the namespace: nothing to record


# --- commands -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deps:
    """What a command's handler is given besides the command: built per request by the adapters (deps.py)."""

    db: Database
    redis: Any  # the bus's asyncio Redis client (dead letters, web sessions)
    settings: Settings
    directory: Directory
    clock: Callable[[], datetime]
    wake_relay: Callable[[], None]  # the outbox relay publishes at once rather than at its next poll


@dataclass(frozen=True)
class ReferralState:
    """A referral after a command, with its history read in the same transaction."""

    referral: Referral
    history: list[ReferralHistory]
    reference: str | None = None  # its need's


def _reference_of(session: Session, need_id: str) -> str | None:
    case = session.get(NeedCase, need_id)
    return case.reference if case else None


class NotFound(LookupError):
    """The command's subject does not exist (or is not the acting partner's): a 404, never a 403."""


class Refused(ValueError):
    """A command the caller can fix: `field` names the input to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Invalid(Refused):
    """A command breaking several rules at once: `problems` names each field (the first is `field`)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems[0].field, problems[0].message)
        self.problems = problems


class NotPaused(Exception):
    """Resuming a partner that is not paused."""


class NotStranded(Exception):
    """Assigning a need that a partner holds, or that was cancelled or closed: the message says what to do instead."""


class RemoteFailed(Exception):
    """Intake did not do what was asked: `kind` is not_found, refused or unreachable."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _audit(session: Session, actor: str, action: str, target: str, reason: str, now: datetime) -> None:
    session.add(OpsAction(at=now, actor=actor, action=action, target=target, reason=reason))


def _partner_action(
    session: Session, command: Any, action: str, text: str | None, deps: Deps, reason_code: str | None = None
) -> ReferralState:
    referral = lock_referral(session, command.referral_id)  # locked before its status is read
    if referral is None or (command.as_partner is not None and referral.partner_id != command.as_partner):
        raise NotFound("no such referral")
    referral = transition(
        session,
        command.referral_id,
        action,
        command.actor,
        deps.clock(),
        deps.directory,
        text,
        reason_code=reason_code,
    )
    assert referral is not None  # locked above
    return ReferralState(referral, history_of(session, referral.id), _reference_of(session, referral.need_id))


@dataclass(frozen=True)
class PersonContactedState:
    """The referral the person answered about, and whether this answer was the one recorded."""

    referral: Referral
    recorded: bool


def record_person_contacted(session: Session, command: RecordPersonContacted, deps: Deps) -> PersonContactedState:
    recorded = _record_person_contacted(session, command.referral_id, command.answer, command.channel, deps.clock())
    return PersonContactedState(session.get_one(Referral, command.referral_id), recorded)


def accept_referral(session: Session, command: AcceptReferral, deps: Deps) -> ReferralState:
    return _partner_action(session, command, "accept", None, deps)


def respond_to_referral(session: Session, command: RespondToReferral, deps: Deps) -> ReferralState:
    return _partner_action(session, command, "respond", command.message, deps)


def decline_referral(session: Session, command: DeclineReferral, deps: Deps) -> ReferralState:
    """The partner declines with a reason (domain.decline_problem): the need goes to the next candidate (or is
    declared unroutable)."""
    reason = command.reason.strip()
    problem = domain.decline_problem(command.reason_code, reason)
    if problem is not None:
        raise Refused(problem.field, problem.message)
    return _partner_action(session, command, "decline", reason or None, deps, reason_code=command.reason_code)


def close_referral(session: Session, command: CloseReferral, deps: Deps) -> ReferralState:
    return _partner_action(session, command, "close", command.outcome, deps)


def escalate_referral(session: Session, command: EscalateReferral, deps: Deps) -> ReferralState:
    """Ops escalate a referral now (the backup contact and the coordinators are told); recorded in the ops log.
    Refused (TransitionRefused) once the need was answered or its clock escalated already."""
    now = deps.clock()
    referral = lock_referral(session, command.referral_id)
    if referral is None:
        raise NotFound("no such referral")
    if not escalate_now(session, referral, now, command.actor, f"escalation (ops: {command.reason})"):
        raise domain.TransitionRefused("the need is not waiting for a first answer, or was escalated already")
    _audit(session, command.actor, "escalate", referral.id, command.reason, now)
    return ReferralState(referral, history_of(session, referral.id), _reference_of(session, referral.need_id))


def cancel_referral(session: Session, command: CancelReferral, deps: Deps) -> ReferralState:
    """Ops cancel a referral; recorded in the ops log."""
    now = deps.clock()
    if lock_referral(session, command.referral_id) is None:
        raise NotFound("no such referral")
    referral = transition(session, command.referral_id, "cancel", command.actor, now, deps.directory, command.reason)
    assert referral is not None  # locked above
    _audit(session, command.actor, "cancel_referral", command.referral_id, command.reason, now)
    return ReferralState(referral, history_of(session, referral.id), _reference_of(session, referral.need_id))


def reassign_referral(session: Session, command: ReassignReferral, deps: Deps) -> ReferralState:
    """Ops hand the need to another partner that takes its category (the old referral is cancelled, the need keeps
    its deadline), recorded in the ops log. `force` hands it to a partner outside the category: an override that
    needs a reason and is recorded as such, in the ops log and in the old referral's history.
    Raises NotFound, Refused, or domain.TransitionRefused."""
    now, directory, reason = deps.clock(), deps.directory, command.reason
    referral = lock_referral(session, command.referral_id)
    if referral is None:
        raise NotFound("no such referral")
    partner = directory.partner(command.partner_id)
    if partner is None:
        raise Refused("partner_id", f"unknown partner '{command.partner_id}'")
    takes_category = domain.takes_category(partner, referral.category)
    if not takes_category and not command.force:
        raise Refused(
            "partner_id",
            f"partner '{command.partner_id}' does not take the need's category "
            f"'{referral.category}': choose one that does, or set force: true "
            "with a reason to override",
        )
    override = command.force and not takes_category
    if override and not (reason or "").strip():
        raise Refused("reason", "an override (force: true for a partner outside the need's category) needs a reason")
    transition(session, referral.id, "reassign", command.actor, now, directory, reason, command.partner_id)
    if override:
        add_history(session, referral.id, now, "reassign_override", command.actor, reason)
    _audit(
        session,
        command.actor,
        "reassign_override" if override else "reassign",
        f"{referral.id}:{command.partner_id}",
        reason or "",
        now,
    )
    return ReferralState(referral, history_of(session, referral.id), _reference_of(session, referral.need_id))


def assign_need(session: Session, command: AssignNeed, deps: Deps) -> ReferralState:
    """Ops hand a need no partner holds (unroutable at recording, or declined by every candidate) to the partner
    they chose, any partner of the directory (they may have agreed it by phone): a new referral keeps the need's
    `respond_by`, referral.assigned tells intake, the partner and the person; recorded in the ops log.
    Raises NotFound, Refused (partner_id, contact_id), NotStranded."""
    now, directory = deps.clock(), deps.directory
    case = lock_need_case(session, command.need_id)
    if case is None:
        raise NotFound("no such need (or referral has not heard of it yet: try again in a few seconds)")
    partner = directory.partner(command.partner_id)
    if partner is None:
        raise Refused(
            "partner_id",
            f"unknown partner '{command.partner_id}'; the directory's partners: "
            + ", ".join(p.id for p in directory.partners),
        )
    if command.contact_id is not None and command.contact_id not in {c.id for c in partner.contacts}:
        raise Refused(
            "contact_id",
            f"contact '{command.contact_id}' is not a contact of partner '{partner.id}'; its contacts: "
            + ", ".join(c.id for c in partner.contacts)
            + " (or leave contact_id out: its primary contact gets the need)",
        )
    if case.stranded_since is None:
        held = current_referral(session, case.need_id)
        if held is not None:
            raise NotStranded(
                f"need {case.need_id} is held by partner '{held.partner_id}' (referral {held.id}, {held.status}): "
                f"to hand it to another partner, use POST /api/v1/referrals/{held.id}/reassign"
            )
        raise NotStranded(f"need {case.need_id} is no longer waiting for a partner: it was closed or cancelled")
    referral = route(
        session, case, directory, now, actor=command.actor, partner_id=partner.id, contact_id=command.contact_id
    )
    assert referral is not None  # a partner chosen by ops always gets it
    _audit(session, command.actor, "assign", f"{case.need_id}:{partner.id}", command.reason, now)
    return ReferralState(referral, history_of(session, referral.id))


def pause_partner(session: Session, command: PausePartner, deps: Deps) -> PartnerPause:
    """Routing skips the partner until `until`; referrals it already has stay with it."""
    now = deps.clock()
    if deps.directory.partner(command.partner_id) is None:
        raise NotFound("no such partner")
    if command.until <= now:
        raise Refused("until", "must be in the future")
    pause = session.get(PartnerPause, command.partner_id) or PartnerPause(
        partner_id=command.partner_id,
        until=command.until,
        reason=command.reason,
        paused_by=command.actor,
        paused_at=now,
    )
    pause.until, pause.reason, pause.paused_by, pause.paused_at = command.until, command.reason, command.actor, now
    session.add(pause)
    _audit(session, command.actor, "pause_partner", command.partner_id, command.reason, now)
    return pause


def resume_partner(session: Session, command: ResumePartner, deps: Deps) -> None:
    if deps.directory.partner(command.partner_id) is None:
        raise NotFound("no such partner")
    pause = session.get(PartnerPause, command.partner_id)
    if pause is None:
        raise NotPaused("this partner is not paused")
    session.delete(pause)
    _audit(session, command.actor, "resume_partner", command.partner_id, command.reason, deps.clock())


async def replay_dead_letters(command: ReplayDeadLetters, deps: Deps) -> int:
    """Put dead-lettered messages back on their stream, after a fix (consumers that did them skip them); how many."""
    if command.stream not in STREAMS:
        raise NotFound(f"no stream '{command.stream}'; streams: {', '.join(STREAMS)}")
    count = await replay(deps.redis, deps.settings.key(command.stream), list(command.ids) if command.ids else None)
    await anyio.to_thread.run_sync(
        _record, deps, command.actor, "replay", f"{command.stream}:{','.join(command.ids or ['*'])}", command.reason
    )
    return count


async def revoke_sessions(command: RevokeSessions, deps: Deps) -> int:
    """End every web session of a user on every service; how many were live."""
    if deps.directory.user(command.user_id) is None:
        raise NotFound("no such user")
    count = await revoke_user_sessions(deps.redis, deps.settings, command.user_id)
    await anyio.to_thread.run_sync(_record, deps, command.actor, "revoke_sessions", command.user_id, command.reason)
    return count


async def cancel_need(command: CancelNeed, deps: Deps) -> None:
    """Through intake's API (intake owns needs; the referral follows by `need.cancelled`). Raises RemoteFailed."""
    headers = {"Authorization": f"Bearer {internal_token(deps.settings)}", ACTOR_HEADER: command.actor}
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT) as client:
            answer = await client.post(
                f"{deps.settings.service_url('intake')}/api/v1/needs/{command.need_id}/cancel",
                json={"reason": command.reason},
                headers=headers,
            )
    except httpx.HTTPError:
        raise RemoteFailed("unreachable") from None
    if answer.status_code != 200:
        raise RemoteFailed({404: "not_found", 409: "refused"}.get(answer.status_code, "unreachable"))
    await anyio.to_thread.run_sync(_record, deps, command.actor, "cancel_need", command.need_id, command.reason)


def _record(deps: Deps, actor: str, action: str, target: str, reason: str) -> None:
    """The ops log row of an action whose effect is outside referral's database (Redis, intake)."""
    with deps.db.transaction() as session:
        _audit(session, actor, action, target, reason, deps.clock())


def _checked_incident(facts: PrivacyIncidentFacts, deps: Deps, now: datetime) -> PrivacyIncidentFacts:
    facts = domain.tidy_incident(facts)
    problems = domain.incident_problems(facts, now, deps.directory.timezone)
    if problems:
        raise Invalid(problems)
    return facts


def record_privacy_incident(session: Session, command: RecordPrivacyIncident, deps: Deps) -> PrivacyIncident:
    """An entry in the register of confidentiality incidents, recorded in the ops log. Raises Invalid."""
    now = deps.clock().astimezone(UTC)  # as the database gives it back
    facts = _checked_incident(command.facts, deps, now)
    incident = PrivacyIncident(id=new_id(), recorded_at=now, recorded_by=command.actor, updated_at=now, **asdict(facts))
    session.add(incident)
    _audit(session, command.actor, "privacy_incident.record", incident.id, domain.incident_summary(facts), now)
    return incident


def update_privacy_incident(session: Session, command: UpdatePrivacyIncident, deps: Deps) -> PrivacyIncident:
    """Change the facts named in `changes` (the others are kept), checked as a whole, recorded in the ops log with
    the names of the fields that changed. Nothing changed: nothing is written. Raises NotFound, Invalid."""
    now = deps.clock().astimezone(UTC)
    unknown = set(command.changes) - INCIDENT_FIELDS
    if unknown:
        raise Refused(sorted(unknown)[0], "not a field of an incident")
    incident = lock_privacy_incident(session, command.incident_id)
    if incident is None:
        raise NotFound("no such privacy incident")
    before = PrivacyIncidentFacts(**incident.model_dump(include=set(INCIDENT_FIELDS)))
    after = _checked_incident(dataclass_replace(before, **command.changes), deps, now)
    changed = sorted(name for name in INCIDENT_FIELDS if getattr(after, name) != getattr(before, name))
    if not changed:
        return incident
    for name in changed:
        setattr(incident, name, getattr(after, name))
    incident.updated_at = now
    session.add(incident)
    reason = f"changed {', '.join(changed)}; " + domain.incident_summary(after)
    _audit(session, command.actor, "privacy_incident.update", incident.id, reason, now)
    return incident


COMMAND_HANDLERS: dict[type, Callable[..., Any]] = {
    AcceptReferral: accept_referral,
    RespondToReferral: respond_to_referral,
    DeclineReferral: decline_referral,
    CloseReferral: close_referral,
    CancelReferral: cancel_referral,
    EscalateReferral: escalate_referral,
    ReassignReferral: reassign_referral,
    AssignNeed: assign_need,
    PausePartner: pause_partner,
    ResumePartner: resume_partner,
    ReplayDeadLetters: replay_dead_letters,
    RevokeSessions: revoke_sessions,
    CancelNeed: cancel_need,
    RecordPrivacyIncident: record_privacy_incident,
    UpdatePrivacyIncident: update_privacy_incident,
    RecordPersonContacted: record_person_contacted,
}


async def handle(command: Any, deps: Deps) -> Any:
    """Run `command` through its one handler: a database one in a thread, in one transaction (its events go out
    through the outbox in that commit); then wake the relay so they are published at once."""
    handler = COMMAND_HANDLERS[type(command)]
    if inspect.iscoroutinefunction(handler):
        result = await handler(command, deps)
    else:

        def run() -> Any:
            with deps.db.transaction() as session:
                return handler(session, command, deps)

        result = await anyio.to_thread.run_sync(run)
    deps.wake_relay()
    return result
