"""The small loop helpers that SFT, reward and PPO share: output dir, seeding, optimizer and
schedule, token-normalised gradient accumulation, checkpoints for ``--resume``, metrics, and
writing the finished adapter.

A stage keeps only what differs (how a batch becomes a loss); everything here is plain
functions over torch / accelerate objects so a reader can follow a loop top to bottom.

Output dir contract: ``lowrank.json`` is the marker of a finished run. It is written last, by
rename, so an interrupted run never leaves a dir that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from lowrank import runrecord
from lowrank.checkpoints import CHECKPOINTS, tensor_bytes, check_free_space, list_checkpoints
from lowrank.errors import UserError
from lowrank.lm_loss import causal_lm_loss_sum, count_loss_tokens

log = logging.getLogger(__name__)

FINISHED_MARKER = runrecord.RECORD_FILE


# --- output dir, seeds, digests ------------------------------------------------------------

def check_output_dir(path, overwrite: bool, *, resume: bool = False) -> Path:
    """Refuse an output dir that is a file, that holds a finished run, or that holds the checkpoints of an
    interrupted run (unless ``overwrite``, or ``resume`` for the latter); touch nothing.

    A stage calls this before its slow set-up (loading the model) and :func:`prepare_output_dir` after.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output dir is a file; choose another --output-dir")
    if (out / FINISHED_MARKER).exists() and not overwrite:
        raise UserError(f"{out}: already holds a finished run ({FINISHED_MARKER}); "
                        f"pass --overwrite to replace it or choose another --output-dir")
    steps = list_checkpoints(out)
    if steps and not (overwrite or resume):
        raise UserError(f"{out}: holds an interrupted run (checkpoint of step {steps[-1]}); pass --resume to "
                        "continue it, or --overwrite to discard it and start again")
    return out


def prepare_output_dir(path, overwrite: bool, *, resume: bool = False) -> Path:
    """Create ``path`` for a new run and return it.

    Refuses a dir that holds a finished run (has lowrank.json) unless ``overwrite``; then the old
    run is removed first, marker before the rest, so the dir never looks finished meanwhile.
    With ``resume`` the checkpoints and metrics of the interrupted run are kept.
    """
    from lowrank import locks

    locks.hold(path)  # before anything in the dir changes: one writer at a time
    out = check_output_dir(path, overwrite, resume=resume)
    if (out / FINISHED_MARKER).exists():
        (out / FINISHED_MARKER).unlink()
        shutil.rmtree(out)
    elif out.exists() and not resume:
        # Leftovers of an interrupted run we are not resuming (--overwrite): they would mix with ours.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        try:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"{out / 'metrics.jsonl'}: cannot remove the old run's metrics ({e.strerror})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot write the output dir ({e.strerror})") from None
    return out


def take_output_dir(state, config) -> Path:
    """:func:`prepare_output_dir` of ``config.output_dir`` (with its ``overwrite`` and ``resume``) on the
    main process of ``state`` (an Accelerator or accelerate's PartialState), the others waiting for it;
    returns the dir."""
    if state.is_main_process:
        prepare_output_dir(config.output_dir, config.overwrite, resume=config.resume)
    state.wait_for_everyone()
    return Path(config.output_dir).expanduser()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): the one place seeds are set."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_digest(source) -> str:
    """sha256 of a local data file's bytes, or of the hub dataset name when it is not a file."""
    path = Path(str(source)).expanduser()
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h.update(f"hub:{source}".encode())
    return h.hexdigest()


# --- optimizer and schedule --------------------------------------------------------------

