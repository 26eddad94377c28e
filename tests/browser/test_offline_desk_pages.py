"""Issue 16, part 1: the itinerant desk records needs offline, in a real browser (Debian's chromium driven by
Playwright, the pages' CSP enforced, the network switched off and on with `context.set_offline`):

- once signed in, the need form and the recent list open with no network (service worker, manifest);
- a need recorded offline is kept in IndexedDB, sealed (nothing of it readable there), counted "En attente d'envoi
  (N)", and sent when the network returns: recorded then (its deadline starts then), once, even when the network is
  cut in the middle of a send after the server recorded it; what the server refuses comes back "À corriger" with
  the form's messages and is fixed on the form;
- a browser restarted while offline still opens the pages, still keeps new needs, and sends them all later.

axe-core on the offline pages (no serious or critical violation); screenshots under test-artifacts/browser/."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect
from sqlmodel import col, select

from services.intake.store import Need
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, sign_in_in_browser, wait_for
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]  # recorded_at and deadlines follow the clock

CAF = "Allocations familiales (CAF)"


class CuttingProxy:
    """The desk's network between the browser and intake: it passes every request on, except that when `cut` is
    set, each send of a kept need reaches the server (which records it) and its answer is then lost, the connection
    closed (ERR_EMPTY_RESPONSE in the page; Chromium may send a POST again on such an error, and loses that answer
    too). The page's requests go through its service worker, where
    Playwright's routing does not see them, so the cut is made here, on the wire."""

    def __init__(self, intake) -> None:
        upstream = intake.url
        self.intake = intake
        self.cut = False
        self.cut_answers: list[int] = []
        client = httpx.Client(base_url=upstream, follow_redirects=False, timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in ("host", "connection")]
                answer = client.request(self.command, self.path, headers=headers, content=body)
                if proxy.cut and self.command == "POST" and self.path == "/hors-ligne/envoyer":
                    proxy.cut_answers.append(answer.status_code)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # recorded, but the answer never arrives
                    return
                content = answer.content
                self.send_response(answer.status_code)
                for k, v in answer.headers.multi_items():
                    if k.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_POST = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.client = client
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@pytest.fixture
def desk_network(settings, start_service):
    """Intake, and the proxy the browser reaches it through (`.url`)."""
    intake = start_service("intake", settings)
    proxy = CuttingProxy(intake)
    yield proxy
    proxy.close()


def needs_of(intake) -> list[Need]:
    with intake.svc.db.read() as session:
        return list(session.exec(select(Need).order_by(col(Need.recorded_at))).all())


def sign_in(page, intake, base: str) -> None:
    link, _ = sign_in_link(intake.settings, intake.name, "desk", now=intake.svc.clock())
    sign_in_in_browser(page, base + urlsplit(link).path)
    assert page.url.endswith("/nouvelle")
    # the service worker has kept the session's copy of the pages
    expect(page.locator("html")).to_have_attribute("data-hors-ligne", "ready")


def fill_need(page, summary: str, consent: bool = True) -> None:
    page.locator("#category").fill(CAF)
    page.locator("#summary").fill(summary)
    page.locator("#display_name").fill("M. Martin")
    page.locator("#preferred_channel-none").check()
    if consent:
        page.locator("#consent").check()


def keep_offline(page, summary: str, count: int, consent: bool = True) -> None:
    """Type a need with no network and press "Enregistrer": kept on the computer, counted in the menu."""
    fill_need(page, summary, consent)
    page.get_by_role("button", name="Enregistrer la demande").click()
    expect(page.locator("#hors-ligne-etat")).to_contain_text("gardée sur cet ordinateur (chiffrée)")
    expect(page.locator("#en-attente-menu")).to_have_text(f"En attente d'envoi ({count})")
    assert page.locator("#summary").input_value() == "", "the form is ready for the next person"


