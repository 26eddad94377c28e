"""The ops dashboard's figures, computed by referral (which owns deadlines, partners, routing and the clock):
queues (from Redis) and outbox backlogs, deadlines, partners, the clock, charts; deliveries and reports are read
from notifications' and intake's own JSON APIs with the internal ops credential, never from their databases.
A service that does not answer makes its part `available: false`, never an error of the whole dashboard.

`GET /api/v1/dashboard` (role ops) answers all of it as JSON; the pages in `dashboard_pages.py` show the same
object. See docs/operations.md for what each figure means and what to do when it is red.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo
from typing import Any

import anyio
import httpx
import redis
import sqlalchemy as sa
from fastapi import APIRouter, Depends
from prometheus_client import Gauge
from pydantic import BaseModel
from sqlmodel import Session, select

from services.referral.store import (OPEN_STATUSES, ClockTimer, NeedCase, OpsAction, PartnerPause, Referral,
                                     ReferralHistory, open_referral_counts)
from shared.directory import User
from shared.logs import current_correlation_id
from shared.queues import StreamReport, queues_report
from shared.service import ACTOR_HEADER, Service, internal_token

SLA_STATES = ("on_track", "at_risk", "met", "breached")
WINDOW = timedelta(days=30)  # partners' answer times, breaches, declines
DUE_SOON = timedelta(hours=24)
ANSWERS = ("accept", "respond")  # a partner's first answer stops the clock (domain.CLOCK_STOPPERS)
PARTNER_ACTIONS = ("accept", "respond", "decline", "close")  # what shows a partner is at work
SILENT_AFTER = timedelta(hours=72)  # no action on any referral for this long...
WAITING_AT_LEAST = timedelta(hours=24)  # ...while one has waited for a first answer this long: stopped answering
OVERDUE_TIMER = timedelta(seconds=60)  # a timer still unfired this long after it was due: the clock is stuck
ANSWER_BUCKETS = ((0, 1), (1, 4), (4, 12), (12, 24), (24, 48), (48, 72), (72, None))  # hours
REMOTE_TIMEOUT = 3.0  # seconds; past it that part of the dashboard shows as unavailable
BASELINE_AGE = 60.0  # seconds: pending counts are compared with a snapshot at least this old
LIST_LIMIT = 50


# --- the shape of the answer ----------------------------------------------------------------------


class ConsumerFigures(BaseModel):
    name: str
    pending: int
    idle_seconds: float
    live: bool


class GroupFigures(BaseModel):
    name: str  # the consuming service
    pending: int
    lag: int
    oldest_pending_seconds: float | None
    live_consumers: int
    consumers: list[ConsumerFigures]
    stuck: bool
    problems: list[str]  # no_live_consumer | lag | old_pending | pending_growing


class StreamFigures(BaseModel):
    name: str  # needs, referrals, deliveries, access
    key: str  # with the namespace
    length: int
    dead_letters: int
    stuck: bool
    groups: list[GroupFigures]


class OutboxFigures(BaseModel):
    service: str
    available: bool
    backlog: int | None = None
    oldest_age_seconds: float | None = None
    error: str | None = None


class Queues(BaseModel):
    available: bool
    error: str | None = None
    streams: list[StreamFigures] = []
    outboxes: list[OutboxFigures] = []


class ReferralLine(BaseModel):
    id: str
    need_id: str
    partner_id: str
    partner_name: str
    library_id: str
    category: str
    status: str
    sla: str
    respond_by: datetime
    created_at: datetime
    breached_at: datetime | None = None
    url: str  # the referral's page (its history)


class Deadlines(BaseModel):
    open_by_sla: dict[str, int]
    open_total: int
    due_soon: list[ReferralLine]  # waiting for a first answer, due within 24 hours, soonest first
    breaches: list[ReferralLine]  # breached within 30 days, newest first
    breaches_count: int


class DeclineReason(BaseModel):
    reason: str
    count: int


class PartnerFigures(BaseModel):
    id: str
    name: str
    open: int
    capacity: int | None
    paused_until: datetime | None
    pause_reason: str | None
    waiting: int  # assigned, no answer yet
    oldest_waiting_since: datetime | None
    referrals_30d: int
    answered_30d: int
    median_answer_seconds: float | None
    p90_answer_seconds: float | None
    in_time_share: float | None  # answered by the deadline / (answered + unanswered past the deadline)
    declines_30d: int
    decline_reasons: list[DeclineReason]
    last_action_at: datetime | None
    stopped_answering: bool


class ClockFigures(BaseModel):
    fired_24h: int
    lag_p50_seconds: float | None
    lag_p90_seconds: float | None
    lag_max_seconds: float | None
    overdue: int  # unfired timers due more than a minute ago


class ChartBar(BaseModel):
    label: str
    start: datetime | None = None
    count: int


class Charts(BaseModel):
    needs_per_hour: list[ChartBar]  # the last 24 hours, oldest first
    answer_times: list[ChartBar]  # partners' first answers over 30 days


class RecentAction(BaseModel):
    at: datetime
    actor: str
    action: str
    target: str
    reason: str


class Remote(BaseModel):
    """A part read from another service's API: its JSON as it answered, or why it could not be read."""

    available: bool
    error: str | None = None
    data: dict[str, Any] | None = None


