"""Email over SMTP: RELAIS_SMTP_URL read and checked, a small pool of reused connections per sender, and what a
failure means for a retry (see base.SendError)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import re
import secrets
import ssl
import time
from dataclasses import dataclass
from email.charset import QP, Charset
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from services.notifications.providers.base import SendError, Sent
from shared.settings import Settings

SEND_TIMEOUT_S = 30
IDLE_CHECK_S = 30  # a connection idle this long is checked with NOOP before use


@dataclass(frozen=True)
class SmtpTarget:
    """RELAIS_SMTP_URL: smtp://[user:pass@]host:port (STARTTLS when the server offers it; `?starttls=require`
    refuses a server that does not) or smtps://... (TLS from the first byte); `?cafile=PATH` trusts a private CA."""

    host: str
    port: int
    use_tls: bool
    starttls: bool | None  # None: when offered
    username: str | None
    password: str | None
    cafile: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SmtpTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"RELAIS_SMTP_URL must look like smtp://[user:pass@]host:port or smtps://...; got {url!r}")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        starttls = {"require": True, "off": False}.get(query.get("starttls", ""), None)
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if parts.scheme == "smtps" else 25),
            use_tls=parts.scheme == "smtps",
            starttls=None if parts.scheme == "smtps" else starttls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            cafile=query.get("cafile"),
        )

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


def mail_domain(sender: str) -> str:
    """The domain of RELAIS_MAIL_FROM, for Message-IDs."""
    address = email.utils.parseaddr(sender)[1]
    return address.rpartition("@")[2] or "relais.localhost"


def message_id(key: str, sender: str) -> str:
    """One Message-ID per delivery, the same on every attempt, so a mail client can drop a duplicate."""
    return f"<{key}@{mail_domain(sender)}>"


# The compat32 classes (email.mime), not EmailMessage: the modern policy parses and refolds every header when the
# message is built and again when aiosmtplib flattens it, which was a third of the notifications service's CPU in
# `./dev bench` (docs/benchmarks.md). The bytes on the wire are the same kind: UTF-8 quoted-printable parts, RFC 2047
# encoded headers where they are not ASCII.
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def _text_part(text: str, subtype: str) -> Message:
    part = MIMENonMultipart("text", subtype)
    part.set_payload(text, _UTF8_QP)  # UTF-8, quoted-printable: readable in the raw message
    return part


def _header(value: str) -> str:
    """A header value in ASCII: as it is, or as RFC 2047 base64 words of at most 30 bytes each (whole characters),
    which the generator folds at their spaces without encoding anything again."""
    if value.isascii():
        return value
    words, word = [], ""
    for char in value:
        if len((word + char).encode()) > 30:
            words.append(word)
            word = char
        else:
            word += char
    words.append(word)
    return " ".join(f"=?utf-8?b?{base64.b64encode(w.encode()).decode()}?=" for w in words)


def _address(value: str) -> str:
    """`Name <address>` with a non-ASCII name encoded (RFC 2047); a bare address as it is."""
    name, address = email.utils.parseaddr(value)
    if not address:
        return value
    if not name:
        return address
    return email.utils.formataddr((name, address)) if name.isascii() else f"{_header(name)} <{address}>"


def build_message(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    reply_to: str | None = None,
    language: str = "fr",
) -> Message:
    plain = _text_part(text, "plain")
    if html:
        # A boundary of ours: the generator would otherwise search both parts for a string they do not hold.
        msg: Message = MIMEMultipart("alternative", boundary=f"=_relais_{secrets.token_hex(16)}")
        msg.attach(plain)
        msg.attach(_text_part(html, "html"))
    else:
        msg = plain
    msg["From"], msg["To"], msg["Subject"] = _address(sender), _address(to), _header(subject)
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = message_id
    if reply_to:
        msg["Reply-To"] = _address(reply_to)
    msg["Auto-Submitted"] = "auto-generated"  # no out-of-office replies back to the desk
    msg["Content-Language"] = language
    return msg


class _Connection:
    """One slot of the pool: an SMTP connection (None until first used, or after it was lost) and its last use."""

    def __init__(self) -> None:
        self.smtp: aiosmtplib.SMTP | None = None
        self.last_used = 0.0

    def drop(self) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is not None:
            try:
                smtp.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass


