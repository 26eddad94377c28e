"""What ops do from the dashboard's pages (each with its confirmation step and reason, through the owning
service), who may not, and what the three services tell Prometheus and the logs about one need's path."""

from __future__ import annotations

import html
import json
import logging
import re
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlmodel import col, select

from services.referral.store import OpsAction
from shared.logs import ContextFilter, JsonFormatter
from shared.service import internal_token
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import search

pytestmark = pytest.mark.date_sensitive  # deadlines in words, months, dates to come


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "referral", user_id, now=service.svc.clock())
    answer = use_sign_in_link(client, link)
    assert answer.status_code == 200, answer.text
    return client


def csrf_of(html: str) -> str:
    return search(r'name="csrf" value="([^"]+)"', html).group(1)


def record(intake, **person) -> dict:
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "x",
            "postal_code": "76000",
            "consent": True,
            "person": person,
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


def confirm_and_post(browser, action: str, params: dict, fields: dict) -> tuple[int, str]:
    """Open the confirmation page, then post its form; the answer's status and text (entities decoded)."""
    page = browser.get(f"/tableau-de-bord/confirmer/{action}", params=params)
    assert page.status_code == 200, page.text
    answer = browser.post(f"/tableau-de-bord/actions/{action}", data={"csrf": csrf_of(page.text), **params, **fields})
    return answer.status_code, html.unescape(answer.text)


