"""The outbox pages (French, ops only): what the system sends, with filters, each delivery's attempts, and,
when the embedded SMTP sink (`relais up`) or the `outbox` SMS provider is in use, the message itself as its
recipient sees it: the email as received by the sink (headers, text part, HTML part in a sandboxed frame),
the SMS with its segment count.

- `/envois`: the deliveries, newest first, filtered by kind, channel, status and need;
- `/envois/{id}`: one delivery;
- `/envois/{id}/apercu`: the HTML part of its email, for the frame;
- `/connexion`, `/deconnexion`: sign-in by email link (shared.signin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from functools import partial
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from services.notifications import views
from services.notifications.deps import ClockDep, DatabaseDep, DirectoryDep, MailSinkDep, PagesDep, SettingsDep
from services.notifications.providers import smtp
from services.notifications.store import Delivery, DeliveryAttempt
from services.notifications.views import MailSinkFolder
from shared.db import Database
from shared.pages import SECURITY_HEADERS, Pages
from shared.people import ERASED, record_access
from shared.search import MAX_QUERY
from shared.service import Service, decode_cursor
from shared.settings import Settings

TEMPLATES = Path(__file__).with_name("templates") / "web"
KINDS = (
    "handoff",
    "person_confirmation",
    "reminder",
    "escalation",
    "breach",
    "partner_answered",
    "unroutable",
    "sign_in",
    "person_erased",
    "receipt",
    "desk_note",
    "desk_nudge",
    "reply_not_applied",
    "contact_away",
)
CHANNELS = ("email", "sms")
STATUSES = ("queued", "sent", "delivered", "failed", "suppressed")
PAGE_SIZE = 50

# The page frames the email's HTML part, served by this service; the part itself runs no script and may
# only be framed here.
PAGE_CSP = SECURITY_HEADERS["Content-Security-Policy"] + "; frame-src 'self'"
PREVIEW_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; "
    "base-uri 'none'; form-action 'none'; sandbox"
)


# A sign-in link in a message shown to ops: the path keeps its shape, the token is gone. Ops can do anything
# already, but a live link on a screen would let whoever sees it sign in as someone else.
SIGN_IN_TOKEN = re.compile(r"(/connexion/)[A-Za-z0-9_.\-]+")
MASKED_TOKEN = "••••••"


def mask_sign_in_links(text: str) -> str:
    return SIGN_IN_TOKEN.sub(lambda m: m.group(1) + MASKED_TOKEN, text)


def masked(address: str) -> str:
    """A person's address as ops see it in lists: enough to tell two apart, not to write to them."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}…@{domain}"
    return f"{address[:4]}…{address[-2:]}" if len(address) > 6 else "…"


@dataclass(frozen=True)
class Shown:
    """A message as its recipient sees it."""

    headers: dict[str, str]
    text: str | None
    has_html: bool


def pages_for(svc: Service) -> Pages:
    """The outbox pages: ops sign in here."""
    return Pages(svc, TEMPLATES, roles=("ops",), home="/envois")


def mail_sink_for(settings: Settings) -> MailSinkFolder | None:
    """The embedded sink's folder (`relais up`), whose messages the pages show; None without one."""
    return MailSinkFolder(settings.mail_sink_dir) if settings.mail_sink_dir else None


router = APIRouter()


def received_email(sink: MailSinkFolder | None, settings: Settings, d: Delivery) -> EmailMessage | None:
    if sink is None or d.channel != "email" or d.status not in ("sent", "delivered"):
        return None
    key = f"digest-{d.digest_of}" if d.digest_of else d.id
    return sink.find(smtp.message_id(key, settings.mail_from))


def load(db: Database, delivery_id: str) -> tuple[Delivery, list[DeliveryAttempt]] | None:
    with db.read() as session:
        return views.delivery_with_attempts(session, delivery_id)


@router.get("/")
async def root(pages: PagesDep) -> Response:
    return pages.redirect("/envois")


@router.get("/envois.css")
async def stylesheet() -> Response:
    return Response(
        (TEMPLATES / "envois.css").read_text(), media_type="text/css", headers={"Cache-Control": "max-age=3600"}
    )


