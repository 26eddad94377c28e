"""Notifications' use cases, one handler per event consumed and per command. An event handler turns the event into
rendered deliveries, queued in the same transaction as the event's tracking row (Bus.process gives it the session: one
message per event, recipient and channel). A command handler (`commands.py`: what a provider's webhook told us,
RecordSmsReceipt, RecordSmsReply) opens its own transaction. Adapters (consumers.py, api.py's webhooks) only translate
and call."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.notifications import domain
from services.notifications.commands import RecordSmsReceipt, RecordSmsReply
from services.notifications.providers.base import SendError, Sent
from services.notifications.render import Rendered, render, render_email
from services.notifications.store import (
    Delivery,
    DeliveryAttempt,
    InboundMail,
    NeedPerson,
    NeedReference,
    SmsSuppression,
    WaitingForPerson,
    forget_replies,
    lock_person_of,
)
from shared.db import Database, UTCDateTime, emit, table_of, upsert
from shared.directory import Directory
from shared.events import (
    AccessLinkRequested,
    DeliveryFailed,
    DeliverySent,
    NeedCancelled,
    NeedMessagesWithdrawn,
    NeedPersonalData,
    NeedRecorded,
    NeedUnroutable,
    PersonContactAnswered,
    PersonErased,
    ReceiptRequested,
    ReferralContactQuestionDue,
    ReferralEvent,
    new_id,
    parse_event,
)
from shared.logs import redact
from shared.people import ERASED
from shared.settings import Settings
from shared.signin import TokenExpired, TokenInvalid, link_for_request, read_sign_in_reference

log = logging.getLogger("relais.notifications")

AnswerLink = Callable[[str, str], str]  # (referral id, "yes" | "no") -> the signed link of that answer's page


# --- referral events: staff by email, the person on their channel -------------------------------------


def on_referral_event(
    session: Session,
    event: ReferralEvent | NeedUnroutable,
    directory: Directory,
    now: datetime,
    link_for: Callable[[ReferralEvent | NeedUnroutable], str | None],
    transliterate: bool = True,
    reply_address: Callable[[ReferralEvent | NeedUnroutable, str], str | None] | None = None,
    answer_link: AnswerLink | None = None,
) -> int:
    """Queue one rendered message per recipient the event concerns; returns how many. `reply_address(event, role)`
    gives a partner's messages their per-referral Reply-To (inbound.py), when replies by email are received."""
    if event.type == "referral.closed":
        if getattr(event, "contact_question_pending", False):
            return 0  # the person is still to be asked whether they were contacted: their contact waits for it
        lock_person_of(session, event.need_id)
        if (person := session.get(NeedPerson, event.need_id)) is None or person.erased_at is None:
            forget_person(session, event.need_id)  # an erased person's tombstone stays: nothing reaches them again
        return 0
    kind = domain.staff_kind(event.type, getattr(event, "person_contacted", None))
    for_person = isinstance(event, ReferralEvent) and event.type in domain.PERSON_KIND_OF
    if kind is None and not for_person:
        return 0  # nobody is told of this one
    if for_person:
        lock_person_of(session, event.need_id)
    person = session.get(NeedPerson, event.need_id)  # read once: kept while this handler holds it
    count = 0
    if kind is not None:
        erased = person is not None and person.erased_at is not None
        count += queue_for_staff(session, event, kind, directory, now, link_for, reply_address, erased)
    if for_person:
        assert isinstance(event, ReferralEvent)  # for_person says so
        if person is None:  # need.recorded comes on another stream: wait for it
            session.add(
                WaitingForPerson(event_id=event.event_id, need_id=event.need_id, payload=event.model_dump_json())
            )
        else:
            count += queue_for_person(session, event, person, directory, now, transliterate, answer_link)
        if isinstance(event, ReferralContactQuestionDue) and event.referral_closed and person is not None:
            if person.erased_at is None:
                forget_person(session, event.need_id)  # kept past the close for this question only
    return count


