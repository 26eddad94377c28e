"""Sessions and sign-in tried as an attacker would, over real HTTP, real Redis and real SMTP servers: a copied
session cookie after sign-out, a lost phone, login CSRF, link requests without end, the outbox page, and events
forged straight into the streams (docs/security.md, "Sessions, sign-in and what crosses Redis")."""

from __future__ import annotations

import json
from email import message_from_bytes, policy

import httpx
import pytest
import redis
from sqlmodel import col, select

from shared.db import OutboxMessage, ProcessedEvent
from shared.devstack import MailSink
from shared.events import STREAM_OF, AccessLinkRequested, new_id, utcnow
from shared.messaging import stream_fields
from shared.signin import (
    SIGN_IN_REQUESTS_PER_CLIENT,
    SIGN_IN_REQUESTS_PER_WINDOW,
    new_sign_in_request,
    sign_in_link,
    sign_in_reference,
)
from shared.testing import DESK_EMAIL, sign_in_link_of, use_sign_in_link, wait_for
from tests.helpers import search, xrange_text

STRANGER = "intrus@evil.test.example"


def browser(service, client_address: str | None = None) -> httpx.Client:
    """A browser of its own (its own cookies), optionally from another loopback address."""
    transport = httpx.HTTPTransport(local_address=client_address) if client_address else None
    return httpx.Client(base_url=service.url, follow_redirects=True, timeout=30, transport=transport)


def csrf_of(html: str) -> str:
    return search(r'name="csrf" value="([^"]+)"', html).group(1)


def path_of(link: str) -> str:
    return httpx.URL(link).raw_path.decode()


def signed_in(service, user_id: str) -> tuple[httpx.Client, httpx.Response]:
    client = browser(service)
    link, _ = sign_in_link(service.settings, service.name, user_id, now=service.svc.clock())
    home = use_sign_in_link(client, link)
    assert home.status_code == 200 and home.url.path != "/connexion"
    return client, home


def ask_for_link(client: httpx.Client, email: str, **headers: str) -> httpx.Response:
    csrf = csrf_of(client.get("/connexion").text)
    return client.post("/connexion", data={"csrf": csrf, "email": email}, headers=headers)


def access_events(service) -> list[dict]:
    with service.svc.db.read() as session:
        return [
            json.loads(m.payload)
            for m in session.exec(
                select(OutboxMessage)
                .where(OutboxMessage.type == "access.link_requested")
                .order_by(col(OutboxMessage.id))
            ).all()
        ]


@pytest.fixture
def intake(settings, start_service):
    return start_service("intake", settings)


# --- 1. sessions end on the server -----------------------------------------------------------------


def test_a_copied_session_cookie_stops_working_when_its_owner_signs_out(intake):
    owner, home = signed_in(intake, "desk")
    thief = browser(intake)
    thief.cookies.set("relais_intake_session", owner.cookies["relais_intake_session"])
    assert thief.get("/nouvelle").url.path == "/nouvelle"  # the copy works while the session lives

    signed_out = owner.post("/deconnexion", data={"csrf": csrf_of(home.text)})
    assert signed_out.url.path == "/connexion"

    stolen = thief.get("/nouvelle")
    assert stolen.url.path == "/connexion" and "<h1>Connexion</h1>" in stolen.text
    assert thief.get("/demandes").url.path == "/connexion"


def test_ops_revoke_every_session_of_a_user_on_every_service_with_one_call(settings, intake, start_service):
    referral = start_service("referral", settings)
    lost_phone, _ = signed_in(intake, "desk")
    other_desk, _ = signed_in(intake, "desk2")
    partner, _ = signed_in(referral, "op-caf")

    with referral.client("desk") as desk_api:
        assert desk_api.post("/users/desk/sessions/revoke").status_code == 403
    with referral.client() as anonymous:
        assert anonymous.post("/users/desk/sessions/revoke").status_code == 401
    with referral.client("ops") as ops:
        assert ops.post("/users/nobody/sessions/revoke").status_code == 404
        revoked = ops.post("/users/desk/sessions/revoke")  # on referral: intake honours it too
    assert revoked.status_code == 200 and revoked.json() == {"user_id": "desk", "revoked": 1}

    assert lost_phone.get("/nouvelle").url.path == "/connexion"
    assert other_desk.get("/nouvelle").url.path == "/nouvelle"  # another user's session is untouched
    assert partner.get("/boite").url.path == "/boite"
    with intake.client("ops") as ops:
        assert ops.post("/users/op-caf/sessions/revoke").json()["revoked"] == 1
    assert partner.get("/boite").url.path == "/connexion"
    # a fresh link still signs the user in: revocation ends sessions, not the account
    again, _ = signed_in(intake, "desk")
    assert again.get("/nouvelle").url.path == "/nouvelle"


