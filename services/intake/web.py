"""Intake's web pages for front-desk staff (French, usable without JavaScript).

- `/nouvelle`: record a need (the API's rules, worded in French next to each field); `?meme_personne=ID` starts
  another need for the person of need ID, with their details filled in;
- `/demandes/{id}/enregistree`: the confirmation, with the deadline and, as soon as referral has routed the
  need, the partner and why (or "aucun partenaire" and what happens next);
- `/demandes`: "Mes demandes", the library's needs, overdue first, with filters; `/demandes/{id}`: one need and
  its history as the desk may see it;
- `/chiffres` and `/chiffres.csv`: the library's monthly figures;
- offline (docs/offline.md): `/manifest.webmanifest`, the service worker `/sw.js`, `/demandes/recentes` (the recent
  list without names, which opens offline), `/hors-ligne/cle` (the session's public key), `/hors-ligne/envoyer` (a
  need kept sealed in the browser, sent when the network returns) and `/hors-ligne/corriger` (one the server
  refused, opened on the form);
- `/connexion`, `/deconnexion`: sign-in by emailed link (shared.signin).

Live parts: a page's `[data-live]` region is fetched again with `?partiel=1` by /scripts/suivi.js and replaced
when its version changes; the answer says when nothing more will change. Without JavaScript the confirmation
page refreshes itself (noscript meta refresh) until the need is routed, and the other pages on reload.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import date, datetime
from functools import partial
from functools import partial as partial_call
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import redis
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from markupsafe import Markup

from services.intake import api, domain, handlers, offline, remote, views
from services.intake.api import MAX_SUMMARY, NEED_STATUSES, Invalid, record_command, unknown_earlier_need, validate_need
from services.intake.commands import (
    AddNote,
    CloseNeed,
    MarkAnswersRead,
    NudgePartner,
    RerouteNeed,
    SendReceipt,
    WithdrawMessagesConsent,
)
from services.intake.deps import ClockDep, DatabaseDep, DirectoryDep, PagesDep, PushBackDep, RuntimeDep
from services.intake.remote import PartUnavailable
from services.intake.reports import CategoryFigures, LibraryReport, csv_response, library_report
from services.intake.store import Need, NeedHistory
from shared import deadlines
from shared.db import Database
from shared.directory import Category, Directory, Library, User
from shared.logs import current_correlation_id
from shared.pages import DASHBOARD_PATH, MONTHS_FR, SECURITY_HEADERS, Pages, page_links, page_number
from shared.people import record_access
from shared.personal_data import PersonalDataError
from shared.queues import PushBack
from shared.search import MAX_QUERY
from shared.service import Service
from shared.settings import Settings

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")
HOME = "/nouvelle"
LIST_LIMIT = 200  # needs per page of "Mes demandes" (the first page also shows every overdue one)
OVERDUE_LIMIT = 500
MONTHS_OFFERED = 13  # this month and the twelve before
LIVE_EVERY_S = {"enregistree": 2, "demande": 10, "demandes": 20}
# Pages with a live region load /scripts/suivi.js, which fetches the region again.
# Every desk page also loads /scripts/hors-ligne.js: the service worker (/sw.js), the manifest, needs kept offline.
CSP = (
    SECURITY_HEADERS["Content-Security-Policy"]
    + "; script-src 'self'; connect-src 'self'; worker-src 'self'; manifest-src 'self'"
)
SLA_FILTERS = ("overdue", "on_track", "at_risk", "met", "breached")
DONE_NOTICES = ("information", "relance", "cloture", "reorientation")  # ?fait= after a desk action on a need
STATUS_FILTERS = ("waiting", *NEED_STATUSES)
FINAL_STATUSES = ("closed",)
PERSON_FIELDS = ("display_name", "email", "phone", "preferred_channel", "language")
MAX_REASON = 2000  # as the API's erase body


@dataclass(frozen=True)
class Desk:
    user: User
    library: Library


def form_errors(errors: list[dict]) -> dict[str, str]:
    """API errors (loc inside the body) as form field -> rule code; the template words them."""
    found: dict[str, str] = {}
    for error in errors:
        loc = [str(part) for part in error["loc"]]
        field = loc[1] if loc[0] == "person" and len(loc) > 1 else loc[0]
        field = {"consent_purposes": "consent_messages"}.get(field, field)  # the form's own box for messages
        found.setdefault(field, error["type"])
    return found


def month_value(raw: str | None, today: date) -> date:
    """The month asked for as YYYY-MM, or this month."""
    try:
        year, month = (int(part) for part in (raw or "").split("-"))
        return date(year, month, 1)
    except ValueError:
        return today.replace(day=1)


def months_before(today: date, count: int) -> list[date]:
    months, year, month = [], today.year, today.month
    for _ in range(count):
        months.append(date(year, month, 1))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return months


def month_label(month: date) -> str:
    return f"{MONTHS_FR[month.month - 1]} {month.year}"


def pages_for(svc: Service) -> Pages:
    """The desk's pages: front-desk staff sign in here; ops too, for a need's page (a person's export, erasure,
    printable file and access log), opened from a link."""
    return Pages(svc, TEMPLATES, roles=("front_desk", "ops"), home=HOME)


router = APIRouter()

# --- helpers


def desk(request: Request, pages: Pages, directory: Directory) -> Desk:
    user = pages.require_user(request, "front_desk")
    library = directory.library(user.library or "")
    if library is None:
        raise pages.error(request, 403, "role")
    return Desk(user, library)


def unread_count(request: Request, pages: Pages) -> int | None:
    """The menu's "Réponses à lire (N)" for a signed-in desk: its library's needs with partner answers not read."""
    user = pages.user(request)
    if user is None or user.role != "front_desk" or not user.library:
        return None
    with request.app.state.runtime.db.read() as session:  # one indexed count
        return views.unread_answers(session, user.library)


def show(request: Request, pages: Pages, template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("unread_answers", unread_count(request, pages))
    context.setdefault("offline_script", True)  # the layout loads hors-ligne.js (this CSP allows it)
    response = pages.render(request, template, status=status, **context)
    response.headers["Content-Security-Policy"] = CSP
    return response


def live(
    request: Request, pages: Pages, desk_: Desk, fragment: str, every_key: str, final: bool, **context: Any
) -> tuple[Response | None, dict[str, Any]]:
    """The live region's HTML: the answer itself for `?partiel=1`, else context for the whole page."""
    html = pages.env.get_template(fragment).render(request=request, user=desk_.user, library=desk_.library, **context)
    version = hashlib.sha256(html.encode()).hexdigest()[:16]
    if request.query_params.get("partiel") == "1":
        headers = {
            **SECURITY_HEADERS,
            "X-Relais-Partiel": "1",
            "X-Relais-Version": version,
            "X-Relais-Final": "1" if final else "0",
        }
        return Response(html, media_type="text/html; charset=utf-8", headers=headers), {}
    url = (
        request.url.path
        + "?"
        + urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "partiel"] + [("partiel", "1")])
    )
    return None, dict(
        live_html=Markup(html),
        live_version=version,
        live_url=url,
        live_final=final,
        live_every=LIVE_EVERY_S[every_key],
    )


