"""`lowrank verify`: passes on a good file, catches real differences, one-line errors for broken files."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from lowrank.cli import main
from lowrank.export.gguf import export_gguf
from lowrank.export.verify import verify_gguf
from lowrank.templates import BUILTIN_TEMPLATES


@pytest.fixture(scope="module")
def bpe_f16(tiny_bpe, tmp_path_factory):
    return export_gguf(tiny_bpe, tmp_path_factory.mktemp("verify"), ["f16"], name="m")[0]


@pytest.fixture(scope="module")
def spm_f32(tiny_spm, tmp_path_factory):
    """The tiny SentencePiece model with the default template for SPM models (vicuna) stored in the file."""
    out = tmp_path_factory.mktemp("verify-spm")
    return export_gguf(tiny_spm, out, ["f32"], name="m", chat_template=BUILTIN_TEMPLATES["vicuna"])[0]


def _cli(capsys, argv) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def test_cli_verify_passes_on_exported_file(bpe_f16, tiny_bpe, capsys):
    rc, out, _ = _cli(capsys, ["verify", str(bpe_f16), str(tiny_bpe)])
    assert rc == 0, out
    assert "PASS" in out and "greedy: 32/32 tokens identical" in out
    assert "chat template: identical rendering and token ids (2 conversations)" in out


def test_sentencepiece_model_tokenizes_and_chats_like_llama_cpp(spm_f32, tiny_spm):
    # vicuna writes " USER:" right after </s>: llama.cpp puts its dummy-prefix space before it ("▁▁USER"),
    # and so must the HF tokenizer training used, or the model sees other ids than it was trained on.
    report = verify_gguf(spm_f32, tiny_spm, chat_template=BUILTIN_TEMPLATES["vicuna"], greedy_tokens=8)
    assert report.texts_checked == 8 and report.tokenization_mismatches == []
    assert report.chat_tokens_checked == 2 and report.chat_template_problem is None
    assert report.passed, report.problems


def test_chat_template_round_trip_detects_a_different_template(bpe_f16, tiny_bpe):
    # The file stores llama3; claim training used chatml: the renderings differ and verify says so.
    report = verify_gguf(bpe_f16, tiny_bpe, chat_template=BUILTIN_TEMPLATES["chatml"], greedy_tokens=4)
    assert report.chat_template_problem.startswith("rendering differs") and not report.passed


def test_tokenizer_that_llama_cpp_splits_differently_fails(spm_f32, tiny_spm, tmp_path):
    # The same vocabulary behind a normalizer llama.cpp does not run (Lowercase after the SentencePiece
    # steps; lowrank.models.load_tokenizer leaves normalizers it does not know alone). The chat text
    # renders identically, but its token ids differ: verify must say so.
    model = tmp_path / "lowercase"
    shutil.copytree(tiny_spm, model)
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"]["normalizers"].append({"type": "Lowercase"})
    (model / "tokenizer.json").write_text(json.dumps(tok))
    report = verify_gguf(spm_f32, model, chat_template=BUILTIN_TEMPLATES["vicuna"], greedy_tokens=4)
    assert any(m["text"].startswith("<s>Hello") for m in report.tokenization_mismatches)
    assert report.chat_template_problem.startswith("same text, different token ids")
    assert not report.passed
    assert report.max_logit_diff < report.logit_tolerance  # the weights themselves are right


# ----------------------------------------------------------------------------- LoRA adapter GGUF

@pytest.fixture(scope="module")
def lora_files(tiny_spm, tmp_path_factory):
    """Base F32 GGUF, merged F32 GGUF + its HF dir, and two LoRA GGUFs: the merged one's and another."""
    from test_lora_gguf import make_adapter

    from lowrank.export.lora import export_lora_gguf
    from lowrank.quantize.merge import merge_adapters

    work = tmp_path_factory.mktemp("verify-lora")
    adapter = make_adapter(tiny_spm, work / "adapter", seed=21)
    other = make_adapter(tiny_spm, work / "other", seed=22)
    merged = merge_adapters(str(tiny_spm), [str(adapter)], work / "merged", dtype="float32")
    return {
        "base": export_gguf(tiny_spm, work, ["f32"], name="base")[0],
        "merged_dir": merged,
        "merged": export_gguf(merged, work, ["f32"], name="merged")[0],
        "lora": export_lora_gguf(adapter, tiny_spm, work / "adapter-lora.gguf"),
        "other": export_lora_gguf(other, tiny_spm, work / "other-lora.gguf"),
    }


def test_cli_verify_lora_on_base_matches_merged(lora_files, capsys):
    f = lora_files
    rc, out, _ = _cli(capsys, ["verify", str(f["merged"]), str(f["merged_dir"]), "--lora", str(f["lora"]),
                               "--base-gguf", str(f["base"]), "--greedy-tokens", "4"])
    assert rc == 0, out
    # F32 throughout: measured 5.6e-05 relative; an adapter that changes nothing would make this meaningless.
    match = re.search(r"LoRA adapter-lora\.gguf on base-f32\.gguf: max relative diff from this file (\S+) "
                      r"\(tolerance 2e-03\); the adapter moves logits by (\S+)", out)
    assert match, out
    assert float(match[1]) < 1e-3 and float(match[2]) > 0.1


