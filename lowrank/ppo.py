"""PPO of the SFT policy against the reward model, on one base with swapped adapters (InstructGPT step 3).

One step of ``train_ppo``, written out (Ziegler et al. 2019; Ouyang et al. 2022):

1. rollouts: sample ``rollout_batch_size`` prompts, render them with the SFT adapter's chat
   template (add_generation_prompt) and sample responses with the policy (temperature, top-p),
   stopping at EOS / the template's end-of-turn token;
2. with no gradient: log-probs of the sampled tokens under the policy (``old_logprobs``) and the
   reference, per-token values (value role) and the score (reward role, read at the last token);
3. per-token rewards = -kl_coef * KL(policy || reference) on every response token, plus the score
   on the last response token; GAE gives advantages and returns; advantages are whitened;
4. ``ppo_epochs`` passes over shuffled minibatches: clipped policy surrogate under the policy
   role, clipped value loss under the value role, one optimizer step with gradient clipping;
5. the KL controller moves kl_coef toward ``target_kl``; metrics and a few samples are logged.

The roles are adapters on one base (lowrank/roles.py); one step is lowrank/ppo_step.py, the math
lowrank/rl.py. This file holds the config, the inputs and the run.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, fast_rollout, locks, runrecord
from lowrank.errors import UserError
from lowrank.fields import RLFields, restate, stage_config
from lowrank.metrics import MetricsLog
from lowrank.ppo_step import collect_rollout, make_kl_controller, ppo_step, samples_for_log
from lowrank.roles import POLICY, VALUE
from lowrank.rollout import (context_length, length_alarm, load_policy_inputs, seeded_prompt_order, step_size_alarm,
                             tokenize_prompts, warn_new_alarms)

log = logging.getLogger(__name__)


@stage_config
class PPOConfig(RLFields):
    """Every knob of `lowrank ppo`; defaults follow TRL's PPO and the InstructGPT paper where they fit a small run."""

    prompts: str = field(default="", metadata={"help": "prompts file (JSON/JSONL) or dataset name"})
    # KL penalty
    init_kl_coef: float = field(default=0.05, metadata={"help": "initial KL penalty coefficient (beta)"})
    adaptive_kl: bool = field(default=True, metadata={"help": "steer beta toward target_kl (Ziegler et al.)"})
    target_kl: float = field(default=6.0, metadata={"help": "target KL per response, nats (adaptive controller)"})
    kl_horizon: int = field(default=10000, metadata={"help": "horizon of the adaptive KL controller, samples"})
    kl_estimator: str = field(default="k3", metadata={"help": "per-token KL estimator in the reward: k3 (>= 0, "
                                                              "low variance) or k1 (log-ratio)"})
    # advantages
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages per rollout batch"})
    samples_per_prompt: int = field(default=1, metadata={"help": "responses sampled per prompt; each rollout batch "
                                                                  "holds rollout_batch_size x this"})
    score_baseline: str = field(default="none", metadata={"help": "subtract from each score a baseline of its prompt: "
                                                               "none, or loo (the mean score of the prompt's other "
                                                               "responses; needs --samples-per-prompt >= 2)"})
    value_head: str = field(default="zero", metadata={"help": "how the value role's head starts: zero (values 0; "
                                                            "the LoRA still from the reward model) or reward (the "
                                                            "reward model's head, as InstructGPT)"})
    value_warmup_steps: int = field(default=0, metadata={"help": "first steps that train only the value role, the "
                                                                 "policy frozen (counted in --steps)"})
    score_clip: float = field(default=0.0, metadata={"help": "clip reward-model scores to +-this (0: off)"})
    # optimisation
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip epsilon"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    rollout_batch_size: int = field(default=16, metadata={"help": "prompts sampled per PPO step"})
    minibatch_size: int = field(default=4, metadata={"help": "rollouts per optimizer step"})
    steps: int = field(default=100, metadata={"help": "PPO steps (rollout batches)"})
    # the shared fields (lowrank.fields) as PPO states them
    model = restate(help="base model: HF dir or hub id (as used for SFT/reward)")
    quant = restate(help="base weights: nf4, int8, none, or auto (what the SFT adapter, else the reward adapter, "
                         "was trained on)")
    temperature = restate(help="sampling temperature of rollouts")
    top_p = restate(help="nucleus sampling of rollouts (1: off)")
    top_k = restate(help="top-k sampling of rollouts (0: off)")
    max_new_tokens = restate(64, help="response length limit")
    cliprange = restate(help="PPO ratio clip epsilon")
    learning_rate = restate(help="AdamW learning rate (policy and value)")

