"""Headless Chromium (Debian's package, driven by Playwright) against a live genserve.

`make test` installs both: Playwright from the dev extra (never `playwright install`, which
downloads browsers), Chromium with apt where /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from tests.server import LiveServer, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
API_KEY = "gs-e2e-playground-key"
EMBEDDINGS_MODEL = "all-MiniLM-L6-v2"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="package")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server that requires an API key, so the page must send the one typed into it."""
    root = tmp_path_factory.mktemp("e2e")
    with mock.patch.dict(os.environ, {"GENSERVE_API_KEYS": API_KEY}):
        srv = start_server(
            tiny_model_dir,
            root,
            "--max-batch-size",
            "8",
            "--data-dir",
            str(root / "data"),
            "--deterministic",  # the compare view's fixed seed: k parallel samples, identical
            # An embeddings model too: its id sorts first, and the picker must not open on it.
            "--embedding-model",
            EMBEDDINGS_MODEL,
        )
    yield srv
    srv.stop()


@pytest.fixture(scope="package")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """One Chromium with a fresh profile; each test gets its own tab (own sessionStorage)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (make test installs Debian's chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture()
def page(browser, live: LiveServer):
    """A new tab; fails the test on any uncaught script error."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    yield tab
    tab.close()
    assert not errors, f"script errors on the page: {errors}"


def screenshot(page, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def open_page(page, live: LiveServer, view: str = "play") -> None:
    """Load the page, type the API key as a user would, wait until the models are listed."""
    page.goto(f"{live.url}/#{view}")
    page.wait_for_selector("body[data-ready]", state="attached")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    wait_for_models(page)


def wait_for_models(page) -> None:
    page.wait_for_selector("#model option", state="attached")
    page.wait_for_selector("#global-error", state="hidden")
