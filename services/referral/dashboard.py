"""The ops dashboard's figures, computed by referral (which owns deadlines, partners, routing and the clock):
queues (from Redis) and outbox backlogs, deadlines, partners, the clock, charts; deliveries and reports are read
from notifications' and intake's own JSON APIs with the internal ops credential, never from their databases.
A service that does not answer makes its part `available: false`, never an error of the whole dashboard.

`GET /api/v1/dashboard` (role ops, api.py) answers all of it as JSON; the pages in `dashboard_pages.py` show the
same object. See docs/operations.md for what each figure means and what to do when it is red.
This module is the answer's shape and its arithmetic; the queries are in views.py, the calls to the other services
in remote.py, the Prometheus gauges in metrics.py.
"""

from __future__ import annotations

import asyncio
import logging
import time as monotonic
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import anyio
import redis
import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Session

from services.referral import remote, views
from services.referral.domain import DECLINE_REASON_CODES, DECLINE_WITHOUT_CODE, NO_ANSWER_AFTER, contacted_rate
from services.referral.remote import OutboxFigures, Remote  # parts of the answer
from services.referral.store import PartnerPause, Referral
from shared.directory import Directory
from shared.pages import environment
from shared.queues import StreamReport, queues_report
from shared.settings import SERVICES

if TYPE_CHECKING:  # deps imports this module
    from services.referral.deps import Runtime
    from shared.service import Service  # metrics.py's

log = logging.getLogger("relais.referral.dashboard")
# the template's variables are the module's attributes, unknown to mypy
LABELS: Any = environment(Path(__file__).with_name("templates")).get_template("_decline_reasons.html").module
SLA_STATES = ("on_track", "at_risk", "met", "breached")
WINDOW = timedelta(days=30)  # partners' answer times, breaches, declines
DUE_SOON = timedelta(hours=24)
ANSWERS = ("accept", "respond")  # a partner's first answer stops the clock (domain.CLOCK_STOPPERS)
PARTNER_ACTIONS = ("accept", "respond", "decline", "close")  # what shows a partner is at work
# A partner stopped answering: at least SILENT_ALERTS of its referrals escalated or past their deadline within
# SILENT_WINDOW, and no action of its own (PARTNER_ACTIONS) on any referral since the first of them.
SILENT_WINDOW = timedelta(days=7)
SILENT_ALERTS = 2
ALERTS = ("escalation", "breach")  # the clock's timers that need a person (a reminder goes to the partner only)
OVERDUE_TIMER = timedelta(seconds=60)  # a timer still unfired this long after it was due: the clock is stuck
ANSWER_BUCKETS = ((0, 1), (1, 4), (4, 12), (12, 24), (24, 48), (48, 72), (72, None))  # hours
BASELINE_AGE = 60.0  # seconds: pending counts are compared with a snapshot at least this old
LIST_LIMIT = 50
REUSE_FROM = 5_000  # referrals in the 30-day window: from there the figures are reused (FiguresReuse)
REUSE_FOR = timedelta(seconds=60)
REUSE_STALE = timedelta(minutes=10)


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
    reference: str | None = None  # intake's reference of the need (CHA-2611-0042); None for older needs
    url: str  # the referral's page (its history)
    need_url: str  # the coordination's page of the need (what it is, its referrals, the actions on it)


class AlertLine(ReferralLine):
    """A referral the clock escalated, or whose deadline passed, today."""

    kind: str  # escalation | breach
    at: datetime


class StrandedNeed(BaseModel):
    """A need no partner holds: the dashboard's "Sans partenaire" list, what ops hand over with
    `POST /api/v1/needs/{need_id}/assign`. `cause` is one of domain.STRANDED_CAUSES; names come from the directory."""

    need_id: str
    reference: str | None  # intake's reference of the need; None for older needs
    library_id: str
    library_name: str
    category: str
    category_label: str
    postal_code: str | None
    urgency: str
    recorded_at: datetime
    respond_by: datetime | None
    stranded_since: datetime
    cause: str | None
    reason: str | None  # the routing rule's words when it found nobody
    declined_by: list[str]  # names of the partners that declined it, in that order
    takers: list[str]  # names of the partners that take its category (anywhere)
    assign_url: str  # the dashboard's page to hand it to a partner
    need_url: str  # the coordination's page of the need


