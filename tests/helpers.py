"""Test helpers that reach into one service's code, kept out of shared/ (which imports nothing from services/).
Test modules import them as `from tests.helpers import ...` (pytest runs from the repository's root)."""

from __future__ import annotations


def record_need(svc, *, category: str = "caf", postal_code: str | None = "76000", library_id: str = "chatelet",
                summary: str = "Dossier APL bloqué depuis trois mois", urgency: str = "normal", recorded_at=None,
                person: dict | None = None) -> str:
    """Hand a need to a referral service of this process as its consumer would; returns the new referral's id."""
    from sqlmodel import select

    from services.referral import handlers
    from services.referral.store import Referral
    from shared.events import NeedRecorded, PersonContact, new_id

    event = NeedRecorded(need_id=new_id(), library_id=library_id, category=category, summary=summary,
                         postal_code=postal_code, urgency=urgency, recorded_at=recorded_at or svc.clock(),
                         person=PersonContact(**(person or {})))
    with svc.db.transaction() as session:
        handlers.on_need_recorded(session, event, svc.directory, svc.clock())
    svc.bus.relay.wake()
    with svc.db.transaction() as session:
        return session.exec(select(Referral.id).where(Referral.need_id == event.need_id)).one()
