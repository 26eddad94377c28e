"""What is wrong with a command's settings, said per RELAIS_* variable, before anything starts.

Every command of `relais` loads its settings here; a problem it can name ends the command with one line per problem
(`BadSettings`, printed by relais.cli.main) instead of a traceback from deep inside a service.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

from shared.settings import ServiceName, Settings

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class BadSettings(Exception):
    """Settings a command cannot run with: one line per problem, each starting with its RELAIS_* variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# Never quoted back: a refused value may still be most of a real secret.
SECRET_FIELDS = frozenset(
    {"secret_key", "personal_data_keys", "internal_token", "redis_password", "twilio_auth_token", "brevo_api_key"}
)
_PATTERN_HINTS = {"namespace": "may hold only letters, digits, '_', '.' and '-' (it prefixes Redis keys)"}
DATABASE_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


def load_settings(
    *,
    redis: bool = False,
    databases: tuple[ServiceName, ...] = (),
    notifications: bool = False,
    production: bool = False,
) -> Settings:
    """The settings from the environment, and the URLs this command will use checked before anything starts:
    Redis (`redis`), the named services' databases, the SMTP server and SMS provider (`notifications`), and with
    `production` what production refuses unless RELAIS_DEMO=true (public secrets, demo tokens). Raises
    BadSettings listing every problem."""
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        raise BadSettings([_explain(error) for error in exc.errors()]) from None
    problems = []
    if redis and settings.redis_url:
        import redis as redis_client

        try:
            redis_client.ConnectionPool.from_url(settings.redis_url)
        except ValueError as exc:
            problems.append(
                f"RELAIS_REDIS_URL: {exc}, e.g. redis://HOST:6379/0 (got {hide_password(settings.redis_url)!r})"
            )
    if redis:
        from shared.redis_clients import redis_settings_problems

        problems += redis_settings_problems(settings)
    for service in databases:
        url = getattr(settings, f"{service}_database_url")
        if url and (problem := _database_url_problem(url)):
            problems.append(f"RELAIS_{service.upper()}_DATABASE_URL: {problem} (got {hide_password(url)!r})")
    if notifications:
        from services.notifications.app import check_settings

        problems += check_settings(settings)
    if production and not settings.demo:
        problems += settings.production_problems()
    if problems:
        raise BadSettings(problems)
    return settings


def _explain(error: ErrorDetails) -> str:
    """One pydantic error on a Settings field as `RELAIS_FIELD: what it must be (got 'value')`."""
    field = str(error["loc"][0]) if error.get("loc") else "?"
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind.startswith("int_"):
        what = "must be a whole number"
    elif kind.startswith("float_"):
        what = "must be a number"
    elif kind.startswith("bool_"):
        what = "must be true or false"
    elif kind == "literal_error":
        what = f"must be one of {ctx.get('expected')}"
    elif kind == "string_pattern_mismatch":
        what = _PATTERN_HINTS.get(field, f"must match {ctx.get('pattern')}")
    elif kind in ("greater_than_equal", "greater_than"):
        what = f"must be at least {ctx.get('ge', ctx.get('gt'))}"
    elif kind in ("less_than_equal", "less_than"):
        what = f"must be at most {ctx.get('le', ctx.get('lt'))}"
    elif kind == "value_error":  # a validator's own words (shared.settings.parse_personal_data_keys)
        what = str(ctx.get("error", error.get("msg", "is not valid")))
    else:
        msg = str(error.get("msg", "is not valid"))
        what = msg[:1].lower() + msg[1:]
    got = error.get("input")
    shown = isinstance(got, str) and field not in SECRET_FIELDS
    return f"RELAIS_{field.upper()}: {what}" + (f" (got {got!r})" if shown else "")


def _database_url_problem(url: str) -> str | None:
    """Why SQLAlchemy could not use this URL (parsed, its dialect found, its driver importable), or None."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return f"is not a database URL; use {DATABASE_URL_FORMS}"
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        return f"unknown kind of database {parsed.drivername!r}; use {DATABASE_URL_FORMS}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return f"the driver for {parsed.drivername!r} is not installed ({exc.name or exc}); use {DATABASE_URL_FORMS}"
    return None


def hide_password(url: str) -> str:
    """A URL as it may be printed: the password in its user part replaced by ***."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def print_directory_errors(path: object, errors: list[str], then: str) -> None:
    """A refused directory file on stderr: what to do (`then`), and its errors with their paths."""
    print(f"{path}: the directory file is invalid; {then}:", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)