class Stranded(BaseModel):
    count: int
    needs: list[StrandedNeed]  # oldest deadline first, at most LIST_LIMIT


class Deadlines(BaseModel):
    open_by_sla: dict[str, int]
    open_total: int
    due_soon: list[ReferralLine]  # waiting for a first answer, due within 24 hours, soonest first
    breaches: list[ReferralLine]  # breached within 30 days, newest first
    breaches_count: int
    today: list[AlertLine]  # escalated or breached since midnight (the directory's time zone), newest first


class DeclineReason(BaseModel):
    code: str  # domain.DECLINE_REASON_CODES
    reason: str  # its French label (templates/_labels.html), as the partner chose it
    count: int


class ContactFigures(BaseModel):
    """ "Contact confirmé par la personne" (issue 16): the people asked, within the window, whether the partner
    contacted them. A question unanswered after domain.NO_ANSWER_AFTER counts as "no answer"; a younger one as none."""

    asked: int = 0
    yes: int = 0
    no: int = 0
    no_answer: int = 0
    confirmed_share: float | None = None  # yes / (yes + no + no_answer)


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
    alerts_7d: int  # its referrals escalated or past their deadline within 7 days
    stopped_answering: bool  # SILENT_ALERTS of those or more, and no action of its own since the first of them
    silent_since: datetime | None  # that first escalation or breach, when it stopped answering
    contact: ContactFigures = ContactFigures()  # the people asked within 30 days whether it contacted them


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


class Dashboard(BaseModel):
    """`figures_pending`: the figures read from referral's database (every field that may be null here) are being
    computed in the background (FiguresReuse, a large window): they are null until then; the queues, outboxes,
    deliveries and reports are there."""

    generated_at: datetime  # when the database figures were computed (maybe a minute ago); pending: now
    timezone: str
    figures_pending: bool = False
    queues: Queues
    deliveries: Remote
    reports: Remote
    stranded: Stranded | None = None
    deadlines: Deadlines | None = None
    partners: list[PartnerFigures] | None = None
    clock: ClockFigures | None = None
    charts: Charts | None = None
    recent_actions: list[RecentAction] | None = None
    declines_by_reason: list[DeclineReason] | None = None  # every partner's declines of the last 30 days, most first
    person_contacted: ContactFigures | None = None  # every partner's, over the same 30 days


# --- small arithmetic -----------------------------------------------------------------------------


def bucket_label(low: int, high: int | None) -> str:
    return f"{low}-{high} h" if high is not None else f"≥ {low} h"


# --- figures from referral's own database (queries in views.py; the arithmetic here) -----------------------


def referral_line(
    referral: Referral,
    directory: Directory,
    references: dict[str, str],
    breached_at: datetime | None = None,
) -> ReferralLine:
    return ReferralLine(**line_fields(referral, directory, references), breached_at=breached_at)


def need_url(need_id: str) -> str:
    return f"/tableau-de-bord/demandes/{need_id}"


def line_fields(referral: Referral, directory: Directory, references: dict[str, str]) -> dict:
    partner = directory.partner(referral.partner_id)
    return dict(
        id=referral.id,
        need_id=referral.need_id,
        partner_id=referral.partner_id,
        partner_name=partner.name if partner else referral.partner_id,
        library_id=referral.library_id,
        category=referral.category,
        status=referral.status,
        sla=referral.sla,
        respond_by=referral.respond_by,
        created_at=referral.created_at,
        reference=references.get(referral.need_id),
        url=f"/boite/{referral.id}",
        need_url=need_url(referral.need_id),
    )


