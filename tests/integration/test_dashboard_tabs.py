"""The dashboard's two tabs and the coordination's page of a need, over HTTP: the monthly reports leave out the
libraries with nothing that month (the CSV keeps them); a need no partner takes has its own page, from which it is
handed over or cancelled, and the cancellation's confirmation names the need and says the action on its button;
partners get 403 on all of it."""

from __future__ import annotations

import html
import re

import httpx
import pytest

from shared.signin import sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import search

pytestmark = pytest.mark.date_sensitive  # months, deadlines in words


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    answer = use_sign_in_link(client, sign_in_link(service.settings, "referral", user_id, now=service.svc.clock())[0])
    assert answer.status_code == 200, answer.text
    return client


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def report_rows(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr data-library="([^"]+)" data-month="([^"]+)">', page)


def record(intake, library: str = "chatelet", category: str = "caf") -> dict:
    desk = intake.client("desk" if library == "chatelet" else "desk2")
    r = desk.post(
        "/needs",
        json={"library_id": library, "category": category, "summary": "x", "postal_code": "76000", "consent": True},
    )
    assert r.status_code == 201, r.text
    return r.json()


def test_the_monthly_reports_leave_out_the_libraries_with_nothing(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops, browser = referral.client("ops"), signed_in(referral, "ops")

    # nothing recorded yet: no row at all, said in words
    assert ops.get("/dashboard").json()["reports"]["available"]
    page = browser.get("/tableau-de-bord").text
    assert report_rows(page) == [] and 'id="table-rapports"' not in page
    assert "Aucune demande enregistrée ce mois-ci ni le mois dernier." in text_of(page)

    # one need at the Châtelet: its row this month only; the others are left out and counted
    record(intake)
    reports = wait_for(
        lambda: (
            (b := ops.get("/dashboard").json())["reports"]["available"]
            and any(r["needs"] for m in b["reports"]["data"]["months"] for r in m["items"])
            and b["reports"]
        )
    )
    assert reports, "intake's report never counted the need"
    items = [r for m in reports["data"]["months"] for r in m["items"]]
    shown = [(r["library_id"], r["month"]) for r in items if r["needs"] or r["people"] or r["due"]]
    assert len(shown) == 1 and shown[0][0] == "chatelet"
    page = browser.get("/tableau-de-bord").text
    assert report_rows(page) == shown
    assert len(items) == 4  # intake answers a row per library of the directory and month, empty or not
    note = search(r'<p class="meta" id="rapports-vides">(.*?)</p>', page).group(1)
    assert "(3 lignes)" in note and "CSV" in note
    assert "Médiathèque de Bihorel" not in text_of(
        search(r'<table class="figures" id="table-rapports">.*?</table>', page, re.S)[0]
    )


def test_a_need_is_cancelled_from_its_page_with_a_confirmation_that_names_it(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops, browser = referral.client("ops"), signed_in(referral, "ops")
    need = record(intake, category="logement")  # no partner of the test directory takes it
    assert wait_for(lambda: ops.get("/dashboard").json()["stranded"]["count"] == 1)

    # the dashboard's line links to the need's page
    board = browser.get("/tableau-de-bord").text
    url = f"/tableau-de-bord/demandes/{need['id']}"
    assert f'href="{url}"' in board
    page = browser.get(url)
    assert page.status_code == 200
    words = text_of(page.text)
    assert "Logement – Bibliothèque du Châtelet" in words and need["reference"] in words
    assert (
        "Sans partenaire depuis le" in words and "Aucun partenaire de l'annuaire ne traite cette thématique." in words
    )
    assert need["id"] not in words  # the internal id only in links, never shown
    assert f'href="/tableau-de-bord/confirmer/confier?demande={need["id"]}"' in page.text
    cancel = search(r'<a href="(/tableau-de-bord/confirmer/annuler\?demande=[^"]+)">([^<]+)</a>', page.text)
    assert cancel.group(2) == "Annuler la demande (enregistrée par erreur)"

    # the confirmation names the need, and its button says the action
    confirm = browser.get(html.unescape(cancel.group(1)))
    assert confirm.status_code == 200
    words = text_of(confirm.text)
    assert "Logement – Bibliothèque du Châtelet" in words and need["reference"] in words
    assert "aucun partenaire (demande sans partenaire)" in words and need["id"] not in words
    button = search(r'<button type="submit" class="danger">(.*?)</button>', confirm.text, re.S).group(1).strip()
    assert button == "Annuler la demande Logement – Bibliothèque du Châtelet"
    assert f'<a href="{url}">Ne rien faire et revenir à la demande</a>' in confirm.text
    csrf = search(r'name="csrf" value="([^"]+)"', confirm.text).group(1)
    done = browser.post(
        "/tableau-de-bord/actions/annuler", data={"csrf": csrf, "demande": need["id"], "motif": "Saisie en double"}
    )
    assert done.status_code == 200 and done.url.path == "/tableau-de-bord"
    assert "La demande est annulée" in text_of(done.text)
    assert wait_for(lambda: ops.get("/dashboard").json()["stranded"]["count"] == 0)
    words = text_of(browser.get(url).text)
    assert "Cette demande n'est plus en cours" in words and "Annuler la demande" not in words
    # the latest actions name the need by its reference, with a link to its page
    board = browser.get("/tableau-de-bord").text
    assert f'<a href="{url}">la demande {need["reference"]}</a>' in board

    assert browser.get("/tableau-de-bord/demandes/nope").status_code == 404
    partner = signed_in(referral, "op-caf")
    for path in (url, "/tableau-de-bord/technique", "/tableau-de-bord/technique/chiffres"):
        assert partner.get(path).status_code == 403, path


def test_a_large_deployments_dashboard_answers_at_once_while_its_months_figures_are_computed(
    settings, start_service, monkeypatch
):
    """A 30-day window of REUSE_FROM referrals or more takes seconds to compute (docs/benchmarks.md, "Timers at
    scale"): the service starts computing it at start, and meanwhile every tab answers with the live parts and a notice
    in place of the month's figures, which its refresh then replaces."""
    import threading

    from services.referral import dashboard

    release = threading.Event()
    compute = dashboard.local_figures

    def held(svc, now):  # the month's figures, computed only once the test has seen the pages without them
        assert release.wait(60), "never released"
        return compute(svc, now)

    monkeypatch.setattr(dashboard, "REUSE_FROM", 0)  # every window is a large one
    monkeypatch.setattr(dashboard, "local_figures", held)
    referral = start_service("referral", settings)
    ops, browser = referral.client("ops"), signed_in(referral, "ops")
    notice = "Chiffres du mois en cours de calcul : ils s'affichent dès qu'ils sont prêts."

    try:
        for path in ("/tableau-de-bord", "/tableau-de-bord/chiffres"):
            answer = browser.get(path)
            assert answer.status_code == 200, answer.text
            page = text_of(answer.text)
            assert notice in page and 'id="partenaire-caf-76"' not in answer.text
            for section in ("sans-partenaire", "du-jour", "partenaires", "graphiques", "actions-recentes", "rapports"):
                assert f'id="{section}"' in answer.text  # the tab's links still land
            assert "Technique :" in page  # the live summary
        technical = browser.get("/tableau-de-bord/technique")
        assert technical.status_code == 200 and notice in text_of(technical.text)
        assert 'id="files"' in technical.text and 'id="horloge"' in technical.text
        body = ops.get("/dashboard").json()
        assert body["figures_pending"] is True and body["partners"] is None and body["queues"]["available"]
    finally:
        release.set()

    assert wait_for(lambda: not ops.get("/dashboard").json()["figures_pending"]), "the figures never came"
    answer = browser.get("/tableau-de-bord/chiffres")
    assert notice not in text_of(answer.text) and 'id="partenaire-caf-76"' in answer.text
    assert notice not in text_of(browser.get("/tableau-de-bord/technique").text)
