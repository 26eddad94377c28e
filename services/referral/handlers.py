"""Referral's commands and event handlers: route a need, move a referral through its states, fire the
need's clock. Each runs inside the caller's transaction and emits its events through the outbox."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlmodel import Session, select

from services.referral import domain
from services.referral.store import (ClockTimer, NeedCase, Referral, ReferralHistory, current_referral, due_timers,
                                     lock_referral, open_referral_counts, partners_who_declined,
                                     paused_partners, OpsAction, PartnerPause)
from shared.db import emit
from shared.directory import Directory
from shared.events import (NeedCancelled, NeedRecorded, NeedUnroutable, ReferralAccepted, ReferralAssigned, ReferralBreached,
                           ReferralCancelled,
                           ReferralClosed, ReferralDeclined, ReferralEscalated, ReferralReminderDue, ReferralResponded,
                           new_id)


def on_need_recorded(session: Session, event: NeedRecorded, directory: Directory, now: datetime) -> None:
    person = event.person
    case = NeedCase(
        need_id=event.need_id, library_id=event.library_id, category=event.category, summary=event.summary,
        postal_code=event.postal_code, urgency=event.urgency, person_display_name=person.display_name,
        person_email=person.email, person_phone=person.phone, preferred_channel=person.preferred_channel,
        language=person.language, recorded_at=event.recorded_at, correlation_id=event.correlation_id,
    )
    session.add(case)
    session.flush()
    route(session, case, directory, now)


def route(session: Session, case: NeedCase, directory: Directory, now: datetime, actor: str = "system",
          partner_id: str | None = None) -> Referral | None:
    """Hand the need to the best candidate partner (or to `partner_id`, chosen by ops), or declare it unroutable."""
    if partner_id is None:
        decision = domain.route_need(
            directory, category=case.category, postal_code=case.postal_code, library_id=case.library_id,
            open_referrals=open_referral_counts(session),
            excluded_partner_ids=partners_who_declined(session, case.need_id),
            paused_partner_ids=paused_partners(session, now),
        )
    else:
        decision = domain.assign_by_hand(directory, partner_id, actor)
    if decision.partner is None:
        emit(session, NeedUnroutable(need_id=case.need_id, library_id=case.library_id, category=case.category,
                                     reason=decision.reason, occurred_at=now, correlation_id=case.correlation_id,
                                     sequence=case.next_sequence()))
        return None
    if case.respond_by is None:  # the clock belongs to the need: set at the first routing, kept after
        timers = domain.clock_timers(case.recorded_at, decision.partner)
        case.respond_by = timers[-1].due_at
        session.add(case)
        for timer in timers:
            session.add(ClockTimer(need_id=case.need_id, kind=timer.kind, number=timer.number, due_at=timer.due_at))
    referral = Referral(
        id=new_id(), need_id=case.need_id, partner_id=decision.partner.id, contact_id=decision.contact.id,
        library_id=case.library_id, category=case.category, respond_by=case.respond_by,
        routed_because=decision.reason, created_at=now, updated_at=now,
    )
    session.add(referral)
    session.flush()
    session.add(ReferralHistory(referral_id=referral.id, at=now, action="assigned", actor=actor, detail=decision.reason))
    emit(session, ReferralAssigned(
        need_id=case.need_id, referral_id=referral.id, partner_id=referral.partner_id, contact_id=referral.contact_id,
        library_id=case.library_id, category=case.category, respond_by=referral.respond_by,
        routed_because=decision.reason, actor=actor, occurred_at=now, correlation_id=case.correlation_id,
        sequence=case.next_sequence(),
    ))
    session.add(case)
    return referral


def act(session: Session, referral_id: str, action: str, actor: str, now: datetime, directory: Directory,
        text: str | None = None, partner_id: str | None = None) -> Referral | None:
    """A partner's or ops' action on a referral; None when there is no such referral.
    Raises domain.TransitionRefused when the action is not allowed from the current status."""
    referral = lock_referral(session, referral_id)
    if referral is None:
        return None
    referral.status = domain.next_status(referral.status, action)
    referral.sla = domain.sla_after(referral.sla, action)
    referral.updated_at = now
    session.add(referral)
    session.add(ReferralHistory(referral_id=referral.id, at=now, action=action, actor=actor,
                                detail=text if partner_id is None else f"{partner_id} : {text or ''}".strip(" :")))
    case = session.get(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
    common = dict(need_id=referral.need_id, referral_id=referral.id, partner_id=referral.partner_id,
                  library_id=referral.library_id, category=referral.category, actor=actor, occurred_at=now, correlation_id=case.correlation_id,
                  sequence=case.next_sequence())
    session.add(case)
    if action == "accept":
        emit(session, ReferralAccepted(**common))
    elif action == "respond":
        emit(session, ReferralResponded(**common, message=text or ""))
    elif action == "close":
        emit(session, ReferralClosed(**common, outcome=text or ""))
    elif action == "decline":
        emit(session, ReferralDeclined(**common, reason=text or ""))
        session.flush()
        route(session, case, directory, now)
    elif action == "cancel":
        emit(session, ReferralCancelled(**common, reason=text or ""))
    elif action == "reassign":
        emit(session, ReferralCancelled(**common, reason=text or "", reassigned=True))
        session.flush()
        route(session, case, directory, now, actor=actor, partner_id=partner_id)
    return referral


def on_need_cancelled(session: Session, event: NeedCancelled, directory: Directory, now: datetime) -> None:
    """A need recorded in error: cancel its open referral (referral.cancelled tells intake and the partner's
    pages) and stop its clock."""
    case = session.get(NeedCase, event.need_id)
    if case is None:  # its need.recorded is still being retried: so is this, until it has been routed
        raise LookupError(f"need {event.need_id} is not known here yet")
    referral = current_referral(session, event.need_id)
    if referral is not None:
        act(session, referral.id, "cancel", event.actor, now, directory, event.reason)
    for timer in session.exec(select(ClockTimer).where(ClockTimer.need_id == event.need_id,
                                                       ClockTimer.fired_at.is_(None))).all():
        timer.fired_at, timer.outcome = now, "cancelled"
        session.add(timer)


def fire_due_timers(session: Session, now: datetime, skip_locked: bool,
                    observe_lag: Callable[[str, float], None] | None = None) -> int:
    """Fire every due timer once: emit its event and move the SLA, or mark it moot if the clock stopped.
    `observe_lag(kind, seconds)` is told how late each timer fired."""
    fired = 0
    for timer in due_timers(session, now, skip_locked):
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
        session.add_all([timer, referral, ReferralHistory(
            referral_id=referral.id, at=now, action=timer.kind, actor="system",
            detail=f"{timer.kind} {timer.number}" if timer.number else timer.kind)])
        case = session.get(NeedCase, referral.need_id, with_for_update=True)  # its sequence moves
        common = dict(need_id=referral.need_id, referral_id=referral.id, partner_id=referral.partner_id,
                      library_id=referral.library_id, category=referral.category, contact_id=referral.contact_id, respond_by=referral.respond_by,
                      actor="system", occurred_at=now, correlation_id=case.correlation_id,
                      sequence=case.next_sequence())
        session.add(case)
        if timer.kind == "reminder":
            emit(session, ReferralReminderDue(**common, reminder_number=timer.number))
        elif timer.kind == "escalation":
            emit(session, ReferralEscalated(**common))
        else:
            emit(session, ReferralBreached(**common))
        fired += 1
    return fired


def record_ops_action(session: Session, actor: str, action: str, target: str, reason: str, now: datetime) -> None:
    session.add(OpsAction(at=now, actor=actor, action=action, target=target, reason=reason))


def pause_partner(session: Session, partner_id: str, until: datetime, reason: str, actor: str, now: datetime) -> None:
    """Routing skips the partner until `until`; referrals it already has stay with it."""
    pause = session.get(PartnerPause, partner_id) or PartnerPause(partner_id=partner_id, until=until, reason=reason,
                                                                  paused_by=actor, paused_at=now)
    pause.until, pause.reason, pause.paused_by, pause.paused_at = until, reason, actor, now
    session.add(pause)
    record_ops_action(session, actor, "pause_partner", partner_id, reason, now)


def resume_partner(session: Session, partner_id: str, reason: str, actor: str, now: datetime) -> bool:
    pause = session.get(PartnerPause, partner_id)
    if pause is None:
        return False
    session.delete(pause)
    record_ops_action(session, actor, "resume_partner", partner_id, reason, now)
    return True


class ReassignRefused(ValueError):
    """A reassignment the caller can fix: `field` names the input to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def reassign(session: Session, referral_id: str, partner_id: str, actor: str, reason: str | None, now: datetime,
             directory: Directory, force: bool = False) -> Referral | None:
    """Ops hand the need to another partner that takes its category (the old referral is cancelled, the need keeps
    its deadline), recorded in the ops log. `force` hands it to a partner outside the category: an override that
    needs a reason and is recorded as such, in the ops log and in the old referral's history.
    None when there is no such referral; raises ReassignRefused, or domain.TransitionRefused."""
    referral = session.get(Referral, referral_id)
    if referral is None:
        return None
    partner = directory.partner(partner_id)
    if partner is None:
        raise ReassignRefused("partner_id", f"unknown partner '{partner_id}'")
    takes_category = domain.takes_category(partner, referral.category)
    if not takes_category and not force:
        raise ReassignRefused("partner_id", f"partner '{partner_id}' does not take the need's category "
                                            f"'{referral.category}': choose one that does, or set force: true "
                                            "with a reason to override")
    override = force and not takes_category
    if override and not (reason or "").strip():
        raise ReassignRefused("reason", "an override (force: true for a partner outside the need's category) "
                                        "needs a reason")
    act(session, referral_id, "reassign", actor, now, directory, reason, partner_id)
    if override:
        session.add(ReferralHistory(referral_id=referral_id, at=now, action="reassign_override", actor=actor,
                                    detail=reason))
    record_ops_action(session, actor, "reassign_override" if override else "reassign", f"{referral_id}:{partner_id}",
                      reason or "", now)
    return referral
