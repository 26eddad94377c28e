"""The referral service's rules, pure and free of I/O.

Sections:
- Routing: which partner (and which of its contacts) gets a need, and why, in words a
  coordinator can read in the referral's ``routed_because``.
- State machine: which action is allowed from which status.
- The clock: the timers of a need's 72-hour promise, and when they fire.
- The register of confidentiality incidents: what a recorded incident must hold to be kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Set
from dataclasses import dataclass, fields
from dataclasses import replace as dataclass_replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple, get_args
from zoneinfo import ZoneInfo

from shared import deadlines  # the partner's clock, shared with intake's deadline at recording

# normalize_postal_code is shared with intake and the directory; re-exported here for routing.
from shared.directory import (
    BusinessHours,
    Contact,
    Directory,
    Partner,  # noqa: F401
    normalize_postal_code,
)
from shared.events import DeclineReasonCode
from shared.search import search_text

# ==============================================================================================
# Routing
# ==============================================================================================
# The rule (design contract, "Routing"): a partner is a candidate when it takes the need's
# category, one of its territory prefixes starts the need's postal code (the library's first
# prefix when the need has none), and it is under capacity. The longest matching prefix wins;
# ties go to the fewest open referrals, then the partner id. The primary contact gets the
# handoff. A partner that declined the need, or that ops paused, is not offered it.

# The reason is stored on the referral and shown as is to French-speaking coordinators, so it
# is written in French; every wording lives here.
ROUTING_TEXTS = {
    "where_code": "code postal {code}",
    "where_library": "territoire « {prefix} » de {library} (pas de code postal)",
    "chosen": "Thématique « {category} », {where} : {choice}",
    "prefix": "préfixe « {prefix} » de {partner}",
    "everywhere": "{partner} (couvre tout le territoire)",
    "longest": " (le plus long)",
    "fewest_open": " ; à préfixe égal, le moins d'orientations en cours ({open})",
    "by_id": " ; à égalité parfaite, choisi selon un ordre fixe",
    "excluded": " ; écartés : {names}",
    "none": "Aucun partenaire ne prend la thématique « {category} » pour le {where}",
    "no_partner_for_category": " : aucun partenaire de l'annuaire ne traite cette thématique",
    "unknown_category": " : thématique inconnue de l'annuaire",
    "out_of_territory": " : aucun des partenaires qui la traitent ne couvre ce territoire ({names})",
    "and_others": "{names} et {count} autres",
    "all_excluded": " ; écartés : {names}",
    "shorter": "{partner} (préfixe plus court)",
    "more_open": "{partner} (plus d'orientations en cours : {open})",
    "lost_on_id": "{partner} (à égalité parfaite, venait après dans cet ordre)",
    "full": "{partner} (capacité atteinte {open}/{capacity})",
    "declined": "{partner} (a déjà décliné)",
    "paused": "{partner} (en pause)",
    "by_hand": "Confiée à {partner} par la coordination (réaffectation)",
    "by_hand_stranded": (
        "Confiée à {partner} par la coordination : aucun partenaire ne pouvait la prendre selon l'annuaire"
    ),
}

# Why no partner could take a need (`RoutingDecision.cause`), a code the dashboard words with names from the
# directory: the category is unknown, nobody takes it, nobody takes it there, every partner that could declined it,
# or every one is unavailable now (paused, full; some may have declined).
STRANDED_CAUSES = ("unknown_category", "no_taker", "out_of_territory", "declined", "unavailable")


# A reason is read in a list of referrals; past a few names the rest is noise.
_NAMED_OUT_OF_TERRITORY = 3


@dataclass(frozen=True)
class RoutingDecision:
    """The partner and contact that get the need (both None when nobody can), and why."""

    partner: Partner | None
    contact: Contact | None
    reason: str
    cause: str | None = None  # one of STRANDED_CAUSES when nobody can take the need


def route_need(
    directory: Directory,
    *,
    category: str,
    postal_code: str | None,
    library_id: str,
    open_referrals: Callable[[str], int],
    excluded_partner_ids: Set[str] = frozenset(),
    paused_partner_ids: Set[str] = frozenset(),
) -> RoutingDecision:
    """Choose the partner for a need by the contract's routing rule; see the section comment."""
    t = ROUTING_TEXTS
    library = directory.library(library_id)
    if library is None:
        raise LookupError(f"unknown library {library_id!r}")
    code = normalize_postal_code(postal_code or "")
    if code:
        where = t["where_code"].format(code=_display_postal_code(code))
    else:
        code = library.territory[0] if library.territory else ""  # no territory: partners covering everywhere
        where = t["where_library"].format(prefix=code, library=library.name)
    known_category = directory.category(category)
    label = known_category.label if known_category else category

    counted: dict[str, int] = {}

    def load(partner_id: str) -> int:  # asked only of a partner with a capacity, or to break a tie
        if partner_id not in counted:
            counted[partner_id] = open_referrals(partner_id)
        return counted[partner_id]

    takers = [p for p in directory.partners if category in p.categories]
    covering: list[tuple[Partner, str]] = []  # (partner, its longest prefix of the code)
    for partner in takers:
        prefixes = [normalize_postal_code(p) for p in partner.territory]
        matching = [p for p in prefixes if code.startswith(p)]
        if matching:
            covering.append((partner, max(matching, key=len)))

    candidates: list[tuple[Partner, str]] = []
    excluded: list[str] = []
    declined = 0
    for partner, prefix in covering:
        if partner.id in excluded_partner_ids:
            excluded.append(t["declined"].format(partner=partner.name))
            declined += 1
        elif partner.id in paused_partner_ids:
            excluded.append(t["paused"].format(partner=partner.name))
        elif partner.capacity is not None and (open_now := load(partner.id)) >= partner.capacity:
            excluded.append(t["full"].format(partner=partner.name, open=open_now, capacity=partner.capacity))
        else:
            candidates.append((partner, prefix))

    if not candidates:
        reason = t["none"].format(category=label, where=where)
        if known_category is None:
            reason, cause = reason + t["unknown_category"], "unknown_category"
        elif not takers:
            reason, cause = reason + t["no_partner_for_category"], "no_taker"
        elif not covering:
            cause = "out_of_territory"
            names = ", ".join(p.name for p in takers[:_NAMED_OUT_OF_TERRITORY])
            if len(takers) > _NAMED_OUT_OF_TERRITORY:
                names = t["and_others"].format(names=names, count=len(takers) - _NAMED_OUT_OF_TERRITORY)
            reason += t["out_of_territory"].format(names=names)
        else:
            reason += t["all_excluded"].format(names=", ".join(excluded))
            cause = "declined" if declined == len(covering) else "unavailable"
        return RoutingDecision(partner=None, contact=None, reason=reason + ".", cause=cause)

    longest = max(len(prefix) for _, prefix in candidates)
    tied = sum(len(prefix) == longest for _, prefix in candidates) > 1

    def rank(candidate: tuple[Partner, str]) -> tuple[int, int, str]:
        partner, prefix = candidate
        return (-len(prefix), load(partner.id) if tied and len(prefix) == longest else 0, partner.id)

    candidates.sort(key=rank)
    winner, prefix = candidates[0]
    losers: list[str] = []
    tie_note = ""
    for partner, other_prefix in candidates[1:]:
        if len(other_prefix) < len(prefix):
            losers.append(t["shorter"].format(partner=partner.name))
        elif (other_open := load(partner.id)) > (winner_open := load(winner.id)):
            losers.append(t["more_open"].format(partner=partner.name, open=other_open))
            tie_note = tie_note or t["fewest_open"].format(open=winner_open)
        else:
            losers.append(t["lost_on_id"].format(partner=partner.name))
            tie_note = t["by_id"]

    if prefix:
        choice = t["prefix"].format(prefix=prefix, partner=winner.name)
    else:
        choice = t["everywhere"].format(partner=winner.name)
    if any(len(p) < len(prefix) for _, p in candidates[1:]):
        choice += t["longest"]
    choice += tie_note
    if losers or excluded:
        choice += t["excluded"].format(names=", ".join(losers + excluded))
    reason = t["chosen"].format(category=label, where=where, choice=choice) + "."
    return RoutingDecision(partner=winner, contact=directory.primary_contact(winner), reason=reason)