def queue_for_staff(
    session: Session,
    event: ReferralEvent | NeedUnroutable,
    kind: str,
    directory: Directory,
    now: datetime,
    link_for: Callable[[ReferralEvent | NeedUnroutable], str | None],
    reply_address: Callable[[ReferralEvent | NeedUnroutable, str], str | None] | None = None,
    erased: bool = False,
) -> int:
    """Queue the event's emails to staff. `erased`: the need's person was erased (the partner's words are not
    copied again)."""
    partner_id = getattr(event, "partner_id", None)
    library = directory.library(event.library_id)
    partner = directory.partner(partner_id) if partner_id else None
    if library is None or (partner_id and partner is None):
        raise LookupError(
            f"{event.type} {event.event_id}: library {event.library_id} or partner {partner_id} is not in the directory"
        )
    people = domain.recipients(
        directory,
        kind,
        partner_id=partner_id,
        contact_id=getattr(event, "contact_id", None),
        library_id=event.library_id,
    )
    category = directory.category(event.category)
    respond_by = getattr(event, "respond_by", None)
    # An event written before its need's person was erased may carry a partner's text: it is not copied again.
    context: dict[str, Any] = dict(
        partner=partner,
        library=library,
        category=category,
        category_id=event.category,
        timezone=library.timezone,
        respond_by=respond_by,
        routed_because=getattr(event, "routed_because", None),
        referral_id=getattr(event, "referral_id", None),
        need_id=event.need_id,
        reference=getattr(event, "reference", None),
        reminder_number=getattr(event, "reminder_number", None),
        reason=ERASED if erased and getattr(event, "reason", None) else getattr(event, "reason", None),
        message=ERASED if erased and getattr(event, "message", None) else getattr(event, "message", None),
        answered=event.type.removeprefix("referral."),
        erased_at=getattr(event, "erased_at", None),
        deployment=directory.deployment.name,
    )
    for person in people:
        link = link_for(event) if person.role in ("partner_contact", "backup_contact") else None
        rendered = render_email(kind, recipient=person, link=link, **context)
        digest: dict[str, Any] = {}
        if kind == "handoff" and person.digest_at is not None:  # held for the contact's daily digest
            assert partner is not None and respond_by is not None  # a handoff (referral.assigned) names both
            zone = domain.digest_timezone(directory, partner)
            digest = dict(
                due_at=domain.next_digest_at(now, person.digest_at, zone),
                held_reason="digest",
                facts={
                    "recipient_name": person.name,
                    "library": library.name,
                    "partner": partner.name,
                    "category": category.label if category else event.category,
                    "respond_by": respond_by.isoformat(),
                    "timezone": library.timezone,
                    "link": link,
                    "referral_id": getattr(event, "referral_id", None),
                    "deployment": directory.deployment.name,
                },
            )
        queue(
            session,
            event,
            now,
            kind=kind,
            channel="email",
            recipient_role=person.role,
            recipient=person.email,
            rendered=rendered,
            reply_to=(reply_address and reply_address(event, person.role))
            or domain.reply_to(directory, event.library_id, person.role),
            **digest,
        )
    return len(people)


# --- the person ----------------------------------------------------------------------------------------


def on_need_recorded(
    session: Session,
    event: NeedRecorded,
    details: NeedPersonalData | None,
    directory: Directory,
    now: datetime,
    transliterate: bool = True,
    answer_link: AnswerLink | None = None,
) -> int:
    """Keep the person's contact for this need; handle the referral events that came before it. `details` is what
    the event sealed (consumers.py opens it), None when the person was erased before it was read: then nothing
    goes to them (no address, channel none)."""
    lock_person_of(session, event.need_id)
    reference = dict(
        need_id=event.need_id, reference=event.reference, library_id=event.library_id, person_id=event.person_id
    )
    upsert(session, table_of(NeedReference), "need_id", reference)
    kept = session.execute(_PERSON_KEPT, {"need_id": event.need_id}).first()
    if kept is not None and kept.erased_at is not None:
        return 0  # a late or replayed need.recorded of a person since erased: nothing of them is kept
    withdrawn = kept is not None and kept.messages_withdrawn_at is not None  # before this reached us: no address
    email, phone = (details.email, details.phone) if details and not withdrawn else (None, None)
    person = dict(
        need_id=event.need_id,
        library_id=event.library_id,
        email=email,
        phone=phone,
        preferred_channel=event.preferred_channel if details else "none",
        language=event.language,
        recorded_at=event.recorded_at,
    )
    upsert(session, table_of(NeedPerson), "need_id", person)  # erased_at and messages_withdrawn_at stay as they are
    waiting = session.execute(_WAITING, {"need_id": event.need_id}).all()
    if not waiting:
        return 0
    stored = session.get_one(NeedPerson, event.need_id, populate_existing=True)
    count = 0
    for row in sorted(waiting, key=lambda w: parse_event(w.payload).occurred_at):
        waited = parse_event(row.payload)
        assert isinstance(waited, ReferralEvent)  # only referral events wait for their person (on_referral_event)
        count += queue_for_person(session, waited, stored, directory, now, transliterate, answer_link)
    session.execute(
        sa.delete(WaitingForPerson).where(col(WaitingForPerson.event_id).in_([w.event_id for w in waiting]))
    )
    return count


