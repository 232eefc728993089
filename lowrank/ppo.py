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

The roles are adapters on one base (lowrank/roles.py); the math is in lowrank/rl.py.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, locks, rl, runrecord
from lowrank.errors import UserError
from lowrank.fields import RLFields, restate, stage_config
from lowrank.metrics import MetricsLog
from lowrank.roles import POLICY, REFERENCE, VALUE, use_role
from lowrank.rollout import (Samples, context_length, position_ids, response_logprobs,  # noqa: F401 (re-exported)
                             length_alarm, load_policy_inputs, response_mask, sample,
                             seeded_prompt_order, tokenize_prompts)

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
def collect_rollout(model, prompt_ids: list[list[int]], config: PPOConfig, stop_ids: list[int],
                    pad_id: int, device) -> Rollout:
    """Sample responses with the policy and evaluate them under every role (no gradients)."""
    with use_role(model, POLICY):
        samples = sample(model, prompt_ids, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         top_p=config.top_p, top_k=config.top_k, stop_ids=stop_ids, pad_id=pad_id, device=device)
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


def penalised_scores(rollout: Rollout, config: PPOConfig) -> torch.Tensor:
    """The reward-model scores, clipped (``score_clip``) and minus ``missing_eos_penalty`` for responses
    that ran into ``max_new_tokens`` without an end-of-turn token."""
    scores = rollout.scores.clamp(-config.score_clip, config.score_clip) if config.score_clip > 0 else rollout.scores
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~rollout.ended).to(scores.dtype)
    return scores


def token_rewards(rollout: Rollout, kl_coef: float, config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
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


def _minibatch_losses(rollout: Rollout, rows, advantages, returns, config: PPOConfig, stats: dict):
    """The (policy, value) loss-sum functions of one minibatch for train.accumulate_gradients.

    Each returns its loss as a sum over the minibatch's response tokens, so that the shared loop
    divides by the token count of the whole optimizer step (over every process). The policy's sum
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
               config: PPOConfig, generator: torch.Generator, train_policy: bool = True) -> dict:
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


def ppo_step(model, optimizer, parameters, rollout: Rollout, kl_controller, config: PPOConfig,
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
    if config.whiten_advantages and rollout.mask.sum() > 1:
        advantages = rl.masked_whiten(advantages, rollout.mask)
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


def make_kl_controller(config: PPOConfig):
    if config.adaptive_kl:
        return rl.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
    return rl.FixedKLController(config.init_kl_coef)


def _load_inputs(config: PPOConfig):
    """Check every input before anything is loaded or written.

    Returns (model path, tokenizer, (template name, jinja), prompt token ids, SFT lowrank.json or None).
    """
    from lowrank.data import load_prompts

    for name in ("reward_adapter", "prompts", "output_dir"):
        if not getattr(config, name):
            raise UserError(f"no {name.replace('_', ' ')}: give --{name.replace('_', '-')}")
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
    if accelerator.is_main_process:
        train.prepare_output_dir(config.output_dir, config.overwrite, resume=config.resume)
    accelerator.wait_for_everyone()
    out_dir = Path(config.output_dir)
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
    lengths, last_alarm = [r["response_length"] for r in metrics_log.records if "response_length" in r], None
    for step in range(start + 1, config.steps + 1):
        seed = config.seed * 100003 + step
        if accelerator.num_processes > 1:
            seed = seed * 64 + accelerator.process_index
        torch.manual_seed(seed)  # sampling is reproducible per step and process, also on resume
        generator.manual_seed(seed)
        taken = [next(order) for _ in range(per_step)]
        batch = [prompt_ids[i] for i in taken[accelerator.process_index::accelerator.num_processes]]
        batch = [ids for ids in batch for _ in range(config.samples_per_prompt)]  # a prompt's responses side by side
        rollout = collect_rollout(model, batch, config, stop_ids, pad_id, device)
        train_policy = step > config.value_warmup_steps
        record = ppo_step(model, optimizer, parameters, rollout, kl_controller, config, generator, train_policy,
                          accelerator=accelerator, scheduler=scheduler)
        if accelerator.num_processes > 1:  # the mean over processes
            keys = [k for k, v in record.items() if isinstance(v, float)]
            summed = train.reduce_sum(accelerator, *(record[k] for k in keys))
            record.update({k: v / accelerator.num_processes for k, v in zip(keys, summed)})
        record = {"step": step, "max_steps": config.steps, **record,
                  "samples": samples_for_log(tokenizer, rollout, config.log_samples)}
        lengths.append(record["response_length"])
        alarm = length_alarm(lengths, config.max_new_tokens)
        if alarm and alarm != last_alarm and accelerator.is_main_process:
            log.warning("step %d: %s", step, alarm)
        last_alarm = alarm
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


def samples_for_log(tokenizer, rollout: Rollout, count: int) -> list[dict]:
    """A few decoded responses with their scores, for metrics.jsonl."""
    out = []
    for row in range(min(count, len(rollout.scores))):
        response = rollout.responses[row][rollout.mask[row].bool()]
        out.append({"response": tokenizer.decode(response, skip_special_tokens=True),
                    "score": round(rollout.scores[row].item(), 4)})
    return out
