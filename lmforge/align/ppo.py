"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), inside the one trainer.

The loop is the trainer's; PPO brings a batch source and an objective:

- `Rollouts` (a `BatchSource`) generates responses to prompts with the current policy through the one
  generator (`lmforge.infer.generate`, KV cache and all), scores them (`reward_fn`), computes the old
  log-probs, the reference log-probs (LoRA adapters off: one model in memory) and the value head's
  values, turns them into per-token rewards r_t = -kl_coef * (log pi_old - log pi_ref) (+ the score at a
  response's last token), and advantages by GAE. It then hands out the rollout buffer as shuffled
  minibatches for `ppo_epochs` passes before generating the next round.
- `PPO` (an `Objective`) is the clipped surrogate plus a clipped value loss:
      L = mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))) + vf_coef * 0.5 * mean(max((V - R)^2,
          (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)),  rho = exp(log pi - log pi_old)
  (Schulman et al. 2017, eq. 7 and 9), with the value head on the policy's hidden states.

GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},
returns R_t = A_t + V_t, over each response's tokens (V after the last token is 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from lmforge.align.data import response_batch
from lmforge.align.logps import Reference, masked_mean, token_logps
from lmforge.errors import ConfigError
from lmforge.models.scalar_heads import ScalarHead
from lmforge.train.batches import BatchSource, _gen_state, _set_gen_state
from lmforge.train.objectives import Batch, Objective, add_aux_loss

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]  # (prompts, responses) -> (B,) scores


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), over the positions where `mask` is True (one contiguous run per row).

    rewards, values: (B, T); the value after a row's last masked position is taken as 0.
    """
    mask = mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        nxt_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * nxt_mask) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


class TokenCountReward:
    """Toy reward: how many times `token_id` appears in the response (a PPO test everyone can check)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(sum(t == self.token_id for t in r)) for r in responses])


class RewardModelScore:
    """Reward from a trained `RewardModel`: its score of prompt + response."""

    def __init__(self, reward_model):
        self.rm = reward_model

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return self.rm.score_ids([p + r for p, r in zip(prompts, responses)]).float().cpu()


