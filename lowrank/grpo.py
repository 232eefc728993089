"""GRPO of the SFT policy against checkable rewards, on one base with swapped adapters.

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) drops PPO's value function:
each prompt is answered ``group_size`` times, and a completion's advantage is its reward relative
to the other completions of the same prompt. One step of ``train_grpo``:

1. take ``prompts_per_step`` prompts (per process), render them in the SFT adapter's chat
   template, and sample ``group_size`` completions of each with the policy adapter;
2. score every completion with the reward sources, weighted and summed: programmatic functions
   (lowrank/rewards.py: the synthetic tasks' checker, GSM8K-style numeric answers, or the user's
   own ``file.py:function``) and/or a reward adapter from `lowrank reward`; a completion that
   ran into ``max_new_tokens`` can lose ``missing_eos_penalty``;
3. advantages (lowrank.rl.group_advantages): reward minus the group's mean, divided by the group's
   standard deviation unless ``scale_rewards`` is off (Dr. GRPO); a group whose completions all
   score the same teaches nothing and gets 0;
4. with no gradient: the log-probs of the sampled tokens under the policy before the update and
   under the reference adapter (the SFT adapter), whose k3 KL is logged even when ``beta`` is 0;
5. ``epochs`` passes over minibatches of ``minibatch_size`` completions: the clipped surrogate
   with the per-token k3 KL to the reference weighted by ``beta`` (rl.grpo_token_loss), reduced
   over tokens as ``loss_normalization`` says, one optimizer step each.

Loss normalisation (``loss_normalization``): "token" (default; DAPO's and TRL's default) divides
the summed per-token loss by the number of completion tokens in the optimizer step, so every token
weighs the same; "sequence" is DeepSeekMath's formula (mean over each completion's tokens, then
over completions), which gives the tokens of long completions less weight each; "constant" is Dr.
GRPO's sum divided by completions x ``max_new_tokens``, which adds no length bias at all.

There is no value role: policy and reference (and, when used, the frozen reward adapter) are the
only adapters on the base, so GRPO needs less memory than PPO.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, locks, rl, runrecord
from lowrank.errors import UserError
from lowrank.metrics import MetricsLog, StageFields
from lowrank.roles import POLICY, REFERENCE, use_role
from lowrank.rollout import (context_length, decode_responses, length_alarm, signal_alarm, load_policy_inputs,
                             response_logprobs, sample, seeded_prompt_order, tokenize_prompts)

log = logging.getLogger(__name__)

LOSS_NORMALIZATIONS = ("token", "sequence", "constant")


@dataclass
class GRPOConfig(StageFields):
    """Every knob of `lowrank grpo`; defaults follow DeepSeekMath and TRL's GRPOTrainer where they fit LoRA."""

    model: str = field(default="tiny", metadata={"help": "base model: HF dir or hub id (as used for SFT)"})
    sft_adapter: str = field(default="", metadata={"help": "SFT adapter dir: initial policy and the reference"})
    prompts: str = field(default="", metadata={"help": "prompts: JSON/JSONL file or hub dataset (name:config), each "
                                                       "record a `prompt` or `messages` plus the fields the reward "
                                                       "functions read (e.g. `answer`)"})
    prompt_field: str = field(default="", metadata={"help": "field of the prompt in each record (default: prompt "
                                                            "or messages; e.g. question for GSM8K)"})
    output_dir: str = field(default="", metadata={"help": "where the policy adapter is written"})
    quant: str = field(default="auto", metadata={"help": "base weights: nf4, int8, none, or auto (what the SFT "
                                                         "adapter was trained on)"})
    # rewards
    rewards: list[str] = field(default_factory=list, metadata={
        "help": "reward functions: built-in names (exact, numeric) or file.py:function / module:function"})
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "one weight per --rewards entry (default: 1 each)"})
    reward_adapter: str = field(default="", metadata={"help": "reward adapter dir from `lowrank reward`, scored "
                                                              "beside the functions"})
    reward_adapter_weight: float = field(default=1.0, metadata={"help": "weight of the reward adapter's score"})
    min_reward_accuracy: float = field(default=0.6, metadata={"help": "warn when the reward adapter's held-out "
                                                                      "pairwise accuracy is below this (0: off)"})
    refuse_weak_reward: bool = field(default=False, metadata={"help": "stop instead of warning below "
                                                                     "--min-reward-accuracy"})
    missing_eos_penalty: float = field(default=0.0, metadata={"help": "subtracted from the reward of a completion "
                                                                      "that hits --max-new-tokens unfinished"})
    # sampling
    group_size: int = field(default=8, metadata={"help": "completions sampled per prompt (G, at least 2)"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step, per process"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion length limit"})
    # loss
    beta: float = field(default=0.04, metadata={"help": "weight of the k3 KL to the reference (0: no reference pass)"})
    cliprange: float = field(default=0.2, metadata={"help": "ratio clip epsilon"})
    cliprange_high: float = field(default=0.0, metadata={"help": "upper clip epsilon (DAPO's clip-higher; 0: "
                                                                 "same as --cliprange)"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group's std "
                                                                "(off: Dr. GRPO)"})
    loss_normalization: str = field(default="token", metadata={"help": "token, sequence (DeepSeekMath) or "
                                                                        "constant (Dr. GRPO)"})
    # optimisation
    epochs: int = field(default=1, metadata={"help": "passes over each step's completions"})
    minibatch_size: int = field(default=0, metadata={"help": "completions per optimizer step (0: all of a step's)"})
    micro_batch_size: int = field(default=0, metadata={"help": "completions per forward/backward (0: the minibatch)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the policy adapter"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    steps: int = field(default=100, metadata={"help": "GRPO steps (sampling rounds)"})
    lora_r: int = field(default=16, metadata={"help": "rank of a fresh policy LoRA when no SFT adapter is given"})
    lora_alpha: int = field(default=32, metadata={"help": "alpha of a fresh policy LoRA"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    # bookkeeping
    seed: int = field(default=0, metadata={"help": "seed of sampling, prompt order and init"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps for --resume (0: off)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in output_dir"})
    log_samples: int = field(default=2, metadata={"help": "sample completions logged per step"})

    @property
    def completions_per_step(self) -> int:
        return self.group_size * self.prompts_per_step

    @property
    def minibatch(self) -> int:
        return self.minibatch_size or self.completions_per_step

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.minibatch


def check_config(config: GRPOConfig) -> None:
    """Refuse settings that cannot work, each with the flag to change; nothing is loaded yet."""
    if config.group_size < 2:
        raise UserError(f"--group-size must be at least 2 (got {config.group_size}): GRPO compares each completion "
                        "with the others sampled for the same prompt")
    if not (config.beta >= 0 and math.isfinite(config.beta)):
        raise UserError(f"--beta must be 0 or more (got {config.beta}); 0 turns the KL term off")
    for name in ("prompts_per_step", "max_new_tokens", "steps", "epochs"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(config, name)})")
    for name in ("minibatch_size", "micro_batch_size", "save_every"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(config, name)})")
    if config.completions_per_step % config.minibatch:
        raise UserError(f"--minibatch-size {config.minibatch} must divide the {config.completions_per_step} "
                        "completions of a step (--group-size x --prompts-per-step)")
    if config.minibatch % config.micro_batch:
        raise UserError(f"--micro-batch-size {config.micro_batch} must divide --minibatch-size {config.minibatch}")
    if config.loss_normalization not in LOSS_NORMALIZATIONS:
        raise UserError(f"--loss-normalization: unknown value '{config.loss_normalization}'; choose "
                        f"{', '.join(LOSS_NORMALIZATIONS)}")
    if not config.temperature > 0:
        raise UserError(f"--temperature must be above 0 (got {config.temperature}): GRPO needs varied samples")
    if not 0 < config.cliprange < 1 or config.cliprange_high < 0:
        raise UserError("--cliprange must lie in (0, 1) and --cliprange-high be 0 or more")
    if not config.rewards and not config.reward_adapter:
        raise UserError("no reward: give --rewards (e.g. exact, numeric, my_rewards.py:score) and/or --reward-adapter")
    for name in ("prompts", "output_dir"):
        if not getattr(config, name):
            raise UserError(f"no {name.replace('_', ' ')}: give --{name.replace('_', '-')}")


@dataclass
class Prompts:
    """The prompt file, tokenized: token ids, the user's text and the row fields reward functions read."""

    ids: list[list[int]]
    texts: list[str]
    fields: list[dict]


def _load_inputs(config: GRPOConfig):
    """Check every input before anything is loaded or written.

    Returns (model path, tokenizer, (template name, jinja), Prompts, reward functions and weights,
    SFT lowrank.json or None).
    """
    from lowrank.data import load_prompt_rows
    from lowrank.rewards import check_weights, load_reward_function, prompt_text

    check_config(config)
    weights = check_weights(config.rewards, [_number(w, "reward_weights") for w in config.reward_weights])
    functions = [load_reward_function(spec) for spec in config.rewards]
    if not math.isfinite(config.reward_adapter_weight):
        raise UserError(f"--reward-adapter-weight must be a finite number (got {config.reward_adapter_weight})")
    model_path, tokenizer, (template_name, template), sft_meta, _ = load_policy_inputs(config, log)
    rows = load_prompt_rows(config.prompts, config.prompt_field)
    ids = tokenize_prompts(tokenizer, template, [row.prompt_messages for row in rows], source=config.prompts,
                           max_new_tokens=config.max_new_tokens, context=context_length(model_path))
    prompts = Prompts(ids, [prompt_text(row.prompt_messages) for row in rows], [row.fields for row in rows])
    return model_path, tokenizer, (template_name, template), prompts, (functions, weights), sft_meta


def _number(value, field_name: str):
    """A weight from the command line arrives as text: "0.5" -> 0.5 (check_weights refuses what is not a number)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{field_name}: '{value}' is not a number") from None
    return value


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------

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
                      config: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
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
        from lowrank.ppo import score_responses

        scores = score_responses(model, samples.queries, samples.query_mask, samples.responses, samples.mask)
        total += config.reward_adapter_weight * scores.float().cpu()
        means["reward/adapter"] = scores.mean().item()
    if config.missing_eos_penalty:
        total -= config.missing_eos_penalty * (~samples.ended).float().cpu()
    return total, means


def minibatch_loss(model, batch: dict, config: GRPOConfig, stats: dict) -> torch.Tensor:
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


def _count(config: GRPOConfig) -> Callable[[dict], int]:
    if config.loss_normalization == "token":
        return lambda batch: int(batch["mask"].sum())
    return lambda batch: len(batch["mask"])  # completions


def grpo_update(accelerator, model, optimizer, scheduler, parameters, group: Group, config: GRPOConfig,
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
              functions, weights, config: GRPOConfig, stop_ids: list[int], pad_id: int,
              generator: torch.Generator) -> tuple[dict, list[dict]]:
    """Sample, score, compute advantages and update the policy for one step; (metrics, samples for the log)."""
    inner = accelerator.unwrap_model(model)
    device = accelerator.device
    expanded = [r for r in rows for _ in range(config.group_size)]  # each prompt's group contiguous
    with use_role(inner, POLICY):
        samples = sample(inner, [prompts.ids[r] for r in expanded], max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                         stop_ids=stop_ids, pad_id=pad_id, device=device)
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


def _chunked_logprobs(model, input_ids, attention_mask, length: int, config: GRPOConfig):
    """Log-probs of the completions in micro-batches (a whole step's batch at once may not fit)."""
    parts = [response_logprobs(model, input_ids[i:i + config.micro_batch], attention_mask[i:i + config.micro_batch],
                               length, temperature=config.temperature)[0]
             for i in range(0, len(input_ids), config.micro_batch)]
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def train_grpo(config: GRPOConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Run GRPO as configured and write the policy adapter to ``config.output_dir``; return that path.

    ``on_step`` gets each step's metrics on the main process (reward and its sources, kl,
    entropy, clip_fraction, approx_kl, response_length, truncated, samples, ...): the same dicts
    that go to metrics.jsonl.
    """
    from lowrank import plan, train
    from lowrank.config import config_to_dict
    from lowrank.models import load_base_model, lora_config
    from lowrank.roles import build_roles, trainable_parameters
    from lowrank.templates import stop_token_ids

    model_path, tokenizer, (template_name, template), prompts, (functions, weights), sft_meta = \
        _load_inputs(config)
    checkpoint = checkpoints.resume_checkpoint(config.output_dir) if config.resume else None
    accelerator = train.make_accelerator()
    if accelerator.is_main_process:
        out_dir = train.prepare_output_dir(config.output_dir, config.overwrite, resume=config.resume)
    accelerator.wait_for_everyone()
    out_dir = Path(config.output_dir)
    train.seed_everything(config.seed)
    memory_plan = plan.plan_for_training(model_path, "grpo", config, accelerator.device,
                                         prompt_len=max(map(len, prompts.ids))) \
        if accelerator.is_main_process else None
    plan.report_start(memory_plan, accelerator.device)
    base = load_base_model(model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing,
                           device=accelerator.device)
    policy_lora = None if config.sft_adapter else lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=0.0)
    model = build_roles(base, sft_adapter=config.sft_adapter or None, policy_lora_config=policy_lora,
                        reward_adapter=config.reward_adapter or None, value=False)
    parameters = trainable_parameters(model)[POLICY]
    optimizer = train.build_optimizer(parameters, config.learning_rate, paged=config.quant != "none")
    updates_per_step = config.epochs * (config.completions_per_step // config.minibatch)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=config.steps * updates_per_step,
                                      kind="constant")
    model = accelerator.prepare(model)  # DDP under `accelerate launch`; unchanged on one process
    metrics_log = MetricsLog(out_dir, enabled=accelerator.is_main_process, report_to=config.report_to,
                             stage="grpo", config=config_to_dict(config))
    start = 0
    if checkpoint is not None:
        start, _ = checkpoints.load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
        metrics_log.truncate_after(start)
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_token_ids(tokenizer, template)
    order = seeded_prompt_order(len(prompts.ids), config.seed)
    per_step = config.prompts_per_step * accelerator.num_processes
    for _ in range(start * per_step):  # replay the prompt stream up to the resumed step
        next(order)
    generator = torch.Generator()
    lengths = [r["response_length"] for r in metrics_log.records if "response_length" in r]
    zero_std = [r["zero_std_groups"] for r in metrics_log.records if "zero_std_groups" in r]
    last_alarms: set[str] = set()
    for step in range(start + 1, config.steps + 1):
        seed = (config.seed * 100003 + step) * 64 + accelerator.process_index
        torch.manual_seed(seed)  # sampling is reproducible per step and process, also on resume
        generator.manual_seed(seed)
        taken = [next(order) for _ in range(per_step)]
        rows = taken[accelerator.process_index::accelerator.num_processes]
        record, shown = grpo_step(accelerator, model, tokenizer, optimizer, scheduler, parameters, prompts, rows,
                                  functions, weights, config, stop_ids, pad_id, generator)
        if accelerator.num_processes > 1:
            keys = [k for k, v in record.items() if isinstance(v, float)]
            summed = train.reduce_sum(accelerator, *(record[k] for k in keys))
            record.update({k: v / accelerator.num_processes for k, v in zip(keys, summed)})
        record = {"step": step, "max_steps": config.steps, **record, "samples": shown}
        lengths.append(record["response_length"])
        zero_std.append(record["zero_std_groups"])
        alarms = {a for a in (length_alarm(lengths, config.max_new_tokens), signal_alarm(zero_std)) if a}
        for alarm in sorted(alarms - last_alarms) if accelerator.is_main_process else ():
            log.warning("step %d: %s", step, alarm)
        last_alarms = alarms
        metrics_log.log(record)
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            checkpoints.save_checkpoint(accelerator, out_dir, step, model, optimizer, scheduler)
        if on_step is not None and accelerator.is_main_process:
            on_step(record)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics_log.plot(out_dir / "grpo_metrics.png", ["reward", "kl", "entropy", "clip_fraction", "approx_kl",
                                                        "response_length", "truncated", "zero_std_groups"])
        final = metrics_log.records[-1] if metrics_log.records else {}
        final.update(plan.peak_metrics(memory_plan, accelerator.device))
        meta = runrecord.RunRecord(
            stage="grpo", base=runrecord.BaseRef.of(config.model, model_path),
            chat_template=runrecord.ChatTemplate(template_name, template),
            data={"source": config.prompts, "digest": train.data_digest(config.prompts),
                  "prompts": len(prompts.ids)},
            config=config_to_dict(config),
            seed=config.seed,
            metrics={k: v for k, v in final.items() if k not in ("step", "max_steps", "samples")},
            extra={
                "sft_adapter": config.sft_adapter or None,
                "reward_adapter": config.reward_adapter or None,
                "rewards": [f.name for f in functions],
                "processes": accelerator.num_processes,
            },
        )
        train.write_adapter(accelerator.unwrap_model(model), out_dir, meta, adapter_name=POLICY)
        shutil.rmtree(out_dir / checkpoints.CHECKPOINTS, ignore_errors=True)  # the run is finished
    accelerator.wait_for_everyone()
    locks.release(out_dir)  # the output is complete
    return out_dir
