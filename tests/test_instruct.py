"""Fine-tuning data: JSONL reading with bad lines reported, chat rendering with assistant-only loss, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close

from lmforge.data.instruct import (
    InstructionBatches,
    collate,
    load_splits,
    pack,
    read_jsonl,
    render,
    render_rows,
    to_messages,
)
from lmforge.errors import FormatError
from lmforge.tokenizers import train_bpe
from lmforge.train.objectives import CausalLM

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "assets" / "data" / "instruct_bad.jsonl"


@pytest.fixture(scope="module")
def tok():
    return train_bpe([ROOT / "tests" / "assets" / "tokenizers" / "corpus.txt"], vocab_size=320)  # ChatML template


def test_malformed_lines_are_reported_with_numbers_and_good_lines_kept(capsys):
    rows, bad = read_jsonl(BAD)
    assert [r["_line"] for r in rows] == [1, 3, 9]
    assert [b.lineno for b in bad] == [2, 4, 6, 7, 8]
    err = capsys.readouterr().err
    assert "skipped 5 malformed line(s), kept 3" in err and "line 2: invalid JSON" in err
    assert "line 6: no assistant message" in err and "line 8: message 0 has role 'wizard'" in err
    assert to_messages(rows[2])[0] == {"role": "system", "content": "Be brief."}


def test_preference_pairs_are_checked(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same "}) + "\n")
    rows, bad = read_jsonl(f, "preferences", quiet=True)
    assert len(rows) == 1 and bad[0].lineno == 2 and "identical" in bad[0].reason
    f.write_text("nope\n")
    with pytest.raises(FormatError, match="line 1: invalid JSON"):
        read_jsonl(f, "preferences")


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the Moor?"},
            {"role": "assistant", "content": "Othello."}, {"role": "user", "content": "And his ensign?"},
            {"role": "assistant", "content": "Iago."}]
    ids, mask = render(tok, msgs)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    learned = [tok.decode([i], skip_special_tokens=False) for i, m in zip(ids, mask, strict=True) if m]
    assert "".join(learned) == "Othello.<|im_end|>\nIago.<|im_end|>\n"
    _, all_mask = render(tok, msgs, prompt_loss=True)
    assert all(all_mask)


def test_packed_rows_compute_each_example_as_alone(tok, tiny_llm):
    rows = load_splits("shakespeare-instruct")["val"][:5]
    ex = render_rows(tok, rows, 10_000)
    T = sum(len(e.ids) for e in ex[:3]) + 7
    model = tiny_llm("llama", vocab_size=320, block_size=T + 8)
    row = pack(ex[:3], T, pad_id=0)[0]
    assert row["segment_ids"].unique().tolist() == [-1, 0, 1, 2]
    with torch.no_grad():
        packed = model(row["input_ids"][None], segment_ids=row["segment_ids"][None])[0]
        pos = 0
        for e in ex[:3]:
            alone = model(torch.tensor([e.ids]))[0]
            assert_rel_close(packed[pos:pos + len(e.ids)], alone, terms=256)
            pos += len(e.ids)
        # the loss of the packed row is the loss of the examples, boundaries not counted
        obj = CausalLM()
        _, st_packed = obj.loss(model, {k: v[None] for k, v in row.items()})
        _, st_alone = obj.loss(model, collate(ex[:3], pad_id=0))
    assert st_packed["tokens"] == st_alone["tokens"]
    assert_rel_close(float(st_packed["nll"]), float(st_alone["nll"]))  # a sum of positive terms: their precision


def test_batches_resume_exactly(tok):
    ex = render_rows(tok, load_splits("shakespeare-instruct")["val"], 200)
    for packed in (False, True):
        a = InstructionBatches(ex, 2, 0, 200, seed=3, pack=packed)
        for _ in range(7):
            a.next_batch()
        b = InstructionBatches(ex, 2, 0, 200, seed=3, pack=packed)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        for _ in range(5):
            x, y = a.next_batch(), b.next_batch()
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_builtin_sets_have_held_out_plays():
    s = load_splits("shakespeare-instruct")
    assert len(s["train"]) >= 300 and len(s["val"]) >= 40 and len(s["test"]) >= 40
    assert {r["work"] for r in s["test"]} == {"macbeth", "tempest"}
    assert not {r["work"] for r in s["train"]} & {"macbeth", "tempest", "julius_caesar", "twelfth_night"}
    p = load_splits("shakespeare-prefs", kind="preferences")
    assert all(r["chosen"] != r["rejected"] for r in p["train"]) and len(p["train"]) >= 300
