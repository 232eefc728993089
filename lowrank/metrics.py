"""What a training stage logs: metrics.jsonl and a PNG of its curves in the output dir, always; and,
with ``--report-to``, the same numbers in TensorBoard, Weights & Biases or MLflow through
accelerate's tracker classes.

No tracker reaches the network unless asked to: TensorBoard writes event files under
``OUTPUT_DIR/tensorboard/STAGE``; MLflow a local store under ``OUTPUT_DIR/mlruns`` unless
MLFLOW_TRACKING_URI names a server; Weights & Biases runs in offline mode (files under
``OUTPUT_DIR/wandb``, uploaded later with ``wandb sync``) unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from lowrank.errors import UserError

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
_INSTALL = {"tensorboard": "pip install 'lowrank-llm[tensorboard]'", "wandb": "pip install wandb",
            "mlflow": "pip install mlflow"}


def check_report_to(value: str) -> str:
    """``value`` if it names a tracker whose package is installed; else a UserError (before any model loads)."""
    if value not in TRACKERS:
        raise UserError(f"--report-to: unknown tracker '{value}'; choose one of {', '.join(TRACKERS)}")
    if value != "none" and importlib.util.find_spec(value) is None:
        raise UserError(f"--report-to {value}: the {value} package is not installed; {_INSTALL[value]}")
    return value


def _hyperparameters(config: dict) -> dict:
    """The config's scalar values (what every tracker accepts as hyperparameters); lists as text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def open_tracker(report_to: str, out_dir: Path, stage: str, config: dict):
    """A started accelerate tracker for ``report_to`` with the config stored, or None for "none"."""
    if check_report_to(report_to) == "none":
        return None
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if report_to == "tensorboard":
        tracker = TensorBoardTracker(stage, out_dir / "tensorboard")
    elif report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        tracker = WandBTracker(f"lowrank-{stage}", dir=str(out_dir), name=out_dir.name)
    else:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(experiment_name=f"lowrank-{stage}", run_name=out_dir.name)
    tracker.start()
    tracker.store_init_configuration(_hyperparameters(config))
    log.info("logging metrics to %s as well", report_to)
    return tracker


class MetricsLog:
    """metrics.jsonl in the output dir (one JSON object per line, appended and flushed), its plot, and
    the tracker ``report_to`` names, which gets every number of every record too.

    ``config`` (the stage's config) gives the tracker's run name and hyperparameters.
    """

    def __init__(self, out_dir, *, enabled: bool = True, report_to: str = "none", stage: str = "run",
                 config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict] = []
        self.tracker = open_tracker(report_to, Path(out_dir), stage, config or {}) if enabled else None
        if self.path.exists():  # resuming: keep what the interrupted run logged
            lines = self.path.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    if number == len(lines):  # a kill mid-write tears the last line only
                        log.warning("%s: dropped its torn last line %d (the run was stopped while writing it)",
                                    self.path, number)
                        continue
                    raise UserError(f"{self.path}: line {number} is not a JSON object; remove the file or "
                                    "run with --overwrite") from None
                self.records.append(record)

    def truncate_after(self, step: int) -> None:
        """Forget records logged after ``step`` (the checkpoint a resumed run restarts from); the file is
        rewritten under a temporary name and renamed, so a kill meanwhile leaves the old one whole."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        if self.enabled:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in self.records))
            os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self.tracker is not None:
            numbers = {k: float(v) for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.tracker.log(numbers, step=int(record.get("step", len(self.records))))

    def close(self) -> None:
        """Flush and close the tracker (metrics.jsonl is flushed at every record)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

    def plot(self, path, keys: list[str]) -> Path | None:
        """One panel per key present in the records, against the step; written as a PNG by rename.

        A stage plots once, at its end, so this closes the tracker too.
        """
        self.close()
        if not self.enabled:
            return None
        keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in self.records)]
        if not keys:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.5 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        return path
