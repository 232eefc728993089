"""A truncated, empty or garbled safetensors file is one line naming it, in every command that reads
weights (sft --model, merge, export, score, ppo, chat), never a SafetensorError traceback."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from lowrank.cli import main
from lowrank.errors import UserError
from lowrank.files import check_safetensors

from adapter_support import make_adapter
from cli_support import command_lines


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "good.safetensors"
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(path))
    return path


def test_a_complete_file_passes(good):
    check_safetensors(good)


def test_an_empty_file_is_named(good, tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    with pytest.raises(UserError, match=rf"{bad}: not a safetensors file: 0 bytes"):
        check_safetensors(bad)


def test_a_truncated_file_is_named(good, tmp_path):
    bad = tmp_path / "cut.safetensors"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"{bad}: truncated safetensors file: {len(data) // 2} bytes, its header "
                                        rf"describes {len(data)}"):
        check_safetensors(bad)


def test_a_header_length_past_the_end_is_named(tmp_path):
    bad = tmp_path / "long.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(UserError, match=rf"{bad}: corrupt safetensors file: its header length says 1000000000"):
        check_safetensors(bad)


def test_a_garbage_header_is_named(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe not json at" + b"\0" * 32)
    with pytest.raises(UserError, match=rf"{bad}: corrupt safetensors file: its header is not JSON"):
        check_safetensors(bad)


def test_a_tensor_without_offsets_is_named(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [2]}}'
    bad = tmp_path / "nooffsets.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(UserError, match="tensor 'w' has no valid data_offsets"):
        check_safetensors(bad)


# --- every command that reads weights -------------------------------------------------------------

def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture
def broken_base(tiny_spm, tmp_path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    shutil.copytree(tiny_spm, base)
    return base, _truncate(base / "model.safetensors")


@pytest.fixture(scope="module")
def adapter(tiny_spm, tmp_path_factory) -> Path:
    return make_adapter(tiny_spm, tmp_path_factory.mktemp("adapter") / "a", seed=1)


@pytest.fixture
def broken_adapter(adapter, tmp_path) -> tuple[Path, Path]:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy, _truncate(copy / "adapter_model.safetensors")


def _one_line(capsys, code: int, command: str, bad_file: Path) -> None:
    err = capsys.readouterr().err
    assert "SafetensorError" not in err, err
    lines = command_lines(err, command)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"lowrank {command}: error: {bad_file}: truncated safetensors file"), err


def test_sft_names_a_truncated_base(broken_base, tmp_path, capsys):
    base, bad = broken_base
    code = main(["sft", "--model", str(base), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                 "--quant", "none"])
    _one_line(capsys, code, "sft", bad)


def test_merge_names_a_truncated_base(broken_base, adapter, tmp_path, capsys):
    base, bad = broken_base
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")])
    _one_line(capsys, code, "merge", bad)
    assert not (tmp_path / "m").exists()


def test_merge_names_a_truncated_adapter(tiny_spm, broken_adapter, tmp_path, capsys):
    adapter_dir, bad = broken_adapter
    code = main(["merge", "--base", str(tiny_spm), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")])
    _one_line(capsys, code, "merge", bad)


def test_export_names_a_truncated_model(broken_base, tmp_path, capsys):
    base, bad = broken_base
    code = main(["export", str(base), "--type", "q8_0", "--out", str(tmp_path / "gguf"), "--no-verify"])
    _one_line(capsys, code, "export", bad)
    assert not list((tmp_path / "gguf").glob("*.gguf")) if (tmp_path / "gguf").exists() else True


@pytest.fixture(scope="module")
def trained(tiny_spm, tmp_path_factory) -> dict:
    """A one-step SFT adapter and a one-step reward adapter: real lowrank outputs to break."""
    import json

    from lowrank.reward import RewardConfig, train_reward
    from lowrank.sft import SFTConfig, default_data, train_sft

    root = tmp_path_factory.mktemp("trained")
    sft = train_sft(SFTConfig(model=str(tiny_spm), data=default_data(), output_dir=str(root / "sft"), max_steps=1,
                              quant="none", lora_r=4, batch_size=2, max_length=64, eval_every=0, save_every=0,
                              gradient_checkpointing=False))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                                              for i in range(8)))
    reward = train_reward(RewardConfig(model=str(tiny_spm), data=str(root / "pairs.jsonl"), output_dir=str(root / "rw"),
                                       max_steps=1, quant="none", lora_r=4, batch_size=2, eval_fraction=0.25,
                                       gradient_checkpointing=False))
    (root / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    return {"sft": sft, "reward": reward, "prompts": root / "prompts.jsonl"}


def _broken_copy(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    return copy, _truncate(copy / "adapter_model.safetensors")


def test_score_names_a_truncated_reward_adapter(tiny_spm, trained, tmp_path, capsys):
    reward, bad = _broken_copy(trained["reward"], tmp_path)
    code = main(["score", "--reward", str(reward), "--model", str(tiny_spm), "--prompt", "hi", "--response", "hello"])
    _one_line(capsys, code, "score", bad)


def test_ppo_names_a_truncated_sft_adapter(tiny_spm, trained, tmp_path, capsys):
    sft, bad = _broken_copy(trained["sft"], tmp_path)
    code = main(["ppo", "--model", str(tiny_spm), "--sft-adapter", str(sft), "--reward-adapter", str(trained["reward"]),
                 "--prompts", str(trained["prompts"]), "--output-dir", str(tmp_path / "ppo"), "--steps", "1",
                 "--quant", "none"])
    _one_line(capsys, code, "ppo", bad)
    assert not (tmp_path / "ppo" / "lowrank.json").exists()


def test_chat_names_a_truncated_adapter(tiny_spm, broken_adapter, capsys):
    adapter_dir, bad = broken_adapter
    code = main(["chat", str(adapter_dir), "--base", str(tiny_spm)])
    _one_line(capsys, code, "chat", bad)


# --- tokenizers -----------------------------------------------------------------------------------

@pytest.fixture
def model_copy(tiny_spm, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_spm, copy)
    return copy


def _tokenizer_error(capsys, code: int, command: str) -> str:
    lines = command_lines(capsys.readouterr().err, command)
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_export_names_a_truncated_sentencepiece_model(model_copy, tmp_path, capsys):
    spm = model_copy / "tokenizer.model"
    spm.write_bytes(spm.read_bytes()[:100])
    code = main(["export", str(model_copy), "--type", "f16", "--out", str(tmp_path / "gguf"), "--no-verify"])
    line = _tokenizer_error(capsys, code, "export")
    assert line.startswith(f"lowrank export: error: {spm}: not a readable SentencePiece model")
    assert not list((tmp_path / "gguf").glob("*.gguf")) if (tmp_path / "gguf").exists() else True


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_sft_names_a_garbled_tokenizer_file(model_copy, tmp_path, capsys, name):
    (model_copy / name).write_text('{"garbled')
    code = main(["sft", "--model", str(model_copy), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                 "--quant", "none"])
    line = _tokenizer_error(capsys, code, "sft")
    assert line == f"lowrank sft: error: {model_copy / name}: not valid JSON (line 1)"
    assert not (tmp_path / "out").exists()
