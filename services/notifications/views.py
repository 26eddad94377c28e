"""What notifications shows of its deliveries (the ops API, the outbox pages): reads of the tables and of the messages
the embedded SMTP sink kept, no rule and no write."""

from __future__ import annotations

import threading
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.notifications.store import Delivery, DeliveryAttempt, NeedPerson, NeedReference, SmsSuppression
from shared.search import query_terms
from shared.service import encode_cursor, page


def delivery_page(
    session: Session, filters: dict, limit: int, cursor: str | None, *, q: str | None = None, library_id: str = ""
) -> tuple[list[Delivery], str | None]:
    """The API's page of deliveries, newest first. The contract's kinds; sign-in links (no need, not in the contract)
    only when asked for by kind=sign_in. `q` and `library_id`: searched_deliveries."""
    query = select(Delivery) if filters.get("kind") else select(Delivery).where(Delivery.kind != "sign_in")
    for name, value in filters.items():
        if value:
            query = query.where(getattr(Delivery, name) == value)
    return page(searched_deliveries(query, q, library_id), Delivery.created_at, Delivery.id, limit, cursor, session)


def searched_deliveries(query: Any, q: str | None, library_id: str | None) -> Any:
    """`query` (of deliveries) narrowed to a library's needs and to `q`: every term is in the need's reference or in
    the address the message went to (an email, a phone in E.164, which a phone typed in any form becomes).
    Notifications holds no name and no summary of the person: those are searched in intake and referral."""
    terms = query_terms(q)
    if not terms and not library_id:
        return query
    query = query.outerjoin(NeedReference, col(NeedReference.need_id) == Delivery.need_id)
    if library_id:
        query = query.where(NeedReference.library_id == library_id)
    reference = sa.func.lower(sa.func.coalesce(NeedReference.reference, ""))
    recipient = sa.func.lower(Delivery.recipient)
    for term in terms:
        query = query.where(
            sa.or_(reference.contains(term, autoescape=True), recipient.contains(term, autoescape=True))
        )
    return query


def delivery_with_attempts(session: Session, delivery_id: str) -> tuple[Delivery, list[DeliveryAttempt]] | None:
    d = session.get(Delivery, delivery_id)
    if d is None:
        return None
    attempts = session.exec(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.delivery_id == delivery_id)
        .order_by(col(DeliveryAttempt.number), col(DeliveryAttempt.id))
    ).all()
    return d, list(attempts)


def delivery_counts(session: Session, since: datetime) -> tuple[list[tuple[str, str, str, int]], int, list[Delivery]]:
    """Deliveries created since `since`: (channel, kind, status, count) rows, SMS segments sent through a provider
    (not the outbox: what the operator bills), and the ten latest failures."""
    counted = session.exec(
        select(Delivery.channel, Delivery.kind, Delivery.status, sa.func.count())
        .where(Delivery.created_at >= since)
        .group_by(Delivery.channel, Delivery.kind, Delivery.status)
    ).all()
    segments = session.exec(
        select(sa.func.coalesce(sa.func.sum(Delivery.sms_segments), 0)).where(
            Delivery.created_at >= since,
            Delivery.channel == "sms",
            col(Delivery.status).in_(("sent", "delivered")),
            Delivery.provider != "outbox",
        )
    ).one()
    failures = session.exec(
        select(Delivery)
        .where(Delivery.created_at >= since, Delivery.status == "failed")
        .order_by(col(Delivery.created_at).desc())
        .limit(10)
    ).all()
    return list(counted), int(segments or 0), list(failures)  # coalesce(): never None, whatever its type says


def outbox_page(
    session: Session,
    filters: dict,
    before: tuple[datetime, str] | None,
    size: int,
    *,
    q: str = "",
    library_id: str = "",
) -> tuple[list[Delivery], str | None]:
    """The outbox page's deliveries, newest first from `before`, and the cursor of the next page; searched as the
    API's (searched_deliveries)."""
    query = select(Delivery)
    for name, value in filters.items():
        if value:
            query = query.where(getattr(Delivery, name) == value)
    query = searched_deliveries(query, q, library_id)
    if before is not None:
        at, id_ = before
        query = query.where((Delivery.created_at < at) | ((Delivery.created_at == at) & (Delivery.id < id_)))
    found = list(
        session.exec(query.order_by(col(Delivery.created_at).desc(), col(Delivery.id).desc()).limit(size + 1)).all()
    )
    if len(found) > size:
        found = found[:size]
        return found, encode_cursor(found[-1].created_at, found[-1].id)
    return found, None


def deliveries_by_status(session: Session) -> dict[tuple[str, str], int]:
    """(status, channel) -> how many, over every delivery kept (for /metrics)."""
    return {
        (status, channel): n
        for status, channel, n in session.exec(
            select(Delivery.status, Delivery.channel, sa.func.count()).group_by(Delivery.status, Delivery.channel)
        )
    }


def is_suppressed(session: Session, phone: str) -> bool:
    """The number replied STOP (and not START since)."""
    return session.get(SmsSuppression, phone) is not None


class MailSinkFolder:
    """The .eml files the embedded sink keeps, found by Message-ID (headers read once per file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_id: dict[str, Path] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def find(self, message_id: str) -> EmailMessage | None:
        with self._lock:
            if message_id not in self._by_id and self.folder.is_dir():
                for path in self.folder.glob("*.eml"):
                    if path.name in self._seen:
                        continue
                    self._seen.add(path.name)
                    with path.open("rb") as f:
                        found = BytesHeaderParser().parse(f).get("Message-ID")
                    if found:
                        self._by_id[str(found).strip()] = path
            kept = self._by_id.get(message_id)
        return message_from_bytes(kept.read_bytes(), policy=policy.default) if kept else None


def person_messages(session: Session, need_ids: list[str]) -> tuple[list[NeedPerson], list[Delivery]]:
    """The contact kept for each of these needs, and every message about them, oldest first."""
    contacts = list(session.exec(select(NeedPerson).where(col(NeedPerson.need_id).in_(need_ids))).all())
    deliveries = list(
        session.exec(
            select(Delivery)
            .where(col(Delivery.need_id).in_(need_ids))
            .order_by(col(Delivery.created_at), col(Delivery.id))
        ).all()
    )
    return contacts, deliveries
