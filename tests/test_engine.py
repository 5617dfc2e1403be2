"""The continuous-batching engine: batched outputs equal each request alone, paged KV memory, preemption,
mid-batch arrivals, cancellation, back-pressure. Tiny random-weight models; everything bounded in time."""

import random
import threading
import time

import pytest
import torch

import lmforge
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.infer.request import QueueFullError

T_OUT = 60  # seconds any single wait may take before the test fails instead of hanging


def _llm(preset: str):
    torch.manual_seed(0)
    llm = lmforge.load("preset:" + preset)
    with torch.no_grad():  # sharpen the random model so that sampled and greedy outputs differ visibly
        llm.model.lm_head.weight.mul_(20)
    return llm


def _cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    gens = [GenerationConfig(max_new_tokens=rng.randint(1, 50), temperature=rng.choice([0, 0, 0.8, 1.2]), seed=i,
                             top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]),
                             repetition_penalty=rng.choice([1.0, 1.3]), stop_at_eos=False) for i in range(n)]
    return prompts, gens


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gpt2"])
def test_concurrent_requests_equal_each_alone(preset):
    """16 requests of different lengths and sampling settings, batched together, give exactly what each gives
    through `generate_ids` on its own (greedy, and sampled with the same seed). tiny-mistral has a sliding
    window of 16, so the paged cache's masks are checked against that too."""
    llm = _llm(preset)
    prompts, gens = _cases(16)
    with Engine(llm, max_seqs=16, block_tokens=4) as eng:
        hold = threading.Event()
        eng.call(hold.wait)  # the engine thread waits while all 16 are queued
        reqs = [eng.submit(p, g) for p, g in zip(prompts, gens)]
        hold.set()
        outs = [r.result(T_OUT) for r in reqs]
        # one step read all 16 prompts together, then every step decoded all rows still running
        assert eng.stats()["steps"] == max(len(o.token_ids) for o in outs)
    alone = [generate_ids(llm.model, [p], g)[0] for p, g in zip(prompts, gens)]
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral"])
def test_chunked_prefill_equals_each_alone_and_keeps_decoding(preset):
    """With a prefill budget of 7 tokens per step, prompts of up to 100 tokens are read in chunks that share
    steps with decoding rows (and, for tiny-mistral, run past its 16-token window), and every output still
    equals the request alone. A stream that is decoding gets a token at every step while a long prompt is
    read, and the long prompt's first token comes only after its chunks."""
    llm = _llm(preset)
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(rng.choice([1, 5, 30, 70, 100]))] for _ in range(8)]
    gens = [GenerationConfig(max_new_tokens=rng.randint(5, 20), temperature=rng.choice([0, 0.9]), seed=i,
                             stop_at_eos=False) for i in range(8)]
    with Engine(llm, max_seqs=8, block_tokens=4, prefill_tokens=7) as eng:
        steps_a = []
        a = eng.submit([3, 1, 4], GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eos=False),
                       sink=lambda ev: steps_a.append(eng.steps))
        while not steps_a:
            time.sleep(0.001)
        first_long = []
        long = eng.submit(list(range(1, 101)), GenerationConfig(max_new_tokens=3, temperature=0, stop_at_eos=False),
                          sink=lambda ev: first_long.append(eng.steps))
        reqs = [eng.submit(p, g) for p, g in zip(prompts, gens)]
        outs = [r.result(T_OUT) for r in reqs]
        long.result(T_OUT), a.result(T_OUT)
    assert steps_a == list(range(steps_a[0], steps_a[0] + 40))  # one token every step, never paused
    assert first_long[0] - steps_a[0] >= 100 // 7
    alone = [generate_ids(llm.model, [p], g)[0] for p, g in zip(prompts, gens)]
    assert [o.token_ids for o in outs] == alone
    assert long.result().token_ids == generate_ids(llm.model, [list(range(1, 101))],
                                                   GenerationConfig(max_new_tokens=3, temperature=0,
                                                                    stop_at_eos=False))[0]


def test_kv_memory_follows_tokens_and_preemption_keeps_outputs():
    """With a KV cap far below what all sequences need, sequences are preempted and recomputed, and still give
    the same tokens; blocks in use never pass the cap and all come back at the end."""
    llm = _llm("tiny-llama")
    prompts, gens = _cases(12, seed=1)
    per_block = 4 * llm.model.kv_bytes_per_token(torch.float32)
    eng = Engine(llm, max_seqs=8, block_tokens=4, max_kv_bytes=30 * per_block).start()
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(eng.pool.blocks_in_use)
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    try:
        outs = [r.result(T_OUT) for r in [eng.submit(p, g) for p, g in zip(prompts, gens)]]
    finally:
        stop.set()
        w.join()
        eng.stop()
    assert eng.stats()["preemptions_total"] > 0
    assert max(peak) <= 30 and eng.pool.blocks_in_use == 0
    alone = [generate_ids(llm.model, [p], g)[0] for p, g in zip(prompts, gens)]
    for o, a in zip(outs, alone):  # a sequence longer than the whole cache ends early, with "length"
        assert o.token_ids == a[:len(o.token_ids)] and (o.token_ids == a or o.finish_reason == "length")


