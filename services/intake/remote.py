"""What intake reads from referral and notifications about a person: their own JSON APIs, with the internal ops
credential (never their databases), as referral's dashboard does (services/referral/remote.py). A person's export is
whole or not at all: a service that does not answer is an error naming it, never a missing part."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from shared.logs import current_correlation_id
from shared.service import ACTOR_HEADER, internal_token
from shared.settings import ServiceName, Settings

REMOTE_TIMEOUT = 5.0  # seconds
PREVIEW_TIMEOUT = 2.0  # seconds: the desk is waiting at the counter
OTHER_SERVICES: tuple[ServiceName, ...] = ("referral", "notifications")


class PartUnavailable(Exception):
    """A service did not give its part: `service` names it, `why` says how it failed."""

    def __init__(self, service: str, why: str) -> None:
        super().__init__(f"{service}: {why}")
        self.service, self.why = service, why


async def part_of(settings: Settings, service: ServiceName, path: str, need_ids: list[str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {internal_token(settings)}"}
    if correlation_id := current_correlation_id():
        headers["X-Correlation-ID"] = correlation_id
    url = f"{settings.service_url(service)}/api/v1{path}"
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT) as client:
            response = await client.get(url, headers=headers, params=[("need_id", n) for n in need_ids])
    except httpx.HTTPError as exc:
        raise PartUnavailable(service, f"unreachable ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise PartUnavailable(service, f"answered {response.status_code}")
    try:
        data = response.json()
    except ValueError:
        raise PartUnavailable(service, "answered something other than JSON") from None
    if not isinstance(data, dict):
        raise PartUnavailable(service, "answered something other than a JSON object")
    return data


async def parts_of_person(settings: Settings, person_id: str, need_ids: list[str], what: str) -> dict[str, dict]:
    """Each other service's part for these needs (`what`: "export" or "access-log"), by service name; raises
    PartUnavailable for the first that fails."""
    answers = await asyncio.gather(
        *(part_of(settings, s, f"/people/{person_id}/{what}", need_ids) for s in OTHER_SERVICES),
        return_exceptions=True,
    )
    parts: dict[str, dict] = {}
    for service, answer in zip(OTHER_SERVICES, answers, strict=True):
        if isinstance(answer, BaseException):
            raise answer
        parts[service] = answer
    return parts


async def routing_preview(
    settings: Settings, *, library_id: str, category: str, postal_code: str | None, actor: str
) -> dict[str, Any] | None:
    """Referral's answer to "who would receive this need now, by when" (GET /api/v1/routing/preview, with the
    internal credential on behalf of `actor`, after this service checked the desk's library), or None when referral
    cannot say now: the form then says so and the need can still be sent."""
    headers = {"Authorization": f"Bearer {internal_token(settings)}", ACTOR_HEADER: actor}
    if correlation_id := current_correlation_id():
        headers["X-Correlation-ID"] = correlation_id
    params = {"library_id": library_id, "category": category}
    if postal_code:
        params["postal_code"] = postal_code
    try:
        async with httpx.AsyncClient(timeout=PREVIEW_TIMEOUT) as client:
            response = await client.get(
                f"{settings.service_url('referral')}/api/v1/routing/preview", headers=headers, params=params
            )
        data = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) and "routed_because" in data else None
