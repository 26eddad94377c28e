"""Test helpers shared by the test suite and the benchmarks: a small directory, real SMTP sink, services
served over real HTTP in a thread, and polling for what crosses processes. Helpers that reach into one service's
code (record_need) are in tests/helpers.py: shared/ imports nothing of services/."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from shared.devstack import MailSink, free_port  # noqa: F401 - one of each, for tests, the bench and `relais up`


def clean_env(**relais) -> dict[str, str]:
    """For a `relais` subprocess: this environment without any RELAIS_* variable, plus the given ones (lower-case
    names without the prefix), its output unbuffered."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    env.update({f"RELAIS_{k.upper()}": str(v) for k, v in relais.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- time: the tests' clock ------------------------------------------------------------------------

# The instant every test system starts at, unless RELAIS_TEST_NOW names another (the date sweep of .ci/run runs
# the date-sensitive tests at a year end, both DST changes, 29 February and a summer holiday). A Tuesday morning
# whose 48 h and 72 h deadlines fall in "décembre": a month whose name is not plain ASCII.
DEFAULT_TEST_NOW = "2026-12-01T10:15:00+01:00"


def clock_start() -> datetime:
    """The instant the tests' clocks start at: RELAIS_TEST_NOW (ISO 8601 with an offset) or DEFAULT_TEST_NOW."""
    value = os.environ.get("RELAIS_TEST_NOW") or DEFAULT_TEST_NOW
    at = datetime.fromisoformat(value)
    if at.tzinfo is None:
        raise ValueError(f"RELAIS_TEST_NOW={value!r} needs an offset, e.g. 2026-12-31T23:30:00+01:00")
    return at


class TestClock:
    """A service's clock in tests: starts at a fixed instant (`clock_start()`) and runs at real speed from there, so
    what the services do in a test does not depend on the day the suite runs; `advance` jumps ahead."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, start: datetime | None = None) -> None:
        self.start = start or clock_start()
        self._began = time.monotonic()
        self._skipped = timedelta()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self._began) + self._skipped

    def advance(self, delta: timedelta) -> None:
        self._skipped += delta


def wait_for(predicate, timeout: float = 15.0, step: float = 0.05):
    """Poll until `predicate()` is truthy (events cross processes); returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


