"""The dashboard's small arithmetic and wording: percentiles, durations, the pending-growth
baseline, and the log guard that masks addresses and phone numbers."""

import pytest

from services.referral.dashboard import QueueWatch, bucket_label
from services.referral.dashboard_pages import duration_fr, percent_fr
from shared.db import percentile
from shared.logs import redact, valid_correlation_id


def test_percentiles_interpolate_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2, 80], 90) == pytest.approx(49.6)  # 4 + 0.6 × 76, order does not matter
    assert percentile([1, 2, 3], 100) == 3 and percentile([1, 2, 3], 0) == 1


def test_durations_and_shares_in_french():
    assert [duration_fr(s) for s in (None, 4.6, 59, 60, 3599, 3600, 2 * 3600 + 5 * 60, 86400, 90000)] == [
        "–",
        "5 s",
        "59 s",
        "1 min",
        "59 min",
        "1 h",
        "2 h 05 min",
        "1 j",
        "1 j 1 h",
    ]
    assert percent_fr(None) == "–" and percent_fr(5 / 7) == "71\u00a0%"
    assert bucket_label(1, 4) == "1-4 h" and bucket_label(72, None) == "≥ 72 h"


def test_pending_counts_are_compared_with_a_snapshot_at_least_a_minute_old():
    watch = QueueWatch()
    assert watch.baseline(0) is None
    watch.keep(0, [])
    watch.keep(5, [])  # too soon after the first: not kept
    assert len(watch.snapshots) == 1
    assert watch.baseline(30) is None and watch.baseline(60) == {}
    watch.keep(400, [])  # the first is now too old to keep
    assert [at for at, _ in watch.snapshots] == [400]


def test_logs_mask_addresses_and_phones_but_not_ids():
    assert redact("to jean.dupont@example.org, +33612345678 or 06 12 34 56 78") == "to [email], [phone] or [phone]"
    assert redact("entry 1732200000000-0 of need 4f2a9c") == "entry 1732200000000-0 of need 4f2a9c"
    assert valid_correlation_id("req-42.a_b") == "req-42.a_b"
    assert valid_correlation_id("x" * 65) is None and valid_correlation_id("a b\n") is None
    assert valid_correlation_id("req-42\n") is None and valid_correlation_id("a:b") is None  # the safe alphabet only


def test_log_lines_go_to_stderr_as_it_is_when_they_are_written(monkeypatch):
    # `relais` commands run in-process by tests configure logging; a later test's stderr is another (capture) stream,
    # and the first one is closed by then: the lines must follow sys.stderr, not the stream of the configure call.
    import io
    import logging

    from shared import logs

    root = logging.getLogger()
    kept = list(root.handlers), root.level  # put back after: the test configures the root logger
    try:
        first, later = io.StringIO(), io.StringIO()
        monkeypatch.setattr("sys.stderr", first)
        logs.configure(service="intake", fmt="text")
        first.close()
        monkeypatch.setattr("sys.stderr", later)
        logging.getLogger("relais.test").warning("written after stderr changed")
        written = later.getvalue()
        assert "written after stderr changed" in written and "Logging error" not in written
    finally:
        root.handlers[:] = kept[0]
        root.setLevel(kept[1])


def test_a_validation_error_is_described_without_the_values_it_was_given():
    from pydantic import ValidationError

    from shared.events import NeedRecorded
    from shared.logs import describe_error

    try:
        NeedRecorded.model_validate(
            {
                "need_id": "n1",
                "library_id": "l",
                "category": "c",
                "summary": "Zoé Martin",  # version 1's clear summary: refused, and not quoted
                "postal_code": None,
                "urgency": "whenever",
                "recorded_at": "2026-11-21T10:00:00Z",
                "person_id": "p1",
                "sealed": {"person_id": "p1", "key_id": "k", "nonce": "bm9uY2U=", "ciphertext": "Y2lwaGVy"},
                "x": 1,
            }
        )
    except ValidationError as exc:
        described = describe_error(exc)
    assert described.startswith("ValidationError: 3 validation errors for NeedRecorded: urgency: Input should be")
    assert "x: Extra inputs are not permitted" in described and "Zoé" not in described
    assert describe_error(LookupError("no partner for zoe@example.org")) == "LookupError: no partner for [email]"