def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, *, weight_decay: float = 0.0,
                    paged: bool = False, optim_bits: int = 32) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters.

    ``paged`` (QLoRA on CUDA) uses bitsandbytes' paged AdamW, whose state moves to CPU memory
    under pressure instead of failing with out-of-memory; 8-bit keeps the state quantized.
    On the CPU there is nothing to page to, so torch's AdamW is used.
    """
    if optim_bits not in (8, 32):
        raise UserError(f"--optim-bits must be 8 or 32, got {optim_bits}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if paged and torch.cuda.is_available():
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if optim_bits == 8 else bnb.optim.PagedAdamW32bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class WarmupDecay:
    """lr multiplier: linear warmup over ``warmup_steps``, then cosine or linear decay to 0 at ``max_steps``.

    A callable object (not a lambda) so that LambdaLR's state_dict can record it for --resume.
    """

    def __init__(self, warmup_steps: int, max_steps: int, kind: str = "cosine"):
        if kind not in ("cosine", "linear", "constant"):
            raise UserError(f"--lr-scheduler: unknown '{kind}'; choose cosine, linear or constant")
        self.warmup_steps, self.max_steps, self.kind = warmup_steps, max_steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, progress)
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress


def build_scheduler(optimizer, *, warmup_steps: int, max_steps: int, kind: str = "cosine"):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup_steps, max_steps, kind))


def accumulation_for_tokens(tokens_per_step: int, lengths: list[int], batch_size: int, processes: int = 1) -> int:
    """Micro-batches per process and optimizer step that take about ``tokens_per_step`` tokens in all.

    ``lengths``: tokens of each row (a packed row, an example, or a preference pair's two
    sequences). The count uses their mean, so a step's tokens vary a little around the budget
    while every step has the same number of micro-batches (which DDP and --resume need); the
    loss of a step is normalised by its own token or pair count, so the variation is exact.
    """
    mean_row = sum(lengths) / max(1, len(lengths))
    rows_per_step = max(1, round(tokens_per_step / max(1.0, mean_row)))
    return max(1, math.ceil(rows_per_step / (batch_size * processes)))


# --- one optimizer step ------------------------------------------------------------------

def multi_cpu() -> bool:
    """True when launched as several processes on a machine without CUDA.

    accelerate only sets up DDP over gloo (its MULTI_CPU mode) when told to use the CPU; without
    this, each process of `accelerate launch --multi_gpu` / torchrun on a CPU box would train alone.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(*, fsdp: bool = False):
    """The Accelerator of a training stage: DDP on CUDA or, under a multi-process launch without CUDA, on gloo;
    FSDP under an FSDP config for a stage that passes ``fsdp`` (one of FSDP_STAGES), refused for the others.

    Only FSDP2 (torch's ``fully_shard``, accelerate's ``fsdp_version: 2``) is run: it keeps each parameter
    as itself (a sharded DTensor), so the frozen 4-bit base and the LoRA weights shard side by side,
    the optimizer sees the LoRA weights by name, and the loss code can tell a sharded head from a whole one.
    """
    from accelerate import Accelerator

    from lowrank.fsdp import FSDP_CONFIG, FSDP_STAGES, fsdp_requested, is_fsdp

    if fsdp_requested() and not fsdp:
        raise UserError(f"FSDP runs only the {', '.join(FSDP_STAGES)} stage (ppo and grpo swap adapters and generate, "
                        "which sharding slows to a crawl; reward and dpo are not wired for it); launch this stage "
                        "with recipes/accelerate/ddp.yaml")
    accelerator = Accelerator(cpu=multi_cpu())
    if fsdp_requested() and not is_fsdp(accelerator):
        raise UserError("the FSDP config needs several CUDA GPUs (accelerate shards only on GPUs and would run plain "
                        "DDP here); launch with recipes/accelerate/ddp.yaml, or on a machine with GPUs")
    version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 2)
    if is_fsdp(accelerator) and version != 2:
        raise UserError(f"fsdp_version {version} is not supported: lowrank runs FSDP2 (fsdp_version: 2 in the "
                        f"accelerate config, as {FSDP_CONFIG} sets it)")
    return accelerator


