"""The embedded default model: offline, deterministic, with real tokenizers."""

import hashlib

import pytest
from transformers import AutoConfig, AutoTokenizer

from lowrank.tiny import build_tiny_model, resolve_model_name


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_spm_tokenizer_has_full_vocabulary_and_llama_specials(tiny_spm):
    tok = AutoTokenizer.from_pretrained(tiny_spm)
    # Without protobuf transformers 5 silently builds a 3-token vocabulary.
    assert len(tok) == 1000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tiny_spm / "tokenizer.model").exists()
    ids = tok("Hello world").input_ids
    assert ids[0] == 1 and len(ids) > 2


@pytest.mark.parametrize("fixture", ["tiny_spm", "tiny_bpe"])
def test_tokenizers_round_trip_any_text(fixture, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    text = "Größe 你好 🙂\n\n\t  def f(x):\n    return x  # 12345"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_bpe_tokenizer_is_llama3_style(tiny_bpe):
    tok = AutoTokenizer.from_pretrained(tiny_bpe)
    assert len(tok) == 1000
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok("hi").input_ids[0] == tok.bos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", hidden_size=32, num_layers=1, seed=3)
    b = build_tiny_model(tmp_path / "b", hidden_size=32, num_layers=1, seed=3)
    c = build_tiny_model(tmp_path / "c", hidden_size=32, num_layers=1, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(tiny_model_factory, arch):
    cfg = AutoConfig.from_pretrained(tiny_model_factory(arch=arch, tie_word_embeddings=True))
    assert cfg.model_type == arch and cfg.tie_word_embeddings


@pytest.mark.parametrize("arch, model_type", [("gemma2", "gemma2"), ("gemma3", "gemma3_text")])
def test_gemma_tiny_models_get_gemmas_sentencepiece_tokenizer(tiny_model_factory, arch, model_type):
    import sentencepiece

    path = tiny_model_factory(tokenizer="spm", arch=arch)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type and config.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "GemmaTokenizer"
    # Without protobuf transformers 5 silently builds GemmaTokenizer's 5-token default vocabulary.
    assert len(tok) == config.vocab_size == 1000
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    start, end = tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert tok.added_tokens_decoder[start].special and tok.added_tokens_decoder[end].special
    # BOS first; the turn markers are single tokens; no dummy-prefix space, after a special token either.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert sp.id_to_piece(sp.encode("Hello")[0]).startswith("H")  # not "\u2581H...": no dummy prefix
    expected = [2, start] + sp.encode("user\n  Hello world") + [end] + sp.encode("\n")
    assert tok("<start_of_turn>user\n  Hello world<end_of_turn>\n").input_ids == expected
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_named_models_resolve_to_built_dirs():
    path = resolve_model_name("tiny")
    assert AutoConfig.from_pretrained(path).hidden_size == 128
    assert resolve_model_name("some/hub-id") == "some/hub-id"


def test_spm_tokenizer_tokenizes_like_sentencepiece_around_special_tokens(tiny_spm):
    # sentencepiece (and llama.cpp) put the dummy-prefix "▁" before every run of text, also after a
    # special token and also before a run that starts with a space ("</s> USER:" -> "▁▁USER:").
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_spm / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(tiny_spm)
    runs = ["A chat", "</s>", " USER: hi", "<s>", "Hello", "</s>", "  two spaces\n\nx"]
    expected = [i for r in runs for i in ([sp.piece_to_id(r)] if r in ("<s>", "</s>") else sp.encode(r))]
    assert tok("".join(runs), add_special_tokens=False).input_ids == expected
    assert tok("Hello").input_ids == [1] + sp.encode("Hello")


def test_qwen2_tiny_model_gets_a_qwen2_tokenizer_inside_its_vocabulary(tiny_model_factory):
    # transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer; every token it knows must have an embedding row.
    path = tiny_model_factory(tokenizer="bpe", arch="qwen2")
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == AutoConfig.from_pretrained(path).vocab_size == 1000
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("hi 123").input_ids == tok("hi 123", add_special_tokens=False).input_ids  # no BOS
    assert len(tok("123", add_special_tokens=False).input_ids) == 3  # Qwen2 splits digits one by one
