"""Intake's HTTP API (contract: /api/v1/needs): parse and validate the request, authorise the caller, call the one
handler of its command (handlers.py), render the answer. The routes are module-level; what they need comes from
deps.py, so a test can override the clock or the database."""

import hashlib
import json
import logging
import math
from collections.abc import Callable
from datetime import date, datetime
from functools import partial
from typing import Annotated, Any, Literal

import anyio
import redis
from fastapi import APIRouter, Body, Header, HTTPException, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from services.intake import deps, domain, handlers
from services.intake.commands import (
    AddNote,
    CancelNeed,
    CloseNeed,
    ErasePerson,
    NudgePartner,
    RecordNeed,
    RerouteNeed,
    WithdrawMessagesConsent,
)
from services.intake.remote import PartUnavailable, parts_of_person
from services.intake.reports import Reports, csv_response, library_report
from services.intake.views import NeedPublic, PersonPart, need_page, need_with_history, person_part, public
from shared.directory import Directory, User, normalize_email, normalize_phone
from shared.events import PersonContact
from shared.logs import current_correlation_id, describe_error
from shared.openapi import BusyBody
from shared.people import AccessChannel, AccessEntry, AccessLogPage, record_access
from shared.personal_data import PersonalDataError
from shared.search import MAX_QUERY, Q_DESCRIPTION
from shared.service import Cursor, error_responses
from shared.settings import Settings

MAX_SUMMARY = 2000
MAX_NOTE = 2000  # a note for the partner, a closing reason
MAX_IDEMPOTENCY_KEY = 200
MONTH = r"^(19|2[0-9])[0-9]{2}-(0[1-9]|1[0-2])$"  # 1900-01 to 2999-12: year 0 or 9999's next month is no date
NEED_STATUSES = ("recorded", "referred", "accepted", "responded", "closed", "unroutable")


def _coded(code: str, exc: ValueError) -> PydanticCustomError:
    """A validation error whose `type` names the rule, so the web form can word it in French."""
    return PydanticCustomError(code, "{reason}", {"reason": str(exc)})


class PersonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display_name: str | None = Field(None, max_length=120)
    email: str | None = Field(None, max_length=254)
    phone: str | None = Field(None, max_length=40)
    preferred_channel: Literal["email", "sms", "none"] | None = None
    language: Literal["fr", "en"] = "fr"

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        try:
            return normalize_email(v) if v else None
        except ValueError as exc:
            raise _coded("bad_email", exc) from None

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        try:
            return normalize_phone(v) if v else None
        except ValueError as exc:
            raise _coded("bad_phone", exc) from None


class NeedCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    library_id: str = Field(min_length=1, max_length=64)
    category: str = Field(min_length=1, max_length=64)
    summary: str = Field(min_length=1, max_length=MAX_SUMMARY)
    postal_code: str | None = Field(None, max_length=10)
    urgency: Literal["normal", "urgent"] = "normal"
    person: PersonIn = PersonIn()
    consent: bool = Field(strict=True)  # JSON true only: "yes", 1 or "true" is not the person's recorded consent
    # Not in the contract's first body, optional (docs/privacy.md, "Consent"): the purposes the person agreed to, and
    # the version of the directory's consent text the desk showed. Absent: the handoff, plus messages when a channel
    # is chosen (what `consent: true` always meant), under the current text of the library's language.
    consent_purposes: list[Literal["handoff", "messages"]] | None = Field(None, max_length=2)
    consent_version: str | None = Field(None, min_length=1, max_length=64)
    # Not in the contract's body, optional: another need of the same person in this visit (reports count people).
    same_person_as: str | None = Field(None, max_length=32)

    @field_validator("consent")
    @classmethod
    def _consent(cls, v: bool) -> bool:
        if v is not True:
            raise _coded(
                "consent_required",
                ValueError(
                    "consent must be true: record a need only once the person agreed that it and their contact details "
                    "go to a partner"
                ),
            )
        return v

    @field_validator("postal_code")
    @classmethod
    def _postal_code(cls, v: str | None) -> str | None:
        try:
            return domain.normalize_postal_code(v) if v else None
        except ValueError as exc:
            raise _coded("bad_postal_code", exc) from None

    @field_validator("summary")
    @classmethod
    def _summary(cls, v: str) -> str:
        if not v.strip():
            raise _coded("blank", ValueError("summary is empty: say in a few words what the person needs"))
        return v  # kept exactly as typed


