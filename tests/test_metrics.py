"""--report-to: a stage's numbers go to TensorBoard (and W&B or MLflow) as well as metrics.jsonl, and a
tracker that is unknown or not installed is refused before any model loads."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lowrank.cli import main
from lowrank.errors import UserError
from lowrank.metrics import MetricsLog, check_report_to


def _scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_sft_with_tensorboard_writes_the_scalars_of_metrics_jsonl(tiny_spm, tmp_path):
    out = tmp_path / "out"
    assert main(["sft", "--model", str(tiny_spm), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
                 "--max-length", "64", "--lora-r", "4", "--quant", "none", "--no-gradient-checkpointing",
                 "--eval-every", "2", "--report-to", "tensorboard"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "tensorboard" / "sft")
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
    assert scalars["eval_loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6))
                                    for r in records if "eval_loss" in r]
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3]


def test_without_report_to_no_tracker_files_are_written(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 2.0})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_an_unknown_tracker_is_refused_before_the_model_loads(tmp_path, capsys):
    code = main(["sft", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"),
                 "--report-to", "tensorbored"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "lowrank sft: error: --report-to: unknown tracker 'tensorbored'; choose one of none, tensorboard, wandb, mlflow"]
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_is_not_installed_is_refused_with_how_to_install_it(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["dpo", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out"),
                 "--report-to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "lowrank dpo: error: --report-to wandb: the wandb package is not installed; pip install wandb"]


def test_a_recipe_field_report_to_is_checked_the_same_way():
    from lowrank.ppo import PPOConfig

    with pytest.raises(UserError, match="unknown tracker 'csv'"):
        PPOConfig(report_to="csv")
    assert check_report_to("none") == "none"
