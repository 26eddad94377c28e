"""Production refuses every secret the repository ships: found by reading the repository itself, so a value
added to the compose file, the docs, CI or the tests one day is refused too (or this test says which)."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import SHIPPED_SECRETS, Settings, weak_secret

ROOT = Path(__file__).resolve().parents[2]
SHIPPING = [
    "docker-compose.yml",
    "Dockerfile",
    ".ci/run",
    "dev",
    "README.md",
    "docs/**/*.md",
    "deploy/**/*",
    "tests/**/*.py",
    "bench/**/*.py",
    "shared/**/*.py",
    "services/**/*.py",
]
# `RELAIS_SECRET_KEY=value`, `RELAIS_SECRET_KEY: value`, `${RELAIS_SECRET_KEY:-value}`, `secret_key="value"`, and the
# same for the internal token.
ASSIGNED = re.compile(
    r"""(?:RELAIS_(?:SECRET_KEY|INTERNAL_TOKEN)[ \t]*(?:=|:-?)[ \t]*
                           |(?:secret_key|internal_token)["']?[ \t]*[=:][ \t]*)
                          [fbr]?(["']?)(?P<value>[^\s"'`}$][^\s"'`}]*)\1""",
    re.VERBOSE,
)


def shipped_values() -> dict[str, str]:
    """Each literal value the repository assigns to the secret key or internal token, with where it is."""
    found: dict[str, str] = {}
    for pattern in SHIPPING:
        for path in ROOT.glob(pattern):
            if not path.is_file() or path.name == "test_modes.py":
                continue
            for match in ASSIGNED.finditer(path.read_text(errors="replace")):
                value = match.group("value")
                # not a literal: a variable, an expression, a placeholder in prose, or a required-value marker
                if value[0] in "$<({[.?" or value in ("None", "str", "null") or "(" in value or value.endswith(","):
                    continue
                found.setdefault(value, str(path.relative_to(ROOT)))
    return found


def test_the_scan_finds_what_the_repository_ships():
    values = shipped_values()
    assert "ci-compose-validation-only-not-a-real-secret-0000" in values, values  # .ci/run's dummy for compose


def test_every_secret_the_repository_ships_is_refused():
    refused = {value: where for value, where in shipped_values().items() if weak_secret(value)}
    assert refused == shipped_values(), "shipped but not refused (add them to SHIPPED_SECRETS): " + ", ".join(
        f"{value!r} in {where}" for value, where in shipped_values().items() if value not in refused
    )


def test_long_shipped_values_are_listed_as_such():
    for value in shipped_values():
        if len(value) >= 32:
            assert value in SHIPPED_SECRETS, value


def test_production_accepts_a_random_key_and_an_own_directory(tmp_path):
    import secrets

    import yaml

    from shared.testing import directory_data

    directory = tmp_path / "directory.yaml"
    directory.write_text(yaml.safe_dump(directory_data()))
    assert Settings(secret_key=secrets.token_urlsafe(32), directory=directory).production_problems() == []