class Invalid(Exception):
    """The need breaks rules; `errors` are pydantic-shaped ({"loc", "msg", "type"}), loc inside the body."""

    def __init__(self, errors: list[dict]) -> None:
        super().__init__(errors)
        self.errors = errors


def _error(loc: tuple, code: str, msg: str) -> dict:
    return {"loc": list(loc), "msg": msg, "type": code}


def _not_your_library() -> dict:
    """One answer for a library the directory does not know and for another desk's: ids cannot be probed."""
    return _error(("library_id",), "unknown_library", "unknown library, or not yours")


def rule_errors(data: object, directory: Directory, library: str) -> list[dict]:
    """What the body as sent breaks beyond its shape: a library other than the desk's own (`library`) or unknown, a
    category the directory does not know, a preferred channel without its address. Read from the raw body, so they
    are found even when pydantic refuses other fields."""
    if not isinstance(data, dict):
        return []
    errors = []
    library_id, category = data.get("library_id"), data.get("category")
    if isinstance(library_id, str) and library_id and (library_id != library or directory.library(library_id) is None):
        errors.append(_not_your_library())
    if isinstance(category, str) and category and directory.category(category) is None:
        known = ", ".join(c.id for c in directory.categories)
        errors.append(_error(("category",), "unknown_category", f"unknown category '{category}'; known: {known}"))
    person = data.get("person")
    channel = person.get("preferred_channel") if isinstance(person, dict) else None
    purposes = data.get("consent_purposes")
    if isinstance(purposes, list):
        if "handoff" not in purposes:
            errors.append(
                _error(
                    ("consent_purposes",),
                    "handoff_required",
                    "the handoff to a partner is what a need is for: record a need only when the person agrees to it "
                    '(include "handoff")',
                )
            )
        elif "messages" not in purposes and channel in ("email", "sms"):
            errors.append(
                _error(
                    ("consent_purposes",),
                    "messages_not_agreed",
                    f'preferred_channel is {channel} but the person did not agree to messages: add "messages", or '
                    "set preferred_channel to none",
                )
            )
    version = data.get("consent_version")
    if isinstance(version, str) and version and version not in {t.version for t in directory.consent}:
        known = ", ".join(t.version for t in directory.consent)
        errors.append(
            _error(
                ("consent_version",),
                "unknown_consent_version",
                f"no consent text {version!r} in the directory; known: {known} (the desk shows the last one of its "
                "language)",
            )
        )
    if isinstance(person, dict) and channel in ("email", "sms"):
        field = "email" if channel == "email" else "phone"
        if not person.get(field):  # a bad address is pydantic's to name; a non-empty one normalizes to non-empty
            errors.append(
                _error(
                    ("person", field),
                    "address_needed",
                    f"preferred_channel is {channel}: give the person's {field}, or choose another channel",
                )
            )
    return errors


def validate_need(data: object, directory: Directory, *, library: str) -> NeedCreate:
    """Every rule of a need's body (`data`: the JSON body as sent) for a desk of `library`, in one place for the API
    and the web form. Raises Invalid naming every failing field at once, pydantic's refusals and the directory's
    together (one error a field)."""
    try:
        body, errors = NeedCreate.model_validate(data), []
    except ValidationError as exc:
        body, errors = None, [_error(e["loc"], e["type"], e["msg"]) for e in exc.errors(include_url=False)]
    named = {tuple(e["loc"]) for e in errors}
    errors += [e for e in rule_errors(data, directory, library) if tuple(e["loc"]) not in named]
    if errors:
        raise Invalid(errors)
    assert body is not None  # pydantic refused nothing
    return body


