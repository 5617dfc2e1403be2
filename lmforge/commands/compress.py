"""`lmforge prune` and `lmforge distill`."""

from __future__ import annotations

import json
from typing import Literal

from lmforge.errors import ConfigError


def prune(model: str = "runs/quickstart/model", out: str = "runs/pruned",
          method: Literal["magnitude", "2:4", "heads", "mlp"] = "magnitude",
          sparsity: float = 0.5, keep: float = 0.5, scope: Literal["layer", "global"] = "layer",
          eval_source: str = "shakespeare", eval_tokens: int = 4096, report: bool = True) -> int:
    """Prune a model and write the result; print parameters, perplexity and decode speed before and after.

    Example: lmforge prune --model runs/quickstart/model --method heads --keep 0.5 --out runs/pruned

    Args:
        model: a model folder, .gguf file or short name.
        out: folder for the pruned model.
        method: magnitude (unstructured), 2:4 (semi-structured), heads (drop attention heads), mlp (drop MLP
            channels); heads and mlp really shrink the model.
        sparsity: magnitude: fraction of block weights set to 0.
        keep: heads / mlp: fraction of heads (KV groups) or MLP channels kept in every layer.
        scope: magnitude: rank weights per matrix (layer) or over all blocks (global).
        eval_source: corpus whose test split measures perplexity (embedded name, or a text file).
        eval_tokens: tokens of it to score.
        report: measure before and after (perplexity, speed); off: just prune.
    """
    import lmforge
    from lmforge.compress import prune as P
    from lmforge.compress.report import held_out_text, measure, print_comparison

    llm = lmforge.load(model, dequantize=True)  # pruning edits float weights
    text = held_out_text(eval_source) if report else ""
    before = measure(llm, text, eval_tokens) if report else None
    if method == "magnitude":
        P.magnitude_prune(llm.model, sparsity, scope)
    elif method == "2:4":
        P.semi_structured_prune(llm.model)
    elif method == "heads":
        llm = lmforge.LLM(P.prune_heads(llm.model, keep), llm.tokenizer)
    elif method == "mlp":
        llm = lmforge.LLM(P.prune_mlp(llm.model, keep), llm.tokenizer)
    else:
        raise ConfigError(f"unknown pruning method {method!r}; choose magnitude, 2:4, heads or mlp")
    llm.save(out)
    print(f"pruned ({method}) -> {out}")
    if report:
        after = measure(llm, text, eval_tokens)
        print_comparison(before, after, f"{model} pruned by {method}")
        print(json.dumps({"method": method, "before": before, "after": after}))
    return 0


def distill(teacher: str = "runs/quickstart/model", out: str = "runs/distill", layers: int | None = None,
            steps: int = 200,
            batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3, temperature: float = 2.0, alpha: float = 0.5,
            hidden_weight: float = 0.0, source: str = "shakespeare", train_tokens: int = 400_000,
            eval_tokens: int = 4096, seed: int = 0, report: bool = True) -> int:
    """Distill a teacher into a shallower student of the same tokenizer; print before/after numbers.

    The student keeps the teacher's width and vocabulary and starts from evenly spaced teacher layers;
    it trains with the one trainer on the teacher's tokens of `source` (KL at a temperature + next-token
    loss, optional hidden-state matching). The run folder `out` gets checkpoints, metrics.jsonl, curves.png
    and model/ (the student).

    Example: lmforge distill --teacher runs/quickstart/model --layers 2 --steps 200 --out runs/distill

    Args:
        teacher: the teacher model (folder, .gguf or short name).
        out: run folder.
        layers: the student's depth (default: half the teacher's).
        steps: optimizer steps.
        batch_size: sequences per step.
        seq_len: tokens per sequence (at most the context).
        lr: peak learning rate.
        temperature: softening of teacher and student distributions.
        alpha: weight of the soft KL term (1 - alpha: next-token loss).
        hidden_weight: weight of final hidden-state MSE matching (0 = off).
        source: training text: embedded corpus name or a text/JSONL file or folder.
        train_tokens: tokens of it to train on (the first ones; a tenth as many for validation).
        eval_tokens: tokens of the held-out split scored for perplexity.
        seed: seed of the data order.
        report: measure teacher and student (perplexity, parameters, decode speed).
    """
    import numpy as np

    import lmforge
    from lmforge.compress.distill import Distill, student_from_teacher
    from lmforge.compress.report import held_out_text, measure, print_comparison
    from lmforge.data import iter_documents
    from lmforge.train import OptimConfig, TokenWindows, TrainConfig, Trainer

    t = lmforge.load(teacher, dequantize=True)
    if t.tokenizer is None:
        raise ConfigError(f"{teacher}: the teacher has no tokenizer; distillation tokenizes text with it")
    n_layer = layers or max(1, t.config.n_layer // 2)
    seq_len = min(seq_len, t.config.block_size)
    torch_seed(seed)
    student = student_from_teacher(t.model.float(), n_layer)
    tok = t.tokenizer
    encode = lambda doc: tok.encode(tok.normalize(doc) if hasattr(tok, "normalize") else doc, add_special_tokens=False)
    ids: list[int] = []
    for doc in iter_documents(source, "train"):
        ids += encode(doc)
        if len(ids) > train_tokens:
            break
    val_ids: list[int] = []
    for doc in iter_documents(source, "val"):
        val_ids += encode(doc)
        if len(val_ids) > train_tokens // 10:
            break
    val = np.array(val_ids[:train_tokens // 10], dtype=np.int64)
    data = TokenWindows(np.array(ids[:train_tokens], dtype=np.int64), batch_size, seq_len, seed=seed,
                        val_tokens=val if len(val) > seq_len + 1 else None, eval_batches=4)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, seq_len=seq_len, eval_every=max(steps // 4, 1),
                      checkpoint_every=max(steps // 2, 1), seed=seed)
    trainer = Trainer(student, Distill(t.model, temperature, alpha, hidden_weight), data, cfg,
                      OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(20, steps // 10)), run_dir=out,
                      tokenizer=t.tokenizer)
    result = trainer.fit()
    print(f"student: {n_layer} of {t.config.n_layer} layers -> {out}/model (stopped by {result.stopped})")
    if report:
        text = held_out_text(source)
        print_comparison(measure(t, text, eval_tokens), measure(lmforge.load(f"{out}/model"), text, eval_tokens),
                         f"teacher {teacher} -> student")
    return 0


def torch_seed(seed: int) -> None:
    """Seed torch (the student's fresh parts, if any)."""
    import torch

    torch.manual_seed(seed)
