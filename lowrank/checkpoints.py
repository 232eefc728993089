"""Checkpoints for ``--resume``: what a stage saves every ``--save-every`` steps and reads back.

A checkpoint is OUTPUT_DIR/checkpoints/step-N/state.pt: the trainable weights, the optimizer and
scheduler, every process's RNG state and the stage's own ``extra`` (its data position). It holds
tensors and plain numbers only and is read with ``torch.load(weights_only=True)``, so a pickled
payload in a shared run dir is refused, never run. Each is written to a temp dir and renamed, after
a free-space check; the newest two are kept. Under FSDP the adapter and optimizer state are gathered
whole (lowrank.fsdp) before they are written, so a checkpoint is the same file however many processes
wrote it.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch

from lowrank import fsdp, runrecord
from lowrank.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (the LoRA weights and any trained head), by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers only, so that ``torch.load(weights_only=True)``
    reads it back (numpy's state holds an ndarray, which would need pickle)."""
    import numpy as np

    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint_file(path: Path) -> dict:
    """torch.load without pickle (weights_only): a planted payload is refused, never run; a truncated
    or foreign file is a one-line UserError naming it."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused: it holds Python objects beyond tensors and numbers, which lowrank "
                        "never writes (loading it could run code); resume from another checkpoint or use "
                        "--overwrite") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable checkpoint file ({reason}); resume from another checkpoint or use "
                        "--overwrite") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a lowrank checkpoint file (holds {type(state).__name__}, not a dict)")
    return state


def save_checkpoint(accelerator, out_dir: Path, step: int, model, optimizer, scheduler,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write out_dir/checkpoints/step-N: trainable weights, optimizer, scheduler, RNG of every process,
    step and ``extra`` (e.g. the data position). Written to a temp dir and renamed, so a checkpoint
    that exists is complete; only the newest ``keep`` are kept.
    """
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        # Under FSDP each process holds a shard: every process takes part in gathering them whole.
        sharded_trainable = fsdp.gathered_trainable_state(accelerator, model)
        sharded_optimizer = fsdp.full_optimizer_state(accelerator, model, optimizer)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            state = {"step": step, "extra": extra or {},
                     "trainable": sharded_trainable if sharded_trainable is not None else trainable_state(unwrapped),
                     "optimizer": sharded_optimizer if sharded_optimizer is not None else optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}
            check_free_space(tmp, tensor_bytes(state), "checkpoint")
            torch.save(state, tmp / "state.pt")
    except BaseException:  # a full disk, a kill: the half-written checkpoint goes; the last good one stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(list_checkpoints(out_dir))[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def tensor_bytes(value) -> int:
    """Bytes of every tensor inside a nest of dicts, lists and tuples (what torch.save will write, about)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """UserError when ``directory``'s file system has less than ``needed`` bytes (+5% and 1 MiB) free."""
    free = shutil.disk_usage(directory).free
    if free < needed * 1.05 + (1 << 20):
        raise UserError(f"{directory}: not enough disk space for the {what}: it needs {needed / 2**20:.1f} MiB, "
                        f"{free / 2**20:.1f} MiB are free")


def list_checkpoints(out_dir) -> list[int]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "state.pt").exists())


def latest_checkpoint(out_dir) -> Path | None:
    steps = list_checkpoints(out_dir)
    return Path(out_dir) / CHECKPOINTS / f"step-{steps[-1]}" if steps else None


def resume_checkpoint(out_dir) -> Path:
    """The newest checkpoint in ``out_dir`` for ``--resume``; UserError when there is none."""
    root = Path(out_dir).expanduser()
    if (root / runrecord.RECORD_FILE).exists():
        raise UserError(f"--resume: the run in {root} is finished ({runrecord.RECORD_FILE}); there is nothing to resume "
                        "(--overwrite trains it again)")
    found = latest_checkpoint(root)
    if found is None:
        raise UserError(f"--resume: no checkpoint in {root / CHECKPOINTS}; run without --resume")
    return found


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (step, extra)."""
    state = _load_checkpoint_file(Path(path) / "state.pt")
    missing = [key for key in ("step", "extra", "trainable", "optimizer", "scheduler") if key not in state]
    if missing:
        raise UserError(f"{Path(path) / 'state.pt'}: not a lowrank checkpoint (no {missing[0]!r})")
    params = dict(accelerator.unwrap_model(model).named_parameters())
    for name in state["trainable"]:
        if name not in params:
            raise UserError(f"{path}: checkpoint has parameter {name} the model lacks; "
                            f"was it written with another --lora-r or target modules?")
    if not fsdp.load_full_state(accelerator, model, optimizer, state["trainable"], state["optimizer"]):
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value.to(params[name].device))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = Path(path) / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        rng_state = _load_checkpoint_file(rng_file)
        try:
            _set_rng_state(rng_state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise UserError(f"{rng_file}: not an RNG state lowrank wrote ({type(e).__name__})") from None
    else:
        log.warning("%s: no RNG state for process %d (different process count); dropout will differ",
                    path, accelerator.process_index)
    return int(state["step"]), dict(state["extra"])
