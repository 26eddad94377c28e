"""The deadline rule, a pure function of the directory: by when a partner must answer a need. Intake answers it when
the need is recorded (before referral has routed it), referral sets the need's timers with the same clock; neither
imports the other.

- `covering_partners`: the partners that take the need's category and whose territory covers its postal code (the
  library's first prefix when it has none), each with its longest matching prefix: the territorial part of the
  contract's routing rule (referral's `route_need` adds capacity, pauses, declines and the open-referral counts);
- `elapse`: a duration on a partner's clock, continuous or counting opening hours only;
- `expected_respond_by`: the window of the partner the rule picks when no count is known yet (longest prefix, then
  the partner id), or the directory's default window when no partner takes the need.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays

from shared.directory import WEEKDAYS, BusinessHours, Directory, Partner, normalize_postal_code


def covering_partners(
    directory: Directory, *, category: str, postal_code: str | None, library_id: str
) -> list[tuple[Partner, str]]:
    """(partner, its longest prefix of the need's code) for each partner that takes the category there, in the
    directory's order. LookupError for a library the directory does not know."""
    library = directory.library(library_id)
    if library is None:
        raise LookupError(f"unknown library {library_id!r}")
    code = normalize_postal_code(postal_code or "") or (library.territory[0] if library.territory else "")
    covering = []
    for partner in directory.partners:
        if category not in partner.categories:
            continue
        matching = [p for p in map(normalize_postal_code, partner.territory) if code.startswith(p)]
        if matching:
            covering.append((partner, max(matching, key=len)))
    return covering


def expected_respond_by(
    directory: Directory, *, category: str, postal_code: str | None, library_id: str, recorded_at: datetime
) -> datetime:
    """The deadline a need gets at recording: the window, on its clock, of the partner the routing rule picks before
    any referral is open, or the directory's default window when no partner takes the need. Referral's decision
    (`referral.assigned`) is what the need keeps; the two differ only when capacity or a pause moves the need to a
    partner with another window."""
    covering = covering_partners(directory, category=category, postal_code=postal_code, library_id=library_id)
    if not covering:
        return recorded_at + directory.sla.respond_within
    partner, _ = min(covering, key=lambda found: (-len(found[1]), found[0].id))
    return elapse(recorded_at, partner.sla.respond_within, partner)


def elapse(start: datetime, duration: timedelta, partner: Partner) -> datetime:
    """`start` + `duration` on the partner's clock: continuous, or counting opening hours only."""
    if partner.clock == "business_hours":
        return add_business_time(start, duration, partner.business_hours)
    return start + duration


def add_business_time(start: datetime, duration: timedelta, hours: BusinessHours) -> datetime:
    """The moment `duration` of opening time has passed after `start` (a long weekend does not count)."""
    tz = ZoneInfo(hours.timezone)
    country, _, subdiv = (hours.holidays or "").partition("-")
    closed_days = holidays.country_holidays(country, subdiv=subdiv or None) if country else {}
    open_days = {WEEKDAYS.index(d) for d in hours.days}
    remaining, cursor = duration, start.astimezone(UTC)
    for _ in range(3 * 366):  # a bound, not a limit anyone reaches: every year has opening days
        day = cursor.astimezone(tz).date()
        if day.weekday() in open_days and day not in closed_days:
            # Wall-clock opening and closing, converted to UTC so that DST days have their true length.
            opens = datetime.combine(day, hours.opens, tz).astimezone(UTC)
            closes = datetime.combine(day, hours.closes, tz).astimezone(UTC)
            begin = max(cursor, opens)
            if begin < closes:
                if remaining <= closes - begin:
                    return begin + remaining
                remaining -= closes - begin
        cursor = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    raise ValueError("no opening hours within three years: check the partner's business_hours")
