"""A partner's access ends with its part, in a real browser (Debian's chromium, the pages' CSP enforced): after a
decline, a reassignment and a cancellation (through intake), the partner's link page, inbox and referral page say
that the need left it and since when, and none of the person's details is anywhere in the page."""

from __future__ import annotations

from datetime import datetime

import pytest
from playwright.sync_api import expect

from shared.pages import datetime_fr
from shared.signin import referral_link, sign_in_link
from shared.testing import sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

NAME = "Anatole Brisebarre-Ladouce"
EMAIL = "anatole.brisebarre@exemple-unique.test"
PHONE_TYPED, PHONE = "06 58 31 72 94", "+33658317294"
SUMMARY = "Prime d'activité interrompue depuis la reprise d'emploi au port"
SECRETS = (NAME, "Brisebarre", EMAIL, PHONE, PHONE_TYPED, "658317294", SUMMARY, "reprise d'emploi")


def assert_no_person(page, where: str) -> None:
    content = page.content() + page.locator("body").inner_text()
    found = [s for s in SECRETS if s in content]
    assert not found, f"{where} still shows {found}"


@pytest.mark.parametrize("exit", ["decline", "reassign", "cancel"])
def test_the_partner_pages_after_the_need_left(exit, page, check_page, settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    need = (
        intake.client("desk")
        .post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": SUMMARY,
                "postal_code": "76000",
                "consent": True,
                "person": {"display_name": NAME, "email": EMAIL, "phone": PHONE_TYPED, "preferred_channel": "email"},
            },
        )
        .json()
    )
    ops = referral.client("ops")
    rid = wait_for(lambda: ops.get("/referrals", params={"need_id": need["id"]}).json()["items"])[0]["id"]
    link = referral_link(settings, rid, "caf-76", now=referral.svc.clock())
    page.goto(link)
    expect(page.get_by_text(NAME)).to_be_visible()  # before: the partner sees the person

    if exit == "decline":  # from the page itself, as a partner does
        page.locator("#decline-reason").select_option("out_of_scope")
        page.get_by_label("Précisions").fill(f"{NAME} relève du CCAS")
        page.get_by_role("button", name="Décliner la demande").click()
        assert page.get_by_role("status").inner_text().startswith("Vous avez décliné cette demande")
        status = "declined"
    else:
        if exit == "reassign":
            assert ops.post(f"/referrals/{rid}/reassign", json={"partner_id": "caf-national"}).status_code == 200
        else:
            assert (
                intake.client("ops").post(f"/needs/{need['id']}/cancel", json={"reason": "Doublon"}).status_code == 200
            )
        status = "cancelled"
        assert wait_for(lambda: ops.get(f"/referrals/{rid}").json()["status"] == status)
        page.goto(link)

    # The date as the page words it, from the API's left_at: never a pattern (Playwright's \w is ASCII-only).
    left_at = datetime.fromisoformat(ops.get(f"/referrals/{rid}").json()["left_at"])
    LEFT = f"Cette demande n'est plus suivie par votre organisation depuis le {datetime_fr(left_at, 'Europe/Paris')}"
    expect(page.get_by_text(LEFT)).to_be_visible()
    assert page.locator("form[action*='/r/']").count() == 0
    assert_no_person(page, "the link's page")
    check_page(page, f"referral-link-left-{exit}")

    sign_in_in_browser(page, sign_in_link(settings, "referral", "op-caf", now=referral.svc.clock())[0])
    page.get_by_label("Statut").select_option(status)
    page.get_by_role("button", name="Filtrer").click()
    page.wait_for_url(f"**/boite?q=&statut={status}")  # the filtered list, not the one the click left
    expect(page.locator(".cards > li")).to_have_count(1)
    expect(page.locator(".cards > li").get_by_text(LEFT)).to_be_visible()
    assert_no_person(page, "the inbox")
    check_page(page, f"inbox-left-{exit}")

    page.locator(".cards > li a").click()
    expect(page.get_by_text(LEFT)).to_be_visible()
    assert page.url.endswith(f"/boite/{rid}")
    assert_no_person(page, "the inbox's page")
    check_page(page, f"referral-signed-in-left-{exit}")