def category_label(directory: Directory, category_id: str) -> str:
    category = directory.category(category_id)
    return category.label if category else category_id


def partner_name(directory: Directory, partner_id: str | None) -> str | None:
    if partner_id is None:
        return None
    partner = directory.partner(partner_id)
    return partner.name if partner else partner_id


def load(db: Database, need_id: str, library_id: str) -> tuple[Need, list[NeedHistory]] | None:
    with db.read() as session:
        found = views.need_with_history(session, need_id)
    return found if found is not None and found[0].library_id == library_id else None


async def found(
    request: Request, pages: Pages, db: Database, desk_: Desk, need_id: str
) -> tuple[Need, list[NeedHistory]]:
    result = await anyio.to_thread.run_sync(load, db, need_id, desk_.library.id)
    if result is None:
        raise pages.error(request, 404, "not_found")  # never 403: ids cannot be probed
    return result


def need_context(directory: Directory, need: Need, now: datetime) -> dict[str, Any]:
    return dict(
        need=need,
        category=category_label(directory, need.category),
        partner=partner_name(directory, need.partner_id),
        overdue=domain.is_overdue(need.status, need.respond_by, now),
        unread=domain.has_unread_answers(need.last_answer_at, need.answers_read_at),
    )


# --- static files of these pages


@router.get("/scripts/{name}")
async def script(name: str) -> Response:
    if name not in ("suivi.js", "nouvelle.js", "accueil.css", *OFFLINE_SHELL_FILES):
        return Response(status_code=404)
    return FileResponse(
        STATIC / name, headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    )


@router.get("/")
async def root(pages: PagesDep) -> Response:
    return pages.redirect(HOME)


# --- recording a need


def default_postal_code(library: Library) -> str:
    """The library's territory when it is a whole postal code (a prefix like "76" or "J2B" is not)."""
    try:
        return domain.normalize_postal_code(library.territory[0]) if library.territory else ""
    except ValueError:
        return ""


def blank_form(library: Library) -> dict[str, str]:
    return {
        "category": "",
        "summary": "",
        "postal_code": default_postal_code(library),
        "urgency": "normal",
        "display_name": "",
        "email": "",
        "phone": "",
        "preferred_channel": "",
        "language": "fr",
        "consent": "",
        "consent_messages": "",
        "consent_version": "",
        "same_person_as": "",
        "idempotency_key": secrets.token_urlsafe(18),
    }


def form_page(
    request: Request,
    pages: Pages,
    directory: Directory,
    desk_: Desk,
    values: dict[str, str],
    status: int = 200,
    errors: dict[str, str] | None = None,
    suggestions: list[str] | None = None,
    earlier: Need | None = None,
    key_reused: str | None = None,
    unavailable: bool = False,
    preview: dict[str, Any] | None = None,
    busy: bool = False,
    retry_after: int | None = None,
) -> Response:
    covered, others = category_groups(directory, desk_.library)
    response = show(
        request,
        pages,
        "nouvelle.html",
        status=status,
        library=desk_.library,
        values=values,
        errors=errors or {},
        suggestions=[category_label(directory, c) for c in suggestions or []],
        categories=[*covered, *others],
        covered_categories=covered,
        other_categories=others,
        preview=preview,
        earlier=earlier,
        key_reused=key_reused,
        unavailable=unavailable,
        busy=busy,
        default_postal_code=default_postal_code(desk_.library),
        max_summary=MAX_SUMMARY,
        consent_text=directory.consent_text(desk_.library.language),
    )
    if retry_after is not None:  # intake's push-back: the desk may send the same form again after this
        response.headers["Retry-After"] = str(retry_after)
    return response


def category_groups(directory: Directory, library: Library) -> tuple[list[Category], list[Category]]:
    """The directory's categories that some partner takes on the library's territory (any of its prefixes), then the
    others, each in the directory's order: the form offers the first ones first."""
    prefixes = library.territory or [""]
    covered = [
        c
        for c in directory.categories
        if any(
            deadlines.covering_partners(directory, category=c.id, postal_code=p or None, library_id=library.id)
            for p in prefixes
        )
    ]
    return covered, [c for c in directory.categories if c not in covered]


