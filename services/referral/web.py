"""Referral's web pages (French, no JavaScript needed): what a partner sees of its referrals and does with them.

- `/r/{token}`: one referral, opened from the signed link in the handoff email, no account needed;
- `/boite`: the inbox of a signed-in partner user (its organisation's referrals; ops see all);
- `/boite/{id}`: one referral for a signed-in user, the same page as the link's;
- `/connexion`, `/deconnexion`: sign-in by email link (shared.signin).
Actions are POST forms (CSRF-checked) followed by a 303 back to the page with a confirmation; each runs the
partner's command through its one handler (handlers.py), as the API does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.referral import dashboard_pages, domain, views
from services.referral.commands import AcceptReferral, CloseReferral, DeclineReferral, RespondToReferral
from services.referral.deps import ClockDep, CommandDeps, DirectoryDep, PagesDep, Runtime, RuntimeDep
from services.referral.handlers import Deps, NotFound, Refused, handle
from services.referral.store import OPEN_STATUSES, NeedCase, Referral, ReferralHistory
from shared.directory import Directory, User
from shared.pages import DAYS_FR, Pages, page_links, page_number
from shared.people import ERASED, record_access
from shared.retention import ANONYMISED
from shared.search import MAX_QUERY, query_terms
from shared.service import Service
from shared.signin import TokenExpired, TokenInvalid, read_referral_token

TEMPLATES = Path(__file__).with_name("templates")

ACTIONS = ("accept", "respond", "decline", "close")  # what a partner may do from its pages
DECLINE_REASONS = domain.DECLINE_REASON_CODES  # labels in shared/templates/_decline_reasons.html
STATUSES = ("assigned", "accepted", "responded", "closed", "declined", "cancelled")
MAX_TEXT = {"message": 4000, "detail": 2000, "outcome": 2000}  # as the JSON API
FORM_FIELD = {"reason_code": "reason", "reason": "detail"}  # a decline's command fields -> the form's
INBOX_LIMIT = 50  # referrals per page of the inbox: one line each, a page readable on a phone
TABS = ("open", "assigned", "accepted", "responded", "all")  # the inbox's tabs shown even when empty
SOON = timedelta(days=6)  # a deadline within this is worded by its weekday ("jeudi avant 14 h")


@dataclass(frozen=True)
class Viewer:
    """Who looks at a referral page, and what their forms do."""

    partner_id: str | None  # None: ops, who see every partner's referrals and do not act for partners
    actor: str  # written in the referral's history
    page_url: str  # the page; its forms post to page_url + "/" + action
    csrf: str | None  # the link's own CSRF token; None: the session's

    @property
    def can_act(self) -> bool:
        return self.partner_id is not None


@dataclass(frozen=True)
class ReferralCase:
    referral: Referral
    case: NeedCase
    history: list[ReferralHistory]


def short_name(display_name: str | None) -> str | None:
    """What an inbox line shows of the person: the first name and the initials of the others ("Marie D."), a
    single name by its initial only (it may be a surname); the full name is on the referral's page."""
    if display_name is None or display_name in (ERASED, ANONYMISED):
        return display_name
    words = display_name.split()
    if not words:
        return None
    if len(words) == 1:
        return words[0][0].upper() + "."
    return " ".join([words[0], *(w[0].upper() + "." for w in words[1:])])  # "Mme Durand": "Mme D."


@dataclass(frozen=True)
class DeadlineWords:
    """A deadline as the inbox words it (templates: boite.html): `kind` is late, today, tomorrow, soon or later;
    `local` the deadline on the library's clock; `late_by` how long ago it passed."""

    kind: str
    local: datetime
    late_by: float = 0.0


def deadline_words(at: datetime, now: datetime, timezone: str) -> DeadlineWords:
    zone = ZoneInfo(timezone)
    local, today = at.astimezone(zone), now.astimezone(zone).date()
    if at <= now:
        return DeadlineWords("late", local, (now - at).total_seconds())
    if local.date() == today:
        return DeadlineWords("today", local)
    if local.date() == today + timedelta(days=1):
        return DeadlineWords("tomorrow", local)
    return DeadlineWords("soon" if local.date() <= today + SOON else "later", local)


def allowed_actions(status: str) -> list[str]:
    return [a for a in ACTIONS if status in domain.TRANSITIONS[a][0]]


def is_late(referral: Referral, now: datetime) -> bool:
    """Past its deadline without a first answer from the partner."""
    return referral.status == "assigned" and referral.respond_by <= now


