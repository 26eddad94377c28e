"""A partner's access ends with its part: after it declines, after ops reassign the need to another partner, and
after the need is cancelled (intake -> need.cancelled -> referral), the partner's signed link, its inbox (list and
page) and its API say that the need left it and since when, and show none of the person's details."""

from __future__ import annotations

import html

import httpx
import pytest

from shared.signin import referral_link, sign_in_link
from shared.testing import use_sign_in_link, wait_for
from tests.helpers import search

NAME = "Zélie Quintard-Vasseur"
EMAIL = "zelie.quintard@exemple-unique.test"
PHONE_TYPED, PHONE = "06 47 19 28 53", "+33647192853"
SUMMARY = "Aide au logement suspendue après le déménagement rue des Capucins"
# What the partner itself wrote about the person: gone too, with the rest of its history's texts.
DECLINE_REASON = "Mme Quintard-Vasseur relève du CCAS"
SECRETS = (NAME, "Quintard", EMAIL, PHONE, PHONE_TYPED, "647192853", SUMMARY, "Capucins")

EXITS = {
    "decline": "declined",
    "reassign": "cancelled",
    "cancel": "cancelled",
}


def record(intake) -> str:
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": SUMMARY,
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": NAME, "email": EMAIL, "phone": PHONE_TYPED, "preferred_channel": "email"},
        },
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def leave(exit: str, intake, referral, need_id: str, rid: str) -> None:
    """The need leaves caf-76 by one of the three exits."""
    if exit == "decline":
        r = referral.client("caf").post(f"/referrals/{rid}/decline", json={"reason": DECLINE_REASON})
    elif exit == "reassign":
        r = referral.client("ops").post(
            f"/referrals/{rid}/reassign", json={"partner_id": "caf-national", "reason": f"Demande de {NAME}"}
        )
    else:
        r = intake.client("ops").post(f"/needs/{need_id}/cancel", json={"reason": f"Doublon pour {NAME}"})
    assert r.status_code == 200, r.text


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "referral", user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def assert_no_person(text: str, where: str) -> None:
    text = html.unescape(text)
    found = [s for s in SECRETS if s in text]
    assert not found, f"{where} still shows {found}"


@pytest.mark.parametrize("exit", EXITS)
def test_after_the_need_left_the_partner_sees_when_and_nothing_of_the_person(exit, settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    need_id = record(intake)
    rid = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])[0][
        "id"
    ]
    link = httpx.URL(referral_link(settings, rid, "caf-76", now=referral.svc.clock())).raw_path.decode()
    pages = httpx.Client(base_url=referral.url, timeout=30)
    partner = signed_in(referral, "op-caf")
    before = pages.get(link).text
    assert NAME in html.unescape(before) and SUMMARY in html.unescape(before)  # what the checks below must not find

    leave(exit, intake, referral, need_id, rid)
    status = EXITS[exit]
    assert wait_for(lambda: referral.client("ops").get(f"/referrals/{rid}").json()["status"] == status)

    # the signed link from the handoff email
    page = pages.get(link)
    assert page.status_code == 200
    assert "n'est plus suivie par votre organisation depuis le" in html.unescape(page.text)
    assert {"decline": "Déclinée", "reassign": "Annulée", "cancel": "Annulée"}[exit] in page.text
    assert_no_person(page.text, "the link's page")
    # its forms are gone, and a late post changes nothing and shows nothing
    assert 'action="' + link not in page.text
    csrf = search(r'name="csrf" value="([^"]+)"', before).group(1)
    late = pages.post(f"{link}/accept", data={"csrf": csrf})
    assert late.status_code == 409
    assert_no_person(late.text, "the answer to a late action")

    # the inbox: the list filtered on the status, and the referral's page
    inbox = partner.get("/boite", params={"statut": status})
    assert inbox.status_code == 200 and f'href="/boite/{rid}"' in inbox.text
    assert "n'est plus suivie par votre organisation depuis le" in html.unescape(inbox.text)
    assert_no_person(inbox.text, "the inbox")
    detail = partner.get(f"/boite/{rid}")
    assert detail.status_code == 200 and "n'est plus suivie par votre organisation" in html.unescape(detail.text)
    assert_no_person(detail.text, "the inbox's page")

    # the API, as the partner
    api = referral.client("caf")
    one = api.get(f"/referrals/{rid}")
    assert one.status_code == 200
    assert one.json()["status"] == status and one.json()["left_at"] is not None
    assert all(h["detail"] is None for h in one.json()["history"])
    assert_no_person(one.text, "GET /referrals/{id}")
    listed = api.get("/referrals", params={"status": status})
    assert [r["id"] for r in listed.json()["items"]] == [rid] and listed.json()["items"][0]["left_at"]
    assert_no_person(listed.text, "GET /referrals")

    # ops keep the whole record
    assert NAME in html.unescape(signed_in(referral, "ops").get(f"/boite/{rid}").text)


def test_a_partner_that_still_has_the_need_sees_the_person(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    need_id = record(intake)
    rid = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])[0][
        "id"
    ]
    assert referral.client("caf").post(f"/referrals/{rid}/accept").status_code == 200
    page = html.unescape(signed_in(referral, "op-caf").get(f"/boite/{rid}").text)
    assert NAME in page and EMAIL in page and PHONE in page and SUMMARY in page
    assert referral.client("caf").get(f"/referrals/{rid}").json()["left_at"] is None
