"""The directory file: who is who (desks, partners, contacts, categories, deadlines, API tokens).

The file is YAML, written by ops (see "The directory file" in the design contract). This module
turns it into frozen pydantic models and refuses a file that would misroute or lose a need:
every problem is reported at once, each as ``"<path in file>: <message>"``, for example
``partners[3].contacts[0].email: not an email address: 'jean@' (...)``.

Loading happens in two passes over the same data:
1. pydantic checks the shape and the values (types, emails, phones, time zones, durations);
2. cross-checks on the raw mapping (ids, references, primary contacts, deadlines in order).
The second pass reads the raw data, not the models, so it still runs when the first pass failed
and the ops person gets the whole list of fixes in one go.

A partner's ``sla`` in the file is a partial override of the default policy. After loading,
``partner.sla`` is the full merged ``SlaPolicy``. When an override changes ``respond_within``
but not the reminders or escalation, the inherited ones keep their place relative to the
window (default PT24H of PT72H becomes PT16H of PT48H), so a shorter contractual window never
inherits reminders that would fall after its own deadline.

Also here, because intake and referral both need them: ``normalize_postal_code``,
``normalize_phone``, ``normalize_email`` and ``parse_duration``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterator, Mapping
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

DEMO_DIRECTORY = Path(__file__).with_name("demo_directory.yaml")

# Tried in this order for numbers written without a country code.
PHONE_REGIONS = ("FR", "CA")


class DirectoryError(Exception):
    """The directory file cannot be used; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        plural = "s" if len(self.errors) != 1 else ""
        super().__init__(f"{len(self.errors)} error{plural} in the directory file:\n  " + "\n  ".join(self.errors))


# --- Values shared with the rest of the project -----------------------------------------------


def normalize_postal_code(code: str) -> str:
    """'H2X 1y4' -> 'H2X1Y4'; '76 000' -> '76000'. Territory prefixes get the same treatment."""
    return "".join(code.split()).upper()


# A French code is 5 digits; a Canadian one alternates letter and digit (A1A1A1).
_FRENCH_PREFIX = re.compile(r"\d{0,5}")
_CANADIAN_PREFIX = re.compile(r"[A-Z](\d([A-Z](\d([A-Z]\d?)?)?)?)?")


def is_postal_prefix(prefix: str) -> bool:
    """True for a prefix (possibly whole, possibly empty) of a French or Canadian postal code."""
    return bool(_FRENCH_PREFIX.fullmatch(prefix) or _CANADIAN_PREFIX.fullmatch(prefix))


def normalize_phone(text: str) -> str:
    """A phone number in E.164 ('+33235000000'); French and Canadian national forms accepted.

    Raises ValueError with a message fit for the person who typed it.
    """
    for region in PHONE_REGIONS:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    raise ValueError(f"not a phone number: {text!r} (write e.g. 02 35 12 34 56, 819 555 0123 or +33235123456)")


def national_phone(e164: str | None, country: str | None = None) -> str:
    """A stored number as people of `country` (FR or CA: the library's) write it: 06 12 34 56 78, 819 555-0101;
    a number of another country in international form (+1 819-555-0101); without `country`, as its own country
    writes it. "" for None; the text as it is when it is not a number."""
    if not e164:
        return ""
    try:
        number = phonenumbers.parse(e164, country or PHONE_REGIONS[0])
    except phonenumbers.NumberParseException:
        return e164
    region = phonenumbers.region_code_for_number(number)
    if country and region != country:
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    if number.country_code == 1:  # (819) 555-0101 -> 819 555-0101, as Québec's public services write it
        text = re.sub(r"^\((\d{3})\) ", r"\1 ", text)
    return text


def normalize_email(text: str) -> str:
    """The normalized address; raises ValueError with email-validator's reason.

    Syntax only, no DNS. `test_environment` lets addresses under the reserved `.test` domain through (RFC 2606):
    test and demo directories use them, and refusing them would say nothing about a real address."""
    try:
        return validate_email(text, check_deliverability=False, test_environment=True).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"not an email address: {text!r} ({exc})") from None


