"""Referral's HTTP API (contract: /api/v1/referrals): parse and authorise the request, run its one command
(handlers.py) or read through views.py, answer. No SQL, no emit, no ops log row here."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Body, HTTPException, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.referral import domain, incidents_api, views
from services.referral.commands import (
    AcceptReferral,
    AssignNeed,
    CancelReferral,
    CloseReferral,
    DeclineReferral,
    EscalateReferral,
    PausePartner,
    ReassignReferral,
    ReplayDeadLetters,
    RespondToReferral,
    ResumePartner,
)
from services.referral.dashboard import Dashboard, build_dashboard
from services.referral.deps import (
    ClockDep,
    CommandDeps,
    DeskOrOpsUser,
    DirectoryDep,
    OpsUser,
    PartnerUser,
    ReaderUser,
    Runtime,
    RuntimeDep,
)
from services.referral.handlers import Deps, NotFound, NotPaused, NotStranded, ReferralState, Refused, handle
from services.referral.store import Referral, ReferralHistory
from shared.directory import Directory, User, normalize_postal_code
from shared.events import STREAMS, DeclineReasonCode
from shared.people import AccessEntry, AccessLogPage, access_entries
from shared.search import MAX_QUERY, Q_DESCRIPTION
from shared.service import Cursor, Service, error_responses, field_error

# The contract's values; a filter outside them is a 422 naming the parameter, not an empty page.
ReferralStatus = Literal["assigned", "accepted", "responded", "closed", "declined", "cancelled"]
SlaState = Literal["on_track", "at_risk", "met", "breached"]


class HistoryEntry(BaseModel):
    at: datetime
    action: str
    actor: str
    detail: str | None


class ReferralPublic(BaseModel):
    id: str
    need_id: str
    reference: str | None = None  # the need's, as intake gave it (CHA-2611-0042); null for needs recorded before it
    partner_id: str
    contact_id: str
    library_id: str
    category: str
    status: str
    respond_by: datetime
    sla: str
    routed_because: str
    created_at: datetime
    # When the need left this referral's partner (declined, reassigned, cancelled); null while the partner has it.
    left_at: datetime | None = None
    # When the person had their data erased at their request (the need's texts and their details are gone).
    person_erased_at: datetime | None = None
    decline_reason: DeclineReasonCode | None = Field(
        None, description="Why the partner declined (status `declined`): the reason code of its decline; else null."
    )
    person_contacted: Literal["yes", "no"] | None = Field(
        None,
        description="The person's answer to « La CAF vous a-t-elle contacté(e) ? », asked once some days after the "
        "partner's first answer: yes, no, or null (not asked yet, or no answer).",
    )
    contact_question_at: datetime | None = Field(None, description="When the person was asked; null: not yet.")
    person_contacted_at: datetime | None = Field(None, description="When the person answered; null: no answer.")
    history: list[HistoryEntry] | None = None


class ReferralPage(BaseModel):
    items: list[ReferralPublic]
    next_cursor: str | None


class RespondBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=4000)


class DeclineBody(BaseModel):
    """Why the partner declines: a `reason_code`, and in `reason` its own words (required with `other`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # domain.decline_problem: a code other than "other", or words in `reason`
            "anyOf": [
                {
                    "properties": {"reason_code": {"enum": [c for c in domain.DECLINE_REASON_CODES if c != "other"]}},
                    "required": ["reason_code"],
                },
                {"properties": {"reason": {"type": "string", "pattern": domain.A_WORD}}, "required": ["reason"]},
            ]
        },
    )
    reason_code: DeclineReasonCode = Field(
        "other",
        description="out_of_scope (hors de nos compétences), out_of_territory (hors de notre territoire), capacity "
        "(capacité atteinte), already_followed (personne déjà suivie chez nous), other (autre: say why in `reason`). "
        "Absent: other, so a decline with `reason` only works as before. The desk sees it and the figures count it.",
    )
    reason: str | None = Field(
        None,
        max_length=2000,
        description="Free text for the desk (e.g. whom to send the person to); required when reason_code is other. "
        "Never name the person: it travels in clear in referral.declined.",
    )


class ReassignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    partner_id: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=2000)
    # A partner outside the need's category only with force: true and a reason (recorded as an override).
    force: bool = False


class AssignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    partner_id: str = Field(min_length=1, max_length=64)
    contact_id: str | None = Field(None, min_length=1, max_length=64)  # the partner's primary contact when absent
    reason: str = Field(min_length=1, max_length=2000)


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class EscalateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    until: AwareDatetime
    reason: str = Field(min_length=1, max_length=2000)


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = None  # dead-letter entry ids; all of the stream when absent
    reason: str = Field(min_length=1, max_length=2000)


class PartnerPublic(BaseModel):
    id: str
    name: str
    categories: list[str]
    territory: list[str]
    capacity: int | None
    open_referrals: int
    paused_until: datetime | None
    pause_reason: str | None


class CloseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcome: str = Field(min_length=1, max_length=2000)


def public(
    referral: Referral,
    history: list[ReferralHistory] | None = None,
    user: User | None = None,
    person_erased_at: datetime | None = None,
    reference: str | None = None,
) -> ReferralPublic:
    left = domain.left_partner(referral.status)
    # The partner the need left keeps its status and date, not the texts of its history (messages, reasons).
    redact = left and user is not None and user.role == "partner"
    return ReferralPublic(
        **referral.model_dump(exclude={"updated_at"}),
        left_at=referral.updated_at if left else None,
        person_erased_at=person_erased_at,
        reference=reference,
        history=None
        if history is None
        else [
            HistoryEntry(**h.model_dump(include={"at", "action", "actor"}), detail=None if redact else h.detail)
            for h in history
        ],
    )


def directory_ids(svc: Service) -> Callable[[dict], None]:
    """An OpenAPI refiner: a reassignment names a partner of the directory (built again on reload)."""

    def refine(document: dict) -> None:
        for name in ("ReassignBody", "AssignBody"):
            body = document["components"]["schemas"][name]
            body["properties"]["partner_id"]["enum"] = [partner.id for partner in svc.directory.partners]
        # The routing preview: a library and a category of the directory, a French or Canadian postal code.
        for parameter in document["paths"]["/api/v1/routing/preview"]["get"]["parameters"]:
            schema = parameter["schema"]
            if parameter["name"] == "library_id":
                schema["enum"] = [library.id for library in svc.directory.libraries]
            elif parameter["name"] == "category":
                schema["enum"] = [category.id for category in svc.directory.categories]
            elif parameter["name"] == "postal_code":
                schema["anyOf"][0]["pattern"] = POSTAL_CODE_PATTERN

    return refine


@contextmanager
def command_errors() -> Iterator[None]:
    """A handler's refusals as HTTP answers: 404 not found, 422 naming the field, 409 not from this state."""
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except Refused as exc:
        raise field_error(exc.field, str(exc)) from None
    except (domain.TransitionRefused, NotPaused, NotStranded) as exc:
        raise HTTPException(409, str(exc)) from None


def as_partner(user: User) -> str | None:
    """The partner a user acts for: a partner sees its own referrals only, ops see all."""
    return user.partner if user.role == "partner" else None


router = APIRouter(tags=["referrals"])


