"""Referral's HTTP API against the contract (auth, scope, actions, re-routing, unroutable needs), and the
notifications API (ops only, filters). The services run over real HTTP and talk through a real Redis."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest

from shared.testing import wait_for


def a_need(**changes) -> dict:
    body = {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "M. D."},
    }
    body.update(changes)
    return body


@pytest.fixture
def system(settings, mail_sink, start_service):
    """intake, referral and notifications over one Redis; returns a small helper object."""
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    return System(
        start_service("intake", settings), start_service("referral", settings), start_service("notifications", settings)
    )


class System:
    def __init__(self, intake, referral, notifications) -> None:
        self.intake, self.referral, self.notifications = intake, referral, notifications

    def record(self, **changes) -> dict:
        r = self.intake.client("desk").post("/needs", json=a_need(**changes))
        assert r.status_code == 201, r.text
        return r.json()

    def referrals(self, need_id: str, who: str = "ops") -> list[dict]:
        r = self.referral.client(who).get("/referrals", params={"need_id": need_id})
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def referral_of(self, need_id: str, count: int = 1) -> list[dict]:
        """Wait until the need has `count` referrals (newest first)."""
        items = wait_for(lambda: len(found := self.referrals(need_id)) >= count and found)
        assert items, f"need {need_id}: fewer than {count} referral(s) after waiting"
        return items

    def desk_view(self, need_id: str, **expected) -> dict:
        """Wait until intake's view of the need has the expected fields; returns it."""

        def matches():
            need = self.intake.client("desk").get(f"/needs/{need_id}").json()
            return all(need.get(k) == v for k, v in expected.items()) and need

        need = wait_for(matches)
        assert need, (
            f"need {need_id}: intake never showed {expected}: "
            f"{self.intake.client('desk').get(f'/needs/{need_id}').json()}"
        )
        return need

    def deliveries(self, who: str = "ops", **params) -> httpx.Response:
        return self.notifications.client(who).get("/deliveries", params=params)


# --- auth and scope -------------------------------------------------------------------------------


def test_partners_see_only_their_own_referrals(system):
    caf_need, cpam_need = system.record(), system.record(category="sante")
    [caf_ref] = system.referral_of(caf_need["id"])
    [cpam_ref] = system.referral_of(cpam_need["id"])
    assert (caf_ref["partner_id"], cpam_ref["partner_id"]) == ("caf-76", "cpam-76")

    caf, cpam, ops = system.referral.client("caf"), system.referral.client("cpam"), system.referral.client("ops")
    assert [r["id"] for r in caf.get("/referrals").json()["items"]] == [caf_ref["id"]]
    assert [r["id"] for r in cpam.get("/referrals").json()["items"]] == [cpam_ref["id"]]
    # a partner cannot widen its scope with filters
    assert caf.get("/referrals", params={"partner_id": "cpam-76"}).json()["items"] == []
    assert caf.get("/referrals", params={"need_id": cpam_need["id"]}).json()["items"] == []
    # another partner's referral is not found, exactly like one that does not exist
    assert caf.get(f"/referrals/{caf_ref['id']}").status_code == 200
    for client, other in ((caf, cpam_ref), (cpam, caf_ref)):
        r = client.get(f"/referrals/{other['id']}")
        assert r.status_code == 404, r.text
        assert r.json() == client.get("/referrals/no-such-referral").json()
    # nor may it act on it
    r = caf.post(f"/referrals/{cpam_ref['id']}/accept")
    assert r.status_code == 404, r.text
    assert ops.get(f"/referrals/{cpam_ref['id']}").json()["status"] == "assigned"
    # ops sees everything
    assert {r["id"] for r in ops.get("/referrals").json()["items"]} == {caf_ref["id"], cpam_ref["id"]}
    assert ops.get(f"/referrals/{cpam_ref['id']}").json()["partner_id"] == "cpam-76"


