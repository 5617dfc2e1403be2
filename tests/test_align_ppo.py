"""PPO: GAE against a hand-computed example, the clipped losses by hand, and a toy reward that rises."""

import pytest
import torch
from conftest import assert_rel_close

from lmforge.align.ppo import PPO, Rollouts, TokenCountReward, gae
from lmforge.errors import ConfigError
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.train import OptimConfig, TrainConfig, Trainer


def test_gae_matches_a_hand_computed_example():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [9.0, 0.0, 2.0], [0.0, 3.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [7.0, 0.5, 1.0], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.3 = 0.7; d1 = 0.9 * 0.3 - 0.4 = -0.13, A1 = -0.13 + 0.72 * 0.7 = 0.374;
    #        d0 = 0.9 * 0.4 - 0.5 = -0.14, A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # row 1 (position 0 is prompt): A2 = 2 - 1 = 1; A1 = 0.9 * 1 - 0.5 + 0.72 * 1 = 1.12
    # row 2 (position 2 is padding, so the value after position 1 is 0): A1 = 3 - 2 = 1;
    #        A0 = 0.9 * 2 - 1 + 0.72 * 1 = 1.52
    want = torch.tensor([[0.12928, 0.374, 0.7], [0.0, 1.12, 1.0], [1.52, 1.0, 0.0]])
    assert_rel_close(adv, want, terms=3)  # 3 steps back: each advantage sums at most 3 discounted deltas
    assert_rel_close(ret, (want + values) * mask, terms=3)


def test_clipped_losses_by_hand(tiny_llm):
    model = tiny_llm("llama", vocab_size=16)
    obj = PPO(d_model=64, reference=model, clip=0.2, clip_value=0.1, vf_coef=0.5)
    x = torch.randint(0, 16, (2, 5))
    y = torch.randint(0, 16, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    logps, values = obj.forward(model, {"input_ids": x, "labels": y})
    old = logps.detach() + torch.tensor([0.5, -0.5, 0.1, 0.0, 0.3]).expand(2, 5)  # ratios e^-0.5, e^0.5, ...
    adv = torch.randn(2, 5)
    ret, old_v = torch.randn(2, 5), values.detach() + 0.3
    batch = {"input_ids": x, "labels": y, "loss_mask": mask, "old_logps": old, "advantages": adv, "returns": ret,
             "old_values": old_v, "scores": torch.zeros(2), "kl": torch.zeros(2)}
    loss, stats = obj.loss(model, batch)
    rho = torch.exp(logps - old)
    pg = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2))[mask].mean()
    v_c = old_v + (values - old_v).clamp(-0.1, 0.1)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_c - ret) ** 2)[mask].mean()
    assert_rel_close(loss, pg + 0.5 * vf, terms=10)
    assert stats["clipped"].item() == int((((rho - 1).abs() > 0.2) & mask).sum())


def test_bad_rollout_settings_are_refused():
    model = DecoderLM(get_preset("tiny-llama"))
    obj = PPO(d_model=64, reference=model)
    reward = TokenCountReward(7)
    with pytest.raises(ConfigError, match="empty prompt"):
        Rollouts(model, obj, [[1, 2], []], reward)
    with pytest.raises(ConfigError, match="multiple of minibatch_size"):
        Rollouts(model, obj, [[1, 2]], reward, rollout_size=10, minibatch_size=4)
    with pytest.raises(ConfigError, match="adapters"):  # no reference model and no LoRA to switch off
        Rollouts(model, PPO(d_model=64), [[1, 2]], reward, rollout_size=2, minibatch_size=2).next_batch()


def ppo_run(policy, reference=None, steps=40, kl_coef=0.05, lr=3e-3):
    """PPO on the toy reward 'count of token 7 in 8 sampled tokens' (vocabulary of 16); (before, after)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 16, (4,), generator=g).tolist() for _ in range(64)]
    obj = PPO(d_model=policy.config.d_model, reference=reference, kl_coef=kl_coef)
    src = Rollouts(policy, obj, prompts, TokenCountReward(7), rollout_size=16, minibatch_size=8, ppo_epochs=2,
                   max_new_tokens=8, val_prompts=prompts[:32])
    tr = Trainer(policy, obj, src, TrainConfig(max_steps=steps, eval_every=0, progress=False, peak_flops=1e11),
                 OptimConfig(lr=lr, warmup_steps=2, weight_decay=0.0))
    before = tr.evaluate()
    return before, tr.fit().val


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_with_bounded_kl(tiny_llm):
    """One model in memory: LoRA adapters train, the reference is the same weights with them off."""
    from lmforge.adapt import apply_lora

    policy = tiny_llm("llama", vocab_size=16, train=True)
    apply_lora(policy, r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    frozen = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before, after = ppo_run(policy, None, lr=2e-2)
    assert before["kl"] == 0.0 and before["reward"] < 1.0
    assert after["reward"] > before["reward"] + 0.5, (before, after)
    assert 0.0 < after["kl"] < 4.0, after  # nats per 8-token response: the penalty keeps it bounded
    for n, p in policy.named_parameters():  # the base (= the reference) never moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_backward_through_frozen_packed_layers(tiny_llm):
    """Rollouts pack the linears for decoding; training after them must still backpropagate through frozen
    ones (LoRA freezes the base weights) into what trains, with the same gradient as unpacked layers."""
    from lmforge.infer.packed import pack_linears

    a = tiny_llm("llama", train=True)
    b = DecoderLM(a.config)
    b.load_state_dict(a.state_dict())
    pack_linears(a)
    x = torch.randint(0, 256, (2, 8))
    for m in (a, b):
        for n, p in m.named_parameters():
            p.requires_grad_(n == "tok_emb.weight")
        m(x).logsumexp(-1).sum().backward()
    assert_rel_close(a.tok_emb.weight.grad, b.tok_emb.weight.grad, terms=256)