_NUMBER = r"\d+(?:[.,]\d+)?"
_ISO_DURATION = re.compile(
    rf"P(?:(?P<weeks>{_NUMBER})W)?(?:(?P<days>{_NUMBER})D)?"
    rf"(?:T(?:(?P<hours>{_NUMBER})H)?(?:(?P<minutes>{_NUMBER})M)?(?:(?P<seconds>{_NUMBER})S)?)?"
)
_DURATION_HINT = "write e.g. PT72H for 72 hours, P3D for 3 days, PT30M for 30 minutes"


def parse_duration(text: str) -> timedelta:
    """A positive ISO 8601 duration ('PT72H', 'P3D', 'PT1.5S') as a timedelta.

    Years and months are refused: their length varies, and deadlines must not.
    """
    code = text.strip().upper()
    match = _ISO_DURATION.fullmatch(code)
    if not match or code in ("P", "PT") or code.endswith("T"):
        date_part = code.partition("T")[0]
        if code.startswith("P") and ("Y" in date_part or "M" in date_part):
            raise ValueError(f"{text!r}: years and months have no fixed length; use days instead (e.g. P30D)")
        raise ValueError(f"not an ISO 8601 duration: {text!r} ({_DURATION_HINT})")
    parts = {k: float(v.replace(",", ".")) for k, v in match.groupdict().items() if v}
    duration = timedelta(**parts)
    if duration <= timedelta(0):
        raise ValueError(f"{text!r} must be longer than zero")
    return duration


# --- Field types ------------------------------------------------------------------------------
# Validators raise PydanticCustomError so the message reaches ops without pydantic's wording.


def _custom(kind: str):
    def wrap(check):
        def validator(value):
            try:
                return check(value)
            except ValueError as exc:
                raise PydanticCustomError(kind, "{reason}", {"reason": str(exc)}) from None

        return validator

    return wrap


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # 64 at most: the services' id columns


@_custom("id")
def _check_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid id (letters, digits, '.', '_' and '-' only, 64 at most)")
    return value


@_custom("timezone")
def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r} (use an IANA name such as Europe/Paris or America/Toronto)"
        ) from None
    return value


@_custom("postal_prefix")
def _check_prefix(value: str) -> str:
    prefix = normalize_postal_code(value)
    if not is_postal_prefix(prefix):
        raise ValueError(
            f"{value!r} is not a postal-code prefix (French e.g. 76 or 76000, Canadian e.g. "
            'H2X or H2X 1Y4, "" for everywhere)'
        )
    return prefix


@_custom("duration")
def _check_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 duration, not {value!r} ({_DURATION_HINT})")
    return parse_duration(value)


@_custom("token_sha256")
def _check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError("must be the SHA-256 of the token: 64 hexadecimal characters")
    return value.lower()


Id = Annotated[str, AfterValidator(_check_id)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]
PostalPrefix = Annotated[str, AfterValidator(_check_prefix)]
Duration = Annotated[timedelta, BeforeValidator(_check_duration)]
Email = Annotated[str, AfterValidator(_custom("email")(normalize_email))]
Phone = Annotated[str, AfterValidator(_custom("phone")(normalize_phone))]
TokenHash = Annotated[str, AfterValidator(_check_sha256)]


class _Frozen(BaseModel):
    # extra="forbid": a misspelt key (capcity) must be an error, not a silent default.
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- Models -----------------------------------------------------------------------------------


class SlaPolicy(_Frozen):
    """How long a partner has to answer, and when the software nudges before that."""

    respond_within: Duration
    remind_after: list[Duration] = []
    escalate_after: Duration | None = None


class SlaOverride(_Frozen):
    """A partner's partial SLA in the file; what it leaves out comes from the default."""

    respond_within: Duration | None = None
    remind_after: list[Duration] | None = None
    escalate_after: Duration | None = None


class Category(_Frozen):
    id: Id
    label: Text


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ClockTime = Annotated[time, BeforeValidator(lambda v: time.fromisoformat(v) if isinstance(v, str) else v)]