async def preview_of(
    settings: Settings, directory: Directory, desk_: Desk, typed_category: str, typed_postal_code: str
) -> dict[str, Any]:
    """What the form shows before sending: who referral would give the need to now, and by when (`state`: "ready",
    "no_category", "bad_postal_code" or "unavailable")."""
    category_id, suggestions = domain.find_category(typed_category, [(c.id, c.label) for c in directory.categories])
    if category_id is None:
        return dict(state="no_category", suggestions=[category_label(directory, c) for c in suggestions])
    try:
        postal_code = domain.normalize_postal_code(typed_postal_code.strip()) if typed_postal_code.strip() else None
    except ValueError:
        return dict(state="bad_postal_code", category=category_label(directory, category_id))
    answer = await remote.routing_preview(
        settings,
        library_id=desk_.library.id,
        category=category_id,
        postal_code=postal_code,
        actor=desk_.user.id,
    )
    if answer is None:
        return dict(state="unavailable", category=category_label(directory, category_id))
    partner = answer.get("partner") or None
    return dict(
        state="ready",
        category=category_label(directory, category_id),
        partner=partner["name"] if isinstance(partner, dict) else None,
        respond_by=datetime.fromisoformat(answer["respond_by"]),
        routed_because=answer["routed_because"],
    )


@router.get("/nouvelle/apercu")
async def routing_preview_fragment(
    request: Request,
    pages: PagesDep,
    runtime: RuntimeDep,
    directory: DirectoryDep,
    thematique: str = "",
    code_postal: str = "",
) -> Response:
    """The form's "who will receive it" region, for the script that refreshes it as the desk types."""
    desk_ = desk(request, pages, directory)
    preview = await preview_of(runtime.settings, directory, desk_, thematique[:200], code_postal[:20])
    html = pages.env.get_template("_apercu.html").render(preview=preview, library=desk_.library)
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/nouvelle")
async def new_need(
    request: Request, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep, meme_personne: str = ""
) -> Response:
    if pages.require_user(request, "front_desk", "ops").role == "ops":  # signed in here for a need's page: home
        return pages.redirect(pages.settings.link_base("referral") + DASHBOARD_PATH)  # is their dashboard
    desk_ = desk(request, pages, directory)
    values, earlier = blank_form(desk_.library), None
    if meme_personne:
        loaded = await anyio.to_thread.run_sync(load, db, meme_personne, desk_.library.id)
        if loaded is not None:
            earlier = loaded[0]
            values.update(
                display_name=earlier.person_display_name or "",
                email=earlier.person_email or "",
                phone=earlier.person_phone or "",
                preferred_channel=earlier.preferred_channel,
                language=earlier.language,
                postal_code=earlier.postal_code or values["postal_code"],
                same_person_as=earlier.id,
            )
    return form_page(request, pages, directory, desk_, values, earlier=earlier)


def form_values(library: Library, fields: dict[str, str]) -> dict[str, str]:
    """The need form's fields as posted (or as a need kept offline holds them), with their defaults."""
    values = {name: str(fields.get(name, "")) for name in blank_form(library)}
    values["urgency"] = values["urgency"] or "normal"
    values["language"] = values["language"] or "fr"
    values["summary"] = values["summary"].replace("\r\n", "\n")  # browsers send a textarea's lines with CRLF
    values["idempotency_key"] = values["idempotency_key"][:200] or secrets.token_urlsafe(18)
    return values


@dataclass
class Submitted:
    """What sending the need form gave: the need recorded (`recorded`), or why not (nothing was recorded)."""

    recorded: handlers.Recorded | None = None
    status: int = 201
    errors: dict[str, str] | None = None
    suggestions: list[str] | None = None
    earlier: Need | None = None
    key_reused: str | None = None
    unavailable: bool = False
    retry_after: int | None = None  # the pipeline lags (intake's push-back): nothing recorded, send again after this


async def submit_need(
    runtime: Any,
    db: Database,
    directory: Directory,
    now: datetime,
    desk_: Desk,
    values: dict[str, str],
    push_back: PushBack,
) -> Submitted:
    """Record the need the form's `values` describe, by the API's rules and command (the form's POST and a need kept
    offline, sent when the network is back, both come here); the idempotency key makes a repeat record nothing."""
    category_id, suggestions = domain.find_category(values["category"], [(c.id, c.label) for c in directory.categories])
    person = {
        "display_name": values["display_name"].strip() or None,
        "email": values["email"].strip() or None,
        "phone": values["phone"].strip() or None,
        "preferred_channel": values["preferred_channel"] or None,
        "language": values["language"] or "fr",
    }
    data = {
        "library_id": desk_.library.id,
        "category": category_id or values["category"].strip(),
        "summary": values["summary"],
        "postal_code": values["postal_code"].strip() or None,
        "urgency": values["urgency"] or "normal",
        "person": person,
        "consent": values["consent"] == "oui",
        # The text shown (its version is in the form) and the second, optional choice: messages to the person.
        "consent_purposes": ["handoff"] + (["messages"] if values["consent_messages"] == "oui" else []),
        "consent_version": values["consent_version"] or None,
        "same_person_as": values["same_person_as"] or None,
    }
    earlier = None
    if values["same_person_as"]:
        loaded = await anyio.to_thread.run_sync(load, db, values["same_person_as"], desk_.library.id)
        earlier = loaded[0] if loaded else None
    if (retry_after := await push_back.retry_after()) is not None:  # the pipeline lags: nothing recorded, try again
        return Submitted(status=429, suggestions=suggestions, earlier=earlier, retry_after=retry_after)
    try:
        body = validate_need(data, directory, library=desk_.library.id)
        cmd = record_command(body, desk_.user, values["idempotency_key"], current_correlation_id(), directory)
        recorded = await anyio.to_thread.run_sync(
            partial(
                handlers.record_need,
                db,
                cmd,
                directory=directory,
                now=now,
                personal_data=runtime.personal_data,
            )
        )
    except (Invalid, handlers.UnknownNeed) as exc:
        invalid = exc if isinstance(exc, Invalid) else unknown_earlier_need(str(exc))
        return Submitted(status=422, errors=form_errors(invalid.errors), suggestions=suggestions, earlier=earlier)
    except (
        redis.RedisError
    ):  # the person's data key could not be stored (Redis away past the retries): nothing recorded
        return Submitted(status=503, suggestions=suggestions, earlier=earlier, unavailable=True)
    except handlers.KeyReused as exc:  # this form already recorded a need, then was changed and sent again
        return Submitted(status=409, key_reused=exc.need_id, earlier=earlier)
    runtime.bus.relay.wake()
    return Submitted(recorded=recorded)


