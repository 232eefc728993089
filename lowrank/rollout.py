"""Sampling and scoring responses of the policy: the part of PPO and GRPO that is the same.

Both stages render prompts in the SFT adapter's chat template, left-pad them so that every
response starts in the same column, sample with the policy adapter active, cut each response at
its first stop token (EOS or the template's end-of-turn) and then need the log-probs of the
sampled tokens under one adapter or another. Everything here is role-agnostic: the caller enters
the role (lowrank.roles.use_role) around each call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank import rl, runrecord
from lowrank.errors import UserError


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, as generate() does for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, input_ids, attention_mask, response_len: int, *, with_entropy: bool = False,
                      temperature: float = 1.0):
    """Log-probs (batch, response_len) of the response tokens (the last ``response_len`` columns), and entropy.

    Logits are divided by the sampling ``temperature`` so that the log-probs are those of the
    distribution the rollouts were actually sampled from (on-policy ratios).

    The token at column t is predicted by the logits at t - 1, so the logits of the last
    response_len + 1 positions are kept (``logits_to_keep`` spares the (batch, seq, vocab) tensor
    of the prompt) and the final one dropped.
    """
    # use_cache=False: a scoring pass has no use for the KV cache it would otherwise build (GiBs on a 7B).
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=response_len + 1, use_cache=False).logits[:, :-1]  # (batch, response_len, vocab)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = rl.logprobs_from_logits(logits, input_ids[:, -response_len:])
    entropy = rl.entropy_from_logits(logits.detach()) if with_entropy else None
    return logprobs, entropy


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row (or to the end when none), else 0."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    stopped_before = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # a stop token strictly earlier
    return (~stopped_before).long()


def ended(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(batch,) bool: the response reached a stop token (False: it ran into max_new_tokens)."""
    return torch.isin(responses, torch.tensor(stop_ids, device=responses.device)).any(1)


@dataclass
class Samples:
    """Left-padded queries (batch, P) and right-padded responses (batch, R), cut at their stop token."""

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor  # (batch,) bool: a stop token was sampled within max_new_tokens

    def sequences(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.queries[rows], self.responses[rows]], 1),
                torch.cat([self.query_mask[rows], self.mask[rows]], 1))


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
           top_k: int, stop_ids: list[int], pad_id: int, device, merged=None) -> Samples:
    """Sample one response per prompt with the active adapter (call inside ``use_role(model, POLICY)``).

    ``merged``: a lowrank.fast_rollout.MergedPolicy of the policy, refreshed here and sampled from
    instead of the peft model (the same distribution, fewer kernels per token).
    """
    from lowrank.data import left_pad

    queries, query_mask = left_pad(prompt_ids, pad_id)  # every response starts in the same column
    width = queries.shape[1]
    queries, query_mask = queries.to(device), query_mask.to(device)
    was_training = model.training
    model.eval()
    # top_k 0 = off: None would fall back to the model's generation_config (often 50).
    # use_cache=True: the base may have it off for gradient checkpointing.
    generate = model.generate
    if merged is not None:
        merged.refresh(model)
        generate = merged.generate
    generated = generate(input_ids=queries, attention_mask=query_mask, do_sample=True, temperature=temperature,
                         top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                         pad_token_id=pad_id, use_cache=True)
    model.train(was_training)
    responses = generated[:, width:]
    if responses.shape[1] == 0:  # nothing generated at all (max_new_tokens 0 is refused earlier)
        raise RuntimeError("generate() returned no new tokens")
    mask = response_mask(responses, stop_ids)
    return Samples(queries, query_mask, responses.masked_fill(mask == 0, pad_id), mask, ended(responses, stop_ids))


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    """Each response's text without its stop token (what a reward function or a log sees)."""
    return [tokenizer.decode(row[keep.bool()], skip_special_tokens=True)
            for row, keep in zip(samples.responses, samples.mask)]


