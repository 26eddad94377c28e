"""The person's answer to "were you contacted?" (issue 16), from the two buttons of the question's email: no account,
one signed single-purpose link per answer (shared.signin.person_answer_link).

- `GET /contact/{token}` shows the question and the answer the button chose, with a button to confirm it: opening
  the link records nothing, so mail scanners and link previews that fetch every URL cannot answer for the person;
- `POST /contact/{token}` records it (commands.RecordPersonContacted, its one handler) and goes back to the page,
  which then thanks the person. Only the first answer counts; the page says so when the question was answered.
The page shows the partner's and the desk's names, never anything of the need or the person.
"""

from __future__ import annotations

from datetime import datetime

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.referral import views
from services.referral.commands import RecordPersonContacted
from services.referral.deps import ClockDep, CommandDeps, DirectoryDep, PagesDep, Runtime, RuntimeDep
from services.referral.handlers import NotFound, handle
from shared.directory import Directory
from shared.pages import Pages
from shared.signin import PersonAnswer, TokenExpired, TokenInvalid, read_person_answer_token

router = APIRouter()


def read_token(request: Request, pages: Pages, token: str, runtime: Runtime, now: datetime) -> PersonAnswer:
    try:
        return read_person_answer_token(runtime.settings, token, now)
    except TokenExpired:
        raise pages.error(request, 410, "expired", template="contact_personne_erreur.html") from None
    except TokenInvalid:
        raise pages.error(request, 400, "invalid", template="contact_personne_erreur.html") from None


def show(
    request: Request, pages: Pages, directory: Directory, runtime: Runtime, token: str, grant: PersonAnswer
) -> Response:
    with runtime.db.read() as session:
        found = views.referral_with_case(session, grant.referral_id)
    if found is None or found[0].contact_question_at is None:
        raise pages.error(request, 404, "invalid", template="contact_personne_erreur.html")
    referral = found[0]
    partner = directory.partner(referral.partner_id)
    library = directory.library(referral.library_id)
    return pages.render(
        request,
        "contact_personne.html",
        answer=grant.answer,
        recorded=referral.person_contacted,
        partner_name=partner.name if partner else referral.partner_id,
        library=library,
        token=token,
        csrf=pages.link_csrf(token),
    )


@router.get("/contact/{token}")
async def question(
    request: Request, token: str, pages: PagesDep, runtime: RuntimeDep, directory: DirectoryDep, clock: ClockDep
) -> Response:
    grant = read_token(request, pages, token, runtime, clock())
    return await anyio.to_thread.run_sync(show, request, pages, directory, runtime, token, grant)


@router.post("/contact/{token}")
async def answer(request: Request, token: str, pages: PagesDep, runtime: RuntimeDep, deps: CommandDeps) -> Response:
    grant = read_token(request, pages, token, runtime, deps.clock())
    await pages.form(request, pages.link_csrf(token))
    try:
        await handle(RecordPersonContacted(grant.referral_id, grant.answer, "email"), deps)
    except NotFound:
        raise pages.error(request, 404, "invalid", template="contact_personne_erreur.html") from None
    return pages.redirect(f"/contact/{token}")
