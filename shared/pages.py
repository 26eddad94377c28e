"""Web pages for every service: templates, French wording of dates, forms and their CSRF tokens, long lists.

A service's pages are a FastAPI router built with a `Pages` object and handed to
`Service.create_app(..., pages=[router])`, which mounts them at the root with `/static/relais.css`.
Pages work without JavaScript: plain forms, POST then redirect (303). User-facing text is French and
lives in templates (`shared/templates/` for the layout, sign-in and error pages; each service's own
`templates/` folder for its pages, looked up first, so a service may override `layout.html`).

CSRF: every POST form carries `csrf`; a session's forms carry the session's token; the forms of a
referral-link page carry a token derived from the link's token (`Pages.link_csrf`), so a form cannot
be replayed against another link. Forms are parsed here (application/x-www-form-urlencoded) rather
than with FastAPI's Form(), which needs python-multipart.

Signed links, sign-in by email, the session cookie and the sign-in routes are shared.signin.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import secrets
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from shared.directory import Directory, User, national_phone
from shared.sessions import SESSION_MAX_AGE
from shared.settings import Settings
from shared.signin import LiveSessions, WebSession, session_cookie, sign, sign_in_router

if TYPE_CHECKING:
    from shared.service import Service

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")

log = logging.getLogger("relais.web")

MAX_FORM_BYTES = 64 * 1024
DASHBOARD_PATH = "/tableau-de-bord"  # the ops dashboard, served by referral; every service's pages link to it


# --- French wording of times ----------------------------------------------------------------------

DAYS_FR = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
MONTHS_FR = (
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
)


def _hour_fr(local: datetime) -> str:
    return f"{local.hour} h{f' {local.minute:02d}' if local.minute else ''}"


def deadline_fr(at: datetime, timezone: str) -> str:
    """'avant lundi 23 novembre à 14 h 05' in the given time zone."""
    local = at.astimezone(ZoneInfo(timezone))
    return f"avant {DAYS_FR[local.weekday()]} {local.day} {MONTHS_FR[local.month - 1]} à {_hour_fr(local)}"


def datetime_fr(at: datetime, timezone: str) -> str:
    """'lundi 23 novembre 2026 à 14 h 05' in the given time zone."""
    local = at.astimezone(ZoneInfo(timezone))
    return f"{DAYS_FR[local.weekday()]} {local.day} {MONTHS_FR[local.month - 1]} {local.year} à {_hour_fr(local)}"


def date_fr(day: date | datetime) -> str:
    """'lundi 23 novembre 2026': a day with no time, worded as the pages' other dates."""
    return f"{DAYS_FR[day.weekday()]} {day.day} {MONTHS_FR[day.month - 1]} {day.year}"


def iso(at: datetime) -> str:
    """For <time datetime="...">."""
    return at.isoformat(timespec="minutes")


# --- templates ------------------------------------------------------------------------------------


def environment(*template_dirs: Path) -> Environment:
    """A Jinja2 environment looking in `template_dirs` first, then in the shared templates."""
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(d) for d in (*template_dirs, TEMPLATES)]),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        deadline_fr=deadline_fr, datetime_fr=datetime_fr, date_fr=date_fr, iso=iso, phone_national=national_phone
    )
    return env


def actor_fr(directory: Directory, actor: str, with_address: bool = False) -> str:
    """Who did something, as a person reads it: the partner's or the library's name from the directory, "la
    coordination", "Relais" for the system; never a directory id such as `op-caf76`. `with_address` adds the
    account's email (the coordination's own pages: who among several people of one team acted)."""
    if actor == "system":
        return "Relais"
    if actor == "person":  # the person's own answer (issue 16: "were you contacted?")
        return "la personne"
    if actor.startswith("link:"):
        partner = directory.partner(actor.removeprefix("link:"))
        return f"{partner.name if partner else 'le partenaire'}, par le lien reçu par e-mail"
    user = directory.user(actor)
    if user is None:
        return "un compte qui n'est plus dans l'annuaire"
    if user.role == "partner":
        partner = directory.partner(user.partner or "")
        name = partner.name if partner else "un partenaire"
    elif user.role == "front_desk":
        library = directory.library(user.library or "")
        name = library.name if library else "un lieu d'accueil"
    else:
        name = "la coordination"
    return f"{name} ({user.email})" if with_address and user.email else name


