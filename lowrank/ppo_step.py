"""One PPO step (lowrank/ppo.py runs them): the rollout (sampled responses, evaluated under every
role), the per-token rewards (reward-model score and KL penalty), GAE and whitening, then
``ppo_epochs`` passes of clipped policy and value losses over minibatches through the shared loop
(train.accumulate_gradients). ``config`` is a PPOConfig throughout; the math is in lowrank/rl.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank import rl
from lowrank.roles import POLICY, REFERENCE, VALUE, use_role
from lowrank.rollout import Samples, response_logprobs, sample


# --------------------------------------------------------------------------------------------
# Forward passes of the roles (each must run inside use_role of its role)
# --------------------------------------------------------------------------------------------

def response_values(model, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """Values (batch, response_len): the value head on the state *before* each response token."""
    from lowrank.scoring import apply_score_head, decoder_states

    hidden = decoder_states(model, input_ids, attention_mask)
    return apply_score_head(model, hidden[:, -response_len - 1:-1])  # (batch, response_len)


def score_responses(model, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores (batch,) of query + response, read at the last response token (reward role);
    for a reward ensemble, the mean over its members' roles."""
    from lowrank.roles import reward_roles
    from lowrank.scoring import score_sequences

    input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
    scores = []
    for role in reward_roles(model):
        with torch.no_grad(), use_role(model, role):
            scores.append(score_sequences(model, input_ids, attention_mask))
    return torch.stack(scores).mean(0)


@dataclass
class Rollout(Samples):
    """One rollout batch: the sampled responses (lowrank.rollout.Samples) and what PPO needs of them."""

    old_logprobs: torch.Tensor = None
    reference_logprobs: torch.Tensor = None
    values: torch.Tensor = None
    scores: torch.Tensor = None  # the reward model's, before any penalty


@torch.no_grad()
def collect_rollout(model, prompt_ids: list[list[int]], config, stop_ids: list[int],
                    pad_id: int, device, merged=None) -> Rollout:
    """Sample responses with the policy and evaluate them under every role (no gradients).

    ``merged``: the policy's lowrank.fast_rollout.MergedPolicy to sample from, or None (peft)."""
    with use_role(model, POLICY):
        samples = sample(model, prompt_ids, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         top_p=config.top_p, top_k=config.top_k, stop_ids=stop_ids, pad_id=pad_id, device=device,
                         merged=merged)
    input_ids, attention_mask = samples.sequences()
    length = samples.responses.shape[1]
    with use_role(model, POLICY):
        old_logprobs, _ = response_logprobs(model, input_ids, attention_mask, length, temperature=config.temperature)
    with use_role(model, REFERENCE):
        reference_logprobs, _ = response_logprobs(model, input_ids, attention_mask, length,
                                                  temperature=config.temperature)
    with use_role(model, VALUE):
        values = response_values(model, input_ids, attention_mask, length)
    scores = score_responses(model, samples.queries, samples.query_mask, samples.responses, samples.mask)
    return Rollout(**vars(samples), old_logprobs=old_logprobs, reference_logprobs=reference_logprobs,
                   values=values, scores=scores)


def penalised_scores(rollout: Rollout, config) -> torch.Tensor:
    """The reward-model scores, clipped (``score_clip``) and minus ``missing_eos_penalty`` for responses
    that ran into ``max_new_tokens`` without an end-of-turn token."""
    scores = rollout.scores.clamp(-config.score_clip, config.score_clip) if config.score_clip > 0 else rollout.scores
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~rollout.ended).to(scores.dtype)
    return scores


def token_rewards(rollout: Rollout, kl_coef: float, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl) per token: -kl_coef * KL everywhere, plus the (penalised) score, less its
    prompt's baseline (``score_baseline``), on the last response token."""
    kl = rl.kl_penalty(rollout.old_logprobs, rollout.reference_logprobs, config.kl_estimator) * rollout.mask
    rewards = -kl_coef * kl
    last = rollout.mask.sum(1).clamp(min=1) - 1  # index of the last response token of each row
    scores = penalised_scores(rollout, config)
    if config.score_baseline == "loo":
        scores = rl.leave_one_out(scores, config.samples_per_prompt)
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def _minibatch_losses(rollout: Rollout, rows, advantages, returns, config, stats: dict):
    """The (policy, value) loss-sum functions of one minibatch for train.accumulate_gradients.

    Each returns its loss as a sum over the minibatch's response tokens, so that the shared loop
    divides by the token count of the whole optimizer step (over every process).
    """
    length = rollout.responses.shape[1]

    def policy(model, batch):
        logprobs, entropy = response_logprobs(model, batch["input_ids"], batch["attention_mask"], length,
                                              with_entropy=True, temperature=config.temperature)
        mask = batch["mask"]
        loss, clipped = rl.ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                           config.cliprange)
        tokens = mask.sum()
        stats["policy_loss"].append(loss.item())
        stats["clip_fraction"].append(clipped.item())
        stats["entropy"].append(rl.masked_mean(entropy, mask).item())
        stats["approx_kl"].append(rl.masked_mean(0.5 * (logprobs.detach() - batch["old_logprobs"]) ** 2, mask).item())
        return loss * tokens

    def value(model, batch):
        values = response_values(model, batch["input_ids"], batch["attention_mask"], length)
        loss, clipped = rl.ppo_value_loss(values, batch["old_values"], batch["returns"], batch["mask"],
                                          config.cliprange_value)
        stats["value_loss"].append(loss.item())
        stats["value_clip_fraction"].append(clipped.item())
        return config.vf_coef * loss * batch["mask"].sum()

    input_ids, attention_mask = rollout.sequences(rows)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": rollout.mask[rows],
             "old_logprobs": rollout.old_logprobs[rows], "advantages": advantages[rows],
             "old_values": rollout.values[rows], "returns": returns[rows]}
    return batch, policy, value


