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
