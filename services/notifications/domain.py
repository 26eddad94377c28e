"""Notifications' rules, pure and free of I/O: who is told what on which channel, when a message may go,
how an SMS is counted, and how long to wait before trying again.

Sections:
- Recipients: the directory's people for each kind, and the person on their preferred channel.
- Timing: quiet hours for SMS to the person, daily digests, retry backoff.
- SMS text: GSM-7 or UCS-2, segments, transliteration of French characters outside GSM-7.
"""

from __future__ import annotations

import math
import random
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

from shared.directory import Directory, Partner

# ==============================================================================================
# Recipients
# ==============================================================================================

# event type -> the kind of message it produces
KIND_OF = {
    "referral.assigned": "handoff",
    "referral.reminder_due": "reminder",
    "referral.escalated": "escalation",
    "referral.breached": "breach",
    "referral.accepted": "partner_answered",
    "referral.responded": "partner_answered",
    "need.unroutable": "unroutable",
    "referral.person_erased": "person_erased",
    "referral.note_added": "desk_note",  # the desk added information for the partner
    "referral.nudged": "desk_nudge",  # the desk asks the partner for news
    "referral.person_contacted": "person_not_contacted",  # only a "no" (staff_kind): the desk and the coordinator
}

# What the person is told, by event type. A referral tells them which organisation will contact them and
# by when; an acceptance tells them it has taken their need in hand. A partner's `respond` message is
# written for the desk (free text, possibly internal), so it goes to the desk only, never to the person.
PERSON_KIND_OF = {
    "referral.assigned": "person_confirmation",
    "referral.accepted": "partner_answered",
    "referral.contact_question_due": "contact_question",  # "were you contacted?", once per referral (issue 16)
}


def staff_kind(event_type: str, person_contacted: str | None = None) -> str | None:
    """The kind of message staff get for an event, if any: the person's answer alerts only when it is "no"."""
    if event_type == "referral.person_contacted" and person_contacted != "no":
        return None
    return KIND_OF.get(event_type)


STAFF_ROLES = ("partner_contact", "backup_contact", "escalation", "front_desk")


@dataclass(frozen=True)
class Recipient:
    role: str  # partner_contact | backup_contact | escalation | front_desk | person
    name: str
    email: str
    digest_at: time | None = None  # a partner contact who asked for one daily email of new handoffs


def recipients(
    directory: Directory,
    kind: str,
    *,
    partner_id: str | None = None,
    contact_id: str | None = None,
    library_id: str | None = None,
) -> list[Recipient]:
    """Everyone on staff a message of `kind` goes to, by email, each address once (the first role wins)."""
    partner = directory.partner(partner_id) if partner_id else None
    library = directory.library(library_id) if library_id else None
    found: list[Recipient] = []
    if kind in ("handoff", "reminder", "person_erased", "desk_note", "desk_nudge") and partner:
        found += [
            Recipient("partner_contact", c.name, c.email, c.digest_at) for c in partner.contacts if c.id == contact_id
        ]
    if kind == "escalation" and partner and (backup := directory.backup_contact(partner)):
        found.append(Recipient("backup_contact", backup.name, backup.email))
    if kind in ("breach", "partner_answered", "unroutable", "person_not_contacted") and library:
        found += [Recipient("front_desk", c.name, c.email) for c in library.contacts]
    if kind in ("escalation", "breach", "unroutable", "person_not_contacted"):
        found += [Recipient("escalation", c.name, c.email) for c in directory.escalation_contacts]
    seen: set[str] = set()
    unique = []
    for r in found:
        if r.email.lower() not in seen:
            seen.add(r.email.lower())
            unique.append(r)
    return unique


@dataclass(frozen=True)
class PersonRoute:
    """How the person is reached: a channel and an address, or why they are not (`suppressed`)."""

    channel: str  # email | sms
    address: str  # "" when suppressed for lack of one
    suppressed: str | None = None  # no_consent | no_channel | no_address