# Built once: what is kept of a need's person already (an erased person's tombstone, a consent withdrawn), and the
# referral events that waited for them.
_PERSON_KEPT = select(col(NeedPerson.erased_at), col(NeedPerson.messages_withdrawn_at)).where(
    col(NeedPerson.need_id) == sa.bindparam("need_id")
)
_WAITING = select(col(WaitingForPerson.event_id), col(WaitingForPerson.payload)).where(
    col(WaitingForPerson.need_id) == sa.bindparam("need_id")
)


def on_receipt_requested(
    session: Session, event: ReceiptRequested, directory: Directory, now: datetime, transliterate: bool = True
) -> int:
    """The desk sends the person their receipt: one message on the channel the desk chose, to the address the person
    gave with their need (kept here from need.recorded). Suppressed, and said so on the outbox page, when the
    address is gone (the need is over, or the person was erased) or the number replied STOP."""
    person = session.get(NeedPerson, event.need_id)
    library = directory.library(event.library_id)
    if library is None:
        raise LookupError(f"{event.type} {event.event_id}: library {event.library_id} is not in the directory")
    address = (person.email if event.channel == "email" else person.phone) if person else None
    suppressed = "person_erased" if person is not None and person.erased_at is not None else None
    suppressed = suppressed or (None if address else "no_address")
    if not suppressed and event.channel == "sms" and session.get(SmsSuppression, address) is not None:
        suppressed = "opted_out"
    partner = directory.partner(event.partner_id) if event.partner_id else None
    category = directory.category(event.category)
    desk = library.contacts[0] if library.contacts else None
    language = person.language if person else "fr"
    facts = {
        "template": "receipt",
        "reference": event.reference,
        "category": category.label if category else event.category,
        "partner": partner.name if partner else None,
        "unroutable": event.status == "unroutable",
        "library": library.name,
        "library_phone": library.phone,
        "library_hours": library.hours,
        "country": library.country,
        "deployment": directory.deployment.name,
        "desk_email": desk.email if desk else None,
        "desk_phone": desk.phone if desk else None,
        "respond_by": event.respond_by.isoformat(),
        "timezone": library.timezone,
        "language": language,
        "recorded_at": (person.recorded_at if person else event.occurred_at).isoformat(),
    }
    rendered = (
        render_for_person(facts, event.channel, transliterate)
        if not suppressed
        else Rendered(subject="", text="", html=None)
    )
    queue(
        session,
        event,
        now,
        kind="receipt",
        channel=event.channel,
        recipient_role="person",
        recipient=address or "",
        rendered=rendered,
        language=language,
        reply_to=domain.reply_to(directory, event.library_id, "person"),
        facts=facts,
        status="suppressed" if suppressed else "queued",
        suppressed_reason=suppressed,
    )
    return 1


def on_need_cancelled(session: Session, event: NeedCancelled, now: datetime) -> None:
    """A need recorded in error: nothing more goes to its person, and their contact is forgotten."""
    lock_person_of(session, event.need_id)
    for d in session.exec(
        select(Delivery).where(
            Delivery.need_id == event.need_id, Delivery.status == "queued", Delivery.recipient_role == "person"
        )
    ).all():
        d.status, d.suppressed_reason, d.leased_until = "suppressed", "need_cancelled", None
        session.add(d)
    forget_person(session, event.need_id)


def on_person_erased(session: Session, event: PersonErased, now: datetime) -> None:
    """The person's data was erased: nothing more goes to anyone about their needs (queued messages are
    suppressed), every message's subject and text become the marker, their addresses go, and a tombstone without
    address keeps later events from reaching them. The notice telling the partner (`person_erased`) is left alone."""
    for need_id in event.need_ids:
        lock_person_of(session, need_id)
        for d in session.exec(
            select(Delivery).where(Delivery.need_id == need_id, Delivery.kind != "person_erased")
        ).all():
            if d.status == "queued":
                d.status, d.suppressed_reason, d.leased_until, d.held_reason = "suppressed", "person_erased", None, None
            d.subject, d.body_text, d.body_html, d.facts = ERASED, ERASED, None, None
            if d.recipient_role == "person":
                d.recipient = ERASED
            session.add(d)
        person = session.get(NeedPerson, need_id) or NeedPerson(
            need_id=need_id, library_id="", preferred_channel="none", recorded_at=event.erased_at
        )
        person.email = person.phone = None
        person.preferred_channel, person.erased_at = "none", person.erased_at or event.erased_at
        session.add(person)
        for row in session.exec(select(WaitingForPerson).where(WaitingForPerson.need_id == need_id)).all():
            session.delete(row)
        replies = session.exec(select(InboundMail.id).where(InboundMail.need_id == need_id)).all()
        forget_replies(session, replies, event.erased_at)  # partners' replies by email about the need