def submitted_page(
    request: Request, pages: Pages, directory: Directory, desk_: Desk, values: dict[str, str], sent: Submitted
) -> Response:
    """The form's answer once sent: the need's confirmation, or the form again saying why nothing was recorded."""
    if sent.recorded is not None:
        return pages.redirect(f"/demandes/{sent.recorded.id}/enregistree")
    return form_page(
        request,
        pages,
        directory,
        desk_,
        values,
        status=sent.status,
        errors=sent.errors,
        suggestions=sent.suggestions,
        earlier=sent.earlier,
        key_reused=sent.key_reused,
        unavailable=sent.unavailable,
        busy=sent.retry_after is not None,
        retry_after=sent.retry_after,
    )


@router.post("/nouvelle")
async def record(
    request: Request,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
    push_back: PushBackDep,
) -> Response:
    desk_ = desk(request, pages, directory)
    fields = await pages.form(request)
    values = form_values(desk_.library, fields)
    if chosen := fields.get("choisir", "").strip():  # a "Vouliez-vous dire" suggestion: fills the field
        values["category"] = chosen[:200]
    if chosen or "verifier" in fields:  # "Vérifier": the form again, with who would receive the need; nothing sent
        earlier_need = None
        if values["same_person_as"]:
            loaded = await anyio.to_thread.run_sync(load, db, values["same_person_as"], desk_.library.id)
            earlier_need = loaded[0] if loaded else None
        preview = await preview_of(runtime.settings, directory, desk_, values["category"], values["postal_code"])
        return form_page(request, pages, directory, desk_, values, earlier=earlier_need, preview=preview)
    sent = await submit_need(runtime, db, directory, clock(), desk_, values, push_back)
    if sent.key_reused:
        values["idempotency_key"] = secrets.token_urlsafe(18)  # a genuinely new need gets a fresh key
    return submitted_page(request, pages, directory, desk_, values, sent)


# --- the desk offline (issue 16, docs/offline.md): installable pages; needs kept sealed in the browser, sent later

OFFLINE_SHELL_FILES = ("hors-ligne.js", "icone-192.png", "icone-512.png")
RECENT_LIMIT = 50  # needs on the list that opens offline


def json_answer(status: int, **body: Any) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        media_type="application/json",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


@router.get("/sw.js")
async def service_worker() -> Response:
    """The service worker, at the root so that it may answer for the desk's pages (scope "/")."""
    return FileResponse(
        STATIC / "sw.js",
        media_type="text/javascript",
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; connect-src 'self'",
        },
    )


