"""Checkpoints are read without pickle: a planted payload is refused and never runs; a torn file is
one line naming it. Checkpoints come from shared or downloaded run dirs, so they are untrusted input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowrank.cli import main

from cli_support import command_lines


class _Interrupt(Exception):
    pass


def _args(tiny_spm, data, out) -> list[str]:
    return ["sft", "--model", str(tiny_spm), "--data", str(data), "--quant", "none", "--max-steps", "4",
            "--save-every", "2", "--batch-size", "2", "--max-length", "128", "--lora-r", "4", "--eval-every", "0",
            "--no-gradient-checkpointing", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def interrupted(tiny_spm, tmp_path_factory):
    """An sft run stopped at step 3, with its step-2 checkpoint."""
    from lowrank.sft import SFTConfig, default_data, train_sft

    root = tmp_path_factory.mktemp("checkpoints")
    data = root / "data.jsonl"
    data.write_text("".join(Path(default_data()).read_text().splitlines(keepends=True)[:40]))

    def stop_at_3(record):
        if record["step"] == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_sft(SFTConfig(model=str(tiny_spm), data=str(data), quant="none", max_steps=4, save_every=2,
                            batch_size=2, max_length=128, lora_r=4, eval_every=0, gradient_checkpointing=False,
                            output_dir=str(root / "run")), on_step=stop_at_3)
    assert (root / "run" / "checkpoints" / "step-2" / "state.pt").exists()
    return {"run": root / "run", "data": data}


class _Payload:
    """Unpickling this creates ``marker``: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _resume(tiny_spm, interrupted, tmp_path, capsys, plant) -> tuple[int, list[str], Path]:
    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    target = plant(run / "checkpoints" / "step-2")
    capsys.readouterr()
    code = main([*_args(tiny_spm, interrupted["data"], run), "--resume"])
    err = capsys.readouterr().err
    assert not (run / "lowrank.json").exists()  # nothing that looks finished
    # the model loads (one INFO line) before its checkpoint can be applied; the error is one line, the last
    lines = command_lines(err, "sft")
    assert lines[-1].startswith("lowrank sft: error: "), err
    return code, lines, target


def test_checkpoint_files_load_without_pickle(interrupted):
    step = interrupted["run"] / "checkpoints" / "step-2"
    state = torch.load(step / "state.pt", weights_only=True)
    rng = torch.load(step / "rng-0.pt", weights_only=True)
    assert state["step"] == 2 and state["trainable"]
    assert set(rng) >= {"python", "numpy", "torch"}


def test_pickle_payload_in_the_rng_file_is_refused_and_never_runs(tiny_spm, interrupted, tmp_path, capsys):
    marker = tmp_path / "pwned"

    def plant(step: Path) -> Path:
        torch.save({"python": _Payload(marker)}, step / "rng-0.pt")
        return step / "rng-0.pt"

    code, err, target = _resume(tiny_spm, interrupted, tmp_path, capsys, plant)
    assert not marker.exists()
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and "refused" in err[0]


def test_pickle_payload_in_the_state_file_is_refused_and_never_runs(tiny_spm, interrupted, tmp_path, capsys):
    marker = tmp_path / "pwned"

    def plant(step: Path) -> Path:
        torch.save({"step": 2, "extra": _Payload(marker)}, step / "state.pt")
        return step / "state.pt"

    code, err, target = _resume(tiny_spm, interrupted, tmp_path, capsys, plant)
    assert not marker.exists()
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and "refused" in err[0]


def test_truncated_state_file_is_a_one_line_error(tiny_spm, interrupted, tmp_path, capsys):
    def plant(step: Path) -> Path:
        data = (step / "state.pt").read_bytes()
        (step / "state.pt").write_bytes(data[: len(data) // 2])
        return step / "state.pt"

    code, err, target = _resume(tiny_spm, interrupted, tmp_path, capsys, plant)
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and "unreadable checkpoint file" in err[0]


def test_state_file_of_another_program_is_a_one_line_error(tiny_spm, interrupted, tmp_path, capsys):
    def plant(step: Path) -> Path:
        torch.save({"weights": torch.zeros(2)}, step / "state.pt")
        return step / "state.pt"

    code, err, target = _resume(tiny_spm, interrupted, tmp_path, capsys, plant)
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and "not a lowrank checkpoint" in err[0]


def test_rng_file_of_another_program_is_a_one_line_error(tiny_spm, interrupted, tmp_path, capsys):
    def plant(step: Path) -> Path:
        torch.save({"python": 1, "numpy": 2, "torch": 3}, step / "rng-0.pt")
        return step / "rng-0.pt"

    code, err, target = _resume(tiny_spm, interrupted, tmp_path, capsys, plant)
    assert code == 2 and len(err) == 1, err
    assert str(target) in err[0] and "not an RNG state" in err[0]


# --- interrupted runs are kept -----------------------------------------------------------------

def _errors(capsys) -> list[str]:
    """The command's own lines on stderr (log lines and progress bars left out); the last must be one of them."""
    return command_lines(capsys.readouterr().err, "sft")


def test_rerun_without_resume_keeps_the_checkpoints_and_names_both_flags(tiny_spm, interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    capsys.readouterr()
    code = main(_args(tiny_spm, interrupted["data"], run))
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "holds an interrupted run (checkpoint of step 2)" in errors[0]
    assert "--resume" in errors[0] and "--overwrite" in errors[0]
    assert (run / "checkpoints" / "step-2" / "state.pt").exists()  # nothing deleted


def test_overwrite_discards_the_interrupted_run(tiny_spm, interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    assert main([*_args(tiny_spm, interrupted["data"], run), "--save-every", "0", "--overwrite"]) == 0
    assert (run / "lowrank.json").exists() and not (run / "checkpoints").exists()


def test_resume_of_a_finished_run_says_it_is_finished(tiny_spm, interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    assert main([*_args(tiny_spm, interrupted["data"], run), "--resume"]) == 0
    capsys.readouterr()
    code = main([*_args(tiny_spm, interrupted["data"], run), "--resume"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"the run in {run} is finished" in errors[0] and "no checkpoint" not in errors[0]


def test_ctrl_c_says_how_to_resume(tiny_spm, interrupted, tmp_path, capsys, monkeypatch):
    from lowrank import train

    real_step, calls = train.optimizer_step, []

    def interrupt_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", interrupt_on_third_step)
    run = tmp_path / "run"
    capsys.readouterr()
    code = main(_args(tiny_spm, interrupted["data"], run))
    errors = _errors(capsys)
    assert code == 130 and len(errors) == 1, errors
    assert errors[0] == f"lowrank sft: interrupted; add --resume to the same command to continue from step 2 ({run})"


# --- metrics.jsonl after a kill --------------------------------------------------------------------

def test_resume_drops_a_torn_last_metrics_line_and_says_so(tiny_spm, interrupted, tmp_path, capsys, caplog):
    import json

    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the kill came mid-write
    assert main([*_args(tiny_spm, interrupted["data"], run), "--resume"]) == 0
    assert "dropped its torn last line" in caplog.text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # 0: the evaluation before training


def test_a_corrupt_metrics_line_before_the_last_is_a_one_line_error(tiny_spm, interrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(interrupted["run"], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["garbage", *lines]) + "\n")
    capsys.readouterr()
    code = main([*_args(tiny_spm, interrupted["data"], run), "--resume"])
    errors = _errors(capsys)
    assert code == 2 and errors == [f"lowrank sft: error: {run / 'metrics.jsonl'}: line 1 is not a JSON object; "
                                    "remove the file or run with --overwrite"]
