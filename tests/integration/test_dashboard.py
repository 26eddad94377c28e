"""The ops dashboard's figures over HTTP, on seeded data: counts, percentiles, the clock's lag, the partner that
stopped answering; the parts read from other services shown as unavailable when those are down; the charts' data
on the page (table and JSON) is the API's, and the vendored uPlot is served; the queue of a stopped consumer marked
stuck, then a dead-lettered message replayed from the dashboard and processed."""

from __future__ import annotations

import json
import re
from datetime import datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from sqlmodel import select

from services.referral.store import ClockTimer, NeedCase, OpsAction, Referral, ReferralHistory
from shared import queues
from shared.events import utcnow
from shared.signin import sign_in_link
from shared.testing import clock_start, directory_data, need_recorded, use_sign_in_link, wait_for
from tests.helpers import search

# date_sensitive: deadlines in words, months, dates to come
# postgres: the figures are SQL aggregates and date arithmetic
pytestmark = [pytest.mark.date_sensitive, pytest.mark.postgres]

NOW = clock_start()
H = timedelta(hours=1)
D = timedelta(days=1)


def seed(db) -> None:
    """Referrals, history and timers whose figures are worked out by hand in the tests below."""
    with db.transaction() as s:

        def referral(
            rid,
            partner,
            created,
            respond_by=None,
            status="assigned",
            sla="on_track",
            category="caf",
            history=(),
            recorded=None,
            decline_reason=None,
        ):
            s.add(
                NeedCase(
                    need_id=f"n-{rid}",
                    library_id="chatelet",
                    category=category,
                    summary="x",
                    urgency="normal",
                    recorded_at=recorded or created,
                )
            )
            s.flush()
            s.add(
                Referral(
                    id=rid,
                    need_id=f"n-{rid}",
                    partner_id=partner,
                    contact_id="c",
                    library_id="chatelet",
                    category=category,
                    status=status,
                    sla=sla,
                    respond_by=respond_by or created + 72 * H,
                    routed_because="test",
                    created_at=created,
                    updated_at=created,
                    decline_reason=decline_reason,
                )
            )
            s.flush()
            s.add(ReferralHistory(referral_id=rid, at=created, action="assigned", actor="system"))
            for action, at, detail in history:
                s.add(
                    ReferralHistory(
                        referral_id=rid,
                        at=at,
                        action=action,
                        actor="system" if action in ("breach", "escalation") else "op",
                        detail=detail,
                    )
                )

        # caf-76: first answers after 1, 2, 3, 4 h (in time), 80 h (late) and 1 h; one unanswered past its deadline
        for n, hours in enumerate((1, 2, 3, 4), start=1):
            created = NOW - 10 * D
            referral(
                f"a{n}",
                "caf-76",
                created,
                status="accepted",
                sla="met",
                history=[("accept", created + hours * H, None)],
            )
        created = NOW - 9 * D
        referral(
            "a5",
            "caf-76",
            created,
            status="responded",
            sla="breached",
            history=[("breach", created + 72 * H, None), ("respond", created + 80 * H, "Rappelée")],
        )
        created = NOW - 5 * D
        referral("a6", "caf-76", created, sla="breached", history=[("breach", created + 72 * H, None)])
        referral("a7", "caf-76", NOW - 3 * H, status="accepted", sla="met", history=[("accept", NOW - 2 * H, None)])
        # waiting for a first answer, due in 2 h, 20 h and 30 h
        referral("d1", "caf-76", NOW - 70 * H, respond_by=NOW + 2 * H, sla="at_risk")
        referral("d2", "caf-76", NOW - 52 * H, respond_by=NOW + 20 * H)
        referral("d3", "caf-76", NOW - 1 * H, respond_by=NOW + 30 * H)
        # caf-national: two referrals escalated within 7 days (one since taken back by ops), nothing done since an
        # answer 40 days ago: it stopped answering (caf-76 had two breaches too, but answered a7 since)
        referral("s1", "caf-national", NOW - 30 * H, history=[("escalation", NOW - 6 * H, "escalation")])
        referral("s2", "caf-national", NOW - 4 * D, status="cancelled", history=[("escalation", NOW - 1 * D, None)])
        referral(
            "o1",
            "caf-national",
            NOW - 40 * D,
            status="closed",
            sla="met",
            history=[("accept", NOW - 40 * D + H, None), ("breach", NOW - 37 * D, None)],
        )
        # cpam-76: three declines within 30 days (two for capacity), one older
        for rid, days, code, detail in (
            ("c1", 3, "capacity", "plus de place"),
            ("c2", 2, "out_of_scope", None),
            ("c3", 1, "capacity", None),
            ("c4", 40, "already_followed", None),
        ):
            referral(
                rid,
                "cpam-76",
                NOW - days * D,
                status="declined",
                category="sante",
                decline_reason=code,
                history=[("decline", NOW - days * D + H, detail)],
            )
        # the clock: four timers fired within 24 h, 1, 2, 3 and 10 s late; older or cancelled ones do not count
        for need, kind, late in (
            ("n-a1", "reminder", 1),
            ("n-a2", "reminder", 2),
            ("n-a3", "escalation", 3),
            ("n-a4", "breach", 10),
        ):
            s.add(
                ClockTimer(
                    need_id=need,
                    kind=kind,
                    number=1 if kind == "reminder" else 0,
                    due_at=NOW - H,
                    fired_at=NOW - H + late * timedelta(seconds=1),
                    outcome="fired",
                )
            )
        s.add(
            ClockTimer(
                need_id="n-a5", kind="reminder", number=1, due_at=NOW - 2 * D, fired_at=NOW - 2 * D, outcome="fired"
            )
        )
        s.add(ClockTimer(need_id="n-a6", kind="reminder", number=2, due_at=NOW - H, fired_at=NOW, outcome="cancelled"))
        # due five minutes ago and not fired yet: the running clock fires it (moot: a1 was answered), 300 s late
        s.add(ClockTimer(need_id="n-a1", kind="reminder", number=2, due_at=NOW - 5 * timedelta(minutes=1)))
        s.add(OpsAction(at=NOW - H, actor="ops", action="pause_partner", target="caf-76", reason="Fermeture"))


