"""What intake is asked to do, one frozen class per use case; `handlers.py` gives each its one handler
(`record_need`, `cancel_need`, `withdraw_messages_consent`). The events it consumes (the referral stream's) are the
messages of `shared.events`."""

from __future__ import annotations

from dataclasses import dataclass

from shared.events import PersonContact


@dataclass(frozen=True)
class RecordNeed:
    """A desk records a need the person agreed to hand to a partner (from the API or the desk's form)."""

    library_id: str
    category: str
    summary: str
    postal_code: str | None
    urgency: str
    person: PersonContact
    recorded_by: str
    consent_purposes: tuple[str, ...] = ("handoff",)  # "handoff" always; "messages" when the person agreed to them
    consent_version: str | None = None  # of the directory's consent text the desk showed
    same_person_as: str | None = None  # a need of this library brought by the same person in this visit
    idempotency_key: str | None = None
    request_hash: str | None = None  # of the request as sent: a repeat of the key must carry the same one
    correlation_id: str | None = None


@dataclass(frozen=True)
class WithdrawMessagesConsent:
    """The person no longer wants messages about this need (told to the desk or to ops); the need goes on."""

    need_id: str
    actor: str
    library: str | None = None  # a desk may do it for its own library's needs only


@dataclass(frozen=True)
class CancelNeed:
    """Ops withdraw a need recorded in error."""

    need_id: str
    reason: str
    actor: str


@dataclass(frozen=True)
class ErasePerson:
    """The person asked for their data to be erased (ops, or a desk of a library where they have a need)."""

    person_id: str
    reason: str
    actor: str


@dataclass(frozen=True)
class SendReceipt:
    """The desk sends the person the receipt of their need, by email or SMS (an address the person gave)."""

    need_id: str
    library_id: str  # the desk's: a need of another library is not found
    channel: str  # "email" | "sms"
    actor: str


@dataclass(frozen=True)
class AddNote:
    """The desk adds information for the partner holding the need (it reaches the partner's page and an email)."""

    need_id: str
    text: str
    actor: str
    library: str | None = None  # a desk acts on its own library's needs only; None for ops


@dataclass(frozen=True)
class NudgePartner:
    """The desk asks the partner holding the need for news, at most once in 24 hours."""

    need_id: str
    actor: str
    library: str | None = None


@dataclass(frozen=True)
class CloseNeed:
    """The desk closes the need: the person no longer needs help."""

    need_id: str
    reason: str
    actor: str
    library: str | None = None


@dataclass(frozen=True)
class RerouteNeed:
    """After a decline left the need without a partner, the desk asks for it to be routed again."""

    need_id: str
    actor: str
    library: str | None = None


@dataclass(frozen=True)
class MarkAnswersRead:
    """The desk opened the need: the partner answers it holds are read."""

    need_id: str
    library: str