def pages_for(svc: Service) -> Pages:
    """Referral's pages: the partners' (here) and the ops dashboard's (dashboard_pages.py), one template set."""
    pages = Pages(svc, TEMPLATES, roles=("partner", "ops"), home="/boite")
    dashboard_pages.install_filters(pages)
    pages.env.filters.update(heure_min=clock_fr, jour=lambda local: DAYS_FR[local.weekday()])
    return pages


def clock_fr(local: datetime) -> str:
    """'14 h 05', '9 h' (a time already on the reader's clock)."""
    return f"{local.hour} h {local.minute:02d}" if local.minute else f"{local.hour} h"


router = APIRouter()

# --- reading


def load(runtime: Runtime, referral_id: str) -> ReferralCase | None:
    with runtime.db.read() as session:
        found = views.referral_with_case(session, referral_id)
    return None if found is None else ReferralCase(*found)


def show(
    request: Request,
    pages: Pages,
    directory: Directory,
    now: datetime,
    found: ReferralCase,
    viewer: Viewer,
    status: int = 200,
    **context,
) -> Response:
    if viewer.can_act and domain.left_partner(found.referral.status):
        return show_left(
            request, pages, directory, found, viewer, status, context.get("refused"), context.get("to_treat")
        )
    referral = found.referral
    library = directory.library(referral.library_id)
    partner = directory.partner(referral.partner_id)
    category = directory.category(referral.category)
    contact = next((c for c in partner.contacts if c.id == referral.contact_id), None) if partner else None
    context.setdefault("errors", {})
    context.setdefault("values", {})
    context.setdefault("refused", None)
    if viewer.csrf:
        context["csrf"] = viewer.csrf  # else the session's, set by render
    return pages.render(
        request,
        "demande.html",
        status=status,
        r=referral,
        case=found.case,
        history=found.history,
        library=library,
        partner=partner,
        category=category,
        contact=contact,
        timezone=library.timezone if library else directory.timezone,
        late=is_late(referral, now),
        actions=allowed_actions(referral.status) if viewer.can_act else [],
        viewer=viewer,
        done=request.query_params.get("fait") if request.query_params.get("fait") in ACTIONS else None,
        reasons=DECLINE_REASONS,
        **context,
    )


def show_left(
    request: Request,
    pages: Pages,
    directory: Directory,
    found: ReferralCase,
    viewer: Viewer,
    status: int = 200,
    refused: str | None = None,
    to_treat: int | str | None = None,
) -> Response:
    """The need left this partner: its status and since when, and nothing of the person nor of the need
    (the case and the history's texts are not even given to the template)."""
    referral = found.referral
    library = directory.library(referral.library_id)
    category = directory.category(referral.category)
    return pages.render(
        request,
        "demande_quittee.html",
        status=status,
        r=referral,
        left_at=referral.updated_at,
        how=domain.how_it_left([h.action for h in found.history]),
        library=library,
        category=category,
        partner=directory.partner(referral.partner_id),
        history=[(h.at, h.action, h.actor) for h in found.history],
        timezone=library.timezone if library else directory.timezone,
        viewer=viewer,
        refused=refused,
        done=request.query_params.get("fait") if request.query_params.get("fait") in ACTIONS else None,
        to_treat=to_treat,
    )


async def log_read(runtime: Runtime, found: ReferralCase, viewer: Viewer, role: str, now: datetime) -> None:
    """The page shows the person's details (not once the need left this partner, nor once they were erased): who
    looked goes in the access log."""
    if (viewer.can_act and domain.left_partner(found.referral.status)) or found.case.person_erased_at is not None:
        return
    await anyio.to_thread.run_sync(
        partial(
            record_access,
            runtime.db,
            at=now,
            need_id=found.case.need_id,
            user_id=viewer.actor,
            role=role,
            service="referral",
            channel="page",
            what="referral",
        )
    )


# --- acting