def on_messages_withdrawn(session: Session, event: NeedMessagesWithdrawn, now: datetime) -> None:
    """The person withdrew their consent to messages: what is queued for them is suppressed, nothing more is queued
    (kept on their NeedPerson, even when this arrives before need.recorded), and their address is not kept."""
    lock_person_of(session, event.need_id)
    for d in session.exec(
        select(Delivery).where(
            Delivery.need_id == event.need_id, Delivery.status == "queued", Delivery.recipient_role == "person"
        )
    ).all():
        d.status, d.suppressed_reason, d.leased_until = "suppressed", "no_consent", None
        session.add(d)
    person = session.get(NeedPerson, event.need_id) or NeedPerson(
        need_id=event.need_id, library_id=event.library_id, preferred_channel="none", recorded_at=event.occurred_at
    )
    person.messages_withdrawn_at = person.messages_withdrawn_at or event.occurred_at
    person.email = person.phone = None
    session.add(person)


def forget_person(session: Session, need_id: str) -> None:
    """The need is over: its person's contact is not kept (queued messages to them still go)."""
    if (person := session.get(NeedPerson, need_id)) is not None:
        session.delete(person)
    for row in session.exec(select(WaitingForPerson).where(WaitingForPerson.need_id == need_id)).all():
        session.delete(row)


def person_facts(
    event: ReferralEvent, directory: Directory, person: NeedPerson, answer_link: AnswerLink | None = None
) -> dict:
    """What a message to the person says: who will contact them and by when, and how to reach the desk;
    nothing about the need itself. The contact question carries its two answer links (kept for an email fallback
    of its SMS)."""
    library = directory.library(event.library_id)
    partner = directory.partner(event.partner_id)
    if library is None or partner is None:
        raise LookupError(
            f"{event.type} {event.event_id}: library {event.library_id} or partner "
            f"{event.partner_id} is not in the directory"
        )
    desk = library.contacts[0] if library.contacts else None
    respond_by = getattr(event, "respond_by", None)
    template = PERSON_TEMPLATE.get(event.type, "partner_answered_person")
    links = {}
    if template == "contact_question":
        links = {
            "link_yes": answer_link(event.referral_id, "yes") if answer_link else None,
            "link_no": answer_link(event.referral_id, "no") if answer_link else None,
        }
    return {
        **links,
        "template": template,
        "partner": partner.name,
        "library": library.name,
        "desk_email": desk.email if desk else None,
        "desk_phone": desk.phone if desk else None,
        "country": library.country,
        "deployment": directory.deployment.name,
        "respond_by": respond_by.isoformat() if respond_by else None,
        "timezone": library.timezone,
        "language": person.language,
        "recorded_at": person.recorded_at.isoformat(),
    }


PERSON_TEMPLATE = {"referral.assigned": "person_confirmation", "referral.contact_question_due": "contact_question"}


def render_for_person(facts: dict, channel: str, transliterate: bool = True) -> Rendered:
    context = {k: v for k, v in facts.items() if k not in ("template", "language")}
    context["respond_by"] = datetime.fromisoformat(facts["respond_by"]) if facts["respond_by"] else None
    return render(facts["template"], channel, facts["language"], transliterate=transliterate, **context)


def queue_for_person(
    session: Session,
    event: ReferralEvent,
    person: NeedPerson,
    directory: Directory,
    now: datetime,
    transliterate: bool = True,
    answer_link: AnswerLink | None = None,
) -> int:
    kind = domain.PERSON_KIND_OF[event.type]
    route = domain.person_route(
        person.preferred_channel, person.email, person.phone, consent=person.messages_withdrawn_at is None
    )
    facts = person_facts(event, directory, person, answer_link)
    suppressed = "person_erased" if person.erased_at is not None else route.suppressed
    if not suppressed and route.channel == "sms" and session.get(SmsSuppression, route.address) is not None:
        suppressed = "opted_out"
    rendered = (
        render_for_person(facts, route.channel, transliterate)
        if not suppressed
        else Rendered(subject="", text="", html=None)
    )
    # An SMS waits for the end of quiet hours, and so do its retries (quiet_timezone).
    zone = facts["timezone"] if route.channel == "sms" and not suppressed else None
    due_at, held_reason = held_until(kind, "person", route.channel, person.recorded_at, zone, now)
    queue(
        session,
        event,
        now,
        kind=kind,
        channel=route.channel,
        recipient_role="person",
        recipient=route.address,
        rendered=rendered,
        language=person.language,
        reply_to=domain.reply_to(directory, event.library_id, "person"),
        facts=facts,
        status="suppressed" if suppressed else "queued",
        suppressed_reason=suppressed,
        due_at=due_at,
        held_reason=held_reason,
        quiet_timezone=zone,
    )
    return 1


