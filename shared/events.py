"""The events the services exchange: frozen, versioned pydantic models, and the streams that carry them.

Each service publishes on its own stream (so one stream keeps one producer's order); a consumer
reads the streams it needs and ignores the event types it has no handler for. Events carry ids and
the facts the next service needs, not copies of whole records. The person's contact details travel
only in `need.recorded`, because the partner who takes the need must be able to reach the person, and
there sealed with the person's data key (shared.personal_data): never in clear on the broker.
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
INBOUND = "inbound"  # partners' replies by email, received by notifications, acted on by referral
STREAMS = (NEEDS, REFERRALS, DELIVERIES, ACCESS, INBOUND)
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
    """The person as the desk recorded them (intake's command and views). On the wire only `preferred_channel` and
    `language` travel in clear; the name and addresses are sealed (`NeedPersonalData`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    display_name: str | None = None
    email: str | None = None
    phone: str | None = None  # E.164
    preferred_channel: Literal["email", "sms", "none"] = "none"
    language: Literal["fr", "en"] = "fr"


class NeedPersonalData(BaseModel):
    """What `need.recorded` carries sealed (shared.personal_data): what the person confided and how to reach them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    summary: str
    display_name: str | None = None
    email: str | None = None
    phone: str | None = None  # E.164


class SealedPersonalData(BaseModel):
    """Personal data encrypted with the person's data key (AES-256-GCM, the need's id as associated data); base64.
    Deleting the person's data key (shared.personal_data.forget) makes every copy unreadable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    person_id: str = Field(max_length=64)
    key_id: str = Field(max_length=64)  # the id of the person's data key that sealed it
    nonce: str = Field(max_length=64)
    ciphertext: str


class NeedRecorded(Event):
    """Version 2: the person's identity and the summary travel sealed (`sealed` opens to NeedPersonalData); in
    clear only what identifies nobody: the person's id, their channel and language."""

    type: Literal["need.recorded"] = "need.recorded"
    version: Literal[2] = 2
    need_id: str
    library_id: str
    category: str
    postal_code: str | None
    urgency: Literal["normal", "urgent"]
    recorded_at: AwareDatetime
    # What the person reads out on the phone (CHA-2611-0042): in clear, it identifies no one. None from producers
    # older than it.
    reference: str | None = Field(None, max_length=24)
    person_id: str
    preferred_channel: Literal["email", "sms", "none"] = "none"
    language: Literal["fr", "en"] = "fr"
    sealed: SealedPersonalData


class NeedCancelled(Event):
    """Ops withdrew a need recorded in error: its open referral is cancelled and its clock stops."""

    type: Literal["need.cancelled"] = "need.cancelled"
    need_id: str
    library_id: str
    reason: str
    actor: str  # the ops user who cancelled it


class PersonErased(Event):
    """A person's data was erased at their request: every service removes their identity, the texts about their
    needs and the rendered messages, and stops what was pending for them. Carries ids and the moment only: neither
    the reason given nor anything that identifies the person."""

    type: Literal["person.erased"] = "person.erased"
    need_id: str  # the first of `need_ids` (every event names a need)
    person_id: str
    need_ids: tuple[str, ...] = Field(min_length=1)
    erased_at: AwareDatetime
    actor: str  # the user who asked for the erasure


class NeedMessagesWithdrawn(Event):
    """The person withdrew their consent to messages about this need: nothing more is sent to them (the need and
    its handoff to the partner go on)."""

    type: Literal["need.messages_withdrawn"] = "need.messages_withdrawn"
    need_id: str
    library_id: str
    actor: str  # the desk or ops user who recorded the withdrawal


class ReceiptRequested(Event):
    """The desk sends the person the receipt of their need by a channel the person gave: its reference, what was
    asked (the category, never the summary), who will call and by when, and how to reach the desk. Carries no
    address (notifications holds the person's) and nothing that identifies the person."""

    type: Literal["need.receipt_requested"] = "need.receipt_requested"
    need_id: str
    library_id: str
    reference: str
    category: str
    channel: Literal["email", "sms"]
    status: str  # the need's, as the desk sees it (recorded, referred, accepted, responded, closed, unroutable)
    partner_id: str | None  # who holds the need, if anyone
    respond_by: AwareDatetime
    actor: str  # the desk user who sent it


class DeskText(BaseModel):
    """What a desk's action seals (shared.personal_data): a text written about the person's need (a note for the
    partner, why the need is closed), free text that may name the person, so it travels like the summary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str


class NeedNoteAdded(Event):
    """The desk added information for the partner holding the need. The text travels sealed with the person's data
    key (`sealed` opens to DeskText, the need's id as associated data); referral keeps it on the referral's page."""

    type: Literal["need.note_added"] = "need.note_added"
    need_id: str
    library_id: str
    note_id: str
    actor: str  # the desk user who wrote it
    sealed: SealedPersonalData


class NeedPartnerNudged(Event):
    """The desk asks the partner holding the need for news (at most once in 24 hours: intake's rule)."""

    type: Literal["need.partner_nudged"] = "need.partner_nudged"
    need_id: str
    library_id: str
    partner_id: str  # as the desk saw it; referral nudges whoever holds the need now
    actor: str


class NeedClosedByDesk(Event):
    """The desk closed the need: the person no longer needs help. Referral ends the open referral and stops the
    clock. The reason is sealed like a note (`sealed` opens to DeskText); None when the person's data was erased."""

    type: Literal["need.closed_by_desk"] = "need.closed_by_desk"
    need_id: str
    library_id: str
    actor: str
    sealed: SealedPersonalData | None = None


class NeedRerouteRequested(Event):
    """After a decline left the need without a partner, the desk asks referral to route it again (partners that
    declined it stay excluded)."""

    type: Literal["need.reroute_requested"] = "need.reroute_requested"
    need_id: str
    library_id: str
    actor: str


NeedEvent = Annotated[
    NeedRecorded
    | NeedCancelled
    | PersonErased
    | NeedMessagesWithdrawn
    | ReceiptRequested
    | NeedNoteAdded
    | NeedPartnerNudged
    | NeedClosedByDesk
    | NeedRerouteRequested,
    Field(discriminator="type"),
]


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


# Why a partner declines, as a code the desk's page words in French and the figures count by.
DeclineReasonCode = Literal["out_of_scope", "out_of_territory", "capacity", "already_followed", "other"]


class ReferralDeclined(ReferralEvent):
    type: Literal["referral.declined"] = "referral.declined"
    reason: str  # the partner's own words (may be empty with a code other than "other"); never the person's name
    reason_code: DeclineReasonCode | None = None  # None: an event from before the codes (its reason is free text)


class ReferralClosed(ReferralEvent):
    type: Literal["referral.closed"] = "referral.closed"
    outcome: str  # empty when the desk closed it (its reason travelled sealed in need.closed_by_desk)
    by_desk: bool = False  # the desk closed the need (the person no longer needs help), not the partner
    # The person is still to be asked whether they were contacted (referral.contact_question_due will follow):
    # notifications keeps their contact until then.
    contact_question_pending: bool = False


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


class ReferralPersonErased(ReferralEvent):
    """The person of a need this partner holds had their data erased: the partner is told (the referral stays)."""

    type: Literal["referral.person_erased"] = "referral.person_erased"
    contact_id: str
    erased_at: AwareDatetime


class ReferralNoteAdded(ReferralEvent):
    """The desk's note reached the partner's referral page; the contact is emailed a link to it (no text here)."""

    type: Literal["referral.note_added"] = "referral.note_added"
    contact_id: str


class ReferralNudged(ReferralEvent):
    """The desk asked the partner for news: the contact is emailed."""

    type: Literal["referral.nudged"] = "referral.nudged"
    contact_id: str
    respond_by: AwareDatetime


# What referral did with a partner's reply by email (partner.reply_received).
ReplyOutcome = Literal["accepted", "responded", "declined", "noted", "left_partner", "away"]


class ReferralReplyRecorded(ReferralEvent):
    """A partner's reply by email was taken: `outcome` says how. An acceptance, answer or decline also has its own
    event; notifications answers the sender when the referral had left the partner (`left_partner`) and tells the
    coordinators of an out-of-office (`away`)."""

    type: Literal["referral.reply_recorded"] = "referral.reply_recorded"
    reply_id: str
    contact_id: str
    outcome: ReplyOutcome


class ReferralContactQuestionDue(ReferralEvent):
    """Some days after the partner's first answer (the partner's `contact_question_after`), the person is asked once
    whether the partner contacted them: notifications sends the question on their channel (issue 16)."""

    type: Literal["referral.contact_question_due"] = "referral.contact_question_due"
    referral_closed: bool = False  # the partner closed it already: notifications forgets the contact once asked


PersonContactedAnswer = Literal["yes", "no"]


class ReferralPersonContacted(ReferralEvent):
    """The person answered the question: `person_contacted` is now on the referral. A "no" alerts the desk and the
    coordinator (notifications)."""

    type: Literal["referral.person_contacted"] = "referral.person_contacted"
    person_contacted: PersonContactedAnswer
    channel: Literal["email", "sms"]  # how the person answered
    reference: str | None = None  # the need's (CHA-2611-0042), for the alert


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
    | ReferralPersonErased
    | ReferralNoteAdded
    | ReferralNudged
    | ReferralReplyRecorded
    | ReferralContactQuestionDue
    | ReferralPersonContacted
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


class PersonContactAnswered(Event):
    """The person answered OUI or NON by SMS to the question about a referral (the last one sent to that number):
    referral records it (`person_contacted`). No phone number: the referral is what the answer is about."""

    type: Literal["person.contact_answered"] = "person.contact_answered"
    need_id: str
    referral_id: str
    answer: PersonContactedAnswer
    channel: Literal["sms"] = "sms"


DeliveryStreamEvent = Annotated[DeliverySent | DeliveryFailed | PersonContactAnswered, Field(discriminator="type")]

# --- inbound -------------------------------------------------------------------------------------

ReplyIntent = Literal["accept", "decline", "respond", "out_of_office"]


class PartnerReplyReceived(Event):
    """A partner's contact replied to a handoff email (notifications checked the reply address's token, the sender
    and, through a provider, SPF/DKIM). `intent` is what its first line says; the new text of the reply (quoted
    history and signature stripped) travels sealed with the person's data key like a desk's note (`sealed` opens to
    DeskText); None for an out-of-office, or when the person was erased. Referral applies it by its API's rules."""

    type: Literal["partner.reply_received"] = "partner.reply_received"
    need_id: str
    referral_id: str
    partner_id: str
    reply_id: str  # notifications' record of the message: what an automatic answer goes back to
    contact_id: str  # the partner's contact who wrote (the handoff's, or another of the same partner)
    intent: ReplyIntent
    reason_code: DeclineReasonCode | None = None  # a decline's, from its first line
    sealed: SealedPersonalData | None = None


InboundEvent = PartnerReplyReceived

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
    | PersonErased
    | NeedMessagesWithdrawn
    | ReceiptRequested
    | NeedNoteAdded
    | NeedPartnerNudged
    | NeedClosedByDesk
    | NeedRerouteRequested
    | ReferralStreamEvent
    | DeliveryStreamEvent
    | PartnerReplyReceived
    | AccessLinkRequested,
    Field(discriminator="type"),
]
_any_event = TypeAdapter(AnyEvent)

# Which stream carries which event type: the producer's own stream.
STREAM_OF: dict[str, str] = {
    "need.recorded": NEEDS,
    "need.cancelled": NEEDS,
    "person.erased": NEEDS,
    "need.messages_withdrawn": NEEDS,
    "need.receipt_requested": NEEDS,
    "need.note_added": NEEDS,
    "need.partner_nudged": NEEDS,
    "need.closed_by_desk": NEEDS,
    "need.reroute_requested": NEEDS,
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
            "referral.person_erased",
            "referral.note_added",
            "referral.nudged",
            "referral.reply_recorded",
            "referral.contact_question_due",
            "referral.person_contacted",
            "need.unroutable",
        )
    },
    "delivery.sent": DELIVERIES,
    "delivery.failed": DELIVERIES,
    "person.contact_answered": DELIVERIES,
    "access.link_requested": ACCESS,
    "partner.reply_received": INBOUND,
}


def parse_event(data: bytes | str | dict) -> Event:
    if isinstance(data, dict):
        return _any_event.validate_python(data)
    return _any_event.validate_json(data)
