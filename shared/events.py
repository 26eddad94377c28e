"""The events the services exchange: frozen, versioned pydantic models, and the streams that carry them.

Each service publishes on its own stream (so one stream keeps one producer's order); a consumer
reads the streams it needs and ignores the event types it has no handler for. Events carry ids and
the facts the next service needs, not copies of whole records. The person's contact details travel
only in `need.recorded`, because the partner who takes the need must be able to reach the person.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

# Stream names, before the deployment's namespace prefix (see Settings.key).
NEEDS = "needs"  # published by intake
REFERRALS = "referrals"  # published by referral
DELIVERIES = "deliveries"  # published by notifications
ACCESS = "access"  # sign-in links asked for on any service's web pages, sent by notifications
STREAMS = (NEEDS, REFERRALS, DELIVERIES, ACCESS)
DEAD_LETTER_SUFFIX = ".dlq"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    version: int = 1
    event_id: str = Field(default_factory=new_id)
    need_id: str | None  # every need and referral event requires it (they narrow it to str); a delivery of a
    # sign-in link and the request for one concern no need
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    correlation_id: str | None = None  # carried from the HTTP request that started the need's path


# --- intake -------------------------------------------------------------------------------------


class PersonContact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    display_name: str | None = None
    email: str | None = None
    phone: str | None = None  # E.164
    preferred_channel: Literal["email", "sms", "none"] = "none"
    language: Literal["fr", "en"] = "fr"


class NeedRecorded(Event):
    type: Literal["need.recorded"] = "need.recorded"
    need_id: str
    library_id: str
    category: str
    summary: str
    postal_code: str | None
    urgency: Literal["normal", "urgent"]
    recorded_at: AwareDatetime
    person: PersonContact


class NeedCancelled(Event):
    """Ops withdrew a need recorded in error: its open referral is cancelled and its clock stops."""

    type: Literal["need.cancelled"] = "need.cancelled"
    need_id: str
    library_id: str
    reason: str
    actor: str  # the ops user who cancelled it


class NeedMessagesWithdrawn(Event):
    """The person withdrew their consent to messages about this need: nothing more is sent to them (the need and
    its handoff to the partner go on)."""

    type: Literal["need.messages_withdrawn"] = "need.messages_withdrawn"
    need_id: str
    library_id: str
    actor: str  # the desk or ops user who recorded the withdrawal


NeedEvent = Annotated[NeedRecorded | NeedCancelled | NeedMessagesWithdrawn, Field(discriminator="type")]


# --- referral -----------------------------------------------------------------------------------


class ReferralEvent(Event):
    need_id: str
    sequence: int  # per need, in the order referral decided: consumers apply the newest state only
    referral_id: str
    partner_id: str
    library_id: str  # so the desk's contacts can be told without asking anyone
    category: str
    actor: str | None = None  # user id or "system"


class ReferralAssigned(ReferralEvent):
    type: Literal["referral.assigned"] = "referral.assigned"
    contact_id: str
    respond_by: AwareDatetime
    routed_because: str


class ReferralAccepted(ReferralEvent):
    type: Literal["referral.accepted"] = "referral.accepted"


class ReferralResponded(ReferralEvent):
    type: Literal["referral.responded"] = "referral.responded"
    message: str


class ReferralDeclined(ReferralEvent):
    type: Literal["referral.declined"] = "referral.declined"
    reason: str


class ReferralClosed(ReferralEvent):
    type: Literal["referral.closed"] = "referral.closed"
    outcome: str


class ReferralCancelled(ReferralEvent):
    """Ops withdrew the referral: a need recorded in error, or a reassignment to another partner."""

    type: Literal["referral.cancelled"] = "referral.cancelled"
    reason: str
    reassigned: bool = False  # a referral.assigned for another partner follows


class ReferralClockEvent(ReferralEvent):
    """A timer of the need's clock fired: who was waiting to answer, and by when."""

    contact_id: str
    respond_by: AwareDatetime


class ReferralReminderDue(ReferralClockEvent):
    type: Literal["referral.reminder_due"] = "referral.reminder_due"
    reminder_number: int


class ReferralEscalated(ReferralClockEvent):
    type: Literal["referral.escalated"] = "referral.escalated"


class ReferralBreached(ReferralClockEvent):
    type: Literal["referral.breached"] = "referral.breached"


class NeedUnroutable(Event):
    type: Literal["need.unroutable"] = "need.unroutable"
    need_id: str
    sequence: int
    library_id: str
    category: str
    reason: str


ReferralStreamEvent = Annotated[
    ReferralAssigned
    | ReferralAccepted
    | ReferralResponded
    | ReferralDeclined
    | ReferralClosed
    | ReferralCancelled
    | ReferralReminderDue
    | ReferralEscalated
    | ReferralBreached
    | NeedUnroutable,
    Field(discriminator="type"),
]


# --- notifications ------------------------------------------------------------------------------


class DeliveryEvent(Event):
    need_id: str | None = None  # None for a sign-in link, which concerns no need
    delivery_id: str
    referral_id: str | None
    kind: str
    channel: Literal["email", "sms"]
    recipient_role: str


class DeliverySent(DeliveryEvent):
    type: Literal["delivery.sent"] = "delivery.sent"


class DeliveryFailed(DeliveryEvent):
    type: Literal["delivery.failed"] = "delivery.failed"
    error: str


DeliveryStreamEvent = Annotated[DeliverySent | DeliveryFailed, Field(discriminator="type")]

# --- access -------------------------------------------------------------------------------------


class AccessLinkRequested(Event):
    """A staff member asked for a sign-in link; notifications emails it. Version 2 carries neither the link nor
    the address: `reference` is signed with the deployment's key (shared.signin.sign_in_reference), notifications
    checks it, rebuilds the link from its own settings and writes to the user's address in the directory. A
    reader of the stream learns who asked, not how to sign in; a writer cannot make Relais mail anyone else."""

    type: Literal["access.link_requested"] = "access.link_requested"
    version: Literal[2] = 2
    need_id: str | None = None  # about a person, not a need
    user_id: str
    service: Literal["intake", "referral", "notifications"]
    reference: str = Field(max_length=512)
    expires_at: AwareDatetime


AccessEvent = AccessLinkRequested

AnyEvent = Annotated[
    NeedRecorded
    | NeedCancelled
    | NeedMessagesWithdrawn
    | ReferralStreamEvent
    | DeliveryStreamEvent
    | AccessLinkRequested,
    Field(discriminator="type"),
]
_any_event = TypeAdapter(AnyEvent)

# Which stream carries which event type: the producer's own stream.
STREAM_OF: dict[str, str] = {
    "need.recorded": NEEDS,
    "need.cancelled": NEEDS,
    "need.messages_withdrawn": NEEDS,
    **{
        t: REFERRALS
        for t in (
            "referral.assigned",
            "referral.accepted",
            "referral.responded",
            "referral.declined",
            "referral.closed",
            "referral.cancelled",
            "referral.reminder_due",
            "referral.escalated",
            "referral.breached",
            "need.unroutable",
        )
    },
    "delivery.sent": DELIVERIES,
    "delivery.failed": DELIVERIES,
    "access.link_requested": ACCESS,
}


def parse_event(data: bytes | str | dict) -> Event:
    if isinstance(data, dict):
        return _any_event.validate_python(data)
    return _any_event.validate_json(data)
