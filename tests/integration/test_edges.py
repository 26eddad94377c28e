"""Edges that answer 4xx, never a 500 or a lost need (shared.edges, shared.openapi): body sizes refused before they are
read, the correlation id a caller sends, the longest legal value of every field carried to the handoff email, NUL
characters, lone surrogates, foreign cursors and deep JSON refused, unexpected errors logged as JSON lines.
Services over real HTTP, on SQLite and PostgreSQL (RELAIS_TEST_POSTGRES_URL), with a real Redis."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import Request
from sqlmodel import select as sql_select

from services.intake.store import Need
from shared.db import OutboxMessage
from shared.edges import MAX_BODY_BYTES, body_limit
from shared.testing import clean_env, directory_data, free_port, wait_for
from tests.helpers import RunningService

ROOT = Path(__file__).resolve().parents[2]
HUNDRED_MB = 100 * 1024 * 1024


def a_need(**changes) -> dict:
    return {
        "library_id": "chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "M. D.", "email": "m.d@example.org"},
    } | changes


def stored_needs(intake) -> list[Need]:
    with intake.svc.db.read() as session:
        return list(session.exec(sql_select(Need)).all())


# --- sizes: refused before they are read --------------------------------------------------------------


def _status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def declared_body(port: int, path: str, length: int) -> int:
    """Send only the head of a request declaring `length` bytes of body; the status that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        return _status_of(sock)


def chunked_body(port: int, path: str, total: int = HUNDRED_MB) -> tuple[int, int]:
    """Stream a chunked body of up to `total` bytes, stopping as soon as an answer comes: (status, bytes sent)."""
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(framed)
                sent += len(chunk)
        except OSError:  # the server answered and closed while we were still writing
            pass
        return _status_of(sock), sent


