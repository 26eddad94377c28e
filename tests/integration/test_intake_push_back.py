"""Intake pushes back while the pipeline lags: POST /api/v1/needs and the desk's form answer 429 with Retry-After
once more needs wait behind it than RELAIS_INTAKE_MAX_BACKLOG (a consumer group of the needs stream that has not
read or not acknowledged them), and take needs again once the group caught up. Real Redis, real SQLite."""

from __future__ import annotations

import redis
from sqlmodel import select

from services.intake.store import Need
from shared.events import NEEDS
from shared.queues import UNSENT_KEYS
from shared.testing import wait_for
from tests.integration.test_desk_pages import A_NEED, form_of, signed_in
from tests.integration.test_intake_api import a_need

BOUND = 5


def needs_of(service) -> list[Need]:
    with service.svc.db.read() as session:
        return list(session.exec(select(Need)).all())


def test_a_consumer_group_behind_the_bound_gets_429_with_retry_after_until_it_catches_up(settings, start_service):
    stream = settings.key(NEEDS)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        # Referral's group, at the start of the stream, with more entries than the bound that nobody read yet.
        client.xgroup_create(stream, "referral", id="0", mkstream=True)
        for n in range(BOUND + 1):
            client.xadd(stream, {"type": "need.recorded", "event_id": f"e{n}", "need_id": f"n{n}"})
        intake = start_service(
            "intake", settings.model_copy(update={"intake_max_backlog": BOUND, "intake_retry_after_s": 3})
        )
        api = intake.client("desk")

        r = api.post("/needs", json=a_need())
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "3"
        body = r.json()
        assert body["retry_after_s"] == 3
        assert "nothing was recorded" in body["detail"] and "rien n'a été enregistré" in body["detail_fr"]

        desk = signed_in(intake)
        page = desk.post("/nouvelle", data={**form_of(desk), **A_NEED})
        assert page.status_code == 429 and page.headers["Retry-After"] == "3"
        assert "Réessayez dans quelques secondes" in page.text
        assert 'value="Dossier APL bloqué"' in page.text or "Dossier APL bloqué" in page.text  # what was typed is kept
        assert needs_of(intake) == []

        # Read but not acknowledged: still in the pipeline (pending), still refused.
        read: list = client.xreadgroup("referral", "referral-1", {stream: ">"})  # type: ignore[assignment]
        ids = [entry_id for _, entries in read for entry_id, _ in entries]
        assert len(ids) == BOUND + 1
        assert wait_for(lambda: api.post("/needs", json=a_need()).status_code == 429)

        # Handled: the next needs are recorded.
        client.xack(stream, "referral", *ids)
        assert wait_for(lambda: api.post("/needs", json=a_need()).status_code == 201)
        assert len(needs_of(intake)) == 1
    finally:
        client.close()


def test_messages_notifications_has_not_yet_sent_count_in_the_backlog(settings, start_service):
    # Notifications keeps the count of its unsent messages in Redis while it has a backlog (its sender): intake adds
    # it to what it sees on the streams, and takes needs again once the count is back under the bound.
    client = redis.Redis.from_url(settings.redis_url)
    email, sms = (settings.key(UNSENT_KEYS[channel]) for channel in ("email", "sms"))
    try:
        client.set(email, BOUND - 1, ex=60)
        client.set(sms, 2, ex=60)
        intake = start_service("intake", settings.model_copy(update={"intake_max_backlog": BOUND}))
        api = intake.client("desk")
        assert api.post("/needs", json=a_need()).status_code == 429
        client.set(email, 0, ex=60)
        assert wait_for(lambda: api.post("/needs", json=a_need()).status_code == 201)
        assert len(needs_of(intake)) == 1
    finally:
        client.close()


def test_no_bound_no_push_back(settings, start_service):
    stream = settings.key(NEEDS)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.xgroup_create(stream, "referral", id="0", mkstream=True)
        for n in range(BOUND + 1):
            client.xadd(stream, {"type": "need.recorded", "event_id": f"e{n}", "need_id": f"n{n}"})
        intake = start_service("intake", settings.model_copy(update={"intake_max_backlog": 0}))
        assert intake.client("desk").post("/needs", json=a_need()).status_code == 201
    finally:
        client.close()
