"""Reward model: Bradley-Terry loss by hand, training raises preference accuracy, the head saves, resumes, loads."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from helpers.preferences import toy_pairs

from lmforge.align import Pair, PreferencePairs, RewardModel, RewardObjective, collate
from lmforge.errors import FormatError
from lmforge.models.scalar_heads import ScalarHead
from lmforge.train import OptimConfig, TrainConfig, Trainer
from lmforge.train.objectives import build_objective


def test_bradley_terry_loss_by_hand(tiny_llm):
    model = tiny_llm("llama")
    obj = build_objective("reward", d_model=64)
    batch = collate([Pair([5, 6], [7, 8, 9], [10]), Pair([4], [3, 2], [11, 12])], 0)
    loss, stats = obj.loss(model, batch)
    # score each whole sequence separately, unpadded, at its last token
    seqs = [[5, 6, 7, 8, 9], [4, 3, 2], [5, 6, 10], [4, 11, 12]]
    r = torch.stack([obj.head(model.hidden_states(torch.tensor([s]))[0, -1]) for s in seqs])
    assert_rel_close(loss, -F.logsigmoid(r[:2] - r[2:]).mean(), terms=64)
    assert stats["correct"].item() == float((r[:2] > r[2:]).sum() + 0.5 * (r[:2] == r[2:]).sum())


def test_scalar_head_reads_the_last_real_token():
    head = ScalarHead(4)
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert_rel_close(head.sequence_scores(h, mask), torch.stack([head(h[0, 2]), head(h[1, 4])]), terms=4)


@pytest.mark.slow
def test_reward_training_learns_the_preference_and_saves_its_head(tmp_path, tiny_llm):
    model = tiny_llm("llama", train=True)
    obj = RewardObjective(d_model=64)
    data = PreferencePairs(toy_pairs(), 8, 0, val_pairs=toy_pairs(16, seed=1))
    cfg = TrainConfig(max_steps=20, eval_every=0, checkpoint_every=10, progress=False, peak_flops=1e11)
    tr = Trainer(model, obj, data, cfg, OptimConfig(lr=3e-3, warmup_steps=2), run_dir=tmp_path / "run")
    before = tr.evaluate()
    res = tr.fit()
    assert res.val["acc"] >= 0.9 > before["acc"] and res.val["loss"] < before["loss"] - 0.2, (before, res.val)

    rm = RewardModel.load(tmp_path / "run" / "model")
    batch = next(data.eval_batches())
    with torch.no_grad():
        want = obj.scores(tr.model.eval(), batch)
    ids = [p.prompt + p.chosen for p in data.val_pairs[:8]] + [p.prompt + p.rejected for p in data.val_pairs[:8]]
    assert_rel_close(rm.score_ids(ids), want, terms=256)

    # resuming restores the head with the model: 10 more steps from step 10 end where the first run ended
    cfg2 = TrainConfig(max_steps=20, eval_every=0, checkpoint_every=10, progress=False, peak_flops=1e11)
    tr2 = Trainer(tiny_llm("llama", seed=1, train=True), RewardObjective(d_model=64),
                  PreferencePairs(toy_pairs(), 8, 0), cfg2, OptimConfig(lr=3e-3, warmup_steps=2),
                  run_dir=tmp_path / "run")
    tr2.fit(resume=str(tmp_path / "run" / "checkpoints" / "step-10"))
    for a, b in zip(tr2.heads.parameters(), tr.heads.parameters()):
        assert torch.equal(a, b)


def test_a_folder_without_a_head_is_refused(tmp_path, tiny_llm):
    from lmforge.llm import LLM

    LLM(tiny_llm("llama", train=True)).save(tmp_path / "m")
    with pytest.raises(FormatError, match="no heads.safetensors"):
        RewardModel.load(tmp_path / "m")