def deadline_of(decision: RoutingDecision, recorded_at: datetime, directory: Directory) -> datetime:
    """The `respond_by` a need recorded at `recorded_at` gets from this decision: the breach of the chosen partner's
    clock (clock_timers), or the directory's default window when nobody takes it (as intake answers then)."""
    if decision.partner is None:
        return recorded_at + directory.sla.respond_within
    return clock_timers(recorded_at, decision.partner)[-1].due_at


def _display_postal_code(code: str) -> str:
    """Canadian codes are read with their space (H2X 1Y4); French ones as they are."""
    if len(code) == 6 and code[0].isalpha():
        return f"{code[:3]} {code[3:]}"
    return code


# --- State machine --------------------------------------------------------------------------------
# assigned -> accepted -> responded -> closed; assigned|accepted -> declined (re-routed); cancelled by ops.

TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "accept": (frozenset({"assigned"}), "accepted"),
    "respond": (frozenset({"assigned", "accepted"}), "responded"),
    "decline": (frozenset({"assigned", "accepted"}), "declined"),
    "close": (frozenset({"accepted", "responded"}), "closed"),
    "cancel": (frozenset({"assigned", "accepted", "responded"}), "cancelled"),
    "reassign": (frozenset({"assigned", "accepted", "responded"}), "cancelled"),  # then a new referral
    "desk_close": (frozenset({"assigned", "accepted", "responded"}), "closed"),  # the person no longer needs help
}
CLOCK_STOPPERS = frozenset({"accept", "respond"})  # the partner's first answer meets the SLA


