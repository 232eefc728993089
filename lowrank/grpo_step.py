"""One GRPO step (lowrank/grpo.py runs them): sample ``group_size`` completions of each prompt with
the policy adapter, score them (reward functions and/or a reward adapter), group-relative
advantages (rl.group_advantages), the sampling policy's and the reference's log-probs, then
``epochs`` passes of clipped-loss minibatch updates (rl.grpo_token_loss) through
train.accumulate_gradients. ``config`` is a GRPOConfig throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowrank import rl
from lowrank.ppo_step import score_responses
from lowrank.roles import POLICY, REFERENCE, use_role
from lowrank.rollout import decode_responses, response_logprobs, sample


@dataclass
class Prompts:
    """The prompt file, tokenized: token ids, the user's text and the row fields reward functions read."""

    ids: list[list[int]]
    texts: list[str]
    fields: list[dict]


@dataclass
class Group:
    """One step's completions (``group_size`` per prompt, contiguous) and what the loss needs of them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # (batch, R) completion tokens, up to and including the stop token
    advantages: torch.Tensor  # (batch,)
    old_logprobs: torch.Tensor  # the sampling policy's
    reference_logprobs: torch.Tensor | None  # None when beta is 0


def score_completions(model, tokenizer, samples, prompts: Prompts, rows: list[int], functions, weights,
                      config) -> tuple[torch.Tensor, dict[str, float]]:
    """Each completion's total reward (batch,) and the mean of each source, for the log."""
    from lowrank.rewards import combine_rewards, gather_fields

    completions = decode_responses(tokenizer, samples)
    total = torch.zeros(len(completions))
    means: dict[str, float] = {}
    if functions:
        fields = gather_fields([prompts.fields[r] for r in rows])
        summed, per_function = combine_rewards(functions, weights, [prompts.texts[r] for r in rows], completions,
                                               fields)
        total += torch.tensor(summed, dtype=torch.float32)
        means.update({f"reward/{name}": sum(values) / len(values) for name, values in per_function.items()})
    if config.reward_adapter:
        scores = score_responses(model, samples.queries, samples.query_mask, samples.responses, samples.mask)
        total += config.reward_adapter_weight * scores.float().cpu()
        means["reward/adapter"] = scores.mean().item()
    if config.missing_eos_penalty:
        total -= config.missing_eos_penalty * (~samples.ended).float().cpu()
    return total, means


def minibatch_loss(model, batch: dict, config, stats: dict) -> torch.Tensor:
    """The summed GRPO loss of a micro-batch (normalised later over the optimizer step); fills ``stats``."""
    length = batch["mask"].shape[1]
    logprobs, entropy = response_logprobs(model, batch["input_ids"], batch["attention_mask"], length,
                                          with_entropy=True, temperature=config.temperature)
    old = batch["old_logprobs"]
    loss, kl, clipped = rl.grpo_token_loss(logprobs, old, batch["advantages"], batch.get("reference_logprobs"),
                                           beta=config.beta, cliprange=config.cliprange,
                                           cliprange_high=config.cliprange_high or None)
    mask = batch["mask"].to(loss.dtype)
    tokens = mask.sum()
    stats["tokens"] += tokens.item()
    stats["clipped"] += (clipped.to(loss.dtype) * mask).sum().item()
    stats["entropy"] += (entropy * mask).sum().item()
    stats["approx_kl"] += (0.5 * (logprobs.detach() - old) ** 2 * mask).sum().item()
    if config.loss_normalization == "token":
        return (loss * mask).sum()
    if config.loss_normalization == "sequence":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)).sum()
    return (loss * mask).sum() / config.max_new_tokens  # "constant": / (completions * max_new_tokens) in the count


def _count(config) -> Callable[[dict], int]:
    if config.loss_normalization == "token":
        return lambda batch: int(batch["mask"].sum())
    return lambda batch: len(batch["mask"])  # completions


