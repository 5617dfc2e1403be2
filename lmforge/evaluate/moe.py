"""Mixture-of-experts against dense at matched active parameters: routing overhead and loss at fixed compute.

`moe_pair` builds a top-k MoE and the dense model with the same active parameters per token;
`moe_throughput` times their training steps side by side; `moe_vs_dense` trains both on the embedded
corpus for the same tokens and compares validation curves (`lmforge bench moe`).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.models import DecoderLM
from lmforge.presets import get_preset


def moe_pair(d_model: int = 256, n_layer: int = 4, vocab: int = 256, n_experts: int = 8, top_k: int = 2
             ) -> dict[str, Config]:
    """A top-k MoE and the dense model with the same active parameters (MLP width = k x expert width)."""
    h = 2 * d_model
    base = get_preset("tiny-llama").replace(vocab_size=vocab, block_size=2048, d_model=d_model, n_layer=n_layer,
                                            **{"attention.n_head": d_model // 64, "attention.n_kv_head": d_model // 64})
    dense = base.replace(name="dense", **{"mlp.hidden": top_k * h})
    moe = base.replace(name="moe", block="attention+moe", **{"mlp.hidden": h, "moe.n_experts": n_experts,
                                                              "moe.top_k": top_k, "moe.hidden": h})
    return {"dense": dense, "moe": moe}



MOE_SHAPES = ((128, 8, 64), (256, 4, 256))  # (d_model, batch, seq_len): the Trainer's run in `bench moe`, and larger


def moe_throughput(shapes=MOE_SHAPES, steps: int = 6, log=print) -> dict:
    """Training tokens/s (forward + backward + the Trainer's AdamW) of an MoE and the dense model with its
    active parameters (`moe_pair`), at each (d_model, batch, seq_len) in `shapes`: steps alternate between
    the two models (so load from other processes hits both alike), the best of `steps` after a warm-up."""
    from lmforge.train.optim import OptimConfig, build_optimizer

    out = {}
    for d, batch, seq_len in shapes:
        torch.manual_seed(0)
        models = {name: DecoderLM(cfg) for name, cfg in moe_pair(d_model=d).items()}
        opts = {name: build_optimizer(m, OptimConfig(lr=1e-4)) for name, m in models.items()}
        x = torch.randint(0, 256, (batch, seq_len))
        times = dict.fromkeys(models, math.inf)
        for i in range(steps + 1):  # the first is a warm-up
            for name, m in models.items():
                t = time.perf_counter()
                loss = m(x).float().logsumexp(-1).mean() + (m.aux_loss() if name == "moe" else 0)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if i:
                    times[name] = min(times[name], time.perf_counter() - t)
        res = {name: {"tok_s": batch * seq_len / times[name], "active_flops_per_token": m.estimate_flops(seq_len),
                      "params": m.num_params()} for name, m in models.items()}
        res["ratio"] = res["moe"]["tok_s"] / res["dense"]["tok_s"]
        out[f"d{d}-{batch}x{seq_len}"] = res
        log(json.dumps({"moe_throughput": f"d{d}-{batch}x{seq_len}", **res}))
    return out


def moe_vs_dense(out: str | Path, steps: int = 150, batch: int = 8, seq_len: int = 64, d_model: int = 128,
                 log=print) -> dict:
    """Dense vs MoE at fixed compute on the embedded corpus (characters): the same active parameters per
    token (dense MLP width = k x expert width), the same tokens, so the same training FLOPs; validation loss
    curves and tokens/s side by side, written to `out`/moe_vs_dense.{json,png}."""
    import numpy as np

    from lmforge.data.corpus import corpus_works, read_work
    from lmforge.tokenizers.char import CharTokenizer
    from lmforge.train import CausalLM, OptimConfig, TokenWindows, TrainConfig, Trainer

    tok = CharTokenizer()
    enc = lambda split, n: np.asarray(tok.encode(tok.normalize(  # noqa: E731
        " ".join(read_work(w) for w in corpus_works(split))[:n]), add_special_tokens=False), dtype=np.uint16)
    train, val = enc("train", 400_000), enc("val", 40_000)
    out = Path(out)
    res = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-moe-") as scratch:
        for name, cfg in moe_pair(d_model=d_model, n_layer=4, vocab=tok.vocab_size).items():
            torch.manual_seed(0)
            model = DecoderLM(cfg.replace(block_size=seq_len))
            run = Path(scratch) / name  # the runs are scratch: a second `lmforge bench moe` must not find them
            tc = TrainConfig(max_steps=steps, batch_size=batch, progress=False, eval_every=max(steps // 10, 1),
                             checkpoint_every=0, peak_flops=1e11)
            tr = Trainer(model, CausalLM(), TokenWindows(train, batch, seq_len, val_tokens=val, eval_batches=4), tc,
                         OptimConfig(lr=3e-3, warmup_steps=10, min_lr=3e-4), run_dir=run)
            r = tr.fit(resume=None)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            curve = [(x["step"], x["loss"]) for x in rows if x.get("split") == "val"]
            res[name] = {"tok_s": r.tokens_per_s, "val_curve": curve, "final_val": r.val.get("loss"),
                         "active_flops_per_token": model.estimate_flops(seq_len), "params": model.num_params()}
            log(json.dumps({"model": name, **{k: v for k, v in res[name].items() if k != "val_curve"}}))
    res["tok_s_ratio"] = res["moe"]["tok_s"] / res["dense"]["tok_s"]
    (out / "moe_vs_dense.json").write_text(json.dumps(res, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("dense", "moe"):
        ax.plot(*zip(*res[name]["val_curve"]), "o-", label=f"{name} ({res[name]['tok_s']:.0f} tok/s)")
    ax.set_xlabel("step (same tokens, same active FLOPs)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "moe_vs_dense.png", dpi=90)
    plt.close(fig)
    return res
