"""The 72-hour promise, lived through by moving the test's clock: reminders, escalation and breach arrive in
order, an early answer stops them; timers fire once across replicas and survive a killed process."""

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import yaml
from sqlmodel import col, select

from services.referral import handlers
from services.referral.store import TABLES, ClockTimer, Referral
from shared.db import Database, OutboxMessage
from shared.directory import load_directory
from shared.events import NeedPersonalData, NeedRecorded, new_id, utcnow
from shared.testing import directory_data, unopenable_seal, wait_for

FAST_SLA = {"respond_within": "PT3S", "remind_after": ["PT1S"], "escalate_after": "PT2S"}


def fast_directory(tmp_path, sla=FAST_SLA):
    data = directory_data()
    data["sla"] = sla
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def record(intake, category="caf"):
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": category,
            "summary": "Dossier bloqué",
            "postal_code": "76000",
            "consent": True,
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.date_sensitive
def test_reminder_escalation_and_breach_reach_the_right_people_in_order(settings, mail_sink, start_service, clock):
    """The directory's own policy (72 h; reminders at 24 h and 48 h; escalation at 60 h), lived through by moving
    the test's clock forward: each notice comes when its hour comes, and not before."""
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    need = record(intake)
    subjects = lambda: [(m["to"][0], m["subject"].split(" ")[0]) for m in mail_sink.messages]  # noqa: E731

    assert wait_for(lambda: len(mail_sink.messages) == 1), subjects()
    assert subjects() == [("referent@caf.test.example", "Nouvelle")]
    clock.advance(timedelta(hours=24, minutes=1))  # 24 h: the first reminder to the référent
    assert wait_for(lambda: len(mail_sink.messages) == 2), subjects()
    assert subjects()[1] == ("referent@caf.test.example", "Relance")
    clock.advance(timedelta(hours=24))  # 48 h: the second reminder
    assert wait_for(lambda: len(mail_sink.messages) == 3), subjects()
    assert subjects()[2] == ("referent@caf.test.example", "Relance")
    clock.advance(timedelta(hours=12))  # 60 h: escalation to the backup and the coordination
    assert wait_for(lambda: len(mail_sink.messages) == 5), subjects()
    assert sorted(subjects()[3:5]) == [
        ("backup@caf.test.example", "Escalade"),
        ("coordination@test.example", "Escalade"),
    ]
    clock.advance(timedelta(hours=12))  # 72 h: the breach, to the desk and the coordination
    assert wait_for(lambda: len(mail_sink.messages) == 7), subjects()
    assert sorted(subjects()[5:7]) == [
        ("accueil@chatelet.test.example", "Délai"),
        ("coordination@test.example", "Délai"),
    ]

    ref = referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"][0]
    assert ref["sla"] == "breached" and ref["status"] == "assigned"
    history = referral.client("ops").get(f"/referrals/{ref['id']}").json()["history"]
    assert [h["action"] for h in history] == ["assigned", "reminder", "reminder", "escalation", "breach"]
    assert wait_for(lambda: intake.client("desk").get(f"/needs/{need['id']}").json()["sla"] == "breached")


def test_accepting_early_stops_every_later_notice(settings, mail_sink, start_service, clock):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    start_service("notifications", settings)
    need = record(intake)
    refs = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need["id"]}).json()["items"])
    assert referral.client("caf").post(f"/referrals/{refs[0]['id']}/accept").status_code == 200

    # Every timer comes due (the clock moves past the deadline) and is found moot: the clock had stopped.
    clock.advance(timedelta(hours=73))
    db = referral.svc.db

    def timers():
        with db.transaction() as s:
            return [(t.kind, t.outcome) for t in s.exec(select(ClockTimer).where(ClockTimer.need_id == need["id"]))]

    assert wait_for(lambda: all(outcome for _, outcome in timers()), 20)
    assert {outcome for kind, outcome in timers() if kind != "contact_question"} == {"moot"}
    # The question to the person (3 days after the acceptance, docs/person-contacted.md) is not the promise's clock.
    assert [o for kind, o in timers() if kind == "contact_question"] == ["fired"]
    assert wait_for(lambda: mail_sink.to("accueil@chatelet.test.example"))  # the desk hears of the acceptance
    subjects = [m["subject"] for m in mail_sink.messages]
    assert not [s for s in subjects if s.startswith(("Relance", "Escalade", "Délai"))], subjects
    ref = referral.client("ops").get(f"/referrals/{refs[0]['id']}").json()
    assert ref["sla"] == "met"


