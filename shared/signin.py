"""Sign-in by email link and what it rests on: signed tokens, single-use links, sessions, rate limits.

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

The pages themselves (rendering, forms, CSRF tokens) are shared.pages; `Pages.sign_in_router()` returns the
routes of this module.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel
from starlette.background import BackgroundTask

from shared.db import UTCDateTime, emit, table_of
from shared.directory import User
from shared.events import AccessLinkRequested, utcnow
from shared.sessions import SESSION_MAX_AGE, end_session, open_session, session_is_live
from shared.settings import SERVICES, ServiceName, Settings

if TYPE_CHECKING:
    from shared.pages import Pages
    from shared.service import Service

REFERRAL_LINK = "referral-link"
SIGN_IN = "sign-in"
SIGN_IN_REQUEST = "sign-in-request"  # the reference in access.link_requested: not itself a sign-in token
PERSON_ANSWER = "person-contacted"  # the person's answer to "La CAF vous a-t-elle contacté(e) ?" (issue 16)
PERSON_ANSWER_MAX_AGE = timedelta(days=30)
REFERRAL_LINK_MAX_AGE = timedelta(days=30)
SIGN_IN_MAX_AGE = timedelta(minutes=15)
SIGN_IN_REQUESTS_PER_WINDOW = 5  # per email address, whether known or not: no address gets more links
SIGN_IN_REQUESTS_PER_CLIENT = 20  # per client address (IPv6: per /64), whatever addresses it asks for
SIGN_IN_REQUEST_WINDOW = timedelta(minutes=15)


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


# --- reply addresses (docs/inbound-mail.md) -----------------------------------------------------------------
# The handoff email's Reply-To is `reponse+TOKEN@<inbound domain>`. Mail systems may change the case of an address's
# local part and refuse one longer than 64 characters, so this token is lower-case hex rather than an itsdangerous
# string: the referral's id (32 hex) and 20 hex of an HMAC-SHA256, keyed like every token here, over the purpose,
# the referral and the contact it was sent to. It does not expire: the referral's status decides what a reply does.

REPLY_ADDRESS = "reply-address"
REPLY_LOCAL_PART = "reponse"
_REPLY_MAC_HEX = 20


def _reply_mac(settings: Settings, referral_id: str, contact_id: str) -> str:
    message = f"{REPLY_ADDRESS}:{referral_id}:{contact_id}".encode()
    return hmac.new(settings.signing_key.encode(), message, hashlib.sha256).hexdigest()[:_REPLY_MAC_HEX]


def reply_token(settings: Settings, referral_id: str, contact_id: str) -> str:
    return f"{referral_id}{_reply_mac(settings, referral_id, contact_id)}"


def referral_of_reply_token(token: str) -> str | None:
    """The referral a reply token names (not yet checked: `reply_token_matches` does that), or None."""
    token = token.strip().lower()
    if len(token) != 32 + _REPLY_MAC_HEX or any(c not in "0123456789abcdef" for c in token):
        return None
    return token[:32]


def reply_token_matches(settings: Settings, token: str, referral_id: str, contact_id: str) -> bool:
    return hmac.compare_digest(token.strip().lower(), reply_token(settings, referral_id, contact_id))


@dataclass(frozen=True)
class PersonAnswer:
    """What the person's link allows: one answer ("yes" or "no") about one referral, nothing else."""

    referral_id: str
    answer: str


def person_answer_link(settings: Settings, referral_id: str, answer: str, now: datetime | None = None) -> str:
    """A button of the question email: opens a confirmation page on referral (no sign-in); only its POST answers."""
    token = sign(settings, PERSON_ANSWER, {"r": referral_id, "a": answer}, now)
    return f"{settings.link_base('referral')}/contact/{token}"


def read_person_answer_token(settings: Settings, token: str, now: datetime | None = None) -> PersonAnswer:
    payload = unsign(settings, PERSON_ANSWER, token, PERSON_ANSWER_MAX_AGE, now)
    try:
        answer = PersonAnswer(referral_id=str(payload["r"]), answer=str(payload["a"]))
    except (TypeError, KeyError):
        raise TokenInvalid(PERSON_ANSWER) from None
    if answer.answer not in ("yes", "no"):
        raise TokenInvalid(PERSON_ANSWER)
    return answer


@dataclass(frozen=True)
class SignInGrant:
    user_id: str
    service: str
    jti: str  # recorded in used_token at first use


@dataclass(frozen=True)
class SignInRequest:
    """A sign-in link asked for: enough for the holder of the signing key to build the link, and nothing else."""

    user_id: str
    service: ServiceName
    jti: str
    requested_at: datetime  # whole seconds: the link's token is dated by it

    @property
    def expires_at(self) -> datetime:
        return self.requested_at + SIGN_IN_MAX_AGE


