"""Needs recorded with no network (issue 16): the per-session key that seals them in the browser.

A desk signed in on the pages gets, from `GET /hors-ligne/cle`, the public half of an elliptic-curve key (P-256)
that belongs to its session: the private half is derived here, from the deployment's signing key and the session id,
and never leaves the server. The browser seals each need it keeps offline to that public key (ECDH with a fresh key
of its own, then AES-GCM: `/scripts/hors-ligne.js`) and stores only the sealed bytes in IndexedDB. Only the server
can open them, and only while the session lives: the session id comes from the signed session cookie, which
`LiveSessions` honours only while its record in Redis exists (sign-out, ops' revocation and the 12-hour expiry end
it). So a laptop left on a bus holds nothing readable once its session has ended; docs/offline.md says what it does
hold before then.

The browser's part is WebCrypto's: `deriveKey({name: "ECDH", public: server}, own_private, {name: "AES-GCM",
length: 256})` keys AES-GCM with the first 32 bytes of the shared secret, which is what `exchange` answers here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.settings import Settings

CURVE = ec.SECP256R1()
CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MAX_SEALED = 48 * 1024  # a need's fields are at most a few KiB; the form body limit is 64 KiB


class Unreadable(Exception):
    """Sealed for another session (ended, or another browser's), altered, or not a sealed need at all."""


@dataclass(frozen=True)
class SessionKey:
    tag: str  # names the session's key in the browser's store, without revealing the session id
    public_key: str  # uncompressed point, base64url: what the browser seals to
    private: ec.EllipticCurvePrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_key(settings: Settings, session_id: str) -> SessionKey:
    """The session's key pair: the same for the whole session, on every replica (derived, not stored)."""
    secret = settings.signing_key.encode()
    seed = hmac.new(secret, f"offline-key|intake|{session_id}".encode(), hashlib.sha512).digest()
    private = ec.derive_private_key(int.from_bytes(seed, "big") % (CURVE_ORDER - 1) + 1, CURVE)
    public = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    tag = hmac.new(secret, f"offline-tag|intake|{session_id}".encode(), hashlib.sha256).hexdigest()[:24]
    return SessionKey(tag=tag, public_key=_b64(public), private=private)


def open_sealed(key: SessionKey, sealed: Mapping[str, object]) -> dict[str, str]:
    """The form fields the browser sealed: `{"tag", "epk", "iv", "ct"}` (base64url) -> {field: value}."""
    try:
        if sealed.get("tag") != key.tag:
            raise Unreadable("another session's")
        parts = [str(sealed[name]) for name in ("epk", "iv", "ct")]
        if sum(len(p) for p in parts) > MAX_SEALED:
            raise Unreadable("too large")
        epk, iv, ct = (_unb64(p) for p in parts)
        peer = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, epk)
        shared = key.private.exchange(ec.ECDH(), peer)
        plain = AESGCM(shared[:32]).decrypt(iv, ct, key.tag.encode())
        fields = json.loads(plain)
    except (KeyError, ValueError, TypeError, InvalidTag) as exc:
        raise Unreadable(type(exc).__name__) from None
    if not isinstance(fields, dict):
        raise Unreadable("not fields")
    return {str(k): v for k, v in fields.items() if isinstance(v, str)}
