"""Databases: one per service, SQLite by default and PostgreSQL in production, plus the two tables every
service has for reliable messaging: the transactional outbox and the processed-event tracking rows; and the two
expressions a figure counted by the database needs on both (`seconds_between`, `percentile_of`)."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from shared.events import STREAM_OF, Event, utcnow
from shared.logs import current_correlation_id

log = logging.getLogger("relais.events")

WAL_SWITCH_SECONDS = 30  # how long a connection tries to put a new SQLite file in WAL mode while another holds it


class UTCDateTime(sa.TypeDecorator):
    """Aware datetimes in, aware UTC datetimes out, on SQLite (which keeps no offset) as on PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):  # noqa: ANN001
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class OutboxMessage(SQLModel, table=True):
    """An event committed with the state change that caused it, waiting for the relay to publish it."""

    __tablename__ = "outbox"
    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=64)
    stream: str = Field(max_length=64)
    type: str = Field(max_length=64)
    payload: str
    created_at: datetime = Field(sa_type=UTCDateTime)
    published_at: datetime | None = Field(default=None, index=True, sa_type=UTCDateTime)


class ProcessedEvent(SQLModel, table=True):
    """Written in the same transaction as a consumer's work, so a second delivery of the event is a no-op."""

    __tablename__ = "processed_event"
    consumer: str = Field(primary_key=True, max_length=64)
    event_id: str = Field(primary_key=True, max_length=64)
    processed_at: datetime = Field(sa_type=UTCDateTime)


def table_of(model: type[SQLModel]) -> sa.Table:
    """The table of a `table=True` model. SQLAlchemy's declarative mapping sets `__table__` when the class is
    created; SQLModel's annotations do not declare it, hence the one ignore."""
    return model.__table__  # type: ignore[attr-defined]


@cache
def _insert_of(model: type[SQLModel]) -> tuple[sa.Insert, tuple[str, ...]]:
    table = table_of(model)
    return sa.insert(table), tuple(table.c.keys())


def insert_new(session: Session, row: SQLModel) -> None:
    """Write a new model object's row now, by one INSERT built once per model, not through the unit of work (building
    the object is cheap; flushing it cost more than the INSERT, docs/benchmarks.md). The object stays out of the
    session: to change the row later in the transaction, read it. Pending ORM changes are flushed first (autoflush),
    so a row it refers to is written before it."""
    insert, columns = _insert_of(type(row))
    session.execute(insert, {column: getattr(row, column) for column in columns})


OUTBOX, PROCESSED = table_of(OutboxMessage), table_of(ProcessedEvent)
MESSAGING_TABLES = (OUTBOX, PROCESSED)


# Fields of events that are the directory's ids, user ids, codes or times, never a person's data: logged with the event.
LOGGED_EVENT_FIELDS = (
    "library_id",
    "partner_id",
    "category",
    "actor",
    "respond_by",
    "reminder_number",
    "reassigned",
    "kind",
    "channel",
    "recipient_role",
)


EMITTED = "relais_emitted"  # in Session.info once `emit` put an event in the session's outbox


def upsert(
    session: Session, table: sa.Table, key: str, row: dict, *, add: str | None = None, returning: str | None = None
) -> sa.Result:
    """INSERT ... ON CONFLICT (key) DO UPDATE in the session's dialect (SQLite and PostgreSQL both have it), executed:
    on a conflict the row's other columns take its values, or only `add` is increased by the row's value of it (a
    counter). One statement, no SELECT first, unlike Session.merge; built once per table and columns, its values
    bound at each call (building it cost more than running it)."""
    shape = (_dialect(session), table, key, tuple(row), add, returning)
    if (statement := _UPSERTS.get(shape)) is None:
        insert = _insert(session, table).values({column: sa.bindparam(column) for column in row})
        if add is not None:
            changes = {add: table.c[add] + insert.excluded[add]}
        else:
            changes = {column: insert.excluded[column] for column in row if column != key}
        statement = insert.on_conflict_do_update(index_elements=[key], set_=changes)
        if returning is not None:
            statement = statement.returning(table.c[returning])
        statement = _UPSERTS.setdefault(shape, statement)
    return session.execute(statement, row)


_UPSERTS: dict[tuple, sa.Insert] = {}  # a few per service: its upserts' shapes