@pytest.fixture
def referral(settings, start_service):
    service = start_service("referral", settings, clock=lambda: NOW)  # the figures below are worked out at this instant
    seed(service.svc.db)
    service.svc.clock_wake.set()
    return service


def test_the_peoples_answers_count_a_question_unanswered_only_after_a_week(referral):
    # The contact question's figures are counted by the database (views.contact_counts_since): a question still
    # unanswered counts as "no answer" once a week old (domain.NO_ANSWER_AFTER), not before.
    with referral.svc.db.transaction() as s:
        for rid, days_ago, answer in (("a1", 10, "yes"), ("a2", 2, "yes"), ("a3", 3, "no"), ("a4", 8, None)):
            r = s.get(Referral, rid)
            r.contact_question_at, r.person_contacted = NOW - days_ago * D, answer
            s.add(r)
        r = s.get(Referral, "a5")
        r.contact_question_at = NOW - 1 * D  # may still answer: not counted yet
        s.add(r)
    board = referral.client("ops").get("/dashboard").json()
    caf = next(p for p in board["partners"] if p["id"] == "caf-76")
    assert caf["contact"] == {"asked": 5, "yes": 2, "no": 1, "no_answer": 1, "confirmed_share": 0.5}
    assert board["person_contacted"] == caf["contact"]  # the only partner asked


def test_a_referral_escalated_then_breached_counts_once_among_its_partners_alerts(referral):
    with referral.svc.db.transaction() as s:
        s.add(ReferralHistory(referral_id="s1", at=NOW - 2 * H, action="breach", actor="system"))
    board = referral.client("ops").get("/dashboard").json()
    national = next(p for p in board["partners"] if p["id"] == "caf-national")
    assert national["alerts_7d"] == 2 and national["stopped_answering"]  # s1 (escalated, then breached) and s2
    assert datetime.fromisoformat(national["silent_since"]) == NOW - D


