"""Prove a GGUF file runs in llama.cpp like the Hugging Face model it came from.

Checks, each reported with numbers (VerifyReport):
- tokenization: a built-in text set (English, code, Chinese, emoji, runs of spaces and
  newlines, special tokens, a rendered chat) gives the same ids in llama.cpp (special=True,
  i.e. special-token text is parsed, as HF does by default) as with the HF tokenizer;
- F32/F16/BF16 files: logits match within a stated tolerance and greedy continuations are
  token-identical for ``greedy_tokens`` tokens (a position where the HF model's own top two
  logits are within that tolerance is a near-tie, reported rather than failed);
- quantized files: KL divergence and top-1 agreement against a float GGUF (the one given,
  else an F16 written from the HF model for the check), each held to a limit (see
  lowrank.export.quality: by default what llama.cpp's own quantization of the same float file
  measures, plus a margin), and perplexity on held-out text;
- chat template: the template stored in the file, rendered and tokenized the way
  llama-cpp-python's chat completion does (its Jinja2ChatFormatter, then tokenize with
  special=True and no extra BOS), gives exactly the string and the token ids that training
  gave (the training template rendered by the HF tokenizer, tokenized by lowrank.data);
- LoRA (with ``lora_gguf`` and ``base_gguf``): llama.cpp running the base GGUF with the
  adapter GGUF gives the merged GGUF's logits within the same tolerance.

The report, its float tolerances and its printed form are lowrank/export/verify_report.py.
llama.cpp is loaded with lowrank.export.llama.load_llama (no AMX weight buffers on CPUs that
advertise AMX: see plain_cpu_weights there).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from lowrank.errors import UserError
from lowrank.export import quality
from lowrank.export.llama import gguf_logits, load_llama
from lowrank.export.verify_report import LOGIT_TOLERANCE, VerifyReport, logit_tolerance

log = logging.getLogger(__name__)

TEST_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "机器学习是人工智能的一个分支。",
    "Great job! 🎉🚀 Let's go 👍🏽",
    "spaces:    four, tabs:\t\ttwo\n\n\nthree newlines",
    "  two leading spaces, then a trailing run   ",
    "It's 2024; they'll pay $1,234.56 (maybe).",
]
# Not in lowrank/assets/corpus.txt: used for perplexity.
HELD_OUT_TEXT = (
    "A lighthouse keeper wrote in his log each evening: the wind, the height of the waves, the ships that "
    "passed and the ones that did not. Years later his grandchildren found the books in the attic and read "
    "them aloud, one page a night, until the winter was over."
)
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
]
def check_gguf_file(path: str | Path):
    """Open ``path`` with gguf's reader; a truncated or corrupted file is a one-line UserError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise UserError(f"{path}: not a valid GGUF file (truncated or corrupted: {type(e).__name__}: {e})") from e
    if end > size:
        raise UserError(f"{path}: truncated GGUF file: tensor data needs {end} bytes, file has {size}")
    return reader


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def file_type_name(reader) -> str:
    import gguf

    ftype = _field(reader, "general.file_type")
    return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_") if ftype is not None else "unknown"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_and_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean per-position KL(ref || got) in nats, and how often the two argmaxes agree; both (positions, vocab)."""
    ref, got = np.asarray(ref), np.asarray(got)
    p_log, q_log = log_softmax(ref), log_softmax(got)
    kl = float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == got.argmax(-1)).mean())


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    lp = log_softmax(logits[:-1])
    return float(math.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def _check_tokenization(report: VerifyReport, vocab_llm, tokenizer) -> None:
    # Special-token text followed directly by words and by a space (where HF's Metaspace
    # pre-tokenizer and SentencePiece/llama.cpp disagree about the dummy-prefix space).
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    texts = TEST_TEXTS + [f"{bos}Hello{eos}{bos}again{eos} and more{eos}\n\nlast"]
    for text in texts:
        hf = tokenizer(text, add_special_tokens=True)["input_ids"]
        add_bos = bool(tokenizer.bos_token_id is not None and hf[:1] == [tokenizer.bos_token_id]
                       and hf != tokenizer(text, add_special_tokens=False)["input_ids"])
        got = vocab_llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if got != hf:
            report.tokenization_mismatches.append({"text": text, "hf": hf, "gguf": got})
    report.texts_checked = len(texts)
    if report.tokenization_mismatches:
        first = report.tokenization_mismatches[0]
        report.problems.append(f"tokenization differs from the HF tokenizer on {len(report.tokenization_mismatches)} of "
                               f"{len(texts)} texts, first {first['text'][:40]!r}")


def _check_chat_template(report: VerifyReport, reader, vocab_llm, tokenizer, expected: str | None) -> None:
    """The file's template in llama-cpp-python == the training template in lowrank.data, as text and as ids.

    llama-cpp-python's chat completion renders tokenizer.chat_template with Jinja2ChatFormatter
    (bos/eos texts from the vocabulary) and tokenizes the prompt with special=True and no BOS of
    its own (the template writes it); training renders with the HF tokenizer and tokenizes with
    lowrank.data.tokenize_text. A multi-turn conversation must give the same ids both ways,
    with the generation prompt (what the model sees when it answers) and without (what it
    was trained on).
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lowrank.data import tokenize_text

    stored = _field(reader, "tokenizer.chat_template")
    expected = expected or getattr(tokenizer, "chat_template", None)
    if stored is None and expected is None:
        return
    report.chat_template_checked = True
    if stored is None:
        report.chat_template_problem = "the file has no tokenizer.chat_template"
    else:
        tokens = _field(reader, "tokenizer.ggml.tokens")
        bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else ""
        eos = tokens[eos_id] if eos_id is not None else ""
        conversations = [(CHAT, True), (CHAT + [{"role": "assistant", "content": "Two."}], False)]
        for msgs, gen in conversations:
            formatted = Jinja2ChatFormatter(stored, eos_token=eos, bos_token=bos, add_generation_prompt=gen)(messages=msgs)
            want = tokenizer.apply_chat_template(msgs, chat_template=expected, tokenize=False, add_generation_prompt=gen)
            if formatted.prompt != want:
                report.chat_template_problem = (f"rendering differs: file gives {formatted.prompt[:60]!r}, "
                                                f"training gives {want[:60]!r}")
                break
            got_ids = vocab_llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special,
                                         special=True)
            want_ids = tokenize_text(tokenizer, want)[0]
            if got_ids != want_ids:
                at = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), min(len(got_ids), len(want_ids)))
                report.chat_template_problem = (
                    f"same text, different token ids at position {at}: llama.cpp "
                    f"{vocab_llm.detokenize(got_ids[at:at + 3])!r} {got_ids[at:at + 3]}, training "
                    f"{tokenizer.decode(want_ids[at:at + 3])!r} {want_ids[at:at + 3]}")
                break
            report.chat_tokens_checked += 1
    if report.chat_template_problem:
        report.problems.append("chat template: " + report.chat_template_problem)


def load_hf_model(model_dir: str | Path):
    """The HF model as verify_gguf compares against it (float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank.files import check_weights_dir

    check_weights_dir(model_dir)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _check_float_parity(report: VerifyReport, llm, model, tokenizer, greedy_tokens: int) -> None:
    ids = tokenizer(HELD_OUT_TEXT)["input_ids"]
    ref, got = _hf_logits(model, ids), gguf_logits(llm, ids)
    report.max_logit_diff = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-6))
    report.logit_tolerance = logit_tolerance(report.file_type, report.architecture)
    if report.max_logit_diff > report.logit_tolerance:
        report.problems.append(f"logits differ by {report.max_logit_diff:.2e} (relative), tolerance {report.logit_tolerance:.0e}")
    report.perplexity, report.perplexity_hf = perplexity(got, ids), perplexity(ref, ids)
    _check_greedy(report, llm, model, tokenizer, greedy_tokens)


