"""Partners' replies by email (docs/inbound-mail.md): the handoff's per-referral Reply-To, reading a received message
(automatic or not, its new text, what its first line asks), checking it, and handing it to referral as
`partner.reply_received`; then what referral made of it (`referral.reply_recorded`): a polite answer when the referral
had left the partner, a word to the coordinators of an out-of-office.

Two ways in, one handler (`receive`): the SMTP listener (`serve_smtp`, aiosmtpd inside this process, on
RELAIS_INBOUND_SMTP_PORT) and Mailgun's inbound route (`POST /webhooks/mail/mailgun`, `read_mailgun`). Notifications
never acts on a referral itself: referral applies the reply by its API's rules.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import html
import json
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.parser import BytesParser
from functools import partial
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from sqlmodel import Session

from services.notifications import domain
from services.notifications.render import render_email
from services.notifications.store import InboundMail, NeedReference, ReplyRoute
from shared.db import Database, emit
from shared.deps import RuntimeDep, SettingsDep
from shared.directory import Contact, Directory
from shared.edges import body_limit
from shared.events import (
    INBOUND,
    DeclineReasonCode,
    InboundEvent,
    NeedUnroutable,
    PartnerReplyReceived,
    ReferralAssigned,
    ReferralEvent,
    ReferralReplyRecorded,
    ReplyIntent,
    SealedPersonalData,
    new_id,
)
from shared.personal_data import DataKeyErased, PersonalData
from shared.service import Service
from shared.settings import Settings
from shared.signin import REPLY_LOCAL_PART, referral_of_reply_token, reply_token, reply_token_matches

log = logging.getLogger("relais.notifications.inbound")

MAX_TEXT = 20_000  # characters of a reply's new text kept and carried (a reply is a few lines)
MAILGUN_MAX_AGE_S = 15 * 60  # a signed Mailgun POST older than this is refused (replayed)


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


# --- reading a message (pure) ---------------------------------------------------------------------------------

# RFC 3834, and what the usual responders write instead.
AUTOMATIC_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder")
AUTOMATIC_PRECEDENCE = {"auto_reply", "bulk", "junk", "list"}
OUT_OF_OFFICE = re.compile(
    r"absen(t|ce|te)|out of (the )?office|automatic reply|r[ée]ponse automatique|autoreply|auto-reply|cong[ée]s?\b"
    r"|vacances|vacation|hors du bureau",
    re.IGNORECASE,
)
BOUNCE_SENDERS = re.compile(r"^(mailer-daemon|postmaster)@", re.IGNORECASE)

# Where the quoted history or a signature starts (the reply's new text is what comes before).
QUOTE_HEADER = re.compile(r"^\s*(le\s.+|on\s.+)\b(a\s+[ée]crit|wrote)\s*:\s*$", re.IGNORECASE)
QUOTE_HEADER_START = re.compile(r"^\s*(le|on)\s", re.IGNORECASE)
FORWARD_MARK = re.compile(
    r"^\s*(-{2,}\s*(original message|message d'origine|message original|forwarded message|message transf[ée]r[ée])"
    r"|_{10,}\s*$)",
    re.IGNORECASE,
)
OUTLOOK_FROM = re.compile(r"^\s*\*?(de|from)\s*:", re.IGNORECASE)
OUTLOOK_NEXT = re.compile(r"^\s*\*?(envoy[ée]|sent|date|[àa]|to|objet|subject|cc)\s*:", re.IGNORECASE)

# What a first line asks (compared without accents, apostrophes made straight).
ACCEPT = re.compile(r"^\W*(j'accepte|je prends|nous acceptons|nous prenons|on prend|accepte)\b")
DECLINE = re.compile(
    r"^\W*(je refuse|nous refusons|refus\b|je decline|nous declinons|hors competence|hors territoire|hors secteur"
    r"|hors zone|pas de capacite|plus de capacite|complet\b|deja suivi)"
)
DECLINE_CODES: tuple[tuple[re.Pattern[str], DeclineReasonCode], ...] = (
    (re.compile(r"hors competence"), "out_of_scope"),
    (re.compile(r"hors (territoire|secteur|zone)"), "out_of_territory"),
    (re.compile(r"capacite|complet"), "capacity"),
    (re.compile(r"deja suivi"), "already_followed"),
)


@dataclass(frozen=True)
class ReadMail:
    """What a received message says, as far as Relais cares."""

    sender: str  # the envelope sender when there was one, else From (lower case)
    from_address: str  # the From header's address (lower case)
    recipients: list[str]
    subject: str
    text: str  # the new text: quoted history and signature stripped
    automatic: Literal["bounce", "auto_reply", "out_of_office"] | None = None
    authenticated: bool | None = None  # what the provider said of SPF/DKIM; None: not said (the token is the proof)


@dataclass(frozen=True)
class Intent:
    intent: ReplyIntent
    reason_code: DeclineReasonCode | None = None
    text: str = ""  # what referral records: the respond message, or the decline's reason


def _plain(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u02bc", "'").casefold()
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def automatic_kind(
    headers: dict[str, str], envelope_sender: str | None, subject: str, text: str, is_report: bool
) -> Literal["bounce", "auto_reply", "out_of_office"] | None:
    """A delivery status notification (bounce), an automatic reply (out-of-office when it says so), or None for a
    person's own reply. `headers` are lower-cased names."""
    sender = (envelope_sender or "").strip()
    if is_report or envelope_sender == "" or sender == "<>" or BOUNCE_SENDERS.match(headers.get("from-address", "")):
        return "bounce"
    auto = headers.get("auto-submitted", "no").strip().lower()
    automatic = (
        auto not in ("", "no")
        or any(name in headers for name in AUTOMATIC_HEADERS)
        or headers.get("precedence", "").strip().lower() in AUTOMATIC_PRECEDENCE
        or headers.get("x-auto-response-suppress") is not None
        and OUT_OF_OFFICE.search(subject) is not None
    )
    if not automatic and not OUT_OF_OFFICE.match(subject.strip()):
        return None
    if auto == "auto-replied" or OUT_OF_OFFICE.search(subject) or OUT_OF_OFFICE.search(text[:2000]):
        return "out_of_office"
    return "auto_reply"


