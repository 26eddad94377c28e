"""The ops dashboard as web pages (French, role ops), served by referral next to the partner pages:

- `/tableau-de-bord` (tab "À traiter"): what needs a person first (needs without a partner, today's escalations and
  breaches, partners that stopped answering, deadlines), then partners, monthly reports, charts and the latest
  actions, with a one-line summary of the technical health;
- `/tableau-de-bord/technique` (tab "Technique"): queues, outboxes, the clock, deliveries, and closing a user's
  sessions. Both are figures of `dashboard.build_dashboard`, readable without JavaScript; a small script
  (`/static/tableau-de-bord.js`) refreshes each tab's figures in place from `.../chiffres` (the same template, so
  the page and its refresh never disagree) and can be paused;
- `/tableau-de-bord/demandes/{need_id}`: one need as the coordination sees it (what it is, its referrals, no
  personal data) with the actions on it (hand it over, reassign, cancel);
- `/tableau-de-bord/rapports.csv`: intake's monthly report as CSV, fetched server-side;
- `/tableau-de-bord/confirmer/{action}`: the confirmation step of each action, which asks for the reason (to hand a
  need no partner holds to one, `confier`: first the partner, then the confirmation that names it on its button);
- `POST /tableau-de-bord/actions/{action}`: the action itself, as the command of handlers.py that the API runs too
  (recorded in `ops_action` with who and why by that handler); then back (303).
The paths' French words (`rejouer`, `reaffecter`, ...) are user-facing; `ACTION_PATHS` maps them to the actions'
identifiers, which the code and the templates use.
Charts: each is a `<figure>` whose data is a table (what a page without JavaScript and a screen reader get) and,
as JSON in a `data-chart` attribute, drawn in the browser by uPlot (vendored in shared/static/vendor/uplot) from
`tableau-de-bord.js`, after the first load and after each refresh.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.referral import domain, incidents_pages, remote, views
from services.referral.commands import (
    AssignNeed,
    CancelNeed,
    PausePartner,
    ReassignReferral,
    ReplayDeadLetters,
    ResumePartner,
    RevokeSessions,
)
from services.referral.dashboard import Charts, Dashboard, build_dashboard
from services.referral.deps import ClockDep, CommandDeps, DirectoryDep, PagesDep, Runtime, RuntimeDep
from services.referral.handlers import NotFound, NotPaused, NotStranded, Refused, RemoteFailed, handle
from services.referral.store import OPEN_STATUSES, NeedCase, Referral
from shared.directory import Directory
from shared.events import STREAMS
from shared.pages import SECURITY_HEADERS, Pages, datetime_fr

TEMPLATES = Path(__file__).with_name("templates")
# The pages' paths and `?fait=` values (French, user-facing) -> the actions' identifiers.
ACTION_PATHS = {
    "rejouer": "replay",
    "reaffecter": "reassign",
    "confier": "assign",
    "pause": "pause",
    "reprise": "resume",
    "annuler": "cancel_need",
    "deconnecter": "revoke_sessions",
}
PATH_OF = {action: path for path, action in ACTION_PATHS.items()}
TECHNICAL_ACTIONS = ("replay", "revoke_sessions")  # done from the technical tab, which then says so
ACTIONS = tuple(ACTION_PATHS.values())
MAX_REASON = 2000
REFRESH_SECONDS = 30
# The dashboard page runs its own scripts (refresh, charts with the vendored uPlot), from this origin only.
DASHBOARD_CSP = SECURITY_HEADERS["Content-Security-Policy"] + "; script-src 'self'; connect-src 'self'"
PROBLEMS = ("no_live_consumer", "lag", "old_pending", "pending_growing")  # labels in _tableau_labels.html


# --- French wording of figures --------------------------------------------------------------------------


def duration_fr(seconds: float | None) -> str:
    """'45 s', '12 min', '3 h 20 min', '2 j 4 h'; '–' for no value."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m:02d} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} j {h} h" if h else f"{d} j"


def percent_fr(share: float | None) -> str:
    return "–" if share is None else f"{round(share * 100)}\u00a0%"


def time_fr(at: datetime, timezone: str) -> str:
    return at.astimezone(ZoneInfo(timezone)).strftime("%H:%M:%S")


def hour_fr(at: datetime, timezone: str) -> str:
    return f"{at.astimezone(ZoneInfo(timezone)).hour} h"


def month_fr(month: str) -> str:
    from shared.pages import MONTHS_FR

    year, number = month.split("-")
    return f"{MONTHS_FR[int(number) - 1]} {year}"