def _load_inputs(config: PPOConfig):
    """Check every input before anything is loaded or written.

    Returns (model path, tokenizer, (template name, jinja), prompt token ids, SFT lowrank.json or None).
    """
    from lowrank.data import load_prompts

    for name in ("reward_adapter", "prompts", "output_dir"):
        if not getattr(config, name):
            raise UserError(f"no {name.replace('_', ' ')}: give --{name.replace('_', '-')}")
    fast_rollout.check(config.fast_rollout)
    rollouts = config.rollout_batch_size * config.samples_per_prompt
    if config.samples_per_prompt < 1:
        raise UserError(f"--samples-per-prompt must be at least 1, got {config.samples_per_prompt}")
    if config.minibatch_size < 1 or rollouts < config.minibatch_size:
        raise UserError(f"--minibatch-size must be at least 1 and at most the rollouts per step ({rollouts}: "
                        "--rollout-batch-size x --samples-per-prompt)")
    if config.score_baseline not in ("none", "loo"):
        raise UserError(f"--score-baseline must be none or loo, got {config.score_baseline!r}")
    if config.score_baseline == "loo" and config.samples_per_prompt < 2:
        raise UserError("--score-baseline loo needs --samples-per-prompt of at least 2 (the other responses "
                        "to a prompt are its baseline)")
    if config.value_head not in ("zero", "reward"):
        raise UserError(f"--value-head must be zero or reward, got {config.value_head!r}")
    if not 0 <= config.value_warmup_steps < config.steps:
        raise UserError(f"--value-warmup-steps must be at least 0 and below --steps ({config.steps}), "
                        f"got {config.value_warmup_steps}")
    model_path, tokenizer, (template_name, template), sft_meta, _ = load_policy_inputs(config, log)
    prompt_ids = tokenize_prompts(tokenizer, template, load_prompts(config.prompts), source=config.prompts,
                                  max_new_tokens=config.max_new_tokens, context=context_length(model_path))
    return model_path, tokenizer, (template_name, template), prompt_ids, sft_meta


