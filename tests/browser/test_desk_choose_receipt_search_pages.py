"""Issue 14, points 2, 3 and 4, in a real browser (Debian's chromium driven by Playwright, the pages' CSP enforced):

- choose right before sending: the categories some partner takes here come first, the rest under "Autres (pas de
  partenaire connu ici)"; "Qui recevra la demande ?" follows the category as the desk types (with JavaScript) or
  on "Vérifier" (without), records nothing; a "Vouliez-vous dire" suggestion is a button that fills the field;
- something to hand the person: the confirmation shows the reference; the receipt says what was asked, who will
  call and by when, the library's phone and hours, prints on one A4 page, goes by SMS and by email through
  notifications; with no channel, the desk is told the person will receive nothing;
- find anything: "Mes demandes", the partner inbox, the dashboard's search and the outbox page searched by
  reference, name, phone and words of the summary (the outbox holds no name nor summary: reference, e-mail,
  phone); the menus count "Réponses à lire (N)" and "À traiter (N)".

axe-core on every page (no serious or critical violation), at 1280 px and on a phone; screenshots under
test-artifacts/browser/."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import expect
from sqlmodel import select

from services.intake.store import Need
from services.notifications.store import Delivery
from shared.pages import deadline_fr
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, directory_data, sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]  # deadlines in words

CAF, SANTE, LOGEMENT = "Allocations familiales (CAF)", "Assurance maladie", "Logement"
OTHERS = "Autres (pas de partenaire connu ici)"
CAF_76, CPAM = "CAF de la Seine-Maritime", "CPAM Rouen-Elbeuf-Dieppe"
LIBRARY_PHONE, LIBRARY_PHONE_NATIONAL, HOURS = "+33235123456", "02 35 12 34 56", "mar.-sam. 10 h-18 h"
TZ = "Europe/Paris"


@pytest.fixture
def directory_file(tmp_path) -> Path:
    """The tests' directory, the Châtelet library with the phone and opening hours its receipts print."""
    data = directory_data()
    chatelet = next(library for library in data["libraries"] if library["id"] == "chatelet")
    chatelet.update(phone=LIBRARY_PHONE, hours=HOURS)
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def sign_in(page, service, user_id: str) -> None:
    link, _ = sign_in_link(service.settings, service.name, user_id, now=service.svc.clock())
    sign_in_in_browser(page, link)


def needs_of(intake) -> list[Need]:
    with intake.svc.db.read() as session:
        return list(session.exec(select(Need)).all())


def previewed_deadlines(referral, category: str) -> set[str]:
    """The deadline in words referral's routing rule gives a need of `category` now (and a moment ago: the page
    asked a few seconds before, and the minute may have turned)."""
    answer = referral.client("desk").get(
        "/routing/preview", params={"library_id": "chatelet", "category": category, "postal_code": "76000"}
    )
    assert answer.status_code == 200, answer.text
    respond_by = datetime.fromisoformat(answer.json()["respond_by"])
    return {deadline_fr(respond_by - timedelta(seconds=s), TZ) for s in (0, 60)}


def outcome_deadline(region) -> str:
    """The deadline the preview region shows in bold ("qui devra répondre <strong>…</strong>")."""
    return region.locator(".outcome strong").nth(1).inner_text()


