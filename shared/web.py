"""Web pages for every service: templates, signed links, sign-in by email, sessions and CSRF.

A service's pages are a FastAPI router built with a `Pages` object and handed to
`Service.create_app(..., pages=[router])`, which mounts them at the root with `/static/relais.css`.
Pages work without JavaScript: plain forms, POST then redirect (303). User-facing text is French and
lives in templates (`shared/templates/` for the layout, sign-in and error pages; each service's own
`templates/` folder for its pages, looked up first, so a service may override `layout.html`).

Tokens are signed with itsdangerous (`settings.signing_key`, one salt per purpose) and dated by the
service's injected clock:
- referral links ("referral-link", 30 days): one referral, one partner, no account needed;
- sign-in links ("sign-in", 15 minutes, single use): each use is recorded in the `used_token` table.
  A service that offers sign-in must add `USED_TOKEN_TABLE` to its database TABLES. The link itself never
  crosses Redis: `access.link_requested` carries a signed reference ("sign-in-request") from which
  notifications rebuilds the very same link (`link_for_request`), and the address comes from the directory;
- the session cookie ("session:<service>", 12 hours): the signed-in user id, the CSRF token and a session id
  whose record in Redis (shared.sessions) must still exist: signing out or an ops revocation ends it at once.
Cookies are per host, not per port, so each service has its own cookie name.

Sign-in is guarded against login CSRF: its POSTs are refused when `Sec-Fetch-Site` or `Origin` says another
site sent them, and the confirmation page of an emailed link sets a short-lived cookie that its button's POST
must bring back (the link is bound to the browser that opened it). Requests for a link are limited per client
address and per email address; using a link is never limited.

CSRF: every POST form carries `csrf`; a session's forms carry the session's token; the forms of a
referral-link page carry a token derived from the link's token (`Pages.link_csrf`), so a form cannot
be replayed against another link. Forms are parsed here (application/x-www-form-urlencoded) rather
than with FastAPI's Form(), which needs python-multipart.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel
from starlette.background import BackgroundTask

from shared.db import UTCDateTime, emit
from shared.directory import User
from shared.events import AccessLinkRequested, utcnow
from shared.sessions import SESSION_MAX_AGE, end_session, open_session, session_is_live
from shared.settings import SERVICES, Settings

if TYPE_CHECKING:
    from shared.service import Service

TEMPLATES = Path(__file__).with_name("templates")
STATIC = Path(__file__).with_name("static")

log = logging.getLogger("relais.web")

REFERRAL_LINK = "referral-link"
SIGN_IN = "sign-in"
SIGN_IN_REQUEST = "sign-in-request"  # the reference in access.link_requested: not itself a sign-in token
REFERRAL_LINK_MAX_AGE = timedelta(days=30)
SIGN_IN_MAX_AGE = timedelta(minutes=15)
SIGN_IN_REQUESTS_PER_WINDOW = 5  # per email address, whether known or not: no address gets more links
SIGN_IN_REQUESTS_PER_CLIENT = 20  # per client address (IPv6: per /64), whatever addresses it asks for
SIGN_IN_REQUEST_WINDOW = timedelta(minutes=15)
MAX_FORM_BYTES = 64 * 1024
DASHBOARD_PATH = "/tableau-de-bord"  # the ops dashboard, served by referral; every service's pages link to it


# --- French wording of times ----------------------------------------------------------------------

DAYS_FR = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
MONTHS_FR = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
             "novembre", "décembre")


def _hour_fr(local: datetime) -> str:
    return f"{local.hour} h{f' {local.minute:02d}' if local.minute else ''}"


def deadline_fr(at: datetime, timezone: str) -> str:
    """'avant lundi 23 novembre à 14 h 05' in the given time zone."""
    local = at.astimezone(ZoneInfo(timezone))
    return f"avant {DAYS_FR[local.weekday()]} {local.day} {MONTHS_FR[local.month - 1]} à {_hour_fr(local)}"


def datetime_fr(at: datetime, timezone: str) -> str:
    """'lundi 23 novembre 2026 à 14 h 05' in the given time zone."""
    local = at.astimezone(ZoneInfo(timezone))
    return (f"{DAYS_FR[local.weekday()]} {local.day} {MONTHS_FR[local.month - 1]} {local.year} "
            f"à {_hour_fr(local)}")


def iso(at: datetime) -> str:
    """For <time datetime="...">."""
    return at.isoformat(timespec="minutes")


# --- templates ------------------------------------------------------------------------------------


def environment(*template_dirs: Path) -> Environment:
    """A Jinja2 environment looking in `template_dirs` first, then in the shared templates."""
    env = Environment(loader=ChoiceLoader([FileSystemLoader(d) for d in (*template_dirs, TEMPLATES)]),
                      autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(deadline_fr=deadline_fr, datetime_fr=datetime_fr, iso=iso)
    return env


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
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
}


def mount(app: FastAPI, pages: Sequence[APIRouter], svc: Service) -> None:
    """Mount page routers at the root (not in the OpenAPI document), /static, the Interrupt handler, and the check
    of each request's session against its server-side record."""
    for router in pages:
        app.include_router(router, include_in_schema=False)
    app.add_middleware(LiveSessions, svc=svc)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def interrupted(request: Request, exc: Interrupt) -> Response:
        return exc.response

    app.add_exception_handler(Interrupt, interrupted)


