"""Intake's commands and event handlers: plain functions on a session, called from api.py and consumers.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from services.intake import domain
from services.intake.store import Need, NeedHistory
from shared.db import emit
from shared.events import Event, NeedCancelled, NeedRecorded, PersonContact, new_id


@dataclass(frozen=True)
class RecordNeed:
    library_id: str
    category: str
    summary: str
    postal_code: str | None
    urgency: str
    person: PersonContact
    recorded_by: str
    person_id: str | None = None  # the person of an earlier need of this visit; None: a new person
    correlation_id: str | None = None


def record_need(session: Session, cmd: RecordNeed, now: datetime, respond_by: datetime) -> Need:
    need = Need(
        id=new_id(), library_id=cmd.library_id, category=cmd.category, summary=cmd.summary,
        postal_code=cmd.postal_code, urgency=cmd.urgency, person_id=cmd.person_id or new_id(),
        person_display_name=cmd.person.display_name,
        person_email=cmd.person.email, person_phone=cmd.person.phone,
        preferred_channel=cmd.person.preferred_channel, language=cmd.person.language,
        recorded_by=cmd.recorded_by, recorded_at=now, respond_by=respond_by,
    )
    session.add(need)
    session.add(NeedHistory(need_id=need.id, at=now, event="need.recorded"))
    emit(session, NeedRecorded(
        need_id=need.id, library_id=need.library_id, category=need.category, summary=need.summary,
        postal_code=need.postal_code, urgency=need.urgency, recorded_at=now, person=cmd.person,
        correlation_id=cmd.correlation_id, occurred_at=now,
    ))
    return need


class AlreadyClosed(Exception):
    """The need is closed or cancelled already: there is nothing to cancel."""


def cancel_need(session: Session, need: Need, reason: str, actor: str, now: datetime) -> Need:
    """Ops withdraw a need recorded in error: it is closed here at once, and referral cancels its open referral
    and stops its clock (need.cancelled). It no longer counts in the library's figures."""
    if need.cancelled_at is not None or need.status == "closed":
        raise AlreadyClosed(need.id)
    need.status, need.cancelled_at = "closed", now
    session.add(need)
    session.add(NeedHistory(need_id=need.id, at=now, event="need.cancelled", detail=reason))
    emit(session, NeedCancelled(need_id=need.id, library_id=need.library_id, reason=reason, actor=actor,
                                occurred_at=now))
    return need


def on_referral_event(session: Session, event: Event) -> None:
    """Keep the desk's view of the handoff in step with the referral service."""
    need = session.get(Need, event.need_id)
    if need is None:
        return  # a need from another deployment sharing the namespace would be a bug; nothing to update
    detail = next((text for name in ("reason", "routed_because", "outcome", "message")
                   if (text := getattr(event, name, None))), None)
    session.add(NeedHistory(need_id=need.id, at=event.occurred_at, event=event.type,
                            partner_id=getattr(event, "partner_id", None), detail=detail))
    need.sla = domain.next_sla(need.sla, event.type)
    if event.type in ("referral.accepted", "referral.responded") and need.answered_at is None:
        need.answered_at = event.occurred_at
    # Retried events can arrive out of order: the newest referral decision (by sequence) sets the status.
    status = domain.status_after(event.type, getattr(event, "reassigned", False))
    if need.cancelled_at is not None:
        status = None  # cancelled by ops: stays closed, whatever referral decided before it heard of it
    if status and event.sequence > need.referral_sequence:
        need.status = status
        need.referral_sequence = event.sequence
        if event.type == "referral.assigned":
            need.partner_id, need.referral_id, need.respond_by = event.partner_id, event.referral_id, event.respond_by
        elif status in ("recorded", "unroutable"):
            need.partner_id = need.referral_id = None
    session.add(need)
