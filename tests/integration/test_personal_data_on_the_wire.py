"""Issue 12, "done means": no personal data in clear on the broker. A need with a distinctive name, email, phone and
summary goes the whole path (intake → referral → notifications: the partner's handoff email and the person's
confirmation); then every key of the namespace (dead-letter streams included), every command the services sent
Redis (MONITOR: what an AOF would record) and every log line (all loggers, DEBUG) is searched for the four values.
And a person erased before a consumer read their need: the need is recorded with the marker, never dead-lettered."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import threading
from typing import Any

import redis

from shared.events import DEAD_LETTER_SUFFIX, NEEDS
from shared.messaging import dead_letter
from shared.people import ERASED
from shared.testing import wait_for

NAME = "Zéphyrine Quartzbottle"
EMAIL = "zephyrine.quartzbottle@example.org"
PHONE_TYPED, PHONE_E164 = "06 12 34 56 78", "+33612345678"
SUMMARY = "Xylophage-Quintessence : loyer impayé, l’huissier passe jeudi"
# Plain ASCII pieces of each value: they survive any escaping (JSON in JSON, \u00e9) that the full forms might not.
TOKENS = ("Quartzbottle", "zephyrine", "612345678", "12 34 56 78", "Xylophage", "Quintessence", "huissier")


def forms(value: str) -> set[bytes]:
    """The ways a value could sit in Redis or a log line in clear: as typed, and JSON-escaped once or twice (the
    stream envelope is JSON holding the event's JSON, with \u00e9 escapes)."""
    once = json.dumps(value)[1:-1]
    return {v.encode() for v in (value, once, json.dumps(once)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1])}


SECRETS = [form.lower() for value in (NAME, EMAIL, PHONE_TYPED, PHONE_E164, SUMMARY, *TOKENS) for form in forms(value)]
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")


def leaks(blob: bytes) -> list[bytes]:
    """The secrets found in `blob`, in clear or inside any run of base64 in it (decoded, standard or URL-safe)."""
    decoded = []
    for run in BASE64_RUN.findall(blob):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            with contextlib.suppress(ValueError):
                decoded.append(decode(run + b"=" * (-len(run) % 4)))
    lowered = b"\n".join([blob, *decoded]).lower()
    return [secret for secret in SECRETS if secret in lowered]


def test_the_scan_finds_the_values_in_clear_escaped_or_base64():
    event = json.dumps({"summary": SUMMARY, "person": {"display_name": NAME}})
    envelope = json.dumps({"data": event}).encode()  # as the relay writes a stream entry: \\u00e9, JSON in JSON
    assert leaks(envelope) and leaks(NAME.encode()) and leaks(PHONE_E164.encode())
    assert leaks(b'{"ciphertext": "' + base64.b64encode(b"x" + event.encode()) + b'"}')  # unaligned base64
    assert not leaks(b'{"ciphertext": "' + base64.b64encode(os.urandom(200)) + b'"}')


def namespace_dump(client: Any, namespace: str) -> dict[str, bytes]:
    """Every key of the namespace, read by its type (SCAN + TYPE), as bytes."""
    dump: dict[str, bytes] = {}
    for key in client.scan_iter(match=f"{namespace}:*", count=500):
        kind = client.type(key).decode()
        if kind == "string":
            parts = [client.get(key) or b""]
        elif kind == "hash":
            parts = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == "list":
            parts = client.lrange(key, 0, -1)
        elif kind == "set":
            parts = list(client.smembers(key))
        elif kind == "zset":
            parts = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [b for _, fields in client.xrange(key) for pair in fields.items() for b in pair]
        else:
            raise AssertionError(f"{key!r}: a {kind} this scan cannot read")
        dump[f"{key.decode()} ({kind})"] = b"\n".join(parts)
    return dump