def stored_rows(page) -> list[dict]:
    """What IndexedDB holds, as the page's own script would read it."""
    return page.evaluate(
        """() => new Promise((resolve, reject) => {
            const open = indexedDB.open("relais-accueil");
            open.onsuccess = () => {
                const all = open.result.transaction("kept").objectStore("kept").getAll();
                all.onsuccess = () => resolve(all.result);
                all.onerror = () => reject(all.error);
            };
            open.onerror = () => reject(open.error);
        })"""
    )


def test_needs_kept_offline_are_sent_once_when_the_network_returns(page, check_page, desk_network, clock):
    intake, base = desk_network.intake, desk_network.url
    context = page.context
    sign_in(page, intake, base)
    assert "manifest-src 'self'" in (page.request.get(f"{base}/nouvelle").headers["content-security-policy"])
    manifest = page.request.get(f"{base}/manifest.webmanifest").json()
    assert manifest["start_url"] == "/nouvelle" and manifest["display"] == "standalone"

    # --- no network: the form opens from the copy, and keeps three needs (one without the person's consent)
    context.set_offline(True)
    page.goto(f"{base}/nouvelle")
    expect(page.get_by_role("heading", level=1)).to_have_text("Nouvelle demande")
    assert "Le délai de réponse du partenaire commence quand Relais l'enregistre" in page.inner_text("form.need-form")
    fill_need(page, "Premier dossier hors connexion")
    page.get_by_role("button", name="Enregistrer la demande").dblclick()  # one need kept, not two
    expect(page.locator("#hors-ligne-etat")).to_contain_text("gardée sur cet ordinateur (chiffrée)")
    expect(page.locator("#en-attente-menu")).to_have_text("En attente d'envoi (1)")
    keep_offline(page, "Dossier sans accord", 2, consent=False)
    keep_offline(page, "Troisième dossier hors connexion", 3)
    check_page(page, "desk-offline-form-kept")
    rows = stored_rows(page)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"pending"}
    assert "dossier" not in str(rows).lower() and "Martin" not in str(rows), "IndexedDB holds the need in clear"
    assert needs_of(intake) == []

    # the desk's list opens offline too: the recent list, and the needs waiting
    page.goto(f"{base}/demandes")
    expect(page.get_by_role("heading", level=1)).to_have_text("Demandes récentes")
    expect(page.locator("#en-attente-titre")).to_have_text("En attente d'envoi (3)")
    expect(page.locator("#en-attente li[data-state=pending]")).to_have_count(3)
    assert "le délai de réponse commencera quand Relais l'enregistrera" in page.inner_text("#en-attente")
    check_page(page, "desk-offline-recent-list")

    # --- two hours later the network returns; the first send is cut after the server recorded the need
    clock.advance(timedelta(hours=2))
    back = clock()
    desk_network.cut = True
    context.set_offline(False)  # the page's "online" event sends what was kept
    expect(page.locator("html")).to_have_attribute("data-sending", "stopped")
    assert set(desk_network.cut_answers) == {201}  # the server recorded the first; its answer was lost
    assert len(needs_of(intake)) == 1
    expect(page.locator("#en-attente li")).to_have_count(3)  # it is still waiting: nothing was lost
    desk_network.cut = False

    # sent again (on the next page opened online): the first one records nothing more, the third is recorded
    page.goto(f"{base}/demandes/recentes")
    expect(page.locator("html")).to_have_attribute("data-sending", "done")
    expect(page.locator("#hors-ligne-etat")).to_contain_text("2 demandes gardées hors connexion ont été envoyées")
    needs = needs_of(intake)
    assert [n.summary for n in needs] == ["Premier dossier hors connexion", "Troisième dossier hors connexion"]
    for need in needs:  # recorded, and their deadline started, when the server got them
        assert back <= need.recorded_at <= clock()
    expect(page.locator("#hors-ligne-etat a")).to_have_count(2)
    assert page.locator("#hors-ligne-etat a").first.inner_text() == needs[0].reference

    # --- the one without consent came back to fix, with the form's own message
    kept = page.locator("#en-attente li[data-state=to_fix]")
    expect(kept).to_have_count(1)
    expect(page.locator("#en-attente-menu")).to_have_text("En attente d'envoi (1)")
    assert "La demande ne peut être transmise qu'avec l'accord de la personne" in kept.inner_text()
    check_page(page, "desk-offline-to-fix")
    kept.get_by_role("button", name="Corriger cette demande").click()
    expect(page.locator("#consent")).to_have_attribute("aria-invalid", "true")
    assert page.locator("#summary").input_value() == "Dossier sans accord"
    check_page(page, "desk-offline-fix-form")
    page.locator("#consent").check()
    page.get_by_role("button", name="Enregistrer la demande").click()
    expect(page).to_have_url(f"{base}/demandes/{needs_of(intake)[-1].id}/enregistree")
    assert len(needs_of(intake)) == 3

    # the kept copy is now known as recorded (its key): nothing waits any more, nothing was recorded twice
    page.goto(f"{base}/demandes/recentes")
    expect(page.locator("#en-attente")).to_contain_text("Aucune demande n'attend d'être envoyée")
    expect(page.locator("#en-attente-menu")).to_be_hidden()
    assert len(needs_of(intake)) == 3
    assert stored_rows(page) == []


