"""Why nobody can take a need (the cause ops read on "Sans partenaire"), and the timers of a need handed to a
partner after it was stranded at recording (the deadline is kept; nothing already past is told late)."""

from datetime import UTC, datetime, timedelta

from services.referral import domain
from shared.directory import parse_directory
from shared.testing import directory_data

NOW = datetime(2026, 12, 1, 9, 15, tzinfo=UTC)


def route(directory, category="sante", **changes):
    return domain.route_need(
        directory,
        category=category,
        postal_code="76000",
        library_id="chatelet",
        open_referrals=lambda partner_id: 0,
        **changes,
    )


def test_the_cause_says_why_no_partner_can_take_the_need():
    directory = parse_directory(directory_data())
    assert route(directory, "xyz").cause == "unknown_category"
    assert route(directory, "logement").cause == "no_taker"
    assert route(directory, excluded_partner_ids={"cpam-76"}).cause == "declined"
    assert route(directory, paused_partner_ids={"cpam-76"}).cause == "unavailable"
    found = route(directory)
    assert found.partner is not None and found.cause is None
    data = directory_data()
    data["partners"][2]["territory"] = ["27"]
    assert route(parse_directory(data)).cause == "out_of_territory"


def test_a_need_handed_over_late_keeps_its_deadline_and_skips_the_timers_already_past():
    directory = parse_directory(directory_data())
    partner = directory.partner("cpam-76")
    assert partner is not None
    respond_by = NOW + timedelta(hours=72)
    timers = domain.clock_timers_until(NOW, partner, respond_by, NOW + timedelta(hours=30))
    assert [(t.kind, t.number) for t in timers] == [("reminder", 2), ("escalation", 0), ("breach", 0)]
    assert timers[-1].due_at == respond_by
    assert domain.clock_timers_until(NOW, partner, respond_by, respond_by + timedelta(hours=1)) == []


def test_ops_may_choose_the_contact_and_the_words_name_no_user():
    directory = parse_directory(directory_data())
    decision = domain.assign_by_hand(directory, "caf-76", "ops", "caf-backup", stranded=True)
    assert decision.contact is not None and decision.contact.id == "caf-backup"
    assert (
        decision.reason.startswith("Confiée à CAF de la Seine-Maritime par la coordination")
        and "ops" not in decision.reason
    )
