"""The tokenizer part of a GGUF file: vocabulary, merges, token types, special tokens, template.

Two kinds, as llama.cpp knows them (facts from llama.cpp's convert_hf_to_gguf.py
``_set_vocab_sentencepiece`` / ``_set_vocab_gpt2`` and src/llama-vocab.cpp):
- SentencePiece (LLaMA-1/2, Mistral, Gemma): tokenizer.ggml.model = "llama"; every piece with
  its score and type read from tokenizer.model. Byte-fallback pieces ``<0x0A>`` are BYTE,
  ``<s>``/``</s>`` CONTROL, ``<unk>`` UNKNOWN, user-defined pieces USER_DEFINED (CONTROL when
  the HF tokenizer has them as special tokens, like Gemma's turn markers); tokens added on top in
  the HF tokenizer are USER_DEFINED (CONTROL when special). add_space_prefix is the model's
  add_dummy_prefix (false for Gemma, as llama.cpp's Gemma converters write it).
- Byte-level BPE (LLaMA-3, Qwen2): tokenizer.ggml.model = "gpt2"; tokens in id order,
  merges as "left right" strings, added special tokens CONTROL. llama.cpp does not run the
  HF pre-tokenizer; it picks a built-in regex by tokenizer.ggml.pre. Its converter finds
  the name by hashing the tokenization of a check text, which only recognises published
  vocabularies. A vocabulary we trained ourselves would never match, so we identify the
  pre-tokenizer by what determines llama.cpp's behaviour: the Split regex (and the
  ignore_merges flag) in tokenizer.json. Anything else is a UserError, never a guess.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lowrank.errors import UserError

log = logging.getLogger(__name__)

# Pre-tokenizer regexes as published in tokenizer.json, -> llama.cpp's tokenizer.ggml.pre name
# (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3 <- "llama-bpe", QWEN2 <- "qwen2").
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

# Token texts that close a turn in chat families; written as tokenizer.ggml.eot_token_id.
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


@dataclass
class GGUFVocab:
    """Everything the GGUF writer needs about the tokenizer."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str] = field(default_factory=list)
    pre: str | None = None  # tokenizer.ggml.pre, BPE only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece only
    chat_template: str | None = None


def _token_types():
    import gguf

    return gguf.TokenType