class Dashboard(BaseModel):
    generated_at: datetime
    timezone: str
    queues: Queues
    deadlines: Deadlines
    partners: list[PartnerFigures]
    clock: ClockFigures
    charts: Charts
    recent_actions: list[RecentAction]
    deliveries: Remote
    reports: Remote


# --- small arithmetic -----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def bucket_label(low: int, high: int | None) -> str:
    return f"{low}-{high} h" if high is not None else f"≥ {low} h"


# --- figures from referral's own database ----------------------------------------------------------


def referral_line(referral: Referral, svc: Service, breached_at: datetime | None = None) -> ReferralLine:
    partner = svc.directory.partner(referral.partner_id)
    return ReferralLine(id=referral.id, need_id=referral.need_id, partner_id=referral.partner_id,
                        partner_name=partner.name if partner else referral.partner_id, library_id=referral.library_id,
                        category=referral.category, status=referral.status, sla=referral.sla,
                        respond_by=referral.respond_by, created_at=referral.created_at, breached_at=breached_at,
                        url=f"/boite/{referral.id}")


def deadlines(session: Session, svc: Service, now: datetime) -> Deadlines:
    by_sla = dict(session.exec(select(Referral.sla, sa.func.count()).where(Referral.status.in_(OPEN_STATUSES))
                               .group_by(Referral.sla)).all())
    open_by_sla = {state: by_sla.get(state, 0) for state in SLA_STATES}
    due = session.exec(select(Referral).where(Referral.status == "assigned", Referral.sla.not_in(("met", "breached")),
                                              Referral.respond_by > now, Referral.respond_by <= now + DUE_SOON)
                       .order_by(Referral.respond_by, Referral.id).limit(LIST_LIMIT)).all()
    breach_query = (select(Referral, ReferralHistory.at).join(ReferralHistory, ReferralHistory.referral_id == Referral.id)
                    .where(ReferralHistory.action == "breach", ReferralHistory.at >= now - WINDOW))
    breaches = session.exec(breach_query.order_by(ReferralHistory.at.desc(), Referral.id).limit(LIST_LIMIT)).all()
    count = session.exec(select(sa.func.count()).select_from(breach_query.subquery())).one()
    return Deadlines(open_by_sla=open_by_sla, open_total=sum(open_by_sla.values()),
                     due_soon=[referral_line(r, svc) for r in due],
                     breaches=[referral_line(r, svc, at) for r, at in breaches], breaches_count=count)


def first_answers(session: Session, since: datetime) -> dict[str, datetime]:
    """Referral id -> its partner's first accept or respond, for referrals created since `since`."""
    rows = session.exec(select(ReferralHistory.referral_id, sa.func.min(ReferralHistory.at))
                        .join(Referral, Referral.id == ReferralHistory.referral_id)
                        .where(Referral.created_at >= since, ReferralHistory.action.in_(ANSWERS))
                        .group_by(ReferralHistory.referral_id)).all()
    return {referral_id: _aware(at) for referral_id, at in rows}


