"""Partner and ops actions on a referral: concurrent actions settle one way; ops reassign and cancel."""

import threading

from shared.testing import wait_for


def _routed(intake, referral, category="caf"):
    r = intake.client("desk").post(
        "/needs",
        json={"library_id": "chatelet", "category": category, "summary": "x", "postal_code": "76000", "consent": True},
    )
    need = r.json()
    refs = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"])
    return need, refs[0]


def test_an_accept_and_a_decline_at_the_same_moment_settle_one_way(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    for _ in range(3):
        need, ref = _routed(intake, referral)
        barrier = threading.Barrier(2)
        answers: dict[str, int] = {}

        def do(action, body=None, barrier=barrier, answers=answers, ref=ref):
            client = referral.client("caf")
            barrier.wait()
            answers[action] = client.post(f"/referrals/{ref['id']}/{action}", json=body).status_code

        threads = [
            threading.Thread(target=do, args=("accept",)),
            threading.Thread(target=do, args=("decline", {"reason": "Hors de notre champ"})),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        final = referral.client("ops").get(f"/referrals/{ref['id']}").json()
        actions = [h["action"] for h in final["history"]]
        if answers["accept"] == 200 and answers["decline"] == 200:
            # accepted first, then declined (allowed from accepted): both recorded in that order
            assert final["status"] == "declined" and actions == ["assigned", "accept", "decline"]
        else:
            assert sorted(answers.values()) == [200, 409], answers
            winner = "accept" if answers["accept"] == 200 else "decline"
            assert final["status"] == {"accept": "accepted", "decline": "declined"}[winner]
            assert actions == ["assigned", winner]


def test_ops_reassign_keeps_the_deadline_and_the_desk_follows(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    need, ref = _routed(intake, referral)
    ops = referral.client("ops")
    assert (
        referral.client("caf").post(f"/referrals/{ref['id']}/reassign", json={"partner_id": "caf-national"}).status_code
        == 403
    )
    bad = ops.post(f"/referrals/{ref['id']}/reassign", json={"partner_id": "nobody"})
    assert bad.status_code == 422 and "partner_id" in bad.text
    r = ops.post(f"/referrals/{ref['id']}/reassign", json={"partner_id": "caf-national", "reason": "Dossier national"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert [h["action"] for h in r.json()["history"]][-1] == "reassign"
    items = ops.get("/referrals", params={"need_id": need["id"]}).json()["items"]
    new = [x for x in items if x["status"] == "assigned"]
    assert [x["partner_id"] for x in new] == ["caf-national"] and new[0]["respond_by"] == ref["respond_by"]
    # in words, no account id: who acted is in the history
    assert new[0]["routed_because"] == "Confiée à CAF plateforme nationale par la coordination (réaffectation)"
    seen = wait_for(
        lambda: (n := intake.client("desk").get(f"/needs/{need['id']}").json())["partner_id"] == "caf-national" and n
    )
    assert seen["status"] == "referred"


def test_ops_cancel_closes_the_need_for_the_desk(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    need, ref = _routed(intake, referral)
    r = referral.client("ops").post(f"/referrals/{ref['id']}/cancel", json={"reason": "Enregistrée par erreur"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert referral.client("ops").post(f"/referrals/{ref['id']}/cancel", json={"reason": "encore"}).status_code == 409
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{need['id']}").json()["status"] == "closed")
