"""Screenshots of every page of Relais at 1280 px (a desk computer) and 390 px (a phone), for anyone to look at.

    ./dev screenshots            # or: .venv/bin/python -m pytest -p no:randomly tests/browser/screenshots.py

It starts the three services as the browser tests do (real Redis, SQLite, an SMTP sink, the test directory),
records a few needs through the API (one handed to the CAF, one answered, one declined, one nobody takes), signs
in as a front desk, a partner and the coordination in Debian's chromium, and saves each page under
`test-artifacts/screenshots/<page>-<width>.png` (not committed). It ends with a table of each page's height on
a phone (in px and in phone screens of 740 px) and whether anything is wider than the screen: the figures the
product pass compares before and after. Not part of the test run (the file name does not start with test_);
each page still goes through axe-core here, so a broken page shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import ServiceName
from shared.signin import sign_in_link
from shared.testing import sign_in_in_browser, wait_for
from tests.helpers import RunningService

pytestmark = [pytest.mark.browser]

OUT = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
WIDTHS = {1280: 900, 390: 740}  # width: the screen's height
NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "summary": "Dossier APL bloqué depuis trois mois",
    "postal_code": "76000",
    "consent": True,
    "person": {"display_name": "Élodie Durand", "phone": "06 12 34 56 78"},
}


def _post_need(intake, **changes) -> dict:
    r = intake.client("desk").post("/needs", json={**NEED, **changes})
    assert r.status_code == 201, r.text
    return r.json()


def _referral_of(referral, need_id: str) -> dict:
    def found():
        page = referral.client("ops").get("/referrals", params={"need_id": need_id}).json()
        return page["items"][0] if page["items"] else None

    return wait_for(found)


def test_screenshots_of_every_page(page, settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)

    handed = _post_need(intake)
    answered = _post_need(intake, summary="Changement de situation à déclarer", urgency="urgent")
    declined = _post_need(intake, category="sante", summary="Carte vitale perdue")
    stranded = _post_need(intake, category="logement", summary="Expulsion annoncée")
    caf = _referral_of(referral, handed["id"])
    accepted = _referral_of(referral, answered["id"])["id"]
    r = referral.client("caf").post(f"/referrals/{accepted}/accept", json={})
    assert r.status_code == 200, r.text
    r = referral.client("caf").post(f"/referrals/{accepted}/respond", json={"message": "Rendez-vous fixé jeudi."})
    assert r.status_code == 200, r.text
    cpam = _referral_of(referral, declined["id"])
    r = referral.client("cpam").post(f"/referrals/{cpam['id']}/decline", json={"reason": "Hors de notre secteur"})
    assert r.status_code == 200, r.text
    wait_for(lambda: notifications.client("ops").get("/deliveries").json()["items"])

    signed_in: dict[str, tuple[RunningService, ServiceName, str]] = {
        "intake": (intake, "intake", "desk"),
        "referral-partner": (referral, "referral", "op-caf"),
        "referral-ops": (referral, "referral", "ops"),
        "notifications": (notifications, "notifications", "ops"),
    }
    urls = {
        "intake": [
            ("desk-new-need", "/nouvelle"),
            ("desk-my-needs", "/demandes"),
            ("desk-need", f"/demandes/{answered['id']}"),
            ("desk-need-declined", f"/demandes/{declined['id']}"),
            ("desk-need-stranded", f"/demandes/{stranded['id']}"),
            ("desk-confirmation", f"/demandes/{handed['id']}/enregistree"),
            ("desk-receipt", f"/demandes/{handed['id']}/recu"),
            ("desk-person-file", f"/demandes/{handed['id']}/dossier"),
            ("desk-erase", f"/demandes/{handed['id']}/effacer"),
            ("desk-figures", "/chiffres"),
        ],
        "referral-partner": [
            ("partner-inbox", "/boite"),
            ("partner-referral", f"/boite/{caf['id']}"),
        ],
        "referral-ops": [
            ("ops-dashboard", "/tableau-de-bord"),
            ("ops-technical", "/tableau-de-bord/technique"),
            ("ops-need", f"/tableau-de-bord/demandes/{stranded['id']}"),
            ("ops-incidents", "/tableau-de-bord/incidents"),
            ("ops-new-incident", "/tableau-de-bord/incidents/nouveau"),
        ],
        "notifications": [
            ("outbox", "/envois"),
        ],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for who, (service, service_name, user) in signed_in.items():
        page.set_viewport_size({"width": 1280, "height": 900})
        sign_in_in_browser(page, sign_in_link(service.settings, service_name, user, now=service.svc.clock())[0])
        for name, path in urls[who]:
            for width, height in WIDTHS.items():
                page.set_viewport_size({"width": width, "height": height})
                page.goto(service.url + path)
                page.screenshot(path=str(OUT / f"{name}-{width}.png"), full_page=True)
                if width == 390:
                    size = page.evaluate(
                        "() => [document.documentElement.scrollHeight, document.documentElement.scrollWidth]"
                    )
                    rows.append((name, size[0], size[0] / height, size[1]))
    # A partner's full page: 50 referrals in the inbox, measured on a phone (the height one line takes).
    for i in range(50 - 2):
        _post_need(intake, summary=f"Demande {i}")
    wait_for(lambda: len(referral.client("caf").get("/referrals", params={"limit": 100}).json()["items"]) >= 50, 60)
    page.set_viewport_size({"width": 1280, "height": 900})
    sign_in_in_browser(page, sign_in_link(referral.settings, "referral", "op-caf", now=referral.svc.clock())[0])
    page.set_viewport_size({"width": 390, "height": 740})
    page.goto(f"{referral.url}/boite")
    page.screenshot(path=str(OUT / "partner-inbox-50-390.png"), full_page=True)
    lines = page.locator("main li:has(a[href*='/boite/'])").count()
    height = page.evaluate("() => document.documentElement.scrollHeight")
    rows.append((f"partner-inbox-{lines}-lines", height, height / 740, 390))
    for name in ("connexion", "donnees-personnelles", "accessibilite"):
        for width, height in WIDTHS.items():
            page.set_viewport_size({"width": width, "height": height})
            page.goto(f"{intake.url}/{name}")
            page.screenshot(path=str(OUT / f"public-{name}-{width}.png"), full_page=True)
    print(f"\nScreenshots in {OUT} ({len(list(OUT.glob('*.png')))} files)\n")
    print(f"{'page at 390 px':<24} {'height px':>9} {'screens':>8} {'width px':>9}")
    for name, h, screens, w in rows:
        print(f"{name:<24} {h:>9} {screens:>8.1f} {w:>9}{'  WIDER THAN THE PHONE' if w > 390 else ''}")
