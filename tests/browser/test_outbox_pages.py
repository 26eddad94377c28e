"""The outbox pages in a real browser, as ops see them in `relais up`: the list with filters, an email as the
embedded SMTP sink received it, an SMS kept by the outbox provider; no serious accessibility violation."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import redis
from playwright.sync_api import expect

from shared.db import OutboxMessage
from shared.devstack import MailSink
from shared.events import STREAM_OF, ReferralAssigned, new_id, utcnow
from shared.messaging import stream_fields
from shared.signin import sign_in_link
from shared.testing import VIEWPORT_DESK, VIEWPORT_PHONE, clock_start, need_recorded, sign_in_in_browser, wait_for

pytestmark = pytest.mark.browser


@pytest.fixture
def notifications(settings, start_service, tmp_path):
    sink = MailSink(tmp_path / "mail")  # the embedded sink of `relais up`, keeping .eml files
    sink.controller.start()
    yield start_service(
        "notifications",
        settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{sink.port}", "mail_sink_dir": sink.folder}),
    )
    sink.controller.stop()


def publish(settings, *events) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    for event in events:
        row = OutboxMessage(
            event_id=event.event_id,
            stream=STREAM_OF[event.type],
            type=event.type,
            payload=event.model_dump_json(),
            created_at=utcnow(),
        )
        client.xadd(settings.key(row.stream), stream_fields(row))
    client.close()


def deliveries(service) -> dict:
    r = service.client("ops").get("/deliveries")
    return {(d["kind"], d["channel"]): d for d in r.json()["items"]}


def test_ops_see_what_was_sent_as_its_recipients_see_it(page, check_page, notifications):
    need_id = new_id()
    publish(
        notifications.settings,
        need_recorded(
            notifications.svc.personal_data,
            need_id=need_id,
            library_id="chatelet",
            category="caf",
            summary="Dossier APL",
            postal_code="76000",
            urgency="normal",
            recorded_at=clock_start(),
            person=dict(phone="+33612345678", preferred_channel="sms"),
        ),
        ReferralAssigned(
            need_id=need_id,
            sequence=1,
            referral_id=new_id(),
            partner_id="caf-76",
            library_id="chatelet",
            category="caf",
            contact_id="caf-ref",
            respond_by=clock_start() + timedelta(hours=48),
            routed_because="préfixe « 76 »",
        ),
    )
    sent = wait_for(
        lambda: (
            (d := deliveries(notifications))
            and all(
                d.get(k, {}).get("status") == "sent" for k in (("handoff", "email"), ("person_confirmation", "sms"))
            )
            and d
        )
    )
    assert sent

    page.goto(f"{notifications.url}/envois")
    assert page.url.endswith("/connexion")
    link, _ = sign_in_link(notifications.settings, "notifications", "ops", now=notifications.svc.clock())
    sign_in_in_browser(page, link)
    assert page.url.endswith("/envois")
    assert page.get_by_role("heading", level=1).inner_text() == "Messages envoyés"
    expect(page.locator("table.deliveries tbody tr")).to_have_count(2)
    check_page(page, "outbox")
    page.set_viewport_size(VIEWPORT_PHONE)
    check_page(page, "outbox-phone")
    page.set_viewport_size(VIEWPORT_DESK)

    page.get_by_label("Canal").select_option("sms")
    page.get_by_role("button", name="Filtrer").click()
    page.wait_for_url("**canal=sms**")  # the filtered list, not the one the click left
    expect(page.locator("table.deliveries tbody tr")).to_have_count(1)
    assert "+336…78" in page.locator("table.deliveries").inner_text()  # a person's number, masked
    page.locator("table.deliveries tbody a").first.click()
    assert page.get_by_role("heading", level=1).inner_text().startswith("Confirmation à la personne")
    bubble = page.locator(".sms-bubble").inner_text()
    assert "votre demande est transmise à CAF de la Seine-Maritime" in bubble
    expect(page.get_by_text(re.compile(r"2 segments en GSM-7"))).to_be_visible()
    check_page(page, "outbox-sms")

    page.goto(f"{notifications.url}/envois/{sent[('handoff', 'email')]['id']}")
    headers = page.locator(".mail-headers").inner_text()
    assert "Reply-To" in headers and "accueil@chatelet.test.example" in headers
    assert page.locator("pre.mail-text").inner_text().startswith("Bonjour Référent,")
    frame = page.frame_locator("iframe.mail-html")
    expect(frame.get_by_role("link", name="Ouvrir la demande")).to_be_visible()
    check_page(page, "outbox-email")
