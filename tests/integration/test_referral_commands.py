"""Each ops command of referral has one handler (services/referral/handlers.py), and that handler writes the
`ops_action` row: so the row is there whichever adapter ran the command, the JSON API (bearer token) or the
dashboard's pages (signed-in ops, confirmation step). The first release's API reassign wrote none."""

from __future__ import annotations

import html
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
from sqlmodel import col, select

from services.referral import deps
from services.referral.store import OpsAction
from shared.signin import sign_in_link
from shared.testing import need_recorded, use_sign_in_link, wait_for
from tests.helpers import record_need, search

pytestmark = pytest.mark.date_sensitive  # pause dates in the directory's time zone


def signed_in(service) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "referral", "ops", now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def on_the_dashboard(browser: httpx.Client, path: str, params: dict, fields: dict) -> tuple[int, str]:
    """Open the action's confirmation page, post its form; the answer's status and text."""
    page = browser.get(f"/tableau-de-bord/confirmer/{path}", params=params)
    assert page.status_code == 200, page.text
    csrf = search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    answer = browser.post(f"/tableau-de-bord/actions/{path}", data={"csrf": csrf, **params, **fields})
    return answer.status_code, html.unescape(answer.text)


def ops_log(service) -> list[tuple[str, str, str, str]]:
    with service.svc.db.read() as session:
        return [
            (a.actor, a.action, a.target, a.reason)
            for a in session.exec(select(OpsAction).order_by(col(OpsAction.id))).all()
        ]


def local_day(service, days: int) -> str:
    return (service.svc.clock().astimezone(ZoneInfo("Europe/Paris")).date() + timedelta(days=days)).isoformat()


def test_reassign_is_logged_from_the_api_and_from_the_dashboard(settings, start_service):
    referral = start_service("referral", settings)
    by_api, by_page = record_need(referral.svc), record_need(referral.svc)

    answer = referral.client("ops").post(
        f"/referrals/{by_api}/reassign", json={"partner_id": "caf-national", "reason": "Dossier national"}
    )
    assert answer.status_code == 200, answer.text
    status, text = on_the_dashboard(
        signed_in(referral),
        "reaffecter",
        {"orientation": by_page},
        {"partenaire": "caf-national", "motif": "Par la page"},
    )
    assert status == 200 and "L'orientation a été réaffectée" in text

    assert ops_log(referral) == [
        ("ops", "reassign", f"{by_api}:caf-national", "Dossier national"),
        ("ops", "reassign", f"{by_page}:caf-national", "Par la page"),
    ]


def test_cancel_is_logged_from_the_api_and_from_the_dashboard(settings, start_service):
    """The API cancels a referral (referral's own command); the dashboard cancels the need through intake (which
    owns needs). Each is recorded by its handler."""
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    by_api = record_need(referral.svc)
    assert ops.post(f"/referrals/{by_api}/cancel", json={"reason": "Erreur de saisie"}).status_code == 200

    need = (
        intake.client("desk")
        .post(
            "/needs",
            json={"library_id": "chatelet", "category": "caf", "summary": "x", "postal_code": "76000", "consent": True},
        )
        .json()["id"]
    )
    wait_for(lambda: ops.get("/referrals", params={"need_id": need}).json()["items"])
    status, text = on_the_dashboard(signed_in(referral), "annuler", {"demande": need}, {"motif": "Saisie en double"})
    assert status == 200 and "La demande est annulée" in text

    assert ops_log(referral) == [
        ("ops", "cancel_referral", by_api, "Erreur de saisie"),
        ("ops", "cancel_need", need, "Saisie en double"),
    ]


def test_pause_and_resume_are_logged_from_the_api_and_from_the_dashboard(settings, start_service):
    referral = start_service("referral", settings)
    ops, browser = referral.client("ops"), signed_in(referral)
    until = (referral.svc.clock() + timedelta(days=3)).isoformat()

    assert ops.post("/partners/caf-76/pause", json={"until": until, "reason": "Travaux"}).status_code == 200
    assert ops.post("/partners/caf-76/resume", json={"reason": "Fin des travaux"}).status_code == 200
    paused = on_the_dashboard(
        browser, "pause", {"partenaire": "caf-76"}, {"reprise": local_day(referral, 3), "motif": "Fermeture"}
    )
    assert paused[0] == 200 and "Le partenaire est en pause" in paused[1]
    resumed = on_the_dashboard(browser, "reprise", {"partenaire": "caf-76"}, {"motif": "Réouverture"})
    assert resumed[0] == 200 and "reçoit de nouveau des demandes" in resumed[1]

    assert ops_log(referral) == [
        ("ops", "pause_partner", "caf-76", "Travaux"),
        ("ops", "resume_partner", "caf-76", "Fin des travaux"),
        ("ops", "pause_partner", "caf-76", "Fermeture"),
        ("ops", "resume_partner", "caf-76", "Réouverture"),
    ]


def test_replay_is_logged_from_the_api_and_from_the_dashboard(settings, start_service):
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    client = redis.Redis.from_url(settings.redis_url)
    for need_id in ("n-poison-1", "n-poison-2"):  # an unknown library fails routing every time: dead letters
        event = need_recorded(
            referral.svc.personal_data,
            need_id=need_id,
            library_id="nowhere",
            category="caf",
            summary="x",
            postal_code=None,
            urgency="normal",
            recorded_at=referral.svc.clock(),
        )
        client.xadd(
            settings.key("needs"),
            {"__data__": event.model_dump_json(), "type": event.type, "event_id": event.event_id, "need_id": need_id},
        )
    client.close()
    letters = wait_for(
        lambda: (found := ops.get("/dead-letters/needs").json()["items"]) and len(found) == 2 and found, 30
    )
    by_api, by_page = (next(x["id"] for x in letters if x["need_id"] == n) for n in ("n-poison-1", "n-poison-2"))

    answer = ops.post("/dead-letters/needs/replay", json={"ids": [by_api], "reason": "Après correction"})
    assert answer.status_code == 200 and answer.json() == {"replayed": 1}
    status, text = on_the_dashboard(
        signed_in(referral), "rejouer", {"flux": "needs", "id": by_page}, {"motif": "Par la page"}
    )
    assert status == 200 and "Messages rejoués : 1." in text

    assert ops_log(referral) == [
        ("ops", "replay", f"needs:{by_api}", "Après correction"),
        ("ops", "replay", f"needs:{by_page}", "Par la page"),
    ]


def test_a_test_overrides_the_clock_dependency_instead_of_patching_the_service(settings, start_service):
    """The routers take the clock from `deps.get_clock`: overriding it moves the time every command sees."""
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    later = referral.svc.clock() + timedelta(days=10)
    referral.svc.app.dependency_overrides[deps.get_clock] = lambda: lambda: later
    try:
        in_three_days = (referral.svc.clock() + timedelta(days=3)).isoformat()  # already past at `later`
        refused = ops.post("/partners/caf-76/pause", json={"until": in_three_days, "reason": "x"})
        assert refused.status_code == 422 and "until" in refused.text
        until = (later + timedelta(days=1)).isoformat()
        assert ops.post("/partners/caf-76/pause", json={"until": until, "reason": "Travaux"}).status_code == 200
    finally:
        referral.svc.app.dependency_overrides.clear()
    with referral.svc.db.read() as session:
        assert [a.at for a in session.exec(select(OpsAction)).all()] == [later]
