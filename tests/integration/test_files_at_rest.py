"""What Relais writes to disk is this user's only, whatever the umask: each piece that creates a file gives it
its mode (the `relais` command also sets umask 077; tests/e2e/test_modes.py checks `relais up` and `relais serve`).
The data dir and its folders 0700; SQLite databases, received mail, Redis's password, config and append-only
file, and the generated secret key 0600."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event

from shared.db import Database
from shared.devstack import MailSink, start_embedded_redis
from shared.settings import Settings
from shared.testing import wait_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The umask most machines have: files 0644 and folders 0755 unless the code says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_data_dir_databases_and_secret_key_are_private(tmp_path, open_umask):
    settings = Settings(data_dir=tmp_path / "data", demo=True)
    db = Database(settings.database_url("intake"), [])
    db.create_all()
    with db.transaction() as session:
        session.connection().execute(sa.text("SELECT 1"))
    db.dispose()
    _ = settings.signing_key
    assert mode(settings.data_dir) == 0o700
    files = [*settings.data_dir.glob("intake.db*"), settings.data_dir / "secret_key"]
    assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o600" for p in files}


def test_a_data_dir_an_older_version_left_open_is_closed(tmp_path, open_umask):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    old_db = data_dir / "referral.db"
    old_db.touch(mode=0o644)
    settings = Settings(data_dir=data_dir)
    Database(settings.database_url("referral"), []).dispose()
    assert mode(data_dir) == 0o700 and mode(old_db) == 0o600


def test_received_mail_is_private(tmp_path, open_umask):
    sink = MailSink(tmp_path / "mail")
    assert sink.folder is not None
    sink.start()
    try:
        with smtplib.SMTP("127.0.0.1", sink.port) as smtp:
            smtp.sendmail("relais@localhost", ["someone@test.example"], b"Subject: lien\r\n\r\nhttps://x/connexion/t")
        [message] = wait_for(lambda: list(sink.folder.glob("*.eml")))
    finally:
        sink.controller.stop()
    assert mode(sink.folder) == 0o700 and mode(message) == 0o600


def test_the_embedded_redis_files_are_private(tmp_path, open_umask):
    folder = tmp_path / "redis"
    proc, url = start_embedded_redis(folder)
    try:
        assert ":" + (folder / "password").read_text().strip() + "@" in url
        files = ["password", "redis.conf", "appendonly.aof"]
        assert mode(folder) == 0o700
        assert {name: oct(mode(folder / name)) for name in files} == dict.fromkeys(files, "0o600")
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_database_file_waits_for_a_writer_to_be_put_in_wal_and_is_switched_only_once(tmp_path):
    """Switching a file to WAL takes its exclusive lock, and SQLite's busy timeout does not wait for it: a
    connection asking for the switch while another process writes used to fail at once with "database is locked"
    (a second replica starting beside the first). It now waits for the writer; once the file is in WAL (a mode
    kept in the file), a new connection only asks."""
    path = tmp_path / "referral.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")  # an older process's write, in the default rollback journal
    writer.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, writer.execute, ["COMMIT"]).start()

    db = Database(f"sqlite:///{path}", [])
    with db.read() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert session.connection().exec_driver_sql("SELECT x FROM t").scalars().all() == [1]
    db.dispose()
    writer.close()

    statements: list[str] = []
    again = Database(f"sqlite:///{path}", [])
    sa_event.listen(again.engine, "connect", lambda conn, _: conn.set_trace_callback(statements.append), insert=True)
    with again.transaction() as session:
        session.connection().exec_driver_sql("SELECT 1")
    again.dispose()
    assert "PRAGMA journal_mode" in statements and "PRAGMA journal_mode=WAL" not in statements
