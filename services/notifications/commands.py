"""What notifications is asked to do, one frozen class per use case: what an SMS provider's webhook told us.
`handlers.py` gives each its one handler (`record_sms_receipt`, `record_sms_reply`). The events it consumes (needs,
referrals, sign-in links) are the messages of `shared.events`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordSmsReceipt:
    """A provider's delivery receipt for one of our SMS."""

    provider: str
    provider_message_id: str
    delivered: bool  # False: the operator could not deliver it
    error: str | None = None


@dataclass(frozen=True)
class RecordSmsReply:
    """A text a number sent back to a provider (STOP, ARRET, START...)."""

    provider: str
    phone: str  # E.164
    text: str
