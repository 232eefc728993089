"""`lowrank sft`: it lowers held-out loss, writes a loadable PEFT adapter with lowrank.json, resumes
exactly, normalises the loss over the whole step, runs under `accelerate launch`, and refuses bad input
with one line."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from lowrank import checkpoints

from cli_support import assert_trained_as_one, launch_two_processes, recorded, run_one_process


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lowrank.cli import main

    code = main(["sft", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`lowrank sft --model tiny` on the shipped alpaca sample, from a YAML recipe plus flags (flags win)."""
    from lowrank.cli import main
    from lowrank.sft import default_data

    work = tmp_path_factory.mktemp("sft")
    recipe = work / "recipe.yaml"
    recipe.write_text("max_steps: 3\nlora_r: 4\nlearning_rate: 0.01\nbatch_size: 4\nmax_length: 128\n"
                      "eval_every: 4\nquant: none\n")
    out = work / "out"
    code = main(["sft", "--config", str(recipe), "--model", "tiny", "--output-dir", str(out),
                 "--max-steps", "8", "--lora-r", "8", "--data", default_data()])
    assert code == 0
    return out


def test_sft_lowers_held_out_loss_on_the_sample_data(trained):
    meta = json.loads((trained / "lowrank.json").read_text())
    metrics = meta["metrics"]
    # 8 steps take the held-out loss from ln(1000) = 6.91 (a random model) to about 6.6.
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.2, metrics
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(0, 9))
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 4, 8]  # at the start, every --eval-every steps, at the end
    assert evals[0][1] > evals[1][1] > evals[2][1]
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 and r["loss"] > 0 for r in records[1:])


def test_flags_override_the_yaml_recipe(trained):
    config = json.loads((trained / "lowrank.json").read_text())["config"]
    assert (config["max_steps"], config["lora_r"], config["learning_rate"], config["quant"]) == (8, 8, 0.01, "none")


def test_output_is_a_standard_peft_adapter_with_lowrank_json(trained):
    from peft import PeftModel

    from lowrank.models import load_base_model, model_digest
    from lowrank.sft import default_data

    meta = json.loads((trained / "lowrank.json").read_text())
    assert meta["stage"] == "sft" and meta["seed"] == 0
    assert meta["base"]["id"] == "tiny" and meta["base"]["digest"] == model_digest("tiny")
    assert meta["chat_template"]["name"] == "vicuna" and "ASSISTANT" in meta["chat_template"]["jinja"]
    assert meta["data"]["digest"] == hashlib.sha256(Path(default_data()).read_bytes()).hexdigest()
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (trained / "checkpoints").exists() and not list(trained.glob(".*tmp*"))
    model = PeftModel.from_pretrained(load_base_model("tiny", "none", gradient_checkpointing=False), str(trained))
    assert model.peft_config["default"].r == 8
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained weights, not the zero init


