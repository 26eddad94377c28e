"""Issue 16, part 3: some days after the partner's first answer, the person is asked once whether they were contacted,
by SMS (OUI or NON, through the SMS provider's webhook) or by email (two buttons, a confirmation page). The answer is
on the referral (`person_contacted`), a "no" alerts the desk and the coordinator. The three services over one real
Redis, a real SMTP server and Twilio's API on loopback; the test clock jumps the days."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import httpx
import pytest
from sqlmodel import select

from services.notifications.store import Delivery, SmsSuppression
from shared.testing import wait_for
from tests.integration.test_notifications import Provider, signed_twilio_post, with_twilio

pytestmark = pytest.mark.date_sensitive  # the question waits for the day (quiet hours) at a year end's night

PHONE = "+33612345678"
DESK = "accueil@chatelet.test.example"
COORDINATION = "coordination@test.example"


@pytest.fixture
def twilio():
    p = Provider((201, {}, {"sid": "SMdefault", "status": "queued"}))
    yield p
    p.close()


def record(intake, person: dict) -> dict:
    r = intake.client("desk").post(
        "/needs",
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL bloqué",
            "postal_code": "76000",
            "consent": True,
            "person": {"display_name": "Marie Durand", **person},
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


def referral_of(referral, need_id: str) -> dict:
    items = wait_for(lambda: referral.client("ops").get("/referrals", params={"need_id": need_id}).json()["items"])
    return referral.client("ops").get(f"/referrals/{items[0]['id']}").json()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, page
    return found[1]


def messages_of(notif, kind: str) -> list[Delivery]:
    with notif.svc.db.read() as session:
        return list(session.exec(select(Delivery).where(Delivery.kind == kind)).all())


def questions(notif) -> list[Delivery]:
    return messages_of(notif, "contact_question")


def ask(notif, clock, days: int = 3) -> Delivery:
    """Let the partner's `contact_question_after` pass; the question is queued, and goes once quiet hours allow."""
    clock.advance(timedelta(days=days, minutes=1))
    queued = wait_for(lambda: questions(notif))
    assert len(queued) == 1
    if queued[0].next_attempt_at > clock():  # held for the day (quiet hours): let the night pass
        assert queued[0].held_reason == "quiet_hours"
        clock.advance(queued[0].next_attempt_at - clock() + timedelta(seconds=1))
    return wait_for(lambda: (d := questions(notif)[0]).status == "sent" and d)


@pytest.mark.postgres  # the clock takes its timers FOR UPDATE SKIP LOCKED there
def test_a_no_by_sms_is_recorded_alerts_the_desk_and_the_coordinator_and_no_second_question_goes(
    settings, mail_sink, twilio, clock, start_service
):
    settings = with_twilio(settings, mail_sink, twilio)
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notif = start_service("notifications", settings)
    need = record(intake, {"phone": PHONE, "preferred_channel": "sms"})
    r = referral_of(referral, need["id"])
    assert r["person_contacted"] is None and r["contact_question_at"] is None

    caf = referral.client("caf")
    assert caf.post(f"/referrals/{r['id']}/accept").status_code == 200
    assert caf.post(f"/referrals/{r['id']}/respond", json={"message": "Rendez-vous fixé"}).status_code == 200
    # The person's "taken in charge" SMS is queued before the days pass, as it would be: read together with the
    # question's event after the jump, at night, both waited for the same morning and went in either order.
    assert wait_for(lambda: messages_of(notif, "partner_answered"))
    clock.advance(timedelta(days=2))  # not yet: three days after the first answer (the directory's default)
    assert referral_of(referral, need["id"])["contact_question_at"] is None and questions(notif) == []

    sms = ask(notif, clock, days=1)
    assert sms.channel == "sms" and sms.recipient == PHONE and sms.referral_id == r["id"]
    body = twilio.form(len(twilio.requests) - 1)["Body"]
    assert "Répondez OUI ou NON" in body and "CAF de la Seine-Maritime" in body and "STOP" in body
    assert referral_of(referral, need["id"])["contact_question_at"] is not None

    reply = signed_twilio_post(notif, {"MessageSid": "SM1", "From": PHONE, "To": "+33700000000", "Body": "Non merci"})
    assert reply.status_code == 200
    answered = wait_for(lambda: (x := referral_of(referral, need["id"]))["person_contacted"] == "no" and x)
    assert answered["person_contacted_at"] is not None
    assert ("person_contacted", "no (sms)") in [(h["action"], h["detail"]) for h in answered["history"]]

    reference = need["reference"]
    for address in (DESK, COORDINATION):
        alert = wait_for(lambda a=address: [m for m in mail_sink.to(a) if "pas avoir été contactée" in m["subject"]])
        assert len(alert) == 1 and reference in alert[0]["subject"]
        text = alert[0]["message"].get_body(("plain",)).get_content()
        assert reference in text and "Marie" not in text and PHONE not in text  # the reference, no personal data
    assert not [m for m in mail_sink.to("referent@caf.test.example") if "contactée" in m["subject"]]

    # The dashboard's figures: the partner's and everyone's "contact confirmé par la personne".
    dashboard = referral.client("ops").get("/dashboard").json()
    caf76 = next(p for p in dashboard["partners"] if p["id"] == "caf-76")
    assert caf76["contact"] == {"asked": 1, "yes": 0, "no": 1, "no_answer": 0, "confirmed_share": 0.0}
    assert dashboard["person_contacted"]["no"] == 1

    # A second answer changes nothing; the desk sees the answer in the need's history.
    signed_twilio_post(notif, {"MessageSid": "SM2", "From": PHONE, "To": "+33700000000", "Body": "Oui."})
    seen = wait_for(
        lambda: (
            (n := intake.client("desk").get(f"/needs/{need['id']}").json())
            and "referral.person_contacted" in [h["event"] for h in n["history"]]
            and n
        )
    )
    assert referral_of(referral, need["id"])["person_contacted"] == "no"
    assert ("referral.person_contacted", "no") in [(h["event"], h.get("detail")) for h in seen["history"]]
    assert "referral.contact_question_due" in [h["event"] for h in seen["history"]]

    # STOP works as before; and however long we wait, no second question about this referral goes.
    assert signed_twilio_post(notif, {"MessageSid": "SM3", "From": PHONE, "Body": "STOP"}).status_code == 200
    with notif.svc.db.transaction() as session:
        assert session.get(SmsSuppression, PHONE) is not None
    clock.advance(timedelta(days=10))
    assert caf.post(f"/referrals/{r['id']}/close", json={"outcome": "Dossier réglé"}).status_code == 200
    wait_for(lambda: referral_of(referral, need["id"])["status"] == "closed")
    assert len(questions(notif)) == 1
    assert seen["status"] in ("responded", "accepted")


