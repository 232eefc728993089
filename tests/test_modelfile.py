"""Ollama Modelfiles: built-in chat templates as Go templates over .Messages, with the right stop strings.

Without a Go template engine here these checks are structural: the loop over .Messages (Ollama's
current form, which keeps a multi-turn chat's system text in one place), the family's role
markers, the system text printed once, balanced actions, and the stop strings.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from lowrank.export.modelfile import write_modelfile
from lowrank.templates import BUILTIN_TEMPLATES, end_of_turn

BOS, EOS = "<s>", "</s>"
# Text that marks a turn in each family; each must also be in the Jinja template training used.
ROLE_MARKERS = {
    "alpaca": ["### Instruction:", "### Response:"],
    "vicuna": [" USER: ", " ASSISTANT:"],
    "llama2": ["[INST] ", " [/INST]", "<<SYS>>", "<</SYS>>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
}


def _modelfile(tmp_path, family: str) -> tuple[str, str, list[str]]:
    """(whole Modelfile, its TEMPLATE, its stop values) for a built-in family."""
    gguf = tmp_path / f"m-{family}.gguf"
    gguf.write_bytes(b"")
    text = write_modelfile(gguf, BUILTIN_TEMPLATES[family], EOS, bos_token=BOS).read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return text, template, stops


def test_every_builtin_family_has_a_modelfile_template():
    assert set(ROLE_MARKERS) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
def test_template_ranges_over_messages_not_prompt_and_response(tmp_path, family):
    _, template, _ = _modelfile(tmp_path, family)
    assert re.search(r"\{\{ range [^}]*\.Messages \}\}", template)
    assert ".Prompt" not in template and ".Response" not in template
    # Go's parser rejects unbalanced actions: every if/range has its end.
    assert len(re.findall(r"\{\{ (?:if|range) ", template)) == template.count("{{ end }}")
    assert "{EOS}" not in template and "{BOS}" not in template


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
def test_template_has_the_family_role_markers(tmp_path, family):
    _, template, _ = _modelfile(tmp_path, family)
    for marker in ROLE_MARKERS[family]:
        assert marker in BUILTIN_TEMPLATES[family].replace("\\n", "\n") and marker in template, marker


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
def test_system_text_is_printed_once(tmp_path, family):
    # Either the template prints .System in one place and skips system turns in its loop, or it
    # prints every turn (system ones included) under its role header and never .System.
    _, template, _ = _modelfile(tmp_path, family)
    prints_system = len(re.findall(r"\{\{ \$?\.System \}\}", template))
    prints_role = "{{ $m.Role }}" in template
    assert (prints_system, prints_role) in [(1, False), (0, True)]
    if not prints_role:  # content printed only inside the user/assistant branches
        assert '{{ if eq $m.Role "user" }}' in template and '{{ else if eq $m.Role "assistant" }}' in template


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
def test_stop_strings_start_with_the_family_end_of_turn(tmp_path, family):
    _, template, stops = _modelfile(tmp_path, family)
    eot = end_of_turn(family, SimpleNamespace(eos_token=EOS))
    assert stops[0] == eot and eot in template
    assert len(stops) == len(set(stops)) >= 2


def test_llama2_template_opens_later_user_turns_with_bos(tmp_path):
    # Jinja llama2 writes BOS before every [INST]; llama.cpp adds only the first one.
    _, template, _ = _modelfile(tmp_path, "llama2")
    assert "{{ if not $first }}<s>{{ end }}[INST] " in template


def test_unknown_template_gets_no_template_line_and_a_warning(tmp_path, caplog):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lowrank.export.modelfile"):
        text = write_modelfile(gguf, "{{ messages }}", EOS).read_text()
    assert text == "FROM ./m.gguf\n"
    assert "not a built-in family" in caplog.text