class TransitionRefused(Exception):
    pass


# A partner declines with a reason code and, for "other", its own words; a decline with words only (the API before
# the codes) is an "other".
DECLINE_REASON_CODES: tuple[str, ...] = get_args(DeclineReasonCode)
DECLINE_WITHOUT_CODE = "other"
# A character that is not blank, for Python's `re` and for the OpenAPI document's (ECMA) patterns alike: the union of
# both languages' whitespace is spelled out, so the API and its document agree on what "words" are.
A_WORD = r"[^\t\n\x0b\x0c\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def has_words(text: str) -> bool:
    return re.search(A_WORD, text) is not None


def decline_problem(code: str, text: str) -> Problem | None:
    """What is wrong with a decline's reason, if anything (the API and the pages run the same rule)."""
    if code not in DECLINE_REASON_CODES:
        return Problem("reason_code", "choose", f"reason_code must be one of: {', '.join(DECLINE_REASON_CODES)}")
    if code == "other" and not has_words(text):
        return Problem(
            "reason", "required", "reason is required when reason_code is 'other' or absent: say why you decline"
        )
    return None


def next_status(status: str, action: str) -> str:
    allowed_from, to = TRANSITIONS[action]
    if status not in allowed_from:
        raise TransitionRefused(
            f"cannot {action} a referral that is {status} (allowed from: {', '.join(sorted(allowed_from))})"
        )
    return to


def sla_after(sla: str, action: str) -> str:
    if action in CLOCK_STOPPERS and sla not in ("met", "breached"):
        return "met"
    return sla


# --- The clock ------------------------------------------------------------------------------------
# The clock belongs to the need: it starts at recording, its timers are set at the first routing
# and survive re-routing; the partner's first accept or respond stops it.


class ClockTimer(NamedTuple):  # a tuple: written as one row each by store.add_clock_timers
    kind: str  # "reminder" | "escalation" | "breach"
    number: int  # 1, 2... for reminders; 0 otherwise
    due_at: datetime


def clock_timers(recorded_at: datetime, partner: Partner) -> list[ClockTimer]:
    """The need's timers under the partner's policy and clock; the last one, the breach, is `respond_by`."""
    sla = partner.sla
    timers = [
        ClockTimer("reminder", n, elapse(recorded_at, after, partner))
        for n, after in enumerate(sla.remind_after, start=1)
    ]
    if sla.escalate_after is not None:
        timers.append(ClockTimer("escalation", 0, elapse(recorded_at, sla.escalate_after, partner)))
    timers.append(ClockTimer("breach", 0, elapse(recorded_at, sla.respond_within, partner)))
    return timers


