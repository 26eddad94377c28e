"""Notifications' subscribers: thin, each hands its event to a handler through `Bus.process` (once per event)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlmodel import Session

from services.notifications import handlers, inbound
from shared.events import (
    ACCESS,
    DELIVERIES,
    NEEDS,
    REFERRALS,
    AccessLinkRequested,
    DeliveryStreamEvent,
    NeedEvent,
    NeedRecorded,
    ReferralReplyRecorded,
    ReferralStreamEvent,
)
from shared.service import Service
from shared.signin import person_answer_link, referral_link


def register(svc: Service, wake_senders: Callable[[Iterable[str]], None]) -> None:
    async def process(handler: Callable[[Session, Any], object], event: Any) -> None:
        """`svc.bus.process`, then wake the senders of the channels on which the handler queued a message due now
        (handlers.DUE_NOW), and only those. Waking every sender after every event cost an empty lease (a write
        transaction) per sender and event: three of the four leases a need caused."""
        channels: set[str] = set()

        def noting(session: Session, event: Any) -> None:
            handler(session, event)
            channels.update(session.info.pop(handlers.DUE_NOW, ()))

        if await svc.bus.process(noting, event):
            wake_senders(channels)

    def link_for(event) -> str:
        """The signed link that opens the referral for its partner, without an account."""
        return referral_link(svc.settings, event.referral_id, event.partner_id, svc.clock())

    def answer_link(referral_id: str, answer: str) -> str:
        """A button of the contact question's email: the person's answer, confirmed on referral's page."""
        return person_answer_link(svc.settings, referral_id, answer, svc.clock())

    transliterate = svc.settings.sms_transliterate
    svc.bus.documents_publisher(
        DELIVERIES,
        DeliveryStreamEvent,
        "What was sent, and what failed after its last attempt; the person's OUI or NON by SMS to the question "
        "whether they were contacted (person.contact_answered, for referral).",
    )

    @svc.bus.subscriber(NEEDS, "The person's contact and choices (channel, language) for the messages meant for them.")
    async def on_need_event(event: NeedEvent) -> None:
        handler: Callable[[Session, Any], object]
        if isinstance(event, NeedRecorded):
            # None: the person was erased
            details = await svc.personal_data.open_need_async(event, svc.bus.redis_client)
            handler = lambda s, e: handlers.on_need_recorded(  # noqa: E731
                s, e, details, svc.directory, svc.clock(), transliterate, answer_link
            )
        elif event.type == "person.erased":
            handler = lambda s, e: handlers.on_person_erased(s, e, svc.clock())  # noqa: E731
        elif event.type == "need.messages_withdrawn":
            handler = lambda s, e: handlers.on_messages_withdrawn(s, e, svc.clock())  # noqa: E731
        elif event.type == "need.receipt_requested":
            handler = lambda s, e: handlers.on_receipt_requested(  # noqa: E731
                s, e, svc.directory, svc.clock(), transliterate
            )
        elif event.type == "need.cancelled":
            handler = lambda s, e: handlers.on_need_cancelled(s, e, svc.clock())  # noqa: E731
        else:
            return  # the desk's actions on a need reach the partner through referral's events
        await process(handler, event)

    def reply_address(event, role: str) -> str | None:
        """The per-referral Reply-To of a message to the partner (inbound.py), when replies can reach us."""
        return inbound.reply_address(svc.settings, event, role)

    def on_referral(session: Session, event) -> object:
        if isinstance(event, ReferralReplyRecorded):  # what referral made of a reply by email
            return inbound.on_reply_recorded(session, event, svc.directory, svc.settings, svc.clock())
        inbound.remember_route(session, event)  # referral.assigned: who its reply address is bound to
        return handlers.on_referral_event(
            session, event, svc.directory, svc.clock(), link_for, transliterate, reply_address, answer_link
        )

    @svc.bus.subscriber(REFERRALS, "Referral events are turned into emails and SMS to the people concerned.")
    async def on_referral_event(event: ReferralStreamEvent) -> None:
        await process(on_referral, event)

    @svc.bus.subscriber(ACCESS, "Sign-in links asked for on any service's pages are emailed.")
    async def on_access_event(event: AccessLinkRequested) -> None:
        await process(
            lambda s, e: handlers.on_access_link_requested(s, e, svc.directory, svc.settings, svc.clock()), event
        )
