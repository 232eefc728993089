"""The embedded default model: a tiny LLaMA-architecture model with a real tokenizer, built offline.

Nothing is downloaded. The tokenizer is trained here on lowrank/assets/corpus.txt:
- ``"spm"``: a SentencePiece BPE model in the LLaMA-1/2 style (``<unk>``=0, ``<s>``=1,
  ``</s>``=2, byte fallback, digits split, no text normalisation), with no chat template
  (like a LLaMA-2 base). Its fast tokenizer tokenizes exactly as sentencepiece and
  llama.cpp do (see :func:`_spm_tokenizer`).
- ``"bpe"``: a byte-level BPE in the LLaMA-3 style (the LLaMA-3 pre-tokenizer regex,
  ``<|begin_of_text|>`` added in front, ``<|eot_id|>`` ends a turn) with the built-in
  ``llama3`` chat template; for ``arch="qwen2"`` in the Qwen2 style (Qwen2 regex, NFC, no BOS,
  ChatML tokens and the ``chatml`` template), since transformers loads qwen2 tokenizers as such.
- ``"spm"`` with ``arch="gemma2"`` or ``"gemma3"``: a SentencePiece BPE model in the Gemma style
  (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<mask>``, ``<start_of_turn>`` and
  ``<end_of_turn>`` in the model itself, byte fallback, no dummy prefix) loaded as transformers'
  GemmaTokenizer, with the built-in ``gemma`` chat template.
Weights are random (normal, std 0.02) from a seed, so a given set of arguments always
gives the same files. `--model tiny` and `--model tiny-bpe` resolve here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CORPUS = ASSETS / "corpus.txt"
BUILDER_VERSION = 3  # bump when the output of build_tiny_model changes

# The pre-tokenizer regex of LLaMA 3 (Meta's tiktoken pattern), as published in its tokenizer.json.
LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX): digits one at a time.
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# `--model NAME` aliases: the shape of the embedded default.
NAMED_MODELS = {
    "tiny": dict(tokenizer="spm", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2),
    "tiny-bpe": dict(tokenizer="bpe", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2),
}


# Gemma's SentencePiece layout (its tokenizer.model): pad, eos, bos, unk first, then <mask> and the turn markers
# as user-defined pieces; no dummy prefix ("Hello" is "Hello", not "▁Hello").
GEMMA_SPM_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                     unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
                     add_dummy_prefix=False)
LLAMA_SPM_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)


def _train_spm(out_dir: Path, vocab_size: int, gemma: bool = False) -> Path:
    import sentencepiece as spm

    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(CORPUS),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        **(GEMMA_SPM_IDS if gemma else LLAMA_SPM_IDS),
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def sentencepiece_normalizer():
    """The fast-tokenizer normalizer that splits text like sentencepiece and llama.cpp.

    sentencepiece puts its dummy-prefix "▁" in front of every piece of text it encodes, and
    llama.cpp's SPM tokenizer (src/llama-vocab.cpp) does the same for every run of text after
    a special token, even one that starts with a space ("</s> USER:" -> "▁▁USER:"). HF's
    Metaspace pre-tokenizer does neither: prepend_scheme "first" (LlamaTokenizer's non-legacy
    default) adds the prefix only at the very start of the input, and "always" skips runs that
    already start with a space. So a model trained on Metaspace tokens would see different
    ids in llama.cpp. The original LLaMA-2 tokenizer.json pipeline, "prepend ▁ to each
    normalized run, then spaces -> ▁" with no pre-tokenizer, matches sentencepiece exactly:
    transformers normalizes each run between special tokens separately.
    """
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])


def _spm_tokenizer(work: Path, vocab_size: int):
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    model_file = _train_spm(work, vocab_size)
    # transformers 5 converts a SentencePiece model to a fast tokenizer only in from_pretrained.
    (work / "src").mkdir()
    shutil.copy(model_file, work / "src" / "tokenizer.model")
    converted = LlamaTokenizer.from_pretrained(str(work / "src"), legacy=True, add_bos_token=True, add_eos_token=False)
    if len(converted) < vocab_size:
        # transformers 5 silently falls back to a 3-token vocabulary without protobuf.
        raise RuntimeError(f"SentencePiece tokenizer has {len(converted)} tokens, expected {vocab_size}: is protobuf installed?")
    backend = converted.backend_tokenizer
    backend.normalizer = sentencepiece_normalizer()
    backend.pre_tokenizer = None
    # Saved as a plain fast tokenizer (tokenizer_class TokenizersBackend): LlamaTokenizer's
    # constructor would rebuild the Metaspace pre-tokenizer and drop this normalizer.
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, model_file


def _gemma_tokenizer(work: Path, vocab_size: int):
    """A Gemma-style SentencePiece tokenizer, as transformers loads Gemma's: GemmaTokenizer (normalizer " " -> "▁",
    no dummy prefix, byte fallback), which splits text like sentencepiece and llama.cpp without any rewiring."""
    from transformers import GemmaTokenizer

    from lowrank.templates import BUILTIN_TEMPLATES

    model_file = _train_spm(work, vocab_size, gemma=True)
    (work / "src").mkdir()
    shutil.copy(model_file, work / "src" / "tokenizer.model")
    # BOS in front of every text, as Gemma's tokenizer_config.json asks (GemmaTokenizer's own default is off).
    tok = GemmaTokenizer.from_pretrained(str(work / "src"), add_bos_token=True, add_eos_token=False)
    tok.init_kwargs.pop("vocab_file", None)  # the temp dir's path; the model file is copied beside the tokenizer
    if len(tok) < vocab_size:
        raise RuntimeError(f"SentencePiece tokenizer has {len(tok)} tokens, expected {vocab_size}: is protobuf installed?")
    # Gemma's tokenizer marks the turn markers special (the conversion leaves them plain user-defined tokens):
    # skipped when decoding with skip_special_tokens, CONTROL tokens in llama.cpp.
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = BUILTIN_TEMPLATES["gemma"]
    return tok, model_file


def _bpe_tokenizer(vocab_size: int, qwen: bool = False):
    """LLaMA-3 style byte-level BPE; with ``qwen``, Qwen2 style (what transformers' Qwen2Tokenizer rebuilds).

    transformers 5 loads any tokenizer of a qwen2 model as Qwen2Tokenizer, which keeps only the
    vocabulary, merges and post-processor of tokenizer.json and brings its own NFC normalizer,
    pre-tokenizer regex (single digits), merges without ignore_merges, and ``<|endoftext|>`` as
    unk/pad (an extra token past the embedding if the vocabulary lacks it). So a qwen2 tiny model
    gets exactly that tokenizer, with ChatML's special tokens and the chatml template, no BOS.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lowrank.templates import BUILTIN_TEMPLATES

    specials = QWEN2_SPECIAL_TOKENS if qwen else LLAMA3_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(ignore_merges=not qwen))
    if qwen:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_REGEX if qwen else LLAMA3_PRETOKENIZER_REGEX),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    # LLaMA 3 and Qwen2 keep their special tokens after the learned vocabulary.
    tok.add_special_tokens(specials)
    if qwen:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", chat_template=BUILTIN_TEMPLATES["chatml"],
                                       model_max_length=8192)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        chat_template=BUILTIN_TEMPLATES["llama3"],
        model_max_length=8192,
    )


