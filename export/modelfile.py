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
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

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
    "chatml": (_RANGE + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}"
               + _CLOSE_TURN + "<|im_end|>\n{{ end }}"
               + _OPEN_ASSISTANT + "<|im_start|>assistant\n{{ end }}{{ end }}", ["<|im_start|>"]),
}


def stop_strings(family: str, eos_token: str) -> list[str]:
    """Ollama's PARAMETER stop values for a built-in family: its end of turn, then the start of a user turn."""
    first = end_of_turn(family, SimpleNamespace(eos_token=eos_token))
    return list(dict.fromkeys(s for s in [first, eos_token, *GO_TEMPLATES[family][1]] if s))


def go_template(family: str, bos_token: str, eos_token: str) -> str:
    """The Ollama TEMPLATE of a built-in family with the tokenizer's BOS/EOS texts filled in."""
    return GO_TEMPLATES[family][0].replace("{BOS}", bos_token).replace("{EOS}", eos_token)


def template_family(jinja: str | None) -> str | None:
    """The built-in family a Jinja chat template is, by exact match, else None."""
    for name, text in BUILTIN_TEMPLATES.items():
        if jinja == text:
            return name
    return None


def _quote(text: str) -> str:
    return '"""' + text + '"""'


def write_modelfile(gguf_path: str | Path, chat_template: str | None, eos_token: str, system: str | None = None,
                    adapter: str | Path | None = None, bos_token: str = "") -> Path:
    """Write ``<gguf stem>.Modelfile`` next to the GGUF (atomic rename) and return its path.

    With ``adapter`` (a LoRA GGUF in the same dir), the Modelfile is ``<adapter stem>.Modelfile``
    and applies it to the base GGUF with Ollama's ADAPTER instruction.
    BOS is not in the template: llama.cpp adds it itself (tokenizer.ggml.add_bos_token).
    """
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{Path(adapter).name}")
    family = template_family(chat_template)
    if family:
        lines.append(f"TEMPLATE {_quote(go_template(family, bos_token, eos_token))}")
        lines += [f'PARAMETER stop "{s}"' for s in stop_strings(family, eos_token)]
    elif chat_template:
        log.warning("chat template is not a built-in family; the Modelfile leaves TEMPLATE to Ollama's reading of the GGUF")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    out = (Path(adapter) if adapter is not None else gguf_path).with_suffix(".Modelfile")
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
