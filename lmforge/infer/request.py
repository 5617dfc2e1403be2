"""What the serving engine hands out and keeps count of: requests, their events and completions, metrics.

A `Request` is created by `Engine.submit` (`lmforge.infer.engine`) and read from any thread: iterate it, or
wait for `result()`. Its underscored fields belong to the engine thread.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.errors import LMForgeError
from lmforge.infer.generate import GenerationConfig, TextStream
from lmforge.infer.paged import SeqBlocks


class QueueFullError(LMForgeError):
    """The engine's waiting queue is full: retry later (an HTTP server answers 429)."""


class EngineStoppedError(LMForgeError):
    """The engine is not running (not started yet, or shutting down)."""


@dataclass
class Event:
    """One thing that happened to a request: new text (and the token that made it), or its end."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event


@dataclass
class Completion:
    """A finished request: its text, tokens, why it ended and its timings."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None  # seconds from submission to the first token
    seconds: float  # submission to end
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A submitted request; iterate it for text pieces as they come, or call `result()`.

    Created by `Engine.submit`. `cancel()` may be called from any thread: the engine frees its slot and
    memory before its next step.
    """

    id: int
    prompt_ids: list[int]
    gen: GenerationConfig
    eos: frozenset[int]
    sink: Callable[[Event], None] | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_end: float | None = None
    # engine-side state
    _cancel: bool = False
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None
    _seq: SeqBlocks | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    _done: threading.Event = field(default_factory=threading.Event)
    _engine_wake: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request (its result then ends with finish_reason "cancelled")."""
        self._cancel = True
        if self._engine_wake is not None:
            self._engine_wake()

    @property
    def done(self) -> bool:
        """True once the request has ended (its last event has been sent)."""
        return self._done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they happen, the last one with a finish_reason (not with a custom sink)."""
        while True:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
            yield ev
            if ev.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if ev.text:
                yield ev.text

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and return the whole completion."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished within {timeout} s")
        return Completion(self.text, list(self.out_ids), self.finish_reason or "error", len(self.prompt_ids),
                          len(self.out_ids), None if self.t_first is None else self.t_first - self.t_submit,
                          (self.t_end or time.perf_counter()) - self.t_submit, self.error)


class EngineMetrics:
    """Counters and recent rates for `/metrics`: tokens, steps, time to first token."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, window: float = 10.0):
        self.requests = 0
        self.tokens = 0
        self.preemptions = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.ttft_hist = [0] * len(self.TTFT_BUCKETS)
        self.window = window
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._lock = threading.Lock()  # the engine thread appends while a server thread reads
        self.last_ttft: float | None = None

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        self.last_ttft = seconds
        for i, b in enumerate(self.TTFT_BUCKETS):
            if seconds <= b:
                self.ttft_hist[i] += 1

    def step(self, rows: int, seconds: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self._recent.append((now, rows))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Decoded tokens per second over the last `window` seconds."""
        now = time.perf_counter()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - self.window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def snapshot(self) -> dict[str, float]:
        return {"requests_total": self.requests, "tokens_total": self.tokens, "preemptions_total": self.preemptions,
                "tokens_per_second": self.tokens_per_second(), "ttft_seconds_sum": self.ttft_sum,
                "ttft_seconds_count": self.ttft_count,
                **{f"finished_{k}": v for k, v in self.finished.items()}}
