"""The default SMS provider: the SMS is kept and shown on the outbox page, never sent."""

from __future__ import annotations

from services.notifications.providers.base import Sent, SmsProviderKind
from shared.settings import Settings


class OutboxSms:
    name = "outbox"

    async def send(self, to: str, text: str, delivery_id: str) -> Sent:
        return Sent("outbox", f"outbox-{delivery_id}")

    async def close(self) -> None:
        pass


def problems(settings: Settings) -> list[str]:
    return []


KIND = SmsProviderKind("outbox", problems, lambda settings: OutboxSms())
