"""The SMS providers behind one interface, registered in one table, and the settings check the CLI calls
(services.notifications.app.check_settings)."""

from services.notifications.app import check_settings
from services.notifications.providers import SMS_PROVIDERS, outbox
from services.notifications.providers.base import SmsProviderKind
from shared.settings import Settings


def test_each_provider_is_one_registered_module_with_its_own_settings_check():
    assert set(SMS_PROVIDERS) == {"outbox", "twilio", "brevo"}
    assert all(isinstance(kind, SmsProviderKind) and kind.name == name for name, kind in SMS_PROVIDERS.items())
    assert SMS_PROVIDERS["outbox"] is outbox.KIND and outbox.KIND.webhooks is None
    assert SMS_PROVIDERS["twilio"].webhooks is not None and SMS_PROVIDERS["brevo"].webhooks is not None


def test_check_settings_names_what_to_set():
    assert check_settings(Settings(smtp_url="smtp://127.0.0.1:25")) == []
    [twilio] = check_settings(Settings(sms_provider="twilio", twilio_account_sid="AC1"))
    assert twilio.startswith("RELAIS_SMS_PROVIDER=twilio needs RELAIS_TWILIO_ACCOUNT_SID")
    assert check_settings(Settings(sms_provider="brevo")) == ["RELAIS_SMS_PROVIDER=brevo needs RELAIS_BREVO_API_KEY"]
    assert check_settings(Settings(sms_provider="brevo", brevo_api_key="xkeysib")) == []
    [smtp] = check_settings(Settings(smtp_url="http://relais:s3cret@mail.example.org"))
    assert smtp.startswith("RELAIS_SMTP_URL: must look like smtp://") and "s3cret" not in smtp and "***" in smtp
