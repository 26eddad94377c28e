"""The retention purge (shared/retention.py and each service's PURGE_RULES): exactly what is due goes, rule by rule,
just before and just after each boundary, per jurisdiction, on SQLite and PostgreSQL; two replicas racing do the work
once; `--dry-run` (and `relais purge --dry-run`) changes nothing; the daily time is the directory's."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import yaml
from sqlmodel import select

from relais.cli import main as relais
from services.intake import store as intake_store
from services.notifications import store as notifications_store
from services.referral import store as referral_store
from shared.db import Database, OutboxMessage, ProcessedEvent
from shared.directory import parse_directory
from shared.events import new_id
from shared.people import AccessLog, access_log_rule
from shared.retention import ANONYMISED, next_purge_at, run_purge, technical_rules
from shared.testing import directory_data

pytestmark = pytest.mark.postgres  # date arithmetic in SQL, correlated subqueries, the advisory lock

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
STORES = {"intake": intake_store, "referral": referral_store, "notifications": notifications_store}
RETENTION = {
    "purge_at": "03:30",
    "closed_needs": "P730D",
    "open_needs": "P700D",
    "message_bodies": "P180D",
    "access_log": "P365D",
    "technical_rows": "P7D",
    "jurisdictions": {"CA-QC": {"closed_needs": "P365D", "message_bodies": "P90D"}},
}


def directory_with_retention():
    data = copy.deepcopy(directory_data())
    data["retention"] = RETENTION
    data["libraries"].append({"id": "drummondville", "name": "Drummondville", "territory": ["J2B"]})
    return parse_directory(data)


DIRECTORY = directory_with_retention()


def purge(service: str, db: Database, *, dry_run: bool = False, now: datetime = NOW):
    rules = [*technical_rules(timedelta(days=7)), access_log_rule(), *STORES[service].PURGE_RULES]
    return run_purge(db, service, rules, DIRECTORY, now, technical_fallback=timedelta(days=7), dry_run=dry_run)


@pytest.fixture
def databases(database_url_factory):
    made = {}

    def make(service: str) -> Database:
        if service not in made:
            made[service] = Database(database_url_factory(service, migrated=True), STORES[service].TABLES)
        return made[service]

    yield make
    for db in made.values():
        db.dispose()


# --- the cases: each seeds one row `age` old and says whether it is anonymised (or gone) -----------------------


def seed_need(db: Database, at: datetime, *, library: str = "chatelet", status: str = "closed") -> str:
    need_id = new_id()
    with db.transaction() as session:
        session.add(
            intake_store.Need(
                id=need_id,
                reference=f"CHA-1506-{need_id[:12]}",  # unique: the racing test seeds hundreds
                library_id=library,
                category="caf",
                summary="Loyer impayé, M. Dupont",
                postal_code="76000",
                person_id=new_id(),
                person_display_name="Marcel Dupont",
                person_email="marcel@example.org",
                person_phone="+33261910001",
                search_text="marcel dupont loyer impaye",
                preferred_channel="email",
                recorded_by="desk",
                recorded_at=at - DAY,
                respond_by=at,
                status=status,
            )
        )
        session.add(intake_store.NeedHistory(need_id=need_id, at=at - DAY, event="need.recorded"))
        session.add(intake_store.NeedHistory(need_id=need_id, at=at, event="referral.closed", detail="Vu M. Dupont"))
    return need_id


def need_anonymised(db: Database, need_id: str) -> bool:
    with db.read() as session:
        need = session.get_one(intake_store.Need, need_id)
        details = session.exec(
            select(intake_store.NeedHistory.detail).where(intake_store.NeedHistory.need_id == need_id)
        ).all()
    if need.anonymised_at is None:
        assert need.summary != ANONYMISED and "Vu M. Dupont" in details
        return False
    assert (need.summary, need.person_display_name, need.person_email, need.person_phone, need.postal_code) == (
        ANONYMISED,
        ANONYMISED,
        None,
        None,
        None,
    )
    assert "Vu M. Dupont" not in details and ANONYMISED in details
    assert need.search_text == need.reference.lower()  # `q=` finds it by its reference only
    assert (need.category, need.library_id, need.status) == ("caf", need.library_id, need.status)  # figures stay
    return True


def seed_case(db: Database, at: datetime, *, status: str = "closed", library: str = "chatelet") -> str:
    need_id = new_id()
    with db.transaction() as session:
        session.add(
            referral_store.NeedCase(
                need_id=need_id,
                library_id=library,
                category="caf",
                summary="Loyer impayé, M. Dupont",
                urgency="normal",
                person_display_name="Marcel Dupont",
                person_email="marcel@example.org",
                search_text="marcel dupont",
                recorded_at=at - DAY,
            )
        )
        session.flush()
        referral_id = new_id()
        session.add(
            referral_store.Referral(
                id=referral_id,
                need_id=need_id,
                partner_id="caf-76",
                contact_id="caf-ref",
                library_id=library,
                category="caf",
                status=status,
                respond_by=at,
                routed_because="test",
                created_at=at - DAY,
                updated_at=at,
            )
        )
        session.flush()
        session.add(
            referral_store.ReferralHistory(referral_id=referral_id, at=at, action=status, actor="op", detail="Vu M. D.")
        )
    return need_id


def case_anonymised(db: Database, need_id: str) -> bool:
    with db.read() as session:
        case = session.get_one(referral_store.NeedCase, need_id)
        details = session.exec(select(referral_store.ReferralHistory.detail)).all()
    if case.summary != ANONYMISED:
        assert case.person_email == "marcel@example.org" and "Vu M. D." in details
        return False
    assert case.person_display_name == ANONYMISED and case.person_email is None and "Vu M. D." not in details
    assert "dupont" not in case.search_text
    return True


def seed_delivery(db: Database, at: datetime) -> str:
    delivery_id = new_id()
    with db.transaction() as session:
        session.add(
            notifications_store.Delivery(
                id=delivery_id,
                event_id=new_id(),
                need_id=new_id(),
                kind="person_confirmation",
                channel="sms",
                recipient_role="person",
                recipient="+33261910001",
                subject="",
                body_text="Bonjour Marcel, la CAF vous contactera",
                status="sent",
                next_attempt_at=at,
                created_at=at,
                sent_at=at,
            )
        )
    return delivery_id


def body_gone(db: Database, delivery_id: str) -> bool:
    with db.read() as session:
        delivery = session.get_one(notifications_store.Delivery, delivery_id)
    if delivery.body_text != ANONYMISED:
        assert delivery.recipient == "+33261910001"
        return False
    assert delivery.recipient == ANONYMISED and delivery.status == "sent" and delivery.kind == "person_confirmation"
    return True


def seed_person(db: Database, at: datetime) -> str:
    need_id = new_id()
    with db.transaction() as session:
        session.add(
            notifications_store.NeedPerson(
                need_id=need_id,
                library_id="chatelet",
                email="marcel@example.org",
                preferred_channel="email",
                recorded_at=at,
            )
        )
    return need_id


def person_gone(db: Database, need_id: str) -> bool:
    with db.read() as session:
        return session.get(notifications_store.NeedPerson, need_id) is None


def seed_outbox(db: Database, at: datetime) -> str:
    event_id = new_id()
    with db.transaction() as session:
        session.add(
            OutboxMessage(
                event_id=event_id, stream="needs", type="need.recorded", payload="{}", created_at=at, published_at=at
            )
        )
    return event_id


def outbox_gone(db: Database, event_id: str) -> bool:
    with db.read() as session:
        return session.exec(select(OutboxMessage).where(OutboxMessage.event_id == event_id)).first() is None


def seed_access(db: Database, at: datetime) -> str:
    with db.transaction() as session:
        row = AccessLog(
            at=at, need_id=new_id(), user_id="op-caf76", role="partner", service="referral", channel="page", what="need"
        )
        session.add(row)
        session.flush()
        return str(row.id)


def access_gone(db: Database, row_id: str) -> bool:
    with db.read() as session:
        return session.get(AccessLog, int(row_id)) is None


@dataclass(frozen=True)
class Case:
    name: str
    service: str
    period: timedelta
    seed: Callable[[Database, datetime], str]
    gone: Callable[[Database, str], bool]

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("closed need, France: 730 days", "intake", 730 * DAY, seed_need, need_anonymised),
    Case(
        "closed need, Québec: 365 days",
        "intake",
        365 * DAY,
        lambda db, at: seed_need(db, at, library="drummondville"),
        need_anonymised,
    ),
    Case(
        "need never closed: 700 days after its last event",
        "intake",
        700 * DAY,
        lambda db, at: seed_need(db, at, status="referred"),
        need_anonymised,
    ),
    Case("referral's closed case, France", "referral", 730 * DAY, seed_case, case_anonymised),
    Case(
        "referral's closed case, Québec",
        "referral",
        365 * DAY,
        lambda db, at: seed_case(db, at, library="drummondville"),
        case_anonymised,
    ),
    Case(
        "referral's open case",
        "referral",
        700 * DAY,
        lambda db, at: seed_case(db, at, status="accepted"),
        case_anonymised,
    ),
    Case("message bodies: the shortest jurisdiction's 90 days", "notifications", 90 * DAY, seed_delivery, body_gone),
    Case("a person whose need never closed", "notifications", 700 * DAY, seed_person, person_gone),
    Case("published outbox row: 7 days", "intake", 7 * DAY, seed_outbox, outbox_gone),
    Case("access log, referral: 365 days", "referral", 365 * DAY, seed_access, access_gone),
    Case("access log, intake: 365 days", "intake", 365 * DAY, seed_access, access_gone),
]


@pytest.mark.parametrize("side", ["just before", "just after"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_purge_removes_exactly_what_is_due(databases, case, side):
    db = databases(case.service)
    age = case.period - SECOND if side == "just before" else case.period + SECOND
    key = case.seed(db, NOW - age)
    expected = side == "just after"

    dry = purge(case.service, db, dry_run=True)
    assert dry.total == int(expected) and not case.gone(db, key)  # counted, not touched
    report = purge(case.service, db)
    assert report.total == int(expected)
    assert case.gone(db, key) is expected
    assert purge(case.service, db).total == 0  # done once: a second run finds nothing


def test_processed_events_outlive_the_streams_copies(databases):
    db = databases("referral")
    with db.transaction() as session:
        session.add(ProcessedEvent(consumer="referral", event_id="old", processed_at=NOW - 8 * DAY - SECOND))
        session.add(ProcessedEvent(consumer="referral", event_id="young", processed_at=NOW - 8 * DAY + SECOND))
    results = {r.name: r.count for r in purge("referral", db).results}
    assert results["processed-event rows, deleted"] == 1
    with db.read() as session:
        assert session.exec(select(ProcessedEvent.event_id)).all() == ["young"]


def test_two_replicas_racing_purge_each_row_once(databases, database_url_factory):
    first = databases("intake")
    due = [seed_need(first, NOW - 800 * DAY) for _ in range(60)]
    second = Database(first.url, intake_store.TABLES)  # another process: its own engine and connections
    barrier, reports, errors = threading.Barrier(2), [], []

    def replica(db: Database) -> None:
        barrier.wait()
        try:
            reports.append(purge("intake", db))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(db,)) for db in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    second.dispose()
    assert errors == []
    assert sum(r.total for r in reports) == len(due)  # one did the work; the other was locked out or found nothing
    with first.read() as session:
        marks = session.exec(
            select(intake_store.NeedHistory.need_id).where(intake_store.NeedHistory.event == "need.anonymised")
        ).all()
    assert sorted(marks) == sorted(due)  # each need anonymised exactly once


def table_contents(db: Database) -> dict[str, list]:
    with db.read() as session:
        return {
            table.name: sorted(map(repr, session.execute(sa.select(table)).all()))
            for table in db.tables
            if table.name != "alembic_version"
        }


def test_a_dry_run_changes_nothing(databases):
    for case in CASES:
        db = databases(case.service)
        case.seed(db, NOW - case.period - DAY)
    for service in STORES:
        db = databases(service)
        before = table_contents(db)
        report = purge(service, db, dry_run=True)
        assert report.total > 0 and report.dry_run
        assert table_contents(db) == before


def test_relais_purge_prints_per_rule_and_dry_run_changes_nothing(databases, monkeypatch, tmp_path, capsys):
    db = databases("intake")
    seed_need(db, datetime.now(UTC) - 800 * DAY)
    seed_need(db, datetime.now(UTC) - DAY)
    data = copy.deepcopy(directory_data())
    data["retention"] = RETENTION
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    monkeypatch.setenv("RELAIS_DIRECTORY", str(path))
    monkeypatch.setenv("RELAIS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RELAIS_INTAKE_DATABASE_URL", db.url)
    before = table_contents(db)

    assert relais(["purge", "intake", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "intake: needs closed or cancelled, anonymised (closed_needs): 1" in out
    assert "intake: published outbox rows, deleted (technical_rows): 0" in out
    assert "would remove or anonymise 1 row(s) in all" in out
    assert table_contents(db) == before

    assert relais(["purge", "intake"]) == 0
    assert "intake: removed or anonymised 1 row(s) in all" in capsys.readouterr().out
    assert table_contents(db) != before


def test_the_daily_purge_runs_at_the_directory_time_in_its_zone():
    paris = DIRECTORY  # Europe/Paris, purge_at 03:30: 01:30 UTC in summer, 02:30 UTC in winter
    assert next_purge_at(paris, datetime(2026, 6, 15, 1, 0, tzinfo=UTC)) == datetime(2026, 6, 15, 1, 30, tzinfo=UTC)
    assert next_purge_at(paris, datetime(2026, 6, 15, 1, 30, tzinfo=UTC)) == datetime(2026, 6, 16, 1, 30, tzinfo=UTC)
    assert next_purge_at(paris, datetime(2026, 12, 15, 12, 0, tzinfo=UTC)) == datetime(2026, 12, 16, 2, 30, tzinfo=UTC)
