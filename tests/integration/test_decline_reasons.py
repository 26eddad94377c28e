"""A partner declines with a reason code (issue 14, point 5): the codes the API takes, the 422s that say what to fix,
a decline with words only (before the codes) counted as "other", the code seen by the desk through intake and counted
in the dashboard's figures. The three services run over real HTTP and a real Redis."""

from __future__ import annotations

import httpx
import pytest

from shared.testing import wait_for
from tests.integration.test_referral_api import System

CODES = ("out_of_scope", "out_of_territory", "capacity", "already_followed", "other")


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    return System(
        start_service("intake", settings), start_service("referral", settings), start_service("notifications", settings)
    )


def decline(system: System, referral_id: str, body: dict, who: str = "caf"):
    return system.referral.client(who).post(f"/referrals/{referral_id}/decline", json=body)


def test_a_decline_with_a_code_is_kept_on_the_referral_and_told_to_the_desk(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    answer = decline(system, ref["id"], {"reason_code": "capacity"})  # the words are optional with a code
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "declined" and answer.json()["decline_reason"] == "capacity"
    assert system.referral.client("ops").get(f"/referrals/{ref['id']}").json()["decline_reason"] == "capacity"

    seen = system.desk_view(need["id"], status="referred", partner_id="caf-national")  # routed on, as before
    [declined] = [h for h in seen["history"] if h["event"] == "referral.declined"]
    assert declined["reason_code"] == "capacity" and declined["partner_id"] == "caf-76" and declined["detail"] is None


def test_a_decline_with_words_only_still_works_and_counts_as_other(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    answer = decline(system, ref["id"], {"reason": "Hors de notre périmètre"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["decline_reason"] == "other"
    as_ops = system.referral.client("ops").get(f"/referrals/{ref['id']}").json()  # the partner no longer sees texts
    assert as_ops["history"][-1]["detail"] == "Hors de notre périmètre"
    seen = system.desk_view(need["id"], partner_id="caf-national")
    [declined] = [h for h in seen["history"] if h["event"] == "referral.declined"]
    assert (declined["reason_code"], declined["detail"]) == ("other", "Hors de notre périmètre")


@pytest.mark.parametrize("code", CODES)
def test_every_code_is_taken_with_words(system, code):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    answer = decline(system, ref["id"], {"reason_code": code, "reason": "Voir le CCAS de Rouen"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["decline_reason"] == code


def test_a_wrong_decline_gets_a_422_naming_what_to_fix_and_changes_nothing(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])

    unknown = decline(system, ref["id"], {"reason_code": "hors_champ", "reason": "x"})
    assert unknown.status_code == 422, unknown.text
    [problem] = unknown.json()["detail"]
    assert problem["loc"] == ["body", "reason_code"]
    assert all(code in problem["msg"] for code in CODES), problem["msg"]  # the values it takes

    for body in ({"reason_code": "other"}, {"reason_code": "other", "reason": "   "}, {}, {"reason": ""}):
        missing = decline(system, ref["id"], body)
        assert missing.status_code == 422, (body, missing.text)
        [problem] = missing.json()["detail"]
        assert problem["loc"] == ["body", "reason"], body
        assert "reason is required when reason_code is 'other'" in problem["msg"]

    too_long = decline(system, ref["id"], {"reason_code": "capacity", "reason": "x" * 2001})
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["body", "reason"]
    unknown_field = decline(system, ref["id"], {"reason_code": "capacity", "motif": "x"})
    assert unknown_field.status_code == 422 and unknown_field.json()["detail"][0]["loc"] == ["body", "motif"]

    after = system.referral.client("ops").get(f"/referrals/{ref['id']}").json()
    assert after["status"] == "assigned" and after["decline_reason"] is None


def test_another_partners_referral_is_not_found_whatever_the_reason(system):
    need = system.record()
    [ref] = system.referral_of(need["id"])
    assert decline(system, ref["id"], {"reason_code": "capacity"}, who="cpam").status_code == 404


def test_the_dashboard_counts_declines_by_reason(system):
    for code in ("capacity", "capacity", "out_of_scope"):
        need = system.record()
        [ref] = system.referral_of(need["id"])
        assert decline(system, ref["id"], {"reason_code": code}).status_code == 200
    ops = system.referral.client("ops")
    board = wait_for(lambda: (b := ops.get("/dashboard").json()) and b)
    assert board["declines_by_reason"] == [
        {"code": "capacity", "reason": "Capacité atteinte", "count": 2},
        {"code": "out_of_scope", "reason": "Hors de nos compétences", "count": 1},
    ]
    [caf] = [p for p in board["partners"] if p["id"] == "caf-76"]
    assert caf["declines_30d"] == 3 and caf["decline_reasons"] == board["declines_by_reason"]


def test_the_openapi_document_lists_the_codes(system):
    document = httpx.get(f"{system.referral.url}/openapi.json", timeout=60).json()  # built at its first request
    body = document["components"]["schemas"]["DeclineBody"]
    assert body["properties"]["reason_code"]["enum"] == list(CODES)
    assert "other" in body["properties"]["reason"]["description"]