class Interrupt(Exception):
    """Raised by page helpers to answer at once with `response` (a redirect, an error page)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# Pages show personal data and carry tokens in their URLs: never cached, never framed, never referred.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        # data: images and self-hosted fonts: the DSFR theme's Marianne block and Marianne font (base.html)
        "default-src 'none'; style-src 'self'; img-src 'self' data:; font-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def csv_download(header: Sequence[object], rows: Iterable[Sequence[object]], filename: str) -> Response:
    """A CSV file to download as French spreadsheets open it: `;`-separated, CRLF, UTF-8 with a BOM."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return Response(
        "\ufeff" + out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def mount(app: FastAPI, pages: Sequence[APIRouter], svc: Service) -> None:
    """Mount page routers at the root (not in the OpenAPI document), /static, the Interrupt handler, and the check
    of each request's session against its server-side record."""
    from shared import public_pages  # it depends on shared.deps, which imports this module

    for router in (*pages, public_pages.router):
        app.include_router(router, include_in_schema=False)
    app.add_middleware(LiveSessions, svc=svc)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def interrupted(request: Request, exc: Interrupt) -> Response:
        return exc.response

    # Starlette types a handler as taking any Exception; it calls each with the class it was added for.
    app.add_exception_handler(Interrupt, interrupted)  # type: ignore[arg-type]


# --- forms ----------------------------------------------------------------------------------------


