"""The partner inbox reads at a glance (issue 14, point 5), in a real browser (Debian's chromium driven by Playwright,
the pages' CSP enforced): untreated referrals first, then by deadline; each line with the category, the person's first
name and initials, the library, the deadline in words and whether the desk waits; a count per status and in the menu;
a decline with a structured reason that the desk then reads on its need page. axe-core on every page, at 1280 px and
390 px; screenshots under test-artifacts/browser/."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, sign_in_in_browser, wait_for
from tests.helpers import record_need

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

PHONE = {"width": 390, "height": 844}
CAF = "Allocations familiales (CAF)"


def ids_in_order(page) -> list[str]:
    hrefs = page.locator(".cards > li a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    return [href.rsplit("/", 1)[1] for href in hrefs]


def test_the_inbox_at_a_glance_and_a_structured_decline_the_desk_reads(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    svc, now = referral.svc, referral.svc.clock()

    # Four referrals for the CAF: one late, one accepted (its deadline the soonest of the open ones after the late
    # one, yet listed last: it is treated), one due in about 12 h, and one the desk records now through intake.
    late = record_need(svc, person={"display_name": "Jean-Luc Martin"}, recorded_at=now - timedelta(hours=80))
    accepted = record_need(svc, person={"display_name": "Sophie Bernard"}, recorded_at=now - timedelta(hours=65))
    soon = record_need(svc, person={"display_name": "Karim"}, urgency="urgent", recorded_at=now - timedelta(hours=60))
    caf = referral.client("caf")
    assert caf.post(f"/referrals/{accepted}/accept").status_code == 200
    answer = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Prime d'activité suspendue",
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": "Élodie Durand", "phone": "0612345678", "preferred_channel": "none"},
        },
    )
    assert answer.status_code == 201, answer.text
    need = answer.json()
    [fresh] = wait_for(lambda: caf.get("/referrals", params={"need_id": need["id"]}).json()["items"])
    fresh_id = fresh["id"]

    # --- the partner's inbox: order, lines, counts
    sign_in_in_browser(page, sign_in_link(referral.settings, "referral", "op-caf", now=svc.clock())[0])
    assert page.url.endswith("/boite")
    assert ids_in_order(page) == [late, soon, fresh_id, accepted]
    menu = page.get_by_role("navigation", name="Menu principal")
    expect(menu.get_by_role("link", name="À traiter (3)")).to_be_visible()
    tabs = page.get_by_role("navigation", name="Nombre de demandes par état")
    for name in ("En cours (4)", "À traiter (3)", "Acceptées (1)", "Réponse donnée (0)", "Toutes (4)"):
        expect(tabs.get_by_role("link", name=name), name).to_be_visible()

    lines = page.locator(".cards > li")
    first = lines.nth(0).inner_text()
    assert f"{CAF} · Jean-Luc M." in first and "Martin" not in first  # first name and initials only
    assert "Bibliothèque du Châtelet" in first and "en retard de 8 h" in first
    assert "l'accueil attend votre réponse" in first
    second = lines.nth(1).inner_text()
    assert "K." in second and "Urgent" in second and "l'accueil attend votre réponse" in second
    assert re.search(r"à répondre (aujourd'hui|demain) avant \d+ h", second), second  # in words, not a date
    third = lines.nth(2).inner_text()
    assert "Élodie D." in third and "Durand" not in third and need["reference"] in third
    last = lines.nth(3).inner_text()
    assert "Sophie B." in last and "l'accueil attend l'issue" in last and "attend votre réponse" not in last
    check_page(page, "inbox-glance-desk")
    page.set_viewport_size(PHONE)
    check_page(page, "inbox-glance-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    tabs.get_by_role("link", name="À traiter (3)").click()
    assert ids_in_order(page) == [late, soon, fresh_id]
    assert tabs.get_by_role("link", name="À traiter (3)").get_attribute("aria-current") == "page"

    # --- the referral: what Accepter and Répondre mean is on the buttons; decline with a structured reason
    page.locator(f".cards > li a[href='/boite/{fresh_id}']").click()
    expect(page.get_by_role("button", name="Accepter : je prends, je rappellerai")).to_be_visible()
    expect(page.get_by_role("button", name="Répondre : envoyer le message à l'accueil")).to_be_visible()
    reasons = page.locator("#decline-reason option").all_inner_texts()
    assert reasons == [
        "Choisir un motif",
        "Hors de nos compétences",
        "Hors de notre territoire",
        "Capacité atteinte",
        "Personne déjà suivie chez nous",
        "Autre motif",
    ]
    page.set_viewport_size(PHONE)
    check_page(page, "referral-decline-form-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    page.get_by_label("Motif").select_option(label="Personne déjà suivie chez nous")
    page.get_by_label("Précisions").fill("Déjà accompagnée par notre assistante sociale de secteur.")
    page.get_by_role("button", name="Décliner la demande").click()
    assert page.get_by_role("status").first.inner_text().startswith("Vous avez décliné cette demande")
    assert "motif : Personne déjà suivie chez nous" in page.locator("main").inner_text()
    check_page(page, "referral-declined-with-reason")
    assert referral.client("ops").get(f"/referrals/{fresh_id}").json()["decline_reason"] == "already_followed"

    page.get_by_role("link", name="Retour aux demandes").click()
    expect(
        page.get_by_role("navigation", name="Menu principal").get_by_role("link", name="À traiter (2)")
    ).to_be_visible()
    assert fresh_id not in ids_in_order(page)  # it left the partner: not among the open ones

    # --- the desk reads the reason on its need's page
    wait_for(
        lambda: any(
            h["event"] == "referral.declined" and h["reason_code"] == "already_followed"
            for h in intake.client("desk").get(f"/needs/{need['id']}").json()["history"]
        )
    )
    sign_in_in_browser(page, sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())[0])
    page.goto(f"{intake.url}/demandes/{need['id']}")
    history = page.locator("ol.history").inner_text()
    assert "Déclinée par CAF de la Seine-Maritime" in history
    assert "Motif : Personne déjà suivie chez nous" in history
    assert "Déjà accompagnée par notre assistante sociale de secteur." in history
    check_page(page, "desk-need-declined-reason")
    page.set_viewport_size(PHONE)
    check_page(page, "desk-need-declined-reason-phone")
