"""Partners' replies by email (docs/inbound-mail.md): the handoff's per-referral Reply-To, checking a received message
(read by mail_reading.py) against its reply address and sender, and handing it to referral as `partner.reply_received`;
then what referral made of it (`referral.reply_recorded`): a polite answer when the referral had left the partner, a
word to the coordinators of an out-of-office.

Two ways in, one handler (`receive`): the SMTP listener (`serve_smtp`, aiosmtpd inside this process, on
RELAIS_INBOUND_SMTP_PORT) and Mailgun's inbound route (`POST /webhooks/mail/mailgun`). Notifications never acts on a
referral itself: referral applies the reply by its API's rules.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, cast

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from sqlmodel import Session

from services.notifications import domain
from services.notifications.mail_reading import (
    BadSignature,
    Intent,
    ReadMail,
    check_mailgun_signature,
    form_fields,
    intent_of,
    read_mailgun,
    read_message,
)
from services.notifications.render import render_email
from services.notifications.store import InboundMail, NeedReference, ReplyRoute
from shared.db import Database, emit, table_of, upsert
from shared.deps import RuntimeDep, SettingsDep
from shared.directory import Contact, Directory
from shared.edges import body_limit
from shared.events import (
    INBOUND,
    InboundEvent,
    NeedUnroutable,
    PartnerReplyReceived,
    ReferralAssigned,
    ReferralEvent,
    ReferralReplyRecorded,
    SealedPersonalData,
    new_id,
)
from shared.personal_data import DataKeyErased, PersonalData
from shared.service import Service
from shared.settings import Settings
from shared.signin import REPLY_LOCAL_PART, referral_of_reply_token, reply_token, reply_token_matches

log = logging.getLogger("relais.notifications.inbound")


# --- the reply address --------------------------------------------------------------------------------------


def receiving(settings: Settings) -> bool:
    """Replies can reach us: the SMTP listener is on, or Mailgun's route posts them."""
    return bool(settings.inbound_smtp_port or settings.mailgun_webhook_signing_key)


def inbound_domain(settings: Settings) -> str:
    """RELAIS_INBOUND_DOMAIN, else the domain of RELAIS_MAIL_FROM."""
    if settings.inbound_domain:
        return settings.inbound_domain.lower()
    return (email.utils.parseaddr(settings.mail_from)[1].rpartition("@")[2] or "relais.localhost").lower()


def reply_address(settings: Settings, event: ReferralEvent | NeedUnroutable, role: str) -> str | None:
    """`reponse+TOKEN@domain` for a partner's contact (or backup) written to about a referral, when replies can reach
    us; None otherwise (the desk's address is the Reply-To then, domain.reply_to)."""
    contact_id = getattr(event, "contact_id", None)
    if not receiving(settings) or role not in ("partner_contact", "backup_contact") or not contact_id:
        return None
    token = reply_token(settings, cast(ReferralEvent, event).referral_id, contact_id)
    return f"{REPLY_LOCAL_PART}+{token}@{inbound_domain(settings)}"


def token_in(addresses: list[str], settings: Settings) -> str | None:
    """The token of the first of `addresses` that is one of our reply addresses."""
    ours = inbound_domain(settings)
    for address in addresses:
        local, _, host = email.utils.parseaddr(address)[1].lower().rpartition("@")
        prefix, plus, token = local.partition("+")
        if host == ours and plus and prefix == REPLY_LOCAL_PART and token:
            return token
    return None


# --- the use case: a received message ------------------------------------------------------------------------


@dataclass
class Received:
    """What `receive` made of a message (the row kept, and whether an event went to referral)."""

    mail: InboundMail
    emitted: bool = False
    notes: list[str] = field(default_factory=list)


def _contact_of(directory: Directory, partner_id: str, address: str) -> Contact | None:
    partner = directory.partner(partner_id)
    return next((c for c in partner.contacts if c.email.lower() == address), None) if partner else None


