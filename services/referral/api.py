"""Referral's HTTP API (contract: /api/v1/referrals)."""


from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Body, Depends, HTTPException, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlmodel import select

from services.referral import domain
from services.referral.handlers import (ReassignRefused, act, pause_partner, reassign as reassign_referral,
                                       record_ops_action, resume_partner)
from services.referral.store import PartnerPause, Referral, ReferralHistory, history_of, open_referral_counts
from shared.events import DEAD_LETTER_SUFFIX, STREAMS
from shared.messaging import replay
from shared.directory import User
from shared.service import Cursor, Service, error_responses, field_error, page

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
    history: list[HistoryEntry] | None = None


class ReferralPage(BaseModel):
    items: list[ReferralPublic]
    next_cursor: str | None


class RespondBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(min_length=1, max_length=4000)


class DeclineBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class ReassignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    partner_id: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=2000)
    # A partner outside the need's category only with force: true and a reason (recorded as an override).
    force: bool = False


class CancelBody(BaseModel):
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


class DeadLetter(BaseModel):
    id: str
    type: str | None
    event_id: str | None
    need_id: str | None
    group: str | None
    error: str | None
    failed_at: str | None


class CloseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcome: str = Field(min_length=1, max_length=2000)


def public(referral: Referral, history: list[ReferralHistory] | None = None,
           user: User | None = None) -> ReferralPublic:
    left = domain.left_partner(referral.status)
    # The partner the need left keeps its status and date, not the texts of its history (messages, reasons).
    redact = left and user is not None and user.role == "partner"
    return ReferralPublic(
        **referral.model_dump(exclude={"updated_at"}), left_at=referral.updated_at if left else None,
        history=None if history is None else [
            HistoryEntry(**h.model_dump(include={"at", "action", "actor"}), detail=None if redact else h.detail)
            for h in history],
    )


def directory_ids(svc: Service) -> Callable[[dict], None]:
    """An OpenAPI refiner: a reassignment names a partner of the directory (built again on reload)."""

    def refine(document: dict) -> None:
        body = document["components"]["schemas"]["ReassignBody"]
        body["properties"]["partner_id"]["enum"] = [partner.id for partner in svc.directory.partners]

    return refine