# Gemma tiny models: a window shorter than verify's texts so that sliding-window layers differ from global ones.
GEMMA_SLIDING_WINDOW = 16
# Gemma 2's soft-caps (50 on attention scores, 30 on logits in the published models) scaled down to where a tiny
# model's scores and logits lie (its q/k weights scaled up: below), so that a file without them gives other logits.
GEMMA2_TINY_SOFTCAPS = dict(attn_logit_softcapping=1.0, final_logit_softcapping=0.5)
GEMMA2_TINY_QK_SCALE = 10.0


def _config(arch: str, vocab_size: int, tokenizer, **shape):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape["tie_word_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    if arch == "llama":
        if shape.get("rope_llama3"):  # LLaMA 3.1-style scaling: long wavelengths divided by 8, on a short window
            return LlamaConfig(**common, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        return LlamaConfig(**common, rope_theta=10000.0)
    if arch == "mistral":
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False)
    if arch == "qwen3":  # a head_dim of its own, as Qwen3 has (128 for 40 heads of a 5120-wide model)
        return Qwen3Config(**common, head_dim=2 * shape["hidden_size"] // shape["num_heads"], rope_theta=1000000.0,
                           use_sliding_window=False, attention_bias=False)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": shape.get("partial_rotary", 1.0)},
            sliding_window=None, pad_token_id=tokenizer.pad_token_id)
    if arch in ("gemma2", "gemma3"):
        # A head_dim of its own (256 for 16 heads of a 3584-wide Gemma 2 9B), attention scaled by
        # query_pre_attn_scalar = head_dim (what llama.cpp assumes but for the 27B models), GELU (tanh), tied.
        head = 2 * shape["hidden_size"] // shape["num_heads"]
        gemma = dict(common, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, head_dim=head,
                     query_pre_attn_scalar=head, sliding_window=GEMMA_SLIDING_WINDOW, rms_norm_eps=1e-6)
        if arch == "gemma2":  # every other layer slides; soft-capped attention scores and logits
            return Gemma2Config(**gemma, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                **GEMMA2_TINY_SOFTCAPS)
        # Gemma 3: 5 sliding layers then a global one, q/k norms, no soft-caps; rope base 1e6 on global layers
        # with the linear scaling (factor 8) of the 4B-27B models, 1e4 on sliding ones.
        return Gemma3TextConfig(**gemma, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    raise ValueError(f"tiny models come in llama, mistral, qwen2, qwen3, phi3, gemma2 and gemma3, not {arch!r}")


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "spm",
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    vocab_size: int = 1000,
    seed: int = 0,
    random_norms: bool = False,
    rope_llama3: bool = False,
    partial_rotary: float = 1.0,
) -> Path:
    """Write a tiny Hugging Face model dir (config, fp32 safetensors, tokenizer) and return its path.

    ``random_norms``: norm weights drawn around 1 (1 + 0.3 N(0, 1)) instead of transformers' ones, so that a
    norm written under the wrong name or axis changes the logits (export tests of q/k norms). Gemma stores a
    norm as its offset from 1 (it scales by 1 + w), so there the stored weights are 0.3 N(0, 1).
    ``rope_llama3`` (llama only): LLaMA 3.1's rope scaling, with an original window of 32 positions so that
    it changes the logits of short texts. ``partial_rotary`` (phi3 only): the share of each head the rope
    turns, 0.75 in Phi-4-mini.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        if tokenizer == "spm" and arch in ("gemma2", "gemma3"):
            tok, model_file = _gemma_tokenizer(Path(work), vocab_size)
        elif tokenizer == "spm":
            tok, model_file = _spm_tokenizer(Path(work), vocab_size)
        elif tokenizer == "bpe":
            tok, model_file = _bpe_tokenizer(vocab_size, qwen=arch in ("qwen2", "qwen3")), None
        else:
            raise ValueError(f"tokenizer must be 'spm' or 'bpe', not {tokenizer!r}")
        tok.model_max_length = max_position_embeddings
        tok.save_pretrained(out_dir)
        if model_file is not None:
            # Keep the SentencePiece model itself: GGUF export reads scores and piece types from it.
            shutil.copy(model_file, out_dir / "tokenizer.model")
    config = _config(
        arch, len(tok), tok,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * ((8 * hidden_size // 3 + 3) // 4),
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rope_llama3=rope_llama3, partial_rotary=partial_rotary,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if random_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
    if arch == "gemma2":
        # Attention scores of std-0.02 weights are ~0.03, far below any soft-cap: q and k drawn 10x larger put
        # them around the cap, so a file that drops or misreads attn_logit_softcapping gives other logits.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    param.mul_(GEMMA2_TINY_QK_SCALE)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a built-in model is built silently (it may happen inside any command)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=True,
                     temperature=0.7, top_p=0.9).save_pretrained(out_dir)
    return out_dir


def cache_dir() -> Path:
    return Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank")


def tiny_model_path(**kwargs) -> Path:
    """Build a tiny model once per set of arguments into the cache and return its dir."""
    from filelock import FileLock

    key_src = json.dumps({"v": BUILDER_VERSION, "corpus": hashlib.sha256(CORPUS.read_bytes()).hexdigest(), **kwargs},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = cache_dir() / "tiny"
    final = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if not (final / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
            build_tiny_model(tmp, **kwargs)
            tmp.rename(final)
    return final


def resolve_model_name(name: str) -> str:
    """Map the embedded names ("tiny", "tiny-bpe") to a built dir; anything else passes through."""
    if name in NAMED_MODELS:
        return str(tiny_model_path(**NAMED_MODELS[name]))
    return name