def _aware(at: datetime) -> datetime:
    """Aggregates lose the column type on SQLite: put the UTC offset back."""
    from datetime import timezone

    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def partners(session: Session, svc: Service, now: datetime) -> tuple[list[PartnerFigures], list[float]]:
    """Each partner's figures, and every first-answer time of the window (for the distribution chart)."""
    since = now - WINDOW
    open_counts = open_referral_counts(session)
    pauses = {p.partner_id: p for p in session.exec(select(PartnerPause).where(PartnerPause.until > now)).all()}
    waiting = {pid: (n, _aware(oldest)) for pid, n, oldest in session.exec(
        select(Referral.partner_id, sa.func.count(), sa.func.min(Referral.created_at))
        .where(Referral.status == "assigned").group_by(Referral.partner_id)).all()}
    last_action = {pid: _aware(at) for pid, at in session.exec(
        select(Referral.partner_id, sa.func.max(ReferralHistory.at)).join(ReferralHistory, ReferralHistory.referral_id == Referral.id)
        .where(ReferralHistory.action.in_(PARTNER_ACTIONS)).group_by(Referral.partner_id)).all()}
    answered_at = first_answers(session, since)
    recent = session.exec(select(Referral).where(Referral.created_at >= since)).all()
    declines = session.exec(select(Referral.partner_id, ReferralHistory.detail)
                            .join(ReferralHistory, ReferralHistory.referral_id == Referral.id)
                            .where(ReferralHistory.action == "decline", ReferralHistory.at >= since)).all()

    times: dict[str, list[float]] = defaultdict(list)
    in_time: Counter = Counter()
    counted: Counter = Counter()
    received: Counter = Counter()
    for referral in recent:
        received[referral.partner_id] += 1
        first = answered_at.get(referral.id)
        if first is not None:
            times[referral.partner_id].append((first - referral.created_at).total_seconds())
            counted[referral.partner_id] += 1
            in_time[referral.partner_id] += first <= referral.respond_by
        elif referral.respond_by <= now and referral.status not in ("declined", "cancelled"):
            counted[referral.partner_id] += 1  # the deadline passed without an answer
    reasons: dict[str, Counter] = defaultdict(Counter)
    for partner_id, detail in declines:
        reasons[partner_id][(detail or "").split(" : ", 1)[0] or "?"] += 1

    result = []
    for p in svc.directory.partners:
        n_waiting, oldest = waiting.get(p.id, (0, None))
        last = last_action.get(p.id)
        silent = (oldest is not None and oldest <= now - WAITING_AT_LEAST
                  and (last is None or last <= now - SILENT_AFTER))
        pause = pauses.get(p.id)
        result.append(PartnerFigures(
            id=p.id, name=p.name, open=open_counts.get(p.id, 0), capacity=p.capacity,
            paused_until=pause.until if pause else None, pause_reason=pause.reason if pause else None,
            waiting=n_waiting, oldest_waiting_since=oldest, referrals_30d=received[p.id],
            answered_30d=len(times[p.id]), median_answer_seconds=percentile(times[p.id], 50),
            p90_answer_seconds=percentile(times[p.id], 90),
            in_time_share=in_time[p.id] / counted[p.id] if counted[p.id] else None,
            declines_30d=sum(reasons[p.id].values()),
            decline_reasons=[DeclineReason(reason=r, count=n) for r, n in reasons[p.id].most_common()],
            last_action_at=last, stopped_answering=silent))
    return result, [t for values in times.values() for t in values]


def clock(session: Session, now: datetime) -> ClockFigures:
    fired = session.exec(select(ClockTimer.due_at, ClockTimer.fired_at).where(
        ClockTimer.fired_at >= now - timedelta(hours=24), ClockTimer.outcome.in_(("fired", "moot")))).all()
    lags = [max(0.0, (fired_at - due_at).total_seconds()) for due_at, fired_at in fired]
    overdue = session.exec(select(sa.func.count()).select_from(ClockTimer).where(
        ClockTimer.fired_at.is_(None), ClockTimer.due_at < now - OVERDUE_TIMER)).one()
    return ClockFigures(fired_24h=len(lags), lag_p50_seconds=percentile(lags, 50), lag_p90_seconds=percentile(lags, 90),
                        lag_max_seconds=max(lags) if lags else None, overdue=overdue)