class SmtpPool:
    """Up to `size` SMTP connections, each reused for message after message and opened again when it was lost.
    A connection is opened only when every open one is busy, and the last one used is taken first, so a sender
    that sends one message at a time keeps one connection; `size` messages may be in flight at once."""

    def __init__(self, target: SmtpTarget, timeout: float = SEND_TIMEOUT_S, size: int = 1) -> None:
        self.target, self.timeout, self.size = target, timeout, max(1, size)
        self._slots = [_Connection() for _ in range(self.size)]
        # Open connections first (last used on top), then the unopened slots.
        self._free: list[_Connection] = list(self._slots)
        self._available = asyncio.Semaphore(self.size)  # one token per free slot
        self.connections_opened = 0  # how many times we had to connect: `size` at most while the server keeps them

    async def _connect(self) -> aiosmtplib.SMTP:
        t = self.target
        smtp = aiosmtplib.SMTP(
            hostname=t.host,
            port=t.port,
            use_tls=t.use_tls,
            start_tls=t.starttls,
            username=t.username,
            password=t.password,
            timeout=self.timeout,
            tls_context=t.tls_context() if (t.use_tls or t.starttls is not False) else None,
        )
        await smtp.connect()
        self.connections_opened += 1
        return smtp

    async def _take(self) -> _Connection:
        await self._available.acquire()
        opened = [c for c in self._free if c.smtp is not None and c.smtp.is_connected]
        slot = max(opened, key=lambda c: c.last_used) if opened else self._free[-1]
        self._free.remove(slot)
        return slot

    def _give(self, slot: _Connection) -> None:
        # Not a coroutine: it also runs while the sender is being cancelled, where no await may complete.
        self._free.append(slot)
        self._available.release()

    async def _connection(self, slot: _Connection) -> tuple[aiosmtplib.SMTP, bool]:
        """The slot's open connection (checked with NOOP after a while idle), or a new one; True when reused."""
        if slot.smtp is not None and slot.smtp.is_connected:
            if time.monotonic() - slot.last_used < IDLE_CHECK_S:
                return slot.smtp, True
            try:
                await slot.smtp.noop()
                return slot.smtp, True
            except (aiosmtplib.SMTPException, OSError):
                pass
        slot.drop()
        slot.smtp = await self._connect()
        return slot.smtp, False

    async def send(self, msg: Message) -> Sent:
        slot = await self._take()
        try:
            await self._send_on(slot, msg)
        finally:
            slot.last_used = time.monotonic()
            self._give(slot)
        return Sent("smtp")

    async def _send_on(self, slot: _Connection, msg: Message) -> None:
        try:
            try:
                smtp, reused = await self._connection(slot)
                await smtp.send_message(msg)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server closed our idle connection: once more on a fresh one.
                slot.drop()
                smtp, _ = await self._connection(slot)
                await smtp.send_message(msg)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [e.code for e in exc.recipients]
            raise SendError(
                f"recipient refused: {'; '.join(f'{e.code} {e.message}' for e in exc.recipients)}",
                permanent=all(c >= 500 for c in codes),
            ) from exc
        except (
            aiosmtplib.SMTPAuthenticationError,
            aiosmtplib.SMTPHeloError,
            aiosmtplib.SMTPConnectResponseError,
        ) as exc:
            # The server or our credentials, not this message: worth a retry once ops fix it.
            slot.drop()
            raise SendError(f"SMTP {exc.code} {exc.message}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                slot.drop()
            raise SendError(f"SMTP {exc.code} {exc.message}", permanent=exc.code >= 500) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            slot.drop()
            raise SendError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            # Cancelled mid-dialogue (the service stops): the connection is in an unknown state.
            slot.drop()
            raise

    async def close(self) -> None:
        """QUIT on the idle connections; one still in a dialogue (its sender cancelled) is closed."""
        for slot in self._slots:
            if slot in self._free and slot.smtp is not None and slot.smtp.is_connected:
                try:
                    await slot.smtp.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    pass
            slot.drop()


def problems(settings: Settings) -> list[str]:
    """A malformed RELAIS_SMTP_URL, said with the form to use (its password not repeated)."""
    if not settings.smtp_url:
        return []
    try:
        SmtpTarget.from_url(settings.smtp_url)
    except ValueError:
        shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", settings.smtp_url)
        return [f"RELAIS_SMTP_URL: must look like smtp://[user:pass@]host:port, or smtps://... for TLS (got {shown!r})"]
    return []