def test_the_email_buttons_open_a_confirmation_page_and_only_its_post_answers(
    settings, mail_sink, clock, start_service
):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notif = start_service("notifications", settings)
    need = record(intake, {"email": "marie@example.org", "preferred_channel": "email"})
    r = referral_of(referral, need["id"])
    assert referral.client("caf").post(f"/referrals/{r['id']}/accept").status_code == 200

    ask(notif, clock)
    mail = wait_for(lambda: [m for m in mail_sink.to("marie@example.org") if "contacté(e)" in m["subject"]])[0]
    html = mail["message"].get_body(("html",)).get_content()
    yes, no = (unescape(u) for u in re.findall(r'href="(http[^"]+/contact/[^"]+)"', html))
    assert "Oui, j'ai été contacté(e)" in html and ">Non<" in html

    with httpx.Client(follow_redirects=False) as browser:
        page = browser.get(yes)  # what a mail scanner does: nothing is recorded
        assert page.status_code == 200 and "Confirmer&nbsp;: oui" in page.text
        assert 'lang="fr"' in page.text and "<h1>" in page.text
        assert referral_of(referral, need["id"])["person_contacted"] is None
        csrf = csrf_of(page.text)
        assert browser.post(yes, data={"csrf": "forged"}).status_code == 403
        done = browser.post(yes, data={"csrf": csrf})
        assert done.status_code == 303 and done.headers["location"] == yes.removeprefix(str(referral.url))
        thanks = browser.get(yes)
        assert "Merci pour votre réponse" in thanks.text and "<strong>oui</strong>" in thanks.text

        other = browser.get(no)  # the other button afterwards: the first answer stays
        assert "Merci pour votre réponse" in other.text and "la première" in other.text
        assert browser.post(no, data={"csrf": csrf}).status_code == 403  # the CSRF token is bound to its link
        assert browser.get(yes[:-3] + "xyz").status_code == 400  # an altered link

    found = referral_of(referral, need["id"])
    assert found["person_contacted"] == "yes"
    assert ("person_contacted", "yes (email)") in [(h["action"], h["detail"]) for h in found["history"]]
    clock.advance(timedelta(days=5))
    assert not [m for m in mail_sink.to(DESK) if "contactée" in m["subject"]]  # a yes alerts nobody
    assert len(questions(notif)) == 1


