"""The ways out: email over SMTP (smtp.py) and SMS through one provider chosen by RELAIS_SMS_PROVIDER, each in a
module of its own behind base.SmsProvider, registered in SMS_PROVIDERS below. A new provider is one new module
(its sender, its settings check, its webhooks) and one line here (and its name in shared.settings' choices)."""

from __future__ import annotations

from services.notifications.providers import brevo, outbox, smtp, twilio
from services.notifications.providers.base import SmsProvider, SmsProviderKind
from shared.settings import Settings

SMS_PROVIDERS: dict[str, SmsProviderKind] = {
    kind.name: kind
    for kind in (
        outbox.KIND,
        twilio.KIND,
        brevo.KIND,
    )
}


def settings_problems(settings: Settings) -> list[str]:
    """What keeps these settings from sending: a malformed SMTP URL, the SMS provider's missing credentials."""
    return smtp.problems(settings) + SMS_PROVIDERS[settings.sms_provider].problems(settings)


def sms_provider(settings: Settings) -> SmsProvider:
    kind = SMS_PROVIDERS[settings.sms_provider]
    if problems := kind.problems(settings):
        raise SystemExit("; ".join(problems))
    return kind.create(settings)
