"""The coordinator's journey in a real browser (Debian's chromium driven by Playwright, the pages' CSP enforced), at
1280 and 390 px: the dashboard opens on what needs a person (needs without a partner, today's escalations and
breaches, partners that stopped answering) under a header that says "Coordination", with the technical health in
one line; the technical tab (plain links, aria-current) holds the queues, outboxes and clock; a need is cancelled
from its own page, through a confirmation that names it and whose button says the action. axe-core on every page
(no serious or critical violation); screenshots under test-artifacts/browser/."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

PHONE = {"width": 390, "height": 844}
NEED = "Logement – Bibliothèque du Châtelet"


def at_both_widths(page, check_page, name: str) -> None:
    """axe-core and a screenshot at 1280 px, then at 390 px (no sideways scrolling), then back to 1280 px."""
    check_page(page, name)
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
    check_page(page, f"{name}-phone")
    page.set_viewport_size(VIEWPORT_DESK)


def test_the_coordinator_sees_what_needs_a_person_first_and_cancels_a_need_from_its_page(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    desk = intake.client("desk")
    needs = {}
    for category in ("caf", "logement"):  # no partner of the test directory takes "logement": it is stranded
        r = desk.post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": category,
                "summary": "x",
                "postal_code": "76000",
                "consent": True,
            },
        )
        assert r.status_code == 201, r.text
        needs[category] = r.json()
    ops = referral.client("ops")

    def calm() -> bool:
        """Both needs routed (or not) and every message out: nothing technical left to report."""
        board = ops.get("/dashboard").json()
        totals = board["deliveries"]["data"]["totals"] if board["deliveries"]["available"] else {}
        return (
            board["stranded"]["count"] == 1
            and board["deadlines"]["open_total"] == 1
            and totals.get("sent", 0) >= 1
            and not totals.get("queued")
            and not totals.get("failed")
        )

    assert wait_for(calm, 30), ops.get("/dashboard").json()

    link, _ = sign_in_link(referral.settings, "referral", "ops", now=referral.svc.clock())
    sign_in_in_browser(page, link)
    page.goto(f"{referral.url}/tableau-de-bord")

    # --- the first tab: what needs a person, under "Coordination"
    assert page.locator(".site-header .area").inner_text() == "Coordination"
    tabs = page.get_by_role("navigation", name="Onglets du tableau de bord")
    assert tabs.get_by_role("link", name="À traiter").get_attribute("aria-current") == "page"
    assert tabs.get_by_role("link", name="Technique").get_attribute("aria-current") is None
    sections = page.locator("#chiffres > section").evaluate_all("s => s.map(e => e.id)")
    assert sections[:4] == ["sans-partenaire", "du-jour", "ne-repondent-plus", "echeances"]
    assert page.locator("#files, #horloge, #envois").count() == 0  # the technical figures are on the other tab
    health = page.locator("#etat-technique")
    assert "Tout circule normalement." in health.inner_text()
    assert "Sans partenaire (1)" in page.locator("#titre-sans-partenaire").inner_text()
    assert "Aucune escalade ni aucun délai dépassé aujourd'hui." in page.locator("#du-jour").inner_text()
    assert "Tous les partenaires répondent." in page.locator("#ne-repondent-plus").inner_text()
    text = page.locator("#chiffres").inner_text()
    for internal in (needs["logement"]["id"], "caf-76", "chatelet"):
        assert internal not in text, internal  # names from the directory, never ids
    at_both_widths(page, check_page, "coordinator-first-tab")

    # --- the second tab: queues, outboxes, the clock; plain links, no JavaScript needed
    health.get_by_role("link", name="Voir l'onglet Technique").click()
    assert page.url.endswith("/tableau-de-bord/technique")
    tabs = page.get_by_role("navigation", name="Onglets du tableau de bord")
    assert tabs.get_by_role("link", name="Technique").get_attribute("aria-current") == "page"
    for part in ("#alertes", "#files", "#horloge", "#envois", "#fermer-sessions"):
        expect(page.locator(part), part).to_be_visible()
    assert "Tout circule normalement" in page.locator("#alertes").inner_text()
    at_both_widths(page, check_page, "coordinator-technical-tab")
    tabs.get_by_role("link", name="À traiter").click()

    # --- the need's page, from the list of needs without a partner
    page.locator("#sans-partenaire").get_by_role("link", name=NEED, exact=True).click()
    assert page.url.endswith(f"/tableau-de-bord/demandes/{needs['logement']['id']}")
    assert page.get_by_role("heading", level=1).inner_text() == NEED
    assert needs["logement"]["reference"] in page.locator("#la-demande").inner_text()
    assert "Sans partenaire depuis le" in page.locator("main").inner_text()
    at_both_widths(page, check_page, "coordinator-need")

    # --- cancel it from there: the confirmation names the need, its button says the action
    page.get_by_role("link", name="Annuler la demande (enregistrée par erreur)").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Annuler une demande enregistrée par erreur"
    facts = page.locator("#la-demande").inner_text()
    assert NEED in facts and needs["logement"]["reference"] in facts
    assert needs["logement"]["id"] not in page.locator("main").inner_text()
    button = page.get_by_role("button", name=f"Annuler la demande {NEED}")
    expect(button).to_be_visible()
    at_both_widths(page, check_page, "coordinator-confirm-cancel")
    button.click()  # without a reason: the form says what to fix, nothing is done
    assert page.get_by_role("alert").first.inner_text().startswith("Le formulaire contient une erreur")
    assert page.get_by_label("Motif").get_attribute("aria-invalid") == "true"
    check_page(page, "coordinator-confirm-cancel-error")
    page.get_by_label("Motif").fill("Saisie en double")
    page.get_by_role("button", name=f"Annuler la demande {NEED}").click()
    assert page.url.endswith("/tableau-de-bord?fait=annuler")
    assert "La demande est annulée" in page.get_by_role("status").first.inner_text()
    assert wait_for(lambda: ops.get("/dashboard").json()["stranded"]["count"] == 0)
    page.reload()
    assert "Sans partenaire (0)" in page.locator("#titre-sans-partenaire").inner_text()
    actions = page.locator("#actions-recentes").inner_text()
    assert f"la demande {needs['logement']['reference']}" in actions and "Saisie en double" in actions
    check_page(page, "coordinator-after-cancel")
    assert not page.console_problems
