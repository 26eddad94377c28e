"""Intake's subscribers: the referral service's events keep the desk's view of each need in step."""

from __future__ import annotations

from services.intake import handlers
from shared.events import NEEDS, REFERRALS, NeedEvent, ReferralStreamEvent
from shared.messaging import LINGER_MS
from shared.service import Service


def register(svc: Service) -> None:
    svc.bus.documents_publisher(
        NEEDS,
        NeedEvent,
        "Needs recorded at a desk, with the person's consent; needs cancelled by ops as recorded in error; "
        "consent to messages withdrawn by the person; the desk's actions on a need (a note for the partner, sealed; "
        "a nudge; a close; a request to route again after a decline).",
    )

    # Nobody waits on this stream to the second (the desk's page shows the status when next loaded): read in batches.
    @svc.bus.subscriber(
        REFERRALS, "Referral events update the desk's view: status, partner, SLA, history.", linger_ms=LINGER_MS
    )
    async def on_referral_event(event: ReferralStreamEvent) -> None:
        await svc.bus.process(handlers.on_referral_event, event)