# --- 2. login CSRF -------------------------------------------------------------------------------------


def test_sign_in_posts_sent_from_another_site_are_refused(intake):
    client = browser(intake)
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.test.example"},
        {"Origin": "null"},
    ):
        refused = ask_for_link(client, DESK_EMAIL, **headers)
        assert refused.status_code == 403 and "Demande refusée" in refused.text, headers
    assert access_events(intake) == []
    assert ask_for_link(client, DESK_EMAIL, Origin=intake.url, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200

    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    page = client.get(path_of(link))
    forged = client.post(
        path_of(link), data={"csrf": csrf_of(page.text)}, headers={"Origin": "https://evil.test.example"}
    )
    assert forged.status_code == 403 and "Demande refusée" in forged.text
    assert client.get("/nouvelle").url.path == "/connexion"
    assert use_sign_in_link(client, link).url.path == "/nouvelle"  # the refused POST did not spend the link


@pytest.mark.postgres  # single-use tokens and counts under unique constraints
def test_a_sign_in_link_is_confirmed_only_in_the_browser_that_opened_it(intake):
    # The attacker opens a link to their own account and hands its form to a victim's browser (login CSRF).
    attacker = browser(intake)
    link, _ = sign_in_link(intake.settings, "intake", "desk2", now=intake.svc.clock())
    form = csrf_of(attacker.get(path_of(link)).text)
    victim = browser(intake)
    refused = victim.post(path_of(link), data={"csrf": form})
    assert refused.status_code == 403 and "Lien ouvert dans un autre navigateur" in refused.text
    assert victim.get("/nouvelle").url.path == "/connexion"
    # with a confirmation cookie of its own (the victim opened some link once), the form still does not match
    victim.get(path_of(sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())[0]))
    assert victim.post(path_of(link), data={"csrf": form}).status_code == 403
    assert victim.get("/nouvelle").url.path == "/connexion"
    # the browser that opened the link signs in with it
    assert attacker.post(path_of(link), data={"csrf": form}).url.path == "/nouvelle"


# --- 3. rate limits ------------------------------------------------------------------------------------


def test_one_client_address_cannot_ask_for_links_without_end(intake):
    stranger = browser(intake, "127.0.0.3")
    for n in range(SIGN_IN_REQUESTS_PER_CLIENT):
        assert ask_for_link(stranger, f"personne{n}@test.example").status_code == 200
    limited = ask_for_link(stranger, "encore@test.example")
    assert limited.status_code == 429 and "depuis cette connexion" in limited.text
    # another client is not affected
    assert ask_for_link(browser(intake), DESK_EMAIL).status_code == 200


@pytest.mark.postgres  # single-use tokens and counts under unique constraints
def test_one_address_gets_a_few_links_whoever_asks_and_is_not_mail_bombed(settings, intake, start_service):
    sink = MailSink()
    sink.controller.start()
    try:
        start_service("notifications", settings.model_copy(update={"smtp_url": sink.url}))
        answers = [
            ask_for_link(browser(intake, f"127.0.0.{10 + n}"), DESK_EMAIL).status_code
            for n in range(SIGN_IN_REQUESTS_PER_WINDOW + 3)
        ]  # from as many client addresses
        assert answers == [200] * SIGN_IN_REQUESTS_PER_WINDOW + [429] * 3
        assert (
            len(wait_for(lambda: len(access_events(intake)) == SIGN_IN_REQUESTS_PER_WINDOW and access_events(intake)))
            == SIGN_IN_REQUESTS_PER_WINDOW
        )
        assert (
            len(wait_for(lambda: len(sink.to(DESK_EMAIL)) >= SIGN_IN_REQUESTS_PER_WINDOW and sink.to(DESK_EMAIL)))
            == SIGN_IN_REQUESTS_PER_WINDOW
        )
    finally:
        sink.controller.stop()


def test_a_stranger_cannot_lock_the_owner_of_an_address_out(intake):
    stranger = browser(intake, "127.0.0.4")
    for _ in range(SIGN_IN_REQUESTS_PER_WINDOW):
        ask_for_link(stranger, DESK_EMAIL)
    owner = browser(intake)
    limited = ask_for_link(owner, DESK_EMAIL)
    assert limited.status_code == 429 and "utilisez le dernier lien reçu" in limited.text

    # The links the stranger made Relais send reached the owner's mailbox: using one is never limited ...
    links = [sign_in_link_of(intake, e) for e in wait_for(lambda: access_events(intake))]
    assert use_sign_in_link(owner, links[-1]).url.path == "/nouvelle"
    # ... and proves the address is theirs: the stranger's requests no longer count against it.
    assert ask_for_link(browser(intake), DESK_EMAIL).status_code == 200


