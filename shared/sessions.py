"""Server-side records of signed-in web sessions, kept in Redis so that every service honours one revocation.

The session cookie (shared.signin) is signed and carries a random session id; a signed-in page is served only while
Redis holds the record of that id. Signing out deletes the record, so a copied cookie stops working at once;
ops revoke a user's sessions (a lost phone) by deleting every record of the user, on all services at once,
through `POST /api/v1/users/{user_id}/sessions/revoke` on any service (or the dashboard's button on referral).

Keys (inside the deployment's namespace), each expiring with the session (12 hours):
- `websession:<sha256 of the id>` -> "<service>|<user id>": Redis holds no usable session id, only its digest;
- `websessions-of:<user id>` -> the set of those digests, for revocation.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel

from shared.directory import User
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.service import Service

log = logging.getLogger("relais.sessions")

SESSION_MAX_AGE = timedelta(hours=12)  # a working day; then sign in again


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _record_key(settings: Settings, session_id: str) -> str:
    return settings.key(f"websession:{_digest(session_id)}")


def _user_key(settings: Settings, user_id: str) -> str:
    return settings.key(f"websessions-of:{user_id}")


async def open_session(redis, settings: Settings, service: str, user_id: str) -> str:
    """Record a new signed-in session of `user_id` on `service`; returns its id (for the signed cookie)."""
    session_id = secrets.token_urlsafe(24)
    ttl = int(SESSION_MAX_AGE.total_seconds())
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(_record_key(settings, session_id), f"{service}|{user_id}", ex=ttl)
        pipe.sadd(_user_key(settings, user_id), _digest(session_id))
        pipe.expire(_user_key(settings, user_id), ttl)
        await pipe.execute()
    return session_id


async def session_is_live(redis, settings: Settings, service: str, user_id: str, session_id: str) -> bool:
    """True while the session was neither signed out nor revoked (nor expired)."""
    value = await redis.get(_record_key(settings, session_id))
    return value is not None and value == f"{service}|{user_id}".encode()


async def end_session(redis, settings: Settings, user_id: str, session_id: str) -> None:
    """Sign out: this session's cookie, and every copy of it, stops working at once."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(_record_key(settings, session_id))
        pipe.srem(_user_key(settings, user_id), _digest(session_id))
        await pipe.execute()


async def revoke_user_sessions(redis, settings: Settings, user_id: str) -> int:
    """End every session of `user_id` on every service; returns how many were still live."""
    digests = await redis.smembers(_user_key(settings, user_id))
    keys = [settings.key(f"websession:{d.decode() if isinstance(d, bytes) else d}") for d in digests]
    async with redis.pipeline(transaction=True) as pipe:
        if keys:
            pipe.delete(*keys)
        pipe.delete(_user_key(settings, user_id))
        results = await pipe.execute()
    return int(results[0]) if keys else 0


# --- the ops API, on every service -----------------------------------------------------------------


class SessionsRevoked(BaseModel):
    user_id: str
    revoked: int  # sessions that were still live, on all services


def api_router(svc: Service) -> APIRouter:
    """`POST /users/{user_id}/sessions/revoke` (ops): the same call on any service ends the user's sessions on all."""
    router = APIRouter(tags=["ops"])
    require_ops = svc.require("ops")

    @router.post(
        "/users/{user_id}/sessions/revoke",
        response_model=SessionsRevoked,
        responses={
            401: {"description": "Missing or unknown bearer token"},
            403: {"description": "The caller's role is not ops"},
            404: {"description": "No such user in the directory"},
        },
    )
    async def revoke(user_id: str, user: User = Depends(require_ops)) -> SessionsRevoked:
        """End every web session of a user on every service (a lost phone, a departure); API tokens are not
        sessions: remove them from the directory."""
        if svc.directory.user(user_id) is None:
            raise HTTPException(404, f"no user {user_id!r} in the directory")
        count = await revoke_user_sessions(svc.bus.redis, svc.settings, user_id)
        log.info("sessions of %s revoked by %s: %d ended", user_id, user.id, count)
        return SessionsRevoked(user_id=user_id, revoked=count)

    return router
