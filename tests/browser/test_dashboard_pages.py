"""The ops dashboard in a real browser (Debian's chromium driven by Playwright) with its Content-Security-Policy
enforced: the figures shown are the API's, they refresh in place without a reload, an action goes through its
confirmation page; the charts are drawn by the vendored uPlot from the API's figures (again after a refresh, at
phone and desk widths), and without JavaScript their tables show instead; no request leaves 127.0.0.1. With the
other services down the page still shows, with those parts marked unavailable; a partner gets 403. axe-core on
every page (no serious violation); screenshots under test-artifacts/browser/."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect

from shared.messaging import DATA_FIELD
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, need_recorded, sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"  # as conftest's check_page


def sign_in(page, referral, user_id: str) -> None:
    link, _ = sign_in_link(referral.settings, "referral", user_id, now=referral.svc.clock())
    sign_in_in_browser(page, link)


def cell(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


CHARTS_JS = """() => Array.from(document.querySelectorAll('#chiffres figure[data-chart]')).map(f => {
    const plot = f.querySelector('.chart-plot[aria-hidden="true"] .uplot');
    return {id: f.id, data: JSON.parse(f.dataset.chart), open: f.querySelector('details').open,
            drawn: plot !== null && plot.querySelector('canvas') !== null,
            width: plot ? plot.getBoundingClientRect().width : 0,
            box: f.querySelector('.chart-plot').getBoundingClientRect().width,
            rows: Array.from(f.querySelectorAll('tbody tr'))
                .map(r => Array.from(r.cells).map(c => c.textContent.trim()))};
})"""


def charts(page) -> dict[str, dict]:
    """Each chart figure: its JSON data, its table's rows, whether uPlot drew it (a canvas in its aria-hidden box)."""
    return {c["id"]: c for c in page.evaluate(CHARTS_JS)}


def check_charts(page, board: dict, opened: tuple[str, ...] = ()) -> dict[str, dict]:
    """Both charts are drawn by uPlot and show the API's figures, in their table and their drawing; their table is
    folded away unless the reader opened it (`opened`)."""
    shown = charts(page)
    assert set(shown) == {"graphique-flux", "graphique-reponses"}
    zone = ZoneInfo(board["timezone"])
    expected = {
        "graphique-flux": [
            (f"{datetime.fromisoformat(b['start']).astimezone(zone).hour} h", b["count"])
            for b in board["charts"]["needs_per_hour"]
        ],
        "graphique-reponses": [(b["label"], b["count"]) for b in board["charts"]["answer_times"]],
    }
    for name, bars in expected.items():
        chart = shown[name]
        assert chart["rows"] == [[label, str(count)] for label, count in bars]
        assert list(zip(chart["data"]["labels"], chart["data"]["counts"], strict=True)) == bars
        assert chart["drawn"] and chart["open"] is (name in opened)
    return shown