# --- 4. the outbox page ----------------------------------------------------------------------------------


def test_the_outbox_page_never_shows_a_live_sign_in_link_not_even_to_ops(settings, start_service, tmp_path):
    sink = MailSink(tmp_path / "mail")  # the sink of `relais up`, whose messages the outbox page shows
    sink.controller.start()
    try:
        notifications = start_service(
            "notifications",
            settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{sink.port}", "mail_sink_dir": sink.folder}),
        )
        ops, _ = signed_in(notifications, "ops")
        asked = browser(notifications)
        assert ask_for_link(asked, DESK_EMAIL.replace("agent", "x")).status_code == 200  # unknown: nothing sent
        assert ask_for_link(asked, "ops@coordination.test.example").status_code == 200

        def sent() -> list:
            with notifications.svc.db.read() as session:
                from services.notifications.store import Delivery

                return session.exec(select(Delivery).where(Delivery.kind == "sign_in", Delivery.status == "sent")).all()

        [delivery] = wait_for(sent)
        assert sink.folder is not None
        [eml] = list(sink.folder.glob("*.eml"))  # what its recipient got
        body = message_from_bytes(eml.read_bytes(), policy=policy.default).get_body(("plain",))
        assert body is not None
        live = search(r"https?://\S+/connexion/[A-Za-z0-9_.\-]+", body.get_content()).group(0)
        token = live.rsplit("/", 1)[1]
        assert token not in delivery.body_text and delivery.body_html is None  # the credential is not kept, once sent

        listing = ops.get("/envois")
        page = ops.get(f"/envois/{delivery.id}")
        preview = ops.get(f"/envois/{delivery.id}/apercu")
        assert page.status_code == 200 and "Version texte" in page.text
        for shown in (listing.text, page.text, preview.text):
            assert token not in shown
        assert "/connexion/••••••" in page.text and "/connexion/••••••" in preview.text
        assert "Le lien de connexion est masqué ici" in page.text
        assert "n'a été envoyé qu'à ops@coordination.test.example" in page.text
        # the link itself still works for the person it was sent to
        assert use_sign_in_link(browser(notifications), live).url.path == "/envois"
    finally:
        sink.controller.stop()


# --- 5 and 6. what crosses Redis, and events forged into it ---------------------------------------------


def xadd(settings, event_type: str, payload: dict) -> str:
    """Write an entry straight into a stream, in the envelope the services use, as someone with Redis access
    could; returns the event id."""
    payload = {"event_id": new_id(), "occurred_at": utcnow().isoformat(), **payload, "type": event_type}
    row = OutboxMessage(
        event_id=payload["event_id"],
        stream=STREAM_OF[event_type],
        type=event_type,
        payload=json.dumps(payload),
        created_at=utcnow(),
    )
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.xadd(settings.key(row.stream), stream_fields(row))
    finally:
        client.close()
    return payload["event_id"]


def dead_letters(settings, stream: str) -> list[str]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        return [fields["event_id"] for fields in xrange_text(client, settings.key(stream) + ".dlq")]
    finally:
        client.close()


