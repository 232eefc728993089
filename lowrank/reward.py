"""Reward model training: a LoRA adapter plus a scalar score head (lowrank.scoring) on the shared base
(InstructGPT step 2).

Training (``train_reward``) is the pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
over preference pairs, with held-out pairwise accuracy and mean margin as the metrics. The adapter's
LoRA config comes from lowrank/reward_lora.py, the set-up it shares with DPO from lowrank/preference.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, loop, preference, runrecord
from lowrank.errors import UserError
from lowrank.fields import AccumulationFields, AdapterFields, EpochFields, WeightDecayField, restate, stage_config
from lowrank.loop import PairStream
from lowrank.reward_lora import is_excluded_target, read_sft_lora_config, reward_lora_config
from lowrank.scoring import MEMBERS, add_score_head, pad_batch, score_sequences

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@stage_config
class RewardConfig(EpochFields, WeightDecayField, AccumulationFields, AdapterFields):
    """Settings of `lowrank reward` (flags: --model, --data, --output-dir, ...); shared fields: lowrank.fields."""

    data: str = field(default="", metadata={"help": "preference pairs (.json/.jsonl with prompt/chosen/rejected, or a hub dataset)"})
    sft_adapter: str | None = field(default=None, metadata={"help": "SFT adapter dir to initialise the LoRA from (and take the chat template of)"})
    template: str | None = field(default=None, metadata={"help": "chat template when no SFT adapter is given: auto, tokenizer or a built-in name"})
    center_rewards: float = field(default=0.0, metadata={"help": "weight of the centring term mean((r_chosen + "
                                                                 "r_rejected)^2) (Eisenstein et al. 2023; 0: off): "
                                                                 "scores comparable across prompts, as PPO needs"})
    batch_size: int = field(default=8, metadata={"help": "preference pairs per micro-batch"})
    ensemble: int = field(default=1, metadata={"help": "reward models trained on the same pairs, seeds seed, seed+1, "
                                                       "...; PPO, GRPO and `lowrank score` use the mean of their "
                                                       "scores (members 2.. in OUTPUT_DIR/members/N)"})
    # the shared fields (lowrank.fields) as reward training states them
    model = restate(help="base model: Hugging Face dir or hub id, or 'tiny'")
    output_dir = restate(help="where the reward adapter is written")
    seed = restate(help="seed of the split, head init, LoRA init and shuffling")
    lora_r = restate(help="LoRA rank (ignored with --sft-adapter: its rank is kept)")
    lora_alpha = restate(help="LoRA alpha (ignored with --sft-adapter)")
    lora_dropout = restate(help="LoRA dropout (ignored with --sft-adapter)")
    learning_rate = 1e-4
    warmup_steps = restate(help="linear warm-up steps, then constant")
    tokens_per_step = restate(help="tokens (chosen + rejected) per optimizer step; when > 0 it sets the micro-batches "
                                   "per step (replaces --gradient-accumulation-steps)")
    max_length = restate(help="tokens per prompt+response (longer ones are cut)")
    eval_every = restate(help="evaluate every N optimizer steps (and at the end)")


# Fields a resumed run must share with the interrupted one (anything that changes the trajectory).
_RESUME_KEYS = ("model", "data", "sft_adapter", "quant", "template", "lora_r", "lora_alpha", "lora_dropout",
                "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "center_rewards", "optim_bits",
                "batch_size", "gradient_accumulation_steps", "tokens_per_step", "epochs", "max_steps", "max_length",
                "eval_fraction", "seed", "ensemble")


def _as_messages(turn) -> list[dict]:
    """A response given as text, or as the assistant part of a conversation (list of messages)."""
    return [{"role": "assistant", "content": turn}] if isinstance(turn, str) else list(turn)


def _response_text(turn) -> str:
    return turn if isinstance(turn, str) else "\n".join(str(m.get("content", "")) for m in turn)


def tokenize_pairs(tokenizer, template: str, pairs: list[dict], max_length: int) -> list[dict]:
    """Token ids of each pair's chosen and rejected conversation, rendered with the SFT template.

    Refuses empty and identical responses (lowrank.data checks them too, naming the line; this guard
    covers pairs built in code). Pairs that become identical after truncation to ``max_length`` teach nothing and are dropped.
    """
    from lowrank.data import tokenize_conversation

    examples = []
    for number, pair in enumerate(pairs, 1):
        where = pair.get("where") or f"pair {number}"
        chosen_text, rejected_text = (_response_text(pair[k]) for k in ("chosen", "rejected"))
        for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            if not text.strip():
                raise UserError(f"{where}: the {name} response is empty; every pair needs two non-empty responses")
        if chosen_text.strip() == rejected_text.strip():
            raise UserError(f"{where}: chosen and rejected responses are identical; such a pair has no preference")
        prompt = list(pair["prompt_messages"])
        chosen = tokenize_conversation(tokenizer, template, prompt + _as_messages(pair["chosen"]), max_length)
        rejected = tokenize_conversation(tokenizer, template, prompt + _as_messages(pair["rejected"]), max_length)
        if chosen["input_ids"] != rejected["input_ids"]:
            examples.append({"chosen": chosen["input_ids"], "rejected": rejected["input_ids"]})
    if not examples:
        raise UserError(f"every preference pair is identical after truncation to {max_length} tokens; "
                        "raise --max-length")
    if len(examples) < len(pairs):
        log.warning("dropped %d pairs whose chosen and rejected are identical after truncation to %d tokens",
                    len(pairs) - len(examples), max_length)
    return examples


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of pairs: the chosen sequences, then the rejected ones, right-padded together."""
    input_ids, attention_mask = pad_batch([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (pairs,), of a :func:`collate_pairs` batch: one forward pass."""
    rewards = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    pairs = rewards.shape[0] // 2
    return rewards[:pairs], rewards[pairs:]


def pair_rewards(model, examples: list[dict], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (batch,): both halves in one forward pass."""
    batch = {k: v.to(device) for k, v in collate_pairs(examples, pad_id).items()}
    return batch_rewards(model, batch)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       center: float = 0.0) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected), shape (batch,): the Bradley-Terry negative log-likelihood
    that the chosen response is preferred (InstructGPT eq. 1). logsigmoid is the stable form.

    The loss sees only differences, so each prompt's scores may carry an offset of their own; PPO
    compares scores across prompts, where those offsets are noise. ``center`` > 0 adds
    center * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023, "Helping or Herding?"), which pulls
    each pair's mean score to 0 and so puts every prompt on one scale.
    """
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)
    if center:
        loss = loss + center * (chosen_rewards + rejected_rewards) ** 2
    return loss


def cross_prompt_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of (chosen of pair i, rejected of pair j) over all i, j with r_chosen_i > r_rejected_j.

    Pairwise accuracy (i = j) is what the Bradley-Terry loss trains; this is what an RL stage with
    one baseline for a whole batch of prompts relies on: a right answer to one prompt scoring above a
    wrong answer to another. Per-prompt offsets pull it toward 0.5 while pairwise accuracy stays high.
    """
    return (chosen_rewards[:, None] > rejected_rewards[None, :]).float().mean().item()


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, batch_size: int, device=None) -> dict:
    """Pairwise accuracy (share with r_chosen > r_rejected), mean margin, loss, cross-prompt accuracy
    and the mean score over ``examples``."""
    was_training = model.training
    model.eval()
    chosen_parts, rejected_parts = [], []
    for start in range(0, len(examples), batch_size):
        chosen, rejected = pair_rewards(model, examples[start: start + batch_size], pad_id, device)
        chosen_parts.append(chosen)
        rejected_parts.append(rejected)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen_parts).float(), torch.cat(rejected_parts).float()
    margin = chosen - rejected
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
            "loss": (-torch.nn.functional.logsigmoid(margin)).mean().item(),
            "cross_prompt_accuracy": cross_prompt_accuracy(chosen, rejected),
            "score_mean": torch.cat([chosen, rejected]).mean().item()}