def charts(session: Session, now: datetime, answer_times: list[float]) -> Charts:
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    hours = [start + timedelta(hours=i) for i in range(24)]
    per_hour = Counter(_aware(at).replace(minute=0, second=0, microsecond=0) for at in session.exec(
        select(NeedCase.recorded_at).where(NeedCase.recorded_at >= start)).all())
    needs = [ChartBar(label=h.isoformat(), start=h, count=per_hour.get(h, 0)) for h in hours]
    answers = []
    for low, high in ANSWER_BUCKETS:
        count = sum(1 for t in answer_times if t >= low * 3600 and (high is None or t < high * 3600))
        answers.append(ChartBar(label=bucket_label(low, high), count=count))
    return Charts(needs_per_hour=needs, answer_times=answers)


def recent_actions(session: Session, limit: int = 10) -> list[RecentAction]:
    rows = session.exec(select(OpsAction).order_by(OpsAction.at.desc(), OpsAction.id.desc()).limit(limit)).all()
    return [RecentAction(**r.model_dump(include={"at", "actor", "action", "target", "reason"})) for r in rows]


def local_figures(svc: Service, now: datetime) -> dict:
    with svc.db.read() as session:
        partner_figures, answer_times = partners(session, svc, now)
        return dict(deadlines=deadlines(session, svc, now), partners=partner_figures, clock=clock(session, now),
                    charts=charts(session, now, answer_times), recent_actions=recent_actions(session))


# --- queues ---------------------------------------------------------------------------------------


class QueueWatch:
    """Keeps recent queue reports, so a pending count can be compared with one at least a minute old."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[float, dict[str, StreamReport]]] = []

    def baseline(self, now: float) -> dict[str, StreamReport] | None:
        old = [report for at, report in self.snapshots if now - at >= BASELINE_AGE]
        return old[-1] if old else None

    def keep(self, now: float, reports: list[StreamReport]) -> None:
        if not self.snapshots or now - self.snapshots[-1][0] >= BASELINE_AGE / 4:
            self.snapshots.append((now, {r.stream: r for r in reports}))
        self.snapshots = [s for s in self.snapshots if now - s[0] <= 5 * BASELINE_AGE]


def stream_figures(report: StreamReport, namespace: str) -> StreamFigures:
    return StreamFigures(
        name=report.stream.removeprefix(f"{namespace}:"), key=report.stream, length=report.length,
        dead_letters=report.dead_letters, stuck=report.stuck,
        groups=[GroupFigures(
            name=g.name, pending=g.pending, lag=g.lag,
            oldest_pending_seconds=g.oldest_pending_ms / 1000 if g.oldest_pending_ms is not None else None,
            live_consumers=g.live_consumers, stuck=g.stuck, problems=g.problems,
            consumers=[ConsumerFigures(name=c.name, pending=c.pending, idle_seconds=c.idle_ms / 1000, live=c.live)
                       for c in g.consumers]) for g in report.groups])


async def queue_reports(svc: Service) -> list[StreamReport]:
    watch: QueueWatch = svc.queue_watch
    now = time.monotonic()
    reports = await queues_report(svc.bus.redis, svc.settings.namespace, watch.baseline(now))
    watch.keep(now, reports)
    return reports


# --- other services, through their APIs -------------------------------------------------------------


async def remote_json(svc: Service, service: str, path: str, actor: str | None = None,
                      params: dict | None = None) -> Remote:
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


async def outbox_of(svc: Service, service: str) -> OutboxFigures:
    if service == svc.name:
        try:
            state = await anyio.to_thread.run_sync(svc.outbox_state)
        except Exception as exc:  # noqa: BLE001
            return OutboxFigures(service=service, available=False, error=type(exc).__name__)
        return OutboxFigures(service=service, available=True, backlog=state["backlog"],
                             oldest_age_seconds=state["oldest_age_seconds"])
    remote = await remote_json(svc, service, "/ops/outbox")
    if not remote.available:
        return OutboxFigures(service=service, available=False, error=remote.error)
    return OutboxFigures(service=service, available=True, backlog=remote.data.get("backlog"),
                         oldest_age_seconds=remote.data.get("oldest_age_seconds"))


async def queues(svc: Service) -> Queues:
    outboxes = await asyncio.gather(*(outbox_of(svc, s) for s in ("intake", "referral", "notifications")))
    try:
        reports = await queue_reports(svc)
    except redis.RedisError as exc:
        return Queues(available=False, error=f"Redis: {type(exc).__name__}", outboxes=list(outboxes))
    return Queues(available=True, streams=[stream_figures(r, svc.settings.namespace) for r in reports],
                  outboxes=list(outboxes))


# --- all of it --------------------------------------------------------------------------------------


def report_months(now: datetime, timezone: str) -> list[str]:
    """This month and the previous one (YYYY-MM) in the directory's time zone."""
    this = now.astimezone(ZoneInfo(timezone)).date().replace(day=1)
    previous = (this - timedelta(days=1)).replace(day=1)
    return [this.strftime("%Y-%m"), previous.strftime("%Y-%m")]


