"""Consent recorded with each need (purposes, the version of the directory's text, who, when) through the API and
the desk's form, old requests still valid; the form shows the directory's text; a withdrawal of consent to messages
is recorded, told to notifications (need.messages_withdrawn), and stops every message to the person."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select

from services.intake.store import Need
from services.notifications import handlers as notifications
from services.notifications.store import TABLES as NOTIFICATIONS_TABLES
from services.notifications.store import Delivery, NeedPerson
from shared.db import Database, OutboxMessage
from shared.directory import DEFAULT_CONSENT, parse_directory
from shared.events import NeedMessagesWithdrawn, NeedPersonalData, NeedRecorded, ReferralAssigned, new_id
from shared.signin import sign_in_link
from shared.testing import directory_data, unopenable_seal, use_sign_in_link
from tests.helpers import search

API_NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "consent": True,
    "person": {"display_name": "M. D.", "email": "m.d@example.org", "preferred_channel": "email"},
}
CURRENT = DEFAULT_CONSENT[0]["version"]  # the test directory has no `consent`: the built-in French text


def events_of(intake, kind: str) -> list[dict]:
    with intake.svc.db.read() as session:
        rows = session.exec(select(OutboxMessage).where(OutboxMessage.type == kind)).all()
    return [json.loads(row.payload) for row in rows]


def test_an_old_request_records_the_handoff_and_messages_under_the_current_text(desk):
    r = desk.post("/needs", json=API_NEED)
    assert r.status_code == 201
    consent = r.json()["consent_record"]
    assert consent["purposes"] == ["handoff", "messages"] and consent["version"] == CURRENT
    assert consent["recorded_by"] == "desk" and consent["recorded_at"] == r.json()["recorded_at"]
    assert consent["messages_withdrawn_at"] is None
    no_channel = desk.post("/needs", json={**API_NEED, "person": {"display_name": "X"}})
    assert no_channel.json()["consent_record"]["purposes"] == ["handoff"]


def test_purposes_and_version_sent_are_recorded(desk):
    body = {**API_NEED, "consent_purposes": ["handoff"], "consent_version": CURRENT, "person": {"email": "a@b.org"}}
    r = desk.post("/needs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["consent_record"]["purposes"] == ["handoff"]
    assert r.json()["person"]["preferred_channel"] == "none"  # no consent to messages: nobody writes to them
    got = desk.get(f"/needs/{r.json()['id']}").json()
    assert got["consent_record"]["version"] == CURRENT


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"consent_purposes": ["messages"]}, "consent_purposes", 'include "handoff"'),
        ({"consent_purposes": ["handoff"]}, "consent_purposes", 'add "messages", or set preferred_channel to none'),
        ({"consent_version": "v-unknown"}, "consent_version", "known: relais-fr-1"),
        ({"consent": False}, "consent", "consent must be true"),
    ],
)
def test_consent_that_does_not_hold_is_refused_naming_the_field(desk, change, field, words):
    r = desk.post("/needs", json={**API_NEED, **change})
    assert r.status_code == 422
    [error] = [e for e in r.json()["detail"] if e["loc"] == ["body", field]]
    assert words in error["msg"]


def signed_in(intake) -> httpx.Client:
    client = httpx.Client(base_url=intake.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    use_sign_in_link(client, link)
    return client


def form_of(client: httpx.Client) -> tuple[str, dict[str, str]]:
    html = client.get("/nouvelle").text
    fields = ("csrf", "idempotency_key", "consent_version")
    return html, {name: search(rf'name="{name}" value="([^"]*)"', html).group(1) for name in fields}


A_NEED = {
    "category": "caf",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "urgency": "normal",
    "display_name": "M. D.",
    "email": "m.d@example.org",
    "language": "fr",
    "consent": "oui",
}


def test_the_desk_form_shows_the_directory_text_and_records_its_version_and_choices(intake):
    client = signed_in(intake)
    html, hidden = form_of(client)
    assert hidden["consent_version"] == CURRENT
    assert DEFAULT_CONSENT[0]["handoff"].replace("'", "&#39;") in html
    assert DEFAULT_CONSENT[0]["messages"].replace("'", "&#39;") in html
    assert 'id="consent_messages"' in html and 'name="consent_messages" value="oui" required' not in html

    with_messages = client.post("/nouvelle", data={**hidden, **A_NEED, "consent_messages": "oui"})
    without = client.post("/nouvelle", data={**form_of(client)[1], **A_NEED})
    refused = client.post(
        "/nouvelle", data={**form_of(client)[1], **A_NEED, "preferred_channel": "sms", "phone": "0261910001"}
    )
    assert refused.status_code == 422 and 'id="consent_messages-erreur"' in refused.text
    ids = [r.url.path.split("/")[2] for r in (with_messages, without)]
    with intake.svc.db.read() as session:
        first, second = (session.get_one(Need, i) for i in ids)
    assert (first.consent_purposes, first.preferred_channel, first.consent_version) == (
        "handoff,messages",
        "email",
        CURRENT,
    )
    assert (second.consent_purposes, second.preferred_channel) == ("handoff", "none")
    assert first.consent_recorded_by == "desk" and first.consent_recorded_at == first.recorded_at


def test_a_withdrawal_is_recorded_once_and_told_to_notifications(intake, desk):
    need_id = desk.post("/needs", json=API_NEED).json()["id"]
    r = desk.post(f"/needs/{need_id}/withdraw-messages-consent")
    assert r.status_code == 200
    assert r.json()["consent_record"]["messages_withdrawn_at"] is not None
    assert r.json()["status"] == "recorded"  # the need goes on
    again = desk.post(f"/needs/{need_id}/withdraw-messages-consent")
    assert again.status_code == 200
    [event] = events_of(intake, "need.messages_withdrawn")
    assert event["need_id"] == need_id and event["actor"] == "desk" and "m.d@" not in json.dumps(event)
    with intake.client("desk2") as other_desk:
        assert other_desk.post(f"/needs/{need_id}/withdraw-messages-consent").status_code == 404
    with intake.client("ops") as ops:
        assert ops.post(f"/needs/{need_id}/withdraw-messages-consent").status_code == 200


def test_the_desk_withdraws_from_the_need_page(intake, desk):
    need_id = desk.post("/needs", json=API_NEED).json()["id"]
    client = signed_in(intake)
    page = client.get(f"/demandes/{need_id}").text
    assert "La personne retire son accord pour les messages" in page
    csrf = search(r'name="csrf" value="([^"]*)"', page).group(1)
    after = client.post(f"/demandes/{need_id}/retirer-messages", data={"csrf": csrf})
    assert after.url.path == f"/demandes/{need_id}" and "accord retiré le" in after.text
    assert len(events_of(intake, "need.messages_withdrawn")) == 1


@pytest.fixture
def notifications_db(database_url_factory):
    db = Database(database_url_factory("notifications", migrated=True), NOTIFICATIONS_TABLES)
    yield db
    db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("withdrawn_first", [False, True], ids=["after need.recorded", "before need.recorded"])
def test_a_withdrawal_stops_every_message_to_the_person(notifications_db, clock, withdrawn_first):
    directory = parse_directory(directory_data())
    now = clock()
    need_id = new_id()
    recorded = NeedRecorded(
        need_id=need_id,
        person_id=new_id(),
        library_id="chatelet",
        category="caf",
        postal_code="76000",
        urgency="normal",
        recorded_at=now,
        preferred_channel="email",
        sealed=unopenable_seal(),  # the handler is given the details below, as consumers.py opens them
    )
    details = NeedPersonalData(summary="x", email="m.d@example.org")
    withdrawn = NeedMessagesWithdrawn(need_id=need_id, library_id="chatelet", actor="desk", occurred_at=now)

    def assigned(sequence: int) -> ReferralAssigned:
        return ReferralAssigned(
            need_id=need_id,
            sequence=sequence,
            referral_id=new_id(),
            partner_id="caf-76",
            library_id="chatelet",
            category="caf",
            contact_id="caf-ref",
            respond_by=now + timedelta(hours=72),
            routed_because="test",
        )

    with notifications_db.transaction() as session:
        if withdrawn_first:
            notifications.on_messages_withdrawn(session, withdrawn, now)
            notifications.on_need_recorded(session, recorded, details, directory, now)
        else:
            notifications.on_need_recorded(session, recorded, details, directory, now)
            notifications.on_referral_event(session, assigned(1), directory, now, lambda e: "https://x/r/1")
            notifications.on_messages_withdrawn(session, withdrawn, now)
        notifications.on_referral_event(session, assigned(2), directory, now, lambda e: "https://x/r/2")
    with notifications_db.read() as session:
        to_person = session.exec(
            select(Delivery).where(Delivery.need_id == need_id, Delivery.recipient_role == "person")
        ).all()
        person = session.get_one(NeedPerson, need_id)
        to_partner = session.exec(select(Delivery).where(Delivery.recipient_role == "partner_contact")).all()
    assert to_person and {(d.status, d.suppressed_reason) for d in to_person} == {("suppressed", "no_consent")}
    assert all("m.d@example.org" != d.recipient for d in to_person if d.status != "suppressed" or withdrawn_first)
    assert person.email is None and person.messages_withdrawn_at is not None
    assert to_partner  # the handoff goes on