def _schema_inlined(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its `$defs` put in place, to document a body the handler validates itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if str(node.get("$ref", "")).startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[node["$ref"].removeprefix("#/$defs/")], **rest})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _as_checked(schema: dict) -> dict:
    """NeedCreate's schema saying what validate_need checks beyond pydantic's types (for OpenAPI readers and
    Schemathesis): consent is `true`, a summary is not blank, the forms of postal codes, emails and phones (the empty
    string means none), a channel needs its address. The directory's ids are added per deployment (see
    `directory_ids`)."""
    props, person = schema["properties"], schema["properties"]["person"]["properties"]
    props["consent"]["const"] = True
    props["summary"]["pattern"] = r"^[^\x00]*[^\s\x00][^\x00]*$"
    props["postal_code"]["anyOf"][0]["pattern"] = r"^(|\s*(\d\s*){5}|\s*([A-Za-z]\s*\d\s*){3})$"
    props["same_person_as"]["anyOf"][0]["pattern"] = r"^[0-9a-f]{32}$"  # the id of a need of this library
    person["email"]["anyOf"] = [
        {"type": "string", "format": "email", "maxLength": 254},
        {"enum": [""]},
        {"type": "null"},
    ]
    # E.164, or a French or Canadian national number: "phone" is not a JSON Schema format, tools must be taught it.
    person["phone"]["anyOf"] = [
        {"type": "string", "format": "phone", "maxLength": 40},
        {"enum": [""]},
        {"type": "null"},
    ]
    props["consent_purposes"]["anyOf"][0].update(contains={"const": "handoff"})
    # No consent to messages: no channel to send them on (the body's own rule, across two fields).
    schema["allOf"] = [
        {
            "if": {
                "required": ["consent_purposes"],
                "properties": {"consent_purposes": {"type": "array", "not": {"contains": {"const": "messages"}}}},
            },
            "then": {"properties": {"person": {"properties": {"preferred_channel": {"enum": ["none", None]}}}}},
        }
    ]
    schema["properties"]["person"]["allOf"] = [
        {
            "if": {"required": ["preferred_channel"], "properties": {"preferred_channel": {"const": channel}}},
            "then": {"required": [address], "properties": {address: {"type": "string", "minLength": 1}}},
        }
        for channel, address in (("email", "email"), ("sms", "phone"))
    ]
    return schema


NEED_CREATE_SCHEMA = _as_checked(_schema_inlined(NeedCreate))


