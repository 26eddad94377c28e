"""A person's data across the three services: the export (one JSON document, whole or refused), the erasure (every
service, the partner told, pending messages stopped, once only) and the access log (who looked), over one real Redis
with the test clock."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis

from shared.events import NeedRecorded, parse_event
from shared.messaging import DATA_FIELD
from shared.people import ERASED
from shared.signin import referral_link, sign_in_link
from shared.testing import TestClock, use_sign_in_link, wait_for
from tests.helpers import xrange_text

NAME, EMAIL, PHONE = "Zoé Quidam-Essai", "zoe.quidam@example.org", "+33612345678"
SUMMARY = "Loyer impayé depuis mars, Zoé vit avec sa fille"
ANSWER = "Nous appelons Zoé Quidam jeudi au 06 12 34 56 78"
DISTINCTIVE = (NAME, EMAIL, PHONE, "Loyer impayé", "appelons Zoé")


@pytest.fixture
def clock() -> TestClock:
    """A Tuesday evening: the person's SMS after the partner's answer waits for the morning (quiet hours), so an
    erasure finds it still queued."""
    return TestClock(datetime(2026, 12, 1, 21, 30, tzinfo=ZoneInfo("Europe/Paris")))


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    return {name: start_service(name, settings) for name in ("intake", "referral", "notifications")}


def record(intake, **person) -> dict:
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": SUMMARY,
            "postal_code": "76000",
            "consent": True,
            "person": person or {"display_name": NAME, "email": EMAIL, "phone": PHONE, "preferred_channel": "sms"},
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, service.name, user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def deliveries(notifications, need_id: str) -> list[dict]:
    return notifications.client("ops").get("/deliveries", params={"need_id": need_id, "limit": 200}).json()["items"]


def seed(system) -> tuple[dict, dict, str]:
    """A need handed to the CAF, accepted and answered; the person's confirmation sent, their next SMS held for the
    morning; its details read by ops (intake API), the partner (its link) and ops (the outbox page)."""
    intake, referral, notifications = system["intake"], system["referral"], system["notifications"]
    need = record(intake)
    referrals = wait_for(
        lambda: referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"]
    )
    assert referrals, "the need was not routed"
    referral_id = referrals[0]["id"]
    caf = referral.client("caf")
    assert caf.post(f"/referrals/{referral_id}/accept").status_code == 200
    assert caf.post(f"/referrals/{referral_id}/respond", json={"message": ANSWER}).status_code == 200

    def settled() -> list[dict] | None:
        found = deliveries(notifications, need["id"])
        person = [d for d in found if d["recipient_role"] == "person"]
        sent = [d for d in person if d["status"] == "sent"]
        held = [d for d in person if d["status"] == "queued"]
        desk = [d for d in found if d["recipient_role"] == "front_desk" and d["status"] == "sent"]
        return found if sent and held and len(desk) >= 2 else None

    assert wait_for(settled), deliveries(notifications, need["id"])
    assert intake.client("ops").get(f"/needs/{need['id']}").status_code == 200
    partner_page = httpx.get(referral_link(referral.settings, referral_id, "caf-76", referral.svc.clock()))
    assert partner_page.status_code == 200 and NAME in partner_page.text
    held = next(d for d in deliveries(notifications, need["id"]) if d["status"] == "queued")
    ops_pages = signed_in(notifications, "ops")
    assert ops_pages.get(f"/envois/{held['id']}").status_code == 200
    ops_pages.close()
    return need, referrals[0], held["id"]


@pytest.mark.postgres
def test_the_export_holds_everything_and_the_erasure_removes_it_everywhere_once(system, mail_sink, redis_url, clock):
    intake, referral, notifications = system["intake"], system["referral"], system["notifications"]
    need, ref, held_id = seed(system)
    person_id = need["person_id"]

    # The export: one document with every service's part.
    answer = intake.client("desk").get(f"/people/{person_id}/export")
    assert answer.status_code == 200, answer.text
    export = answer.json()
    assert export["person"]["display_name"] == NAME and export["person"]["phone"] == PHONE
    assert [n["summary"] for n in export["needs"]] == [SUMMARY]
    assert [h["event"] for h in export["needs"][0]["history"]][:2] == ["need.recorded", "referral.assigned"]
    case = export["referral"]["needs"][0]
    assert case["person"]["email"] == EMAIL and case["summary"] == SUMMARY
    actions = {h["action"]: h["detail"] for h in case["referrals"][0]["history"]}
    assert ANSWER in actions["respond"]
    texts = {(d["kind"], d["recipient_role"], d["status"]): d for d in export["notifications"]["deliveries"]}
    assert (
        texts["person_confirmation", "person", "sent"]["body_text"]
        and texts["person_confirmation", "person", "sent"]["recipient"] == PHONE
    )
    assert ANSWER in texts["partner_answered", "front_desk", "sent"]["body_text"]
    # The partner's signed link in its handoff is a credential: the person's copy does not carry it.
    assert "/r/••••••" in texts["handoff", "partner_contact", "sent"]["body_text"]
    assert export["notifications"]["contacts"][0]["phone"] == PHONE
    logged = {(e["service"], e["role"], e["channel"], e["what"]) for e in export["access_log"]}
    assert logged == {
        ("intake", "ops", "api", "need"),
        ("referral", "partner", "page", "referral"),
        ("notifications", "ops", "page", "delivery"),
    }
    partner_read = next(e for e in export["access_log"] if e["service"] == "referral")
    assert partner_read["user_id"] == "link:caf-76" and partner_read["need_id"] == need["id"]
    # Ops' access log, assembled the same way; an export by ops is a read of its own.
    assert intake.client("ops").get(f"/people/{person_id}/export").status_code == 200
    log = intake.client("ops").get(f"/people/{person_id}/access-log").json()["items"]
    assert ("intake", "export") in {(e["service"], e["what"]) for e in log}
    # Ops see it on the need's page, which they may open on the desk's pages (and that read is logged too).
    ops_desk_pages = signed_in(intake, "ops")
    need_page = ops_desk_pages.get(f"/demandes/{need['id']}")
    ops_desk_pages.close()
    assert need_page.status_code == 200 and 'id="consultations"' in need_page.text
    assert "link:caf-76" in need_page.text and "Exporter les données de la personne" in need_page.text
    assert ("intake", "page", "need") in {
        (e["service"], e["channel"], e["what"])
        for e in intake.client("ops").get(f"/people/{person_id}/access-log").json()["items"]
    }

    # The erasure.
    erased = intake.client("desk").post(f"/people/{person_id}/erase", json={"reason": "demande au guichet"})
    assert erased.status_code == 202, erased.text
    assert erased.json()["already_erased"] is False and erased.json()["need_ids"] == [need["id"]]

    caf = referral.client("caf")
    seen = wait_for(lambda: (r := caf.get(f"/referrals/{ref['id']}").json())["person_erased_at"] and r)
    assert seen and seen["status"] == "responded"  # the figures keep it
    assert all(h["detail"] in (None, ERASED) for h in seen["history"])
    notice = wait_for(lambda: [m for m in mail_sink.to("referent@caf.test.example") if "effacées" in m["subject"]])
    assert len(notice) == 1
    page = httpx.get(referral_link(referral.settings, ref["id"], "caf-76", referral.svc.clock()))
    assert "Données effacées à la demande de la personne le" in page.text and NAME not in page.text

    def stopped() -> bool:
        held = next(d for d in deliveries(notifications, need["id"]) if d["id"] == held_id)
        return held["status"] == "suppressed" and held["suppressed_reason"] == "person_erased"

    assert wait_for(stopped)
    desk_view = intake.client("desk").get(f"/needs/{need['id']}").json()
    assert desk_view["summary"] == ERASED and desk_view["person"]["display_name"] == ERASED
    assert desk_view["person"]["email"] is None and desk_view["person"]["phone"] is None
    assert desk_view["status"] == "responded" and desk_view["category"] == "caf"  # what the figures count

    after = wait_for(
        lambda: (
            (e := intake.client("desk").get(f"/people/{person_id}/export").json())["notifications"]["contacts"][0][
                "erased_at"
            ]
            and e
        )
    )
    text = json.dumps(after, ensure_ascii=False)
    for clear in DISTINCTIVE:
        assert clear not in text, clear
    assert after["erasure"]["requested_by"] == "desk" and after["erasure"]["reason"] == "demande au guichet"

    # The morning comes: the held SMS never goes.
    clock.advance(timedelta(hours=12))
    again = intake.client("desk").post(f"/people/{person_id}/erase", json={"reason": "encore"})
    assert again.status_code == 202 and again.json()["already_erased"] is True
    assert datetime.fromisoformat(again.json()["erased_at"]) == datetime.fromisoformat(erased.json()["erased_at"])
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    needs_stream = [e["type"] for e in xrange_text(client, intake.settings.key("needs"))]
    referral_stream = [e["type"] for e in xrange_text(client, intake.settings.key("referrals"))]
    assert needs_stream.count("person.erased") == 1 and referral_stream.count("referral.person_erased") == 1
    # Crypto-shredding: the person's data key is gone, so the need.recorded still in the stream opens no more.
    recorded = [
        parse_event(json.loads(e[DATA_FIELD])["data"])
        for e in xrange_text(client, intake.settings.key("needs"))
        if e["type"] == "need.recorded"
    ]
    assert recorded and all(isinstance(e, NeedRecorded) for e in recorded)
    assert [intake.svc.personal_data.open_need(e) for e in recorded if isinstance(e, NeedRecorded)] == [None]
    client.close()
    held = next(d for d in deliveries(notifications, need["id"]) if d["id"] == held_id)
    assert held["status"] == "suppressed" and held["sent_at"] is None
    assert len([m for m in mail_sink.to("referent@caf.test.example") if "effacées" in m["subject"]]) == 1

    # What the partner writes afterwards is not kept either: the need is there for the figures only.
    closed = caf.post(f"/referrals/{ref['id']}/close", json={"outcome": "Zoé rappelée au 0612345678"})
    assert closed.status_code == 200 and closed.json()["history"][-1]["detail"] == f"{ERASED}"
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{need['id']}").json()["status"] == "closed")
    final = json.dumps(intake.client("desk").get(f"/people/{person_id}/export").json(), ensure_ascii=False)
    assert "Zoé" not in final and "0612345678" not in final


@pytest.mark.postgres
def test_only_ops_and_the_desks_of_the_persons_library_may_export_or_erase(system):
    intake = system["intake"]
    need = record(intake, display_name=NAME)
    person_id = need["person_id"]
    for path, call in ((f"/people/{person_id}/export", "get"), (f"/people/{person_id}/erase", "post")):
        body = {"json": {"reason": "test"}} if call == "post" else {}
        assert getattr(intake.client("desk2"), call)(path, **body).status_code == 404  # another library's desk
        assert getattr(intake.client("caf"), call)(path, **body).status_code == 403  # a partner
        assert getattr(intake.client(), call)(path, **body).status_code == 401
        assert (
            getattr(intake.client("ops"), call)("/people/nobody/" + path.rsplit("/", 1)[1], **body).status_code == 404
        )
    assert intake.client("desk").get(f"/people/{person_id}/access-log").status_code == 403  # ops only
    assert intake.client("desk").post(f"/people/{person_id}/erase", json={"reason": ""}).status_code == 422
    assert intake.client("desk").get(f"/needs/{need['id']}").json()["summary"] == SUMMARY  # nothing erased


def test_an_export_is_refused_whole_when_a_service_does_not_answer(settings, start_service):
    intake = start_service("intake", settings)
    start_service("referral", settings)  # notifications is not running
    need = record(intake, display_name=NAME)
    answer = intake.client("desk").get(f"/people/{need['person_id']}/export")
    assert answer.status_code == 503 and "notifications" in answer.json()["detail"]
