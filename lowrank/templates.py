"""Built-in chat templates, as Jinja strings in the Hugging Face `chat_template` format.

The same string formats the training data, is recorded in the adapter's
lowrank.json, and is written into the GGUF as `tokenizer.chat_template`, so
llama.cpp, Ollama and the apps format a conversation exactly as training did.

Conventions shared by every built-in:
- the rendering starts with ``bos_token`` (when the tokenizer has one), so the
  rendered text is tokenized with ``add_special_tokens=False``;
- an assistant turn is followed by the family's end-of-turn marker (``eos_token``,
  ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>`` or ``<|end|>``), which carries loss so the model
  learns to stop;
- rendering ``messages[:k]`` with ``add_generation_prompt=True`` is a prefix of the
  rendering of ``messages[:k+1]`` when message k is the assistant's. The SFT loss
  mask relies on this to find assistant spans without `{% generation %}` tags,
  which llama.cpp's template engine does not know.
"""

from __future__ import annotations

from lowrank.errors import UserError

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
# Families without a system role (mistral, gemma): the system text and a blank line open the first user turn.
_SYSTEM_OPENS_FIRST_USER = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # Stanford Alpaca's prompt; a system message replaces the preamble.
    "alpaca": (
        _BOS
        + "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    # Vicuna v1.1: "SYSTEM USER: ... ASSISTANT: ...</s>".
    "vicuna": (
        _BOS
        + "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    ),
    # Llama 2 chat: every user turn opens with BOS [INST], the system prompt sits
    # inside the first one between <<SYS>> markers, every answer ends with EOS.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        + _BOS
        + "{{ '[INST] ' }}"
        "{% if loop.first and system_message %}{{ '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # Llama 3 instruct: header-delimited turns closed by <|eot_id|>.
    "llama3": (
        _BOS
        + "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral instruct ([INST] format of Mistral-7B-Instruct v0.1-v0.3): one BOS, no system role (a
    # system message opens the first user turn), every answer closed by EOS.
    "mistral": (
        _BOS
        + _SYSTEM_OPENS_FIRST_USER
        + "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system_message if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # Gemma 2 / 3: <start_of_turn>user|model ... <end_of_turn>; no system role (a system message
    # opens the first user turn, as Gemma's own template does).
    "gemma": (
        _BOS
        + _SYSTEM_OPENS_FIRST_USER
        + "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '<start_of_turn>user\\n' + (system_message if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<start_of_turn>model\\n' + message['content'] + '<end_of_turn>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Phi-3 / Phi-4-mini: <|role|> headers, every turn closed by <|end|>.
    "phi3": (
        _BOS
        + "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # ChatML (Qwen, many community fine-tunes).
    "chatml": (
        _BOS
        + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}

# Used when the tokenizer has no chat template of its own (a base model).
DEFAULT_TEMPLATE = "vicuna"

def end_of_turn(name: str, tokenizer) -> str:
    """The text that closes an assistant turn in a built-in family (a stop string for generation)."""
    return {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>",
            "phi3": "<|end|>"}.get(name, tokenizer.eos_token)


# Tokens that close a turn in the templates lowrank knows (built-in and the common tokenizer ones).
END_OF_TURN_MARKERS = ("</s>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
                       "<|end|>")


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a response: EOS and every end-of-turn token the template's Jinja writes.

    Read from the template text, not its name, so a tokenizer's own template (name "tokenizer")
    stops at its end-of-turn token too.
    """
    ids = {tokenizer.eos_token_id}
    for marker in END_OF_TURN_MARKERS:
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if marker in template and isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def resolve_template(tokenizer, name: str | None) -> tuple[str, str]:
    """(name, jinja) of the template to use.

    ``None`` or ``"auto"`` takes the tokenizer's own ``chat_template`` when it has
    one (name ``"tokenizer"``), else the built-in DEFAULT_TEMPLATE.
    """
    if name in (None, "", "auto"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if own:
            return "tokenizer", own
        name = DEFAULT_TEMPLATE
    if name == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise UserError("template 'tokenizer': this tokenizer has no chat_template; "
                            f"pick one of: {', '.join(BUILTIN_TEMPLATES)}")
        return name, own
    if name not in BUILTIN_TEMPLATES:
        raise UserError(f"unknown chat template '{name}'; known: auto, tokenizer, {', '.join(BUILTIN_TEMPLATES)}")
    return name, BUILTIN_TEMPLATES[name]


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """Format ``messages`` with ``template`` as a string, with the tokenizer's special tokens."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
