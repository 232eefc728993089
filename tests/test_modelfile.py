"""Ollama Modelfiles: built-in chat templates as Go templates over .Messages, with the right stop strings.

Without a Go template engine here these checks are structural: the loop over .Messages (Ollama's
current form, which keeps a multi-turn chat's system text in one place), the family's role
markers, the system text printed once, balanced actions, and the stop strings.
"""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest

from lowrank.export.modelfile import stop_strings, write_modelfile
from lowrank.templates import BUILTIN_TEMPLATES, end_of_turn

BOS, EOS = "<s>", "</s>"
# Text that marks a turn in each family; each must also be in the Jinja template training used.
ROLE_MARKERS = {
    "alpaca": ["### Instruction:", "### Response:"],
    "vicuna": [" USER: ", " ASSISTANT:"],
    "llama2": ["[INST] ", " [/INST]", "<<SYS>>", "<</SYS>>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "mistral": ["[INST] ", " [/INST]"],
    "gemma": ["<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>"],
    "phi3": ["<|end|>", "<|assistant|>"],
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


# --- crafted tokenizer texts: quoted so that Ollama reads them back, never as new directives -------------

def ollama_commands(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's Modelfile parser (parser/parser.go) reads ``text``; PARAMETER gives
    (its name, value). A value has no escapes: it ends at the first line break where what was read so far,
    spaces trimmed, is bare or a closed "..." or triple-quoted string. Unprintable characters are dropped."""

    def unquoted(value: str) -> str | None:
        value = value.strip()
        for mark in ('"""', '"'):
            if value.startswith(mark):
                closed = len(value) >= 2 * len(mark) and value.endswith(mark)
                return value[len(mark):-len(mark)] if closed else None
        return value

    commands, state, name, value = [], "start", "", ""
    for ch in text:
        if state == "start":
            if ch == "#":
                state = "comment"
            elif ch not in " \t\r\n":
                state, name = "name", ch
        elif state == "comment":
            state = "start" if ch in "\r\n" else state
        elif state in ("name", "parameter"):
            if ch in " \t":
                if state == "name" and name.lower() == "parameter":
                    state, name = "parameter", ""
                else:
                    state, value = "value", ""
            else:
                assert ch.isalnum() or ch == "_", f"Ollama refuses the command starting {name + ch!r}"
                name += ch
        elif ch in "\r\n" and unquoted(value) is not None:
            commands.append((name.lower(), unquoted(value)))
            state = "start"
        elif ch.isprintable() or ch in " \t\r\n":
            value += ch
    if state == "value":
        assert unquoted(value) is not None, "a quote is never closed"
        commands.append((name.lower(), unquoted(value)))
    return commands


CRAFTED_EOS = {
    "quote-newline": 'x"\nSYSTEM pwned\nADAPTER ./evil.gguf\nPARAMETER stop "y',
    "triple-quote-newline": 'x"""\nSYSTEM pwned\n"""',
    "go-action": "{{ .System }}{{ range .Messages }}",
    "brace-before-action": "</s>{",
}


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("eos", list(CRAFTED_EOS.values()), ids=list(CRAFTED_EOS))
def test_crafted_eos_adds_no_directive(tmp_path, caplog, family, eos):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    text = write_modelfile(gguf, BUILTIN_TEMPLATES[family], eos, system="Be brief.", bos_token=BOS).read_text()
    commands = ollama_commands(text)
    names = [name for name, _ in commands]
    assert names.count("system") == 1 and dict(commands)["system"] == "Be brief."
    assert set(names) <= {"from", "template", "stop", "system"} and dict(commands)["from"] == "./m.gguf"
    written = [value for name, value in commands if name == "stop"]
    wanted = stop_strings(family, eos)
    # Every stop string is read back exactly, or left out with a warning naming it.
    assert written == [s for s in wanted if s in written]
    for left_out in set(wanted) - set(written):
        assert repr(left_out) in caplog.text


@pytest.mark.parametrize("family", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("eos", list(CRAFTED_EOS.values()), ids=list(CRAFTED_EOS))
def test_crafted_eos_is_printed_by_the_go_template_not_run(tmp_path, family, eos):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    template = dict(ollama_commands(write_modelfile(gguf, BUILTIN_TEMPLATES[family], eos).read_text()))["template"]
    literal = "{{ " + json.dumps(eos) + " }}"
    if family in ("alpaca", "vicuna", "llama2"):  # these print EOS themselves, between assistant turns
        assert literal in template
    # Once the string literals are taken out, the actions are the family's own and balance.
    rest = template.replace(literal, "")
    assert eos not in rest
    assert len(re.findall(r"\{\{ (?:if|range) ", rest)) == rest.count("{{ end }}")
    assert rest.count("{{") == rest.count("}}")


@pytest.mark.parametrize("text", ['plain', 'say "hi"', '"quoted"', '""', 'ends with "', 'two\nlines "quoted"\nend',
                                  'line ends with "\nnext', '  padded  ', 'tab\tand unicode é', '"""', 'a"""b'])
def test_modelfile_values_read_back_exactly(text):
    from lowrank.export.modelfile import modelfile_value

    value = modelfile_value(text)
    assert value is not None
    assert ollama_commands(f"SYSTEM {value}\nFROM ./m.gguf\n") == [("system", text), ("from", "./m.gguf")]


@pytest.mark.parametrize("text", ['first line ends with """\nSYSTEM pwned', "a nul \x00 byte", "an escape \x1b[31m"],
                         ids=["triple-quote-line-end", "nul", "escape"])
def test_unwritable_system_prompt_is_left_out_with_a_warning(tmp_path, caplog, text):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lowrank.export.modelfile"):
        written = write_modelfile(gguf, None, EOS, system=text).read_text()
    assert ollama_commands(written) == [("from", "./m.gguf")]
    assert "leaves out the system prompt" in caplog.text


def test_file_name_with_a_line_break_is_refused(tmp_path):
    from lowrank.errors import UserError

    gguf = tmp_path / 'm"\nSYSTEM pwned.gguf'
    gguf.write_bytes(b"")
    written = write_modelfile(gguf, None, EOS).read_text()  # quoted: Ollama reads the name back
    assert ollama_commands(written) == [("from", f"./{gguf.name}")]
    bad = tmp_path / 'n"""\n"x.gguf'
    bad.write_bytes(b"")
    with pytest.raises(UserError, match="a Modelfile cannot name this file"):
        write_modelfile(bad, None, EOS)
