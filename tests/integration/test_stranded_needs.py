"""No need is stranded: a need no partner can take, or that every candidate declined, is on ops' list "Sans
partenaire" (the dashboard's `stranded`), oldest deadline first, with why; ops hand it to a partner with
`POST /api/v1/needs/{need_id}/assign`, which keeps its deadline, tells intake (and so the desk), the partner and the
person, and is recorded in the ops log. Intake lists such needs for ops across libraries (`status=unroutable`).
The three services run over real HTTP and talk through a real Redis."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlmodel import col, select

from services.referral.store import ClockTimer, NeedCase, OpsAction
from shared.testing import wait_for

pytestmark = pytest.mark.date_sensitive


def a_need(**changes) -> dict:
    body = {
        "library_id": "chatelet",
        "category": "logement",  # no partner of the test directory takes it
        "summary": "Expulsion annoncée",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "M. D.", "email": "md@example.org", "preferred_channel": "email"},
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


def desk_view(intake, need_id: str, who: str = "desk", **expected) -> dict:
    def matches():
        need = intake.client(who).get(f"/needs/{need_id}").json()
        return need if all(need.get(k) == v for k, v in expected.items()) else None

    seen = wait_for(matches)
    assert seen, f"need {need_id} never had {expected}: {intake.client(who).get(f'/needs/{need_id}').json()}"
    return seen


def stranded(referral) -> dict:
    r = referral.client("ops").get("/dashboard")
    assert r.status_code == 200, r.text
    return r.json()["stranded"]


def assign(referral, need_id: str, who: str = "ops", **body):
    return referral.client(who).post(f"/needs/{need_id}/assign", json={"reason": "Vu au téléphone", **body})


@pytest.mark.postgres
def test_a_need_nobody_takes_is_listed_then_handed_to_a_partner_keeping_its_deadline(system, mail_sink):
    intake, referral = system
    later = record(intake, summary="Plus tard")  # recorded first: the earlier deadline, first in the list
    need = record(intake)
    other_library = record(intake, "desk2", library_id="bihorel", postal_code="76420")
    for n, who in ((need, "desk"), (later, "desk"), (other_library, "desk2")):
        desk_view(intake, n["id"], who, status="unroutable")

    # intake: ops list the needs nobody holds, every library's
    listed = intake.client("ops").get("/needs", params={"status": "unroutable"}).json()["items"]
    assert {n["id"] for n in listed} == {need["id"], later["id"], other_library["id"]}
    assert {n["id"] for n in intake.client("desk").get("/needs", params={"status": "unroutable"}).json()["items"]} == {
        need["id"],
        later["id"],
    }

    # referral: the list, oldest deadline first, with why; the deadline is the one intake gave at recording
    found = stranded(referral)
    assert found["count"] == 3
    assert [n["need_id"] for n in found["needs"]] == [later["id"], need["id"], other_library["id"]]
    line = found["needs"][1]
    assert line["cause"] == "no_taker" and line["declined_by"] == [] and line["takers"] == []
    assert line["library_name"] == "Bibliothèque du Châtelet" and line["category_label"] == "Logement"
    assert datetime.fromisoformat(line["respond_by"]) == datetime.fromisoformat(need["respond_by"])
    assert line["assign_url"] == f"/tableau-de-bord/confirmer/confier?demande={need['id']}"

    # ops hand it to a partner outside its category (agreed by phone): the deadline stays
    r = assign(referral, need["id"], partner_id="cpam-76")
    assert r.status_code == 200, r.text
    handed = r.json()
    assert handed["partner_id"] == "cpam-76" and handed["contact_id"] == "cpam-ref" and handed["status"] == "assigned"
    assert datetime.fromisoformat(handed["respond_by"]) == datetime.fromisoformat(need["respond_by"])
    assert handed["routed_because"].startswith("Confiée à CPAM Rouen-Elbeuf-Dieppe par la coordination")
    assert "ops" not in handed["routed_because"]  # no user id in words shown to people

    assert [n["need_id"] for n in stranded(referral)["needs"]] == [later["id"], other_library["id"]]
    seen = desk_view(intake, need["id"], status="referred", partner_id="cpam-76")
    assert datetime.fromisoformat(seen["respond_by"]) == datetime.fromisoformat(need["respond_by"])
    assert [h["event"] for h in seen["history"]] == ["need.recorded", "need.unroutable", "referral.assigned"]
    assert wait_for(lambda: mail_sink.to("referent@cpam.test.example")), "the partner was not told"
    assert wait_for(lambda: mail_sink.to("md@example.org")), "the person was not told"

    with referral.svc.db.read() as s:
        actions = s.exec(select(OpsAction).order_by(col(OpsAction.id))).all()
        assert [(a.actor, a.action, a.target, a.reason) for a in actions] == [
            ("ops", "assign", f"{need['id']}:cpam-76", "Vu au téléphone")
        ]
        timers = s.exec(select(ClockTimer).where(ClockTimer.need_id == need["id"])).all()
        breach = [t for t in timers if t.kind == "breach"]
        assert len(breach) == 1 and breach[0].due_at == datetime.fromisoformat(need["respond_by"])
        assert all(t.due_at <= breach[0].due_at for t in timers)
        case = s.get_one(NeedCase, need["id"])
        assert case.stranded_since is None and case.stranded_cause is None

    # the same need again: a partner holds it now; the answer says what to do instead
    again = assign(referral, need["id"], partner_id="caf-76")
    assert again.status_code == 409 and f"/referrals/{handed['id']}/reassign" in again.json()["detail"]


def test_a_need_every_candidate_declined_is_listed_with_who_declined(system):
    intake, referral = system
    need = record(intake, category="sante")
    ref = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"])
    r = referral.client("cpam").post(f"/referrals/{ref[0]['id']}/decline", json={"reason": "Pas chez nous"})
    assert r.status_code == 200, r.text
    desk_view(intake, need["id"], status="unroutable")
    [line] = stranded(referral)["needs"]
    assert line["cause"] == "declined" and line["declined_by"] == ["CPAM Rouen-Elbeuf-Dieppe"]
    assert line["takers"] == ["CPAM Rouen-Elbeuf-Dieppe"]

    # a contact of the chosen partner by id; the partner that declined may take it after all
    r = assign(referral, need["id"], partner_id="cpam-76", contact_id="cpam-ref")
    assert r.status_code == 200, r.text
    assert datetime.fromisoformat(r.json()["respond_by"]) == datetime.fromisoformat(need["respond_by"])
    desk_view(intake, need["id"], status="referred", partner_id="cpam-76")
    assert stranded(referral) == {"count": 0, "needs": []}


def test_assigning_says_what_to_fix(system):
    intake, referral = system
    need = record(intake)
    desk_view(intake, need["id"], status="unroutable")
    wait_for(lambda: stranded(referral)["count"] == 1)

    for who in ("desk", "caf"):
        assert assign(referral, need["id"], who, partner_id="cpam-76").status_code == 403
    assert assign(referral, "no-such-need", partner_id="cpam-76").status_code == 404

    unknown = assign(referral, need["id"], partner_id="nobody")
    assert unknown.status_code == 422
    [problem] = unknown.json()["detail"]
    assert problem["loc"] == ["body", "partner_id"] and "cpam-76" in problem["msg"]  # the partners to choose from

    wrong_contact = assign(referral, need["id"], partner_id="cpam-76", contact_id="caf-ref")
    assert wrong_contact.status_code == 422
    [problem] = wrong_contact.json()["detail"]
    assert problem["loc"] == ["body", "contact_id"] and "cpam-ref" in problem["msg"]

    no_reason = referral.client("ops").post(f"/needs/{need['id']}/assign", json={"partner_id": "cpam-76"})
    assert no_reason.status_code == 422 and "reason" in no_reason.text

    # cancelled by ops at intake: it leaves the list and cannot be handed to anyone
    r = intake.client("ops").post(f"/needs/{need['id']}/cancel", json={"reason": "Enregistrée par erreur"})
    assert r.status_code == 200, r.text
    assert wait_for(lambda: stranded(referral)["count"] == 0)
    gone = assign(referral, need["id"], partner_id="cpam-76")
    assert gone.status_code == 409 and "cancelled" in gone.json()["detail"]
    with referral.svc.db.read() as s:
        assert s.exec(select(OpsAction)).all() == []  # nothing was done
