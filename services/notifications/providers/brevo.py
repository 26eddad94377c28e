"""Brevo: POST /v3/transactionalSMS/send (which replaced /v3/transactionalSMS/sms) with the `api-key` header and a
JSON body; the message's delivery events go to its webUrl, POST /webhooks/sms/brevo/{secret}, and an account webhook
(replies, unsubscriptions) to POST /webhooks/sms/brevo with `Authorization: Bearer {secret}`."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from services.notifications.providers.base import (
    MAX_WEBHOOK_BYTES,
    HttpProvider,
    Receipt,
    Reply,
    Report,
    Sent,
    SmsProviderKind,
    e164,
    http_error,
    webhook_base,
    webhook_body,
)
from shared.deps import SettingsDep
from shared.edges import body_limit
from shared.settings import Settings

BREVO_DELIVERED = {"delivered"}
BREVO_FAILED = {"hardbounce", "hard_bounce", "rejected", "blocked", "error", "invalid", "skip", "failed"}
BREVO_REPLIES = {"reply", "replied", "inbound", "received"}
BREVO_UNSUBSCRIBED = {"unsubscribe", "unsubscribed", "optout", "opt_out"}


class BrevoSms(HttpProvider):
    name = "brevo"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.url = f"{settings.brevo_base_url.rstrip('/')}/v3/transactionalSMS/send"

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        s = self.settings
        body: dict[str, str | bool] = {
            "sender": s.brevo_sender,
            "recipient": to.lstrip("+"),
            "content": text,
            "type": "transactional",
            "tag": "relais",
            "webUrl": brevo_webhook_url(s),
        }
        if any(ord(c) > 0x7F for c in text) and not s.sms_transliterate:
            body["unicodeEnabled"] = True
        response = await self._post(
            self.url, json=body, headers={"api-key": s.brevo_api_key, "accept": "application/json"}
        )
        if response.status_code in (200, 201):
            return Sent("brevo", str(response.json()["messageId"]))
        raise http_error("brevo", response)


def problems(settings: Settings) -> list[str]:
    return [] if settings.brevo_api_key else ["RELAIS_SMS_PROVIDER=brevo needs RELAIS_BREVO_API_KEY"]


def brevo_webhook_secret(settings: Settings) -> str:
    """The token in Brevo's webhook URL: RELAIS_SMS_WEBHOOK_SECRET, or one derived from the signing key."""
    if settings.sms_webhook_secret:
        return settings.sms_webhook_secret
    return hmac.new(settings.signing_key.encode(), b"relais-brevo-webhook", hashlib.sha256).hexdigest()[:40]


def brevo_webhook_url(settings: Settings) -> str:
    return f"{webhook_base(settings)}/webhooks/sms/brevo/{brevo_webhook_secret(settings)}"


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


def webhooks(report_of: Callable[..., Report]) -> APIRouter:
    """POST /webhooks/sms/brevo/{secret} (the secret in the webUrl given with each message) or POST
    /webhooks/sms/brevo with `Authorization: Bearer {secret}` (an account webhook for replies); what they read goes
    to the Report that the service's dependency `report_of` gives."""
    router = APIRouter()

    async def brevo(request: Request, secret: str, settings: Settings, report: Report) -> Response:
        if not hmac.compare_digest(secret.encode(), brevo_webhook_secret(settings).encode()):
            raise HTTPException(403, "bad webhook secret")
        try:
            body = json.loads(await webhook_body(request))
        except ValueError:
            raise HTTPException(400, "expected a JSON body") from None
        for item in body if isinstance(body, list) else [body]:
            if isinstance(item, dict):
                await report("brevo", read_brevo(item))
        return Response(status_code=204)

    @router.post("/webhooks/sms/brevo/{secret}")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def brevo_by_url(
        request: Request, secret: str, settings: SettingsDep, report: Report = Depends(report_of)
    ) -> Response:
        """The URL given as each message's webUrl: the secret is its last segment."""
        return await brevo(request, secret, settings, report)

    @router.post("/webhooks/sms/brevo")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def brevo_by_bearer(request: Request, settings: SettingsDep, report: Report = Depends(report_of)) -> Response:
        """An account webhook (replies, unsubscriptions) created with Brevo's bearer-token authentication."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return await brevo(request, token.strip() if scheme.lower() == "bearer" else "", settings, report)

    return router


KIND = SmsProviderKind("brevo", problems, BrevoSms, webhooks)
