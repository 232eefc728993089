"""What the stages' training loops share above one optimizer step: the held-out split, the seeded
stream of micro-batches whose position is the data state a checkpoint needs, the held-out loss
of a causal LM, ``resume`` and what happens to each step's record (``StepRecords``: metrics.jsonl,
checkpoints, the caller's ``on_step``). (One optimizer step, the optimizer and the output dir are in
lowrank.train.)
"""

from __future__ import annotations

import logging
import math
import random

import torch

from lowrank.lm_loss import causal_lm_loss_sum, count_loss_tokens
from lowrank.train import reduce_sum

log = logging.getLogger(__name__)


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random split: (train, held out). At least one of each when there are two or more."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def split_pairs(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """The preference stages' split (reward, DPO): a seeded shuffle, the last ``fraction`` held out
    (at least one pair when there are two or more), the rest in shuffled order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples)))) if fraction > 0 else 0
    shuffled = [examples[i] for i in order]
    return shuffled[:len(shuffled) - n_eval], shuffled[len(shuffled) - n_eval:]


class BatchStream:
    """An endless, seeded stream of micro-batches (lists of row indices); epoch e is a fresh permutation.

    The stream's position (``consumed``) is the whole data-order state a checkpoint needs.
    Under DDP, process r of P takes micro-batches consumed + m*P + r, so all processes walk the
    same stream.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, consumed: int = 0):
        self.num_rows, self.batch_size, self.seed, self.consumed = num_rows, batch_size, seed, consumed
        self.batches_per_epoch = max(1, math.ceil(num_rows / batch_size))
        self._epoch, self._perm = -1, []

    def batch(self, index: int) -> list[int]:
        epoch, j = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._perm = list(range(self.num_rows))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._epoch = epoch
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size]

    def take(self, micro_batches: int, num_processes: int, process_index: int) -> list[list[int]]:
        """This process's micro-batches of the next optimizer step; advances the stream for all processes."""
        out = [self.batch(self.consumed + m * num_processes + process_index) for m in range(micro_batches)]
        self.consumed += micro_batches * num_processes
        return out

    def epoch(self) -> float:
        return self.consumed / self.batches_per_epoch


class PairStream(BatchStream):
    """The reward stage's micro-batch order: one seeded generator shuffles the rows again whenever fewer
    than a batch remain, and batches run on across those reshuffles (no short last batch). Position
    and DDP sharing as in :class:`BatchStream`.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, consumed: int = 0):
        super().__init__(num_rows, batch_size, seed, consumed)
        self._rng, self._order = random.Random(seed), []

    def batch(self, index: int) -> list[int]:
        end = (index + 1) * self.batch_size
        while len(self._order) < end:  # deterministic: the same reshuffles whatever is asked first
            fresh = list(range(self.num_rows))
            self._rng.shuffle(fresh)
            self._order.extend(fresh)
        return self._order[index * self.batch_size:end]

    def epoch(self) -> float:
        return self.consumed * self.batch_size / max(1, self.num_rows)


def held_out_loss(accelerator, model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean next-token loss per loss token over ``rows`` (sharded over processes, summed, divided).

    Under FSDP every forward pass all-gathers the weights with every other process, so a process that
    has run out of rows runs the first batch again, uncounted, until the others are done.
    """
    from lowrank.data import collate
    from lowrank.fsdp import is_fsdp

    model.eval()
    loss_sum, tokens = 0.0, 0
    stride = batch_size * accelerator.num_processes
    rounds = math.ceil(len(rows) / stride) if is_fsdp(accelerator) else 0
    with torch.no_grad():
        starts = list(range(accelerator.process_index * batch_size, len(rows), stride))
        for start in starts + [None] * (rounds - len(starts)):
            batch = collate(rows[start or 0:(start or 0) + batch_size], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = float(causal_lm_loss_sum(model, batch))
            if start is not None:
                loss_sum += loss
                tokens += count_loss_tokens(batch)
    model.train()
    loss_sum, tokens = reduce_sum(accelerator, loss_sum, tokens)
    return loss_sum / max(1.0, tokens)


def resume(accelerator, checkpoint, model, optimizer, scheduler, *, config, keys: tuple[str, ...],
           stream: BatchStream, metrics_log, max_steps: int) -> int:
    """Restore ``checkpoint`` for ``--resume`` and return its step: weights, optimizer, schedule, RNG,
    the stream's position, and metrics.jsonl cut back to that step. Refused when any of ``keys``
    (the settings that shape the trajectory) differs from the interrupted run's."""
    from lowrank.checkpoints import load_checkpoint
    from lowrank.config import config_to_dict
    from lowrank.errors import UserError

    step, extra = load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
    recorded, current = extra.get("config", {}), config_to_dict(config)
    changed = [k for k in keys if recorded.get(k) != current.get(k)]
    if changed:
        raise UserError(f"--resume: {checkpoint} was written with different {', '.join(changed)}; "
                        "use the same settings or start without --resume")
    stream.consumed = extra["consumed"]
    if accelerator.is_main_process:
        metrics_log.truncate_after(step)
    log.info("resuming from %s (step %d of %d)", checkpoint, step, max_steps)
    return step


class StepRecords:
    """What a loop over a data set does with each optimizer step's record: metrics.jsonl (and the
    ``--report-to`` tracker), a checkpoint every ``config.save_every`` steps for ``--resume``, and
    ``on_step`` on the main process.

    Built after ``accelerator.prepare``; with ``resume_from`` (a checkpoint) it restores the run
    (:func:`resume`, refused when any of ``resume_keys`` changed) and ``start_step`` is that
    checkpoint's step, else 0.
    """

    def __init__(self, accelerator, out_dir, stage: str, config, resume_keys: tuple[str, ...], *, model, optimizer,
                 scheduler, stream: BatchStream, max_steps: int, resume_from, on_step):
        from lowrank.config import config_to_dict
        from lowrank.metrics import MetricsLog

        self.accelerator, self.out_dir, self.config, self.max_steps = accelerator, out_dir, config, max_steps
        self.model, self.optimizer, self.scheduler, self.stream, self.on_step = model, optimizer, scheduler, stream, on_step
        self.metrics_log = MetricsLog(out_dir, enabled=accelerator.is_main_process, report_to=config.report_to,
                                      stage=stage, config=config_to_dict(config))
        self.start_step = 0
        if resume_from is not None:
            self.start_step = resume(accelerator, resume_from, model, optimizer, scheduler, config=config,
                                     keys=resume_keys, stream=stream, metrics_log=self.metrics_log,
                                     max_steps=max_steps)

    def add(self, step: int, record: dict) -> None:
        """Log ``record`` (of optimizer step ``step``), checkpoint when due, and pass it to ``on_step``."""
        from lowrank.checkpoints import save_checkpoint
        from lowrank.config import config_to_dict

        self.metrics_log.log(record)
        if self.config.save_every > 0 and step % self.config.save_every == 0 and step < self.max_steps:
            save_checkpoint(self.accelerator, self.out_dir, step, self.model, self.optimizer, self.scheduler,
                            extra={"consumed": self.stream.consumed, "config": config_to_dict(self.config)})
        if self.on_step is not None and self.accelerator.is_main_process:
            self.on_step(record)