# --- signed tokens --------------------------------------------------------------------------------


class TokenExpired(Exception):
    """The token was genuine but is too old."""


class TokenInvalid(Exception):
    """The token was not signed by us for this purpose (or was altered)."""


def _serializer(settings: Settings, purpose: str, now: datetime | None) -> URLSafeTimedSerializer:
    stamp = int((now or utcnow()).timestamp())

    class ClockSigner(TimestampSigner):
        """Dates and checks tokens by the service's clock, so tests can age them without sleeping."""

        def get_timestamp(self) -> int:
            return stamp

    return URLSafeTimedSerializer(settings.signing_key, salt=purpose, signer=ClockSigner)


def sign(settings: Settings, purpose: str, payload: Any, now: datetime | None = None) -> str:
    return _serializer(settings, purpose, now).dumps(payload)


def unsign(settings: Settings, purpose: str, token: str, max_age: timedelta, now: datetime | None = None) -> Any:
    """The payload of a token signed for `purpose` at most `max_age` ago; raises TokenExpired or TokenInvalid."""
    try:
        return _serializer(settings, purpose, now).loads(token, max_age=int(max_age.total_seconds()))
    except SignatureExpired:
        raise TokenExpired(purpose) from None
    except BadSignature:
        raise TokenInvalid(purpose) from None


@dataclass(frozen=True)
class ReferralGrant:
    """What a referral link allows: acting on one referral, as the partner it was sent to."""

    referral_id: str
    partner_id: str


def referral_token(settings: Settings, referral_id: str, partner_id: str, now: datetime | None = None) -> str:
    return sign(settings, REFERRAL_LINK, {"r": referral_id, "p": partner_id}, now)


def referral_link(settings: Settings, referral_id: str, partner_id: str, now: datetime | None = None) -> str:
    """The link put in the handoff email: opens the referral for its partner, without an account, for 30 days."""
    return f"{settings.link_base('referral')}/r/{referral_token(settings, referral_id, partner_id, now)}"


def read_referral_token(settings: Settings, token: str, now: datetime | None = None) -> ReferralGrant:
    payload = unsign(settings, REFERRAL_LINK, token, REFERRAL_LINK_MAX_AGE, now)
    try:
        return ReferralGrant(referral_id=str(payload["r"]), partner_id=str(payload["p"]))
    except (TypeError, KeyError):
        raise TokenInvalid(REFERRAL_LINK) from None


@dataclass(frozen=True)
class SignInGrant:
    user_id: str
    service: str
    jti: str  # recorded in used_token at first use