class BusinessHours(_Frozen):
    """When a `clock: business_hours` partner's window runs: opening hours, minus its public holidays."""

    timezone: TimeZoneName = "Europe/Paris"
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default=["mon", "tue", "wed", "thu", "fri"], min_length=1
    )
    opens: ClockTime = time(9, 0)
    closes: ClockTime = time(17, 0)
    holidays: Literal["FR", "CA-QC"] | None = "FR"  # France's, or Québec's, public holidays

    @model_validator(mode="after")
    def _opens_before_closing(self) -> BusinessHours:
        if self.opens >= self.closes:
            raise ValueError(f"opens ({self.opens:%H:%M}) must be before closes ({self.closes:%H:%M})")
        return self


class Person(_Frozen):
    name: Text
    email: Email
    phone: Phone | None = None


class EscalationContact(Person):
    """A coordinator told of escalations, breaches and unroutable needs."""


Jurisdiction = Literal["FR", "CA-QC"]  # France (RGPD, CNIL), Québec (Law 25)
JURISDICTIONS: tuple[Jurisdiction, ...] = ("FR", "CA-QC")


class Library(_Frozen):
    """A desk that records needs: library, France Services, bus."""

    id: Id
    name: Text
    timezone: TimeZoneName | None = None  # absent: the directory's; Directory fills it in at load time
    # Whose data-protection law applies to what the desk records; absent: Directory infers it (see jurisdiction_of).
    jurisdiction: Jurisdiction | None = None
    language: Literal["fr", "en"] = "fr"  # of the consent text the desk shows
    territory: list[PostalPrefix] = []  # the first prefix stands for a need recorded without a postal code
    contacts: list[Person] = []
    # Starts the references of its needs (CHA-2611-0042); absent: derived from the id (`reference_code`).
    code: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{2,6}$")] | None = None
    phone: Phone | None = None  # the desk's number, printed on the person's receipt
    hours: Text | None = None  # opening hours as people read them ("mar.-sam. 10 h-18 h"), on the receipt

    @property
    def zoneinfo(self) -> ZoneInfo:
        assert self.timezone is not None  # Directory fills it in at load time
        return ZoneInfo(self.timezone)

    @property
    def country(self) -> str:
        """FR or CA: how its phone numbers are written (shared.directory.national_phone)."""
        return "CA" if (self.jurisdiction or jurisdiction_of(self)) == "CA-QC" else "FR"

    @property
    def reference_code(self) -> str:
        return self.code or default_reference_code(self.id)


