"""/donnees-personnelles and /accessibilite answer without sign-in on every service with pages, say what the
directory says (retention, consent text, privacy contact), and every page's footer links them."""

from __future__ import annotations

import copy

import httpx
import pytest
import yaml

from shared.testing import directory_data

PAGES = ("/donnees-personnelles", "/accessibilite")


@pytest.fixture
def services(settings, start_service, mail_sink, directory_file):
    data = copy.deepcopy(directory_data())
    data["retention"] = {"closed_needs": "P400D", "jurisdictions": {"CA-QC": {"closed_needs": "P365D"}}}
    data["libraries"].append({"id": "drummondville", "name": "Drummondville", "territory": ["J2B"]})
    data["privacy_contact"] = {"name": "DPO du département", "email": "dpo@departement.test.example"}
    directory_file.write_text(yaml.safe_dump(data, allow_unicode=True))
    settings = settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{mail_sink.port}"})
    return [start_service(name, settings) for name in ("intake", "referral", "notifications")]


def test_the_public_pages_answer_without_sign_in_everywhere_and_say_what_the_directory_says(services):
    for service in services:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for path in PAGES:
                r = client.get(path)
                assert r.status_code == 200, (service.name, path)
                assert '<a href="/donnees-personnelles"' in r.text and '<a href="/accessibilite"' in r.text
            privacy = client.get("/donnees-personnelles").text
            assert "400 jours" in privacy and "365 jours (1 an)" in privacy  # France's, then Québec's
            assert "Québec (Loi 25)" in privacy and "France (RGPD)" in privacy
            assert "dpo@departement.test.example" in privacy and "relais-fr-1" in privacy
            assert "partiellement conforme" in client.get("/accessibilite").text


def test_every_page_footer_links_them(services):
    intake, referral, notifications = services
    pages = {
        intake: ["/nouvelle", "/connexion", "/demandes/inconnue"],
        referral: ["/connexion", "/tableau-de-bord", "/r/jeton-invalide", "/boite"],
        notifications: ["/connexion", "/envois"],
    }
    for service, paths in pages.items():
        with httpx.Client(base_url=service.url, timeout=30, follow_redirects=True) as client:
            for path in paths:
                r = client.get(path)
                assert r.headers["content-type"].startswith("text/html"), (service.name, path)
                for link in PAGES:
                    assert f'<a href="{link}"' in r.text, (service.name, path, link)
