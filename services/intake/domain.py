"""Intake rules, no I/O: what a need's status and SLA become as referral events arrive, postal codes, the
order of the desk's list, categories typed at the desk, and the monthly figures."""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from shared.directory import normalize_postal_code as directory_postal_code
from shared.search import search_text

# The desk's view of the handoff, driven by the referral service's events.
STATUS_AFTER = {
    "referral.assigned": "referred",
    "referral.accepted": "accepted",
    "referral.responded": "responded",
    "referral.closed": "closed",
    "referral.declined": "recorded",  # waiting for the next partner; an assigned or unroutable event follows
    "need.unroutable": "unroutable",
    "referral.cancelled": "closed",  # by ops; a reassignment is followed by referral.assigned
}
SLA_AFTER = {
    "referral.assigned": "on_track",
    "referral.reminder_due": "at_risk",
    "referral.escalated": "at_risk",
    "referral.breached": "breached",
    "referral.accepted": "met",
    "referral.responded": "met",
}
FINAL_SLA = {"met", "breached"}


def status_after(event_type: str, reassigned: bool = False) -> str | None:
    if event_type == "referral.cancelled" and reassigned:
        return "recorded"
    return STATUS_AFTER.get(event_type)  # once the clock stopped, later events do not move it


def next_sla(current: str, event_type: str) -> str:
    new = SLA_AFTER.get(event_type)
    if new is None or current in FINAL_SLA:
        return current
    if event_type == "referral.assigned" and current == "at_risk":
        return current  # a re-route keeps the need's clock, and so its risk
    return new


def normalize_postal_code(raw: str) -> str:
    """French `76000` or Canadian `H2X 1Y4` (kept as `H2X 1Y4`); ValueError otherwise."""
    code = directory_postal_code(raw) if raw.isascii() else ""  # "٧٦٠٠٠" is digits to Python, not a postal code
    if len(code) == 5 and code.isdigit():
        return code
    if len(code) == 6 and code[0::2].isalpha() and code[1::2].isdigit():
        return f"{code[:3]} {code[3:]}"
    raise ValueError("not a postal code: give 5 digits (France) or A1A 1A1 (Canada)")


# --- references and search ----------------------------------------------------------------------------


def reference_prefix(library_code: str, recorded_at: datetime, zone: ZoneInfo) -> str:
    """A reference's prefix: the library's code and the day it was recorded there (CHA-2611 for 26 November). The
    counter after it never restarts (next year's 26 November goes on from this year's), so references stay unique
    without the year."""
    return f"{library_code}-{recorded_at.astimezone(zone):%d%m}"


def need_search_text(
    reference: str, display_name: str | None, email: str | None, phone: str | None, summary: str | None
) -> str:
    """What `q=` finds a need by: its reference, the person's name, email and phone, the words of the summary."""
    return search_text(words=(reference, display_name, email, summary), phones=(phone,))


# --- following needs ----------------------------------------------------------------------------------

WAITING_FOR_PARTNER = ("recorded", "referred", "unroutable")  # no partner has accepted or answered yet


def is_overdue(status: str, respond_by: datetime, now: datetime) -> bool:
    """Past the need's deadline without a partner's first answer."""
    return status in WAITING_FOR_PARTNER and respond_by <= now


def desk_order(status: str, respond_by: datetime, recorded_at: datetime, now: datetime) -> tuple:
    """Sort key of "Mes demandes": overdue first, then the needs still waiting by deadline, then the rest newest
    first."""
    if is_overdue(status, respond_by, now):
        return (0, respond_by.timestamp())
    if status in WAITING_FOR_PARTNER:
        return (1, respond_by.timestamp())
    return (2, -recorded_at.timestamp())


# --- what the desk may do on a need (issue 14, point 8) ---------------------------------------------------

HELD_BY_PARTNER = ("referred", "accepted", "responded")  # a partner holds the need: a note reaches it
WAITING_FOR_ANSWER = ("referred", "accepted")  # the partner has not answered yet: the desk may nudge it
NUDGE_EVERY = timedelta(hours=24)
# Partner answers the desk reads ("à lire"): a desk's own close of the referral is not one.
ANSWER_EVENTS = frozenset({"referral.accepted", "referral.responded", "referral.declined", "referral.closed"})


class Refusal(Exception):
    """A desk action the need's state does not allow now; `code` names why (the pages word it in French), `until`
    says when it becomes possible, if it will."""

    def __init__(self, code: str, message: str, until: datetime | None = None) -> None:
        super().__init__(message)
        self.code, self.until = code, until


