"""CLI commands of the data stage (`lmforge prepare`)."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError


def _default_out(source: str, tokenizer: str) -> Path:
    src = Path(source).stem if source else "data"
    tok = "char" if tokenizer == "char" else Path(tokenizer).name or "tokenizer"
    return Path("out") / "data" / f"{src}-{tok}"


def prepare(source: str = "shakespeare", tokenizer: str = "char", out: str = "",
            val_fraction: float = 0.0005, text_field: str = "text", overwrite: bool = False,
            progress: bool = True) -> int:
    """Tokenize a corpus into train/val(/test) token files (np.memmap-ready) plus a manifest.

    Args:
        source: "shakespeare" (embedded; split by whole works), a .txt/.md/.jsonl file or a folder.
        tokenizer: a folder holding tokenizer.json, or "char" for teenyGPT's character tokenizer.
        out: output folder; default out/data/<source>-<tokenizer>.
        val_fraction: share of a file/folder source held out for validation (by document).
        text_field: JSON key holding the text in .jsonl files.
        overwrite: replace an existing prepared folder made from other data or settings.
        progress: show a progress bar on a terminal.
    """
    from lmforge.data.shard_reader import read_manifest
    from lmforge.data.shards import prepare as prepare_shards

    if tokenizer == "char":
        from lmforge.tokenizers import CharTokenizer

        tok = CharTokenizer()
        # No EOS in teenyGPT's vocabulary: BOS starts the next document instead.
        kwargs = {"normalize": CharTokenizer.normalize, "sep_id": tok.bos_id}
    else:
        from lmforge.tokenizers import load_tokenizer

        if not tokenizer:
            raise ConfigError("no tokenizer given; pass --tokenizer char or a folder holding tokenizer.json")
        tok = load_tokenizer(tokenizer)
        kwargs = {}
    out_dir = Path(out) if out else _default_out(source, tokenizer)
    path = prepare_shards(source, tok, out_dir, val_fraction=val_fraction, text_field=text_field,
                          overwrite=overwrite, progress=progress, **kwargs)
    manifest = read_manifest(path)
    parts = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']} docs"
                      for s, v in manifest["splits"].items())
    print(f"{path}: {parts} ({manifest['dtype']}, vocab {manifest['vocab_size']})")
    return 0
