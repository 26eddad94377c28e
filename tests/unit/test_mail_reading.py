"""Reading partners' replies by email (services/notifications/mail_reading.py): pure rules, table tests."""

import hashlib
import hmac
from email.message import EmailMessage

import pytest

from services.notifications.mail_reading import (
    BadSignature,
    automatic_kind,
    check_mailgun_signature,
    form_fields,
    intent_of,
    new_text,
    read_mailgun,
    read_message,
)
from shared.settings import Settings
from shared.signin import referral_of_reply_token, reply_token, reply_token_matches


@pytest.mark.parametrize(
    "body, expected",
    [
        ("J'accepte.\n\nLe lun. 30 nov. 2026 à 10:00, Relais <r@x> a écrit :\n> Nouvelle demande", "J'accepte."),
        ("J'accepte.\nLe lun. 30 nov. 2026 à 10:00, Relais <r@x> a\nécrit :\n> quoted", "J'accepte."),
        ("OK for me.\n\nOn Mon, Nov 30, 2026 at 10:00 AM Relais <r@x> wrote:\n> quoted", "OK for me."),
        ("Je prends\n-- \nMarie, CAF 76\n02 35 00 00 00", "Je prends"),
        ("Je prends\r\n\r\nDe : Relais <r@x>\r\nEnvoyé : lundi\r\nÀ : moi\r\nObjet : demande", "Je prends"),
        ("Vu.\n\nFrom: Relais\nSent: Monday\nTo: me\nSubject: x\n\nbody", "Vu."),
        ("Vu.\n-----Original Message-----\nFrom: x", "Vu."),
        ("> quoted first\nMy answer\n> more quoted", "My answer"),
        ("Nous de: la CAF\nsuite", "Nous de: la CAF\nsuite"),  # "de :" inside a line is no Outlook header
    ],
)
def test_the_new_text_leaves_out_quoted_history_and_signature(body, expected):
    assert new_text(body) == expected


@pytest.mark.parametrize(
    "text, intent, code, said",
    [
        ("J'accepte", "accept", None, ""),
        ("J’accepte, je rappelle demain\nMerci", "accept", None, "Merci"),
        ("je prends !", "accept", None, ""),
        ("Hors compétence", "decline", "out_of_scope", ""),
        ("HORS COMPETENCE : voir la CPAM", "decline", "out_of_scope", "voir la CPAM"),
        (
            "Je refuse : la personne habite hors du département",
            "decline",
            "other",
            "la personne habite hors du département",
        ),
        ("Je refuse\nnous n'avons pas de conseiller", "decline", "other", "nous n'avons pas de conseiller"),
        ("Hors territoire", "decline", "out_of_territory", ""),
        ("Je refuse", "respond", None, "Je refuse"),  # no reason: unclear, kept as an answer
        ("Déjà suivi chez nous", "decline", "already_followed", "chez nous"),
        ("Bonjour, pouvez-vous préciser ?", "respond", None, "Bonjour, pouvez-vous préciser ?"),
        ("Je n'accepte pas", "respond", None, "Je n'accepte pas"),
    ],
)
def test_the_first_line_says_what_the_reply_asks(text, intent, code, said):
    found = intent_of(text)
    assert (found.intent, found.reason_code, found.text) == (intent, code, said)


@pytest.mark.parametrize(
    "headers, envelope, subject, report, expected",
    [
        ({}, "ref@caf.example", "Re: demande", False, None),
        ({"auto-submitted": "no"}, "ref@caf.example", "Re: demande", False, None),
        ({"auto-submitted": "auto-replied"}, "ref@caf.example", "Re: demande", False, "out_of_office"),
        ({"auto-submitted": "auto-generated"}, "ref@caf.example", "Accusé de réception", False, "auto_reply"),
        ({"x-autoreply": "yes"}, "ref@caf.example", "Absent du bureau", False, "out_of_office"),
        ({"precedence": "bulk"}, "ref@caf.example", "Newsletter", False, "auto_reply"),
        ({}, "ref@caf.example", "Réponse automatique : absent", False, "out_of_office"),
        ({}, "", "Undelivered Mail", False, "bounce"),  # empty return path
        ({}, "ref@caf.example", "Delivery Status Notification", True, "bounce"),
        ({"from-address": "mailer-daemon@caf.example"}, "x@y", "failure", False, "bounce"),
    ],
)
def test_bounces_and_automatic_replies_are_recognised(headers, envelope, subject, report, expected):
    assert automatic_kind(headers, envelope, subject, "", report) == expected