def requests_seen(page) -> list[str]:
    """Every URL the page asks for, from now on."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    return seen


def test_the_dashboard_shows_the_apis_figures_refreshes_itself_and_confirms_an_action(
    chromium, page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    desk = intake.client("desk")
    for category in ("caf", "caf", "sante"):
        assert (
            desk.post(
                "/needs",
                json={
                    "library_id": "chatelet",
                    "category": category,
                    "summary": "x",
                    "postal_code": "76000",
                    "consent": True,
                },
            ).status_code
            == 201
        )
    ops = referral.client("ops")

    def settled() -> dict | None:
        """The board once every message of these needs is out and nothing changes any more (a figure read while
        deliveries still move would differ from the page's)."""
        board = ops.get("/dashboard").json()
        totals = board["deliveries"]["data"]["totals"] if board["deliveries"]["available"] else {}
        if totals.get("sent", 0) < 3 or totals.get("queued", 0):
            return None
        time.sleep(0.5)
        again = ops.get("/dashboard").json()
        figures = lambda b: (b["deliveries"], b["deadlines"]["open_by_sla"], b["partners"])  # noqa: E731
        return board if figures(again) == figures(board) else None

    board = wait_for(settled, 30)
    assert board, "the deliveries never settled"

    seen = requests_seen(page)
    sign_in(page, referral, "ops")
    page.goto(f"{referral.url}/tableau-de-bord")
    assert page.get_by_role("heading", level=1).inner_text() == "Tableau de bord de la coordination"
    for state, count in board["deadlines"]["open_by_sla"].items():
        assert cell(page, f'td[data-sla="{state}"]') == str(count)
    caf = next(p for p in board["partners"] if p["id"] == "caf-76")
    assert cell(page, "#partenaire-caf-76 td:nth-of-type(1)") == f"{caf['open']} / ∞" == "2 / ∞"
    month = referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")).strftime("%Y-%m")
    report = next(r for r in board["reports"]["data"]["months"][0]["items"] if r["library_id"] == "chatelet")
    assert (
        cell(page, f'tr[data-library="chatelet"][data-month="{month}"] td:nth-of-type(3)')
        == str(report["needs"])
        == "3"
    )
    assert page.get_by_role("link", name="Tableau de bord").first.get_attribute("aria-current") == "page"
    assert page.get_by_role("link", name="À traiter").get_attribute("aria-current") == "page"
    # the technical tab: the deliveries (and queues, outboxes, clock)
    page.get_by_role("link", name="Technique", exact=True).click()
    assert page.url.endswith("/tableau-de-bord/technique")
    assert page.get_by_role("link", name="Technique", exact=True).get_attribute("aria-current") == "page"
    for status, count in board["deliveries"]["data"]["totals"].items():
        assert cell(page, f'tfoot td[data-status="{status}"]') == str(count)
    check_page(page, "dashboard-technical")
    page.get_by_role("link", name="À traiter").click()
    page.wait_for_function("() => window.relaisDashboardCharts && window.relaisDashboardCharts() === 2")
    drawn = check_charts(page, ops.get("/dashboard").json())
    assert sum(drawn["graphique-flux"]["data"]["counts"]) >= 3
    assert drawn["graphique-reponses"]["width"] == drawn["graphique-reponses"]["box"] == 768  # 48rem at most
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#graphiques").screenshot(path=str(ARTIFACTS / "dashboard-charts.png"))
    check_page(page, "dashboard")

    # without JavaScript, each chart's table is there, open: it is the chart
    plain = chromium.new_context(viewport=VIEWPORT_PHONE, locale="fr-FR", java_script_enabled=False)
    bare = plain.new_page()
    bare_seen = requests_seen(bare)
    sign_in(bare, referral, "ops")
    bare.goto(f"{referral.url}/tableau-de-bord")
    for name in ("flux", "reponses"):
        figure = bare.locator(f"#graphique-{name}")
        assert figure.locator("details").get_attribute("open") == ""
        assert figure.locator("table").is_visible() and figure.locator(".uplot").count() == 0
    bare.locator("#graphiques").screenshot(path=str(ARTIFACTS / "dashboard-charts-no-js.png"))
    plain.close()
    assert bare_seen and {urlsplit(u).hostname for u in bare_seen} == {"127.0.0.1"}

    # live: a new need appears after a refresh of the figures, without reloading the page
    marker = page.evaluate("() => { window.notReloaded = true; return true; }")
    assert (
        desk.post(
            "/needs",
            json={"library_id": "chatelet", "category": "caf", "summary": "x", "postal_code": "76000", "consent": True},
        ).status_code
        == 201
    )
    expected = str(board["deadlines"]["open_by_sla"]["on_track"] + 1)
    assert wait_for(lambda: ops.get("/dashboard").json()["deadlines"]["open_by_sla"]["on_track"] == int(expected))
    page.locator("#graphique-reponses summary").click()  # a reader opens a chart's table: kept open on refresh
    page.locator("#graphique-reponses summary").blur()  # (no refresh while the focus is in the figures)
    assert page.evaluate("() => window.relaisDashboardRefresh()") is True
    assert cell(page, 'td[data-sla="on_track"]') == expected
    assert marker and page.evaluate("() => window.notReloaded") is True
    assert page.evaluate("() => window.relaisDashboardCharts()") == 2
    board = ops.get("/dashboard").json()
    shown = check_charts(page, board, opened=("graphique-reponses",))
    assert sum(shown["graphique-flux"]["data"]["counts"]) == sum(drawn["graphique-flux"]["data"]["counts"]) + 1
    expect(page.locator("#chiffres .uplot")).to_have_count(2)  # the charts before the refresh are gone
    pause = page.get_by_role("button", name="Suspendre la mise à jour automatique")
    pause.click()
    assert (
        page.get_by_role("button", name="Reprendre la mise à jour automatique").get_attribute("aria-pressed") == "true"
    )
    page.set_viewport_size(VIEWPORT_PHONE)
    # wide tables scroll inside; the charts shrink to the phone's width
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#chiffres .uplot')).every("
        "p => p.getBoundingClientRect().width === p.parentNode.getBoundingClientRect().width)"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_PHONE["width"]
    assert all(300 <= c["width"] == c["box"] <= VIEWPORT_PHONE["width"] - 32 for c in charts(page).values())
    page.locator("#graphiques").screenshot(path=str(ARTIFACTS / "dashboard-charts-phone.png"))
    check_page(page, "dashboard-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    page.wait_for_function("() => document.querySelector('#chiffres .uplot').getBoundingClientRect().width === 768")

    # an action: its confirmation page asks for the reason, then the dashboard says it is done
    page.get_by_role("link", name="Mettre en pause CAF de la Seine-Maritime").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Mettre un partenaire en pause"
    check_page(page, "dashboard-confirm-pause")
    page.get_by_role("button", name="Mettre CAF de la Seine-Maritime en pause").click()
    assert page.get_by_role("alert").first.inner_text().startswith("Le formulaire contient une erreur")
    assert page.get_by_label("Motif").get_attribute("aria-invalid") == "true"
    check_page(page, "dashboard-confirm-pause-error")
    resume_on = (referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")) + timedelta(days=2)).date().isoformat()
    page.get_by_label("Reprise automatique le").fill(resume_on)
    page.get_by_label("Motif").fill("Fermeture exceptionnelle")
    page.get_by_role("button", name="Mettre CAF de la Seine-Maritime en pause").click()
    assert page.url.endswith("/tableau-de-bord?fait=pause")
    assert "Le partenaire est en pause" in page.get_by_role("status").first.inner_text()
    assert "En pause" in cell(page, "#partenaire-caf-76")
    check_page(page, "dashboard-after-pause")

    # the other confirmation pages, and a referral's page with its ops links
    page.get_by_role("link", name="Remettre en service CAF de la Seine-Maritime").click()
    check_page(page, "dashboard-confirm-resume")
    referral_id = ops.get("/referrals", params={"partner_id": "caf-76"}).json()["items"][0]["id"]
    page.goto(f"{referral.url}/boite/{referral_id}")
    check_page(page, "referral-as-ops")
    page.get_by_role("link", name="Réaffecter cette orientation à un autre partenaire").click()
    # expect() waits for the page the click opens (all_inner_texts() read the old one once: [] in CI)
    expect(page.get_by_label("Nouveau partenaire").locator("option")).to_have_text(
        ["Choisir un partenaire", "CAF plateforme nationale"]
    )
    check_page(page, "dashboard-confirm-reassign")
    page.get_by_label("Nouveau partenaire").select_option(label="CAF plateforme nationale")
    page.get_by_role("button", name="Continuer").click()  # then the confirmation, whose button names the partner
    expect(page.get_by_role("button", name="Réaffecter à CAF plateforme nationale")).to_be_visible()
    assert "Allocations familiales (CAF) – Bibliothèque du Châtelet" in page.locator("#la-demande").inner_text()
    check_page(page, "dashboard-confirm-reassign-chosen")
    page.goto(f"{referral.url}/boite/{referral_id}")
    page.get_by_role("link", name="Annuler la demande (enregistrée par erreur)").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Annuler une demande enregistrée par erreur"
    check_page(page, "dashboard-confirm-cancel")
    # everything the pages asked for (uPlot included) came from the services on 127.0.0.1
    assert seen and {urlsplit(u).hostname for u in seen} == {"127.0.0.1"}
    assert any(u.endswith("/static/vendor/uplot/uPlot.iife.min.js") for u in seen)
    assert not page.console_problems


def test_with_the_other_services_down_the_page_still_shows_and_partners_get_403(
    page, check_page, settings, start_service
):
    referral = start_service("referral", settings)  # intake and notifications are not running
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    event = need_recorded(
        referral.svc.personal_data,
        need_id="n-poison",
        library_id="nowhere",
        category="caf",
        summary="x",
        postal_code=None,
        urgency="normal",
        recorded_at=referral.svc.clock(),
    )
    client.xadd(
        settings.key("needs"),
        {
            DATA_FIELD: json.dumps({"data": event.model_dump_json(), "headers": {}}),
            "type": event.type,
            "event_id": event.event_id,
            "need_id": event.need_id,
        },
    )
    client.close()
    ops = referral.client("ops")
    assert wait_for(
        lambda: (
            next(s for s in ops.get("/dashboard").json()["queues"]["streams"] if s["name"] == "needs")["dead_letters"]
            == 1
        ),
        30,
    )

    sign_in(page, referral, "ops")
    page.goto(f"{referral.url}/tableau-de-bord")
    summary = page.locator("#etat-technique").inner_text()  # the first tab says it in one line
    assert "1 message en échec à rejouer" in summary and "le service d'envoi ne répond pas" in summary
    check_page(page, "dashboard-services-down-first-tab")
    page.locator("#etat-technique").get_by_role("link", name="Voir l'onglet Technique").click()
    alerts = page.locator("#alertes").inner_text()
    assert "1 message en échec" in alerts
    assert "Chiffres des envois : le service d'envoi ne répond pas (notifications unreachable" in alerts
    assert "Rapports mensuels : le service d'accueil ne répond pas (intake unreachable" in alerts
    assert "Chiffres indisponibles" in page.locator("#envois").inner_text()
    check_page(page, "dashboard-services-down")
    page.goto(f"{referral.url}/tableau-de-bord")
    assert "Chiffres indisponibles" in page.locator("#rapports").inner_text()
    page.goto(f"{referral.url}/tableau-de-bord/technique")
    page.get_by_role("link", name=re.compile("1 en échec : voir et rejouer")).click()
    assert "nowhere" in page.locator("table").inner_text()
    check_page(page, "dashboard-confirm-replay")

    answer = page.goto(f"{referral.url}/tableau-de-bord/rapports.csv")
    assert answer.status == 502 and page.get_by_role("heading", level=1).inner_text() == "Rapport indisponible"
    check_page(page, "dashboard-csv-intake-down")

    page.context.clear_cookies()
    sign_in(page, referral, "op-caf")
    answer = page.goto(f"{referral.url}/tableau-de-bord")
    assert answer.status == 403
    assert page.get_by_role("heading", level=1).inner_text() == "Accès non autorisé"
    check_page(page, "dashboard-partner-403")