def _module_of_weight(key: str) -> str:
    """The module path of a peft state-dict key: 'base_model.model.lm_head.lora_A.weight' -> '...lm_head'."""
    parts = key.split(".")
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        if marker in parts:
            return ".".join(parts[: parts.index(marker)])
    parts = parts[:-1]  # a saved whole module (modules_to_save) or base layer: drop 'weight' / 'bias'
    return ".".join(parts[:-1] if parts and parts[-1] == "base_layer" else parts)


def _load_sft_lora(peft_model, sft_adapter: Path, adapter_name: str) -> None:
    """Copy the SFT adapter's LoRA weights into the reward adapter (same targets and rank); the head
    keeps its fresh initialisation (peft wants every saved module in the state dict, so we start
    from the adapter's own state and overwrite the LoRA part).

    Weights of the LM head (a LoRA on ``lm_head``, or the head saved whole) are skipped with a log
    line: ``reward_lora_config`` left the head out, since the score never passes through it.
    Any other weight the reward adapter lacks, or one of another shape, is an adapter of another base.
    """
    from peft import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    try:
        sft_weights = load_peft_weights(str(sft_adapter), device="cpu")
    except Exception as e:  # a missing or corrupt adapter_model.safetensors
        raise UserError(f"{sft_adapter}: cannot read its adapter weights ({type(e).__name__}); "
                        "give the output dir of a completed `lowrank sft` run") from None
    skipped = sorted({_module_of_weight(k) for k in sft_weights if is_excluded_target(_module_of_weight(k))})
    if skipped:
        sft_weights = {k: v for k, v in sft_weights.items() if not is_excluded_target(_module_of_weight(k))}
        log.info("%s: not loading the SFT adapter's weights of %s into the reward adapter (the score reads the "
                 "hidden state before the LM head)", sft_adapter, ", ".join(m.rsplit(".", 1)[-1] for m in skipped))
    unknown = sorted(set(sft_weights) - set(state))
    if unknown:
        raise UserError(f"{sft_adapter}: its LoRA weights do not fit this base (e.g. {unknown[0]}); "
                        "was it trained on another model?")
    wrong = [k for k in sft_weights if sft_weights[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"{sft_adapter}: weight {wrong[0]} has shape {tuple(sft_weights[wrong[0]].shape)}, the "
                        f"reward adapter expects {tuple(state[wrong[0]].shape)}; was it trained on another model?")
    set_peft_model_state_dict(peft_model, {**state, **sft_weights}, adapter_name=adapter_name)


def train_reward(config: RewardConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train a reward adapter on preference pairs and write it to ``config.output_dir``; return that path.

    ``on_step`` gets a dict per optimizer step (step, max_steps, loss, lr, and after an evaluation
    eval_accuracy / eval_margin / eval_loss); the same dicts go to metrics.jsonl.

    With ``ensemble`` K > 1, members 2..K are trained first, each a whole reward adapter in
    ``members/N`` with seed ``seed + N - 1`` (its own held-out split, head, LoRA init and order),
    then the first in ``output_dir`` itself; its lowrank.json, written last, lists the members, so
    the ensemble looks finished only when all of it is there. A small reward model's ranking moves
    with its seed, and a policy learns whichever mistakes its one model makes; the mean of several
    is harder to fool (docs/benchmarks.md). ``on_step`` follows the first model's training.
    """
    if config.ensemble < 1:
        raise UserError(f"--ensemble must be at least 1 (got {config.ensemble})")
    if config.ensemble == 1:
        return _train_one(config, on_step)
    from accelerate import PartialState

    from lowrank import train

    state = PartialState()
    out = train.take_output_dir(state, config)
    members = []
    for number in range(2, config.ensemble + 1):
        member_dir = out / MEMBERS / str(number)
        members.append(f"{MEMBERS}/{number}")
        if config.resume and runrecord.exists(member_dir):
            continue  # finished before the interruption
        member = dataclasses.replace(config, ensemble=1, seed=config.seed + number - 1, output_dir=str(member_dir),
                                     overwrite=True, report_to="none")
        _train_one(member, None)
        log.info("reward model %d of %d: %s", number, config.ensemble, _accuracy_words(runrecord.read(member_dir)))
    return _train_one(config, on_step, members=members)


def _accuracy_words(meta: runrecord.RunRecord) -> str:
    accuracy = meta.metrics.get("eval_accuracy")
    return "no held-out pairs" if accuracy is None else f"held-out pairwise accuracy {accuracy:.3f}"


def _train_one(config: RewardConfig, on_step: Callable[[dict], None] | None = None,
               members: list[str] | None = None) -> Path:
    """One reward model (:func:`train_reward`); ``members`` (relative dirs) go into its lowrank.json."""
    from peft import get_peft_model

    from lowrank import plan, train
    from lowrank.models import load_base_model, resolve_quant
    from lowrank.tiny import resolve_model_name

    config.quant = resolve_quant(config.quant)  # "auto" becomes this machine's choice, and lowrank.json records that
    if not config.data:
        raise UserError("no preference data: give --data FILE.jsonl (fields prompt, chosen, rejected)")
    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR")
    if config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise UserError("--batch-size and --gradient-accumulation-steps must be at least 1")
    if config.tokens_per_step < 0:
        raise UserError(f"--tokens-per-step must be 0 (off) or positive, got {config.tokens_per_step}")
    model_path = resolve_model_name(config.model)
    sft_meta = preference.read_sft_record(config)
    if config.sft_adapter:
        read_sft_lora_config(config.sft_adapter)
    # Validate every input before touching the output dir or loading the model.
    inputs = preference.load_pair_inputs(config, config.data, model_path, sft_meta, tokenize_pairs)
    tokenizer, train_examples, eval_examples = inputs.tokenizer, inputs.train_examples, inputs.eval_examples
    out_dir = train.check_output_dir(config.output_dir, config.overwrite, resume=config.resume)
    resume_from = checkpoints.resume_checkpoint(out_dir) if config.resume else None

    accelerator = train.make_accelerator()
    train.seed_everything(config.seed)  # LoRA init and dropout; the head and the split have their own seeds
    memory_plan = plan.plan_for_training(model_path, "reward", config, accelerator.device)
    plan.report_start(memory_plan, accelerator.device)
    base = load_base_model(model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing,
                           device=accelerator.device)
    add_score_head(base, seed=config.seed)
    lora = reward_lora_config(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              sft_adapter=config.sft_adapter)
    peft_model = get_peft_model(base, lora)
    if config.sft_adapter:
        _load_sft_lora(peft_model, Path(config.sft_adapter), "default")
    # Every input has been checked (an SFT adapter that does not fit refuses above): now the output dir.
    train.take_output_dir(accelerator, config)
    peft_model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    accumulation = config.gradient_accumulation_steps
    if config.tokens_per_step:
        accumulation = train.accumulation_for_tokens(
            config.tokens_per_step, [len(e["chosen"]) + len(e["rejected"]) for e in train_examples], config.batch_size,
            accelerator.num_processes)
    stream = PairStream(len(train_examples), config.batch_size, config.seed)
    micro_per_step = accumulation * accelerator.num_processes
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * stream.batches_per_epoch / micro_per_step))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(params, config.learning_rate, weight_decay=config.weight_decay,
                                      paged=config.quant != "none", optim_bits=config.optim_bits)
    scheduler = train.build_scheduler(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps,
                                      kind="constant")
    model = accelerator.prepare(peft_model)  # DDP under `accelerate launch`; unchanged on one process
    steps = loop.StepRecords(accelerator, out_dir, "reward", config, _RESUME_KEYS, model=model, optimizer=optimizer,
                             scheduler=scheduler, stream=stream, max_steps=max_steps, resume_from=resume_from,
                             on_step=on_step)
    metrics_log, start_step = steps.metrics_log, steps.start_step

    correct: list[torch.Tensor] = []

    def loss_sum(model, batch: dict) -> torch.Tensor:
        chosen, rejected = batch_rewards(model, batch)
        correct.append((chosen > rejected).float().sum().detach().cpu())
        return bradley_terry_loss(chosen, rejected, config.center_rewards).sum()

    final: dict = {}
    for step in range(start_step + 1, max_steps + 1):
        indices = stream.take(accumulation, accelerator.num_processes, accelerator.process_index)
        micro_batches = [collate_pairs([train_examples[i] for i in batch], pad_id) for batch in indices]
        correct.clear()
        loss_total, pairs = train.accumulate_gradients(accelerator, model, micro_batches, loss_sum_fn=loss_sum,
                                                       count_fn=lambda b: b["input_ids"].shape[0] // 2)
        grad_norm = train.optimizer_step(accelerator, params, optimizer, scheduler, config.max_grad_norm)
        loss_total, pairs, right = train.reduce_sum(accelerator, loss_total, pairs, float(sum(correct)))
        record = {"step": step, "max_steps": max_steps, "epoch": round(stream.epoch(), 4), "pairs": int(pairs),
                  "micro_batches": accumulation, "loss": loss_total / pairs, "train_accuracy": right / pairs,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        if eval_examples and ((config.eval_every > 0 and step % config.eval_every == 0) or step == max_steps):
            scores = evaluate_pairs(peft_model, eval_examples, pad_id, config.batch_size, accelerator.device)
            record.update({f"eval_{k}": v for k, v in scores.items()})
        final = {**final, **record}
        steps.add(step, record)

    accelerator.wait_for_everyone()
    metrics_log.plot(out_dir / "reward_metrics.png", ["loss", "eval_accuracy", "eval_margin"])
    metrics = {**{k: v for k, v in final.items() if k not in ("step", "max_steps", "lr", "grad_norm")},
               **plan.peak_metrics(memory_plan, accelerator.device)}
    extra = {"sft_adapter": str(config.sft_adapter) if config.sft_adapter else None,
             "processes": accelerator.num_processes,
             **({"members": members,
                 "member_eval_accuracy": [runrecord.read(out_dir / m).metrics.get("eval_accuracy") for m in members]}
                if members else {})}
    return preference.finish_run(accelerator, peft_model, out_dir, "reward", config, inputs, metrics=metrics,
                                 extra=extra)
