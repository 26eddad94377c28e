"""The public pages in chromium: reached from the footer of a page shown to someone not signed in, by keyboard,
without sign-in, and without serious accessibility violation (axe-core); the desk's form shows the consent text
and its second, optional choice."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from shared.directory import DEFAULT_CONSENT
from shared.signin import sign_in_link
from shared.testing import sign_in_in_browser, tab_to

pytestmark = pytest.mark.browser


@pytest.fixture
def intake(settings, start_service):
    return start_service("intake", settings)


def test_the_footer_leads_to_the_public_pages_by_keyboard(intake, page, check_page):
    page.goto(f"{intake.url}/connexion")
    tab_to(page, 'footer a[href="/donnees-personnelles"]')
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{intake.url}/donnees-personnelles")
    expect(page.get_by_role("heading", level=1)).to_have_text("Données personnelles")
    expect(page.get_by_role("table")).to_contain_text("730 jours (2 ans)")
    check_page(page, "public-donnees-personnelles")

    page.get_by_role("link", name="Accessibilité : partiellement conforme").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Déclaration d'accessibilité")
    expect(page.locator('footer a[href="/accessibilite"]')).to_have_attribute("aria-current", "page")
    check_page(page, "public-accessibilite")


def test_the_desk_form_reads_the_consent_text_with_messages_as_a_second_choice(intake, page, check_page):
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{intake.url}/nouvelle")
    expect(page.get_by_label(DEFAULT_CONSENT[0]["handoff"])).not_to_be_checked()
    messages = page.get_by_label(DEFAULT_CONSENT[0]["messages"])
    expect(messages).not_to_be_checked()
    expect(page.locator("#consent_messages")).not_to_have_attribute("required", "")
    expect(page.locator('footer a[href="/donnees-personnelles"]')).to_be_visible()
    check_page(page, "desk-consent")
