"""Headless Chromium for page tests (Debian's chromium driven by playwright, which never downloads a browser
here), with every request a page makes recorded, and screenshots kept as test artifacts."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="Chromium is not installed (make setup-test installs it)")


@contextmanager
def chromium(tmp_path: Path, width: int = 1100, height: int = 800):
    """A fresh browser profile under tmp_path; yields a `new_page()` function whose pages record their
    requests in `page.requests` and their script errors in `page.errors`."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": width, "height": height})
        try:
            def new_page():
                page = browser.new_page()
                page.requests, page.errors = [], []
                page.on("request", lambda r: page.requests.append(r.url))
                page.on("pageerror", lambda e: page.errors.append(str(e)))
                return page

            yield new_page
        finally:
            browser.close()


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Screenshot the whole page to tmp_path/<name>.png, copied to $LMFORGE_ARTIFACTS when that is set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LMFORGE_ARTIFACTS"):
        dest = Path(os.environ["LMFORGE_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / path.name)
    assert path.stat().st_size > 1000
    return path


def only_local(urls: list[str], base: str | None = None) -> list[str]:
    """The requests that went anywhere but the page's own file, inline data, or the test's local server."""
    ok = ("file://", "data:", "about:") + ((base,) if base else ())
    return [u for u in urls if not u.startswith(ok)]
