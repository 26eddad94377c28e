"""Test helpers that reach into one service's code, kept out of shared/ (which imports nothing from services/).
Test modules import them as `from tests.helpers import ...` (pytest runs from the repository's root)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from datetime import datetime

import redis

from services.intake.app import IntakeRuntime
from services.intake.app import bootstrap as intake
from services.notifications.app import NotificationsRuntime
from services.notifications.app import bootstrap as notifications
from services.referral.app import ReferralRuntime
from services.referral.app import bootstrap as referral
from shared.settings import ServiceName, Settings
from shared.testing import TOKENS, TestClock, wait_for

AnyRuntime = IntakeRuntime | ReferralRuntime | NotificationsRuntime
BOOTSTRAP: dict[ServiceName, Callable[..., AnyRuntime]] = {
    "intake": intake,
    "referral": referral,
    "notifications": notifications,
}


def search(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    """re.search that fails the test, saying what it looked for, when the text does not have it."""
    match = re.search(pattern, text, flags)
    assert match, f"{pattern!r} not found in {text[:2000]!r}"
    return match


def _bytes(value: bytes | str | None) -> bytes:
    assert isinstance(value, bytes), f"{value!r}: this client decodes responses"
    return value


def _text(value: bytes | str | None) -> str:
    assert isinstance(value, str), f"{value!r}: this client does not decode responses"
    return value


def _entries(client: redis.Redis, stream: str) -> list[tuple[bytes | str | None, dict[bytes | str, bytes | str]]]:
    entries = client.xrange(stream)
    assert entries is not None
    read: list[tuple[bytes | str | None, dict[bytes | str, bytes | str]]] = []
    for id_, fields in entries:
        assert fields is not None  # nil fields are for entries deleted meanwhile (XCLAIM), never XRANGE's
        read.append((id_, fields))
    return read


def xrange_bytes(client: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """A stream's entries (XRANGE) read by a client that keeps bytes. redis-py types each id, field and value as
    bytes or str for any client, and each entry as possibly empty: this checks what it got."""
    return [
        (_bytes(id_), {_bytes(k): _bytes(v) for k, v in fields.items()}) for id_, fields in _entries(client, stream)
    ]


def xrange_text(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """The fields of a stream's entries (XRANGE) read by a client made with `decode_responses=True`."""
    return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in _entries(client, stream)]


class RunningService:
    """A service's FastAPI app served by uvicorn in a thread of this process, over real HTTP."""

    def __init__(self, name: ServiceName, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        import uvicorn

        self.name, self.settings = name, settings
        self.svc: AnyRuntime = BOOTSTRAP[name](settings, clock=clock or TestClock())
        self.server = uvicorn.Server(
            uvicorn.Config(self.svc.app, host="127.0.0.1", port=settings.port(name), log_level="warning", lifespan="on")
        )
        # uvicorn (>= 0.29) installs signal handlers only from the main thread: this one is left alone
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port(self.name)}"

    def start(self) -> RunningService:
        self.thread.start()
        assert wait_for(lambda: self.server.started, 30), f"{self.name} did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, who: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=30)


def record_need(
    svc,
    *,
    category: str = "caf",
    postal_code: str | None = "76000",
    library_id: str = "chatelet",
    summary: str = "Dossier APL bloqué depuis trois mois",
    urgency: str = "normal",
    recorded_at=None,
    person: dict | None = None,
    reference: str | None = None,
) -> str:
    """Hand a need to a referral service of this process as its consumer would; returns the new referral's id."""
    from sqlmodel import select

    from services.referral import handlers
    from services.referral.store import Referral
    from shared.testing import need_recorded

    event = need_recorded(
        svc.personal_data,
        library_id=library_id,
        category=category,
        summary=summary,
        postal_code=postal_code,
        urgency=urgency,
        recorded_at=recorded_at or svc.clock(),
        person=person,
        reference=reference,
    )
    details = svc.personal_data.open_need(event)
    with svc.db.transaction() as session:
        handlers.on_need_recorded(session, event, details, svc.directory, svc.clock())
    svc.bus.relay.wake()
    with svc.db.transaction() as session:
        return session.exec(select(Referral.id).where(Referral.need_id == event.need_id)).one()
