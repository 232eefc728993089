"""Supervised fine-tuning (SFT) of a LoRA adapter on a 4-bit, 8-bit or full-precision base.

The loop is written out: each optimizer step takes ``gradient_accumulation_steps`` micro-batches
per process, computes the summed next-token loss over assistant tokens, normalises it by the
loss tokens of the whole step (lowrank.train.accumulate_gradients), clips and steps. Examples
are packed padding-free into rows of ``max_length`` tokens by default (lowrank.data), which is
where most of the speed over a padded Trainer comes from on varied-length instruction data.

It runs unchanged under ``accelerate launch`` (DDP): each process takes every P-th micro-batch
of one seeded stream, so the data order, and hence ``--resume``, does not depend on timing. Under
an FSDP config (recipes/accelerate/fsdp-qlora.yaml) accelerate shards the base, the adapter and the
optimizer state over the processes (lowrank.train.make_accelerator says what FSDP runs and why).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import Callable

from lowrank import checkpoints, fsdp, locks, loop, runrecord, train
from lowrank.config import config_to_dict
from lowrank.errors import UserError
from lowrank.fields import (AccumulationFields, AdapterFields, EpochFields, SchedulerField, WeightDecayField, restate,
                            stage_config)
from lowrank.loop import BatchStream, held_out_loss, split_held_out

log = logging.getLogger(__name__)


@stage_config
class SFTConfig(EpochFields, WeightDecayField, SchedulerField, AccumulationFields, AdapterFields):
    """Settings of `lowrank sft` (flags: --model, --data, --output-dir, ...); shared fields: lowrank.fields."""

    data: str = field(default="", metadata={"help": "training data: .json/.jsonl (alpaca, sharegpt or messages) or a hub dataset; empty: the shipped alpaca sample"})
    eval_data: str = field(default="", metadata={"help": "held-out data; empty: hold out --eval-fraction of --data"})
    template: str = field(default="auto", metadata={"help": "chat template: auto (the tokenizer's, else vicuna), tokenizer, alpaca, vicuna, llama2, llama3, mistral, gemma, phi3, chatml"})
    pack: bool = field(default=True, metadata={"help": "pack several examples into one row, padding-free"})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "modules that get LoRA: all-linear (every linear but lm_head) or names such as q_proj,v_proj"})
    batch_size: int = field(default=4, metadata={"help": "rows (packed) or examples per micro-batch, per process"})
    # the shared fields (lowrank.fields) as SFT states them
    model = restate(help="base model: Hugging Face dir or hub id, or 'tiny' / 'tiny-bpe'")
    output_dir = restate(help="where the adapter, metrics.jsonl, loss.png and checkpoints go")
    seed = restate(help="seed of the split, LoRA init, dropout and data order")
    lora_r = restate(help="LoRA rank")
    lora_alpha = restate(help="LoRA alpha (scale = alpha / r)")
    epochs = restate(help="passes over the training data (when max_steps is 0)")
    max_length = restate(help="tokens per example (longer ones are cut) and per packed row")
    eval_fraction = restate(help="share of examples held out for eval loss when no --eval-data")
    eval_every = restate(help="eval loss every N optimizer steps (and at start and end; 0: only those)")


# Fields a resumed run must share with the interrupted one (anything that changes the trajectory).
_RESUME_KEYS = ("model", "data", "eval_data", "eval_fraction", "template", "max_length", "pack", "quant", "lora_r",
                "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "weight_decay", "lr_scheduler",
                "warmup_steps", "max_grad_norm", "batch_size", "gradient_accumulation_steps", "tokens_per_step", "epochs",
                "max_steps", "seed")


def _validate(config: SFTConfig) -> None:
    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR")
    for name in ("batch_size", "gradient_accumulation_steps", "max_length"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    from lowrank.models import resolve_quant

    resolve_quant(config.quant)  # refuses an unknown value
    if config.tokens_per_step < 0:
        raise UserError(f"--tokens-per-step must be 0 (off) or positive, got {config.tokens_per_step}")


def default_data() -> str:
    """The shipped alpaca sample (what `lowrank sft` trains on when no --data is given)."""
    from lowrank.data import SAMPLE_FILES

    return str(SAMPLE_FILES["alpaca"])


def _to_rows(examples: list[dict], config: SFTConfig) -> list[dict]:
    from lowrank.data import pack_examples

    return pack_examples(examples, config.max_length) if config.pack else examples


def train_sft(config: SFTConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train a LoRA adapter as configured; write it (PEFT dir + lowrank.json) to ``config.output_dir``.

    ``on_step`` gets one dict per optimizer step on the main process: step, max_steps, loss, lr,
    tokens (non-padding, this step, all processes), tokens_per_second, epoch, and eval_loss when
    evaluated. The same dicts go to metrics.jsonl; a record with step 0 holds the initial eval loss.
    """
    from peft import get_peft_model

    from lowrank import plan
    from lowrank.data import build_sft_dataset, collate
    from lowrank.models import (check_architecture, check_fsdp_base, compute_dtype, load_base_model, load_tokenizer,
                                lora_config, resolve_quant)
    from lowrank.templates import resolve_template
    from lowrank.tiny import resolve_model_name

    _validate(config)
    accelerator = train.make_accelerator(fsdp=True)
    sharded = fsdp.is_fsdp(accelerator)
    config.quant = resolve_quant(config.quant, cuda=accelerator.device.type == "cuda")  # recorded as resolved
    # Validate every input (model, template, data) before touching the output dir.
    model_path = resolve_model_name(config.model)
    check_architecture(model_path)
    if sharded:
        fsdp.check_fsdp_settings(config.optim_bits)
        check_fsdp_base(model_path, config.quant, compute_dtype(accelerator.device))
    plan.lora_targets(plan.architecture(model_path), config.target_modules)  # names peft would not find
    tokenizer = load_tokenizer(model_path)
    template_name, template = resolve_template(tokenizer, None if config.template in ("", "auto") else config.template)
    data_source = config.data or default_data()
    examples = build_sft_dataset(tokenizer, template, data_source, config.max_length)
    if config.eval_data:
        train_examples, eval_examples = examples, build_sft_dataset(tokenizer, template, config.eval_data, config.max_length)
    else:
        train_examples, eval_examples = split_held_out(examples, config.eval_fraction, config.seed)
    train_rows, eval_rows = _to_rows(train_examples, config), _to_rows(eval_examples, config)
    lora = lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       target_modules=list(config.target_modules))

    out_dir = Path(config.output_dir).expanduser()
    resume_from = checkpoints.resume_checkpoint(out_dir) if config.resume else None
    train.take_output_dir(accelerator, config)

    train.seed_everything(config.seed)
    memory_plan = plan.plan_for_training(model_path, "sft", config, accelerator.device,
                                         gpus=accelerator.num_processes if sharded else 1) \
        if accelerator.is_main_process else None
    plan.report_start(memory_plan, accelerator.device)
    base = load_base_model(model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing,
                           device=accelerator.device, fsdp=sharded)
    model = get_peft_model(base, lora)
    model.train()
    accumulation = config.gradient_accumulation_steps
    if config.tokens_per_step:
        accumulation = train.accumulation_for_tokens(config.tokens_per_step, [len(r["input_ids"]) for r in train_rows],
                                                     config.batch_size, accelerator.num_processes)
        log.info("--tokens-per-step %d: %d micro-batches of %d rows per process and step", config.tokens_per_step,
                 accumulation, config.batch_size)
    micro_per_step = accumulation * accelerator.num_processes
    stream = BatchStream(len(train_rows), config.batch_size, config.seed)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * stream.batches_per_epoch / micro_per_step))
    # DDP or FSDP under `accelerate launch`; unchanged on one process. Under FSDP: torch's AdamW, sharded.
    model, optimizer, params = fsdp.prepare_model_and_optimizer(accelerator, model, lambda trainable: train.build_optimizer(
        trainable, config.learning_rate, weight_decay=config.weight_decay, paged=config.quant != "none" and not sharded,
        optim_bits=config.optim_bits))
    scheduler = train.build_scheduler(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps,
                                      kind=config.lr_scheduler)
    steps = loop.StepRecords(accelerator, out_dir, "sft", config, _RESUME_KEYS, model=model, optimizer=optimizer,
                             scheduler=scheduler, stream=stream, max_steps=max_steps, resume_from=resume_from,
                             on_step=on_step)
    metrics_log, start_step = steps.metrics_log, steps.start_step
    pad_id = tokenizer.pad_token_id

    if resume_from is None and eval_rows:
        initial = {"step": 0, "max_steps": max_steps,
                   "eval_loss": held_out_loss(accelerator, model, eval_rows, config.batch_size, pad_id)}
        metrics_log.log(initial)

    train_seconds, train_tokens = 0.0, 0
    last: dict = {}
    for step in range(start_step + 1, max_steps + 1):
        started = time.perf_counter()
        indices = stream.take(accumulation, accelerator.num_processes, accelerator.process_index)
        rows = [[train_rows[i] for i in batch] for batch in indices]
        micro_batches = [collate(r, pad_id) for r in rows if r]
        real_tokens = sum(len(row["input_ids"]) for r in rows for row in r)  # non-padding tokens
        loss_sum, loss_tokens = train.accumulate_gradients(accelerator, model, micro_batches)
        grad_norm = train.optimizer_step(accelerator, params, optimizer, scheduler, config.max_grad_norm)
        loss_sum, loss_tokens, real_tokens = train.reduce_sum(accelerator, loss_sum, loss_tokens, real_tokens)
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        train_tokens += int(real_tokens)
        record = {"step": step, "max_steps": max_steps, "epoch": round(stream.epoch(), 4),
                  "loss": loss_sum / max(1.0, loss_tokens), "lr": scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "tokens": int(real_tokens), "loss_tokens": int(loss_tokens),
                  "tokens_per_second": real_tokens / max(elapsed, 1e-9)}
        if eval_rows and ((config.eval_every > 0 and step % config.eval_every == 0) or step == max_steps):
            record["eval_loss"] = held_out_loss(accelerator, model, eval_rows, config.batch_size, pad_id)
        last.update(record)
        steps.add(step, record)

    accelerator.wait_for_everyone()
    adapter_state = fsdp.gathered_trainable_state(accelerator, model)  # every process: FSDP gathers the shards
    if accelerator.is_main_process:
        metrics_log.plot(out_dir / "loss.png", ["loss", "eval_loss"])
        evals = [r["eval_loss"] for r in metrics_log.records if "eval_loss" in r]
        metrics = {k: last[k] for k in ("loss", "eval_loss") if k in last}
        metrics.update({"initial_eval_loss": evals[0] if evals else None, "steps": max_steps,
                        "epochs": round(stream.epoch(), 4), "train_tokens": train_tokens,
                        "micro_batches_per_step": accumulation, **plan.peak_metrics(memory_plan, accelerator.device),
                        "tokens_per_second": train_tokens / max(train_seconds, 1e-9)})
        meta = runrecord.RunRecord(
            stage="sft", base=runrecord.BaseRef.of(config.model, model_path),
            chat_template=runrecord.ChatTemplate(template_name, template),
            data={"source": data_source, "digest": train.data_digest(data_source),
                  "eval_source": config.eval_data or None,
                  "eval_digest": train.data_digest(config.eval_data) if config.eval_data else None,
                  "examples": len(examples), "train_examples": len(train_examples),
                  "eval_examples": len(eval_examples), "train_rows": len(train_rows)},
            config=config_to_dict(config),
            seed=config.seed,
            metrics=metrics,
            extra={"processes": accelerator.num_processes, "fsdp": sharded},
        )
        train.write_adapter(accelerator.unwrap_model(model), out_dir, meta, state_dict=adapter_state)
        shutil.rmtree(out_dir / checkpoints.CHECKPOINTS, ignore_errors=True)  # the run is finished
    accelerator.wait_for_everyone()
    locks.release(out_dir)  # the output is complete
    return out_dir