@dataclass(frozen=True)
class SignInRequest:
    """A sign-in link asked for: enough for the holder of the signing key to build the link, and nothing else."""

    user_id: str
    service: str
    jti: str
    requested_at: datetime  # whole seconds: the link's token is dated by it

    @property
    def expires_at(self) -> datetime:
        return self.requested_at + SIGN_IN_MAX_AGE


def new_sign_in_request(service: str, user_id: str, now: datetime | None = None) -> SignInRequest:
    stamp = datetime.fromtimestamp(int((now or utcnow()).timestamp()), timezone.utc)
    return SignInRequest(user_id=user_id, service=service, jti=secrets.token_urlsafe(16), requested_at=stamp)


def link_for_request(settings: Settings, request: SignInRequest) -> str:
    """The single-use sign-in link of `request`: the same link whoever builds it, built from our own settings."""
    token = sign(settings, SIGN_IN, {"u": request.user_id, "s": request.service, "j": request.jti},
                 request.requested_at)
    return f"{settings.link_base(request.service)}/connexion/{token}"


def sign_in_reference(settings: Settings, request: SignInRequest) -> str:
    """What access.link_requested carries instead of the link: signed for another purpose, so a reader of the stream
    can neither sign in with it nor forge one."""
    return sign(settings, SIGN_IN_REQUEST, {"u": request.user_id, "s": request.service, "j": request.jti,
                                            "t": int(request.requested_at.timestamp())}, request.requested_at)


def read_sign_in_reference(settings: Settings, reference: str, now: datetime | None = None) -> SignInRequest:
    """The request behind a reference signed by this deployment; raises TokenExpired (the link would be dead
    already) or TokenInvalid (not ours: a forged event)."""
    payload = unsign(settings, SIGN_IN_REQUEST, reference, SIGN_IN_MAX_AGE, now)
    try:
        request = SignInRequest(user_id=str(payload["u"]), service=str(payload["s"]), jti=str(payload["j"]),
                                requested_at=datetime.fromtimestamp(int(payload["t"]), timezone.utc))
    except (TypeError, KeyError, ValueError, OverflowError):
        raise TokenInvalid(SIGN_IN_REQUEST) from None
    if request.service not in SERVICES:
        raise TokenInvalid(SIGN_IN_REQUEST)
    return request


def sign_in_link(settings: Settings, service: str, user_id: str, now: datetime | None = None) -> tuple[str, datetime]:
    """A single-use sign-in link to `service` for `user_id`, and when it expires."""
    request = new_sign_in_request(service, user_id, now)
    return link_for_request(settings, request), request.expires_at


def read_sign_in_token(settings: Settings, service: str, token: str, now: datetime | None = None) -> SignInGrant:
    """The grant in a sign-in token for `service` (not yet checked for reuse: see `use_once`)."""
    payload = unsign(settings, SIGN_IN, token, SIGN_IN_MAX_AGE, now)
    try:
        grant = SignInGrant(user_id=str(payload["u"]), service=str(payload["s"]), jti=str(payload["j"]))
    except (TypeError, KeyError):
        raise TokenInvalid(SIGN_IN) from None
    if grant.service != service:
        raise TokenInvalid(SIGN_IN)
    return grant


class UsedToken(SQLModel, table=True):
    """A single-use token already used; kept at least as long as such a token is valid."""

    __tablename__ = "used_token"
    jti: str = Field(primary_key=True, max_length=64)
    used_at: datetime = Field(sa_type=UTCDateTime)


USED_TOKEN_TABLE = UsedToken.__table__


def was_used(db, jti: str) -> bool:
    with db.read() as session:
        return session.get(UsedToken, jti) is not None


def use_once(db, jti: str, now: datetime) -> bool:
    """Record the use of a single-use token; False when it was used before (even by a concurrent request)."""
    try:
        with db.transaction() as session:
            if session.get(UsedToken, jti) is not None:
                return False
            session.add(UsedToken(jti=jti, used_at=now))
    except IntegrityError:
        return False
    return True


# --- sign-in rate limit ---------------------------------------------------------------------------


async def _count_in_window(redis, key: str, window: timedelta) -> int:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, ex=int(window.total_seconds()), nx=True)  # the window starts at the first request
        pipe.incr(key)
        _, count = await pipe.execute()
    return count


