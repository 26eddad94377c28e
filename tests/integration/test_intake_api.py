"""Intake's HTTP API against the contract: POST /api/v1/needs validation, auth and scope, lists and idempotency.

Intake alone over real HTTP, on its own database (SQLite, and PostgreSQL when configured) and a real Redis.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import select

from services.intake.store import TABLES, Need
from shared.db import Database, OutboxMessage

SUMMARY = "Dossier APL bloqué depuis « mars » : l'usager n'a plus d'accès 🙂 — ça presse"


def a_need(**changes) -> dict:
    body = {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "M. D.", "email": "m.d@example.org"},
    }
    body.update(changes)
    return body


def failing_fields(response) -> set[str]:
    """The fields a 422 names, as dotted paths inside the body or query (`person.phone`, `limit`)."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    return {".".join(str(part) for part in error["loc"][1:]) for error in detail}


def needs_in_db(settings) -> list[Need]:
    db = Database(settings.intake_database_url, TABLES)
    try:
        with db.transaction() as session:
            return list(session.exec(select(Need)).all())
    finally:
        db.dispose()


def recorded_events(settings) -> int:
    db = Database(settings.intake_database_url, TABLES)
    try:
        with db.transaction() as session:
            return session.exec(
                select(sa.func.count()).select_from(OutboxMessage).where(OutboxMessage.type == "need.recorded")
            ).one()
    finally:
        db.dispose()


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("consent", [False, None, "missing", "yes", "true", 1, "false", 0])
def test_consent_must_be_true(desk, settings, consent):
    body = a_need()
    if consent == "missing":
        del body["consent"]
    else:
        body["consent"] = consent
    assert "consent" in failing_fields(desk.post("/needs", json=body))
    assert needs_in_db(settings) == []


def test_unknown_category_is_named(desk):
    assert failing_fields(desk.post("/needs", json=a_need(category="impots"))) == {"category"}


def test_unknown_library_is_refused(desk):
    assert failing_fields(desk.post("/needs", json=a_need(library_id="nowhere"))) == {"library_id"}


def test_bad_email_is_named(desk):
    r = desk.post("/needs", json=a_need(person={"email": "not-an-address"}))
    assert failing_fields(r) == {"person.email"}


def test_sms_without_phone_names_phone(desk):
    r = desk.post("/needs", json=a_need(person={"email": "m.d@example.org", "preferred_channel": "sms"}))
    assert failing_fields(r) == {"person.phone"}


def test_email_channel_without_email_names_email(desk):
    r = desk.post("/needs", json=a_need(person={"phone": "06 12 34 56 78", "preferred_channel": "email"}))
    assert failing_fields(r) == {"person.email"}


def test_bad_phone_is_named(desk):
    assert failing_fields(desk.post("/needs", json=a_need(person={"phone": "12"}))) == {"person.phone"}


@pytest.mark.parametrize(
    "typed, stored",
    [("06 12 34 56 78", "+33612345678"), ("(514) 555-0123", "+15145550123"), ("+33 2 35 00 00 00", "+33235000000")],
)
def test_phones_are_stored_in_e164(desk, typed, stored):
    r = desk.post("/needs", json=a_need(person={"phone": typed, "preferred_channel": "sms"}))
    assert r.status_code == 201, r.text
    assert r.json()["person"]["phone"] == stored
    assert r.json()["person"]["preferred_channel"] == "sms"
    assert desk.get(f"/needs/{r.json()['id']}").json()["person"]["phone"] == stored


@pytest.mark.parametrize("postal_code", ["7600", "760000", "ABCDE", "H2X-1Y", "7600A"])
def test_bad_postal_code_is_named(desk, postal_code):
    assert failing_fields(desk.post("/needs", json=a_need(postal_code=postal_code))) == {"postal_code"}


@pytest.mark.postgres  # the text as typed, stored by PostgreSQL
def test_summary_is_kept_exactly_as_typed(desk, settings):
    r = desk.post("/needs", json=a_need(summary=SUMMARY))
    assert r.status_code == 201, r.text
    assert r.json()["summary"] == SUMMARY
    assert desk.get(f"/needs/{r.json()['id']}").json()["summary"] == SUMMARY
    assert [n.summary for n in needs_in_db(settings)] == [SUMMARY]


def test_summary_too_long_or_blank_is_named(desk):
    assert failing_fields(desk.post("/needs", json=a_need(summary="é" * 2001))) == {"summary"}
    assert failing_fields(desk.post("/needs", json=a_need(summary="   "))) == {"summary"}
    assert desk.post("/needs", json=a_need(summary="é" * 2000)).status_code == 201


def test_unknown_fields_are_refused(desk, settings):
    assert "priority" in failing_fields(desk.post("/needs", json=a_need(priority="high")))
    r = desk.post("/needs", json=a_need(person={"email": "m.d@example.org", "birth_date": "1970-01-01"}))
    assert "person.birth_date" in failing_fields(r)
    assert needs_in_db(settings) == []