def clock_timers_until(
    recorded_at: datetime, partner: Partner, respond_by: datetime, now: datetime
) -> list[ClockTimer]:
    """The timers of a need whose deadline was fixed before it had a partner (stranded at recording, then handed
    to `partner` by ops): the partner's reminders and escalation that fall between now and the kept deadline, and
    the breach at that deadline if it is still ahead (a moment already past is not told late)."""
    timers = [t for t in clock_timers(recorded_at, partner)[:-1] if now < t.due_at < respond_by]
    if respond_by > now:
        timers.append(ClockTimer("breach", 0, respond_by))
    return timers


def elapse(start: datetime, duration: timedelta, partner: Partner) -> datetime:
    """`start` + `duration` on the partner's clock: continuous, or counting opening hours only."""
    return deadlines.elapse(start, duration, partner)


def add_business_time(start: datetime, duration: timedelta, hours: BusinessHours) -> datetime:
    """The moment `duration` of opening time has passed after `start` (a long weekend does not count)."""
    return deadlines.add_business_time(start, duration, hours)


def timer_fires(referral_status: str | None, referral_sla: str | None) -> bool:
    """A timer fires only while the need waits for a first answer from its current partner."""
    return referral_status == "assigned" and referral_sla not in ("met", "breached")


SLA_AFTER_TIMER = {"reminder": "at_risk", "escalation": "at_risk", "breach": "breached"}


# --- The person says whether they were contacted (issue 16) ---------------------------------------------------

CONTACT_QUESTION = "contact_question"  # the clock_timer kind: not part of the 72-hour promise, never moves the SLA
PERSON_CONTACTED_ANSWERS = ("yes", "no")
NO_ANSWER_AFTER = timedelta(days=7)  # a question still unanswered this long after it went counts as "no answer"


def contact_question_due(answered_at: datetime, partner: Partner) -> datetime:
    """When the person is asked: the partner's `contact_question_after` (3 days by default) after its first answer,
    in calendar time (the person's days, not the partner's opening hours)."""
    return answered_at + partner.contact_question_after


def contact_question_goes(status: str, closed_by_desk: bool, asked_at: datetime | None, erased: bool) -> bool:
    """Asked once per referral, while the partner holds the need or after it closed it; not after a decline, a
    cancellation, a close by the desk (the person no longer needs help) or the person's erasure."""
    if asked_at is not None or erased or closed_by_desk:
        return False
    return status in ("accepted", "responded", "closed")


def person_answer_counts(asked_at: datetime | None, answered: str | None) -> bool:
    """The first answer to a question that was asked is the one kept; later ones change nothing."""
    return asked_at is not None and answered is None


def contacted_rate(yes: int, no: int, no_answer: int) -> float | None:
    """ "Contact confirmé par la personne": yes / (yes + no + questions unanswered after NO_ANSWER_AFTER)."""
    asked = yes + no + no_answer
    return yes / asked if asked else None


def takes_category(partner: Partner, category: str) -> bool:
    """Whether ops may hand the partner a need of this category without an explicit override."""
    return category in partner.categories


def assign_by_hand(
    directory: Directory, partner_id: str, actor: str, contact_id: str | None = None, stranded: bool = False
) -> RoutingDecision:
    """Ops chose the partner (and maybe its contact; else the primary one gets the handoff), whatever the routing
    rule says. `stranded`: the need had no partner (handlers.assign_need), not another one (a reassignment)."""
    partner = directory.partner(partner_id)
    if partner is None:  # the caller checked it (reassign_referral, assign_need)
        raise LookupError(f"unknown partner {partner_id!r}")
    contact = next((c for c in partner.contacts if c.id == contact_id), None) if contact_id else None
    if contact_id and contact is None:  # the caller checked it (assign_need)
        raise LookupError(f"contact {contact_id!r} is not one of {partner_id!r}")
    if stranded:
        reason = ROUTING_TEXTS["by_hand_stranded"].format(partner=partner.name)
    else:
        reason = ROUTING_TEXTS["by_hand"].format(partner=partner.name)  # who: in the history
    return RoutingDecision(
        partner=partner,
        contact=contact or directory.primary_contact(partner),
        reason=reason + ("." if stranded else ""),
    )


