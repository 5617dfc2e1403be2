"""Tokenized datasets on disk: one flat token file per split (`lmforge.data.shard_reader` reads them back).

`prepare(source, tokenizer, out_dir)` streams the documents of a source through a tokenizer and
writes

    out_dir/train.bin  val.bin  [test.bin]   raw little-endian uint16 (vocab <= 65536) or uint32 ids,
                                             each document followed by the separator (EOS) id
    out_dir/manifest.json                    tokenizer hash, vocab size, dtype, token and document
                                             counts per split, source, creation time, lmforge version

Tokens never sit in RAM as a whole: they are appended to the files in chunks of `chunk_tokens`.
The folder is written under a temporary name and renamed into place, so a crash leaves either the
old folder or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.corpus import (
    SPLITS,
    TEST_WORKS,
    VAL_WORKS,
    corpus_works,
    is_embedded,
    iter_documents,
    read_work,
    source_files,
)
from lmforge.data.shard_reader import FORMAT, MANIFEST, TokenizerLike, read_manifest
from lmforge.errors import ConfigError, FormatError
from lmforge.io import publish_dir, write_json

DEFAULT_VAL_FRACTION = 0.0005
CHUNK_TOKENS = 1 << 20  # tokens buffered before each write (8 MB at most)
BATCH_DOCS = 64  # documents per encode_batch call
# A document longer than this is encoded in pieces cut after a newline that sits between two
# non-space characters: byte-level BPE pre-tokenizes such a newline as a token of its own, so the
# pieces' ids equal the whole document's, while peak memory stays bounded.
PIECE_CHARS = 1 << 22

SplitMode = Literal["auto", "works", "documents", "tail"]


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- writing -----------------------------------------------------------------------------------------
class _TokenWriter:
    """Appends ids to a file through a fixed-size numpy buffer."""

    def __init__(self, path: Path, dtype: np.dtype, vocab_size: int, chunk_tokens: int):
        self.f = open(path, "wb")
        self.buf = np.empty(max(1, chunk_tokens), dtype=np.int64)
        self.n_buf = 0
        self.dtype, self.vocab_size = dtype, vocab_size
        self.tokens = 0
        self.documents = 0

    def write(self, ids: list[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        while len(arr):
            take = min(len(arr), len(self.buf) - self.n_buf)
            self.buf[self.n_buf:self.n_buf + take] = arr[:take]
            self.n_buf += take
            arr = arr[take:]
            if self.n_buf == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if not self.n_buf:
            return
        chunk = self.buf[:self.n_buf]
        if chunk.min() < 0 or chunk.max() >= self.vocab_size:
            bad = int(chunk[(chunk < 0) | (chunk >= self.vocab_size)][0])
            raise ConfigError(f"the tokenizer produced id {bad}, outside its vocab_size {self.vocab_size}; "
                              "the tokenizer is inconsistent (re-train or re-save it)")
        chunk.astype(self.dtype.newbyteorder("<")).tofile(self.f)
        self.tokens += self.n_buf
        self.n_buf = 0

    def close(self) -> None:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`text` cut into pieces of about `limit` characters after a newline between non-space chars."""
    start = 0
    while len(text) - start > limit:
        cut = -1
        pos = start + limit
        while cut < 0:
            nl = text.find("\n", pos)
            if nl < 0:
                break
            if 0 < nl < len(text) - 1 and not text[nl - 1].isspace() and not text[nl + 1].isspace():
                cut = nl + 1
            pos = nl + 1
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_docs(tok: TokenizerLike, docs: list[str]) -> Iterator[list[int]]:
    """ids of each document (no special tokens), long documents in pieces (see PIECE_CHARS)."""
    short = [d for d in docs if len(d) <= PIECE_CHARS]
    encoded = iter(tok.encode_batch(short, add_special_tokens=False) if short else [])
    for d in docs:
        if len(d) <= PIECE_CHARS:
            yield next(encoded)
        else:
            ids: list[int] = []
            for piece in _pieces(d):
                ids.extend(tok.encode(piece, add_special_tokens=False))
            yield ids