# --- the pages ------------------------------------------------------------------------------------------


def install_filters(pages: Pages) -> None:
    """The French wording of figures, for the dashboard's templates."""
    pages.env.filters.update(
        duree=duration_fr,
        pourcent=percent_fr,
        heure=time_fr,
        mois=month_fr,
        date_iso=lambda value, tz: datetime_fr(datetime.fromisoformat(value), tz),
    )


HEADERS = {"Content-Security-Policy": DASHBOARD_CSP}
router = APIRouter()


def technical_problems(d: Dashboard) -> list[tuple[str, int]]:
    """What is stuck on the technical tab, as (code, how many), for the first tab's one-line summary (worded in
    _tableau_labels.html; none: "Tout circule normalement")."""
    q = d.queues
    failed = d.deliveries.data.get("totals", {}).get("failed", 0) if d.deliveries.available and d.deliveries.data else 0
    found = [
        ("redis_down", 0 if q.available else 1),
        ("stuck_streams", sum(1 for s in q.streams if s.stuck)),
        ("dead_letters", sum(s.dead_letters for s in q.streams)),
        ("outboxes_late", sum(1 for o in q.outboxes if o.available and (o.oldest_age_seconds or 0) > 60)),
        ("outboxes_down", sum(1 for o in q.outboxes if not o.available)),
        ("clock_overdue", d.clock.overdue if d.clock else 0),
        ("deliveries_failed", failed),
        ("deliveries_down", 0 if d.deliveries.available else 1),
        ("reports_down", 0 if d.reports.available else 1),
    ]
    return [(code, n) for code, n in found if n]


def report_rows(d: Dashboard) -> tuple[list[dict[str, Any]], int]:
    """The monthly reports' rows worth a line (a library with no need, nobody helped and nothing due that month is
    left out: the CSV keeps it), and how many were left out."""
    if not d.reports.available or not d.reports.data:
        return [], 0
    rows = [r for m in d.reports.data.get("months", []) for r in m.get("items", [])]
    shown = [r for r in rows if r.get("needs") or r.get("people") or r.get("due")]
    return shown, len(rows) - len(shown)


def action_targets(d: Dashboard, directory: Directory, references: dict[str, str]) -> list[dict[str, str]]:
    """What each of the latest actions was about, in names (a need's reference, a partner's name), never ids."""

    def partner(partner_id: str) -> str:
        found = directory.partner(partner_id)
        return found.name if found else partner_id

    targets = []
    for a in d.recent_actions or []:
        head, _, partner_id = a.target.partition(":")
        if a.action in ("pause_partner", "resume_partner"):
            targets.append({"partner": partner(a.target)})
        elif a.action in ("assign", "cancel_need"):
            targets.append({"need_url": f"/tableau-de-bord/demandes/{head}", "reference": references.get(head, "")})
            if partner_id:
                targets[-1]["partner"] = partner(partner_id)
        elif a.action in ("reassign", "reassign_override", "cancel_referral"):
            targets.append({"referral_url": f"/boite/{head}", "partner": partner(partner_id) if partner_id else ""})
        elif a.action == "replay":
            targets.append({"stream": head})  # "needs:*", or the stream and the entry replayed
        elif a.action.startswith("privacy_incident"):
            targets.append({"incident_url": f"/tableau-de-bord/incidents/{a.target}"})
        else:
            targets.append({"text": a.target})
    return targets


async def figures(runtime: Runtime) -> dict:
    data = await build_dashboard(runtime, runtime.queue_watch, runtime.figures_reuse)
    directory = runtime.directory
    actions = data.recent_actions or []  # none while the database figures are being computed (figures_pending)
    need_ids = [a.target.partition(":")[0] for a in actions if a.action in ("assign", "cancel_need")]

    def read_references() -> dict[str, str]:
        with runtime.db.read() as session:
            return views.references(session, need_ids)

    references = await anyio.to_thread.run_sync(read_references) if need_ids else {}
    rows = report_rows(data)
    names = dict(
        partners={p.id: p.name for p in directory.partners},
        categories={c.id: c.label for c in directory.categories},
        libraries={lib.id: lib.name for lib in directory.libraries},
    )
    # the bars of each chart (label, count): its table and its drawing both come from these
    charts = data.charts or Charts(needs_per_hour=[], answer_times=[])
    needs_bars = [
        {"label": hour_fr(b.start, data.timezone), "count": b.count}
        for b in charts.needs_per_hour
        if b.start is not None  # every hour's bar has its start
    ]
    answers_bars = [{"label": b.label, "count": b.count} for b in charts.answer_times]
    return dict(
        d=data,
        tz=data.timezone,
        names=names,
        needs_bars=needs_bars,
        answers_bars=answers_bars,
        problems=PROBLEMS,
        technical=technical_problems(data),
        report_rows=rows[0],
        report_hidden=rows[1],
        targets=action_targets(data, directory, references),
        refresh=REFRESH_SECONDS,
    )


