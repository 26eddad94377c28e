"""The retention purge, written once for every service: what is due under the directory's `retention` block, removed
(or anonymised) by a registry of rules each service declares, once across replicas, daily at a quiet hour.

A service's rules are a list of `PurgeRule` in its `store.py` (`PURGE_RULES`); the technical rows every service has
(published outbox rows, processed events) are this module's (`technical_rules`). Adding a rule is one line in that
list. `run_purge` runs them all in one transaction under a lock, or counts them without changing anything
(`dry_run`, for `relais purge --dry-run`). `purge_daily` is the background loop `Service` starts.

The lock is PostgreSQL's `pg_try_advisory_xact_lock`, taken by the purge's own transaction: it lasts exactly as
long as the work, is released by PostgreSQL if the process dies or loses its connection, and lives where the data
is. A Redis `SET NX PX` lease would need a duration guessed in advance (too short: a second replica starts while
the first still deletes; too long: a crashed holder blocks the next day's run) and sits in a Redis that several
deployments may share. On SQLite, `BEGIN IMMEDIATE` already makes writers take turns, so a second run finds nothing
left to do. The rules are idempotent anyway (`WHERE … < cutoff`, anonymised rows are skipped): the lock makes the
report count each row once and keeps replicas from doing the same work twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import sqlalchemy as sa
from sqlmodel import Session, col, select

from shared.db import PROCESSED_EVENT_MARGIN, Database, OutboxMessage, ProcessedEvent
from shared.directory import Directory
from shared.logs import describe_error

log = logging.getLogger("relais.retention")

# What anonymised free text and names become: figures keep the row, nobody can read who or what.
ANONYMISED = "[anonymisé]"
CHUNK = 500  # keys per UPDATE/DELETE … IN (…): well under every driver's limit on bound parameters
PURGE_CHECK_S = 60.0  # the daily loop looks at the clock (and a reloaded directory's purge_at) this often


class Due:
    """The moments before which data is due, from the directory's retention periods, per jurisdiction."""

    def __init__(self, directory: Directory, now: datetime, technical_fallback: timedelta) -> None:
        self.directory, self.now, self.technical_fallback = directory, now, technical_fallback

    def period(self, name: str, jurisdiction: str | None = None) -> timedelta:
        if name == "technical_rows":
            return self.directory.retention.technical_rows or self.technical_fallback
        value = getattr(self.directory.retention.periods(jurisdiction), name)
        assert isinstance(value, timedelta)
        return value

    def cutoff(self, name: str, jurisdiction: str | None = None) -> datetime:
        return self.now - self.period(name, jurisdiction)

    def shortest_cutoff(self, name: str) -> datetime:
        """For rows that do not know their desk: the latest cutoff of every jurisdiction (keep no longer than any)."""
        jurisdictions = [None, *self.directory.libraries_by_jurisdiction()]
        return max(self.cutoff(name, j) for j in jurisdictions)

    def older_than(self, name: str, library: Any, at: Any) -> sa.ColumnElement[bool]:
        """`at < cutoff` with the cutoff of the jurisdiction of the row's desk (`library`, a column); desks no longer
        in the directory get the retention block's own value."""
        by_jurisdiction = self.directory.libraries_by_jurisdiction()
        known = [lib for libs in by_jurisdiction.values() for lib in libs]
        clauses = [sa.and_(library.in_(libs), at < self.cutoff(name, j)) for j, libs in by_jurisdiction.items()]
        clauses.append(sa.and_(library.not_in(known) if known else sa.true(), at < self.cutoff(name)))
        return sa.or_(*clauses)


@dataclass(frozen=True)
class PurgeRule:
    """One kind of row that retention removes or anonymises: `due` lists the keys of the rows due now, `apply`
    anonymises or deletes those (called with at most CHUNK keys at a time)."""

    name: str  # what the report prints: "needs closed, anonymised"
    period: str  # the RetentionPeriods field that says how long (or "technical_rows")
    due: Callable[[Session, Due], Sequence[Any]]
    apply: Callable[[Session, Sequence[Any], datetime], None]


@dataclass(frozen=True)
class RuleResult:
    name: str
    period: str
    count: int


@dataclass(frozen=True)
class PurgeReport:
    service: str
    dry_run: bool
    results: list[RuleResult] = field(default_factory=list)
    skipped: bool = False  # another replica held the lock: it does the work

    @property
    def total(self) -> int:
        return sum(r.count for r in self.results)

    def lines(self) -> list[str]:
        if self.skipped:
            return [f"{self.service}: another process is purging now; nothing done here"]
        verb = "would remove or anonymise" if self.dry_run else "removed or anonymised"
        return [f"{self.service}: {r.name} ({r.period}): {r.count}" for r in self.results] + [
            f"{self.service}: {verb} {self.total} row(s) in all"
        ]