def _insert(session: Session, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with ON CONFLICT clauses, in the session's dialect."""
    return (postgresql.insert if _postgresql(session) else sqlite.insert)(table)


def emit(session: Session, event: Event) -> None:
    """Put an event in the outbox, inside the caller's transaction: it is published only if that commits.
    An event without a correlation id takes the one of the work in hand (the HTTP request or the event consumed)."""
    if event.correlation_id is None and (correlation_id := current_correlation_id()):
        event = event.model_copy(update={"correlation_id": correlation_id})
    # Type and ids only: the payload may hold personal data. The directory's ids and the deadline say where the
    # need goes (what `relais up` shows as one line per step, with the directory's names).
    log.info(
        "emit %s",
        event.type,
        extra={
            "event_type": event.type,
            "event_id": event.event_id,
            "need_id": event.need_id,
            "correlation_id": event.correlation_id,
            **{
                name: value.isoformat() if isinstance(value, datetime) else value
                for name in LOGGED_EVENT_FIELDS
                if (value := getattr(event, name, None)) is not None
            },
        },
    )
    session.info[EMITTED] = True  # Bus.process wakes the relay only after a commit that emitted
    # Core, one INSERT now: the outbox row needs none of the ORM's unit of work, and rows keep the order of emits.
    # One statement for every emit, the row's values bound (building it for each event cost 3/4 of the emit).
    row = {
        "event_id": event.event_id,
        "stream": STREAM_OF[event.type],
        "type": event.type,
        "payload": event.model_dump_json(),
        "created_at": utcnow(),
    }
    session.execute(_OUTBOX_INSERT, row)


def claim_event(session: Session, consumer: str, event_id: str) -> bool:
    """Record that `consumer` processes `event_id` now; False when it already did (a redelivery).

    One INSERT ... ON CONFLICT DO NOTHING, no SELECT first: the row is written with the handler's work, or not at
    all. On PostgreSQL, a replica processing the same event in an open transaction makes this one wait for its end;
    once it committed, this finds the row and says False (rolled back, this one claims the event)."""
    statement = _CLAIMS[_dialect(session)]
    claimed = session.execute(statement, {"consumer": consumer, "event_id": event_id, "processed_at": utcnow()})
    return claimed.first() is not None


_OUTBOX_INSERT = sa.insert(OUTBOX)

# claim_event's statement, built once per dialect (building it again for each entry read alone was a third of the
# claim's cost): its values are bound at each execution.
_CLAIMS = {
    name: dialect.insert(PROCESSED)
    .values({c: sa.bindparam(c) for c in ("consumer", "event_id", "processed_at")})
    .on_conflict_do_nothing()
    .returning(PROCESSED.c.event_id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


def was_processed(session: Session, consumer: str, event_id: str) -> bool:
    """Whether `consumer` committed the processing of `event_id` (a read: it records nothing)."""
    return session.get(ProcessedEvent, (consumer, event_id)) is not None


# A processed-event row makes a redelivery a no-op, so it must outlive every copy of its event still in a stream
# or dead-letter stream (trimmed past stream_max_age): it goes only once older than that, plus a day, too.
PROCESSED_EVENT_MARGIN = timedelta(days=1)


def purge_technical_rows(
    db: Database, now: datetime, retention: timedelta, stream_max_age: timedelta
) -> tuple[int, int]:
    """Delete outbox rows published more than `retention` ago and processed-event rows older than both `retention`
    and the streams' age (see PROCESSED_EVENT_MARGIN); (outbox rows, processed-event rows) deleted.
    Idempotent, so replicas may run it at the same time: a row is deleted by one of them, the others skip it."""
    outbox_cutoff = now - retention
    processed_cutoff = now - max(retention, stream_max_age + PROCESSED_EVENT_MARGIN)
    with db.transaction() as session:
        outbox = session.exec(
            sa.delete(OutboxMessage).where(
                col(OutboxMessage.published_at).is_not(None), col(OutboxMessage.published_at) < outbox_cutoff
            )
        ).rowcount
        processed = session.exec(
            sa.delete(ProcessedEvent).where(col(ProcessedEvent.processed_at) < processed_cutoff)
        ).rowcount
    return outbox, processed


class Database:
    def __init__(self, url: str, tables: Sequence[sa.Table]) -> None:
        self.url = url
        self.tables = [*tables, *MESSAGING_TABLES]
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            _private_sqlite_file(url)
            # hide_parameters: a failing statement's values (a person's address) stay out of errors and logs.
            self.engine = sa.create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True
            )
            _sqlite_pragmas(self.engine, begin="BEGIN IMMEDIATE")
            self.read_engine = sa.create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True
            )
            _sqlite_pragmas(self.read_engine, begin="BEGIN")
            # Writers of this process queue here and are woken at once; SQLite's own busy handler sleeps
            # in steps and left the lock idle between waiters (see docs/benchmarks.md).
            self._write_lock: threading.RLock | None = threading.RLock()
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, hide_parameters=True)
            self.read_engine = self.engine
            self._write_lock = None

    def create_all(self) -> None:
        SQLModel.metadata.create_all(self.engine, tables=self.tables)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction (on SQLite it holds the database's write lock from its first statement)."""
        with self._write_lock or nullcontext():
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite it never waits for writers (WAL snapshot)."""
        with Session(self.read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def outbox_backlog(self) -> int:
        with self.read() as s:
            return s.exec(
                select(sa.func.count()).select_from(OutboxMessage).where(col(OutboxMessage.published_at).is_(None))
            ).one()

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


def _private_sqlite_file(url: str) -> None:
    """Create the database file readable by this user only (SQLite gives its -wal and -shm files the same mode), or
    close one of ours that an older version left open."""
    database = sa.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.exists() and path.parent.is_dir():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # an empty file is an empty SQLite database
    elif path.exists() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


# --- figures computed by the database (the dashboard's: a month may hold a million rows) ----------------------------


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default, PostgreSQL's
    percentile_cont)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _dialect(session: Session) -> str:
    """The session's database: "postgresql" or "sqlite"."""
    return session.get_bind().dialect.name


def _postgresql(session: Session) -> bool:
    return _dialect(session) == "postgresql"


def seconds_between(session: Session, later: Any, earlier: Any) -> sa.ColumnElement[float]:
    """`later - earlier` in seconds, computed by the database (SQLite: `relais_seconds`, registered on each
    connection)."""
    if _postgresql(session):
        return sa.cast(sa.extract("epoch", later - earlier), sa.Float)
    return sa.func.relais_seconds(later, earlier, type_=sa.Float)


def percentile_of(session: Session, value: sa.ColumnElement[float], p: float) -> sa.ColumnElement[float]:
    """The aggregate: the p-th percentile of `value` over a group, as `percentile` computes it (NULLs left out).
    PostgreSQL's percentile_cont; on SQLite `relais_percentile`, registered on each connection."""
    if _postgresql(session):
        return sa.func.percentile_cont(p / 100).within_group(value)
    return sa.func.relais_percentile(value, p, type_=sa.Float)


def _sqlite_seconds(later: str | None, earlier: str | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (_stored_utc(later) - _stored_utc(earlier)).total_seconds()


def _stored_utc(text: str) -> datetime:
    """A datetime as SQLite holds it: UTCDateTime writes UTC without an offset (one with an offset is read so)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class _SqlitePercentile:
    def __init__(self) -> None:
        self.values: list[float] = []
        self.p = 50.0

    def step(self, value: float | None, p: float) -> None:
        self.p = p
        if value is not None:
            self.values.append(value)

    def finalize(self) -> float | None:
        return percentile(self.values, self.p)


def _use_wal(cur: sqlite3.Cursor) -> None:
    """Put the database file in WAL mode, once: the mode is kept in the file, so a connection to a file already in
    WAL only asks. Switching takes the file's exclusive lock, and SQLite's busy handler does not wait for it: a
    second replica starting beside a running one failed with "database is locked" when every connection asked for
    the switch. A switch refused that way is tried again for up to WAL_SWITCH_SECONDS."""
    if cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    deadline = time.monotonic() + WAL_SWITCH_SECONDS
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # an in-memory database stays "memory": asked once, not looped on
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(engine: sa.Engine, begin: str) -> None:
    """WAL, and BEGIN IMMEDIATE for writers: readers never block, and writers queue on the lock instead of
    failing with 'database is locked' when two transactions both try to upgrade a read lock. And the two
    functions PostgreSQL has and SQLite lacks (seconds_between, percentile_of)."""

    @sa_event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None
        dbapi_conn.create_function("relais_seconds", 2, _sqlite_seconds, deterministic=True)
        dbapi_conn.create_aggregate("relais_percentile", 2, _SqlitePercentile)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        _use_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        conn.exec_driver_sql(begin)
