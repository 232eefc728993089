"""An Ollama Modelfile next to a GGUF, so `ollama create NAME -f FILE` works as is.

Ollama templates are Go templates (text/template) over .System, .Prompt and .Response,
not Jinja, so the known chat template families (lowrank.templates) are rewritten by hand
here; the stop strings are the families' end-of-turn markers. A template we do not
recognise gets no TEMPLATE line (Ollama then reads tokenizer.chat_template from the GGUF
and picks its closest built-in) and a warning in the log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lowrank.templates import BUILTIN_TEMPLATES

log = logging.getLogger(__name__)

# family -> (Go template, stop strings). {{ bos }}/{{ eos }} are filled with the token texts.
GO_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "alpaca": ("{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a response "
               "that appropriately completes the request.{{ end }}\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n"
               "{{ .Response }}{EOS}", ["{EOS}", "### Instruction:"]),
    "vicuna": ("{{ if .System }}{{ .System }}{{ else }}A chat between a curious user and an artificial intelligence "
               "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
               "{{ end }} USER: {{ .Prompt }} ASSISTANT: {{ .Response }}{EOS}", ["{EOS}", "USER:"]),
    "llama2": ("[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST] "
               "{{ .Response }} {EOS}", ["{EOS}", "[INST]"]),
    "llama3": ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
               ["<|eot_id|>", "<|start_header_id|>"]),
    "chatml": ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}"
               "<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
}


def template_family(jinja: str | None) -> str | None:
    """The built-in family a Jinja chat template is, by exact match, else None."""
    for name, text in BUILTIN_TEMPLATES.items():
        if jinja == text:
            return name
    return None


def _quote(text: str) -> str:
    return '"""' + text + '"""'


def write_modelfile(gguf_path: str | Path, chat_template: str | None, eos_token: str, system: str | None = None,
                    adapter: str | Path | None = None) -> Path:
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
        go, stops = GO_TEMPLATES[family]
        lines.append(f"TEMPLATE {_quote(go.replace('{EOS}', eos_token))}")
        lines += [f'PARAMETER stop "{s.replace("{EOS}", eos_token)}"' for s in stops]
    elif chat_template:
        log.warning("chat template is not a built-in family; the Modelfile leaves TEMPLATE to Ollama's reading of the GGUF")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    out = (Path(adapter) if adapter is not None else gguf_path).with_suffix(".Modelfile")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out