def quiet_time(d: Delivery, at: datetime) -> tuple[datetime, str | None]:
    """When a queued SMS to the person due `at` may go, and why it waits if it does."""
    recorded_at = datetime.fromisoformat(json.loads(d.facts)["recorded_at"]) if d.facts else None
    return held_until(d.kind, d.recipient_role, d.channel, recorded_at, d.quiet_timezone, at)


def held_until(
    kind: str, role: str, channel: str, recorded_at: datetime | None, zone: str | None, at: datetime
) -> tuple[datetime, str | None]:
    """When a message of this kind due `at` may go (quiet hours of `zone`; none without), and why it waits."""
    if not zone or not domain.held_by_quiet_hours(kind, role, channel, recorded_at, at):
        return at, None
    allowed = domain.sms_allowed_at(at, zone)
    return allowed, "quiet_hours" if allowed > at else None


def fall_back_to_email(session: Session, sms: Delivery, now: datetime) -> None:
    """An SMS to the person that failed goes again by email, when the person gave an address: queued as a message of
    the SMS's event (its ids, kind, language, facts), naming the SMS it replaces."""
    person = session.get(NeedPerson, sms.need_id) if sms.need_id else None
    if sms.channel != "sms" or sms.recipient_role != "person" or person is None or not person.email or not sms.facts:
        return
    if session.exec(
        select(Delivery.id).where(
            Delivery.event_id == sms.event_id, Delivery.channel == "email", Delivery.recipient == person.email
        )
    ).first():
        return
    facts = json.loads(sms.facts)
    queue(
        session,
        sms,
        now,
        kind=sms.kind,
        channel="email",
        recipient_role="person",
        recipient=person.email,
        rendered=render_for_person(facts, "email"),
        language=sms.language,
        reply_to=sms.reply_to,
        facts=facts,
        fallback_for=sms.id,
    )


# --- sign-in links -------------------------------------------------------------------------------------

SIGN_IN_ROLE = {"partner": "partner_contact", "front_desk": "front_desk", "ops": "escalation"}


class ForgedEvent(ValueError):
    """An event that no Relais service wrote (not signed with the deployment's key): dead-lettered, never acted on."""


def on_access_link_requested(
    session: Session, event: AccessLinkRequested, directory: Directory, settings: Settings, now: datetime
) -> None:
    """Email a sign-in link to the user's address in the directory, built here from the event's signed reference
    and our own settings; the event names no address and carries no link (see shared.signin.sign_in_reference)."""
    try:
        request = read_sign_in_reference(settings, event.reference, now)
    except TokenExpired:
        log.info("sign-in link for %s on %s asked for too long ago: not sent", event.user_id, event.service)
        return
    except TokenInvalid:
        raise ForgedEvent(f"access.link_requested {event.event_id}: reference not signed by this deployment") from None
    if (request.user_id, request.service) != (event.user_id, event.service):
        raise ForgedEvent(f"access.link_requested {event.event_id}: reference is for another user or service")
    user = directory.user(request.user_id)
    if user is None or not user.email:
        return  # removed from the directory (or its address) since it asked: nothing to send
    once = f"sign-in:{request.jti}"  # the same reference written again (a replayed entry) sends nothing more
    if session.exec(select(Delivery.id).where(Delivery.event_id == once)).first() is not None:
        return
    role = SIGN_IN_ROLE[user.role]
    rendered = render_email(
        "sign_in",
        recipient=domain.Recipient(role, user.id, user.email),
        link=link_for_request(settings, request),
        expires_at=request.expires_at,
        timezone=directory.timezone,
        deployment=directory.deployment.name,
    )
    queue(
        session,
        event,
        now,
        kind="sign_in",
        channel="email",
        recipient_role=role,
        recipient=user.email,
        rendered=rendered,
        event_id=once,
    )


# --- what the SMS providers tell us --------------------------------------------------------------------


