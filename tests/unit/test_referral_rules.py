"""The handoff state machine and the need's clock, on tables of cases."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.referral import domain
from shared.directory import BusinessHours, Partner, SlaPolicy

ALL_STATUSES = ["assigned", "accepted", "responded", "closed", "declined", "cancelled"]
ALLOWED = {
    ("accept", "assigned"): "accepted",
    ("respond", "assigned"): "responded",
    ("respond", "accepted"): "responded",
    ("decline", "assigned"): "declined",
    ("decline", "accepted"): "declined",
    ("close", "accepted"): "closed",
    ("close", "responded"): "closed",
    ("cancel", "assigned"): "cancelled",
    ("cancel", "accepted"): "cancelled",
    ("cancel", "responded"): "cancelled",
    ("reassign", "assigned"): "cancelled",
    ("reassign", "accepted"): "cancelled",
    ("reassign", "responded"): "cancelled",
    ("desk_close", "assigned"): "closed",  # the desk closed the need: the person no longer needs help
    ("desk_close", "accepted"): "closed",
    ("desk_close", "responded"): "closed",
}


@pytest.mark.parametrize("action", sorted(domain.TRANSITIONS))
@pytest.mark.parametrize("status", ALL_STATUSES)
def test_every_transition_is_allowed_or_refused_as_the_table_says(action, status):
    expected = ALLOWED.get((action, status))
    if expected is None:
        with pytest.raises(domain.TransitionRefused, match=f"cannot {action} a referral that is {status}"):
            domain.next_status(status, action)
    else:
        assert domain.next_status(status, action) == expected


@pytest.mark.parametrize(
    "sla, action, after",
    [
        ("on_track", "accept", "met"),
        ("at_risk", "respond", "met"),
        ("breached", "accept", "breached"),
        ("on_track", "decline", "on_track"),
        ("at_risk", "close", "at_risk"),
    ],
)
def test_the_first_answer_meets_the_sla_unless_it_was_already_breached(sla, action, after):
    assert domain.sla_after(sla, action) == after


T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def partner(sla: SlaPolicy, **extra) -> Partner:
    return Partner(
        id="p",
        name="P",
        categories=["caf"],
        territory=["76"],
        sla=sla,
        contacts=[{"id": "c", "name": "C", "email": "c@example.org", "role": "primary"}],
        **extra,
    )


def test_a_need_gets_its_reminders_escalation_and_breach_from_the_recording_time():
    sla = SlaPolicy(
        respond_within=timedelta(hours=72),
        remind_after=[timedelta(hours=24), timedelta(hours=48)],
        escalate_after=timedelta(hours=60),
    )
    timers = domain.clock_timers(T0, partner(sla))
    assert [(t.kind, t.number, t.due_at - T0) for t in timers] == [
        ("reminder", 1, timedelta(hours=24)),
        ("reminder", 2, timedelta(hours=48)),
        ("escalation", 0, timedelta(hours=60)),
        ("breach", 0, timedelta(hours=72)),
    ]


def test_without_escalation_there_are_only_reminders_and_the_breach():
    sla = SlaPolicy(respond_within=timedelta(hours=48))
    assert [t.kind for t in domain.clock_timers(T0, partner(sla))] == ["breach"]


PARIS = ZoneInfo("Europe/Paris")
QUEBEC = ZoneInfo("America/Toronto")


@pytest.mark.parametrize(
    "start, hours, duration, due",
    [
        # Friday 16:00 + 2 h of opening time: 1 h on Friday, 1 h on Monday morning
        (
            datetime(2026, 11, 20, 16, 0, tzinfo=PARIS),
            {},
            timedelta(hours=2),
            datetime(2026, 11, 23, 10, 0, tzinfo=PARIS),
        ),
        # recorded on Saturday: the clock starts on Monday at opening
        (
            datetime(2026, 11, 21, 11, 0, tzinfo=PARIS),
            {},
            timedelta(hours=1),
            datetime(2026, 11, 23, 10, 0, tzinfo=PARIS),
        ),
        # 24 h of opening time = three 8-hour days
        (
            datetime(2026, 11, 23, 9, 0, tzinfo=PARIS),
            {},
            timedelta(hours=24),
            datetime(2026, 11, 25, 17, 0, tzinfo=PARIS),
        ),
        # Ascension (Thursday 14 May 2026) is a French public holiday: skipped
        (
            datetime(2026, 5, 13, 16, 0, tzinfo=PARIS),
            {},
            timedelta(hours=2),
            datetime(2026, 5, 15, 10, 0, tzinfo=PARIS),
        ),
        # Saint-Jean-Baptiste (24 June) in Québec, not in France
        (
            datetime(2026, 6, 23, 16, 0, tzinfo=QUEBEC),
            {"timezone": "America/Toronto", "holidays": "CA-QC"},
            timedelta(hours=2),
            datetime(2026, 6, 25, 10, 0, tzinfo=QUEBEC),
        ),
        (
            datetime(2026, 6, 23, 16, 0, tzinfo=PARIS),
            {},
            timedelta(hours=2),
            datetime(2026, 6, 24, 10, 0, tzinfo=PARIS),
        ),
        # the night the clocks go back (25 October 2026) changes nothing to opening time
        (
            datetime(2026, 10, 23, 16, 30, tzinfo=PARIS),
            {},
            timedelta(hours=1),
            datetime(2026, 10, 26, 9, 30, tzinfo=PARIS),
        ),
        # custom hours: Tuesday to Saturday, 10:00-12:00
        (
            datetime(2026, 11, 23, 9, 0, tzinfo=PARIS),
            {"days": ["tue", "wed", "thu", "fri", "sat"], "opens": "10:00", "closes": "12:00"},
            timedelta(hours=3),
            datetime(2026, 11, 25, 11, 0, tzinfo=PARIS),
        ),
    ],
)
def test_a_business_hours_clock_counts_only_opening_time(start, hours, duration, due):
    p = partner(SlaPolicy(respond_within=duration), clock="business_hours", business_hours=BusinessHours(**hours))
    assert domain.elapse(start, duration, p) == due
    assert domain.clock_timers(start, p)[-1].due_at == due


@pytest.mark.parametrize(
    "status, sla, fires",
    [
        ("assigned", "on_track", True),
        ("assigned", "at_risk", True),
        ("assigned", "met", False),
        ("assigned", "breached", False),
        ("accepted", "met", False),
        ("responded", "met", False),
        (None, None, False),
    ],
)
def test_a_timer_fires_only_while_the_need_waits_for_a_first_answer(status, sla, fires):
    assert domain.timer_fires(status, sla) is fires