@router.get("/envois")
async def outbox(
    request: Request,
    pages: PagesDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    settings: SettingsDep,
    sink: MailSinkDep,
    type: str = "",
    canal: str = "",
    statut: str = "",
    demande: str = "",
    avant: str = "",
    q: str = "",
    lieu: str = "",
) -> Response:
    pages.require_user(request, "ops")
    filters = {
        "type": type if type in KINDS else "",
        "canal": canal if canal in CHANNELS else "",
        "statut": statut if statut in STATUSES else "",
        "demande": demande.strip()[:64],
        "q": q.strip()[:MAX_QUERY],
        "lieu": lieu if directory.library(lieu) else "",
    }

    def rows() -> tuple[list[Delivery], str | None]:
        before = None
        if avant:
            try:
                before = decode_cursor(avant)
            except Exception:  # noqa: BLE001 - a hand-edited link: start from the newest
                pass
        with db.read() as session:
            return views.outbox_page(
                session,
                {
                    "kind": filters["type"],
                    "channel": filters["canal"],
                    "status": filters["statut"],
                    "need_id": filters["demande"],
                },
                before,
                PAGE_SIZE,
                q=filters["q"],
                library_id=filters["lieu"],
            )

    items, more = await anyio.to_thread.run_sync(rows)
    return pages.render(
        request,
        "envois.html",
        items=items,
        more=more,
        filters=filters,
        kinds=KINDS,
        channels=CHANNELS,
        libraries=directory.libraries,
        statuses=STATUSES,
        masked=masked,
        timezone=directory.timezone,
        showing_messages=sink is not None or settings.sms_provider == "outbox",
    )


@router.get("/envois/{delivery_id}")
async def one(
    request: Request,
    delivery_id: str,
    pages: PagesDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    settings: SettingsDep,
    sink: MailSinkDep,
    clock: ClockDep,
) -> Response:
    user = pages.require_user(request, "ops")
    found = await anyio.to_thread.run_sync(load, db, delivery_id)
    if found is None:
        raise pages.error(request, 404, "not_found")
    d, attempts = found
    if d.recipient_role == "person" and d.need_id and d.body_text != ERASED:  # the person's address and message
        await anyio.to_thread.run_sync(
            partial(
                record_access,
                db,
                at=clock(),
                need_id=d.need_id,
                user_id=user.id,
                role=user.role,
                service="notifications",
                channel="page",
                what="delivery",
            )
        )
    shown = None
    erased = d.body_text == ERASED  # the sink's copy of an erased message is not shown either
    msg = None if erased else await anyio.to_thread.run_sync(received_email, sink, settings, d)
    if msg is not None:
        text_part, html_part = msg.get_body(("plain",)), msg.get_body(("html",))
        shown = Shown(
            headers={
                name: str(msg[name])
                for name in ("From", "To", "Reply-To", "Subject", "Date", "Message-ID")
                if msg[name]
            },
            text=mask_sign_in_links(text_part.get_content()) if text_part else None,
            has_html=html_part is not None,
        )
    sms_kept = not erased and d.channel == "sms" and d.provider == "outbox" and d.status in ("sent", "delivered")
    return pages.render(
        request,
        "envoi.html",
        d=d,
        attempts=attempts,
        shown=shown,
        sms_kept=sms_kept,
        sink=sink is not None,
        sms_provider=settings.sms_provider,
        masked=masked,
        timezone=directory.timezone,
        headers={"Content-Security-Policy": PAGE_CSP},
    )


@router.get("/envois/{delivery_id}/apercu")
async def preview(
    request: Request, delivery_id: str, pages: PagesDep, db: DatabaseDep, settings: SettingsDep, sink: MailSinkDep
) -> Response:
    pages.require_user(request, "ops")
    found = await anyio.to_thread.run_sync(load, db, delivery_id)
    msg = None
    if found is not None and found[0].body_text != ERASED:  # the sink's copy of an erased message is not shown
        msg = await anyio.to_thread.run_sync(received_email, sink, settings, found[0])
    html_part = msg.get_body(("html",)) if msg is not None else None
    if html_part is None:
        raise pages.error(request, 404, "not_found")
    return HTMLResponse(
        mask_sign_in_links(html_part.get_content()),
        headers={**SECURITY_HEADERS, "Content-Security-Policy": PREVIEW_CSP},
    )