def _doc_hash(index: int) -> float:
    """A document index's place in [0, 1): sha1 of its decimal string."""
    return int.from_bytes(hashlib.sha1(str(index).encode()).digest()[:8], "big") / 2.0**64


def held_out_documents(n_docs: int, val_fraction: float) -> set[int]:
    """Indices of the documents that go to "val": those whose `_doc_hash` is below `val_fraction`,
    at least one (the lowest hash) when there are two or more documents and `val_fraction` > 0, and
    never all of them."""
    if val_fraction <= 0 or n_docs < 2:
        return set()
    chosen = {i for i in range(n_docs) if _doc_hash(i) < val_fraction}
    if not chosen:
        chosen = {min(range(n_docs), key=_doc_hash)}
    if len(chosen) == n_docs:
        chosen.discard(max(range(n_docs), key=_doc_hash))
    return chosen


def _source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies a source's contents cheaply: the embedded archive's digest, or each file's
    path, size and modification time."""
    if is_embedded(source):
        from lmforge.data.corpus import _archive

        return {"embedded": source, "sha1": hashlib.sha1(_archive().read_bytes()).hexdigest()}
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(source)]}


def _lmforge_version() -> str:
    try:
        from lmforge.version import __version__

        return str(__version__)
    except Exception:  # a half-written package must not stop data preparation
        return "unknown"


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="char", unit_scale=True, desc=desc, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty())


def prepare(source: str, tokenizer: TokenizerLike, out_dir: str | os.PathLike,
            val_fraction: float = DEFAULT_VAL_FRACTION, split_mode: SplitMode = "auto", *,
            text_field: str = "text", normalize: Callable[[str], str] | None = None,
            sep_id: int | None = None, overwrite: bool = False, progress: bool = True,
            chunk_tokens: int = CHUNK_TOKENS) -> Path:
    """Tokenize `source` into `out_dir` (train.bin, val.bin, test.bin for the embedded corpus,
    manifest.json) and return `out_dir`.

    Args:
        source: "shakespeare", a .txt/.md/.jsonl file or a folder (see `iter_documents`).
        tokenizer: anything with `encode`, `encode_batch`, `eos_id`, `vocab_size` and `hash()`.
        out_dir: the folder to create.
        val_fraction: share of a path source held out for "val" (ignored for the embedded corpus,
            whose splits are whole works). 0 writes an empty val.bin.
        split_mode: "auto" (works for the embedded corpus; documents for two or more documents; the
            token tail for a single document), or force "documents" / "tail".
        text_field: JSON key of the text in .jsonl sources.
        normalize: applied to each document before encoding (e.g. `CharTokenizer.normalize`).
        sep_id: id written after each document when the tokenizer has no EOS.
        overwrite: replace an existing, different prepared folder.
        progress: show a progress bar (only on a terminal).
        chunk_tokens: tokens buffered per write.

    Re-running with the same source, tokenizer and settings on a complete folder does nothing and
    returns it. Raises ConfigError / FormatError for bad input, leaving any existing folder untouched.
    """
    out = Path(out_dir).expanduser()
    source = str(source)
    embedded = is_embedded(source)
    sep, vocab_size = _check_args(source, embedded, tokenizer, val_fraction, split_mode, sep_id)
    dtype = dtype_for(vocab_size)

    settings = {"source": source if embedded else str(Path(source).expanduser().resolve()),
                "fingerprint": _source_fingerprint(source), "tokenizer_hash": tokenizer.hash(),
                "vocab_size": vocab_size, "sep_id": int(sep), "dtype": dtype.name,
                "split_mode_requested": split_mode, "val_fraction": 0.0 if embedded else float(val_fraction),
                "text_field": text_field, "normalize": _callable_name(normalize)}
    existing = _check_out_dir(out, settings, overwrite)
    if existing is not None:
        return existing

    plan = _plan_splits(source, embedded, split_mode, val_fraction, text_field)
    tmp, umask = _make_temp_dir(out)
    try:
        splits = ("train", "val", "test") if embedded else ("train", "val")
        writers = {s: _TokenWriter(tmp / f"{s}.bin", dtype, vocab_size, chunk_tokens) for s in splits}
        bar = _progress(plan.total_chars, progress, f"prepare {Path(source).name}")
        skipped = _write_documents(_document_batches(source, plan, splits, text_field), tokenizer, writers, sep,
                                   normalize, bar)
        if sum(w.documents for w in writers.values()) == 0:
            raise ConfigError(f"data source {source!r} has no text left after normalisation; nothing to "
                              "train on")
        if plan.mode == "tail" and val_fraction > 0:
            _split_tail(tmp, writers, dtype, val_fraction)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "lmforge_version": _lmforge_version(),
            **settings,
            "split_mode": plan.mode,
            "documents_skipped_empty": skipped,
            "splits": {s: {"file": f"{s}.bin", "tokens": writers[s].tokens, "documents": writers[s].documents}
                       for s in splits},
        }
        if embedded:
            manifest["works"] = {"val": list(VAL_WORKS), "test": list(TEST_WORKS)}
        write_json(tmp / MANIFEST, manifest, mode=0o666 & ~umask)  # readable as the .bin files are
        publish_dir(tmp, out)  # an existing folder (checked above) is replaced whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_args(source: str, embedded: bool, tokenizer: TokenizerLike, val_fraction: float,
                split_mode: SplitMode, sep_id: int | None) -> tuple[int, int]:
    """ConfigError for settings `prepare` cannot use; else the separator id and the vocabulary size."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1); 0.0005 holds out 0.05%")
    if split_mode not in ("auto", "works", "documents", "tail"):
        raise ConfigError(f"unknown split_mode {split_mode!r}; choose auto, works, documents or tail")
    if split_mode == "works" and not embedded:
        raise ConfigError(f"split_mode 'works' needs an embedded corpus, not {source!r}; use auto, "
                          "documents or tail")
    if embedded and split_mode not in ("auto", "works"):
        raise ConfigError(f"the embedded corpus {source!r} is split by whole works; leave split_mode 'auto'")
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else sep_id
    if sep is None:
        raise ConfigError("the tokenizer has no EOS token, so documents cannot be separated; pass sep_id "
                          "(e.g. the BOS or pad id)")
    vocab_size = int(tokenizer.vocab_size)
    if not 0 <= sep < vocab_size:
        raise ConfigError(f"separator id {sep} is outside the vocabulary (vocab_size {vocab_size})")
    return sep, vocab_size