def new_sign_in_request(service: ServiceName, user_id: str, now: datetime | None = None) -> SignInRequest:
    stamp = datetime.fromtimestamp(int((now or utcnow()).timestamp()), UTC)
    return SignInRequest(user_id=user_id, service=service, jti=secrets.token_urlsafe(16), requested_at=stamp)


def link_for_request(settings: Settings, request: SignInRequest) -> str:
    """The single-use sign-in link of `request`: the same link whoever builds it, built from our own settings."""
    token = sign(
        settings, SIGN_IN, {"u": request.user_id, "s": request.service, "j": request.jti}, request.requested_at
    )
    return f"{settings.link_base(request.service)}/connexion/{token}"


def sign_in_reference(settings: Settings, request: SignInRequest) -> str:
    """What access.link_requested carries instead of the link: signed for another purpose, so a reader of the stream
    can neither sign in with it nor forge one."""
    return sign(
        settings,
        SIGN_IN_REQUEST,
        {"u": request.user_id, "s": request.service, "j": request.jti, "t": int(request.requested_at.timestamp())},
        request.requested_at,
    )


def read_sign_in_reference(settings: Settings, reference: str, now: datetime | None = None) -> SignInRequest:
    """The request behind a reference signed by this deployment; raises TokenExpired (the link would be dead
    already) or TokenInvalid (not ours: a forged event)."""
    payload = unsign(settings, SIGN_IN_REQUEST, reference, SIGN_IN_MAX_AGE, now)
    try:
        request = SignInRequest(
            user_id=str(payload["u"]),
            service=_service_name(str(payload["s"])),
            jti=str(payload["j"]),
            requested_at=datetime.fromtimestamp(int(payload["t"]), UTC),
        )
    except (TypeError, KeyError, ValueError, OverflowError):
        raise TokenInvalid(SIGN_IN_REQUEST) from None
    return request


def _service_name(name: str) -> ServiceName:
    """`name` as one of our services; a reference naming another is not ours."""
    for service in SERVICES:
        if name == service:
            return service
    raise TokenInvalid(SIGN_IN_REQUEST)


def sign_in_link(
    settings: Settings, service: ServiceName, user_id: str, now: datetime | None = None
) -> tuple[str, datetime]:
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


USED_TOKEN_TABLE = table_of(UsedToken)


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


async def allow_sign_in_request(
    redis,
    settings: Settings,
    email: str,
    limit: int = SIGN_IN_REQUESTS_PER_WINDOW,
    window: timedelta = SIGN_IN_REQUEST_WINDOW,
) -> bool:
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


async def allow_sign_in_from(
    redis,
    settings: Settings,
    client: str,
    limit: int = SIGN_IN_REQUESTS_PER_CLIENT,
    window: timedelta = SIGN_IN_REQUEST_WINDOW,
) -> bool:
    """Count a sign-in request from `client`; False past `limit`, whatever addresses it asks links for."""
    key = settings.key(f"ratelimit:signin-client:{hashlib.sha256(client.encode()).hexdigest()}")
    return await _count_in_window(redis, key, window) <= limit


async def forget_sign_in_requests(redis, settings: Settings, email: str) -> None:
    """The owner of `email` just used a link sent there: what strangers asked for that address no longer counts."""
    await redis.delete(_address_key(settings, email))


# --- sessions: the signed cookie and its record in Redis ------------------------------------------


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
        svc.bus.redis, svc.settings, svc.name, str(found.user_id), found.session_id
    ):
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


# --- the sign-in routes ---------------------------------------------------------------------------


