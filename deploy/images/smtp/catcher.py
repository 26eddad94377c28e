"""An SMTP catcher for the compose stack where Mailpit's image cannot be had: SMTP on 1025, HTTP on 8025 with the
part of Mailpit's API (https://mailpit.axllent.org/docs/api-v1/) people and tests read, so either can be used:
  GET /api/v1/messages[?start=&limit=]  newest first: ID, MessageID, From, To, Subject, Created, Size
  GET /api/v1/message/ID                the same with Text, HTML, Date
  GET /api/v1/message/ID/raw            the message as received
  DELETE /api/v1/messages               forget every message
  GET /livez, /readyz                   health; GET / a page listing the messages
Mail is kept in memory only (a read-only root filesystem suits it)."""

from __future__ import annotations

import html
import json
import threading
import uuid
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from aiosmtpd.controller import Controller

MESSAGES: list[dict] = []
LOCK = threading.Lock()


def addresses(value: str | None) -> list[dict]:
    return [{"Name": name, "Address": address} for name, address in getaddresses([value or ""]) if address]


class Keep:
    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        message = message_from_bytes(raw, policy=policy.default)
        text = message.get_body(("plain",))
        body_html = message.get_body(("html",))
        summary = {
            "ID": uuid.uuid4().hex,
            "MessageID": (message["Message-ID"] or "").strip("<>"),
            "From": (addresses(message["From"]) or [{"Name": "", "Address": envelope.mail_from}])[0],
            "To": addresses(message["To"]) or [{"Name": "", "Address": a} for a in envelope.rcpt_tos],
            "Subject": str(message["Subject"] or ""),
            "Created": datetime.now(UTC).isoformat(),
            "Size": len(raw),
        }
        with LOCK:
            MESSAGES.append(
                {
                    "summary": summary,
                    "raw": raw,
                    "date": str(message["Date"] or ""),
                    "text": text.get_content() if text else "",
                    "html": body_html.get_content() if body_html else "",
                }
            )
        return "250 Message accepted for delivery"


class Api(BaseHTTPRequestHandler):
    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def json(self, data, status: int = 200) -> None:
        self.reply(status, json.dumps(data).encode())

    def find(self, message_id: str) -> dict | None:
        with LOCK:
            return next((m for m in MESSAGES if m["summary"]["ID"] == message_id), None)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if url.path in ("/livez", "/readyz"):
            return self.reply(200, b"ok", "text/plain")
        if parts == ["api", "v1", "messages"]:
            query = parse_qs(url.query)
            start = int(query.get("start", ["0"])[0])
            limit = int(query.get("limit", ["50"])[0])
            with LOCK:
                newest_first = [m["summary"] for m in reversed(MESSAGES)]
            page = newest_first[start : start + limit]
            return self.json(
                {
                    "total": len(newest_first),
                    "unread": 0,
                    "count": len(page),
                    "messages_count": len(newest_first),
                    "start": start,
                    "messages": page,
                }
            )
        if len(parts) in (4, 5) and parts[:3] == ["api", "v1", "message"]:
            message = self.find(parts[3])
            if message is None:
                return self.reply(404, b"message not found", "text/plain")
            if len(parts) == 5 and parts[4] == "raw":
                return self.reply(200, message["raw"], "text/plain; charset=utf-8")
            return self.json(
                {**message["summary"], "Date": message["date"], "Text": message["text"], "HTML": message["html"]}
            )
        if url.path == "/":
            with LOCK:
                rows = "".join(
                    f'<li><a href="/api/v1/message/{m["summary"]["ID"]}/raw">'
                    f"{html.escape(m['summary']['Subject'])}</a> to "
                    f"{html.escape(', '.join(t['Address'] for t in m['summary']['To']))}</li>"
                    for m in reversed(MESSAGES)
                )
            page = f"<!doctype html><meta charset=utf-8><title>SMTP catcher</title><ol>{rows}</ol>"
            return self.reply(200, page.encode(), "text/html; charset=utf-8")
        self.reply(404, b"not found", "text/plain")

    def do_DELETE(self) -> None:  # noqa: N802
        if urlparse(self.path).path == "/api/v1/messages":
            with LOCK:
                MESSAGES.clear()
            return self.reply(200, b"ok", "text/plain")
        self.reply(404, b"not found", "text/plain")

    def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # every poll of the API would be a line


def main() -> None:
    smtp = Controller(Keep(), hostname="0.0.0.0", port=1025)
    smtp.start()
    print("SMTP on :1025, HTTP on :8025", flush=True)
    ThreadingHTTPServer(("0.0.0.0", 8025), Api).serve_forever()


if __name__ == "__main__":
    main()