def receive(
    db: Database,
    read: ReadMail,
    *,
    source: str,
    settings: Settings,
    directory: Directory,
    personal_data: PersonalData,
    now: datetime,
) -> Received:
    """Keep the message (inbound_mail, whatever it is) and, when it is a partner's answer or out-of-office on one of
    our reply addresses, hand it to referral (`partner.reply_received` in the outbox, same transaction). The token
    is bound to the referral and its contact; the sender must be that contact or another of the same partner (the
    From address, or the envelope's); a provider's failed SPF and DKIM make it unauthenticated. Bounces and automatic
    replies other than an out-of-office are never answers."""
    mail = InboundMail(
        id=new_id(),
        received_at=now,
        source=source,
        sender=read.sender[:254],
        subject=read.subject,
        text=read.text or None,
        verdict="answer",
    )
    token = token_in(read.recipients, settings)
    referral_id = referral_of_reply_token(token) if token else None
    with db.read() as session:
        route = session.get(ReplyRoute, referral_id) if referral_id else None
        reference = session.get(NeedReference, route.need_id) if route else None
    contact = None
    if token is None:
        mail.verdict = "no_token"
    elif route is None or not reply_token_matches(settings, token, route.referral_id, route.contact_id):
        mail.verdict = "bad_token"
    else:
        mail.referral_id, mail.need_id = route.referral_id, route.need_id
        contact = _contact_of(directory, route.partner_id, read.from_address) or _contact_of(
            directory, route.partner_id, read.sender
        )
        if read.automatic in ("bounce", "auto_reply"):
            mail.verdict = read.automatic
        elif contact is None:
            mail.verdict = "unknown_sender"
        elif read.authenticated is False:
            mail.verdict = "unauthenticated"
        elif read.automatic == "out_of_office":
            mail.verdict = "out_of_office"
        elif not read.text:
            mail.verdict = "empty"
    event: PartnerReplyReceived | None = None
    if route is not None and contact is not None and mail.verdict in ("answer", "out_of_office"):
        mail.contact_id = contact.id
        what = Intent("out_of_office") if mail.verdict == "out_of_office" else intent_of(read.text)
        mail.intent = what.intent
        sealed: SealedPersonalData | None = None
        if what.intent != "out_of_office" and reference is not None and reference.person_id:
            try:
                sealed = personal_data.seal_text(reference.person_id, route.need_id, what.text or read.text)
            except DataKeyErased:
                sealed = None  # the person was erased: the words are not carried
        if what.intent == "out_of_office" or sealed is not None or what.intent == "accept":
            event = PartnerReplyReceived(
                need_id=route.need_id,
                referral_id=route.referral_id,
                partner_id=route.partner_id,
                reply_id=mail.id,
                contact_id=contact.id,
                intent=what.intent,
                reason_code=what.reason_code,
                sealed=sealed,
                occurred_at=now,
            )
        else:
            mail.verdict = "no_person_key"  # a need recorded before replies existed, or its person erased
    with db.transaction() as session:
        session.add(mail)
        if event is not None:
            emit(session, event)
    log.info(
        "reply by email %s (%s) on referral %s: %s%s",
        mail.id,
        source,
        mail.referral_id or "-",
        mail.verdict,
        f", {mail.intent}" if mail.intent else "",
    )
    return Received(mail, emitted=event is not None)


# --- what referral made of it ------------------------------------------------------------------------------------


def remember_route(session: Session, event: ReferralEvent | NeedUnroutable) -> None:
    """On referral.assigned: who the reply address of this referral is bound to. One upsert (a referral is assigned
    once; the same event read twice writes the same row)."""
    if isinstance(event, ReferralAssigned):
        row = dict(
            referral_id=event.referral_id,
            need_id=event.need_id,
            partner_id=event.partner_id,
            contact_id=event.contact_id,
            library_id=event.library_id,
            category=event.category,
        )
        upsert(session, table_of(ReplyRoute), "referral_id", row)


