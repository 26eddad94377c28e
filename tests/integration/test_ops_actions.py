"""What ops can do through referral's API: pause and resume a partner, read and replay dead letters.
Every action is recorded with who and why."""

from datetime import timedelta

import pytest
from sqlmodel import col, select

from services.referral.store import OpsAction
from shared.testing import need_recorded, wait_for
from tests.helpers import xrange_bytes

pytestmark = pytest.mark.date_sensitive  # deadlines in words, months, dates to come


def record(intake, category="caf"):
    r = intake.client("desk").post(
        "/needs",
        json={"library_id": "chatelet", "category": category, "summary": "x", "postal_code": "76000", "consent": True},
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_paused_partner_is_skipped_by_routing_until_resumed(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    until = (referral.svc.clock() + timedelta(days=3)).isoformat()
    assert (
        referral.client("caf").post("/partners/caf-76/pause", json={"until": until, "reason": "x"}).status_code == 403
    )
    assert ops.post("/partners/nobody/pause", json={"until": until, "reason": "x"}).status_code == 404
    past = ops.post(
        "/partners/caf-76/pause", json={"until": (referral.svc.clock() - timedelta(days=1)).isoformat(), "reason": "x"}
    )
    assert past.status_code == 422 and "until" in past.text
    r = ops.post("/partners/caf-76/pause", json={"until": until, "reason": "Fermeture exceptionnelle"})
    assert r.status_code == 200 and r.json()["paused_until"] and r.json()["pause_reason"] == "Fermeture exceptionnelle"

    need = record(intake)
    ref = wait_for(lambda: ops.get("/referrals", params={"need_id": need}).json()["items"])[0]
    assert ref["partner_id"] == "caf-national" and "en pause" in ref["routed_because"]

    assert ops.post("/partners/caf-76/resume", json={"reason": "Réouverture"}).status_code == 200
    assert ops.post("/partners/caf-76/resume", json={"reason": "encore"}).status_code == 409
    need = record(intake)
    assert (
        wait_for(lambda: ops.get("/referrals", params={"need_id": need}).json()["items"])[0]["partner_id"] == "caf-76"
    )
    partners = {p["id"]: p for p in ops.get("/partners").json()["items"]}
    assert partners["caf-76"]["paused_until"] is None and partners["caf-national"]["open_referrals"] == 1
    with referral.svc.db.transaction() as s:
        assert [(a.actor, a.action, a.reason) for a in s.exec(select(OpsAction).order_by(col(OpsAction.id)))] == [
            ("ops", "pause_partner", "Fermeture exceptionnelle"),
            ("ops", "resume_partner", "Réouverture"),
        ]


async def test_dead_letters_are_listed_and_replayed(settings, start_service):
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    # A need.recorded that names an unknown library fails routing every time: it ends in the dead letters.
    import redis

    event = need_recorded(
        referral.svc.personal_data,
        need_id="n-poison",
        library_id="nowhere",
        category="caf",
        summary="x",
        postal_code=None,
        urgency="normal",
        recorded_at=referral.svc.clock(),
    )
    client = redis.Redis.from_url(settings.redis_url)
    client.xadd(
        settings.key("needs"), {"__data__": event.model_dump_json(), "type": event.type, "event_id": event.event_id}
    )
    letters = wait_for(lambda: ops.get("/dead-letters/needs").json()["items"], 30)
    assert letters[0]["event_id"] == event.event_id and letters[0]["group"] == "referral"
    assert "nowhere" in letters[0]["error"]
    assert ops.get("/dead-letters/nope").status_code == 404
    assert referral.client("caf").get("/dead-letters/needs").status_code == 403

    r = ops.post("/dead-letters/needs/replay", json={"ids": [letters[0]["id"]], "reason": "après correction"})
    assert r.status_code == 200 and r.json() == {"replayed": 1}
    replayed = [fields for _, fields in xrange_bytes(client, settings.key("needs"))]
    assert [f[b"event_id"].decode() for f in replayed] == [event.event_id] * 2  # the original, and the replay
    with referral.svc.db.transaction() as s:
        assert [(a.action, a.reason) for a in s.exec(select(OpsAction))] == [("replay", "après correction")]
    client.close()