def train_ppo(config: PPOConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Run PPO as configured and write the policy adapter to ``config.output_dir``; return that path.

    ``on_step`` gets each step's metrics (score, kl, kl_coef, entropy, clip_fraction, value_loss,
    response_length, samples, ...), the same dicts that go to metrics.jsonl.
    """
    from lowrank import plan, train
    from lowrank.config import config_to_dict
    from lowrank.models import load_base_model, lora_config
    from lowrank.roles import build_roles, trainable_parameters, zero_value_head
    from lowrank.templates import stop_token_ids

    model_path, tokenizer, (template_name, template), prompt_ids, sft_meta = _load_inputs(config)
    checkpoint = checkpoints.resume_checkpoint(config.output_dir) if config.resume else None
    accelerator = train.make_accelerator()
    out_dir = train.take_output_dir(accelerator, config)
    train.seed_everything(config.seed)
    memory_plan = plan.plan_for_training(model_path, "ppo", config, accelerator.device,
                                         prompt_len=max(map(len, prompt_ids))) \
        if accelerator.is_main_process else None
    plan.report_start(memory_plan, accelerator.device)
    base = load_base_model(model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing,
                           device=accelerator.device)
    policy_lora = None if config.sft_adapter else lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=0.0)
    model = build_roles(base, reward_adapter=config.reward_adapter, sft_adapter=config.sft_adapter or None,
                        policy_lora_config=policy_lora)
    if config.value_head == "zero":  # a resumed run loads its trained head over this
        zero_value_head(model)
    merged = fast_rollout.build(model, POLICY, config.fast_rollout)
    groups = trainable_parameters(model)
    parameters = groups[POLICY] + groups[VALUE]  # the only parameters with optimizer state
    optimizer = train.build_optimizer(parameters, config.learning_rate, paged=config.quant != "none")
    rollouts = config.rollout_batch_size * config.samples_per_prompt
    updates_per_step = config.ppo_epochs * -(-rollouts // config.minibatch_size)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=config.steps * updates_per_step,
                                      kind="constant")
    kl_controller = make_kl_controller(config)
    metrics_log = MetricsLog(out_dir, enabled=accelerator.is_main_process, report_to=config.report_to, stage="ppo",
                             config=config_to_dict(config))
    start = 0
    if checkpoint is not None:
        start, extra = checkpoints.load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
        kl_controller.load_state_dict(extra["kl_controller"])
        metrics_log.truncate_after(start)
    device = base.get_output_embeddings().weight.device
    pad_id = tokenizer.pad_token_id  # load_tokenizer makes eos the pad when the model has none
    stop_ids = stop_token_ids(tokenizer, template)
    order = seeded_prompt_order(len(prompt_ids), config.seed)
    per_step = config.rollout_batch_size * accelerator.num_processes  # each process samples its own prompts
    for _ in range(start * per_step):  # replay the prompt stream up to the resumed step
        next(order)
    generator = torch.Generator()
    lengths = [r["response_length"] for r in metrics_log.records if "response_length" in r]
    step_sizes = [r["approx_kl"] for r in metrics_log.records  # the policy's steps, as in the loop below
                  if "approx_kl" in r and r.get("step", 0) > config.value_warmup_steps]
    alarms: set[str] = set()
    for step in range(start + 1, config.steps + 1):
        seed = config.seed * 100003 + step
        if accelerator.num_processes > 1:
            seed = seed * 64 + accelerator.process_index
        torch.manual_seed(seed)  # sampling is reproducible per step and process, also on resume
        generator.manual_seed(seed)
        taken = [next(order) for _ in range(per_step)]
        batch = [prompt_ids[i] for i in taken[accelerator.process_index::accelerator.num_processes]]
        batch = [ids for ids in batch for _ in range(config.samples_per_prompt)]  # a prompt's responses side by side
        rollout = collect_rollout(model, batch, config, stop_ids, pad_id, device, merged=merged)
        train_policy = step > config.value_warmup_steps
        record = ppo_step(model, optimizer, parameters, rollout, kl_controller, config, generator, train_policy,
                          accelerator=accelerator, scheduler=scheduler)
        record = train.mean_over_processes(accelerator, record)
        record = {"step": step, "max_steps": config.steps, **record,
                  "samples": samples_for_log(tokenizer, rollout, config.log_samples)}
        lengths.append(record["response_length"])
        if train_policy:  # a value warm-up step measures the policy loss without moving the policy
            step_sizes.append(record["approx_kl"])
        found = {"length": length_alarm(lengths, config.max_new_tokens), "step size": step_size_alarm(step_sizes)}
        alarms = warn_new_alarms(log if accelerator.is_main_process else None, step, found, alarms)
        metrics_log.log(record)
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            checkpoints.save_checkpoint(accelerator, out_dir, step, model, optimizer, scheduler,
                                        extra={"kl_controller": kl_controller.state_dict()})
        if on_step is not None and accelerator.is_main_process:
            on_step(record)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics_log.plot(out_dir / "ppo_metrics.png", ["score", "kl", "entropy", "clip_fraction", "approx_kl",
                                                       "value_loss", "explained_variance", "response_length",
                                                       "truncated"])
        final = metrics_log.records[-1] if metrics_log.records else {}
        final.update(plan.peak_metrics(memory_plan, accelerator.device))
        meta = runrecord.RunRecord(
            stage="ppo", base=runrecord.BaseRef.of(config.model, model_path),
            chat_template=runrecord.ChatTemplate(template_name, template),
            data={"source": config.prompts, "digest": train.data_digest(config.prompts), "prompts": len(prompt_ids)},
            config=config_to_dict(config),
            seed=config.seed,
            metrics={k: v for k, v in final.items() if k not in ("step", "max_steps", "samples")},
            extra={
                "sft_adapter": config.sft_adapter or None,
                "reward_adapter": config.reward_adapter,
                "processes": accelerator.num_processes,
            },
        )
        train.write_adapter(model, out_dir, meta, adapter_name=POLICY)
        shutil.rmtree(out_dir / checkpoints.CHECKPOINTS, ignore_errors=True)  # the run is finished: resume data is done
    accelerator.wait_for_everyone()
    locks.release(out_dir)  # the output is complete
    return out_dir
