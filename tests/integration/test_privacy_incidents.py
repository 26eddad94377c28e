"""The register of confidentiality incidents (issue 12): ops record an incident with what Québec's regulation and
the CNIL's register ask, change it as notifications and measures follow, and export the register as CSV; through
the JSON API (role ops) or the dashboard's pages (signed-in ops, CSRF). Each rule answers a 422 naming the field;
each change leaves an `ops_action` row whichever adapter ran it. A new table: marked postgres."""

from __future__ import annotations

import csv
import html
import io
import re
from datetime import date, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlmodel import col, select

from services.referral.store import OpsAction
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link
from tests.helpers import search

pytestmark = [pytest.mark.postgres, pytest.mark.date_sensitive]  # "not after today" in the directory's time zone


def today(referral) -> date:
    return referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")).date()


def incident(referral, **changes) -> dict:
    day = today(referral)
    return {
        "nature": "confidentiality",
        "information_description": "Noms et numéros de téléphone de personnes orientées vers la CAF",
        "circumstances": "Un tableau exporté a été envoyé par erreur à un partenaire qui n'était pas concerné.",
        "occurred_from": (day - timedelta(days=10)).isoformat(),
        "known_at": (day - timedelta(days=2)).isoformat(),
        "people_count": 12,
        "people_categories": "usagers",
        "consequences": "Démarchage ou gêne possible ; pas de données sensibles.",
        "risk_assessment": "Faible : le destinataire a confirmé la suppression.",
        "measures": "Demande de suppression, confirmation écrite reçue ; export désormais restreint.",
        **changes,
    }


def ops_log(referral) -> list[tuple[str, str, str, str]]:
    with referral.svc.db.read() as session:
        rows = session.exec(select(OpsAction).order_by(col(OpsAction.id))).all()
        return [(a.actor, a.action, a.target, a.reason) for a in rows if a.action.startswith("privacy_incident")]