def record_sms_receipt(db: Database, cmd: RecordSmsReceipt, *, now: datetime) -> Delivery | None:
    """`sent` becomes `delivered`, or `failed` (delivery.failed in the outbox; the person gets an email instead)."""
    with db.transaction() as session:
        d = session.exec(
            select(Delivery).where(
                Delivery.provider == cmd.provider, Delivery.provider_message_id == cmd.provider_message_id
            )
        ).first()
        if d is None or d.status not in ("sent", "delivered"):
            return d
        if cmd.delivered:
            d.status, d.delivered_at = "delivered", d.delivered_at or now
        elif d.status == "sent":
            d.status, d.last_error = "failed", (cmd.error or "undelivered")[:2000]
            # A provider's words may quote the address: masked on the wire (shared.logs.redact), kept here for ops.
            emit(session, DeliveryFailed(**event_fields(d, now), error=redact(d.last_error)))
            fall_back_to_email(session, d, now)
        session.add(d)
    return d


def record_sms_reply(db: Database, cmd: RecordSmsReply, *, now: datetime) -> str | None:
    """STOP or ARRET: no more SMS to that number (queued ones are suppressed); START: they may come again.
    OUI or NON: the answer to the last contact question sent to that number, for referral to record
    (person.contact_answered through the outbox); referral keeps the first answer to each question."""
    with db.transaction() as session:
        if domain.is_stop_reply(cmd.text):
            opt_out(session, cmd.phone, cmd.provider, now)
            return "stop"
        if domain.is_start_reply(cmd.text) and (row := session.get(SmsSuppression, cmd.phone)) is not None:
            session.delete(row)
            return "start"
        if (answer := domain.contact_answer(cmd.text)) is not None:
            asked = session.exec(
                select(Delivery)
                .where(
                    Delivery.kind == "contact_question",
                    Delivery.channel == "sms",
                    Delivery.recipient == cmd.phone,
                    col(Delivery.status).in_(("sent", "delivered")),
                )
                .order_by(col(Delivery.sent_at).desc())
            ).first()
            if asked is None or asked.need_id is None or asked.referral_id is None:
                return None  # nothing was asked of this number: an ordinary reply
            emit(
                session,
                PersonContactAnswered(
                    need_id=asked.need_id,
                    referral_id=asked.referral_id,
                    answer=answer,  # domain.contact_answer: "yes" or "no"
                    occurred_at=now,
                    correlation_id=asked.correlation_id,
                ),
            )
            return answer
    return None


def opt_out(session: Session, phone: str, source: str, now: datetime) -> None:
    if session.get(SmsSuppression, phone) is None:
        session.add(SmsSuppression(phone=phone, at=now, source=source))
    for d in session.exec(
        select(Delivery).where(Delivery.channel == "sms", Delivery.recipient == phone, Delivery.status == "queued")
    ).all():
        d.status, d.suppressed_reason, d.leased_until = "suppressed", "opted_out", None
        session.add(d)


# --- sending: the senders' (sender.py) leases and outcomes -------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one attempt at sending came to; record_send_outcome records it."""

    sent: Sent | None = None
    error: SendError | None = None
    suppressed: str | None = None


_DELIVERY = table_of(Delivery)
_ADD_DELIVERY = sa.insert(_DELIVERY)
LEASE = timedelta(minutes=2)  # a sender that died mid-send frees its deliveries after this
REDACT_AFTER_SENDING = {"sign_in"}  # the body holds a credential: keep it only until it is sent
BATCH = 50


def _lease_statement(postgresql: bool) -> Any:
    """UPDATE ... WHERE id IN (the due ones, oldest first) RETURNING them, as Delivery objects; built once per
    dialect, its values bound at each lease (building the statement cost more than running it)."""
    now: sa.BindParameter[datetime] = sa.bindparam("now")
    due = (
        select(col(Delivery.id))
        .where(col(Delivery.status) == "queued", col(Delivery.channel) == sa.bindparam("of_channel"))
        .where(col(Delivery.next_attempt_at) <= now)
        .where(col(Delivery.leased_until).is_(None) | (col(Delivery.leased_until) < now))
        .where(col(Delivery.id).not_in(sa.bindparam("held", expanding=True)))
        .order_by(col(Delivery.next_attempt_at))
        .limit(sa.bindparam("limit"))
    )
    if postgresql:  # replicas at the same instant take different rows
        due = due.with_for_update(skip_locked=True)
    leasing = (
        sa.update(Delivery)
        .where(col(Delivery.id).in_(due.scalar_subquery()))
        .values(leased_until=sa.bindparam("lease_until"), attempts=col(Delivery.attempts) + 1)
        .returning(Delivery)
    )
    return select(Delivery).from_statement(leasing)


_LEASES = {postgresql: _lease_statement(postgresql) for postgresql in (False, True)}