def test_verify_lora_catches_the_wrong_adapter(lora_files):
    f = lora_files
    report = verify_gguf(f["merged"], f["merged_dir"], lora_gguf=f["other"], base_gguf=f["base"], greedy_tokens=4)
    assert report.lora_max_diff > report.lora_tolerance
    assert not report.passed and any(p.startswith("LoRA: base + adapter differs") for p in report.problems)


def test_verify_lora_without_base_is_one_line_error(lora_files, capsys):
    f = lora_files
    rc, _, err = _cli(capsys, ["verify", str(f["merged"]), str(f["merged_dir"]), "--lora", str(f["lora"])])
    assert rc == 2 and err == ("lowrank verify: error: --lora and --base-gguf go together: "
                               "the adapter GGUF and the base GGUF it applies to")


def test_verify_lora_that_is_not_an_adapter_is_one_line_error(lora_files, capsys):
    f = lora_files
    rc, _, err = _cli(capsys, ["verify", str(f["merged"]), str(f["merged_dir"]), "--lora", str(f["base"]),
                               "--base-gguf", str(f["base"]), "--greedy-tokens", "1"])
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"lowrank verify: error: {f['base']}: not a LoRA adapter GGUF")


# ----------------------------------------------------------------------------- broken files

def test_truncated_gguf_is_one_line_error(bpe_f16, tiny_bpe, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(bpe_f16.read_bytes()[: bpe_f16.stat().st_size // 2])
    rc, _, err = _cli(capsys, ["verify", str(bad), str(tiny_bpe)])
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"lowrank verify: error: {bad}: ") and "truncated" in err


def test_corrupted_gguf_is_one_line_error(bpe_f16, tiny_bpe, tmp_path, capsys):
    data = bytearray(bpe_f16.read_bytes())
    data[8:24] = b"\xff" * 16  # version and tensor/kv counts
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    rc, _, err = _cli(capsys, ["verify", str(bad), str(tiny_bpe)])
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"lowrank verify: error: {bad}: not a valid GGUF file")


def test_missing_gguf_is_one_line_error(tiny_bpe, tmp_path, capsys):
    rc, _, err = _cli(capsys, ["verify", str(tmp_path / "none.gguf"), str(tiny_bpe)])
    assert rc == 2 and err == f"lowrank verify: error: {tmp_path / 'none.gguf'}: no such GGUF file"


class _GreedyStub:
    """An HF model whose greedy picks are tokens 1, 2, 3 with the given scores, and a tokenizer of 2 ids."""

    def __init__(self, scores):
        import torch

        self.scores = [torch.tensor([row]) for row in scores]

    def generate(self, input_ids, **kwargs):
        import torch
        from types import SimpleNamespace

        picks = [int(s.argmax()) for s in self.scores]
        return SimpleNamespace(sequences=torch.tensor([input_ids[0].tolist() + picks]), scores=self.scores)


def _greedy_report(monkeypatch, hf_scores, gguf_scores):
    import numpy as np

    from lowrank.export import verify as verify_mod

    tokenizer = lambda text: {"input_ids": [0, 4]}  # noqa: E731
    tokenizer.pad_token_id = 0
    # llama.cpp's logits after each prefix: row k predicts the token at position k + 1.
    rows = np.zeros((2 + len(gguf_scores), 5), dtype=np.float32)
    rows[1: 1 + len(gguf_scores)] = gguf_scores
    monkeypatch.setattr(verify_mod, "gguf_logits", lambda llm, ids: rows[: len(ids)])
    report = verify_mod.VerifyReport(path="x.gguf", file_type="F16", logit_tolerance=5e-3)
    verify_mod._check_greedy(report, None, _GreedyStub(hf_scores), tokenizer, len(hf_scores))
    return report


def test_greedy_near_tie_is_reported_not_failed(monkeypatch):
    hf = [[0, 3.0, 1, 0, 0], [0, 0, 2.0, 1.999, 0], [0, 0, 0, 3.0, 1]]  # position 1: tokens 2 and 3 tie
    gguf = [[0, 3.0, 1, 0, 0], [0, 0, 1.999, 2.0, 0], [0, 0, 0, 3.0, 1]]  # llama.cpp rounds the other way
    report = _greedy_report(monkeypatch, hf, gguf)
    assert report.problems == [] and report.greedy_identical_tokens == 2 and report.greedy_near_ties == 1


def test_greedy_real_divergence_fails(monkeypatch):
    hf = [[0, 3.0, 1, 0, 0], [0, 0, 2.0, 1.0, 0], [0, 0, 0, 3.0, 1]]
    gguf = [[0, 3.0, 1, 0, 0], [0, 0, 1.0, 2.0, 0], [0, 0, 0, 3.0, 1]]  # a clear preference, the other way
    report = _greedy_report(monkeypatch, hf, gguf)
    assert len(report.problems) == 1 and "diverges at token 1 of 3" in report.problems[0]
    assert report.greedy_near_ties == 0


@pytest.mark.parametrize("name", ["mistral", "gemma", "phi3"])
def test_the_mistral_gemma_and_phi3_templates_render_the_same_in_llama_cpp(tiny_bpe, tmp_path, name):
    """The template written into the GGUF renders to the same text and token ids in llama.cpp as in training."""
    path = export_gguf(tiny_bpe, tmp_path, ["f32"], name="m", chat_template=BUILTIN_TEMPLATES[name])[0]
    report = verify_gguf(path, tiny_bpe, chat_template=BUILTIN_TEMPLATES[name], greedy_tokens=4)
    assert report.chat_tokens_checked == 2 and report.chat_template_problem is None
    assert report.passed, report.problems