# The two tabs: (page, its figures alone) templates.
TABS = {
    "a-traiter": ("tableau_de_bord.html", "_tableau_chiffres.html"),
    "technique": ("tableau_technique.html", "_tableau_technique.html"),
}


async def tab_page(request: Request, pages: Pages, runtime: Runtime, tab: str) -> Response:
    pages.require_user(request, "ops")
    return pages.render(
        request,
        TABS[tab][0],
        headers=HEADERS,
        tab=tab,
        done=ACTION_PATHS.get(request.query_params.get("fait", "")),
        count=request.query_params.get("nombre"),
        users=runtime.directory.users,
        libraries=runtime.directory.libraries,
        **await figures(runtime),
    )


@router.get("/tableau-de-bord")
async def board(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    return await tab_page(request, pages, runtime, "a-traiter")


@router.get("/tableau-de-bord/technique")
async def technical_board(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    return await tab_page(request, pages, runtime, "technique")


@router.get("/tableau-de-bord/chiffres")
async def board_figures(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    """The first tab's figures alone, for the page's refresh script."""
    pages.require_user(request, "ops")
    return pages.render(request, TABS["a-traiter"][1], headers=HEADERS, **await figures(runtime))


@router.get("/tableau-de-bord/technique/chiffres")
async def technical_figures(request: Request, pages: PagesDep, runtime: RuntimeDep) -> Response:
    """The technical tab's figures alone, for the page's refresh script."""
    pages.require_user(request, "ops")
    return pages.render(request, TABS["technique"][1], headers=HEADERS, **await figures(runtime))


# --- a need, as the coordination sees it


def need_facts(case: NeedCase, directory: Directory) -> dict[str, Any]:
    """What a need is, in the directory's names (no personal data): for its page and the confirmation pages."""
    library, category = directory.library(case.library_id), directory.category(case.category)
    return {
        "id": case.need_id,
        "reference": case.reference,
        "url": f"/tableau-de-bord/demandes/{case.need_id}",
        "category": category.label if category else case.category,
        "library": library.name if library else case.library_id,
        "urgent": case.urgency == "urgent",
        "postal_code": case.postal_code,
        "recorded_at": case.recorded_at,
        "respond_by": case.respond_by,
        "stranded": case.stranded_since is not None,
    }


def need_page_context(runtime: Runtime, need_id: str) -> dict[str, Any] | None:
    with runtime.db.read() as session:
        found = views.person_cases(session, [need_id])
    if not found:
        return None
    case, referrals = found[0]
    directory = runtime.directory

    def partner_name(referral: Referral) -> str:
        partner = directory.partner(referral.partner_id)
        return partner.name if partner else referral.partner_id

    lines = [{"referral": r, "partner": partner_name(r), "history": h} for r, h in reversed(referrals)]
    current = next((r for r, _ in referrals if r.status in OPEN_STATUSES), None)
    return {
        "n": need_facts(case, directory),
        "case": case,
        "referrals": lines,
        "current": current,
        "current_partner": partner_name(current) if current else None,
        "stranded_why": case.stranded_cause,
    }


@router.get("/tableau-de-bord/demandes/{need_id}")
async def need_page(request: Request, need_id: str, pages: PagesDep, runtime: RuntimeDep, clock: ClockDep) -> Response:
    """One need: what it is, where it stands, its referrals; and the actions on it (hand over, reassign, cancel)."""
    pages.require_user(request, "ops")
    context = await anyio.to_thread.run_sync(need_page_context, runtime, need_id[:64])
    if context is None:
        raise pages.error(request, 404, "not_found")
    return pages.render(request, "tableau_demande.html", now=clock(), tz=runtime.directory.timezone, **context)


@router.get("/tableau-de-bord/rapports.csv")
async def reports_csv(request: Request, pages: PagesDep, runtime: RuntimeDep, mois: str = "") -> Response:
    user = pages.require_user(request, "ops")
    month = mois if re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", mois) else None
    answer = await remote.intake_report_csv(runtime, user.id, month)
    if answer is None:
        raise pages.error(request, 502, "intake_down", template="tableau_erreur.html")
    return Response(
        answer.content,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": answer.headers.get("content-disposition", "attachment"),
            "Cache-Control": "no-store",
        },
    )


# --- confirmation step


def action_of(request: Request, pages: Pages, path: str) -> str:
    """The action a page path names; a 404 page for any other."""
    if path not in ACTION_PATHS:
        raise pages.error(request, 404, "not_found")
    return ACTION_PATHS[path]


def subject_of(request: Request, pages: Pages, runtime: Runtime, action: str, params: dict[str, str]) -> dict:
    """What the action is about, checked; a 404 page when it does not exist."""
    directory = runtime.directory
    if action == "replay":
        stream = params.get("flux", "")
        if stream not in STREAMS:
            raise pages.error(request, 404, "not_found")
        return {"stream": stream, "id": params.get("id") or None}
    if action == "revoke_sessions":
        user = directory.user(params.get("utilisateur", ""))
        if user is None:
            raise pages.error(request, 404, "not_found")
        return {"user": user}
    if action in ("pause", "resume"):
        partner = directory.partner(params.get("partenaire", ""))
        if partner is None:
            raise pages.error(request, 404, "not_found")
        return {"partner": partner}
    if action == "reassign":
        with runtime.db.read() as session:
            found = views.referral_with_case(session, params.get("orientation", ""))
        if found is None:
            raise pages.error(request, 404, "not_found")
        referral, need_case, _ = found
        candidates = [
            p for p in directory.partners if referral.category in p.categories and p.id != referral.partner_id
        ]
        return {
            "referral": referral,
            "need": need_facts(need_case, directory),
            "partner": directory.partner(referral.partner_id),
            "candidates": candidates,
            "chosen": next((p for p in candidates if p.id == params.get("partenaire")), None),
        }
    need_id = params.get("demande", "").strip()
    if not need_id or len(need_id) > 64:
        raise pages.error(request, 404, "not_found")
    with runtime.db.read() as session:
        case, open_referral = views.need_and_open_referral(session, need_id)
    if action == "assign":
        return assign_subject(request, pages, runtime, case, open_referral, params)
    return {
        "need_id": need_id,
        "case": case,
        "need": need_facts(case, directory) if case else None,
        "referral": open_referral,
        "partner": directory.partner(open_referral.partner_id) if open_referral else None,
    }


def assign_subject(
    request: Request,
    pages: Pages,
    runtime: Runtime,
    case,
    open_referral,
    params: dict[str, str],  # noqa: ANN001
) -> dict:
    """A need to hand to a partner: its facts, why nobody took it, the partners to choose from (those that take its
    category first) and, once one is chosen, that partner and its contacts."""
    if case is None:
        raise pages.error(request, 404, "not_found")
    directory = runtime.directory
    with runtime.db.read() as session:
        declined = views.declined_by(session, [case.need_id])[case.need_id]
    takers = [p for p in directory.partners if case.category in p.categories]
    library, category = directory.library(case.library_id), directory.category(case.category)
    return {
        "need_id": case.need_id,
        "case": case,
        "need": need_facts(case, directory),
        "stranded": case.stranded_since is not None,
        "referral": open_referral,
        "holder": directory.partner(open_referral.partner_id) if open_referral else None,
        "library": library.name if library else case.library_id,
        "category": category.label if category else case.category,
        "declined": [p.name for p in map(directory.partner, declined) if p is not None],
        "takers": takers,
        "others": [p for p in directory.partners if p not in takers],
        "partner": directory.partner(params.get("partenaire", "")),
    }


async def confirm_page(
    request: Request,
    pages: Pages,
    runtime: Runtime,
    now: datetime,
    action: str,
    subject: dict,
    status: int = 200,
    errors=None,
    values=None,
    failure: str | None = None,
) -> Response:
    extra: dict[str, Any] = {}
    if action == "replay":
        key = runtime.settings.key(subject["stream"])
        extra["letters"] = await views.dead_letters(runtime.bus.redis, key, entry_id=subject["id"])
        extra["total"] = (
            len(extra["letters"]) if subject["id"] else await views.dead_letter_count(runtime.bus.redis, key)
        )
    if action == "pause":
        local_today = now.astimezone(ZoneInfo(runtime.directory.timezone)).date()
        extra["min_date"] = (local_today + timedelta(days=1)).isoformat()
    return pages.render(
        request,
        "tableau_confirmer.html",
        status=status,
        action=action,
        path=PATH_OF[action],
        s=subject,
        errors=errors or {},
        values=values or {},
        failure=failure,
        tz=runtime.directory.timezone,
        **extra,
    )


@router.get("/tableau-de-bord/confirmer/{path}")
async def confirm(request: Request, path: str, pages: PagesDep, runtime: RuntimeDep, clock: ClockDep) -> Response:
    pages.require_user(request, "ops")
    action = action_of(request, pages, path)
    subject = await anyio.to_thread.run_sync(subject_of, request, pages, runtime, action, dict(request.query_params))
    return await confirm_page(request, pages, runtime, clock(), action, subject)


# --- the actions


def until_of(value: str, timezone: str) -> datetime | None:
    """The pause ends at the start of the chosen day, in the directory's time zone."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return None
    return datetime.combine(day, time(0), ZoneInfo(timezone))


def form_errors(
    action: str, fields: dict[str, str], subject: dict, now: datetime, timezone: str
) -> tuple[dict[str, str], datetime | None]:
    """The form's problems (field -> code), and the pause's end when there is one."""
    errors: dict[str, str] = {}
    reason = fields.get("motif", "").strip()
    if not reason:
        errors["motif"] = "required"
    elif len(reason) > MAX_REASON:
        errors["motif"] = "too_long"
    until = None
    if action == "pause":
        until = until_of(fields.get("reprise", ""), timezone)
        if until is None:
            errors["reprise"] = "date"
        elif until <= now:
            errors["reprise"] = "future"
    if action == "reassign" and fields.get("partenaire") not in {p.id for p in subject["candidates"]}:
        errors["partenaire"] = "choose"
    if action == "assign":
        partner = subject["partner"]
        if partner is None:
            errors["partenaire"] = "choose"
        elif fields.get("contact") and fields["contact"] not in {c.id for c in partner.contacts}:
            errors["contact"] = "choose_contact"
    return errors, until


def command_of(action: str, fields: dict[str, str], subject: dict, until: datetime | None, actor: str) -> object:
    reason = fields.get("motif", "").strip()
    if action == "replay":
        return ReplayDeadLetters(subject["stream"], (subject["id"],) if subject["id"] else None, reason, actor)
    if action == "revoke_sessions":
        return RevokeSessions(subject["user"].id, reason, actor)
    if action == "reassign":
        return ReassignReferral(subject["referral"].id, fields["partenaire"], actor, reason)
    if action == "assign":
        return AssignNeed(subject["need_id"], subject["partner"].id, actor, reason, fields.get("contact") or None)
    if action == "pause":
        assert until is not None  # form_errors required it
        return PausePartner(subject["partner"].id, until, reason, actor)
    if action == "resume":
        return ResumePartner(subject["partner"].id, reason, actor)
    return CancelNeed(subject["need_id"], reason, actor)


@router.post("/tableau-de-bord/actions/{path}")
async def perform(
    request: Request, path: str, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps, directory: DirectoryDep
) -> Response:
    user = pages.require_user(request, "ops")
    action = action_of(request, pages, path)
    fields = await pages.form(request)
    subject = await anyio.to_thread.run_sync(subject_of, request, pages, runtime, action, fields)
    now = deps.clock()
    errors, until = form_errors(action, fields, subject, now, directory.timezone)

    async def again(status: int, errors=None, failure: str | None = None) -> Response:
        return await confirm_page(request, pages, runtime, now, action, subject, status, errors, fields, failure)

    if errors:
        return await again(422, errors)
    try:
        done = await handle(command_of(action, fields, subject, until, user.id), deps)
        runtime.figures_reuse.forget()  # the page the action lands on shows it
    except NotFound:  # gone since the confirmation page was shown
        raise pages.error(request, 404, "not_found") from None
    except domain.TransitionRefused:
        return await again(409, failure="transition")
    except NotStranded:  # assigned or cancelled since the page was shown
        return await again(409, failure="not_stranded")
    except Refused as refused:  # the directory or the clock moved since the page was shown
        field = {"partner_id": "partenaire", "contact_id": "contact"}.get(refused.field, "reprise")
        return await again(
            422, {field: "choose_contact" if field == "contact" else "choose" if field == "partenaire" else "future"}
        )
    except NotPaused:
        return await again(409, failure="not_paused")
    except RemoteFailed as failed:
        return await again({"not_found": 404, "refused": 409}.get(failed.kind, 502), failure=failed.kind)
    count = done if action in ("replay", "revoke_sessions") else None
    suffix = f"&nombre={count}" if count is not None else ""
    tab = "/technique" if action in TECHNICAL_ACTIONS else ""
    return pages.redirect(f"/tableau-de-bord{tab}?fait={path}{suffix}")


router.include_router(incidents_pages.router)  # the register of confidentiality incidents