def stranded(session: Session, directory: Directory) -> Stranded:
    rows, count = views.stranded_needs(session, LIST_LIMIT)

    def name_of(partner_id: str) -> str:
        partner = directory.partner(partner_id)
        return partner.name if partner else partner_id

    needs = []
    for case, declined in rows:
        library, category = directory.library(case.library_id), directory.category(case.category)
        assert case.stranded_since is not None  # the query's condition
        needs.append(
            StrandedNeed(
                need_id=case.need_id,
                reference=case.reference,
                library_id=case.library_id,
                library_name=library.name if library else case.library_id,
                category=case.category,
                category_label=category.label if category else case.category,
                postal_code=case.postal_code,
                urgency=case.urgency,
                recorded_at=case.recorded_at,
                respond_by=case.respond_by,
                stranded_since=case.stranded_since,
                cause=case.stranded_cause,
                reason=case.stranded_reason,
                declined_by=[name_of(p) for p in declined],
                takers=[p.name for p in directory.partners if case.category in p.categories],
                assign_url=f"/tableau-de-bord/confirmer/confier?demande={case.need_id}",
                need_url=need_url(case.need_id),
            )
        )
    return Stranded(count=count, needs=needs)


def start_of_day(now: datetime, timezone: str) -> datetime:
    """Midnight of `now`'s day in the directory's time zone."""
    zone = ZoneInfo(timezone)
    return datetime.combine(now.astimezone(zone).date(), time(0), zone)


def deadlines(session: Session, directory: Directory, now: datetime) -> Deadlines:
    by_sla = views.open_by_sla(session)
    open_by_sla = {state: by_sla.get(state, 0) for state in SLA_STATES}
    due = views.due_soon(session, now, now + DUE_SOON, LIST_LIMIT)
    breaches, count = views.breaches_since(session, now - WINDOW, LIST_LIMIT)
    midnight = start_of_day(now, directory.timezone)
    today = views.alerts_since(session, midnight, ALERTS, LIST_LIMIT)
    references = views.references(
        session, list({r.need_id for r in due} | {r.need_id for r, _ in breaches} | {r.need_id for r, _, _ in today})
    )
    return Deadlines(
        open_by_sla=open_by_sla,
        open_total=sum(open_by_sla.values()),
        due_soon=[referral_line(r, directory, references) for r in due],
        breaches=[referral_line(r, directory, references, at) for r, at in breaches],
        breaches_count=count,
        today=[AlertLine(**line_fields(r, directory, references), kind=kind, at=at) for r, kind, at in today],
    )


def partners(
    session: Session, directory: Directory, now: datetime
) -> tuple[list[PartnerFigures], dict[str, views.PartnerWindow]]:
    """Each partner's figures, counted by the database (a month may hold a million referrals), and every partner's
    window as counted (the charts' answer times, the window's size)."""
    since = now - WINDOW
    windows = views.partner_windows(session, since, now, ANSWERS, ANSWER_BUCKETS)
    figures = partner_figures(
        directory.partners,
        now,
        open_counts=views.open_referral_counts(session),
        pauses=views.active_pauses(session, now),
        waiting=views.waiting_by_partner(session),
        last_action=views.last_action_by_partner(session, PARTNER_ACTIONS),
        windows=windows,
        declines=views.decline_counts_since(session, since),
        alerts=views.alert_counts_since(session, now - SILENT_WINDOW, ALERTS),
        contacts=views.contact_counts_since(session, since, now - NO_ANSWER_AFTER),
    )
    return figures, windows


