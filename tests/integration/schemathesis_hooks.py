"""What Schemathesis must be taught about Relais' documents (loaded by `st run` through SCHEMATHESIS_HOOKS).

- `phone`: the documents' string format for a phone number (E.164, or a French or Canadian national number); not a
  JSON Schema format, so the fuzzer is given numbers of those forms.
- A partner's pause must end in the future (`until`): the server's clock, which no schema can state; a drawn date
  in the past is moved to a month from now.
- A confidentiality incident's dates are in the past and in order (the incident, then when it was known, then the
  notifications), a notified authority is named, and a serious risk is notified or explained: drawn dates and times
  that the schema accepts are replaced by such a set, a serious risk becomes none, a notified authority gets a name.
- The routing preview's `library_id` must be the calling desk's own library, as a body's.
- A body's `library_id` must be the calling desk's own library and `same_person_as` a need recorded there: state
  that no schema can hold (the document lists every library of the directory). Values the schema accepts are
  replaced by the caller's (RELAIS_ST_LIBRARY) or dropped; values it refuses are left as drawn, so negative tests
  still send them.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

import schemathesis
from hypothesis import strategies as st

# Metropolitan mobiles (06 39 is Mayotte's, 06 9x the overseas departments': another region, refused) and Montréal.
_FRENCH = st.builds("+33 6 {} {:02d} {:02d} {:02d}".format, st.integers(10, 38), *[st.integers(0, 99)] * 3)
_CANADIAN = st.builds("+1 514 {:03d} {:04d}".format, st.integers(200, 999), st.integers(0, 9999))

schemathesis.openapi.format("phone", st.one_of(_FRENCH, _CANADIAN))


@schemathesis.hook
def map_case(context, case):  # noqa: ANN001 - every phase applies it (map_body is not applied to coverage cases)
    library = os.environ.get("RELAIS_ST_LIBRARY")
    query = case.query
    if context.operation.path == "/api/v1/routing/preview" and library and isinstance(query, dict):
        if isinstance(query.get("library_id"), str) and re.fullmatch(r"[a-z-]+", query["library_id"]):
            case.query = {**query, "library_id": library}  # a desk asks about its own library
    body = case.body
    if not isinstance(body, dict):
        return case
    library = os.environ.get("RELAIS_ST_LIBRARY")
    if library and isinstance(body.get("library_id"), str) and re.fullmatch(r"[a-z-]+", body["library_id"]):
        body = {**body, "library_id": library}
    if isinstance(body.get("same_person_as"), str) and re.fullmatch(r"[0-9a-f]{32}", body["same_person_as"]):
        body = {k: v for k, v in body.items() if k != "same_person_as"}
    if re.fullmatch(r"/api/v1/partners/\{partner_id\}/pause", context.operation.path) and "until" in body:
        body = {**body, "until": _in_the_future(body["until"])}
    if context.operation.path.startswith("/api/v1/privacy-incidents"):
        body = _plausible_incident(body)
    case.body = body
    return case


# One consistent past, whatever the test clock says: the incident, known two days later, notified the day after.
_INCIDENT_PAST = {
    "occurred_from": "2024-01-01",
    "occurred_until": "2024-01-02",
    "known_at": "2024-01-03",
    "authority_notified_at": "2024-01-04T10:00:00+00:00",
    "people_notified_at": "2024-01-04T11:00:00+00:00",
}


def _plausible_incident(body: dict) -> dict:
    body = dict(body)
    for name, past in _INCIDENT_PAST.items():
        value = body.get(name)
        if isinstance(value, str) and _parses(value, with_time="T" in past):
            body[name] = past
    if body.get("serious_risk") is True:
        body["serious_risk"] = False
    notified = isinstance(body.get("authority_notified_at"), str)
    if ("authority" in body or notified) and not (isinstance(body.get("authority"), str) and body["authority"].strip()):
        if body.get("authority") is None or isinstance(body.get("authority"), str):
            body["authority"] = "CNIL"
    return body


def _parses(value: str, with_time: bool) -> bool:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return parsed.tzinfo is not None if with_time else re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None


def _in_the_future(value):  # noqa: ANN001
    try:
        until = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return value  # not a date-time: a negative case, sent as drawn
    if until.tzinfo is None or until > datetime.now(UTC):
        return value
    return (datetime.now(UTC) + timedelta(days=30)).isoformat()