def lease_due_deliveries(
    db: Database, channel: str, *, now: datetime, limit: int = BATCH, held: Collection[str] = ()
) -> list[list[Delivery]]:
    """Take the due queued deliveries of `channel` for this sender, as messages to send: one delivery each,
    except a contact's digest, where every handoff held for the slot goes in one email. `held`: the deliveries this
    sender leased and has not recorded yet (sent, their outcome waiting to be written), never taken again, even if
    their lease seems over (a clock set forward, as tests do).

    One statement, no ORM flush: the due rows are leased (`leased_until`, one attempt more) and returned; on
    PostgreSQL they are locked SKIP LOCKED, so replicas take different ones."""
    values = {"of_channel": channel, "now": now, "limit": limit, "lease_until": now + LEASE, "held": list(held)}
    with db.transaction() as session:
        leased = session.scalars(_LEASES[not db.is_sqlite], values).all()
    due_first = sorted(leased, key=lambda d: (d.next_attempt_at, d.id))  # RETURNING keeps no order
    messages: list[list[Delivery]] = []
    digests: dict[str, list[Delivery]] = {}
    for d in due_first:
        if d.held_reason == "digest":
            digests.setdefault(d.recipient.lower(), []).append(d)
        else:
            messages.append([d])
    return messages + list(digests.values())


_UNSENT = select(sa.func.count()).select_from(
    select(col(Delivery.id))
    .where(col(Delivery.status) == "queued", col(Delivery.channel) == sa.bindparam("of_channel"))
    .where(col(Delivery.next_attempt_at) <= sa.bindparam("now"))
    .limit(sa.bindparam("cap"))
    .subquery()
)


def count_unsent(db: Database, channel: str, *, now: datetime, cap: int) -> int:
    """How many deliveries of `channel` are due and not yet sent (leased ones included: they are not sent either),
    counting at most `cap` (the due-deliveries index, read to `cap` rows at most)."""
    with db.read() as session:
        return session.scalar(_UNSENT, {"of_channel": channel, "now": now, "cap": cap}) or 0


def record_send_outcome(db: Database, ids: list[str], outcome: Outcome, *, now: datetime, settings: Settings) -> None:
    """Write the attempt and move each delivery on: sent, suppressed, failed (with delivery.failed and, for
    an SMS to the person, an email instead), or queued again for a later try."""
    record_send_outcomes(db, [(ids, outcome)], now=now, settings=settings)


def record_send_outcomes(
    db: Database, sent: list[tuple[list[str], Outcome]], *, now: datetime, settings: Settings
) -> None:
    """`record_send_outcome` for several messages (each its delivery ids and outcome), in one transaction: a sender
    waits for the database's writer once per few messages, not once per message."""
    with db.transaction() as session:
        attempts: list[dict] = []
        for ids, outcome in sent:
            if outcome.sent is not None:
                attempts += _record_sent(session, ids, outcome.sent, now)
            else:
                _record_not_sent(session, ids, outcome, now=now, settings=settings)
        if attempts:
            session.execute(_ADD_ATTEMPTS, attempts)


SIGN_IN_SENT = "(lien de connexion envoyé, effacé)"
# A message sent (its delivery, or a digest's): one statement built once, no ORM object; it returns what the
# delivery.sent events and the attempts say. A sign-in link's body is a credential: kept only until it is sent.
_redacted = _DELIVERY.c.kind.in_(REDACT_AFTER_SENDING)
_MARK_SENT = (
    sa.update(_DELIVERY)
    .where(_DELIVERY.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        status="sent",
        sent_at=sa.bindparam("now", type_=UTCDateTime()),
        last_error=None,
        leased_until=None,
        provider=sa.bindparam("provider"),
        provider_message_id=sa.bindparam("message_id"),
        digest_of=sa.bindparam("digest_of"),
        body_text=sa.case((_redacted, SIGN_IN_SENT), else_=_DELIVERY.c.body_text),
        body_html=sa.case((_redacted, sa.null()), else_=_DELIVERY.c.body_html),
    )
    .returning(
        *(
            _DELIVERY.c[name]
            for name in ("id", "need_id", "referral_id", "kind", "channel", "recipient_role", "correlation_id")
        ),
        _DELIVERY.c.attempts,
    )
)
_ADD_ATTEMPTS = sa.insert(table_of(DeliveryAttempt))


def _record_sent(session: Session, ids: list[str], sent: Sent, now: datetime) -> list[dict]:
    """Mark one message's deliveries sent (a digest's: each names the first, `digest_of`); returns their attempts."""
    values = {
        "ids": ids,
        "now": now,
        "provider": sent.provider,
        "message_id": sent.provider_message_id,
        "digest_of": ids[0] if len(ids) > 1 else None,
    }
    attempts = []
    for d in session.execute(_MARK_SENT, values).all():
        attempts.append({"delivery_id": d.id, "number": d.attempts, "at": now, "outcome": "sent"})
        if d.need_id is not None:  # delivery events are about a need; a sign-in link is not
            emit(session, DeliverySent(**event_fields(d, now)))
    return attempts