def test_a_100_mb_body_without_a_token_gets_413_before_it_is_read(settings, start_service):
    intake = start_service("intake", settings)
    port = settings.port("intake")
    assert declared_body(port, "/api/v1/needs", HUNDRED_MB) == 413  # the head alone: nothing else was sent
    status, sent = chunked_body(port, "/api/v1/needs")
    assert status == 413 and sent < 32 * 1024 * 1024  # answered long before the 100 MB were through
    # the pages have the same door
    assert declared_body(port, "/nouvelle", HUNDRED_MB) == 413
    assert chunked_body(port, "/nouvelle")[0] == 413
    # and a body at the limit is read: refused for what it says, not for its size
    body = json.dumps(a_need(summary="x" * (MAX_BODY_BYTES - 300))).encode()
    assert len(body) <= MAX_BODY_BYTES
    r = httpx.post(f"{intake.url}/api/v1/needs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert stored_needs(intake) == []


def test_the_sms_webhooks_refuse_a_large_body_before_parsing_it(settings, start_service, mail_sink):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    start_service("notifications", settings)
    port = settings.port("notifications")
    for path in ("/webhooks/sms/brevo", "/webhooks/sms/brevo/not-the-secret", "/webhooks/sms/twilio"):
        assert declared_body(port, path, HUNDRED_MB) == 413, path
        assert chunked_body(port, path)[0] == 413, path


def test_a_route_may_take_larger_bodies_than_the_default(settings):
    """`@body_limit(n)` on a route's endpoint: its own limit, larger (or smaller) than MAX_BODY_BYTES."""
    service = RunningService("intake", settings)

    @body_limit(4 * MAX_BODY_BYTES)
    async def upload(request: Request) -> dict:
        return {"received": len(await request.body())}

    service.svc.app.add_api_route("/api/v1/test-upload", upload, methods=["POST"])
    service.start()
    try:
        big = b"x" * (2 * MAX_BODY_BYTES)
        assert httpx.post(f"{service.url}/api/v1/test-upload", content=big).json() == {"received": len(big)}
        assert declared_body(settings.port("intake"), "/api/v1/test-upload", 4 * MAX_BODY_BYTES + 1) == 413
        assert declared_body(settings.port("intake"), "/api/v1/needs", 2 * MAX_BODY_BYTES) == 413
    finally:
        service.stop()


# --- the correlation id ---------------------------------------------------------------------------------

BAD_IDS = ["x" * 65, "two words", "line\nbreak", "a:b", "é", "<script>", "id\r\nX-Injected: 1"]


@pytest.mark.parametrize("sent", BAD_IDS)
def test_an_unsafe_correlation_id_is_replaced_on_the_api_and_the_pages(settings, start_service, sent, caplog):
    intake = start_service("intake", settings)
    headers = {"X-Correlation-ID": sent.encode("utf-8")}  # bytes: httpx sends them as they are
    if "\n" in sent:  # httpx refuses to send a header with a line break: the raw value goes by socket
        answers = []
        for path in ("/api/v1/needs", "/connexion"):
            with socket.create_connection(("127.0.0.1", settings.port("intake")), timeout=10) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Correlation-ID: {sent}\r\n\r\n".encode())
                answers.append(sock.recv(65536))
        assert all(b"X-Injected" not in a.split(b"\r\n\r\n")[0] for a in answers)
        return
    with intake.client("desk") as desk:
        r = desk.post("/needs", json=a_need(), headers=headers)
    assert r.status_code == 201, r.text
    fresh = r.headers["X-Correlation-ID"]
    assert fresh != sent and len(fresh) == 32
    page = httpx.get(f"{intake.url}/connexion", headers=headers)
    assert page.status_code == 200 and page.headers["X-Correlation-ID"] not in (sent, fresh)
    with intake.svc.db.read() as session:
        events = session.exec(sql_select(OutboxMessage).where(OutboxMessage.type == "need.recorded")).all()
    assert [json.loads(e.payload)["correlation_id"] for e in events] == [fresh]  # stored: the fresh one
    assert all(getattr(record, "correlation_id", None) != sent for record in caplog.records)


def test_a_safe_correlation_id_is_kept_and_carried(settings, start_service):
    intake = start_service("intake", settings)
    sent = "desk-42.Retry_3" + "a" * 49  # 64 characters of the safe alphabet
    with intake.client("desk") as desk:
        r = desk.post("/needs", json=a_need(), headers={"X-Correlation-ID": sent})
    assert r.headers["X-Correlation-ID"] == sent
    assert httpx.get(f"{intake.url}/connexion", headers={"X-Correlation-ID": sent}).headers["X-Correlation-ID"] == sent
    with intake.svc.db.read() as session:
        event = session.exec(sql_select(OutboxMessage).where(OutboxMessage.type == "need.recorded")).one()
    assert json.loads(event.payload)["correlation_id"] == sent


# --- the longest legal value of every field reaches the partner -----------------------------------------

LONG_ID = "l" * 64


def _long_email(prefix: str) -> str:
    """A valid address of exactly 254 characters: a 64-character local part and a long domain under .test."""
    local, labels, room = (prefix + "." + "p" * 64)[:64], [], 254 - 64 - len("@") - len(".test")
    while room > 0:
        labels.append("d" * min(63, room))
        room -= len(labels[-1]) + 1  # and the dot before the next label
    return f"{local}@{'.'.join(labels)}.test"


@pytest.mark.postgres  # column lengths, NUL bytes and ordering differ
def test_the_longest_legal_need_is_routed_and_handed_off(tmp_path, settings, start_service, mail_sink):
    data = directory_data()
    long_contact = _long_email("referent")
    data["categories"].append({"id": "c" * 64, "label": "Catégorie au nom long"})
    data["libraries"][0] = {
        **data["libraries"][0],
        "id": LONG_ID,
        "contacts": [{"name": "Accueil", "email": _long_email("accueil")}],
    }
    data["partners"].append(
        {
            "id": "p" * 64,
            "name": "Partenaire au nom long",
            "categories": ["c" * 64],
            "territory": ["76"],
            "contacts": [{"id": "k" * 64, "name": "Référent", "email": long_contact, "role": "primary"}],
        }
    )
    data["users"][0] = {**data["users"][0], "id": "u" * 64, "library": LONG_ID}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    settings = settings.model_copy(update={"directory": path, "smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    start_service("referral", settings)
    start_service("notifications", settings)
    person_email = _long_email("personne")
    assert len(long_contact) == len(person_email) == 254
    longest: dict[str, Any] = {  # a JSON body
        "library_id": LONG_ID,
        "category": "c" * 64,
        "summary": "💬" * 2000,  # 2000 characters, 4 bytes each in UTF-8
        "postal_code": " 76 0 00  ",  # 10 characters
        "urgency": "urgent",
        "person": {
            "display_name": "Ÿ" * 120,
            "email": person_email,
            "phone": "+33 6 12 34 56 78".ljust(40),
            "preferred_channel": "email",
            "language": "en",
        },
        "consent": True,
    }
    assert len(longest["postal_code"]) == 10 and len(longest["person"]["phone"]) == 40
    headers = {"Idempotency-Key": "k" * 200, "X-Correlation-ID": "c" * 64}
    with intake.client("desk") as desk:
        first = desk.post("/needs", json=longest, headers=headers)
        assert first.status_code == 201, first.text
        second = desk.post(
            "/needs", json=longest | {"same_person_as": first.json()["id"]}, headers={"Idempotency-Key": "j" * 200}
        )
        assert second.status_code == 201, second.text
        for need in (first.json(), second.json()):
            assert wait_for(lambda need=need: desk.get(f"/needs/{need['id']}").json()["status"] == "referred", 30), (
                desk.get(f"/needs/{need['id']}").json()
            )
    handoffs = wait_for(lambda: len(mail_sink.to(long_contact)) >= 2 and mail_sink.to(long_contact), 30)
    assert handoffs, "no handoff email reached the partner"
    assert wait_for(lambda: mail_sink.to(person_email), 30), "the person was not told"


# --- NUL, lone surrogates, cursors, deep JSON -----------------------------------------------------------


def _raw_json(client: httpx.Client, path: str, text: str):
    """POST a JSON text as typed (json.dumps would escape a surrogate the same way, but cannot write a NUL raw)."""
    return client.post(
        path, content=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"}
    )


@pytest.mark.postgres  # column lengths, NUL bytes and ordering differ
@pytest.mark.parametrize("bad", ["\\u0000", "\\ud800", "\\udfff", "a\\ud800b"])
def test_nul_and_lone_surrogates_in_a_text_field_get_422(settings, start_service, bad):
    intake = start_service("intake", settings)
    body = json.dumps(a_need()).replace("Dossier APL", f"Dossier{bad}APL")
    with intake.client("desk") as desk:
        r = _raw_json(desk, "/needs", body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "summary"]
        person = json.dumps(a_need()).replace("M. D.", f"M.{bad}D.")
        assert _raw_json(desk, "/needs", person).json()["detail"][0]["loc"] == ["body", "person", "display_name"]
        key = json.dumps(a_need()).replace('"summary"', f'"sum{bad}mary"')
        assert _raw_json(desk, "/needs", key).status_code == 422
    assert stored_needs(intake) == []


@pytest.mark.postgres  # column lengths, NUL bytes and ordering differ
def test_nul_in_a_path_id_a_filter_or_a_cursor_gets_422(settings, start_service):
    intake = start_service("intake", settings)
    with intake.client("desk") as desk:
        for path in (
            "/needs/abc%00def",
            "/needs?library_id=%00",
            "/needs?status=recorded&cursor=1-ab%00",
            "/needs?q%00=1",
        ):
            r = desk.get(path)
            assert r.status_code == 422, (path, r.text)
        assert desk.post("/needs/a%00b/cancel", json={"reason": "x"}).status_code == 422


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "MjAyNi0xMS0zMFQxMDowMDowMCswMDowMHxhYmM=",
        "12-",
        "-abc",
        "1" * 17 + "-abc",
        "12-" + "a" * 65,
        "12-ab|cd",
        "١٢-abc",
    ],
)
def test_a_cursor_the_service_did_not_write_gets_422(settings, start_service, cursor):
    intake = start_service("intake", settings)
    with intake.client("desk") as desk:
        r = desk.get("/needs", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "cursor"]


@pytest.mark.postgres  # column lengths, NUL bytes and ordering differ
def test_cursors_the_service_wrote_page_through_every_need(settings, start_service):
    intake = start_service("intake", settings)
    with intake.client("desk") as desk:
        ids = {desk.post("/needs", json=a_need(summary=f"n{i}")).json()["id"] for i in range(5)}
        seen, cursor = [], None
        while True:
            page = desk.get("/needs", params={"limit": 2} | ({"cursor": cursor} if cursor else {})).json()
            seen += [n["id"] for n in page["items"]]
            if not (cursor := page["next_cursor"]):
                break
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


def test_nul_in_the_other_services_inputs_gets_422(settings, start_service, mail_sink):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)
    with referral.client("caf") as caf, referral.client("ops") as ops, notifications.client("ops") as n_ops:
        assert _raw_json(caf, "/referrals/abc/respond", '{"message": "ok\\u0000"}').status_code == 422
        assert (
            _raw_json(
                ops, "/partners/caf-76/pause", '{"until": "2999-01-01T00:00:00Z", "reason": "\\ud800"}'
            ).status_code
            == 422
        )
        assert caf.get("/referrals", params={"partner_id": "a\x00"}).status_code == 422
        assert n_ops.get("/deliveries", params={"need_id": "\x00"}).status_code == 422
        assert n_ops.get("/deliveries", params={"cursor": "garbage"}).status_code == 422
    # a form on the pages: the same rule
    r = httpx.post(
        f"{referral.url}/connexion",
        content=b"email=a%00b%40example.org",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422


@pytest.mark.parametrize("depth", [40, 30_000])  # deeper than the parser goes, within 64 KiB
def test_deeply_nested_json_gets_400(settings, start_service, depth):
    intake = start_service("intake", settings)
    nested = "[" * depth + "]" * depth
    with intake.client("desk") as desk:
        for body in (nested, json.dumps(a_need(person={}))[:-1] + f', "same_person_as": {nested}}}'):
            r = _raw_json(desk, "/needs", body)
            assert r.status_code == 400, r.text[:300]
            assert "nested" in r.json()["detail"]
        assert desk.post("/needs", json=a_need()).status_code == 201  # the service is still well


# --- unexpected errors: JSON lines through the masking, no raw traceback --------------------------------

FAILING_SERVICE = textwrap.dedent("""
    import sys
    from shared import logs
    from relais.cli import serve_app
    from shared.settings import Settings
    from services.intake.app import bootstrap

    logs.configure(service="intake")
    svc = bootstrap(Settings())

    @svc.app.get("/api/v1/test-failure")
    def fail():
        raise RuntimeError("the database said no to jeanne.martin@example.org, 06 12 34 56 78")

    serve_app(svc.app, "127.0.0.1", int(sys.argv[1]))
""")


def test_an_unexpected_error_is_one_json_log_line_with_masking(tmp_path, redis_url, namespace, directory_file):
    port = free_port()
    env = clean_env(
        redis_url=redis_url,
        namespace=namespace,
        directory=directory_file,
        data_dir=tmp_path,
        intake_database_url=f"sqlite:///{tmp_path / 'intake.db'}",
        secret_key="s" * 40,
        demo="true",
    )
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", FAILING_SERVICE, str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: _answers(port), 30), "the service did not start"
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/test-failure", headers={"X-Correlation-ID": "probe-1"})
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error; quote probe-1 to ops"}
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not [line for line in lines if not line.startswith("{")], stderr  # every line is a JSON object
    records = [json.loads(line) for line in lines]
    failure = [r for r in records if "RuntimeError" in r.get("exc", "")]
    assert len(failure) == 1, stderr
    assert failure[0]["correlation_id"] == "probe-1" and failure[0]["level"] == "error"
    assert "jeanne.martin@example.org" not in stderr and "06 12 34 56 78" not in stderr
    assert "[email]" in failure[0]["exc"] and "[phone]" in failure[0]["exc"]


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
