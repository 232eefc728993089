"""lowrank.models.load_tokenizer gives a hub-style LLaMA-2 SentencePiece dir sentencepiece's (and llama.cpp's) ids.

A LLaMA-1/2 or Mistral model dir from the hub holds tokenizer.model and a tokenizer_config.json
naming LlamaTokenizer, often with a tokenizer.json too. transformers 5 loads it with a Metaspace
pre-tokenizer that drops sentencepiece's dummy-prefix "▁" after special tokens, so training would
see other ids than llama.cpp runs. These dirs are built here from the tiny SentencePiece model.
"""

from __future__ import annotations

import json
import shutil

import pytest

from lowrank.models import load_tokenizer
from lowrank.spm_split import match_sentencepiece
from lowrank.templates import BUILTIN_TEMPLATES

SPECIALS = ("<s>", "</s>")
# Each text is a list of runs; a run that is a special token is that token's id in sentencepiece,
# any other run is sentencepiece's encoding of it (sentencepiece does not parse special tokens).
TEXTS = [
    ["A chat", "</s>", " USER: hi", "<s>", "Hello"],  # special token, then a space and text
    ["</s>", "\n", "<s>", "  x", "</s>"],  # special first, a newline and two spaces after special tokens
    ["  two leading spaces, then a trailing run   "],
    ["runs   of    spaces\t\tand tabs"],
    ["line one\n\nline two\n"],
    ["emoji 🙂🎉 👍🏽"],
    ["机器学习是人工智能的一个分支。"],
    [" "],
]


def _expected(sp, runs: list[str]) -> list[int]:
    return [i for r in runs for i in ([sp.piece_to_id(r)] if r in SPECIALS else sp.encode(r))]


