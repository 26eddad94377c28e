"""The calls behind the desk's offline mode (docs/offline.md) over real HTTP, without a browser: the session's public
key, a kept need sent (recorded once whatever the repeats), refused (the form's French messages), or fixed and
recorded on the form; the guards: signed out, CSRF, another session's need. The browser's part is
tests/browser/test_offline_desk_pages.py."""

from __future__ import annotations

import pytest

from services.intake import offline
from shared.signin import sign_in_link
from shared.testing import use_sign_in_link
from tests.integration.test_desk_pages import A_NEED, browser, hidden, needs_of
from tests.unit.test_offline_seal import seal_as_the_browser

pytestmark = pytest.mark.date_sensitive


def desk_session(intake):
    client = browser(intake)
    link, _ = sign_in_link(intake.settings, "intake", "desk", now=intake.svc.clock())
    assert use_sign_in_link(client, link).url.path == "/nouvelle"
    html = client.get("/nouvelle").text
    answer = client.get("/hors-ligne/cle")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    key = answer.json()
    return client, hidden(html, "csrf"), hidden(html, "consent_version"), key


def sealed(intake, key: dict, fields: dict[str, str]) -> dict[str, str]:
    """What hors-ligne.js stores, sealed to the session's public key (the tests hold no private key: the server's)."""
    public = offline.SessionKey(tag=key["tag"], public_key=key["public_key"], private=None)  # type: ignore[arg-type]
    return seal_as_the_browser(public, fields)


def test_a_kept_need_is_recorded_once_and_a_refused_one_comes_back_to_fix(intake):
    client, csrf, version, key = desk_session(intake)
    headers = {"X-CSRF-Token": csrf}
    need = sealed(intake, key, {**A_NEED, "consent_version": version, "idempotency_key": "hl-1"})
    first = client.post("/hors-ligne/envoyer", json=need, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["state"] == "recorded" and first.json()["reference"].startswith("CHA-")
    again = client.post("/hors-ligne/envoyer", json=need, headers=headers)  # the answer was lost: sent again
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert len(needs_of(intake)) == 1

    refused = sealed(intake, key, {**A_NEED, "consent": "", "email": "pas une adresse", "idempotency_key": "hl-2"})
    answer = client.post("/hors-ligne/envoyer", json=refused, headers=headers)
    assert answer.status_code == 422
    assert answer.json()["state"] == "to_fix"
    assert answer.json()["messages"] == [
        "Adresse e-mail non valide : vérifiez-la, par exemple prenom.nom@exemple.fr.",
        "La demande ne peut être transmise qu'avec l'accord de la personne : lisez-lui le texte de la case, puis "
        "cochez-la si elle est d'accord.",
    ]
    # opened on the form: what was typed, the errors, the kept need's own key
    page = client.post("/hors-ligne/corriger", data={"csrf": csrf, **refused})
    assert page.status_code == 422 and 'value="pas une adresse"' in page.text
    assert hidden(page.text, "idempotency_key") == "hl-2"
    fixed = {**A_NEED, "csrf": csrf, "consent_version": version, "idempotency_key": "hl-2"}
    assert client.post("/nouvelle", data=fixed).url.path.endswith("/enregistree")
    assert len(needs_of(intake)) == 2
    # the kept copy, sent again, is known as recorded: nothing more
    done = client.post("/hors-ligne/envoyer", json=refused, headers=headers)
    assert done.json()["state"] == "recorded_before" and len(needs_of(intake)) == 2


def test_the_guards_of_the_offline_calls(intake):
    client, csrf, version, key = desk_session(intake)
    need = sealed(intake, key, {**A_NEED, "consent_version": version, "idempotency_key": "hl-1"})
    assert client.post("/hors-ligne/envoyer", json=need).status_code == 403  # no CSRF token
    assert client.post("/hors-ligne/envoyer", json=need, headers={"X-CSRF-Token": "x"}).status_code == 403
    cross = {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}
    assert client.post("/hors-ligne/envoyer", json=need, headers=cross).status_code == 403
    altered = {**need, "ct": need["ct"][:-4] + "AAAA"}
    assert client.post("/hors-ligne/envoyer", json=altered, headers={"X-CSRF-Token": csrf}).status_code == 400

    # signed out: the session's key is gone with it; signed in again, the old need is unreadable
    client.post("/deconnexion", data={"csrf": csrf})
    assert client.get("/hors-ligne/cle").status_code == 401
    assert client.post("/hors-ligne/envoyer", json=need, headers={"X-CSRF-Token": csrf}).status_code == 401
    client2, csrf2, _, key2 = desk_session(intake)
    assert key2["tag"] != key["tag"]
    answer = client2.post("/hors-ligne/envoyer", json=need, headers={"X-CSRF-Token": csrf2})
    assert answer.status_code == 400 and answer.json()["state"] == "unreadable"
    assert needs_of(intake) == []
