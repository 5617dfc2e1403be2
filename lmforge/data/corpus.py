"""Text corpora as streams of documents: the embedded Shakespeare and the user's own files.

A *source* is either the name of an embedded corpus ("shakespeare") or a path:

- a `.txt` / `.md` file: the whole file is one document;
- a `.jsonl` file: one document per line, read from the `text_field` of each JSON object;
- a folder: every `.txt`, `.md` and `.jsonl` file under it, recursively, in sorted path order.

The embedded corpus is the complete works of Shakespeare (42 works, one document each, see
`data/shakespeare/README.md`). Its splits hold out whole works, so validation text is never a
neighbouring scene of training text: `VAL_WORKS` and `TEST_WORKS` below, the rest is "train".
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import ConfigError, FormatError

EMBEDDED = ("shakespeare",)
SPLITS = ("train", "val", "test")
# Whole works held out (names are the archive's file names without ".txt"). One tragedy and one
# comedy per split, each ~4-5% of the corpus. Changing these changes every prepared dataset.
VAL_WORKS = ("julius_caesar", "twelfth_night")
TEST_WORKS = ("macbeth", "tempest")
# The kind of each play, as the First Folio's catalogue (1623) groups them: Comedies, Histories,
# Tragedies (Troilus and Cressida and Cymbeline as printed there, among the tragedies). Pericles, not in
# the Folio, and the poems have no kind.
PLAY_KINDS: dict[str, str] = {
    **dict.fromkeys(("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
                     "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
                     "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
                     "twelfth_night", "winters_tale"), "comedy"),
    **dict.fromkeys(("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                     "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"), "history"),
    **dict.fromkeys(("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                     "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello",
                     "antony_and_cleopatra", "cymbeline"), "tragedy"),
}
TEXT_SUFFIXES = (".txt", ".md")
DOC_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")

_NOT_LETTER = re.compile(r"[^a-z]+")


def data_root() -> Path:
    """The folder of embedded corpora: `$LMFORGE_DATA_DIR`, else `data/` beside the package."""
    env = os.environ.get("LMFORGE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def _archive() -> Path:
    path = data_root() / "shakespeare" / "works.tar.xz"
    if not path.is_file():
        raise FormatError(f"the embedded Shakespeare corpus is missing: {path} does not exist; run from a "
                          "checkout of lmforge that has data/shakespeare/, or set LMFORGE_DATA_DIR to a "
                          "folder holding shakespeare/works.tar.xz")
    return path


@functools.lru_cache(maxsize=1)
def _load_works() -> dict[str, str]:
    """{work name: text} of the embedded corpus (~5 MB of text, decompressed once per process)."""
    path = _archive()
    try:
        with tarfile.open(path, "r:xz") as tar:
            works = {}
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".txt"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    works[member.name.removesuffix(".txt")] = data.decode("utf-8")
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise FormatError(f"the embedded corpus {path} is corrupt ({e}); restore it from git "
                          "(`git checkout data/shakespeare/works.tar.xz`)") from e
    return dict(sorted(works.items()))


def _check_split(split: str) -> str:
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"unknown split {split!r}; choose one of train, val, test or all")
    return split


def corpus_works(split: str = "train", source: str = "shakespeare") -> list[str]:
    """Names of the embedded corpus's works in `split` ("train", "val", "test" or "all"), sorted."""
    if source not in EMBEDDED:
        raise ConfigError(f"{source!r} is not an embedded corpus; embedded: {', '.join(EMBEDDED)}")
    _check_split(split)
    names = list(_load_works())
    held = {"val": VAL_WORKS, "test": TEST_WORKS}
    if split == "all":
        return names
    if split in held:
        return sorted(held[split])
    return [n for n in names if n not in VAL_WORKS and n not in TEST_WORKS]


def read_work(name: str) -> str:
    """Full text of one work of the embedded corpus, e.g. `read_work("hamlet")`."""
    works = _load_works()
    if name not in works:
        raise ConfigError(f"no work named {name!r} in the embedded corpus; see corpus_works('all')")
    return works[name]