def test_forged_events_make_relais_mail_no_address_the_directory_does_not_know(settings, start_service):
    sink = MailSink()
    sink.controller.start()
    try:
        notifications = start_service(
            "notifications",
            settings.model_copy(update={"smtp_url": sink.url, "public_url": "https://relais.test.example"}),
        )
        later = notifications.svc.clock().isoformat()
        forged = [
            # the event as it was before: an address and a link of the forger's choosing
            xadd(
                settings,
                "access.link_requested",
                {
                    "version": 1,
                    "need_id": None,
                    "user_id": "desk",
                    "email": STRANGER,
                    "link": "https://evil.test.example/connexion/x",
                    "expires_at": later,
                    "service": "intake",
                },
            ),
            # today's shape with a reference the forger signed with a key of their own
            xadd(
                settings,
                "access.link_requested",
                {
                    "version": 2,
                    "need_id": None,
                    "user_id": "desk",
                    "service": "intake",
                    "expires_at": later,
                    "reference": sign_in_reference(
                        settings.model_copy(update={"secret_key": "guessed"}),
                        new_sign_in_request("intake", "desk", now=notifications.svc.clock()),
                    ),
                },
            ),
            # a genuine reference (read from the stream) put in an event naming another user
            xadd(
                settings,
                "access.link_requested",
                {
                    "version": 2,
                    "need_id": None,
                    "user_id": "ops",
                    "service": "notifications",
                    "expires_at": later,
                    "reference": sign_in_reference(
                        settings, new_sign_in_request("intake", "desk", now=notifications.svc.clock())
                    ),
                },
            ),
            # a referral event carrying an address for the partner
            xadd(
                settings,
                "referral.assigned",
                {
                    "need_id": new_id(),
                    "sequence": 1,
                    "referral_id": new_id(),
                    "partner_id": "caf-76",
                    "library_id": "chatelet",
                    "category": "caf",
                    "contact_id": "caf-ref",
                    "respond_by": later,
                    "routed_because": "x",
                    "contact_email": STRANGER,
                },
            ),
            # a referral event for a partner the directory does not know
            xadd(
                settings,
                "referral.escalated",
                {
                    "need_id": new_id(),
                    "sequence": 1,
                    "referral_id": new_id(),
                    "partner_id": "evil-partner",
                    "library_id": "chatelet",
                    "category": "caf",
                    "contact_id": "evil",
                    "respond_by": later,
                },
            ),
        ]
        assert wait_for(
            lambda: set(forged) <= set(dead_letters(settings, "access") + dead_letters(settings, "referrals")), 30
        )

        # A genuine request is mailed to the directory's address, with a link built from notifications' settings;
        # written again into the stream (a new event id, the same reference), it sends nothing more.
        request = new_sign_in_request("intake", "desk", now=notifications.svc.clock())
        genuine = AccessLinkRequested(
            user_id="desk",
            service="intake",
            reference=sign_in_reference(settings, request),
            expires_at=request.expires_at,
        )
        first = xadd(settings, "access.link_requested", json.loads(genuine.model_dump_json()))
        replayed = xadd(settings, "access.link_requested", json.loads(genuine.model_dump_json()))
        [mail] = wait_for(lambda: sink.to(DESK_EMAIL))
        assert "https://relais.test.example/connexion/" in mail["message"].get_body(("plain",)).get_content()

        def processed() -> set[str]:
            with notifications.svc.db.read() as session:
                return set(session.exec(select(ProcessedEvent.event_id)).all())

        assert wait_for(lambda: {first, replayed} <= processed())
        assert len(sink.to(DESK_EMAIL)) == 1
        with sink.lock:
            assert all(m["to"] == [DESK_EMAIL] for m in sink.messages)
        assert sink.to(STRANGER) == []
    finally:
        sink.controller.stop()


def test_the_access_stream_carries_no_link_and_no_address(intake):
    assert ask_for_link(browser(intake), DESK_EMAIL).status_code == 200
    [event] = wait_for(lambda: access_events(intake))
    client = redis.Redis.from_url(intake.settings.redis_url, decode_responses=True)
    try:
        entries = wait_for(lambda: client.xrange(intake.settings.key("access")))
    finally:
        client.close()
    written = json.dumps(entries)
    link = sign_in_link_of(intake, event)
    assert DESK_EMAIL not in written and link.rsplit("/", 1)[1] not in written and "/connexion/" not in written
    # the reference is no sign-in token: used as one, it is refused
    assert browser(intake).get(f"/connexion/{event['reference']}").status_code == 400


def test_ops_close_a_users_sessions_from_the_dashboard_with_a_reason(settings, intake, start_service):
    referral = start_service("referral", settings)
    lost_phone, _ = signed_in(intake, "desk")
    ops, board = signed_in(referral, "ops")
    board = ops.get("/tableau-de-bord/technique")  # the dashboard's technical tab
    assert "Fermer les sessions d'un utilisateur" in board.text and '<option value="desk">' in board.text

    confirm = ops.get("/tableau-de-bord/confirmer/deconnecter", params={"utilisateur": "desk"})
    assert confirm.status_code == 200 and DESK_EMAIL in confirm.text
    assert ops.get("/tableau-de-bord/confirmer/deconnecter", params={"utilisateur": "nobody"}).status_code == 404
    missing = ops.post(
        "/tableau-de-bord/actions/deconnecter", data={"csrf": csrf_of(confirm.text), "utilisateur": "desk"}
    )
    assert missing.status_code == 422
    assert lost_phone.get("/nouvelle").url.path == "/nouvelle"  # nothing done without a reason

    done = ops.post(
        "/tableau-de-bord/actions/deconnecter",
        data={"csrf": csrf_of(confirm.text), "utilisateur": "desk", "motif": "Téléphone perdu"},
    )
    assert done.url.path == "/tableau-de-bord/technique" and "Sessions fermées : 1." in done.text
    assert lost_phone.get("/nouvelle").url.path == "/connexion"
    assert "Téléphone perdu" in ops.get("/tableau-de-bord").text  # in the journal of ops actions, with who