def _check_greedy(report: VerifyReport, llm, model, tokenizer, greedy_tokens: int) -> None:
    """HF's greedy continuation, and llama.cpp's argmax after each of its prefixes (teacher forcing).

    A position where the two pick different tokens fails the check, unless the HF model itself
    scores the two within the logit tolerance: a near-tie, which rounding decides (common on
    models with random weights, whose top logits are close). Near-ties are counted and reported.
    """
    import torch

    prompt = tokenizer("Once upon a time")["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=greedy_tokens,
                             min_new_tokens=greedy_tokens, pad_token_id=tokenizer.pad_token_id or 0,
                             output_scores=True, return_dict_in_generate=True)
    hf_new = out.sequences[0, len(prompt):].tolist()
    hf_scores = torch.stack(out.scores)[:, 0].float().numpy()  # what HF chose from, EOS masked as generate did
    got = gguf_logits(llm, prompt + hf_new)[len(prompt) - 1: len(prompt) - 1 + len(hf_new)].copy()
    got[~np.isfinite(hf_scores)] = -np.inf
    scale = max(float(np.abs(hf_scores[np.isfinite(hf_scores)]).max()), 1e-6)
    identical = ties = 0
    for i, (want, chosen) in enumerate(zip(hf_new, got.argmax(-1).tolist())):
        if want == chosen:
            identical += 1
            continue
        gap = float(hf_scores[i, want] - hf_scores[i, chosen]) / scale
        if gap <= report.logit_tolerance:
            ties += 1
            continue
        report.problems.append(f"greedy continuation diverges at token {i} of {len(hf_new)} (llama.cpp picks "
                               f"{chosen}, the HF model {want}, {gap:.1e} apart relative to max |logit|)")
        break
    report.greedy_tokens, report.greedy_identical_tokens, report.greedy_near_ties = len(hf_new), identical, ties


