"""export/vocab.py reads a tokenizer saved by transformers 5 from its files, without transformers, and gets
exactly what loading it with transformers gives; anything else goes through transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from lowrank.export.vocab import _facts_from_tokenizer, load_gguf_vocab, read_tokenizer_files
from lowrank.models import load_tokenizer

# The tokenizer kinds of the tiny models that transformers 5 saves as TokenizersBackend: LLaMA-2 SentencePiece,
# LLaMA-3 BPE, Qwen2 BPE. (Gemma's is saved as GemmaTokenizer, which transformers builds its own way.)
KINDS = {"spm": dict(tokenizer="spm"), "llama3": dict(tokenizer="bpe"), "qwen2": dict(tokenizer="bpe", arch="qwen2")}


def transformers_facts(model_dir):
    return _facts_from_tokenizer(load_tokenizer(str(model_dir), pad_with_eos=False))


@pytest.mark.parametrize("kind", KINDS)
def test_files_give_what_transformers_gives(tiny_model_factory, kind):
    model_dir = tiny_model_factory(**KINDS[kind])
    facts = read_tokenizer_files(model_dir)
    assert facts is not None  # saved by transformers 5: read from the files
    assert facts == transformers_facts(model_dir)


def test_a_tokenizer_class_of_its_own_goes_through_transformers(tiny_model_factory):
    model_dir = tiny_model_factory(tokenizer="spm", arch="gemma2")
    assert read_tokenizer_files(model_dir) is None
    vocab = load_gguf_vocab(model_dir, 1000)
    assert vocab.special_ids["bos"] == 2 and vocab.chat_template  # Gemma's layout, its template


def test_chat_template_jinja_wins_as_in_transformers(tiny_spm, tmp_path):
    # What the merge writes when the adapter was trained with a template of its own.
    model_dir = tmp_path / "merged"
    shutil.copytree(tiny_spm, model_dir)
    (model_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    facts = read_tokenizer_files(model_dir)
    assert facts.chat_template == "{{ messages[0]['content'] }}"
    assert facts == transformers_facts(model_dir)


@pytest.mark.parametrize("change", ["add_eos_token", "special_tokens_map", "other_class", "unknown_bos"])
def test_what_transformers_adds_to_the_files_goes_through_transformers(tiny_spm, tmp_path, change):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_spm, model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if change == "add_eos_token":
        config["add_eos_token"] = True
    elif change == "special_tokens_map":
        (model_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<unk>"}))
    elif change == "other_class":
        config["tokenizer_class"] = "LlamaTokenizer"
    else:
        config["bos_token"] = "<not-a-token>"
    config_file.write_text(json.dumps(config))
    assert read_tokenizer_files(model_dir) is None
    vocab = load_gguf_vocab(model_dir, 1024)  # still exported, by way of transformers (which adds a new bos)
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