def test_a_partner_stopped_answering_after_two_alerts_in_7_days_and_no_answer_since():
    from datetime import UTC, datetime, timedelta

    from services.referral.dashboard import partner_figures
    from shared.directory import parse_directory
    from shared.testing import directory_data

    partners = parse_directory(directory_data()).partners
    now = datetime(2026, 11, 20, 12, tzinfo=UTC)
    h = timedelta(hours=1)

    def silent(alerted: int, first_hours_ago: int, last_action=None) -> tuple[bool, int, datetime | None]:
        # `alerted`: its referrals escalated or breached in 7 days (one referral escalated then breached counts
        # once: views.alert_counts_since, tests/integration/test_dashboard.py)
        figures = partner_figures(
            partners,
            now,
            open_counts={},
            pauses={},
            waiting={},
            last_action={"caf-76": last_action} if last_action else {},
            windows={},
            declines={},
            alerts={"caf-76": (alerted, now - first_hours_ago * h)},
            contacts={},
        )
        caf = next(p for p in figures if p.id == "caf-76")
        return caf.stopped_answering, caf.alerts_7d, caf.silent_since

    assert silent(1, 30) == (False, 1, None)  # one escalation is not enough
    assert silent(2, 30) == (True, 2, now - 30 * h)  # never acted at all
    assert silent(2, 30, last_action=now - 40 * h) == (True, 2, now - 30 * h)
    assert silent(2, 30, last_action=now - 10 * h) == (False, 2, None)  # answered since the first


async def test_slow_figures_of_a_large_deployment_are_reused_then_refreshed_behind_and_forgotten_after_an_action(
    monkeypatch,
):
    from datetime import UTC, datetime, timedelta
    from typing import Any, cast

    from services.referral import dashboard

    window = {"size": 10}  # referrals of the 30-day window: below dashboard.REUSE_FROM at first
    computed: list[datetime] = []

    def local_figures(svc, now):  # the database part, counted
        computed.append(now)
        return {"n": len(computed)}, window["size"]

    monkeypatch.setattr(dashboard, "local_figures", local_figures)
    monkeypatch.setattr(dashboard, "window_holds", lambda svc, since, at_least: window["size"] >= at_least)
    reuse, t = dashboard.FiguresReuse(), datetime(2026, 11, 20, 12, tzinfo=UTC)
    svc = cast(Any, None)  # local_figures, replaced, does not read it

    assert await reuse.figures(svc, t) == (t, {"n": 1})
    assert await reuse.figures(svc, t) == (t, {"n": 2})  # a small deployment computes them every time

    window["size"] = dashboard.REUSE_FROM
    assert await reuse.figures(svc, t) == (t, {"n": 3})  # the window grew: found so by this computation
    assert await reuse.figures(svc, t + timedelta(seconds=5)) == (t, {"n": 3})  # reused, with their time

    assert reuse.last is not None
    started, fresh_for, at, figures = reuse.last
    reuse.last = (started - fresh_for - 1, fresh_for, at, figures)  # older than fresh: still shown, refreshed behind
    assert await reuse.figures(svc, t + timedelta(minutes=2)) == (t, {"n": 3})
    assert reuse.refresh is not None
    await reuse.refresh
    assert await reuse.figures(svc, t + timedelta(minutes=2)) == (t + timedelta(minutes=2), {"n": 4})

    reuse.forget()  # an action from the dashboard: no figures until fresh ones are computed behind
    assert await reuse.figures(svc, t + timedelta(minutes=3)) is None
    await reuse.refresh
    assert await reuse.figures(svc, t + timedelta(minutes=3)) == (t + timedelta(minutes=3), {"n": 5})


async def test_a_large_window_is_computed_from_the_start_and_no_request_waits_for_it(monkeypatch):
    """At start, a window of REUSE_FROM referrals or more is computed behind; a request meanwhile gets None (the
    pages' notice) at once, and starts no second computation; an action during a computation makes it start again."""
    import asyncio
    import threading
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace
    from typing import Any, cast

    from services.referral import dashboard

    t = datetime(2026, 11, 20, 12, tzinfo=UTC)
    release, computed = threading.Event(), []

    def local_figures(svc, now):  # the database part, held until the test releases it
        assert release.wait(30), "never released"
        computed.append(now)
        return {"n": len(computed)}, 7

    monkeypatch.setattr(dashboard, "local_figures", local_figures)
    monkeypatch.setattr(dashboard, "window_holds", lambda svc, since, at_least: at_least <= 7)
    svc = cast(Any, SimpleNamespace(clock=lambda: t))
    reuse = dashboard.FiguresReuse(reuse_from=5)

    starting = asyncio.create_task(reuse.start(svc))
    while reuse.refresh is None:
        await asyncio.sleep(0.01)  # the window counted, the computation started
    first = reuse.refresh
    assert await reuse.figures(svc, t) is None  # answered at once, without figures
    assert await reuse.figures(svc, t + timedelta(seconds=1)) is None
    assert reuse.refresh is first and computed == []  # one computation at a time

    reuse.forget()  # an action while it runs: its figures predate the action, so it is computed again
    release.set()
    await starting
    await reuse.refresh
    assert computed == [t, t] and reuse.last is not None
    assert await reuse.figures(svc, t) == (t, {"n": 2})


