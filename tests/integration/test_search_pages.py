"""Issue 14's search boxes over real HTTP: the partner inbox (a partner's own referrals; a need that left it by its
reference only; ops across partners and by library; "À traiter (N)"), the dashboard's box leading there, and the
outbox page (reference, address, library)."""

from __future__ import annotations

import re

import httpx
import pytest

from shared.signin import sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import record_need

pytestmark = pytest.mark.date_sensitive  # deadlines in words


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, service.name, user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def cards(html: str) -> list[str]:
    return [text_of(li) for li in re.findall(r"<li class=\"[a-z ]*\">\s*<p class=\"line-head\">.*?</li>", html, re.S)]


@pytest.fixture
def referral(settings, start_service):
    return start_service("referral", settings)


@pytest.fixture(params=["by its candidates", "in each query"])
def inbox_search(request, monkeypatch) -> str:
    """The inbox runs a search matching few needs once, then reads by their ids (views.search_candidates); a broader
    one in each of its queries. Both ways find the same."""
    from services.referral import views

    if request.param == "in each query":
        monkeypatch.setattr(views, "SEARCH_CANDIDATES", 1)  # a search matching two needs or more is "broad"
    return request.param


def test_the_partner_inbox_is_searched_in_the_partners_scope(referral, inbox_search):
    elodie = {"display_name": "Élodie Durand", "phone": "+33612345678"}
    record_need(referral.svc, person=elodie, reference="CHA-0101-0001")
    record_need(referral.svc, person={"display_name": "Marc"}, summary="Prime d'activité", reference="CHA-0101-0002")
    record_need(referral.svc, category="sante", person={"display_name": "Élodie Durand"}, reference="CHA-0101-0003")
    caf = signed_in(referral, "op-caf")
    page = caf.get("/boite").text
    assert "À traiter (2)" in page  # the menu's count: CAF's two referrals nobody answered yet
    assert "2 demandes</strong> attendent votre réponse" in page
    for q in ("elodie", "06 12 34 56 78", "cha-0101-0001", "APL bloqué"):
        found = cards(caf.get("/boite", params={"q": q}).text)
        assert len(found) == 1 and "CHA-0101-0001" in found[0], (q, found)
    assert cards(caf.get("/boite", params={"q": "CHA-0101-0003"}).text) == []  # CPAM's
    assert "Aucune demande ne correspond à « zzz »" in text_of(caf.get("/boite", params={"q": "zzz"}).text)
    ops = signed_in(referral, "ops")
    assert len(cards(ops.get("/boite", params={"q": "elodie"}).text)) == 2
    assert cards(ops.get("/boite", params={"q": "elodie", "lieu": "bihorel"}).text) == []
    board = ops.get("/tableau-de-bord").text
    assert re.search(r'<form method="get" action="/boite"[^>]*role="search"', board)


def test_a_declined_need_is_found_by_its_reference_only(referral, inbox_search):
    referral_id = record_need(referral.svc, person={"display_name": "Élodie Durand"}, reference="CHA-0101-0009")
    answer = referral.client("caf").post(f"/referrals/{referral_id}/decline", json={"reason": "hors zone"})
    assert answer.status_code == 200, answer.text
    caf = signed_in(referral, "op-caf")
    assert len(cards(caf.get("/boite", params={"q": "CHA-0101-0009", "statut": "all"}).text)) == 1
    assert cards(caf.get("/boite", params={"q": "durand", "statut": "all"}).text) == []


def test_the_outbox_page_is_searched_and_filtered_by_library(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    start_service("referral", settings)
    notifications = start_service("notifications", settings)
    body = {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "E. D.", "phone": "06 12 34 56 78"},
    }
    need = intake.client("desk").post("/needs", json=body).json()
    ops_api = notifications.client("ops")
    assert wait_for(lambda: ops_api.get("/deliveries", params={"need_id": need["id"]}).json()["items"])
    ops = signed_in(notifications, "ops")
    page = ops.get("/envois", params={"q": need["reference"]}).text
    assert need["id"] in page or need["reference"] in page or "Nouvelle demande" in text_of(page)
    assert "Aucun envoi ne correspond" not in page
    assert "Aucun envoi ne correspond" in ops.get("/envois", params={"q": need["reference"], "lieu": "bihorel"}).text
    assert "Aucun envoi ne correspond" in ops.get("/envois", params={"q": "zzz-nothing"}).text
