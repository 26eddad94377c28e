"""The desk acts on its needs, in a real browser (Debian's chromium driven by Playwright, the pages' CSP enforced):
a partner's answer shows as "Réponses à lire (1)" in the menu and "À lire" in "Mes demandes" until the desk opens
the need; there the desk sends information to the partner (an error in French next to the field first), nudges it
(then sees when it may nudge again), and closes the need; the partner's page shows the information and the close.
axe-core on every page (no serious or critical violation), at 1280 px and 390 px; screenshots under
test-artifacts/browser/."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, sign_in_in_browser, wait_for
from tests.helpers import search

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

NOTE = "La personne a reçu le courrier de la CAF ; elle est joignable le matin."


def test_the_desk_reads_an_answer_adds_information_nudges_and_closes(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    needs = []
    for summary in ("Dossier APL bloqué", "Changement de situation"):
        r = intake.client("desk").post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": summary,
                "postal_code": "76000",
                "consent": True,
                "person": {"display_name": "Mme Durand"},
            },
        )
        assert r.status_code == 201, r.text
        needs.append(r.json())
    answered, other = needs

    def routed(need_id: str) -> dict | None:
        need = intake.client("desk").get(f"/needs/{need_id}").json()
        return need if need["status"] == "referred" else None

    assert wait_for(lambda: routed(other["id"]))
    referral_id = wait_for(lambda: routed(answered["id"]))["referral_id"]
    r = referral.client("caf").post(f"/referrals/{referral_id}/accept")
    assert r.status_code == 200, r.text
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{answered['id']}").json()["answers_unread"])

    # --- "Mes demandes": the menu counts the answers to read, the list flags the need
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{intake.url}/demandes")
    menu = page.get_by_role("link", name="Réponses à lire (1)")
    expect(menu).to_have_count(1)
    cards = page.locator(".cards > li")
    flagged = cards.filter(has_text="Dossier APL bloqué")
    assert "À lire" in flagged.locator(".badges").inner_text()
    assert "À lire" not in cards.filter(has_text="Changement de situation").locator(".badges").inner_text()
    check_page(page, "desk-actions-my-needs")
    menu.click()
    expect(page.locator(".cards > li")).to_have_count(1)
    assert page.get_by_role("link", name="Réponses à lire (1)").get_attribute("aria-current") == "page"

    # --- the need's page: read, so no longer counted; the actions
    flagged_link = page.locator(".cards > li h2 a").first
    flagged_link.click()
    page.wait_for_url(f"**/demandes/{answered['id']}")
    expect(page.get_by_role("heading", name="Agir sur la demande")).to_have_count(1)
    check_page(page, "desk-actions-need")
    page.reload()
    assert page.get_by_role("link", name="Réponses à lire (1)").count() == 0

    # information for the partner: the error in French next to the field, then sent
    box = page.get_by_label("Information", exact=True)
    box.fill("   ")
    box.evaluate("e => e.removeAttribute('required')")  # what a browser without validation sends
    page.get_by_role("button", name="Envoyer l'information").click()
    error = page.locator("#note-erreur")
    assert "Écrivez l'information avant de l'envoyer." in error.inner_text()
    assert page.get_by_label("Information", exact=True).get_attribute("aria-invalid") == "true"
    assert "note-erreur" in (page.get_by_label("Information", exact=True).get_attribute("aria-describedby") or "")
    check_page(page, "desk-actions-note-error")
    page.get_by_label("Information", exact=True).fill(NOTE)
    page.get_by_role("button", name="Envoyer l'information").click()
    assert "L'information est transmise au partenaire." in page.get_by_role("status").first.inner_text()

    # nudge: done, then the page says from when it is possible again
    page.get_by_role("button", name="Relancer le partenaire").click()
    assert "Le partenaire est relancé par e-mail." in page.locator("#action-faite").inner_text()
    assert "Nouvelle relance possible à partir du" in page.locator("#relance-attente").inner_text()
    assert page.get_by_role("button", name="Relancer le partenaire").count() == 0
    check_page(page, "desk-actions-nudged")

    # the phone: nothing wider than the screen, still accessible
    page.set_viewport_size(VIEWPORT_PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_PHONE["width"]
    check_page(page, "desk-actions-need-phone")
    page.goto(f"{intake.url}/demandes")
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_PHONE["width"]
    check_page(page, "desk-actions-my-needs-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    # close: the person no longer needs help
    page.goto(f"{intake.url}/demandes/{answered['id']}")
    page.get_by_label("Pourquoi la personne n'a plus besoin d'aide").fill("Démarche faite avec son fils")
    page.get_by_role("button", name="Clôturer la demande").click()
    assert "La demande est clôturée." in page.locator("#action-faite").inner_text()
    assert page.get_by_role("button", name="Clôturer la demande").count() == 0
    check_page(page, "desk-actions-closed")

    # --- the partner's page: the information and the close by the desk
    def closed() -> bool:
        return referral.client("ops").get(f"/referrals/{referral_id}").json()["status"] == "closed"

    assert wait_for(closed)
    mails = [m for m in mail_sink.messages if "Information ajoutée" in m["subject"]]
    assert mails
    partner_link = search(
        r"Ouvrir la demande : (\S+)", mails[0]["message"].get_body(preferencelist=("plain",)).get_content()
    ).group(1)
    assert httpx.get(partner_link, timeout=30).status_code == 200
    page.goto(partner_link)
    notes = page.locator("#informations-accueil")
    assert NOTE in notes.inner_text()
    assert "la personne n'a plus besoin d'aide" in page.locator("#cloturee-par-accueil").inner_text()
    assert "Démarche faite avec son fils" in page.locator("#cloturee-par-accueil").inner_text()
    check_page(page, "desk-actions-partner-page")
