"""The ways out: email over SMTP (one reused connection per sender) and SMS through a provider (`outbox`,
Twilio's REST API, Brevo's transactional SMS API), with what a failure means for a retry.

A send either returns `Sent` or raises `SendError`: `permanent` for what a retry cannot fix (SMTP 5xx on the
message or its recipient, HTTP 4xx), otherwise transient (SMTP 4xx, refused or dropped connections,
timeouts, HTTP 429 and 5xx), with the server's `Retry-After` when it gave one.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import logging
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import httpx

from shared.settings import Settings

log = logging.getLogger("relais.notifications.channels")

SEND_TIMEOUT_S = 30
IDLE_CHECK_S = 30  # a connection idle this long is checked with NOOP before use


@dataclass(frozen=True)
class Sent:
    provider: str  # smtp | outbox | twilio | brevo
    provider_message_id: str | None = None


class SendError(Exception):
    def __init__(self, message: str, *, permanent: bool = False, retry_after_s: float | None = None,
                 opted_out: bool = False) -> None:
        super().__init__(message)
        self.permanent, self.retry_after_s, self.opted_out = permanent or opted_out, retry_after_s, opted_out


# ==============================================================================================
# Email
# ==============================================================================================


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
        return cls(host=parts.hostname, port=parts.port or (465 if parts.scheme == "smtps" else 25),
                   use_tls=parts.scheme == "smtps", starttls=None if parts.scheme == "smtps" else starttls,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None, cafile=query.get("cafile"))

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


def mail_domain(sender: str) -> str:
    """The domain of RELAIS_MAIL_FROM, for Message-IDs."""
    address = email.utils.parseaddr(sender)[1]
    return address.rpartition("@")[2] or "relais.localhost"


def message_id(key: str, sender: str) -> str:
    """One Message-ID per delivery, the same on every attempt, so a mail client can drop a duplicate."""
    return f"<{key}@{mail_domain(sender)}>"


def build_message(*, sender: str, to: str, subject: str, text: str, html: str | None, message_id: str,
                  reply_to: str | None = None, language: str = "fr") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = message_id
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Auto-Submitted"] = "auto-generated"  # no out-of-office replies back to the desk
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    msg["Content-Language"] = language  # after the parts: set_content clears Content-* headers
    return msg


class SmtpPool:
    """One SMTP connection per sender, reused for every message and opened again when it was lost."""

    def __init__(self, target: SmtpTarget, timeout: float = SEND_TIMEOUT_S) -> None:
        self.target, self.timeout = target, timeout
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self._lock = asyncio.Lock()
        self.connections_opened = 0  # how many times we had to connect: one while the server keeps it

    async def _connect(self) -> aiosmtplib.SMTP:
        t = self.target
        smtp = aiosmtplib.SMTP(hostname=t.host, port=t.port, use_tls=t.use_tls, start_tls=t.starttls,
                               username=t.username, password=t.password, timeout=self.timeout,
                               tls_context=t.tls_context() if (t.use_tls or t.starttls is not False) else None)
        await smtp.connect()
        self.connections_opened += 1
        return smtp

    async def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The open connection (checked with NOOP after a while idle), or a new one; True when reused."""
        if self._smtp is not None and self._smtp.is_connected:
            if time.monotonic() - self._last_used < IDLE_CHECK_S:
                return self._smtp, True
            try:
                await self._smtp.noop()
                return self._smtp, True
            except (aiosmtplib.SMTPException, OSError):
                await self._drop()
        await self._drop()
        self._smtp = await self._connect()
        return self._smtp, False

    async def send(self, msg: EmailMessage) -> Sent:
        async with self._lock:
            try:
                try:
                    smtp, reused = await self._connection()
                    await smtp.send_message(msg)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # The server closed our idle connection: once more on a fresh one.
                    await self._drop()
                    smtp, _ = await self._connection()
                    await smtp.send_message(msg)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [e.code for e in exc.recipients]
                raise SendError(f"recipient refused: {'; '.join(f'{e.code} {e.message}' for e in exc.recipients)}",
                                permanent=all(c >= 500 for c in codes)) from exc
            except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPHeloError,
                    aiosmtplib.SMTPConnectResponseError) as exc:
                # The server or our credentials, not this message: worth a retry once ops fix it.
                await self._drop()
                raise SendError(f"SMTP {exc.code} {exc.message}") from exc
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == 421:
                    await self._drop()
                raise SendError(f"SMTP {exc.code} {exc.message}", permanent=exc.code >= 500) from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await self._drop()
                raise SendError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._last_used = time.monotonic()
        return Sent("smtp")

    async def close(self) -> None:
        async with self._lock:
            if self._smtp is not None and self._smtp.is_connected:
                try:
                    await self._smtp.quit()
                except (aiosmtplib.SMTPException, OSError):
                    pass
            await self._drop()