def _address_key(settings: Settings, email: str) -> str:
    return settings.key(f"ratelimit:signin:{hashlib.sha256(email.strip().casefold().encode()).hexdigest()}")


async def allow_sign_in_request(redis, settings: Settings, email: str,
                                limit: int = SIGN_IN_REQUESTS_PER_WINDOW,
                                window: timedelta = SIGN_IN_REQUEST_WINDOW) -> bool:
    """Count a sign-in request for `email` (known or not, so the limit tells nothing); False past `limit`: one
    address never gets more than `limit` links per window, whoever asks."""
    return await _count_in_window(redis, _address_key(settings, email), window) <= limit


def client_of(request: Request) -> str:
    """The client address the limits count: an IPv6 client may hold a whole /64, so it counts as one."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


async def allow_sign_in_from(redis, settings: Settings, client: str, limit: int = SIGN_IN_REQUESTS_PER_CLIENT,
                             window: timedelta = SIGN_IN_REQUEST_WINDOW) -> bool:
    """Count a sign-in request from `client`; False past `limit`, whatever addresses it asks links for."""
    key = settings.key(f"ratelimit:signin-client:{hashlib.sha256(client.encode()).hexdigest()}")
    return await _count_in_window(redis, key, window) <= limit


async def forget_sign_in_requests(redis, settings: Settings, email: str) -> None:
    """The owner of `email` just used a link sent there: what strangers asked for that address no longer counts."""
    await redis.delete(_address_key(settings, email))


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


def page_links(request: Request, page: int, has_more: bool) -> dict[str, str | None]:
    """Links to the previous and next pages of a long list, keeping the list's filters (for shared/templates/
    _pages.html)."""
    def url(number: int) -> str:
        kept = [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "partiel")]
        query = urlencode(kept + ([("page", str(number))] if number > 1 else []))
        return request.url.path + ("?" + query if query else "")

    return {"page": page, "newer_url": url(page - 1) if page > 1 else None,
            "older_url": url(page + 1) if has_more else None}


# --- one service's pages --------------------------------------------------------------------------


_UNREAD = object()


@dataclass(frozen=True)
class WebSession:
    user_id: str | None
    csrf: str
    session_id: str | None = None  # a signed-in session's server-side record (shared.sessions)


def session_cookie(service: str) -> str:
    return f"relais_{service}_session"


async def read_session(svc: Service, raw: str) -> WebSession | None:
    """The session in a cookie value: None when it is not ours, too old, or a signed-in session whose record was
    ended (signed out, revoked)."""
    try:
        data = unsign(svc.settings, f"session:{svc.name}", raw, SESSION_MAX_AGE, svc.clock())
        found = WebSession(user_id=data.get("u"), csrf=str(data["c"]), session_id=data.get("s"))
    except (TokenExpired, TokenInvalid, AttributeError, KeyError, TypeError):
        return None
    if found.user_id is None:
        return found
    if not isinstance(found.session_id, str) or not await session_is_live(
            svc.bus.redis, svc.settings, svc.name, str(found.user_id), found.session_id):
        return None
    return found


class LiveSessions:
    """ASGI middleware: reads the service's session cookie once per request, checking a signed-in session against
    its record in Redis, before any page runs (the page helpers are synchronous)."""

    def __init__(self, app, svc: Service) -> None:
        self.app, self.svc, self.cookie = app, svc, session_cookie(svc.name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            raw = Request(scope).cookies.get(self.cookie)
            scope.setdefault("state", {})["web_session"] = await read_session(self.svc, raw) if raw else None
        await self.app(scope, receive, send)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Pages:
    """One service's web pages: rendering, the signed-in user, CSRF, and the sign-in routes.

    `roles` may sign in on this service; `home` is where a signed-in user lands.
    """

    def __init__(self, svc: Service, template_dir: Path | None, *, roles: Sequence[str], home: str) -> None:
        self.svc, self.roles, self.home = svc, tuple(roles), home
        self.env = environment(*([template_dir] if template_dir else []))
        self.cookie = session_cookie(svc.name)
        self.link_cookie = f"relais_{svc.name}_lien"  # binds a sign-in link's confirmation page to its browser
        self.secure = svc.settings.link_base(svc.name).startswith("https://")

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    # --- sessions

    def session(self, request: Request) -> WebSession | None:
        """The request's valid session, read and checked by `LiveSessions` before the page ran."""
        found = getattr(request.state, "web_session", _UNREAD)
        return None if found is _UNREAD else found  # no middleware: nobody is signed in (fail closed)

    def _set_session(self, response: Response, session: WebSession) -> None:
        value = sign(self.settings, f"session:{self.svc.name}",
                     {"u": session.user_id, "c": session.csrf, "s": session.session_id}, self.svc.clock())
        response.set_cookie(self.cookie, value, max_age=int(SESSION_MAX_AGE.total_seconds()), path="/",
                            httponly=True, samesite="lax", secure=self.secure)

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

    def render(self, request: Request, template: str, status: int = 200, headers: dict[str, str] | None = None,
               **context: Any) -> HTMLResponse:
        """A page; gives the visitor a session (for the CSRF token of its forms) when they have none.
        `headers` replace the default security headers of the same name (e.g. a page with its own script)."""
        session = self.session(request)
        fresh = session is None
        if fresh:
            session = WebSession(user_id=None, csrf=secrets.token_urlsafe(24))
            request.state.web_session = session
        context.setdefault("csrf", session.csrf)
        html = self.env.get_template(template).render(
            request=request, user=self.user(request), home=self.home, service=self.svc.name,
            session_csrf=session.csrf, dashboard_url=self.settings.link_base("referral") + DASHBOARD_PATH, **context)
        response = HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})
        if fresh:
            self._set_session(response, session)
        return response

    def text(self, template: str, **context: Any) -> str:
        """A short text rendered from a template (French wording kept out of Python)."""
        return self.env.get_template(template).render(**context).strip()

    def redirect(self, url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)

    def error(self, request: Request, status: int, problem: str, template: str = "erreur.html",
              **context: Any) -> Interrupt:
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
        return origin.lower().rstrip("/") not in {_origin(self.settings.link_base(self.svc.name)),
                                                  _origin(str(request.base_url))}

    def refuse_cross_site(self, request: Request) -> None:
        if self.cross_site(request):
            log.warning("%s: cross-site POST to %s refused", self.svc.name, request.url.path.split("/")[1])
            raise self.error(request, 403, "cross_site")

    def sign_in_csrf(self, token: str, browser: str) -> str:
        """The CSRF token of a sign-in link's confirmation form: bound to that link and to the browser's cookie."""
        key = self.settings.signing_key.encode()
        return hmac.new(key, f"sign-in|{self.svc.name}|{token}|{browser}".encode(), hashlib.sha256).hexdigest()

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
        router = APIRouter()
        svc = self.svc

        @router.get("/connexion")
        async def sign_in_form(request: Request) -> Response:
            if self.user(request) is not None:
                return self.redirect(self.home)
            return self.render(request, "connexion.html", email="", error=None,
                               signed_out="fin" in request.query_params)

        @router.post("/connexion")
        async def ask_for_link(request: Request) -> Response:
            self.refuse_cross_site(request)
            fields = await self.form(request)
            email = fields.get("email", "").strip()
            if "@" not in email or len(email) > 320:
                return self.render(request, "connexion.html", status=422, email=email, error="email",
                                   signed_out=False)
            if not await allow_sign_in_from(svc.bus.redis, self.settings, client_of(request)):
                return self.render(request, "connexion_limite.html", status=429, limit="client")
            if not await allow_sign_in_request(svc.bus.redis, self.settings, email):
                return self.render(request, "connexion_limite.html", status=429, limit="address")
            wanted = email.casefold()
            user = next((u for u in svc.directory.users
                         if u.email and u.email.casefold() == wanted and u.role in self.roles), None)
            response = self.render(request, "connexion_envoyee.html")
            if user is not None:
                # After the answer, so a known address takes no longer to answer than an unknown one.
                response.background = BackgroundTask(self._send_link, user)
            return response

        # The emailed link opens a page with one button; only the button's POST uses the link up. Mail scanners and
        # link previews that fetch every URL of a message (GET) therefore cannot spend it before its owner does.
        def check_link(request: Request, token: str, now: datetime) -> tuple[User, SignInGrant]:
            try:
                grant = read_sign_in_token(self.settings, svc.name, token, now)
            except TokenExpired:
                raise self.error(request, 410, "sign_in_expired") from None
            except TokenInvalid:
                raise self.error(request, 400, "sign_in_invalid") from None
            user = next((u for u in svc.directory.users if u.id == grant.user_id and u.role in self.roles), None)
            if user is None:
                raise self.error(request, 403, "role")
            return user, grant

        # The confirmation page gives its browser a random cookie that the button's form is bound to: a page on
        # another site that got the form of its own link (login CSRF) cannot make another browser use it.
        @router.get("/connexion/{token}")
        async def confirm_link(request: Request, token: str) -> Response:
            now = svc.clock()
            user, grant = check_link(request, token, now)
            if await anyio.to_thread.run_sync(was_used, svc.db, grant.jti):
                return self.render(request, "erreur.html", status=410, problem="sign_in_used")
            browser = request.cookies.get(self.link_cookie, "")
            if not 20 <= len(browser) <= 64:  # one per browser, so two open links both work
                browser = secrets.token_urlsafe(24)
            response = self.render(request, "connexion_confirmer.html", token=token,
                                   csrf=self.sign_in_csrf(token, browser), email=user.email)
            response.set_cookie(self.link_cookie, browser, max_age=int(SIGN_IN_MAX_AGE.total_seconds()),
                                path="/connexion/", httponly=True, samesite="strict", secure=self.secure)
            return response

        @router.post("/connexion/{token}")
        async def use_link(request: Request, token: str) -> Response:
            self.refuse_cross_site(request)
            browser = request.cookies.get(self.link_cookie)
            if not browser:
                raise self.error(request, 403, "sign_in_browser")
            await self.form(request, csrf=self.sign_in_csrf(token, browser))
            now = svc.clock()
            user, grant = check_link(request, token, now)
            if not await anyio.to_thread.run_sync(use_once, svc.db, grant.jti, now):
                return self.render(request, "erreur.html", status=410, problem="sign_in_used")
            session_id = await open_session(svc.bus.redis, self.settings, svc.name, user.id)
            if user.email:  # the owner of the address proved it: strangers' requests for it no longer count
                await forget_sign_in_requests(svc.bus.redis, self.settings, user.email)
            response = self.redirect(self.home)
            self._set_session(response, WebSession(user_id=user.id, csrf=secrets.token_urlsafe(24),
                                                   session_id=session_id))
            response.delete_cookie(self.link_cookie, path="/connexion/", httponly=True, samesite="strict",
                                   secure=self.secure)
            return response

        @router.post("/deconnexion")
        async def sign_out(request: Request) -> Response:
            self.refuse_cross_site(request)
            await self.form(request)
            session = self.session(request)
            if session is not None and session.user_id and session.session_id:
                await end_session(svc.bus.redis, self.settings, session.user_id, session.session_id)
            response = self.redirect("/connexion?fin=1")
            response.delete_cookie(self.cookie, path="/", httponly=True, samesite="lax", secure=self.secure)
            return response

        return router

    async def _send_link(self, user: User) -> None:
        svc = self.svc
        now = svc.clock()
        request = new_sign_in_request(svc.name, user.id, now)

        def record() -> None:
            with svc.db.transaction() as session:
                emit(session, AccessLinkRequested(user_id=user.id, service=svc.name,
                                                  reference=sign_in_reference(self.settings, request),
                                                  expires_at=request.expires_at, occurred_at=now))

        await anyio.to_thread.run_sync(record)
        svc.bus.relay.wake()