def default_reference_code(library_id: str) -> str:
    """Three letters of the library id's last word of three or more ('rouen-chatelet' -> 'CHA'), for references."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", library_id) if w]
    word = next((w for w in reversed(words) if len(w) >= 3), "".join(words) or "LIB")
    return word[:3].upper()


class Contact(_Frozen):
    """A named person or shared mailbox at a partner."""

    id: Id
    name: Text
    email: Email
    phone: Phone | None = None
    role: Literal["primary", "backup"]
    digest_at: ClockTime | None = None  # one email a day at this hour listing new handoffs, instead of one each


class _PartnerBase(_Frozen):
    id: Id
    name: Text
    categories: list[Id] = Field(min_length=1)
    territory: list[PostalPrefix] = Field(min_length=1)
    capacity: Annotated[StrictInt, Field(ge=1)] | None = None
    clock: Literal["continuous", "business_hours"] = "continuous"
    business_hours: BusinessHours = BusinessHours()  # used when clock is business_hours
    contacts: list[Contact]
    # How long after the partner's first answer (accept or respond) the person is asked whether they were contacted.
    contact_question_after: Duration = timedelta(days=3)


class Partner(_PartnerBase):
    """An organisation that takes handoffs; ``sla`` is the full policy that applies to it."""

    sla: SlaPolicy


class _PartnerEntry(_PartnerBase):
    sla: SlaOverride | None = None


class User(_Frozen):
    """Someone who may sign in: by a link sent to ``email``, or with an API token."""

    id: Id
    role: Literal["front_desk", "partner", "ops"]
    library: Id | None = None
    partner: Id | None = None
    email: Email | None = None
    token_sha256: TokenHash | None = None


DEFAULT_TIMEZONE = "Europe/Paris"


# --- Retention, consent, privacy contact ----------------------------------------------------------

# What a directory without `retention` gets: DORA's 730 days after a need ends, RDV-Solidarités' six months for
# message receipts, CNIL's 6 to 12 months for logs, a week of technical rows (docs/privacy.md).
DEFAULT_RETENTION = {
    "closed_needs": "P730D",
    "open_needs": "P730D",
    "message_bodies": "P180D",
    "access_log": "P365D",
}


class RetentionPeriods(_Frozen):
    """How long each kind of personal data is kept (docs/privacy.md, "Retention and purge")."""

    closed_needs: Duration  # a closed or cancelled need: identity and free text anonymised this long after it ended
    open_needs: Duration  # a need never closed (never answered, or answered and left): after its last event
    message_bodies: Duration  # rendered email and SMS texts, and the person's address on them: after creation
    access_log: Duration  # who read a person's details: after the reading
    technical_rows: Duration | None = None  # published outbox rows, processed events; None: RELAIS_TECHNICAL_RETENTION


class RetentionOverride(_Frozen):
    """A jurisdiction's values; what it leaves out comes from the retention block's own."""

    closed_needs: Duration | None = None
    open_needs: Duration | None = None
    message_bodies: Duration | None = None
    access_log: Duration | None = None


class Retention(RetentionPeriods):
    closed_needs: Duration = Field(default_factory=lambda: parse_duration(DEFAULT_RETENTION["closed_needs"]))
    open_needs: Duration = Field(default_factory=lambda: parse_duration(DEFAULT_RETENTION["open_needs"]))
    message_bodies: Duration = Field(default_factory=lambda: parse_duration(DEFAULT_RETENTION["message_bodies"]))
    access_log: Duration = Field(default_factory=lambda: parse_duration(DEFAULT_RETENTION["access_log"]))
    purge_at: ClockTime = time(3, 30)  # each service purges once a day at this time of the directory's zone
    jurisdictions: dict[Jurisdiction, RetentionOverride] = {}

    def periods(self, jurisdiction: str | None = None) -> RetentionPeriods:
        """The periods that apply to data recorded under `jurisdiction` (None: the block's own values)."""
        override = self.jurisdictions.get(jurisdiction) if jurisdiction else None  # type: ignore[call-overload]
        given = {k: v for k, v in (override.model_dump() if override else {}).items() if v is not None}
        base = {name: getattr(self, name) for name in RetentionPeriods.model_fields}
        return RetentionPeriods(**{**base, **given})


class ConsentText(_Frozen):
    """The words the desk shows before recording a need, one entry per version and language."""

    version: Id
    language: Literal["fr", "en"] = "fr"
    handoff: Text  # the need and the person's contact go to a partner: required to record a need
    messages: Text  # the person is told by email or SMS on their channel: optional, withdrawable


DEFAULT_CONSENT = [
    {
        "version": "relais-fr-1",
        "language": "fr",
        "handoff": (
            "J'accepte que ma demande et mes coordonnées soient transmises au partenaire qui peut y répondre, "
            "pour qu'il me contacte. Elles sont conservées le temps du traitement, puis anonymisées."
        ),
        "messages": (
            "J'accepte de recevoir par courriel ou SMS des nouvelles de ma demande (qui me contactera et quand). "
            "Je peux retirer cet accord à tout moment à l'accueil."
        ),
    },
    {
        "version": "relais-en-1",
        "language": "en",
        "handoff": (
            "I agree that my request and my contact details are passed on to the partner who can answer it, so "
            "that they contact me. They are kept while it is handled, then anonymised."
        ),
        "messages": (
            "I agree to receive news of my request by email or text message (who will contact me and when). "
            "I may withdraw this at any time at the desk."
        ),
    },
]


def default_consent() -> list[ConsentText]:
    return [ConsentText.model_validate(text) for text in DEFAULT_CONSENT]


class PrivacyContact(_Frozen):
    """Whom a person writes to about their data (export, erasure, questions): a data-protection officer in France,
    the person in charge of the protection of personal information in Québec."""

    name: Text
    email: Email
    phone: Phone | None = None
    address: Text | None = None  # postal address, for requests by letter


class Deployment(_Frozen):
    """How the pages and emails present this deployment (docs/deployment.md, "Look: the deployment block")."""

    name: Text = "Relais"  # in every page's header and title, and in every email
    # dsfr: the French State's design system (France Services); neutral: Relais's own look (Québec libraries...)
    theme: Literal["dsfr", "neutral"] = "neutral"
    # The République française block (Marianne) is shown only for a State service; it needs theme dsfr.
    state_service: StrictBool = False

    @model_validator(mode="after")
    def _state_block_needs_dsfr(self) -> Deployment:
        if self.state_service and self.theme != "dsfr":
            raise ValueError(
                "state_service: true shows the République française block, which only the dsfr theme has: "
                "add theme: dsfr, or set state_service: false"
            )
        return self


# The France Services window, when the file gives no `sla`, as the file would write it.
DEFAULT_SLA = {"respond_within": "PT72H", "remind_after": ["PT24H", "PT48H"], "escalate_after": "PT60H"}


def default_sla() -> SlaPolicy:
    return SlaPolicy.model_validate(DEFAULT_SLA)


class _DirectoryBase(_Frozen):
    deployment: Deployment = Field(default_factory=Deployment)
    timezone: TimeZoneName = DEFAULT_TIMEZONE
    sla: SlaPolicy = Field(default_factory=default_sla)
    retention: Retention = Field(default_factory=Retention)
    consent: list[ConsentText] = Field(default_factory=default_consent, min_length=1)
    privacy_contact: PrivacyContact | None = None  # absent: the first escalation contact answers
    escalation_contacts: list[EscalationContact] = []
    categories: list[Category] = Field(min_length=1)
    libraries: list[Library]
    users: list[User]


class _DirectoryFile(_DirectoryBase):
    partners: list[_PartnerEntry]


class Directory(_DirectoryBase):
    """The loaded directory, with lookups by id. Build it with ``load_directory``."""

    partners: list[Partner]

    _categories: dict[str, Category] = PrivateAttr()
    _libraries: dict[str, Library] = PrivateAttr()
    _partners: dict[str, Partner] = PrivateAttr()
    _users: dict[str, User] = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._categories = {c.id: c for c in self.categories}
        self._libraries = {lib.id: lib for lib in self.libraries}
        self._partners = {p.id: p for p in self.partners}
        self._users = {u.id: u for u in self.users}

    @property
    def zoneinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def category(self, id: str) -> Category | None:
        return self._categories.get(id)

    def library(self, id: str) -> Library | None:
        return self._libraries.get(id)

    def partner(self, id: str) -> Partner | None:
        return self._partners.get(id)

    def consent_text(self, language: str, version: str | None = None) -> ConsentText | None:
        """The text of `version` in `language`; without a version, the current one (the last listed)."""
        texts = [t for t in self.consent if t.language == language] or [t for t in self.consent if t.language == "fr"]
        if version is None:
            return texts[-1] if texts else self.consent[-1]
        return next((t for t in texts if t.version == version), None)

    def libraries_by_jurisdiction(self) -> dict[str, list[str]]:
        """The ids of the desks under each jurisdiction (every one filled in at load time)."""
        found: dict[str, list[str]] = {}
        for lib in self.libraries:
            found.setdefault(lib.jurisdiction or "FR", []).append(lib.id)
        return found

    @property
    def privacy_contact_or_default(self) -> PrivacyContact | EscalationContact | None:
        return self.privacy_contact or (self.escalation_contacts[0] if self.escalation_contacts else None)

    def user(self, id: str) -> User | None:
        return self._users.get(id)

    def user_by_token(self, token: str) -> User | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        # No early exit: the time taken must not tell which user matched.
        for user in self.users:
            if user.token_sha256 is not None and hmac.compare_digest(user.token_sha256, digest):
                found = user
        return found

    def primary_contact(self, partner: Partner | str) -> Contact:
        contact = next(self._contacts(partner, "primary"), None)
        if contact is None:
            raise LookupError(f"partner {self._partner_id(partner)!r} has no primary contact")
        return contact

    def backup_contact(self, partner: Partner | str) -> Contact | None:
        return next(self._contacts(partner, "backup"), None)

    def _contacts(self, partner: Partner | str, role: str) -> Iterator[Contact]:
        found = self._partners.get(self._partner_id(partner))
        if found is None:
            raise LookupError(f"unknown partner {self._partner_id(partner)!r}")
        return (c for c in found.contacts if c.role == role)

    @staticmethod
    def _partner_id(partner: Partner | str) -> str:
        return partner if isinstance(partner, str) else partner.id


# --- Loading ----------------------------------------------------------------------------------


def load_directory(path: str | os.PathLike[str]) -> Directory:
    """Read and validate a directory file; raises DirectoryError listing every problem."""
    return parse_directory(_read_yaml(Path(path)))


def check_directory_file(path: str | os.PathLike[str]) -> list[str]:
    """Every problem in the file, as ``"<path in file>: <message>"``; empty when it is fine."""
    try:
        load_directory(path)
    except DirectoryError as exc:
        return exc.errors
    return []


def parse_directory(data: Any) -> Directory:
    """Validate already-parsed YAML data (a mapping) into a Directory; raises DirectoryError."""
    if data is None:
        raise DirectoryError(["(top level): the file is empty"])
    if not isinstance(data, Mapping):
        raise DirectoryError(
            [f"(top level): expected a mapping (timezone:, sla:, categories:, ...), got {type(data).__name__}"]
        )
    problems: list[tuple[tuple, str]] = []
    parsed = None
    try:
        parsed = _DirectoryFile.model_validate(data)
    except ValidationError as exc:
        problems += [(tuple(err["loc"]), _message(err)) for err in exc.errors()]
    problems += _cross_check(data)
    if problems or parsed is None:
        problems.sort(key=lambda problem: _sort_key(problem[0]))
        raise DirectoryError([f"{_format_loc(loc)}: {message}" for loc, message in problems])
    return _build(parsed)


def _build(parsed: _DirectoryFile) -> Directory:
    partners = [
        Partner(
            **{name: getattr(entry, name) for name in _PartnerBase.model_fields},
            sla=merge_sla(parsed.sla, entry.sla),
        )
        for entry in parsed.partners
    ]
    # A library without its own time zone shows deadlines in the directory's; its jurisdiction follows its place.
    libraries = []
    for lib in parsed.libraries:
        lib = lib if lib.timezone else lib.model_copy(update={"timezone": parsed.timezone})
        if lib.jurisdiction is None:
            lib = lib.model_copy(update={"jurisdiction": jurisdiction_of(lib)})
        libraries.append(lib)
    return Directory(
        **{name: getattr(parsed, name) for name in _DirectoryBase.model_fields if name != "libraries"},
        libraries=libraries,
        partners=partners,
    )


def jurisdiction_of(library: Library) -> Jurisdiction:
    """Québec for a desk whose territory has Canadian postal codes (or, without a territory, whose time zone is
    American), France otherwise: the two jurisdictions Relais serves (docs/privacy.md)."""
    if library.territory and library.territory[0][:1].isalpha():
        return "CA-QC"
    if not library.territory and (library.timezone or "").startswith("America/"):
        return "CA-QC"
    return "FR"


def merge_sla(default: SlaPolicy, override: SlaOverride | None) -> SlaPolicy:
    """The policy a partner works under: its override over the default (see module docstring)."""
    if override is None:
        return default
    given = override.model_fields_set
    window = override.respond_within or default.respond_within
    ratio = window / default.respond_within
    remind_after = (
        override.remind_after if override.remind_after is not None else [step * ratio for step in default.remind_after]
    )
    if "escalate_after" in given:
        escalate_after = override.escalate_after  # an explicit null turns escalation off
    else:
        escalate_after = default.escalate_after and default.escalate_after * ratio
    return SlaPolicy(respond_within=window, remind_after=remind_after, escalate_after=escalate_after)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in the same mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DirectoryError([f"{path}: file not found"]) from None
    except UnicodeDecodeError:
        raise DirectoryError([f"{path}: not UTF-8 text"]) from None
    except OSError as exc:
        raise DirectoryError([f"{path}: cannot read the file ({exc.strerror})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise DirectoryError([f"{where}: invalid YAML: {problem}"]) from None


# --- Error messages ---------------------------------------------------------------------------

_SECTIONS = (
    "deployment",
    "timezone",
    "sla",
    "retention",
    "consent",
    "privacy_contact",
    "escalation_contacts",
    "categories",
    "libraries",
    "partners",
    "users",
)


def _sort_key(loc: tuple) -> tuple:
    section = _SECTIONS.index(loc[0]) if loc and loc[0] in _SECTIONS else len(_SECTIONS)
    return (section, *((0, part, "") if isinstance(part, int) else (1, 0, part) for part in loc))


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing (required)"
    if kind == "extra_forbidden":
        return "unknown field (misspelt? remove it or fix the name)"
    if kind == "string_type":
        if isinstance(value, (int, float, bool)):
            return f"must be text; put {value!r} in quotes"
        return "must be text"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, not {value!r}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, not {value!r}"
    if kind == "list_type":
        return "must be a list, e.g. [a, b]"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping (key: value)"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}, not {value!r}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return "must list at least one entry"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "value_error":
        return str(ctx.get("error"))
    return err["msg"]


# --- Cross-checks on the raw mapping ----------------------------------------------------------


def _entries(data: Mapping, *keys: Any) -> Iterator[tuple[int, Mapping]]:
    """(index, mapping) for each mapping in the list at data[keys...]; skips anything else."""
    value: Any = data
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, Mapping):
                yield index, item


def _str(item: Mapping, key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) else None


def _cross_check(data: Mapping) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    problems += _check_unique_ids(data)
    problems += _check_partners(data)
    problems += _check_users(data)
    problems += _check_deadlines(data)
    problems += _check_consent(data)
    return problems


def _check_consent(data: Mapping) -> list[tuple[tuple, str]]:
    """Each version id once (a need records it, so it must name one text), and a text in every desk's language."""
    problems: list[tuple[tuple, str]] = []
    if not isinstance(data.get("consent"), list):
        return problems  # absent: the defaults; another shape: the first pass says so
    seen: dict[str, int] = {}
    for i, text in _entries(data, "consent"):
        version = _str(text, "version")
        if version is None:
            continue
        if version in seen:
            problems.append(
                (
                    ("consent", i, "version"),
                    f"duplicate version {version!r} (already consent[{seen[version]}]); "
                    "give each text its own version id",
                )
            )
        seen.setdefault(version, i)
    languages = {_str(t, "language") or "fr" for _, t in _entries(data, "consent")}
    for i, library in _entries(data, "libraries"):
        language = _str(library, "language") or "fr"
        if language in ("fr", "en") and language not in languages:
            problems.append(
                (
                    ("libraries", i, "language"),
                    f"no consent text in {language!r}; add one to consent with language: {language}",
                )
            )
    return problems


def _check_unique_ids(data: Mapping) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    namespaces: dict[str, list[tuple[tuple, str | None]]] = {
        "categories": [(("categories", i, "id"), _str(c, "id")) for i, c in _entries(data, "categories")],
        "libraries": [(("libraries", i, "id"), _str(x, "id")) for i, x in _entries(data, "libraries")],
        "partners": [(("partners", i, "id"), _str(p, "id")) for i, p in _entries(data, "partners")],
        "users": [(("users", i, "id"), _str(u, "id")) for i, u in _entries(data, "users")],
        # Contact ids are recorded on referrals without their partner, so they are file-wide.
        "contacts": [
            (("partners", i, "contacts", j, "id"), _str(c, "id"))
            for i, p in _entries(data, "partners")
            for j, c in _entries(p, "contacts")
        ],
    }
    for located in namespaces.values():
        first_seen: dict[str, tuple] = {}
        for loc, id_ in located:
            if id_ is None:
                continue
            if id_ in first_seen:
                problems.append((loc, f"duplicate id {id_!r} (already used at {_format_loc(first_seen[id_])})"))
            else:
                first_seen[id_] = loc
    return problems


def _check_partners(data: Mapping) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    categories = {_str(c, "id") for _, c in _entries(data, "categories")}
    check_categories = isinstance(data.get("categories"), list)
    for i, partner in _entries(data, "partners"):
        taken = partner.get("categories")
        if check_categories and isinstance(taken, list):
            for j, category in enumerate(taken):
                if isinstance(category, str) and category not in categories:
                    problems.append((("partners", i, "categories", j), f"unknown category {category!r}"))
        contacts = list(_entries(partner, "contacts"))
        roles = [_str(c, "role") for _, c in contacts]
        if not isinstance(partner.get("contacts"), list) or not set(roles) <= {"primary", "backup"}:
            continue  # the first pass already reports a missing list or an unknown role
        primaries = [j for (j, _), role in zip(contacts, roles, strict=True) if role == "primary"]
        if not primaries:
            problems.append((("partners", i, "contacts"), "no primary contact; give one contact role: primary"))
        for j in primaries[1:]:
            problems.append(
                (
                    ("partners", i, "contacts", j, "role"),
                    f"a second primary contact (contacts[{primaries[0]}] is already primary); make this one backup",
                )
            )
    return problems


def _check_users(data: Mapping) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    known = {
        "library": {_str(x, "id") for _, x in _entries(data, "libraries")},
        "partner": {_str(x, "id") for _, x in _entries(data, "partners")},
    }
    needs = {"front_desk": "library", "partner": "partner", "ops": None}
    tokens: dict[str, int] = {}
    emails: dict[str, int] = {}
    for i, user in _entries(data, "users"):
        role = _str(user, "role")
        if role in needs:
            for field in ("library", "partner"):
                value = user.get(field)
                if field == needs[role]:
                    if value is None:
                        problems.append(
                            (("users", i, field), f"missing; {_a(role)} user needs the id of their {field}")
                        )
                    elif isinstance(value, str) and value not in known[field]:
                        problems.append((("users", i, field), f"unknown {field} {value!r}"))
                elif value is not None:
                    problems.append((("users", i, field), f"{_a(role)} user has no {field}; remove it"))
        token, email = _str(user, "token_sha256"), _str(user, "email")
        if user.get("token_sha256") is None and user.get("email") is None:
            problems.append((("users", i), "no way to sign in; give an email or a token_sha256"))
        if token and re.fullmatch(r"[0-9a-fA-F]{64}", token):
            if token.lower() in tokens:
                problems.append(
                    (
                        ("users", i, "token_sha256"),
                        f"same token as users[{tokens[token.lower()]}]; every user needs their own token",
                    )
                )
            tokens.setdefault(token.lower(), i)
        if email:
            if email.lower() in emails:
                problems.append(
                    (
                        ("users", i, "email"),
                        f"same email as users[{emails[email.lower()]}]; sign-in links need one user per email",
                    )
                )
            emails.setdefault(email.lower(), i)
    return problems


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _duration_or_none(value: Any) -> timedelta | None:
    try:
        return parse_duration(value) if isinstance(value, str) else None
    except ValueError:
        return None  # the first pass reports it


def _check_deadlines(data: Mapping) -> list[tuple[tuple, str]]:
    problems = []
    if "sla" in data:
        default = data["sla"] if isinstance(data["sla"], Mapping) else {}
        problems += _deadline_problems(("sla",), default, fields=set(default))
    else:  # DEFAULT_SLA, valid by construction: only the partners' overrides can clash with it
        default = DEFAULT_SLA
    for i, partner in _entries(data, "partners"):
        override = partner.get("sla")
        if not isinstance(override, Mapping):
            continue
        # Inherited values are scaled to the partner's window, so only its own ones can clash.
        given = {k for k, v in override.items() if v is not None or k == "escalate_after"}
        effective = {**default, **{k: override[k] for k in given}}
        problems += _deadline_problems(("partners", i, "sla"), effective, fields=given)
    return problems


def _deadline_problems(loc: tuple, sla: Mapping, fields: set) -> list[tuple[tuple, str]]:
    window_text = sla.get("respond_within")
    window = _duration_or_none(window_text)
    if window is None:
        return []
    problems = []
    reminders = sla.get("remind_after")
    if "remind_after" in fields and isinstance(reminders, list):
        previous = None
        for j, text in enumerate(reminders):
            step = _duration_or_none(text)
            if step is None:
                continue
            if step >= window:
                problems.append(((*loc, "remind_after", j), f"{text} is not before respond_within {window_text}"))
            elif previous is not None and step <= previous[1]:
                problems.append(
                    (
                        (*loc, "remind_after", j),
                        f"{text} is not after the previous reminder {previous[0]}; list reminders in increasing order",
                    )
                )
            previous = (text, step)
    escalate_text = sla.get("escalate_after")
    escalate = _duration_or_none(escalate_text)
    if "escalate_after" in fields and escalate is not None and escalate >= window:
        problems.append(((*loc, "escalate_after"), f"{escalate_text} is not before respond_within {window_text}"))
    return problems
