"""lowrank.json, the record between stages: one module reads and writes it, and checks the base."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from lowrank import runrecord
from lowrank.errors import UserError
from lowrank.runrecord import BaseRef, ChatTemplate, RunRecord

ROOT = Path(__file__).resolve().parents[1]


def _record(**kw) -> RunRecord:
    fields = dict(stage="sft", base=BaseRef(id="tiny", path="/models/tiny", digest="ab" * 32),
                  chat_template=ChatTemplate("llama2", "{{ messages }}"), data={"source": "d.jsonl"},
                  config={"quant": "nf4", "max_length": 64}, seed=3, metrics={"loss": 1.5},
                  extra={"sft_adapter": "runs/sft", "processes": 1})
    fields.update(kw)
    return RunRecord(**fields)


def test_a_record_reads_back_as_written(tmp_path):
    record = _record()
    runrecord.write(tmp_path, record)
    assert runrecord.read(tmp_path, stage="sft") == record
    doc = json.loads((tmp_path / "lowrank.json").read_text())
    assert doc["base"] == {"id": "tiny", "path": "/models/tiny", "digest": "ab" * 32}
    assert doc["chat_template"] == {"name": "llama2", "jinja": "{{ messages }}"}
    assert doc["sft_adapter"] == "runs/sft" and doc["seed"] == 3  # stage fields sit beside the shared ones
    assert record.quant == "nf4"


def test_the_flat_template_layout_of_older_records_is_read(tmp_path):
    (tmp_path / "lowrank.json").write_text(json.dumps({"stage": "sft", "template": "chatml", "chat_template": "J"}))
    assert runrecord.read(tmp_path).chat_template == ChatTemplate("chatml", "J")


def test_write_replaces_by_rename_and_leaves_the_old_record_when_it_fails(tmp_path, monkeypatch):
    runrecord.write(tmp_path, _record(seed=1))

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        runrecord.write(tmp_path, _record(seed=2))
    monkeypatch.undo()
    assert runrecord.read(tmp_path).seed == 1
    assert [p.name for p in tmp_path.iterdir()] == ["lowrank.json"]  # no temp file left behind


def test_a_dir_without_a_record_is_not_a_finished_run(tmp_path):
    assert runrecord.read_optional(tmp_path) is None and not runrecord.exists(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path}: not a finished lowrank run"):
        runrecord.read(tmp_path)


def test_a_garbled_record_names_the_file_and_line(tmp_path):
    (tmp_path / "lowrank.json").write_text('{"stage": "sft",\n "base": ')
    with pytest.raises(UserError, match=rf"{tmp_path / 'lowrank.json'}: not valid JSON \(line 2\)"):
        runrecord.read(tmp_path)


def test_a_record_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "lowrank.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        runrecord.read(tmp_path)


def test_a_record_whose_metrics_are_not_an_object_is_refused(tmp_path):
    (tmp_path / "lowrank.json").write_text(json.dumps({"stage": "sft", "metrics": [1]}))
    with pytest.raises(UserError, match="field 'metrics' must be an object"):
        runrecord.read(tmp_path)


def test_a_record_of_another_stage_is_refused(tmp_path):
    runrecord.write(tmp_path, _record(stage="reward"))
    with pytest.raises(UserError, match="a 'reward' run, expected a 'sft' run"):
        runrecord.read(tmp_path, stage="sft")


def test_read_adapter_wants_the_peft_files_too(tmp_path):
    runrecord.write(tmp_path, _record())
    with pytest.raises(UserError, match="not a finished lowrank adapter"):
        runrecord.read_adapter(tmp_path, stage="sft")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert runrecord.read_adapter(tmp_path, stage="sft").stage == "sft"


def test_check_base_refuses_another_digest_and_names_both(tmp_path):
    record = _record()
    with pytest.raises(UserError) as info:
        runrecord.check_base(record, tmp_path, digest="cd" * 32, hint="use the right one")
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: adapter was trained on another base (tiny)")
    assert "abababababab" in message and "cdcdcdcdcdcd" in message and message.endswith("use the right one")
    runrecord.check_base(record, tmp_path, digest="ab" * 32)  # the same base passes


def test_check_base_digests_a_model_dir_by_its_contents(tiny_spm, tmp_path):
    from lowrank.models import model_digest

    record = _record(base=BaseRef(id="tiny", digest=model_digest(str(tiny_spm))))
    runrecord.check_base(record, tmp_path, base=str(tiny_spm))
    with pytest.raises(UserError, match="another base"):
        runrecord.check_base(_record(), tmp_path, base=str(tiny_spm))


def test_check_base_passes_an_adapter_made_elsewhere_without_digesting(tmp_path):
    runrecord.check_base(None, tmp_path, base=str(tmp_path / "not-a-model"))  # nothing to compare: no digest taken
    runrecord.check_base(_record(base=BaseRef(id="x")), tmp_path, base=str(tmp_path / "not-a-model"))


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            docstrings.add(id(node.body[0].value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_only_the_runrecord_module_names_the_record_file():
    """Every reader and writer of lowrank.json goes through lowrank.runrecord (messages may name it)."""
    offenders = []
    for path in sorted(p for d in ("lowrank", "apps", "export", "quantize") for p in (ROOT / d).rglob("*.py")):
        if path.name == "runrecord.py" and path.parent.name == "lowrank":
            continue
        for node in _string_constants(ast.parse(path.read_text())):
            if node.value == runrecord.RECORD_FILE:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
