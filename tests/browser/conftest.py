"""What every browser test shares: Debian's chromium driven by Playwright, a page with the pages' own
Content-Security-Policy enforced and its console errors collected, and `check_page`: a screenshot under
test-artifacts/browser/, then no serious axe-core violation, lang="fr" and no console error.

Plain helpers that need no fixture (viewports, keyboard focus) are in shared.testing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.testing import VIEWPORT_DESK

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
AXE = Path(__file__).with_name("vendor") / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
AXE_RUN = """async () => {
    const r = await axe.run(document, {resultTypes: ["violations"]});
    return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                   targets: v.nodes.map(n => n.target.join(" "))}));
}"""


# Module scope, not session: Playwright's sync API keeps an event loop running in the main thread while
# it is open, and the async tests that follow in the same session need that thread free.
@pytest.fixture(scope="module")
def chromium():
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium package (see .ci/run)")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, clock):
    context = chromium.new_context(viewport=VIEWPORT_DESK, locale="fr-FR")  # the pages' CSP applies: no bypass
    page = context.new_page()
    page.clock.install(time=clock())  # the page's Date starts where the services' clock is, and runs on
    page.set_default_timeout(15_000)
    page.console_problems = []
    # Blocked by the CSP, or a script error; a page answered 422 (a form's errors) is meant.
    # Playwright's clock is a script injected into every frame: in the sandboxed e-mail preview it is refused.
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and not (m.text.startswith("Blocked script execution") and "frame is sandboxed" in m.text)
            and page.console_problems.append(m.text)
        ),
    )
    page.on("pageerror", lambda e: page.console_problems.append(str(e)))
    yield page
    context.close()


@pytest.fixture
def check_page():
    """`check_page(page, name)`: screenshot the page, then fail on any serious or critical axe-core violation,
    a missing lang="fr" or a console error."""
    axe = AXE.read_text()

    def check(page, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        page.evaluate(axe)  # evaluated by the browser's debugger: the page's CSP does not apply to it
        serious = [v for v in page.evaluate(AXE_RUN) if v["impact"] in ("serious", "critical")]
        assert not serious, f"{name}: axe-core violations:\n" + "\n".join(
            f"- {v['impact']} {v['id']}: {v['help']} at {v['targets']}" for v in serious
        )
        assert page.locator("html").get_attribute("lang") == "fr"
        assert not page.console_problems, f"{name}: console errors (CSP?): {page.console_problems}"

    return check
