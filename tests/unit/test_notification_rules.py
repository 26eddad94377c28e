"""Notifications' pure rules: who is reached how, quiet hours, digests, backoff, SMS segments and transliteration,
STOP replies, what the providers' webhooks say, and the templates' output."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from typing import TypedDict
from zoneinfo import ZoneInfo

import pytest

from services.notifications import domain, render
from services.notifications.providers import brevo, smtp, twilio
from services.notifications.providers.base import Receipt, Reply
from shared.directory import DirectoryError, parse_directory
from shared.testing import directory_data

PARIS, MONTREAL = ZoneInfo("Europe/Paris"), ZoneInfo("America/Toronto")


def paris(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=PARIS)


# --- who, and on which channel ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "preferred, email, phone, expected",
    [
        ("sms", "p@example.org", "+33612345678", ("sms", "+33612345678", None)),
        ("email", "p@example.org", "+33612345678", ("email", "p@example.org", None)),
        ("none", "p@example.org", "+33612345678", ("email", "", "no_channel")),
        ("sms", "p@example.org", None, ("sms", "", "no_address")),
    ],
)
def test_the_person_is_reached_on_the_channel_they_chose_or_not_at_all(preferred, email, phone, expected):
    route = domain.person_route(preferred, email, phone)
    assert (route.channel, route.address, route.suppressed) == expected
    assert domain.person_route("sms", email, "+33612345678", consent=False).suppressed == "no_consent"


def test_replies_go_to_the_desk_except_for_the_desk_itself():
    directory = parse_directory(directory_data())
    assert domain.reply_to(directory, "chatelet", "partner_contact") == "accueil@chatelet.test.example"
    assert domain.reply_to(directory, "chatelet", "person") == "accueil@chatelet.test.example"
    assert domain.reply_to(directory, "chatelet", "front_desk") is None


def test_a_contact_may_ask_for_a_daily_digest_at_a_valid_hour():
    data = directory_data()
    data["partners"][0]["contacts"][0]["digest_at"] = "08:30"
    directory = parse_directory(data)
    [referent] = domain.recipients(directory, "handoff", partner_id="caf-76", contact_id="caf-ref")
    assert referent.digest_at == time(8, 30)
    data["partners"][0]["contacts"][0]["digest_at"] = "8h30"
    with pytest.raises(DirectoryError) as refused:
        parse_directory(data)
    assert [e.split(":")[0] for e in refused.value.errors] == ["partners[0].contacts[0].digest_at"]


# --- quiet hours ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "at, allowed",
    [
        (paris(2026, 11, 25, 14, 0), paris(2026, 11, 25, 14, 0)),  # a Wednesday afternoon: at once
        (paris(2026, 11, 25, 6, 30), paris(2026, 11, 25, 8, 0)),  # early: at 8 h the same day
        (paris(2026, 11, 25, 20, 0), paris(2026, 11, 26, 8, 0)),  # 20 h sharp is quiet already
        (paris(2026, 11, 28, 21, 0), paris(2026, 11, 30, 8, 0)),  # Saturday night: not Sunday, Monday 8 h
        (paris(2026, 7, 13, 22, 0), paris(2026, 7, 15, 8, 0)),  # 14 July is a public holiday in France
        (paris(2026, 3, 28, 23, 0), paris(2026, 3, 30, 8, 0)),  # across the spring DST change (a Sunday)
    ],
)
def test_sms_to_the_person_wait_for_8_to_20_h_on_working_days_in_france(at, allowed):
    assert domain.sms_allowed_at(at.astimezone(UTC), "Europe/Paris") == allowed


def test_quebec_libraries_keep_quebec_holidays():
    fete_nationale = datetime(2026, 6, 24, 10, 0, tzinfo=MONTREAL)
    assert domain.sms_allowed_at(fete_nationale, "America/Toronto") == datetime(2026, 6, 25, 8, 0, tzinfo=MONTREAL)
    bastille_day = datetime(2026, 7, 14, 10, 0, tzinfo=MONTREAL)  # an ordinary Tuesday in Québec
    assert domain.sms_allowed_at(bastille_day, "America/Toronto") == bastille_day


def test_only_sms_to_the_person_wait_and_not_the_confirmation_at_the_desk():
    recorded = paris(2026, 11, 25, 21, 0)
    assert not domain.held_by_quiet_hours(
        "person_confirmation", "person", "sms", recorded, recorded + timedelta(minutes=3)
    )
    assert domain.held_by_quiet_hours("person_confirmation", "person", "sms", recorded, recorded + timedelta(hours=1))
    assert domain.held_by_quiet_hours("partner_answered", "person", "sms", recorded, recorded + timedelta(minutes=3))
    assert not domain.held_by_quiet_hours("partner_answered", "person", "email", recorded, recorded)
    assert not domain.held_by_quiet_hours("breach", "front_desk", "sms", recorded, recorded)


# --- digests and retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "now, slot",
    [
        (paris(2026, 11, 25, 7, 0), paris(2026, 11, 25, 8, 30)),
        (paris(2026, 11, 25, 8, 30), paris(2026, 11, 26, 8, 30)),  # the slot that just went is not this one's
        (paris(2026, 11, 25, 23, 59), paris(2026, 11, 26, 8, 30)),
        (paris(2026, 3, 28, 9, 0), paris(2026, 3, 29, 8, 30)),  # the day the clocks go forward: still 08:30 local
    ],
)
def test_a_digest_goes_at_the_contacts_next_hour(now, slot):
    assert domain.next_digest_at(now.astimezone(UTC), time(8, 30), "Europe/Paris") == slot


def test_retries_back_off_exponentially_with_jitter_and_honour_retry_after():
    rand = random.Random(7)
    delays = [domain.retry_delay(n, 30, 3600, rand=rand).total_seconds() for n in (1, 2, 3, 4, 10)]
    for delay, full in zip(delays, (30, 60, 120, 240, 3600), strict=True):
        assert full / 2 <= delay <= full
    assert domain.retry_delay(1, 30, 3600, retry_after_s=120, rand=rand) == timedelta(seconds=120)
    assert domain.retry_delay(3, 30, 3600, retry_after_s=1, rand=rand).total_seconds() >= 60


# --- SMS text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, encoding, segments",
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("é" * 159 + "€", "GSM-7", 2),  # é is GSM-7; € takes two septets: 161
        ("à" * 158 + "[", "GSM-7", 1),
        ("ê" * 70, "UCS-2", 1),
        ("ê" * 71, "UCS-2", 2),
        ("ê" * 134, "UCS-2", 2),
        ("ê" * 135, "UCS-2", 3),
        ("🙂" * 35, "UCS-2", 1),  # two UTF-16 code units each
        ("", "GSM-7", 0),
    ],
)
def test_segments_are_counted_as_the_network_does(text, encoding, segments):
    count = domain.sms_count(text)
    assert (count.encoding, count.segments) == (encoding, segments)


def test_french_characters_outside_gsm7_are_transliterated_and_the_rest_kept():
    text = "Vous êtes à l’accueil « Châtelet »… ça, œuvre ; Ç é è ù à"
    plain = domain.to_gsm7(text)
    assert plain == 'Vous etes à l\'accueil " Chatelet "... ca, oeuvre ; Ç é è ù à'
    assert domain.sms_count(plain).encoding == "GSM-7"
    assert domain.to_gsm7("Merci 🙂") == "Merci 🙂"  # nothing near enough: the SMS goes as UCS-2


@pytest.mark.parametrize(
    "reply, stop",
    [
        ("STOP", True),
        ("Stop.", True),
        ("arrêt", True),
        ("ARRET merci", True),
        ("  stop  ", True),
        ("Bonjour, stop", False),
        ("stopper", False),
        ("", False),
    ],
)
def test_stop_and_arret_as_the_first_word_opt_out(reply, stop):
    assert domain.is_stop_reply(reply) is stop


# --- what the providers tell us --------------------------------------------------------------------------


def test_twilio_signature_matches_twilios_published_example():
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    signature = twilio.twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params)
    assert signature == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_provider_callbacks_are_read_as_receipts_or_replies():
    assert twilio.read_twilio({"MessageSid": "SM1", "MessageStatus": "delivered"}) == Receipt("SM1", True)
    failed = twilio.read_twilio({"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"})
    assert isinstance(failed, Receipt)
    assert (failed.delivered, failed.error) == (False, "twilio undelivered 30003")
    assert twilio.read_twilio({"MessageSid": "SM1", "MessageStatus": "sent"}) is None
    assert twilio.read_twilio({"MessageSid": "SM2", "From": "+33612345678", "Body": "STOP"}) == Reply(
        "+33612345678", "STOP"
    )
    assert brevo.read_brevo({"messageId": 15, "msg_status": "delivered", "to": "33612345678"}) == Receipt("15", True)
    bounced = brevo.read_brevo({"messageId": 15, "msg_status": "hard_bounce"})
    assert isinstance(bounced, Receipt) and bounced.delivered is False
    assert brevo.read_brevo({"messageId": 15, "msg_status": "soft_bounce"}) is None
    assert brevo.read_brevo({"event": "replied", "from": "33612345678", "reply": "Arrêt"}) == Reply(
        "+33612345678", "Arrêt"
    )
    assert brevo.read_brevo({"event": "unsubscribe", "to": "33612345678"}) == Reply("+33612345678", "STOP")


def test_smtp_url_forms():
    plain = smtp.SmtpTarget.from_url("smtp://relais%40ex.org:s3cr%2Ft@mail.example.org:587?starttls=require")
    assert (plain.host, plain.port, plain.use_tls, plain.starttls) == ("mail.example.org", 587, False, True)
    assert (plain.username, plain.password) == ("relais@ex.org", "s3cr/t")
    tls = smtp.SmtpTarget.from_url("smtps://mail.example.org")
    assert (tls.port, tls.use_tls, tls.starttls) == (465, True, None)
    with pytest.raises(ValueError, match="smtp://"):
        smtp.SmtpTarget.from_url("mail.example.org:25")


# --- templates ------------------------------------------------------------------------------------------


class Facts(TypedDict):
    library: str
    partner: str
    desk_email: str
    desk_phone: str | None
    respond_by: datetime
    timezone: str


FACTS = Facts(
    library="Bibliothèque du Châtelet",
    partner="CAF de la Seine-Maritime",
    desk_email="accueil@example.org",
    desk_phone=None,
    respond_by=datetime(2026, 11, 25, 13, 5, tzinfo=UTC),
    timezone="Europe/Paris",
)


def test_the_person_is_told_who_will_call_and_by_when_in_their_language():
    fr = render.render_email("person_confirmation", "fr", **FACTS)
    assert fr.subject == (
        "Votre demande est transmise : CAF de la Seine-Maritime vous contactera avant mercredi 25 novembre à 14 h 05"
    )
    assert fr.html is not None and "accueil@example.org" in fr.text and 'lang="fr"' in fr.html
    en = render.render_email("person_confirmation", "en", **FACTS)
    assert (
        en.subject
        == "Your request has been passed on: CAF de la Seine-Maritime will contact you by Wednesday 25 November, 14:05"
    )
    assert en.html is not None and 'lang="en"' in en.html
    sms = render.render_sms("person_confirmation", "fr", **FACTS).text
    assert "Chatelet" in sms and "STOP" in sms and domain.sms_count(sms).encoding == "GSM-7"
    kept = render.render_sms("person_confirmation", "fr", transliterate=False, **FACTS).text
    assert "Châtelet" in kept and domain.sms_count(kept).encoding == "UCS-2"


def test_a_retry_of_an_sms_to_the_person_keeps_quiet_hours_once_they_left_the_desk():
    import json

    from services.notifications.handlers import quiet_time
    from services.notifications.store import Delivery

    recorded = paris(2026, 11, 25, 19, 55)
    sms = Delivery(
        id="d",
        event_id="e",
        kind="person_confirmation",
        channel="sms",
        recipient_role="person",
        recipient="+33612345678",
        subject="",
        body_text="...",
        next_attempt_at=recorded,
        created_at=recorded,
        quiet_timezone="Europe/Paris",
        facts=json.dumps({"recorded_at": recorded.isoformat()}),
    )
    assert quiet_time(sms, recorded + timedelta(minutes=10)) == (recorded + timedelta(minutes=10), None)
    assert quiet_time(sms, recorded + timedelta(minutes=30)) == (paris(2026, 11, 26, 8, 0), "quiet_hours")
