"""Labelled probing sets built at run time from the embedded Shakespeare corpus.

Every example is a passage: the first `WORDS` words of one speech (the lines under a speaker's name, with
stage directions and the line breaks removed), so that all passages have the same length and the layout
is not in the text a model reads. The tasks:

- `comedy_vs_tragedy`: passages from comedies and from tragedies, as the First Folio's catalogue (1623)
  groups the plays (`lmforge.data.corpus.PLAY_KINDS`).
- `genre`: the same with the histories as a third class (comedy / history / tragedy).
- `verse_vs_prose`: passages from speeches in verse and from speeches in prose, labelled from the layout
  of the printed text (`speech_form`).

Train and test examples come from different plays: a seeded draw holds out `TEST_PLAY_FRACTION` of the
plays of each kind, so a probe cannot pass by recognising a play's names or plot. Within each split
every class has the same number of examples, drawn round-robin over that split's plays so that each
play contributes about equally. Everything is deterministic given the seed.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.data.corpus import _HEADING, _SPEAKER, _STAGE, PLAY_KINDS, read_work
from lmforge.errors import ConfigError

WORDS = 32  # words per passage (~40-50 tokens for BPE and WordPiece vocabularies)
DEFAULT_SIZE = 420  # examples per set when no limit is given: a few seconds of features on a CPU
TEST_FRACTION = 2 / 7  # share of the examples in the test split (60 of 210 per class by default)
TEST_PLAY_FRACTION = 0.3  # share of each kind's plays held out for testing

# Verse vs prose from the layout. In these texts a verse line is printed as its own line, starts with a
# capital letter and is about 10 syllables (iambic pentameter) long; prose runs on to the printer's
# measure (~60-70 characters) and its continuation lines start wherever a line break fell, often in
# lower case. A speech of at least 3 lines is:
#   verse  when every line starts with a capital letter and none is longer than VERSE_MAX_CHARS;
#   prose  when its lines but the last are at least PROSE_MIN_CHARS long and at least half of its
#          continuation lines start in lower case;
#   neither otherwise (mixed or too short to tell): left out.
# `form_check` measures what the rule produces (syllables per line), and the tests hold it to the
# known facts: verse lines ~10 syllables, prose lines far longer, Richard II and King John (verse
# throughout) without prose, The Merry Wives of Windsor mostly prose.
VERSE_MAX_CHARS = 56
PROSE_MIN_CHARS = 50
_FIRST_LETTER = re.compile(r"[A-Za-z]")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_NUMBERED = re.compile(r"^\d+ ")


@dataclass(frozen=True)
class Speech:
    """One speech of a play: its lines as printed (speaker line and stage directions removed)."""
    play: str
    lines: tuple[str, ...]

    @property
    def words(self) -> list[str]:
        return " ".join(self.lines).split()


@dataclass
class ProbingSet:
    """A labelled probing set: `texts[i]` has class `classes[labels[i]]`, from `plays[i]`, in `splits[i]`."""
    task: str
    classes: list[str]
    texts: list[str]
    labels: list[int]
    plays: list[str]
    splits: list[str]  # "train" | "test"

    def __len__(self) -> int:
        return len(self.texts)

    def indices(self, split: str) -> list[int]:
        """Positions of the examples in `split` ("train" or "test")."""
        return [i for i, s in enumerate(self.splits) if s == split]


@dataclass(frozen=True)
class ProbingTask:
    """A task: its classes and the function that labels a play's speeches (None: not used)."""
    name: str
    classes: tuple[str, ...]
    plays: tuple[str, ...]
    label: Callable[[Speech], str | None]
    description: str


def speeches(play: str) -> list[Speech]:
    """The speeches of `play` in order: blocks between blank lines that open with a speaker's name."""
    return list(_speeches(play))


@functools.lru_cache(maxsize=64)
def _speeches(play: str) -> tuple[Speech, ...]:
    out = []
    for block in re.split(r"\n[ \t]*\n", read_work(play).replace("\r\n", "\n")):
        lines = block.strip("\n").split("\n")
        speaker = _NUMBERED.sub("", lines[0].strip())  # "1 Clown." is the first clown
        if len(lines) < 2 or len(speaker) > 40 or not _SPEAKER.match(speaker):
            continue
        body = []
        for raw in lines[1:]:
            line = " ".join(_STAGE.sub(" ", raw).split())
            if line and not _HEADING.match(line) and not (line.startswith("[") or line.endswith("]")):
                body.append(line)  # a stage direction broken over lines leaves a "[..." or "...]" line
        if body:
            out.append(Speech(play, tuple(body)))
    return tuple(out)


def _starts_upper(line: str) -> bool:
    m = _FIRST_LETTER.search(line)
    return m is not None and line[m.start()].isupper()


def speech_form(speech: Speech) -> str | None:
    """"verse", "prose" or None (can't tell) for one speech, from its layout (the rule above)."""
    lines = speech.lines
    if len(lines) < 3:
        return None
    if all(_starts_upper(x) and len(x) <= VERSE_MAX_CHARS for x in lines):
        return "verse"
    lower = sum(not _starts_upper(x) for x in lines[1:])
    if all(len(x) >= PROSE_MIN_CHARS for x in lines[:-1]) and 2 * lower >= len(lines) - 1:
        return "prose"
    return None


