"""Issue 16, part 2: a partner answers by replying to the handoff email. Through the real paths: the three services
over one Redis, the handoff received by the SMTP sink, the reply sent over SMTP to notifications' listener on
loopback, or posted in Mailgun's documented inbound format (form fields, HMAC-SHA256 of timestamp + token)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import smtplib
import time
from email.message import EmailMessage

import httpx
import pytest
from sqlmodel import select

from services.notifications.store import InboundMail
from shared.testing import free_port, wait_for

DOMAIN = "reponses.test.example"
MAILGUN_KEY = "key-mailgun-test-signing-key-0123456789"
REFERENT = "referent@caf.test.example"


@pytest.fixture
def system(settings, mail_sink, start_service):
    settings = settings.model_copy(
        update={
            "smtp_url": mail_sink.url,
            "inbound_smtp_port": free_port(),
            "inbound_domain": DOMAIN,
            "mailgun_webhook_signing_key": MAILGUN_KEY,
            "inbound_max_bytes": 50_000,
        }
    )
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)
    return settings, intake, referral, notifications


def handed_off(intake, referral, mail_sink) -> tuple[str, str]:
    """Record a need at the desk; the referral's id and the Reply-To of its handoff email."""
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL bloqué",
            "postal_code": "76000",
            "consent": True,
            "person": {
                "display_name": "Mme Quartz",
                "email": "quartz@person.test.example",
                "preferred_channel": "email",
            },
        },
    )
    assert r.status_code == 201, r.text
    need_id = r.json()["id"]
    items = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])
    handoff = wait_for(lambda: [m for m in mail_sink.to(REFERENT) if items[0]["id"] in str(m["message"])])
    assert handoff, "no handoff email"
    return items[0]["id"], str(handoff[0]["message"]["Reply-To"])


def reply(port: int, to: str, text: str, *, sender: str = REFERENT, headers: dict | None = None) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = f"Référent <{sender}>", to, "Re: Nouvelle demande à traiter"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg, from_addr="" if headers and "bounce" in headers.get("X-Test", "") else sender)


def referral_of(referral, referral_id: str) -> dict:
    return referral.client("ops").get(f"/referrals/{referral_id}").json()


