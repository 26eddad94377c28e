"""The register of confidentiality incidents as JSON (role ops): record an incident, list, read, change one, and
the whole register as CSV. Parse and authorise, run its one command (handlers.py) or read through views.py,
answer. The rules are domain.incident_problems'; a 422 names each field that breaks one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from services.referral import domain, incidents_csv, views
from services.referral.commands import RecordPrivacyIncident, UpdatePrivacyIncident
from services.referral.deps import ClockDep, CommandDeps, DirectoryDep, OpsUser, RuntimeDep
from services.referral.domain import PrivacyIncidentFacts
from services.referral.handlers import Invalid, NotFound, Refused, handle
from services.referral.store import PrivacyIncident
from shared.edges import body_limit
from shared.service import Cursor, field_error

# The largest body the schema allows: ~29 000 characters of text, each up to 12 bytes as JSON escapes.
MAX_BODY = 400 * 1024
# A required text holds something besides blanks (and no NUL, which the edge refuses).
FILLED = r"^[^\x00]*[^\s\x00][^\x00]*$"
Nature = Literal["confidentiality", "integrity", "availability"]
Status = Literal["open", "closed"]
LongText = Annotated[str, Field(min_length=1, max_length=domain.LONG_TEXT, pattern=FILLED)]
Categories = Annotated[str, Field(min_length=1, max_length=domain.SHORT_TEXT, pattern=FILLED)]


def a_number(value: Any) -> Any:
    """Counts as JSON numbers (12 or 12.0), not strings or booleans."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    return value


Count = Annotated[int, Field(ge=0, le=domain.MOST_PEOPLE), BeforeValidator(a_number)]


def as_written(value: Any) -> Any:
    """Days and times as JSON writes them (strings): not numbers read as timestamps."""
    if not isinstance(value, str | date):
        raise ValueError("must be a string in ISO 8601 form")
    return value


Day = Annotated[date, BeforeValidator(as_written)]
Instant = Annotated[AwareDatetime, BeforeValidator(as_written)]
AuthorityName = Annotated[str, Field(max_length=domain.NAME_TEXT)]
Note = Annotated[str, Field(max_length=domain.NOTE_TEXT)]


class PrivacyIncidentBody(BaseModel):
    """An incident to record. Dates are days; `occurred_until` only for a period. The notifications' times are
    instants with an offset."""

    model_config = ConfigDict(extra="forbid")
    nature: Nature = Field(description="which was breached: confidentiality, integrity or availability (CNIL)")
    information_description: LongText = Field(description="the personal information concerned (Québec, CNIL)")
    circumstances: LongText
    occurred_from: Day = Field(description="the day of the incident, or the first day of its period")
    occurred_until: Day | None = Field(None, description="the last day of the period, when it is one")
    known_at: Day = Field(description="the day the organisation learnt of it")
    people_count: Count
    people_count_is_estimate: StrictBool = False
    people_categories: Categories = Field(description="e.g. people helped, partners' contacts (CNIL)")
    records_count: Count | None = None
    consequences: LongText = Field(description="the probable consequences for the people (CNIL)")
    risk_assessment: LongText = Field(description="the assessment of the risk of harm (Québec)")
    serious_risk: StrictBool = Field(False, description="a risk of serious harm (Québec) or a high risk (CNIL)")
    authority: AuthorityName | None = Field(None, description="the authority notified; needed with its date")
    authority_notified_at: Instant | None = None
    people_notified_at: Instant | None = None
    people_notice_description: Note | None = Field(None, description="how people were told (a public notice: why)")
    notification_note: Note | None = Field(
        None, description="why the authority was not (yet) notified, or late; needed for a serious risk not notified"
    )
    measures: LongText = Field(description="measures taken or planned (Québec, CNIL)")
    status: Status = "open"


# The fields a change may not set to null (they are required in the register).
NOT_NULL = (
    "nature",
    "information_description",
    "circumstances",
    "occurred_from",
    "known_at",
    "people_count",
    "people_count_is_estimate",
    "people_categories",
    "consequences",
    "risk_assessment",
    "serious_risk",
    "measures",
    "status",
)