@dataclass
class _Plan:
    """Which documents go where: whole works by split (embedded corpus), or the indices held out for "val"."""

    mode: str  # works | documents | tail
    total_chars: int
    works: dict[str, list[str]] = field(default_factory=dict)
    held: set[int] = field(default_factory=set)


def _plan_splits(source: str, embedded: bool, split_mode: SplitMode, val_fraction: float,
                 text_field: str) -> _Plan:
    """Plan the splits. Reading a path source once beforehand also catches bad files before anything is
    written."""
    if embedded:
        works = {s: corpus_works(s, source) for s in SPLITS}
        return _Plan("works", sum(len(read_work(n)) for names in works.values() for n in names), works=works)
    n_docs, total_chars = 0, 0
    for doc in iter_documents(source, text_field=text_field):
        n_docs += 1
        total_chars += len(doc)
    if n_docs == 0 or total_chars == 0:
        raise ConfigError(f"data source {source!r} has no text (0 documents with any characters); "
                          "check the path, the file contents or --text-field")
    mode = split_mode if split_mode != "auto" else ("documents" if n_docs >= 2 else "tail")
    if mode == "documents" and n_docs < 2 and val_fraction > 0:
        raise ConfigError(f"split_mode 'documents' needs two or more documents and {source!r} has one; "
                          "use split_mode 'tail' or 'auto'")
    return _Plan(mode, total_chars, held=held_out_documents(n_docs, val_fraction) if mode == "documents" else set())


