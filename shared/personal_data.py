"""Personal data on the wire: sealed with the person's own data key, so the broker never holds it in clear, and
erasing the person deletes the key, which makes every copy unreadable at once (crypto-shredding).

- Each person (intake's `person_id`) has a data key: 32 random bytes, AES-256-GCM. It is stored wrapped (AES-GCM
  with a key-encryption key, the person's and the data key's ids as associated data) in the Redis hash
  `<namespace>:person-keys`, field = person id: the one store the three services share, so opening an event needs
  no call between services. Intake creates it with the person's first need, before the event exists.
- The key-encryption keys come from RELAIS_PERSONAL_DATA_KEYS (`id:base64,...`: the first wraps, the others only
  unwrap, for rotation); unset, or for data keys wrapped before it was set, one is derived from the signing key
  with HKDF (key id `s0`). `rewrap` wraps every data key again with the first key (`relais keys rewrap`).
- `forget` replaces the person's wrapped key with an erasure mark: an event sealed for them opens to DataKeyErased,
  which consumers record as ERASED. A key missing without a mark (Redis lost the hash) is DataKeyMissing, an error:
  the event is retried, then dead-lettered, and can be replayed once the hash is restored (docs/privacy.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import ReadOnlyError

from shared.events import DeskText, NeedPersonalData, NeedRecorded, SealedPersonalData, utcnow
from shared.people import ERASED
from shared.settings import KEY_BYTES, Settings, parse_personal_data_keys

__all__ = [
    "ERASED",
    "DataKeyErased",
    "DataKeyMissing",
    "PersonalData",
    "PersonalDataError",
    "SealBroken",
    "SealedPersonalData",
    "UnknownKeyId",
]

T = TypeVar("T")

# ERASED (shared.people) is recorded instead of the identity when the person was erased before the event was read.
DERIVED_KEY_ID = "s0"  # the key-encryption key derived from the signing key
DERIVATION_INFO = b"relais personal data key-encryption key v1"
KEYS_HASH = "person-keys"  # in the deployment's namespace: <namespace>:person-keys
NONCE_BYTES = 12
KEY_STORE_PATIENCE_S = 15.0  # how long recording a need waits for an absent Redis (a failover takes a few seconds)

# Create the person's data key unless a live one is there (an erasure mark is replaced): one key per person even
# when two needs of the same person are recorded at once.
_GET_OR_CREATE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and record['wrapped'] then return current end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
"""
# Replace a wrapped key only if it is still the one read: a rotation never brings back a key erased meanwhile.
_COMPARE_AND_SET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class PersonalDataError(Exception):
    """Sealed personal data that cannot be opened."""


class DataKeyErased(PersonalDataError):
    """The person was erased: their data key is gone, and what was sealed with it can never be read again."""


class DataKeyMissing(PersonalDataError):
    """No data key and no erasure mark for the person: the key hash was lost (a Redis restored without it)."""


class UnknownKeyId(PersonalDataError):
    """A data key is wrapped with a key-encryption key this process does not have."""


class SealBroken(PersonalDataError):
    """The ciphertext does not open with its key: altered, or sealed for another need or person."""


def key_encryption_keys(settings: Settings) -> list[tuple[str, bytes]]:
    """The key-encryption keys, the one that wraps first: RELAIS_PERSONAL_DATA_KEYS's, then the key derived from the
    signing key (which opens data keys wrapped before the variable was set) unless the variable names an `s0`."""
    keys = parse_personal_data_keys(settings.personal_data_keys) if settings.personal_data_keys else []
    derivable = settings.secret_key or not keys or (settings.data_dir / "secret_key").exists()
    if derivable and all(key_id != DERIVED_KEY_ID for key_id, _ in keys):
        derived = HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=DERIVATION_INFO).derive(
            settings.signing_key.encode()
        )
        keys.append((DERIVED_KEY_ID, derived))
    return keys


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _wrap_aad(person_id: str, data_key_id: str) -> bytes:
    return f"relais data key|{person_id}|{data_key_id}".encode()


def _seal_aad(need_id: str) -> bytes:
    return f"relais need|{need_id}".encode()


KEY_STORE_AWAY = (redis.ConnectionError, redis.TimeoutError, ReadOnlyError)  # tried again, up to the patience


def _pauses(deadline: float) -> Iterator[float]:
    """The waits between tries at a key store that is away (50 ms, doubling up to 1 s), while the next one ends
    before `deadline` (`time.monotonic()`); then the caller raises what it got."""
    pause = 0.05
    while time.monotonic() + pause <= deadline:
        yield pause
        pause = min(pause * 2, 1.0)