def build_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["referrals"])
    svc.openapi_refiners.append(directory_ids(svc))
    Reader = Annotated[User, Depends(svc.require("partner", "ops"))]
    Partner = Annotated[User, Depends(svc.require("partner"))]
    Ops = Annotated[User, Depends(svc.require("ops"))]

    def visible(referral: Referral | None, user: User) -> bool:
        return referral is not None and (user.role == "ops" or referral.partner_id == user.partner)

    @router.get("/referrals", response_model=ReferralPage)
    def list_referrals(user: Reader, need_id: str | None = None, partner_id: str | None = None,
                       status: ReferralStatus | None = None, sla: SlaState | None = None,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: Cursor = None) -> ReferralPage:
        query = select(Referral)
        if user.role == "partner":
            query = query.where(Referral.partner_id == user.partner)
        for column, value in ((Referral.need_id, need_id), (Referral.partner_id, partner_id),
                              (Referral.status, status), (Referral.sla, sla)):
            if value:
                query = query.where(column == value)
        with svc.db.read() as session:
            rows, next_cursor = page(query, Referral.created_at, Referral.id, limit, cursor, session)
            return ReferralPage(items=[public(r, user=user) for r in rows], next_cursor=next_cursor)

    @router.get("/referrals/{referral_id}", response_model=ReferralPublic)
    def get_referral(referral_id: str, user: Reader) -> ReferralPublic:
        with svc.db.read() as session:
            referral = session.get(Referral, referral_id)
            if not visible(referral, user):
                raise HTTPException(404, "no such referral")
            return public(referral, history_of(session, referral_id), user)

    async def run_action(referral_id: str, user: User, action: str, text: str | None = None,
                         partner_id: str | None = None, check: Callable[[], None] = lambda: None) -> ReferralPublic:
        def work() -> ReferralPublic:
            with svc.db.transaction() as session:
                if not visible(session.get(Referral, referral_id), user):
                    raise HTTPException(404, "no such referral")
                check()  # the body's rules, once the referral is known to exist (404 first, as for any id)
                try:
                    referral = act(session, referral_id, action, user.id, svc.clock(), svc.directory, text, partner_id)
                except domain.TransitionRefused as exc:
                    raise HTTPException(409, str(exc)) from None
                return public(referral, history_of(session, referral_id), user)

        result = await anyio.to_thread.run_sync(work)
        svc.bus.relay.wake()
        return result

    @router.post("/referrals/{referral_id}/accept", response_model=ReferralPublic, responses=error_responses(409))
    async def accept(referral_id: str, user: Partner) -> ReferralPublic:
        return await run_action(referral_id, user, "accept")

    @router.post("/referrals/{referral_id}/respond", response_model=ReferralPublic, responses=error_responses(409))
    async def respond(referral_id: str, user: Partner, body: RespondBody) -> ReferralPublic:
        return await run_action(referral_id, user, "respond", body.message)

    @router.post("/referrals/{referral_id}/decline", response_model=ReferralPublic, responses=error_responses(409))
    async def decline(referral_id: str, user: Partner, body: DeclineBody) -> ReferralPublic:
        return await run_action(referral_id, user, "decline", body.reason)

    @router.post("/referrals/{referral_id}/close", response_model=ReferralPublic, responses=error_responses(409))
    async def close(referral_id: str, user: Partner, body: Annotated[CloseBody, Body()]) -> ReferralPublic:
        return await run_action(referral_id, user, "close", body.outcome)

    @router.post("/referrals/{referral_id}/reassign", response_model=ReferralPublic, responses=error_responses(409))
    async def reassign(referral_id: str, user: Ops, body: ReassignBody) -> ReferralPublic:
        """Ops hand the need to another partner that takes its category; the old referral is cancelled, the need
        keeps its deadline. `force: true` (with a reason) overrides the category, recorded as an override."""
        def work() -> ReferralPublic:
            with svc.db.transaction() as session:
                if session.get(Referral, referral_id) is None:
                    raise HTTPException(404, "no such referral")
                try:
                    referral = reassign_referral(session, referral_id, body.partner_id, user.id, body.reason,
                                                 svc.clock(), svc.directory, body.force)
                except ReassignRefused as exc:
                    raise field_error(exc.field, str(exc)) from None
                except domain.TransitionRefused as exc:
                    raise HTTPException(409, str(exc)) from None
                return public(referral, history_of(session, referral_id))

        result = await anyio.to_thread.run_sync(work)
        svc.bus.relay.wake()
        return result

    @router.post("/referrals/{referral_id}/cancel", response_model=ReferralPublic, responses=error_responses(409))
    async def cancel(referral_id: str, user: Ops, body: CancelBody) -> ReferralPublic:
        return await run_action(referral_id, user, "cancel", body.reason)

    # --- ops: partners and dead letters ---

    def partners_now(session) -> list[PartnerPublic]:
        counts = open_referral_counts(session)
        pauses = {p.partner_id: p for p in session.exec(select(PartnerPause)).all() if p.until > svc.clock()}
        return [PartnerPublic(id=p.id, name=p.name, categories=p.categories, territory=p.territory,
                              capacity=p.capacity, open_referrals=counts.get(p.id, 0),
                              paused_until=pauses[p.id].until if p.id in pauses else None,
                              pause_reason=pauses[p.id].reason if p.id in pauses else None)
                for p in svc.directory.partners]

    def known_partner(partner_id: str) -> None:
        if svc.directory.partner(partner_id) is None:
            raise HTTPException(404, "no such partner")

    @router.get("/partners", tags=["ops"])
    def list_partners(user: Ops) -> dict:
        with svc.db.read() as session:
            return {"items": partners_now(session), "next_cursor": None}

    @router.post("/partners/{partner_id}/pause", tags=["ops"], response_model=PartnerPublic)
    def pause(partner_id: str, user: Ops, body: PauseBody) -> PartnerPublic:
        """Routing skips the partner until `until`; the referrals it already has stay with it."""
        known_partner(partner_id)
        if body.until <= svc.clock():
            raise field_error("until", "must be in the future")
        with svc.db.transaction() as session:
            pause_partner(session, partner_id, body.until, body.reason, user.id, svc.clock())
            return next(p for p in partners_now(session) if p.id == partner_id)

    @router.post("/partners/{partner_id}/resume", tags=["ops"], response_model=PartnerPublic,
                 responses=error_responses(409))
    def resume(partner_id: str, user: Ops, body: ReasonBody) -> PartnerPublic:
        known_partner(partner_id)
        with svc.db.transaction() as session:
            if not resume_partner(session, partner_id, body.reason, user.id, svc.clock()):
                raise HTTPException(409, "this partner is not paused")
            return next(p for p in partners_now(session) if p.id == partner_id)

    def stream_key(stream: str) -> str:
        if stream not in STREAMS:
            raise HTTPException(404, f"no stream '{stream}'; streams: {', '.join(STREAMS)}")
        return svc.settings.key(stream)

    @router.get("/dead-letters/{stream}", tags=["ops"])
    async def dead_letters(stream: str, user: Ops, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict:
        entries = await svc.bus.redis.xrevrange(stream_key(stream) + DEAD_LETTER_SUFFIX, count=limit)
        def field(fields, name):
            value = fields.get(name.encode())
            return value.decode(errors="replace") if value is not None else None
        return {"items": [DeadLetter(id=entry_id.decode(), type=field(f, "type"), event_id=field(f, "event_id"),
                                     need_id=field(f, "need_id"), group=field(f, "dlq_group"),
                                     error=field(f, "dlq_error"), failed_at=field(f, "dlq_failed_at"))
                          for entry_id, f in entries], "next_cursor": None}

    @router.post("/dead-letters/{stream}/replay", tags=["ops"])
    async def replay_dead_letters(stream: str, user: Ops, body: ReplayBody) -> dict:
        """Put dead-lettered messages back on their stream, after a fix; consumers that did them skip them."""
        key = stream_key(stream)
        count = await replay(svc.bus.redis, key, body.ids)

        def record() -> None:
            with svc.db.transaction() as session:
                record_ops_action(session, user.id, "replay", f"{stream}:{','.join(body.ids or ['*'])}",
                                  body.reason, svc.clock())

        await anyio.to_thread.run_sync(record)
        return {"replayed": count}

    return router