def directory_ids(runtime) -> Callable[[dict], None]:
    """An OpenAPI refiner: a need's library and category are ids of the directory (built again on reload)."""

    def refine(document: dict) -> None:
        body = document["paths"]["/api/v1/needs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["library_id"]["enum"] = [library.id for library in runtime.directory.libraries]
        body["properties"]["category"]["enum"] = [category.id for category in runtime.directory.categories]
        versions = [text.version for text in runtime.directory.consent]
        body["properties"]["consent_version"]["anyOf"][0]["enum"] = versions

    return refine


def record_command(
    body: NeedCreate, user: User, idempotency_key: str | None, correlation_id: str | None, directory: Directory
) -> RecordNeed:
    """The RecordNeed a validated body asks for (the API's and the desk form's)."""
    person = body.person
    messages = body.consent_purposes is None or "messages" in body.consent_purposes
    guessed = ("email" if person.email else "sms" if person.phone else "none") if messages else "none"
    channel = person.preferred_channel or guessed
    purposes: tuple[str, ...] = ("handoff", "messages") if messages and channel != "none" else ("handoff",)
    if body.consent_purposes is not None:
        purposes = tuple(p for p in ("handoff", "messages") if p in body.consent_purposes)
    library = directory.library(body.library_id)
    shown = directory.consent_text(library.language if library else "fr")
    version = body.consent_version or (shown.version if shown else None)
    contact = PersonContact(
        display_name=person.display_name,
        email=person.email,
        phone=person.phone,
        preferred_channel=channel,
        language=person.language,
    )
    # The consent fields only when sent: a request as it was before they existed keeps its hash (Idempotency-Key).
    sent = body.model_dump(mode="json", exclude={"consent_purposes", "consent_version"} - body.model_fields_set)
    request_hash = hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()
    return RecordNeed(
        library_id=body.library_id,
        category=body.category,
        summary=body.summary,
        postal_code=body.postal_code,
        urgency=body.urgency,
        person=contact,
        recorded_by=user.id,
        consent_purposes=purposes,
        consent_version=version,
        same_person_as=body.same_person_as,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        correlation_id=correlation_id,
    )


def unknown_earlier_need(need_id: str) -> Invalid:
    """RecordNeed's UnknownNeed, as the field error both adapters show."""
    return Invalid([_error(("same_person_as",), "unknown_need", f"no need '{need_id}' recorded at this library")])


class CancelNeedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise _coded("blank", ValueError("the text is empty: write a few words"))
    return v.replace("\r\n", "\n")


class NoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(
        min_length=1,
        max_length=MAX_NOTE,
        description="Information for the partner holding the need (free text about the person's need: it travels "
        "sealed with the person's data key and is shown on the partner's referral page).",
    )

    _text = field_validator("text")(classmethod(lambda cls, v: _not_blank(v)))


class CloseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(
        min_length=1,
        max_length=MAX_NOTE,
        description="Why the need is closed (the person no longer needs help: solved elsewhere, gave up...). Shown to "
        "the partner; travels sealed like a note.",
    )

    _reason = field_validator("reason")(classmethod(lambda cls, v: _not_blank(v)))


class NeedPage(BaseModel):
    items: list[NeedPublic]
    next_cursor: str | None


log = logging.getLogger("relais.intake.api")
router = APIRouter(tags=["needs"])


@router.post("/needs", status_code=201, response_model=NeedPublic, responses=error_responses(409, 429))
async def create_need(
    data: Annotated[dict[str, Any], Body(title="NeedCreate", json_schema_extra=NEED_CREATE_SCHEMA)],
    user: deps.FrontDeskUser,
    runtime: deps.RuntimeDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
    push_back: deps.PushBackDep,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)] = None,
) -> Response:
    # The body (documented as NeedCreate) is validated here, not by FastAPI, so that a 422 names every failing
    # field at once, the directory's refusals with pydantic's (validate_need).
    assert user.library is not None  # a front-desk user's library (the directory requires it)
    if (retry_after := await push_back.retry_after()) is not None:
        return busy(retry_after)
    try:
        body = validate_need(data, runtime.directory, library=user.library)
        cmd = record_command(body, user, idempotency_key, current_correlation_id(), runtime.directory)
        recorded = await anyio.to_thread.run_sync(
            partial(
                handlers.record_need,
                db,
                cmd,
                directory=runtime.directory,
                now=clock(),
                personal_data=runtime.personal_data,
            )
        )
    except redis.RedisError as exc:  # the person's data key could not be stored: nothing was recorded
        log.warning("a need could not be recorded: Redis unavailable past the retries (%s)", describe_error(exc))
        raise HTTPException(
            503,
            "the need could not be recorded now (Redis is unavailable); nothing was recorded: try again in a minute",
            headers={"Retry-After": "60"},
        ) from None
    except handlers.KeyReused:
        raise HTTPException(409, "this Idempotency-Key was already used with another body") from None
    except handlers.UnknownNeed as exc:
        raise HTTPException(422, body_errors(unknown_earlier_need(str(exc)))) from None
    except Invalid as exc:
        raise HTTPException(422, body_errors(exc)) from None
    runtime.bus.relay.wake()
    return Response(recorded.response_body, status_code=201, media_type="application/json")


def busy(retry_after: int) -> Response:
    """429 while the pipeline lags (shared.queues.PushBack): the desk sends the need again a little later."""
    body = BusyBody(
        detail=(
            f"Relais is receiving more needs than it can pass on right now; nothing was recorded: "
            f"send this need again in {retry_after} s"
        ),
        detail_fr=(
            f"Relais reçoit plus de demandes qu'il ne peut en transmettre en ce moment ; rien n'a été enregistré : "
            f"renvoyez cette demande dans {retry_after} s"
        ),
        retry_after_s=retry_after,
    )
    return JSONResponse(body.model_dump(), status_code=429, headers={"Retry-After": str(retry_after)})


def body_errors(invalid: Invalid) -> list[dict]:
    return [{**e, "loc": ["body", *e["loc"]]} for e in invalid.errors]