def accumulate_gradients(accelerator, model, micro_batches: list[dict],
                         loss_sum_fn: Callable[[Any, dict], torch.Tensor] = causal_lm_loss_sum,
                         count_fn: Callable[[dict], int] = count_loss_tokens) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (loss sum, tokens) of the step.

    The loss is normalised by the number of loss tokens of the WHOLE step, counted over every
    micro-batch and every process, so each token weighs the same however the tokens fall into
    micro-batches (torchtune's recipes do the same). The mean of per-micro-batch means would
    over-weight the tokens of short micro-batches, which packing and varied lengths make common.
    DDP averages gradients over processes, so the per-process loss is scaled by the process count.
    """
    local_tokens = sum(count_fn(b) for b in micro_batches)
    total = torch.tensor([float(local_tokens)], device=accelerator.device)
    total_tokens = int(accelerator.reduce(total, reduction="sum").item()) if accelerator.num_processes > 1 else local_tokens
    scale = accelerator.num_processes / max(1, total_tokens)
    loss_total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced only on the last micro-batch of the step.
        ctx = accelerator.no_sync(model) if not last and accelerator.num_processes > 1 else contextlib.nullcontext()
        with ctx:
            loss_sum = loss_sum_fn(model, batch)
            accelerator.backward(loss_sum * scale)
        loss_total += float(loss_sum.detach())
    return loss_total, local_tokens


def average_gradients(accelerator, params) -> None:
    """Average the gradients of ``params`` over processes, in one all-reduce, for a model that is not
    DDP-wrapped (PPO's two trained roles backpropagate separately); nothing with one process.

    Parameters without a gradient are left out; every process runs the same code path, so they
    are the same ones on each.
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


def optimizer_step(accelerator, params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, schedule (when there is a scheduler), zero; returns the gradient norm before
    clipping (0 when not clipping)."""
    grad_norm = 0.0
    if max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def reduce_sum(accelerator, *values: float) -> list[float]:
    """Sum scalars over processes (identity with one process)."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor([float(v) for v in values], device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(t, reduction="sum").tolist()


def mean_over_processes(accelerator, record: dict) -> dict:
    """``record`` with each float value replaced by its mean over processes (one all-reduce; the same
    record with one process), so one process can log a step of all of them."""
    if accelerator.num_processes == 1:
        return record
    keys = [k for k, v in record.items() if isinstance(v, float)]
    summed = reduce_sum(accelerator, *(record[k] for k in keys))
    return {**record, **{k: v / accelerator.num_processes for k, v in zip(keys, summed)}}


# --- the finished adapter ----------------------------------------------------------------------

def publish(src: Path, out: Path, record: runrecord.RunRecord) -> None:
    """Rename the files of the temp dir ``src`` into ``out``, then write the run record last.

    A file under its final name is complete, and the marker of a finished run appears only after
    every other file. Temp files are private by default; a model or adapter is meant to be shared.
    """
    for f in src.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
            os.replace(f, out / f.name)
    runrecord.write(out, record)


def write_adapter(peft_model, out_dir, record: runrecord.RunRecord, adapter_name: str = "default",
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter ``adapter_name`` as a standard PEFT dir in ``out_dir``, then lowrank.json.

    ``state_dict``: the adapter's weights when the model's own are shards (FSDP: lowrank.fsdp.gathered_trainable_state).

    peft writes to a temp dir first; its files are renamed into ``out_dir`` and lowrank.json,
    the marker of a finished run, is renamed in last. ``PeftModel.from_pretrained(base, out_dir)``
    loads the result (as adapter "default" whatever its name was in training).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / FINISHED_MARKER).unlink(missing_ok=True)
    check_free_space(out, tensor_bytes([p for n, p in peft_model.named_parameters() if f".{adapter_name}." in n]),
                     "adapter")
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter-"))
    try:
        # save_embedding_layers=False: with lm_head among the LoRA targets, peft would otherwise save
        # the (unchanged) base LM head too, vocab x hidden values (260 MB on a 7B), meant for resized
        # vocabularies, which lowrank never makes.
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name], save_embedding_layers=False,
                                   state_dict=state_dict)
        # peft puts a non-default adapter in a subdir named after it.
        publish(tmp if adapter_name == "default" else tmp / adapter_name, out, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
