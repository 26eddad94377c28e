"""Reading a received email, pure and free of I/O (docs/inbound-mail.md): whether it is automatic (a bounce, an
out-of-office, another automatic reply), its new text without the quoted history and signature, what its first line
asks (accept, decline with a reason code, else an answer), and Mailgun's inbound format (its form fields, its
signature). `inbound.py` does the rest: checking the reply address and the sender, keeping the message, referral's
event."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import html
import json
import re
import unicodedata
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Literal
from urllib.parse import parse_qsl

from shared.events import DeclineReasonCode, ReplyIntent

MAX_TEXT = 20_000  # characters of a reply's new text kept and carried (a reply is a few lines)
MAILGUN_MAX_AGE_S = 15 * 60  # a signed Mailgun POST older than this is refused (replayed)


# --- a message ---------------------------------------------------------------------------------

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