def _record_not_sent(session: Session, ids: list[str], outcome: Outcome, *, now: datetime, settings: Settings) -> None:
    for d in (session.get_one(Delivery, i) for i in ids):  # leased by this sender: they exist
        d.leased_until = None
        error = outcome.error
        attempt = DeliveryAttempt(delivery_id=d.id, number=d.attempts, at=now, outcome="retry")
        if outcome.suppressed or (error is not None and error.opted_out):
            d.status, d.suppressed_reason = "suppressed", outcome.suppressed or "opted_out"
            attempt.outcome, attempt.error = "suppressed", str(error) if error else d.suppressed_reason
            if error is not None:
                opt_out(session, d.recipient, d.provider or settings.sms_provider, now)
        else:
            assert error is not None  # neither sent nor suppressed: the outcome is an error
            d.last_error = attempt.error = str(error)[:2000]
            if error.permanent or d.attempts >= settings.delivery_max_attempts:
                d.status, attempt.outcome = "failed", "failed"
                if d.need_id is not None:
                    emit(session, DeliveryFailed(**event_fields(d, now), error=redact(d.last_error)))
                fall_back_to_email(session, d, now)
            else:
                retry_at = now + domain.retry_delay(
                    d.attempts, settings.delivery_retry_base_s, settings.delivery_retry_max_s, error.retry_after_s
                )
                if d.quiet_timezone:
                    retry_at, d.held_reason = quiet_time(d, retry_at)
                d.next_attempt_at, attempt.outcome, attempt.retry_at = retry_at, "retry", retry_at
        session.add(d)
        session.add(attempt)


# --- queueing ------------------------------------------------------------------------------------------

DUE_NOW = "relais.due_now"  # session.info: the channels a transaction queued a message due now on (their senders wake)


def queue(
    session: Session,
    event,
    now: datetime,
    *,
    kind: str,
    channel: str,
    recipient_role: str,
    recipient: str,
    rendered: Rendered,
    language: str = "fr",
    reply_to: str | None = None,
    facts: dict | None = None,
    status: str = "queued",
    suppressed_reason: str | None = None,
    due_at: datetime | None = None,
    held_reason: str | None = None,
    quiet_timezone: str | None = None,
    event_id: str | None = None,
    fallback_for: str | None = None,
) -> str:
    """Queue one rendered message of `event` (its `event_id` unless given), due now unless `due_at` (held for quiet
    hours or a digest: `held_reason`), or record it with status "suppressed" and its `suppressed_reason`; returns the
    delivery's id. `event` is the event, or the failed SMS an email replaces (`fallback_for`: its id). One prebuilt
    INSERT: building a Delivery object and flushing it cost more than the insert."""
    delivery_id = new_id()
    sms = domain.sms_count(rendered.text) if channel == "sms" and rendered.text else None
    row = {
        "id": delivery_id,
        "event_id": event_id or event.event_id,
        "need_id": event.need_id,
        "referral_id": getattr(event, "referral_id", None),
        "kind": kind,
        "channel": channel,
        "recipient_role": recipient_role,
        "recipient": recipient,
        "language": language,
        "subject": rendered.subject,
        "body_text": rendered.text,
        "body_html": rendered.html,
        "reply_to": reply_to,
        "status": status,
        "suppressed_reason": suppressed_reason,
        "attempts": 0,
        "next_attempt_at": due_at or now,
        "held_reason": held_reason,
        "quiet_timezone": quiet_timezone,
        "facts": json.dumps(facts) if facts else None,
        "sms_encoding": sms.encoding if sms else None,
        "sms_segments": sms.segments if sms else None,
        "fallback_for": fallback_for,
        "created_at": now,
        "correlation_id": event.correlation_id,
    }
    session.execute(_ADD_DELIVERY, row)
    if status == "queued" and row["next_attempt_at"] <= now:
        session.info.setdefault(DUE_NOW, set()).add(channel)
    return delivery_id


def event_fields(d: Delivery | sa.Row[Any], now: datetime) -> dict:
    """What delivery.sent and delivery.failed say of a delivery (no address)."""
    return dict(
        need_id=d.need_id,
        delivery_id=d.id,
        referral_id=d.referral_id,
        kind=d.kind,
        channel=d.channel,
        recipient_role=d.recipient_role,
        occurred_at=now,
        correlation_id=d.correlation_id,
    )