def is_embedded(source: str) -> bool:
    return str(source) in EMBEDDED


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 "
                          "(e.g. `iconv -f latin1 -t utf-8`)") from e


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise FormatError(f"{path}, line {lineno}: not UTF-8 text ({e.reason}); convert the file "
                                  "to UTF-8") from e
            if not line:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each "
                                  "line must be one JSON object such as {\"text\": \"...\"}") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = f"keys: {', '.join(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
                raise FormatError(f"{path}, line {lineno}: no {text_field!r} field ({keys}); add it, or name "
                                  "the field that holds the text with text_field / --text-field")
            text = obj[text_field]
            if not isinstance(text, str):
                raise FormatError(f"{path}, line {lineno}: field {text_field!r} is a "
                                  f"{type(text).__name__}, not a string")
            yield text


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif suffix in TEXT_SUFFIXES:
        yield _read_text(path)
    else:
        raise FormatError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .txt, .md (one document "
                          "per file), .jsonl (one document per line) or a folder of them")


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files a path source reads, in reading order (a file source is its own single file)."""
    path = Path(source).expanduser()
    if not path.exists():
        hint = "" if os.sep in str(source) or path.suffix else f" (embedded corpora: {', '.join(EMBEDDED)})"
        raise FormatError(f"data source {str(source)!r} does not exist{hint}; pass an existing .txt, .md or "
                          ".jsonl file, a folder of them, or the name of an embedded corpus")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise FormatError(f"folder {path} has no .txt, .md or .jsonl files; put the documents there "
                              "or pass the file itself")
        return files
    return [path]


def iter_documents(source: str = "shakespeare", split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents of `source`, one string each, in a fixed order.

    Args:
        source: "shakespeare" (embedded; each work is one document), a .txt/.md file (one document),
            a .jsonl file (one document per line, from `text_field`) or a folder of such files.
        split: for an embedded corpus, "train", "val", "test" or "all"; ignored for paths (`prepare`
            splits those itself).
        text_field: the JSON key that holds the text in .jsonl files.

    Raises FormatError for a missing path, an unsupported file type, a non-UTF-8 file, a bad JSON line
    or a missing field (naming the file and line).
    """
    if is_embedded(source):
        for name in corpus_works(split, source):
            yield read_work(name)
        return
    for path in source_files(source):
        yield from _iter_file(path, text_field)


# ---- teenyGPT's character passages -----------------------------------------------------------------
def normalize_chars(text: str) -> str:
    """Lower-case a-z and single spaces: NFKD, combining marks dropped, every other character a space,
    runs of spaces collapsed, ends stripped (the same map as `CharTokenizer.normalize`)."""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NOT_LETTER.sub(" ", letters.lower()).strip()


def _wrap(line: str, max_chars: int) -> list[str]:
    """Greedy word wrap of a normalised line; words longer than `max_chars` are dropped."""
    pieces, cur = [], ""
    for word in line.split(" "):
        if len(word) > max_chars:
            continue
        if cur and len(cur) + 1 + len(word) > max_chars:
            pieces.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        pieces.append(cur)
    return pieces


# A speech's first line naming its speaker ("Ham.", "First Lord.", "LADY MACBETH."), an act or scene
# heading, and bracketed stage directions are not speech: they are left out of passages.
_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: (?:[A-Z][A-Za-z']*|of|the|and|de|to))*\.$")
_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene)\b")
_STAGE = re.compile(r"\[[^\[\]]*\]")


def passages_of(text: str, max_chars: int = 149, min_line_chars: int = 8) -> list[str]:
    """`char_passages` for one document: its paragraphs (blocks between blank lines: one speech, stanza
    or prose paragraph) as normalised lines packed greedily into passages of at most `max_chars`."""
    out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", _STAGE.sub(" ", text.replace("\r\n", "\n"))):
        lines = block.strip("\n").split("\n")
        if len(lines) > 1 and len(lines[0]) <= 40 and _SPEAKER.match(lines[0].strip()):
            lines = lines[1:]
        cur = ""
        for raw in lines:
            if _HEADING.match(raw.strip()):
                continue
            line = normalize_chars(raw)
            if len(line) < min_line_chars:  # what is left of headings, numbers, short exclamations
                continue
            for piece in _wrap(line, max_chars) if len(line) > max_chars else [line]:
                if cur and len(cur) + 1 + len(piece) <= max_chars:
                    cur = f"{cur} {piece}"
                else:
                    if cur:
                        out.append(cur)
                    cur = piece
        if cur:
            out.append(cur)
    return out


def char_passages(source: str = "shakespeare", split: str = "train", max_chars: int = 149,
                  text_field: str = "text") -> list[str]:
    """One-line passages of at most `max_chars` characters, only 'a'-'z' and single spaces, for the
    teenyGPT recipe (its char tokenizer adds BOS and pads each passage to a fixed length).

    Each document is split into lines, each line normalised (`normalize_chars`), lines shorter than 8
    characters dropped, and consecutive lines of one speech or paragraph (a block between blank lines)
    packed greedily into a passage without splitting a word; a word longer than `max_chars` is dropped.
    A speech's speaker line ("Ham."), act/scene headings and bracketed stage directions are not speech
    and are left out. The result is deterministic, in document order.
    """
    if max_chars < 8:
        raise ConfigError(f"max_chars={max_chars} is too small; passages need at least 8 characters")
    out: list[str] = []
    for doc in iter_documents(source, split, text_field):
        out.extend(passages_of(doc, max_chars))
    return out


def corpus_stats(split: str = "all") -> dict[str, int]:
    """{"documents", "characters", "archive_bytes"} of the embedded corpus's `split`."""
    names = corpus_works(split)
    return {"documents": len(names), "characters": sum(len(read_work(n)) for n in names),
            "archive_bytes": _archive().stat().st_size}