def test_every_figure_on_seeded_data(referral):
    ops = referral.client("ops")
    board = wait_for(lambda: (b := ops.get("/dashboard").json())["clock"]["fired_24h"] == 5 and b)
    assert board, ops.get("/dashboard").json()["clock"]

    deadlines = board["deadlines"]
    assert deadlines["open_by_sla"] == {"on_track": 3, "at_risk": 1, "met": 5, "breached": 2}
    assert deadlines["open_total"] == 11
    assert [r["id"] for r in deadlines["due_soon"]] == ["d1", "d2"]  # soonest first; d3 is due in 30 h
    assert deadlines["due_soon"][0]["url"] == "/boite/d1"
    assert [r["id"] for r in deadlines["breaches"]] == ["a6", "a5"] and deadlines["breaches_count"] == 2
    # today's escalations and breaches: since midnight in the directory's time zone (s2's was yesterday or before)
    paris = ZoneInfo("Europe/Paris")
    midnight = datetime.combine(NOW.astimezone(paris).date(), time(0), paris)
    assert [(r["id"], r["kind"]) for r in deadlines["today"]] == (
        [("s1", "escalation")] if NOW - 6 * H >= midnight else []
    )
    assert all(r["need_url"] == f"/tableau-de-bord/demandes/{r['need_id']}" for r in deadlines["today"])

    partners = {p["id"]: p for p in board["partners"]}
    caf = partners["caf-76"]
    assert (caf["open"], caf["waiting"], caf["referrals_30d"], caf["answered_30d"]) == (10, 4, 10, 6)
    assert caf["median_answer_seconds"] == 2.5 * 3600  # 1, 1, 2, 3, 4, 80 h
    assert caf["p90_answer_seconds"] == pytest.approx(42 * 3600)  # 4 + 0.5 × (80 - 4) h
    assert caf["in_time_share"] == pytest.approx(5 / 7)  # 5 in time; late: a5 answered, a6 never
    assert not caf["stopped_answering"] and caf["alerts_7d"] == 2  # a5 and a6 breached, but a7 answered since
    national = partners["caf-national"]
    assert national["stopped_answering"] and national["alerts_7d"] == 2 and national["waiting"] == 1
    assert datetime.fromisoformat(national["silent_since"]) == NOW - D  # the first of the two escalations
    assert national["referrals_30d"] == 2
    assert national["median_answer_seconds"] is None and national["in_time_share"] is None
    cpam = partners["cpam-76"]
    assert cpam["declines_30d"] == 3
    assert cpam["decline_reasons"] == [
        {"code": "capacity", "reason": "Capacité atteinte", "count": 2},
        {"code": "out_of_scope", "reason": "Hors de nos compétences", "count": 1},
    ]
    assert board["declines_by_reason"] == cpam["decline_reasons"]  # every partner's, counted by reason code

    clock = board["clock"]
    assert clock["lag_max_seconds"] == 300 and clock["lag_p50_seconds"] == 3  # 1, 2, 3, 10, 300 s
    assert clock["lag_p90_seconds"] == pytest.approx(184)  # 10 + 0.6 × 290
    assert clock["overdue"] == 0

    charts = board["charts"]
    assert len(charts["needs_per_hour"]) == 24 and sum(b["count"] for b in charts["needs_per_hour"]) == 2
    assert [b["count"] for b in charts["answer_times"]] == [0, 4, 1, 0, 0, 0, 1]
    assert board["recent_actions"][0]["reason"] == "Fermeture"

    # intake and notifications are not running: their parts say so, the rest is there
    assert board["deliveries"] == {
        "available": False,
        "error": "notifications unreachable (ConnectError)",
        "data": None,
    }
    assert board["reports"]["available"] is False
    assert {o["service"]: o["available"] for o in board["queues"]["outboxes"]} == {
        "intake": False,
        "referral": True,
        "notifications": False,
    }
    assert [s["name"] for s in board["queues"]["streams"]] == ["needs", "referrals", "deliveries", "access", "inbound"]

    metrics = httpx.get(f"{referral.url}/metrics").text
    assert 'relais_open_referrals{sla="breached"} 2.0' in metrics
    assert 'relais_timer_firing_lag_seconds_bucket{kind="reminder",le="300.0"} 1.0' in metrics
    assert 'relais_timer_firing_lag_seconds_bucket{kind="reminder",le="60.0"} 0.0' in metrics
    assert re.search(r'relais_group_pending\{group="referral",stream="needs"\} 0\.0', metrics)


