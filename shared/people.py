"""What every service keeps and answers about a person, beyond its own tables: who looked at their details (the
access log, one table of the same shape in each service's database), and the marker that replaces what was erased.

A service records a read with `record_access` when a partner or ops user is shown a person's details (a page or an
API answer); intake asks each service for its rows of a person's needs (`GET /api/v1/people/{id}/access-log`) to
show them to ops and to put them in the person's export."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel
from sqlmodel import Field, Session, SQLModel, col, select

from shared.db import UTCDateTime, table_of
from shared.retention import Due, PurgeRule

log = logging.getLogger("relais.access")

# What replaces a name, a free text or a message body once the person asked for their data to be erased. Stored
# data, not an interface text: every service writes the same, so a reader (and a test) knows it at a glance.
ERASED = "[données effacées]"

AccessChannel = Literal["page", "api"]


class AccessLog(SQLModel, table=True):
    """One read of a person's details by a partner or ops user: who, when, which need, where, how."""

    __tablename__ = "access_log"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    need_id: str = Field(index=True, max_length=32)
    user_id: str = Field(max_length=64)  # a directory user, or "link:<partner>" for a handoff email's link
    role: str = Field(max_length=16)  # partner | ops
    service: str = Field(max_length=16)  # intake | referral | notifications
    channel: str = Field(max_length=8)  # page | api
    what: str = Field(max_length=64)  # what was shown: "need", "referral", "delivery", "export"


ACCESS_LOG_TABLE = table_of(AccessLog)


class AccessEntry(BaseModel):
    at: datetime
    need_id: str
    user_id: str
    role: str
    service: str
    channel: str
    what: str


def record_access(
    db, *, at: datetime, need_id: str, user_id: str, role: str, service: str, channel: AccessChannel, what: str
) -> None:
    """Write one access-log row in its own transaction (a thread's work: it blocks on the database). A failure is
    logged, never shown to the reader: the page they asked for is not refused for it."""
    try:
        with db.transaction() as session:
            session.add(
                AccessLog(
                    at=at, need_id=need_id, user_id=user_id, role=role, service=service, channel=channel, what=what
                )
            )
    except Exception:  # noqa: BLE001
        log.exception("%s: the access log could not record a read of need %s", service, need_id)


def access_entries(session: Session, need_ids: Sequence[str]) -> list[AccessEntry]:
    """The reads of these needs, newest first."""
    if not need_ids:
        return []
    rows = session.exec(
        select(AccessLog)
        .where(col(AccessLog.need_id).in_(list(need_ids)))
        .order_by(col(AccessLog.at).desc(), col(AccessLog.id).desc())
    ).all()
    return [AccessEntry(**r.model_dump(exclude={"id"})) for r in rows]


class AccessLogPage(BaseModel):
    items: list[AccessEntry]
    next_cursor: str | None = None


def access_log_rule() -> PurgeRule:
    """The retention rule of the access log, the same in every service: rows older than the directory's
    `access_log` period are deleted. A row does not know its desk: the shortest period of any jurisdiction applies."""

    def due(session: Session, due: Due) -> Sequence[int]:
        rows = session.exec(select(AccessLog.id).where(col(AccessLog.at) < due.shortest_cutoff("access_log"))).all()
        return [row for row in rows if row is not None]

    def apply(session: Session, ids: Sequence[int], now: datetime) -> None:
        session.exec(sa.delete(AccessLog).where(col(AccessLog.id).in_(list(ids))))

    return PurgeRule("access-log rows, deleted", "access_log", due, apply)
