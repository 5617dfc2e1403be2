"""Alignment on one model in memory: the reference is the policy with its LoRA adapters switched off."""

import pytest
import torch
from helpers.preferences import toy_pairs
from helpers.tiny import tiny_llm

from lmforge.adapt import apply_lora, disable_adapters
from lmforge.align import DPO, Pair, PreferencePairs, collate, sequence_logps
from lmforge.models import DecoderLM
from lmforge.train import OptimConfig, TrainConfig, Trainer


def _policy_and_base(seed=0):
    base = tiny_llm("llama", seed)
    policy = DecoderLM(base.config).eval()
    policy.load_state_dict(base.state_dict())
    apply_lora(policy, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give the adapters something to say
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy, base


def _batch():
    g = torch.Generator().manual_seed(0)
    r = lambda k: torch.randint(3, 256, (k,), generator=g).tolist()
    return collate([Pair(r(5), r(4), r(6)), Pair(r(3), r(7), r(2)), Pair(r(8), r(1), r(3))], pad_id=0)


def test_adapters_off_gives_the_reference_log_probs_exactly():
    policy, base = _policy_and_base()
    batch = _batch()
    with torch.no_grad():
        on, _ = sequence_logps(policy, batch)
        with disable_adapters(policy):
            off, _ = sequence_logps(policy, batch)
        ref, _ = sequence_logps(base, batch)
    assert torch.equal(off, ref)  # bit for bit: the adapters-off path is the base computation
    assert (on - ref).abs().max() > 1e-3  # and the adapters do change the policy


def test_dpo_with_toggled_reference_equals_dpo_with_a_frozen_copy():
    policy, base = _policy_and_base()
    batch = _batch()
    one_model, _ = DPO("dpo", beta=0.3).loss(policy, batch)
    two_models, _ = DPO("dpo", beta=0.3, reference=base).loss(policy, batch)
    assert torch.equal(one_model, two_models)


@pytest.mark.slow
def test_lora_dpo_trains_only_adapters_and_learns():
    policy, _ = _policy_and_base()
    frozen = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    data = PreferencePairs(toy_pairs(), batch_size=8, pad_id=0, val_pairs=toy_pairs(16, seed=1))
    tr = Trainer(policy, DPO("dpo", beta=0.5), data,
                 TrainConfig(max_steps=15, eval_every=0, progress=False, peak_flops=1e11),
                 OptimConfig(lr=2e-2, warmup_steps=2, weight_decay=0.0))
    before = tr.evaluate()
    after = tr.fit().val
    assert after["acc"] > before["acc"] + 0.3 and after["loss"] < before["loss"] - 0.03, (before, after)
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