@router.get("/referrals", response_model=ReferralPage)
def list_referrals(
    user: ReaderUser,
    runtime: RuntimeDep,
    need_id: str | None = None,
    partner_id: str | None = None,
    status: ReferralStatus | None = None,
    sla: SlaState | None = None,
    library_id: str | None = None,
    q: Annotated[str | None, Query(max_length=MAX_QUERY, description=Q_DESCRIPTION)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> ReferralPage:
    """A page of referrals the caller may see, newest first: a partner's own, or (ops) every one, filtered. `q`
    searches their needs; a partner finds a need that left it by its reference only."""
    rows: list[Referral]
    with runtime.db.read() as session:
        if user.role == "partner" and partner_id and partner_id != user.partner:
            rows, next_cursor = [], None  # another partner's: nothing, as before
        else:
            rows, next_cursor = views.find_referrals(
                session,
                limit=limit,
                cursor=cursor,
                partner_id=as_partner(user) or partner_id,
                need_id=need_id,
                status=status,
                sla=sla,
                library_id=library_id,
                q=q,
                only_open_cases=user.role == "partner",
            )
        need_ids = [r.need_id for r in rows]
        erased, references = views.person_erased_at(session, need_ids), views.references(session, need_ids)
        return ReferralPage(
            items=[
                public(r, user=user, person_erased_at=erased.get(r.need_id), reference=references.get(r.need_id))
                for r in rows
            ],
            next_cursor=next_cursor,
        )


@router.get("/referrals/{referral_id}", response_model=ReferralPublic)
def get_referral(referral_id: str, user: ReaderUser, runtime: RuntimeDep) -> ReferralPublic:
    with runtime.db.read() as session:
        found = views.referral_with_case(session, referral_id)
    if found is None or as_partner(user) not in (None, found[0].partner_id):
        raise HTTPException(404, "no such referral")
    return public(found[0], found[2], user, found[1].person_erased_at, found[1].reference)


async def run(command: object, deps: Deps) -> ReferralState:
    with command_errors():
        return await handle(command, deps)


@router.post("/referrals/{referral_id}/accept", response_model=ReferralPublic, responses=error_responses(409))
async def accept(referral_id: str, user: PartnerUser, deps: CommandDeps) -> ReferralPublic:
    done = await run(AcceptReferral(referral_id, user.id, as_partner(user)), deps)
    return public(done.referral, done.history, user, reference=done.reference)


@router.post("/referrals/{referral_id}/respond", response_model=ReferralPublic, responses=error_responses(409))
async def respond(referral_id: str, user: PartnerUser, body: RespondBody, deps: CommandDeps) -> ReferralPublic:
    done = await run(RespondToReferral(referral_id, user.id, as_partner(user), body.message), deps)
    return public(done.referral, done.history, user, reference=done.reference)


@router.post(
    "/referrals/{referral_id}/decline",
    response_model=ReferralPublic,
    responses=error_responses(409),
    summary="Decline a referral, with a reason code",
)
async def decline(referral_id: str, user: PartnerUser, body: DeclineBody, deps: CommandDeps) -> ReferralPublic:
    """The partner declines its referral with a `reason_code` (and its words in `reason`, required for `other`): the
    need goes at once to the next candidate partner, keeping its deadline, or becomes unroutable. The code is kept on
    the referral (`decline_reason`), carried by `referral.declined` to the desk's page and counted in the dashboard's
    figures. 422 names the field to fix (an unknown `reason_code`; `reason` missing with `other`); 409 when the
    referral is no longer assigned or accepted."""
    done = await run(
        DeclineReferral(referral_id, user.id, as_partner(user), (body.reason or "").strip(), body.reason_code), deps
    )
    return public(done.referral, done.history, user, reference=done.reference)


@router.post("/referrals/{referral_id}/close", response_model=ReferralPublic, responses=error_responses(409))
async def close(
    referral_id: str, user: PartnerUser, body: Annotated[CloseBody, Body()], deps: CommandDeps
) -> ReferralPublic:
    done = await run(CloseReferral(referral_id, user.id, as_partner(user), body.outcome), deps)
    return public(done.referral, done.history, user, reference=done.reference)


@router.post("/referrals/{referral_id}/reassign", response_model=ReferralPublic, responses=error_responses(409))
async def reassign(referral_id: str, user: OpsUser, body: ReassignBody, deps: CommandDeps) -> ReferralPublic:
    """Ops hand the need to another partner that takes its category; the old referral is cancelled, the need
    keeps its deadline. `force: true` (with a reason) overrides the category, recorded as an override."""
    done = await run(ReassignReferral(referral_id, body.partner_id, user.id, body.reason, body.force), deps)
    return public(done.referral, done.history, reference=done.reference)


@router.post("/needs/{need_id}/assign", tags=["ops"], response_model=ReferralPublic, responses=error_responses(409))
async def assign(need_id: str, user: OpsUser, body: AssignBody, deps: CommandDeps) -> ReferralPublic:
    """Ops hand a need that no partner holds (unroutable, or declined by every candidate: the dashboard's "Sans
    partenaire") to a partner of their choice, any partner of the directory; `contact_id` one of its contacts (its
    primary contact when absent). The need keeps its `respond_by`; referral.assigned tells intake, the partner and
    the person. 409 when a partner holds the need (use /referrals/{id}/reassign) or it was closed or cancelled."""
    done = await run(AssignNeed(need_id, body.partner_id, user.id, body.reason, body.contact_id), deps)
    return public(done.referral, done.history)


@router.post("/referrals/{referral_id}/cancel", response_model=ReferralPublic, responses=error_responses(409))
async def cancel(referral_id: str, user: OpsUser, body: CancelBody, deps: CommandDeps) -> ReferralPublic:
    done = await run(CancelReferral(referral_id, user.id, body.reason), deps)
    return public(done.referral, done.history, user, reference=done.reference)


@router.post("/referrals/{referral_id}/escalate", response_model=ReferralPublic, responses=error_responses(409))
async def escalate(referral_id: str, user: OpsUser, body: EscalateBody, deps: CommandDeps) -> ReferralPublic:
    """Ops escalate now, before the clock does: the backup contact and the coordinators get the escalation email
    (referral.escalated), `sla` becomes at_risk. 409 when the need is no longer waiting for a first answer or was
    escalated already. (An out-of-office reply to the handoff does the same: docs/inbound-mail.md.)"""
    done = await run(EscalateReferral(referral_id, user.id, body.reason), deps)
    return public(done.referral, done.history, user, reference=done.reference)


# --- before a need is recorded: who would get it ---


class PartnerRef(BaseModel):
    id: str
    name: str


class RoutingPreview(BaseModel):
    partner: PartnerRef | None  # null: no partner takes it there now; the coordination would be told
    respond_by: datetime  # the deadline the need would get if recorded now
    routed_because: str  # why, in French, as the referral would say it


_POSTAL_CODE = re.compile(r"\d{5}|[A-Z]\d[A-Z]\d[A-Z]\d")
# What the preview accepts, as written (spaces anywhere, either case), for the OpenAPI document.
POSTAL_CODE_PATTERN = r"^(|\s*(\d\s*){5}|\s*([A-Za-z]\s*\d\s*){3})$"


@router.get("/routing/preview", tags=["routing"], response_model=RoutingPreview)
def routing_preview(
    user: DeskOrOpsUser,
    runtime: RuntimeDep,
    directory: DirectoryDep,
    clock: ClockDep,
    library_id: Annotated[str, Query(min_length=1, max_length=64)],
    category: Annotated[str, Query(min_length=1, max_length=64)],
    postal_code: Annotated[str | None, Query(max_length=10)] = None,
) -> RoutingPreview:
    """Who would receive a need recorded now at `library_id` for `category` (and `postal_code`, else the library's
    territory), and by when they would have to answer: the routing rule referral applies at recording, on the open
    referrals and pauses of this moment (capacity can change before the need is sent). A front desk asks for its
    own library; ops for any."""
    errors = []  # every failing parameter at once
    if directory.library(library_id) is None or (user.role == "front_desk" and library_id != user.library):
        errors.append(("library_id", "unknown_library", "unknown library, or not yours"))
    if directory.category(category) is None:
        known = ", ".join(c.id for c in directory.categories)
        errors.append(("category", "unknown_category", f"unknown category '{category}'; known: {known}"))
    code = normalize_postal_code(postal_code or "")
    if code and not (code.isascii() and _POSTAL_CODE.fullmatch(code)):
        errors.append(("postal_code", "bad_postal_code", "not a postal code: give 5 digits (France) or A1A 1A1"))
    if errors:
        raise HTTPException(422, [{"loc": ["query", name], "msg": msg, "type": kind} for name, kind, msg in errors])
    with runtime.db.read() as session:
        decision, respond_by = views.routing_preview(
            session, directory, library_id=library_id, category=category, postal_code=code or None, now=clock()
        )
    partner = PartnerRef(id=decision.partner.id, name=decision.partner.name) if decision.partner else None
    return RoutingPreview(partner=partner, respond_by=respond_by, routed_because=decision.reason)


# --- ops: partners and dead letters ---


def partners_now(runtime: Runtime, directory: Directory, now: datetime) -> list[PartnerPublic]:
    with runtime.db.read() as session:
        counts, pauses = views.open_referral_counts(session), views.active_pauses(session, now)
    return [
        PartnerPublic(
            id=p.id,
            name=p.name,
            categories=p.categories,
            territory=p.territory,
            capacity=p.capacity,
            open_referrals=counts.get(p.id, 0),
            paused_until=pauses[p.id].until if p.id in pauses else None,
            pause_reason=pauses[p.id].reason if p.id in pauses else None,
        )
        for p in directory.partners
    ]


@router.get("/partners", tags=["ops"])
def list_partners(user: OpsUser, runtime: RuntimeDep, directory: DirectoryDep, clock: ClockDep) -> dict:
    return {"items": partners_now(runtime, directory, clock()), "next_cursor": None}


@router.post("/partners/{partner_id}/pause", tags=["ops"], response_model=PartnerPublic)
async def pause(
    partner_id: str, user: OpsUser, body: PauseBody, runtime: RuntimeDep, deps: CommandDeps
) -> PartnerPublic:
    """Routing skips the partner until `until`; the referrals it already has stay with it."""
    with command_errors():
        await handle(PausePartner(partner_id, body.until, body.reason, user.id), deps)
    partners = await anyio.to_thread.run_sync(partners_now, runtime, deps.directory, deps.clock())
    return next(p for p in partners if p.id == partner_id)


@router.post(
    "/partners/{partner_id}/resume", tags=["ops"], response_model=PartnerPublic, responses=error_responses(409)
)
async def resume(
    partner_id: str, user: OpsUser, body: ReasonBody, runtime: RuntimeDep, deps: CommandDeps
) -> PartnerPublic:
    with command_errors():
        await handle(ResumePartner(partner_id, body.reason, user.id), deps)
    partners = await anyio.to_thread.run_sync(partners_now, runtime, deps.directory, deps.clock())
    return next(p for p in partners if p.id == partner_id)


def stream_key(runtime: Runtime, stream: str) -> str:
    if stream not in STREAMS:
        raise HTTPException(404, f"no stream '{stream}'; streams: {', '.join(STREAMS)}")
    return runtime.settings.key(stream)


@router.get("/dead-letters/{stream}", tags=["ops"])
async def dead_letters(
    stream: str, user: OpsUser, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> dict:
    letters = await views.dead_letters(runtime.bus.redis, stream_key(runtime, stream), limit=limit)
    return {"items": letters, "next_cursor": None}


@router.post("/dead-letters/{stream}/replay", tags=["ops"])
async def replay_dead_letters(stream: str, user: OpsUser, body: ReplayBody, deps: CommandDeps) -> dict:
    """Put dead-lettered messages back on their stream, after a fix; consumers that did them skip them."""
    with command_errors():
        count = await handle(
            ReplayDeadLetters(stream, tuple(body.ids) if body.ids else None, body.reason, user.id), deps
        )
    return {"replayed": count}


# --- the dashboard's figures ---


dashboard_router = APIRouter(tags=["ops"])


@dashboard_router.get("/dashboard", response_model=Dashboard)
async def dashboard(user: OpsUser, runtime: RuntimeDep) -> Dashboard:
    """Every figure of the ops dashboard (the page /tableau-de-bord shows the same)."""
    return await build_dashboard(runtime, runtime.queue_watch, runtime.figures_reuse)


dashboard_router.include_router(incidents_api.router)  # the register of confidentiality incidents


# --- a person's part (intake assembles the export and the access log) ---


class PersonCase(BaseModel):
    need_id: str
    reference: str | None = None
    library_id: str
    category: str
    summary: str
    postal_code: str | None
    urgency: str
    recorded_at: datetime
    respond_by: datetime | None
    person_erased_at: datetime | None
    person: dict
    referrals: list[ReferralPublic]


class PersonPart(BaseModel):
    service: Literal["referral"] = "referral"
    needs: list[PersonCase]
    access_log: list[AccessEntry]


people_router = APIRouter(tags=["people"])


@people_router.get("/people/{person_id}/export", response_model=PersonPart)
def export_person_part(
    person_id: str,
    user: OpsUser,
    runtime: RuntimeDep,
    need_id: Annotated[list[str], Query(max_length=200)],
) -> PersonPart:
    """What referral holds about the person of these needs (intake knows which are theirs): each need as routed,
    its referrals with their histories (the partners' answers), and who looked at them here."""
    with runtime.db.read() as session:
        needs = []
        for case, referrals in views.person_cases(session, need_id):
            needs.append(
                PersonCase(
                    **case.model_dump(
                        include={
                            "need_id",
                            "reference",
                            "library_id",
                            "category",
                            "summary",
                            "postal_code",
                            "urgency",
                            "recorded_at",
                            "respond_by",
                            "person_erased_at",
                        }
                    ),
                    person={
                        "display_name": case.person_display_name,
                        "email": case.person_email,
                        "phone": case.person_phone,
                        "preferred_channel": case.preferred_channel,
                        "language": case.language,
                    },
                    referrals=[
                        public(r, h, person_erased_at=case.person_erased_at, reference=case.reference)
                        for r, h in referrals
                    ],
                )
            )
        return PersonPart(needs=needs, access_log=access_entries(session, need_id))


@people_router.get("/people/{person_id}/access-log", response_model=AccessLogPage)
def person_access_log(
    person_id: str, user: OpsUser, runtime: RuntimeDep, need_id: Annotated[list[str], Query(max_length=200)]
) -> AccessLogPage:
    """Who read these needs' details on referral's pages, newest first."""
    with runtime.db.read() as session:
        return AccessLogPage(items=access_entries(session, need_id))
