"""What the dashboard reads from intake and notifications: their own JSON APIs, with the internal ops credential
(never their databases). A service that does not answer makes its part `available: false`."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
import httpx
from pydantic import BaseModel

from shared.logs import current_correlation_id
from shared.service import ACTOR_HEADER, internal_token
from shared.settings import ServiceName

if TYPE_CHECKING:  # deps imports dashboard, which imports this module
    from services.referral.deps import Runtime

REMOTE_TIMEOUT = 3.0  # seconds; past it that part of the dashboard shows as unavailable


class Remote(BaseModel):
    """A part read from another service's API: its JSON as it answered, or why it could not be read."""

    available: bool
    error: str | None = None
    data: dict[str, Any] | None = None


class OutboxFigures(BaseModel):
    service: str
    available: bool
    backlog: int | None = None
    oldest_age_seconds: float | None = None
    error: str | None = None


async def remote_json(
    svc: Runtime, service: ServiceName, path: str, actor: str | None = None, params: dict | None = None
) -> Remote:
    headers = {"Authorization": f"Bearer {internal_token(svc.settings)}"}
    if correlation_id := current_correlation_id():
        headers["X-Correlation-ID"] = correlation_id
    if actor:
        headers[ACTOR_HEADER] = actor
    url = f"{svc.settings.service_url(service)}/api/v1{path}"
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT) as client:
            response = await client.get(url, headers=headers, params=params)
        if response.status_code != 200:
            return Remote(available=False, error=f"{service} answered {response.status_code}")
        return Remote(available=True, data=response.json())
    except (httpx.HTTPError, ValueError) as exc:
        return Remote(available=False, error=f"{service} unreachable ({type(exc).__name__})")


async def outbox_of(svc: Runtime, service: ServiceName) -> OutboxFigures:
    if service == svc.name:
        try:
            state = await anyio.to_thread.run_sync(svc.service.outbox_state)
        except Exception as exc:  # noqa: BLE001
            return OutboxFigures(service=service, available=False, error=type(exc).__name__)
        return OutboxFigures(
            service=service, available=True, backlog=state["backlog"], oldest_age_seconds=state["oldest_age_seconds"]
        )
    remote = await remote_json(svc, service, "/ops/outbox")
    if not remote.available or remote.data is None:  # an available part has its data
        return OutboxFigures(service=service, available=False, error=remote.error)
    return OutboxFigures(
        service=service,
        available=True,
        backlog=remote.data.get("backlog"),
        oldest_age_seconds=remote.data.get("oldest_age_seconds"),
    )


def report_months(now: datetime, timezone: str) -> list[str]:
    """This month and the previous one (YYYY-MM) in the directory's time zone."""
    this = now.astimezone(ZoneInfo(timezone)).date().replace(day=1)
    previous = (this - timedelta(days=1)).replace(day=1)
    return [this.strftime("%Y-%m"), previous.strftime("%Y-%m")]


async def reports(svc: Runtime, now: datetime) -> Remote:
    """Intake's monthly reports of this month and the previous one: {"months": [intake's answer for each]}."""
    answers = await asyncio.gather(
        *(
            remote_json(svc, "intake", "/reports", params={"month": m})
            for m in report_months(now, svc.directory.timezone)
        )
    )
    failed = next((a for a in answers if not a.available), None)
    return failed or Remote(available=True, data={"months": [a.data for a in answers]})


async def intake_report_csv(svc: Runtime, actor: str, month: str | None) -> httpx.Response | None:
    """Intake's monthly report as CSV, asked for the ops user `actor`; None when intake does not answer 200."""
    params = {"format": "csv", **({"month": month} if month else {})}
    headers = {"Authorization": f"Bearer {internal_token(svc.settings)}", ACTOR_HEADER: actor}
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT * 3) as client:
            answer = await client.get(
                f"{svc.settings.service_url('intake')}/api/v1/reports", params=params, headers=headers
            )
    except httpx.HTTPError:
        return None
    return answer if answer.status_code == 200 else None
