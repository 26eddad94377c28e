"""A library's monthly figures (people helped, needs recorded, by category, share answered in time), as JSON for
the API and the ops dashboard and as CSV for spreadsheets. The CSV's French headers live in templates/_labels.html."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from services.intake import domain
from services.intake.store import counted_needs
from shared.db import Database
from shared.directory import Directory, Library
from shared.pages import csv_download, environment

# the template's variables are the module's attributes, unknown to mypy
LABELS: Any = environment(Path(__file__).with_name("templates")).get_template("_labels.html").module


class CategoryFigures(BaseModel):
    category: str
    people: int
    needs: int
    answered_in_time: int
    due: int  # deadline passed, or answered: what share_in_time is computed on
    still_running: int
    share_in_time: float | None


class LibraryReport(BaseModel):
    library_id: str
    month: str  # YYYY-MM, in the library's time zone
    people: int  # one person may bring several needs
    needs: int
    answered_in_time: int
    due: int
    still_running: int
    share_in_time: float | None
    by_category: list[CategoryFigures]


class Reports(BaseModel):
    month: str
    items: list[LibraryReport]


def _fields(f: domain.Figures) -> dict:
    return dict(
        people=f.people,
        needs=f.needs,
        answered_in_time=f.answered_in_time,
        due=f.due,
        still_running=f.still_running,
        share_in_time=f.share_in_time,
    )


def library_report(db: Database, library: Library, month: date, now: datetime) -> LibraryReport:
    """A library's figures for a month (needs cancelled as errors left out), categories with most needs first."""
    assert library.timezone is not None  # Directory fills it in at load time
    start, end = domain.month_bounds(month, library.timezone)
    with db.read() as session:
        counted = counted_needs(session, library.id, start, end)
    total, by_category = domain.monthly_figures(counted, now)
    return LibraryReport(
        library_id=library.id,
        month=month.strftime("%Y-%m"),
        **_fields(total),
        by_category=[
            CategoryFigures(category=c, **_fields(f))
            for c, f in sorted(by_category.items(), key=lambda x: (-x[1].needs, x[0]))
        ],
    )


def csv_response(reports: Sequence[LibraryReport], directory: Directory, filename: str) -> Response:
    """One row per library for all categories, then one per category; `;`-separated with a BOM, as French
    spreadsheets open it."""

    def row(report: LibraryReport, label: str, f: LibraryReport | CategoryFigures) -> list:
        library = directory.library(report.library_id)
        share = "" if f.share_in_time is None else f"{100 * f.share_in_time:.0f}"
        return [
            report.month,
            library.name if library else report.library_id,
            label,
            f.people,
            f.needs,
            f.answered_in_time,
            f.due,
            share,
            f.still_running,
        ]

    def rows() -> Iterator[list]:
        for report in reports:
            yield row(report, LABELS.ALL_CATEGORIES, report)
            for f in report.by_category:
                category = directory.category(f.category)
                yield row(report, category.label if category else f.category, f)

    return csv_download(LABELS.CSV_HEADERS, rows(), filename)