def partner_figures(
    directory_partners: list,
    now: datetime,
    *,
    open_counts: dict[str, int],
    pauses: dict[str, PartnerPause],
    waiting: dict[str, tuple[int, datetime]],
    last_action: dict[str, datetime],
    windows: dict[str, views.PartnerWindow],
    declines: dict[str, dict[str | None, int]],
    alerts: dict[str, tuple[int, datetime]],
    contacts: dict[str, views.ContactCounts],
) -> list[PartnerFigures]:
    """The partners' figures from what the queries counted (no I/O). `alerts`: per partner, how many of its referrals
    escalated or breached within SILENT_WINDOW and the first of those alerts."""
    result = []
    nothing = views.PartnerWindow(0, 0, 0, 0, None, None, ())
    for p in directory_partners:
        n_waiting, oldest = waiting.get(p.id, (0, None))
        last = last_action.get(p.id)
        alerted, since_first = alerts.get(p.id, (0, None))
        silent = alerted >= SILENT_ALERTS and since_first is not None and (last is None or last < since_first)
        pause = pauses.get(p.id)
        window = windows.get(p.id, nothing)
        reasons: Counter = Counter()
        for code, n in declines.get(p.id, {}).items():
            reasons[code or DECLINE_WITHOUT_CODE] += n
        result.append(
            PartnerFigures(
                id=p.id,
                name=p.name,
                open=open_counts.get(p.id, 0),
                capacity=p.capacity,
                paused_until=pause.until if pause else None,
                pause_reason=pause.reason if pause else None,
                waiting=n_waiting,
                oldest_waiting_since=oldest,
                referrals_30d=window.received,
                answered_30d=window.answered,
                median_answer_seconds=window.median_seconds,
                p90_answer_seconds=window.p90_seconds,
                in_time_share=window.in_time / window.counted if window.counted else None,
                declines_30d=sum(reasons.values()),
                decline_reasons=decline_reasons(reasons),
                last_action_at=last,
                alerts_7d=alerted,
                stopped_answering=silent,
                silent_since=since_first if silent else None,
                contact=contact_figures(contacts.get(p.id)),
            )
        )
    return result


def contact_figures(counts: views.ContactCounts | None) -> ContactFigures:
    """The people's answers to "were you contacted?", as counted."""
    asked, yes, no, no_answer = counts or (0, 0, 0, 0)
    return ContactFigures(
        asked=asked, yes=yes, no=no, no_answer=no_answer, confirmed_share=contacted_rate(yes, no, no_answer)
    )


def total_contact(figures: Sequence[ContactFigures]) -> ContactFigures:
    yes, no, no_answer = (sum(getattr(f, name) for f in figures) for name in ("yes", "no", "no_answer"))
    return ContactFigures(
        asked=sum(f.asked for f in figures),
        yes=yes,
        no=no,
        no_answer=no_answer,
        confirmed_share=contacted_rate(yes, no, no_answer),
    )


def decline_reasons(counts: Counter) -> list[DeclineReason]:
    """Declines by reason code, most first (ties in the codes' order), each with its French label."""
    order = {code: i for i, code in enumerate(DECLINE_REASON_CODES)}
    return [
        DeclineReason(code=code, reason=LABELS.DECLINE_REASON.get(code, code), count=n)
        for code, n in sorted(counts.items(), key=lambda item: (-item[1], order.get(item[0], len(order))))
    ]


def clock(session: Session, now: datetime) -> ClockFigures:
    lags = views.timer_lags_since(session, now - timedelta(hours=24))
    return ClockFigures(
        fired_24h=lags.fired,
        lag_p50_seconds=lags.p50_seconds,
        lag_p90_seconds=lags.p90_seconds,
        lag_max_seconds=lags.max_seconds,
        overdue=views.overdue_timers(session, now - OVERDUE_TIMER),
    )