def syllables(line: str) -> int:
    """A rough syllable count: groups of vowels, a silent final e and elided "'d" not counted."""
    words = re.findall(r"[a-z']+", line.lower())
    n = 0
    for w in words:
        w = w.replace("'", "")
        k = len(_VOWEL_GROUP.findall(w))
        if k > 1 and w.endswith("e") and not w.endswith(("le", "ee")):
            k -= 1
        n += max(k, 1)
    return n


def form_check(plays: list[str] | None = None) -> dict[str, dict[str, float]]:
    """What `speech_form` finds in `plays` (default: all): per form, speeches, lines, syllables per line.

    Last lines of speeches are left out of the syllable mean: verse speeches often end on a half line.
    """
    stats = {f: {"speeches": 0, "lines": 0, "syllables": 0} for f in ("verse", "prose", "unlabelled")}
    for play in plays or sorted(PLAY_KINDS):
        for sp in speeches(play):
            s = stats[speech_form(sp) or "unlabelled"]
            s["speeches"] += 1
            s["lines"] += len(sp.lines) - 1
            s["syllables"] += sum(syllables(x) for x in sp.lines[:-1])
    return {f: {"speeches": s["speeches"], "lines": s["lines"],
                "syllables_per_line": s["syllables"] / max(s["lines"], 1)} for f, s in stats.items()}


def _kind_of(kinds: tuple[str, ...]) -> Callable[[Speech], str | None]:
    return lambda sp: PLAY_KINDS[sp.play] if PLAY_KINDS[sp.play] in kinds else None


def _plays(*kinds: str) -> tuple[str, ...]:
    return tuple(sorted(p for p, k in PLAY_KINDS.items() if k in kinds))


PROBING_TASKS: dict[str, ProbingTask] = {
    "comedy_vs_tragedy": ProbingTask(
        "comedy_vs_tragedy", ("comedy", "tragedy"), _plays("comedy", "tragedy"), _kind_of(("comedy", "tragedy")),
        "passages from the First Folio's comedies vs its tragedies; train and test plays differ"),
    "verse_vs_prose": ProbingTask(
        "verse_vs_prose", ("verse", "prose"), _plays("comedy", "history", "tragedy"), speech_form,
        "passages from speeches set as verse vs as prose (from the printed layout); train and test plays differ"),
    "genre": ProbingTask(
        "genre", ("comedy", "history", "tragedy"), _plays("comedy", "history", "tragedy"),
        _kind_of(("comedy", "history", "tragedy")),
        "passages from the First Folio's comedies, histories and tragedies; train and test plays differ"),
}


def _test_plays(task: ProbingTask, rng: random.Random) -> set[str]:
    """A seeded TEST_PLAY_FRACTION of the task's plays of each kind (at least one of each)."""
    held: set[str] = set()
    for kind in ("comedy", "history", "tragedy"):
        plays = [p for p in task.plays if PLAY_KINDS[p] == kind]
        if plays:
            held.update(rng.sample(plays, max(1, round(TEST_PLAY_FRACTION * len(plays)))))
    return held


def _round_robin(pools: dict[str, list[str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (play, passage) pairs taken in turn from each play's shuffled pool, plays in a seeded order."""
    order = sorted(pools)
    rng.shuffle(order)
    queues = {p: rng.sample(pools[p], len(pools[p])) for p in order}
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues.values()):
        out.extend((p, queues[p][depth]) for p in order if depth < len(queues[p]))
        depth += 1
    return out[:n]


def build_probing_set(task: str = "comedy_vs_tragedy", *, seed: int = 0, limit: int | None = None) -> ProbingSet:
    """The probing set of `task`, balanced per class in each split, train and test plays disjoint.

    Args:
        task: a name in `PROBING_TASKS`.
        seed: fixes which plays are held out and which passages are drawn.
        limit: the number of examples (default `DEFAULT_SIZE`); the split and class balance are kept.
    """
    if task not in PROBING_TASKS:
        raise ConfigError(f"unknown probing task {task!r}; choose one of {', '.join(PROBING_TASKS)}")
    spec = PROBING_TASKS[task]
    k = len(spec.classes)
    size = DEFAULT_SIZE if limit is None else limit
    if size < 4 * k:
        raise ConfigError(f"limit={limit} is too small for {task!r}: it needs at least {4 * k} examples "
                          f"(2 per class in each of train and test)")
    n_test = max(2, round(size * TEST_FRACTION / k))
    n_train = max(2, size // k - n_test)
    rng = random.Random(f"{task}:{seed}")
    held = _test_plays(spec, rng)
    pools: dict[tuple[str, str], dict[str, list[str]]] = {}
    for play in spec.plays:
        split = "test" if play in held else "train"
        for sp in speeches(play):
            words = sp.words
            label = spec.label(sp) if len(words) >= WORDS else None
            if label is not None:
                pools.setdefault((split, label), {}).setdefault(play, []).append(" ".join(words[:WORDS]))
    out = ProbingSet(task, list(spec.classes), [], [], [], [])
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(spec.classes):
            drawn = _round_robin(pools.get((split, name), {}), n, rng)
            if len(drawn) < n:
                raise ConfigError(f"{task!r}: only {len(drawn)} {name} passages in the {split} plays, {n} asked; "
                                  "lower limit")
            for play, text in drawn:
                out.texts.append(text)
                out.labels.append(c)
                out.plays.append(play)
                out.splits.append(split)
    return out