def _ready(url):
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _seed_routed_need(db, directory, now):
    event = NeedRecorded(
        need_id=new_id(),
        library_id="chatelet",
        category="caf",
        postal_code="76000",
        urgency="normal",
        recorded_at=now - timedelta(hours=80),
        person_id=new_id(),
        sealed=unopenable_seal(),
    )
    with db.transaction() as s:
        handlers.on_need_recorded(s, event, NeedPersonalData(summary="x"), directory, now - timedelta(hours=80))
    return event.need_id


@pytest.mark.postgres  # row locks (SKIP LOCKED) between replicas
def test_two_replicas_racing_fire_each_timer_once(settings, directory_file):
    db = Database(settings.database_url("referral"), TABLES)
    db.create_all()
    directory = load_directory(directory_file)
    now = utcnow()
    needs = [_seed_routed_need(db, directory, now) for _ in range(5)]  # every timer of each is due

    barrier = threading.Barrier(2)
    fired = []

    def replica():
        barrier.wait()
        while True:
            with db.transaction() as s:
                n = handlers.fire_due_timers(s, now, skip_locked=not db.is_sqlite)
            fired.append(n)
            if n == 0:
                return

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with db.transaction() as s:
        events = s.exec(select(OutboxMessage.type).where(OutboxMessage.type != "referral.assigned")).all()
        outcomes = s.exec(select(ClockTimer.outcome)).all()
    # Each need: one reminder fires; the second reminder, the escalation and the breach fire too (all due),
    # since the referral is still waiting: 4 timers per need, each fired once by one replica.
    assert sum(fired) == 4 * len(needs) == len(events) == len(outcomes)
    assert set(outcomes) == {"fired"}
    db.dispose()


@pytest.mark.postgres  # row locks (SKIP LOCKED) between replicas
def test_a_timer_due_while_every_referral_process_was_dead_fires_once_after_restart(
    settings, mail_sink, tmp_path, start_service
):
    settings = settings.model_copy(
        update={
            "smtp_url": mail_sink.url,
            "directory": fast_directory(tmp_path, {"respond_within": "PT6S", "remind_after": ["PT4S"]}),
        }
    )
    intake = start_service("intake", settings, clock=utcnow)  # referral runs as a real process, on the real time
    start_service("notifications", settings, clock=utcnow)
    env = {**os.environ, **{f"RELAIS_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}}
    serve = [sys.executable, "-m", "relais", "serve", "referral"]
    first = subprocess.Popen(serve, env=env)
    try:
        assert wait_for(lambda: _ready(settings.base_url("referral")), 30)
        need = record(intake)
        assert wait_for(lambda: mail_sink.to("referent@caf.test.example"), 30), "no handoff"
        first.send_signal(signal.SIGKILL)  # dies before the reminder (4 s) and the breach (6 s) are due
        first.wait(10)
        db = Database(settings.database_url("referral"), TABLES)
        with db.transaction() as s:
            due = s.exec(select(ClockTimer).where(ClockTimer.need_id == need["id"])).all()
        assert due and all(t.fired_at is None for t in due)
        assert wait_for(lambda: utcnow() > max(t.due_at for t in due), 10)  # both come due with nobody running
        second = subprocess.Popen(serve, env=env)
        try:
            assert wait_for(lambda: len(mail_sink.messages) >= 4, 30), [m["subject"] for m in mail_sink.messages]
            with db.transaction() as s:
                assert sorted(
                    s.exec(
                        select(OutboxMessage.type).where(
                            col(OutboxMessage.type).in_(["referral.reminder_due", "referral.breached"])
                        )
                    ).all()
                ) == ["referral.breached", "referral.reminder_due"]
                assert s.exec(select(Referral.sla)).all() == ["breached"]
        finally:
            second.terminate()
            second.wait(20)
        db.dispose()
    finally:
        if first.poll() is None:
            first.kill()
