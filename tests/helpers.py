"""Test helpers that reach into one service's code, kept out of shared/ (which imports nothing from services/).
Test modules import them as `from tests.helpers import ...` (pytest runs from the repository's root)."""

from __future__ import annotations

import asyncio
import threading

from services.intake.app import bootstrap as intake
from services.notifications.app import bootstrap as notifications
from services.referral.app import bootstrap as referral
from shared.settings import Settings
from shared.testing import TOKENS, TestClock, wait_for

BOOTSTRAP = {"intake": intake, "referral": referral, "notifications": notifications}


class RunningService:
    """A service's FastAPI app served by uvicorn in a thread of this process, over real HTTP."""

    def __init__(self, name: str, settings: Settings, clock=None) -> None:
        import uvicorn

        self.name, self.settings = name, settings
        self.svc = BOOTSTRAP[name](settings, clock=clock or TestClock())
        self.server = uvicorn.Server(
            uvicorn.Config(self.svc.app, host="127.0.0.1", port=settings.port(name), log_level="warning", lifespan="on")
        )
        self.server.install_signal_handlers = lambda: None
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
) -> str:
    """Hand a need to a referral service of this process as its consumer would; returns the new referral's id."""
    from sqlmodel import select

    from services.referral import handlers
    from services.referral.store import Referral
    from shared.events import NeedRecorded, PersonContact, new_id

    event = NeedRecorded(
        need_id=new_id(),
        library_id=library_id,
        category=category,
        summary=summary,
        postal_code=postal_code,
        urgency=urgency,
        recorded_at=recorded_at or svc.clock(),
        person=PersonContact(**(person or {})),
    )
    with svc.db.transaction() as session:
        handlers.on_need_recorded(session, event, svc.directory, svc.clock())
    svc.bus.relay.wake()
    with svc.db.transaction() as session:
        return session.exec(select(Referral.id).where(Referral.need_id == event.need_id)).one()