def on_reply_recorded(
    session: Session, event: ReferralReplyRecorded, directory: Directory, settings: Settings, now: datetime
) -> int:
    """Referral took the reply: the kept message learns how. A reply on a referral that had left the partner gets a
    polite automatic answer (kind `reply_not_applied`, to its sender, never to an automatic message); an
    out-of-office tells the coordinators (kind `contact_away`). Returns how many messages were queued."""
    from services.notifications.handlers import queue  # one queueing for every message

    mail = session.get(InboundMail, event.reply_id)
    if mail is not None:
        mail.outcome = event.outcome
        session.add(mail)
    partner, library = directory.partner(event.partner_id), directory.library(event.library_id)
    category = directory.category(event.category)
    context: dict[str, Any] = dict(
        partner=partner,
        library=library,
        category=category,
        category_id=event.category,
        timezone=library.timezone if library else directory.timezone,
        deployment=directory.deployment.name,
        referral_id=event.referral_id,
        need_id=event.need_id,
        contact=next((c for c in partner.contacts if c.id == event.contact_id), None) if partner else None,
    )
    if event.outcome == "left_partner" and mail is not None and mail.verdict == "answer":
        contact = context["contact"]
        recipient = domain.Recipient("partner_contact", contact.name if contact else "", mail.sender)
        rendered = render_email("reply_not_applied", recipient=recipient, link=None, subject=mail.subject, **context)
        queue(
            session,
            event,
            now,
            kind="reply_not_applied",
            channel="email",
            recipient_role="partner_contact",
            recipient=mail.sender,
            rendered=rendered,
            reply_to=domain.reply_to(directory, event.library_id, "partner_contact"),
        )
        return 1
    if event.outcome == "away":
        people = [domain.Recipient("escalation", c.name, c.email) for c in directory.escalation_contacts]
        for person in people:
            rendered = render_email(
                "contact_away",
                recipient=person,
                link=None,
                escalates=settings.inbound_away_escalates,
                **context,
            )
            queue(
                session,
                event,
                now,
                kind="contact_away",
                channel="email",
                recipient_role="escalation",
                recipient=person.email,
                rendered=rendered,
            )
        return len(people)
    return 0


# --- the SMTP listener ------------------------------------------------------------------------------------------


class InboundSmtpHandler:
    """aiosmtpd's handler: only our reply addresses are taken as recipients (no relaying anywhere), the message size
    is aiosmtpd's `data_size_limit` (552 beyond it), and each message goes through `receive` in a thread."""

    def __init__(self, settings: Settings, take: Callable[[ReadMail, str], Awaitable[Any]]) -> None:
        self.settings, self.take = settings, take

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options):  # noqa: N802, ANN001
        if token_in([address], self.settings) is None:
            return "550 5.1.1 No such mailbox here: replies go to the address of the message they answer"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001
        raw = envelope.original_content or envelope.content
        if len(raw) > self.settings.inbound_max_bytes:
            return "552 5.3.4 Message too big"
        sender = envelope.mail_from if envelope.mail_from not in (None, "<>") else ""
        read = read_message(raw, sender, list(envelope.rcpt_tos))
        try:
            await self.take(read, "smtp")
        except Exception:  # noqa: BLE001 - the sender's server will try again later
            log.exception("an inbound message could not be recorded")
            return "451 4.3.0 Try again later"
        return "250 OK: received"