def test_every_failing_field_is_named_at_once(desk):
    body = a_need(summary="x" * 2001, postal_code="1", person={"email": "nope"})
    del body["consent"]
    assert failing_fields(desk.post("/needs", json=body)) >= {"summary", "postal_code", "person.email", "consent"}


def test_the_directorys_refusals_are_named_with_the_bodys(desk, settings):
    """A body pydantic refuses is still checked against the directory and the channel rule: all at once."""
    r = desk.post("/needs", json={"library_id": "zzz", "category": "zzz", "summary": "x", "consent": False})
    assert failing_fields(r) == {"library_id", "category", "consent"}
    r = desk.post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "zzz",
            "consent": True,
            "person": {"preferred_channel": "sms", "email": "bad"},
        },
    )
    assert failing_fields(r) == {"category", "summary", "person.email", "person.phone"}
    assert needs_in_db(settings) == []


# --- auth and scope -------------------------------------------------------------------------------


def test_a_desk_records_for_its_own_library_only(desk, settings):
    # another library's id answers as an unknown one does: ids cannot be probed
    theirs = desk.post("/needs", json=a_need(library_id="bihorel"))
    unknown = desk.post("/needs", json=a_need(library_id="nowhere"))
    assert failing_fields(theirs) == failing_fields(unknown) == {"library_id"}
    assert theirs.json() == unknown.json()
    assert needs_in_db(settings) == []


@pytest.mark.parametrize("who", ["caf", "ops"])
def test_other_roles_may_not_record(intake, settings, who):
    r = intake.client(who).post("/needs", json=a_need())
    assert r.status_code == 403, r.text
    assert needs_in_db(settings) == []


def test_no_token_or_unknown_token_is_401(intake, settings):
    import httpx

    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic dGVzdDp0ZXN0"}):
        with httpx.Client(base_url=f"{intake.url}/api/v1", headers=headers) as client:
            for r in (client.post("/needs", json=a_need()), client.get("/needs"), client.get("/needs/whatever")):
                assert r.status_code == 401, r.text
                assert "detail" in r.json()
    assert needs_in_db(settings) == []


def test_another_librarys_need_is_not_found(intake, desk):
    need = desk.post("/needs", json=a_need()).json()
    r = intake.client("desk2").get(f"/needs/{need['id']}")
    assert r.status_code == 404, r.text
    assert intake.client("desk2").get("/needs/no-such-need").status_code == 404
    assert intake.client("ops").get(f"/needs/{need['id']}").json()["id"] == need["id"]
    assert intake.client("caf").get(f"/needs/{need['id']}").status_code == 403


# --- what a recorded need looks like --------------------------------------------------------------


@pytest.mark.date_sensitive
def test_a_recorded_need_answers_its_id_status_and_deadline(desk):
    r = desk.post("/needs", json=a_need())
    assert r.status_code == 201, r.text
    need = r.json()
    assert isinstance(need["id"], str) and need["id"]
    assert need["status"] == "recorded"
    recorded_at, respond_by = datetime.fromisoformat(need["recorded_at"]), datetime.fromisoformat(need["respond_by"])
    assert recorded_at.utcoffset() is not None and respond_by.utcoffset() is not None
    assert respond_by - recorded_at == timedelta(hours=72)
    seen = desk.get(f"/needs/{need['id']}").json()
    assert seen["status"] == "recorded" and seen["partner_id"] is None and seen["sla"] == "on_track"
    assert [h["event"] for h in seen["history"]] == ["need.recorded"]
    assert datetime.fromisoformat(seen["history"][0]["at"]).utcoffset() is not None
    assert datetime.fromisoformat(seen["respond_by"]) == respond_by


@pytest.mark.date_sensitive
def test_the_deadline_answered_at_recording_is_the_window_of_the_partner_the_rule_picks(
    settings, start_service, tmp_path
):
    import yaml

    from shared.testing import directory_data

    data = directory_data()
    caf = next(p for p in data["partners"] if p["id"] == "caf-76")
    caf["sla"] = {"respond_within": "PT48H"}  # as in the contract's example
    directory = tmp_path / "sla48.yaml"
    directory.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    intake = start_service("intake", settings.model_copy(update={"directory": directory}))

    need = intake.client("desk").post("/needs", json=a_need()).json()
    assert datetime.fromisoformat(need["respond_by"]) - datetime.fromisoformat(need["recorded_at"]) == timedelta(
        hours=48
    )
    # Nobody takes the category: the directory's default window.
    nobody = intake.client("desk").post("/needs", json=a_need(postal_code="H2X 1Y4")).json()
    assert datetime.fromisoformat(nobody["respond_by"]) - datetime.fromisoformat(nobody["recorded_at"]) == timedelta(
        hours=72
    )


