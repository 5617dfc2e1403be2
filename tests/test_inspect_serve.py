"""`POST /v1/inspect` on a real uvicorn (127.0.0.1, a free port) serving a tiny Llama with SmolLM2's tokenizer,
and the chat page's Attribution tab in headless Chromium. Until `lmforge.inspect.attribution` is merged the
attribution is the definition computed by hand (helpers/inspect_by_hand.py), installed for these tests only;
afterwards the same tests check the real one against it (gradient x input) and drive it through the page."""

import importlib.util

import httpx
import pytest
import torch
from conftest import assert_rel_close
from helpers.browser import chromium, keep_screenshot, needs_chromium, only_local
from helpers.inspect_by_hand import attribute_by_hand
from helpers.serving import tiny_chat_llm

from lmforge.serve.server import ServerThread

MODEL = "tiny-llama"
TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: see test_serve.py
    try:
        with ServerThread(tiny_chat_llm(block_size=1024)) as s:
            yield s
    finally:
        torch.set_num_threads(n)


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/inspect", json=body, timeout=60)


def test_bad_requests_get_a_400_with_one_line(server):
    base = {"model": MODEL, "analysis": "attribute", "text": TEXT}
    cases = [
        ({"analysis": "bogus"}, 400, "unknown analysis 'bogus'"),
        ({"text": ""}, 400, "text is empty"),
        ({"text": None}, 400, "give text"),
        ({"text": 123}, 400, "text"),
        ({"analysis": "attention", "layer": 5}, 400, "layer 5 is out of range: the model has 2 layers"),
        ({"analysis": "attention", "head": 4}, 400, "head 4 is out of range"),
        ({"attribution": "shap"}, 400, "unknown attribution 'shap'"),
        ({"layre": 1}, 400, "layre"),
        ({"steps": 0}, 400, "steps"),
        ({"model": "gpt-4"}, 404, "does not exist"),
        ({"text": None, "messages": [{"role": "user", "content": "Hi"}]}, 400, "non-empty reply"),
        ({"reply": "Hello"}, 400, "reply goes with messages"),
        ({"text": None, "messages": [{"role": "user", "content": "Hi"}], "reply": "Hello", "target_index": 99},
         400, "target_index 99 is out of range"),
    ]
    for change, status, expected in cases:
        r = _post(server, {**base, **change})
        msg = r.json()["error"]["message"]
        assert r.status_code == status and expected in msg and "\n" not in msg, (change, r.status_code, msg)


def test_attribute_of_a_text_is_the_attribution(server, monkeypatch):
    r = _post(server, {"model": MODEL, "analysis": "attribute", "text": TEXT, "attribution": "gradient_x_input",
                       "target": " Paris"})
    assert r.status_code == 200, r.text
    got = r.json()
    ref = attribute_by_hand(server.app.state.serving.llm, TEXT, target=" Paris", method="gradient_x_input")
    assert got["object"] == "inspection" and got["analysis"] == "attribute" and got["model"] == MODEL
    assert got["tokens"] == ref.tokens and got["target_id"] == ref.target_id
    assert got["method"] == "gradient_x_input"
    assert_rel_close(torch.tensor(got["scores"]), ref.scores, rtol=1e-4)


def test_attribute_of_a_reply_explains_its_token(server, monkeypatch):
    llm = server.app.state.serving.llm
    messages = [{"role": "user", "content": "Where is Paris?"}]
    reply = "Paris is in France."
    r = _post(server, {"model": MODEL, "analysis": "attribute", "messages": messages, "reply": reply,
                       "target_index": 2, "attribution": "gradient_x_input"})
    assert r.status_code == 200, r.text
    got = r.json()
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    reply_ids = tok.encode(reply, add_special_tokens=False)
    ref = attribute_by_hand(llm, torch.tensor([prompt + reply_ids[:2]]), target=reply_ids[2],
                            method="gradient_x_input")
    assert got["reply_tokens"] == [tok.decode([i]) for i in reply_ids] and got["target_index"] == 2
    assert len(got["tokens"]) == len(prompt) + 2 and got["target_id"] == reply_ids[2]
    assert_rel_close(torch.tensor(got["scores"]), ref.scores, rtol=1e-4)


@pytest.mark.slow
def test_lens_and_attention_answer_their_dicts(server):
    if importlib.util.find_spec("lmforge.inspect.lens") is None:
        pytest.skip("lmforge.inspect.lens is not in this tree yet")
    from lmforge.inspect.lens import logit_lens

    llm = server.app.state.serving.llm
    got = _post(server, {"model": MODEL, "analysis": "lens", "text": TEXT, "k": 3, "target": " Paris"}).json()
    ref = logit_lens(llm, TEXT, k=3, target=" Paris")
    assert got["top_tokens"] == ref.top_tokens
    assert_rel_close(torch.tensor(got["top_probs"]), ref.top_probs)
    got = _post(server, {"model": MODEL, "analysis": "attention", "text": TEXT, "layer": 1}).json()
    trace = llm.inspect(TEXT, capture=("attention",))
    assert_rel_close(torch.tensor(got["attention"][0]), trace.attention[1][0])


@pytest.mark.slow
@needs_chromium
def test_chat_page_attribution_tab_colours_the_last_reply(server, monkeypatch, tmp_path):
    with chromium(tmp_path) as new_page:
        page = new_page()
        page.goto(server.url + "/", timeout=30_000)
        page.click("#tab-attr")
        assert page.get_attribute("#attr-status", "data-state") == "idle"  # nothing to explain yet
        page.click("#tab-chat")
        page.fill("#max_tokens", "8")
        page.fill("#temperature", "0")
        page.fill("#input", "Where is Paris?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        reply = page.evaluate("history[history.length - 1].content")  # the reply as sent, not as laid out
        page.click("#tab-attr")
        assert page.is_hidden("#log") and page.is_visible("#attr")
        page.wait_for_selector("#attr-status[data-state=done]", timeout=60_000)
        ref = _post(server, {"model": MODEL, "analysis": "attribute", "steps": 16,
                             "messages": [{"role": "user", "content": "Where is Paris?"}], "reply": reply}).json()
        spans = page.query_selector_all("#attr-tokens .tok")
        assert [s.inner_text() for s in spans] == [t.replace("\n", "\\n") for t in ref["tokens"]]
        shown = [float(s.get_attribute("data-score")) for s in spans]
        assert_rel_close(torch.tensor(shown), torch.tensor(ref["scores"]), rtol=1e-6)
        colours = {s.evaluate("e => getComputedStyle(e).backgroundColor") for s in spans}
        assert len(colours) > 2  # coloured by attribution, not one flat colour
        rtoks = page.query_selector_all("#attr-reply .rtok")
        assert len(rtoks) == len(ref["reply_tokens"]) and "sel" in rtoks[0].get_attribute("class")
        if len(rtoks) > 1:  # explain another token of the reply: the context grows by the tokens before it
            rtoks[1].click()
            page.wait_for_function("document.querySelector('#attr-reply .rtok.sel').dataset.i === '1' && "
                                   "document.querySelector('#attr-status').dataset.state === 'done'", timeout=60_000)
            assert len(page.query_selector_all("#attr-tokens .tok")) == len(spans) + 1
        keep_screenshot(page, tmp_path, "chat_attribution_tab")
        assert page.errors == [] and only_local(page.requests, server.url) == []
