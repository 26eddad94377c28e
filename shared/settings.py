"""Settings of every Relais process, read from the environment (`RELAIS_*`), as the contract lists them."""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.directory import DEMO_DIRECTORY

SERVICES = ("intake", "referral", "notifications")
ServiceName = Literal["intake", "referral", "notifications"]
# The demo directory stores only their SHA-256; `relais up` prints them so a newcomer can call the API.
DEMO_TOKENS = {
    "desk-chatelet": "demo-desk-chatelet",
    "desk-drummondville": "demo-desk-drummondville",
    "op-caf76": "demo-partner-caf76",
    "op-cpam76": "demo-partner-cpam76",
    "op-piaule": "demo-partner-piaule",
    "coord": "demo-ops",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAIS_", extra="ignore")

    redis_url: str | None = None  # None only inside `relais up`, which starts an embedded Redis
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
    secret_key: str | None = None
    public_url: str | None = None
    # Where referral's dashboard reads the other services' figures (their JSON APIs, server to server).
    intake_url: str | None = None  # default: base_url("intake")
    notifications_url: str | None = None  # default: base_url("notifications")
    # Messaging tuning: the defaults suit production; tests shorten them.
    claim_idle_ms: int = 15_000  # a pending entry idle this long belonged to a dead consumer
    max_deliveries: int = 5  # after this many failed deliveries an entry goes to the dead-letter stream
    poll_ms: int = 200
    stream_max_len: int = 100_000
    stream_max_age_s: int = 7 * 24 * 3600
    # Published outbox rows and processed-event rows are deleted after this (ISO 8601, e.g. `P7D`);
    # processed-event rows never before the streams' age plus a day (shared.db.purge_technical_rows).
    technical_retention: timedelta = Field(timedelta(days=7), gt=timedelta(0))

    def database_url(self, service: ServiceName) -> str:
        url = getattr(self, f"{service}_database_url")
        if url:
            return url
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip()

    def key(self, name: str) -> str:
        """A Redis key or stream name inside this deployment's namespace."""
        return f"{self.namespace}:{name}"


def consumer_name(service: str) -> str:
    """One consumer name per process, stable for its lifetime: host and pid say which process holds an entry."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"
