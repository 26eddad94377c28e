"""Personal data on the wire (shared/personal_data.py): sealed with the person's data key in a real Redis, opened
only for its need, erased by deleting the key, and key-encryption keys rotated without losing anything."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
import redis
import redis.asyncio as aioredis

from relais.cli import main
from shared.events import NeedPersonalData
from shared.personal_data import (
    DERIVED_KEY_ID,
    DataKeyErased,
    DataKeyMissing,
    PersonalData,
    SealBroken,
    UnknownKeyId,
)
from shared.settings import Settings, parse_personal_data_keys
from shared.testing import need_recorded

DETAILS = {"summary": "Loyer impayé", "display_name": "Zoé Martin", "email": "zoe@example.org", "phone": "+33612345678"}


def kek(key_id: str) -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def keys(settings: Settings, client, value: str | None = None) -> PersonalData:
    return PersonalData(settings.model_copy(update={"personal_data_keys": value}), client)


def test_sealed_data_opens_only_for_its_need(settings, client):
    pd = keys(settings, client)
    sealed = pd.seal("p1", "n1", DETAILS)
    assert pd.unseal(sealed, "n1") == DETAILS
    assert "Zoé" not in sealed.model_dump_json() and "zoe@" not in sealed.model_dump_json()
    with pytest.raises(SealBroken):
        pd.unseal(sealed, "n2")  # moved into another need's event
    tampered = bytearray(base64.b64decode(sealed.ciphertext))
    tampered[0] ^= 1
    with pytest.raises(SealBroken):
        pd.unseal(sealed.model_copy(update={"ciphertext": base64.b64encode(bytes(tampered)).decode()}), "n1")
    with pytest.raises(SealBroken):  # another person's key does not open it either
        pd.unseal(sealed.model_copy(update={"person_id": "p2", "key_id": pd.seal("p2", "n1", {}).key_id}), "n1")


def test_a_person_has_one_data_key_for_all_their_needs_stored_wrapped(settings, client):
    pd = keys(settings, client)
    first, second = pd.seal("p1", "n1", DETAILS), pd.seal("p1", "n2", {"summary": "Autre"})
    assert first.key_id == second.key_id and pd.unseal(second, "n2") == {"summary": "Autre"}
    stored = json.loads(client.hget(settings.key("person-keys"), "p1"))
    assert set(stored) == {"kek", "id", "nonce", "wrapped"} and stored["kek"] == DERIVED_KEY_ID
    assert len(base64.b64decode(stored["wrapped"])) == 32 + 16  # the key and GCM's tag: never the key in clear


def test_forget_makes_every_copy_unreadable(settings, client):
    pd = keys(settings, client)
    event = need_recorded(pd, summary="Loyer impayé", person={"display_name": "Zoé Martin"})
    assert pd.open_need(event) == NeedPersonalData(summary="Loyer impayé", display_name="Zoé Martin")
    assert pd.forget(event.person_id) is True
    with pytest.raises(DataKeyErased):
        pd.unseal(event.sealed, event.need_id)
    assert pd.open_need(event) is None  # consumers record the marker
    assert pd.forget(event.person_id) is False  # a second erasure has nothing left to delete
    # A later need of the same person gets a new key; the old events stay unreadable.
    later = pd.seal(event.person_id, "n-later", {"summary": "Nouvelle demande"})
    assert later.key_id != event.sealed.key_id and pd.unseal(later, "n-later") == {"summary": "Nouvelle demande"}
    assert pd.open_need(event) is None


def test_the_consumers_open_a_need_on_the_event_loop_as_in_a_thread(settings, client, redis_url):
    """`open_need_async` (the consumers', with the bus's asyncio client) answers what `open_need` answers."""
    pd = keys(settings, client)
    event = need_recorded(pd, summary="Loyer impayé", person={"display_name": "Zoé Martin"})
    moved = event.model_copy(update={"need_id": "N-other"})  # its sealed data in another need's event

    async def opened(*events):
        async_client = aioredis.Redis.from_url(redis_url)
        try:
            return [await pd.open_need_async(e, async_client) for e in events]
        finally:
            await async_client.aclose()

    assert asyncio.run(opened(event)) == [NeedPersonalData(summary="Loyer impayé", display_name="Zoé Martin")]
    with pytest.raises(SealBroken):
        asyncio.run(opened(moved))
    pd.forget(event.person_id)
    assert asyncio.run(opened(event)) == [None]  # erased before it was read: consumers record the marker
    client.delete(settings.key("person-keys"))
    with pytest.raises(DataKeyMissing):  # lost, not erased: retried, then dead-lettered
        asyncio.run(opened(event))


def test_a_lost_key_is_an_error_not_an_erasure(settings, client):
    pd = keys(settings, client)
    sealed = pd.seal("p1", "n1", DETAILS)
    client.delete(settings.key("person-keys"))  # Redis lost the hash: the event is retried, then dead-lettered
    with pytest.raises(DataKeyMissing):
        pd.unseal(sealed, "n1")


def test_rotation_old_keys_still_open_and_rewrap_moves_every_key_to_the_current_one(settings, client, capsys):
    old, new = kek("k1"), kek("k2")
    before = keys(settings, client, old)
    sealed = [before.seal(f"p{i}", f"n{i}", {"summary": f"demande {i}"}) for i in range(3)]
    before.forget("p2")
    legacy = keys(settings, client).seal("p-legacy", "n-legacy", {"summary": "avant les clés"})  # derived key s0

    after = keys(settings, client, f"{new},{old}")
    assert [after.unseal(s, f"n{i}") for i, s in enumerate(sealed[:2])] == [
        {"summary": "demande 0"},
        {"summary": "demande 1"},
    ]
    assert after.unseal(legacy, "n-legacy") == {"summary": "avant les clés"}  # s0 still opens, as the last key
    assert after.seal("p-new", "n-new", {}).key_id  # new data keys are wrapped with k2
    assert json.loads(client.hget(settings.key("person-keys"), "p-new"))["kek"] == "k2"

    done = after.rewrap()
    assert (done.rewrapped, done.current, done.erased, done.key_id) == (3, 1, 1, "k2")
    stored = {k.decode(): json.loads(v) for k, v in client.hgetall(settings.key("person-keys")).items()}
    assert {record.get("kek") for record in stored.values()} == {"k2", None}  # None: p2's erasure mark
    # k1 can go now: only k2 is needed (s0 is still derived, it opens nothing any more).
    only_new = keys(settings, client, new)
    assert only_new.unseal(sealed[0], "n0") == {"summary": "demande 0"}
    assert only_new.unseal(legacy, "n-legacy") == {"summary": "avant les clés"}
    assert after.rewrap().rewrapped == 0  # nothing left to do


def test_an_unknown_key_id_is_a_clear_error(settings, client):
    sealed = keys(settings, client, kek("k1")).seal("p1", "n1", DETAILS)
    with pytest.raises(UnknownKeyId, match="'k1'.*RELAIS_PERSONAL_DATA_KEYS"):
        keys(settings, client, kek("k2")).unseal(sealed, "n1")
    with pytest.raises(SealBroken):  # the same id with another key: not what wrapped it
        keys(settings, client, kek("k1")).unseal(sealed, "n1")


@pytest.mark.parametrize(  # fixed values: xdist's workers must collect the same ids
    ("value", "says"),
    [
        ("k1", "does not start with a key id"),
        ("k 1:AAAA", "does not start with a key id"),
        ("k1:not base64!", "is not base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "is 5 bytes, not 32"),
        (f"k1:{base64.b64encode(bytes(32)).decode()},k1:{base64.b64encode(bytes([1]) * 32).decode()}", "given twice"),
    ],
)
def test_malformed_keys_are_refused_without_quoting_them(value, says):
    with pytest.raises(ValueError, match=says) as refused:
        parse_personal_data_keys(value)
    if len(secret := value.partition(":")[2]) >= 8:
        assert secret not in str(refused.value)


def test_keys_rewrap_command(settings, client, monkeypatch, capsys):
    old, new = kek("k1"), kek("k2")
    sealed = keys(settings, client, old).seal("p1", "n1", DETAILS)
    for name, value in {
        "RELAIS_REDIS_URL": settings.redis_url,
        "RELAIS_NAMESPACE": settings.namespace,
        "RELAIS_SECRET_KEY": settings.secret_key,
        "RELAIS_DATA_DIR": str(settings.data_dir),
        "RELAIS_PERSONAL_DATA_KEYS": f"{new},{old}",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["keys", "rewrap"]) == 0
    assert "rewrapped 1 data key(s) with key k2" in capsys.readouterr().out
    assert keys(settings, client, new).unseal(sealed, "n1") == DETAILS  # k1 is no longer needed
    monkeypatch.setenv("RELAIS_PERSONAL_DATA_KEYS", "k1:nope!")
    assert main(["keys", "rewrap"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("RELAIS_PERSONAL_DATA_KEYS: key 'k1' is not base64") and "nope!" not in err