def failing_fields(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 422, answer.text
    return {".".join(str(part) for part in e["loc"][1:]) for e in answer.json()["detail"]}


def test_ops_record_read_list_change_an_incident_each_in_the_ops_log(settings, start_service):
    referral = start_service("referral", settings)
    ops = referral.client("ops")

    created = ops.post("/privacy-incidents", json=incident(referral, people_count_is_estimate=True))
    assert created.status_code == 201, created.text
    first = created.json()
    assert first["status"] == "open" and first["recorded_by"] == "ops" and first["people_count_is_estimate"]
    assert first["occurred_until"] is None and first["authority_notified_at"] is None
    assert ops.get(f"/privacy-incidents/{first['id']}").json() == first

    second = ops.post("/privacy-incidents", json=incident(referral, nature="availability", records_count=40)).json()
    third = ops.post("/privacy-incidents", json=incident(referral, nature="integrity")).json()
    page = ops.get("/privacy-incidents", params={"limit": 2}).json()
    assert [i["id"] for i in page["items"]] == [third["id"], second["id"]]  # newest first
    rest = ops.get("/privacy-incidents", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [i["id"] for i in rest["items"]] == [first["id"]] and rest["next_cursor"] is None

    # later: the authority and the people were told, the measures grew, the incident is closed
    now = referral.svc.clock()
    changed = ops.patch(
        f"/privacy-incidents/{first['id']}",
        json={
            "serious_risk": True,
            "authority": "CNIL",
            "authority_notified_at": (now - timedelta(hours=3)).isoformat(),
            "people_notified_at": (now - timedelta(hours=1)).isoformat(),
            "people_notice_description": "Courriel à chaque personne",
            "status": "closed",
        },
    )
    assert changed.status_code == 200, changed.text
    after = changed.json()
    assert (after["status"], after["authority"], after["serious_risk"]) == ("closed", "CNIL", True)
    assert after["circumstances"] == first["circumstances"]  # kept
    assert after["updated_at"] > first["updated_at"] and after["recorded_at"] == first["recorded_at"]
    cleared = ops.patch(f"/privacy-incidents/{second['id']}", json={"records_count": None})
    assert cleared.status_code == 200 and cleared.json()["records_count"] is None
    unchanged = ops.patch(f"/privacy-incidents/{third['id']}", json={})
    assert unchanged.status_code == 200 and unchanged.json() == third

    assert ops.get("/privacy-incidents/nope").status_code == 404
    assert ops.patch("/privacy-incidents/nope", json={"status": "closed"}).status_code == 404

    log = ops_log(referral)
    assert [(actor, action, target) for actor, action, target, _ in log] == [
        ("ops", "privacy_incident.record", first["id"]),
        ("ops", "privacy_incident.record", second["id"]),
        ("ops", "privacy_incident.record", third["id"]),
        ("ops", "privacy_incident.update", first["id"]),
        ("ops", "privacy_incident.update", second["id"]),
    ]  # the empty change wrote nothing
    assert log[0][3] == "confidentiality incident, about 12 people, open"
    assert log[3][3].startswith(
        "changed authority, authority_notified_at, people_notice_description, people_notified_at, serious_risk, status"
    )
    assert "Noms" not in " ".join(reason for *_, reason in log)  # the ops log says what kind, not what ops wrote


def test_only_ops_may_see_or_keep_the_register(settings, start_service):
    referral = start_service("referral", settings)
    made = referral.client("ops").post("/privacy-incidents", json=incident(referral)).json()
    calls = [
        ("post", "/privacy-incidents", incident(referral)),
        ("get", "/privacy-incidents", None),
        ("get", "/privacy-incidents.csv", None),
        ("get", f"/privacy-incidents/{made['id']}", None),
        ("patch", f"/privacy-incidents/{made['id']}", {"status": "closed"}),
    ]
    for who, status in (("desk", 403), ("caf", 403), (None, 401)):
        client = referral.client(who)
        for method, path, body in calls:
            answer = client.request(method, path, json=body)
            assert answer.status_code == status, (who, method, path, answer.text)
    assert len(ops_log(referral)) == 1


def test_each_rule_answers_422_naming_its_field(settings, start_service):
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    day, now = today(referral), referral.svc.clock()

    def refused(**changes) -> set[str]:
        return failing_fields(ops.post("/privacy-incidents", json=incident(referral, **changes)))

    assert refused(circumstances="   ", measures="") == {"circumstances", "measures"}
    assert refused(consequences="x" * 4001) == {"consequences"}
    assert refused(nature="lost") == {"nature"}
    assert refused(people_count=-1) == {"people_count"}
    assert refused(occurred_from=(day + timedelta(days=1)).isoformat()) == {"occurred_from", "known_at"}
    assert refused(occurred_until=(day - timedelta(days=11)).isoformat()) == {"occurred_until"}
    assert refused(known_at=(day - timedelta(days=11)).isoformat()) == {"known_at"}
    assert refused(authority="CNIL", authority_notified_at=(now + timedelta(days=1)).isoformat()) == {
        "authority_notified_at"
    }
    assert refused(authority_notified_at=(now - timedelta(hours=1)).isoformat()) == {"authority"}
    assert refused(people_notified_at=(now - timedelta(days=5)).isoformat()) == {"people_notified_at"}
    assert refused(serious_risk=True) == {"notification_note"}
    assert refused(authority_notified_at="2026-01-01T10:00:00") == {"authority_notified_at"}  # no offset
    assert refused(surprise=1) == {"surprise"}
    serious = ops.post("/privacy-incidents", json=incident(referral, serious_risk=True, notification_note="En cours"))
    assert serious.status_code == 201, serious.text

    made = ops.post("/privacy-incidents", json=incident(referral)).json()
    patch = f"/privacy-incidents/{made['id']}"
    assert failing_fields(ops.patch(patch, json={"measures": None})) == {"measures"}  # required: not removable
    early = (date.fromisoformat(made["occurred_from"]) - timedelta(days=1)).isoformat()
    assert failing_fields(ops.patch(patch, json={"occurred_until": early})) == {"occurred_until"}  # with the kept
    assert failing_fields(ops.patch(patch, json={"serious_risk": True})) == {"notification_note"}
    assert ops.get(patch).json() == made  # nothing changed
    assert len(ops_log(referral)) == 2


def test_the_register_as_csv_opens_in_a_spreadsheet_and_runs_no_formula(settings, start_service):
    referral = start_service("referral", settings)
    ops = referral.client("ops")
    assert ops.get("/privacy-incidents.csv").content.startswith("\ufeff".encode())  # empty: the headers alone
    made = ops.post(
        "/privacy-incidents",
        json=incident(
            referral,
            people_categories='=HYPERLINK("http://evil.example")',
            measures="-2+3",
            authority="@CNIL",
            authority_notified_at=referral.svc.clock().isoformat(),
            records_count=30,
        ),
    ).json()
    other = ops.post("/privacy-incidents", json=incident(referral, nature="integrity", status="closed")).json()

    answer = ops.get("/privacy-incidents.csv")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"].startswith('attachment; filename="relais-registre-incidents-')
    assert answer.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(answer.content.decode("utf-8-sig")), delimiter=";"))
    headers, *body = rows
    assert len(headers) == 24 and headers[0] == "Identifiant"
    assert "Nombre de personnes concernées (Québec, CNIL)" in headers
    assert "Conséquences probables pour les personnes (CNIL)" in headers
    assert "Évaluation du risque de préjudice (Québec)" in headers
    assert [r[0] for r in body] == [other["id"], made["id"]]  # one row per incident, newest first
    row = dict(zip(headers, body[1], strict=True))
    assert row["Catégories de personnes concernées (CNIL)"] == '\'=HYPERLINK("http://evil.example")'
    assert row["Mesures prises ou prévues (Québec, CNIL)"] == "'-2+3"
    assert row["Autorité avisée (Commission d'accès à l'information, CNIL)"] == "'@CNIL"
    assert row["Nature de la violation (CNIL : confidentialité, intégrité, disponibilité)"] == (
        "Atteinte à la confidentialité"
    )
    assert row["Nombre approximatif d'enregistrements concernés (CNIL)"] == "30"
    assert row["Risque de préjudice sérieux (Québec) ou risque élevé (CNIL)"] == "non"
    assert row["Statut"] == "En cours" and dict(zip(headers, body[0], strict=True))["Statut"] == "Clos"
    assert row["Date de l'incident ou début de la période (Québec, CNIL)"] == made["occurred_from"]