class PPO(Objective):
    """Clipped PPO surrogate + clipped value loss on rollout batches from `Rollouts`.

    Args:
        d_model: the policy's hidden size (the value head's input), or pass `value_head`.
        clip: eps of the ratio clipping.
        clip_value: eps_v of the value clipping.
        vf_coef: weight of the value loss.
        kl_coef, gamma, lam: read by `Rollouts` (per-token KL penalty, GAE discount and lambda).
        reference: a frozen reference model; None = the policy with its LoRA adapters off.

    Stats: loss, pg, vf (sums over batches), batches, score, kl, rows (per-sequence sums), clipped, tokens.
    Summaries: loss, reward (mean score of a response), kl (mean per-sequence KL to the reference),
    clipfrac, pg_loss, vf_loss.
    """

    name = "ppo"

    def __init__(self, d_model: int | None = None, value_head: ScalarHead | None = None, clip: float = 0.2,
                 clip_value: float = 0.2, vf_coef: float = 0.1, kl_coef: float = 0.05, gamma: float = 1.0,
                 lam: float = 0.95, reference: nn.Module | None = None):
        if value_head is None:
            if d_model is None:
                raise ValueError("PPO needs d_model (the policy's hidden size) or a value_head")
            value_head = ScalarHead(d_model)
        if not 0 < clip < 1 or clip_value <= 0:
            raise ConfigError(f"clip must be in (0, 1) and clip_value > 0, got {clip}, {clip_value}")
        self.value_head = value_head
        self.clip, self.clip_value, self.vf_coef = clip, clip_value, vf_coef
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.reference = Reference(reference)

    def modules(self) -> dict[str, nn.Module]:
        """The value head, trained with the policy."""
        return {"value_head": self.value_head}

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(token log-probs (B, T), values (B, T)) of the current policy."""
        h = model.hidden_states(batch["input_ids"])
        return token_logps(model.lm_head(h), batch["labels"]), self.value_head(h)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped surrogate + vf_coef * clipped value loss, means over response tokens."""
        mask = batch["loss_mask"].bool()
        logps, values = self.forward(model, batch)
        adv, ret, old_v = batch["advantages"], batch["returns"], batch["old_values"]
        ratio = torch.exp(logps - batch["old_logps"])
        pg = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip)), mask)
        v_clip = old_v + (values - old_v).clamp(-self.clip_value, self.clip_value)
        vf = 0.5 * masked_mean(torch.max((values - ret) ** 2, (v_clip - ret) ** 2), mask)
        loss = pg + self.vf_coef * vf
        with torch.no_grad():
            clipped = (((ratio - 1).abs() > self.clip) & mask).sum()
        f64 = lambda x: x.detach().double()
        stats = {"loss": f64(loss), "pg": f64(pg), "vf": f64(vf), "batches": torch.tensor(1.0, dtype=torch.float64),
                 "score": f64(batch["scores"].sum()), "kl": f64(batch["kl"].sum()),
                 "rows": torch.tensor(float(len(batch["scores"])), dtype=torch.float64),
                 "clipped": clipped.double(), "tokens": mask.sum().double()}
        return add_aux_loss(model, loss, stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss, reward, kl, clipfrac, pg_loss, vf_loss."""
        nb, nr = max(totals.get("batches", 0.0), 1.0), max(totals.get("rows", 0.0), 1.0)
        return {"loss": totals["loss"] / nb, "reward": totals["score"] / nr, "kl": totals["kl"] / nr,
                "clipfrac": totals["clipped"] / max(totals["tokens"], 1.0), "pg_loss": totals["pg"] / nb,
                "vf_loss": totals["vf"] / nb}


class Rollouts(BatchSource):
    """PPO's batch source: generate, score and advantage-estimate a round of rollouts, then serve minibatches.

    Args:
        policy: the model being trained (the very object the trainer optimises).
        objective: the `PPO` objective (its value head, reference and coefficients).
        prompts: token-id prompts; each round samples `rollout_size` of them.
        reward_fn: (prompts, responses) -> (B,) scores.
        rollout_size: responses generated per round.
        minibatch_size: rows per trainer batch.
        ppo_epochs: passes over each round's buffer.
        max_new_tokens, temperature, top_k: sampling of the responses.
        eos_ids, pad_id: generation's stop tokens and padding.
        val_prompts: prompts of the validation rollouts (sampled with a fixed seed).

    State: the generator and the number of rounds. A resumed run starts a fresh round (the buffer of an
    interrupted round is not saved), so PPO resumes exactly only at round boundaries.
    """

    def __init__(self, policy: nn.Module | None, objective: PPO | None, prompts: list[list[int]],
                 reward_fn: RewardFn | None,
                 rollout_size: int = 16, minibatch_size: int = 8, ppo_epochs: int = 2, max_new_tokens: int = 16,
                 temperature: float = 1.0, top_k: int = 0, eos_ids: tuple[int, ...] = (), pad_id: int = 0,
                 seed: int = 0, val_prompts: list[list[int]] | None = None):
        if not prompts:
            raise ConfigError("PPO needs prompts to generate from")
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("empty prompt among the PPO prompts: there is nothing to respond to")
        if rollout_size % minibatch_size:
            raise ConfigError(f"rollout_size ({rollout_size}) must be a multiple of minibatch_size "
                              f"({minibatch_size})")
        self.policy, self.objective, self.prompts, self.reward_fn = policy, objective, prompts, reward_fn
        self.rollout_size, self.minibatch_size, self.ppo_epochs = rollout_size, minibatch_size, ppo_epochs
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.eos_ids, self.pad_id = tuple(eos_ids), pad_id
        self.val_prompts = val_prompts or []
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds = 0
        self._queue: list[Batch] = []
        self.last_round: dict[str, float] = {}

    def bind(self, policy: nn.Module, objective: PPO, reward_fn: RewardFn | None = None) -> Rollouts:
        """Attach the policy, objective and reward (a run builder makes the source before the model)."""
        self.policy, self.objective = policy, objective
        if reward_fn is not None:
            self.reward_fn = reward_fn
        return self

    # ---- one round -------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], seed: int) -> Batch:
        """Generate, score and estimate advantages for `prompts`: one buffer of len(prompts) rows."""
        from lmforge.infer.generate import GenerationConfig, generate_ids

        model, obj = self.policy, self.objective
        was = model.training
        model.eval()
        try:
            gen = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   top_k=self.top_k, seed=seed)
            responses = generate_ids(model, prompts, gen, self.eos_ids, self.pad_id)
            responses = [r if r else [self.pad_id] for r in responses]
            batch = response_batch([p + r for p, r in zip(prompts, responses)], [len(r) for r in responses],
                                   self.pad_id)
            mask = batch["loss_mask"]
            old_logps, values = obj.forward(model, batch)
            ref_logps = obj.reference.logps(model, batch, lambda m, b: (token_logps(m(b["input_ids"]),
                                                                                     b["labels"]),))
        finally:
            model.train(was)
        scores = self.reward_fn(prompts, responses).float()
        kl_tok = (old_logps - ref_logps) * mask
        rewards = -obj.kl_coef * kl_tok
        last = batch["lengths"] - 2  # the target position of each row's last token
        rewards[torch.arange(len(prompts)), last] += scores
        adv, ret = gae(rewards, values * mask, mask, obj.gamma, obj.lam)
        m = mask.bool()
        mean, std = adv[m].mean(), adv[m].std().clamp(min=1e-6) if m.sum() > 1 else torch.tensor(1.0)
        batch.update(old_logps=old_logps, old_values=values * mask, advantages=((adv - mean) / std) * mask,
                     returns=ret, scores=scores, kl=kl_tok.sum(1))
        return batch

    def _new_round(self) -> None:
        idx = torch.randint(len(self.prompts), (self.rollout_size,), generator=self.generator).tolist()
        seed = int(torch.randint(2 ** 31 - 1, (1,), generator=self.generator))
        buf = self.rollout([self.prompts[i] for i in idx], seed)
        self.last_round = {"reward": float(buf["scores"].mean()), "kl": float(buf["kl"].mean())}
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(self.rollout_size, generator=self.generator)
            for i in range(0, self.rollout_size, self.minibatch_size):
                take = perm[i:i + self.minibatch_size]
                self._queue.append({k: v[take] for k, v in buf.items()})
        self.rounds += 1

    # ---- BatchSource ------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        """The next minibatch of the current round (a new round is generated when it is used up)."""
        if not self._queue:
            self._new_round()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """Generator state and rounds done (the current round's remaining minibatches are not saved)."""
        return {"kind": "ppo_rollouts", "generator": _gen_state(self.generator), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        """Continue with a fresh round from the saved generator."""
        _set_gen_state(self.generator, state["generator"])
        self.rounds, self._queue = int(state["rounds"]), []

    def eval_batches(self) -> Iterator[Batch]:
        """Rollouts on the validation prompts, sampled with a fixed seed (no training RNG touched)."""
        for i in range(0, len(self.val_prompts), self.rollout_size):
            yield self.rollout(self.val_prompts[i:i + self.rollout_size], seed=1234 + i)
