"""The desk acts on its needs (issue 14, point 8): information for the partner (its referral page and an email),
a nudge at most once in 24 hours, closing a need the person no longer needs, routing again after a decline, and
partner answers flagged "à lire" until the desk opens the need. The three services run over real HTTP and talk
through a real Redis; the 24-hour rule is checked by moving the test clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from sqlmodel import col, select

from services.intake.store import Need
from services.referral.store import ClockTimer
from shared.events import NEEDS, REFERRALS
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import search, xrange_bytes

pytestmark = pytest.mark.date_sensitive

NOTE = "Le courrier de la CAF du 12 est arrivé ; la personne est joignable le matin"


def a_need(**changes) -> dict:
    body = {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "Mme Q.", "email": "mme.q@example.org", "preferred_channel": "email"},
    }
    body.update(changes)
    return body


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    return intake, referral


def record(intake, who: str = "desk", **changes) -> dict:
    r = intake.client(who).post("/needs", json=a_need(**changes))
    assert r.status_code == 201, r.text
    return r.json()


def desk_view(intake, need_id: str, **expected) -> dict:
    def matches():
        need = intake.client("desk").get(f"/needs/{need_id}").json()
        return need if all(need.get(k) == v for k, v in expected.items()) else None

    seen = wait_for(matches)
    assert seen, f"need {need_id} never had {expected}: {intake.client('desk').get(f'/needs/{need_id}').json()}"
    return seen


def mails_to(mail_sink, address: str, subject_part: str) -> list[dict]:
    return [m for m in mail_sink.messages if address in m["to"] and subject_part in m["subject"]]


def body_of(mail: dict) -> str:
    return mail["message"].get_body(preferencelist=("plain",)).get_content()


def referral_of(referral, referral_id: str) -> dict:
    r = referral.client("ops").get(f"/referrals/{referral_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_note_reaches_the_partners_page_and_its_contact_by_email_sealed_on_the_wire(system, mail_sink, settings):
    intake, referral = system
    need = record(intake)
    routed = desk_view(intake, need["id"], status="referred")

    r = intake.client("desk").post(f"/needs/{need['id']}/notes", json={"text": NOTE})
    assert r.status_code == 201, r.text
    assert [(h["event"], h["detail"]) for h in r.json()["history"] if h["event"] == "need.note_added"] == [
        ("need.note_added", NOTE)
    ]

    # the partner's contact is emailed a link to the page, without the text (emails carry no personal data)
    assert wait_for(lambda: mails_to(mail_sink, "referent@caf.test.example", "Information ajoutée"))
    mail = mails_to(mail_sink, "referent@caf.test.example", "Information ajoutée")[0]
    assert NOTE not in body_of(mail)
    link = search(r"Ouvrir la demande : (\S+)", body_of(mail)).group(1)
    page = httpx.get(link, timeout=30, follow_redirects=True)
    assert page.status_code == 200
    section = search(r'id="informations-accueil".*?</section>', page.text, re.S).group(0)
    assert "Informations du lieu d&#39;accueil" in section or "Informations du lieu d'accueil" in section
    assert "Le courrier de la CAF du 12 est arrivé" in section

    # the partner's API shows it in the referral's history
    history = referral_of(referral, routed["referral_id"])["history"]
    assert [(h["action"], h["detail"]) for h in history if h["action"] == "desk_note"] == [("desk_note", NOTE)]

    # on the wire the text is sealed: neither stream holds it
    client = redis.Redis.from_url(settings.redis_url)
    for stream in (NEEDS, REFERRALS):
        raw = b"".join(b"".join(fields.values()) for _, fields in xrange_bytes(client, settings.key(stream)))
        assert NOTE.encode() not in raw and b"courrier de la CAF" not in raw
    assert b"need.note_added" in b"".join(
        b"".join(fields.values()) for _, fields in xrange_bytes(client, settings.key(NEEDS))
    )


def test_a_note_is_refused_with_a_clear_error(system):
    intake, referral = system
    need = record(intake)
    desk_view(intake, need["id"], status="referred")
    notes = f"/needs/{need['id']}/notes"

    blank = intake.client("desk").post(notes, json={"text": "  \n "})
    assert blank.status_code == 422
    assert [(e["loc"], e["type"]) for e in blank.json()["detail"]] == [(["body", "text"], "blank")]
    long = intake.client("desk").post(notes, json={"text": "x" * 2001})
    assert long.status_code == 422 and long.json()["detail"][0]["loc"] == ["body", "text"]
    assert intake.client("desk").post(notes, json={}).status_code == 422
    assert intake.client("desk2").post(notes, json={"text": NOTE}).status_code == 404  # another library's
    assert intake.client("caf").post(notes, json={"text": NOTE}).status_code == 403  # partners use referral
    assert intake.client("desk").post("/needs/nope/notes", json={"text": NOTE}).status_code == 404

    nobody = record(intake, category="logement")  # no partner takes it
    desk_view(intake, nobody["id"], status="unroutable")
    r = intake.client("desk").post(f"/needs/{nobody['id']}/notes", json={"text": NOTE})
    assert r.status_code == 409 and "no partner holds this need" in r.json()["detail"]
    # nothing half-written
    history = intake.client("desk").get(f"/needs/{nobody['id']}").json()["history"]
    assert "need.note_added" not in [h["event"] for h in history]


def test_a_nudge_emails_the_partner_at_most_once_in_24_hours(system, mail_sink, clock):
    intake, referral = system
    need = record(intake)
    routed = desk_view(intake, need["id"], status="referred")
    nudge = f"/needs/{need['id']}/nudge"

    first = intake.client("desk").post(nudge)
    assert first.status_code == 200, first.text
    nudged_at = datetime.fromisoformat(first.json()["partner_nudged_at"])
    assert wait_for(lambda: mails_to(mail_sink, "referent@caf.test.example", "demande des nouvelles"))
    assert wait_for(
        lambda: [h for h in referral_of(referral, routed["referral_id"])["history"] if h["action"] == "desk_nudge"]
    )

    again = intake.client("desk").post(nudge)
    assert again.status_code == 409
    allowed_from = (nudged_at + timedelta(hours=24)).astimezone(UTC)
    assert "less than 24 hours ago" in again.json()["detail"]
    assert allowed_from.isoformat() in again.json()["detail"]
    assert 0 < int(again.headers["Retry-After"]) <= 24 * 3600
    events = [h["event"] for h in intake.client("desk").get(f"/needs/{need['id']}").json()["history"]]
    assert events.count("need.partner_nudged") == 1  # the refused one wrote nothing

    clock.advance(timedelta(hours=23, minutes=59))
    assert intake.client("desk").post(nudge).status_code == 409
    clock.advance(timedelta(minutes=2))
    assert intake.client("desk").post(nudge).status_code == 200
    assert wait_for(lambda: len(mails_to(mail_sink, "referent@caf.test.example", "demande des nouvelles")) == 2)

    # nobody to nudge once the partner answered
    r = referral.client("caf").post(f"/referrals/{routed['referral_id']}/respond", json={"message": "RDV le 3"})
    assert r.status_code == 200, r.text
    desk_view(intake, need["id"], status="responded")
    clock.advance(timedelta(hours=25))
    refused = intake.client("desk").post(nudge)
    assert refused.status_code == 409 and "nobody to nudge" in refused.json()["detail"]
    assert intake.client("desk2").post(nudge).status_code == 404


def test_closing_ends_the_referral_stops_the_clock_and_keeps_the_reason(system, mail_sink):
    intake, referral = system
    need = record(intake)
    routed = desk_view(intake, need["id"], status="referred")
    close = f"/needs/{need['id']}/close"

    blank = intake.client("desk").post(close, json={"reason": " "})
    assert blank.status_code == 422 and blank.json()["detail"][0]["loc"] == ["body", "reason"]
    r = intake.client("desk").post(close, json={"reason": "Démarche faite en ligne avec son fils"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "closed" and r.json()["closed_by_desk_at"]
    assert intake.client("desk").post(close, json={"reason": "encore"}).status_code == 409

    def closed() -> dict | None:
        found = referral_of(referral, routed["referral_id"])
        return found if found["status"] == "closed" else None

    seen = wait_for(closed)
    assert seen, referral_of(referral, routed["referral_id"])
    assert [(h["action"], h["detail"]) for h in seen["history"] if h["action"] == "desk_close"] == [
        ("desk_close", "Démarche faite en ligne avec son fils")
    ]
    with referral.svc.db.read() as session:
        timers = session.exec(select(ClockTimer).where(ClockTimer.need_id == need["id"])).all()
    assert timers and all(t.fired_at is not None and t.outcome == "cancelled" for t in timers)
    # the desk's view stays closed, with one history row of its own (the referral's close is not repeated)
    view = desk_view(intake, need["id"], status="closed")
    assert [h["event"] for h in view["history"]].count("need.closed_by_desk") == 1
    assert "referral.closed" not in [h["event"] for h in view["history"]]
    # closed: no note, no nudge
    assert intake.client("desk").post(f"/needs/{need['id']}/notes", json={"text": NOTE}).status_code == 409
    assert intake.client("desk").post(f"/needs/{need['id']}/nudge").status_code == 409


def test_after_a_decline_the_desk_routes_again_without_the_partner_that_declined(system, clock):
    intake, referral = system
    need = record(intake)
    routed = desk_view(intake, need["id"], status="referred", partner_id="caf-76")
    assert intake.client("desk").post(f"/needs/{need['id']}/reroute").status_code == 409  # nobody declined

    # the other candidate is paused while caf-76 declines: nobody is left, the need is unroutable
    until = (clock() + timedelta(hours=1)).isoformat()
    paused = referral.client("ops").post("/partners/caf-national/pause", json={"until": until, "reason": "Fermé"})
    assert paused.status_code == 200, paused.text
    r = referral.client("caf").post(f"/referrals/{routed['referral_id']}/decline", json={"reason": "hors_champ"})
    assert r.status_code == 200, r.text
    desk_view(intake, need["id"], status="unroutable")

    clock.advance(timedelta(hours=2))  # the pause is over
    r = intake.client("desk2").post(f"/needs/{need['id']}/reroute")
    assert r.status_code == 404
    r = intake.client("desk").post(f"/needs/{need['id']}/reroute")
    assert r.status_code == 202, r.text
    view = desk_view(intake, need["id"], status="referred", partner_id="caf-national")
    assert view["respond_by"] == routed["respond_by"]  # the need's deadline is kept
    assert "need.reroute_requested" in [h["event"] for h in view["history"]]
    again = intake.client("desk").post(f"/needs/{need['id']}/reroute")
    assert again.status_code == 409 and "handed to a partner already" in again.json()["detail"]


def test_a_reroute_with_no_candidate_left_says_so_again(system):
    intake, referral = system
    need = record(intake, category="sante")  # only cpam-76 takes it
    routed = desk_view(intake, need["id"], status="referred", partner_id="cpam-76")
    r = referral.client("cpam").post(f"/referrals/{routed['referral_id']}/decline", json={"reason": "capacite"})
    assert r.status_code == 200, r.text
    desk_view(intake, need["id"], status="unroutable")
    assert intake.client("desk").post(f"/needs/{need['id']}/reroute").status_code == 202

    def twice_unroutable() -> bool:
        history = intake.client("desk").get(f"/needs/{need['id']}").json()["history"]
        return [h["event"] for h in history].count("need.unroutable") == 2

    assert wait_for(twice_unroutable)  # cpam-76 was not offered it again
    assert intake.client("desk").get(f"/needs/{need['id']}").json()["partner_id"] is None


def signed_in(intake) -> httpx.Client:
    client = httpx.Client(base_url=intake.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    assert use_sign_in_link(client, link).url.path == "/nouvelle"
    return client


def test_partner_answers_are_flagged_a_lire_until_the_desk_opens_the_need(system):
    intake, referral = system
    answered, quiet = record(intake), record(intake, summary="Autre dossier")
    routed = desk_view(intake, answered["id"], status="referred")
    desk_view(intake, quiet["id"], status="referred")
    client = signed_in(intake)
    assert "Réponses à lire" not in client.get("/demandes").text

    r = referral.client("caf").post(f"/referrals/{routed['referral_id']}/respond", json={"message": "RDV le 3"})
    assert r.status_code == 200, r.text
    assert desk_view(intake, answered["id"], status="responded")["answers_unread"] is True
    listing = client.get("/demandes").text
    assert search(r'id="reponses-a-lire"[^>]*>Réponses à lire \(1\)</a>', listing)
    only_unread = client.get("/demandes", params={"lire": "1"}).text
    assert "À lire" in only_unread and "Autre dossier" not in only_unread

    page = client.get(f"/demandes/{answered['id']}").text  # the desk reads it
    assert "RDV le 3" in page
    assert intake.client("desk").get(f"/needs/{answered['id']}").json()["answers_unread"] is False
    assert "Réponses à lire" not in client.get("/demandes").text
    with intake.svc.db.read() as session:
        need = session.exec(select(Need).where(col(Need.id) == answered["id"])).one()
        assert need.answers_read_at is not None and need.last_answer_at is not None


def test_the_desk_forms_work_without_javascript_with_french_errors(system, mail_sink, clock):
    intake, referral = system
    need = record(intake)
    desk_view(intake, need["id"], status="referred")
    client = signed_in(intake)
    page = client.get(f"/demandes/{need['id']}").text
    csrf = search(r'name="csrf" value="([^"]*)"', page).group(1)
    assert "Agir sur la demande" in page

    r = client.post(f"/demandes/{need['id']}/information", data={"csrf": csrf, "texte": "   "})
    assert r.status_code == 422
    assert 'id="note-erreur"' in r.text and "Écrivez l'information avant de l'envoyer." in r.text
    r = client.post(f"/demandes/{need['id']}/information", data={"csrf": "faux", "texte": NOTE})
    assert r.status_code in (400, 403)
    r = client.post(f"/demandes/{need['id']}/information", data={"csrf": csrf, "texte": NOTE})
    assert r.status_code == 200 and r.url.params.get("fait") == "information"
    assert "L'information est transmise au partenaire." in r.text

    r = client.post(f"/demandes/{need['id']}/relancer", data={"csrf": csrf})
    assert r.status_code == 200 and "Le partenaire est relancé par e-mail." in r.text
    assert "Nouvelle relance possible à partir du" in r.text  # no button before 24 hours
    r = client.post(f"/demandes/{need['id']}/relancer", data={"csrf": csrf})  # sent again (an old tab)
    assert r.status_code == 409 and 'id="nudge-erreur"' in r.text and "moins de 24 heures" in r.text

    r = client.post(f"/demandes/{need['id']}/cloturer", data={"csrf": csrf, "motif": ""})
    assert r.status_code == 422 and "Indiquez pourquoi la demande est clôturée." in r.text
    r = client.post(f"/demandes/{need['id']}/cloturer", data={"csrf": csrf, "motif": "A trouvé de l'aide ailleurs"})
    assert r.status_code == 200 and "La demande est clôturée." in r.text
    assert "Clôturée par l&#39;accueil" in r.text
    assert 'action="/demandes/' + need["id"] + '/cloturer"' not in r.text  # nothing more to do

    r = client.post(f"/demandes/{need['id']}/reorienter", data={"csrf": csrf})
    assert r.status_code == 409 and "La demande est déjà clôturée" in r.text
