"""Pretraining a small base: full-parameter next-token training on plain text (no LoRA).

The embedded tiny models have random weights; the demo first teaches one its task on practice
text (lowrank.tasks writes it) so that SFT, the reward model and PPO have a base that knows
something. The loop is SFT's (lowrank.sft) with every parameter trainable and every token of a
document carrying loss: documents are tokenized with the tokenizer's BOS and an EOS after them,
packed padding-free into rows of ``max_length`` tokens (lowrank.data.pack_examples), and trained
with the shared helpers of lowrank.train (AdamW, warm-up + cosine, token-normalised loss).

The output is a plain Hugging Face model dir (safetensors, config, tokenizer files, and the
SentencePiece model when the base has one), so every later stage, merge and GGUF export load it
like any other base; ``lowrank.json`` (written last) marks it finished. It runs as one process (on
CUDA when there is one): pretraining here is for small bases that train in minutes.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import Callable

from lowrank import locks, runrecord, train
from lowrank.config import config_to_dict
from lowrank.errors import UserError
from lowrank.fields import EpochFields, SchedulerField, TrainingFields, WeightDecayField, restate, stage_config
from lowrank.metrics import MetricsLog

log = logging.getLogger(__name__)

# Files of the base dir copied beside the trained weights (tokenizer.model: GGUF export reads the
# SentencePiece scores and piece types from it).
_EXTRA_FILES = ("tokenizer.model", "generation_config.json")


@stage_config
class PretrainConfig(EpochFields, WeightDecayField, SchedulerField, TrainingFields):
    """Settings of `lowrank pretrain` (flags: --model, --data, --output-dir, ...)."""

    data: str = field(default="", metadata={"help": "training text: .json/.jsonl records with a 'text' field"})
    batch_size: int = field(default=16, metadata={"help": "packed rows per optimizer step"})
    # the shared fields (lowrank.fields) as pretraining states them
    model = restate(help="model to train: Hugging Face dir or hub id, or 'tiny' / 'tiny-bpe' (random weights)")
    output_dir = restate(help="where the trained model (a Hugging Face dir) and metrics.jsonl go")
    seed = restate(help="seed of the split and the data order")
    learning_rate = 1e-3  # the tiny bases: 3e-3 learned sort but not reverse (3.5% against 78% at 1e-3)
    warmup_steps = 20
    epochs = restate(help="passes over the training text (when max_steps is 0)")
    max_length = restate(256, help="tokens per document (longer ones are cut) and per packed row")
    eval_fraction = restate(0.02, help="share of documents held out for the eval loss")
    eval_every = restate(0, help="eval loss every N optimizer steps (0: at start and end only)")


def _validate(config: PretrainConfig) -> None:
    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR")
    if not config.data:
        raise UserError("no training text: give --data FILE.jsonl (records with a 'text' field)")
    for name, low in (("batch_size", 1), ("max_length", 2)):
        if getattr(config, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(config, name)}")
    if not config.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {config.learning_rate}")


def _check_full_precision(model_path: str) -> None:
    """Refuse a quantized checkpoint: its weights cannot take full-parameter updates."""
    from lowrank.models import read_model_config

    quant = read_model_config(model_path).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise UserError(f"{model_path}: a {method} model (config.json has quantization_config); pretraining "
                        "updates every weight in full precision: give an unquantized model")


def load_documents(tokenizer, source: str, max_length: int) -> list[dict]:
    """Each record's ``text`` as ``input_ids`` with BOS (when the tokenizer uses one) and EOS; loss on all."""
    from lowrank.data import load_records_with_locations, tokenize_text

    records, wheres = load_records_with_locations(source)
    examples = []
    for record, where in zip(records, wheres):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            found = "missing" if text is None else ("empty" if isinstance(text, str) else f"a {type(text).__name__}")
            raise UserError(f"{where}: field 'text' must be a non-empty string, it is {found}")
        ids = tokenize_text(tokenizer, text)[0]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]  # the model learns where a document ends
        ids = ids[:max_length]
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def _save_model(model, model_path: str, out_dir: Path, meta: runrecord.RunRecord) -> None:
    """Write the model as a Hugging Face dir in ``out_dir``; lowrank.json, the finished marker, last.

    Everything goes to a temp dir first and is renamed into place, so a file under its final name
    is complete.
    """
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model-"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # The tokenizer files as the base has them (load_tokenizer's in-memory fixes are not saved).
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_path).save_pretrained(str(tmp))
        for name in _EXTRA_FILES:
            src = Path(model_path) / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy(src, tmp / name)
        train.publish(tmp, out_dir, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_base(config: PretrainConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train every weight of ``config.model`` on ``config.data``; write a Hugging Face dir to ``output_dir``.

    ``on_step`` gets one dict per optimizer step: step, max_steps, loss, lr, grad_norm, tokens,
    tokens_per_second, epoch, and eval_loss when evaluated (the same dicts go to metrics.jsonl;
    a record with step 0 holds the initial eval loss).
    """
    from accelerate import Accelerator

    from lowrank.data import collate, pack_examples
    from lowrank.models import check_architecture, load_base_model, load_tokenizer
    from lowrank.loop import BatchStream, held_out_loss, split_held_out
    from lowrank.tiny import resolve_model_name

    _validate(config)
    # Validate every input (model, data) before touching the output dir.
    out_dir = train.check_output_dir(config.output_dir, config.overwrite)
    model_path = resolve_model_name(config.model)
    check_architecture(model_path)
    _check_full_precision(model_path)
    tokenizer = load_tokenizer(model_path)
    documents = load_documents(tokenizer, config.data, config.max_length)
    train_docs, eval_docs = split_held_out(documents, config.eval_fraction, config.seed)
    train_rows, eval_rows = pack_examples(train_docs, config.max_length), pack_examples(eval_docs, config.max_length)
    train.prepare_output_dir(out_dir, config.overwrite)

    train.seed_everything(config.seed)
    accelerator = Accelerator()  # one process: the device (CUDA when there is one) and backward
    model = load_base_model(model_path, "none", gradient_checkpointing=False, device=accelerator.device)
    model.float()  # full-parameter training keeps fp32 weights (a bf16 base is cast up)
    for p in model.parameters():
        p.requires_grad_(True)
    model.config.use_cache = True  # a finished base generates with its KV cache
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stream = BatchStream(len(train_rows), config.batch_size, config.seed)
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * stream.batches_per_epoch))
    optimizer = train.build_optimizer(params, config.learning_rate, weight_decay=config.weight_decay)
    scheduler = train.build_scheduler(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps,
                                      kind=config.lr_scheduler)
    metrics_log = MetricsLog(out_dir, report_to=config.report_to, stage="pretrain",
                             config=config_to_dict(config))
    pad_id = tokenizer.pad_token_id

    if eval_rows:
        metrics_log.log({"step": 0, "max_steps": max_steps,
                         "eval_loss": held_out_loss(accelerator, model, eval_rows, config.batch_size, pad_id)})
    last: dict = {}
    train_seconds, train_tokens = 0.0, 0
    for step in range(1, max_steps + 1):
        started = time.perf_counter()
        rows = [train_rows[i] for i in stream.take(1, 1, 0)[0]]
        batch = collate(rows, pad_id)
        loss_sum, loss_tokens = train.accumulate_gradients(accelerator, model, [batch])
        grad_norm = train.optimizer_step(accelerator, params, optimizer, scheduler, config.max_grad_norm)
        elapsed = time.perf_counter() - started
        tokens = sum(len(r["input_ids"]) for r in rows)
        train_seconds += elapsed
        train_tokens += tokens
        record = {"step": step, "max_steps": max_steps, "epoch": round(stream.epoch(), 4),
                  "loss": loss_sum / max(1, loss_tokens), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens": tokens, "tokens_per_second": tokens / max(elapsed, 1e-9)}
        if eval_rows and ((config.eval_every > 0 and step % config.eval_every == 0) or step == max_steps):
            record["eval_loss"] = held_out_loss(accelerator, model, eval_rows, config.batch_size, pad_id)
        metrics_log.log(record)
        last.update(record)
        if on_step is not None:
            on_step(record)

    model.eval()
    metrics_log.plot(out_dir / "loss.png", ["loss", "eval_loss"])
    evals = [r["eval_loss"] for r in metrics_log.records if "eval_loss" in r]
    metrics = {k: last[k] for k in ("loss", "eval_loss") if k in last}
    metrics.update({"initial_eval_loss": evals[0] if evals else None, "steps": max_steps,
                    "epochs": round(stream.epoch(), 4), "train_tokens": train_tokens,
                    "tokens_per_second": train_tokens / max(train_seconds, 1e-9)})
    meta = runrecord.RunRecord(
        stage="pretrain", base=runrecord.BaseRef.of(config.model, model_path),
        data={"source": config.data, "digest": train.data_digest(config.data), "documents": len(documents),
              "train_documents": len(train_docs), "eval_documents": len(eval_docs), "train_rows": len(train_rows)},
        config=config_to_dict(config),
        seed=config.seed,
        metrics=metrics,
    )
    _save_model(model, model_path, out_dir, meta)
    log.info("pretrained %s for %d steps (loss %.3f); written to %s", config.model, max_steps,
             metrics.get("loss", float("nan")), out_dir)
    locks.release(out_dir)  # the output is complete
    return out_dir
