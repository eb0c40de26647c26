"""Browser tests drive Debian's Chromium through Playwright (never a downloaded browser). `make test` installs
Chromium, so only a bare `pytest` on a machine without it may skip these, never CI."""

import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"


def pytest_collection_modifyitems(config, items):
    if shutil.which(CHROMIUM) is not None or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser page (its own context) that waits up to 30 s for what a test expects: actions and
    `expect(...)` assertions alike (Playwright's assertions otherwise give up after 5 s, too soon on a busy CPU)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()