def charts(session: Session, now: datetime, windows: dict[str, views.PartnerWindow]) -> Charts:
    """Needs recorded in each of the last 24 hours; first answers of the window by how long they took (every
    partner's, counted with its window)."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    hours = [start + timedelta(hours=i) for i in range(24)]
    needs = [
        ChartBar(label=h.isoformat(), start=h, count=n)
        for h, n in zip(hours, views.needs_per_hour(session, hours), strict=True)
    ]
    answers = [sum(w.answered_within[i] for w in windows.values()) for i in range(len(ANSWER_BUCKETS))]
    return Charts(
        needs_per_hour=needs,
        answer_times=[ChartBar(label=bucket_label(*b), count=n) for b, n in zip(ANSWER_BUCKETS, answers, strict=True)],
    )


def recent_actions(session: Session, limit: int = 10) -> list[RecentAction]:
    return [
        RecentAction(**r.model_dump(include={"at", "actor", "action", "target", "reason"}))
        for r in views.recent_ops_actions(session, limit)
    ]


def local_figures(svc: Runtime, now: datetime) -> tuple[dict, int]:
    """The figures read from referral's database, and how many referrals of the window they went through."""
    directory = svc.directory
    with svc.db.read() as session:
        if not svc.db.is_sqlite:  # one core for these counts, done in the background: the pages keep the other
            session.execute(sa.text("SET LOCAL max_parallel_workers_per_gather = 0"))
        partner_figures_, windows = partners(session, directory, now)
        all_declines: Counter = Counter()
        for p in partner_figures_:
            all_declines.update({r.code: r.count for r in p.decline_reasons})
        return dict(
            declines_by_reason=decline_reasons(all_declines),
            person_contacted=total_contact([p.contact for p in partner_figures_]),
            stranded=stranded(session, directory),
            deadlines=deadlines(session, directory, now),
            partners=partner_figures_,
            clock=clock(session, now),
            charts=charts(session, now, windows),
            recent_actions=recent_actions(session),
        ), sum(window.received for window in windows.values())


class FiguresReuse:
    """The database figures of a dashboard whose 30-day window holds `reuse_from` (REUSE_FROM) referrals or more:
    they then take seconds to compute (about 25 s for a million), so no request waits for them. Such a window is
    found at start (`start`, a background task counting the window up to `reuse_from`, which then computes the
    figures) or by the first request; from then on the figures are computed in the background, one computation at a
    time, and a request that finds none yet answers without them (`figures` returns None: the pages say they are
    being computed, the JSON says `figures_pending`). The last ones are shown, with their time, while younger than
    REUSE_FOR or ten times what computing them took (so refreshing costs at most a tenth of a core, however many
    watch), and, older, up to REUSE_STALE more while fresh ones are computed behind. An ops action from the dashboard
    forgets them (`forget`), so no page shows figures from before it. Smaller windows (and the tests) are computed on
    every request, as before."""

    def __init__(self, reuse_from: int | None = None) -> None:
        self.reuse_from = REUSE_FROM if reuse_from is None else reuse_from
        self.large: bool | None = None  # the window holds reuse_from referrals or more; None: not counted yet
        self.last: tuple[float, float, datetime, dict] | None = None  # (monotonic when, fresh for (s), now, figures)
        self.forgotten = 0  # how many times the figures were forgotten: a computation started before is not kept
        self.refresh: asyncio.Task | None = None

    def forget(self) -> None:
        self.last = None
        self.forgotten += 1

    async def start(self, svc: Runtime) -> None:
        """At start (a background task of the service): a large window's figures are computed before anyone asks."""
        try:
            if await self.window_is_large(svc, svc.clock()):
                self.compute_behind_soon(svc, svc.clock())
                if self.refresh is not None:
                    await self.refresh  # a stopping service cancels it with this task
        except Exception:  # noqa: BLE001 - the first request counts the window again
            log.exception("counting the dashboard's window at start failed")

    async def window_is_large(self, svc: Runtime, now: datetime) -> bool:
        if self.large is None:
            self.large = await anyio.to_thread.run_sync(window_holds, svc, now - WINDOW, self.reuse_from)
        return self.large

    async def figures(self, svc: Runtime, now: datetime) -> tuple[datetime, dict] | None:
        """The database figures and when they were computed; None while a large window's are being computed."""
        if (last := self.last) is not None:
            started, fresh_for, computed_at, figures = last
            age = monotonic.monotonic() - started
            if age >= fresh_for and age < fresh_for + REUSE_STALE.total_seconds():
                self.compute_behind_soon(svc, now)
            if age < fresh_for + REUSE_STALE.total_seconds():
                return computed_at, figures
        if await self.window_is_large(svc, now):
            self.compute_behind_soon(svc, now)
            return None
        return await self.compute(svc, now)

    def compute_behind_soon(self, svc: Runtime, now: datetime) -> None:
        """Starts computing the figures in the background, unless a computation is already running."""
        if self.refresh is None or self.refresh.done():
            self.refresh = asyncio.create_task(self.compute_behind(svc, now))

    async def compute_behind(self, svc: Runtime, now: datetime) -> None:
        try:
            while True:
                forgotten = self.forgotten
                await self.compute(svc, now, keep_unless_forgotten=forgotten)
                if forgotten == self.forgotten:
                    return
                now = svc.clock()  # an action forgot the figures meanwhile: compute them again, after it
        except Exception:  # noqa: BLE001 - the last figures stay; the next request tries again
            log.exception("computing the dashboard's figures failed")

    async def compute(
        self, svc: Runtime, now: datetime, keep_unless_forgotten: int | None = None
    ) -> tuple[datetime, dict]:
        """Computes the figures in a worker thread; behind (`keep_unless_forgotten` given), a stopping service does
        not wait for it."""
        started = monotonic.monotonic()
        behind = keep_unless_forgotten is not None
        figures, window_size = await anyio.to_thread.run_sync(local_figures, svc, now, abandon_on_cancel=behind)
        took = monotonic.monotonic() - started
        fresh_for = max(REUSE_FOR.total_seconds(), 10 * took)
        self.large = window_size >= self.reuse_from
        if not behind or keep_unless_forgotten == self.forgotten:
            self.last = (started, fresh_for, now, figures) if self.large else None
        if self.large:
            log.info("dashboard figures computed in %.1f s; reused for %.0f s", took, fresh_for)
        return now, figures


