"""The partner's pages in a real browser (Debian's chromium driven by Playwright) with their Content-Security-Policy
enforced: keyboard only, no serious accessibility violation (axe-core), no console error, a screenshot of each page
under test-artifacts/browser/."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from playwright.sync_api import expect

from shared.pages import deadline_fr
from shared.signin import referral_link, sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, focus_is_visible, sign_in_in_browser, tab_to
from tests.helpers import record_need

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]


@pytest.fixture
def referral(settings, start_service):
    return start_service("referral", settings)


def test_a_partner_declines_from_the_email_link_with_the_keyboard_only(page, check_page, referral):
    rid = record_need(
        referral.svc,
        summary="Loyer impayé, dossier d'aide au logement à compléter",
        person={"display_name": "M. Martin", "email": "martin@example.org", "preferred_channel": "email"},
    )
    page.goto(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock()))
    assert page.get_by_role("heading", level=1).inner_text() == "Demande : Allocations familiales (CAF)"
    respond_by = datetime.fromisoformat(referral.client("ops").get(f"/referrals/{rid}").json()["respond_by"])
    expect(page.get_by_text(f"À répondre {deadline_fr(respond_by, 'Europe/Paris')}.")).to_be_visible()
    check_page(page, "referral-link")

    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Aller au contenu" and focus_is_visible(page)
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "contenu"

    tab_to(page, "#decline-reason")
    assert focus_is_visible(page)
    page.keyboard.type("Capacit")  # a closed <select> picks the option typed
    assert page.locator("#decline-reason").input_value() == "capacity"
    tab_to(page, "#decline-detail")
    page.keyboard.type("Plus de place avant janvier ; voir le CCAS de Rouen.")
    tab_to(page, "form[action$='/decline'] button")
    assert focus_is_visible(page)
    with page.expect_navigation():
        page.keyboard.press("Enter")

    assert page.get_by_role("status").inner_text().startswith("Vous avez décliné cette demande")
    assert page.locator("form[action$='/accept']").count() == 0
    check_page(page, "referral-link-declined")
    body = referral.client("ops").get(f"/referrals/{rid}").json()
    assert body["status"] == "declined" and body["decline_reason"] == "capacity"
    assert body["history"][-1]["detail"] == "Plus de place avant janvier ; voir le CCAS de Rouen."


def test_a_form_error_is_announced_next_to_its_field(page, check_page, referral):
    rid = record_need(referral.svc)
    page.goto(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock()))
    page.locator("#decline-reason").select_option("other")
    page.get_by_role("button", name="Décliner la demande").click()

    assert page.get_by_role("alert").first.inner_text().startswith("Le formulaire contient une erreur")
    detail = page.get_by_label("Précisions")
    assert detail.get_attribute("aria-invalid") == "true"
    assert "decline-detail-erreur" in detail.get_attribute("aria-describedby")
    check_page(page, "referral-link-form-error")
    assert referral.client("ops").get(f"/referrals/{rid}").json()["status"] == "assigned"


def test_sign_in_inbox_and_referral_pages_on_desk_and_phone(page, check_page, referral):
    now = referral.svc.clock()
    late = record_need(
        referral.svc,
        summary="Attestation de paiement introuvable",
        urgency="urgent",
        recorded_at=now - timedelta(hours=80),
    )
    record_need(referral.svc, summary="Changement de situation à déclarer", recorded_at=now - timedelta(hours=30))

    page.goto(f"{referral.url}/boite")
    assert page.url.endswith("/connexion")
    check_page(page, "sign-in")
    page.get_by_label("Adresse e-mail").fill("op@caf.test.example")
    page.get_by_role("button", name="Recevoir un lien de connexion").click()
    assert "Si cette adresse est connue" in page.get_by_role("status").inner_text()
    check_page(page, "sign-in-sent")

    link, _ = sign_in_link(referral.settings, "referral", "op-caf", now=referral.svc.clock())
    sign_in_in_browser(page, link)
    assert page.url.endswith("/boite")
    expect(page.locator(".cards > li")).to_have_count(2)
    expect(page.locator(".cards > li").first.get_by_text("En retard")).to_be_visible()
    check_page(page, "inbox")
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "inbox-phone")

    page.get_by_role("link", name=re.compile("Allocations familiales")).first.click()
    assert page.url.endswith(f"/boite/{late}")
    check_page(page, "referral-signed-in-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    page.get_by_role("link", name="Retour aux demandes").click()
    page.get_by_label("Statut").select_option("closed")
    page.get_by_role("button", name="Filtrer").click()
    assert page.url.endswith("/boite?q=&statut=closed")  # the search box (empty) and the filter are one form
    assert "Aucune demande ne correspond à ce filtre." in page.get_by_role("status").inner_text()
    check_page(page, "inbox-filtered-empty")

    page.get_by_role("button", name="Se déconnecter").click()
    assert page.url.endswith("/connexion?fin=1")


def test_an_expired_link_page(page, check_page, referral):
    rid = record_need(referral.svc)
    page.goto(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock() - timedelta(days=40)))
    assert page.get_by_role("heading", level=1).inner_text() == "Lien expiré"
    check_page(page, "referral-link-expired")
