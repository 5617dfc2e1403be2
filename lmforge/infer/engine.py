"""A continuous-batching engine: many requests share each forward pass, joining and leaving between steps.

One engine thread owns the model. Each loop it (1) drops cancelled requests, (2) builds one step: every
decoding sequence feeds its last token, and up to `prefill_tokens` prompt tokens follow, taken from
sequences still reading their prompts and then from newly admitted requests (while there is a free
sequence slot and KV memory), a long prompt split into chunks over several steps, and (3) runs them all
in one packed forward pass (`paged.PagedBatch`: no padding, attention within each sequence), sampling
each sequence that has read all its input with that request's own settings and random generator. A
request that arrives while others decode therefore starts at the next step, prompts of several requests
are read together, and decoding streams keep moving while a long prompt is read (chunked prefill, as in
Sarathi-Serve, Agrawal et al. 2024; iteration-level scheduling from Orca, Yu et al. 2022).

Keys and values live in a paged cache (`lmforge.infer.paged`), so a sequence holds memory for the tokens
it has, not for the context. When the cache is full a sequence is preempted: its blocks are freed and it
is queued again to be recomputed from its prompt and the tokens it already produced (vLLM's recompute
preemption); its random generator carries on, so its output is the same.

All model work happens in the engine thread, one step at a time: the fp32 decode path (`blas_decode`)
changes process-wide thread counts for the duration of a step, so two threads must never decode at once.
Sampling and stopping reuse `generate.py` (`sample_next`, `TextStream`, `GenerationConfig`). What `submit` returns
(`Request`, its `Event`s and `Completion`), the engine's errors and `EngineMetrics` are in `lmforge.infer.request`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, TextStream, sample_next
from lmforge.infer.packed import blas_decode, blas_decode_helps, pack_linears
from lmforge.infer.paged import BlockPool, PagedBatch, SeqBlocks
from lmforge.infer.request import EngineMetrics, EngineStoppedError, Event, QueueFullError, Request
from lmforge.quant import is_quantized


class Engine:
    """Serves many generation requests at once from one model, batching their decode steps.

    Args:
        llm: an `lmforge.LLM` (model and tokenizer).
        max_seqs: most sequences decoding together (a cap on the batch).
        max_queue: most requests waiting to start; `submit` raises `QueueFullError` beyond it.
        max_kv_bytes: cap on the paged KV cache's memory (all layers, keys and values).
        block_tokens: tokens per KV cache block.
        prefill_tokens: most prompt tokens read in one step, beside one token per decoding sequence;
            longer prompts are read in chunks over several steps. It bounds how long running streams
            pause for newcomers (a larger budget reads prompts in fewer, larger matrix products).

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, llm, max_seqs: int = 16, max_queue: int = 64, max_kv_bytes: int = 1 << 30,
                 block_tokens: int = 16, prefill_tokens: int = 512):
        if max_seqs < 1 or max_queue < 0 or block_tokens < 1 or prefill_tokens < 1:
            raise ConfigError("max_seqs, block_tokens and prefill_tokens must be >= 1, max_queue >= 0")
        self.llm, self.model = llm, llm.model
        if self.model.config.is_encoder_decoder:
            raise ConfigError(f"{self.model.config.name!r} is an encoder-decoder; the serving engine batches "
                              "decoder-only models, so use LLM.generate for it")
        mixers = {token for token, _ in self.model.config.layer_mixers()}
        if mixers != {"attention"}:
            raise ConfigError(f"the serving engine pages attention keys and values; this model's layers use "
                              f"{sorted(mixers)}, so serve it with plain generation (LLM.generate) instead")
        self.max_seqs, self.max_queue, self.prefill_tokens = max_seqs, max_queue, prefill_tokens
        p = self.model.tok_emb.weight
        # the cache dtype follows the model's own rule (fp32 keys/values for a bf16 model on the CPU)
        cache_dtype = self.model.new_cache(1, 1).k[0].dtype
        probe = BlockPool(self.model.config, block_tokens, 2, cache_dtype, p.device, initial_blocks=2)
        max_blocks = 1 + max_kv_bytes // probe.bytes_per_block()
        if max_blocks < 2:
            raise ConfigError(f"max_kv_bytes={max_kv_bytes} holds no KV block of {probe.bytes_per_block()} bytes; "
                              "raise it")
        self.pool = BlockPool(self.model.config, block_tokens, max_blocks, cache_dtype, p.device,
                              initial_blocks=min(64, max_blocks))
        self.max_kv_tokens = (max_blocks - 1) * block_tokens
        self.device = p.device
        self._blas_weight = p  # decides, with a step's row count, whether the step runs under blas_decode
        self._quantized = is_quantized(self.model)  # quantized layers use torch's threads: never under it
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._calls: collections.deque[tuple[Callable[[], object], concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self.steps = 0  # decode steps run (tests and metrics use it)
        self.metrics = EngineMetrics()

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            pack_linears(self.model)  # CPU: prepacked weights (a no-op when already done)
            self._stopping, self._accepting = False, True
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = False, timeout: float | None = 30.0) -> None:
        """Stop accepting requests; with `drain` let running and queued ones finish, else cancel them."""
        with self._cond:
            self._accepting = False
            if not drain:
                for r in itertools.chain(self._waiting, self._running):
                    r._cancel = True
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- submitting ------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], gen: GenerationConfig | None = None, *, chat: bool = False,
               sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a prompt (text, or token ids) for generation and return its `Request` at once.

        `chat=True` adds the end-of-turn tokens of chat templates to the EOS set (use `submit_chat` to
        render messages). `sink`, if given, receives every `Event` in the engine thread instead of the
        request's own queue; it must not block. Raises `QueueFullError` when the queue is full.
        """
        if self.model.lm_head is None or not self.model.config.attention.causal:
            raise ConfigError("this model is an encoder: it has no next-token head to generate with; use its "
                              "embeddings (LLM.embed, or the server's /v1/embeddings)")
        gen = (gen or GenerationConfig()).validate()
        if gen.num_beams > 1 or gen.prompt_lookup > 0:
            raise ConfigError(f"the engine samples every request token by token in a shared batch: num_beams="
                              f"{gen.num_beams} and prompt_lookup={gen.prompt_lookup} are not served; use "
                              "LLM.generate (or generate_ids) for beam search and speculative decoding")
        if gen.seed is not None and not -(2**63) <= gen.seed < 2**64:
            raise ConfigError(f"seed must fit in 64 bits, got {gen.seed}")
        ids = self.llm.encode_prompt(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        block = self.model.config.block_size
        if not ids:
            raise ConfigError("empty prompt: there is nothing to condition on; give some text")
        if len(ids) > block:
            if not gen.truncate:
                raise ConfigError(f"the prompt has {len(ids)} tokens but the model's context is {block}; shorten it "
                                  "or set truncate to keep its last tokens")
            ids = ids[-block:]
        if len(ids) + 1 > self.max_kv_tokens:
            raise ConfigError(f"the prompt has {len(ids)} tokens but the KV cache holds at most "
                              f"{self.max_kv_tokens}; raise max_kv_bytes or shorten the prompt")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"token ids must be in [0, {vocab})")
        eos = frozenset(self.llm.eos_ids(chat)) if gen.stop_at_eos else frozenset()
        req = Request(next(self._ids), ids, gen, eos, sink)
        req._engine_wake = self._wake
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the engine is not running; start() it (or it is shutting down)")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(req)
            self.metrics.requests += 1
            self._cond.notify()
        return req

    def submit_chat(self, messages: list[dict[str, str]], gen: GenerationConfig | None = None,
                    sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a conversation, rendered with the tokenizer's chat template, as `LLM.chat` does."""
        tok = self.llm._need_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return self.submit(tok.encode(text, add_special_tokens=False), gen, chat=True, sink=sink)

    def generate(self, prompt: str | Sequence[int], gen: GenerationConfig | None = None,
                 timeout: float | None = None) -> str:
        """Submit and wait: the completion's text."""
        c = self.submit(prompt, gen).result(timeout)
        if c.finish_reason == "error":
            raise RuntimeError(f"generation failed: {c.error}")
        return c.text

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn()` in the engine thread between two steps (other model work, e.g. embeddings, must not run
        at the same time as a decode step); returns a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the engine is not running; start() it (or it is shutting down)")
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    def stats(self) -> dict[str, float]:
        """Queue length, running sequences, KV blocks and memory in use, throughput and latency figures."""
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
        return {"waiting": waiting, "running": running, "kv_blocks_used": self.pool.blocks_in_use,
                "kv_blocks_max": self.pool.max_blocks - 1, "kv_bytes_allocated": self.pool.bytes(),
                "steps": self.steps, **self.metrics.snapshot()}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._running and not self._calls:
                    return
                waiting = [r for r in self._waiting if r._cancel]
                for r in waiting:
                    self._waiting.remove(r)
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as e:
                        fut.set_exception(e)
            for r in waiting:
                self._finish(r, "cancelled")
            for r in [r for r in self._running if r._cancel]:
                self._finish(r, "cancelled")
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a failed step fails its requests, not the engine
                for r in list(self._running):
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def _admit(self) -> Request | None:
        """Move the first waiting request into the running set with KV blocks for all its input, or None
        (nothing waiting, or not enough memory while other sequences run)."""
        while True:
            with self._cond:
                if not self._waiting:
                    return None
                r = self._waiting[0]
                n = len(r.prompt_ids) + len(r.out_ids)  # a preempted request resumes from all it has
                seq = SeqBlocks(self.pool)
                # room for the input, plus a block of headroom per running sequence for its next steps
                if seq.blocks_needed(n + 1) + len(self._running) > self.pool.blocks_available and self._running:
                    return None  # wait for memory to free up
                self._waiting.popleft()
            if not seq.reserve(n + 1):
                # only a preempted request can get here (submit checks prompts): it outgrew the whole cache
                self._finish(r, "length")
                continue
            r._seq = seq
            try:
                self._prepare(r)
            except Exception as e:
                self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                continue
            self._running.append(r)
            return r

    def _prepare(self, r: Request) -> None:
        """Per-request sampling state, created once (a preempted request keeps its generator)."""
        if r._stream is not None:
            return
        # a bare preset has no tokenizer: it serves token ids only, with no text
        r._stream = TextStream(self.llm._decode if self.llm.tokenizer is not None else lambda ids: "", r.gen.stop)
        if r.gen.temperature > 0:
            r._generator = torch.Generator(device=self.device)
            if r.gen.seed is not None:
                r._generator.manual_seed(r.gen.seed)
            else:
                r._generator.seed()
        if r.gen.repetition_penalty != 1.0:
            r._seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            r._seen[0, torch.tensor(r.prompt_ids, device=self.device)] = True

    def _make_room(self) -> None:
        """Every running sequence needs slots for the tokens it feeds next; preempt the newest when memory
        is out (it is recomputed later, with the same output)."""
        i = 0
        while i < len(self._running):
            r = self._running[i]
            if r._seq.reserve(r._seq.length + _pending(r)):
                i += 1
                continue
            if len(self._running) == 1:  # alone and still out of memory: the cache cap ends it
                self._finish(r, "length")
                break
            victim = self._running.pop()  # the most recently admitted
            victim._seq.release()
            victim._seq = None
            self.metrics.preemptions += 1
            with self._cond:
                self._waiting.appendleft(victim)

    def _step(self) -> None:
        """One packed forward pass: each decoding sequence's last token, then prompt chunks up to the budget."""
        self._make_room()
        rows = [r for r in self._running if _pending(r) == 1]  # decoding (or one input token left)
        counts = [1] * len(rows)
        budget = self.prefill_tokens
        for r in self._running:
            if budget > 0 and _pending(r) > 1:
                rows.append(r)
                counts.append(min(_pending(r), budget))
                budget -= counts[-1]
        while budget > 0 and len(self._running) < self.max_seqs:
            r = self._admit()
            if r is None:
                break
            rows.append(r)
            counts.append(min(_pending(r), budget))
            budget -= counts[-1]
        if not rows:
            return
        seqs = [r._seq for r in rows]
        tokens, last, off = [], [], 0
        for r, c in zip(rows, counts):
            n = r._seq.length
            p = len(r.prompt_ids)
            tokens += (r.prompt_ids[n:n + c] + r.out_ids[max(0, n - p):max(0, n + c - p)]) if n < p \
                else r.out_ids[n - p:n - p + c]
            off += c
            last.append(off - 1)
        done = [i for i, (r, c) in enumerate(zip(rows, counts)) if _pending(r) == c]  # read all their input
        batch = PagedBatch(self.pool, seqs, counts)
        x = torch.tensor([tokens], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        # fp32 on the CPU: a step of a few rows is matrix-vector work, through numpy's BLAS where that is faster
        with blas_decode(not self._quantized and blas_decode_helps(self._blas_weight, batch.N)):
            h = self.model.hidden_states(x, cache=batch)[0]  # (N, C)
            logits = None
            if done:
                idx = torch.tensor([last[i] for i in done], device=self.device)
                logits = self.model.head_logits(h.index_select(0, idx))  # (rows done, V)
        batch.commit()
        self.steps += 1
        if done:
            self._emit([rows[i] for i in done], logits)
        self.metrics.step(len(done), time.perf_counter() - t0)

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per row from logits (B, V), send it on, finish the rows that are done."""
        toks = [0] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.gen.temperature == 0 and r._seen is None]
        if greedy:
            picked = logits[greedy].float().argmax(dim=-1).tolist()
            for i, t in zip(greedy, picked):
                toks[i] = t
        for i, r in enumerate(rows):
            if r.gen.temperature != 0 or r._seen is not None:
                toks[i] = int(sample_next(logits[i:i + 1], r.gen, r._generator, r._seen)[0])
        now = time.perf_counter()
        block = self.model.config.block_size
        for r, t in zip(rows, toks):
            if r._seen is not None:
                r._seen[0, t] = True
            r.out_ids.append(t)
            if r.t_first is None:
                r.t_first = now
                self.metrics.first_token(now - r.t_submit)
            self.metrics.tokens += 1
            if t in r.eos:
                self._finish(r, "stop", token=t)
                continue
            piece = r._stream.push(t)
            if r._stream.stopped:
                self._finish(r, "stop", piece, token=t)
            elif len(r.out_ids) >= r.gen.max_new_tokens or len(r.prompt_ids) + len(r.out_ids) >= block:
                self._finish(r, "length", piece, token=t)
            else:
                self._send(r, Event(piece, t))

    def _send(self, r: Request, ev: Event) -> None:
        r.text += ev.text
        if r.sink is not None:
            try:
                r.sink(ev)
            except Exception:  # a broken consumer (closed connection) cancels its request only
                r._cancel = True
        else:
            r._events.put(ev)

    def _finish(self, r: Request, reason: str, piece: str = "", error: str | None = None,
                token: int | None = None) -> None:
        if r in self._running:
            self._running.remove(r)
        if r._seq is not None:
            r._seq.release()
            r._seq = None
        rest = r._stream.flush() if r._stream is not None and reason in ("stop", "length") else ""
        r.finish_reason, r.error, r.t_end = reason, error, time.perf_counter()
        self.metrics.finished[reason] += 1
        self._send(r, Event(piece + rest, token, reason))
        r._done.set()


def _pending(r: Request) -> int:
    """Input tokens a running request has not fed yet: 1 while decoding, more while reading its prompt."""
    return len(r.prompt_ids) + len(r.out_ids) - r._seq.length