def pdf_pages(pdf: bytes) -> int:
    """Pages in a PDF made by Chromium: one /Type /Page object each (/Type /Pages is their parent)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf))


def fits_the_phone(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT_PHONE["width"]


# --- point 2: choose right before sending ------------------------------------------------------------------


def test_the_form_says_who_will_receive_the_need_as_the_desk_types(page, check_page, settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    sign_in(page, intake, "desk")
    assert page.url.endswith("/nouvelle")

    # the categories some partner takes on the library's territory come first, then the others, said so
    options = page.locator("#categories option")
    assert [options.nth(i).get_attribute("value") for i in range(options.count())] == [CAF, SANTE, LOGEMENT]
    assert [options.nth(i).get_attribute("label") for i in range(options.count())] == [None, None, OTHERS]
    page.get_by_text("Voir les thématiques").click()
    listed = page.locator(".category-list")
    assert listed.locator("h3").all_inner_texts() == ["Avec un partenaire pour votre territoire", OTHERS]
    assert listed.locator("ul").nth(0).locator("li").all_inner_texts() == [CAF, SANTE]
    assert listed.locator("ul").nth(1).locator("li").all_inner_texts() == [LOGEMENT]
    region = page.locator("#apercu")
    expect(page.get_by_role("heading", name="Qui recevra la demande ?")).to_be_visible()
    assert "le partenaire qui recevra la demande et son délai de réponse s'affichent ici" in region.inner_text()
    check_page(page, "choose-new-need")

    # typing a category: the region follows, without a submit nor a reload
    page.evaluate("window.relaisNotReloaded = true")
    page.locator("#category").fill(SANTE)
    expect(region).to_contain_text(f"la demande « {SANTE} » ira à {CPAM}")
    assert outcome_deadline(region) in previewed_deadlines(referral, "sante")
    assert "Pourquoi ce partenaire" in region.inner_text()
    page.locator("#category").fill(CAF)
    expect(region).to_contain_text(f"la demande « {CAF} » ira à {CAF_76}")
    assert outcome_deadline(region) in previewed_deadlines(referral, "caf")
    check_page(page, "choose-preview-live")
    page.locator("#postal_code").fill("7600")
    expect(region).to_contain_text("Le code postal n'est pas reconnu")
    page.locator("#postal_code").fill("76000")
    page.locator("#category").fill(LOGEMENT)
    expect(region).to_contain_text(f"Aucun partenaire ne prend la demande « {LOGEMENT} » ici.")
    assert "la coordination départementale sera prévenue" in region.inner_text()
    assert page.evaluate("window.relaisNotReloaded === true"), "the page reloaded instead of updating"
    assert page.url.endswith("/nouvelle") and needs_of(intake) == []  # nothing sent, nothing recorded
    page.set_viewport_size(VIEWPORT_PHONE)
    assert fits_the_phone(page)
    check_page(page, "choose-preview-live-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    # a mistyped category: "Vouliez-vous dire", whose suggestions are buttons that fill the field in place
    page.locator("#category").fill("al")
    page.locator("#summary").fill("Dossier APL bloqué")
    page.get_by_role("button", name="Enregistrer la demande").click()
    page.wait_for_load_state()
    error = page.locator("#category-erreur")
    assert "Vouliez-vous dire" in error.inner_text()
    suggestions = error.get_by_role("button")
    assert [suggestions.nth(i).get_attribute("value") for i in range(suggestions.count())] == [CAF, SANTE]
    check_page(page, "choose-suggestions")
    page.set_viewport_size(VIEWPORT_PHONE)
    assert fits_the_phone(page)
    check_page(page, "choose-suggestions-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    page.evaluate("window.relaisNotReloaded = true")
    error.get_by_role("button", name=SANTE, exact=True).click()
    assert page.locator("#category").input_value() == SANTE
    assert page.evaluate("document.activeElement.id") == "category"
    expect(region).to_contain_text(f"ira à {CPAM}")
    assert page.evaluate("window.relaisNotReloaded === true"), "the suggestion sent the form instead of filling it"
    assert page.locator("#summary").input_value() == "Dossier APL bloqué"
    assert needs_of(intake) == []


class WithoutJavaScript:
    """A page in a browser context with JavaScript disabled (java_script_enabled=False), and how to check it with
    axe-core: axe cannot run there (its timers never fire), so the page as the server sent it is shown again in
    `replay`, a page of the usual context whose own scripts are refused, and checked there (check_page)."""

    def __init__(self, chromium, replay) -> None:
        self.context = chromium.new_context(viewport=VIEWPORT_DESK, locale="fr-FR", java_script_enabled=False)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.replay = replay
        self.headers: dict[str, str] = {}
        self.page.on("response", self._keep_headers)

    def _keep_headers(self, response) -> None:
        if response.request.is_navigation_request() and response.request.frame == self.page.main_frame:
            self.headers = dict(response.headers)

    def check(self, check_page, name: str) -> None:
        html, url = self.page.content(), self.page.url
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "content-encoding")}

        def serve(route) -> None:
            if route.request.is_navigation_request():
                route.fulfill(status=200, headers=headers, body=html)
            elif route.request.resource_type == "script":
                route.abort()  # the page as without JavaScript: none of its scripts runs
            else:
                route.continue_()

        self.replay.set_viewport_size(self.page.viewport_size)
        self.replay.route("**/*", serve)
        try:
            self.replay.goto(url)
            assert self.replay.locator("body").inner_text() == self.page.locator("body").inner_text()
            check_page(self.replay, name)
        finally:
            self.replay.unroute("**/*", serve)

    def close(self) -> None:
        self.context.close()


def test_without_javascript_verifier_shows_the_same_and_records_nothing(
    chromium, page, check_page, settings, start_service
):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    no_js = WithoutJavaScript(chromium, replay=page)
    page = no_js.page
    try:
        sign_in(page, intake, "desk")
        assert page.url.endswith("/nouvelle")
        page.locator("#category").fill(SANTE)
        page.locator("#summary").fill("Carte Vitale perdue")
        page.locator("#display_name").fill("M. Martin")
        with page.expect_navigation():
            page.get_by_role("button", name="Vérifier").click()
        region = page.locator("#apercu")
        assert f"la demande « {SANTE} » ira à {CPAM}" in region.inner_text()
        assert outcome_deadline(region) in previewed_deadlines(referral, "sante")
        assert "Pourquoi ce partenaire" in region.inner_text()
        # what was typed is kept; nothing is recorded
        assert page.locator("#summary").input_value() == "Carte Vitale perdue"
        assert page.locator("#display_name").input_value() == "M. Martin"
        assert needs_of(intake) == []
        no_js.check(check_page, "choose-verifier-no-js")
        page.set_viewport_size(VIEWPORT_PHONE)
        assert fits_the_phone(page)
        no_js.check(check_page, "choose-verifier-no-js-phone")
        page.set_viewport_size(VIEWPORT_DESK)

        page.locator("#category").fill(LOGEMENT)
        with page.expect_navigation():
            page.get_by_role("button", name="Vérifier").click()
        assert f"Aucun partenaire ne prend la demande « {LOGEMENT} » ici." in page.locator("#apercu").inner_text()

        # a suggestion, without JavaScript: a button that sends the form back with the field filled
        page.locator("#category").fill("al")
        with page.expect_navigation():
            page.get_by_role("button", name="Enregistrer la demande").click()
        error = page.locator("#category-erreur")
        assert "Vouliez-vous dire" in error.inner_text()
        no_js.check(check_page, "choose-suggestions-no-js")
        with page.expect_navigation():
            error.get_by_role("button", name=CAF, exact=True).click()
        assert page.locator("#category").input_value() == CAF
        assert f"ira à {CAF_76}" in page.locator("#apercu").inner_text()
        assert page.locator("#summary").input_value() == "Carte Vitale perdue"
        assert page.locator(".error-summary").count() == 0
        assert needs_of(intake) == []
        no_js.check(check_page, "choose-suggestion-chosen-no-js")
    finally:
        no_js.close()


# --- point 3: something to hand the person --------------------------------------------------------------------


def fill_need(page, *, category: str, summary: str, name: str, channel: str, email: str = "", phone: str = ""):
    page.locator("#category").fill(category)
    page.locator("#summary").fill(summary)
    page.locator("#display_name").fill(name)
    page.locator("#email").fill(email)
    page.locator("#phone").fill(phone)
    page.locator(f"#preferred_channel-{channel}").check()
    page.locator("#consent").check()
    if channel != "none":
        page.locator("#consent_messages").check()
    page.get_by_role("button", name="Enregistrer la demande").click()
    page.wait_for_url(re.compile(r"/enregistree$"))


def test_the_desk_hands_a_receipt_printed_or_sent_and_is_told_when_the_person_gets_nothing(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    start_service("referral", settings)
    notifications = start_service("notifications", settings)
    sign_in(page, intake, "desk")

    # --- the confirmation: the reference to give the person, the partner once routed
    fill_need(
        page,
        category=CAF,
        summary="Dossier APL bloqué depuis mars",
        name="Élodie Durand",
        channel="email",
        email="elodie.durand@example.org",
        phone="06 12 34 56 78",
    )
    reference = page.locator(".reference-line .reference").inner_text()
    assert re.fullmatch(r"CHA-\d{4}-\d{4}", reference), reference
    assert f"Référence à donner à la personne : {reference}" in page.locator(".reference-line").inner_text()
    assert "ne recevra aucun message" not in page.locator("main").inner_text()
    page.locator("#suivi").get_by_text(CAF_76, exact=True).wait_for()
    [need] = needs_of(intake)
    assert need.reference == reference
    deadline = deadline_fr(need.respond_by, TZ)
    check_page(page, "receipt-confirmation")

    # --- the receipt: what was asked (not the summary), who will call and by when, how to reach the desk
    page.get_by_role("link", name="Reçu pour la personne").click()
    page.wait_for_url(f"**/demandes/{need.id}/recu")
    receipt = page.locator("article.receipt")
    text = receipt.inner_text()
    assert reference in text and CAF in text
    assert "Dossier APL" not in text  # the private summary only when the desk chooses
    assert f"{CAF_76} vous contactera {deadline}." in " ".join(text.split())
    assert f"Bibliothèque du Châtelet : {LIBRARY_PHONE_NATIONAL}" in text and f"Horaires : {HOURS}" in text
    assert receipt.get_by_role("link", name=LIBRARY_PHONE_NATIONAL).get_attribute("href") == f"tel:{LIBRARY_PHONE}"
    expect(page.get_by_role("button", name="Imprimer le reçu")).to_be_visible()  # with JavaScript
    check_page(page, "receipt")
    page.set_viewport_size(VIEWPORT_PHONE)
    assert fits_the_phone(page)
    check_page(page, "receipt-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    # printed: the receipt alone, on one A4 page
    page.emulate_media(media="print")
    expect(receipt).to_be_visible()
    assert not page.get_by_role("heading", name="Reçu pour la personne").is_visible()
    assert not page.get_by_role("button", name="Envoyer par SMS").is_visible()
    assert pdf_pages(page.pdf(format="A4")) == 1
    page.screenshot(path=str(Path(__file__).resolve().parents[2] / "test-artifacts" / "browser" / "receipt-print.png"))
    page.emulate_media(media="screen")

    # with the summary, when the person wants it: still one page
    page.get_by_label("Montrer aussi le résumé de la demande sur le reçu").check()
    page.get_by_role("button", name="Mettre à jour le reçu").click()
    page.wait_for_url("**resume=oui**")
    assert "Dossier APL bloqué depuis mars" in page.locator("article.receipt").inner_text()
    page.emulate_media(media="print")
    assert pdf_pages(page.pdf(format="A4")) == 1
    page.emulate_media(media="screen")

    # sent by SMS, then by email: notifications sends them, without the summary
    page.get_by_role("button", name="Envoyer par SMS").click()
    page.wait_for_url("**envoye=sms**")
    assert "Le reçu part par SMS" in page.get_by_role("status").first.inner_text()
    check_page(page, "receipt-sent")

    def receipt_by(channel: str) -> Delivery | None:
        with notifications.svc.db.read() as session:
            found = select(Delivery).where(Delivery.kind == "receipt", Delivery.channel == channel)
            return session.exec(found).first()

    sms = wait_for(lambda: receipt_by("sms"))
    assert sms is not None and sms.recipient == "+33612345678" and sms.recipient_role == "person"
    assert reference in sms.body_text and f"{CAF_76} vous contactera" in sms.body_text
    assert "Dossier APL" not in sms.body_text
    page.get_by_role("button", name="Envoyer par e-mail").click()
    page.wait_for_url("**envoye=email**")
    assert "Le reçu part par e-mail" in page.get_by_role("status").first.inner_text()
    mails = wait_for(lambda: [m for m in mail_sink.to("elodie.durand@example.org") if reference in m["subject"]], 30)
    assert [m["subject"] for m in mails] == [f"Votre demande {reference} : {CAF}"]
    body = mails[0]["message"].get_body(preferencelist=("plain",)).get_content()
    assert reference in body and "Dossier APL" not in body
    page.get_by_role("link", name="Retour à la demande").click()
    history = page.locator(".history").inner_text()
    assert "Reçu envoyé à la personne par SMS" in history and "Reçu envoyé à la personne par e-mail" in history

    # --- a person who gave no channel: the desk is told they will receive nothing, and to hand the receipt
    page.get_by_role("link", name="Nouvelle demande").first.click()
    fill_need(page, category=CAF, summary="Prime d'activité", name="Marc", channel="none")
    warning = page.locator(".notice-warn").filter(has_text="La personne ne recevra aucun message")
    assert "donnez-lui le reçu, ou faites-lui noter la référence" in warning.inner_text()
    marc = next(n for n in needs_of(intake) if n.person_display_name == "Marc")
    assert marc.reference in page.locator(".reference-line").inner_text() and marc.reference != reference
    check_page(page, "receipt-confirmation-no-channel")
    warning.get_by_role("link", name="Imprimer le reçu").click()
    page.wait_for_url(f"**/demandes/{marc.id}/recu")
    actions = page.locator("main").inner_text()
    assert "La personne n'a donné ni e-mail ni téléphone : elle ne recevra aucun message." in actions
    assert page.get_by_role("button", name=re.compile("^Envoyer par")).count() == 0
    check_page(page, "receipt-no-channel")


# --- point 4: find anything -----------------------------------------------------------------------------------

ELODIE = {"display_name": "Élodie Durand", "phone": "06 12 34 56 78", "preferred_channel": "sms"}
MARC = {"display_name": "Marc Petit", "email": "marc.petit@example.org", "preferred_channel": "email"}


def menu(page):
    return page.get_by_role("navigation", name="Menu principal")


def search_for(page, q: str, button: str = "Filtrer") -> None:
    """Type `q` in the page's search box and send it; back once the page of results has loaded."""
    page.locator("#q").fill(q)
    with page.expect_navigation():  # not the URL alone: the page before may already hold a q=
        page.get_by_role("button", name=button).click()
    assert page.locator("#q").input_value() == q  # the page of results says what it searched