def _logits_of(path: Path, ids: list[int], n_threads: int) -> np.ndarray:
    llm = load_llama(path, n_threads=n_threads, n_ctx=max(256, len(ids)))
    try:
        return gguf_logits(llm, ids)
    finally:
        llm.close()


def _check_quantized(report: VerifyReport, llm, model, tokenizer, path: Path, model_dir: Path,
                     reference_gguf: Path | None, n_threads: int, reference_quant: bool) -> None:
    """KL and top-1 agreement against a float GGUF, held to limits (lowrank.export.quality); perplexity."""
    ids = tokenizer(HELD_OUT_TEXT)["input_ids"]
    got = gguf_logits(llm, ids)
    report.perplexity = perplexity(got, ids)
    report.perplexity_hf = perplexity(_hf_logits(model, ids), ids)
    with quality.scratch_dir(path) as scratch:
        if reference_gguf is None:
            reference_gguf = quality.write_float_reference(model_dir, scratch / "reference-f16.gguf")
            report.reference = f"F16 of {model_dir}"
        else:
            report.reference = str(reference_gguf)
        ref = _logits_of(reference_gguf, ids, n_threads)
        report.kl_divergence, report.top1_agreement = kl_and_top1(ref, got)
        limits = None
        if reference_quant:
            made = quality.llama_cpp_quantization(reference_gguf, report.file_type, scratch / "llama-cpp-quant.gguf")
            if made is not None:
                limits = quality.relative_limits(report.file_type, *kl_and_top1(ref, _logits_of(made, ids, n_threads)))
        limits = limits or quality.published_limits(report.file_type)
    if limits is None:
        log.warning("%s: no limits for type %s; KL and top-1 are reported only", path, report.file_type)
        return
    report.kl_limit, report.top1_limit, report.limits_source = limits.kl, limits.top1, limits.source
    report.reference_quant_kl, report.reference_quant_top1 = limits.reference_quant_kl, limits.reference_quant_top1
    report.problems += quality.check_limits(report.kl_divergence, report.top1_agreement, limits,
                                            "the F16 reference" if report.reference.startswith("F16 of") else
                                            Path(report.reference).name)


def _check_lora_files(lora_gguf: Path, base_gguf: Path) -> str:
    """UserError unless ``lora_gguf`` is a LoRA adapter GGUF and ``base_gguf`` a model GGUF; the base's file type."""
    lora_reader, base_reader = check_gguf_file(lora_gguf), check_gguf_file(base_gguf)
    if _field(lora_reader, "general.type") != "adapter" or _field(lora_reader, "adapter.type") != "lora":
        raise UserError(f"{lora_gguf}: not a LoRA adapter GGUF (general.type is "
                        f"{_field(lora_reader, 'general.type')!r}, expected 'adapter')")
    if _field(base_reader, "general.type") == "adapter":
        raise UserError(f"{base_gguf}: this is an adapter GGUF; give the base model's GGUF")
    return file_type_name(base_reader)


def _check_lora(report: VerifyReport, merged: Path, base_gguf: Path, lora_gguf: Path, ids: list[int],
                n_threads: int, exact: bool) -> None:
    """llama.cpp's base GGUF + LoRA GGUF against the merged GGUF, relative to the merged logits' scale."""
    from lowrank.export.lora import lora_gguf_logit_gap

    base_type = _check_lora_files(lora_gguf, base_gguf)
    gap = lora_gguf_logit_gap(base_gguf, lora_gguf, merged, ids, n_threads=n_threads)
    scale = max(gap["merged_max_abs"], 1e-6)
    report.lora_path, report.lora_base = str(lora_gguf), str(base_gguf)
    report.lora_max_diff, report.lora_effect = gap["max_abs_diff"] / scale, gap["adapter_effect"] / scale
    if exact and base_type in LOGIT_TOLERANCE and report.file_type in LOGIT_TOLERANCE:
        # Float files: the two differ by rounding of W + BA vs W (and summation order), as the merged file
        # differs from the HF model; the coarser of the two files' types sets the tolerance.
        report.lora_tolerance = max(logit_tolerance(base_type, report.architecture),
                                    logit_tolerance(report.file_type, report.architecture))
        if report.lora_max_diff > report.lora_tolerance:
            report.problems.append(f"LoRA: base + adapter differs from the merged file by {report.lora_max_diff:.2e} "
                                   f"(relative), tolerance {report.lora_tolerance:.0e}")


