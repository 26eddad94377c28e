"""The front desk's pages over real HTTP (no browser): sign-in by emailed link, the need form and its French
errors, one need per form however often it is sent, the live confirmation, "Mes demandes", the monthly figures."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlmodel import col, select

from services.intake.store import Need
from shared.pages import deadline_fr
from shared.signin import sign_in_link
from shared.testing import DESK_EMAIL, free_port, sign_in_link_of, use_sign_in_link, wait_for
from tests.helpers import search

pytestmark = pytest.mark.date_sensitive  # deadlines in words, months, dates to come


def browser(service) -> httpx.Client:
    return httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)


def hidden(html: str, name: str) -> str:
    return search(rf'name="{name}" value="([^"]*)"', html).group(1)


def signed_in(service, user_id: str = "desk") -> httpx.Client:
    client = browser(service)
    link, _ = sign_in_link(service.settings, "intake", user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).url.path == "/nouvelle"
    return client


def form_of(client: httpx.Client, path: str = "/nouvelle") -> dict[str, str]:
    html = client.get(path).text
    return {"csrf": hidden(html, "csrf"), "idempotency_key": hidden(html, "idempotency_key")}


def needs_of(service) -> list[Need]:
    with service.svc.db.read() as session:
        return list(session.exec(select(Need).order_by(col(Need.recorded_at))).all())


A_NEED = {
    "category": "Allocations familiales (CAF)",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "urgency": "normal",
    "display_name": "M. D.",
    "email": "m.d@example.org",
    "phone": "",
    "preferred_channel": "email",
    "language": "fr",
    "consent": "oui",
    "consent_messages": "oui",  # the second, optional choice: messages to the person on their channel
}


def test_sign_in_by_emailed_link_and_sign_out(intake):
    client = browser(intake)
    assert client.get("/demandes").url.path == "/connexion"
    page = client.get("/connexion")
    r = client.post("/connexion", data={"csrf": hidden(page.text, "csrf"), "email": DESK_EMAIL.upper()})
    assert "Si cette adresse est connue" in r.text
    # a partner's address gets nothing from the desk's pages (and the same answer)
    r = client.post("/connexion", data={"csrf": hidden(page.text, "csrf"), "email": "op@caf.test.example"})
    assert "Si cette adresse est connue" in r.text

    def requested() -> list[dict]:
        import json

        from shared.db import OutboxMessage

        with intake.svc.db.read() as session:
            return [
                json.loads(m.payload)
                for m in session.exec(select(OutboxMessage).where(OutboxMessage.type == "access.link_requested")).all()
            ]

    [event] = wait_for(requested)
    assert event["user_id"] == "desk" and event["service"] == "intake" and "email" not in event
    link = httpx.URL(sign_in_link_of(intake, event))
    assert f"{link.scheme}://{link.host}:{link.port}" == intake.url

    confirm = client.get(link.raw_path.decode())  # a button to press: fetching the link does not use it
    assert confirm.status_code == 200 and "Me connecter" in confirm.text
    assert client.get("/nouvelle").url.path == "/connexion"
    landed = use_sign_in_link(client, str(link))
    assert landed.url.path == "/nouvelle" and "<h1>Nouvelle demande</h1>" in landed.text
    assert "Bibliothèque du Châtelet" in landed.text
    assert browser(intake).get(link.raw_path.decode()).status_code == 410  # single use

    signed_out = client.post("/deconnexion", data={"csrf": hidden(landed.text, "csrf")})
    assert signed_out.url.path == "/connexion" and "Vous êtes déconnecté" in signed_out.text
    assert client.get("/nouvelle").url.path == "/connexion"
    # the API still wants its bearer token, session or not
    assert client.get("/api/v1/needs").status_code == 401


def test_only_front_desks_sign_in_here(intake):
    client = browser(intake)
    link, _ = sign_in_link(intake.settings, "intake", "op-caf", now=intake.svc.clock())
    assert client.get(httpx.URL(link).raw_path.decode()).status_code == 403
    assert client.get("/nouvelle").url.path == "/connexion"


def test_errors_are_in_french_next_to_their_field_and_keep_what_was_typed(intake):
    client = signed_in(intake)
    summary = "Loyer « impayé » 😟\r\nsuite"
    typed = {
        **form_of(client),
        **A_NEED,
        "category": "al",
        "summary": summary,
        "email": "m.d@",
        "postal_code": "7600",
        "consent": "",
    }
    r = client.post("/nouvelle", data=typed)
    assert r.status_code == 422
    html = r.text
    assert "<title>Erreur : Nouvelle demande – Relais</title>" in html
    assert "4 informations sont à corriger" in html
    for field, message in [
        ("category", "Cette thématique n&#39;est pas dans la liste"),
        ("postal_code", "Code postal non reconnu"),
        ("email", "Adresse e-mail non valide"),
        ("consent", "La demande ne peut être transmise qu&#39;avec l&#39;accord"),
    ]:
        assert re.search(rf'id="{field}-erreur"><span class="visually-hidden">Erreur : </span>{message}', html), field
        assert re.search(
            rf'id="{field}"[^>]*aria-invalid="true"[^>]*aria-describedby="[^"]*{field}-erreur"', html, re.S
        ), field
    suggestion = search(r"Vouliez-vous dire :(.*?) \?</p>", html, re.S).group(1)
    assert re.findall(r'name="choisir" value="([^"]+)"', suggestion) == [
        "Allocations familiales (CAF)",
        "Assurance maladie",
    ]
    assert 'value="al"' in html and 'value="m.d@"' in html and 'value="7600"' in html
    assert ">Loyer « impayé » 😟\nsuite</textarea>" in html
    assert hidden(html, "idempotency_key") == typed["idempotency_key"]  # nothing recorded: the same form goes on
    assert needs_of(intake) == []

    r = client.post(
        "/nouvelle",
        data={**typed, "category": "caf", "email": "m.d@example.org", "postal_code": "76000", "consent": "oui"},
    )
    assert r.url.path.endswith("/enregistree")
    [need] = needs_of(intake)
    assert need.summary == "Loyer « impayé » 😟\nsuite" and need.category == "caf"


def test_a_form_sent_twice_records_one_need(intake):
    client = signed_in(intake)
    form = {**form_of(client), **A_NEED}
    first, second = client.post("/nouvelle", data=form), client.post("/nouvelle", data=form)
    assert first.url == second.url and first.url.path.endswith("/enregistree")
    assert len(needs_of(intake)) == 1
    # the same form changed and sent again records nothing and says so
    r = client.post("/nouvelle", data={**form, "summary": "autre chose"})
    assert r.status_code == 409 and "a déjà servi à enregistrer" in r.text
    assert hidden(r.text, "idempotency_key") != form["idempotency_key"]
    assert len(needs_of(intake)) == 1


def test_forms_need_their_csrf_token(intake):
    client = signed_in(intake)
    r = client.post("/nouvelle", data={**form_of(client), **A_NEED, "csrf": "forged"})
    assert r.status_code == 403 and "Formulaire expiré" in r.text
    assert needs_of(intake) == []


def test_confirmation_shows_the_partner_then_the_same_person_brings_another_need(settings, intake, start_service):
    start_service("referral", settings)
    client = signed_in(intake)
    r = client.post("/nouvelle", data={**form_of(client), **A_NEED, "display_name": "Mme Durand"})
    confirmation = r.url.path
    need_id = confirmation.split("/")[2]
    assert "La demande est enregistrée pour Mme Durand" in r.text
    [need] = needs_of(intake)
    assert deadline_fr(need.respond_by, "Europe/Paris") in r.text  # "Réponse attendue" or "Le partenaire doit répondre"

    def routed():
        live = client.get(confirmation, params={"partiel": "1"})
        return live.headers["X-Relais-Final"] == "1" and live

    live = wait_for(routed)
    assert live, "the confirmation never showed a partner"
    assert live.headers["X-Relais-Partiel"] == "1"
    assert "Transmise à <strong>CAF de la Seine-Maritime</strong>" in live.text
    assert "Pourquoi ce partenaire : Thématique « Allocations familiales (CAF) », code postal 76000" in live.text
    page = client.get(confirmation).text  # without JavaScript: the same, and no more refreshing
    assert "CAF de la Seine-Maritime" in page and 'http-equiv="refresh"' not in page

    again = client.get(f"/nouvelle?meme_personne={need_id}").text
    assert 'value="Mme Durand"' in again and 'value="m.d@example.org"' in again
    assert hidden(again, "same_person_as") == need_id
    r = client.post(
        "/nouvelle",
        data={
            **form_of(client, f"/nouvelle?meme_personne={need_id}"),
            **A_NEED,
            "display_name": "Mme Durand",
            "category": "Logement",
            "same_person_as": need_id,
        },
    )
    unroutable = r.url.path
    assert wait_for(lambda: "Aucun partenaire" in client.get(unroutable, params={"partiel": "1"}).text)
    text = client.get(unroutable).text
    assert "La coordination départementale a été prévenue par e-mail (Coordination 76)" in text
    assert "Elle va confier la demande à un partenaire <strong>avant " in text  # what happens, and by when
    assert "notice-ok" not in text  # nothing green for a need nobody holds
    need_page = client.get(unroutable.removesuffix("/enregistree")).text
    assert "Sans partenaire : la coordination cherche" in need_page and "Dans les délais" not in need_page
    first, second = needs_of(intake)
    assert first.person_id == second.person_id

    figures = client.get("/chiffres").text
    assert "<strong>1</strong> personne aidée" in figures and "<strong>2</strong> demandes enregistrées" in figures
    exported = client.get("/chiffres.csv")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(exported.text.lstrip("\ufeff")), delimiter=";"))
    assert rows[0][:5] == ["Mois", "Lieu d'accueil", "Thématique", "Personnes aidées", "Demandes enregistrées"]
    assert rows[1][1:5] == ["Bibliothèque du Châtelet", "Toutes thématiques", "1", "2"]
    assert sorted(r[2] for r in rows[2:]) == ["Allocations familiales (CAF)", "Logement"]


def test_my_needs_overdue_first_with_filters_and_each_need_history(settings, intake):
    client = signed_in(intake)
    ids = []
    for summary in ("Ancienne demande", "Demande récente"):
        r = client.post("/nouvelle", data={**form_of(client), **A_NEED, "summary": summary})
        ids.append(r.url.path.split("/")[2])
    other = (
        intake.client("desk2")
        .post("/needs", json={"library_id": "bihorel", "category": "caf", "summary": "Pas à vous", "consent": True})
        .json()["id"]
    )
    with intake.svc.db.transaction() as session:
        session.get(Need, ids[0]).respond_by = intake.svc.clock() - timedelta(hours=2)

    page = client.get("/demandes").text
    assert page.index("Ancienne demande") < page.index("Demande récente")
    assert "2 demandes, les plus en retard en premier. Une est en retard." in page
    assert "Pas à vous" not in page
    overdue = client.get("/demandes", params={"delai": "overdue"}).text
    assert "Ancienne demande" in overdue and "Demande récente" not in overdue
    assert "Aucune demande ne correspond à ces filtres." in client.get("/demandes", params={"statut": "closed"}).text
    live = client.get("/demandes", params={"delai": "overdue", "partiel": "1"})
    assert live.headers["X-Relais-Partiel"] == "1" and "<html" not in live.text and "Ancienne demande" in live.text

    need = client.get(f"/demandes/{ids[0]}").text
    assert "En retard : la réponse était attendue" in need and "Demande enregistrée à l&#39;accueil" in need
    assert client.get(f"/demandes/{other}").status_code == 404
    assert client.get("/demandes/nope").status_code == 404


def test_my_needs_go_back_in_time_page_by_page_with_every_overdue_need_on_the_first(intake, monkeypatch):
    import services.intake.web as desk_web

    monkeypatch.setattr(desk_web, "LIST_LIMIT", 2)
    client = signed_in(intake)
    ids = []
    for number in range(5):
        r = client.post("/nouvelle", data={**form_of(client), **A_NEED, "summary": f"Demande numéro {number}"})
        ids.append(r.url.path.split("/")[2])
    with intake.svc.db.transaction() as session:
        session.get(Need, ids[0]).respond_by = intake.svc.clock() - timedelta(hours=2)  # the oldest is overdue

    def shown(html: str) -> list[int]:
        return [int(n) for n in re.findall(r"Demande numéro (\d)", html)]

    first = client.get("/demandes").text
    assert shown(first) == [0, 3, 4]  # the overdue one, then the two newest (waiting: soonest deadline first)
    assert "La liste continue sur une autre page" in first and "Demandes plus récentes" not in first
    older = search(r'<a href="([^"]+)" rel="next">Demandes plus anciennes</a>', first).group(1)
    assert older == "/demandes?page=2"
    second = client.get(older).text
    assert shown(second) == [1, 2]
    assert '<a href="/demandes" rel="prev">Demandes plus récentes</a>' in second
    third = client.get("/demandes?page=3").text
    assert shown(third) == [0] and 'rel="next"' not in third
    # Filters are kept from page to page, also by the live region; a page number that is not one means page 1.
    filtered = client.get("/demandes", params={"thematique": "caf", "page": "2"}).text
    assert 'href="/demandes?thematique=caf&amp;page=3" rel="next"' in filtered
    assert "page=2" in search(r'data-live="([^"]+)"', filtered).group(1)
    assert shown(client.get("/demandes?page=zéro").text) == [0, 3, 4]


def test_with_redis_away_the_form_and_the_api_record_nothing_and_say_so(intake, desk):
    # Recording a need stores the person's data key in Redis (shared.personal_data), through a Redis restart or a
    # failover by its retries; past them nothing is recorded, the desk keeps what it typed, the API says when to retry.
    client = signed_in(intake)
    form = form_of(client)
    intake.svc.personal_data._client = redis.Redis(
        port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 1)
    )  # nothing listens there
    intake.svc.personal_data.patience_s = 0.5  # not the 15 s that ride through a failover
    page = client.post("/nouvelle", data=A_NEED | form)
    assert page.status_code == 503
    assert "Rien n'a été enregistré" in page.text and "Dossier APL bloqué" in page.text  # the form, as typed
    api = desk.post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL",
            "postal_code": "76000",
            "consent": True,
        },
    )
    assert api.status_code == 503 and api.headers["retry-after"] == "60", api.text
    assert "nothing was recorded" in api.json()["detail"]
    assert needs_of(intake) == []