async def read_form(request: Request) -> dict[str, str] | None:
    """The fields of an urlencoded form (first value of each; none for an empty body); None when the body is
    something else or too large."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    if not body:
        return {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


# --- long lists ----------------------------------------------------------------------------------


def page_number(raw: str) -> int:
    """The `page` query parameter of a long list: 1 for anything that is not a positive number."""
    return int(raw) if raw.isdigit() and 0 < int(raw) < 100_000 else 1


def page_links(request: Request, page: int, has_more: bool) -> dict[str, Any]:
    """Links to the previous and next pages of a long list, keeping the list's filters (for shared/templates/
    _pages.html)."""

    def url(number: int) -> str:
        kept = [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "partiel")]
        query = urlencode(kept + ([("page", str(number))] if number > 1 else []))
        return request.url.path + ("?" + query if query else "")

    return {
        "page": page,
        "newer_url": url(page - 1) if page > 1 else None,
        "older_url": url(page + 1) if has_more else None,
    }


# --- one service's pages --------------------------------------------------------------------------


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Pages:
    """One service's web pages: rendering, the signed-in user, CSRF, and the sign-in routes (shared.signin).

    `roles` may sign in on this service; `home` is where a signed-in user lands.
    """

    def __init__(self, svc: Service, template_dir: Path | None, *, roles: Sequence[str], home: str) -> None:
        self.svc, self.roles, self.home = svc, tuple(roles), home
        self.env = environment(*([template_dir] if template_dir else []))
        self.cookie = session_cookie(svc.name)
        self.secure = svc.settings.link_base(svc.name).startswith("https://")

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    # --- sessions

    def session(self, request: Request) -> WebSession | None:
        """The request's valid session, read and checked by `LiveSessions` before the page ran."""
        # No middleware ran: nobody is signed in (fail closed).
        found: WebSession | None = getattr(request.state, "web_session", None)
        return found

    def set_session(self, response: Response, session: WebSession) -> None:
        value = sign(
            self.settings,
            f"session:{self.svc.name}",
            {"u": session.user_id, "c": session.csrf, "s": session.session_id},
            self.svc.clock(),
        )
        response.set_cookie(
            self.cookie,
            value,
            max_age=int(SESSION_MAX_AGE.total_seconds()),
            path="/",
            httponly=True,
            samesite="lax",
            secure=self.secure,
        )

    def user(self, request: Request) -> User | None:
        """The signed-in user, if they are still in the directory with a role allowed here."""
        session = self.session(request)
        if session is None or not session.user_id:
            return None
        user = next((u for u in self.svc.directory.users if u.id == session.user_id), None)
        return user if user is not None and user.role in self.roles else None

    def require_user(self, request: Request, *roles: str) -> User:
        """The signed-in user; otherwise a redirect to the sign-in page, or a 403 page for another role."""
        user = self.user(request)
        if user is None:
            raise Interrupt(RedirectResponse("/connexion", status_code=303))
        if roles and user.role not in roles:
            raise Interrupt(self.render(request, "erreur.html", status=403, problem="role"))
        return user

    # --- rendering

    def render(
        self, request: Request, template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
    ) -> HTMLResponse:
        """A page; gives the visitor a session (for the CSRF token of its forms) when they have none.
        `headers` replace the default security headers of the same name (e.g. a page with its own script)."""
        session = self.session(request)
        fresh = session is None
        if session is None:
            session = WebSession(user_id=None, csrf=secrets.token_urlsafe(24))
            request.state.web_session = session
        context.setdefault("csrf", session.csrf)
        user = self.user(request)
        directory = self.svc.directory
        html = self.env.get_template(template).render(
            request=request,
            user=user,
            deployment=directory.deployment,
            desk_library=directory.library(user.library) if user and user.library else None,
            who=lambda actor, with_address=False: actor_fr(directory, actor, with_address),
            home=self.home,
            service=self.svc.name,
            session_csrf=session.csrf,
            dashboard_url=self.settings.link_base("referral") + DASHBOARD_PATH,
            **context,
        )
        response = HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})
        if fresh:
            self.set_session(response, session)
        return response

    def text(self, template: str, **context: Any) -> str:
        """A short text rendered from a template (French wording kept out of Python)."""
        return self.env.get_template(template).render(**context).strip()

    def redirect(self, url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)

    def error(
        self, request: Request, status: int, problem: str, template: str = "erreur.html", **context: Any
    ) -> Interrupt:
        return Interrupt(self.render(request, template, status=status, problem=problem, **context))

    # --- CSRF

    def cross_site(self, request: Request) -> bool:
        """True when the browser says another site sent this POST (Sec-Fetch-Site, else Origin); a client that
        sends neither header (not a browser) is let through: the form's CSRF token still applies."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site.lower() not in ("same-origin", "none")
        origin = request.headers.get("origin")
        if origin is None:
            return False
        return origin.lower().rstrip("/") not in {
            _origin(self.settings.link_base(self.svc.name)),
            _origin(str(request.base_url)),
        }

    def refuse_cross_site(self, request: Request) -> None:
        if self.cross_site(request):
            log.warning("%s: cross-site POST to %s refused", self.svc.name, request.url.path.split("/")[1])
            raise self.error(request, 403, "cross_site")

    def link_csrf(self, token: str) -> str:
        """The CSRF token of the forms on a signed-link page: bound to that link."""
        key = self.settings.signing_key.encode()
        return hmac.new(key, f"csrf|{self.svc.name}|{token}".encode(), hashlib.sha256).hexdigest()

    async def form(self, request: Request, csrf: str | None = None) -> dict[str, str]:
        """The posted form, after checking its CSRF token (the session's, or `csrf` for link pages)."""
        fields = await read_form(request)
        if fields is None:
            raise self.error(request, 400, "form")
        if csrf is None:
            session = self.session(request)
            csrf = session.csrf if session else None
        if not csrf or not hmac.compare_digest(fields.get("csrf", ""), csrf):
            raise self.error(request, 403, "csrf")
        return fields

    # --- sign-in routes

    def sign_in_router(self) -> APIRouter:
        """GET/POST /connexion (ask for a link), GET /connexion/{token} (use it), POST /deconnexion."""
        return sign_in_router(self)