def verify_gguf(gguf_path: str | Path, hf_model_dir: str | Path, *, reference_gguf: str | Path | None = None,
                chat_template: str | None = None, greedy_tokens: int = 32, n_ctx: int = 256,
                n_threads: int = 2, lora_gguf: str | Path | None = None,
                base_gguf: str | Path | None = None, lora_exact: bool = True, hf_model=None,
                reference_quant: bool = True) -> VerifyReport:
    """Compare ``gguf_path`` with the HF model in ``hf_model_dir``; return the report (never raises on a mismatch).

    ``chat_template``: the Jinja template training used (default: the HF tokenizer's own).
    ``reference_gguf``: the float (F16/BF16/F32) file to measure a quantized file against; without it an F16
    is written from ``hf_model_dir`` into a temp dir beside ``gguf_path`` for the check.
    ``reference_quant``: hold a quantized file to what llama.cpp's own quantization of the reference gives
    (made in the same temp dir); False: to llama.cpp's published figures for LLaMA 3 8B.
    ``lora_gguf`` with ``base_gguf``: also check that llama.cpp running ``base_gguf`` with the
    adapter ``lora_gguf`` gives the logits of ``gguf_path`` (the merged file). ``lora_exact=False``
    reports the gap without a tolerance (a merge into dequantized nf4/int8 weights differs from
    base + adapter by the base's quantization error, by design).
    ``hf_model``: load_hf_model(hf_model_dir), when the caller checks several files against one model.
    """
    from lowrank.models import load_tokenizer

    if (lora_gguf is None) != (base_gguf is None):
        raise UserError("--lora and --base-gguf go together: the adapter GGUF and the base GGUF it applies to")
    path = Path(gguf_path)
    reader = check_gguf_file(path)
    if _field(reader, "general.type") == "adapter":
        raise UserError(f"{path}: this is a LoRA adapter GGUF; verify the merged model's GGUF and pass the adapter "
                        "with --lora and the base with --base-gguf")
    if lora_gguf is not None:
        _check_lora_files(Path(lora_gguf), Path(base_gguf))  # bad files fail before any slow work
    if reference_gguf is not None and file_type_name(check_gguf_file(reference_gguf)) not in quality.FLOAT_TYPES:
        raise UserError(f"{reference_gguf}: a reference must be a float GGUF (F16, BF16 or F32), not "
                        f"{file_type_name(check_gguf_file(reference_gguf))}")
    model_dir = Path(hf_model_dir)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: not a Hugging Face model dir (no config.json)")
    tokenizer = load_tokenizer(str(model_dir))  # the tokenizer training used, SentencePiece fix included
    report = VerifyReport(path=str(path), file_type=file_type_name(reader), architecture=_field(reader, "general.architecture"))
    expected_template = chat_template or getattr(tokenizer, "chat_template", None)

    vocab_llm = load_llama(path, vocab_only=True, n_threads=n_threads)
    try:
        _check_tokenization(report, vocab_llm, tokenizer)
        _check_chat_template(report, reader, vocab_llm, tokenizer, expected_template)
    finally:
        vocab_llm.close()
    del reader

    model = hf_model if hf_model is not None else load_hf_model(model_dir)
    llm = load_llama(path, n_ctx=n_ctx, n_threads=n_threads)
    try:
        if report.file_type in LOGIT_TOLERANCE:
            _check_float_parity(report, llm, model, tokenizer, greedy_tokens)
        else:
            _check_quantized(report, llm, model, tokenizer, path, model_dir,
                             Path(reference_gguf) if reference_gguf else None, n_threads, reference_quant)
    finally:
        llm.close()
    if lora_gguf is not None:
        _check_lora(report, path, Path(base_gguf), Path(lora_gguf), tokenizer(HELD_OUT_TEXT)["input_ids"], n_threads,
                    lora_exact)
    return report
