"""Issue 14 on the desk's pages over real HTTP (no browser, so no JavaScript): "Vérifier" shows who will receive the
need and by when before it is sent (intake asks referral's routing preview), a "Vouliez-vous dire" suggestion
fills the field, the categories some partner takes here come first; the person's receipt (print, SMS, email, nothing
when the person gave no channel); "Mes demandes" searched."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlmodel import select

from services.intake.store import Need
from services.notifications.store import Delivery
from shared.pages import deadline_fr
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import search

pytestmark = pytest.mark.date_sensitive  # deadlines in words

A_NEED = {
    "category": "Allocations familiales (CAF)",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "urgency": "normal",
    "display_name": "Élodie Durand",
    "email": "",
    "phone": "06 12 34 56 78",
    "preferred_channel": "sms",
    "language": "fr",
    "consent": "oui",
    "consent_messages": "oui",  # the person agreed to hear about their need on their channel
}


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    return (
        start_service("intake", settings),
        start_service("referral", settings),
        start_service("notifications", settings),
    )


def signed_in(service, user_id: str = "desk") -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "intake", user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).url.path == "/nouvelle"
    return client


def hidden(html: str, name: str) -> str:
    return search(rf'name="{name}" value="([^"]*)"', html).group(1)


def form_of(client: httpx.Client) -> dict[str, str]:
    html = client.get("/nouvelle").text
    return {"csrf": hidden(html, "csrf"), "idempotency_key": hidden(html, "idempotency_key")}


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def needs_of(service) -> list[Need]:
    with service.svc.db.read() as session:
        return list(session.exec(select(Need)).all())


def test_verifier_shows_the_partner_and_the_deadline_and_sends_nothing(system):
    intake, _, _ = system
    desk = signed_in(intake)
    page = desk.post("/nouvelle", data={**form_of(desk), **A_NEED, "verifier": "Vérifier"})
    assert page.status_code == 200
    region = text_of(search(r'<div id="apercu".*?</div>', page.text, re.S).group(0))
    assert "ira à CAF de la Seine-Maritime" in region
    assert "qui devra répondre" in region
    assert "Pourquoi ce partenaire" in region
    assert needs_of(intake) == []  # nothing recorded
    # the form keeps what was typed, and sends for real with its own button
    assert 'value="Élodie Durand"' in page.text and "Dossier APL bloqué" in page.text
    sent = desk.post("/nouvelle", data={**form_of(desk), **A_NEED})
    assert sent.url.path.endswith("/enregistree")
    [need] = needs_of(intake)
    # the deadline the preview said is the one the need got (same rule, same clock, seconds apart)
    assert deadline_fr(need.respond_by, "Europe/Paris")[:12] in region


def test_verifier_says_when_nobody_takes_the_need_here(system):
    intake, _, _ = system
    desk = signed_in(intake)
    page = desk.post("/nouvelle", data={**form_of(desk), **A_NEED, "category": "Logement", "verifier": "Vérifier"})
    assert "Aucun partenaire ne prend la demande « Logement » ici" in text_of(page.text)


def test_the_preview_fragment_follows_what_is_typed(system):
    intake, _, _ = system
    desk = signed_in(intake)
    fragment = desk.get("/nouvelle/apercu", params={"thematique": "assurance maladie", "code_postal": "76000"})
    assert fragment.status_code == 200
    assert "CPAM Rouen-Elbeuf-Dieppe" in fragment.text
    assert "Choisissez d'abord une thématique" in desk.get("/nouvelle/apercu", params={"thematique": "zz"}).text
    bad = desk.get("/nouvelle/apercu", params={"thematique": "caf", "code_postal": "7600"})
    assert "code postal n'est pas reconnu" in bad.text
    anonymous = httpx.Client(base_url=intake.url, timeout=30).get("/nouvelle/apercu", params={"thematique": "caf"})
    assert "apercu" not in anonymous.text and "CAF de la Seine" not in anonymous.text


def test_the_preview_says_so_when_referral_does_not_answer(settings, start_service):
    intake = start_service("intake", settings)  # referral is not running
    desk = signed_in(intake)
    page = desk.post("/nouvelle", data={**form_of(desk), **A_NEED, "verifier": "Vérifier"})
    assert "Relais ne peut pas dire maintenant qui recevra la demande" in text_of(page.text)


def test_a_suggestion_fills_the_field_and_the_categories_with_a_partner_come_first(system):
    intake, _, _ = system
    desk = signed_in(intake)
    page = desk.post("/nouvelle", data={**form_of(desk), **A_NEED, "category": "al"})
    assert page.status_code == 422
    suggestion = search(r'<input type="submit" name="choisir" value="([^"]+)"', page.text).group(1)
    chosen = desk.post("/nouvelle", data={**form_of(desk), **A_NEED, "category": "al", "choisir": suggestion})
    assert chosen.status_code == 200
    assert search(r'id="category" name="category" list="categories" value="([^"]*)"', chosen.text).group(1) == (
        suggestion
    )
    assert needs_of(intake) == []
    # the datalist: CAF and Assurance maladie (partners cover 76) before Logement (nobody), marked as such
    options = re.findall(r'<option value="([^"]+)"( label="[^"]+")?>', chosen.text)
    assert [o[0] for o in options] == ["Allocations familiales (CAF)", "Assurance maladie", "Logement"]
    assert options[-1][1] == ' label="Autres (pas de partenaire connu ici)"'
    listed = text_of(search(r"<details.*?</details>", chosen.text, re.S).group(0))
    assert "Autres (pas de partenaire connu ici)" in listed


# --- the receipt ----------------------------------------------------------------------------------------------


def test_the_receipt_says_who_will_call_by_when_and_how_to_reach_the_desk(system, tmp_path):
    intake, referral, _ = system
    desk = signed_in(intake)
    desk.post("/nouvelle", data={**form_of(desk), **A_NEED})
    [need] = needs_of(intake)
    wait_for(lambda: needs_of(intake)[0].status == "referred")
    receipt = desk.get(f"/demandes/{need.id}/recu")
    assert receipt.status_code == 200
    text = text_of(receipt.text)
    assert need.reference in text
    assert "Allocations familiales (CAF)" in text
    assert "Dossier APL bloqué" not in text  # the summary only when the desk ticks it
    assert "CAF de la Seine-Maritime vous contactera" in text
    assert receipt.headers["Cache-Control"] == "no-store"
    with_summary = text_of(desk.get(f"/demandes/{need.id}/recu", params={"resume": "oui"}).text)
    assert "Dossier APL bloqué" in with_summary
    # another library's desk: not found
    other = signed_in(intake, "desk2")
    assert other.get(f"/demandes/{need.id}/recu").status_code == 404


def test_the_desk_sends_the_receipt_by_sms_through_notifications(system):
    intake, _, notifications = system
    desk = signed_in(intake)
    desk.post("/nouvelle", data={**form_of(desk), **A_NEED})
    [need] = needs_of(intake)
    page = desk.get(f"/demandes/{need.id}/recu")
    assert "Envoyer par SMS" in page.text and "Envoyer par e-mail" not in page.text  # no email given
    sent = desk.post(f"/demandes/{need.id}/recu", data={"csrf": hidden(page.text, "csrf"), "canal": "sms"})
    assert sent.status_code == 200 and sent.url.params["envoye"] == "sms"
    assert "Le reçu part par SMS" in sent.text

    def receipt() -> Delivery | None:
        with notifications.svc.db.read() as session:
            return session.exec(select(Delivery).where(Delivery.kind == "receipt")).first()

    delivery = wait_for(receipt)
    assert delivery is not None
    assert delivery.channel == "sms" and delivery.recipient == "+33612345678" and delivery.recipient_role == "person"
    assert need.reference in delivery.body_text and "Dossier APL" not in delivery.body_text
    # by email: the person gave none
    refused = desk.post(f"/demandes/{need.id}/recu", data={"csrf": hidden(page.text, "csrf"), "canal": "email"})
    assert refused.status_code == 422
    assert "Le reçu n'a pas été envoyé" in refused.text
    history = desk.get(f"/demandes/{need.id}").text
    assert "Reçu envoyé à la personne par SMS" in history


def test_without_a_channel_the_confirmation_says_the_person_receives_nothing(system):
    intake, _, _ = system
    desk = signed_in(intake)
    nothing = {**A_NEED, "phone": "", "preferred_channel": "none"}
    confirmation = desk.post("/nouvelle", data={**form_of(desk), **nothing})
    text = text_of(confirmation.text)
    assert "La personne ne recevra aucun message" in text
    [need] = needs_of(intake)
    assert need.reference in text
    receipt = text_of(desk.get(f"/demandes/{need.id}/recu").text)
    assert "elle ne recevra aucun message" in receipt and "Envoyer par" not in receipt


def test_mes_demandes_is_searched(system):
    intake, _, _ = system
    desk = signed_in(intake)
    desk.post("/nouvelle", data={**form_of(desk), **A_NEED})
    desk.post(
        "/nouvelle",
        data={**form_of(desk), **A_NEED, "display_name": "Marc", "phone": "", "preferred_channel": "none"},
    )
    elodie = next(n for n in needs_of(intake) if n.person_display_name == "Élodie Durand")
    for q in ("elodie", "0612345678", elodie.reference.lower()):
        page = text_of(desk.get("/demandes", params={"q": q}).text)
        assert "Élodie Durand" in page and "– Marc" not in page, q
    assert "Aucune demande ne correspond à « zzz »" in text_of(desk.get("/demandes", params={"q": "zzz"}).text)
