"""What shared/cli.py read here before the providers had a module each (services/notifications/providers/): kept
only until the CLI calls services.notifications.app.check_settings; nothing in the service imports it."""

from __future__ import annotations

from services.notifications.providers import SMS_PROVIDERS
from services.notifications.providers.smtp import SmtpTarget  # noqa: F401 - the CLI checks RELAIS_SMTP_URL with it
from shared.settings import Settings


def check_sms_settings(settings: Settings) -> None:
    """Stop, saying what to set, when the chosen provider lacks its credentials."""
    if problems := SMS_PROVIDERS[settings.sms_provider].problems(settings):
        raise SystemExit("; ".join(problems))