# --- A partner's access ends with its part --------------------------------------------------------
# Once a need left a partner (it declined, ops reassigned it, or the need was cancelled), the partner's
# pages and API say so and since when, and show nothing more of the person or of what they asked.

LEFT_PARTNER = frozenset({"declined", "cancelled"})  # final statuses: nothing moves the referral after them
HOW_IT_LEFT = ("decline", "reassign", "cancel")  # history actions that end a partner's part


def case_search_text(
    reference: str | None, display_name: str | None, email: str | None, phone: str | None, summary: str | None
) -> str:
    """What `q=` finds a referral by: its need's reference, the person's name, email and phone, the summary's words."""
    return search_text(words=(reference, display_name, email, summary), phones=(phone,))


def left_partner(status: str) -> bool:
    return status in LEFT_PARTNER


def how_it_left(actions: list[str]) -> str | None:
    """The action that ended the partner's part (the last of HOW_IT_LEFT in its history), if any."""
    return next((a for a in reversed(actions) if a in HOW_IT_LEFT), None)


# ==============================================================================================
# The register of confidentiality incidents (privacy incidents)
# ==============================================================================================
# One row per incident holds what Québec's regulation on confidentiality incidents asks the register to keep
# (description of the information, circumstances, date or period, date known, number of people, risk assessment,
# notifications with their dates, measures) and what the CNIL's register of breaches asks (nature, categories and
# number of people, probable consequences, measures).

INCIDENT_NATURES = ("confidentiality", "integrity", "availability")
INCIDENT_STATUSES = ("open", "closed")
LONG_TEXT = 4000  # descriptions, circumstances, consequences, risk assessment, measures
SHORT_TEXT = 500  # the categories of people
NAME_TEXT = 200  # the authority's name
NOTE_TEXT = 2000  # the notice to people, the note on notifications
MOST_PEOPLE = 1_000_000_000  # counts fit a 32-bit column
CLOCK_SKEW = timedelta(minutes=5)  # a notification time "now" from a client whose clock runs a little ahead


@dataclass(frozen=True)
class PrivacyIncidentFacts:
    """What ops record about a confidentiality incident (everything but who recorded it and when)."""

    nature: str  # one of INCIDENT_NATURES: which of confidentiality, integrity, availability was breached
    information_description: str  # which personal information
    circumstances: str
    occurred_from: date  # the date, or the start of the period
    occurred_until: date | None  # the end of the period, when it is one
    known_at: date  # when the organisation learnt of it
    people_count: int
    people_count_is_estimate: bool
    people_categories: str  # e.g. people helped, partners' contacts
    records_count: int | None
    consequences: str  # the probable consequences for the people
    risk_assessment: str
    serious_risk: bool  # a risk of serious harm: the authority and the people must be told
    authority: str | None  # which authority was told (CNIL, Commission d'accès à l'information)
    authority_notified_at: datetime | None
    people_notified_at: datetime | None
    people_notice_description: str | None  # how the people were told (e.g. a public notice, and why)
    notification_note: str | None  # why the authority was not (yet) told, or told late
    measures: str  # measures taken or planned
    status: str = "open"  # one of INCIDENT_STATUSES


INCIDENT_FIELDS = frozenset(f.name for f in fields(PrivacyIncidentFacts))
REQUIRED_TEXTS = {
    "information_description": LONG_TEXT,
    "circumstances": LONG_TEXT,
    "people_categories": SHORT_TEXT,
    "consequences": LONG_TEXT,
    "risk_assessment": LONG_TEXT,
    "measures": LONG_TEXT,
}
OPTIONAL_TEXTS = {
    "authority": NAME_TEXT,
    "people_notice_description": NOTE_TEXT,
    "notification_note": NOTE_TEXT,
}