# --- lists ----------------------------------------------------------------------------------------


def test_a_desk_lists_its_own_needs_newest_first(intake, desk):
    mine = [desk.post("/needs", json=a_need(summary=f"besoin {i}")).json()["id"] for i in range(4)]
    theirs = intake.client("desk2").post("/needs", json=a_need(library_id="bihorel", postal_code="76420")).json()["id"]
    page = desk.get("/needs").json()
    assert [n["id"] for n in page["items"]] == mine[::-1]
    assert page["next_cursor"] is None
    assert [n["id"] for n in intake.client("desk2").get("/needs").json()["items"]] == [theirs]
    # asking for another library's needs shows nothing of them
    assert desk.get("/needs", params={"library_id": "bihorel"}).json()["items"] == []
    assert {n["id"] for n in intake.client("ops").get("/needs").json()["items"]} == {*mine, theirs}


def test_limit_is_at_most_200(desk):
    assert failing_fields(desk.get("/needs", params={"limit": 201})) == {"limit"}
    assert failing_fields(desk.get("/needs", params={"limit": 0})) == {"limit"}
    assert desk.get("/needs", params={"limit": 200}).status_code == 200


def test_a_bad_cursor_is_named(desk):
    assert failing_fields(desk.get("/needs", params={"cursor": "not a cursor"})) == {"cursor"}


@pytest.mark.postgres  # ordering by (created_at, id) in SQL
def test_cursor_pagination_returns_every_need_once(desk):
    ids = [desk.post("/needs", json=a_need(summary=f"besoin {i}")).json()["id"] for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = desk.get("/needs", params=params).json()
        assert len(page["items"]) <= 3
        seen += [n["id"] for n in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "pagination does not end"
    assert seen == ids[::-1]
    assert pages == 3


def test_status_filter(desk):
    need = desk.post("/needs", json=a_need()).json()
    assert [n["id"] for n in desk.get("/needs", params={"status": "recorded"}).json()["items"]] == [need["id"]]
    assert desk.get("/needs", params={"status": "referred"}).json()["items"] == []


# --- idempotency ----------------------------------------------------------------------------------


@pytest.mark.postgres  # the idempotency key's unique constraint
def test_a_repeat_with_the_same_key_and_body_records_nothing_more(desk, settings):
    first = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"})
    again = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["recorded_at"] == first.json()["recorded_at"]
    assert len(needs_in_db(settings)) == 1
    assert recorded_events(settings) == 1
    # another key records another need
    other = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert len(desk.get("/needs").json()["items"]) == 2


def test_a_repeat_answers_the_first_answer_not_the_need_as_it_is_now(intake, desk, settings):
    first = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "recorded" and first.json()["partner_id"] is None
    with intake.svc.db.transaction() as session:  # as a routing would leave it
        need = session.get(Need, first.json()["id"])
        need.status, need.partner_id, need.referral_id = "referred", "caf", "ref-1"
        need.respond_by = need.respond_by + timedelta(hours=5)
    assert desk.get(f"/needs/{first.json()['id']}").json()["status"] == "referred"
    again = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201, again.text
    assert again.content == first.content
    assert again.json() == first.json()
    assert len(needs_in_db(settings)) == 1
    assert recorded_events(settings) == 1


def test_the_same_key_with_another_body_is_a_conflict(desk, settings):
    first = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    r = desk.post("/needs", json=a_need(summary="autre chose"), headers={"Idempotency-Key": "k-1"})
    assert r.status_code == 409, r.text
    assert "detail" in r.json()
    assert [n.id for n in needs_in_db(settings)] == [first.json()["id"]]
    assert recorded_events(settings) == 1


def test_keys_belong_to_the_caller(intake, desk, settings):
    mine = desk.post("/needs", json=a_need(), headers={"Idempotency-Key": "k-1"}).json()
    theirs = intake.client("desk2").post(
        "/needs", json=a_need(library_id="bihorel", postal_code="76420"), headers={"Idempotency-Key": "k-1"}
    )
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != mine["id"]
    assert len(needs_in_db(settings)) == 2


@pytest.mark.postgres  # the unique constraint under a race
def test_concurrent_repeats_record_one_need(intake, settings):
    threads_count = 8
    barrier = threading.Barrier(threads_count)
    answers: list = [None] * threads_count

    def post(i: int) -> None:
        with intake.client("desk") as client:
            barrier.wait()
            answers[i] = client.post("/needs", json=a_need(summary=SUMMARY), headers={"Idempotency-Key": "same"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a is not None for a in answers)
    assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len({a.content for a in answers}) == 1  # every repeat answers what the first answered
    assert [n.id for n in needs_in_db(settings)] == [answers[0].json()["id"]]
    assert recorded_events(settings) == 1
    with intake.client("desk") as client:
        assert [n["id"] for n in client.get("/needs").json()["items"]] == [answers[0].json()["id"]]
