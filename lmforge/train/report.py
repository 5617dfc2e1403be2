"""A training run's report: test-split metrics and samples of the model it leaves (test_metrics.json).

`final_report` scores the run's model (the best one when early stopping kept one) on the test split the
data kind gave, adds samples at two temperatures, and writes test_metrics.json; `print_report` words it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.io import write_json
from lmforge.train.objectives import CausalLM
from lmforge.train.run import Run
from lmforge.train.trainer import TrainResult, evaluate


def samples(llm, n: int, max_new_tokens: int, prompt: str = "", seed: int = 0,
            temperatures: tuple[float, ...] = (0.1, 1.0)) -> dict[str, list[str]]:
    """`n` samples per temperature; an empty prompt starts from BOS (or the end-of-text token)."""
    tok = llm.tokenizer
    if not prompt and not llm.encode_prompt(""):
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        prompt = tok.id_to_token(start) if start is not None else "\n"
    out: dict[str, list[str]] = {}
    for temp in temperatures:
        out[str(temp)] = [llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temp, seed=seed + i)
                          for i in range(n)]
    return out


def _reported_llm(run: Run, folder):
    """The model `folder` holds: the trained one still in memory where that is it (the final model of a
    one-process run whose objective has no heads of its own), else loaded. Loading the final model beside
    the trained one would hold the weights twice: a QLoRA run's peak went from 806 to 1,566 MB that way
    (SmolLM2, its NF4 base coming back as fp32)."""
    from lmforge.llm import LLM, load

    trainer = run.trainer
    if folder.name == "model" and trainer.dist.strategy == "single" and not len(trainer.heads):
        return LLM(run.model, run.tokenizer)  # eval mode: the training is over
    return load(folder)


def final_report(run: Run, result: TrainResult, extra: Callable[[Any], dict] | None = None) -> dict[str, Any]:
    """Test-split metrics and samples of the run's model (the best one when early stopping kept one).

    extra: more test metrics of that model, `extra(llm) -> dict`, merged into the report's "test"."""
    recipe, t = run.recipe, run.recipe.train
    folder = run.run_dir / ("best" if t.patience > 0 and (run.run_dir / "best").is_dir() else "model")
    report: dict[str, Any] = {"model_folder": str(folder), "step": result.step, "stopped": result.stopped,
                              "elapsed_s": round(result.elapsed, 1), "val": result.val, **run.info}
    if not folder.is_dir():
        return report
    llm = _reported_llm(run, folder)
    if run.test_seqs is not None:
        from lmforge.train.teeny import sequence_report

        report["test"] = sequence_report(llm.model, run.test_seqs, run.tokenizer.pad_id, dtype=t.dtype)
    elif run.test_batches is not None:
        objective = run.trainer.objective if not isinstance(run.trainer.objective, CausalLM) else CausalLM()
        report["test"] = evaluate(llm.model, objective, run.test_batches(), t.dtype)
    if extra is not None:
        report.setdefault("test", {}).update(extra(llm))
    if recipe.run.samples and llm.config.attention.causal:  # an encoder cannot generate
        report["samples"] = samples(llm, recipe.run.samples, recipe.run.sample_tokens, recipe.run.sample_prompt,
                                    seed=t.seed)
    write_json(run.run_dir / "test_metrics.json", report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """Human-readable summary of `final_report`."""
    print(f"model: {report['model_folder']} (step {report['step']}, stopped by {report['stopped']}, "
          f"{report['elapsed_s']}s of training)")
    if report.get("val"):
        v = report["val"]
        print(f"validation: loss {v['loss']:.4f}  ppl {v['ppl']:.2f}  acc {v['acc']:.4f}")
    test = report.get("test")
    if test and "nll_per_seq_masked" in test:
        print(f"test ({int(test['sequences'])} sequences): NLL/seq masked {test['nll_per_seq_masked']:.2f} nats, "
              f"unmasked {test['nll_per_seq_unmasked']:.2f} nats; acc masked {test['acc_masked']:.4f}, unmasked "
              f"{test['acc_unmasked']:.4f}; NLL/token masked {test['nll_per_token_masked']:.4f}")
    elif test:
        print(f"test: loss {test['loss']:.4f}  ppl {test['ppl']:.2f}  acc {test['acc']:.4f}")
    for temp, texts in (report.get("samples") or {}).items():
        for s in texts:
            print(f"sample (temperature {temp}): {s!r}")