# ==============================================================================================
# SMS
# ==============================================================================================


class SmsProvider(Protocol):
    name: str

    async def send(self, to: str, text: str, delivery_id: str) -> Sent: ...

    async def close(self) -> None: ...


def webhook_base(settings: Settings) -> str:
    return (settings.webhook_base_url or settings.link_base("notifications")).rstrip("/")


def brevo_webhook_secret(settings: Settings) -> str:
    """The token in Brevo's webhook URL: RELAIS_SMS_WEBHOOK_SECRET, or one derived from the signing key."""
    if settings.sms_webhook_secret:
        return settings.sms_webhook_secret
    return hmac.new(settings.signing_key.encode(), b"relais-brevo-webhook", hashlib.sha256).hexdigest()[:40]


def twilio_webhook_url(settings: Settings) -> str:
    return f"{webhook_base(settings)}/webhooks/sms/twilio"


def brevo_webhook_url(settings: Settings) -> str:
    return f"{webhook_base(settings)}/webhooks/sms/brevo/{brevo_webhook_secret(settings)}"


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by each POST parameter, sorted by
    name, as name then value."""
    payload = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds or as an HTTP date; Brevo's x-sib-ratelimit-reset (seconds) otherwise."""
    value = response.headers.get("retry-after") or response.headers.get("x-sib-ratelimit-reset")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _http_error(provider: str, response: httpx.Response, opted_out: bool = False) -> SendError:
    try:
        body = response.json()
        detail = f"{body.get('code', '')} {body.get('message', '')}".strip()
    except ValueError:
        detail = response.text[:200]
    message = f"{provider} HTTP {response.status_code}: {detail}"
    if response.status_code == 429 or response.status_code >= 500:
        return SendError(message, retry_after_s=_retry_after(response))
    return SendError(message, permanent=True, opted_out=opted_out)