UPLOT = Path(__file__).resolve().parents[2] / "shared" / "static" / "vendor" / "uplot"


def test_the_charts_data_is_the_apis_and_the_vendored_uplot_is_served(referral):
    board = referral.client("ops").get("/dashboard").json()
    browser = httpx.Client(base_url=referral.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(referral.settings, "referral", "ops", NOW)  # dated by the service's frozen clock
    assert use_sign_in_link(browser, link).status_code == 200
    page = browser.get("/tableau-de-bord")
    browser.close()
    assert page.status_code == 200
    figures = dict(
        re.findall(r'<figure class="chart" id="graphique-(\w+)".*?data-chart=\'([^\']*)\'.*?</figure>', page.text, re.S)
    )
    charts = {name: json.loads(data) for name, data in figures.items()}
    zone = ZoneInfo(board["timezone"])
    needs, answers = board["charts"]["needs_per_hour"], board["charts"]["answer_times"]
    assert charts["flux"] == {
        "x": "Heure",
        "y": "Demandes",
        "counts": [b["count"] for b in needs],
        "labels": [f"{datetime.fromisoformat(b['start']).astimezone(zone).hour} h" for b in needs],
    }
    assert charts["reponses"] == {
        "x": "Délai",
        "y": "Réponses",
        "counts": [0, 4, 1, 0, 0, 0, 1],
        "labels": [b["label"] for b in answers],
    }
    assert [b["count"] for b in answers] == [0, 4, 1, 0, 0, 0, 1]
    # the table under each chart has the same rows
    for name, chart in charts.items():
        block = search(rf'id="graphique-{name}".*?<tbody>(.*?)</tbody>', page.text, re.S).group(1)
        rows = re.findall(r'<tr><td>(.*?)</td><td class="num">(\d+)</td></tr>', block)
        assert rows == [(label, str(count)) for label, count in zip(chart["labels"], chart["counts"], strict=True)]
    assert '<script src="/static/vendor/uplot/uPlot.iife.min.js" defer></script>' in page.text
    assert '<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">' in page.text

    for name, kind in (
        ("uPlot.iife.min.js", ("text/javascript", "application/javascript")),
        ("uPlot.min.css", ("text/css",)),
        ("LICENSE", None),
    ):
        answer = httpx.get(f"{referral.url}/static/vendor/uplot/{name}")
        assert answer.status_code == 200 and answer.content == (UPLOT / name).read_bytes()
        if kind:
            assert answer.headers["content-type"].split(";")[0].strip() in kind, answer.headers["content-type"]
    assert b"uPlot (v1.6.32)" in (UPLOT / "uPlot.iife.min.js").read_bytes()[:100]


def test_a_timer_left_unfired_is_counted_overdue(tmp_path):
    """The clock normally fires every due timer within a second: an overdue one means it is stuck. Checked on the
    query itself, because a running referral service would fire the timer at once."""
    from services.referral import dashboard
    from services.referral.store import TABLES
    from shared.db import Database

    db = Database(f"sqlite:///{tmp_path / 'referral.db'}", TABLES)
    db.create_all()
    with db.transaction() as s:
        s.add(
            NeedCase(
                need_id="n1", library_id="chatelet", category="caf", summary="x", urgency="normal", recorded_at=NOW
            )
        )
        s.flush()
        s.add(ClockTimer(need_id="n1", kind="reminder", number=1, due_at=NOW - 2 * timedelta(minutes=1)))
        s.add(ClockTimer(need_id="n1", kind="breach", number=0, due_at=NOW - timedelta(seconds=30)))
    with db.read() as s:
        assert dashboard.clock(s, NOW).overdue == 1  # due 2 min ago; the other only 30 s
    db.dispose()


def signed_in(service, user_id: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(service.settings, "referral", user_id, now=service.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def csrf_of(html: str) -> str:
    return search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_a_stopped_consumer_is_marked_stuck_and_a_dead_letter_replayed_after_a_fix(
    settings, start_service, monkeypatch, tmp_path
):
    monkeypatch.setattr(queues, "LIVE_CONSUMER_IDLE_MS", 1500)  # silent 1.5 s = gone, instead of 30 s
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    desk = intake.client("desk")
    need = desk.post(
        "/needs",
        json={"library_id": "chatelet", "category": "caf", "summary": "x", "postal_code": "76000", "consent": True},
    ).json()
    wait_for(lambda: desk.get(f"/needs/{need['id']}").json()["status"] == "referred")

    def intake_group(board):
        stream = next(s for s in board["queues"]["streams"] if s["name"] == "referrals")
        return next(g for g in stream["groups"] if g["name"] == "intake")

    assert not intake_group(ops.get("/dashboard").json())["stuck"]
    intake.stop()  # its consumer is gone; referral events for it pile up
    from tests.helpers import record_need

    record_need(referral.svc)
    group = wait_for(lambda: (g := intake_group(ops.get("/dashboard").json()))["stuck"] and g, 20)
    assert group and group["problems"] == ["no_live_consumer"] and group["lag"] >= 1
    browser = signed_in(referral, "ops")
    page = browser.get("/tableau-de-bord")  # the first tab says it in one line, the technical tab in full
    summary = search(r'<p class="notice notice-error" id="etat-technique">(.*?)</p>', page.text).group(1)
    assert "1 file d'attente bloquée" in summary and 'href="/tableau-de-bord/technique"' in summary
    page = browser.get("/tableau-de-bord/technique")
    assert "Bloquée" in page.text and "aucun lecteur actif alors que des messages attendent" in page.text

    # A need from a library the directory does not know yet fails routing every time: it is dead-lettered.
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    event = need_recorded(
        referral.svc.personal_data,
        need_id="n-new-library",
        library_id="bois-guillaume",
        category="caf",
        summary="x",
        postal_code="76230",
        urgency="normal",
        recorded_at=utcnow(),
    )
    import json

    from shared.messaging import DATA_FIELD

    client.xadd(
        settings.key("needs"),
        {
            DATA_FIELD: json.dumps({"data": event.model_dump_json(), "headers": {}}),
            "type": event.type,
            "event_id": event.event_id,
            "need_id": event.need_id,
        },
    )
    needs = lambda: next(s for s in ops.get("/dashboard").json()["queues"]["streams"] if s["name"] == "needs")  # noqa: E731
    assert wait_for(lambda: needs()["dead_letters"] == 1, 30)

    # The fix: the library is added to the directory (and reloaded, as SIGHUP does). Then replay from the page.
    data = directory_data()
    data["libraries"].append(
        {
            "id": "bois-guillaume",
            "name": "Médiathèque de Bois-Guillaume",
            "timezone": "Europe/Paris",
            "territory": ["76230"],
            "contacts": [{"name": "Accueil", "email": "accueil@bg.test.example"}],
        }
    )
    settings.directory.write_text(yaml.safe_dump(data, allow_unicode=True))
    referral.svc.reload_directory()
    browser = signed_in(referral, "ops")
    confirm = browser.get("/tableau-de-bord/confirmer/rejouer", params={"flux": "needs"})
    assert confirm.status_code == 200 and "bois-guillaume" in confirm.text
    refused = browser.post("/tableau-de-bord/actions/rejouer", data={"csrf": csrf_of(confirm.text), "flux": "needs"})
    assert refused.status_code == 422 and 'aria-invalid="true"' in refused.text  # the reason is required
    done = browser.post(
        "/tableau-de-bord/actions/rejouer",
        data={"csrf": csrf_of(confirm.text), "flux": "needs", "motif": "Bibliothèque ajoutée"},
    )
    assert done.status_code == 200 and done.url.path == "/tableau-de-bord/technique"
    assert "Messages rejoués : 1" in done.text
    routed = wait_for(lambda: ops.get("/referrals", params={"need_id": "n-new-library"}).json()["items"], 30)
    assert routed and routed[0]["partner_id"] == "caf-76"
    assert needs()["dead_letters"] == 0
    with referral.svc.db.read() as s:
        assert [(a.actor, a.action, a.target, a.reason) for a in s.exec(select(OpsAction))] == [
            ("ops", "replay", "needs:*", "Bibliothèque ajoutée")
        ]
    client.close()