async def test_a_small_window_is_not_computed_at_start_but_on_each_request(monkeypatch):
    from datetime import UTC, datetime
    from types import SimpleNamespace
    from typing import Any, cast

    from services.referral import dashboard

    t, computed = datetime(2026, 11, 20, 12, tzinfo=UTC), []

    def local_figures(svc, now):
        computed.append(now)
        return {"n": len(computed)}, 4

    monkeypatch.setattr(dashboard, "local_figures", local_figures)
    monkeypatch.setattr(dashboard, "window_holds", lambda svc, since, at_least: at_least <= 4)
    svc = cast(Any, SimpleNamespace(clock=lambda: t))
    reuse = dashboard.FiguresReuse(reuse_from=5)
    await reuse.start(svc)
    assert reuse.large is False and reuse.refresh is None and computed == []
    assert await reuse.figures(svc, t) == (t, {"n": 1})
    assert await reuse.figures(svc, t) == (t, {"n": 2})


async def test_a_stopping_service_does_not_wait_for_the_figures_computed_behind(monkeypatch):
    """The computation started at start runs in a worker thread; cancelling the start (the service stops) returns
    without waiting for that thread to finish its queries."""
    import threading
    from datetime import UTC, datetime
    from types import SimpleNamespace
    from typing import Any, cast

    import anyio

    from services.referral import dashboard

    t = datetime(2026, 11, 20, 12, tzinfo=UTC)
    running, release, finished = threading.Event(), threading.Event(), threading.Event()

    def local_figures(svc, now):  # a computation still in its queries when the service stops
        running.set()
        release.wait(30)
        finished.set()
        return {}, 7

    monkeypatch.setattr(dashboard, "local_figures", local_figures)
    monkeypatch.setattr(dashboard, "window_holds", lambda svc, since, at_least: True)
    reuse = dashboard.FiguresReuse(reuse_from=5)
    try:
        async with anyio.create_task_group() as tasks:  # as the service's lifespan runs its background tasks
            tasks.start_soon(reuse.start, cast(Any, SimpleNamespace(clock=lambda: t)))
            while not running.is_set():
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()  # the service stops
        assert not finished.is_set()  # the stop did not wait for the thread
        assert reuse.refresh is not None and reuse.refresh.done() and reuse.last is None
    finally:
        release.set()


def test_sqlite_gets_the_seconds_between_two_datetimes_and_percentiles_as_postgresql_computes_them(tmp_path):
    import sqlalchemy as sa

    from shared.db import Database

    db = Database(f"sqlite:///{tmp_path}/figures.db", [])
    try:
        with db.read() as session:
            seconds = "SELECT relais_seconds(:later, :earlier)"
            assert (
                session.execute(
                    sa.text(seconds), {"later": "2026-12-01 10:00:01.500000", "earlier": "2026-12-01 10:00:00"}
                ).scalar_one()
                == 1.5
            )
            # a value written with an offset (not by UTCDateTime) is read with it
            assert (
                session.execute(
                    sa.text(seconds), {"later": "2026-12-01T10:00:00+01:00", "earlier": "2026-12-01 08:59:00"}
                ).scalar_one()
                == 60.0
            )
            values = " UNION ALL ".join(f"SELECT {v} AS v" for v in (4, 1, 3, 2, 80, "NULL"))
            p50, p90 = session.execute(
                sa.text(f"SELECT relais_percentile(v, 50), relais_percentile(v, 90) FROM ({values})")
            ).one()
            assert (p50, p90) == (3, pytest.approx(49.6))  # NULL left out, as percentile_cont does
            assert session.execute(sa.text("SELECT relais_percentile(NULL, 50)")).scalar_one() is None
    finally:
        db.dispose()
