"""The per-session key that seals needs kept offline (services/intake/offline.py): what the browser seals (ECDH P-256
then AES-GCM-256 keyed with the shared secret, the tag as additional data, as hors-ligne.js does with WebCrypto) opens
with the key of that session only, and not once altered."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.intake import offline
from shared.settings import Settings


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def seal_as_the_browser(key: offline.SessionKey, fields: dict[str, str]) -> dict[str, str]:
    server = ec.EllipticCurvePublicKey.from_encoded_point(
        offline.CURVE, base64.urlsafe_b64decode(key.public_key + "=" * (-len(key.public_key) % 4))
    )
    own = ec.generate_private_key(offline.CURVE)
    shared = own.exchange(ec.ECDH(), server)
    iv = os.urandom(12)
    ct = AESGCM(shared[:32]).encrypt(iv, json.dumps(fields).encode(), key.tag.encode())
    epk = own.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"tag": key.tag, "epk": b64(epk), "iv": b64(iv), "ct": b64(ct)}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(secret_key="k" * 40, data_dir=tmp_path)


def test_a_sealed_need_opens_with_its_session_key_only(settings):
    key = offline.session_key(settings, "session-a")
    again = offline.session_key(settings, "session-a")
    assert (again.tag, again.public_key) == (key.tag, key.public_key)  # derived: every replica, every request
    fields = {"category": "Logement", "summary": "Expulsion annoncée", "idempotency_key": "hl-1"}
    sealed = seal_as_the_browser(key, fields)
    assert offline.open_sealed(key, sealed) == fields

    other = offline.session_key(settings, "session-b")
    assert other.tag != key.tag and other.public_key != key.public_key
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(other, sealed)  # another session (signed out, then in again)
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(other, {**sealed, "tag": other.tag})  # even when it claims the other's tag
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(offline.session_key(Settings(secret_key="j" * 40), "session-a"), sealed)


@pytest.mark.parametrize("part", ["epk", "iv", "ct"])
def test_an_altered_or_malformed_need_is_unreadable(settings, part):
    key = offline.session_key(settings, "session-a")
    sealed = seal_as_the_browser(key, {"summary": "x"})
    altered = {**sealed, part: sealed[part][:-2] + ("AA" if not sealed[part].endswith("AA") else "BB")}
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(key, altered)
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(key, {**sealed, part: "not base64 !"})
    with pytest.raises(offline.Unreadable):
        offline.open_sealed(key, {"tag": key.tag})
