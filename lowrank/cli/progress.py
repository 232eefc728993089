"""The progress bar every training command shows: made on the first step, closed however the run ends."""

from __future__ import annotations


class StepBar:
    """A tqdm bar sized by the first event (``total_key``), resumed runs starting where they left off.

    Call it with each event and the values to show; values stay shown until replaced, so a
    held-out figure logged every few steps does not flicker away. Use it as a context manager
    so the bar is closed when training raises.
    """

    def __init__(self, desc: str, unit: str = "step", total_key: str = "max_steps"):
        self.desc, self.unit, self.total_key = desc, unit, total_key
        self.bar = None
        self.shown: dict[str, str] = {}

    def __call__(self, event: dict, **values: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event[self.total_key], initial=max(event.get("step", 1) - 1, 0),
                            desc=self.desc, unit=self.unit)
        if values:
            self.shown.update(values)
            self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        from tqdm import tqdm

        (self.bar or tqdm).write(text)

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def reporting_process() -> bool:
    """Whether this process prints the run's summary: under `accelerate launch` only the first (RANK 0)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def train_with_bar(name: str, train, show, sample=None):
    """``train(on_step)`` under a StepBar named ``name``; ``show(record)`` gives the values the bar shows
    for a step, and ``sample(record)``, when given, a line to print above the bar (or None)."""
    bar = StepBar(name)

    def on_step(record: dict) -> None:
        bar(record, **show(record))
        line = sample(record) if sample is not None else None
        if line:
            bar.write(line)

    with bar:
        return train(on_step)


def sample_line(record: dict, value: str) -> str | None:
    """The step's first logged sample and its ``value`` (score, reward) as one line, or None when none was logged."""
    shown = record.get("samples")
    return f"step {record['step']}: {shown[0]['response']!r} ({value} {shown[0][value]:.3f})" if shown else None


def train_with_loss_bar(name: str, train):
    """``train(on_step)`` (SFT, pretraining) under a StepBar showing loss, tokens/s and held-out loss."""
    def show(record: dict) -> dict:
        held_out = {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}
        return {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_second']:.0f}", **held_out}

    return train_with_bar(name, train, show)


def print_held_out_loss(out_dir) -> None:
    """"held-out loss A -> B" from a finished run's lowrank.json, when it measured both."""
    from lowrank import runrecord

    metrics = runrecord.read(out_dir).metrics
    if metrics.get("initial_eval_loss") is not None and metrics.get("eval_loss") is not None:
        print(f"held-out loss {metrics['initial_eval_loss']:.4f} -> {metrics['eval_loss']:.4f}")
