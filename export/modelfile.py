"""An Ollama Modelfile next to a GGUF, so `ollama create NAME -f FILE` works as is.

Ollama templates are Go templates (text/template), not Jinja, so the known chat template
families (lowrank.templates) are rewritten by hand here, in Ollama's current form: a range
over .Messages (role and content of every turn, consecutive turns of one role merged, the
Modelfile's SYSTEM put first as a system message when the chat has none). The old
.System/.Prompt/.Response form is rendered once per exchange, so a multi-turn chat repeats
the template's head (alpaca's and vicuna's default system text) before every turn.

Each template renders what the Jinja one renders with add_generation_prompt (without the
leading BOS, which llama.cpp adds), and leaves a last assistant message open (no end of
turn) so Ollama can continue it. The stop strings are the family's end-of-turn marker
(lowrank.templates.end_of_turn) and the text that opens a new user turn. A template we do
not recognise gets no TEMPLATE line (Ollama then reads tokenizer.chat_template from the GGUF
and picks its closest built-in) and a warning in the log.

The tokenizer's BOS/EOS texts and the system prompt come from files a user may have downloaded,
so nothing is written unquoted. Ollama's Modelfile parser has no escapes: a value ends at the
first line break where the text read so far is a whole "..." or triple-quoted string, and it drops
unprintable characters. Each value gets the quoting that reads back exactly (checked by
simulating that rule), or is left out with a warning; BOS/EOS texts that could open a Go
template action go into the template as Go string literals.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from lowrank.errors import UserError
from lowrank.export.gguf import atomic_output
from lowrank.templates import BUILTIN_TEMPLATES, end_of_turn

log = logging.getLogger(__name__)

# Go template pieces. $last: the message is the conversation's last one (Ollama's own templates use
# this idiom); {BOS}/{EOS} are filled with the tokenizer's texts.
_RANGE = "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
_OPEN_ASSISTANT = '{{ if and $last (ne $m.Role "assistant") }}'  # the generation prompt goes after the last turn
_CLOSE_TURN = '{{ if or (ne $m.Role "assistant") (not $last) }}'  # a last assistant turn stays open
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")

# family -> (Go template, stop strings besides the family's end of turn).
# alpaca, vicuna, llama2 print .System (every system message) once, in their own place, and skip
# system turns in the loop; llama3 and chatml give a system turn its own header, in the loop.
GO_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "alpaca": ("{{ if .System }}{{ .System }}{{ else }}" + _ALPACA_SYSTEM + "{{ end }}" + _RANGE
               + '{{ if eq $m.Role "user" }}\n\n### Instruction:\n{{ $m.Content }}'
               "{{ if $last }}\n\n### Response:\n{{ end }}"
               '{{ else if eq $m.Role "assistant" }}\n\n### Response:\n{{ $m.Content }}{{ if not $last }}{EOS}{{ end }}'
               "{{ end }}{{ end }}", ["### Instruction:"]),
    "vicuna": ("{{ if .System }}{{ .System }}{{ else }}" + _VICUNA_SYSTEM + "{{ end }}" + _RANGE
               + '{{ if eq $m.Role "user" }} USER: {{ $m.Content }}{{ if $last }} ASSISTANT:{{ end }}'
               '{{ else if eq $m.Role "assistant" }} ASSISTANT: {{ $m.Content }}{{ if not $last }}{EOS}{{ end }}'
               "{{ end }}{{ end }}", ["USER:"]),
    # BOS opens every user turn but the first (llama.cpp adds that one); the system prompt sits in the
    # first turn that is not a system one.
    "llama2": ("{{ $first := true }}" + _RANGE
               + '{{ if eq $m.Role "user" }}{{ if not $first }}{BOS}{{ end }}[INST] '
               "{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ $m.Content }} [/INST]"
               '{{ else if eq $m.Role "assistant" }} {{ $m.Content }}{{ if not $last }} {EOS}{{ end }}{{ end }}'
               '{{ if ne $m.Role "system" }}{{ $first = false }}{{ end }}{{ end }}', ["[INST]"]),
    "llama3": (_RANGE + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}"
               + _CLOSE_TURN + "<|eot_id|>{{ end }}"
               + _OPEN_ASSISTANT + "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{ end }}",
               ["<|start_header_id|>"]),
    # mistral and gemma have no system role: the system prompt opens the first user turn, as in Jinja.
    "mistral": ("{{ $first := true }}" + _RANGE
                + '{{ if eq $m.Role "user" }}[INST] {{ if and $first $.System }}{{ $.System }}\n\n{{ end }}'
                "{{ $m.Content }} [/INST]"
                '{{ else if eq $m.Role "assistant" }}{{ $m.Content }}{{ if not $last }}{EOS}{{ end }}{{ end }}'
                '{{ if ne $m.Role "system" }}{{ $first = false }}{{ end }}{{ end }}', ["[INST]"]),
    "gemma": ("{{ $first := true }}" + _RANGE
              + '{{ if eq $m.Role "user" }}<start_of_turn>user\n{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}'
              "{{ $m.Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}"
              '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}'
              "{{ if not $last }}<end_of_turn>\n{{ end }}{{ end }}"
              '{{ if ne $m.Role "system" }}{{ $first = false }}{{ end }}{{ end }}', ["<start_of_turn>"]),
    "phi3": (_RANGE + "<|{{ $m.Role }}|>\n{{ $m.Content }}"
             + _CLOSE_TURN + "<|end|>\n{{ end }}"
             + _OPEN_ASSISTANT + "<|assistant|>\n{{ end }}{{ end }}", ["<|user|>"]),
    "chatml": (_RANGE + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}"
               + _CLOSE_TURN + "<|im_end|>\n{{ end }}"
               + _OPEN_ASSISTANT + "<|im_start|>assistant\n{{ end }}{{ end }}", ["<|im_start|>"]),
}


def stop_strings(family: str, eos_token: str) -> list[str]:
    """Ollama's PARAMETER stop values for a built-in family: its end of turn, then the start of a user turn."""
    first = end_of_turn(family, SimpleNamespace(eos_token=eos_token))
    return list(dict.fromkeys(s for s in [first, eos_token, *GO_TEMPLATES[family][1]] if s))