def test_a_referral_has_the_contract_fields(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    full = system.referral.client("caf").get(f"/referrals/{ref['id']}").json()
    assert {
        "id",
        "need_id",
        "partner_id",
        "contact_id",
        "status",
        "respond_by",
        "sla",
        "routed_because",
        "history",
    } <= set(full)
    assert full["need_id"] == need["id"] and full["contact_id"] == "caf-ref"
    assert full["status"] == "assigned" and full["sla"] == "on_track" and full["routed_because"]
    assert datetime.fromisoformat(full["respond_by"]).utcoffset() is not None
    assert [h["action"] for h in full["history"]] == ["assigned"]


def test_desks_may_not_use_the_referral_api(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    desk = system.referral.client("desk")
    for r in (desk.get("/referrals"), desk.get(f"/referrals/{ref['id']}"), desk.post(f"/referrals/{ref['id']}/accept")):
        assert r.status_code == 403, r.text
    # ops reads but does not act for a partner
    assert system.referral.client("ops").post(f"/referrals/{ref['id']}/accept").status_code == 403
    for headers in ({}, {"Authorization": "Bearer nope"}):
        with httpx.Client(base_url=f"{system.referral.url}/api/v1", headers=headers) as anonymous:
            assert anonymous.get("/referrals").status_code == 401
            assert anonymous.get(f"/referrals/{ref['id']}").status_code == 401
            assert anonymous.post(f"/referrals/{ref['id']}/accept").status_code == 401
    assert system.referral.client("ops").get(f"/referrals/{ref['id']}").json()["status"] == "assigned"


def test_referral_list_limit_is_at_most_200(system):
    ops = system.referral.client("ops")
    r = ops.get("/referrals", params={"limit": 201})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "limit"
    assert ops.get("/referrals", params={"limit": 200}).status_code == 200


def test_a_malformed_body_without_a_known_token_is_401_not_422(system):
    import httpx

    url = f"{system.referral.url}/api/v1/referrals/whatever/decline"
    garbage, as_json = b"{not json", {"Content-Type": "application/json"}
    assert httpx.post(url, content=garbage, headers=as_json).status_code == 401
    r = httpx.post(url, content=garbage, headers={**as_json, "Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.json() == {"detail": "missing or unknown bearer token"}
    # A known token: the body's problem is the answer.
    r = system.referral.client("caf").post(
        "/referrals/whatever/decline", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_a_referral_filter_outside_the_contracts_values_is_a_422_naming_it(system):
    ops = system.referral.client("ops")
    for name in ("status", "sla"):
        r = ops.get("/referrals", params={name: "bogus"})
        assert r.status_code == 422 and [e["loc"][-1] for e in r.json()["detail"]] == [name]
    assert ops.get("/referrals", params={"status": "declined", "sla": "breached"}).json()["items"] == []


# --- actions --------------------------------------------------------------------------------------


def test_accept_then_accept_again_is_a_conflict_that_changes_nothing(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    caf = system.referral.client("caf")

    accepted = caf.post(f"/referrals/{ref['id']}/accept")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "accepted" and accepted.json()["sla"] == "met"
    assert [h["action"] for h in accepted.json()["history"]] == ["assigned", "accept"]

    again = caf.post(f"/referrals/{ref['id']}/accept")
    assert again.status_code == 409, again.text
    assert "detail" in again.json()
    assert caf.get(f"/referrals/{ref['id']}").json() == accepted.json()

    seen = system.desk_view(need["id"], status="accepted")
    assert seen["partner_id"] == "caf-76" and seen["sla"] == "met"


def test_respond_then_close(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    caf = system.referral.client("caf")
    assert (
        caf.post(f"/referrals/{ref['id']}/respond", json={"message": "Rendez-vous mardi"}).json()["status"]
        == "responded"
    )
    system.desk_view(need["id"], status="responded")
    r = caf.post(f"/referrals/{ref['id']}/close", json={"outcome": "Droits rétablis"})
    assert r.status_code == 200 and r.json()["status"] == "closed"
    assert caf.post(f"/referrals/{ref['id']}/decline", json={"reason": "trop tard"}).status_code == 409
    assert caf.get(f"/referrals/{ref['id']}").json()["status"] == "closed"
    system.desk_view(need["id"], status="closed")


def test_a_decline_needs_a_reason(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    caf = system.referral.client("caf")
    for body in ({}, {"reason": ""}):
        r = caf.post(f"/referrals/{ref['id']}/decline", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == "reason"
    assert caf.get(f"/referrals/{ref['id']}").json()["status"] == "assigned"


@pytest.mark.date_sensitive
def test_a_decline_routes_the_need_to_the_next_candidate_with_the_same_deadline(system):
    need = system.record()
    [first] = system.referral_of(need["id"])
    assert first["partner_id"] == "caf-76"
    system.desk_view(need["id"], status="referred", partner_id="caf-76")

    r = system.referral.client("caf").post(
        f"/referrals/{first['id']}/decline", json={"reason": "Hors de notre périmètre"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "declined"

    newest, declined = system.referral_of(need["id"], count=2)
    assert declined["id"] == first["id"] and declined["status"] == "declined"
    assert newest["partner_id"] == "caf-national" and newest["status"] == "assigned"
    assert newest["contact_id"] == "cafn-ref"
    assert datetime.fromisoformat(newest["respond_by"]) == datetime.fromisoformat(first["respond_by"])

    seen = system.desk_view(need["id"], status="referred", partner_id="caf-national")
    assert datetime.fromisoformat(seen["respond_by"]) == datetime.fromisoformat(first["respond_by"])
    assert seen["referral_id"] == newest["id"]
    events = [h["event"] for h in seen["history"]]
    assert events == ["need.recorded", "referral.assigned", "referral.declined", "referral.assigned"], events
    assert seen["history"][2]["detail"] == "Hors de notre périmètre"

    # the partner that declined still sees its (declined) referral, and cannot decline it twice
    caf = system.referral.client("caf")
    assert [x["id"] for x in caf.get("/referrals").json()["items"]] == [first["id"]]
    assert caf.post(f"/referrals/{first['id']}/decline", json={"reason": "encore"}).status_code == 409
    assert len(system.referrals(need["id"])) == 2


def test_a_decline_with_no_other_candidate_makes_the_need_unroutable(system):
    need = system.record(category="sante")
    [ref] = system.referral_of(need["id"])
    assert ref["partner_id"] == "cpam-76"
    r = system.referral.client("cpam").post(f"/referrals/{ref['id']}/decline", json={"reason": "Pas chez nous"})
    assert r.status_code == 200, r.text
    seen = system.desk_view(need["id"], status="unroutable")
    assert seen["partner_id"] is None
    assert [h["event"] for h in seen["history"]][-1] == "need.unroutable"
    assert [x["status"] for x in system.referrals(need["id"])] == ["declined"]


def test_a_need_with_no_candidate_gets_no_referral_and_is_unroutable(system):
    need = system.record(category="logement")
    seen = system.desk_view(need["id"], status="unroutable")
    assert seen["partner_id"] is None
    assert [h["event"] for h in seen["history"]] == ["need.recorded", "need.unroutable"]
    assert system.referrals(need["id"]) == []
    assert system.referral.client("ops").get("/referrals").json()["items"] == []


# --- the notifications API ------------------------------------------------------------------------


DELIVERY_FIELDS = {
    "id",
    "need_id",
    "referral_id",
    "kind",
    "channel",
    "recipient_role",
    "status",
    "attempts",
    "created_at",
    "sent_at",
}


def test_deliveries_are_for_ops_only(system):
    need = system.record()
    system.referral_of(need["id"])
    for who in ("desk", "caf"):
        r = system.deliveries(who)
        assert r.status_code == 403, r.text
    for headers in ({}, {"Authorization": "Bearer nope"}):
        with httpx.Client(base_url=f"{system.notifications.url}/api/v1", headers=headers) as anonymous:
            assert anonymous.get("/deliveries").status_code == 401
    assert system.deliveries("ops").status_code == 200


def test_deliveries_filter_by_need_referral_and_status(system, mail_sink):
    one, two = system.record(), system.record(category="sante")
    [ref_one] = system.referral_of(one["id"])
    [ref_two] = system.referral_of(two["id"])

    def handoff_sent(need_id):
        items = system.deliveries(need_id=need_id).json()["items"]
        return [d for d in items if d["kind"] == "handoff" and d["status"] == "sent"]

    [d_one] = wait_for(lambda: handoff_sent(one["id"]))
    [d_two] = wait_for(lambda: handoff_sent(two["id"]))
    assert DELIVERY_FIELDS <= set(d_one)
    assert (d_one["need_id"], d_one["referral_id"], d_one["channel"], d_one["recipient_role"]) == (
        one["id"],
        ref_one["id"],
        "email",
        "partner_contact",
    )
    assert d_one["attempts"] == 1
    assert datetime.fromisoformat(d_one["created_at"]).utcoffset() is not None
    assert datetime.fromisoformat(d_one["sent_at"]).utcoffset() is not None
    assert d_two["referral_id"] == ref_two["id"]

    assert {d["need_id"] for d in system.deliveries(need_id=one["id"]).json()["items"]} == {one["id"]}
    assert {d["need_id"] for d in system.deliveries(need_id=two["id"]).json()["items"]} == {two["id"]}
    handoffs_two = [d for d in system.deliveries(referral_id=ref_two["id"]).json()["items"] if d["kind"] == "handoff"]
    assert [d["id"] for d in handoffs_two] == [d_two["id"]]
    assert system.deliveries(need_id="no-such-need").json()["items"] == []
    sent = {d["id"] for d in system.deliveries(status="sent").json()["items"]}
    assert {d_one["id"], d_two["id"]} <= sent
    assert system.deliveries(status="failed").json()["items"] == []
    assert len(mail_sink.to("referent@caf.test.example")) == 1
    assert len(mail_sink.to("referent@cpam.test.example")) == 1


# --- races and the need's clock -------------------------------------------------------------------


def at_once(count: int, call) -> list[httpx.Response]:
    """`call(i)` from `count` threads released together; their answers."""
    import threading

    barrier = threading.Barrier(count)
    answers: list[httpx.Response | None] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done = [a for a in answers if a is not None]
    assert len(done) == count
    return done


@pytest.mark.postgres  # row locks and ordering differ
@pytest.mark.parametrize(
    "action, body, status", [("accept", None, "accepted"), ("decline", {"reason": "Hors périmètre"}, "declined")]
)
def test_concurrent_actions_on_one_referral_apply_once(system, action, body, status):
    need = system.record()
    [ref] = system.referral_of(need["id"])

    def act(_i):
        with system.referral.client("caf") as caf:
            return caf.post(f"/referrals/{ref['id']}/{action}", json=body)

    answers = at_once(6, act)
    assert sorted(a.status_code for a in answers) == [200] + [409] * 5, [a.text for a in answers]
    full = system.referral.client("caf").get(f"/referrals/{ref['id']}").json()
    assert full["status"] == status
    assert [h["action"] for h in full["history"]] == ["assigned", action]
    if action == "decline":
        system.desk_view(need["id"], status="referred", partner_id="caf-national")
        assert [r["partner_id"] for r in system.referrals(need["id"])] == ["caf-national", "caf-76"]
    else:
        seen = system.desk_view(need["id"], status="accepted")
        assert [h["event"] for h in seen["history"]].count("referral.accepted") == 1


@pytest.mark.postgres  # row locks and ordering differ
def test_referral_pages_return_every_referral_once(system):
    needs = [system.record(summary=f"besoin {i}")["id"] for i in range(5)]
    for need_id in needs:
        system.referral_of(need_id)
    ops, seen, cursor = system.referral.client("ops"), [], None
    while True:
        page = ops.get("/referrals", params={"limit": 2} | ({"cursor": cursor} if cursor else {})).json()
        seen += [r["need_id"] for r in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert sorted(seen) == sorted(needs) and len(seen) == len(set(seen))
    assert [
        r["need_id"] for r in ops.get("/referrals", params={"status": "assigned", "sla": "on_track"}).json()["items"]
    ] == seen


@pytest.mark.date_sensitive
def test_the_first_partners_deadline_is_kept_when_the_need_moves(settings, mail_sink, start_service, tmp_path):
    """caf-76 promises 48 h, caf-national 24 h: after caf-76 declines, the need keeps caf-76's deadline."""
    import yaml

    from shared.testing import directory_data

    data = directory_data()
    partners = {p["id"]: p for p in data["partners"]}
    partners["caf-76"]["sla"] = {"respond_within": "PT48H"}
    partners["caf-national"]["sla"] = {"respond_within": "PT24H"}
    path = tmp_path / "directory-sla.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    settings = settings.model_copy(update={"smtp_url": mail_sink.url, "directory": path})
    system = System(
        start_service("intake", settings), start_service("referral", settings), start_service("notifications", settings)
    )

    need = system.record()
    recorded_at = datetime.fromisoformat(need["recorded_at"])
    [first] = system.referral_of(need["id"])
    assert datetime.fromisoformat(first["respond_by"]) - recorded_at == timedelta(hours=48)
    system.desk_view(need["id"], status="referred", respond_by=first["respond_by"])

    assert (
        system.referral.client("caf")
        .post(f"/referrals/{first['id']}/decline", json={"reason": "Pas de créneau"})
        .status_code
        == 200
    )
    newest, _ = system.referral_of(need["id"], count=2)
    assert newest["partner_id"] == "caf-national"
    assert datetime.fromisoformat(newest["respond_by"]) - recorded_at == timedelta(hours=48)
    seen = system.desk_view(need["id"], status="referred", partner_id="caf-national")
    assert datetime.fromisoformat(seen["respond_by"]) - recorded_at == timedelta(hours=48)