def test_a_person_who_withdrew_consent_to_messages_is_not_asked(settings, mail_sink, clock, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notif = start_service("notifications", settings)
    need = record(intake, {"email": "marie@example.org", "preferred_channel": "email"})
    r = referral_of(referral, need["id"])
    withdrawn = intake.client("desk").post(f"/needs/{need['id']}/withdraw-messages-consent", json={})
    assert withdrawn.status_code in (200, 202), withdrawn.text
    assert referral.client("caf").post(f"/referrals/{r['id']}/accept").status_code == 200
    clock.advance(timedelta(days=3, minutes=1))
    question = wait_for(lambda: questions(notif))[0]
    assert (question.status, question.suppressed_reason) == ("suppressed", "no_consent")


def test_the_contract_documents_carry_person_contacted_and_its_events(settings):
    from services.notifications.app import bootstrap as notifications_app
    from services.referral.app import bootstrap as referral_app

    referral = referral_app(settings)
    schemas = referral.service.asyncapi()["components"]["schemas"]
    assert schemas["ReferralContactQuestionDue"]["properties"]["type"]["const"] == "referral.contact_question_due"
    assert schemas["ReferralPersonContacted"]["properties"]["person_contacted"]["enum"] == ["yes", "no"]
    assert "PersonContactAnswered" in schemas  # referral reads it from the deliveries stream
    with_smtp = settings.model_copy(update={"smtp_url": "smtp://127.0.0.1:25"})  # not used: the document only
    notifications = notifications_app(with_smtp).service.asyncapi()["components"]["schemas"]
    assert notifications["PersonContactAnswered"]["properties"]["answer"]["enum"] == ["yes", "no"]

    public = referral.app.openapi()["components"]["schemas"]["ReferralPublic"]["properties"]["person_contacted"]
    assert {"enum": ["yes", "no"], "type": "string"} in public["anyOf"] and {"type": "null"} in public["anyOf"]


def test_after_a_decline_only_the_partner_that_holds_the_need_has_the_person_asked(settings, clock, start_service):
    from services.referral import handlers
    from services.referral.store import ClockTimer, Referral
    from tests.helpers import record_need

    referral = start_service("referral", settings)
    svc = referral.svc
    first = record_need(svc, person={"email": "marie@example.org", "preferred_channel": "email"})
    caf = referral.client("caf")
    assert caf.post(f"/referrals/{first}/accept").status_code == 200
    declined = caf.post(f"/referrals/{first}/decline", json={"reason_code": "capacity", "reason": ""})
    assert declined.status_code == 200, declined.text
    with svc.db.transaction() as session:  # the national platform, which took the need, answers (it has no token)
        second = session.exec(select(Referral.id).where(Referral.partner_id == "caf-national")).one()
        handlers.transition(session, second, "accept", "test", svc.clock(), svc.directory)
        handlers.transition(session, second, "respond", "test", svc.clock(), svc.directory, "Rendez-vous fixé")

    clock.advance(timedelta(days=3, minutes=1))

    def timers() -> dict[str | None, str | None]:
        with svc.db.transaction() as session:
            rows = session.exec(select(ClockTimer).where(ClockTimer.kind == "contact_question")).all()
            return {t.referral_id: t.outcome for t in rows}

    assert wait_for(lambda: all(timers().values())) and timers() == {first: "moot", second: "fired"}
    ops = referral.client("ops")
    assert ops.get(f"/referrals/{first}").json()["contact_question_at"] is None
    assert ops.get(f"/referrals/{second}").json()["contact_question_at"] is not None


def test_a_need_the_desk_closed_is_not_asked_about(settings, clock, start_service):
    from services.referral import handlers
    from services.referral.store import ClockTimer
    from tests.helpers import record_need

    referral = start_service("referral", settings)
    svc = referral.svc
    rid = record_need(svc, person={"email": "marie@example.org", "preferred_channel": "email"})
    assert referral.client("caf").post(f"/referrals/{rid}/accept").status_code == 200
    with svc.db.transaction() as session:  # as need.closed_by_desk does: the person no longer needs help
        handlers.transition(session, rid, "desk_close", "desk", svc.clock(), svc.directory, "Plus besoin")
    clock.advance(timedelta(days=3, minutes=1))

    def outcome() -> str | None:
        with svc.db.transaction() as session:
            return session.exec(select(ClockTimer.outcome).where(ClockTimer.kind == "contact_question")).one()

    assert wait_for(outcome) == "moot"
    assert referral.client("ops").get(f"/referrals/{rid}").json()["contact_question_at"] is None


def test_a_partner_that_closes_before_the_question_is_due_still_has_the_person_asked(
    settings, mail_sink, clock, start_service
):
    from services.notifications.store import NeedPerson

    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notif = start_service("notifications", settings)
    need = record(intake, {"email": "marie@example.org", "preferred_channel": "email"})
    r = referral_of(referral, need["id"])
    caf = referral.client("caf")
    assert caf.post(f"/referrals/{r['id']}/accept").status_code == 200
    assert caf.post(f"/referrals/{r['id']}/close", json={"outcome": "Rappelée, dossier réglé"}).status_code == 200
    wait_for(lambda: intake.client("desk").get(f"/needs/{need['id']}").json()["status"] == "closed")

    def person_kept() -> bool:
        with notif.svc.db.transaction() as session:
            return session.get(NeedPerson, need["id"]) is not None

    # referral.closed comes before referral.contact_question_due on the same stream: the question reaching the
    # person's address shows the close kept their contact for it.
    ask(notif, clock)
    assert wait_for(lambda: [m for m in mail_sink.to("marie@example.org") if "contacté(e)" in m["subject"]])
    assert not person_kept()  # forgotten once the question was queued, as at any close