TOKENS = {"desk": "test-desk", "desk2": "test-desk2", "caf": "test-caf", "cpam": "test-cpam", "ops": "test-ops"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


DESK_EMAIL = "agent@chatelet.test.example"  # the Châtelet desk signs in by a link sent here


def directory_data() -> dict:
    """A small directory like the contract's example; tests change copies of it."""
    return {
        "timezone": "Europe/Paris",
        "sla": {"respond_within": "PT72H", "remind_after": ["PT24H", "PT48H"], "escalate_after": "PT60H"},
        "escalation_contacts": [{"name": "Coordination 76", "email": "coordination@test.example"}],
        "categories": [
            {"id": "caf", "label": "Allocations familiales (CAF)"},
            {"id": "sante", "label": "Assurance maladie"},
            {"id": "logement", "label": "Logement"},
        ],
        "libraries": [
            {
                "id": "chatelet",
                "name": "Bibliothèque du Châtelet",
                "timezone": "Europe/Paris",
                "territory": ["76000"],
                "contacts": [{"name": "Accueil", "email": "accueil@chatelet.test.example"}],
            },
            {
                "id": "bihorel",
                "name": "Médiathèque de Bihorel",
                "timezone": "Europe/Paris",
                "territory": ["76420"],
                "contacts": [{"name": "Accueil", "email": "accueil@bihorel.test.example"}],
            },
        ],
        "partners": [
            {
                "id": "caf-76",
                "name": "CAF de la Seine-Maritime",
                "categories": ["caf"],
                "territory": ["76"],
                "contacts": [
                    {"id": "caf-ref", "name": "Référent", "email": "referent@caf.test.example", "role": "primary"},
                    {
                        "id": "caf-backup",
                        "name": "Accueil partenaires",
                        "email": "backup@caf.test.example",
                        "role": "backup",
                    },
                ],
            },
            {
                "id": "caf-national",
                "name": "CAF plateforme nationale",
                "categories": ["caf"],
                "territory": [""],
                "contacts": [
                    {"id": "cafn-ref", "name": "Plateforme", "email": "plateforme@caf.test.example", "role": "primary"}
                ],
            },
            {
                "id": "cpam-76",
                "name": "CPAM Rouen-Elbeuf-Dieppe",
                "categories": ["sante"],
                "territory": ["76"],
                "contacts": [
                    {"id": "cpam-ref", "name": "Référent", "email": "referent@cpam.test.example", "role": "primary"}
                ],
            },
        ],
        "users": [
            {
                "id": "desk",
                "role": "front_desk",
                "library": "chatelet",
                "email": DESK_EMAIL,
                "token_sha256": sha(TOKENS["desk"]),
            },
            {"id": "desk2", "role": "front_desk", "library": "bihorel", "token_sha256": sha(TOKENS["desk2"])},
            {
                "id": "op-caf",
                "role": "partner",
                "partner": "caf-76",
                "token_sha256": sha(TOKENS["caf"]),
                "email": "op@caf.test.example",
            },
            {
                "id": "op-cpam",
                "role": "partner",
                "partner": "cpam-76",
                "token_sha256": sha(TOKENS["cpam"]),
                "email": "op@cpam.test.example",
            },
            {"id": "ops", "role": "ops", "token_sha256": sha(TOKENS["ops"]), "email": "ops@coordination.test.example"},
        ],
    }


# --- browser tests (tests/browser): helpers given a Playwright page; playwright is not imported here -----

VIEWPORT_DESK = {"width": 1280, "height": 900}
VIEWPORT_PHONE = {"width": 375, "height": 740}


def sign_in_link_of(service, event: dict) -> str:
    """The link notifications builds from an access.link_requested event of `service` (which carries no link), for
    tests that run a service without notifications."""
    from shared.signin import link_for_request, read_sign_in_reference

    reference = read_sign_in_reference(service.settings, event["reference"], service.svc.clock())
    return link_for_request(service.settings, reference)


def use_sign_in_link(client, link: str):
    """Open an emailed sign-in link with an httpx client and press its "Me connecter" button, as a person does;
    the response of the last step (the home page when following redirects, or the error page)."""
    import re

    import httpx

    page = client.get(httpx.URL(link).raw_path.decode())
    found = re.search(
        r'<form method="post" action="([^"]+)"[^>]*>\s*<input type="hidden" name="csrf" value="([^"]+)"', page.text
    )
    if page.status_code != 200 or found is None:
        return page
    return client.post(found.group(1), data={"csrf": found.group(2)})


def sign_in_in_browser(page, link: str) -> None:
    """Open an emailed sign-in link in a Playwright page and press its button."""
    page.goto(link)
    page.get_by_role("button", name="Me connecter").click()
    page.wait_for_load_state()


def focused(page, selector: str) -> bool:
    return page.evaluate("s => document.activeElement && document.activeElement.matches(s)", selector)


def tab_to(page, selector: str, limit: int = 60) -> None:
    """Press Tab until `selector` has the focus, as a keyboard user would."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if focused(page, selector):
            return
    raise AssertionError(f"{selector} never got the keyboard focus")


def focus_is_visible(page) -> bool:
    return page.evaluate("""() => {
        const s = getComputedStyle(document.activeElement);
        return (s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== "none";
    }""")


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command in `folder`."""
    import subprocess

    cert, key = folder / "cert.pem", folder / "key.pem"
    subj = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *subj,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# --- events as intake emits them --------------------------------------------------------------------


def need_recorded(
    personal_data,  # noqa: ANN001 - a shared.personal_data.PersonalData (imported late: tests may not need crypto)
    *,
    summary: str = "Dossier APL bloqué depuis trois mois",
    person: dict | None = None,
    need_id: str | None = None,
    person_id: str | None = None,
    **fields,
):
    """A `need.recorded` as intake emits it: `summary` and the person's name and addresses sealed with the person's
    data key (created in `personal_data`'s Redis), channel and language in clear. `fields` override the rest
    (library_id, category, postal_code, urgency, recorded_at...)."""
    from shared.events import NeedPersonalData, NeedRecorded, PersonContact, new_id, utcnow

    contact = PersonContact(**(person or {}))
    need_id, person_id = need_id or new_id(), person_id or new_id()
    details = NeedPersonalData(
        summary=summary, display_name=contact.display_name, email=contact.email, phone=contact.phone
    )
    values = {
        "library_id": "chatelet",
        "category": "caf",
        "postal_code": "76000",
        "urgency": "normal",
        "recorded_at": utcnow(),
        **fields,
    }
    return NeedRecorded(
        need_id=need_id,
        person_id=person_id,
        preferred_channel=contact.preferred_channel,
        language=contact.language,
        sealed=personal_data.seal_need(person_id, need_id, details),
        **values,
    )


def unopenable_seal(person_id: str = "p-test"):  # noqa: ANN201 - a shared.events.SealedPersonalData
    """A seal no key opens, the size of a real one: for events that are only carried (the messaging tests, the
    bench), or handed to a handler with their details by the test itself."""
    import base64

    from shared.events import SealedPersonalData

    return SealedPersonalData(
        person_id=person_id,
        key_id=os.urandom(8).hex(),
        nonce=base64.b64encode(os.urandom(12)).decode(),
        ciphertext=base64.b64encode(os.urandom(120)).decode(),
    )
