"""A stream that loses its consumer group under a running service (a replica promoted before its first sync, a
flushed stream; here XGROUP DESTROY): FastStream stops the subscriber for good (NOGROUP), so the service creates
the group again and reads on; while it cannot, /readyz answers 503 so that an orchestrator restarts it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from shared.events import NEEDS
from shared.testing import wait_for

NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "summary": "Dossier APL bloqué",
    "postal_code": "76000",
    "consent": True,
    "person": {"display_name": "M. D."},
}


def groups_of(client: redis.Redis, stream: str) -> list[str]:
    try:
        return [g["name"].decode() for g in client.xinfo_groups(stream)]
    except redis.ResponseError:  # no such stream
        return []


def referred(referral, need_id: str) -> bool:
    return bool(referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])


def readyz(service) -> httpx.Response:
    return httpx.get(f"{service.url}/readyz", timeout=10)


def test_a_consumer_group_deleted_under_a_running_service_is_created_again_and_events_flow(settings, start_service):
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    admin = redis.Redis.from_url(settings.redis_url)
    stream = settings.key(NEEDS)
    desk = intake.client("desk")
    first = desk.post("/needs", json=NEED).json()["id"]
    assert wait_for(lambda: referred(referral, first)), "the first need was not referred"

    admin.xgroup_destroy(stream, "referral")

    assert wait_for(lambda: "referral" in groups_of(admin, stream)), "the consumer group was not created again"
    second = desk.post("/needs", json={**NEED, "summary": "Après la perte du groupe"}).json()["id"]
    assert wait_for(lambda: referred(referral, second)), "a need recorded after the group was lost was not referred"
    assert wait_for(lambda: readyz(referral).status_code == 200)
    # The group starts again at the stream's beginning: the first need is read again and skipped (event_id).
    assert len(referral.client("ops").get("/referrals", params={"need_id": first}).json()["items"]) == 1


@pytest.fixture
def limited_user(settings) -> Iterator[tuple[str, str]]:
    """An ACL user of the test Redis for one service, whose rights the test takes away: (name, its Redis URL)."""
    admin = redis.Redis.from_url(settings.redis_url)
    name, password = f"relais-{settings.namespace}", secrets.token_hex(16)
    admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all"])
    parts = urlsplit(settings.redis_url)
    url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}:{parts.port or 6379}"))
    yield name, url
    admin.acl_deluser(name)


def test_readyz_fails_while_a_subscriber_is_stopped(settings, start_service, limited_user):
    name, url = limited_user
    referral = start_service("referral", settings.model_copy(update={"redis_url": url}))
    admin = redis.Redis.from_url(settings.redis_url)
    stream = settings.key(NEEDS)
    assert readyz(referral).status_code == 200

    # The service may no longer create groups (XGROUP), then loses one: it cannot heal its subscribers.
    admin.acl_setuser(name, enabled=True, commands=["-xgroup"])
    admin.xgroup_destroy(stream, "referral")

    answer = wait_for(lambda: (r := readyz(referral)).status_code == 503 and r)
    assert answer, "/readyz kept answering 200 with a stopped subscriber"
    stopped = answer.json()["detail"]["subscribers"]
    assert f"{stream}:referral" in stopped, stopped

    admin.acl_setuser(name, enabled=True, commands=["+xgroup"])
    assert wait_for(lambda: readyz(referral).status_code == 200), "the subscriber was not started again"
    assert "referral" in groups_of(admin, stream)
