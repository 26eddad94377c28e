"""The person's answer page (issue 16, part 3) in Debian's chromium: the email's "Non" button opens a confirmation
page that a keyboard alone can confirm, on a phone's screen, with no serious accessibility violation (axe-core)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.signin import person_answer_link
from shared.testing import VIEWPORT_PHONE, focus_is_visible, tab_to, wait_for
from tests.helpers import record_need

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]


def test_the_person_confirms_no_on_a_phone_with_the_keyboard_only(page, check_page, settings, start_service, clock):
    referral = start_service("referral", settings)
    rid = record_need(
        referral.svc, person={"display_name": "M. Martin", "email": "martin@example.org", "preferred_channel": "email"}
    )
    assert referral.client("caf").post(f"/referrals/{rid}/accept").status_code == 200
    clock.advance(timedelta(days=3, minutes=1))
    wait_for(lambda: referral.client("ops").get(f"/referrals/{rid}").json()["contact_question_at"])

    page.set_viewport_size(VIEWPORT_PHONE)
    page.goto(person_answer_link(referral.settings, rid, "no", now=clock()))
    heading = page.get_by_role("heading", level=1).inner_text()
    assert heading == "Avez-vous été contacté(e) par CAF de la Seine-Maritime\u00a0?"
    assert "M. Martin" not in page.content()  # nothing of the person or the need
    check_page(page, "person-contacted-question")

    tab_to(page, "form button")
    assert focus_is_visible(page)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.get_by_role("heading", level=1).inner_text() == "Merci pour votre réponse"
    assert "non" in page.get_by_role("status").inner_text()
    check_page(page, "person-contacted-thanks")
    assert referral.client("ops").get(f"/referrals/{rid}").json()["person_contacted"] == "no"
