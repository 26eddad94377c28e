"""What referral is asked to do, one frozen class per use case; `handlers.COMMAND_HANDLERS` gives each its one
handler. The events it consumes (`NeedRecorded`, `NeedCancelled`) are the messages of `shared.events`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.referral.domain import DECLINE_WITHOUT_CODE, PrivacyIncidentFacts

# --- a partner's answers (its own referrals only) ---


@dataclass(frozen=True)
class AcceptReferral:
    referral_id: str
    actor: str
    as_partner: str | None  # the acting partner: another partner's referral is not found; None for ops


@dataclass(frozen=True)
class RespondToReferral:
    referral_id: str
    actor: str
    as_partner: str | None
    message: str


@dataclass(frozen=True)
class DeclineReferral:
    referral_id: str
    actor: str
    as_partner: str | None
    reason: str  # the partner's words; required with the code "other"
    reason_code: str = DECLINE_WITHOUT_CODE  # domain.DECLINE_REASON_CODES


@dataclass(frozen=True)
class CloseReferral:
    referral_id: str
    actor: str
    as_partner: str | None
    outcome: str


# --- the person (issue 16) ---


@dataclass(frozen=True)
class RecordPersonContacted:
    """The person answered "were you contacted?": by the signed link of the question's email (web.py), or OUI/NON by
    SMS (notifications' person.contact_answered). Only the first answer to a question that was asked counts."""

    referral_id: str
    answer: str  # yes | no
    channel: str  # email | sms


# --- ops (each leaves an ops_action row) ---


@dataclass(frozen=True)
class EscalateReferral:
    """Escalate now, before the clock does: the backup contact and the coordinators are told (referral.escalated).
    Also what an out-of-office reply to a handoff does when RELAIS_INBOUND_AWAY_ESCALATES is true."""

    referral_id: str
    actor: str
    reason: str


@dataclass(frozen=True)
class CancelReferral:
    referral_id: str
    actor: str
    reason: str


@dataclass(frozen=True)
class ReassignReferral:
    referral_id: str
    partner_id: str
    actor: str
    reason: str | None
    force: bool = False  # a partner outside the need's category: an override that needs a reason


@dataclass(frozen=True)
class AssignNeed:
    """Hand a need no partner holds (unroutable, or declined by every candidate) to the partner ops chose."""

    need_id: str
    partner_id: str
    actor: str
    reason: str
    contact_id: str | None = None  # the partner's primary contact when None


@dataclass(frozen=True)
class PausePartner:
    partner_id: str
    until: datetime
    reason: str
    actor: str


@dataclass(frozen=True)
class ResumePartner:
    partner_id: str
    reason: str
    actor: str


@dataclass(frozen=True)
class ReplayDeadLetters:
    stream: str  # a stream name of shared.events.STREAMS, without the namespace
    ids: tuple[str, ...] | None  # dead-letter entry ids; the whole dead-letter stream when None
    reason: str
    actor: str


@dataclass(frozen=True)
class CancelNeed:
    """A need recorded in error, cancelled through intake (which owns needs); its referral follows by event."""

    need_id: str
    reason: str
    actor: str


@dataclass(frozen=True)
class RevokeSessions:
    user_id: str
    reason: str
    actor: str


# --- the register of confidentiality incidents (ops; each leaves an ops_action row) ---


@dataclass(frozen=True)
class RecordPrivacyIncident:
    facts: PrivacyIncidentFacts
    actor: str


@dataclass(frozen=True)
class UpdatePrivacyIncident:
    """Change some facts of a recorded incident (e.g. the notifications' dates, the measures, close it)."""

    incident_id: str
    changes: Mapping[str, Any]  # field of PrivacyIncidentFacts -> its new value; the others are kept
    actor: str
