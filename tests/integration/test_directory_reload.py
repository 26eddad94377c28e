"""The directory at start and on SIGHUP: a bad file stops a service with the checker's messages; a reload
changes routing for new needs and leaves assigned referrals with their partner and deadline."""

import os
import signal
import subprocess
import sys

import httpx
import yaml

from shared.events import utcnow
from shared.testing import directory_data, wait_for


def env_of(settings, **extra):
    values = {f"RELAIS_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}
    return {**os.environ, **values, **extra}


def test_a_service_refuses_to_start_with_a_bad_directory_and_says_what_to_fix(settings, tmp_path):
    bad = directory_data()
    bad["partners"][0]["contacts"][0]["email"] = "not-an-email"
    bad["partners"][1]["categories"] = ["nope"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad, allow_unicode=True))
    run = subprocess.run(
        [sys.executable, "-m", "relais", "serve", "referral"],
        capture_output=True,
        text=True,
        env=env_of(settings, RELAIS_DIRECTORY=str(path)),
        timeout=60,
    )
    assert run.returncode == 2
    assert "partners[0].contacts[0].email: not an email address" in run.stderr
    assert "partners[1].categories[0]: unknown category 'nope'" in run.stderr


def test_sighup_reloads_the_directory_without_moving_assigned_referrals(settings, start_service, tmp_path):
    intake = start_service("intake", settings, clock=utcnow)  # referral runs as a real process, on the real time
    referral = subprocess.Popen([sys.executable, "-m", "relais", "serve", "referral"], env=env_of(settings))
    api = httpx.Client(
        base_url=f"{settings.base_url('referral')}/api/v1", headers={"Authorization": "Bearer test-ops"}, timeout=10
    )
    try:
        assert wait_for(lambda: _ready(settings.base_url("referral")), 30)

        def record(category):
            r = intake.client("desk").post(
                "/needs",
                json={
                    "library_id": "chatelet",
                    "category": category,
                    "summary": "x",
                    "postal_code": "76000",
                    "consent": True,
                },
            )
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def referrals(need_id):
            return api.get("/referrals", params={"need_id": need_id}).json()["items"]

        caf_need = record("caf")
        before = wait_for(lambda: referrals(caf_need))
        housing_need = record("logement")  # nobody takes housing yet
        assert wait_for(lambda: intake.client("desk").get(f"/needs/{housing_need}").json()["status"] == "unroutable")

        changed = directory_data()
        changed["partners"].append(
            {
                "id": "ccas-rouen",
                "name": "CCAS de Rouen",
                "categories": ["logement"],
                "territory": ["76"],
                "contacts": [
                    {"id": "ccas-ref", "name": "Accueil CCAS", "email": "ccas@test.example", "role": "primary"}
                ],
            }
        )
        changed["partners"][0]["sla"] = {"respond_within": "PT24H"}  # the CAF's window changes, for new needs only
        settings.directory.write_text(yaml.safe_dump(changed, allow_unicode=True))
        referral.send_signal(signal.SIGHUP)

        housing_again = record("logement")
        assert wait_for(lambda: referrals(housing_again), 20)[0]["partner_id"] == "ccas-rouen"
        after = api.get(f"/referrals/{before[0]['id']}").json()
        assert (after["partner_id"], after["respond_by"]) == (before[0]["partner_id"], before[0]["respond_by"])
        assert referral.poll() is None  # still running
    finally:
        referral.terminate()
        referral.wait(20)


def _ready(url):
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
