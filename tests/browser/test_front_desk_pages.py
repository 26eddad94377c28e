"""The front desk's pages in a real browser (Debian's chromium driven by Playwright), with the three services, a
real SMTP sink and the pages' own Content-Security-Policy enforced: sign in through the emailed link, record a need
with the keyboard alone, see the partner appear on the confirmation page without a reload, add a need for the same
person, find the need in "Mes demandes". axe-core on every page (no serious violation); screenshots under
test-artifacts/browser/."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from sqlmodel import select

from services.intake.store import Need
from shared.pages import deadline_fr
from shared.testing import DESK_EMAIL, VIEWPORT_DESK, VIEWPORT_PHONE, focus_is_visible, tab_to, wait_for
from tests.helpers import search

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

SUMMARY = "Dossier APL bloqué depuis « mars » 😟"


def test_a_desk_signs_in_by_email_records_a_need_by_keyboard_and_follows_it(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    start_service("referral", settings)
    start_service("notifications", settings)

    # --- sign in with the link the notifications service emails
    page.goto(f"{intake.url}/demandes")
    assert page.url.endswith("/connexion")
    check_page(page, "desk-sign-in")
    tab_to(page, "#email")
    page.keyboard.type(DESK_EMAIL)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Si cette adresse est connue" in page.get_by_role("status").inner_text()
    [mail] = wait_for(lambda: mail_sink.to(DESK_EMAIL), 30)
    text = mail["message"].get_body(preferencelist=("plain",)).get_content()
    link = search(r"http://127\.0\.0\.1:\d+/connexion/\S+", text).group(0)
    page.goto(link)  # a page with one button: opening the link (or a mail scanner fetching it) does not use it
    check_page(page, "desk-sign-in-confirm")
    assert page.evaluate("document.activeElement.textContent") == "Me connecter" and focus_is_visible(page)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith("/nouvelle")
    check_page(page, "desk-new-need")

    # --- record a need with the keyboard alone
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Aller au contenu" and focus_is_visible(page)
    tab_to(page, "#category")
    assert focus_is_visible(page)
    page.keyboard.type("allocations")  # the list narrows as one types; the desk need not pick from it
    tab_to(page, "#summary")
    page.keyboard.type(SUMMARY)
    tab_to(page, "#postal_code")
    assert page.locator("#postal_code").input_value() == "76000"  # the library's territory
    tab_to(page, "#display_name")
    page.keyboard.type("Mme Durand")
    tab_to(page, "#email")
    page.keyboard.type("durand@example.org")
    tab_to(page, "#preferred_channel-email")
    page.keyboard.press("Space")
    tab_to(page, "#consent")
    assert focus_is_visible(page)
    page.keyboard.press("Space")
    tab_to(page, "#consent_messages")  # the second, optional choice: messages on the channel chosen above
    page.keyboard.press("Space")
    tab_to(page, "form.need-form button[type=submit]")
    with page.expect_navigation():
        page.keyboard.press("Enter")

    # --- the confirmation: the partner appears without a reload
    assert page.url.endswith("/enregistree")
    assert page.get_by_role("heading", level=1).inner_text() == "Demande enregistrée : Allocations familiales (CAF)"
    page.evaluate("window.relaisNotReloaded = true")
    live = page.locator("#suivi")
    live.get_by_text("CAF de la Seine-Maritime", exact=True).wait_for()
    assert page.evaluate("window.relaisNotReloaded === true"), "the page reloaded instead of updating"
    with intake.svc.db.read() as session:
        respond_by = session.get(Need, page.url.split("/")[-2]).respond_by
    assert f"Le partenaire doit répondre {deadline_fr(respond_by, 'Europe/Paris')}." in live.inner_text()
    assert "Pourquoi ce partenaire" in live.inner_text()
    check_page(page, "desk-confirmation")

    # --- another need for the same person: their details come along; errors show next to their fields
    tab_to(page, "a[href^='/nouvelle?meme_personne=']")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.locator("#display_name").input_value() == "Mme Durand"
    assert page.locator("#email").input_value() == "durand@example.org"
    tab_to(page, "#category")
    page.keyboard.type("al")  # ambiguous
    tab_to(page, "form.need-form button[type=submit]")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.title().startswith("Erreur : ")
    alert = page.locator(".error-summary")
    # the category, the summary, the consent; and email chosen (as for the first need) without consent to messages
    assert "4 informations sont à corriger" in alert.inner_text()
    assert page.locator("#category").get_attribute("aria-invalid") == "true"
    assert "Vouliez-vous dire" in page.locator("#category-erreur").inner_text()
    assert page.locator("#display_name").input_value() == "Mme Durand"
    check_page(page, "desk-new-need-errors")
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "desk-new-need-errors-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    # --- corrected, then double-clicked: one need; no partner takes it, and the page says what happens next
    page.locator("#category").fill("Logement")
    page.locator("#summary").fill("Expulsion annoncée")
    page.locator("#consent").check()
    page.locator("#consent_messages").check()
    # Chromium may send one POST or two; either way the form's idempotency key records one need (a repeat sent
    # for sure is in tests/integration/test_desk_pages.py).
    # The second POST may abort the first one's navigation (net::ERR_ABORTED), which fails a wait for a navigation
    # (page.wait_for_url, seen in CI): poll where the page lands instead.
    page.locator("form.need-form button[type=submit]").dblclick()
    expect(page).to_have_url(re.compile(r"/enregistree$"))
    page.locator("#suivi").get_by_text("Aucun partenaire", exact=True).wait_for()
    assert "La coordination départementale a été prévenue" in page.locator("#suivi").inner_text()
    check_page(page, "desk-confirmation-unroutable")
    with intake.svc.db.read() as session:
        people = session.exec(select(Need.person_id)).all()
    assert len(people) == 2 and len(set(people)) == 1, "a double click recorded twice, or lost the person"

    # --- Mes demandes, then the need's page with its history
    page.get_by_role("link", name="Mes demandes").click()
    card = page.locator(".cards > li").filter(has_text="Allocations familiales (CAF) – Mme Durand")
    expect(card).to_have_count(1)  # once the list the click asked for has loaded
    assert "CAF de la Seine-Maritime" in card.inner_text() and "Transmise au partenaire" in card.inner_text()
    check_page(page, "desk-my-needs")
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "desk-my-needs-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    card.get_by_role("link").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Demande : Allocations familiales (CAF)"
    assert SUMMARY in page.locator(".summary-text").inner_text()
    history = page.locator(".history").inner_text()
    assert "Demande enregistrée à l'accueil" in history and "Transmise à CAF de la Seine-Maritime" in history
    check_page(page, "desk-need")

    page.get_by_role("link", name="Chiffres du mois").click()
    expect(page.locator(".figures").get_by_text("personne aidée")).to_be_visible()
    check_page(page, "desk-figures")

    page.get_by_role("button", name="Se déconnecter").click()
    assert page.url.endswith("/connexion?fin=1")
