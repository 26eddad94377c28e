"""The two pages every service with web pages serves to anyone, without signing in, linked from every page's footer
(shared/templates/base.html): `/donnees-personnelles` (what Relais keeps about a person, why, how long, from the
directory's `retention`, `consent` and `privacy_contact`; how to ask for export or erasure) and `/accessibilite`
(the accessibility statement). Wording in the templates; what they show comes from the directory."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response

from shared.deps import DirectoryDep, PagesDep
from shared.directory import JURISDICTIONS, Directory

PRIVACY_PATH = "/donnees-personnelles"
ACCESSIBILITY_PATH = "/accessibilite"
router = APIRouter()


def days(period: timedelta | None) -> int | None:
    return None if period is None else round(period / timedelta(days=1))


def retention_table(directory: Directory) -> list[dict]:
    """One row per jurisdiction that has desks (or the block's own values when none is known): days per period."""
    known = directory.libraries_by_jurisdiction()
    rows = []
    jurisdictions: list[str | None] = [j for j in JURISDICTIONS if j in known]
    for jurisdiction in jurisdictions or [None]:
        periods = directory.retention.periods(jurisdiction)
        rows.append(
            {
                "jurisdiction": jurisdiction,
                "libraries": [lib.name for lib in directory.libraries if lib.jurisdiction == jurisdiction],
                "closed_needs": days(periods.closed_needs),
                "open_needs": days(periods.open_needs),
                "message_bodies": days(periods.message_bodies),
                "access_log": days(periods.access_log),
            }
        )
    return rows


@router.get(PRIVACY_PATH)
def privacy(request: Request, pages: PagesDep, directory: DirectoryDep) -> Response:
    fallback = pages.settings.technical_retention
    return pages.render(
        request,
        "donnees_personnelles.html",
        retention=retention_table(directory),
        technical_days=days(directory.retention.technical_rows or fallback),
        contact=directory.privacy_contact_or_default,
        consent_texts=[directory.consent_text(language) for language in ("fr", "en")],
    )


@router.get(ACCESSIBILITY_PATH)
def accessibility(request: Request, pages: PagesDep, directory: DirectoryDep) -> Response:
    return pages.render(request, "accessibilite.html", contact=directory.privacy_contact_or_default)
