"""The deadline rule shared by intake (the deadline answered at recording) and referral (the need's timers): it picks
the partner referral's routing picks when no referral is open yet, and counts on that partner's clock."""

from datetime import UTC, datetime, timedelta

import pytest

from services.referral.domain import route_need
from shared.deadlines import covering_partners, expected_respond_by
from shared.directory import parse_directory
from shared.testing import directory_data

RECORDED_AT = datetime(2026, 12, 1, 9, 15, tzinfo=UTC)  # a Tuesday morning


def a_directory():
    data = directory_data()
    partners = {p["id"]: p for p in data["partners"]}
    partners["caf-76"]["sla"] = {"respond_within": "PT48H"}
    partners["caf-national"]["sla"] = {"respond_within": "PT24H"}
    partners["cpam-76"].update(clock="business_hours", sla={"respond_within": "PT8H"})
    # Two partners with the same prefix: the tie goes to the partner id, as in route_need with no open referral.
    data["partners"].append(
        {
            **partners["caf-76"],
            "id": "aaa-caf-76",
            "name": "CAF bis",
            "sla": {"respond_within": "PT36H"},
            "contacts": [{**c, "id": f"bis-{c['id']}"} for c in partners["caf-76"]["contacts"]],
        }
    )
    return parse_directory(data)


@pytest.mark.parametrize(
    "category, postal_code, library_id",
    [
        ("caf", "76000", "chatelet"),  # the longest prefix: 76 over everywhere, then the id
        ("caf", "H2X 1Y4", "chatelet"),  # only the national platform covers Canada
        ("caf", None, "bihorel"),  # no postal code: the library's territory
        ("sante", "76420", "bihorel"),  # a business-hours clock
        ("sante", "33000", "chatelet"),  # nobody: the directory's window
        ("logement", "76000", "chatelet"),  # nobody takes the category
    ],
)
def test_the_deadline_at_recording_is_the_window_of_the_partner_routing_picks(category, postal_code, library_id):
    directory = a_directory()
    chosen = route_need(
        directory,
        category=category,
        postal_code=postal_code,
        library_id=library_id,
        open_referrals=lambda partner_id: 0,
    ).partner
    due = expected_respond_by(
        directory, category=category, postal_code=postal_code, library_id=library_id, recorded_at=RECORDED_AT
    )
    if chosen is None:
        assert covering_partners(directory, category=category, postal_code=postal_code, library_id=library_id) == []
        assert due == RECORDED_AT + timedelta(hours=72)
    else:
        from services.referral.domain import clock_timers

        assert due == clock_timers(RECORDED_AT, chosen)[-1].due_at  # referral's breach timer: the same instant
        assert chosen.id in {
            p.id
            for p, _ in covering_partners(directory, category=category, postal_code=postal_code, library_id=library_id)
        }


def test_the_tie_on_a_prefix_goes_to_the_partner_id():
    due = expected_respond_by(
        a_directory(), category="caf", postal_code="76000", library_id="chatelet", recorded_at=RECORDED_AT
    )
    assert due == RECORDED_AT + timedelta(hours=36)  # aaa-caf-76 before caf-76