@torch.no_grad()
def kl_to_reference(model, tokenizer, template: str, prompts: list[list[dict]], *, policy: str, reference: str,
                    max_new_tokens: int, stop_ids: list[int], batch_size: int = 64, seed: int = 0) -> float:
    """Mean KL(policy || reference) per response on ``prompts``, in nats: one response sampled from the
    policy (temperature 1) per prompt, and at each of its positions the exact KL between the two
    adapters' next-token distributions (rl.kl_from_logits), summed over the response.

    ``model`` is a PeftModel holding both adapters by name. The measure is the same for every RL
    stage (PPO, DPO, GRPO), whatever each optimised, so the final table can compare them.
    """
    from lowrank.data import tokenize_prompt

    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    was_training, previous = model.training, model.active_adapter
    model.eval()
    totals = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [tokenize_prompt(tokenizer, template, messages) for messages in prompts[start:start + batch_size]]
            model.set_adapter(policy)
            samples = sample(model, ids, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                             stop_ids=stop_ids, pad_id=pad_id, device=device)
            input_ids, attention_mask = samples.sequences()
            length = samples.responses.shape[1]
            logits = {}
            for name in (policy, reference):
                model.set_adapter(name)
                logits[name] = model(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids(attention_mask), logits_to_keep=length + 1,
                                     use_cache=False).logits[:, :-1]
            kl = rl.kl_from_logits(logits[policy], logits[reference]) * samples.mask
            totals += kl.sum(1).tolist()
    finally:
        model.set_adapter(previous)
        model.train(was_training)
        torch.set_rng_state(generator_state)
    return sum(totals) / len(totals)


def length_alarm(lengths: list[float], max_new_tokens: int, *, window: int = 3) -> str | None:
    """A warning when the mean response length collapsed or exploded compared with the first steps.

    Collapse: the mean of the last ``window`` steps is under a third of the first ``window``'s
    (or under 1.5 tokens); explosion: at least 3x the first, or most responses at the limit.
    Returns None while fewer than 2 * window steps are known.
    """
    if len(lengths) < 2 * window:
        return None
    first = sum(lengths[:window]) / window
    last = sum(lengths[-window:]) / window
    if last < 1.5 or last < first / 3:
        return f"response length collapsed: {first:.1f} -> {last:.1f} tokens (mean of {window} steps)"
    if last > 3 * first or last > 0.9 * max_new_tokens:
        return (f"response length exploded: {first:.1f} -> {last:.1f} tokens (mean of {window} steps; "
                f"limit {max_new_tokens})")
    return None


def signal_alarm(zero_std_shares: list[float], *, window: int = 3) -> str | None:
    """A warning when GRPO has had no learning signal for the last ``window`` steps.

    ``zero_std_shares`` is each step's share of prompts whose completions all scored the same:
    their group-relative advantages are all 0, so when every group is like that the policy does
    not move at all (only the KL term acts). It happens when the policy never (or always) earns
    the reward, e.g. a base that has not learned the task at all. Returns None otherwise.
    """
    if len(zero_std_shares) < window or min(zero_std_shares[-window:]) < 1.0:
        return None
    return (f"no learning signal: for {window} steps every prompt's completions scored the same, so every "
            f"advantage is 0; check that the policy can earn the reward (sampled answers are in metrics.jsonl)")


# The PPO literature keeps the old-to-new policy divergence of one update near 0.01 nats (the
# "target_kl" that SB3 and Spinning Up stop their epochs at); far above it the clipped ratio no
# longer bounds the step. On the demo's reverse task a learning rate of 3e-4 gave 0.04 a token and
# PPO gained 8.8 points over SFT; 1e-4 gave 0.006 and 20.5 points (docs/benchmarks.md).
STEP_SIZE_LIMIT = 0.02


def step_size_alarm(approx_kls: list[float], *, window: int = 3, limit: float = STEP_SIZE_LIMIT) -> str | None:
    """A warning when the policy moves too far in each update: the mean ``approx_kl`` (the token-mean
    of 0.5 * (new - old log-prob)^2 over an update's minibatches) of the last ``window`` steps is
    above ``limit``. Such a policy wanders instead of climbing: the samples that earned the reward
    are forgotten by the next batch. The first step is left out: Adam's first update moves every
    weight by about the learning rate, whatever its gradient (up to 0.066 a token on the demo's
    reverse task at 1e-4, against 0.003-0.009 after it). Returns None while fewer than ``window``
    later steps are known."""
    later = approx_kls[1:]
    if len(later) < window:
        return None
    mean = sum(later[-window:]) / window
    if mean <= limit:
        return None
    return (f"the policy moves {mean:.3f} nats a token per update (approx_kl, mean of {window} steps; above "
            f"{limit}): PPO's clip no longer bounds the step, so lower --learning-rate")


def warn_new_alarms(log, step: int, alarms: dict[str, str | None], active: set[str]) -> set[str]:
    """Log each alarm (kind -> message, or None when quiet) in the step it starts, not again while it
    lasts; returns the kinds active now (pass them back next step). ``log`` None (a process other
    than the main one) keeps count without writing."""
    now = {kind for kind, message in alarms.items() if message}
    for kind in sorted(now - active) if log is not None else ():
        log.warning("step %d: %s", step, alarms[kind])
    return now


def seeded_prompt_order(count: int, seed: int):
    """An endless stream of prompt indices, reshuffled each epoch with a seeded RNG (resumable by position)."""
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        yield from order


