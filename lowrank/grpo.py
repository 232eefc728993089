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

One step (sampling, scoring, the updates) is lowrank/grpo_step.py; this file holds the config, the
inputs and the run. There is no value role: policy and reference (and, when used, the frozen reward
adapter) are the only adapters on the base, so GRPO needs less memory than PPO.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, fast_rollout, locks, runrecord
from lowrank.errors import UserError
from lowrank.fields import QUANT_OF_SFT_ADAPTER, RewardFunctionFields, RLFields, restate, stage_config
from lowrank.grpo_step import Prompts, grpo_step
from lowrank.metrics import MetricsLog
from lowrank.roles import POLICY
from lowrank.rollout import (context_length, length_alarm, load_policy_inputs, seeded_prompt_order, signal_alarm,
                             step_size_alarm, tokenize_prompts, warn_new_alarms)

log = logging.getLogger(__name__)

LOSS_NORMALIZATIONS = ("token", "sequence", "constant")


@stage_config
class GRPOConfig(RewardFunctionFields, RLFields):
    """Every knob of `lowrank grpo`; defaults follow DeepSeekMath and TRL's GRPOTrainer where they fit LoRA."""

    prompts: str = field(default="", metadata={"help": "prompts: JSON/JSONL file or hub dataset (name:config), each "
                                                       "record a `prompt` or `messages` plus the fields the reward "
                                                       "functions read (e.g. `answer`)"})
    # rewards
    reward_adapter_weight: float = field(default=1.0, metadata={"help": "weight of the reward adapter's score"})
    # sampling
    group_size: int = field(default=8, metadata={"help": "completions sampled per prompt (G, at least 2)"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step, per process"})
    # loss
    beta: float = field(default=0.04, metadata={"help": "weight of the k3 KL to the reference (0: no reference pass)"})
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
    steps: int = field(default=100, metadata={"help": "GRPO steps (sampling rounds)"})
    # the shared fields (lowrank.fields) as GRPO states them
    quant = restate(help=QUANT_OF_SFT_ADAPTER)
    reward_adapter = restate(help="reward adapter dir from `lowrank reward`, scored beside the functions")
    missing_eos_penalty = restate(help="subtracted from the reward of a completion that hits --max-new-tokens "
                                       "unfinished")
    learning_rate = restate(help="AdamW learning rate of the policy adapter")
    log_samples = restate(help="sample completions logged per step")

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
    fast_rollout.check(config.fast_rollout)
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
    out_dir = train.take_output_dir(accelerator, config)
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
    merged = fast_rollout.build(model, POLICY, config.fast_rollout)
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
    step_sizes = [r["approx_kl"] for r in metrics_log.records if "approx_kl" in r]
    alarms: set[str] = set()
    for step in range(start + 1, config.steps + 1):
        seed = (config.seed * 100003 + step) * 64 + accelerator.process_index
        torch.manual_seed(seed)  # sampling is reproducible per step and process, also on resume
        generator.manual_seed(seed)
        taken = [next(order) for _ in range(per_step)]
        rows = taken[accelerator.process_index::accelerator.num_processes]
        record, shown = grpo_step(accelerator, model, tokenizer, optimizer, scheduler, parameters, prompts, rows,
                                  functions, weights, config, stop_ids, pad_id, generator, merged=merged)
        record = train.mean_over_processes(accelerator, record)
        record = {"step": step, "max_steps": config.steps, **record, "samples": shown}
        lengths.append(record["response_length"])
        zero_std.append(record["zero_std_groups"])
        step_sizes.append(record["approx_kl"])
        found = {"length": length_alarm(lengths, config.max_new_tokens), "signal": signal_alarm(zero_std),
                 "step size": step_size_alarm(step_sizes)}
        alarms = warn_new_alarms(log if accelerator.is_main_process else None, step, found, alarms)
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