def test_loss_is_normalised_by_the_tokens_of_the_whole_step(tiny_spm):
    """Two micro-batches with 1 and 5 loss tokens: each token must weigh 1/6, not 1/2 and 1/10."""
    from accelerate import Accelerator
    from peft import get_peft_model

    from lowrank import lm_loss, train
    from lowrank.models import load_base_model, lora_config

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(tiny_spm), "none", gradient_checkpointing=False),
                           lora_config(r=4, dropout=0.0))
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    short = {"input_ids": ids, "labels": torch.tensor([[-100] * 7 + ids[0, 7:].tolist()])}  # 1 loss token
    long = {"input_ids": ids, "labels": torch.tensor([[-100] * 3 + ids[0, 3:].tolist()])}  # 5 loss tokens
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # make lora_B non-zero so that every LoRA weight gets a gradient
        for p in params:
            p.add_(0.01)
    loss_sum, tokens = train.accumulate_gradients(Accelerator(), model, [short, long])
    accumulated = [p.grad.clone() for p in params]
    assert tokens == 6
    model.zero_grad()
    (lm_loss.causal_lm_loss_sum(model, short) + lm_loss.causal_lm_loss_sum(model, long)).div(6).backward()
    for got, want in zip(accumulated, [p.grad for p in params]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    (lm_loss.causal_lm_loss_sum(model, short) / 1 + lm_loss.causal_lm_loss_sum(model, long) / 5).div(2).backward()
    assert max((a - p.grad).abs().max().item() for a, p in zip(accumulated, params)) > 1e-4  # mean of means differs


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_sft_runs_end_to_end_on_the_cpu(tiny_spm, tmp_path, quant):
    """`lowrank sft`'s default path on CUDA (QLoRA: nf4, gradient checkpointing) and int8, two steps on the CPU."""
    from safetensors.torch import load_file

    from lowrank.sft import SFTConfig, default_data, train_sft

    out = train_sft(SFTConfig(model=str(tiny_spm), data=default_data(), output_dir=str(tmp_path / quant), quant=quant,
                              max_steps=2, batch_size=2, max_length=96, eval_fraction=0.02, learning_rate=1e-2))
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["config"]["quant"] == quant and meta["config"]["gradient_checkpointing"]
    assert all(math.isfinite(meta["metrics"][k]) for k in ("loss", "eval_loss", "initial_eval_loss"))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [t for n, t in tensors.items() if "lora_B" in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero: every LoRA trained


class _Interrupt(Exception):
    pass


def test_resume_continues_exactly(tiny_spm, tmp_path):
    """An interrupted run resumed from its step-2 checkpoint ends with the uninterrupted run's adapter.

    Both run in fp32 on the CPU with the same seeds and restored RNG (LoRA dropout is on), so they
    should agree to rounding; 1e-6 absolute is far below one step's update (~1e-4). Gradient
    accumulation and an eval between checkpoint and interruption are part of what is restored.
    """
    from safetensors.torch import load_file

    from lowrank.sft import SFTConfig, default_data, train_sft

    data = tmp_path / "data.jsonl"  # 60 examples: enough for 4 steps of 2 x 2 rows, quick to tokenize
    data.write_text("".join(Path(default_data()).read_text().splitlines(keepends=True)[:60]))
    common = dict(model=str(tiny_spm), data=str(data), quant="none", max_steps=4, save_every=2,
                  batch_size=2, gradient_accumulation_steps=2, max_length=128, lora_r=4, eval_every=1,
                  learning_rate=5e-3, warmup_steps=1)
    whole = train_sft(SFTConfig(output_dir=str(tmp_path / "whole"), **common))

    def stop_at_3(record):
        if record["step"] == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_sft(SFTConfig(output_dir=str(tmp_path / "cut"), **common), on_step=stop_at_3)
    cut = tmp_path / "cut"
    assert not (cut / "lowrank.json").exists() and not (cut / "adapter_model.safetensors").exists()
    assert (cut / "checkpoints" / "step-2" / "state.pt").exists()
    train_sft(SFTConfig(output_dir=str(cut), resume=True, **common))

    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    first = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in second] == [r["step"] for r in first] == list(range(5))
    for key in ("loss", "eval_loss"):
        assert [r[key] for r in second[1:]] == pytest.approx([r[key] for r in first[1:]], abs=1e-6)


def test_two_processes_train_as_one_process_on_both_their_batches(tiny_spm, tmp_path, monkeypatch):
    """The same command under `accelerate launch` with two CPU processes (DDP over gloo) trains as one process
    would on the union of their micro-batches: every step's gradients are averaged, so both processes hold
    the same adapter, and it is the adapter of one process with twice the accumulation.

    `--multi_gpu` is accelerate's torchrun launcher; `--cpu` would start a single process. lowrank
    sees WORLD_SIZE=2 and no CUDA and asks accelerate for DDP on the CPU. Process r of 2 takes
    micro-batches 2m + r of the seeded stream (lowrank.loop.BatchStream), so one process with
    accumulation 2 takes micro-batches 2m and 2m + 1, the same rows; both divide the loss by the
    loss tokens of the whole step. Sums in another order round differently: fp32, tolerance 1e-4.
    """
    from lowrank.sft import default_data

    flags = ["--model", str(tiny_spm), "--data", default_data(), "--quant", "none", "--max-steps", "2",
             "--batch-size", "2", "--max-length", "96", "--learning-rate", "0.01", "--lora-r", "4",
             "--lora-dropout", "0", "--eval-every", "0", "--eval-fraction", "0.05"]
    out = tmp_path / "ddp"
    launch_two_processes(tmp_path, ["sft", *flags, "--output-dir", str(out)], record=True)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["initial_eval_loss"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(3))  # one process logs, once per step
    assert (out / "adapter_model.safetensors").exists()

    one = run_one_process(monkeypatch, tmp_path, ["sft", *flags, "--output-dir", str(tmp_path / "one"),
                                                  "--gradient-accumulation-steps", "2"])
    assert_trained_as_one(recorded(tmp_path), one)


# --- bad input: one line on stderr, exit 2, no output dir that looks finished ---------------------

def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowrank sft: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_cli_refuses_an_output_dir_with_a_finished_run(trained, capsys):
    before = (trained / "lowrank.json").read_text()
    code, _, err = _cli(["--model", "tiny", "--output-dir", str(trained), "--max-steps", "1"], capsys)
    _assert_one_line_error(code, err, "already holds a finished run (lowrank.json); pass --overwrite")
    assert (trained / "lowrank.json").read_text() == before


def test_cli_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' own warnings about this config, before the command runs
    code, _, err = _cli(["--model", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, "unsupported architecture 'gpt2'; supported: llama, mistral, qwen2")
    assert not (tmp_path / "out").exists()


def test_cli_multimodal_gemma3_is_refused_naming_the_text_only_form(tmp_path, capsys):
    # Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration (model_type gemma3: a vision tower beside the text).
    (tmp_path / "gemma3").mkdir()
    (tmp_path / "gemma3" / "config.json").write_text(json.dumps(
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}}))
    code, _, err = _cli(["--model", str(tmp_path / "gemma3"), "--output-dir", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, "model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); "
                                      "lowrank supports text-only Gemma 3, Gemma3ForCausalLM (model_type gemma3_text)")
    assert not (tmp_path / "out").exists()


def test_cli_missing_model_dir(tmp_path, capsys):
    code, _, err = _cli(["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, f"{tmp_path / 'no-model'}: model dir not found")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_template(tiny_spm, tmp_path, capsys):
    code, _, err = _cli(["--model", str(tiny_spm), "--template", "alpacca", "--output-dir", str(tmp_path / "out")],
                        capsys)
    _assert_one_line_error(code, err, "alpacca")
    assert "vicuna" in err  # the message lists the known templates
    assert not (tmp_path / "out").exists()


def test_cli_missing_data_file(tiny_spm, tmp_path, capsys):
    code, _, err = _cli(["--model", str(tiny_spm), "--data", str(tmp_path / "none.jsonl"),
                         "--output-dir", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, "none.jsonl")
    assert not (tmp_path / "out").exists()


def test_cli_resume_without_checkpoint(tiny_spm, tmp_path, capsys):
    code, _, err = _cli(["--model", str(tiny_spm), "--output-dir", str(tmp_path / "out"), "--resume"], capsys)
    _assert_one_line_error(code, err, "--resume: no checkpoint in")


def test_cli_requires_an_output_dir(capsys):
    code, _, err = _cli(["--model", "tiny"], capsys)
    _assert_one_line_error(code, err, "no output dir: give --output-dir DIR")


def test_overwrite_replaces_a_finished_run(tiny_spm, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_spm), "--output-dir", str(out), "--quant", "none", "--max-steps", "1",
            "--max-length", "96", "--lora-r", "2", "--eval-fraction", "0"]
    assert _cli(args, capsys)[0] == 0
    (out / "stale.txt").write_text("from the old run")
    code, stdout, err = _cli([*args, "--lora-r", "3", "--overwrite"], capsys)
    assert code == 0 and "adapter written to" in stdout
    assert "loss=" in err and "tok/s=" in err  # the progress bar
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert not (out / "stale.txt").exists()


def test_cli_unknown_quant(tmp_path, capsys):
    code, _, err = _cli(["--model", "tiny", "--quant", "fp3", "--output-dir", str(tmp_path / "out")], capsys)
    _assert_one_line_error(code, err, "--quant: unknown value 'fp3'; choose auto or one of nf4, int8, none")


def test_default_quant_is_auto_nf4_on_cuda_and_unquantized_on_a_cpu(tiny_spm, tmp_path, capsys):
    """The default trains on the base this machine runs fastest, and lowrank.json records which."""
    from lowrank.models import resolve_quant
    from lowrank.sft import SFTConfig

    assert SFTConfig().quant == "auto"
    assert resolve_quant("auto", cuda=True) == "nf4" and resolve_quant("auto", cuda=False) == "none"
    assert resolve_quant("nf4", cuda=False) == "nf4"  # asked for, nf4 runs on the CPU too
    out = tmp_path / "out"
    code, _, _ = _cli(["--model", str(tiny_spm), "--output-dir", str(out), "--max-steps", "1", "--max-length", "64",
                       "--lora-r", "2", "--eval-fraction", "0", "--no-gradient-checkpointing"], capsys)
    assert code == 0
    recorded = json.loads((out / "lowrank.json").read_text())["config"]["quant"]
    assert recorded == ("nf4" if torch.cuda.is_available() else "none")


def test_resume_checkpoint_expands_home_and_takes_the_newest(tmp_path, monkeypatch):
    from lowrank import train
    from lowrank.errors import UserError

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="--resume: no checkpoint in"):
        checkpoints.resume_checkpoint("~/run")
    for step in (2, 10, 3):
        (tmp_path / "run" / checkpoints.CHECKPOINTS / f"step-{step}").mkdir(parents=True)
        (tmp_path / "run" / checkpoints.CHECKPOINTS / f"step-{step}" / "state.pt").write_bytes(b"")
    (tmp_path / "run" / checkpoints.CHECKPOINTS / "step-11").mkdir()  # no state.pt: an incomplete checkpoint
    assert checkpoints.resume_checkpoint("~/run") == tmp_path / "run" / checkpoints.CHECKPOINTS / "step-10"