def test_a_browser_restarted_offline_keeps_and_later_sends_its_needs(chromium, desk_network, tmp_path):
    intake, base = desk_network.intake, desk_network.url
    profile = tmp_path / "profil"

    def launch():
        context = chromium.browser_type.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport=VIEWPORT_DESK, locale="fr-FR"
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(15_000)
        return context, page

    context, page = launch()
    sign_in(page, intake, base)
    context.set_offline(True)
    page.goto(f"{base}/nouvelle")
    keep_offline(page, "Avant le redémarrage", 1)
    context.close()  # the laptop is shut down on the bus

    context, page = launch()
    try:
        context.set_offline(True)
        page.goto(f"{base}/nouvelle")  # still no network: the form opens from the copy
        expect(page.locator("#en-attente-menu")).to_have_text("En attente d'envoi (1)")
        keep_offline(page, "Après le redémarrage", 2)
        assert needs_of(intake) == []
        context.set_offline(False)
        wait_for(lambda: len(needs_of(intake)) == 2)
        expect(page.locator("#hors-ligne-etat")).to_contain_text("2 demandes gardées hors connexion ont été envoyées")
        expect(page.locator("#en-attente-menu")).to_be_hidden()
        assert sorted(n.summary for n in needs_of(intake)) == ["Après le redémarrage", "Avant le redémarrage"]
    finally:
        context.close()


def test_kept_needs_of_a_revoked_session_are_unreadable_and_said_so(page, check_page, desk_network):
    """The laptop is lost with a need kept on it: ops revoke the desk's sessions. The kept need can no longer be
    sent nor read, by anyone; signed in again, the desk is told to type it again, and may delete it."""
    intake, base = desk_network.intake, desk_network.url
    context = page.context
    sign_in(page, intake, base)
    context.set_offline(True)
    page.goto(f"{base}/nouvelle")
    keep_offline(page, "Sur l'ordinateur perdu", 1)
    revoked = intake.client("ops").post("/users/desk/sessions/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] >= 1

    context.set_offline(False)
    expect(page.locator("html")).to_have_attribute("data-sending", "stopped")  # the session is over: nothing sent
    expect(page.locator("#hors-ligne-etat")).to_contain_text("Votre session est terminée")
    assert needs_of(intake) == []
    sign_in(page, intake, base)
    page.goto(f"{base}/demandes/recentes")
    expect(page.locator("html")).to_have_attribute("data-sending", "done")
    kept = page.locator("#en-attente li[data-state=unreadable]")
    expect(kept).to_have_count(1)
    assert "Relais ne peut plus la lire ni l'envoyer" in kept.inner_text()
    check_page(page, "desk-offline-unreadable")
    kept.get_by_role("button", name="Supprimer cette demande de l'ordinateur").click()
    expect(page.locator("#en-attente")).to_contain_text("Aucune demande n'attend d'être envoyée")
    expect(page.locator("#en-attente-menu")).to_be_hidden()
    assert needs_of(intake) == [] and stored_rows(page) == []