def technical_rules(stream_max_age: timedelta) -> list[PurgeRule]:
    """Every service's technical rows (see shared.db.purge_technical_rows, which the hourly purge runs)."""

    def outbox_due(session: Session, due: Due) -> Sequence[Any]:
        cutoff = due.cutoff("technical_rows")
        return session.exec(
            select(OutboxMessage.id).where(
                col(OutboxMessage.published_at).is_not(None), col(OutboxMessage.published_at) < cutoff
            )
        ).all()

    def outbox_apply(session: Session, ids: Sequence[Any], now: datetime) -> None:
        session.exec(sa.delete(OutboxMessage).where(col(OutboxMessage.id).in_(ids)))

    def processed_due(session: Session, due: Due) -> Sequence[Any]:
        # A processed-event row must outlive every stream copy of its event (PROCESSED_EVENT_MARGIN).
        cutoff = due.now - max(due.period("technical_rows"), stream_max_age + PROCESSED_EVENT_MARGIN)
        rows = session.exec(
            select(ProcessedEvent.consumer, ProcessedEvent.event_id).where(col(ProcessedEvent.processed_at) < cutoff)
        ).all()
        return [tuple(row) for row in rows]

    def processed_apply(session: Session, keys: Sequence[Any], now: datetime) -> None:
        session.exec(
            sa.delete(ProcessedEvent).where(
                sa.tuple_(col(ProcessedEvent.consumer), col(ProcessedEvent.event_id)).in_(list(keys))
            )
        )

    return [
        PurgeRule("published outbox rows, deleted", "technical_rows", outbox_due, outbox_apply),
        PurgeRule("processed-event rows, deleted", "technical_rows", processed_due, processed_apply),
    ]


def _lock(session: Session, service: str) -> bool:
    """True when this transaction may purge (see the module docstring)."""
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite: BEGIN IMMEDIATE holds the write lock for the whole transaction
    return bool(
        session.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"), {"key": f"relais-purge:{service}"}
        ).scalar()
    )


def run_purge(
    db: Database,
    service: str,
    rules: Sequence[PurgeRule],
    directory: Directory,
    now: datetime,
    *,
    technical_fallback: timedelta,
    dry_run: bool = False,
) -> PurgeReport:
    """Apply every rule to what is due at `now`, in one transaction, once across replicas; with `dry_run`, count
    what would go and change nothing."""
    due = Due(directory, now, technical_fallback)
    results = []
    with db.transaction() as session:
        if not _lock(session, service):
            return PurgeReport(service, dry_run, skipped=True)
        for rule in rules:
            keys = list(rule.due(session, due))
            if not dry_run:
                for start in range(0, len(keys), CHUNK):
                    rule.apply(session, keys[start : start + CHUNK], now)
            results.append(RuleResult(rule.name, rule.period, len(keys)))
    return PurgeReport(service, dry_run, results)


def next_purge_at(directory: Directory, now: datetime) -> datetime:
    """The next moment, after `now`, that is the directory's `purge_at` in its time zone (an aware UTC-comparable
    datetime; on a day clocks change, wall-clock time as zoneinfo resolves it)."""
    zone = ZoneInfo(directory.timezone)
    local = now.astimezone(zone)
    at = directory.retention.purge_at
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate


async def purge_daily(
    service: str,
    purge: Callable[[datetime], PurgeReport],
    directory: Callable[[], Directory],
    clock: Callable[[], datetime],
) -> None:
    """Run `purge` once a day at the directory's `purge_at` (each replica tries; the lock lets one work). The clock is
    read every PURGE_CHECK_S: a purge time crossed since the last look is due (a reloaded directory's included)."""
    checked = clock()
    while True:
        await asyncio.sleep(PURGE_CHECK_S)
        now = clock()
        crossed = next_purge_at(directory(), checked) <= now
        checked = now
        if not crossed:
            continue
        try:
            report = await anyio.to_thread.run_sync(purge, now)
        except Exception as exc:  # noqa: BLE001 - tried again tomorrow; ops see the warning
            log.warning("%s: the retention purge failed: %s", service, describe_error(exc))
            continue
        for line in report.lines():
            log.info("retention purge: %s", line)
