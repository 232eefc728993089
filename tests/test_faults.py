"""Faults that lose nothing: a full disk, a read-only dir and kill -9 at several points of sft, export
and merge (ppo: tests/test_ppo.py). Each case ends in one of two outcomes: a one-line error, or a state that resumes (or reruns)
to the same result as an uninterrupted run. Two writers on one dir: tests/test_locks.py."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank import checkpoints
from lowrank.cli import main

from adapter_support import make_adapter
from cli_support import KILL_IN_CHECKPOINT, command_lines, run_killed

SFT_STEPS = 4


def _sft_args(tiny_spm, data, out) -> list[str]:
    return ["sft", "--model", str(tiny_spm), "--data", str(data), "--quant", "none", "--max-steps", str(SFT_STEPS),
            "--save-every", "1", "--batch-size", "2", "--max-length", "128", "--lora-r", "4", "--eval-every", "0",
            "--no-gradient-checkpointing", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def straight(tiny_spm, tmp_path_factory):
    """The uninterrupted run every faulty one must match."""
    from lowrank.sft import default_data

    root = tmp_path_factory.mktemp("faults")
    data = root / "data.jsonl"
    data.write_text("".join(Path(default_data()).read_text().splitlines(keepends=True)[:40]))
    assert main(_sft_args(tiny_spm, data, root / "straight")) == 0
    return {"data": data, "adapter": load_file(str(root / "straight" / "adapter_model.safetensors"))}


def _same_adapter(out: Path, straight: dict) -> None:
    mine = load_file(str(out / "adapter_model.safetensors"))
    assert mine.keys() == straight["adapter"].keys()
    assert max((mine[k] - straight["adapter"][k]).abs().max().item() for k in mine) < 1e-6


def _one_error_line(capsys, command: str = "sft") -> str:
    err = capsys.readouterr().err
    lines = command_lines(err, command)
    assert len(lines) == 1 and lines[0].startswith(f"lowrank {command}: error: "), err
    return lines[0]


# --- a full disk --------------------------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tiny_spm, straight, tmp_path, capsys,
                                                                      monkeypatch):
    from lowrank import train

    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def full_disk_at_the_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(Path(path).name)
        if saves.count("state.pt") == 2 and Path(path).name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", full_disk_at_the_second_checkpoint)
    code = main(_sft_args(tiny_spm, straight["data"], out))  # checkpoints after steps 1, 2 and 3
    line = _one_error_line(capsys)
    assert code == 2 and line.endswith("state.pt: the disk is full; free some space and run again (an interrupted "
                                       "training run keeps its last complete checkpoint: add --resume)")
    assert checkpoints.list_checkpoints(out) == [1]
    assert not list((out / "checkpoints").glob(".step-*"))  # the half-written one is gone
    monkeypatch.undo()
    assert main([*_sft_args(tiny_spm, straight["data"], out), "--resume"]) == 0  # from step 1
    _same_adapter(out, straight)


def test_too_little_free_space_for_a_checkpoint_is_found_before_writing(tiny_spm, straight, tmp_path, capsys,
                                                                         monkeypatch):
    import collections

    from lowrank import train

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code = main(_sft_args(tiny_spm, straight["data"], tmp_path / "run"))
    line = _one_error_line(capsys)
    assert code == 2 and "not enough disk space for the checkpoint: it needs" in line and "MiB are free" in line
    assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))


def test_disk_full_at_the_final_write_leaves_a_resumable_run(tiny_spm, straight, tmp_path, capsys, monkeypatch):
    from lowrank import train

    out = tmp_path / "run"

    def full_disk(src, dest, meta):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "adapter_model.safetensors"))

    monkeypatch.setattr(train, "publish", full_disk)
    code = main(_sft_args(tiny_spm, straight["data"], out))
    assert code == 2 and "the disk is full" in _one_error_line(capsys)
    assert not (out / "lowrank.json").exists() and not list(out.glob(".adapter-*"))
    monkeypatch.undo()
    assert main([*_sft_args(tiny_spm, straight["data"], out), "--resume"]) == 0
    _same_adapter(out, straight)


# --- read-only ----------------------------------------------------------------------------------

def test_a_read_only_output_dir_is_one_line(tiny_spm, straight, tmp_path, capsys, monkeypatch):
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path / "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, *args, **kwargs)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(Path, "write_text", read_only)
    code = main(_sft_args(tiny_spm, straight["data"], tmp_path / "run"))
    assert code == 2 and _one_error_line(capsys).endswith(f"{tmp_path / 'run'}: cannot write the output dir "
                                                         "(Read-only file system)")


def test_export_into_a_read_only_dir_is_one_line(tiny_bpe, tmp_path, capsys, monkeypatch):
    from lowrank.export import gguf

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(gguf.os, "replace", read_only)
    code = main(["export", str(tiny_bpe), "--type", "q8_0", "--out", str(tmp_path / "g"), "--no-verify", "--name", "m"])
    line = _one_error_line(capsys, "export")
    assert code == 2 and line == (f"lowrank export: error: {tmp_path / 'g' / 'm-q8_0.gguf'}: the file system is "
                                  "read-only; choose another output dir")
    assert not list((tmp_path / "g").glob(".*tmp*"))


# --- kill -9 ------------------------------------------------------------------------------------

def test_sft_killed_in_the_middle_of_a_checkpoint_resumes_to_the_same_adapter(tiny_spm, straight, tmp_path):
    out = tmp_path / "run"
    run_killed(KILL_IN_CHECKPOINT.format(n=2), _sft_args(tiny_spm, straight["data"], out))
    from lowrank import train

    assert checkpoints.list_checkpoints(out) == [1]  # the torn step-2 checkpoint does not count
    assert main([*_sft_args(tiny_spm, straight["data"], out), "--resume"]) == 0
    _same_adapter(out, straight)


def test_sft_killed_while_publishing_the_adapter_resumes_to_the_same_adapter(tiny_spm, straight, tmp_path):
    out = tmp_path / "run"
    patch = ("from lowrank import train\nreal = train.os.replace\n"
             "def replace(src, dst):\n    real(src, dst)\n    if Path(str(dst)).name == 'adapter_model.safetensors':\n"
             "        die()\ntrain.os.replace = replace\n")
    run_killed(patch, _sft_args(tiny_spm, straight["data"], out))
    assert not (out / "lowrank.json").exists()  # never looks finished
    assert main([*_sft_args(tiny_spm, straight["data"], out), "--resume"]) == 0
    _same_adapter(out, straight)


def test_export_killed_mid_write_leaves_files_the_next_export_removes(tiny_bpe, tmp_path):
    out = tmp_path / "g"
    patch = ("from lowrank.export import gguf\nreal = gguf.os.replace\n"
             "def replace(src, dst):\n    die()\ngguf.os.replace = replace\n")
    argv = ["export", str(tiny_bpe), "--type", "q8_0,q4_k_m", "--out", str(out), "--no-verify", "--name", "m"]
    run_killed(patch, argv)
    leftovers = list(out.glob(".*"))
    assert leftovers and not list(out.glob("*.gguf"))  # only temp names: nothing looks complete
    assert main(argv) == 0
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in out.glob("*.gguf")) == ["m-q4_k_m.gguf", "m-q8_0.gguf"]


def test_merge_killed_mid_write_leaves_a_temp_dir_the_next_merge_removes(tiny_spm, tmp_path):
    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    patch = ("from lowrank.quantize import merge\n"
             "def copy(*a, **k):\n    die()\nmerge._copy_side_files = copy\n")
    argv = ["merge", "--base", str(tiny_spm), "--adapter", str(adapter), "--out", str(out)]
    run_killed(patch, argv)
    leftovers = list(tmp_path.glob(".merged.tmp-*"))
    assert leftovers and not out.exists()
    assert main(argv) == 0
    assert not any(p.exists() for p in leftovers)
    assert json.loads((out / "lowrank.json").read_text())["stage"] == "merge"