def test_a_sequence_holds_blocks_for_its_tokens_only():
    llm = _llm("tiny-llama")
    seen = []
    with Engine(llm, block_tokens=4) as eng:
        # the sink runs in the engine thread as each token is sent, so it sees the pool at that moment
        sink = lambda ev: seen.append(eng.pool.blocks_in_use)
        r = eng.submit([1, 2, 3], GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eos=False), sink=sink)
        assert r.result(T_OUT).completion_tokens == 40
    # after k tokens: 3 prompt tokens + k - 1 fed back, plus room for the next one, in blocks of 4
    for k, blocks in enumerate(seen[:-1], start=1):
        assert -(-(k + 2) // 4) <= blocks <= -(-(k + 3) // 4), (k, blocks)
    assert max(seen) <= 11 and eng.pool.blocks_in_use == 0  # never the 128-token context's 32 blocks


def test_mid_batch_arrival_starts_before_the_batch_finishes():
    llm = _llm("tiny-llama")
    long = GenerationConfig(max_new_tokens=100, temperature=0, stop_at_eos=False)
    with Engine(llm, max_seqs=4) as eng:
        first = [eng.submit([i + 1, 7, 9], long) for i in range(3)]
        next(first[0].events(timeout=T_OUT))  # the batch is decoding
        late = eng.submit([42, 43], GenerationConfig(max_new_tokens=5, temperature=0, stop_at_eos=False))
        late_result = late.result(T_OUT)
        assert not any(r.done for r in first)  # the newcomer finished while the batch still ran
        assert late_result.completion_tokens == 5
        assert [len(r.result(T_OUT).token_ids) for r in first] == [100, 100, 100]


def test_cancel_frees_slot_and_caps_hold():
    llm = _llm("tiny-llama")
    gen = GenerationConfig(max_new_tokens=100, temperature=0, stop_at_eos=False)
    with Engine(llm, max_seqs=2, max_queue=2) as eng:
        a, b = eng.submit([1, 2], gen), eng.submit([3, 4], gen)
        next(a.events(timeout=T_OUT))
        next(b.events(timeout=T_OUT))
        c, d = eng.submit([5], gen), eng.submit([6], gen)  # queued: only 2 run at once
        assert eng.stats()["running"] == 2
        with pytest.raises(QueueFullError):
            eng.submit([7], gen)
        a.cancel()
        assert a.result(T_OUT).finish_reason == "cancelled"
        next(c.events(timeout=T_OUT))  # c took a's slot
        assert eng.stats()["running"] == 2
        for r in (b, c, d):
            r.cancel()
        assert all(r.result(T_OUT).finish_reason == "cancelled" for r in (b, c, d))
    assert eng.pool.blocks_in_use == 0


def test_text_stop_strings_and_bad_input():
    llm = lmforge.load("preset:tiny-teenygpt")  # a real (character) tokenizer
    gen = GenerationConfig(max_new_tokens=30, temperature=0, stop_at_eos=False)
    with Engine(llm) as eng:
        pieces = list(eng.submit("to be or not", gen))
        text = "".join(pieces)
        assert text == llm.generate("to be or not", max_new_tokens=30, temperature=0)
        if len(text) > 4:
            stop = text[2:4]
            g = GenerationConfig(max_new_tokens=30, temperature=0, stop=[stop])
            r = eng.submit("to be or not", g).result(T_OUT)
            assert r.text == text[:text.find(stop)] and r.finish_reason == "stop"
        with pytest.raises(ConfigError, match="temperature"):
            eng.submit("hi", GenerationConfig(temperature=-1))
        with pytest.raises(ConfigError, match="context"):
            eng.submit([1] * 10_000, gen)
        with pytest.raises(ConfigError, match="seed"):
            eng.submit("hi", GenerationConfig(seed=2**70))
        with pytest.raises(ConfigError, match="token ids"):
            eng.submit([10_000], gen)
        with pytest.raises(ConfigError, match="num_beams=3"):
            eng.submit("hi", GenerationConfig(num_beams=3))
        with pytest.raises(ConfigError, match="prompt_lookup=2"):
            eng.submit("hi", GenerationConfig(prompt_lookup=2))
    with pytest.raises(ConfigError, match="max_kv_bytes"):
        Engine(llm, max_kv_bytes=10)
