"""Messages from templates: an email (subject, text and HTML parts) or an SMS text per kind, in French, or in
English for a person whose language is `en` (templates under `templates/en/`, looked up first)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from services.notifications import domain
from shared.directory import national_phone
from shared.pages import datetime_fr, deadline_fr

TEMPLATES = Path(__file__).with_name("templates")


def when_en(at: datetime, timezone: str) -> str:
    """'Monday 23 November, 14:05' in the given time zone (English names from the C locale)."""
    local = at.astimezone(ZoneInfo(timezone))
    return f"{local:%A} {local.day} {local:%B}, {local:%H:%M}"


_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    keep_trailing_newline=False,
)
_env.filters.update(deadline_fr=deadline_fr, datetime_fr=datetime_fr, when_en=when_en, phone_national=national_phone)
# What a caller does not pass: messages queued before the directory named the deployment, or the library's country.
_env.globals.update(deployment="Relais", country=None)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None


def _template(name: str, language: str):
    return _env.select_template([f"en/{name}", name] if language == "en" else [name])


def render_email(template: str, language: str = "fr", **context) -> Rendered:
    return Rendered(
        subject=" ".join(_template(f"{template}.subject.txt", language).render(**context).split()),
        text=_template(f"{template}.txt", language).render(**context),
        html=_template(f"{template}.html", language).render(**context),
    )


def render_sms(template: str, language: str = "fr", *, transliterate: bool = True, **context) -> Rendered:
    """One SMS text, on one line; French characters outside GSM-7 become plain ones unless told otherwise."""
    text = " ".join(_template(f"{template}.sms.txt", language).render(**context).split())
    return Rendered(subject="", text=domain.to_gsm7(text) if transliterate else text, html=None)


def render(template: str, channel: str, language: str = "fr", *, transliterate: bool = True, **context) -> Rendered:
    if channel == "sms":
        return render_sms(template, language, transliterate=transliterate, **context)
    return render_email(template, language, **context)
