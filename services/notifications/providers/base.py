"""What every way out shares: a send returns `Sent` or raises `SendError`, and an SMS provider is one small
interface (`SmsProvider`: send, close) registered with its settings check and its webhooks (`SmsProviderKind`).

`SendError.permanent` is for what a retry cannot fix (SMTP 5xx on the message or its recipient, HTTP 4xx); other
errors are transient (SMTP 4xx, refused or dropped connections, timeouts, HTTP 429 and 5xx), with the server's
`Retry-After` when it gave one.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import httpx
from fastapi import APIRouter, HTTPException, Request

from shared.settings import Settings


@dataclass(frozen=True)
class Sent:
    provider: str  # smtp | outbox | twilio | brevo
    provider_message_id: str | None = None


class SendError(Exception):
    def __init__(
        self, message: str, *, permanent: bool = False, retry_after_s: float | None = None, opted_out: bool = False
    ) -> None:
        super().__init__(message)
        self.permanent, self.retry_after_s, self.opted_out = permanent or opted_out, retry_after_s, opted_out


class SmsProvider(Protocol):
    name: str

    async def send(self, to: str, text: str, delivery_id: str) -> Sent: ...

    async def close(self) -> None: ...


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


# A webhook hands what it read (or None: nothing for us) to the service, which runs the command it is.
Report = Callable[[str, "Receipt | Reply | None"], Awaitable[None]]


@dataclass(frozen=True)
class SmsProviderKind:
    """One SMS provider as the service knows it: the settings it needs, how to make one, its webhooks if any."""

    name: str
    problems: Callable[[Settings], list[str]]  # what is missing or wrong in the settings, one sentence each
    create: Callable[[Settings], SmsProvider]
    # Its webhooks, given the service's dependency that gives the Report (mounted outside /api/v1: no bearer token).
    webhooks: Callable[[Callable[..., Report]], APIRouter] | None = None


MAX_WEBHOOK_BYTES = 64 * 1024


async def webhook_body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise HTTPException(413, "too large")
    return body


def e164(number: str) -> str:
    number = number.strip().replace(" ", "")
    return number if number.startswith("+") else f"+{number}"


def webhook_base(settings: Settings) -> str:
    return (settings.webhook_base_url or settings.link_base("notifications")).rstrip("/")


# --- HTTP providers ----------------------------------------------------------------------------


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


def http_error(provider: str, response: httpx.Response, opted_out: bool = False) -> SendError:
    try:
        body = response.json()
        detail = f"{body.get('code', '')} {body.get('message', '')}".strip()
    except ValueError:
        detail = response.text[:200]
    message = f"{provider} HTTP {response.status_code}: {detail}"
    if response.status_code == 429 or response.status_code >= 500:
        return SendError(message, retry_after_s=_retry_after(response))
    return SendError(message, permanent=True, opted_out=opted_out)


def json_field(response: httpx.Response, name: str):
    try:
        return response.json().get(name)
    except (ValueError, AttributeError):
        return None


class HttpProvider:
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