def _go_text(text: str) -> str:
    """``text`` as it must stand in a Go template to print itself: as is, or as a string literal when it holds
    a brace (which could open an action, alone or with the template's next "{{"), a quote or a line break
    (which could end the Modelfile's quoted TEMPLATE early)."""
    plain = text.isprintable() and "{" not in text and '"' not in text
    return text if plain else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def go_template(family: str, bos_token: str, eos_token: str) -> str:
    """The Ollama TEMPLATE of a built-in family with the tokenizer's BOS/EOS texts filled in."""
    return GO_TEMPLATES[family][0].replace("{BOS}", _go_text(bos_token)).replace("{EOS}", _go_text(eos_token))


def template_family(jinja: str | None) -> str | None:
    """The built-in family a Jinja chat template is, by exact match, else None."""
    for name, text in BUILTIN_TEMPLATES.items():
        if jinja == text:
            return name
    return None


_BLOCK = ('"""', '"')  # templates and system prompts: triple quotes, as Ollama's docs write them


def _unquote(text: str) -> str | None:
    """What Ollama makes of a value read so far (spaces trimmed): its content, or None while a quote is open."""
    for mark in ('"""', '"'):
        if text.startswith(mark):
            return text[len(mark):-len(mark)] if len(text) >= 2 * len(mark) and text.endswith(mark) else None
    return text


def _read_back(value: str) -> str | None:
    """The text Ollama's parser reads from ``value`` written after a command, or None when it would stop early
    (the rest of ``value`` would then be read as new commands)."""
    read: list[str] = []
    for ch in value:
        if ch in "\r\n":
            if _unquote("".join(read).strip()) is not None:
                return None
            read.append(ch)
        elif ch.isprintable() or ch == "\t":
            read.append(ch)
    return _unquote("".join(read).strip())


def modelfile_value(text: str, quotes: tuple[str, ...] = ('"', '"""')) -> str | None:
    """``text`` in the first of ``quotes`` ("" for none) that Ollama reads back as exactly it, or None."""
    for mark in quotes:
        if _read_back(mark + text + mark) == text:
            return mark + text + mark
    return None


def _instruction(command: str, text: str, what: str, quotes: tuple[str, ...] = ('"', '"""')) -> list[str]:
    """``[command value]``, or [] with a warning when ``text`` cannot be written so that Ollama reads it back."""
    value = modelfile_value(text, quotes)
    if value is None:
        log.warning("the Modelfile leaves out %s %r: Ollama's parser cannot read it back as written", what, text)
        return []
    return [f"{command} {value}"]


def write_modelfile(gguf_path: str | Path, chat_template: str | None, eos_token: str, system: str | None = None,
                    adapter: str | Path | None = None, bos_token: str = "") -> Path:
    """Write ``<gguf stem>.Modelfile`` next to the GGUF (atomic rename) and return its path.

    With ``adapter`` (a LoRA GGUF in the same dir), the Modelfile is ``<adapter stem>.Modelfile``
    and applies it to the base GGUF with Ollama's ADAPTER instruction.
    BOS is not in the template: llama.cpp adds it itself (tokenizer.ggml.add_bos_token).
    """
    gguf_path = Path(gguf_path)
    files = [("FROM", gguf_path)] + ([("ADAPTER", Path(adapter))] if adapter is not None else [])
    lines = []
    for command, path in files:
        value = modelfile_value(f"./{path.name}", ("", '"', '"""'))
        if value is None:
            raise UserError(f"{path}: a Modelfile cannot name this file (rename it without line breaks)")
        lines.append(f"{command} {value}")
    family = template_family(chat_template)
    if family:
        template = _instruction("TEMPLATE", go_template(family, bos_token, eos_token), "the chat template", _BLOCK)
        lines += template
        if template:
            for stop in stop_strings(family, eos_token):
                lines += _instruction("PARAMETER stop", stop, "the stop string")
    elif chat_template:
        log.warning("chat template is not a built-in family; the Modelfile leaves TEMPLATE to Ollama's reading of the GGUF")
    if system:
        lines += _instruction("SYSTEM", system, "the system prompt", _BLOCK)
    out = (Path(adapter) if adapter is not None else gguf_path).with_suffix(".Modelfile")
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
