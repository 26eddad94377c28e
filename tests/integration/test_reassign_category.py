"""Ops reassign a need only to a partner that takes its category; an override is explicit, needs a reason and is
recorded, through the API and the dashboard alike (one handler, `handlers.reassign_referral`)."""

from __future__ import annotations

import html
import re

import httpx
import pytest
from sqlmodel import col, select

from services.referral.store import OpsAction, Referral
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link
from tests.helpers import record_need, search


@pytest.fixture
def referral(settings, start_service):
    return start_service("referral", settings)


def ops_actions(service) -> list[tuple[str, str, str, str]]:
    with service.svc.db.read() as session:
        return [
            (a.actor, a.action, a.target, a.reason) for a in session.exec(select(OpsAction).order_by(col(OpsAction.id)))
        ]


def referrals_of(service, rid: str) -> list[tuple[str, str]]:
    with service.svc.db.read() as session:
        need_id = session.get(Referral, rid).need_id
        rows = session.exec(
            select(Referral).where(Referral.need_id == need_id).order_by(col(Referral.created_at))
        ).all()
        return [(r.partner_id, r.status) for r in rows]


def test_the_api_refuses_a_partner_outside_the_category_unless_forced_with_a_reason(referral):
    ops = referral.client("ops")
    rid = record_need(referral.svc, category="caf")  # routed to caf-76; cpam-76 takes only "sante"

    refused = ops.post(f"/referrals/{rid}/reassign", json={"partner_id": "cpam-76", "reason": "Mauvaise thématique"})
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "partner_id"] and "category 'caf'" in error["msg"] and "force" in error["msg"]

    no_reason = ops.post(f"/referrals/{rid}/reassign", json={"partner_id": "cpam-76", "force": True})
    assert no_reason.status_code == 422 and no_reason.json()["detail"][0]["loc"] == ["body", "reason"]
    assert referrals_of(referral, rid) == [("caf-76", "assigned")] and ops_actions(referral) == []

    forced = ops.post(
        f"/referrals/{rid}/reassign",
        json={"partner_id": "cpam-76", "force": True, "reason": "La personne est déjà suivie par la CPAM"},
    )
    assert forced.status_code == 200, forced.text
    assert [(h["action"], h["detail"]) for h in forced.json()["history"]][-2:] == [
        ("reassign", "cpam-76 : La personne est déjà suivie par la CPAM"),
        ("reassign_override", "La personne est déjà suivie par la CPAM"),
    ]
    assert referrals_of(referral, rid) == [("caf-76", "cancelled"), ("cpam-76", "assigned")]
    assert ops_actions(referral) == [
        ("ops", "reassign_override", f"{rid}:cpam-76", "La personne est déjà suivie par la CPAM")
    ]


def test_a_reassignment_within_the_category_needs_no_force_and_is_recorded(referral):
    ops = referral.client("ops")
    rid = record_need(referral.svc, category="caf")
    done = ops.post(f"/referrals/{rid}/reassign", json={"partner_id": "caf-national", "reason": "Dossier national"})
    assert done.status_code == 200 and "reassign_override" not in [h["action"] for h in done.json()["history"]]
    # the API used to forget the ops log row that the dashboard wrote
    assert ops_actions(referral) == [("ops", "reassign", f"{rid}:caf-national", "Dossier national")]
    # force on a partner that takes the category is no override
    rid = record_need(referral.svc, category="caf")
    assert ops.post(f"/referrals/{rid}/reassign", json={"partner_id": "caf-national", "force": True}).status_code == 200
    assert ops_actions(referral)[-1][1] == "reassign"


def test_the_dashboard_offers_and_accepts_only_partners_of_the_category(referral):
    rid = record_need(referral.svc, category="caf")
    browser = httpx.Client(base_url=referral.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(referral.settings, "referral", "ops", now=referral.svc.clock())
    assert use_sign_in_link(browser, link).status_code == 200

    page = browser.get("/tableau-de-bord/confirmer/reaffecter", params={"orientation": rid})
    offered = re.findall(r'<option value="([^"]+)"', page.text)
    assert offered == ["caf-national"]
    csrf = search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    answer = browser.post(
        "/tableau-de-bord/actions/reaffecter",
        data={"csrf": csrf, "orientation": rid, "partenaire": "cpam-76", "motif": "Essai"},
    )
    assert answer.status_code == 422 and "Choisissez un partenaire dans la liste" in html.unescape(answer.text)
    assert referrals_of(referral, rid) == [("caf-76", "assigned")] and ops_actions(referral) == []

    answer = browser.post(
        "/tableau-de-bord/actions/reaffecter",
        data={"csrf": csrf, "orientation": rid, "partenaire": "caf-national", "motif": "National"},
    )
    assert answer.status_code == 200
    assert referrals_of(referral, rid) == [("caf-76", "cancelled"), ("caf-national", "assigned")]
    assert ops_actions(referral) == [("ops", "reassign", f"{rid}:caf-national", "National")]