def grpo_update(accelerator, model, optimizer, scheduler, parameters, group: Group, config,
                generator: torch.Generator) -> dict:
    """``epochs`` passes of minibatch optimizer steps over one step's completions; mean stats."""
    from lowrank import train

    stats = {"tokens": 0.0, "clipped": 0.0, "entropy": 0.0, "approx_kl": 0.0}
    losses, grad_norms = [], []
    batch_size = len(group.advantages)
    tensors = {"input_ids": group.input_ids, "attention_mask": group.attention_mask, "mask": group.mask,
               "advantages": group.advantages, "old_logprobs": group.old_logprobs,
               "reference_logprobs": group.reference_logprobs}
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(batch_size, generator=generator) if config.minibatch < batch_size \
            else torch.arange(batch_size)
        for start in range(0, batch_size, config.minibatch):
            rows = order[start:start + config.minibatch]
            micro = [{k: v[rows[i:i + config.micro_batch].to(v.device)] for k, v in tensors.items() if v is not None}
                     for i in range(0, len(rows), config.micro_batch)]
            loss_sum, count = train.accumulate_gradients(
                accelerator, model, micro, loss_sum_fn=lambda m, b: minibatch_loss(m, b, config, stats),
                count_fn=_count(config))
            grad_norms.append(train.optimizer_step(accelerator, parameters, optimizer, scheduler,
                                                   config.max_grad_norm))
            losses.append(loss_sum / max(count, 1))
    model.eval()
    tokens = max(stats["tokens"], 1.0)
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
            "clip_fraction": stats["clipped"] / tokens, "entropy": stats["entropy"] / tokens,
            "approx_kl": stats["approx_kl"] / tokens}


def grpo_step(accelerator, model, tokenizer, optimizer, scheduler, parameters, prompts: Prompts, rows: list[int],
              functions, weights, config, stop_ids: list[int], pad_id: int,
              generator: torch.Generator, merged=None) -> tuple[dict, list[dict]]:
    """Sample, score, compute advantages and update the policy for one step; (metrics, samples for the log)."""
    inner = accelerator.unwrap_model(model)
    device = accelerator.device
    expanded = [r for r in rows for _ in range(config.group_size)]  # each prompt's group contiguous
    with use_role(inner, POLICY):
        samples = sample(inner, [prompts.ids[r] for r in expanded], max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                         stop_ids=stop_ids, pad_id=pad_id, device=device, merged=merged)
    rewards, reward_means = score_completions(inner, tokenizer, samples, prompts, expanded, functions, weights,
                                              config)
    advantages = rl.group_advantages(rewards, config.group_size, scale=config.scale_rewards).to(device)
    input_ids, attention_mask = samples.sequences()
    length = samples.responses.shape[1]
    with torch.no_grad():
        # The sampling policy's log-probs (the ratio's denominator) and the reference's. The reference
        # pass runs even with beta 0: one forward without gradient, far cheaper than the sampling,
        # buys the KL that the log and the final table report.
        with use_role(inner, POLICY):
            old = _chunked_logprobs(inner, input_ids, attention_mask, length, config)
        with use_role(inner, REFERENCE):
            reference = _chunked_logprobs(inner, input_ids, attention_mask, length, config)
    group = Group(input_ids, attention_mask, samples.mask, advantages, old, reference if config.beta > 0 else None)
    update = grpo_update(accelerator, model, optimizer, scheduler, parameters, group, config, generator)
    kl = (rl.kl_penalty(old, reference, "k3") * samples.mask).sum(1).mean().item()  # nats per completion
    grouped = rewards.view(-1, config.group_size)
    record = {
        "reward": rewards.mean().item(),
        "reward_std": grouped.std(1).mean().item(),
        "zero_std_groups": (grouped.std(1) < 1e-6).float().mean().item(),
        **reward_means,
        "kl": kl,
        "response_length": samples.mask.sum(1).float().mean().item(),
        "truncated": (~samples.ended).float().mean().item(),
        **update,
        "lr": scheduler.get_last_lr()[0],
    }
    texts = decode_responses(tokenizer, samples)
    shown = [{"prompt": prompts.texts[expanded[i]], "response": texts[i], "reward": round(rewards[i].item(), 4)}
             for i in range(0, len(texts), config.group_size)][:config.log_samples]
    return record, shown


def _chunked_logprobs(model, input_ids, attention_mask, length: int, config):
    """Log-probs of the completions in micro-batches (a whole step's batch at once may not fit)."""
    parts = [response_logprobs(model, input_ids[i:i + config.micro_batch], attention_mask[i:i + config.micro_batch],
                               length, temperature=config.temperature)[0]
             for i in range(0, len(input_ids), config.micro_batch)]
    return torch.cat(parts)