class Monitor:
    """Every command Redis receives while it runs (MONITOR), as an AOF would keep the writes."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.commands: list[bytes] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def run(self) -> None:
        try:
            with self.client.monitor() as monitor:
                self.connection = monitor.connection
                self.ready.set()
                for command in monitor.listen():
                    self.commands.append(command["command"].encode("utf-8", "surrogateescape"))
        except (redis.ConnectionError, OSError, AttributeError, ValueError):
            return  # stopped

    def stop(self) -> list[bytes]:
        self.connection.disconnect()
        self.thread.join(10)
        self.client.close()
        return self.commands


def test_no_personal_data_in_clear_in_redis_or_the_logs(settings, mail_sink, start_service, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level (the capture sees records before any masking)
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    monitor = Monitor(settings.redis_url)
    intake = start_service("intake", settings)
    start_service("referral", settings)
    notifications = start_service("notifications", settings)
    person = {"display_name": NAME, "email": EMAIL, "phone": PHONE_TYPED, "preferred_channel": "email"}
    with intake.client("desk") as desk:
        r = desk.post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": SUMMARY,
                "postal_code": "76000",
                "consent": True,
                "person": person,
            },
        )
        assert r.status_code == 201, r.text
        need = r.json()
        # The whole path ran: the partner's handoff and the person's confirmation were sent, the desk sees it referred.
        assert wait_for(lambda: mail_sink.to("referent@caf.test.example"), 30)
        assert wait_for(lambda: mail_sink.to(EMAIL), 30), "the person's confirmation was not sent"
        assert wait_for(lambda: desk.get(f"/needs/{need['id']}").json()["status"] == "referred", 30)
        assert desk.get(f"/needs/{need['id']}").json()["summary"] == SUMMARY  # intake itself still shows it
    with notifications.client("ops") as ops:
        sent = wait_for(
            lambda: (
                {
                    d["kind"]
                    for d in ops.get("/deliveries", params={"need_id": need["id"]}).json()["items"]
                    if d["status"] == "sent"
                }
                >= {"handoff", "person_confirmation"}
            ),
            30,
        )
        assert sent

    client: Any = redis.Redis.from_url(settings.redis_url)  # redis-py's reply types are too loose for mypy here
    try:
        # A dead letter of the need's event, made by the consumers' own code, so the .dlq stream is scanned too.
        stream = settings.key(NEEDS)
        client.xgroup_create(stream, "scan", id="0")
        [[_, [(entry_id, fields)]]] = client.xreadgroup("scan", "scan-1", {stream: ">"}, count=1)
        import asyncio

        import redis.asyncio as aioredis

        async def to_dead_letters() -> None:
            async_client = aioredis.Redis.from_url(settings.redis_url)
            await dead_letter(async_client, stream, "scan", entry_id, fields, "RuntimeError: a scan test's failure")
            await async_client.aclose()

        asyncio.run(to_dead_letters())
        dump = namespace_dump(client, settings.namespace)
    finally:
        client.close()
    commands = monitor.stop()

    assert f"{stream}{DEAD_LETTER_SUFFIX} (stream)" in dump and settings.key("person-keys") + " (hash)" in dump
    assert need["id"].encode() in dump[f"{stream} (stream)"]  # the scan reads what it should
    for key, blob in dump.items():
        assert not leaks(blob), f"{key} holds personal data in clear: {leaks(blob)}"
    ours = [c for c in commands if settings.namespace.encode() in c]
    assert any(b"XADD" in c.upper() and need["id"].encode() in c for c in ours), "MONITOR missed the event's XADD"
    for command in ours:
        assert not leaks(command), f"a command sent to Redis holds personal data in clear: {command[:300]!r}"

    # Every record but those of aiosmtpd's "mail.log": the SMTP server receiving the mail (the test's sink, standing
    # in for the deployment's mail server; in `relais up`, shared.logs.configure keeps it below WARNING).
    records = [record for record in caplog.records if not record.name.startswith("mail.log")]
    lines = [
        *(caplog.handler.format(record) for record in records),
        *(json.dumps(vars(record), default=str, ensure_ascii=False) for record in records),
    ]
    logged = "\n".join(lines).encode()
    assert need["id"].encode() in logged, "no log line names the need: the capture missed the services' logs"
    assert any(r.levelno == logging.DEBUG for r in records), "no DEBUG line was captured"
    assert {"relais.events", "relais.http"} <= {r.name for r in records}
    leaking = sorted({r.name for r in records if leaks(json.dumps(vars(r), default=str, ensure_ascii=False).encode())})
    assert not leaks(logged), f"personal data in the logs: {leaks(logged)} (loggers: {leaking})"


def test_a_person_erased_before_the_event_is_read_is_recorded_with_the_marker(settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)  # referral and notifications are not running yet
    with intake.client("desk") as desk:
        need = desk.post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": "caf",
                "summary": SUMMARY,
                "postal_code": "76000",
                "consent": True,
                "person": {"display_name": NAME, "email": EMAIL, "preferred_channel": "email"},
            },
        ).json()
    client = redis.Redis.from_url(settings.redis_url)
    assert wait_for(lambda: client.xlen(settings.key(NEEDS)) == 1)  # published, not yet read by anyone
    from services.intake.store import Need

    with intake.svc.db.read() as session:
        person_id = session.get_one(Need, need["id"]).person_id
    assert intake.svc.personal_data.forget(person_id)  # what intake's erasure does

    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)
    from services.notifications.store import NeedPerson
    from services.referral.store import NeedCase

    def case():
        with referral.svc.db.read() as session:
            return session.get(NeedCase, need["id"])

    recorded = wait_for(case, 30)
    assert (recorded.summary, recorded.person_display_name, recorded.person_email) == (ERASED, ERASED, None)
    assert recorded.preferred_channel == "none"
    # Routed all the same (figures count it); the partner is told, the person is not (no address is left).
    assert wait_for(lambda: mail_sink.to("referent@caf.test.example"), 30)
    with notifications.svc.db.read() as session:
        person = session.get(NeedPerson, need["id"])
    assert person is not None and (person.email, person.phone, person.preferred_channel) == (None, None, "none")
    with notifications.client("ops") as ops:
        kinds = {d["kind"]: d["status"] for d in ops.get("/deliveries", params={"need_id": need["id"]}).json()["items"]}
    assert kinds.get("person_confirmation") in (None, "suppressed") and not mail_sink.to(EMAIL)
    # Never a dead letter: both consumers acknowledged it.
    assert client.xlen(settings.key(NEEDS) + DEAD_LETTER_SUFFIX) == 0
    for group in client.xinfo_groups(settings.key(NEEDS)):
        assert group["pending"] == 0, group
    client.close()
