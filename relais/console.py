"""What `relais up` shows in its terminal, and where the rest goes.

The services it runs write their logs as JSON lines to a pipe; each line goes, as it is, to the log file in the
data dir (`shared.logs.LogFile`, one writer for all). The terminal gets warnings and errors, anything a child
printed that is not a log line (a traceback before logging started, a start-up problem), and one readable line per
need each time it moves, from the events the services emit (`relais.events` lines carry the directory's ids and
the deadline, never a person's data):

    10:15:02  need 7951bb06  recorded at Bibliothèque du Châtelet: Allocations familiales (CAF)
    10:15:02  need 7951bb06  routed to CAF de la Seine-Maritime, answer due Wed 02 Dec 10:15
    10:15:03  need 7951bb06  emailed the handoff to the partner's contact

With `--verbose` every line is shown, as the services' text logs would read.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import IO, Any
from zoneinfo import ZoneInfo

from shared.directory import Directory
from shared.logs import LogFile, redact

# `relais serve` under `relais up` is always the demo: its warning about it is for `serve` alone.
DEMO_NOTICE = "demo mode (RELAIS_DEMO=true)"
SCREEN_LEVELS = ("warning", "error", "critical")
KIND = {
    "handoff": "the handoff",
    "person_confirmation": "the confirmation",
    "reminder": "a reminder",
    "escalation": "the escalation",
    "breach": "the missed deadline",
    "partner_answered": "the partner's answer",
    "unroutable": "the 'no partner' alert",
    "sign_in": "a sign-in link",
    "digest": "the daily digest",
    "reply_not_applied": "the automatic answer to a late reply",
    "contact_away": "the out-of-office alert",
}
ROLE = {
    "partner_contact": "the partner's contact",
    "backup_contact": "the partner's backup contact",
    "escalation": "the coordination",
    "front_desk": "the desk",
    "person": "the person",
}


class Console:
    """Feeds the log file and the terminal from the children's lines (`child_line`, called by one reader thread
    per child) and from this process's own records (through `log_file`, which `shared.logs.configure` adds)."""

    def __init__(
        self, log_file: LogFile, directory: Directory, verbose: bool = False, out: IO[str] | None = None
    ) -> None:
        self.log_file, self.directory, self.verbose = log_file, directory, verbose
        self.out = out or sys.stdout
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def child_line(self, service: str, raw: str) -> None:
        text = raw.rstrip("\r\n")
        if not text.strip():
            return
        record = parse(text)
        if record is None:  # a child's plain output: kept in the file as a JSON line too
            self.keep_plain(service, text)
            if self.verbose or DEMO_NOTICE not in text:
                self.say(text)
            return
        self.log_file.write_line(text)
        if self.verbose or record.get("level") in SCREEN_LEVELS:
            self.say(as_text(record))
        elif (line := self.progress(record)) is not None:
            self.say(line)

    def keep_plain(self, service: str, text: str) -> None:
        """A line that is not a log line (a print, a traceback before logging started), in the file as one."""
        line = {
            "ts": datetime.now().astimezone().isoformat(timespec="milliseconds"),
            "level": "info",
            "logger": "relais.up",
            "service": service,
            "msg": redact(text),
        }
        self.log_file.write_line(json.dumps(line, ensure_ascii=False))

    def progress(self, record: dict[str, Any]) -> str | None:
        """The readable line of an event about a need (or a sign-in link sent), else None."""
        if record.get("logger") != "relais.events" or "event_type" not in record:
            return None
        event, need = record["event_type"], record.get("need_id")
        words = describe(event, record, self.directory)
        if words is None:
            return None
        when = local_time(record.get("ts"))
        return f"{when}  need {need[:8]}  {words}" if need else f"{when}  {words}"


def parse(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def local_time(ts: str | None, fmt: str = "%H:%M:%S") -> str:
    try:
        return datetime.fromisoformat(ts or "").astimezone().strftime(fmt)
    except ValueError:
        return "--:--:--"


def as_text(record: dict[str, Any]) -> str:
    """A JSON log line as the services' text format reads (what `relais up` showed before it kept a log file)."""
    when = local_time(record.get("ts"), "%Y-%m-%d %H:%M:%S")
    ids = " ".join(f"{k}={record[k]}" for k in ("need_id", "correlation_id") if record.get(k))
    text = f"{when} {str(record.get('level', '')).upper()} {record.get('logger', '')}: {record.get('msg', '')}"
    text += f" [{ids}]" if ids else ""
    return text + (f"\n{record['exc']}" if record.get("exc") else "")


def describe(event: str, record: dict[str, Any], directory: Directory) -> str | None:
    """What happened to the need, in a few words with the directory's names."""

    def name(kind: str, id_: str | None, find: Callable[[str], Any]) -> str:
        found = find(id_) if id_ else None
        return getattr(found, "name" if kind != "category" else "label", None) or id_ or "?"

    partner = name("partner", record.get("partner_id"), directory.partner)
    library = directory.library(record.get("library_id") or "")
    by = record.get("actor")
    by_hand = f" by {by}" if by and by != "system" else ""
    if event == "need.recorded":
        category = name("category", record.get("category"), directory.category)
        return f"recorded at {library.name if library else record.get('library_id')}: {category}"
    if event == "referral.assigned":
        due = record.get("respond_by")
        if due and library:
            zone = ZoneInfo(library.timezone or directory.timezone)
            due = datetime.fromisoformat(due).astimezone(zone).strftime("%a %d %b %H:%M")
        return f"{'handed' if by_hand else 'routed'} to {partner}{by_hand}, answer due {due}"
    if event == "need.unroutable":
        return "no partner can take it: the coordination is told (dashboard, 'Sans partenaire')"
    if event == "delivery.sent" or event == "delivery.failed":
        kind = KIND.get(record.get("kind", ""), record.get("kind", "a message"))
        role = ROLE.get(record.get("recipient_role", ""), record.get("recipient_role", "someone"))
        how = "texted" if record.get("channel") == "sms" else "emailed"
        if event == "delivery.failed":
            return f"could not send {kind} to {role} ({record.get('channel', 'email')}): see the outbox page"
        return f"{how} {kind} to {role}"
    simple = {
        "referral.accepted": f"accepted by {partner}",
        "referral.responded": f"{partner} answered",
        "referral.declined": f"declined by {partner}",
        "referral.closed": f"closed by {partner}",
        "referral.cancelled": f"taken back from {partner}{by_hand}"
        + (" to hand it to another partner" if record.get("reassigned") else ""),
        "referral.reminder_due": f"reminder {record.get('reminder_number', '')} to {partner}".replace("  ", " "),
        "referral.escalated": f"escalated: {partner} has not answered",
        "referral.breached": f"deadline passed without an answer from {partner}",
        "need.cancelled": f"cancelled{by_hand}",
        "partner.reply_received": f"{partner} replied by email",
    }
    return simple.get(event)