def _make_temp_dir(out: Path) -> tuple[Path, int]:
    """A fresh temporary folder beside `out`, readable as `out` will be; and the process's umask."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the data from other users
    return tmp, umask


def _document_batches(source: str, plan: _Plan, splits: tuple[str, ...],
                      text_field: str) -> Iterator[tuple[str, list[str]]]:
    """(split, documents) in file order: one work at a time, or up to BATCH_DOCS documents of one split."""
    if plan.mode == "works":
        for s in splits:
            for name in plan.works[s]:
                yield s, [read_work(name)]
        return
    batch: list[str] = []
    batch_split = "train"
    for index, doc in enumerate(iter_documents(source, text_field=text_field)):
        dest = "val" if index in plan.held else "train"
        if batch and (dest != batch_split or len(batch) >= BATCH_DOCS):
            yield batch_split, batch
            batch = []
        batch_split = dest
        batch.append(doc)
    if batch:
        yield batch_split, batch


def _write_documents(batches: Iterator[tuple[str, list[str]]], tokenizer: TokenizerLike,
                     writers: dict[str, _TokenWriter], sep: int, normalize: Callable[[str], str] | None,
                     bar) -> int:
    """Encode each batch into its split's writer, every document followed by `sep`; close the writers and
    `bar`. Returns the number of documents skipped as empty (after `normalize`)."""
    skipped = 0
    for split, docs in batches:
        chars = sum(len(d) for d in docs)
        if normalize is not None:
            docs = [normalize(d) for d in docs]
        kept = [d for d in docs if d]
        skipped += len(docs) - len(kept)
        w = writers[split]
        for ids in _encode_docs(tokenizer, kept):
            w.write(ids)
            w.write([sep])
            w.documents += 1
        bar.update(chars)
        bar.set_postfix(tokens=sum(w.tokens + w.n_buf for w in writers.values()), refresh=False)
    bar.close()
    for w in writers.values():
        w.close()
    return skipped


def _callable_name(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _split_tail(tmp: Path, writers: dict[str, _TokenWriter], dtype: np.dtype, val_fraction: float) -> None:
    """Move the last `val_fraction` of train.bin's tokens (at least one) into val.bin."""
    train = writers["train"]
    n = train.tokens
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    if n_val <= 0:
        return
    itemsize = dtype.itemsize
    with open(tmp / "train.bin", "r+b") as src, open(tmp / "val.bin", "wb") as dst:
        src.seek((n - n_val) * itemsize)
        shutil.copyfileobj(src, dst, 1 << 22)
        src.truncate((n - n_val) * itemsize)
        dst.flush()
        os.fsync(dst.fileno())
        src.flush()
        os.fsync(src.fileno())
    train.tokens -= n_val
    writers["val"].tokens = n_val
    writers["val"].documents = 1  # the tail of the one document
    train.documents = 1


def _check_out_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> Path | None:
    """None when `out` may be written; `out` itself when it already holds this exact dataset."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return None
    if not (out / MANIFEST).is_file():
        raise ConfigError(f"output folder {out} is not empty and is not a prepared dataset (no {MANIFEST}); "
                          "refusing to replace it even with overwrite - choose another --out")
    try:
        manifest = read_manifest(out)
    except FormatError:
        manifest = None
    if manifest is not None and all(manifest.get(k) == v for k, v in settings.items()):
        return out
    if not overwrite:
        why = "is incomplete or corrupt" if manifest is None else "was prepared from other data or settings"
        raise ConfigError(f"output folder {out} already holds a prepared dataset that {why}; pass "
                          "overwrite=True (--overwrite) to replace it, or choose another --out")
    return None
