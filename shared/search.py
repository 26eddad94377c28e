"""Search within a list (`q=` on the list APIs, the search boxes of the pages), the same in the three services and on
SQLite and PostgreSQL: each searchable row keeps a `search_text` column, the folded words of what may be searched
(reference, name, phone, summary...) written with the row; a query is folded the same way and every one of its terms
must be a substring of it (SQL `LIKE`, escaped). Folding (lower case, no accents, one space) is done in Python, so
the two databases behave alike without collations or extensions.

A query that is a phone number in any written form (06 12 34 56 78, +33 6 12..., 819-555-0101) becomes one term,
the number in E.164, which `search_text` holds for each phone."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import Any

import phonenumbers
import sqlalchemy as sa

from shared.directory import PHONE_REGIONS, normalize_phone

MAX_QUERY = 200  # characters of `q`
Q_DESCRIPTION = (
    "Search within what the caller may see: every word must match, case and accents aside (a reference such as "
    "CHA-2611-0042, a name, words of the summary, an email); a phone number matches in any written form."
)


def fold(text: str) -> str:
    """Case- and accent-insensitive form: 'Élodie  DURAND' -> 'elodie durand'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


def _phone_forms(phone: str) -> list[str]:
    """E.164 and the national digits of a stored phone, so a partial number typed without spaces matches too."""
    try:
        number = phonenumbers.parse(phone, PHONE_REGIONS[0])
    except phonenumbers.NumberParseException:
        return [phone]
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    return [phone, "".join(c for c in national if c.isdigit())]


def search_text(*, words: Iterable[str | None] = (), phones: Iterable[str | None] = ()) -> str:
    """The `search_text` of a row: the folded words (reference, name, summary, email...) and each phone's forms."""
    parts = [fold(w) for w in words if w]
    for phone in phones:
        if phone:
            parts += _phone_forms(phone)
    return " ".join(p for p in parts if p)


def query_terms(q: str | None) -> list[str]:
    """The terms a query asks for (every one must match); [] for a blank query."""
    if not q or not q.strip():
        return []
    text = q.strip()
    if sum(c.isdigit() for c in text) >= 8 and not any(c.isalpha() for c in text):  # 06 12 34 56 78, +1 819...
        try:
            return [normalize_phone(text)]
        except ValueError:
            digits = "".join(c for c in text if c.isdigit() or c == "+")
            return [digits]
    return fold(text).split()


def matches(column: Any, q: str | None) -> list[sa.ColumnElement[bool]]:
    """WHERE clauses: `column` (a search_text) holds every term of `q`."""
    return [column.contains(term, autoescape=True) for term in query_terms(q)]