def person_route(preferred_channel: str, email: str | None, phone: str | None, consent: bool = True) -> PersonRoute:
    """The person's own choice decides; without consent or a channel they are never contacted."""
    channel = (
        preferred_channel if preferred_channel in ("email", "sms") else ("sms" if phone and not email else "email")
    )
    address = (email if channel == "email" else phone) or ""
    if not consent:
        return PersonRoute(channel, address, "no_consent")
    if preferred_channel not in ("email", "sms"):
        return PersonRoute(channel, "", "no_channel")
    if not address:
        return PersonRoute(channel, "", "no_address")
    return PersonRoute(channel, address)


def reply_to(directory: Directory, library_id: str | None, role: str) -> str | None:
    """Replies from partners and the person reach the desk (the library's first contact); the desk needs none."""
    library = directory.library(library_id) if library_id else None
    if library is None or not library.contacts or role == "front_desk":
        return None
    return library.contacts[0].email


# ==============================================================================================
# Timing
# ==============================================================================================

QUIET_UNTIL = time(8, 0)  # SMS to the person from 8 h ...
QUIET_FROM = time(20, 0)  # ... to 20 h, in the library's time zone
AT_THE_DESK = timedelta(minutes=15)  # a confirmation this soon after recording finds the person at the desk


def holiday_region(timezone: str) -> tuple[str, str | None]:
    """France's public holidays, or Québec's for a library in an American time zone."""
    return ("CA", "QC") if timezone.startswith("America/") else ("FR", None)


@lru_cache(maxsize=16)
def _holidays(country: str, subdiv: str | None, year: int) -> holidays.HolidayBase:
    return holidays.country_holidays(country, subdiv=subdiv, years=year)


def is_day_off(day: date, timezone: str) -> bool:
    return day.weekday() == 6 or day in _holidays(*holiday_region(timezone), day.year)


def sms_allowed_at(at: datetime, timezone: str) -> datetime:
    """The first moment at or after `at` when an SMS may reach the person: 8 h to 20 h local time, not on a
    Sunday or public holiday. DST-safe: local wall times are turned back into instants by zoneinfo."""
    zone = ZoneInfo(timezone)
    local = at.astimezone(zone)
    day = local.date()
    if QUIET_UNTIL <= local.time() < QUIET_FROM and not is_day_off(day, timezone):
        return at
    if local.time() >= QUIET_FROM or is_day_off(day, timezone):
        day += timedelta(days=1)
    while is_day_off(day, timezone):
        day += timedelta(days=1)
    return max(at, datetime.combine(day, QUIET_UNTIL, zone).astimezone(at.tzinfo))


def held_by_quiet_hours(kind: str, role: str, channel: str, recorded_at: datetime | None, now: datetime) -> bool:
    """Only SMS to the person wait for the day; not the confirmation given while they are still at the desk."""
    if role != "person" or channel != "sms":
        return False
    at_the_desk = kind == "person_confirmation" and recorded_at is not None and now - recorded_at <= AT_THE_DESK
    return not at_the_desk


def next_digest_at(now: datetime, at: time, timezone: str) -> datetime:
    """The next daily digest at local time `at` strictly after `now` (a handoff at 08:30 sharp waits a day)."""
    zone = ZoneInfo(timezone)
    day = now.astimezone(zone).date()
    for offset in range(3):
        slot = datetime.combine(day + timedelta(days=offset), at, zone).astimezone(now.tzinfo)
        if slot > now:
            return slot
    raise AssertionError("unreachable: a daily slot comes within two days")


def digest_timezone(directory: Directory, partner: Partner | None) -> str:
    """A partner on business hours lives in their time zone; others in the directory's."""
    if partner is not None and partner.clock == "business_hours":
        return partner.business_hours.timezone
    return directory.timezone


