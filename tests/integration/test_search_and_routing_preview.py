"""Issue 14 across the services: a need's reference travels to referral (the referral object carries it) and to
notifications (the outbox is searched by it); `q=` on referral's referrals and notifications' deliveries keeps each
list's scope; ops filter by library; referral's `GET /api/v1/routing/preview` answers what the routing rule would
decide now. The three services over real HTTP and one real Redis, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from shared.testing import wait_for

pytestmark = pytest.mark.postgres  # the searches' joins and LIKE on both databases


def a_need(**changes) -> dict:
    body = {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué depuis mars",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "Élodie Durand", "phone": "06 12 34 56 78", "preferred_channel": "sms"},
    }
    body.update(changes)
    return body


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    return (
        start_service("intake", settings),
        start_service("referral", settings),
        start_service("notifications", settings),
    )


def record(intake, who: str = "desk", **changes) -> dict:
    answer = intake.client(who).post("/needs", json=a_need(**changes))
    assert answer.status_code == 201, answer.text
    return answer.json()


def referrals(referral, who: str = "ops", **params) -> list[dict]:
    answer = referral.client(who).get("/referrals", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]


def routed(referral, need_id: str) -> dict:
    found = wait_for(lambda: referrals(referral, need_id=need_id))
    assert found, f"need {need_id} was never routed"
    return found[0]


def test_the_referral_carries_its_needs_reference_and_q_finds_it_in_the_partners_scope(system):
    intake, referral, _ = system
    elodie = record(intake)
    marc = record(intake, person={"display_name": "Marc Lefèvre", "email": "marc@example.org"}, summary="Prime")
    soins = record(intake, category="sante", summary="Carte vitale perdue")
    ref = routed(referral, elodie["id"])
    assert ref["reference"] == elodie["reference"]
    routed(referral, marc["id"]), routed(referral, soins["id"])
    assert referral.client("caf").get(f"/referrals/{ref['id']}").json()["reference"] == elodie["reference"]

    def found(who: str, q: str, **params) -> set[str]:
        return {r["need_id"] for r in referrals(referral, who, q=q, **params)}

    assert found("caf", "durand") == {elodie["id"]}
    assert found("caf", "ELODIE apl") == {elodie["id"]}
    assert found("caf", "06.12.34.56.78") == {elodie["id"]}
    assert found("caf", marc["reference"].lower()) == {marc["id"]}
    assert found("caf", "lefevre") == {marc["id"]}
    assert found("caf", "vitale") == set()  # CPAM's, not CAF's
    assert found("cpam", "vitale") == {soins["id"]}
    assert found("ops", "durand") == {elodie["id"], soins["id"]}
    assert found("ops", "durand", library_id="bihorel") == set()
    assert found("ops", "durand", library_id="chatelet") == {elodie["id"], soins["id"]}
    # a front desk has no referral list (its needs are intake's)
    assert referral.client("desk").get("/referrals", params={"q": "durand"}).status_code == 403


def test_a_partner_finds_a_need_it_declined_by_its_reference_only(system):
    intake, referral, _ = system
    need = record(intake)
    ref = routed(referral, need["id"])
    partner = "caf" if ref["partner_id"] == "caf-76" else None
    assert partner, ref
    declined = referral.client("caf").post(f"/referrals/{ref['id']}/decline", json={"reason": "hors zone"})
    assert declined.status_code == 200, declined.text
    assert [r["id"] for r in referrals(referral, "caf", q=need["reference"])] == [ref["id"]]
    assert referrals(referral, "caf", q="durand") == []  # the case is no longer the partner's to search


def test_q_on_referrals_too_long_is_a_422_naming_it(system):
    _, referral, _ = system
    answer = referral.client("ops").get("/referrals", params={"q": "x" * 201})
    assert answer.status_code == 422
    assert [e["loc"] for e in answer.json()["detail"]] == [["query", "q"]]


def test_the_outbox_is_searched_by_reference_and_address_and_filtered_by_library(system):
    intake, referral, notifications = system
    elodie = record(intake)
    other = record(intake, "desk2", library_id="bihorel", postal_code="76420", person={"display_name": "X"})
    routed(referral, elodie["id"]), routed(referral, other["id"])
    ops = notifications.client("ops")

    def found(**params) -> set[str]:
        answer = ops.get("/deliveries", params=params)
        assert answer.status_code == 200, answer.text
        return {d["need_id"] for d in answer.json()["items"]}

    assert wait_for(lambda: found(q=elodie["reference"]) == {elodie["id"]})
    assert found(q=elodie["reference"].lower()) == {elodie["id"]}
    assert wait_for(lambda: found(q="06 12 34 56 78") == {elodie["id"]})  # the person's SMS, in any written form
    # the partner's handoff emails (the other need's may still be on its way: routed is not yet queued)
    assert wait_for(lambda: found(q="referent@caf") >= {elodie["id"], other["id"]})
    assert found(library_id="bihorel") == {other["id"]}
    assert found(library_id="bihorel", q=elodie["reference"]) == set()
    assert ops.get("/deliveries", params={"q": "x" * 201}).status_code == 422
    assert notifications.client("desk").get("/deliveries", params={"q": "x"}).status_code == 403


# --- the routing preview ------------------------------------------------------------------------------------


def preview(referral, who: str = "desk", **params):
    return referral.client(who).get("/routing/preview", params={"library_id": "chatelet", **params})


def test_the_preview_names_the_partner_and_the_deadline_the_need_would_get(system):
    intake, referral, _ = system
    answer = preview(referral, category="caf", postal_code="76000")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["partner"] == {"id": "caf-76", "name": "CAF de la Seine-Maritime"}
    assert "CAF de la Seine-Maritime" in body["routed_because"]
    # what recording the need now gives it: the same partner, the same deadline
    need = record(intake)
    assert routed(referral, need["id"])["partner_id"] == "caf-76"
    # the clock runs between the two calls: the same window, seconds apart
    shift = datetime.fromisoformat(need["respond_by"]) - datetime.fromisoformat(body["respond_by"])
    assert timedelta(0) <= shift < timedelta(seconds=30)
    assert datetime.fromisoformat(need["respond_by"]) - datetime.fromisoformat(need["recorded_at"]) == timedelta(
        hours=72
    )


def test_the_preview_without_postal_code_uses_the_librarys_territory(system):
    _, referral, _ = system
    assert preview(referral, category="sante").json()["partner"]["id"] == "cpam-76"


def test_the_preview_says_when_nobody_would_take_the_need(system):
    _, referral, _ = system
    body = preview(referral, category="logement").json()
    assert body["partner"] is None
    assert body["routed_because"].startswith("Aucun partenaire")
    assert body["respond_by"]


def test_the_preview_follows_the_rule_as_it_stands_now(system, clock):
    _, referral, _ = system
    until = (clock() + timedelta(days=30)).isoformat()
    paused = referral.client("ops").post("/partners/caf-76/pause", json={"until": until, "reason": "congés"})
    assert paused.status_code == 200, paused.text
    body = preview(referral, category="caf", postal_code="76000").json()
    assert body["partner"]["id"] == "caf-national"  # the next candidate of the same rule
    assert "en pause" in body["routed_because"]


def test_the_preview_is_for_a_desk_of_the_library_and_ops(system):
    _, referral, _ = system
    assert preview(referral, "ops", category="caf").status_code == 200
    assert preview(referral, "caf", category="caf").status_code == 403
    other = referral.client("desk2").get("/routing/preview", params={"library_id": "chatelet", "category": "caf"})
    assert other.status_code == 422
    assert [e["loc"] for e in other.json()["detail"]] == [["query", "library_id"]]
    anonymous = referral.client().get("/routing/preview", params={"library_id": "chatelet", "category": "caf"})
    assert anonymous.status_code == 401


def test_the_preview_names_every_bad_parameter(system):
    _, referral, _ = system
    answer = referral.client("ops").get(
        "/routing/preview", params={"library_id": "nowhere", "category": "impots", "postal_code": "7600"}
    )
    assert answer.status_code == 422
    assert {tuple(e["loc"]) for e in answer.json()["detail"]} == {
        ("query", "library_id"),
        ("query", "category"),
        ("query", "postal_code"),
    }
    missing = referral.client("ops").get("/routing/preview", params={"library_id": "chatelet"})
    assert missing.status_code == 422
    assert [e["loc"] for e in missing.json()["detail"]] == [["query", "category"]]
