"""A bad RELAIS_* variable stops `relais serve` and `relais up` before anything starts, with exit status 2 and a
line naming the variable and what it must be: never a Python traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.testing import clean_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90  # a refusal comes at once; should it start instead, the run ends here (its children die with it)

BAD = [  # (variable, value, what the line must say besides the variable)
    ("INTAKE_PORT", "abc", "must be a whole number (got 'abc')"),
    ("REFERRAL_PORT", "70000", "must be at most 65535"),
    ("SMS_PROVIDER", "carrier-pigeon", "must be one of 'outbox', 'twilio' or 'brevo'"),
    ("NAMESPACE", "a b", "letters, digits"),
    ("SMS_TRANSLITERATE", "maybe", "must be true or false"),
    ("INTAKE_DATABASE_URL", "nonsense://", "sqlite:///"),
    ("INTAKE_DATABASE_URL", "not a url", "not a database URL"),
    ("REDIS_URL", "localhost:6379", "redis://"),
    ("PERSONAL_DATA_KEYS", "k1:c2VjcmV0LXRvby1zaG9ydA==", "key 'k1' is 16 bytes, not 32"),
    ("PERSONAL_DATA_KEYS", "k1:not-base64!", "is not base64"),
]


def relais(args: list[str], tmp_path, **variables) -> subprocess.CompletedProcess:
    """`relais ARGS` with only the given RELAIS_* variables (lower-case names, without the prefix), in the demo mode so
    that the demo directory and a generated key are no problem: only the bad setting is (tests/e2e/test_modes.py
    covers what production refuses)."""
    env = clean_env(**{"data_dir": tmp_path / "data", "demo": "true", **variables})
    return subprocess.run(
        [sys.executable, "-m", "relais", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_refused(run: subprocess.CompletedProcess, variable: str, says: str) -> None:
    output = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 2, output
    assert "Traceback" not in run.stderr, output
    [line] = [line for line in run.stderr.splitlines() if line.startswith(f"RELAIS_{variable}: ")] or [None]
    assert line and says in line, output


@pytest.mark.parametrize(("variable", "value", "says"), BAD, ids=[f"{v}={x}" for v, x, _ in BAD])
def test_relais_serve_refuses_a_bad_setting_and_names_it(tmp_path, variable, value, says):
    variables = {"redis_url": "redis://127.0.0.1:9/0", variable.lower(): value}  # never reached: nothing starts
    run = relais(["serve", "intake"], tmp_path, **variables)
    assert_refused(run, variable, says)
    if variable == "PERSONAL_DATA_KEYS":
        assert value.partition(":")[2] not in run.stderr  # a key, even a refused one, is never printed


def test_relais_serve_notifications_refuses_a_bad_smtp_url(tmp_path):
    run = relais(["serve", "notifications"], tmp_path, redis_url="redis://127.0.0.1:9/0", smtp_url="http://u:pw@x")
    assert_refused(run, "SMTP_URL", "smtp://")
    assert "pw" not in run.stderr  # a password in the URL is not printed


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("INTAKE_PORT", "abc", "must be a whole number (got 'abc')"),
        ("SMS_PROVIDER", "carrier-pigeon", "must be one of"),
        ("NAMESPACE", "a b", "letters, digits"),
        ("NOTIFICATIONS_DATABASE_URL", "nonsense://", "sqlite:///"),
        ("SMTP_URL", "http://x", "smtp://"),
    ],
    ids=lambda value: str(value)[:20],
)
def test_relais_up_refuses_a_bad_setting_and_names_it(tmp_path, variable, value, says):
    run = relais(["up", "--data-dir", str(tmp_path / "up")], tmp_path, **{variable.lower(): value})
    assert_refused(run, variable, says)
    assert "Relais is running" not in run.stdout


def test_every_problem_is_listed_at_once(tmp_path):
    run = relais(["serve", "intake"], tmp_path, redis_url="redis://127.0.0.1:9/0", intake_port="abc", namespace="a b")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "RELAIS_INTAKE_PORT: " in run.stderr and "RELAIS_NAMESPACE: " in run.stderr, run.stderr


def test_relais_replay_refuses_a_stream_that_does_not_exist_and_lists_those_that_do(tmp_path):
    run = relais(["replay", "bogus"], tmp_path, redis_url="redis://127.0.0.1:9/0")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "invalid choice: 'bogus'" in run.stderr and "'needs', 'referrals', 'deliveries', 'access'" in run.stderr


SENTINELS_BAD = [  # (value of RELAIS_REDIS_SENTINELS, what the line must say)
    ("sentinel-0", "'sentinel-0' is not host:port"),
    ("s0:26379,s1:port", "'s1:port' is not host:port"),
    ("s0:26379,,s1:26379", "an empty item between commas"),
    ("s0:99999", "'s0:99999' is not host:port"),
    (":26379", "':26379' is not host:port"),
]


@pytest.mark.parametrize(("value", "says"), SENTINELS_BAD, ids=[v for v, _ in SENTINELS_BAD])
def test_relais_serve_refuses_a_bad_list_of_sentinels_and_names_it(tmp_path, value, says):
    run = relais(["serve", "referral"], tmp_path, redis_sentinels=value)
    assert_refused(run, "REDIS_SENTINELS", says)
    assert "host:port,host:port" in run.stderr


def test_relais_serve_refuses_sentinels_without_a_master_name_or_with_a_redis_url_too(tmp_path):
    run = relais(["serve", "intake"], tmp_path, redis_sentinels="s0:26379,s1:26379", redis_sentinel_master=" ")
    assert_refused(run, "REDIS_SENTINEL_MASTER", "must not be empty")
    run = relais(["serve", "intake"], tmp_path, redis_sentinels="s0:26379", redis_url="redis://127.0.0.1:9/0")
    assert_refused(run, "REDIS_URL", "set only one")


def test_relais_up_refuses_a_bad_list_of_sentinels(tmp_path):
    run = relais(["up", "--data-dir", str(tmp_path / "up")], tmp_path, redis_sentinels="s0:26379;s1:26379")
    assert_refused(run, "REDIS_SENTINELS", "is not host:port")
    assert "Relais is running" not in run.stdout
