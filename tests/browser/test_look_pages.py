"""How the pages look, in a real browser: no page of any service is wider than a phone (390 px: its tables become
lists), and the deployment's theme from the directory: the State's design system (DSFR, vendored) with the
République française block only for a State service, and the neutral look for a Québec library, with the
deployment's and the library's names. axe-core on each theme (no serious violation); screenshots under
test-artifacts/browser/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import yaml

from shared.messaging import DATA_FIELD
from shared.signin import sign_in_link
from shared.testing import directory_data, need_recorded, sign_in_in_browser, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.date_sensitive]

PHONE_390 = {"width": 390, "height": 844}
WIDTH_JS = "() => document.documentElement.scrollWidth"


def sign_in(page, service, user_id: str) -> None:
    page.context.clear_cookies()
    link, _ = sign_in_link(service.settings, service.svc.name, user_id, now=service.svc.clock())
    sign_in_in_browser(page, link)


def dead_letter(settings, service) -> None:
    """A need.recorded from a library the directory does not know: referral dead-letters it (the replay page's)."""
    client = redis.Redis.from_url(settings.redis_url)
    event = need_recorded(
        service.svc.personal_data,
        need_id="n-poison",
        library_id="nowhere",
        category="caf",
        summary="x",
        postal_code=None,
        urgency="normal",
        recorded_at=service.svc.clock(),
    )
    fields = {"data": event.model_dump_json(), "headers": {}}
    client.xadd(
        settings.key("needs"),
        {DATA_FIELD: json.dumps(fields), "type": event.type, "event_id": event.event_id, "need_id": event.need_id},
    )
    client.close()


LIST_JS = """() => {
    const table = document.querySelector("table.stack-narrow");
    const heads = Array.from(table.tHead.rows[0].cells).map(c => c.textContent.trim());
    return Array.from(table.tBodies[0].rows).map(r => ({
        display: getComputedStyle(r).display,
        labels: Array.from(r.cells).map((c, i) => [heads[i], c.dataset.label || null,
                                                   getComputedStyle(c, "::before").content]),
    }));
}"""


def lists_each_value_with_its_column(page) -> bool:
    """The page's stack-narrow table shows its rows as blocks, each cell after its column's name (but the first,
    which names the row, and a column of links)."""
    rows = page.evaluate(LIST_JS)
    assert rows and all(r["display"] == "block" for r in rows)
    for row in rows:
        for head, label, before in row["labels"][1:]:
            assert label in (head, None) and (label is None or before == f'"{head} : "'), (head, before)
        assert [label for _, label, _ in row["labels"][1:3]] == [head for head, _, _ in row["labels"][1:3]]
    return True


def test_no_page_of_any_service_is_wider_than_a_phone(page, check_page, settings, mail_sink, start_service):
    settings = settings.model_copy(update={"smtp_url": mail_sink.url})
    intake = start_service("intake", settings)
    referral = start_service("referral", settings)
    notifications = start_service("notifications", settings)
    person = {"display_name": "Mme Durand", "email": "durand@example.org", "phone": "06 12 34 56 78"}
    needs = [
        intake.client("desk")
        .post(
            "/needs",
            json={
                "library_id": "chatelet",
                "category": category,
                "summary": "Dossier APL bloqué depuis trois mois, la CAF ne répond pas aux courriers",
                "postal_code": "76000",
                "person": {**person, "preferred_channel": "email"},
                "consent": True,
            },
        )
        .json()["id"]
        for category in ("caf", "sante", "logement")
    ]
    dead_letter(settings, referral)
    ops = referral.client("ops")
    streams = lambda: ops.get("/dashboard").json()["queues"]["streams"]  # noqa: E731
    assert wait_for(lambda: next(s for s in streams() if s["name"] == "needs")["dead_letters"] == 1, 30)
    [referral_id] = wait_for(
        lambda: [r["id"] for r in referral.client("caf").get("/referrals").json()["items"]] or None, 30
    )
    deliveries = wait_for(lambda: notifications.client("ops").get("/deliveries").json()["items"] or None, 30)

    page.set_viewport_size(PHONE_390)
    pages = {
        intake: {
            None: ["/connexion", "/accessibilite", "/donnees-personnelles"],
            "desk": [
                "/nouvelle",
                "/demandes",
                f"/demandes/{needs[0]}",
                f"/demandes/{needs[0]}/enregistree",
                f"/demandes/{needs[0]}/recu",
                f"/demandes/{needs[0]}/effacer",
                "/chiffres",
            ],
        },
        referral: {
            None: ["/connexion"],
            "op-caf": ["/boite", f"/boite/{referral_id}"],
            "ops": [
                "/tableau-de-bord",
                "/tableau-de-bord/confirmer/rejouer?flux=needs",
                f"/tableau-de-bord/confirmer/reaffecter?orientation={referral_id}",
                "/tableau-de-bord/incidents",
                "/tableau-de-bord/incidents/nouveau",
            ],
        },
        notifications: {None: ["/connexion"], "ops": ["/envois", f"/envois/{deliveries[0]['id']}"]},
    }
    too_wide = []
    for service, by_user in pages.items():
        for user, paths in by_user.items():
            if user:
                sign_in(page, service, user)
            else:
                page.context.clear_cookies()
            for path in paths:
                answer = page.goto(service.url + path)
                assert answer is not None and answer.ok, f"{service.svc.name} {path}: {answer and answer.status}"
                page.wait_for_load_state("networkidle")
                if (width := page.evaluate(WIDTH_JS)) > PHONE_390["width"]:
                    too_wide.append(f"{service.svc.name} {path}: {width} px")
    assert not too_wide, "pages wider than a 390 px phone:\n" + "\n".join(too_wide)

    # The two tables that were too wide are lists on a phone, each value with its column's name; still accessible.
    sign_in(page, intake, "desk")
    page.goto(f"{intake.url}/chiffres")
    assert lists_each_value_with_its_column(page)
    check_page(page, "look-desk-figures-390")
    sign_in(page, referral, "ops")
    page.goto(f"{referral.url}/tableau-de-bord/confirmer/rejouer?flux=needs")
    assert lists_each_value_with_its_column(page)
    check_page(page, "look-ops-replay-390")


def theme_directory(tmp_path, deployment: dict, quebec: bool = False) -> Path:
    data = directory_data()
    data["deployment"] = deployment
    if quebec:
        data["libraries"][0].update(
            name="Bibliothèque de Drummondville", timezone="America/Toronto", territory=["J2B"], phone="819 555 0101"
        )
        data["partners"][0]["territory"] = ["J2B"]
    path = tmp_path / f"directory-{len(list(tmp_path.glob('directory-*')))}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


@pytest.mark.parametrize("state_service", [True, False])
def test_a_france_services_deployment_wears_the_states_design_system(
    page, check_page, settings, start_service, tmp_path, state_service
):
    name = "France Services de Seine-Maritime"
    directory = theme_directory(tmp_path, {"name": name, "theme": "dsfr", "state_service": state_service})
    intake = start_service("intake", settings.model_copy(update={"directory": directory}))

    responses: list = []
    page.on("response", lambda r: responses.append(r))
    sign_in(page, intake, "desk")
    page.goto(f"{intake.url}/nouvelle")
    page.wait_for_load_state("networkidle")
    assert page.title().endswith(f" – {name}")
    header = page.locator("header.fr-header")
    assert header.locator(".fr-header__service-title").inner_text() == name
    assert "Bibliothèque du Châtelet" in header.locator(".fr-header__service-tagline").inner_text()
    body_font = page.evaluate("getComputedStyle(document.body).fontFamily")
    assert body_font.startswith("Marianne")
    fonts = [r.status for r in responses if "/static/vendor/dsfr/fonts/Marianne-" in r.url]
    assert fonts and set(fonts) == {200}, "the Marianne font is served from the vendored DSFR"
    assert page.evaluate("document.fonts.check('16px Marianne')")
    # The République française block (the State's brand, with Marianne) only for a State service.
    assert page.locator(".fr-logo").count() == (2 if state_service else 0)
    if state_service:
        assert page.locator("header .fr-logo").text_content() == "Républiquefrançaise"  # a <br> between
    check_page(page, f"look-dsfr-{'state' if state_service else 'not-state'}")
    page.set_viewport_size(PHONE_390)
    assert page.evaluate(WIDTH_JS) <= PHONE_390["width"]
    check_page(page, f"look-dsfr-{'state' if state_service else 'not-state'}-390")


def test_a_quebec_library_gets_the_neutral_look_with_its_name(page, check_page, settings, start_service, tmp_path):
    directory = theme_directory(tmp_path, {"name": "Réseau BIBLIO du Centre-du-Québec"}, quebec=True)
    intake = start_service("intake", settings.model_copy(update={"directory": directory}))

    requested = []
    page.on("request", lambda r: requested.append(r.url))
    sign_in(page, intake, "desk")
    page.goto(f"{intake.url}/nouvelle")
    page.wait_for_load_state("networkidle")
    assert page.title().endswith(" – Réseau BIBLIO du Centre-du-Québec")
    brand = page.locator(".site-header .brand").inner_text()
    assert "Réseau BIBLIO du Centre-du-Québec" in brand and "Bibliothèque de Drummondville" in brand
    assert page.locator(".fr-logo, .fr-header").count() == 0
    assert not [url for url in requested if "/vendor/dsfr/" in url]
    assert "Marianne" not in page.evaluate("getComputedStyle(document.body).fontFamily")
    check_page(page, "look-neutral-quebec")

    # The desk's number on the person's receipt, as Québec writes it.
    need = intake.client("desk").post(
        "/needs",
        json={"library_id": "chatelet", "category": "caf", "summary": "x", "postal_code": "J2B 1A1", "consent": True},
    )
    page.goto(f"{intake.url}/demandes/{need.json()['id']}/recu")
    assert page.get_by_role("link", name="819 555-0101").get_attribute("href") == "tel:+18195550101"