# --- the pages ---


def signed_in(referral, user_id: str = "ops") -> httpx.Client:
    client = httpx.Client(base_url=referral.url, follow_redirects=True, timeout=30)
    link, _ = sign_in_link(referral.settings, "referral", user_id, now=referral.svc.clock())
    assert use_sign_in_link(client, link).status_code == 200
    return client


def csrf_of(text: str) -> str:
    return search(r'name="csrf" value="([^"]+)"', text).group(1)


def form_of(referral, **changes) -> dict:
    """The new-incident form's fields, filled in as ops would."""
    fields = {k: str(v) for k, v in incident(referral).items()}
    fields["people_count_is_estimate"] = "on"
    return {**fields, **changes}


def test_ops_record_and_change_an_incident_from_the_dashboard(settings, start_service):
    referral = start_service("referral", settings)
    browser = signed_in(referral)
    board = browser.get("/tableau-de-bord")
    assert 'href="/tableau-de-bord/incidents"' in board.text

    empty = browser.get("/tableau-de-bord/incidents")
    assert empty.status_code == 200 and "Aucun incident" in html.unescape(empty.text)
    form = browser.get("/tableau-de-bord/incidents/nouveau")
    assert form.status_code == 200
    csrf = csrf_of(form.text)

    # without the CSRF token: refused, nothing recorded
    forged = browser.post("/tableau-de-bord/incidents/nouveau", data=form_of(referral))
    assert forged.status_code == 403 and not ops_log(referral)

    # errors are shown next to their fields, the values kept
    wrong = browser.post(
        "/tableau-de-bord/incidents/nouveau",
        data=form_of(referral, csrf=csrf, circumstances=" ", people_count="douze", serious_risk="on"),
    )
    text = html.unescape(wrong.text)
    assert wrong.status_code == 422
    assert 'id="circumstances-erreur"' in text and 'id="people_count-erreur"' in text
    assert "Indiquez un nombre" in text and "Noms et numéros de téléphone" in text
    assert not ops_log(referral)

    done = browser.post("/tableau-de-bord/incidents/nouveau", data=form_of(referral, csrf=csrf))
    assert done.status_code == 200, done.text
    assert re.fullmatch(r"/tableau-de-bord/incidents/[0-9a-f]{32}", done.url.path)
    assert done.url.params["fait"] == "inscrit"
    incident_id = done.url.path.rsplit("/", 1)[1]
    assert "L'incident est inscrit au registre" in html.unescape(done.text)
    api = referral.client("ops").get(f"/privacy-incidents/{incident_id}").json()
    assert api["people_count"] == 12 and api["people_count_is_estimate"] and api["recorded_by"] == "ops"
    listed = html.unescape(browser.get("/tableau-de-bord/incidents").text)
    assert f"/tableau-de-bord/incidents/{incident_id}" in listed and 'href="/tableau-de-bord/incidents.csv"' in listed

    # the incident's page changes it: the authority was told, it is closed
    page = browser.get(f"/tableau-de-bord/incidents/{incident_id}")
    notified = referral.svc.clock().astimezone(ZoneInfo("Europe/Paris")) - timedelta(hours=2)
    fields = form_of(
        referral,
        csrf=csrf_of(page.text),
        authority="CNIL",
        authority_notified_at=notified.strftime("%Y-%m-%dT%H:%M"),
        status="closed",
    )
    changed = browser.post(f"/tableau-de-bord/incidents/{incident_id}", data=fields)
    assert changed.status_code == 200 and "Les modifications sont enregistrées" in html.unescape(changed.text)
    api = referral.client("ops").get(f"/privacy-incidents/{incident_id}").json()
    assert api["status"] == "closed" and api["authority"] == "CNIL"
    assert api["authority_notified_at"][:16] == notified.astimezone(ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M")

    spreadsheet = browser.get("/tableau-de-bord/incidents.csv")
    assert spreadsheet.status_code == 200 and spreadsheet.content.startswith(b"\xef\xbb\xbf")
    assert incident_id in spreadsheet.content.decode("utf-8-sig")

    assert [(a, action, target) for a, action, target, _ in ops_log(referral)] == [
        ("ops", "privacy_incident.record", incident_id),
        ("ops", "privacy_incident.update", incident_id),
    ]
    assert browser.get("/tableau-de-bord/incidents/nope").status_code == 404

    partner = signed_in(referral, "op-caf")
    for path in ("/tableau-de-bord/incidents", "/tableau-de-bord/incidents/nouveau", "/tableau-de-bord/incidents.csv"):
        assert partner.get(path).status_code == 403
