"""The register of confidentiality incidents as ops pages (French, signed-in ops, CSRF on every form), next to the
dashboard:

- `/tableau-de-bord/incidents`: the register, newest first, with the CSV download
  (`/tableau-de-bord/incidents.csv`, the same file as `GET /api/v1/privacy-incidents.csv`);
- `/tableau-de-bord/incidents/nouveau`: the form to record one (`RecordPrivacyIncident`);
- `/tableau-de-bord/incidents/{id}`: an incident, and the same form to change it (`UpdatePrivacyIncident`).
The form's field names are the incident's (domain.PrivacyIncidentFacts); its dates are days, its notification times
local times in the directory's time zone. Errors are shown next to their fields, the values kept."""

from __future__ import annotations

from dataclasses import asdict
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.referral import domain, incidents_csv, views
from services.referral.commands import RecordPrivacyIncident, UpdatePrivacyIncident
from services.referral.deps import ClockDep, CommandDeps, PagesDep, RuntimeDep
from services.referral.domain import PrivacyIncidentFacts
from services.referral.handlers import Invalid, NotFound, handle
from services.referral.store import PrivacyIncident
from shared.pages import Pages, page_links, page_number

PER_PAGE = 100
DATES = ("occurred_from", "occurred_until", "known_at")
REQUIRED_DATES = ("occurred_from", "known_at")
TIMES = ("authority_notified_at", "people_notified_at")
COUNTS = ("people_count", "records_count")
CHECKBOXES = ("people_count_is_estimate", "serious_risk")
# What a field holds while the form cannot be read (its own error is shown), so the other fields are still checked.
STAND_INS: dict[str, Any] = {"occurred_from": date.min, "known_at": date.min, "people_count": 0}
# `?fait=` on the incident's page (user-facing words)
DONE = {"inscrit": "recorded", "modifie": "updated"}

router = APIRouter()


def local_minute(at: datetime | None, timezone: str) -> str:
    """A time as a datetime-local input shows it."""
    return "" if at is None else at.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%dT%H:%M")


def values_of(incident: PrivacyIncident, timezone: str) -> dict[str, str]:
    """The form's fields for a recorded incident."""
    values: dict[str, str] = {}
    for name in domain.INCIDENT_FIELDS:
        value = getattr(incident, name)
        if name in TIMES:
            values[name] = local_minute(value, timezone)
        elif name in CHECKBOXES:
            values[name] = "on" if value else ""
        else:
            values[name] = "" if value is None else str(value)
    return values