@router.post("/needs/{need_id}/cancel", response_model=NeedPublic, responses=error_responses(409))
def cancel(
    need_id: str,
    body: CancelNeedBody,
    user: deps.OpsUser,
    runtime: deps.RuntimeDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
) -> NeedPublic:
    """Ops withdraw a need recorded in error: closed at once; referral cancels its referral and stops its clock."""
    try:
        handlers.cancel_need(db, CancelNeed(need_id=need_id, reason=body.reason, actor=user.id), now=clock())
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such need") from None
    except handlers.AlreadyClosed:
        raise HTTPException(409, "this need is closed already; nothing was changed") from None
    runtime.bus.relay.wake()
    with db.read() as session:
        found = need_with_history(session, need_id)
        assert found is not None  # it was just cancelled
        return public(*found)


@router.post("/needs/{need_id}/withdraw-messages-consent", response_model=NeedPublic)
def withdraw_messages_consent(
    need_id: str, user: deps.ReaderUser, runtime: deps.RuntimeDep, db: deps.DatabaseDep, clock: deps.ClockDep
) -> NeedPublic:
    """The person withdraws their consent to messages (email, SMS) about this need; the need and its handoff go on.
    A desk for its own library's needs, or ops. Withdrawing again, or when no consent to messages was given,
    changes nothing and answers the need as it is."""
    library = user.library if user.role == "front_desk" else None
    try:
        changed = handlers.withdraw_messages_consent(
            db, WithdrawMessagesConsent(need_id=need_id, actor=user.id, library=library), now=clock()
        )
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such need") from None
    if changed:
        runtime.bus.relay.wake()
    with db.read() as session:
        found = need_with_history(session, need_id)
        assert found is not None
        return public(*found)


# --- the desk's actions on a need (issue 14, point 8) --------------------------------------------------------


def _desk_library(user: User) -> str | None:
    """The library a caller may act for: a desk's own; None for ops (any)."""
    return user.library if user.role == "front_desk" else None


def refused(exc: domain.Refusal, now: datetime | None = None) -> HTTPException:
    """A desk action the need's state refuses: 409, saying why and, for a nudge, from when (Retry-After too)."""
    headers = None
    if exc.until is not None and now is not None:
        headers = {"Retry-After": str(max(1, math.ceil((exc.until - now).total_seconds())))}
    return HTTPException(409, str(exc), headers=headers)


def _answer(db, need_id: str) -> NeedPublic:
    with db.read() as session:
        found = need_with_history(session, need_id)
        assert found is not None  # it was just acted on
        return public(*found)


def _sealing_failed(exc: Exception) -> HTTPException:
    log.warning("a desk action could not seal its text (%s)", describe_error(exc))
    return HTTPException(
        503,
        "the text could not be sealed now (the person's data key is unavailable); nothing was recorded: try again "
        "in a minute",
        headers={"Retry-After": "60"},
    )


@router.post(
    "/needs/{need_id}/notes",
    status_code=201,
    response_model=NeedPublic,
    responses=error_responses(409, 503),
    summary="Add information for the partner",
)
async def add_note(
    need_id: str,
    body: NoteBody,
    user: deps.ReaderUser,
    runtime: deps.RuntimeDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
) -> NeedPublic:
    """A note for the partner holding the need (status `referred`, `accepted` or `responded`): kept in the need's
    history, shown on the partner's referral page, and the partner's contact is emailed a link to it. The text
    travels sealed (`need.note_added`). A desk for its own library's needs, or ops. 409 when no partner holds the
    need, when it is closed, or when the person's data was erased."""
    cmd = AddNote(need_id=need_id, text=body.text, actor=user.id, library=_desk_library(user))
    run = partial(handlers.add_note, db, cmd, now=clock(), personal_data=runtime.personal_data)
    return await _sealing_action(run, runtime, db, need_id)


async def _sealing_action(
    run: Callable[[], object], runtime: deps.RuntimeDep, db: deps.DatabaseDep, need_id: str
) -> NeedPublic:
    """Run a desk action whose text is sealed with the person's key (a note, a closing reason), map its refusals,
    wake the relay and answer the need."""
    try:
        await anyio.to_thread.run_sync(run)
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such need") from None
    except domain.Refusal as exc:
        raise refused(exc) from None
    except (redis.RedisError, PersonalDataError) as exc:
        raise _sealing_failed(exc) from None
    runtime.bus.relay.wake()
    return await anyio.to_thread.run_sync(_answer, db, need_id)


