"""The register of confidentiality incidents as a spreadsheet: one row per incident, a column per field with French
headers naming the register (Québec's, the CNIL's) each answers; `;`-separated, UTF-8 with a BOM (as French
spreadsheets open it), and cells that a spreadsheet would run as a formula made text."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi.responses import Response

from services.referral.store import PrivacyIncident
from services.referral.views import privacy_incidents
from shared.db import Database
from shared.pages import csv_download, environment

# the template's variables are the module's attributes, unknown to mypy
LABELS: Any = environment(Path(__file__).with_name("templates")).get_template("_incident_labels.html").module
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula (OWASP)


def cell(value: object, timezone: str) -> str:
    """A value as the spreadsheet shows it; a text that would start a formula gets a leading '."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return LABELS.YES_NO[value]
    if isinstance(value, datetime):
        return value.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def row(incident: PrivacyIncident) -> list[object]:
    """The incident's values in the order of LABELS.CSV_HEADERS."""
    return [
        incident.id,
        incident.recorded_at,
        incident.recorded_by,
        incident.updated_at,
        LABELS.NATURE.get(incident.nature, incident.nature),
        incident.information_description,
        incident.circumstances,
        incident.occurred_from,
        incident.occurred_until,
        incident.known_at,
        incident.people_count,
        incident.people_count_is_estimate,
        incident.people_categories,
        incident.records_count,
        incident.consequences,
        incident.risk_assessment,
        incident.serious_risk,
        incident.authority,
        incident.authority_notified_at,
        incident.people_notified_at,
        incident.people_notice_description,
        incident.notification_note,
        incident.measures,
        LABELS.STATUS.get(incident.status, incident.status),
    ]


def register_csv(incidents: Sequence[PrivacyIncident], timezone: str, filename: str) -> Response:
    """The CSV download of `incidents`; times in `timezone` (the directory's)."""
    rows = ([cell(value, timezone) for value in row(incident)] for incident in incidents)
    return csv_download(LABELS.CSV_HEADERS, rows, filename)


def export(db: Database, timezone: str, now: datetime) -> Response:
    """The whole register, as the API and the page download it."""
    with db.read() as session:
        incidents = privacy_incidents(session)
    return register_csv(incidents, timezone, f"relais-registre-incidents-{now:%Y-%m-%d}.csv")
