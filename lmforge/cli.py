"""`lmforge <command>`: the command line, generated from typed Python functions.

Each command is a plain function with type hints and a Google-style docstring in `lmforge.commands`, registered
in `COMMANDS` as "module:function" so that `lmforge --help` imports nothing heavy. Parameters become
options (`--max-new-tokens`); a parameter without a default becomes a positional argument;
`bool` becomes a `--flag/--no-flag` pair; `Literal[...]` becomes a choice; `list[str]` takes many
values. The docstring's first paragraph is the command's help, its `Args:` lines the options' help.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable

from lmforge.errors import LMForgeError

# name -> ("module:function", one-line help). The help is here, not read from the function, so that
# `lmforge --help` lists every command without importing any of them. Keep the order of a model's life.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lmforge.commands.train:quickstart",
                   "train a BPE tokenizer and a small GPT on the embedded corpus, then sample"),
    "train-tokenizer": ("lmforge.commands.tokenizer:train_tokenizer", "train a tokenizer on a corpus"),
    "prepare": ("lmforge.commands.data:prepare", "tokenize a corpus into memory-mapped token shards"),
    "pretrain": ("lmforge.commands.train:pretrain", "pre-train a model from a YAML recipe"),
    "ngram": ("lmforge.commands.train:ngram", "fit a count-based n-gram LM (Kneser-Ney or backoff) as a baseline"),
    "finetune": ("lmforge.commands.train:finetune",
                 "fine-tune a pretrained model on instructions: full, LoRA, DoRA, QLoRA, adapters, prefix/prompt"),
    "align": ("lmforge.commands.align:align", "align with preferences: DPO, IPO, SimPO, ORPO, reward model, PPO"),
    "merge": ("lmforge.commands.merge:merge", "merge fine-tunes of one base (average, task arithmetic, TIES, DARE)"),
    "distill": ("lmforge.commands.compress:distill", "distill a teacher into a smaller student of its tokenizer"),
    "prune": ("lmforge.commands.compress:prune", "prune a model (magnitude, 2:4, attention heads, MLP channels)"),
    "quantize": ("lmforge.commands.quant:quantize", "quantize a model's linear layers (int8, int4, nf4, q8_0)"),
    "generate": ("lmforge.commands.infer:generate", "continue a prompt with a model"),
    "chat": ("lmforge.commands.infer:chat", "chat with a model (its chat template), one turn or interactively"),
    "embed": ("lmforge.commands.infer:embed", "sentence embeddings from an encoder (MiniLM), to .npy or JSONL"),
    "serve": ("lmforge.commands.serve:serve", "serve a model: OpenAI-compatible HTTP API and a chat page"),
    "convert": ("lmforge.commands.interop:convert", "convert a model between lmforge, Hugging Face and GGUF"),
    "eval": ("lmforge.commands.evaluate:eval_", "evaluate a model (perplexity, bits per byte)"),
    "inspect": ("lmforge.commands.inspect:inspect",
                "look inside a model: attention, rollout, head ablation, logit lens, attribution, probes"),
    "env": ("lmforge.commands.env:env", "what to paste into a bug report: the CPU, its kernels, the fast paths chosen"),
    "bench": ("lmforge.commands.evaluate:bench",
              "measure block families' time/memory growth (complexity) or MoE routing overhead (moe)"),
}


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {arg: help})."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    head, _, rest = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        m = re.match(r"^\s{2,4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip() and line.startswith(" " * 6):
            helps[current] += " " + line.strip()
        elif not line.strip():
            continue
        else:
            current = None
    return head.strip(), helps


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser_for(fn: Callable, parser: argparse.ArgumentParser) -> None:
    """Add one argparse argument per parameter of `fn`, from its type hints and docstring."""
    desc, helps = _parse_docstring(fn.__doc__)
    parser.description = desc
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        help_ = helps.get(name, "")
        flag = "--" + name.rstrip("_").replace("_", "-")
        required = param.default is inspect.Parameter.empty
        kw: dict = {"help": help_}
        if tp is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=False if required else param.default, help=help_)
            continue
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif origin is list:
            (inner,) = typing.get_args(tp) or (str,)
            kw["type"] = inner
            kw["nargs"] = "+" if required else "*"
        elif tp in (int, float, str):
            kw["type"] = tp
        if required:
            parser.add_argument(name, metavar=name.upper(), **kw)
        else:
            if param.default is not None and help_ and not kw.get("nargs"):
                kw["help"] = f"{help_} (default: {param.default})"
            parser.add_argument(flag, dest=name, default=param.default, **kw)


def _load(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lmforge", description="lmforge: a language model's whole life.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported; the others get a one-line help entry.
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (target, short) in COMMANDS.items():
        if name == chosen:
            fn = _load(target)
            p = sub.add_parser(name, help=short, formatter_class=argparse.RawDescriptionHelpFormatter)
            build_parser_for(fn, p)
            p.set_defaults(_fn=fn)
        else:
            sub.add_parser(name, help=short, add_help=False)
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 0 if not argv else 2
    fn = args._fn
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "_fn")}
    try:
        result = fn(**kwargs)
    except (LMForgeError, FileNotFoundError) as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    dist = sys.modules.get("lmforge.train.distributed")  # imported only by commands that can run under torchrun
    if dist is not None:
        dist.finish()  # every rank ends together, and its process group while Python is whole
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