@router.post(
    "/needs/{need_id}/nudge",
    response_model=NeedPublic,
    responses=error_responses(409),
    summary="Nudge the partner (once per 24 hours)",
)
def nudge(
    need_id: str, user: deps.ReaderUser, runtime: deps.RuntimeDep, db: deps.DatabaseDep, clock: deps.ClockDep
) -> NeedPublic:
    """Ask the partner holding the need, which has not answered yet (status `referred` or `accepted`), for news: its
    contact is emailed (`need.partner_nudged`, then referral's `referral.nudged`). At most once in 24 hours: sooner
    gets 409 saying from when it becomes possible, with `Retry-After` in seconds. A desk for its own library's
    needs, or ops."""
    cmd = NudgePartner(need_id=need_id, actor=user.id, library=_desk_library(user))
    try:
        handlers.nudge_partner(db, cmd, now=clock())
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such need") from None
    except domain.Refusal as exc:
        raise refused(exc, clock()) from None
    runtime.bus.relay.wake()
    return _answer(db, need_id)


@router.post(
    "/needs/{need_id}/close",
    response_model=NeedPublic,
    responses=error_responses(409, 503),
    summary="Close the need (the person no longer needs help)",
)
async def close(
    need_id: str,
    body: CloseBody,
    user: deps.ReaderUser,
    runtime: deps.RuntimeDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
) -> NeedPublic:
    """The person no longer needs help: the need is closed at once (it still counts in the month's figures, unlike
    a cancellation), and referral ends its referral (the partner sees it closed by the desk) and stops its clock
    (`need.closed_by_desk`, the reason sealed). 409 when it is closed already. A desk for its own library's needs,
    or ops."""
    cmd = CloseNeed(need_id=need_id, reason=body.reason, actor=user.id, library=_desk_library(user))
    run = partial(handlers.close_need, db, cmd, now=clock(), personal_data=runtime.personal_data)
    return await _sealing_action(run, runtime, db, need_id)


@router.post(
    "/needs/{need_id}/reroute",
    status_code=202,
    response_model=NeedPublic,
    responses=error_responses(409),
    summary="Route the need again after a decline",
)
def reroute(
    need_id: str, user: deps.ReaderUser, runtime: deps.RuntimeDep, db: deps.DatabaseDep, clock: deps.ClockDep
) -> NeedPublic:
    """A decline left the need with no partner (status `unroutable` after a `referral.declined`): referral routes
    it again, the partners that declined it excluded, keeping its deadline (`need.reroute_requested`). Answers 202:
    the new partner, or `need.unroutable` again, arrives in the need's history within seconds. 409 when no partner
    declined it, when a partner holds it, when it is closed or the person's data was erased."""
    cmd = RerouteNeed(need_id=need_id, actor=user.id, library=_desk_library(user))
    try:
        handlers.reroute_need(db, cmd, now=clock())
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such need") from None
    except domain.Refusal as exc:
        raise refused(exc) from None
    runtime.bus.relay.wake()
    return _answer(db, need_id)