def test_reassign_pause_resume_and_cancel_from_the_dashboard(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    need = record(intake)
    ref = wait_for(lambda: ops.get("/referrals", params={"need_id": need["id"]}).json()["items"])[0]
    browser = signed_in(referral, "ops")

    # reassign: a partner must be chosen, and a reason given
    missing = confirm_and_post(browser, "reaffecter", {"orientation": ref["id"]}, {"motif": "Dossier national"})
    assert missing[0] == 422 and "Choisissez un partenaire" in missing[1]
    done = confirm_and_post(
        browser, "reaffecter", {"orientation": ref["id"]}, {"partenaire": "caf-national", "motif": "Dossier national"}
    )
    assert done[0] == 200 and "L'orientation a été réaffectée" in done[1]
    items = ops.get("/referrals", params={"need_id": need["id"]}).json()["items"]
    assert [(r["partner_id"], r["status"]) for r in items] == [("caf-national", "assigned"), ("caf-76", "cancelled")]
    again = confirm_and_post(
        browser, "reaffecter", {"orientation": ref["id"]}, {"partenaire": "caf-national", "motif": "encore"}
    )
    assert again[0] == 409 and "ne peut plus être réaffectée" in again[1]

    # pause until a day to come, then resume
    today = referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")).date()
    past = confirm_and_post(browser, "pause", {"partenaire": "caf-76"}, {"reprise": today.isoformat(), "motif": "x"})
    assert past[0] == 422 and "Choisissez une date à venir" in past[1]
    resume_on = today + timedelta(days=3)
    paused = confirm_and_post(
        browser,
        "pause",
        {"partenaire": "caf-76"},
        {"reprise": resume_on.isoformat(), "motif": "Fermeture pour travaux"},
    )
    assert paused[0] == 200 and "Le partenaire est en pause" in paused[1]
    caf = next(p for p in ops.get("/partners").json()["items"] if p["id"] == "caf-76")
    assert caf["pause_reason"] == "Fermeture pour travaux"
    assert (
        caf["paused_until"].startswith(resume_on.isoformat())
        or caf["paused_until"][:10] == (resume_on - timedelta(days=1)).isoformat()
    )  # midnight in Paris is the evening before in UTC
    resumed = confirm_and_post(browser, "reprise", {"partenaire": "caf-76"}, {"motif": "Réouverture"})
    assert resumed[0] == 200 and "reçoit de nouveau des demandes" in resumed[1]
    twice = confirm_and_post(browser, "reprise", {"partenaire": "caf-76"}, {"motif": "Réouverture"})
    assert twice[0] == 409 and "n'est plus en pause" in twice[1]

    # cancel the need through intake: the open referral is cancelled, its clock stopped, the desk sees it closed
    unknown = confirm_and_post(browser, "annuler", {"demande": "nope"}, {"motif": "Erreur"})
    assert unknown[0] == 404 and "ne connaît pas cette demande" in unknown[1]
    cancelled = confirm_and_post(browser, "annuler", {"demande": need["id"]}, {"motif": "Saisie en double"})
    assert cancelled[0] == 200 and "La demande est annulée" in cancelled[1]
    assert wait_for(
        lambda: ops.get("/referrals", params={"need_id": need["id"]}).json()["items"][0]["status"] == "cancelled"
    )
    current = ops.get("/referrals", params={"need_id": need["id"]}).json()["items"][0]
    last = ops.get(f"/referrals/{current['id']}").json()["history"][-1]
    assert (last["action"], last["actor"], last["detail"]) == ("cancel", "ops", "Saisie en double")
    desk_view = intake.client("desk").get(f"/needs/{need['id']}").json()
    assert desk_view["status"] == "closed" and "need.cancelled" in [h["event"] for h in desk_view["history"]]
    from services.referral.store import ClockTimer

    with referral.svc.db.read() as s:
        timers = s.exec(select(ClockTimer).where(ClockTimer.need_id == need["id"])).all()
    assert timers and {t.outcome for t in timers} == {"cancelled"}
    twice = confirm_and_post(browser, "annuler", {"demande": need["id"]}, {"motif": "Saisie en double"})
    assert twice[0] == 409 and "déjà annulée ou clôturée" in twice[1]

    with referral.svc.db.read() as s:
        assert [(a.actor, a.action, a.reason) for a in s.exec(select(OpsAction).order_by(col(OpsAction.id)))] == [
            ("ops", "reassign", "Dossier national"),
            ("ops", "pause_partner", "Fermeture pour travaux"),
            ("ops", "resume_partner", "Réouverture"),
            ("ops", "cancel_need", "Saisie en double"),
        ]
    board = browser.get("/tableau-de-bord").text
    assert "Saisie en double" in board and "Demande annulée" in board  # the latest actions, with who and why

    # the monthly reports as CSV, fetched from intake by referral (the cancelled need does not count)
    month = referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")).strftime("%Y-%m")
    sheet = browser.get("/tableau-de-bord/rapports.csv", params={"mois": month})
    assert sheet.status_code == 200 and sheet.headers["content-type"].startswith("text/csv")
    rows = sheet.text.lstrip("\ufeff").splitlines()
    assert rows[0].startswith("Mois;Lieu d'accueil") and rows[1].startswith(f"{month};Bibliothèque du Châtelet;")
    assert rows[1].split(";")[4] == "0"  # needs recorded: the one need was cancelled as recorded in error


def test_partners_and_desks_get_403_on_every_ops_page_and_endpoint(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)

    partner = signed_in(referral, "op-caf")
    csrf = csrf_of(partner.get("/boite").text)
    for path in (
        "/tableau-de-bord",
        "/tableau-de-bord/chiffres",
        "/tableau-de-bord/rapports.csv",
        "/tableau-de-bord/confirmer/pause?partenaire=caf-76",
        "/tableau-de-bord/confirmer/rejouer?flux=needs",
        "/tableau-de-bord/confirmer/reaffecter?orientation=x",
        "/tableau-de-bord/confirmer/annuler?demande=x",
        "/tableau-de-bord/confirmer/reprise?partenaire=caf-76",
    ):
        answer = partner.get(path)
        assert answer.status_code == 403 and "Accès non autorisé" in html.unescape(answer.text), path
    for action in ("rejouer", "reaffecter", "pause", "reprise", "annuler"):
        assert partner.post(f"/tableau-de-bord/actions/{action}", data={"csrf": csrf, "motif": "x"}).status_code == 403
    assert "Tableau de bord" not in partner.get("/boite").text  # the link is for ops only

    # A desk cannot even sign in here; its sign-in link is refused with 403.
    desk_browser = httpx.Client(base_url=referral.url, timeout=30)
    link, _ = sign_in_link(referral.settings, "referral", "desk", now=referral.svc.clock())
    assert desk_browser.get(httpx.URL(link).raw_path.decode()).status_code == 403

    endpoints = [
        (referral, "GET", "/dashboard", None),
        (referral, "GET", "/partners", None),
        (
            referral,
            "POST",
            "/partners/caf-76/pause",
            {"until": (referral.svc.clock() + timedelta(days=1)).isoformat(), "reason": "x"},
        ),
        (referral, "POST", "/partners/caf-76/resume", {"reason": "x"}),
        (referral, "GET", "/dead-letters/needs", None),
        (referral, "POST", "/dead-letters/needs/replay", {"reason": "x"}),
        (referral, "POST", "/referrals/x/reassign", {"partner_id": "caf-national"}),
        (referral, "POST", "/referrals/x/cancel", {"reason": "x"}),
        (intake, "POST", "/needs/x/cancel", {"reason": "x"}),
        (notifications, "GET", "/deliveries/stats", None),
        (notifications, "GET", "/deliveries", None),
        *((service, "GET", "/ops/outbox", None) for service in (intake, referral, notifications)),
    ]
    for who in ("caf", "desk"):
        for service, method, path, body in endpoints:
            answer = service.client(who).request(method, path, json=body)
            assert answer.status_code == 403, (who, service.name, path, answer.status_code)
    assert intake.client("caf").get("/reports").status_code == 403
    # intake's reports are a desk's own figures too: a desk sees its library only, ops all of them
    assert [r["library_id"] for r in intake.client("desk").get("/reports").json()["items"]] == ["chatelet"]
    assert len(intake.client("ops").get("/reports").json()["items"]) == 2
    # every service's pages lead to the dashboard, on referral
    for service in (intake, referral, notifications):
        page = httpx.get(f"{service.url}/connexion", timeout=30)
        assert f'href="{referral.url}/tableau-de-bord"' in page.text, service.name
    # the services' own credential is accepted as ops, the wrong one is not
    internal = {"Authorization": f"Bearer {internal_token(settings)}"}
    assert httpx.get(f"{intake.url}/api/v1/ops/outbox", headers=internal).status_code == 200
    assert httpx.get(f"{intake.url}/api/v1/ops/outbox", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_one_needs_path_in_metrics_and_logs(settings, mail_sink, start_service):
    """Each service's /metrics, and the JSON log lines of the three services that carry the need's correlation id
    from the desk's request to the partner's email, with no personal data."""
    lines: list[dict] = []
    raw: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raw.append(record.getMessage() + " " + json.dumps({k: str(v) for k, v in vars(record).items()}))
            lines.append(json.loads(self.format(record)))

    handler = Capture(level=logging.INFO)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        settings = settings.model_copy(update={"smtp_url": mail_sink.url})
        intake = start_service("intake", settings)
        referral = start_service("referral", settings)
        notifications = start_service("notifications", settings)
        r = intake.client("desk").post(
            "/needs",
            headers={"X-Correlation-ID": "corr-obs-1"},
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": "Loyer impayé",
                "postal_code": "76000",
                "consent": True,
                "person": {
                    "display_name": "Zoé Testperson",
                    "email": "zoe.testperson@example.org",
                    "phone": "+33612345678",
                    "preferred_channel": "email",
                },
            },
        )
        assert r.status_code == 201 and r.headers["x-correlation-id"] == "corr-obs-1"
        need_id = r.json()["id"]
        assert wait_for(lambda: mail_sink.to("referent@caf.test.example"))

        def emitted():
            return {
                line["event_type"]
                for line in lines
                if line.get("correlation_id") == "corr-obs-1"
                and line.get("need_id") == need_id
                and line["msg"].startswith("emit")
            }

        assert wait_for(lambda: {"need.recorded", "referral.assigned", "delivery.sent"} <= emitted()), emitted()
        http = [
            line for line in lines if line["logger"] == "relais.http" and line.get("correlation_id") == "corr-obs-1"
        ]
        assert http and http[0]["msg"] == "POST /api/v1/needs 201"
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    ours = [line for line in raw if '"name": "relais' in line]  # the services' loggers (not the test's SMTP sink)
    assert len(ours) > 10
    for secret in ("Testperson", "zoe.testperson", "+33612345678", "612345678", "Loyer impayé"):
        assert not [line for line in ours if secret in line], secret

    text = {s.name: httpx.get(f"{s.url}/metrics").text for s in (intake, referral, notifications)}
    for name, body in text.items():
        assert f'relais_outbox_backlog{{service="{name}"}}' in body
        assert "relais_http_requests_total" in body and "relais_http_request_seconds" in body
    needs = f"{settings.namespace}:needs"
    acked = re.compile(
        rf'faststream_received_processed_messages_total\{{app_name="referral",broker="redis",'
        rf'handler="{needs}",status="acked"\}} [1-9][0-9]*\.0'
    )
    # FastStream counts the message once acked, after its handler returned: the handoff email can arrive first. Under
    # load it may count it twice: an entry idle past claim_idle_ms (500 ms here) is claimed and delivered again, and
    # the ledger skips it. That the work was done once is the next line's single open referral.
    assert wait_for(lambda: acked.search(httpx.get(f"{referral.url}/metrics").text)), "need.recorded never acked"
    assert 'relais_open_referrals{sla="on_track"} 1.0' in text["referral"]
    assert 'relais_deliveries{channel="email",status="sent"}' in text["notifications"]
    assert "relais_timer_firing_lag_seconds" in text["referral"]