async def reports(svc: Service, now: datetime) -> Remote:
    """Intake's monthly reports of this month and the previous one: {"months": [intake's answer for each]}."""
    answers = await asyncio.gather(*(remote_json(svc, "intake", "/reports", params={"month": m})
                                     for m in report_months(now, svc.directory.timezone)))
    failed = next((a for a in answers if not a.available), None)
    return failed or Remote(available=True, data={"months": [a.data for a in answers]})


async def build_dashboard(svc: Service) -> Dashboard:
    now = svc.clock()
    local, queue_part, deliveries, monthly = await asyncio.gather(
        anyio.to_thread.run_sync(local_figures, svc, now), queues(svc),
        remote_json(svc, "notifications", "/deliveries/stats"), reports(svc, now))
    return Dashboard(generated_at=now, timezone=svc.directory.timezone, queues=queue_part, deliveries=deliveries,
                     reports=monthly, **local)


def build_router(svc: Service) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/dashboard", response_model=Dashboard)
    async def dashboard(user: User = Depends(svc.require("ops"))) -> Dashboard:
        """Every figure of the ops dashboard (the page /tableau-de-bord shows the same)."""
        return await build_dashboard(svc)

    return router


# --- Prometheus -------------------------------------------------------------------------------------


def register(svc: Service) -> None:
    """The dashboard's state on the service, and the gauges referral adds to /metrics."""
    svc.queue_watch = QueueWatch()
    open_referrals = Gauge("relais_open_referrals", "Open referrals by SLA state", ["sla"], registry=svc.metrics)
    stream_length = Gauge("relais_stream_length", "Entries in the stream", ["stream"], registry=svc.metrics)
    dead_letters = Gauge("relais_stream_dead_letters", "Entries in the stream's dead-letter stream", ["stream"],
                         registry=svc.metrics)
    pending = Gauge("relais_group_pending", "Entries delivered to the group and not yet acknowledged",
                    ["stream", "group"], registry=svc.metrics)
    lag = Gauge("relais_group_lag", "Entries not yet delivered to the group", ["stream", "group"], registry=svc.metrics)
    oldest = Gauge("relais_group_oldest_pending_seconds", "Age of the group's oldest pending entry",
                   ["stream", "group"], registry=svc.metrics)
    live = Gauge("relais_group_live_consumers", "Consumers of the group seen in the last 30 s", ["stream", "group"],
                 registry=svc.metrics)
    overdue = Gauge("relais_overdue_timers", "Timers of the need's clock due more than a minute ago and not fired",
                    registry=svc.metrics)

    def database_figures() -> None:
        with svc.db.read() as session:
            counts = dict(session.exec(select(Referral.sla, sa.func.count()).where(Referral.status.in_(OPEN_STATUSES))
                                       .group_by(Referral.sla)).all())
            overdue.set(session.exec(select(sa.func.count()).select_from(ClockTimer).where(
                ClockTimer.fired_at.is_(None), ClockTimer.due_at < svc.clock() - OVERDUE_TIMER)).one())
        for state in SLA_STATES:
            open_referrals.labels(state).set(counts.get(state, 0))

    async def queue_figures() -> None:
        for report in await queue_reports(svc):
            name = report.stream.removeprefix(f"{svc.settings.namespace}:")
            stream_length.labels(name).set(report.length)
            dead_letters.labels(name).set(report.dead_letters)
            for g in report.groups:
                pending.labels(name, g.name).set(g.pending)
                lag.labels(name, g.name).set(g.lag)
                oldest.labels(name, g.name).set((g.oldest_pending_ms or 0) / 1000)
                live.labels(name, g.name).set(g.live_consumers)

    svc.on_scrape += [database_figures, queue_figures]
