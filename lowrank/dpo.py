"""Offline preference optimisation of the SFT policy on preference pairs: DPO, IPO, SimPO, ORPO.

No reward model and no sampling: each pair (prompt, chosen y_w, rejected y_l) is scored by the
policy's own log-probabilities of the two responses. One step of ``train_dpo``:

1. once, before training: the log-probs of every chosen and rejected response under the frozen
   reference (the SFT adapter, or the bare base without one), summed over the response tokens
   (``reference_logprobs``; DPO and IPO only, SimPO and ORPO need no reference);
2. per micro-batch: chosen and rejected rows in ONE right-padded forward pass of the policy; the
   sequence log-prob sums (DPO, IPO) or per-token means (SimPO, ORPO) over the response tokens;
3. the pair losses (lowrank/dpo_loss.py, on the maths of lowrank/rl.py), summed and normalised by
   the pairs of the whole optimizer step (lowrank.train.accumulate_gradients), then clip and step.

The implicit reward of a response is beta * (log pi - log ref) (Rafailov et al. 2023, section 5),
or beta * mean log pi for the reference-free losses; the pairwise accuracy is the share of pairs
whose chosen response gets the higher reward. Policy and reference are two adapters on one base
(lowrank/roles.py), and the loop is SFT's: the same stream, accumulation, checkpoints and DDP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import field
from pathlib import Path
from typing import Callable

import torch

from lowrank import checkpoints, loop, preference, train
from lowrank.dpo_loss import DEFAULT_BETA, LOSSES, REFERENCE_FREE, pair_losses, sequence_logprobs
from lowrank.errors import UserError
from lowrank.fields import AdapterFields, EpochFields, SchedulerField, restate, stage_config
from lowrank.preference import PairInputs
from lowrank.roles import POLICY, REFERENCE, use_role

log = logging.getLogger(__name__)


@stage_config
class DPOConfig(EpochFields, SchedulerField, AdapterFields):
    """Settings of `lowrank dpo`; defaults follow TRL's DPOTrainer where they fit a LoRA run."""

    sft_adapter: str = field(default="", metadata={"help": "SFT adapter dir: the initial policy and the frozen "
                                                           "reference (empty: a fresh LoRA, the base as reference)"})
    pairs: str = field(default="", metadata={"help": "preference pairs (.json/.jsonl with prompt/chosen/rejected, "
                                                     "chat-format records, or a hub dataset)"})
    template: str = field(default="auto", metadata={"help": "chat template without --sft-adapter (with one, its "
                                                            "recorded template is used)"})
    loss: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, simpo or orpo"})
    beta: float | None = field(default=None, metadata={"help": "DPO/SimPO beta, IPO tau, ORPO lambda (default: 2.0 "
                                                                "for simpo, 0.1 for the others)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: share of labels assumed "
                                                                   "flipped, in [0, 0.5) (sigmoid only)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin"})
    rpo_alpha: float = field(default=0.0, metadata={"help": "weight of the chosen responses' per-token NLL added "
                                                            "to a sigmoid/IPO loss (RPO; 0: off)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimizer step, all processes together"})
    micro_batch_size: int = field(default=2, metadata={"help": "pairs per forward pass and process (two rows "
                                                               "each); batch_size must be a multiple"})
    # the shared fields (lowrank.fields) as DPO states them
    output_dir = restate(help="where the policy adapter, metrics.jsonl and checkpoints go")
    quant = restate(help="base weights: nf4, int8, none, or auto (what the SFT adapter was trained on, else nf4)")
    learning_rate = 5e-6
    lr_scheduler = "linear"
    seed = restate(help="seed of the split, LoRA init and pair order")
    save_every = restate(help="checkpoint every N steps for --resume (0: never)")

# Fields a resumed run must share with the interrupted one (anything that changes the trajectory).
_RESUME_KEYS = ("model", "sft_adapter", "pairs", "quant", "template", "loss", "beta", "label_smoothing", "simpo_gamma",
                "rpo_alpha",
                "learning_rate", "lr_scheduler", "warmup_steps", "max_grad_norm", "epochs", "max_steps", "batch_size",
                "micro_batch_size", "max_length", "eval_fraction", "lora_r", "lora_alpha", "seed")


