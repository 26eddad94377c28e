"""Twilio: POST /2010-04-01/Accounts/{AccountSid}/Messages.json, form-encoded, HTTP basic auth (SID, token); its
status callbacks and the replies to our number come to POST /webhooks/sms/twilio, signed (X-Twilio-Signature)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from urllib.parse import parse_qs

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
    json_field,
    webhook_base,
    webhook_body,
)
from shared.deps import SettingsDep
from shared.edges import body_limit
from shared.settings import Settings

TWILIO_OPTED_OUT = 21610  # "Attempt to send to unsubscribed recipient": the number replied STOP to Twilio
TWILIO_FAILED = {"failed", "undelivered"}


class TwilioSms(HttpProvider):
    name = "twilio"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.url = (
            f"{settings.twilio_base_url.rstrip('/')}/2010-04-01/Accounts/{settings.twilio_account_sid}/Messages.json"
        )

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        s = self.settings
        assert s.twilio_from is not None  # a provider is made only from settings that pass problems()
        sender = {"MessagingServiceSid" if s.twilio_from.startswith("MG") else "From": s.twilio_from}
        response = await self._post(
            self.url,
            auth=(s.twilio_account_sid, s.twilio_auth_token),
            data={"To": to, "Body": text, "StatusCallback": twilio_webhook_url(s), **sender},
        )
        if response.status_code in (200, 201):
            return Sent("twilio", str(response.json()["sid"]))
        code = json_field(response, "code")
        raise http_error("twilio", response, opted_out=code == TWILIO_OPTED_OUT)


def problems(settings: Settings) -> list[str]:
    if settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from:
        return []
    return [
        "RELAIS_SMS_PROVIDER=twilio needs RELAIS_TWILIO_ACCOUNT_SID, RELAIS_TWILIO_AUTH_TOKEN "
        "and RELAIS_TWILIO_FROM (a number in E.164 or a Messaging Service SID)"
    ]


def twilio_webhook_url(settings: Settings) -> str:
    return f"{webhook_base(settings)}/webhooks/sms/twilio"


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by each POST parameter, sorted by
    name, as name then value."""
    payload = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


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


def webhooks(report_of: Callable[..., Report]) -> APIRouter:
    """POST /webhooks/sms/twilio, its X-Twilio-Signature checked with the auth token (404 without one); what it
    reads goes to the Report that the service's dependency `report_of` gives."""
    router = APIRouter()

    @router.post("/webhooks/sms/twilio")
    @body_limit(MAX_WEBHOOK_BYTES)  # refused before it is read or parsed
    async def twilio(request: Request, settings: SettingsDep, report: Report = Depends(report_of)) -> Response:
        if not settings.twilio_auth_token:
            raise HTTPException(404, "Twilio is not configured")
        fields = parse_qs((await webhook_body(request)).decode("utf-8", errors="replace"), keep_blank_values=True)
        params = {name: values[0] for name, values in fields.items()}
        expected = twilio_signature(settings.twilio_auth_token, twilio_webhook_url(settings), params)
        if not hmac.compare_digest(expected.encode(), request.headers.get("X-Twilio-Signature", "").encode()):
            raise HTTPException(403, "bad X-Twilio-Signature")
        await report("twilio", read_twilio(params))
        # An empty TwiML answer: nothing is sent back to the person.
        return Response('<?xml version="1.0" encoding="UTF-8"?><Response></Response>', media_type="text/xml")

    return router


KIND = SmsProviderKind("twilio", problems, TwilioSms, webhooks)