async def serve_smtp(settings: Settings, take: Callable[[ReadMail, str], Awaitable[Any]]) -> None:
    """Listen on RELAIS_HOST:RELAIS_INBOUND_SMTP_PORT for the app's lifetime (a background task of the service)."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    assert settings.inbound_smtp_port is not None
    loop = asyncio.get_running_loop()
    handler = InboundSmtpHandler(settings, take)
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=settings.inbound_max_bytes,
            enable_SMTPUTF8=True,
            hostname=inbound_domain(settings),
            ident="Relais inbound",
            loop=loop,
        ),
        host=settings.host,
        port=settings.inbound_smtp_port,
    )
    log.info("inbound SMTP listening on %s:%s", settings.host, settings.inbound_smtp_port)
    try:
        await asyncio.Event().wait()  # until the service stops (the task is cancelled)
    finally:
        server.close()


# --- wiring: the service's part ------------------------------------------------------------------------------------


def taker(svc: Service) -> Callable[[ReadMail, str], Awaitable[Received]]:
    """What both ways in call with a message read: `receive` in a thread, then the relay woken."""

    async def take(read: ReadMail, source: str) -> Received:
        received = await anyio.to_thread.run_sync(
            partial(
                receive,
                svc.db,
                read,
                source=source,
                settings=svc.settings,
                directory=svc.directory,
                personal_data=svc.personal_data,
                now=svc.clock(),
            )
        )
        if received.emitted:
            svc.bus.relay.wake()
        return received

    return take


def take_dep(runtime: RuntimeDep) -> Callable[[ReadMail, str], Awaitable[Received]]:
    return taker(runtime.service)


def register(svc: Service) -> None:
    """The inbound stream in the AsyncAPI document, and the SMTP listener when RELAIS_INBOUND_SMTP_PORT is set."""
    svc.bus.documents_publisher(
        INBOUND, InboundEvent, "Partners' replies by email to a handoff, for referral to apply by its API's rules."
    )
    if svc.settings.inbound_smtp_port:
        svc.background.append(partial(serve_smtp, svc.settings, taker(svc)))
    svc.openapi_refiners.append(document_inbound)


# What the OpenAPI document says of replies by email: outside /api/v1 (a provider holds no bearer token, SMTP is not
# HTTP), so as an extension that API tools skip, and in the description people read.
INBOUND_SETTINGS = {
    "RELAIS_INBOUND_SMTP_PORT": "port of the SMTP listener for partners' replies; off when unset (`relais up` sets it)",
    "RELAIS_INBOUND_DOMAIN": "domain of the reply addresses reponse+TOKEN@domain; default RELAIS_MAIL_FROM's",
    "RELAIS_INBOUND_MAX_BYTES": "largest message taken (1000000): SMTP 552, webhook 413 beyond it",
    "RELAIS_MAILGUN_WEBHOOK_SIGNING_KEY": "Mailgun's webhook signing key: turns POST /webhooks/mail/mailgun on",
    "RELAIS_INBOUND_AWAY_ESCALATES": "true: an out-of-office on a handoff escalates to the backup contact at once",
}


def document_inbound(document: dict) -> None:
    document["x-relais-inbound-mail"] = {
        "settings": INBOUND_SETTINGS,
        "webhooks": {
            "/webhooks/mail/mailgun": "POST, Mailgun's inbound route (forward), form fields signed with "
            "HMAC-SHA256(signing key, timestamp + token): 200 kept, 403 bad signature, 406 not set up, 413 too large"
        },
        "events": ["partner.reply_received (stream inbound)", "referral.reply_recorded (stream referrals)"],
        "docs": "docs/inbound-mail.md",
    }
    info = document.setdefault("info", {})
    lines = "\n".join(f"- `{name}`: {what}" for name, what in INBOUND_SETTINGS.items())
    info["description"] = (
        (info.get("description") or "")
        + "\n\n**Replies by email** (docs/inbound-mail.md): `POST /webhooks/mail/mailgun` (Mailgun's inbound route) and"
        + " an SMTP listener. Settings:\n"
        + lines
    ).strip()


# --- the webhook ---------------------------------------------------------------------------------------------------

MAX_WEBHOOK_EDGE_BYTES = 25 * 1024 * 1024  # the door's limit; RELAIS_INBOUND_MAX_BYTES is checked inside


def webhook_router(take_of: Callable[..., Callable[[ReadMail, str], Awaitable[Any]]]) -> APIRouter:
    """POST /webhooks/mail/mailgun: Mailgun's route `forward("https://.../webhooks/mail/mailgun")`."""
    router = APIRouter()

    @router.post("/webhooks/mail/mailgun")
    @body_limit(MAX_WEBHOOK_EDGE_BYTES)
    async def mailgun(
        request: Request, settings: SettingsDep, take: Callable[[ReadMail, str], Awaitable[Any]] = Depends(take_of)
    ) -> Response:
        """A reply to a handoff, as Mailgun's inbound route posts it (signed with the webhook signing key). 403 on a
        bad signature, 413 beyond RELAIS_INBOUND_MAX_BYTES, 406 (Mailgun does not retry) when Relais is not set up
        for Mailgun; 200 once the message is kept, whatever it turned out to be."""
        if not settings.mailgun_webhook_signing_key:
            raise HTTPException(406, "RELAIS_MAILGUN_WEBHOOK_SIGNING_KEY is not set")
        body = await request.body()
        if len(body) > settings.inbound_max_bytes:
            raise HTTPException(413, f"message too large: at most {settings.inbound_max_bytes} bytes")
        fields = form_fields(request.headers.get("content-type", ""), body)
        try:
            check_mailgun_signature(settings.mailgun_webhook_signing_key, fields, time.time())
        except BadSignature:
            raise HTTPException(403, "bad signature") from None
        await take(read_mailgun(fields), "mailgun")
        return Response(status_code=200)

    return router


webhooks = webhook_router(take_dep)
