"""The partner's pages over real HTTP: the signed link from the handoff email, sign-in by email link, the inbox."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select

from shared.db import OutboxMessage
from shared.signin import referral_link, referral_token, sign, sign_in_link
from shared.testing import sign_in_link_of, use_sign_in_link, wait_for
from tests.helpers import record_need, search

pytestmark = pytest.mark.date_sensitive  # deadlines in words, months, dates to come

CAF_EMAIL = "op@caf.test.example"


@pytest.fixture
def referral(settings, start_service):
    return start_service("referral", settings)


def browser(service) -> httpx.Client:
    return httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)


def csrf_of(html: str) -> str:
    return search(r'name="csrf" value="([^"]+)"', html).group(1)


def path_of(link: str) -> str:
    return httpx.URL(link).raw_path.decode()


def status_of(service, referral_id: str) -> str:
    return service.client("ops").get(f"/referrals/{referral_id}").json()["status"]


def access_links(service) -> list[dict]:
    import json

    with service.svc.db.transaction() as session:
        rows = session.exec(select(OutboxMessage).where(OutboxMessage.type == "access.link_requested")).all()
        return [json.loads(row.payload) for row in rows]


def signed_in(service, user_id: str) -> httpx.Client:
    client = browser(service)
    link, _ = sign_in_link(service.settings, "referral", user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


# --- the signed link ----------------------------------------------------------------------------


def test_the_link_opens_the_referral_as_its_partner_sees_it(referral):
    rid = record_need(
        referral.svc,
        summary="Dossier APL bloqué depuis trois mois",
        person={"display_name": "Mme Durand", "phone": "+33235123456", "preferred_channel": "sms"},
    )
    link = referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock())
    assert link.startswith(f"{referral.url}/r/")

    page = browser(referral).get(path_of(link))

    assert page.status_code == 200
    html = page.text
    assert '<html lang="fr">' in html
    for expected in (
        "Dossier APL bloqué depuis trois mois",
        "Bibliothèque du Châtelet",
        "Allocations familiales (CAF)",
        "Mme Durand",
        "+33235123456",
        "À répondre avant",
        "Dans les délais",
        "Accepter : je prends, je rappellerai",
        "Répondre : envoyer le message à l'accueil",
        "Décliner la demande",
        "Hors de notre territoire",
    ):
        assert expected in html, expected
    assert "Clôturer la demande" not in html  # not allowed from "assigned"
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"


def test_accepting_through_the_form_changes_the_referral(referral):
    rid = record_need(referral.svc)
    client = browser(referral)
    path = path_of(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock()))
    csrf = csrf_of(client.get(path).text)

    answer = client.post(f"{path}/accept", data={"csrf": csrf})

    assert answer.status_code == 200 and answer.url.path == path and answer.url.params["fait"] == "accept"
    assert "Vous avez accepté cette demande" in answer.text
    assert "Clôturer la demande" in answer.text and "Accepter : je prends" not in answer.text
    body = referral.client("ops").get(f"/referrals/{rid}").json()
    assert body["status"] == "accepted" and body["sla"] == "met"
    assert body["history"][-1]["actor"] == "link:caf-76"
    # the page says who acted in words, never a directory id
    assert "(CAF de la Seine-Maritime, par le lien reçu par e-mail)" in answer.text and "link:caf-76" not in answer.text

    again = client.post(f"{path}/accept", data={"csrf": csrf})  # e.g. a second tab
    assert again.status_code == 409 and "n'est plus possible" in again.text
    assert status_of(referral, rid) == "accepted"


def test_declining_records_the_reason_and_routes_the_need_on(referral):
    rid = record_need(referral.svc)
    client = browser(referral)
    path = path_of(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock()))
    csrf = csrf_of(client.get(path).text)

    missing = client.post(f"{path}/decline", data={"csrf": csrf, "reason": "other", "detail": " "})
    assert missing.status_code == 422 and "Avec « Autre motif », expliquez" in missing.text
    assert 'aria-invalid="true"' in missing.text and status_of(referral, rid) == "assigned"

    done = client.post(
        f"{path}/decline", data={"csrf": csrf, "reason": "out_of_territory", "detail": "Voir la CAF du Calvados"}
    )
    assert done.status_code == 200 and "Vous avez décliné cette demande" in done.text
    body = referral.client("ops").get(f"/referrals/{rid}").json()
    assert body["status"] == "declined" and body["decline_reason"] == "out_of_territory"
    assert body["history"][-1]["detail"] == "Voir la CAF du Calvados"  # the partner's words; the code apart
    others = referral.client("ops").get("/referrals", params={"need_id": body["need_id"]}).json()["items"]
    assert {r["partner_id"] for r in others} == {"caf-76", "caf-national"}


def test_a_form_without_its_csrf_token_changes_nothing(referral):
    rid = record_need(referral.svc)
    client = browser(referral)
    path = path_of(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock()))
    client.get(path)

    for data in ({}, {"csrf": "forged"}):
        answer = client.post(f"{path}/accept", data=data)
        assert answer.status_code == 403 and "Formulaire expiré" in answer.text
    assert status_of(referral, rid) == "assigned"


def test_a_link_for_one_referral_cannot_act_on_another(referral):
    mine = record_need(referral.svc)
    other = record_need(referral.svc)
    client = browser(referral)
    my_path = path_of(referral_link(referral.settings, mine, "caf-76", now=referral.svc.clock()))
    other_path = path_of(referral_link(referral.settings, other, "caf-76", now=referral.svc.clock()))
    my_csrf = csrf_of(client.get(my_path).text)

    # My page's CSRF token is bound to my link: it does not work on another link.
    assert client.post(f"{other_path}/accept", data={"csrf": my_csrf}).status_code == 403
    # A link whose payload is changed to name the other referral fails its signature.
    token = my_path.rsplit("/", 1)[1]
    payload, _, signature = token.partition(".")
    forged_payload = referral_token(referral.settings, other, "caf-76").partition(".")[0]
    assert client.get(f"/r/{forged_payload}.{signature}").status_code == 400
    # A genuine link for a partner that no longer holds the referral opens nothing.
    moved = client.get(path_of(referral_link(referral.settings, mine, "cpam-76", now=referral.svc.clock())))
    assert moved.status_code == 410 and "confiée à un autre partenaire" in moved.text
    assert status_of(referral, mine) == status_of(referral, other) == "assigned"


def test_an_expired_or_broken_link_says_what_to_do(referral):
    rid = record_need(referral.svc)
    client = browser(referral)

    old = client.get(
        path_of(referral_link(referral.settings, rid, "caf-76", now=referral.svc.clock() - timedelta(days=31)))
    )
    assert old.status_code == 410
    assert (
        "Lien expiré" in old.text and "Demandez au lieu d&#39;accueil" in old.text and 'href="/connexion"' in old.text
    )

    broken = client.get("/r/not-a-token")
    assert broken.status_code == 400 and "Lien invalide" in broken.text
    # A token signed for another purpose (here a sign-in link) is not a referral link.
    other_purpose = sign(referral.settings, "sign-in", {"r": rid, "p": "caf-76"}, now=referral.svc.clock())
    assert client.get(f"/r/{other_purpose}").status_code == 400


# --- sign-in by email link ----------------------------------------------------------------------


NEUTRAL = "Si cette adresse est connue, un lien de connexion vient d'être envoyé."


def ask_for_link(client: httpx.Client, email: str) -> httpx.Response:
    csrf = csrf_of(client.get("/connexion").text)
    return client.post("/connexion", data={"csrf": csrf, "email": email})


def test_a_partner_signs_in_with_a_single_use_link_from_the_outbox(referral):
    client = browser(referral)
    assert client.get("/boite").url.path == "/connexion"  # not signed in yet

    answer = ask_for_link(client, "OP@caf.test.example")

    assert answer.status_code == 200 and NEUTRAL in answer.text
    [event] = wait_for(lambda: access_links(referral))
    assert event["user_id"] == "op-caf" and event["service"] == "referral" and event["need_id"] is None
    assert "email" not in event and "link" not in event  # neither crosses Redis: notifications builds them
    link = sign_in_link_of(referral, event)
    assert link.startswith(f"{referral.url}/connexion/")

    # Opening the link (as a mail scanner or a link preview does) only shows a button; it signs in nobody and
    # leaves the link usable.
    scanner = browser(referral)
    confirm = scanner.get(path_of(link))
    assert confirm.status_code == 200 and "Me connecter" in confirm.text and CAF_EMAIL in confirm.text
    assert scanner.get("/boite").url.path == "/connexion"
    # The button's form needs the token bound to this link.
    assert scanner.post(path_of(link), data={"csrf": "forged"}).status_code == 403

    inbox = use_sign_in_link(client, link)
    assert inbox.status_code == 200 and inbox.url.path == "/boite"
    assert "Demandes de CAF de la Seine-Maritime" in inbox.text and "Se déconnecter" in inbox.text

    second = browser(referral).get(path_of(link))
    assert second.status_code == 410 and "déjà utilisé" in second.text
    assert use_sign_in_link(browser(referral), link).status_code == 410

    signed_out = client.post("/deconnexion", data={"csrf": csrf_of(inbox.text)})
    assert signed_out.url.path == "/connexion" and "Vous êtes déconnecté" in signed_out.text
    assert client.get("/boite").url.path == "/connexion"


def test_an_unknown_or_wrong_role_email_gets_the_same_answer_and_no_link(referral, settings):
    client = browser(referral)
    unknown = ask_for_link(client, "nobody@example.org")
    desk = ask_for_link(client, "accueil@chatelet.test.example")  # a library contact, not a user
    known = ask_for_link(client, CAF_EMAIL)

    assert unknown.status_code == desk.status_code == known.status_code == 200
    assert NEUTRAL in unknown.text and NEUTRAL in desk.text
    assert [e["user_id"] for e in wait_for(lambda: access_links(referral))] == ["op-caf"]


def test_sign_in_links_are_rate_limited_per_email(referral):
    client = browser(referral)
    for _ in range(5):
        assert ask_for_link(client, "nobody@example.org").status_code == 200
    limited = ask_for_link(client, "Nobody@Example.org")
    assert limited.status_code == 429 and "Trop de demandes" in limited.text
    assert ask_for_link(client, CAF_EMAIL).status_code == 200  # other addresses are not affected


def test_sign_in_needs_the_form_csrf_token_and_an_expired_link_is_refused(referral):
    client = browser(referral)
    assert client.post("/connexion", data={"email": CAF_EMAIL}).status_code == 403
    old, _ = sign_in_link(referral.settings, "referral", "op-caf", now=referral.svc.clock() - timedelta(minutes=16))
    answer = client.get(path_of(old))
    assert answer.status_code == 410 and "expiré" in answer.text
    intake_link, _ = sign_in_link(
        referral.settings, "intake", "op-caf", now=referral.svc.clock()
    )  # made for another service
    assert client.get("/connexion/" + intake_link.rsplit("/", 1)[1]).status_code == 400
    assert access_links(referral) == []


# --- the inbox ----------------------------------------------------------------------------------


@pytest.mark.postgres  # ordering by deadline in SQL
def test_the_inbox_lists_the_partners_open_referrals_by_deadline_late_ones_marked(referral):
    svc, now = referral.svc, referral.svc.clock()
    soon = record_need(svc, summary="Échéance dans 10 heures", recorded_at=now - timedelta(hours=62))
    later = record_need(svc, summary="Échéance dans 70 heures", recorded_at=now - timedelta(hours=2))
    late = record_need(svc, summary="Échéance dépassée", recorded_at=now - timedelta(hours=80))
    closed = record_need(svc, summary="Demande clôturée")
    cpam = record_need(svc, category="sante", summary="Carte Vitale perdue")
    caf = referral.client("caf")
    assert caf.post(f"/referrals/{closed}/accept").status_code == 200
    assert caf.post(f"/referrals/{closed}/close", json={"outcome": "Dossier débloqué"}).status_code == 200

    client = signed_in(referral, "op-caf")
    html = client.get("/boite").text

    listed = re.findall(r'href="/boite/([0-9a-f]{32})"', html)
    assert listed == [late, soon, later]
    assert "en retard de" in html and "3 demandes" in html and "Une est en retard" in html
    assert cpam not in html and closed not in html

    filtered = client.get("/boite", params={"statut": "closed"}).text
    assert re.findall(r'href="/boite/([0-9a-f]{32})"', filtered) == [closed]

    page = client.get(f"/boite/{soon}")
    assert page.status_code == 200 and "Échéance dans 10 heures" in page.text
    assert client.get(f"/boite/{cpam}").status_code == 404  # another partner's: never 403


@pytest.mark.postgres  # ordering by deadline in SQL
def test_a_long_inbox_is_read_page_by_page_soonest_deadline_first(referral, monkeypatch):
    import services.referral.web as inbox_web

    monkeypatch.setattr(inbox_web, "INBOX_LIMIT", 2)
    svc, now = referral.svc, referral.svc.clock()
    ids = [
        record_need(svc, summary=f"Demande {hours}", recorded_at=now - timedelta(hours=hours)) for hours in (10, 50, 30)
    ]  # deadlines in 62, 22 and 42 hours

    client = signed_in(referral, "op-caf")
    first = client.get("/boite").text
    assert re.findall(r'href="/boite/([0-9a-f]{32})"', first) == [ids[1], ids[2]]
    older = search(r'<a href="([^"]+)" rel="next">Échéances suivantes</a>', first).group(1)
    second = client.get(older.replace("&amp;", "&")).text
    assert re.findall(r'href="/boite/([0-9a-f]{32})"', second) == [ids[0]]
    assert 'rel="next"' not in second and '<a href="/boite" rel="prev">Échéances précédentes</a>' in second


def test_a_signed_in_partner_acts_from_the_inbox_and_ops_see_everything(referral):
    rid = record_need(referral.svc)
    cpam = record_need(referral.svc, category="sante")
    client = signed_in(referral, "op-caf")
    page = client.get(f"/boite/{rid}")
    answer = client.post(f"/boite/{rid}/respond", data={"csrf": csrf_of(page.text), "message": "Rappel demain 10 h"})
    assert answer.status_code == 200 and "Votre réponse est enregistrée" in answer.text
    body = referral.client("ops").get(f"/referrals/{rid}").json()
    assert body["status"] == "responded" and body["history"][-1] == {
        **body["history"][-1],
        "actor": "op-caf",
        "detail": "Rappel demain 10 h",
    }
    assert client.post(f"/boite/{cpam}/accept", data={"csrf": csrf_of(page.text)}).status_code == 404

    ops = signed_in(referral, "ops")
    listed = re.findall(r'href="/boite/([0-9a-f]{32})"', ops.get("/boite").text)
    assert set(listed) == {rid, cpam}
    only_cpam = ops.get("/boite", params={"partenaire": "cpam-76"}).text
    assert re.findall(r'href="/boite/([0-9a-f]{32})"', only_cpam) == [cpam]
    view = ops.get(f"/boite/{cpam}")
    assert view.status_code == 200 and "Consultation seule" in view.text and "Accepter : je prends" not in view.text
    assert ops.post(f"/boite/{cpam}/accept", data={"csrf": csrf_of(view.text)}).status_code == 403


def test_the_stylesheet_is_served(referral):
    css = browser(referral).get("/static/relais.css")
    assert css.status_code == 200 and "focus-visible" in css.text


@pytest.mark.postgres  # ordering by deadline in SQL
def test_the_inbox_pages_run_from_the_awaited_first_answers_into_the_other_open_referrals(referral, monkeypatch):
    import services.referral.web as inbox_web

    monkeypatch.setattr(inbox_web, "INBOX_LIMIT", 1)  # each page boundary falls between or inside the two groups
    svc, now = referral.svc, referral.svc.clock()
    late_accepted, awaited, soon_accepted = (
        record_need(svc, summary=f"Demande {hours}", recorded_at=now - timedelta(hours=hours)) for hours in (60, 10, 50)
    )
    caf = referral.client("caf")
    for accepted in (late_accepted, soon_accepted):
        assert caf.post(f"/referrals/{accepted}/accept").status_code == 200

    client = signed_in(referral, "op-caf")
    pages = [
        re.findall(r'href="/boite/([0-9a-f]{32})"', client.get("/boite", params={"page": n}).text) for n in (1, 2, 3, 4)
    ]
    assert pages == [[awaited], [late_accepted], [soon_accepted], []]  # awaited first, then by deadline