def _validate(config: DPOConfig) -> None:
    """Refuse bad settings before anything is read or loaded; each message names its flag."""
    for name in ("pairs", "output_dir"):
        if not getattr(config, name):
            raise UserError(f"no {name.replace('_', ' ')}: give --{name.replace('_', '-')}")
    if config.loss not in LOSSES:
        raise UserError(f"--loss: unknown '{config.loss}'; choose one of {', '.join(LOSSES)}")
    if config.beta is None:
        config.beta = DEFAULT_BETA[config.loss]
    if not config.beta > 0:  # also refuses NaN
        raise UserError(f"--beta must be positive, got {config.beta}")
    if not 0.0 <= config.label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {config.label_smoothing}")
    if config.label_smoothing and config.loss != "sigmoid":
        raise UserError(f"--label-smoothing applies to --loss sigmoid only, not {config.loss}")
    if not config.rpo_alpha >= 0:
        raise UserError(f"--rpo-alpha must be 0 or positive, got {config.rpo_alpha}")
    if config.simpo_gamma < 0:
        raise UserError(f"--simpo-gamma must be 0 or positive, got {config.simpo_gamma}")
    for name in ("batch_size", "micro_batch_size", "max_length"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.batch_size % config.micro_batch_size:
        raise UserError(f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size "
                        f"{config.micro_batch_size}")
    if config.sft_adapter and not Path(config.sft_adapter).is_dir():
        raise UserError(f"SFT adapter directory {config.sft_adapter} does not exist; give the output dir of "
                        "`lowrank sft` (or leave --sft-adapter out to start from the base)")


# --------------------------------------------------------------------------------------------
# Pairs as token ids with a response mask
# --------------------------------------------------------------------------------------------

def tokenize_response(tokenizer, template: str, prompt: list[dict], response, max_length: int) -> dict:
    """``input_ids`` of prompt + response rendered with ``template``, and ``response_mask`` (1 on response tokens).

    The response tokens are those of the assistant turns after the prompt, end-of-turn marker
    included, exactly as SFT puts its loss on them (lowrank.data.assistant_spans); assistant turns
    inside a multi-turn prompt are context, not response. Both lists are cut to ``max_length``.
    """
    from lowrank.data import assistant_spans, tokenize_text

    messages = list(prompt) + ([{"role": "assistant", "content": response}] if isinstance(response, str)
                               else list(response))
    text, spans = assistant_spans(template, messages, tokenizer)
    response_spans = spans[sum(m["role"] == "assistant" for m in prompt):]
    ids, offsets = tokenize_text(tokenizer, text)
    mask = [int(end > start and any(s <= start < e for s, e in response_spans)) for start, end in offsets]
    return {"input_ids": ids[:max_length], "response_mask": mask[:max_length]}


def tokenize_preference_pairs(tokenizer, template: str, pairs: list[dict], max_length: int) -> list[dict]:
    """Pairs as ``{"chosen", "rejected"}`` of tokenize_response, plus ``index`` (their position).

    A pair whose chosen or rejected response is cut away by ``max_length``, or whose two rows are
    the same tokens after the cut, teaches nothing and is dropped with a warning.
    """
    examples = []
    for pair in pairs:
        try:
            chosen, rejected = (tokenize_response(tokenizer, template, pair["prompt_messages"], pair[k], max_length)
                                for k in ("chosen", "rejected"))
        except UserError as error:
            raise UserError(f"{pair.get('where', 'a pair')}: {error}") from None
        # Position 0 is never predicted, so a response must have a token after it.
        if any(sum(row["response_mask"][1:]) == 0 for row in (chosen, rejected)) or \
                chosen["input_ids"] == rejected["input_ids"]:
            continue
        examples.append({"index": len(examples), "chosen": chosen, "rejected": rejected})
    if not examples:
        raise UserError(f"no preference pair keeps a response of each side within --max-length {max_length} "
                        "tokens; raise --max-length")
    if len(examples) < len(pairs):
        log.warning("dropped %d of %d pairs whose chosen or rejected response does not fit in %d tokens (or "
                    "that become identical when cut)", len(pairs) - len(examples), len(pairs), max_length)
    return examples


def collate_pairs(examples: list[dict], pad_id: int, reference: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """One micro-batch: the chosen rows, then the rejected rows, right-padded to one width.

    ``input_ids``, ``attention_mask``, ``response_mask`` are (2 * pairs, width); ``reference_chosen``
    and ``reference_rejected`` (pairs,) are the precomputed reference log-probs (zeros without them).
    """
    from lowrank.scoring import pad_batch

    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    input_ids, attention_mask = pad_batch([r["input_ids"] for r in rows], pad_id)
    response_mask, _ = pad_batch([r["response_mask"] for r in rows], 0)
    index = torch.tensor([e["index"] for e in examples])
    ref_chosen, ref_rejected = (r[index] for r in reference) if reference else (torch.zeros(len(index)),) * 2
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "reference_chosen": ref_chosen, "reference_rejected": ref_rejected}


@torch.no_grad()
def reference_logprobs(accelerator, model, examples: list[dict], batch_size: int,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (pairs,) of every chosen and rejected response under the reference role, computed once.

    Each process scores every P-th micro-batch; the sums are then added over processes.
    """
    chosen = torch.zeros(len(examples), dtype=torch.float64, device=accelerator.device)
    rejected = torch.zeros_like(chosen)
    model.eval()
    with use_role(model, REFERENCE):
        starts = range(accelerator.process_index * batch_size, len(examples), batch_size * accelerator.num_processes)
        for start in starts:
            part = examples[start:start + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate_pairs(part, pad_id, None).items()}
            sums, _ = sequence_logprobs(model, batch)
            index = torch.tensor([e["index"] for e in part], device=accelerator.device)
            chosen[index], rejected[index] = sums[:len(part)].double(), sums[len(part):].double()
    model.train()
    if accelerator.num_processes > 1:
        chosen, rejected = accelerator.reduce(chosen, reduction="sum"), accelerator.reduce(rejected, reduction="sum")
    return chosen.float().cpu(), rejected.float().cpu()


@torch.no_grad()
def evaluate(accelerator, model, config: DPOConfig, examples: list[dict], pad_id: int, reference) -> dict:
    """Held-out loss, pairwise accuracy, mean margin and mean implicit rewards of the policy over ``examples``."""
    model.eval()
    totals = [0.0] * 5  # loss, correct, margin, chosen reward, rejected reward
    size = config.micro_batch_size
    for start in range(accelerator.process_index * size, len(examples), size * accelerator.num_processes):
        batch = collate_pairs(examples[start:start + size], pad_id, reference)
        loss, chosen, rejected = pair_losses(config, model, {k: v.to(accelerator.device) for k, v in batch.items()})
        for i, value in enumerate((loss, (chosen > rejected).float(), chosen - rejected, chosen, rejected)):
            totals[i] += value.sum().item()
    model.train()
    totals = train.reduce_sum(accelerator, *totals)
    names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")
    return {f"eval_{name}": value / len(examples) for name, value in zip(names, totals)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _load_inputs(config: DPOConfig) -> PairInputs:
    """Check every input before anything is loaded or written: settings, SFT adapter, base, pairs."""
    from lowrank.models import QUANT_CHOICES, check_architecture, resolve_quant
    from lowrank.tiny import resolve_model_name

    _validate(config)
    sft_meta = preference.read_sft_record(config)
    if config.quant == "auto":  # the base as the SFT adapter saw it in training
        config.quant = (sft_meta.config.get("quant") if sft_meta else None) or resolve_quant("auto")
    if config.quant not in QUANT_CHOICES:
        raise UserError(f"--quant: unknown value '{config.quant}'; choose auto or one of {', '.join(QUANT_CHOICES)}")
    model_path = resolve_model_name(config.model)
    check_architecture(model_path)
    inputs = preference.load_pair_inputs(config, config.pairs, model_path, sft_meta, tokenize_preference_pairs)
    if not config.sft_adapter and config.loss not in REFERENCE_FREE:
        log.info("no --sft-adapter: the policy is a fresh LoRA and the reference of --loss %s is the base itself "
                 "(adapters disabled)", config.loss)
    return inputs


def train_dpo(config: DPOConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Optimise the policy on preference pairs as configured; write its adapter to ``config.output_dir``.

    ``on_step`` gets one dict per optimizer step on the main process (step, max_steps, loss,
    chosen_reward, rejected_reward, margin, accuracy, lr, grad_norm, and eval_* after an
    evaluation); the same dicts go to metrics.jsonl, where a record with step 0 holds the
    held-out figures before training.
    """

    from lowrank.models import load_base_model, lora_config
    from lowrank.roles import build_roles, trainable_parameters

    inputs = _load_inputs(config)
    examples, train_examples, eval_examples = inputs.examples, inputs.train_examples, inputs.eval_examples
    accelerator = train.make_accelerator()
    micro_per_step = config.batch_size // config.micro_batch_size
    if micro_per_step % accelerator.num_processes:
        raise UserError(f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size "
                        f"{config.micro_batch_size} x {accelerator.num_processes} processes")
    accumulation = micro_per_step // accelerator.num_processes
    out_dir = Path(config.output_dir).expanduser()
    resume_from = checkpoints.resume_checkpoint(out_dir) if config.resume else None
    train.take_output_dir(accelerator, config)

    train.seed_everything(config.seed)
    base = load_base_model(inputs.model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing,
                           device=accelerator.device)
    policy_lora = None if config.sft_adapter else lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=0.0)
    model = build_roles(base, sft_adapter=config.sft_adapter or None, policy_lora_config=policy_lora)
    pad_id = inputs.tokenizer.pad_token_id  # load_tokenizer makes eos the pad when the model has none
    reference = None
    if config.loss not in REFERENCE_FREE:
        reference = reference_logprobs(accelerator, model, examples, config.micro_batch_size, pad_id)
    model.train()
    params = trainable_parameters(model)[POLICY]  # the only parameters with optimizer state
    stream = loop.BatchStream(len(train_examples), config.micro_batch_size, config.seed)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * stream.batches_per_epoch / micro_per_step))
    optimizer = train.build_optimizer(params, config.learning_rate, paged=config.quant != "none")
    scheduler = train.build_scheduler(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps,
                                      kind=config.lr_scheduler)
    peft_model = model
    model = accelerator.prepare(model)  # DDP under `accelerate launch`; unchanged on one process
    steps = loop.StepRecords(accelerator, out_dir, "dpo", config, _RESUME_KEYS, model=model, optimizer=optimizer,
                             scheduler=scheduler, stream=stream, max_steps=max_steps, resume_from=resume_from,
                             on_step=on_step)
    metrics_log, start_step = steps.metrics_log, steps.start_step
    if resume_from is None and eval_examples:
        metrics_log.log({"step": 0, "max_steps": max_steps,
                         **evaluate(accelerator, peft_model, config, eval_examples, pad_id, reference)})

    step_stats: list[torch.Tensor] = []

    def loss_sum(model, batch: dict) -> torch.Tensor:
        losses, chosen, rejected = pair_losses(config, model, batch)
        step_stats.append(torch.stack([(chosen > rejected).float().sum(), chosen.sum(), rejected.sum()]).cpu())
        return losses.sum()

    last: dict = {}
    for step in range(start_step + 1, max_steps + 1):
        indices = stream.take(accumulation, accelerator.num_processes, accelerator.process_index)
        micro_batches = [collate_pairs([train_examples[i] for i in batch], pad_id, reference) for batch in indices]
        step_stats.clear()
        loss_total, pairs = train.accumulate_gradients(accelerator, model, micro_batches, loss_sum_fn=loss_sum,
                                                       count_fn=lambda b: b["reference_chosen"].shape[0])
        grad_norm = train.optimizer_step(accelerator, params, optimizer, scheduler, config.max_grad_norm)
        correct, chosen, rejected = torch.stack(step_stats).sum(0).tolist()
        loss_total, pairs, correct, chosen, rejected = train.reduce_sum(accelerator, loss_total, pairs, correct,
                                                                        chosen, rejected)
        record = {"step": step, "max_steps": max_steps, "epoch": round(stream.epoch(), 4), "pairs": int(pairs),
                  "loss": loss_total / pairs, "chosen_reward": chosen / pairs, "rejected_reward": rejected / pairs,
                  "margin": (chosen - rejected) / pairs, "accuracy": correct / pairs,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        if eval_examples and ((config.eval_every > 0 and step % config.eval_every == 0) or step == max_steps):
            record.update(evaluate(accelerator, peft_model, config, eval_examples, pad_id, reference))
        last.update(record)
        steps.add(step, record)

    accelerator.wait_for_everyone()
    metrics_log.plot(out_dir / "dpo_metrics.png", ["loss", "margin", "accuracy", "eval_accuracy", "eval_margin"])
    evals = [r for r in metrics_log.records if "eval_accuracy" in r]
    metrics = {k: v for k, v in last.items() if k not in ("step", "max_steps", "lr", "grad_norm")}
    if evals:
        metrics.update({"initial_eval_accuracy": evals[0]["eval_accuracy"],
                        "initial_eval_margin": evals[0]["eval_margin"], "initial_eval_loss": evals[0]["eval_loss"]})
    metrics["steps"] = max_steps
    if torch.cuda.is_available():
        metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3)
    extra = {"sft_adapter": config.sft_adapter or None,
             # what the implicit rewards are measured against
             "reference": None if config.loss in REFERENCE_FREE else (config.sft_adapter or "base"),
             "processes": accelerator.num_processes}
    return preference.finish_run(accelerator, peft_model, out_dir, "dpo", config, inputs, metrics=metrics, extra=extra,
                                 adapter_name=POLICY)
