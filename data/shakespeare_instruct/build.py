"""Build the Shakespeare instruction and preference sets from the embedded corpus (deterministic).

    python data/shakespeare_instruct/build.py        # writes {train,val,test}.jsonl and prefs_{...}.jsonl here

Every answer is derived from the corpus itself: who speaks a speech (the speaker line above it), which work
a passage comes from (the archive's file name; titles below, as in data/shakespeare/README.md), and how a
speech goes on (its next lines). Splits follow the corpus's held-out works (lmforge.data.corpus VAL_WORKS /
TEST_WORKS), so validation and test questions come from plays never seen in training.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from lmforge.data.corpus import _HEADING, _SPEAKER, _STAGE, corpus_works, read_work  # noqa: E402

TITLES = {
    "alls_well_that_ends_well": "All's Well That Ends Well", "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It", "comedy_of_errors": "The Comedy of Errors", "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline", "hamlet": "Hamlet", "henry_iv_part_1": "King Henry IV, Part 1",
    "henry_iv_part_2": "King Henry IV, Part 2", "henry_v": "King Henry V", "henry_vi_part_1": "King Henry VI, Part 1",
    "henry_vi_part_2": "King Henry VI, Part 2", "henry_vi_part_3": "King Henry VI, Part 3",
    "henry_viii": "King Henry VIII", "john": "King John", "julius_caesar": "Julius Caesar", "lear": "King Lear",
    "lovers_complaint": "A Lover's Complaint", "loves_labours_lost": "Love's Labour's Lost", "macbeth": "Macbeth",
    "measure_for_measure": "Measure for Measure", "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor", "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing", "othello": "Othello",
    "passionate_pilgrim": "The Passionate Pilgrim", "pericles": "Pericles",
    "phoenix_and_the_turtle": "The Phoenix and the Turtle", "rape_of_lucrece": "The Rape of Lucrece",
    "richard_ii": "King Richard II", "richard_iii": "King Richard III", "romeo_and_juliet": "Romeo and Juliet",
    "sonnets": "Sonnets", "taming_of_the_shrew": "The Taming of the Shrew", "tempest": "The Tempest",
    "timon_of_athens": "Timon of Athens", "tragedy_of_titus_andronicus": "The Tragedy of Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida", "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "Two Gentlemen of Verona", "winters_tale": "The Winter's Tale",
}
# These texts label speeches with abbreviations (Ham., Glou., FAL.): no clean speaker name to answer with.
ABBREVIATED = {"hamlet", "lear", "henry_iv_part_1"}
SYSTEM = "You are a careful scholar of Shakespeare. Answer briefly."
PER_SPLIT = {"train": (160, 160, 120), "val": (24, 16, 16), "test": (24, 16, 16)}  # speaker, work, continue


def speeches(text: str) -> list[tuple[str | None, list[str]]]:
    """(speaker or None, lines) per block between blank lines, stage directions and headings dropped."""
    out = []
    for block in re.split(r"\n[ \t]*\n", _STAGE.sub(" ", text.replace("\r\n", "\n"))):
        lines = [ln.strip() for ln in block.strip("\n").split("\n")]
        speaker = None
        if len(lines) > 1 and len(lines[0]) <= 40 and _SPEAKER.match(lines[0]):
            speaker, lines = lines[0][:-1], lines[1:]
        lines = [ln for ln in lines if ln and not _HEADING.match(ln)]
        if lines:
            out.append((speaker, lines))
    return out


def speaker_name(label: str) -> str:
    """'LADY MACBETH' -> 'Lady Macbeth', 'ANTIPHOLUS OF SYRACUSE' -> 'Antipholus of Syracuse'."""
    small = {"of", "the", "and", "de", "to"}
    return " ".join(w.lower() if w.lower() in small else w.capitalize() for w in label.split())


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def build_split(split: str, rng: random.Random) -> tuple[list[dict], list[dict]]:
    works = corpus_works(split)
    all_works = corpus_works("all")
    n_speaker, n_work, n_cont = PER_SPLIT[split]
    parsed = {w: speeches(read_work(w)) for w in works}
    examples, prefs = [], []

    plays = [w for w in works if w not in ABBREVIATED and sum(1 for s, _ in parsed[w] if s) > 100]
    for i in range(n_speaker):
        w = plays[i % len(plays)]
        counts: dict[str, int] = {}
        for s, _ in parsed[w]:
            if s:
                counts[s] = counts.get(s, 0) + 1
        main = sorted((s for s, c in counts.items() if c >= 20), key=counts.get, reverse=True)[:8]
        cands = [(s, ls) for s, ls in parsed[w] if s in main and 1 <= len(ls) <= 4 and 40 <= len(" ".join(ls)) <= 320]
        who, lines = rng.choice(cands)
        others = rng.sample([s for s in main if s != who], 3)
        options = [speaker_name(x) for x in rng.sample([who, *others], 4)]
        q = (f"In Shakespeare's {TITLES[w]}, who speaks these lines?\n\n" + "\n".join(lines)
             + f"\n\nAnswer with one name: {', '.join(options[:-1])} or {options[-1]}.")
        answer = speaker_name(who)
        examples.append({"messages": chat(q, answer), "task": "speaker", "work": w, "options": options,
                         "answer": answer})
        prefs.append({"prompt": q, "chosen": answer, "rejected": speaker_name(others[0]), "task": "speaker",
                      "work": w})
    for i in range(n_work):
        w = works[i % len(works)]
        blocks = [ls for _, ls in parsed[w] if len(ls) >= 3]
        lines = rng.choice(blocks)[:4]
        wrong = rng.sample([x for x in all_works if x != w], 3)
        options = [TITLES[x] for x in rng.sample([w, *wrong], 4)]
        q = ("Which of Shakespeare's works is this passage from?\n\n" + "\n".join(lines)
             + f"\n\nAnswer with one title: {', '.join(options[:-1])} or {options[-1]}.")
        examples.append({"messages": chat(q, TITLES[w]), "task": "work", "work": w, "options": options,
                         "answer": TITLES[w]})
        prefs.append({"prompt": q, "chosen": TITLES[w], "rejected": TITLES[wrong[0]], "task": "work", "work": w})
    for i in range(n_cont):
        w = works[i % len(works)]
        blocks = [ls for _, ls in parsed[w] if len(ls) >= 4]
        lines = rng.choice(blocks)
        cut = min(len(lines) - 2, 4)
        q = f"Continue this passage from {TITLES[w]} in Shakespeare's style:\n\n" + "\n".join(lines[:cut])
        answer = "\n".join(lines[cut:cut + 2])
        other = rng.choice([x for x in all_works if x != w])
        decoy = [ls for _, ls in speeches(read_work(other)) if len(ls) >= 2]
        rejected = "\n".join(rng.choice(decoy)[:2])
        examples.append({"messages": chat(q, answer), "task": "continue", "work": w})
        if rejected != answer:
            prefs.append({"prompt": q, "chosen": answer, "rejected": rejected, "task": "continue", "work": w})
    rng.shuffle(examples)
    rng.shuffle(prefs)
    return examples, prefs


def main() -> None:
    for split in ("train", "val", "test"):
        examples, prefs = build_split(split, random.Random(f"shakespeare-instruct-{split}"))
        for name, rows in ((f"{split}.jsonl", examples), (f"prefs_{split}.jsonl", prefs)):
            with open(HERE / name, "w", encoding="utf-8", newline="\n") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