def test_needs_are_found_by_reference_name_phone_and_words_everywhere_and_menus_count(
    page, check_page, settings, mail_sink, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)
    recorded = {}
    for person, summary in ((ELODIE, "Dossier APL bloqué depuis mars"), (MARC, "Prime d'activité à recalculer")):
        r = intake.client("desk").post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": summary,
                "postal_code": "76000",
                "consent": True,
                "consent_purposes": ["handoff", "messages"],
                "person": person,
            },
        )
        assert r.status_code == 201, r.text
        recorded[person["display_name"]] = r.json()
    elodie, marc = recorded["Élodie Durand"], recorded["Marc Petit"]

    def referral_of(need: dict) -> str | None:
        got = intake.client("desk").get(f"/needs/{need['id']}").json()
        return got["referral_id"] if got["status"] == "referred" else None

    elodie_referral = wait_for(lambda: referral_of(elodie))
    assert elodie_referral and wait_for(lambda: referral_of(marc))
    ref = elodie["reference"]
    queries = (ref.lower(), "durand", "06 12 34 56 78", "APL bloqué")

    # --- the desk's "Mes demandes"
    sign_in(page, intake, "desk")
    page.goto(f"{intake.url}/demandes")
    expect(page.locator(".cards > li")).to_have_count(2)
    for q in queries:
        search_for(page, q)
        cards = page.locator(".cards > li")
        expect(cards, q).to_have_count(1)
        assert "Élodie Durand" in cards.inner_text() and ref in cards.inner_text(), q
    check_page(page, "search-my-needs")
    page.set_viewport_size(VIEWPORT_PHONE)
    assert fits_the_phone(page)
    check_page(page, "search-my-needs-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    search_for(page, "prime activite")
    assert "Marc Petit" in page.locator(".cards > li").inner_text()
    search_for(page, "zzz")
    assert page.locator(".cards > li").count() == 0
    assert "Aucune demande ne correspond à « zzz »." in page.locator("#liste").inner_text()
    assert menu(page).get_by_role("link", name=re.compile(r"^Réponses à lire")).count() == 0

    # --- the partner's inbox: "À traiter (2)", the same searches in the partner's scope
    sign_in(page, referral, "op-caf")
    page.goto(f"{referral.url}/boite")
    expect(menu(page).get_by_role("link", name="À traiter (2)")).to_be_visible()
    for q in queries:
        search_for(page, q)
        lines = page.locator("ol.cards > li")
        expect(lines, q).to_have_count(1)
        assert ref in lines.inner_text(), q
    check_page(page, "search-partner-inbox")
    page.set_viewport_size(VIEWPORT_PHONE)
    assert fits_the_phone(page)
    check_page(page, "search-partner-inbox-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    search_for(page, "zzz")
    assert "Aucune demande ne correspond à « zzz »." in page.get_by_role("status").inner_text()

    # the partner answers one: one left to treat; the desk has one answer to read
    search_for(page, ref)
    page.locator("ol.cards > li a").first.click()
    page.wait_for_url(f"**/boite/{elodie_referral}")
    page.get_by_label("Votre message à l'accueil").fill("Pouvez-vous nous transmettre son dernier avis d'imposition ?")
    page.get_by_role("button", name="Répondre : envoyer le message à l'accueil").click()
    page.wait_for_load_state()
    expect(menu(page).get_by_role("link", name="À traiter (1)")).to_be_visible()
    menu(page).get_by_role("link", name="À traiter (1)").click()
    expect(page.locator("ol.cards > li")).to_have_count(1)
    assert marc["reference"] in page.locator("ol.cards > li").inner_text()
    check_page(page, "search-partner-to-treat")
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{elodie['id']}").json()["answers_unread"])
    page.goto(f"{intake.url}/demandes")
    to_read = menu(page).get_by_role("link", name="Réponses à lire (1)")
    expect(to_read).to_be_visible()
    to_read.click()
    expect(page.locator(".cards > li")).to_have_count(1)
    assert ref in page.locator(".cards > li").inner_text()
    check_page(page, "search-answers-to-read")

    # --- the dashboard's search: across partners, to the inbox's list, filtered by library
    sign_in(page, referral, "ops")
    for q in queries:
        page.goto(f"{referral.url}/tableau-de-bord")
        search_for(page, q, "Rechercher")
        assert "/boite?" in page.url
        lines = page.locator("ol.cards > li")
        expect(lines, q).to_have_count(1)
        assert ref in lines.inner_text(), q
    check_page(page, "search-dashboard-results")
    page.goto(f"{referral.url}/tableau-de-bord")
    page.locator("#q").fill("durand")
    page.get_by_label("Lieu d'accueil").select_option(label="Médiathèque de Bihorel")
    page.get_by_role("button", name="Rechercher").click()
    page.wait_for_url("**lieu=bihorel**")
    assert page.locator("ol.cards > li").count() == 0
    assert "Aucune demande ne correspond à « durand »." in page.get_by_role("status").inner_text()
    page.goto(f"{referral.url}/tableau-de-bord")
    check_page(page, "search-dashboard")

    # --- the outbox page: by reference, and by the address a message went to (no name nor summary there)
    def sent_to_people() -> bool:
        with notifications.svc.db.read() as session:
            rows = session.exec(select(Delivery).where(Delivery.recipient_role == "person")).all()
            return {d.recipient for d in rows} >= {"+33612345678", "marc.petit@example.org"}

    assert wait_for(sent_to_people, 30)
    sign_in(page, notifications, "ops")
    page.goto(f"{notifications.url}/envois")
    assert "référence, e-mail ou téléphone" in page.get_by_text("Rechercher").inner_text()
    search_for(page, ref)
    rows = page.locator("table.deliveries tbody tr")
    assert rows.count() >= 2  # at least the partner's email and the person's SMS about this need
    table = page.locator("table.deliveries").inner_text()
    assert "+336…78" in table and "m…@example.org" not in table
    check_page(page, "search-outbox")
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "search-outbox-phone")
    page.set_viewport_size(VIEWPORT_DESK)
    search_for(page, "06 12 34 56 78")
    rows = page.locator("table.deliveries tbody tr")
    assert rows.count() >= 1
    assert all("+336…78" in row for row in rows.all_inner_texts())
    search_for(page, "marc.petit@example.org")
    rows = page.locator("table.deliveries tbody tr")
    assert rows.count() >= 1
    assert all("m…@example.org" in row for row in rows.all_inner_texts())
    page.locator("#q").fill(ref)
    page.get_by_label("Lieu d'accueil").select_option(label="Médiathèque de Bihorel")
    page.get_by_role("button", name="Filtrer").click()
    page.wait_for_url("**lieu=bihorel**")
    assert "Aucun envoi ne correspond à ce filtre." in page.get_by_role("status").inner_text()
