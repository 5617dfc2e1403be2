"""CLI command: `lmforge serve`."""

from __future__ import annotations


def serve(model: str = "smollm2", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, tokenizer: str | None = None,
          max_seqs: int = 16, max_queue: int = 64, max_kv_mb: int = 1024, max_body_kb: int = 1024,
          max_prompt_tokens: int | None = None, max_tokens: int | None = None, graceful_timeout: float = 10.0,
          log_level: str = "info", dequantize: bool = False, prefill_tokens: int = 512) -> int:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/.

    Endpoints: /v1/chat/completions and /v1/completions (streaming or not), /v1/embeddings, /v1/models,
    /health, /metrics (Prometheus). Example: lmforge serve --model smollm2 --port 8000

    Args:
        model: a model folder, a .gguf file, a short name (smollm2) or preset:<name>.
        host: address to bind; 127.0.0.1 keeps the server local (0.0.0.0 exposes it).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $LMFORGE_API_KEY).
        model_name: the model id clients send (default: the model's config name).
        dtype: float32 or bfloat16 (default: as stored).
        tokenizer: a folder or tokenizer.json to use instead of the model's own.
        max_seqs: most sequences decoding together.
        max_queue: most requests waiting; beyond it requests get 429.
        max_kv_mb: cap on KV cache memory in MiB.
        max_body_kb: largest request body in KiB (413 beyond).
        max_prompt_tokens: longest prompt accepted (default: the model's context).
        max_tokens: largest max_tokens a request may ask for (default: the model's context).
        graceful_timeout: seconds open requests get to finish on SIGTERM before they are cancelled.
        log_level: uvicorn's log level.
        dequantize: expand a GGUF file's Q8_0/Q4_0/Q4_1 layers to float (--dtype) instead of running them
            quantized: on a CPU with AMX, bfloat16 reads prompts ~3x faster than Q4_1 (README, Serving).
        prefill_tokens: most prompt tokens read per engine step beside the decoding streams (longer prompts
            are read in chunks); larger reads prompts faster, smaller pauses running streams less.
    """
    import lmforge
    from lmforge.serve.server import ServerLimits
    from lmforge.serve.server import serve as run

    llm = lmforge.load(model, dtype=dtype, tokenizer=tokenizer, dequantize=dequantize)
    limits = ServerLimits(max_body_bytes=max_body_kb * 1024, max_prompt_tokens=max_prompt_tokens,
                          max_tokens=max_tokens)
    print(f"lmforge: serving {model_name or llm.config.name} on http://{host}:{port}/ (chat page) and "
          f"http://{host}:{port}/v1 (OpenAI API)", flush=True)
    run(llm, host, port, api_key=api_key, model_name=model_name, limits=limits, graceful_timeout=graceful_timeout,
        log_level=log_level, max_seqs=max_seqs, max_queue=max_queue, max_kv_bytes=max_kv_mb << 20,
        prefill_tokens=prefill_tokens)
    return 0