def check_open(status: str, erased: bool, *, text: bool = False) -> None:
    if status == "closed":
        raise Refusal("closed", "this need is closed: nothing more can be done on it")
    if text and erased:
        raise Refusal("erased", "the person's data was erased: nothing more can be written about this need")


def check_note(status: str, erased: bool) -> None:
    check_open(status, erased, text=True)
    if status not in HELD_BY_PARTNER:
        raise Refusal(
            "no_partner",
            f"no partner holds this need now (status {status}): a note can only go to the partner holding it",
        )


def check_nudge(status: str, last_nudged_at: datetime | None, now: datetime) -> None:
    check_open(status, False)
    if status not in WAITING_FOR_ANSWER:
        raise Refusal(
            "not_waiting",
            f"there is nobody to nudge (status {status}): a partner is nudged while it holds the need and has not "
            "answered yet",
        )
    if last_nudged_at is not None and now < last_nudged_at + NUDGE_EVERY:
        until = last_nudged_at + NUDGE_EVERY
        raise Refusal(
            "too_soon",
            f"the partner was nudged less than 24 hours ago ({last_nudged_at.isoformat()}); it may be nudged again "
            f"from {until.isoformat()}",
            until,
        )


def check_reroute(status: str, erased: bool, declined: bool) -> None:
    check_open(status, False)
    if erased:
        raise Refusal("erased", "the person's data was erased: the need goes to no other partner")
    if not declined:
        raise Refusal("not_declined", "no partner declined this need: routing again is for a need a decline left alone")
    if status != "unroutable":
        raise Refusal(
            "held", f"the need is not waiting for a partner (status {status}): it was handed to a partner already"
        )


def has_unread_answers(last_answer_at: datetime | None, answers_read_at: datetime | None) -> bool:
    """A partner answered since the desk last opened the need."""
    return last_answer_at is not None and (answers_read_at is None or last_answer_at > answers_read_at)


# --- categories as typed at the desk ---------------------------------------------------------------


def _folded(text: str) -> str:
    """Case- and accent-insensitive form, for matching what a desk typed against the directory's labels."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


def find_category(typed: str, categories: Sequence[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """The category id for what was typed in the searchable list (`categories`: (id, label) pairs), and, when
    none matches exactly, the ids whose label or id contains it (suggestions; the only one is taken)."""
    wanted = _folded(typed)
    if not wanted:
        return None, []
    for id_, label in categories:
        if wanted in (_folded(label), _folded(id_)):
            return id_, []
    containing = [id_ for id_, label in categories if wanted in _folded(label) or wanted in _folded(id_)]
    if len(containing) == 1 and len(wanted) >= 3:
        return containing[0], []
    return None, containing


# --- monthly figures ----------------------------------------------------------------------------------


def month_bounds(month: date, timezone: str) -> tuple[datetime, datetime]:
    """The first instant of `month` and of the next one, in the library's time zone."""
    zone = ZoneInfo(timezone)
    start = datetime(month.year, month.month, 1, tzinfo=zone)
    end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=zone)
    return start, end


@dataclass
class Figures:
    """What a month at a desk amounts to: people and needs counted apart (one person may bring several needs)."""

    people: int = 0
    needs: int = 0
    answered_in_time: int = 0  # a partner accepted or answered before the deadline
    due: int = 0  # deadline passed, or answered: the needs the share is computed on
    still_running: int = 0  # no answer yet and the deadline not reached

    @property
    def share_in_time(self) -> float | None:
        return self.answered_in_time / self.due if self.due else None


@dataclass(frozen=True)
class CountedNeed:
    person_id: str
    category: str
    status: str
    sla: str
    respond_by: datetime


def monthly_figures(needs: Iterable[CountedNeed], now: datetime) -> tuple[Figures, dict[str, Figures]]:
    """The month's figures in all and by category."""
    total, by_category = Figures(), defaultdict[str, Figures](Figures)
    people: set[str] = set()
    people_by_category: dict[str, set[str]] = defaultdict(set)
    for need in needs:
        people.add(need.person_id)
        people_by_category[need.category].add(need.person_id)
        for figures in (total, by_category[need.category]):
            figures.needs += 1
            if need.sla == "met":
                figures.answered_in_time += 1
                figures.due += 1
            elif need.sla == "breached" or need.respond_by <= now:
                figures.due += 1
            else:
                figures.still_running += 1
    total.people = len(people)
    for category, figures in by_category.items():
        figures.people = len(people_by_category[category])
    return total, dict(by_category)