def mailgun_fields(recipient: str, text: str, *, sender: str = REFERENT, spf: str = "Pass") -> dict[str, str]:
    timestamp, token = str(int(time.time())), secrets.token_hex(25)
    return {
        "recipient": recipient,
        "sender": sender,
        "from": f"Référent <{sender}>",
        "subject": "Re: Nouvelle demande à traiter",
        "body-plain": text,
        "stripped-text": text.split("\n\nLe ")[0],
        "message-headers": f'[["X-Mailgun-Spf", "{spf}"], ["X-Mailgun-Dkim-Check-Result", "{spf}"]]',
        "timestamp": timestamp,
        "token": token,
        "signature": hmac.new(MAILGUN_KEY.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest(),
    }


@pytest.mark.postgres  # the whole path on the production database
def test_a_reply_over_smtp_accepts_and_a_later_one_is_kept_in_the_history(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, reply_to = handed_off(intake, referral, mail_sink)
    assert reply_to.startswith("reponse+") and reply_to.endswith(f"@{DOMAIN}")
    assert referral_id in reply_to  # the token names the referral (and is signed for it and its contact)

    reply(
        settings.inbound_smtp_port,
        reply_to,
        "J'accepte, je rappelle la personne demain.\n\nCordialement,\n-- \nLe référent CAF\n\n"
        "Le lun. 30 nov. 2026 à 10:00, Relais <relais@localhost> a écrit :\n> Nouvelle demande à traiter\n",
    )
    accepted = wait_for(lambda: (r := referral_of(referral, referral_id))["status"] == "accepted" and r)
    assert accepted, referral_of(referral, referral_id)
    notes = [h for h in accepted["history"] if h["action"] == "email_reply"]
    assert notes and notes[0]["detail"] == "Cordialement,"  # the rest of the new text; signature and quote gone
    assert all("Nouvelle demande" not in (h["detail"] or "") for h in accepted["history"])

    # The desk is told as when the partner clicks (partner_answered).
    assert wait_for(lambda: mail_sink.to("accueil@chatelet.test.example"))

    # A second answer: accepted -> responded by the API's rules.
    reply(settings.inbound_smtp_port, reply_to.upper(), "Rendez-vous fixé au 3 décembre.\n")  # case is lost on the way
    responded = wait_for(lambda: (r := referral_of(referral, referral_id))["status"] == "responded" and r)
    assert responded and any(h["detail"] == "Rendez-vous fixé au 3 décembre." for h in responded["history"])

    # A third: nothing more is allowed, so it is kept in the history, where the coordinator reads it.
    reply(settings.inbound_smtp_port, reply_to, "Finalement la personne a déjà un conseiller.\n")
    noted = wait_for(
        lambda: any(
            h["action"] == "email_reply" and "déjà un conseiller" in (h["detail"] or "")
            for h in referral_of(referral, referral_id)["history"]
        )
    )
    assert noted and referral_of(referral, referral_id)["status"] == "responded"


def test_a_decline_by_email_reroutes_and_a_reply_after_it_gets_a_polite_answer(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, reply_to = handed_off(intake, referral, mail_sink)

    reply(settings.inbound_smtp_port, reply_to, "Hors compétence : c'est une question de logement.\n")
    declined = wait_for(lambda: (r := referral_of(referral, referral_id))["status"] == "declined" and r)
    assert declined, referral_of(referral, referral_id)
    assert any("logement" in (h["detail"] or "") for h in declined["history"] if h["action"] == "decline")
    need_id = declined["need_id"]
    rerouted = wait_for(
        lambda: [
            r
            for r in referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"]
            if r["status"] == "assigned"
        ]
    )
    assert rerouted and rerouted[0]["partner_id"] == "caf-national"

    before = len(mail_sink.to(REFERENT))
    reply(settings.inbound_smtp_port, reply_to, "J'accepte finalement.\n")
    polite = wait_for(lambda: [m for m in mail_sink.to(REFERENT)[before:] if "plus confiée" in m["subject"]])
    assert polite, [m["subject"] for m in mail_sink.to(REFERENT)]
    assert polite[0]["message"]["Auto-Submitted"] == "auto-generated"
    assert referral_of(referral, referral_id)["status"] == "declined"


@pytest.mark.postgres
def test_out_of_office_tells_the_coordinator_and_escalates_to_the_backup_bounces_are_never_answers(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, reply_to = handed_off(intake, referral, mail_sink)

    # A bounce (empty return path, a delivery status report) is kept, never taken as an answer.
    reply(
        settings.inbound_smtp_port,
        reply_to,
        "Delivery failed.\n",
        sender="mailer-daemon@caf.test.example",
        headers={"X-Test": "bounce"},
    )
    reply(
        settings.inbound_smtp_port,
        reply_to,
        "Je suis absent du bureau jusqu'au 8 décembre.\n",
        headers={"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"},
    )
    away = wait_for(lambda: [m for m in mail_sink.to("coordination@test.example") if "Absence" in m["subject"]])
    assert away, [m["subject"] for m in mail_sink.messages]
    assert wait_for(lambda: mail_sink.to("backup@caf.test.example"))  # the escalation, early
    seen = referral_of(referral, referral_id)
    assert seen["status"] == "assigned" and seen["sla"] == "at_risk"
    assert [h["action"] for h in seen["history"]][-2:] == ["out_of_office", "escalation"]
    with notifications.svc.db.read() as session:
        verdicts = sorted(m.verdict for m in session.exec(select(InboundMail)).all())
    assert verdicts == ["bounce", "out_of_office"]
    # The same escalation by hand (ops): once only.
    again = referral.client("ops").post(f"/referrals/{referral_id}/escalate", json={"reason": "absent"})
    assert again.status_code == 409, again.text


def test_ops_escalate_a_referral_now(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, _ = handed_off(intake, referral, mail_sink)
    assert referral.client("caf").post(f"/referrals/{referral_id}/escalate", json={"reason": "x"}).status_code == 403
    r = referral.client("ops").post(f"/referrals/{referral_id}/escalate", json={"reason": "référent en congé"})
    assert r.status_code == 200, r.text
    assert r.json()["sla"] == "at_risk" and r.json()["history"][-1]["action"] == "escalation"
    assert wait_for(lambda: mail_sink.to("backup@caf.test.example"))


def test_only_the_partners_addresses_and_our_reply_addresses_are_taken(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, reply_to = handed_off(intake, referral, mail_sink)
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # not a relay: only reponse+TOKEN@ the inbound domain
        reply(settings.inbound_smtp_port, "someone@elsewhere.example", "J'accepte")
    reply(settings.inbound_smtp_port, reply_to, "J'accepte", sender="stranger@test.example")
    forged = reply_to.replace(reply_to[40:52], "0" * 12)
    reply(settings.inbound_smtp_port, forged, "J'accepte")
    with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as too_big:  # at MAIL FROM's SIZE=
        reply(settings.inbound_smtp_port, reply_to, "x" * 60_000)
    assert too_big.value.smtp_code == 552
    kept = wait_for(lambda: len(_inbound(notifications)) == 2 and _inbound(notifications))
    assert sorted(m.verdict for m in kept) == ["bad_token", "unknown_sender"]
    assert referral_of(referral, referral_id)["status"] == "assigned"


def _inbound(notifications) -> list[InboundMail]:
    with notifications.svc.db.read() as session:
        return list(session.exec(select(InboundMail)).all())


def test_mailgun_inbound_route_posts_a_signed_answer(system, mail_sink):
    settings, intake, referral, notifications = system
    referral_id, reply_to = handed_off(intake, referral, mail_sink)
    url = f"{notifications.url}/webhooks/mail/mailgun"

    unsigned = mailgun_fields(reply_to, "J'accepte")
    unsigned["signature"] = "0" * 64
    assert httpx.post(url, data=unsigned).status_code == 403
    assert httpx.post(url, data=mailgun_fields(reply_to, "x" * 60_000)).status_code == 413
    failing = mailgun_fields(reply_to, "J'accepte", spf="Fail")
    assert httpx.post(url, data=failing).status_code == 200  # kept, not taken: SPF and DKIM failed

    text = "Nous avons déjà ce dossier : rendez-vous le 4.\n\nLe lun. 30 nov. 2026, Relais a écrit :\n> Nouvelle"
    r = httpx.post(url, data=mailgun_fields(reply_to, text))
    assert r.status_code == 200, r.text
    responded = wait_for(lambda: (x := referral_of(referral, referral_id))["status"] == "responded" and x)
    assert responded, referral_of(referral, referral_id)
    assert any(h["detail"] == "Nous avons déjà ce dossier : rendez-vous le 4." for h in responded["history"])
    assert sorted(m.verdict for m in _inbound(notifications)) == ["answer", "unauthenticated"]

    # The person's erasure takes the partner's words with it, here and in referral's history.
    person_id = intake.client("desk").get(f"/needs/{responded['need_id']}").json()["person_id"]
    erased = intake.client("desk").post(f"/people/{person_id}/erase", json={"reason": "demande au guichet"})
    assert erased.status_code == 202, erased.text
    assert wait_for(lambda: all(m.text is None and m.subject == "" for m in _inbound(notifications)))
    history = wait_for(lambda: (x := referral_of(referral, referral_id))["person_erased_at"] and x["history"])
    assert history and all("rendez-vous" not in (h["detail"] or "") for h in history)


def test_the_contract_documents_list_the_inbound_stream_and_webhook(system):
    settings, intake, referral, notifications = system
    # The documents are built at their first request: on a loaded machine (CI, once) longer than httpx's 5 s default
    asyncapi = httpx.get(f"{notifications.url}/asyncapi.json", timeout=60).text
    assert "partner.reply_received" in asyncapi
    assert "referral.reply_recorded" in httpx.get(f"{referral.url}/asyncapi.json", timeout=60).text
    openapi = httpx.get(f"{notifications.url}/openapi.json", timeout=60).json()
    assert "/webhooks/mail/mailgun" in openapi["x-relais-inbound-mail"]["webhooks"]
    assert "RELAIS_INBOUND_SMTP_PORT" in openapi["x-relais-inbound-mail"]["settings"]
    assert "RELAIS_INBOUND_SMTP_PORT" in openapi["info"]["description"]
