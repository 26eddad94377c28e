"""Intake's commands, each handled by one function (services/intake/handlers.py) whichever adapter calls it:
RecordNeed from the API and from the desk's form records the same need, history and need.recorded; CancelNeed from
ops' token or from the dashboard's internal call (acting for an ops user) writes the same history row and names the
actor in need.cancelled. And the routes' dependencies (services/intake/deps.py) are what a test overrides."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from services.intake import deps
from services.intake import handlers as intake_handlers
from services.intake.store import Need, NeedHistory
from shared.db import OutboxMessage
from shared.events import (
    NeedRecorded,
    ReferralAccepted,
    ReferralAssigned,
    ReferralCancelled,
    ReferralResponded,
)
from shared.service import ACTOR_HEADER, internal_token
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link
from tests.helpers import search

A_NEED = {
    "category": "Allocations familiales (CAF)",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "urgency": "normal",
    "display_name": "M. D.",
    "email": "m.d@example.org",
    "phone": "",
    "preferred_channel": "email",
    "language": "fr",
    "consent": "oui",
    "consent_messages": "oui",  # the second, optional choice: messages to the person on their channel
}  # as the desk types it

HOUR = timedelta(hours=1)
API_NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "urgency": "normal",
    "consent": True,
    "person": {"display_name": "M. D.", "email": "m.d@example.org", "preferred_channel": "email", "language": "fr"},
}


def signed_in(service) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "intake", "desk", now=service.svc.clock())
    assert use_sign_in_link(client, link).url.path == "/nouvelle"
    return client


def form_of(client: httpx.Client) -> dict[str, str]:
    html = client.get("/nouvelle").text
    return {name: search(rf'name="{name}" value="([^"]*)"', html).group(1) for name in ("csrf", "idempotency_key")}


def recorded(intake, need_id: str) -> tuple[Need, list[str], dict]:
    """The need's row, its history's events and the need.recorded it put in the outbox."""
    with intake.svc.db.read() as session:
        need = session.get(Need, need_id)
        history = [h.event for h in session.exec(select(NeedHistory).where(NeedHistory.need_id == need_id)).all()]
        events = [
            json.loads(m.payload)
            for m in session.exec(select(OutboxMessage).where(OutboxMessage.type == "need.recorded")).all()
        ]
    [event] = [e for e in events if e["need_id"] == need_id]
    return need, history, event


def test_record_need_from_the_api_and_from_the_desk_form_records_the_same(intake, desk):
    by_api = desk.post("/needs", json=API_NEED, headers={"Idempotency-Key": "k-1"})
    assert by_api.status_code == 201
    client = signed_in(intake)
    by_form = client.post("/nouvelle", data={**form_of(client), **A_NEED})
    assert by_form.status_code == 200 and by_form.url.path.endswith("/enregistree")
    form_id = by_form.url.path.split("/")[2]

    api_need, api_history, api_event = recorded(intake, by_api.json()["id"])
    form_need, form_history, form_event = recorded(intake, form_id)
    what = {
        "library_id",
        "category",
        "summary",
        "postal_code",
        "urgency",
        "person_display_name",
        "person_email",
        "person_phone",
        "preferred_channel",
        "language",
        "recorded_by",
        "status",
        "sla",
    }
    assert api_need.model_dump(include=what) == form_need.model_dump(include=what)
    assert (
        api_need.respond_by - api_need.recorded_at
        == form_need.respond_by - form_need.recorded_at
        == timedelta(hours=72)
    )
    assert api_history == form_history == ["need.recorded"]
    same = {"type", "version", "library_id", "category", "postal_code", "urgency", "preferred_channel", "language"}
    assert {k: api_event[k] for k in same} == {k: form_event[k] for k in same}
    opened = [intake.svc.personal_data.open_need(NeedRecorded.model_validate(e)) for e in (api_event, form_event)]
    assert opened[0] == opened[1] is not None  # the same summary and person, sealed for each need
    assert api_event["correlation_id"] and form_event["correlation_id"]  # each request's own

    # Both adapters keep the handler's idempotency: a repeat records nothing more.
    again = desk.post("/needs", json=API_NEED, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201 and again.json() == by_api.json()
    with intake.svc.db.read() as session:
        assert len(session.exec(select(Need)).all()) == 2


def test_cancel_need_writes_its_history_and_names_the_actor_whichever_caller(intake, desk, settings):
    first, second = (desk.post("/needs", json=API_NEED).json()["id"] for _ in range(2))
    with intake.client("ops") as ops:
        assert ops.post(f"/needs/{first}/cancel", json={"reason": "saisie en double"}).status_code == 200
        assert ops.post(f"/needs/{first}/cancel", json={"reason": "encore"}).status_code == 409
        assert ops.post("/needs/nope/cancel", json={"reason": "x"}).status_code == 404
    # The dashboard calls with the services' credential, for the ops user it names.
    with intake.client() as dashboard:
        answer = dashboard.post(
            f"/needs/{second}/cancel",
            json={"reason": "erreur de lieu"},
            headers={"Authorization": f"Bearer {internal_token(settings)}", ACTOR_HEADER: "ops"},
        )
    assert answer.status_code == 200 and answer.json()["status"] == "closed"

    with intake.svc.db.read() as session:
        for need_id, reason in ((first, "saisie en double"), (second, "erreur de lieu")):
            cancelled = session.exec(
                select(NeedHistory).where(NeedHistory.need_id == need_id, NeedHistory.event == "need.cancelled")
            ).all()
            assert [h.detail for h in cancelled] == [reason]
            assert session.get(Need, need_id).cancelled_at is not None
        events = [
            json.loads(m.payload)
            for m in session.exec(select(OutboxMessage).where(OutboxMessage.type == "need.cancelled")).all()
        ]
    assert sorted((e["need_id"], e["actor"], e["reason"]) for e in events) == sorted(
        [(first, "ops", "saisie en double"), (second, "ops", "erreur de lieu")]
    )


def test_a_test_overrides_the_clock_the_routes_depend_on(intake, desk):
    fixed = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
    intake.svc.app.dependency_overrides[deps.get_clock] = lambda: lambda: fixed
    try:
        need = desk.post("/needs", json=API_NEED).json()
    finally:
        intake.svc.app.dependency_overrides.clear()
    assert datetime.fromisoformat(need["recorded_at"]) == fixed
    assert datetime.fromisoformat(need["respond_by"]) == fixed + timedelta(hours=72)
    assert datetime.fromisoformat(desk.post("/needs", json=API_NEED).json()["recorded_at"]) != fixed


@pytest.mark.postgres  # every column written by one INSERT, read back through another driver
def test_a_need_is_recorded_by_one_insert_of_what_the_201_answers(intake, desk):
    """The need is one INSERT with every value it is recorded with (shared/db.py `insert_new`), never
    inserted then updated; the 201 answers what was written."""
    written: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001 - SQLAlchemy's event hook
        if statement.startswith(("INSERT INTO need ", "UPDATE need ")):
            written.append(" ".join(statement.split()[:3]))

    sa.event.listen(intake.svc.db.engine, "before_cursor_execute", seen)
    try:
        response = desk.post("/needs", json=API_NEED)
    finally:
        sa.event.remove(intake.svc.db.engine, "before_cursor_execute", seen)
    assert response.status_code == 201
    assert written == ["INSERT INTO need"]
    body = response.json()
    need, history, event = recorded(intake, body["id"])
    assert history == ["need.recorded"] and event["reference"] == need.reference == body["reference"]
    assert (need.status, need.sla, need.consent_purposes, need.person_email) == (
        "recorded",
        "on_track",
        "handoff,messages",
        "m.d@example.org",
    )
    assert datetime.fromisoformat(body["respond_by"]) == need.respond_by


@pytest.mark.postgres  # datetimes and NULLs read back through another driver
def test_referral_events_move_the_desks_view_newest_decision_first(intake, desk):
    """Intake's view of the handoff (services/intake/handlers.py `on_referral_event`): each event adds a line of
    history; the newest decision by sequence sets the status and the partner, an older one arriving late does not;
    the first answer is kept; a reassignment clears the partner until the next one; a need closed by the desk stays
    closed."""
    need_id = desk.post("/needs", json=API_NEED).json()["id"]
    db, t0 = intake.svc.db, datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    common = {"need_id": need_id, "library_id": "chatelet", "category": "caf", "actor": "system"}

    def apply(event) -> Need:  # noqa: ANN001 - a referral event
        with db.transaction() as session:
            intake_handlers.on_referral_event(session, event)
        with db.read() as session:
            need = session.get(Need, need_id)
            assert need is not None
            return need

    def assigned(referral_id: str, partner_id: str, sequence: int, at: datetime) -> ReferralAssigned:
        return ReferralAssigned(
            **common,
            referral_id=referral_id,
            partner_id=partner_id,
            sequence=sequence,
            contact_id="referent",
            respond_by=at + timedelta(days=3),
            routed_because="territoire",
            occurred_at=at,
        )

    need = apply(assigned("r-1", "caf-76", 1, t0))
    assert (need.status, need.partner_id, need.referral_id, need.respond_by) == (
        "referred",
        "caf-76",
        "r-1",
        t0 + timedelta(days=3),
    )
    accepted = ReferralAccepted(**common, referral_id="r-1", partner_id="caf-76", sequence=2, occurred_at=t0 + HOUR)
    need = apply(accepted)
    assert (need.status, need.sla, need.answered_at, need.last_answer_at) == ("accepted", "met", t0 + HOUR, t0 + HOUR)
    need = apply(assigned("r-1", "caf-76", 1, t0))  # delivered again, late: only its history line
    assert (need.status, need.sla, need.answered_at) == ("accepted", "met", t0 + HOUR)
    cancelled = ReferralCancelled(
        **common, referral_id="r-1", partner_id="caf-76", sequence=3, reason="erreur", reassigned=True
    )
    need = apply(cancelled)
    assert (need.status, need.partner_id, need.referral_id) == ("recorded", None, None)
    need = apply(assigned("r-2", "caf-national", 4, t0 + 2 * HOUR))
    assert (need.status, need.partner_id, need.referral_id) == ("referred", "caf-national", "r-2")
    assert need.answered_at == t0 + HOUR  # the first answer is the need's, whoever holds it now
    with db.transaction() as session:
        session.execute(sa.update(Need).where(Need.id == need_id).values(closed_by_desk_at=t0, status="closed"))
    responded = ReferralResponded(
        **common, referral_id="r-2", partner_id="caf-national", sequence=5, message="Rappel fait", occurred_at=t0
    )
    need = apply(responded)
    assert need.status == "closed" and need.partner_id == "caf-national"
    with db.read() as session:
        history = session.exec(select(NeedHistory).where(NeedHistory.need_id == need_id).order_by(col(NeedHistory.id)))
        assert [(h.event, h.detail) for h in history] == [
            ("need.recorded", None),
            ("referral.assigned", "territoire"),
            ("referral.accepted", None),
            ("referral.assigned", "territoire"),
            ("referral.cancelled", "erreur"),
            ("referral.assigned", "territoire"),
            ("referral.responded", "Rappel fait"),
        ]
