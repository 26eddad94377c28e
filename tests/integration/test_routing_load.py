"""Routing reads a partner's load from the database only when it matters (a capacity, or partners tied on
territory), one partner at a time and capped (services/referral/views.py `open_referrals_of`): the capacity and the
fewest-open rules hold on SQLite and PostgreSQL as they do in the unit tests of domain.route_need."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import select

from services.referral import handlers
from services.referral.store import TABLES, NeedCase, Referral
from services.referral.views import open_referrals_of
from shared.db import Database
from shared.directory import parse_directory
from shared.events import NeedPersonalData, NeedRecorded, new_id, utcnow
from shared.testing import directory_data, unopenable_seal


def route_a_need(db: Database, directory, postal_code: str = "76000") -> Referral:
    now = utcnow()
    event = NeedRecorded(
        need_id=new_id(),
        library_id="chatelet",
        category="caf",
        postal_code=postal_code,
        urgency="normal",
        recorded_at=now - timedelta(minutes=1),
        person_id=new_id(),
        sealed=unopenable_seal(),
    )
    with db.transaction() as s:
        handlers.on_need_recorded(s, event, NeedPersonalData(summary="x"), directory, now)
    with db.transaction() as s:
        return s.exec(select(Referral).where(Referral.need_id == event.need_id)).one()


@pytest.fixture
def db(database_url_factory):
    db = Database(database_url_factory("referral", migrated=True), TABLES)
    yield db
    db.dispose()


@pytest.mark.postgres
def test_a_full_partner_is_passed_over_and_the_count_is_capped(db):
    data = directory_data()
    data["partners"][0]["capacity"] = 2  # caf-76
    directory = parse_directory(data)
    first, second = route_a_need(db, directory), route_a_need(db, directory)
    assert first.partner_id == second.partner_id == "caf-76"
    third = route_a_need(db, directory)
    assert third.partner_id == "caf-national"
    assert "CAF" in third.routed_because and "capacité atteinte 2/2" in third.routed_because
    with db.transaction() as s:
        assert open_referrals_of(s, "caf-76") == 2
        assert open_referrals_of(s, "caf-76", cap=1) == 1  # counted no further than asked
        assert open_referrals_of(s, "cpam-76") == 0


@pytest.mark.postgres
def test_partners_tied_on_territory_share_needs_by_fewest_open(db):
    data = directory_data()
    national = next(p for p in data["partners"] if p["id"] == "caf-national")
    national["territory"] = ["76"]  # now tied with caf-76 on its prefix
    directory = parse_directory(data)
    chosen = [route_a_need(db, directory).partner_id for _ in range(4)]
    assert chosen == ["caf-76", "caf-national", "caf-76", "caf-national"]  # fewest open, then the id


@pytest.mark.postgres
def test_routing_a_recorded_need_writes_each_row_once(db):
    """The case is written once, with its deadline and its event's sequence, and the referral by one INSERT
    (services/referral/store.py `keep_case`, shared/db.py `insert_new`): not inserted, then updated by the unit of
    work."""
    written: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001 - SQLAlchemy's event hook
        if statement.startswith(("INSERT", "UPDATE", "DELETE")):
            written.append(" ".join(statement.split()[:3]))

    sa.event.listen(db.engine, "before_cursor_execute", seen)
    try:
        referral = route_a_need(db, parse_directory(directory_data()))
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", seen)
    assert sorted(written) == [
        "INSERT INTO clock_timer",
        "INSERT INTO need_case",
        "INSERT INTO outbox",
        "INSERT INTO referral",
        "INSERT INTO referral_history",
    ]
    with db.transaction() as s:
        case = s.get(NeedCase, referral.need_id)
        assert case is not None and case.sequence == 1 and case.respond_by == referral.respond_by
        assert case.stranded_since is None
