"""The register of confidentiality incidents in a real browser (Debian's chromium driven by Playwright): ops record
an incident with the keyboard alone, are told next to the field what to fix, then find the incident in the
register; axe-core on each page, at desk and phone widths."""

from __future__ import annotations

from datetime import date, timedelta
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect

from shared.pages import date_fr
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_PHONE, focused, sign_in_in_browser, tab_to

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]


def type_into(page, selector: str, text: str) -> None:
    tab_to(page, selector)
    page.keyboard.type(text)


def type_date(page, selector: str, day: date) -> None:
    """Type a day into a date field, in the order its widget shows (chromium's: its own locale's, not the page's)."""
    type_into(page, selector, "01022003")
    day_first = page.locator(selector).input_value() == "2003-02-01"
    while focused(page, selector):  # out of the field backwards, then in again: on its first part
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    page.keyboard.type(day.strftime("%d%m%Y" if day_first else "%m%d%Y"))
    assert page.locator(selector).input_value() == day.isoformat()


def test_ops_record_an_incident_with_the_keyboard_and_find_it_in_the_register(
    page, check_page, settings, start_service
):
    referral = start_service("referral", settings)
    link, _ = sign_in_link(referral.settings, "referral", "ops", now=referral.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{referral.url}/tableau-de-bord/incidents")
    assert "Aucun incident" in page.locator("main").inner_text()
    check_page(page, "incidents-empty")

    tab_to(page, 'a[href="/tableau-de-bord/incidents/nouveau"]')
    page.keyboard.press("Enter")
    page.wait_for_url("**/tableau-de-bord/incidents/nouveau")
    assert page.get_by_role("heading", level=1).inner_text() == "Inscrire un incident de confidentialité"
    check_page(page, "incident-new")

    today = referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")).date()
    start, known = today - timedelta(days=6), today - timedelta(days=1)
    tab_to(page, "#nature-confidentiality")
    page.keyboard.press("Space")
    type_into(page, "#information_description", "Noms et téléphones de personnes orientées")
    type_into(page, "#circumstances", "Tableau envoyé au mauvais partenaire")
    type_date(page, "#occurred_from", start)
    type_date(page, "#known_at", known)
    type_into(page, "#people_count", "12")
    tab_to(page, "#people_count_is_estimate")
    page.keyboard.press("Space")
    type_into(page, "#people_categories", "usagers")
    type_into(page, "#consequences", "Démarchage possible")
    type_into(page, "#risk_assessment", "Faible : suppression confirmée")
    tab_to(page, "button[type=submit]")
    with page.expect_navigation():
        page.keyboard.press("Enter")  # the measures are missing
    error = page.locator("#measures-erreur")
    assert "Remplissez ce champ" in error.inner_text()
    assert page.locator("#measures").get_attribute("aria-invalid") == "true"
    assert "measures-erreur" in page.locator("#measures").get_attribute("aria-describedby")
    assert page.locator("#circumstances").input_value() == "Tableau envoyé au mauvais partenaire"  # kept
    check_page(page, "incident-new-errors")

    tab_to(page, '.error-summary a[href="#measures"]')
    page.keyboard.press("Enter")
    tab_to(page, "#measures")
    assert focused(page, "#measures")
    page.keyboard.type("Suppression demandée et confirmée par écrit")
    tab_to(page, "button[type=submit]")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "fait=inscrit" in page.url, page.locator(".error-message").all_inner_texts()
    assert "L'incident est inscrit au registre" in page.get_by_role("status").inner_text()
    assert page.locator("#people_count_is_estimate").is_checked()
    check_page(page, "incident-recorded")

    page.goto(f"{referral.url}/tableau-de-bord/incidents")
    row = page.locator("table tbody tr")
    expect(row).to_have_count(1)
    cells = row.first.inner_text()
    assert "Atteinte à la confidentialité" in cells and "environ 12" in cells and "En cours" in cells
    assert date_fr(start) in cells
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "incidents-phone")
    items = referral.client("ops").get("/privacy-incidents").json()["items"]
    assert [(i["occurred_from"], i["known_at"], i["people_count"]) for i in items] == [
        (start.isoformat(), known.isoformat(), 12)
    ]