def test_a_delivery_status_report_is_a_bounce():
    raw = (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.caf.example>\r\nTo: reponse+x@r.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nI could not deliver your message.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.caf.example\r\n\r\n"
        b"Final-Recipient: rfc822; ref@caf.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n"
    )
    # Even with a return path (some servers set one), a delivery status report is never an answer.
    assert read_message(raw, "ref@caf.example", ["reponse+x@r.example"]).automatic == "bounce"


def test_an_html_only_reply_is_read_without_its_quote():
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Réf <REF@caf.example>", "reponse+abc@r.example", "Re: x"
    msg.set_content("<p>J&#39;accepte</p><blockquote>Nouvelle demande</blockquote>", subtype="html")
    read = read_message(msg.as_bytes(), "ref@caf.example", ["reponse+abc@r.example"])
    assert (read.text, read.from_address, read.automatic) == ("J'accepte", "ref@caf.example", None)


def test_the_reply_token_is_bound_to_the_referral_and_the_contact():
    settings = Settings(secret_key="k" * 40)
    token = reply_token(settings, "a" * 32, "caf-ref")
    assert len(f"reponse+{token}") <= 64 and token == token.lower()
    assert referral_of_reply_token(token.upper()) == "a" * 32
    assert reply_token_matches(settings, token.upper(), "a" * 32, "caf-ref")
    assert not reply_token_matches(settings, token, "a" * 32, "caf-backup")
    assert not reply_token_matches(settings, token, "b" * 32, "caf-ref")
    assert not reply_token_matches(Settings(secret_key="z" * 40), token, "a" * 32, "caf-ref")
    assert referral_of_reply_token("not-a-token") is None


def _signed(key: str, timestamp: int, token: str = "t" * 50) -> dict[str, str]:
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return {"timestamp": str(timestamp), "token": token, "signature": signature}


def test_mailgun_signature_is_checked_and_a_stale_post_refused():
    check_mailgun_signature("key", _signed("key", 1_000_000), 1_000_010)
    with pytest.raises(BadSignature):
        check_mailgun_signature("other", _signed("key", 1_000_000), 1_000_010)
    with pytest.raises(BadSignature):
        check_mailgun_signature("key", _signed("key", 1_000_000), 1_000_000 + 3600)
    with pytest.raises(BadSignature):
        check_mailgun_signature("key", {}, 0)


def test_mailgun_form_fields_urlencoded_and_multipart():
    assert form_fields("application/x-www-form-urlencoded", b"sender=a%40b.example&body-plain=J%27accepte") == {
        "sender": "a@b.example",
        "body-plain": "J'accepte",
    }
    body = (
        b'--xx\r\nContent-Disposition: form-data; name="sender"\r\n\r\na@b.example\r\n'
        b'--xx\r\nContent-Disposition: form-data; name="stripped-text"\r\n\r\nJe prends\r\n'
        b'--xx\r\nContent-Disposition: form-data; name="attachment-1"; filename="a.pdf"\r\n'
        b"Content-Type: application/pdf\r\n\r\n%PDF\r\n--xx--\r\n"
    )
    assert form_fields("multipart/form-data; boundary=xx", body) == {
        "sender": "a@b.example",
        "stripped-text": "Je prends",
    }


def test_mailgun_verdicts_on_spf_and_dkim():
    base = {
        "sender": "ref@caf.example",
        "from": "ref@caf.example",
        "recipient": "reponse+x@r.example",
        "body-plain": "Ok",
    }
    for spf, dkim, expected in (("Pass", "Fail", True), ("Fail", "Pass", True), ("Fail", "Fail", False)):
        headers = f'[["X-Mailgun-Spf", "{spf}"], ["X-Mailgun-Dkim-Check-Result", "{dkim}"]]'
        assert read_mailgun({**base, "message-headers": headers}).authenticated is expected
    assert read_mailgun(base).authenticated is None
    auto = read_mailgun({**base, "message-headers": '[["Auto-Submitted", "auto-replied"]]', "subject": "Absent"})
    assert auto.automatic == "out_of_office"
