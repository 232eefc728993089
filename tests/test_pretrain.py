"""Pretraining: every weight trains, the loss falls, the output is a base every later stage loads,
finished only when complete, and one error per bad input."""

from __future__ import annotations

import json

import pytest
import torch

from cli_support import quantized_copy
from lowrank.cli import main
from lowrank.errors import UserError
from lowrank.pretrain import PretrainConfig, train_base
from lowrank.tasks import write_task

STEPS = 30


@pytest.fixture(scope="module")
def practice(tmp_path_factory):
    """Practice text of the sort task (about 25k tokens)."""
    return write_task(tmp_path_factory.mktemp("task"), "sort", seed=0, pretrain=2000, sft=2, eval=2,
                      preferences=2, prompts=2)["pretrain"]


@pytest.fixture(scope="module")
def pretrained(tiny_spm, practice, tmp_path_factory):
    """A tiny base trained STEPS steps; the records on_step saw, and whether the marker existed meanwhile."""
    out = tmp_path_factory.mktemp("pretrain") / "base"
    records, marker_seen = [], []

    def on_step(record):
        records.append(record)
        marker_seen.append((out / "lowrank.json").exists())

    config = PretrainConfig(model=str(tiny_spm), data=str(practice), output_dir=str(out), max_steps=STEPS,
                            batch_size=8, max_length=128, learning_rate=3e-3, warmup_steps=5, eval_fraction=0.05)
    assert train_base(config, on_step=on_step) == out
    return out, records, marker_seen


def test_training_lowers_the_loss(pretrained):
    out, records, _ = pretrained
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[0]["max_steps"] == STEPS
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 6.0  # a random model over a 1000-token vocabulary: about ln(1000) = 6.9
    assert last < first - 2.0
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["stage"] == "pretrain"
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["initial_eval_loss"] - 2.0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == {"step": 0, "max_steps": STEPS, "eval_loss": meta["metrics"]["initial_eval_loss"]}


def test_every_weight_changes(pretrained, tiny_spm):
    from safetensors.torch import load_file

    out, _, _ = pretrained
    before, after = load_file(tiny_spm / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_output_is_a_base_the_other_stages_load(pretrained):
    from lowrank.models import load_base_model, load_tokenizer

    out, _, _ = pretrained
    tokenizer = load_tokenizer(str(out))
    model = load_base_model(str(out), "none", gradient_checkpointing=False)
    ids = tokenizer("sort: c a b =", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.model").is_file()  # GGUF export reads the SentencePiece scores from it


def test_output_exports_to_gguf_that_matches(pretrained, tmp_path):
    from lowrank.export.gguf import export_gguf
    from lowrank.export.verify import verify_gguf

    out, _, _ = pretrained
    (path,) = export_gguf(out, tmp_path, ["f32"])
    report = verify_gguf(path, out)
    assert report.tokenization_mismatches == []
    assert report.max_logit_diff < report.logit_tolerance


def test_marked_finished_only_at_the_end(pretrained):
    out, _, marker_seen = pretrained
    assert marker_seen == [False] * STEPS
    newest = max(p.stat().st_mtime_ns for p in out.iterdir() if p.name != "lowrank.json")
    assert (out / "lowrank.json").stat().st_mtime_ns >= newest
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_trains_and_reports(tiny_spm, practice, tmp_path, capsys):
    code = main(["pretrain", "--model", str(tiny_spm), "--data", str(practice), "--output-dir", str(tmp_path / "b"),
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "64"])
    assert code == 0
    assert "model written to" in capsys.readouterr().out
    assert (tmp_path / "b" / "lowrank.json").is_file()


# --- bad inputs: one line naming the field or file, nothing written ---------------------------------

def _cli_error(capsys, *args) -> str:
    code = main(["pretrain", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("lowrank pretrain: error: ")
    return err


def test_missing_data_file_is_refused(tiny_spm, tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(tiny_spm), "--data", str(tmp_path / "none.jsonl"),
                     "--output-dir", str(tmp_path / "out"))
    assert "none.jsonl does not exist" in err
    assert not (tmp_path / "out").exists()


def test_no_data_is_refused(tiny_spm, tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(tiny_spm), "--output-dir", str(tmp_path / "out"))
    assert "give --data" in err


def test_record_without_text_is_refused(tiny_spm, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "sort: b a = a b"}\n{"instruction": "hi", "output": "there"}\n')
    err = _cli_error(capsys, "--model", str(tiny_spm), "--data", str(data), "--output-dir", str(tmp_path / "out"))
    assert "data.jsonl line 2: field 'text' must be a non-empty string, it is missing" in err
    assert not (tmp_path / "out").exists()


def test_quantized_model_is_refused(tiny_spm, practice, tmp_path, capsys):
    quantized = quantized_copy(tiny_spm, tmp_path / "quantized", quant_method="bitsandbytes", load_in_4bit=True)
    err = _cli_error(capsys, "--model", str(quantized), "--data", str(practice), "--output-dir", str(tmp_path / "out"))
    assert "a bitsandbytes model" in err and "unquantized" in err


def test_bad_batch_size_is_refused(tiny_spm, practice, tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(tiny_spm), "--data", str(practice), "--output-dir", str(tmp_path / "out"),
                     "--batch-size", "0")
    assert "--batch-size must be at least 1, got 0" in err


def test_unknown_scheduler_is_refused(tiny_spm, practice, tmp_path, capsys):
    err = _cli_error(capsys, "--model", str(tiny_spm), "--data", str(practice), "--output-dir", str(tmp_path / "out"),
                     "--lr-scheduler", "step")
    assert "--lr-scheduler: unknown 'step'" in err


def test_finished_output_dir_is_kept_without_overwrite(pretrained, practice, tiny_spm):
    out, _, _ = pretrained
    before = (out / "lowrank.json").read_text()
    config = PretrainConfig(model=str(tiny_spm), data=str(practice), output_dir=str(out), max_steps=1)
    with pytest.raises(UserError, match="already holds a finished run"):
        train_base(config)
    assert (out / "lowrank.json").read_text() == before
