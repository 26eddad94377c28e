"""Settings of every Relais process, read from the environment (`RELAIS_*`), as the contract lists them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import socket
import stat
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.directory import DEMO_DIRECTORY, DirectoryError, load_directory

ServiceName = Literal["intake", "referral", "notifications"]
SERVICES: tuple[ServiceName, ...] = ("intake", "referral", "notifications")
# The demo directory stores only their SHA-256; `relais up` prints them so a newcomer can call the API.
DEMO_TOKENS = {
    "desk-chatelet": "demo-desk-chatelet",
    "desk-drummondville": "demo-desk-drummondville",
    "op-caf76": "demo-partner-caf76",
    "op-cpam76": "demo-partner-cpam76",
    "op-piaule": "demo-partner-piaule",
    "coord": "demo-ops",
}

# --- modes: what production refuses (docs/security.md, "Modes, secrets and files at rest") ---------------

SECRET_MIN_LENGTH = 32
# Secret values this repository ships (compose file, docs, tests, CI), and the usual placeholders: public, so never
# a production key. tests/unit/test_modes.py fails when a file of the repository ships one missing here.
SHIPPED_SECRETS = frozenset(
    {
        "dev-only-insecure-secret-override-in-production",
        "ci-compose-validation-only-not-a-real-secret-0000",
        "ci-compose-validation-only",
        "test-secret",
        "e2e-secret",
        "changethis",
        "changeme",
        "change-me",
        "secret",
        "your-secret-key",
    }
)
DEMO_HINT = "or set RELAIS_DEMO=true to run the demo, never with real people's data"


def weak_secret(value: str | None) -> str | None:
    """Why `value` cannot protect a production deployment (unset, shipped by the repository, short), or None."""
    if not value:
        return "is not set"
    if value.strip().lower() in SHIPPED_SECRETS:
        return "is a value the Relais repository ships, so anyone can read it"
    if len(value) < SECRET_MIN_LENGTH:
        return f"is shorter than {SECRET_MIN_LENGTH} characters"
    return None


def demo_token_hashes() -> frozenset[str]:
    """The SHA-256 of every demo token: public, since `relais up` prints the tokens and the demo file ships."""
    hashes = {hashlib.sha256(token.encode()).hexdigest() for token in DEMO_TOKENS.values()}
    hashes |= {u.token_sha256.lower() for u in load_directory(DEMO_DIRECTORY).users if u.token_sha256}
    return frozenset(hashes)


# --- keys of personal data on the wire (shared.personal_data, docs/privacy.md "Keys") -----------------------------

KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
KEY_BYTES = 32
PERSONAL_DATA_KEYS_FORM = (
    "give comma-separated KEY_ID:KEY items, KEY_ID of letters, digits, '_' or '-', KEY the base64 of 32 random "
    "bytes (e.g. `k1:$(openssl rand -base64 32)`), the key that wraps new data keys first"
)


def parse_personal_data_keys(value: str) -> list[tuple[str, bytes]]:
    """`id:base64,id:base64,...` as (key id, 32-byte key) pairs, in order; ValueError saying which item is wrong and
    never quoting a key."""
    keys: list[tuple[str, bytes]] = []
    for number, item in enumerate(value.split(","), start=1):
        key_id, colon, encoded = item.strip().partition(":")
        if not colon or not KEY_ID.fullmatch(key_id):
            raise ValueError(f"item {number} does not start with a key id and ':'; {PERSONAL_DATA_KEYS_FORM}")
        try:
            key = base64.b64decode(encoded.strip().replace("-", "+").replace("_", "/"), validate=True)
        except binascii.Error:
            raise ValueError(f"key {key_id!r} is not base64; {PERSONAL_DATA_KEYS_FORM}") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {key_id!r} is {len(key)} bytes, not {KEY_BYTES}; {PERSONAL_DATA_KEYS_FORM}")
        if any(key_id == seen for seen, _ in keys):
            raise ValueError(f"key id {key_id!r} is given twice; each key needs its own id")
        keys.append((key_id, key))
    return keys


def private_dir(path: Path) -> Path:
    """Create the folder `path` readable by this user only (missing parents as usual); a folder of ours that an older
    version left open is closed (not a shared one such as /tmp, which has the sticky bit, or someone else's)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX:
        path.chmod(0o700)
    return path


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAIS_", extra="ignore")

    redis_url: str | None = None  # None only inside `relais up`, which starts an embedded Redis
    # A Sentinel-managed Redis instead of RELAIS_REDIS_URL: `host:port,...` of the Sentinels (shared.redis_clients).
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "relais"
    redis_password: str | None = None  # the Sentinel-managed Redis's password, asked by its Sentinels too
    namespace: str = Field("relais", pattern=r"^[A-Za-z0-9_.-]+$")
    directory: Path = DEMO_DIRECTORY
    data_dir: Path = Path(".relais")
    intake_database_url: str | None = None
    referral_database_url: str | None = None
    notifications_database_url: str | None = None
    host: str = "127.0.0.1"
    intake_port: int = Field(8001, ge=1, le=65535)
    referral_port: int = Field(8002, ge=1, le=65535)
    notifications_port: int = Field(8003, ge=1, le=65535)
    smtp_url: str | None = None
    mail_from: str = "Relais <relais@localhost>"
    # Emails in flight at once, each on its own reused SMTP connection (services/notifications/sender.py).
    smtp_connections: int = Field(4, ge=1, le=32)
    sms_provider: Literal["outbox", "twilio", "brevo"] = "outbox"
    # Notifications: SMS providers, retries and the outbox page (see docs/notifications.md).
    sms_transliterate: bool = True  # French characters outside GSM-7 (ê, ç, ’, « ») become plain ones
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None  # a number in E.164, or a Messaging Service SID (MG...)
    twilio_base_url: str = "https://api.twilio.com"
    brevo_api_key: str | None = None
    brevo_sender: str = "Relais"  # up to 11 letters and digits
    brevo_base_url: str = "https://api.brevo.com"
    sms_webhook_secret: str | None = None  # in Brevo's webhook URL; default derived from the signing key
    webhook_base_url: str | None = None  # notifications as the providers reach it; default link_base
    delivery_retry_base_s: float = 30.0  # the first retry comes after about this long, then doubling
    delivery_retry_max_s: float = 3600.0
    delivery_max_attempts: int = Field(6, ge=1)
    mail_sink_dir: Path | None = None  # set by `relais up`: the embedded SMTP sink's folder of .eml files
    # Partners' replies by email (docs/inbound-mail.md): the SMTP listener's port (off when unset; `relais up` sets
    # it), the domain of the per-referral Reply-To addresses (default: RELAIS_MAIL_FROM's), the largest message taken,
    # Mailgun's webhook signing key, and whether an out-of-office on a handoff escalates to the backup at once.
    inbound_smtp_port: int | None = Field(None, ge=1, le=65535)
    inbound_domain: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+$")
    inbound_max_bytes: int = Field(1_000_000, ge=10_000)
    mailgun_webhook_signing_key: str | None = Field(None, repr=False)
    inbound_away_escalates: bool = True
    secret_key: str | None = None
    # Key-encryption keys of the personal data that events carry (shared.personal_data): `id:base64,...`, the first
    # wraps new data keys, the others only open old ones; unset, one key is derived from the signing key.
    personal_data_keys: str | None = Field(None, repr=False)
    # Production (`relais serve`) unless true: see production_problems(). `relais up` is always the demo.
    demo: bool = False
    # The ops credential services use between themselves; default derived from the secret key (shared.service).
    internal_token: str | None = None
    public_url: str | None = None
    # Where referral's dashboard reads the other services' figures (their JSON APIs, server to server).
    intake_url: str | None = None  # default: base_url("intake")
    notifications_url: str | None = None  # default: base_url("notifications")
    # Intake's push-back (shared.queues.PushBack): POST /api/v1/needs and the desk's form answer 429 while more
    # than this many needs wait in the pipeline (intake's outbox not yet relayed, plus the most entries of the
    # needs or referrals stream that one consumer group has not yet handled: lag and pending); 0 never pushes back.
    intake_max_backlog: int = Field(2_000, ge=0)
    intake_retry_after_s: int = Field(2, ge=1, le=3600)  # the 429's Retry-After
    # Messaging tuning: the defaults suit production; tests shorten them.
    claim_idle_ms: int = 15_000  # a pending entry idle this long belonged to a dead consumer
    max_deliveries: int = 5  # after this many failed deliveries an entry goes to the dead-letter stream
    poll_ms: int = 200
    stream_max_len: int = 100_000
    stream_max_age_s: int = 7 * 24 * 3600
    # Published outbox rows and processed-event rows are deleted after this (ISO 8601, e.g. `P7D`);
    # processed-event rows never before the streams' age plus a day (shared.db.purge_technical_rows).
    technical_retention: timedelta = Field(timedelta(days=7), gt=timedelta(0))

    @field_validator("personal_data_keys")
    @classmethod
    def _check_personal_data_keys(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_personal_data_keys(value)
            return value
        return None

    @property
    def redis_configured(self) -> bool:
        """A Redis was given (a URL or Sentinels): without one, `relais up` and `relais serve` start an embedded one."""
        return bool(self.redis_url or self.redis_sentinels)

    def database_url(self, service: ServiceName) -> str:
        url = getattr(self, f"{service}_database_url")
        if url:
            return url
        private_dir(self.data_dir)
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def port(self, service: ServiceName) -> int:
        return getattr(self, f"{service}_port")

    def base_url(self, service: ServiceName) -> str:
        return f"http://{self.host}:{self.port(service)}"

    def service_url(self, service: ServiceName) -> str:
        """Where another service reaches `service`'s API: RELAIS_<SERVICE>_URL, else its own host and port."""
        return (getattr(self, f"{service}_url", None) or self.base_url(service)).rstrip("/")

    def link_base(self, service: ServiceName) -> str:
        """Base of links put in emails: RELAIS_PUBLIC_URL when set (behind a proxy), else the service's own URL."""
        return (self.public_url or self.base_url(service)).rstrip("/")

    @cached_property
    def signing_key(self) -> str:
        """RELAIS_SECRET_KEY, or a key generated once into the data dir (so links survive restarts)."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if not path.exists():
            private_dir(self.data_dir)
            draft = path.with_name(f".secret_key.{os.getpid()}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            try:
                os.link(draft, path)  # whole or not at all: a process starting at the same time never reads half a key
            except FileExistsError:
                pass  # another process of this system wrote it first: its key is the one
            except OSError:  # a filesystem without hard links
                if not path.exists():
                    os.replace(draft, path)
            finally:
                draft.unlink(missing_ok=True)
        return path.read_text().strip()

    def production_problems(self) -> list[str]:
        """Why `relais serve` may not run in production with these settings (RELAIS_DEMO is not true): a secret key
        anyone could know, or a directory whose tokens are public. One line per problem, naming its variable."""
        problems = []
        if why := weak_secret(self.secret_key):
            problems.append(
                f"RELAIS_SECRET_KEY: {why}; production needs a random key of at least "
                f"{SECRET_MIN_LENGTH} characters that only this deployment knows (e.g. the output of "
                f"`openssl rand -base64 48`), the same for every service; {DEMO_HINT}"
            )
        if self.internal_token is not None and (why := weak_secret(self.internal_token)):
            problems.append(
                f"RELAIS_INTERNAL_TOKEN: {why}; set a random value of at least {SECRET_MIN_LENGTH} "
                "characters (e.g. `openssl rand -hex 32`), the same for every service, or leave it "
                "unset to derive it from RELAIS_SECRET_KEY"
            )
        if Path(self.directory).resolve() == DEMO_DIRECTORY.resolve():
            problems.append(
                f"RELAIS_DIRECTORY: is the demo directory ({DEMO_DIRECTORY}), whose tokens are public; "
                f"give the path of your own directory file; {DEMO_HINT}"
            )
            return problems
        try:
            users = load_directory(self.directory).users
        except DirectoryError:
            return problems  # `relais serve` lists the file's own errors when it loads it
        public = demo_token_hashes()
        for user in users:
            if user.token_sha256 and user.token_sha256.lower() in public:
                problems.append(
                    f"RELAIS_DIRECTORY: user {user.id!r} in {self.directory} has a token_sha256 of the "
                    "demo directory, whose tokens are public; give them a new random token and put its "
                    f"SHA-256 there; {DEMO_HINT}"
                )
        return problems

    def key(self, name: str) -> str:
        """A Redis key or stream name inside this deployment's namespace."""
        return f"{self.namespace}:{name}"


def consumer_name(service: str) -> str:
    """One consumer name per process, stable for its lifetime: host and pid say which process holds an entry."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"