def read_action(action: str, fields: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """The text the action records (a decline's: the partner's words, its code is the form's `reason`), or the
    errors of the form (field -> problem code)."""
    errors: dict[str, str] = {}

    def text(name: str, required: bool = True) -> str:
        value = fields.get(name, "").strip()
        if required and not value:
            errors[name] = "required"
        elif len(value) > MAX_TEXT[name]:
            errors[name] = "too_long"
        return value

    if action == "accept":
        return None, errors
    if action == "respond":
        return text("message"), errors
    if action == "close":
        return text("outcome"), errors
    reason = fields.get("reason", "")
    if reason not in DECLINE_REASONS:
        errors["reason"] = "choose"
    detail = text("detail", required=reason == "other")
    return detail, errors


def command_of(action: str, referral_id: str, viewer: Viewer, text: str | None, fields: dict[str, str]) -> object:
    if action == "accept":
        return AcceptReferral(referral_id, viewer.actor, viewer.partner_id)
    if action == "respond":
        return RespondToReferral(referral_id, viewer.actor, viewer.partner_id, text or "")
    if action == "close":
        return CloseReferral(referral_id, viewer.actor, viewer.partner_id, text or "")
    return DeclineReferral(referral_id, viewer.actor, viewer.partner_id, text or "", fields["reason"])


async def perform(
    request: Request, pages: Pages, runtime: Runtime, deps: Deps, referral_id: str, action: str, viewer: Viewer
) -> Response:
    if action not in ACTIONS:
        raise pages.error(request, 404, "not_found")
    fields = await pages.form(request, viewer.csrf)
    found = await anyio.to_thread.run_sync(load, runtime, referral_id)
    if found is None or found.referral.partner_id != viewer.partner_id:
        raise pages.error(request, 404, "not_found")
    directory, now = deps.directory, deps.clock()
    if domain.left_partner(found.referral.status):  # nothing left to do, and no form to show back
        return show(request, pages, directory, now, found, viewer, status=409, refused=action)
    text, errors = read_action(action, fields)
    if errors:
        return show(
            request, pages, directory, now, found, viewer, status=422, errors={action: errors}, values={action: fields}
        )
    try:
        await handle(command_of(action, referral_id, viewer, text, fields), deps)
    except NotFound:
        raise pages.error(request, 404, "not_found") from None
    except Refused as refused:  # the handler's rule, which the form's checks above already apply
        field = FORM_FIELD.get(refused.field, refused.field)
        return show(
            request,
            pages,
            directory,
            now,
            found,
            viewer,
            status=422,
            errors={action: {field: "choose" if field == "reason" else "required"}},
            values={action: fields},
        )
    except domain.TransitionRefused:
        found = await anyio.to_thread.run_sync(load, runtime, referral_id)
        if found is None:
            raise pages.error(request, 404, "not_found") from None
        return show(request, pages, directory, now, found, viewer, status=409, refused=action)
    return pages.redirect(f"{viewer.page_url}?fait={action}")


# --- the signed link from the handoff email


def link_viewer(request: Request, pages: Pages, runtime: Runtime, now: datetime, token: str) -> tuple[Viewer, str]:
    try:
        grant = read_referral_token(runtime.settings, token, now)
    except TokenExpired:
        raise pages.error(request, 410, "link_expired", template="lien_erreur.html") from None
    except TokenInvalid:
        raise pages.error(request, 400, "link_invalid", template="lien_erreur.html") from None
    viewer = Viewer(
        partner_id=grant.partner_id,
        actor=f"link:{grant.partner_id}",
        page_url=f"/r/{token}",
        csrf=pages.link_csrf(token),
    )
    return viewer, grant.referral_id


@router.get("/r/{token}")
async def referral_by_link(
    request: Request, token: str, pages: PagesDep, runtime: RuntimeDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    now = clock()
    viewer, referral_id = link_viewer(request, pages, runtime, now, token)
    found = await anyio.to_thread.run_sync(load, runtime, referral_id)
    if found is None or found.referral.partner_id != viewer.partner_id:
        raise pages.error(request, 410, "link_moved", template="lien_erreur.html")
    await log_read(runtime, found, viewer, "partner", now)
    return show(request, pages, directory, now, found, viewer)


@router.post("/r/{token}/{action}")
async def act_by_link(
    request: Request, token: str, action: str, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps
) -> Response:
    viewer, referral_id = link_viewer(request, pages, runtime, deps.clock(), token)
    return await perform(request, pages, runtime, deps, referral_id, action, viewer)


# --- signed-in users


def user_viewer(user: User, referral_id: str) -> Viewer:
    return Viewer(
        partner_id=user.partner if user.role == "partner" else None,
        actor=user.id,
        page_url=f"/boite/{referral_id}",
        csrf=None,
    )


@router.get("/")
async def root(pages: PagesDep) -> Response:
    return pages.redirect("/boite")


@router.get("/boite")
async def inbox(
    request: Request,
    pages: PagesDep,
    runtime: RuntimeDep,
    directory: DirectoryDep,
    clock: ClockDep,
    statut: str = "open",
    partenaire: str = "",
    q: str = "",
    lieu: str = "",
    page: str = "1",
) -> Response:
    user = pages.require_user(request, "partner", "ops")
    status = statut if statut in ("open", "all", *STATUSES) else "open"
    partner_id = user.partner if user.role == "partner" else (partenaire or None)
    q = q.strip()[:MAX_QUERY]
    library_id = lieu if user.role == "ops" and directory.library(lieu) else ""
    number = page_number(page)
    now = clock()

    only_open_cases = user.role == "partner"  # a partner's search finds a need that left it by its reference only

    def rows() -> tuple[list[tuple[Referral, NeedCase]], dict[str, int], int | str]:
        with runtime.db.read() as session:
            need_ids = views.search_candidates(session, q, only_open_cases)  # a narrow search: once, not per query
            found = views.inbox(
                session,
                status=status,
                offset=(number - 1) * INBOX_LIMIT,
                limit=INBOX_LIMIT + 1,
                partner_id=partner_id,
                q=q,
                library_id=library_id,
                only_open_cases=only_open_cases,
                need_ids=need_ids,
            )
            counts = views.inbox_counts(
                session,
                partner_id=partner_id,
                statuses=STATUSES,
                q=q,
                library_id=library_id,
                only_open_cases=only_open_cases,
                need_ids=need_ids,
            )
            unfiltered = not query_terms(q) and not library_id  # then the tab's count is the number to treat
            to_treat = counts.get("assigned", 0) if unfiltered else views.count_to_treat(session, partner_id)
            return found, counts, shown(to_treat)

    found, counts, to_treat = await anyio.to_thread.run_sync(rows)
    filter_status = status

    def tab_url(tab: str) -> str:
        kept = {"statut": tab, "q": q, "partenaire": partenaire if user.role == "ops" else "", "lieu": library_id}
        return "/boite?" + urlencode({k: v for k, v in kept.items() if v})

    # A need that left the partner shows as such, without its case (summary, the person) in the page.
    items = [
        dict(
            r=r,
            case=None if left else case,
            person=None if left else short_name(case.person_display_name),
            left=left,
            left_at=r.updated_at if left else None,
            late=is_late(r, now),
            deadline=deadline_words(r.respond_by, now, (library.timezone if library else None) or directory.timezone),
            library=library,
            partner=directory.partner(r.partner_id),
            category=directory.category(r.category),
        )
        for r, case in found[:INBOX_LIMIT]
        for left in [user.role == "partner" and domain.left_partner(r.status)]
        for library in [directory.library(r.library_id)]
    ]
    return pages.render(
        request,
        "boite.html",
        items=items,
        **page_links(request, number, len(found) > INBOX_LIMIT),
        filter_status=status,
        statuses=STATUSES,
        tabs=[
            (tab, count, tab_url(tab))
            for tab, count in (
                ("open", shown(*(counts.get(s, 0) for s in OPEN_STATUSES))),
                *((s, shown(counts.get(s, 0))) for s in STATUSES),
                ("all", shown(*counts.values())),
            )
            if count or tab in TABS or tab == filter_status
        ],
        partner=directory.partner(user.partner) if user.partner else None,
        partners=directory.partners if user.role == "ops" else [],
        partner_filter=partenaire,
        libraries=directory.libraries if user.role == "ops" else [],
        library_filter=library_id,
        filter_q=q,
        to_treat=to_treat,
        default_timezone=directory.timezone,
    )


@router.get("/boite/{referral_id}")
async def referral_signed_in(
    request: Request, referral_id: str, pages: PagesDep, runtime: RuntimeDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    user = pages.require_user(request, "partner", "ops")
    viewer = user_viewer(user, referral_id)
    found = await anyio.to_thread.run_sync(load, runtime, referral_id)
    if found is None or (viewer.partner_id is not None and found.referral.partner_id != viewer.partner_id):
        raise pages.error(request, 404, "not_found")  # never 403: ids cannot be probed
    await log_read(runtime, found, viewer, user.role, clock())
    to_treat = await anyio.to_thread.run_sync(menu_count, runtime, viewer.partner_id)
    return show(request, pages, directory, clock(), found, viewer, to_treat=to_treat)


def menu_count(runtime: Runtime, partner_id: str | None) -> int | str:
    """The menu's "À traiter (n)": referrals waiting for the partner's first answer (every partner's, for ops)."""
    with runtime.db.read() as session:
        return shown(views.count_to_treat(session, partner_id))


def shown(*counts: int) -> int | str:
    """The sum of capped counts (views.COUNT_CAP) as the pages say it: the number, or "10 000+" when one was capped."""
    if any(n > views.COUNT_CAP for n in counts):
        return f"{views.COUNT_CAP:,}+".replace(",", "\u202f")
    return sum(counts)


@router.post("/boite/{referral_id}/{action}")
async def act_signed_in(
    request: Request, referral_id: str, action: str, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps
) -> Response:
    user = pages.require_user(request, "partner")
    return await perform(request, pages, runtime, deps, referral_id, action, user_viewer(user, referral_id))