def _hub_dir(tiny_spm, dest, *, tokenizer_json: str | None, legacy: bool | None = False, dummy_prefix: bool = True,
             normalized_specials: bool = False):
    """A model dir laid out like a hub LLaMA-2 one: tokenizer.model + tokenizer_config.json (LlamaTokenizer).

    ``tokenizer_json``: None (no tokenizer.json), "hf" (what transformers' LlamaTokenizer saves: Metaspace)
    or "llama2" (the original LLaMA-2 file's Prepend + Replace normalizer). ``normalized_specials``:
    tokenizer_config.json declares <unk>, <s>, </s> as normalized (matched in normalized text), as some do.
    """
    from transformers import LlamaTokenizer

    dest.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_spm / name, dest / name)
    model_file = (tiny_spm / "tokenizer.model").read_bytes()
    if not dummy_prefix:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file)
        proto.normalizer_spec.add_dummy_prefix = False
        model_file = proto.SerializeToString()
    (dest / "tokenizer.model").write_bytes(model_file)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 512}
    if legacy is not None:
        config["legacy"] = legacy
    if normalized_specials:
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "single_word": False, "normalized": True,
                     "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if tokenizer_json == "hf":
        saved = dest / "saved"
        LlamaTokenizer.from_pretrained(str(dest)).save_pretrained(str(saved))
        shutil.move(saved / "tokenizer.json", dest / "tokenizer.json")
        shutil.rmtree(saved)
        assert json.loads((dest / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "Metaspace"
    elif tokenizer_json == "llama2":
        shutil.copy(tiny_spm / "tokenizer.json", dest / "tokenizer.json")
    return dest


VARIANTS = {
    "model-only": dict(tokenizer_json=None),
    "model-only-legacy": dict(tokenizer_json=None, legacy=True),
    "hf-tokenizer-json": dict(tokenizer_json="hf"),
    "llama2-tokenizer-json": dict(tokenizer_json="llama2", legacy=None),
    "no-dummy-prefix": dict(tokenizer_json=None, dummy_prefix=False),
    "normalized-specials": dict(tokenizer_json=None, normalized_specials=True),
}


@pytest.fixture(scope="module")
def hub_dirs(tiny_spm, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-llama2")
    return {name: _hub_dir(tiny_spm, root / name, **kwargs) for name, kwargs in VARIANTS.items()}


def _sentencepiece(model_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def test_transformers_default_drops_the_dummy_prefix_after_special_tokens(hub_dirs):
    # Why the loader exists: plain AutoTokenizer gives "</s>", "▁USER" where sentencepiece gives "</s>", "▁▁USER".
    from transformers import AutoTokenizer

    sp = _sentencepiece(hub_dirs["hf-tokenizer-json"])
    tok = AutoTokenizer.from_pretrained(str(hub_dirs["hf-tokenizer-json"]))
    assert tok("".join(TEXTS[0]), add_special_tokens=False).input_ids != _expected(sp, TEXTS[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_tokenizer_gives_sentencepiece_ids(hub_dirs, variant):
    model_dir = hub_dirs[variant]
    sp = _sentencepiece(model_dir)
    tok = load_tokenizer(str(model_dir))
    mismatches = [runs for runs in TEXTS
                  if tok("".join(runs), add_special_tokens=False).input_ids != _expected(sp, runs)]
    assert mismatches == []
    assert tok("Hello world").input_ids == [sp.bos_id()] + sp.encode("Hello world")
    assert tok.pad_token == "</s>" and tok.convert_ids_to_tokens([1, 2]) == ["<s>", "</s>"]
    assert tok.decode(tok("Hi</s>").input_ids).endswith("Hi</s>")  # not "Hi▁</s>" or "Hi </s>"


def test_load_tokenizer_is_idempotent_on_the_tiny_tokenizer(tiny_spm):
    tok = load_tokenizer(str(tiny_spm))
    before = tok.backend_tokenizer.to_str()
    assert match_sentencepiece(tok) and tok.backend_tokenizer.to_str() == before


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_byte_level_bpe_tokenizers_are_left_alone(tiny_model_factory, kind):
    from transformers import AutoTokenizer

    path = tiny_model_factory(tokenizer="bpe", arch="qwen2" if kind == "qwen2" else "llama")
    plain, loaded = AutoTokenizer.from_pretrained(str(path)), load_tokenizer(str(path))
    assert not match_sentencepiece(plain)
    assert loaded.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()
    text = "".join(TEXTS[0]) + " 你好 🙂  x\n"
    assert loaded(text).input_ids == plain(text).input_ids


def test_unknown_sentencepiece_normalizer_is_left_alone(hub_dirs, tmp_path):
    # A normalizer lowrank does not know (here: Lowercase) is not replaced; lowrank verify reports the difference.
    model_dir = shutil.copytree(hub_dirs["llama2-tokenizer-json"], tmp_path / "lower")
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["normalizer"]["normalizers"].append({"type": "Lowercase"})
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(model_dir))
    assert json.loads(tok.backend_tokenizer.to_str())["normalizer"] == data["normalizer"]
    assert not match_sentencepiece(tok)


@pytest.mark.parametrize("variant", ["hf-tokenizer-json", "no-dummy-prefix"])
def test_exported_gguf_tokenizes_and_chats_like_training(hub_dirs, variant, tmp_path):
    # vicuna writes " USER:" right after </s>; llama.cpp reads it as "▁▁USER" (with the dummy prefix).
    from lowrank.export.gguf import export_gguf
    from lowrank.export.verify import check_gguf_file, verify_gguf

    model_dir = hub_dirs[variant]
    vicuna = BUILTIN_TEMPLATES["vicuna"]
    path = export_gguf(model_dir, tmp_path, ["f32"], name="m", chat_template=vicuna)[0]
    add_space_prefix = check_gguf_file(path).fields["tokenizer.ggml.add_space_prefix"].contents()
    assert add_space_prefix is (variant != "no-dummy-prefix")
    report = verify_gguf(path, model_dir, chat_template=vicuna, greedy_tokens=4)
    assert report.texts_checked == 8 and report.tokenization_mismatches == []
    assert report.chat_tokens_checked == 2 and report.chat_template_problem is None
    assert report.passed, report.problems
