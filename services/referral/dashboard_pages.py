"""The ops dashboard as web pages (French, role ops), served by referral next to the partner pages:

- `/tableau-de-bord`: every figure of `dashboard.build_dashboard`, readable without JavaScript; a small script
  (`/static/tableau-de-bord.js`) refreshes the figures in place from `/tableau-de-bord/chiffres` (the same
  template, so the page and its refresh never disagree) and can be paused;
- `/tableau-de-bord/rapports.csv`: intake's monthly report as CSV, fetched server-side;
- `/tableau-de-bord/confirmer/{action}`: the confirmation step of each action, which asks for the reason;
- `POST /tableau-de-bord/actions/{action}`: the action itself, through the owning service (referral's handlers,
  the shared replay, intake's API for a need, shared.sessions for a user's sessions), recorded in `ops_action`
  with who and why; then back (303).
Charts: each is a `<figure>` whose data is a table (what a page without JavaScript and a screen reader get) and,
as JSON in a `data-chart` attribute, drawn in the browser by uPlot (vendored in shared/static/vendor/uplot) from
`tableau-de-bord.js`, after the first load and after each refresh.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.referral import dashboard, domain
from services.referral.handlers import ReassignRefused, pause_partner, reassign, record_ops_action, resume_partner
from services.referral.store import NeedCase, Referral, current_referral
from shared.directory import User
from shared.events import DEAD_LETTER_SUFFIX, STREAMS
from shared.messaging import replay
from shared.pages import SECURITY_HEADERS, Pages, datetime_fr
from shared.service import ACTOR_HEADER, Service, internal_token
from shared.sessions import revoke_user_sessions

TEMPLATES = Path(__file__).with_name("templates")
ACTIONS = ("rejouer", "reaffecter", "pause", "reprise", "annuler", "deconnecter")
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


def build_router(svc: Service, pages: Pages) -> APIRouter:
    router = APIRouter()
    pages.env.filters.update(duree=duration_fr, pourcent=percent_fr, heure=time_fr, mois=month_fr,
                             date_iso=lambda value, tz: datetime_fr(datetime.fromisoformat(value), tz))
    headers = {"Content-Security-Policy": DASHBOARD_CSP}

    def ops(request: Request) -> User:
        return pages.require_user(request, "ops")

    async def figures(request: Request) -> dict:
        data = await dashboard.build_dashboard(svc)
        directory = svc.directory
        names = dict(partners={p.id: p.name for p in directory.partners},
                     categories={c.id: c.label for c in directory.categories},
                     libraries={lib.id: lib.name for lib in directory.libraries})
        # the bars of each chart (label, count): its table and its drawing both come from these
        needs_bars = [{"label": hour_fr(b.start, data.timezone), "count": b.count} for b in data.charts.needs_per_hour]
        answers_bars = [{"label": b.label, "count": b.count} for b in data.charts.answer_times]
        return dict(d=data, tz=data.timezone, names=names, needs_bars=needs_bars, answers_bars=answers_bars,
                    problems=PROBLEMS, refresh=REFRESH_SECONDS)

    @router.get("/tableau-de-bord")
    async def board(request: Request) -> Response:
        ops(request)
        done = request.query_params.get("fait")
        return pages.render(request, "tableau_de_bord.html", headers=headers,
                            done=done if done in ACTIONS else None, count=request.query_params.get("nombre"),
                            users=svc.directory.users, **await figures(request))

    @router.get("/tableau-de-bord/chiffres")
    async def board_figures(request: Request) -> Response:
        """The figures alone, for the page's refresh script."""
        ops(request)
        return pages.render(request, "_tableau_chiffres.html", headers=headers, **await figures(request))

    @router.get("/tableau-de-bord/rapports.csv")
    async def reports_csv(request: Request, mois: str = "") -> Response:
        user = ops(request)
        params = {"format": "csv", **({"month": mois} if re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", mois) else {})}
        try:
            async with httpx.AsyncClient(timeout=dashboard.REMOTE_TIMEOUT * 3) as client:
                answer = await client.get(f"{svc.settings.service_url('intake')}/api/v1/reports",
                                          params=params, headers=internal_headers(user))
        except httpx.HTTPError:
            raise pages.error(request, 502, "intake_down", template="tableau_erreur.html") from None
        if answer.status_code != 200:
            raise pages.error(request, 502, "intake_down", template="tableau_erreur.html")
        return Response(answer.content, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": answer.headers.get("content-disposition", "attachment"),
                                 "Cache-Control": "no-store"})

    def internal_headers(user: User) -> dict[str, str]:
        return {"Authorization": f"Bearer {internal_token(svc.settings)}", ACTOR_HEADER: user.id}

    # --- confirmation step

    def subject_of(request: Request, action: str, params: dict[str, str]) -> dict:
        """What the action is about, checked; a 404 page when it does not exist."""
        directory = svc.directory
        if action == "rejouer":
            stream = params.get("flux", "")
            if stream not in STREAMS:
                raise pages.error(request, 404, "not_found")
            return {"stream": stream, "id": params.get("id") or None}
        if action == "deconnecter":
            user = directory.user(params.get("utilisateur", ""))
            if user is None:
                raise pages.error(request, 404, "not_found")
            return {"user": user}
        if action in ("pause", "reprise"):
            partner = directory.partner(params.get("partenaire", ""))
            if partner is None:
                raise pages.error(request, 404, "not_found")
            return {"partner": partner}
        if action == "reaffecter":
            with svc.db.read() as session:
                referral = session.get(Referral, params.get("orientation", ""))
            if referral is None:
                raise pages.error(request, 404, "not_found")
            return {"referral": referral, "partner": directory.partner(referral.partner_id),
                    "candidates": [p for p in directory.partners
                                   if referral.category in p.categories and p.id != referral.partner_id]}
        need_id = params.get("demande", "").strip()
        if not need_id or len(need_id) > 64:
            raise pages.error(request, 404, "not_found")
        with svc.db.read() as session:
            case = session.get(NeedCase, need_id)
            referral = current_referral(session, need_id) if case else None
        return {"need_id": need_id, "case": case, "referral": referral,
                "partner": directory.partner(referral.partner_id) if referral else None}

    async def letters(stream: str, entry_id: str | None) -> list[dict]:
        key = svc.settings.key(stream) + DEAD_LETTER_SUFFIX
        entries = await svc.bus.redis.xrevrange(key, count=50) if entry_id is None else \
            await svc.bus.redis.xrange(key, min=entry_id, max=entry_id)

        def field(fields, name):
            value = fields.get(name.encode())
            return value.decode(errors="replace") if value is not None else None

        return [{"id": i.decode(), "type": field(f, "type"), "need_id": field(f, "need_id"),
                 "group": field(f, "dlq_group"), "error": field(f, "dlq_error"), "failed_at": field(f, "dlq_failed_at")}
                for i, f in entries]

    async def confirm_page(request: Request, action: str, subject: dict, status: int = 200, errors=None,
                           values=None, failure: str | None = None) -> Response:
        extra = {}
        if action == "rejouer":
            extra["letters"] = await letters(subject["stream"], subject["id"])
            extra["total"] = len(extra["letters"]) if subject["id"] else \
                await svc.bus.redis.xlen(svc.settings.key(subject["stream"]) + DEAD_LETTER_SUFFIX)
        if action == "pause":
            local_today = svc.clock().astimezone(ZoneInfo(svc.directory.timezone)).date()
            extra["min_date"] = (local_today + timedelta(days=1)).isoformat()
        return pages.render(request, "tableau_confirmer.html", status=status, action=action, s=subject,
                            errors=errors or {}, values=values or {}, failure=failure,
                            tz=svc.directory.timezone, **extra)

    @router.get("/tableau-de-bord/confirmer/{action}")
    async def confirm(request: Request, action: str) -> Response:
        ops(request)
        if action not in ACTIONS:
            raise pages.error(request, 404, "not_found")
        subject = await anyio.to_thread.run_sync(subject_of, request, action, dict(request.query_params))
        return await confirm_page(request, action, subject)

    # --- the actions

    def until_of(value: str) -> datetime | None:
        """The pause ends at the start of the chosen day, in the directory's time zone."""
        try:
            day = date.fromisoformat(value)
        except ValueError:
            return None
        return datetime.combine(day, time(0), ZoneInfo(svc.directory.timezone))

    @router.post("/tableau-de-bord/actions/{action}")
    async def perform(request: Request, action: str) -> Response:
        user = ops(request)
        if action not in ACTIONS:
            raise pages.error(request, 404, "not_found")
        fields = await pages.form(request)
        subject = await anyio.to_thread.run_sync(subject_of, request, action, fields)
        errors: dict[str, str] = {}
        reason = fields.get("motif", "").strip()
        if not reason:
            errors["motif"] = "required"
        elif len(reason) > MAX_REASON:
            errors["motif"] = "too_long"
        until = None
        if action == "pause":
            until = until_of(fields.get("reprise", ""))
            if until is None:
                errors["reprise"] = "date"
            elif until <= svc.clock():
                errors["reprise"] = "future"
        if action == "reaffecter" and fields.get("partenaire") not in {p.id for p in subject["candidates"]}:
            errors["partenaire"] = "choose"
        if errors:
            return await confirm_page(request, action, subject, 422, errors, fields)

        now = svc.clock()
        count = None
        if action == "rejouer":
            key = svc.settings.key(subject["stream"])
            ids = [subject["id"]] if subject["id"] else None
            count = await replay(svc.bus.redis, key, ids)
            target = f"{subject['stream']}:{subject['id'] or '*'}"
            await anyio.to_thread.run_sync(record, user, "replay", target, reason)
        elif action == "deconnecter":
            count = await revoke_user_sessions(svc.bus.redis, svc.settings, subject["user"].id)
            await anyio.to_thread.run_sync(record, user, "revoke_sessions", subject["user"].id, reason)
        elif action == "reaffecter":
            def work() -> None:
                with svc.db.transaction() as session:
                    reassign(session, subject["referral"].id, fields["partenaire"], user.id, reason, now,
                             svc.directory)
            try:
                await anyio.to_thread.run_sync(work)
            except domain.TransitionRefused:
                return await confirm_page(request, action, subject, 409, values=fields, failure="transition")
            except ReassignRefused:  # the directory changed since the page listed its candidates
                return await confirm_page(request, action, subject, 422, {"partenaire": "choose"}, fields)
        elif action == "pause":
            def work() -> None:
                with svc.db.transaction() as session:
                    pause_partner(session, subject["partner"].id, until, reason, user.id, now)
            await anyio.to_thread.run_sync(work)
        elif action == "reprise":
            def work() -> bool:
                with svc.db.transaction() as session:
                    return resume_partner(session, subject["partner"].id, reason, user.id, now)
            if not await anyio.to_thread.run_sync(work):
                return await confirm_page(request, action, subject, 409, values=fields, failure="not_paused")
        else:
            failure = await cancel_need(user, subject["need_id"], reason)
            if failure:
                status = {"not_found": 404, "refused": 409}.get(failure, 502)
                return await confirm_page(request, action, subject, status, values=fields, failure=failure)
            await anyio.to_thread.run_sync(record, user, "cancel_need", subject["need_id"], reason)
        svc.bus.relay.wake()
        suffix = f"&nombre={count}" if count is not None else ""
        return pages.redirect(f"/tableau-de-bord?fait={action}{suffix}")

    def record(user: User, action: str, target: str, reason: str) -> None:
        with svc.db.transaction() as session:
            record_ops_action(session, user.id, action, target, reason, svc.clock())

    async def cancel_need(user: User, need_id: str, reason: str) -> str | None:
        """Through intake's API (intake owns needs); None when done, else what went wrong."""
        try:
            async with httpx.AsyncClient(timeout=dashboard.REMOTE_TIMEOUT * 3) as client:
                answer = await client.post(f"{svc.settings.service_url('intake')}/api/v1/needs/{need_id}/cancel",
                                           json={"reason": reason}, headers=internal_headers(user))
        except httpx.HTTPError:
            return "unreachable"
        if answer.status_code == 200:
            return None
        return {404: "not_found", 409: "refused"}.get(answer.status_code, "unreachable")

    return router