def ppo_update(accelerator, model, optimizer, scheduler, parameters, rollout: Rollout, advantages, returns,
               config, generator: torch.Generator, train_policy: bool = True) -> dict:
    """``ppo_epochs`` passes of clipped policy and value losses over shuffled minibatches; mean stats.

    Each minibatch is one optimizer step of the shared loop (train.accumulate_gradients, then
    train.optimizer_step): the policy loss is backpropagated inside the policy role and the value
    loss inside the value role, because with gradient checkpointing the forward pass is recomputed
    during backward under whatever adapter is active then. Under `accelerate launch` the two
    trained roles' gradients are averaged over the processes before the step
    (train.average_gradients; a DDP wrapper would expect every trainable parameter in each backward).
    With ``train_policy`` False (value warm-up) the policy loss is measured but not backpropagated.
    """
    from lowrank import train

    model.train()
    optimizer.zero_grad(set_to_none=True)
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "value_clip_fraction": [], "entropy": [],
             "approx_kl": []}
    batch_size = rollout.responses.shape[0]

    def tokens(batch):
        return int(batch["mask"].sum())

    for _ in range(config.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, config.minibatch_size):
            rows = order[start: start + config.minibatch_size].to(rollout.mask.device)
            batch, policy_loss, value_loss = _minibatch_losses(rollout, rows, advantages, returns, config, stats)
            with use_role(model, POLICY):
                if train_policy:
                    train.accumulate_gradients(accelerator, model, [batch], loss_sum_fn=policy_loss, count_fn=tokens)
                else:  # measured only
                    with torch.no_grad():
                        policy_loss(model, batch)
            with use_role(model, VALUE):
                train.accumulate_gradients(accelerator, model, [batch], loss_sum_fn=value_loss, count_fn=tokens)
            train.average_gradients(accelerator, parameters)
            train.optimizer_step(accelerator, parameters, optimizer, scheduler, config.max_grad_norm)
    model.eval()
    return {k: sum(v) / len(v) for k, v in stats.items()}


def whiten_over_processes(accelerator, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages whitened with the mean and variance of every process's response tokens.

    Statistics of each process's own rollouts would make N processes step differently from one
    process on the union of their rollouts; two all-reduces (count and sum, then squared
    deviations) make them the same. One process keeps rl.masked_whiten exactly. Fewer than two
    tokens in all: left as they are (no variance to divide by).
    """
    if accelerator.num_processes == 1:
        return rl.masked_whiten(advantages, mask) if mask.sum() > 1 else advantages
    from lowrank import train

    weight = mask.to(advantages.dtype)
    count, total = train.reduce_sum(accelerator, weight.sum().item(), (advantages * weight).sum().item())
    if count < 2:
        return advantages
    mean = total / count
    (squares,) = train.reduce_sum(accelerator, (((advantages - mean) ** 2) * weight).sum().item())
    variance = squares / (count - 1)  # Bessel's correction, as rl.masked_var
    return (advantages - mean) * (variance + 1e-8) ** -0.5 * weight


def ppo_step(model, optimizer, parameters, rollout: Rollout, kl_controller, config,
             generator: torch.Generator, train_policy: bool = True, *, accelerator=None, scheduler=None) -> dict:
    """Rewards, GAE, whitening and the PPO update for one rollout batch; the step's metrics.

    "kl" is the k3 estimate of KL(policy || reference) per response, in nats: non-negative
    whichever estimator the penalty uses (k1 is unbiased too, but its per-sample values go negative
    and a plotted "KL" below zero is no divergence). ``accelerator`` defaults to a single-process
    one and ``scheduler`` to none (a constant learning rate).
    """
    if accelerator is None:
        from lowrank.train import make_accelerator
        accelerator = make_accelerator()
    rewards, penalty_kl = token_rewards(rollout, kl_controller.value, config)
    advantages, returns = rl.compute_gae(rewards, rollout.values, rollout.mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten_over_processes(accelerator, advantages, rollout.mask)
    update = ppo_update(accelerator, model, optimizer, scheduler, parameters, rollout, advantages, returns, config,
                        generator, train_policy)
    kl = (rl.kl_penalty(rollout.old_logprobs, rollout.reference_logprobs, "k3") * rollout.mask).sum(1).mean().item()
    record = {
        "score": rollout.scores.mean().item(),
        "score_std": rollout.scores.std().item() if len(rollout.scores) > 1 else 0.0,
        "kl": kl,
        "kl_coef": kl_controller.value,
        "response_length": rollout.mask.sum(1).float().mean().item(),
        "truncated": (~rollout.ended).float().mean().item(),
        "explained_variance": rl.explained_variance(rollout.values, returns, rollout.mask),
        **update,
    }
    observed, count = penalty_kl.sum(1).mean().item(), len(rollout.scores)
    if accelerator.num_processes > 1:  # every process steers by the same KL, so kl_coef stays one value
        from lowrank.train import reduce_sum
        total, count = reduce_sum(accelerator, observed, count)
        observed = total / accelerator.num_processes
    kl_controller.update(observed, int(count))
    return record


def make_kl_controller(config):
    if config.adaptive_kl:
        return rl.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
    return rl.FixedKLController(config.init_kl_coef)


def samples_for_log(tokenizer, rollout: Rollout, count: int) -> list[dict]:
    """A few decoded responses with their scores, for metrics.jsonl."""
    out = []
    for row in range(min(count, len(rollout.scores))):
        response = rollout.responses[row][rollout.mask[row].bool()]
        out.append({"response": tokenizer.decode(response, skip_special_tokens=True),
                    "score": round(rollout.scores[row].item(), 4)})
    return out