class PrivacyIncidentChanges(BaseModel):
    """The fields to change (the others are kept); null clears an optional field. Checked with the kept ones."""

    model_config = ConfigDict(extra="forbid")
    nature: Nature | SkipJsonSchema[None] = None
    information_description: LongText | SkipJsonSchema[None] = None
    circumstances: LongText | SkipJsonSchema[None] = None
    occurred_from: Day | SkipJsonSchema[None] = None
    occurred_until: Day | None = None
    known_at: Day | SkipJsonSchema[None] = None
    people_count: Count | SkipJsonSchema[None] = None
    people_count_is_estimate: StrictBool | SkipJsonSchema[None] = None
    people_categories: Categories | SkipJsonSchema[None] = None
    records_count: Count | None = None
    consequences: LongText | SkipJsonSchema[None] = None
    risk_assessment: LongText | SkipJsonSchema[None] = None
    serious_risk: StrictBool | SkipJsonSchema[None] = None
    authority: AuthorityName | None = None
    authority_notified_at: Instant | None = None
    people_notified_at: Instant | None = None
    people_notice_description: Note | None = None
    notification_note: Note | None = None
    measures: LongText | SkipJsonSchema[None] = None
    status: Status | SkipJsonSchema[None] = None

    @field_validator(*NOT_NULL)
    @classmethod
    def not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("may be changed, not removed")
        return value


class PrivacyIncidentPublic(BaseModel):
    id: str
    recorded_at: datetime
    recorded_by: str
    updated_at: datetime
    nature: str
    information_description: str
    circumstances: str
    occurred_from: date
    occurred_until: date | None
    known_at: date
    people_count: int
    people_count_is_estimate: bool
    people_categories: str
    records_count: int | None
    consequences: str
    risk_assessment: str
    serious_risk: bool
    authority: str | None
    authority_notified_at: datetime | None
    people_notified_at: datetime | None
    people_notice_description: str | None
    notification_note: str | None
    measures: str
    status: str


class PrivacyIncidentPage(BaseModel):
    items: list[PrivacyIncidentPublic]
    next_cursor: str | None


def public(incident: PrivacyIncident) -> PrivacyIncidentPublic:
    return PrivacyIncidentPublic(**incident.model_dump())


@contextmanager
def incident_errors() -> Iterator[None]:
    """The handler's refusals: 404, or a 422 naming every field that breaks a rule."""
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Invalid as exc:
        raise HTTPException(
            422, [{"loc": ["body", p.field], "msg": p.message, "type": "value_error"} for p in exc.problems]
        ) from None
    except Refused as exc:
        raise field_error(exc.field, str(exc)) from None


router = APIRouter()  # included in api.dashboard_router, with the other ops routes (tag "ops")


@router.post("/privacy-incidents", status_code=201, response_model=PrivacyIncidentPublic)
@body_limit(MAX_BODY)
async def record_incident(user: OpsUser, body: PrivacyIncidentBody, deps: CommandDeps) -> PrivacyIncidentPublic:
    """Record a confidentiality incident in the register (Québec's register of confidentiality incidents, the
    CNIL's register of breaches); recorded in the ops log."""
    with incident_errors():
        incident = await handle(RecordPrivacyIncident(PrivacyIncidentFacts(**body.model_dump()), user.id), deps)
    return public(incident)


@router.get("/privacy-incidents", response_model=PrivacyIncidentPage)
def list_incidents(
    user: OpsUser,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> PrivacyIncidentPage:
    """The register, newest first."""
    with runtime.db.read() as session:
        rows, next_cursor = views.find_privacy_incidents(session, limit=limit, cursor=cursor)
    return PrivacyIncidentPage(items=[public(r) for r in rows], next_cursor=next_cursor)


@router.get(
    "/privacy-incidents.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "The register as CSV"}},
)
async def incidents_csv_export(
    user: OpsUser, runtime: RuntimeDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    """The whole register as a spreadsheet: one row per incident, French headers naming the register (Québec, CNIL)
    each column answers; `;`-separated, UTF-8 with a BOM."""
    return await anyio.to_thread.run_sync(incidents_csv.export, runtime.db, directory.timezone, clock())


@router.get("/privacy-incidents/{incident_id}", response_model=PrivacyIncidentPublic)
def get_incident(incident_id: str, user: OpsUser, runtime: RuntimeDep) -> PrivacyIncidentPublic:
    with runtime.db.read() as session:
        incident = session.get(PrivacyIncident, incident_id)
    if incident is None:
        raise HTTPException(404, "no such privacy incident")
    return public(incident)


@router.patch("/privacy-incidents/{incident_id}", response_model=PrivacyIncidentPublic)
@body_limit(MAX_BODY)
async def update_incident(
    incident_id: str, user: OpsUser, body: PrivacyIncidentChanges, deps: CommandDeps
) -> PrivacyIncidentPublic:
    """Change some fields of an incident (e.g. the notifications' dates, the measures, `status: closed`); the
    incident is checked as a whole again; recorded in the ops log with the names of the fields changed."""
    changes = body.model_dump(include=body.model_fields_set)
    with incident_errors():
        incident = await handle(UpdatePrivacyIncident(incident_id, changes, user.id), deps)
    return public(incident)
