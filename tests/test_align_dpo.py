"""Preference optimisation: DPO / IPO against trl on the same models, SimPO / ORPO by hand, data checks, training."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_rel_close
from helpers.preferences import toy_pairs

from lmforge.align import DPO, Pair, PreferencePairs, collate, sequence_logps, tokenize_pairs
from lmforge.errors import ConfigError
from lmforge.interop import hf
from lmforge.loading import build
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.train import OptimConfig, TrainConfig, Trainer
from lmforge.train.objectives import build_objective


def _hf_pair(seed):
    """An HF Llama with widened random weights and our model holding the same weights."""
    cfg = get_preset("tiny-llama")
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf.to_hf_config(cfg)))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return build(cfg, hf.from_hf_state_dict(cfg, ref.state_dict()), "test").eval(), ref.eval()


def _examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda k: torch.randint(3, 256, (k,), generator=g).tolist()
    return [{"prompt_ids": r(5 + i), "chosen_ids": r(3 + 2 * i), "rejected_ids": r(7 - i)} for i in range(n)]


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
@pytest.mark.slow
def test_loss_matches_trl(loss_type, tmp_path):
    """trl's DPOTrainer.compute_loss on its own collated batch, HF policy and HF reference, vs ours."""
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours, hf_policy = _hf_pair(0)
    ours_ref, hf_ref = _hf_pair(1)
    ex = _examples()
    # trl needs a tokenizer and a dataset to construct; the loss below runs on the token ids of `ex`
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1},
                                               unk_token="a")), pad_token="<pad>", eos_token="a")
    args = DPOConfig(output_dir=str(tmp_path), beta=0.25, report_to=[], use_cpu=True, bf16=False,
                     loss_type=["sigmoid" if loss_type == "dpo" else "ipo"])
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "a a", "rejected": "a"}]))
    hf_policy.eval()
    expected = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=0)(ex)).item()

    batch = collate([Pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in ex], pad_id=0)
    loss, stats = DPO(loss_type, beta=0.25, reference=ours_ref).loss(ours, batch)
    assert_rel_close(loss.item(), expected, terms=256)
    assert stats["pairs"].item() == 4


def test_collate_masks_exactly_the_response_targets():
    b = collate([Pair([1, 2, 3], [4, 5], [6]), Pair([7], [8, 9, 10], [11, 12])], pad_id=0)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; a target t is input token t+1
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 10], [1, 2, 3, 6], [7, 11, 12, 0]]
    assert b["labels"].tolist() == [[2, 3, 4, 5], [8, 9, 10, 0], [2, 3, 6, 0], [11, 12, 0, 0]]
    assert b["loss_mask"].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]]


def test_sequence_logps_match_a_direct_sum(tiny_llm):
    model = tiny_llm("llama")
    pair = Pair([5, 6, 7], [8, 9], [10, 11, 12])
    logps, n = sequence_logps(model, collate([pair], 0))
    full = torch.tensor([[5, 6, 7, 8, 9]])
    lp = F.log_softmax(model(full)[0].float(), -1)
    direct = lp[2, 8] + lp[3, 9]
    assert_rel_close(logps[0], direct, terms=256)
    assert n.tolist() == [2, 3]


def test_reference_free_losses_by_hand(tiny_llm):
    model = tiny_llm("llama")
    batch = collate([Pair([5, 6], [7, 8, 9], [10]), Pair([4], [3, 2], [11, 12])], 0)
    logps, n = sequence_logps(model, batch)
    avg = logps / n
    simpo, _ = DPO("simpo", beta=2.0, gamma=0.5).loss(model, batch)
    want = -F.logsigmoid(2.0 * (avg[:2] - avg[2:]) - 0.5).mean()
    assert_rel_close(simpo, want, terms=256)
    orpo, _ = DPO("orpo", lam=0.3).loss(model, batch)
    odds = lambda a: a - torch.log(1 - torch.exp(a))
    want = (-avg[:2] - 0.3 * F.logsigmoid(odds(avg[:2]) - odds(avg[2:]))).mean()
    assert_rel_close(orpo, want, terms=256)


def test_build_objective_finds_the_preference_losses():
    assert build_objective("dpo", beta=0.2).beta == 0.2
    assert build_objective("ipo").loss_type == "ipo"
    assert build_objective("simpo").loss_type == "simpo"
    with pytest.raises(ConfigError, match="beta"):
        build_objective("dpo", beta=0.0)


def test_bad_pairs_are_refused_by_name():
    from lmforge.tokenizers import CharTokenizer

    tok = CharTokenizer()
    good = {"prompt": "to be", "chosen": "or not", "rejected": "and so"}
    with pytest.raises(ConfigError, match="record 1: chosen and rejected are identical"):
        tokenize_pairs([good, {"prompt": "a", "chosen": "same", "rejected": "same "}], tok, chat=False)
    with pytest.raises(ConfigError, match="record 0: missing field"):
        tokenize_pairs([{"prompt": "a", "chosen": "b"}], tok, chat=False)
    with pytest.raises(ConfigError, match="non-empty"):
        tokenize_pairs([{"prompt": "a", "chosen": "", "rejected": "b"}], tok, chat=False)


def test_dpo_needs_adapters_or_a_reference(tiny_llm):
    model = tiny_llm("llama", train=True)
    with pytest.raises(ConfigError, match="adapters"):
        DPO("dpo").loss(model, collate([Pair([1, 2], [3], [4])], 0))


@pytest.mark.slow
def test_dpo_training_raises_preference_accuracy(tiny_llm):
    policy = tiny_llm("llama", train=True)
    reference = DecoderLM(policy.config)
    reference.load_state_dict(policy.state_dict())
    objective = DPO("dpo", beta=0.5, reference=reference)
    data = PreferencePairs(toy_pairs(), batch_size=8, pad_id=0, val_pairs=toy_pairs(16, seed=1))
    tr = Trainer(policy, objective, data, TrainConfig(max_steps=25, eval_every=0, progress=False, peak_flops=1e11),
                 OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0))
    before = tr.evaluate()
    # policy == reference: every implicit reward is 0, every pair a tie (counted half)
    assert before["acc"] == 0.5
    assert_rel_close(before["loss"], math.log(2))
    res = tr.fit()
    assert res.val["acc"] >= 0.75 and res.val["loss"] < 0.6, res.val