def read_form(fields: dict[str, str], timezone: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The facts the form gives, and what could not be read (field -> code)."""
    facts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in domain.INCIDENT_FIELDS:
        raw = fields.get(name, "").strip()
        if name in CHECKBOXES:
            facts[name] = name in fields
        elif name in DATES:
            try:
                facts[name] = date.fromisoformat(raw) if raw else None
            except ValueError:
                errors[name] = "date"
            if raw == "" and name in REQUIRED_DATES:
                errors[name] = "required_date"
        elif name in TIMES:
            try:
                facts[name] = datetime.fromisoformat(raw).replace(tzinfo=ZoneInfo(timezone)) if raw else None
            except ValueError:
                errors[name] = "datetime"
        elif name in COUNTS:
            if raw.isdigit() and len(raw) < 12:
                facts[name] = int(raw)
            elif raw == "" and name == "records_count":
                facts[name] = None
            else:
                errors[name] = "number" if raw else "required_number"
        elif name == "status":
            facts[name] = raw or "open"
        else:
            facts[name] = fields.get(name, "")
    return facts, errors


def problems_of(facts: dict[str, Any], unreadable: dict[str, str], now: datetime, timezone: str) -> dict[str, str]:
    """Every problem of the form: what could not be read, and the register's rules on the rest."""
    stand_ins = {name: STAND_INS.get(name) for name in unreadable}
    checked = domain.tidy_incident(PrivacyIncidentFacts(**{**facts, **stand_ins}))
    errors = dict(unreadable)
    for problem in domain.incident_problems(checked, now, timezone):
        if problem.code == "serious_unnotified" and "authority_notified_at" in unreadable:
            continue  # the date given could not be read: ask for it, not for a note
        errors.setdefault(problem.field, problem.code)
    return errors


def form_page(
    request: Request,
    pages: Pages,
    timezone: str,
    values: dict[str, str],
    errors: dict[str, str] | None = None,
    incident: PrivacyIncident | None = None,
    status: int = 200,
    done: str | None = None,
) -> Response:
    return pages.render(
        request,
        "incident.html",
        status=status,
        values=values,
        errors=errors or {},
        incident=incident,
        tz=timezone,
        done=done,
        limits=dict(long=domain.LONG_TEXT, short=domain.SHORT_TEXT, name=domain.NAME_TEXT, note=domain.NOTE_TEXT),
    )


@router.get("/tableau-de-bord/incidents")
async def register(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    pages.require_user(request, "ops")
    number = page_number(request.query_params.get("page", ""))

    def read() -> list[PrivacyIncident]:
        with runtime.db.read() as session:
            return views.privacy_incidents(session, offset=(number - 1) * PER_PAGE, limit=PER_PAGE + 1)

    incidents = await anyio.to_thread.run_sync(read)
    return pages.render(
        request,
        "incidents.html",
        incidents=incidents[:PER_PAGE],
        tz=runtime.directory.timezone,
        **page_links(request, number, len(incidents) > PER_PAGE),
    )


@router.get("/tableau-de-bord/incidents.csv")
async def register_csv(request: Request, pages: PagesDep, runtime: RuntimeDep, clock: ClockDep) -> Response:
    pages.require_user(request, "ops")
    return await anyio.to_thread.run_sync(incidents_csv.export, runtime.db, runtime.directory.timezone, clock())


@router.get("/tableau-de-bord/incidents/nouveau")
async def new_incident(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    pages.require_user(request, "ops")
    return form_page(request, pages, runtime.directory.timezone, {"status": "open"})


@router.post("/tableau-de-bord/incidents/nouveau")
async def record_incident(request: Request, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps) -> Response:
    user = pages.require_user(request, "ops")
    fields = await pages.form(request)
    timezone = deps.directory.timezone
    facts, unreadable = read_form(fields, timezone)
    if unreadable:
        errors = problems_of(facts, unreadable, deps.clock(), timezone)
        return form_page(request, pages, timezone, fields, errors, status=422)
    try:
        incident = await handle(RecordPrivacyIncident(PrivacyIncidentFacts(**facts), user.id), deps)
    except Invalid as invalid:
        errors = {p.field: p.code for p in reversed(invalid.problems)}  # the first problem of a field wins
        return form_page(request, pages, timezone, fields, errors, status=422)
    return pages.redirect(f"/tableau-de-bord/incidents/{incident.id}?fait=inscrit")


def incident_or_404(request: Request, pages: Pages, runtime: Any, incident_id: str) -> PrivacyIncident:
    with runtime.db.read() as session:
        incident = session.get(PrivacyIncident, incident_id)
    if incident is None:
        raise pages.error(request, 404, "not_found")
    return incident


@router.get("/tableau-de-bord/incidents/{incident_id}")
async def show_incident(request: Request, incident_id: str, pages: PagesDep, runtime: RuntimeDep) -> Response:
    pages.require_user(request, "ops")
    incident = await anyio.to_thread.run_sync(incident_or_404, request, pages, runtime, incident_id)
    timezone = runtime.directory.timezone
    done = DONE.get(request.query_params.get("fait", ""))
    return form_page(request, pages, timezone, values_of(incident, timezone), incident=incident, done=done)


@router.post("/tableau-de-bord/incidents/{incident_id}")
async def update_incident(
    request: Request, incident_id: str, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps
) -> Response:
    user = pages.require_user(request, "ops")
    fields = await pages.form(request)
    incident = await anyio.to_thread.run_sync(incident_or_404, request, pages, runtime, incident_id)
    timezone = deps.directory.timezone
    facts, unreadable = read_form(fields, timezone)
    if unreadable:
        errors = problems_of(facts, unreadable, deps.clock(), timezone)
        return form_page(request, pages, timezone, fields, errors, incident, status=422)
    changes = dict(asdict(PrivacyIncidentFacts(**facts)))
    for name in TIMES:  # the form shows minutes: a time it shows unchanged keeps its seconds
        if fields.get(name, "").strip() == local_minute(getattr(incident, name), timezone):
            del changes[name]
    try:
        await handle(UpdatePrivacyIncident(incident_id, changes, user.id), deps)
    except NotFound:
        raise pages.error(request, 404, "not_found") from None
    except Invalid as invalid:
        errors = {p.field: p.code for p in reversed(invalid.problems)}
        return form_page(request, pages, timezone, fields, errors, incident, status=422)
    return pages.redirect(f"/tableau-de-bord/incidents/{incident_id}?fait=modifie")