def _record(raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored record: a wrapped data key (`kek`, `id`, `nonce`, `wrapped`) or an erasure mark (`erased_at`)."""
    return None if raw is None else json.loads(raw)


@dataclass(frozen=True)
class Rewrapped:
    """What `PersonalData.rewrap` did: data keys wrapped again, already under the current key, erased persons."""

    rewrapped: int
    current: int
    erased: int
    key_id: str  # the key-encryption key that now wraps them


class PersonalData:
    """The deployment's data keys (a Redis hash) and its key-encryption keys (settings): seal, unseal, forget,
    rewrap. Blocking calls, which services make from their worker threads, except `open_need_async`."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = key_encryption_keys(settings)
        self.hash = settings.key(KEYS_HASH)
        self._client = client
        self._lock = threading.Lock()
        self.patience_s = KEY_STORE_PATIENCE_S

    @property
    def client(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                from shared import redis_clients

                self._client = redis_clients.sync_client(self.settings, socket_timeout=5, socket_connect_timeout=5)
            return self._client

    def _patiently(self, call: Callable[[], T]) -> T:
        """Run a call to the key store, again for up to KEY_STORE_PATIENCE_S while Redis is away: recording a need
        writes the person's data key, and a Redis restart or a Sentinel failover (each new connection goes to the
        master Sentinel names then) should delay the desk, not refuse it. Past that the error is raised: intake
        answers 503 with Retry-After and records nothing."""
        pauses = _pauses(time.monotonic() + self.patience_s)
        while True:
            try:
                return call()
            except KEY_STORE_AWAY:
                if (pause := next(pauses, None)) is None:
                    raise
                time.sleep(pause)

    @property
    def current_key_id(self) -> str:
        return self.keys[0][0]

    # --- data keys ---

    def _wrap(self, person_id: str, data_key_id: str, data_key: bytes) -> str:
        key_id, kek = self.keys[0]
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(person_id, data_key_id))
        return json.dumps({"kek": key_id, "id": data_key_id, "nonce": _b64(nonce), "wrapped": _b64(wrapped)})

    def _unwrap(self, person_id: str, record: dict[str, Any]) -> bytes:
        kek = dict(self.keys).get(record["kek"])
        if kek is None:
            raise UnknownKeyId(
                f"the data key of person {person_id} is wrapped with key-encryption key {record['kek']!r}, which "
                f"this process does not have: add it back to RELAIS_PERSONAL_DATA_KEYS (after the current key), "
                f"or set the RELAIS_SECRET_KEY it was derived from (key {DERIVED_KEY_ID!r})"
            )
        try:
            return AESGCM(kek).decrypt(
                _unb64(record["nonce"]), _unb64(record["wrapped"]), _wrap_aad(person_id, record["id"])
            )
        except (InvalidTag, ValueError):
            raise SealBroken(
                f"the data key of person {person_id} does not unwrap with key-encryption key {record['kek']!r}: "
                "the key under that id is not the one that wrapped it, or the record was altered"
            ) from None

    def data_key(self, person_id: str, *, create: bool = False) -> tuple[str, bytes]:
        """(data key id, data key) of the person; with `create`, a new one unless a live one exists. Raises
        DataKeyErased or DataKeyMissing without `create`."""
        if create:  # one round trip: the script keeps a live key, else stores this candidate (cheaper than a read)
            get_or_create = self.client.register_script(_GET_OR_CREATE)
            data_key_id, data_key = os.urandom(8).hex(), AESGCM.generate_key(bit_length=8 * KEY_BYTES)
            candidate = self._wrap(person_id, data_key_id, data_key)
            stored = self._patiently(lambda: get_or_create(keys=[self.hash], args=[person_id, candidate]))
            if stored in (candidate, candidate.encode()):
                return data_key_id, data_key
            record = _record(stored)  # the person's live key: another need of theirs created it first
        else:
            record = _record(self._patiently(lambda: self.client.hget(self.hash, person_id)))
        return self._live_key(person_id, record)

    def _live_key(self, person_id: str, record: dict[str, Any] | None) -> tuple[str, bytes]:
        """(data key id, data key) from the person's stored record; DataKeyMissing or DataKeyErased."""
        if record is None:
            raise DataKeyMissing(f"no data key for person {person_id} in {self.hash}")
        if "wrapped" not in record:
            raise DataKeyErased(f"person {person_id} was erased on {record.get('erased_at')}")
        return record["id"], self._unwrap(person_id, record)

    def forget(self, person_id: str, now: datetime | None = None) -> bool:
        """Crypto-shredding: the person's data key is replaced by an erasure mark, so nothing sealed for them opens
        again, wherever it was copied. True when a live key was deleted."""
        mark = json.dumps({"erased_at": (now or utcnow()).isoformat()})
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self.hash, person_id)
        pipe.hset(self.hash, person_id, mark)
        previous, _ = pipe.execute()
        record = _record(previous)
        return bool(record and "wrapped" in record)

    def rewrap(self) -> Rewrapped:
        """Wrap every data key again with the current key-encryption key (the first of RELAIS_PERSONAL_DATA_KEYS),
        so an older one can be removed. Safe while the services run; a key erased meanwhile stays erased."""
        compare_and_set = self.client.register_script(_COMPARE_AND_SET)
        rewrapped = current = erased = 0
        for field, raw in self.client.hscan_iter(self.hash):
            person_id = field.decode() if isinstance(field, bytes) else field
            record = _record(raw)
            if record is None or "wrapped" not in record:
                erased += 1
                continue
            if record["kek"] == self.current_key_id:
                current += 1
                continue
            fresh = self._wrap(person_id, record["id"], self._unwrap(person_id, record))
            if compare_and_set(keys=[self.hash], args=[person_id, raw, fresh]):
                rewrapped += 1
            else:
                erased += 1  # changed meanwhile: only an erasure replaces a live key
        return Rewrapped(rewrapped, current, erased, self.current_key_id)

    # --- sealing ---

    def seal(self, person_id: str, need_id: str, data: dict[str, Any], *, create: bool = True) -> SealedPersonalData:
        """Encrypt `data` (JSON) with the person's data key, created if they have none yet (unless `create` is
        False); the need's id is the associated data, so the ciphertext opens only as part of that need's event."""
        data_key_id, data_key = self.data_key(person_id, create=create)
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        ciphertext = AESGCM(data_key).encrypt(nonce, plain, _seal_aad(need_id))
        return SealedPersonalData(
            person_id=person_id, key_id=data_key_id, nonce=_b64(nonce), ciphertext=_b64(ciphertext)
        )

    def unseal(self, sealed: SealedPersonalData, need_id: str) -> dict[str, Any]:
        """The data `seal` sealed for this need. DataKeyErased when the person was erased (or their key replaced
        since), DataKeyMissing, UnknownKeyId or SealBroken otherwise."""
        return self._open(sealed, need_id, self.data_key(sealed.person_id))

    def _open(self, sealed: SealedPersonalData, need_id: str, key: tuple[str, bytes]) -> dict[str, Any]:
        data_key_id, data_key = key
        if data_key_id != sealed.key_id:  # only an erasure lets a person's key be replaced
            raise DataKeyErased(f"the data key that sealed this data for person {sealed.person_id} is gone")
        try:
            plain = AESGCM(data_key).decrypt(_unb64(sealed.nonce), _unb64(sealed.ciphertext), _seal_aad(need_id))
        except (InvalidTag, ValueError):
            raise SealBroken(
                f"sealed data of person {sealed.person_id} does not open for need {need_id}: altered, or sealed "
                "for another need"
            ) from None
        return json.loads(plain)

    def seal_need(self, person_id: str, need_id: str, data: NeedPersonalData) -> SealedPersonalData:
        return self.seal(person_id, need_id, data.model_dump())

    def open_need(self, event: NeedRecorded) -> NeedPersonalData | None:
        """What `need.recorded` sealed, or None when the person was erased before it was read (consumers record
        ERASED then). Any other failure raises: the event is retried, then dead-lettered."""
        return self._need_details(event, lambda: self.data_key(event.sealed.person_id))

    def _need_details(self, event: NeedRecorded, key: Callable[[], tuple[str, bytes]]) -> NeedPersonalData | None:
        try:
            return NeedPersonalData.model_validate(self._open(event.sealed, event.need_id, key()))
        except DataKeyErased:
            return None

    async def open_need_async(self, event: NeedRecorded, client: aioredis.Redis) -> NeedPersonalData | None:
        """`open_need` from the event loop, reading the key store with `client` (the bus's asyncio client): one
        HGET, then the key's unwrapping and the data's decryption, a few microseconds each, on the loop. A thread
        per entry cost more than the work (a hop, and 40 threads in notifications under load before they were
        limited). Waits for an absent Redis as `data_key` does."""
        person_id = event.sealed.person_id
        pauses = _pauses(time.monotonic() + self.patience_s)
        while True:
            try:
                raw = await client.hget(self.hash, person_id)
                break
            except KEY_STORE_AWAY:
                if (pause := next(pauses, None)) is None:
                    raise
                await asyncio.sleep(pause)
        return self._need_details(event, lambda: self._live_key(person_id, _record(raw)))

    def seal_text(self, person_id: str, need_id: str, text: str) -> SealedPersonalData:
        """Seal a desk's text about the person's need (a note, a closing reason) with their existing data key: never
        creates one, so an erased person's key is not brought back (DataKeyErased then)."""
        return self.seal(person_id, need_id, DeskText(text=text).model_dump(), create=False)

    def open_text(self, sealed: SealedPersonalData, need_id: str) -> str | None:
        """What `seal_text` sealed, or None when the person was erased before it was read."""
        try:
            return DeskText.model_validate(self.unseal(sealed, need_id)).text
        except DataKeyErased:
            return None