def new_text(body: str) -> str:
    """The reply's own words: everything before the quoted history ("Le ... a écrit :", "On ... wrote:", an Outlook
    "De :/Envoyé :" block, "-----Original Message-----") or the signature ("-- "), without quoted ('>') lines."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    for i, line in enumerate(lines):
        if line.rstrip() in ("--", "-- ") or FORWARD_MARK.match(line) or QUOTE_HEADER.match(line):
            break
        if QUOTE_HEADER_START.match(line) and i + 1 < len(lines) and QUOTE_HEADER.match(f"{line} {lines[i + 1]}"):
            break  # "Le lun. 1 déc. 2026 à 10:00, Relais <...> a" / "écrit :" wrapped on two lines
        if OUTLOOK_FROM.match(line) and any(OUTLOOK_NEXT.match(n) for n in lines[i + 1 : i + 5]):
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip()[:MAX_TEXT]


def intent_of(text: str) -> Intent:
    """What the first line asks: an acceptance ("J'accepte", "Je prends"), a decline ("Je refuse" + why, "Hors
    compétence"...), else an answer whose message is the whole text. A decline that gives no reason is unclear:
    it is recorded as an answer, so nothing is lost and the coordinator reads it."""
    lines = text.split("\n")
    first = lines[0] if lines else ""
    plain = _plain(first)
    rest = "\n".join(lines[1:]).strip()
    if ACCEPT.match(plain):
        return Intent("accept", text=rest)
    if match := DECLINE.match(plain):
        code: DeclineReasonCode = next((c for pattern, c in DECLINE_CODES if pattern.search(plain)), "other")
        said = first[match.end() :].strip(" \t:,.;-–—") if len(first) >= match.end() else ""
        reason = "\n".join(part for part in (said, rest) if part).strip()
        if code != "other" or reason:
            return Intent("decline", code, reason)
    return Intent("respond", text=text)


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1>", "", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</li>", "\n", markup)
    markup = re.sub(r"(?is)<blockquote\b.*?</blockquote>", "", markup)  # quoted history
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def read_message(raw: bytes, envelope_sender: str | None, envelope_recipients: list[str]) -> ReadMail:
    """A raw RFC 5322 message as received by the SMTP listener."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    from_address = email.utils.parseaddr(str(msg.get("from", "")))[1].lower()
    headers = {k.lower(): str(v) for k, v in msg.items()}
    headers["from-address"] = from_address
    subject = str(msg.get("subject", ""))
    body = msg.get_body(preferencelist=("plain", "html"))
    content = ""
    if body is not None:
        try:
            content = str(body.get_content())
        except (LookupError, ValueError):  # an unknown charset or a broken part: read what can be read
            content = (body.get_payload(decode=True) or b"").decode("utf-8", "replace")  # type: ignore[union-attr]
        if body.get_content_type() == "text/html":
            content = _html_to_text(content)
    is_report = msg.get_content_type() == "multipart/report" or any(
        part.get_content_type() == "message/delivery-status" for part in msg.walk()
    )
    recipients = [*envelope_recipients]
    for name in ("to", "cc", "delivered-to", "x-original-to"):
        recipients += [a for _, a in email.utils.getaddresses([str(v) for v in msg.get_all(name, [])])]
    text = new_text(content)
    sender = (envelope_sender or from_address).lower()
    return ReadMail(
        sender=sender,
        from_address=from_address,
        recipients=recipients,
        subject=subject[:500],
        text=text,
        automatic=automatic_kind(headers, envelope_sender, subject, content, is_report),
    )


# --- Mailgun's inbound route ----------------------------------------------------------------------------------


class BadSignature(Exception):
    pass


def check_mailgun_signature(signing_key: str, fields: dict[str, str], now: float) -> None:
    """Mailgun signs each POST: `signature` is the hex HMAC-SHA256, keyed with the webhook signing key, of
    `timestamp` followed by `token`. A stale timestamp is refused too (a replayed POST)."""
    timestamp, token, signature = fields.get("timestamp", ""), fields.get("token", ""), fields.get("signature", "")
    expected = hmac.new(signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    if not signature or not hmac.compare_digest(expected, signature.lower()):
        raise BadSignature("signature")
    try:
        if abs(now - int(timestamp)) > MAILGUN_MAX_AGE_S:
            raise BadSignature("timestamp")
    except ValueError:
        raise BadSignature("timestamp") from None


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Mailgun posts `application/x-www-form-urlencoded`, or `multipart/form-data` when the message has attachments
    (read with the email package: the lock file has no python-multipart). Attachments are not kept."""
    if content_type.startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        fields: dict[str, str] = {}
        for part in msg.iter_parts() if msg.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str) or part.get_filename():
                continue
            payload = part.get_payload(decode=True)
            raw = payload if isinstance(payload, bytes) else b""
            fields[name] = raw.decode(part.get_content_charset() or "utf-8", "replace")
        return fields
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def read_mailgun(fields: dict[str, str]) -> ReadMail:
    """A message as Mailgun's route posts it ("fully parsed"): `sender` (MAIL FROM), `from`, `recipient` (RCPT TO),
    `subject`, `body-plain`, `stripped-text` (Mailgun's own removal of the quoted part, when present),
    `message-headers` (a JSON list of [name, value]) with Mailgun's verdicts `X-Mailgun-Spf` and
    `X-Mailgun-Dkim-Check-Result`."""
    try:
        pairs = json.loads(fields.get("message-headers") or "[]")
        headers = {str(k).lower(): str(v) for k, v in pairs}
    except (ValueError, TypeError):
        headers = {}
    from_address = email.utils.parseaddr(fields.get("from", ""))[1].lower()
    headers["from-address"] = from_address
    subject = fields.get("subject", "")
    plain = fields.get("body-plain", "")
    text = new_text(fields.get("stripped-text") or plain)
    spf = headers.get("x-mailgun-spf", "").strip().lower()
    dkim = headers.get("x-mailgun-dkim-check-result", "").strip().lower()
    authenticated: bool | None = None
    if spf or dkim:
        authenticated = spf == "pass" or dkim == "pass"  # one aligned pass is enough, as DMARC has it
    is_report = headers.get("content-type", "").lower().startswith("multipart/report")
    sender = fields.get("sender", "")
    return ReadMail(
        sender=(sender or from_address).lower(),
        from_address=from_address,
        recipients=[fields.get("recipient", ""), *[a for _, a in email.utils.getaddresses([headers.get("to", "")])]],
        subject=subject[:500],
        text=text,
        automatic=automatic_kind(headers, sender if "sender" in fields else None, subject, plain, is_report),
        authenticated=authenticated,
    )


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
    """On referral.assigned: who the reply address of this referral is bound to."""
    if isinstance(event, ReferralAssigned):
        session.merge(
            ReplyRoute(
                referral_id=event.referral_id,
                need_id=event.need_id,
                partner_id=event.partner_id,
                contact_id=event.contact_id,
                library_id=event.library_id,
                category=event.category,
            )
        )


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
