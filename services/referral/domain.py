"""The referral service's rules, pure and free of I/O.

Sections:
- Routing: which partner (and which of its contacts) gets a need, and why, in words a
  coordinator can read in the referral's ``routed_because``.
- State machine: which action is allowed from which status.
- The clock: the timers of a need's 72-hour promise, and when they fire.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared import deadlines  # the partner's clock, shared with intake's deadline at recording

# normalize_postal_code is shared with intake and the directory; re-exported here for routing.
from shared.directory import (
    BusinessHours,
    Contact,
    Directory,
    Partner,  # noqa: F401
    normalize_postal_code,
)

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
    "by_id": " ; à égalité, départagé par l'identifiant",
    "excluded": " ; écartés : {names}",
    "none": "Aucun partenaire ne prend la thématique « {category} » pour le {where}",
    "no_partner_for_category": " : aucun partenaire de l'annuaire ne traite cette thématique",
    "unknown_category": " : thématique inconnue de l'annuaire",
    "out_of_territory": " : aucun des partenaires qui la traitent ne couvre ce territoire ({names})",
    "and_others": "{names} et {count} autres",
    "all_excluded": " ; écartés : {names}",
    "shorter": "{partner} (préfixe plus court)",
    "more_open": "{partner} (plus d'orientations en cours : {open})",
    "lost_on_id": "{partner} (à égalité, départagé par l'identifiant)",
    "full": "{partner} (capacité atteinte {open}/{capacity})",
    "declined": "{partner} (a déjà décliné)",
    "paused": "{partner} (en pause)",
    "by_hand": "Réaffectée à la main par {actor} à {partner}",
}


# A reason is read in a list of referrals; past a few names the rest is noise.
_NAMED_OUT_OF_TERRITORY = 3


@dataclass(frozen=True)
class RoutingDecision:
    """The partner and contact that get the need (both None when nobody can), and why."""

    partner: Partner | None
    contact: Contact | None
    reason: str


def route_need(
    directory: Directory,
    *,
    category: str,
    postal_code: str | None,
    library_id: str,
    open_referrals: Mapping[str, int],
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

    takers = [p for p in directory.partners if category in p.categories]
    covering: list[tuple[Partner, str]] = []  # (partner, its longest prefix of the code)
    for partner in takers:
        prefixes = [normalize_postal_code(p) for p in partner.territory]
        matching = [p for p in prefixes if code.startswith(p)]
        if matching:
            covering.append((partner, max(matching, key=len)))

    candidates: list[tuple[Partner, str]] = []
    excluded: list[str] = []
    for partner, prefix in covering:
        open_now = open_referrals.get(partner.id, 0)
        if partner.id in excluded_partner_ids:
            excluded.append(t["declined"].format(partner=partner.name))
        elif partner.id in paused_partner_ids:
            excluded.append(t["paused"].format(partner=partner.name))
        elif partner.capacity is not None and open_now >= partner.capacity:
            excluded.append(t["full"].format(partner=partner.name, open=open_now, capacity=partner.capacity))
        else:
            candidates.append((partner, prefix))

    if not candidates:
        reason = t["none"].format(category=label, where=where)
        if known_category is None:
            reason += t["unknown_category"]
        elif not takers:
            reason += t["no_partner_for_category"]
        elif not covering:
            names = ", ".join(p.name for p in takers[:_NAMED_OUT_OF_TERRITORY])
            if len(takers) > _NAMED_OUT_OF_TERRITORY:
                names = t["and_others"].format(names=names, count=len(takers) - _NAMED_OUT_OF_TERRITORY)
            reason += t["out_of_territory"].format(names=names)
        else:
            reason += t["all_excluded"].format(names=", ".join(excluded))
        return RoutingDecision(partner=None, contact=None, reason=reason + ".")

    def rank(candidate: tuple[Partner, str]) -> tuple[int, int, str]:
        partner, prefix = candidate
        return (-len(prefix), open_referrals.get(partner.id, 0), partner.id)

    candidates.sort(key=rank)
    winner, prefix = candidates[0]
    winner_open = open_referrals.get(winner.id, 0)
    losers: list[str] = []
    tie_note = ""
    for partner, other_prefix in candidates[1:]:
        other_open = open_referrals.get(partner.id, 0)
        if len(other_prefix) < len(prefix):
            losers.append(t["shorter"].format(partner=partner.name))
        elif other_open > winner_open:
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
}
CLOCK_STOPPERS = frozenset({"accept", "respond"})  # the partner's first answer meets the SLA


class TransitionRefused(Exception):
    pass


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


@dataclass(frozen=True)
class ClockTimer:
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


def takes_category(partner: Partner, category: str) -> bool:
    """Whether ops may hand the partner a need of this category without an explicit override."""
    return category in partner.categories


def assign_by_hand(directory: Directory, partner_id: str, actor: str) -> RoutingDecision:
    """Ops chose the partner: its primary contact gets the handoff, whatever the routing rule says."""
    partner = directory.partner(partner_id)
    if partner is None:  # the caller checked it (reassign_referral)
        raise LookupError(f"unknown partner {partner_id!r}")
    return RoutingDecision(
        partner=partner,
        contact=directory.primary_contact(partner),
        reason=ROUTING_TEXTS["by_hand"].format(actor=actor, partner=partner.name),
    )


# --- A partner's access ends with its part --------------------------------------------------------
# Once a need left a partner (it declined, ops reassigned it, or the need was cancelled), the partner's
# pages and API say so and since when, and show nothing more of the person or of what they asked.

LEFT_PARTNER = frozenset({"declined", "cancelled"})  # final statuses: nothing moves the referral after them
HOW_IT_LEFT = ("decline", "reassign", "cancel")  # history actions that end a partner's part


def left_partner(status: str) -> bool:
    return status in LEFT_PARTNER


def how_it_left(actions: list[str]) -> str | None:
    """The action that ended the partner's part (the last of HOW_IT_LEFT in its history), if any."""
    return next((a for a in reversed(actions) if a in HOW_IT_LEFT), None)
