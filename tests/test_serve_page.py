"""The chat page at `/`, in a real headless Chromium (Debian's, driven by playwright; playwright never
downloads a browser here): type a message, send it, watch the streamed reply and the tokens/s figure, and
keep a screenshot as an artifact (tests/artifacts/chat_page.png, not committed)."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers.serving import tiny_chat_llm

from lmforge.serve.server import ServerThread

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (make setup-test installs it)")
def test_chat_page_streams_a_reply_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: see test_serve.py
    try:
        with ServerThread(tiny_chat_llm(block_size=4096)) as server, sync_api.sync_playwright() as pw:
            # a fresh profile in tmp_path: nothing from another run, nothing written elsewhere
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1000, "height": 700})
            try:
                page = browser.new_page()
                outside = []
                page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
                page.goto(server.url + "/", timeout=30_000)
                assert page.title() == "lmforge chat"
                page.fill("#max_tokens", "40")
                page.fill("#temperature", "0")
                page.fill("#input", "Hello! Tell me a story.")
                page.click("#send")
                page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
                reply = page.inner_text(".msg.assistant")
                stats = page.inner_text("#stats")
                assert page.inner_text(".msg.user") == "Hello! Tell me a story."
                assert reply.strip() and "[" not in reply[:1]
                assert "tokens/s" in stats and float(stats.split()[0]) > 0
                # a second turn keeps the conversation: the page sends both turns back
                page.fill("#input", "And then?")
                page.press("#input", "Enter")
                page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2",
                                       timeout=60_000)
                assert len(page.query_selector_all(".msg.user")) == 2
                # the stop button ends a long reply early and the server drops the request (3000 tokens take
                # seconds even for this model, so the click lands mid-reply)
                page.fill("#max_tokens", "3000")
                page.fill("#input", "Go on for a long time.")
                page.click("#send")
                page.wait_for_function("document.querySelectorAll('.msg.assistant')[2].textContent.length > 0",
                                       timeout=60_000)
                page.click("#stop")
                page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 3",
                                       timeout=60_000)
                cancelled = server.engine.metrics.finished
                deadline = time.monotonic() + 30
                while cancelled["cancelled"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert cancelled["cancelled"] == 1
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
                assert outside == []  # self-contained: nothing fetched from anywhere else
            finally:
                browser.close()
    finally:
        torch.set_num_threads(threads)
