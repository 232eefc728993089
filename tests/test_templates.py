"""Built-in chat templates render each family's published format; template resolution and its errors."""

from __future__ import annotations

import pytest

from lowrank.errors import UserError
from lowrank.templates import BUILTIN_TEMPLATES, end_of_turn, render, resolve_template

CHAT = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]

# Rendered with the LLaMA-style tokenizer: bos_token "<s>", eos_token "</s>".
# (full conversation, conversation up to Q2 + generation prompt)
EXPECTED = {
    # Stanford Alpaca: the system text replaces the preamble; answers end with EOS.
    "alpaca": ("<s>SYS\n\n### Instruction:\nQ1\n\n### Response:\nA1</s>\n\n### Instruction:\nQ2\n\n### Response:\nA2</s>",
               "<s>SYS\n\n### Instruction:\nQ1\n\n### Response:\nA1</s>\n\n### Instruction:\nQ2\n\n### Response:\n"),
    # Vicuna v1.1 (FastChat writes no space after </s>; this template does, in training and in the GGUF alike).
    "vicuna": ("<s>SYS USER: Q1 ASSISTANT: A1</s> USER: Q2 ASSISTANT: A2</s>",
               "<s>SYS USER: Q1 ASSISTANT: A1</s> USER: Q2 ASSISTANT:"),
    # Llama 2 chat (Meta's reference): BOS [INST] per user turn, <<SYS>> inside the first, " </s>" after answers.
    "llama2": ("<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>",
               "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
               "<s><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
               "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"),
    # Mistral instruct (its tokenizer's template): one BOS, the system text opens the first [INST], EOS after answers.
    "mistral": ("<s>[INST] SYS\n\nQ1 [/INST]A1</s>[INST] Q2 [/INST]A2</s>",
                "<s>[INST] SYS\n\nQ1 [/INST]A1</s>[INST] Q2 [/INST]"),
    # Gemma 2/3: user and model turns, the system text at the start of the first user turn.
    "gemma": ("<s><start_of_turn>user\nSYS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
              "<s><start_of_turn>user\nSYS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n"),
    # Phi-3 / Phi-4-mini: <|role|> headers, <|end|> after every turn.
    "phi3": ("<s><|system|>\nSYS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n"
             "<|assistant|>\nA2<|end|>\n",
             "<s><|system|>\nSYS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n"
             "<|assistant|>\n"),
}


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny_bpe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_bpe))


def test_every_builtin_has_its_family_format_here():
    assert sorted(BUILTIN_TEMPLATES) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_system_and_two_turns_in_its_family_format(spm_tokenizer, name):
    full, generation = EXPECTED[name]
    assert render(BUILTIN_TEMPLATES[name], CHAT, spm_tokenizer) == full
    assert render(BUILTIN_TEMPLATES[name], CHAT[:4], spm_tokenizer, add_generation_prompt=True) == generation


@pytest.mark.parametrize("name", ["alpaca", "vicuna"])
def test_without_a_system_message_the_default_preamble_is_used(spm_tokenizer, name):
    text = render(BUILTIN_TEMPLATES[name], CHAT[1:3], spm_tokenizer)
    preamble = "Below is an instruction" if name == "alpaca" else "A chat between a curious user"
    assert text.startswith("<s>" + preamble)


def test_llama3_on_its_own_tokenizer_starts_with_begin_of_text(bpe_tokenizer):
    text = render(BUILTIN_TEMPLATES["llama3"], CHAT[1:3], bpe_tokenizer)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>")


def test_auto_takes_the_tokenizers_own_template_else_vicuna(spm_tokenizer, bpe_tokenizer):
    assert resolve_template(bpe_tokenizer, None) == ("tokenizer", bpe_tokenizer.chat_template)
    assert resolve_template(bpe_tokenizer, "auto")[0] == "tokenizer"
    assert resolve_template(spm_tokenizer, None) == ("vicuna", BUILTIN_TEMPLATES["vicuna"])
    assert resolve_template(bpe_tokenizer, "chatml") == ("chatml", BUILTIN_TEMPLATES["chatml"])


def test_unknown_template_is_refused_listing_the_known_ones(spm_tokenizer):
    with pytest.raises(UserError) as error:
        resolve_template(spm_tokenizer, "zephyr")
    message = str(error.value)
    assert "zephyr" in message and all(name in message for name in BUILTIN_TEMPLATES)


def test_tokenizer_template_on_a_tokenizer_without_one_is_refused(spm_tokenizer):
    with pytest.raises(UserError, match="no chat_template"):
        resolve_template(spm_tokenizer, "tokenizer")


def test_end_of_turn_is_the_family_stop_string(spm_tokenizer):
    assert [end_of_turn(n, spm_tokenizer) for n in ("alpaca", "vicuna", "llama2", "llama3", "chatml")] == [
        "</s>", "</s>", "</s>", "<|eot_id|>", "<|im_end|>"]


def test_stop_ids_come_from_the_template_text_also_for_a_tokenizer_template(tiny_spm):
    """A tokenizer's own ChatML template (name "tokenizer") stops at <|im_end|>, not only at EOS (</s>)."""
    from lowrank.models import load_tokenizer
    from lowrank.templates import BUILTIN_TEMPLATES, end_of_turn, stop_token_ids

    tokenizer = load_tokenizer(str(tiny_spm))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(im_end, int) and im_end != tokenizer.eos_token_id
    own = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    assert stop_token_ids(tokenizer, own) == sorted({tokenizer.eos_token_id, im_end})
    for name, jinja in BUILTIN_TEMPLATES.items():  # built-in templates: EOS and their end of turn if one token
        eot = tokenizer.convert_tokens_to_ids(end_of_turn(name, tokenizer))
        wanted = {tokenizer.eos_token_id} | ({eot} if eot != tokenizer.unk_token_id else set())
        assert set(stop_token_ids(tokenizer, jinja)) >= wanted, name
