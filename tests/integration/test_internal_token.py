"""The ops credential the services use between themselves cannot be computed from a public string.

It is derived from the secret key with a purpose string (or set apart as RELAIS_INTERNAL_TOKEN), and never
accepted when the key is one anyone could know: a value the repository ships, a short one, or outside the demo a
key generated into the data dir. The attacker below computes it exactly as the services do."""

from __future__ import annotations

import hashlib
import hmac
import secrets

import httpx
import pytest

from shared.testing import free_port

COMPOSE_DEFAULT_KEY = "dev-only-insecure-secret-override-in-production"  # what docker-compose.yml used to default to


def forged(key: str) -> str:
    """The internal credential as anyone who knows `key` computes it (shared.service's derivation)."""
    return hmac.new(key.encode(), b"relais-internal-ops", hashlib.sha256).hexdigest()


def ops_outbox(service, token: str) -> int:
    return httpx.get(
        f"{service.url}/api/v1/ops/outbox", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).status_code


@pytest.mark.parametrize(
    "key", [COMPOSE_DEFAULT_KEY, "test-secret", "k" * 31], ids=["compose-default", "test", "short"]
)
def test_a_key_anyone_could_know_opens_no_ops_api(settings, start_service, key):
    intake = start_service("intake", settings.model_copy(update={"secret_key": key}))
    assert ops_outbox(intake, forged(key)) == 401


def test_a_key_generated_into_the_data_dir_serves_the_demo_only(settings, start_service):
    production = start_service("intake", settings.model_copy(update={"secret_key": None}))
    generated = production.settings.signing_key  # as one who can read the data dir (or a stale copy of it) has it
    assert ops_outbox(production, forged(generated)) == 401

    demo = settings.model_copy(update={"secret_key": None, "demo": True, "data_dir": settings.data_dir / "demo"})
    demo_intake = start_service("intake", demo.model_copy(update={"intake_port": free_port()}))
    assert ops_outbox(demo_intake, forged(demo_intake.settings.signing_key)) == 200  # `relais up`'s dashboard


def test_a_strong_key_gives_the_services_their_credential(settings, start_service):
    intake = start_service("intake", settings)
    assert ops_outbox(intake, forged(settings.secret_key)) == 200


def test_the_internal_token_can_be_set_apart_from_the_key(settings, start_service):
    token = secrets.token_hex(32)
    intake = start_service("intake", settings.model_copy(update={"internal_token": token}))
    assert ops_outbox(intake, token) == 200
    assert ops_outbox(intake, forged(settings.secret_key)) == 401  # the derived one no longer opens anything


def test_a_weak_internal_token_is_never_accepted(settings, start_service):
    intake = start_service("intake", settings.model_copy(update={"internal_token": "relais"}))
    assert ops_outbox(intake, "relais") == 401