class _HttpProvider:
    name = "http"

    def __init__(self) -> None:
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0))  # kept alive between messages

    async def _post(self, url: str, **kwargs) -> httpx.Response:
        try:
            return await self.client.post(url, **kwargs)
        except httpx.TimeoutException as exc:
            raise SendError(f"{self.name}: timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise SendError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


class OutboxSms:
    """The default: the SMS is kept and shown on the outbox page, never sent."""

    name = "outbox"

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        return Sent("outbox", f"outbox-{delivery_id}")

    async def close(self) -> None:
        pass


TWILIO_OPTED_OUT = 21610  # "Attempt to send to unsubscribed recipient": the number replied STOP to Twilio


class TwilioSms(_HttpProvider):
    """POST /2010-04-01/Accounts/{AccountSid}/Messages.json, form-encoded, HTTP basic auth (SID, token)."""

    name = "twilio"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.url = (f"{settings.twilio_base_url.rstrip('/')}/2010-04-01/Accounts/"
                    f"{settings.twilio_account_sid}/Messages.json")

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        s = self.settings
        sender = {"MessagingServiceSid" if s.twilio_from.startswith("MG") else "From": s.twilio_from}
        response = await self._post(self.url, auth=(s.twilio_account_sid, s.twilio_auth_token), data={
            "To": to, "Body": text, "StatusCallback": twilio_webhook_url(s), **sender})
        if response.status_code in (200, 201):
            return Sent("twilio", str(response.json()["sid"]))
        code = _json_field(response, "code")
        raise _http_error("twilio", response, opted_out=code == TWILIO_OPTED_OUT)


class BrevoSms(_HttpProvider):
    """POST /v3/transactionalSMS/send (which replaced /v3/transactionalSMS/sms) with the `api-key` header and a
    JSON body; the message's delivery events go to its webUrl."""

    name = "brevo"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.url = f"{settings.brevo_base_url.rstrip('/')}/v3/transactionalSMS/send"

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        s = self.settings
        body = {"sender": s.brevo_sender, "recipient": to.lstrip("+"), "content": text, "type": "transactional",
                "tag": "relais", "webUrl": brevo_webhook_url(s)}
        if any(ord(c) > 0x7F for c in text) and not s.sms_transliterate:
            body["unicodeEnabled"] = True
        response = await self._post(self.url, json=body, headers={"api-key": s.brevo_api_key,
                                                                   "accept": "application/json"})
        if response.status_code in (200, 201):
            return Sent("brevo", str(response.json()["messageId"]))
        raise _http_error("brevo", response)


def _json_field(response: httpx.Response, name: str):
    try:
        return response.json().get(name)
    except (ValueError, AttributeError):
        return None


def check_sms_settings(settings: Settings) -> None:
    """Stop at start, saying what to set, when the chosen provider lacks its credentials."""
    if settings.sms_provider == "twilio" and not (settings.twilio_account_sid and settings.twilio_auth_token
                                                  and settings.twilio_from):
        raise SystemExit("RELAIS_SMS_PROVIDER=twilio needs RELAIS_TWILIO_ACCOUNT_SID, RELAIS_TWILIO_AUTH_TOKEN "
                         "and RELAIS_TWILIO_FROM (a number in E.164 or a Messaging Service SID)")
    if settings.sms_provider == "brevo" and not settings.brevo_api_key:
        raise SystemExit("RELAIS_SMS_PROVIDER=brevo needs RELAIS_BREVO_API_KEY")


def sms_provider(settings: Settings) -> SmsProvider:
    check_sms_settings(settings)
    if settings.sms_provider == "outbox":
        return OutboxSms()
    return {"twilio": TwilioSms, "brevo": BrevoSms}[settings.sms_provider](settings)


# --- what the providers tell us back ---------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    provider_message_id: str
    delivered: bool  # False: the operator could not deliver it
    error: str | None = None


@dataclass(frozen=True)
class Reply:
    phone: str  # E.164
    text: str


def e164(number: str) -> str:
    number = number.strip().replace(" ", "")
    return number if number.startswith("+") else f"+{number}"


TWILIO_FAILED = {"failed", "undelivered"}


def read_twilio(params: dict[str, str]) -> Receipt | Reply | None:
    """A status callback (MessageSid + MessageStatus) or an incoming message (From + Body)."""
    if "MessageStatus" in params and params.get("MessageSid") and "Body" not in params:
        status = params["MessageStatus"]
        if status == "delivered":
            return Receipt(params["MessageSid"], True)
        if status in TWILIO_FAILED:
            return Receipt(params["MessageSid"], False, f"twilio {status} {params.get('ErrorCode', '')}".strip())
        return None
    if params.get("From") and "Body" in params:
        return Reply(e164(params["From"]), params["Body"])
    return None


BREVO_DELIVERED = {"delivered"}
BREVO_FAILED = {"hardbounce", "hard_bounce", "rejected", "blocked", "error", "invalid", "skip", "failed"}
BREVO_REPLIES = {"reply", "replied", "inbound", "received"}
BREVO_UNSUBSCRIBED = {"unsubscribe", "unsubscribed", "optout", "opt_out"}


def read_brevo(body: dict) -> Receipt | Reply | None:
    """Brevo's SMS webhook: a delivery event for a messageId, or a reply from a number (names vary between
    Brevo's event kinds, so the usual spellings are all read)."""
    event = str(body.get("msg_status") or body.get("event") or body.get("status") or "").replace(" ", "").casefold()
    message_id = body.get("messageId") or body.get("message_id") or body.get("id")
    phone = body.get("from") or body.get("sender") or body.get("to") or body.get("phone")
    if event in BREVO_REPLIES or (event not in BREVO_DELIVERED | BREVO_FAILED and body.get("reply")):
        text = body.get("reply") or body.get("text") or body.get("content") or body.get("message") or ""
        return Reply(e164(str(phone)), str(text)) if phone else None
    if event in BREVO_UNSUBSCRIBED and phone:
        return Reply(e164(str(body.get("to") or phone)), "STOP")
    if message_id is None:
        return None
    if event in BREVO_DELIVERED:
        return Receipt(str(message_id), True)
    if event in BREVO_FAILED:
        return Receipt(str(message_id), False, f"brevo {event} {body.get('description', '')}".strip())
    return None