def sign_in_router(pages: Pages) -> APIRouter:
    """A service's sign-in routes (`Pages.sign_in_router`): GET/POST /connexion (ask for a link), GET
    /connexion/{token} (the confirmation page), POST /connexion/{token} (use it), POST /deconnexion."""
    router = APIRouter()
    svc = pages.svc
    link_cookie = f"relais_{svc.name}_lien"  # binds a sign-in link's confirmation page to its browser

    @router.get("/connexion")
    async def sign_in_form(request: Request) -> Response:
        if pages.user(request) is not None:
            return pages.redirect(pages.home)
        return pages.render(request, "connexion.html", email="", error=None, signed_out="fin" in request.query_params)

    @router.post("/connexion")
    async def ask_for_link(request: Request) -> Response:
        pages.refuse_cross_site(request)
        fields = await pages.form(request)
        email = fields.get("email", "").strip()
        if "@" not in email or len(email) > 320:
            return pages.render(request, "connexion.html", status=422, email=email, error="email", signed_out=False)
        if not await allow_sign_in_from(svc.bus.redis, pages.settings, client_of(request)):
            return pages.render(request, "connexion_limite.html", status=429, limit="client")
        if not await allow_sign_in_request(svc.bus.redis, pages.settings, email):
            return pages.render(request, "connexion_limite.html", status=429, limit="address")
        wanted = email.casefold()
        user = next(
            (u for u in svc.directory.users if u.email and u.email.casefold() == wanted and u.role in pages.roles), None
        )
        response = pages.render(request, "connexion_envoyee.html")
        if user is not None:
            # After the answer, so a known address takes no longer to answer than an unknown one.
            response.background = BackgroundTask(send_sign_in_link, pages, user)
        return response

    # The emailed link opens a page with one button; only the button's POST uses the link up. Mail scanners and
    # link previews that fetch every URL of a message (GET) therefore cannot spend it before its owner does.
    def check_link(request: Request, token: str, now: datetime) -> tuple[User, SignInGrant]:
        try:
            grant = read_sign_in_token(pages.settings, svc.name, token, now)
        except TokenExpired:
            raise pages.error(request, 410, "sign_in_expired") from None
        except TokenInvalid:
            raise pages.error(request, 400, "sign_in_invalid") from None
        user = next((u for u in svc.directory.users if u.id == grant.user_id and u.role in pages.roles), None)
        if user is None:
            raise pages.error(request, 403, "role")
        return user, grant

    # The confirmation page gives its browser a random cookie that the button's form is bound to: a page on
    # another site that got the form of its own link (login CSRF) cannot make another browser use it.
    @router.get("/connexion/{token}")
    async def confirm_link(request: Request, token: str) -> Response:
        now = svc.clock()
        user, grant = check_link(request, token, now)
        if await anyio.to_thread.run_sync(was_used, svc.db, grant.jti):
            return pages.render(request, "erreur.html", status=410, problem="sign_in_used")
        browser = request.cookies.get(link_cookie, "")
        if not 20 <= len(browser) <= 64:  # one per browser, so two open links both work
            browser = secrets.token_urlsafe(24)
        response = pages.render(
            request,
            "connexion_confirmer.html",
            token=token,
            csrf=_confirmation_csrf(pages, token, browser),
            email=user.email,
        )
        response.set_cookie(
            link_cookie,
            browser,
            max_age=int(SIGN_IN_MAX_AGE.total_seconds()),
            path="/connexion/",
            httponly=True,
            samesite="strict",
            secure=pages.secure,
        )
        return response

    @router.post("/connexion/{token}")
    async def use_link(request: Request, token: str) -> Response:
        pages.refuse_cross_site(request)
        browser = request.cookies.get(link_cookie)
        if not browser:
            raise pages.error(request, 403, "sign_in_browser")
        await pages.form(request, csrf=_confirmation_csrf(pages, token, browser))
        now = svc.clock()
        user, grant = check_link(request, token, now)
        if not await anyio.to_thread.run_sync(use_once, svc.db, grant.jti, now):
            return pages.render(request, "erreur.html", status=410, problem="sign_in_used")
        session_id = await open_session(svc.bus.redis, pages.settings, svc.name, user.id)
        if user.email:  # the owner of the address proved it: strangers' requests for it no longer count
            await forget_sign_in_requests(svc.bus.redis, pages.settings, user.email)
        response = pages.redirect(pages.home)
        pages.set_session(response, WebSession(user_id=user.id, csrf=secrets.token_urlsafe(24), session_id=session_id))
        response.delete_cookie(link_cookie, path="/connexion/", httponly=True, samesite="strict", secure=pages.secure)
        return response

    @router.post("/deconnexion")
    async def sign_out(request: Request) -> Response:
        pages.refuse_cross_site(request)
        await pages.form(request)
        session = pages.session(request)
        if session is not None and session.user_id and session.session_id:
            await end_session(svc.bus.redis, pages.settings, session.user_id, session.session_id)
        response = pages.redirect("/connexion?fin=1")
        response.delete_cookie(pages.cookie, path="/", httponly=True, samesite="lax", secure=pages.secure)
        return response

    return router


def _confirmation_csrf(pages: Pages, token: str, browser: str) -> str:
    """The CSRF token of a sign-in link's confirmation form: bound to that link and to the browser's cookie."""
    key = pages.settings.signing_key.encode()
    return hmac.new(key, f"sign-in|{pages.svc.name}|{token}|{browser}".encode(), hashlib.sha256).hexdigest()


async def send_sign_in_link(pages: Pages, user: User) -> None:
    """Put `access.link_requested` in the outbox for `user`: notifications builds the link and emails it."""
    svc = pages.svc
    now = svc.clock()
    request = new_sign_in_request(svc.name, user.id, now)

    def record() -> None:
        with svc.db.transaction() as session:
            emit(
                session,
                AccessLinkRequested(
                    user_id=user.id,
                    service=svc.name,
                    reference=sign_in_reference(pages.settings, request),
                    expires_at=request.expires_at,
                    occurred_at=now,
                ),
            )

    await anyio.to_thread.run_sync(record)
    svc.bus.relay.wake()
