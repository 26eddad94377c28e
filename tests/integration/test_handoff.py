"""A need recorded at a desk reaches the right partner's inbox: the three services over one real Redis."""

import pytest

from shared.testing import wait_for


@pytest.mark.postgres  # the walking skeleton on the production database
def test_a_recorded_need_is_referred_and_the_partner_emailed(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)

    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL bloqué « urgent » 🙂",
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": "M. D."},
        },
    )
    assert r.status_code == 201, r.text
    need = r.json()

    referrals = wait_for(
        lambda: referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"]
    )
    assert [x["partner_id"] for x in referrals] == ["caf-76"]
    assert referrals[0]["status"] == "assigned" and referrals[0]["sla"] == "on_track"
    assert "76" in referrals[0]["routed_because"]

    mails = wait_for(lambda: mail_sink.to("referent@caf.test.example"))
    assert len(mails) == 1 and "nouvelle demande" in mails[0]["subject"].lower()

    seen = wait_for(
        lambda: (n := intake.client("desk").get(f"/needs/{need['id']}").json())["status"] == "referred" and n
    )
    assert seen["partner_id"] == "caf-76" and seen["summary"] == "Dossier APL bloqué « urgent » 🙂"
    assert [h["event"] for h in seen["history"]] == ["need.recorded", "referral.assigned"]