def retry_delay(
    attempt: int, base_s: float, max_s: float, retry_after_s: float | None = None, rand: random.Random | None = None
) -> timedelta:
    """Exponential backoff with jitter after failed attempt number `attempt` (1-based): about base, 2 base,
    4 base... capped at max, each drawn in [half, full] so that replicas retrying together spread out. A
    server's Retry-After is honoured when it asks for longer."""
    full = min(max_s, base_s * 2 ** (attempt - 1))
    delay = full / 2 + (rand or random).random() * full / 2
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return timedelta(seconds=delay)


# ==============================================================================================
# SMS text
# ==============================================================================================

# GSM 03.38: the basic character set (one septet each) and its extension table (escape + one septet).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

# Characters of French text outside GSM-7, and what they become. Letters not listed lose their accent
# (Ê -> E) when the bare letter is in GSM-7; é è à ù É are GSM-7 already and stay.
TRANSLITERATION = {
    "’": "'",
    "‘": "'",
    "‚": ",",
    "«": '"',
    "»": '"',
    "“": '"',
    "”": '"',
    "„": '"',
    "…": "...",
    "–": "-",
    "—": "-",
    "‑": "-",
    "\u00a0": " ",
    "\u202f": " ",
    "\u2009": " ",
    "œ": "oe",
    "Œ": "OE",
    "æ": "ae",
    "ç": "c",
    "·": ".",
    "•": "-",
}


@dataclass(frozen=True)
class SmsCount:
    encoding: str  # GSM-7 | UCS-2
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def sms_count(text: str) -> SmsCount:
    """How many segments `text` takes: 160 septets in one, 153 per part beyond; 70 / 67 in UCS-2.
    An extension character (€, [, ...) takes two septets."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, part, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2  # an emoji takes two code units
        single, part, encoding = 70, 67, "UCS-2"
    segments = 1 if units <= single else math.ceil(units / part)
    return SmsCount(encoding, units, max(segments, 1) if text else 0)


def to_gsm7(text: str) -> str:
    """Replace the characters that would force the whole SMS into UCS-2 by their nearest GSM-7 form;
    what has none (an emoji) stays, and the text then goes as UCS-2."""
    out = []
    for c in text:
        if c in GSM7_BASIC or c in GSM7_EXTENSION:
            out.append(c)
        elif c in TRANSLITERATION:
            out.append(TRANSLITERATION[c])
        else:
            bare = "".join(ch for ch in unicodedata.normalize("NFD", c) if not unicodedata.combining(ch))
            out.append(bare if bare and all(ch in GSM7_BASIC for ch in bare) else c)
    return "".join(out)


STOP_WORDS = frozenset({"stop", "arret", "arreter", "stopall", "unsubscribe", "desabonner", "desinscrire"})
START_WORDS = frozenset({"start", "unstop"})


def _first_word(text: str) -> str:
    bare = "".join(ch for ch in unicodedata.normalize("NFD", text.strip()) if not unicodedata.combining(ch))
    return (bare.split() or [""])[0].strip(".!").casefold()


def is_stop_reply(text: str) -> bool:
    """STOP, Stop!, ARRET, Arrêt... as the first word of a reply."""
    return _first_word(text) in STOP_WORDS


def is_start_reply(text: str) -> bool:
    return _first_word(text) in START_WORDS


CONTACT_ANSWERS = {"oui": "yes", "non": "no", "yes": "yes", "no": "no"}  # YES/NO: the English question's


def contact_answer(text: str) -> str | None:
    """OUI or NON, as the first word of a reply to the contact question ("oui", "Oui.", "NON !", "non merci"):
    "yes" or "no"; None for anything else."""
    bare = "".join(ch for ch in unicodedata.normalize("NFD", text.strip()) if not unicodedata.combining(ch))
    words = bare.replace(",", " ").split()
    first = words[0].strip(".!?;:…'\"«»()").casefold() if words else ""
    return CONTACT_ANSWERS.get(first)
