"""HF tokenizers of a LLaMA-style SentencePiece vocabulary made to split text exactly as
sentencepiece and llama.cpp do (``match_sentencepiece``); lowrank.models.load_tokenizer applies it
to every tokenizer a stage loads, and the HF chat backend to the ones it loads itself.
"""

from __future__ import annotations

import json
from pathlib import Path


# tokenizer.json normalizers (with no pre-tokenizer) of a LLaMA-2 SentencePiece vocabulary -> whether
# they add the dummy prefix: the original LLaMA-2 file's (Prepend + Replace), and Replace alone.
_PREPEND = {"type": "Prepend", "prepend": "\u2581"}
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_SPM_NORMALIZERS = {json.dumps(n, sort_keys=True): prefix for n, prefix in [
    ({"type": "Sequence", "normalizers": [_PREPEND, _REPLACE]}, True),
    ({"type": "Sequence", "normalizers": [_REPLACE]}, False), (_REPLACE, False)]}


def _dummy_prefix_in_model_file(tokenizer) -> bool | None:
    """add_dummy_prefix of the tokenizer's SentencePiece model file, None when it has none.

    GGUF export writes this flag as tokenizer.ggml.add_space_prefix, which is what llama.cpp obeys.
    """
    vocab_file = tokenizer.init_kwargs.get("vocab_file")
    if not vocab_file or not str(vocab_file).endswith(".model") or not Path(vocab_file).is_file():
        return None
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(vocab_file).read_bytes())
    except Exception:  # noqa: BLE001 - not a SentencePiece model (a tiktoken file, say): no opinion
        return None
    return bool(proto.normalizer_spec.add_dummy_prefix)


def match_sentencepiece(tokenizer) -> bool:
    """Make a LLaMA-style SentencePiece tokenizer split text like sentencepiece and llama.cpp; True if it is one.

    transformers 5 loads such a vocabulary (tokenizer_class LlamaTokenizer / LlamaTokenizerFast,
    from tokenizer.model or tokenizer.json) with a Metaspace pre-tokenizer that puts the
    dummy-prefix "▁" only at the start of the input (legacy=False) or only before runs that do
    not start with a space (legacy=True). sentencepiece, and llama.cpp after every special token
    (src/llama-vocab.cpp, LLAMA_VOCAB_TYPE_SPM), put it before every run of text: "</s> USER:"
    is "</s>", "▁▁USER:" there, "</s>", "▁USER:" in HF. A model trained on HF's ids would see
    other ids in llama.cpp. The fix is the original LLaMA-2 tokenizer.json pipeline (see
    :func:`lowrank.tiny.sentencepiece_normalizer`) with every added token matched on the raw text,
    so each run between added tokens is normalized, and prefixed, on its own.

    Recognised: a BPE or Unigram vocabulary behind a Metaspace pre-tokenizer and no normalizer,
    or behind one of the LLaMA-2 normalizers above. Anything else (byte-level BPE, other
    normalizers) is left as it is; lowrank verify reports a tokenizer llama.cpp splits differently.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if spec.get("model", {}).get("type") not in ("BPE", "Unigram"):
        return False
    if pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" and norm is None:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        dummy_prefix = scheme != "never"
    elif pre is None and json.dumps(norm, sort_keys=True) in _SPM_NORMALIZERS:
        dummy_prefix = _SPM_NORMALIZERS[json.dumps(norm, sort_keys=True)]
    else:
        return False
    from_file = _dummy_prefix_in_model_file(tokenizer)
    dummy_prefix = from_file if from_file is not None else dummy_prefix
    # The same pipeline as lowrank.tiny.sentencepiece_normalizer (without the Prepend if no dummy prefix).
    spec["normalizer"] = {"type": "Sequence", "normalizers": [_PREPEND, _REPLACE] if dummy_prefix else [_REPLACE]}
    spec["pre_tokenizer"] = None
    # llama.cpp matches every added token (control or user-defined) on the raw text.
    for added in spec.get("added_tokens", []):
        added["normalized"] = False
    # Rebuilt rather than edited in place: re-adding a token that was normalized leaves tokenizers'
    # id -> text map holding its normalized text ("\u2581</s>").
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return True
