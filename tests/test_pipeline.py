"""`lowrank run`: the whole pipeline (SFT -> reward -> PPO -> merge -> GGUF + verify) in one command,
stage outputs chained through their files, a marker written last, and bad input refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

STAGES = ("sft", "reward", "ppo")


def _head(source: Path, dest: Path, lines: int) -> str:
    dest.write_text("".join(source.read_text().splitlines(keepends=True)[:lines]))
    return str(dest)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`lowrank run --model tiny --quick --type f16` on the head of each shipped sample: (code, out dir, stdout)."""
    from lowrank.cli import main
    from lowrank.data import SAMPLE_FILES

    work = tmp_path_factory.mktemp("pipeline")
    data = {"--data": _head(SAMPLE_FILES["alpaca"], work / "alpaca.jsonl", 24),
            "--preferences": _head(SAMPLE_FILES["preferences"], work / "pairs.jsonl", 16),
            "--prompts": _head(SAMPLE_FILES["prompts"], work / "prompts.jsonl", 4)}
    out = work / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", "--model", "tiny", "--output-dir", str(out), "--quick", "--type", "f16",
                     *[x for pair in data.items() for x in pair]])
    return code, out, stdout.getvalue()


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lowrank.cli import main

    capsys.readouterr()
    code = main(["run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_chains_every_stage_and_marks_the_run_finished(finished):
    code, out, printed = finished
    assert code == 0, printed
    for stage in STAGES:
        assert (out / stage / "adapter_model.safetensors").is_file() and (out / stage / "lowrank.json").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["gguf"] == [{"path": str(out / "gguf" / "run-f16.gguf"), "verified": True, "passed": True,
                                "problems": []}]
    # Each stage read the previous stage's output dir.
    reward = json.loads((out / "reward" / "lowrank.json").read_text())
    ppo = json.loads((out / "ppo" / "lowrank.json").read_text())
    merged = json.loads((out / "merged" / "lowrank.json").read_text())
    assert reward["sft_adapter"] == str(out / "sft")
    assert (ppo["sft_adapter"], ppo["reward_adapter"]) == (str(out / "sft"), str(out / "reward"))
    assert merged["adapters"] == [str(out / "ppo")]
    assert ppo["config"]["steps"] == 1 and reward["config"]["max_steps"] == 2  # --quick
    # The marker holds the metrics the summary printed.
    before, after = summary["metrics"]["sft_eval_loss"]
    assert after < before
    assert f"held-out loss {before:.4f} -> {after:.4f}" in printed
    assert "held-out accuracy" in printed and "KL to SFT" in printed
    assert f"{out / 'gguf' / 'run-f16.gguf'}  verify PASS" in printed
    assert f"lowrank chat {out / 'gguf' / 'run-f16.gguf'}" in printed
    assert f"lowrank app --models-dir {out / 'gguf'}" in printed


def test_stages_record_the_same_base_and_chat_template(finished):
    from lowrank.models import model_digest
    from lowrank.tiny import resolve_model_name

    _, out, _ = finished
    metas = [json.loads((out / stage / "lowrank.json").read_text()) for stage in STAGES]
    path = resolve_model_name("tiny")
    for meta in metas:
        assert meta["base"] == {"id": "tiny", "path": path, "digest": model_digest(path)}
        assert meta["chat_template"] == metas[0]["chat_template"] and meta["chat_template"]["jinja"]


def test_chat_loads_the_ppo_adapter_on_the_base_its_lowrank_json_names(finished):
    from lowrank.apps.backends import SamplingConfig, load_backend
    from lowrank.tiny import resolve_model_name

    _, out, _ = finished
    backend = load_backend(out / "ppo", device="cpu")
    try:
        assert backend.kind == "adapter"
        assert backend.template_source.endswith("from lowrank.json")
        assert "".join(backend.generate([{"role": "user", "content": "Hi"}], SamplingConfig(max_tokens=4, seed=0)))
    finally:
        backend.close()
    # The recorded path is gone (another machine): the id, `tiny`, resolves there, and its digest is checked.
    from lowrank.apps.hf_backend import base_of, check_base_digest
    from lowrank.errors import UserError

    meta = json.loads((out / "ppo" / "lowrank.json").read_text())
    moved = {**meta, "base": {**meta["base"], "path": str(out.parent / "gone")}}
    assert base_of(out / "ppo", meta) == meta["base"]["path"] and base_of(out / "ppo", moved) == "tiny"
    check_base_digest(out / "ppo", moved, resolve_model_name("tiny"))
    other = {**meta, "base": {**meta["base"], "digest": "0" * 64}}
    with pytest.raises(UserError, match=r"was trained on base 'tiny' \(digest 000000000000\), not on"):
        check_base_digest(out / "ppo", other, resolve_model_name("tiny"))


def test_finished_output_dir_is_refused_without_overwrite(finished, capsys):
    _, out, _ = finished
    marker = (out / "pipeline.json").read_bytes()
    code, _, err = _cli(["--output-dir", str(out), "--quick"], capsys)
    assert code == 2
    assert err == (f"lowrank run: error: {out}: already holds a finished run (pipeline.json); "
                   "pass --overwrite to replace it or choose another --output-dir\n")
    assert (out / "pipeline.json").read_bytes() == marker and (out / "sft" / "lowrank.json").is_file()


def test_output_of_an_unfinished_run_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "lowrank.json").write_text("{}")
    code, _, err = _cli(["--output-dir", str(tmp_path), "--quick"], capsys)
    assert code == 2
    assert err == (f"lowrank run: error: {tmp_path}: holds the output of an earlier run (sft/); "
                   "pass --overwrite to replace it or choose another --output-dir\n")


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = _cli(["--model", str(missing), "--output-dir", str(tmp_path / "run"), "--quick"], capsys)
    assert code == 2
    assert err.startswith(f"lowrank run: error: {missing}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_unknown_gguf_type_is_refused_before_training(tmp_path, capsys):
    code, _, err = _cli(["--output-dir", str(tmp_path / "run"), "--type", "f16,q3_z"], capsys)
    assert code == 2
    assert err.startswith("lowrank run: error: --type: unknown GGUF type 'q3_z'")
    assert not (tmp_path / "run").exists()


def test_missing_data_file_is_refused_before_training(tmp_path, capsys):
    code, _, err = _cli(["--output-dir", str(tmp_path / "run"), "--prompts", str(tmp_path / "p.jsonl")], capsys)
    assert code == 2
    assert err == f"lowrank run: error: --prompts {tmp_path / 'p.jsonl'}: file not found\n"


def test_overwrite_replaces_only_the_pipeline_dirs(tmp_path):
    from lowrank.cli.pipeline import PipelineConfig, prepare_output_dir

    for name in ("sft", "reward", "ppo", "merged", "gguf"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lowrank.json").write_text("{}")
    (tmp_path / "pipeline.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    prepare_output_dir(PipelineConfig(output_dir=str(tmp_path), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- configuration: recipe sections, tiny defaults, wiring ---------------------------------------

def _configs(tmp_path, recipe: str | None, *flags: str):
    from lowrank.cli import build_parser
    from lowrank.cli.pipeline import build_pipeline_config, stage_configs

    args = ["run", "--output-dir", str(tmp_path / "run"), *flags]
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        args += ["--config", str(tmp_path / "recipe.yaml")]
    config, sections = build_pipeline_config(build_parser("run").parse_args(args))
    return config, stage_configs(config, sections)


def test_recipe_sections_fill_stage_configs_and_flags_win(tmp_path):
    config, configs = _configs(tmp_path, "quant: int8\ntype: q8_0\nppo:\n  steps: 3\n  max-new-tokens: 5\n"
                                         "sft:\n  lora_r: 4\nmerge:\n  dtype: bfloat16\n", "--quant", "none")
    run = tmp_path / "run"
    assert config.quant == "none" and config.type == ["q8_0"]
    assert {s: configs[s].quant for s in STAGES} == {"sft": "none", "reward": "none", "ppo": "none"}
    assert (configs["ppo"].steps, configs["ppo"].max_new_tokens, configs["sft"].lora_r) == (3, 5, 4)
    assert configs["ppo"].rollout_batch_size == 8  # the tiny default still applies where the recipe is silent
    assert configs["reward"].sft_adapter == str(run / "sft")
    assert (configs["ppo"].sft_adapter, configs["ppo"].reward_adapter) == (str(run / "sft"), str(run / "reward"))
    assert (configs["merge"].adapters, configs["merge"].out, configs["merge"].dtype) == ([str(run / "ppo")], str(run / "merged"), "bfloat16")
    assert (configs["export"].type, configs["export"].out, configs["export"].name) == (["q8_0"], str(run / "gguf"), "run")


def test_quick_overrides_the_recipe_and_real_models_keep_stage_defaults(tmp_path):
    from lowrank.ppo import PPOConfig

    _, configs = _configs(tmp_path, "ppo:\n  steps: 50\n", "--quick")
    assert configs["ppo"].steps == 1 and configs["sft"].max_steps == 2
    _, configs = _configs(tmp_path, None, "--model", str(tmp_path / "some-model"))
    assert configs["ppo"].steps == PPOConfig().steps and configs["ppo"].model == str(tmp_path / "some-model")


def test_recipe_may_not_set_what_the_pipeline_wires(tmp_path):
    from lowrank.errors import UserError

    with pytest.raises(UserError, match=r"recipe.yaml: reward.sft_adapter is set by `lowrank run` itself"):
        _configs(tmp_path, "reward:\n  sft_adapter: elsewhere\n")


def test_recipe_with_an_unknown_field_names_its_section(tmp_path):
    from lowrank.errors import UserError

    with pytest.raises(UserError, match=r"recipe.yaml: unknown field 'stpes' in section 'ppo' \(PPOConfig\)"):
        _configs(tmp_path, "ppo:\n  stpes: 3\n")


def test_failed_verification_exits_1_without_the_marker(tmp_path, monkeypatch, capsys):
    from lowrank.cli import pipeline

    def fake_stages(config, configs):
        return {"stage": "pipeline", "model": "tiny", "quant": "none", "dirs": {"merged": "m", "gguf": "g"},
                "metrics": {"sft_eval_loss": [2.0, 1.0], "reward_eval_accuracy": 1.0, "reward_eval_margin": 0.5,
                            "ppo_score": [0.1, 0.2], "ppo_score_window": 1, "ppo_kl": 0.01, "ppo_steps": 1},
                "gguf": [{"path": "g/x-f16.gguf", "verified": True, "passed": False, "problems": ["logits differ"]}],
                "seconds": dict.fromkeys(("sft", "reward", "ppo", "merge", "export"), 1.0), "config": {}}

    monkeypatch.setattr(pipeline, "run_stages", fake_stages)
    code, out, _ = _cli(["--output-dir", str(tmp_path), "--quick"], capsys)
    assert code == 1
    assert "g/x-f16.gguf  verify FAIL" in out and "verification failed for g/x-f16.gguf" in out
    assert not (tmp_path / "pipeline.json").exists()