@router.get(
    "/reports",
    response_model=Reports,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
def reports(
    user: deps.ReaderUser,
    directory: deps.DirectoryDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
    month: Annotated[str | None, Query(pattern=MONTH)] = None,
    library_id: str | None = None,
    format: Literal["json", "csv"] = "json",
) -> Reports | Response:
    """People helped, needs recorded, by category, and the share answered in time, per library for a month
    (default: this month in the directory's time zone). A front desk sees its own library. `format=csv`: the
    same as a spreadsheet (French headers, `;`-separated, UTF-8 with a BOM)."""
    now = clock()
    if month:
        wanted = date(int(month[:4]), int(month[5:]), 1)
    else:
        wanted = now.astimezone(directory.zoneinfo).date().replace(day=1)
    libraries = directory.libraries
    if user.role == "front_desk":
        libraries = [lib for lib in libraries if lib.id == user.library]
    if library_id:
        libraries = [lib for lib in libraries if lib.id == library_id]
    items = [library_report(db, lib, wanted, now) for lib in libraries]
    if format == "csv":
        name = library_id if library_id and items else "lieux"
        return csv_response(items, directory, f"relais-{name}-{wanted:%Y-%m}.csv")
    return Reports(month=wanted.strftime("%Y-%m"), items=items)


@router.get("/needs/{need_id}", response_model=NeedPublic)
def get_need(
    need_id: str, user: deps.ReaderUser, session: deps.ReadSessionDep, db: deps.DatabaseDep, clock: deps.ClockDep
) -> NeedPublic:
    found = need_with_history(session, need_id)
    if found is None or (user.role == "front_desk" and found[0].library_id != user.library):
        raise HTTPException(404, "no such need")
    if user.role == "ops":  # the person's details, read by someone other than the desk that recorded them
        record_access(
            db,
            at=clock(),
            need_id=need_id,
            user_id=user.id,
            role=user.role,
            service="intake",
            channel="api",
            what="need",
        )
    return public(*found)


@router.get("/needs", response_model=NeedPage)
def list_needs(
    user: deps.ReaderUser,
    session: deps.ReadSessionDep,
    library_id: str | None = None,
    status: Literal["recorded", "referred", "accepted", "responded", "closed", "unroutable"] | None = None,
    q: Annotated[str | None, Query(max_length=MAX_QUERY, description=Q_DESCRIPTION)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> NeedPage:
    """A page of needs, newest first: a front desk's library's, or (ops) every library's or `library_id`'s."""
    rows, next_cursor = need_page(
        session,
        own_library=user.library if user.role == "front_desk" else None,
        library_id=library_id,
        status=status,
        limit=limit,
        cursor=cursor,
        q=q,
    )
    return NeedPage(items=[public(n) for n in rows], next_cursor=next_cursor)


# --- a person: export, erasure, who looked -----------------------------------------------------------------


class EraseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class ErasureAccepted(BaseModel):
    person_id: str
    need_ids: list[str]
    erased_at: datetime
    erased_by: str
    already_erased: bool  # true: an earlier request erased it; this one changed nothing


def person_in_scope(db, person_id: str, user: User) -> PersonPart | None:
    """Intake's part of the person, when the caller may see them: ops, or a desk of a library where they have a
    need. None otherwise (404, never 403: ids cannot be probed)."""
    with db.read() as session:
        part = person_part(session, person_id)
    if part is None or (user.role == "front_desk" and all(n.library_id != user.library for n in part.needs)):
        return None
    return part


async def person_export(
    settings: Settings, db, part: PersonPart, user: User, now: datetime, channel: AccessChannel
) -> dict[str, Any]:
    """The person's one JSON document: intake's part, referral's and notifications' (each read over its API), and
    every service's access-log rows of their needs, newest first. Raises PartUnavailable when a part cannot be read."""
    need_ids = [n.id for n in part.needs]
    if user.role == "ops":
        for need_id in need_ids:
            await anyio.to_thread.run_sync(
                partial(
                    record_access,
                    db,
                    at=now,
                    need_id=need_id,
                    user_id=user.id,
                    role=user.role,
                    service="intake",
                    channel=channel,
                    what="export",
                )
            )
        with db.read() as session:
            refreshed = person_part(session, part.person_id)
        part = refreshed or part
    others = await parts_of_person(settings, part.person_id, need_ids, "export")
    access = [e.model_dump(mode="json") for e in part.access_log]
    for other in others.values():
        access += other.get("access_log", [])
    access.sort(key=lambda e: e["at"], reverse=True)
    return {
        "format": "relais.person-export.v1",
        "person_id": part.person_id,
        "exported_at": now.isoformat(),
        "exported_by": user.id,
        "person": part.person.model_dump(mode="json"),
        "erasure": part.erasure.model_dump(mode="json") if part.erasure else None,
        "needs": [n.model_dump(mode="json") for n in part.needs],
        "referral": {k: v for k, v in others["referral"].items() if k != "access_log"},
        "notifications": {k: v for k, v in others["notifications"].items() if k != "access_log"},
        "access_log": access,
    }


async def person_access_log(settings: Settings, part: PersonPart) -> list[AccessEntry]:
    """Who looked at the person's details, in every service, newest first (raises PartUnavailable)."""
    others = await parts_of_person(settings, part.person_id, [n.id for n in part.needs], "access-log")
    entries = list(part.access_log)
    for other in others.values():
        entries += [AccessEntry.model_validate(e) for e in other.get("items", [])]
    return sorted(entries, key=lambda e: e.at, reverse=True)


def unavailable(exc: PartUnavailable) -> HTTPException:
    return HTTPException(503, f"the {exc.service} service could not give its part ({exc.why}); nothing was exported")


@router.get("/people/{person_id}/export", tags=["people"], responses=error_responses(503))
async def export_person(
    person_id: str, user: deps.ReaderUser, runtime: deps.RuntimeDep, db: deps.DatabaseDep, clock: deps.ClockDep
) -> dict[str, Any]:
    """Everything Relais holds about the person, in one JSON document: the person, their needs and histories, the
    referrals and the partners' answers, the messages with their text, and who looked at their details. Each
    service gives its own part; if one cannot, the answer is 503 naming it (never a partial export)."""
    part = await anyio.to_thread.run_sync(person_in_scope, db, person_id, user)
    if part is None:
        raise HTTPException(404, "no such person")
    try:
        return await person_export(runtime.settings, db, part, user, clock(), "api")
    except PartUnavailable as exc:
        raise unavailable(exc) from None


@router.get(
    "/people/{person_id}/access-log", tags=["people"], response_model=AccessLogPage, responses=error_responses(503)
)
async def access_log(
    person_id: str, user: deps.OpsUser, runtime: deps.RuntimeDep, db: deps.DatabaseDep
) -> AccessLogPage:
    """Who read the person's details (partners and ops), in every service, newest first."""
    part = await anyio.to_thread.run_sync(person_in_scope, db, person_id, user)
    if part is None:
        raise HTTPException(404, "no such person")
    try:
        return AccessLogPage(items=await person_access_log(runtime.settings, part))
    except PartUnavailable as exc:
        raise unavailable(exc) from None


@router.post("/people/{person_id}/erase", tags=["people"], status_code=202, response_model=ErasureAccepted)
async def erase_person(
    person_id: str,
    body: EraseBody,
    user: deps.ReaderUser,
    runtime: deps.RuntimeDep,
    db: deps.DatabaseDep,
    clock: deps.ClockDep,
) -> ErasureAccepted:
    """Erase the person's data at their request: intake at once, the other services within seconds (person.erased).
    A second request changes nothing and answers the first erasure."""
    if await anyio.to_thread.run_sync(person_in_scope, db, person_id, user) is None:
        raise HTTPException(404, "no such person")
    done = await erase(runtime, db, person_id, body.reason, user, clock())
    return done


async def erase(runtime, db, person_id: str, reason: str, user: User, now: datetime) -> ErasureAccepted:
    """Run ErasePerson (the API's and the desk page's) and wake the relay."""
    cmd = ErasePerson(person_id=person_id, reason=reason, actor=user.id)
    try:
        done = await anyio.to_thread.run_sync(
            partial(handlers.erase_person, db, cmd, now=now, personal_data=runtime.personal_data)
        )
    except handlers.UnknownNeed:
        raise HTTPException(404, "no such person") from None
    except redis.RedisError as exc:  # the person's data key could not be deleted: nothing was erased
        log.warning("an erasure could not be done: Redis unavailable past the retries (%s)", describe_error(exc))
        raise HTTPException(
            503,
            "the erasure could not be done now (Redis is unavailable); nothing was erased: try again in a minute",
            headers={"Retry-After": "60"},
        ) from None
    if done.done_now:
        runtime.bus.relay.wake()
    return ErasureAccepted(
        person_id=person_id,
        need_ids=json.loads(done.erasure.need_ids),
        erased_at=done.erasure.requested_at,
        erased_by=done.erasure.requested_by,
        already_erased=not done.done_now,
    )