class Problem(NamedTuple):
    """A rule an incident breaks: the field to fix, a code (the pages word it in French) and an English message."""

    field: str
    code: str
    message: str


def tidy_incident(facts: PrivacyIncidentFacts) -> PrivacyIncidentFacts:
    """Texts without their surrounding blanks; an optional text left blank is no text; times in UTC (as stored)."""
    changes: dict[str, Any] = {name: getattr(facts, name).strip() for name in REQUIRED_TEXTS}
    for name in ("authority_notified_at", "people_notified_at"):
        at = getattr(facts, name)
        changes[name] = at.astimezone(UTC) if at is not None and at.tzinfo is not None else at
    for name in OPTIONAL_TEXTS:
        value = getattr(facts, name)
        changes[name] = value.strip() or None if value is not None else None
    return dataclass_replace(facts, **changes)


def incident_problems(facts: PrivacyIncidentFacts, now: datetime, timezone: str) -> list[Problem]:
    """Every rule the (tidied) incident breaks, in the order of the form. Dates are days in the directory's time
    zone; none may be after today, nor a notification time after now."""
    zone = ZoneInfo(timezone)
    today = now.astimezone(zone).date()
    problems: list[Problem] = []
    if facts.nature not in INCIDENT_NATURES:
        problems.append(Problem("nature", "choose", f"must be one of {', '.join(INCIDENT_NATURES)}"))
    for name, most in REQUIRED_TEXTS.items():
        value = getattr(facts, name)
        if not value.strip():
            problems.append(Problem(name, "required", "must not be blank"))
        elif len(value) > most:
            problems.append(Problem(name, "too_long", f"must be at most {most} characters"))
    for name, most in OPTIONAL_TEXTS.items():
        value = getattr(facts, name)
        if value is not None and len(value) > most:
            problems.append(Problem(name, "too_long", f"must be at most {most} characters"))
    if facts.occurred_from > today:
        problems.append(Problem("occurred_from", "future", "must not be after today"))
    if facts.occurred_until is not None:
        if facts.occurred_until > today:
            problems.append(Problem("occurred_until", "future", "must not be after today"))
        elif facts.occurred_until < facts.occurred_from:
            problems.append(Problem("occurred_until", "before_start", "must not be before occurred_from"))
    if facts.known_at > today:
        problems.append(Problem("known_at", "future", "must not be after today"))
    elif facts.known_at < facts.occurred_from:
        problems.append(Problem("known_at", "before_start", "must not be before occurred_from"))
    for name, count in (("people_count", facts.people_count), ("records_count", facts.records_count)):
        if count is not None and not 0 <= count <= MOST_PEOPLE:
            problems.append(Problem(name, "count", f"must be between 0 and {MOST_PEOPLE}"))
    for name in ("authority_notified_at", "people_notified_at"):
        at: datetime | None = getattr(facts, name)
        if at is None:
            continue
        if at > now + CLOCK_SKEW:
            problems.append(Problem(name, "future", "must not be in the future"))
        elif at.astimezone(zone).date() < facts.known_at:
            problems.append(Problem(name, "before_known", "must not be before known_at"))
    if facts.authority_notified_at is not None and not facts.authority:
        problems.append(Problem("authority", "required_notified", "name the authority that was notified"))
    if facts.serious_risk and facts.authority_notified_at is None and not facts.notification_note:
        problems.append(
            Problem(
                "notification_note",
                "serious_unnotified",
                "a serious risk of harm is notified to the authority: give authority_notified_at, "
                "or say in notification_note why it is not (yet)",
            )
        )
    if facts.status not in INCIDENT_STATUSES:
        problems.append(Problem("status", "choose", f"must be one of {', '.join(INCIDENT_STATUSES)}"))
    return problems


def incident_summary(facts: PrivacyIncidentFacts) -> str:
    """A line for the ops log: what kind of incident, how many people; no text ops wrote about it."""
    about = "about " if facts.people_count_is_estimate else ""
    serious = ", serious risk" if facts.serious_risk else ""
    return f"{facts.nature} incident, {about}{facts.people_count} people{serious}, {facts.status}"