def window_holds(svc: Runtime, since: datetime, at_least: int) -> bool:
    with svc.db.read() as session:
        return views.referrals_created_since_count(session, since, at_least) >= at_least


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
        name=report.stream.removeprefix(f"{namespace}:"),
        key=report.stream,
        length=report.length,
        dead_letters=report.dead_letters,
        stuck=report.stuck,
        groups=[
            GroupFigures(
                name=g.name,
                pending=g.pending,
                lag=g.lag,
                oldest_pending_seconds=g.oldest_pending_ms / 1000 if g.oldest_pending_ms is not None else None,
                live_consumers=g.live_consumers,
                stuck=g.stuck,
                problems=g.problems,
                consumers=[
                    ConsumerFigures(name=c.name, pending=c.pending, idle_seconds=c.idle_ms / 1000, live=c.live)
                    for c in g.consumers
                ],
            )
            for g in report.groups
        ],
    )


async def queue_reports(svc: Runtime | Service, watch: QueueWatch) -> list[StreamReport]:
    now = monotonic.monotonic()
    reports = await queues_report(svc.bus.redis_client, svc.settings.namespace, watch.baseline(now))
    watch.keep(now, reports)
    return reports


async def queues(svc: Runtime, watch: QueueWatch) -> Queues:
    outboxes = await asyncio.gather(*(remote.outbox_of(svc, s) for s in SERVICES))
    try:
        reports = await queue_reports(svc, watch)
    except redis.RedisError as exc:
        return Queues(available=False, error=f"Redis: {type(exc).__name__}", outboxes=list(outboxes))
    return Queues(
        available=True, streams=[stream_figures(r, svc.settings.namespace) for r in reports], outboxes=list(outboxes)
    )


# --- all of it --------------------------------------------------------------------------------------


async def build_dashboard(svc: Runtime, watch: QueueWatch, reuse: FiguresReuse) -> Dashboard:
    now = svc.clock()
    database, queue_part, deliveries, monthly = await asyncio.gather(
        reuse.figures(svc, now),
        queues(svc, watch),
        remote.remote_json(svc, "notifications", "/deliveries/stats"),
        remote.reports(svc, now),
    )
    computed_at, local = database if database is not None else (now, {})
    return Dashboard(
        generated_at=computed_at,  # when the database figures were computed (FiguresReuse: maybe a minute ago)
        timezone=svc.directory.timezone,
        figures_pending=database is None,
        queues=queue_part,
        deliveries=deliveries,
        reports=monthly,
        **local,
    )