@router.get("/manifest.webmanifest")
async def manifest(directory: DirectoryDep) -> Response:
    """What makes the desk's pages an installable web app: its name, start page and icons."""
    name = directory.deployment.name
    body = {
        "name": f"{name} – Accueil",
        "short_name": name,
        "lang": "fr",
        "start_url": HOME,
        "scope": "/",
        "display": "standalone",
        "background_color": "#ffffff",
        "theme_color": "#000091",
        "icons": [
            {"src": "/scripts/icone-192.png", "sizes": "192x192", "type": "image/png"},
            {"src": "/scripts/icone-512.png", "sizes": "512x512", "type": "image/png"},
        ],
    }
    return Response(
        json.dumps(body, ensure_ascii=False),
        media_type="application/manifest+json",
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def signed_in_desk(request: Request, pages: Pages, directory: Directory) -> tuple[Desk, offline.SessionKey] | None:
    """The desk and its session's key, for the offline calls (JSON: no redirect to the sign-in page)."""
    user, session = pages.user(request), pages.session(request)
    library = directory.library(user.library or "") if user is not None and user.role == "front_desk" else None
    if user is None or library is None or session is None or not session.session_id:
        return None
    return Desk(user, library), offline.session_key(pages.settings, session.session_id)


@router.get("/hors-ligne/cle")
async def offline_key(request: Request, pages: PagesDep, directory: DirectoryDep) -> Response:
    """The public key the browser seals the needs it keeps offline to; its private half lives with the session."""
    found = signed_in_desk(request, pages, directory)
    if found is None:
        return json_answer(401, detail="signed_out")
    return json_answer(200, tag=found[1].tag, public_key=found[1].public_key)


def sealed_of(fields: dict[str, Any]) -> dict[str, object]:
    return {name: fields.get(name, "") for name in ("tag", "epk", "iv", "ct")}


def refusal_messages(pages: Pages, library: Library, errors: dict[str, str]) -> list[str]:
    """The form's own French message for each refused field, in the form's order."""
    module = pages.env.get_template("_messages_demande.html").module
    return [
        Markup(module.field_message(field, errors[field], MAX_SUMMARY)).unescape().strip()  # type: ignore[attr-defined]
        for field in blank_form(library)
        if field in errors
    ]


@router.post("/hors-ligne/envoyer")
async def send_kept_need(
    request: Request,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
    push_back: PushBackDep,
) -> Response:
    """A need the browser kept while offline, sent now: recorded when the server records it (its deadline starts
    now), once whatever the repeats (its idempotency key); refused fields come back worded for the desk to fix."""
    found = signed_in_desk(request, pages, directory)
    if found is None:
        return json_answer(401, state="signed_out")
    desk_, key = found
    session = pages.session(request)
    if pages.cross_site(request) or session is None or request.headers.get("x-csrf-token") != session.csrf:
        return json_answer(403, state="csrf")
    try:
        sealed = await request.json()
        fields = offline.open_sealed(key, sealed_of(sealed if isinstance(sealed, dict) else {}))
    except (ValueError, offline.Unreadable):
        return json_answer(400, state="unreadable")
    values = form_values(desk_.library, fields)

    def fixed_on_the_form() -> tuple[str, str] | None:
        with db.read() as session:
            need = views.need_of_key(session, desk_.user.id, values["idempotency_key"])
            return (need.id, need.reference) if need is not None else None

    sent = await submit_need(runtime, db, directory, clock(), desk_, values, push_back)
    if sent.recorded is not None:
        need = json.loads(sent.recorded.response_body)
        return json_answer(
            201, state="recorded", id=sent.recorded.id, reference=need.get("reference"), url=f"/demandes/{need['id']}"
        )
    if sent.key_reused:  # refused once, then fixed and recorded on the form with its key: this copy is done
        return json_answer(409, state="recorded_before", id=sent.key_reused, url=f"/demandes/{sent.key_reused}")
    if sent.unavailable:
        return json_answer(503, state="unavailable")
    if sent.retry_after is not None:  # the pipeline lags: the browser keeps the need and sends it again later
        return json_answer(429, state="busy", retry_after_s=sent.retry_after)
    # Refused once, then opened on the form, fixed and recorded there with its key: this copy is done.
    if (earlier := await anyio.to_thread.run_sync(fixed_on_the_form)) is not None:
        need_id, reference = earlier
        return json_answer(200, state="recorded_before", id=need_id, reference=reference, url=f"/demandes/{need_id}")
    return json_answer(422, state="to_fix", messages=refusal_messages(pages, desk_.library, sent.errors or {}))


@router.post("/hors-ligne/corriger")
async def fix_kept_need(
    request: Request,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
    push_back: PushBackDep,
) -> Response:
    """A kept need the server refused, opened on the form with its errors; the form keeps its idempotency key, so
    sending it records the need once (and the kept copy is then known as recorded)."""
    desk_ = desk(request, pages, directory)
    fields = await pages.form(request)
    found = signed_in_desk(request, pages, directory)
    try:
        values = form_values(desk_.library, offline.open_sealed(found[1], sealed_of(fields))) if found else None
    except offline.Unreadable:
        values = None
    if values is None:
        raise pages.error(request, 400, "form")
    sent = await submit_need(runtime, db, directory, clock(), desk_, values, push_back)
    return submitted_page(request, pages, directory, desk_, values, sent)


@router.get("/demandes/recentes")
async def recent_needs(
    request: Request, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    """The library's recent needs without the people's names nor the summaries (this page is kept by the browser to
    open offline), and the needs kept on this computer waiting to be sent (filled in by /scripts/hors-ligne.js)."""
    desk_ = desk(request, pages, directory)
    now = clock()

    def rows() -> list[Need]:
        with db.read() as session:
            found, _ = views.desk_needs(
                session,
                desk_.library.id,
                now,
                status="",
                category="",
                sla="",
                q="",
                unread=False,
                page=1,
                limit=RECENT_LIMIT,
                overdue_limit=RECENT_LIMIT,
            )
            return found

    items = [need_context(directory, n, now) for n in await anyio.to_thread.run_sync(rows)]
    return show(request, pages, "recentes.html", library=desk_.library, items=items, updated_at=now)


# --- the confirmation


@router.get("/demandes/{need_id}/enregistree")
async def recorded(
    request: Request, need_id: str, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    desk_ = desk(request, pages, directory)
    need, history = await found(request, pages, db, desk_, need_id)
    now = clock()
    routed_because = next(
        (h.detail for h in reversed(history) if h.event in ("referral.assigned", "need.unroutable")), None
    )
    coordination = ", ".join(c.name for c in directory.escalation_contacts)  # told when no partner is found
    context = need_context(directory, need, now) | dict(routed_because=routed_because, coordination=coordination)
    partial, live_context = live(
        request, pages, desk_, "_suivi.html", "enregistree", final=need.status != "recorded", **context
    )
    if partial is not None:
        return partial
    return show(request, pages, "enregistree.html", library=desk_.library, **context, **live_context)


# --- the person's receipt


RECEIPT_CHANNELS = {"email": "e-mail", "sms": "SMS"}


def receipt_channels(need: Need) -> list[str]:
    """The channels the receipt can go by: those the person gave an address for."""
    if need.person_erased_at is not None:
        return []
    return [c for c, address in (("sms", need.person_phone), ("email", need.person_email)) if address]


@router.get("/demandes/{need_id}/recu")
async def receipt(
    request: Request,
    need_id: str,
    pages: PagesDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
    resume: str = "",
    envoye: str = "",
) -> Response:
    """The person's receipt, to print (one A4 page) or show on a phone: the reference, what was asked (the category;
    the summary only when the desk ticks it), who will call and by when, the library's phone and hours."""
    desk_, need, _ = await need_reader(request, pages, db, directory, need_id)
    response = show(
        request,
        pages,
        "recu.html",
        library=desk_.library,
        **need_context(directory, need, clock()),
        with_summary=resume == "oui" and need.person_erased_at is None,
        channels=receipt_channels(need),
        channel_names=RECEIPT_CHANNELS,
        sent=RECEIPT_CHANNELS.get(envoye),
        send_error=False,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/demandes/{need_id}/recu")
async def send_receipt(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """Send the receipt to the person by SMS or email (notifications sends it; the need's history says so)."""
    desk_ = desk(request, pages, directory)
    fields = await pages.form(request)
    channel = fields.get("canal", "")
    cmd = SendReceipt(need_id=need_id, library_id=desk_.library.id, channel=channel, actor=desk_.user.id)
    try:
        await anyio.to_thread.run_sync(partial(handlers.send_receipt, db, cmd, now=clock()))
    except handlers.UnknownNeed:
        raise pages.error(request, 404, "not_found") from None
    except handlers.NoAddress:
        need, _ = await found(request, pages, db, desk_, need_id)
        return show(
            request,
            pages,
            "recu.html",
            status=422,
            library=desk_.library,
            **need_context(directory, need, clock()),
            with_summary=False,
            channels=receipt_channels(need),
            channel_names=RECEIPT_CHANNELS,
            sent=None,
            send_error=True,
        )
    runtime.bus.relay.wake()
    return pages.redirect(f"/demandes/{need_id}/recu?envoye={channel}")


# --- Mes demandes


@router.get("/demandes")
async def needs(
    request: Request,
    pages: PagesDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
    statut: str = "",
    thematique: str = "",
    delai: str = "",
    q: str = "",
    lire: str = "",
    page: str = "1",
) -> Response:
    desk_ = desk(request, pages, directory)
    q = q.strip()[:MAX_QUERY]
    unread = lire == "1"
    status = statut if statut in STATUS_FILTERS else ""
    category = thematique if directory.category(thematique) else ""
    sla = delai if delai in SLA_FILTERS else ""
    number = page_number(page)
    now = clock()

    def rows() -> tuple[list[Need], bool]:
        with db.read() as session:
            return views.desk_needs(
                session,
                desk_.library.id,
                now,
                status=status,
                category=category,
                sla=sla,
                q=q,
                unread=unread,
                page=number,
                limit=LIST_LIMIT,
                overdue_limit=OVERDUE_LIMIT,
            )

    found_rows, has_more = await anyio.to_thread.run_sync(rows)
    items = [need_context(directory, n, now) for n in found_rows]
    filters: dict[str, Any] = dict(
        filter_status=status, filter_category=category, filter_sla=sla, filter_q=q, filter_unread=unread
    )
    partial, live_context = live(
        request,
        pages,
        desk_,
        "_liste.html",
        "demandes",
        final=False,
        items=items,
        filtered=bool(status or category or sla or q or unread),
        **page_links(request, number, has_more),
        **filters,
    )
    if partial is not None:
        return partial
    return show(
        request,
        pages,
        "demandes.html",
        library=desk_.library,
        categories=directory.categories,
        statuses=STATUS_FILTERS,
        slas=SLA_FILTERS,
        **filters,
        **live_context,
    )


async def need_reader(
    request: Request, pages: Pages, db: Database, directory: Directory, need_id: str
) -> tuple[Desk, Need, list[NeedHistory]]:
    """A need's page for its library's desk, or for ops (any library's need)."""
    user = pages.require_user(request, "front_desk", "ops")
    if user.role == "front_desk":
        desk_ = desk(request, pages, directory)
        need, history = await found(request, pages, db, desk_, need_id)
        return desk_, need, history

    def any_library() -> tuple[Need, list[NeedHistory]] | None:
        with db.read() as session:
            return views.need_with_history(session, need_id)

    loaded = await anyio.to_thread.run_sync(any_library)
    library = directory.library(loaded[0].library_id) if loaded else None
    if loaded is None or library is None:
        raise pages.error(request, 404, "not_found")
    return Desk(user, library), *loaded


@router.get("/demandes/{need_id}")
async def need_page(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    desk_, need, history = await need_reader(request, pages, db, directory, need_id)
    if desk_.user.role == "front_desk" and domain.has_unread_answers(need.last_answer_at, need.answers_read_at):
        # The desk is reading the need: its partner answers are no longer "à lire" (the page shows them flagged once).
        cmd = MarkAnswersRead(need_id=need.id, library=desk_.library.id)
        await anyio.to_thread.run_sync(partial(handlers.mark_answers_read, db, cmd, now=clock()))
    return await render_need_page(request, pages, runtime, db, directory, desk_, need, history, clock())


def desk_actions(need: Need, history: list[NeedHistory], now: datetime) -> dict[str, Any]:
    """Which of the desk's actions the need's state allows now (domain's rules), and when a nudge becomes possible."""

    def allowed(check: Any, *args: Any) -> domain.Refusal | None:
        try:
            check(*args)
        except domain.Refusal as refusal:
            return refusal
        return None

    erased = need.person_erased_at is not None
    declined = any(h.event == "referral.declined" for h in history)
    nudge = allowed(domain.check_nudge, need.status, need.partner_nudged_at, now)
    return dict(
        can_note=allowed(domain.check_note, need.status, erased) is None,
        can_nudge=nudge is None,
        nudge_from=nudge.until if nudge is not None else None,
        can_close=allowed(domain.check_open, need.status, erased) is None,
        can_reroute=allowed(domain.check_reroute, need.status, erased, declined) is None,
    )


async def render_need_page(
    request: Request,
    pages: Pages,
    runtime: Any,
    db: Database,
    directory: Directory,
    desk_: Desk,
    need: Need,
    history: list[NeedHistory],
    now: datetime,
    status: int = 200,
    **extra: Any,
) -> Response:
    entries = [dict(h=h, partner=partner_name(directory, h.partner_id)) for h in history]
    context = need_context(directory, need, now) | dict(history=entries)
    partial, live_context = live(
        request, pages, desk_, "_demande_etat.html", "demande", final=need.status in FINAL_STATUSES, **context
    )
    if partial is not None:
        return partial
    access: dict[str, Any] = {}
    if desk_.user.role == "ops":  # ops read the person's details here: logged; and they see who else did
        await anyio.to_thread.run_sync(
            partial_call(
                record_access,
                db,
                at=now,
                need_id=need.id,
                user_id=desk_.user.id,
                role="ops",
                service="intake",
                channel="page",
                what="need",
            )
        )
        access = await access_log_context(runtime.settings, db, need.person_id, desk_.user)
    done = request.query_params.get("fait")
    extra.setdefault("action_errors", {})
    extra.setdefault("action_values", {})
    return show(
        request,
        pages,
        "demande.html",
        status=status,
        library=desk_.library,
        erased=done == "effacement",
        done=done if done in DONE_NOTICES else None,
        max_note=api.MAX_NOTE,
        **desk_actions(need, history, now),
        **context,
        **live_context,
        **access,
        **extra,
    )


async def desk_action(
    request: Request,
    need_id: str,
    pages: Pages,
    runtime: Any,
    db: Database,
    directory: Directory,
    now: datetime,
    run: Any,
    done: str,
    action: str,
    values: dict[str, str] | None = None,
) -> Response:
    """Run a desk action's handler (`run()`, in a thread); then back to the need's page saying it is done, or the
    page again with the refusal next to the action's form (nothing was written)."""
    desk_ = desk(request, pages, directory)
    try:
        await anyio.to_thread.run_sync(run)
    except handlers.UnknownNeed:
        raise pages.error(request, 404, "not_found") from None
    except domain.Refusal as refusal:
        need, history = await found(request, pages, db, desk_, need_id)
        return await render_need_page(
            request,
            pages,
            runtime,
            db,
            directory,
            desk_,
            need,
            history,
            now,
            status=409,
            action_errors={action: refusal.code},
            action_values=values or {},
            refused_until=refusal.until,
        )
    except (redis.RedisError, PersonalDataError):  # the text could not be sealed: nothing recorded
        need, history = await found(request, pages, db, desk_, need_id)
        return await render_need_page(
            request,
            pages,
            runtime,
            db,
            directory,
            desk_,
            need,
            history,
            now,
            status=503,
            action_errors={action: "unavailable"},
            action_values=values or {},
        )
    runtime.bus.relay.wake()
    return pages.redirect(f"/demandes/{need_id}?fait={done}#actions")


async def text_field(
    request: Request,
    pages: Pages,
    runtime: Any,
    db: Database,
    directory: Directory,
    desk_: Desk,
    need_id: str,
    action: str,
    text: str,
    now: datetime,
) -> Response | None:
    """The page again with the field's error (blank, too long) when the action's text is not acceptable."""
    problem = "required" if not text.strip() else "too_long" if len(text) > api.MAX_NOTE else None
    if problem is None:
        return None
    need, history = await found(request, pages, db, desk_, need_id)
    return await render_need_page(
        request,
        pages,
        runtime,
        db,
        directory,
        desk_,
        need,
        history,
        now,
        status=422,
        action_errors={action: problem},
        action_values={action: text},
    )


@router.post("/demandes/{need_id}/information")
async def add_note(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """Information for the partner holding the need: on its referral page, and its contact is emailed."""
    desk_ = desk(request, pages, directory)
    fields = await pages.form(request)
    text, now = fields.get("texte", "").replace("\r\n", "\n"), clock()
    if (
        invalid := await text_field(request, pages, runtime, db, directory, desk_, need_id, "note", text, now)
    ) is not None:
        return invalid
    cmd = AddNote(need_id=need_id, text=text, actor=desk_.user.id, library=desk_.library.id)
    run = partial(handlers.add_note, db, cmd, now=now, personal_data=runtime.personal_data)
    return await desk_action(
        request, need_id, pages, runtime, db, directory, now, run, "information", "note", {"note": text}
    )


@router.post("/demandes/{need_id}/relancer")
async def nudge(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """Ask the partner for news (at most once in 24 hours)."""
    desk_ = desk(request, pages, directory)
    await pages.form(request)  # the CSRF check
    now = clock()
    cmd = NudgePartner(need_id=need_id, actor=desk_.user.id, library=desk_.library.id)
    run = partial(handlers.nudge_partner, db, cmd, now=now)
    return await desk_action(request, need_id, pages, runtime, db, directory, now, run, "relance", "nudge")


@router.post("/demandes/{need_id}/cloturer")
async def close(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """The person no longer needs help: the need is closed, the partner's referral ends."""
    desk_ = desk(request, pages, directory)
    fields = await pages.form(request)
    reason, now = fields.get("motif", "").replace("\r\n", "\n"), clock()
    if (
        invalid := await text_field(request, pages, runtime, db, directory, desk_, need_id, "close", reason, now)
    ) is not None:
        return invalid
    cmd = CloseNeed(need_id=need_id, reason=reason, actor=desk_.user.id, library=desk_.library.id)
    run = partial(handlers.close_need, db, cmd, now=now, personal_data=runtime.personal_data)
    return await desk_action(
        request, need_id, pages, runtime, db, directory, now, run, "cloture", "close", {"close": reason}
    )


@router.post("/demandes/{need_id}/reorienter")
async def reroute(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """After a decline left the need with no partner: route it again, those that declined excluded."""
    desk_ = desk(request, pages, directory)
    await pages.form(request)  # the CSRF check
    now = clock()
    cmd = RerouteNeed(need_id=need_id, actor=desk_.user.id, library=desk_.library.id)
    run = partial(handlers.reroute_need, db, cmd, now=now)
    return await desk_action(request, need_id, pages, runtime, db, directory, now, run, "reorientation", "reroute")


async def access_log_context(settings: Settings, db: Database, person_id: str, user: User) -> dict[str, Any]:
    """The person's access log for ops' view of a need: every service's rows, or which service did not answer."""
    part = await anyio.to_thread.run_sync(api.person_in_scope, db, person_id, user)
    if part is None:
        return {}
    try:
        return dict(access_log=await api.person_access_log(settings, part), access_log_missing=None)
    except PartUnavailable as exc:
        return dict(access_log=None, access_log_missing=exc.service)


# --- a person's data: export, printable file, erasure


async def person_of_need(request: Request, pages: Pages, db: Database, directory: Directory, need_id: str):
    """The need's reader and intake's part of its person (a desk of the need's library, or ops)."""
    desk_, need, _ = await need_reader(request, pages, db, directory, need_id)
    part = await anyio.to_thread.run_sync(api.person_in_scope, db, need.person_id, desk_.user)
    if part is None:
        raise pages.error(request, 404, "not_found")
    return desk_, need, part


async def export_or_error(
    request: Request, pages: Pages, settings: Settings, db: Database, part, user: User, now: datetime
) -> dict[str, Any]:
    try:
        return await api.person_export(settings, db, part, user, now, "page")
    except PartUnavailable as exc:
        raise pages.error(request, 503, "export_unavailable", service_name=exc.service) from None


@router.get("/demandes/{need_id}/donnees.json")
async def person_export_download(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """Everything Relais holds about the need's person, as the JSON file the API answers, to download."""
    desk_, need, part = await person_of_need(request, pages, db, directory, need_id)
    document = await export_or_error(request, pages, runtime.settings, db, part, desk_.user, clock())
    return Response(
        json.dumps(document, ensure_ascii=False, indent=2),
        media_type="application/json; charset=utf-8",
        headers={
            **SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="relais-personne-{need.person_id}.json"',
            "Cache-Control": "no-store",
        },
    )


@router.get("/demandes/{need_id}/dossier")
async def person_file(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    """The person's file, to print and hand to them: their needs, the referrals and answers, the messages."""
    desk_, need, part = await person_of_need(request, pages, db, directory, need_id)
    now = clock()
    document = await export_or_error(request, pages, runtime.settings, db, part, desk_.user, now)
    referrals = {
        case["need_id"]: case["referrals"] for case in document["referral"].get("needs", []) if isinstance(case, dict)
    }
    deliveries: dict[str, list[dict]] = {}
    for d in document["notifications"].get("deliveries", []):
        deliveries.setdefault(d.get("need_id") or "", []).append(d)
    needs = [
        dict(
            need=n,
            category=category_label(directory, n["category"]),
            referrals=[dict(r=r, partner=partner_name(directory, r["partner_id"])) for r in referrals.get(n["id"], [])],
            deliveries=deliveries.get(n["id"], []),
        )
        for n in document["needs"]
    ]
    response = show(
        request,
        pages,
        "dossier.html",
        library=desk_.library,
        document=document,
        needs=needs,
        printed_at=now,
        parse_at=datetime.fromisoformat,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/demandes/{need_id}/effacer")
async def erase_confirmation(
    request: Request, need_id: str, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep
) -> Response:
    """What erasing the person's data will do, before it is done."""
    desk_, need, part = await person_of_need(request, pages, db, directory, need_id)
    return erase_page(request, pages, desk_, need, part)


def erase_page(request: Request, pages: Pages, desk_: Desk, need: Need, part, status: int = 200, **context) -> Response:
    return show(
        request,
        pages,
        "effacer.html",
        status=status,
        library=desk_.library,
        need=need,
        needs=part.needs,
        erasure=part.erasure,
        max_reason=MAX_REASON,
        **context,
    )


@router.post("/demandes/{need_id}/effacer")
async def erase(
    request: Request,
    need_id: str,
    pages: PagesDep,
    runtime: RuntimeDep,
    db: DatabaseDep,
    directory: DirectoryDep,
    clock: ClockDep,
) -> Response:
    desk_, need, part = await person_of_need(request, pages, db, directory, need_id)
    fields = await pages.form(request)
    reason = fields.get("reason", "").strip()
    if not reason or len(reason) > MAX_REASON or fields.get("confirm") != "oui":
        errors = {
            **({"reason": "required" if not reason else "too_long"} if not reason or len(reason) > MAX_REASON else {}),
            **({"confirm": "required"} if fields.get("confirm") != "oui" else {}),
        }
        return erase_page(request, pages, desk_, need, part, status=422, errors=errors, values=fields)
    await api.erase(runtime, db, need.person_id, reason, desk_.user, clock())
    return pages.redirect(f"/demandes/{need.id}?fait=effacement")


@router.post("/demandes/{need_id}/retirer-messages")
async def withdraw_messages(
    request: Request, need_id: str, pages: PagesDep, runtime: RuntimeDep, db: DatabaseDep, clock: ClockDep
) -> Response:
    """The person tells the desk they want no more messages: recorded, notifications stops; the need goes on."""
    desk_ = desk(request, pages, runtime.directory)
    await pages.form(request)  # the CSRF check
    await found(request, pages, db, desk_, need_id)  # another library's need: 404
    cmd = WithdrawMessagesConsent(need_id=need_id, actor=desk_.user.id, library=desk_.library.id)
    if await anyio.to_thread.run_sync(partial(handlers.withdraw_messages_consent, db, cmd, now=clock())):
        runtime.bus.relay.wake()
    return pages.redirect(f"/demandes/{need_id}")


# --- monthly figures


def month_figures(
    db: Database, directory: Directory, library: Library, month: date, now: datetime
) -> tuple[LibraryReport, list[tuple[str, CategoryFigures]]]:
    report = library_report(db, library, month, now)
    return report, [(category_label(directory, f.category), f) for f in report.by_category]


def month_choice(library: Library, raw: str, now: datetime) -> tuple[date, list[date]]:
    today = now.astimezone(library.zoneinfo).date()
    offered = months_before(today, MONTHS_OFFERED)
    month = month_value(raw, today)
    return (month if month in offered else offered[0]), offered


@router.get("/chiffres")
async def figures(
    request: Request, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep, clock: ClockDep, mois: str = ""
) -> Response:
    desk_ = desk(request, pages, directory)
    month, offered = month_choice(desk_.library, mois, clock())
    total, by_category = await anyio.to_thread.run_sync(month_figures, db, directory, desk_.library, month, clock())
    return show(
        request,
        pages,
        "chiffres.html",
        library=desk_.library,
        month=month,
        month_label=month_label(month),
        months=[(m.strftime("%Y-%m"), month_label(m)) for m in offered],
        total=total,
        by_category=by_category,
    )


@router.get("/chiffres.csv")
async def figures_csv(
    request: Request, pages: PagesDep, db: DatabaseDep, directory: DirectoryDep, clock: ClockDep, mois: str = ""
) -> Response:
    desk_ = desk(request, pages, directory)
    month, _ = month_choice(desk_.library, mois, clock())
    report, _ = await anyio.to_thread.run_sync(month_figures, db, directory, desk_.library, month, clock())
    return csv_response([report], directory, f"relais-{desk_.library.id}-{month:%Y-%m}.csv")