def context_length(model_path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).get_text_config().max_position_embeddings)


def tokenize_prompts(tokenizer, template: str, prompts: list[list[dict]], *, source: str, max_new_tokens: int,
                     context: int) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt; refuses one that leaves no room to answer."""
    from lowrank.data import tokenize_prompt

    prompt_ids = []
    for number, messages in enumerate(prompts, 1):
        ids = tokenize_prompt(tokenizer, template, messages)  # BOS as in SFT and reward training
        if len(ids) + max_new_tokens > context:
            raise UserError(f"{source}: prompt {number} has {len(ids)} tokens, which with --max-new-tokens "
                            f"{max_new_tokens} exceeds the model's context of {context} tokens; shorten or drop "
                            "it, or lower --max-new-tokens")
        prompt_ids.append(ids)
    return prompt_ids


def check_reward_accuracy(reward_meta: runrecord.RunRecord, adapter: str | Path, threshold: float, refuse: bool, log) -> None:
    """Warn (or refuse, with ``refuse``) when the reward adapter ranked too few held-out pairs right.

    A policy optimised against a reward model that is right on 55% of pairs learns its mistakes as
    eagerly as its knowledge. The accuracy is the one `lowrank reward` recorded in lowrank.json.
    """
    accuracy = reward_meta.metrics.get("eval_accuracy")
    if accuracy is None or threshold <= 0:
        return
    if accuracy < threshold:
        message = (f"reward adapter {adapter} ranks only {accuracy:.1%} of its held-out pairs right (threshold "
                   f"{threshold:.0%}): the policy will learn its mistakes")
        if refuse:
            raise UserError(message + "; train a better reward model, or lower --min-reward-accuracy")
        log.warning("WARNING: %s. Pass --refuse-weak-reward to stop instead.", message)


def load_policy_inputs(config, log, policy_stages: tuple[str, ...] = ("sft",)):
    """What PPO and GRPO check and resolve alike before anything loads, from their shared fields
    (model, sft_adapter, reward_adapter, quant, min_reward_accuracy, refuse_weak_reward).

    Each adapter dir must exist and be trained on ``config.model``; the policy adapter (``sft_adapter``)
    must come from one of ``policy_stages``; a reward adapter's recorded
    accuracy is checked. The chat template is the SFT adapter's (else the reward adapter's, else
    the tokenizer's) and ``config.quant`` "auto" becomes what the adapters were trained on.
    Returns (model path, tokenizer, (template name, jinja), SFT lowrank.json or None, reward's or None).
    """
    from lowrank.models import QUANT_CHOICES, load_tokenizer, resolve_quant
    from lowrank.templates import resolve_template
    from lowrank.tiny import resolve_model_name

    sft_meta = reward_meta = None
    if config.sft_adapter:
        if not Path(config.sft_adapter).is_dir():
            raise UserError(f"SFT adapter directory {config.sft_adapter} does not exist; give the output dir of "
                            "`lowrank sft` (or leave --sft-adapter out to start from the base)")
        sft_meta = runrecord.read_adapter(config.sft_adapter, stage=policy_stages, what="SFT adapter",
                                          base=config.model)
    reward_adapter = getattr(config, "reward_adapter", "")  # `lowrank pairs` has none
    if reward_adapter:
        if not Path(reward_adapter).is_dir():
            raise UserError(f"reward adapter directory {reward_adapter} does not exist; give the output dir "
                            "of `lowrank reward`")
        reward_meta = runrecord.read_adapter(reward_adapter, stage="reward", what="reward adapter",
                                             base=config.model)
        check_reward_accuracy(reward_meta, reward_adapter, config.min_reward_accuracy,
                              config.refuse_weak_reward, log)
    model_path = resolve_model_name(config.model)
    tokenizer = load_tokenizer(model_path)
    first = sft_meta or reward_meta
    recorded = first.chat_template if first else None
    if sft_meta and reward_meta and reward_meta.chat_template and recorded and \
            reward_meta.chat_template.jinja != recorded.jinja:
        log.warning("the reward adapter was trained with chat template '%s', the SFT adapter with '%s': "
                    "rollouts use the SFT one, so scores may be off", reward_meta.chat_template.name, recorded.name)
    template = (recorded.name, recorded.jinja) if recorded else resolve_template(tokenizer, None)
    if config.quant == "auto":  # the base as the adapters saw it in training
        config.quant = (first.config.get("quant") if first else None) or resolve_quant("auto")
    if config.quant not in QUANT_CHOICES:
        raise UserError(f"--quant: unknown value '{config.quant}'; choose auto or one of {', '.join(QUANT_CHOICES)}")
    return model_path, tokenizer, template, sft_meta, reward_meta
