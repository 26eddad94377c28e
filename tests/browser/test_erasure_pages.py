"""A desk erases a person's data from the need's page, in a real browser: the confirmation page says what will
happen, refuses a form without a reason or the confirmation box, then the need shows the marker, and the person's
printable file is there to print before. axe-core on every page; screenshots under test-artifacts/browser/."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from shared.people import ERASED
from shared.signin import sign_in_link
from shared.testing import sign_in_in_browser, tab_to, wait_for

pytestmark = [pytest.mark.browser]

NAME, SUMMARY = "Mme Quidam-Essai", "Facture d'énergie impayée, coupure annoncée"


def test_a_desk_reads_what_erasure_does_then_erases_the_persons_data(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    need = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": SUMMARY,
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": NAME, "email": "quidam@example.org"},
        },
    )
    assert need.status_code == 201, need.text
    need_id = need.json()["id"]
    assert wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])

    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{intake.url}/demandes/{need_id}")
    expect(page.locator("#donnees-personne")).to_contain_text("Exporter les données de la personne")
    check_page(page, "desk-need-person-data")

    # The file to print for the person: their need and its messages.
    page.goto(f"{intake.url}/demandes/{need_id}/dossier")
    expect(page.get_by_role("heading", level=1)).to_have_text("Vos données dans Relais")
    expect(page.locator("main")).to_contain_text(SUMMARY)
    expect(page.locator("main")).to_contain_text(NAME)
    check_page(page, "desk-person-file")
    page.emulate_media(media="print")
    assert page.locator(".site-header").is_hidden()
    page.emulate_media(media="screen")

    # The confirmation page, reached by the keyboard from the need's page.
    page.goto(f"{intake.url}/demandes/{need_id}")
    tab_to(page, 'a[href$="/effacer"]')
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Effacer les données de la personne")
    said = page.locator("#ce-qui-sera-efface").inner_text()
    assert "nom" in said and "téléphone" in said and "messages" in said
    expect(page.locator("main")).to_contain_text("C'est définitif.")
    check_page(page, "desk-erase-confirm")

    # Sent without a reason nor the box: nothing is erased, the errors say what to fix.
    with page.expect_navigation():
        page.get_by_role("button", name="Effacer définitivement les données").click()
    expect(page.get_by_role("alert")).to_contain_text("Indiquez pourquoi")
    expect(page.get_by_role("alert")).to_contain_text("Cochez la case")
    check_page(page, "desk-erase-errors")
    assert intake.client("desk").get(f"/needs/{need_id}").json()["summary"] == SUMMARY

    page.get_by_label("Motif de l'effacement").fill("Demande de la personne au guichet")
    page.get_by_label("J'ai lu ce qui va se passer").check()
    with page.expect_navigation():
        page.get_by_role("button", name="Effacer définitivement les données").click()
    assert page.url.endswith(f"/demandes/{need_id}?fait=effacement")
    expect(page.get_by_role("status").filter(has_text="effacement")).to_be_visible()
    expect(page.locator(".summary-text")).to_have_text(ERASED)
    expect(page.locator("#donnees-effacees")).to_contain_text("Données effacées à la demande de la personne le")
    assert page.locator('a[href$="/effacer"]').count() == 0
    assert NAME not in page.content() and SUMMARY not in page.content()
    check_page(page, "desk-need-erased")

    # The erase page of an erased person says so, and offers nothing more.
    page.goto(f"{intake.url}/demandes/{need_id}/effacer")
    expect(page.locator("#deja-efface")).to_be_visible()
    assert page.get_by_role("button", name="Effacer définitivement les données").count() == 0