def _sentencepiece_vocab(model_dir: Path, added_tokens: dict[int, tuple[str, bool]], vocab_size: int) -> GGUFVocab:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    T = _token_types()
    path = model_dir / "tokenizer.model"
    try:
        sp = SentencePieceProcessor(model_file=str(path))
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except (RuntimeError, OSError, ValueError) as e:  # sentencepiece raises RuntimeError on a bad protobuf
        raise UserError(f"{path}: not a readable SentencePiece model ({str(e).splitlines()[0]})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(T.UNKNOWN)
        elif sp.is_control(i):
            types.append(T.CONTROL)
        elif sp.is_unused(i):
            types.append(T.UNUSED)
        elif sp.is_byte(i):
            types.append(T.BYTE)
        elif proto.pieces[i].type == proto.pieces[i].USER_DEFINED:
            types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    # Pieces of the model that the HF tokenizer treats as special (Gemma's <start_of_turn>, <end_of_turn>, <mask>:
    # user-defined pieces in tokenizer.model) are CONTROL, as llama.cpp's converter (_set_vocab_sentencepiece)
    # writes the special entries of added_tokens_decoder. As NORMAL pieces llama.cpp would spell them out letter
    # by letter; as CONTROL it matches them in the text like HF (with special=True) and does not print them.
    for tid, (_, special) in added_tokens.items():
        if tid < len(types) and special and types[tid] in (T.NORMAL, T.USER_DEFINED):
            types[tid] = T.CONTROL
    # Tokens the HF tokenizer adds on top of the SentencePiece model.
    for tid, (content, special) in sorted(added_tokens.items()):
        if tid < len(tokens):
            continue
        if tid != len(tokens):
            raise UserError(f"{model_dir}: added token {content!r} has id {tid}, leaving a gap after {len(tokens)}")
        tokens.append(content)
        scores.append(-1000.0)
        types.append(T.CONTROL if special else T.USER_DEFINED)
    _pad_vocab(tokens, scores, types, vocab_size)
    add_space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    return GGUFVocab("llama", tokens, scores, [int(t) for t in types], add_space_prefix=add_space_prefix)


def _pad_vocab(tokens: list, scores: list, types: list, vocab_size: int) -> None:
    """The embedding may have more rows than the tokenizer has tokens; llama.cpp needs one entry per row."""
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(_token_types().UNUSED)


def bpe_pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's tokenizer.ggml.pre name for the pre-tokenizer in tokenizer.json, or UserError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p["pattern"]["Regex"] for p in parts if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(regexes) == 1 and byte_level and not byte_level[0].get("use_regex", True):
        name = KNOWN_PRE_TOKENIZERS.get(regexes[0])
        if name:
            # llama.cpp's "llama-bpe" looks a word up whole before merging (ignore_merges).
            if name == "llama-bpe" and not tokenizer_json["model"].get("ignore_merges", False):
                raise UserError(f"{where}: LLaMA-3 pre-tokenizer without ignore_merges; llama.cpp would tokenize differently")
            return name
    if not regexes and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"  # plain GPT-2 byte-level pre-tokenizer
    raise UserError(
        f"{where}: unknown pre-tokenizer {json.dumps(pre)[:200]}; llama.cpp would split text differently. "
        f"Supported: LLaMA-3 ('llama-bpe'), Qwen2 ('qwen2'), GPT-2 byte-level ('gpt-2')"
    )


def _bpe_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    T = _token_types()
    where = str(model_dir / "tokenizer.json")
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    by_id: dict[int, tuple[str, int]] = {i: (t, T.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], T.CONTROL if added.get("special") else T.USER_DEFINED)
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{where}: token ids are not contiguous from 0")
    tokens = [by_id[i][0] for i in range(len(by_id))]
    types = [int(by_id[i][1]) for i in range(len(by_id))]
    scores = [0.0] * len(tokens)
    _pad_vocab(tokens, scores, types, vocab_size)
    # Merges are stored as ["a", "b"] pairs (tokenizers >= 0.20) or "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab("gpt2", tokens, scores, types, merges=merges, pre=bpe_pre_tokenizer_name(data, where))


@dataclass
class TokenizerFacts:
    """What a GGUF takes from the HF tokenizer beyond tokenizer.model / tokenizer.json's vocabulary."""

    added_tokens: dict[int, tuple[str, bool]]  # id -> (text, special) of the tokenizer's added tokens
    special_ids: dict[str, int]  # bos/eos/unk/pad -> id, those the tokenizer defines
    add_bos: bool  # the tokenizer puts BOS before plain text
    add_eos: bool  # ... and EOS after it
    chat_template: str | None


def _facts_from_tokenizer(tokenizer) -> TokenizerFacts:
    """The facts of a loaded transformers tokenizer; BOS/EOS adding observed, not read from flags that vary by class."""
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            ids[name] = int(tid)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos, add_eos = _adds_bos_eos(with_special, without, ids)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    added = {tid: (t.content, bool(t.special)) for tid, t in tokenizer.added_tokens_decoder.items()}
    return TokenizerFacts(added, ids, add_bos, add_eos, template or None)


def _adds_bos_eos(with_special: list[int], without: list[int], ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding "a" with special tokens put BOS in front / EOS behind what it gives without."""
    longer = len(with_special) > len(without)
    return (longer and "bos" in ids and with_special[0] == ids["bos"],
            longer and "eos" in ids and with_special[-1] == ids["eos"])


# tokenizer_config.json keys that change nothing a GGUF takes from the tokenizer. A config with any other key
# (add_bos_token, added_tokens_decoder, legacy, a tokenizer class's own options, ...) is read by transformers.
_PLAIN_CONFIG_KEYS = {"backend", "tokenizer_class", "bos_token", "eos_token", "unk_token", "pad_token", "chat_template",
                      "model_max_length", "clean_up_tokenization_spaces", "model_input_names", "padding_side",
                      "truncation_side"}
# Files transformers merges into what tokenizer_config.json and tokenizer.json say.
_MERGED_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json", "additional_chat_templates")


def read_tokenizer_files(model_dir: Path) -> TokenizerFacts | None:
    """The facts transformers 5 would load, read from the files, when the dir holds a tokenizer it loads as saved.

    That is a tokenizer.json with a tokenizer_config.json of class TokenizersBackend (what transformers 5 saves,
    so every dir lowrank writes) and only the keys of _PLAIN_CONFIG_KEYS: transformers then uses tokenizer.json
    as it is, with the special tokens the config names. Importing transformers (and torch, which it pulls in)
    and building the tokenizer takes seconds, longer than writing a 1B model's Q8_0 file; the tokenizers
    library that runs tokenizer.json takes milliseconds. None for anything else (another class, a
    special_tokens_map.json, a special token that is not in the vocabulary, a file that does not parse):
    load_gguf_vocab then loads the tokenizer with transformers, which reports what is wrong.
    tests/test_export_vocab.py checks that both give the same vocabulary.
    """
    config_file, tokenizer_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()) or any((model_dir / f).exists() for f in _MERGED_FILES):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") != "TokenizersBackend" or set(config) - _PLAIN_CONFIG_KEYS:
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizer_file))
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a file that does not parse: transformers reads it again and says what is wrong
        return None
    added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])}
    added_ids = {text: tid for tid, (text, _) in added.items()}
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{name}_token")
        text = value.get("content") if isinstance(value, dict) else value
        if text is None:
            continue
        tid = backend.token_to_id(text) if isinstance(text, str) else None
        # A special token that is not an added special token: transformers would add or re-flag it.
        if tid is None or not added.get(tid, ("", False))[1] or added_ids.get(text) != tid:
            return None
        ids[name] = tid
    add_bos, add_eos = _adds_bos_eos(backend.encode("a", add_special_tokens=True).ids,
                                     backend.encode("a", add_special_tokens=False).ids, ids)
    template = config.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")  # transformers lets chat_template.jinja win
    if template is not None and not isinstance(template, str):
        return None  # a list of named templates
    return TokenizerFacts(added, ids, add_bos, add_eos, template or None)


def _special_ids(ids: dict[str, int], tokens: list[str]) -> dict[str, int]:
    ids = dict(ids)
    for text in EOT_TOKENS:
        if text in tokens:
            ids["eot"] = tokens.index(text)
            break
    return ids


def load_tokenizer_facts(model_dir: Path) -> TokenizerFacts:
    """read_tokenizer_files, or else the tokenizer loaded as training loaded it (lowrank.models.load_tokenizer)."""
    facts = read_tokenizer_files(model_dir)
    if facts is not None:
        return facts
    from lowrank.models import load_tokenizer

    try:
        # The loader training used, so the file's add_space_prefix and the ids training saw agree.
        tokenizer = load_tokenizer(str(model_dir), pad_with_eos=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is a bad model dir
        raise UserError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    return _facts_from_tokenizer(tokenizer)


def load_gguf_vocab(model_dir: str | Path, vocab_size: int, chat_template: str | None = None) -> GGUFVocab:
    """Read the tokenizer of an HF model dir into a GGUFVocab.

    ``chat_template`` overrides the tokenizer's own (e.g. the one recorded in lowrank.json).
    """
    model_dir = Path(model_dir)
    facts = load_tokenizer_facts(model_dir)
    if (model_dir / "tokenizer.model").exists():
        vocab = _sentencepiece_vocab(model_dir, facts.added_tokens, vocab_size)
    elif (model_dir / "tokenizer.json").exists():
        vocab = _bpe_vocab(model_dir, vocab_size)
    else:
        raise UserError(f"{model_dir}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE) to export")
    if len(vocab.tokens) > vocab_size:
        raise UserError(f"{model_dir}: tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {vocab_size}")
    vocab.special_ids = _special_ids(facts.special_ids, vocab.tokens)
    vocab.add_bos, vocab.add_eos = facts.add_bos, facts.add_eos
    vocab.chat_template = chat_template or facts.chat_template
    return vocab


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add the tokenizer.ggml.* keys and tokenizer.chat_template to a GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    elif vocab.model == "llama":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for name, tid in vocab.special_ids.items():
        adders[name](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
