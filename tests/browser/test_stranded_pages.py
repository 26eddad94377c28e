"""No need is stranded, in a real browser (Debian's chromium driven by Playwright, the pages' CSP enforced): a need
no partner takes is told plainly to the desk (what the coordination does, by when; no "Dans les délais"), shows
under "Sans partenaire" at the top of the ops dashboard with why, ops hand it to a partner through a confirmation
page whose button names that partner, it leaves the list, and the desk's page of the need shows the partner.
axe-core on every page (no serious violation); screenshots under test-artifacts/browser/."""

from __future__ import annotations

from datetime import datetime

import pytest
from playwright.sync_api import expect

from shared.pages import deadline_fr
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

CPAM = "CPAM Rouen-Elbeuf-Dieppe"


def test_a_need_nobody_takes_is_handed_to_a_partner_by_ops_and_the_desk_sees_it(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "logement",  # no partner of the test directory takes it
            "summary": "Expulsion annoncée",
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": "Mme Durand"},
        },
    )
    assert r.status_code == 201, r.text
    need = r.json()
    deadline = deadline_fr(datetime.fromisoformat(need["respond_by"]), "Europe/Paris")

    # --- the desk: the confirmation says nobody took it, what the coordination does and by when
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{intake.url}/demandes/{need['id']}/enregistree")
    live = page.locator("#suivi")
    live.get_by_text("Aucun partenaire", exact=True).wait_for()
    text = live.inner_text()
    assert "Ce que fait la coordination" in text and f"confier la demande à un partenaire {deadline}" in text
    page.reload()  # the banner is drawn at load: nothing green once referral found nobody
    assert "aucun partenaire ne peut la prendre" in page.get_by_role("status").first.inner_text()
    assert page.locator(".notice-ok").count() == 0
    check_page(page, "stranded-desk-confirmation")
    page.goto(f"{intake.url}/demandes/{need['id']}")
    badges = page.locator("#etat .badges").inner_text()
    assert "Sans partenaire : la coordination cherche" in badges and "Dans les délais" not in badges
    page.goto(f"{intake.url}/demandes")
    card = page.locator(".cards > li").filter(has_text="Logement – Mme Durand")
    assert "Dans les délais" not in card.inner_text()
    check_page(page, "stranded-desk-my-needs")

    # --- ops: the list at the top of the dashboard, with why in words
    link, _ = sign_in_link(referral.settings, "referral", "ops", now=referral.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{referral.url}/tableau-de-bord")
    section = page.locator("#sans-partenaire")
    assert page.locator("#chiffres > section").first.get_attribute("id") == "sans-partenaire"  # first of all
    assert section.get_by_role("heading", level=2).inner_text() == "Sans partenaire (1)"
    row = section.locator("tbody tr")
    expect(row).to_have_count(1)
    assert "Logement – Bibliothèque du Châtelet" in row.inner_text()
    assert "Aucun partenaire de l'annuaire ne traite cette thématique." in row.inner_text()
    assert need["id"] not in row.inner_text()  # no internal id shown
    check_page(page, "stranded-dashboard")

    # --- hand it to a partner: choose it, then a confirmation whose button names it
    row.get_by_role("link", name="Confier à un partenaire").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Confier une demande sans partenaire"
    check_page(page, "stranded-choose-partner")
    page.get_by_label("Partenaire").select_option(label=CPAM)
    page.get_by_role("button", name="Continuer").click()
    button = page.get_by_role("button", name=f"Confier à {CPAM}")
    expect(button).to_be_visible()
    assert page.get_by_label("Référent qui reçoit la demande").input_value() == "cpam-ref"
    button.click()  # without a reason: the form says what to fix, nothing is done
    assert page.get_by_role("alert").first.inner_text().startswith("Le formulaire contient une erreur")
    assert page.get_by_label("Motif").get_attribute("aria-invalid") == "true"
    check_page(page, "stranded-confirm-error")
    page.set_viewport_size(VIEWPORT_PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_PHONE["width"]
    check_page(page, "stranded-confirm-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    page.get_by_label("Motif").fill("Accord de la CPAM au téléphone")
    page.get_by_role("button", name=f"Confier à {CPAM}").click()
    assert page.url.endswith("/tableau-de-bord?fait=confier")
    assert "La demande est confiée au partenaire" in page.get_by_role("status").first.inner_text()
    section = page.locator("#sans-partenaire")
    assert section.get_by_role("heading", level=2).inner_text() == "Sans partenaire (0)"
    assert "Toutes les demandes ont un partenaire." in section.inner_text()
    check_page(page, "stranded-dashboard-after")

    # --- the desk's page of the need shows the partner, and when it must answer
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{need['id']}").json()["partner_id"] == "cpam-76")
    page.goto(f"{intake.url}/demandes/{need['id']}")
    state = page.locator("#etat")
    assert f"Partenaire : {CPAM}" in state.inner_text() and "Transmise au partenaire" in state.inner_text()
    assert f"Réponse attendue {deadline}." in state.inner_text()  # the deadline did not move
    assert f"Transmise à {CPAM}" in page.locator(".history").inner_text()
    check_page(page, "stranded-desk-need-after")
