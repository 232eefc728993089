"""Bad values are refused when a config is built: one line naming the flag or field, exit 2, before any
model loads and before anything is written. Each case is its own test."""

from __future__ import annotations

import pytest

from lowrank.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model."""
    import lowrank.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was refused")

    monkeypatch.setattr(lowrank.models, "load_base_model", refuse)


def _refused(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"lowrank {argv[0]}: error: "), err
    return lines[0].split(": error: ", 1)[1]


CASES = {
    "sft-lr-scheduler": (["sft", "--lr-scheduler", "foo"], "--lr-scheduler: unknown 'foo'; choose cosine, linear or constant"),
    "sft-optim-bits": (["sft", "--optim-bits", "4"], "--optim-bits must be 8 or 32, got 4"),
    "reward-optim-bits": (["reward", "--optim-bits", "16"], "--optim-bits must be 8 or 32, got 16"),
    "sft-negative-lr": (["sft", "--learning-rate=-1e-4"], "--learning-rate must be at least 0, got -0.0001"),
    "dpo-negative-lr": (["dpo", "--learning-rate", "-1"], "--learning-rate must be at least 0, got -1.0"),
    "grpo-negative-lr": (["grpo", "--learning-rate", "-0.5"], "--learning-rate must be at least 0, got -0.5"),
    "sft-lora-dropout": (["sft", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    "sft-negative-warmup": (["sft", "--warmup-steps", "-2"], "--warmup-steps must be at least 0, got -2"),
    "ppo-temperature-0": (["ppo", "--temperature", "0"], "--temperature must be above 0, got 0.0"),
    "ppo-cliprange-0": (["ppo", "--cliprange", "0"], "--cliprange must be above 0, got 0.0"),
    "grpo-cliprange-negative": (["grpo", "--cliprange", "-0.2"], "--cliprange must be above 0, got -0.2"),
    "grpo-top-p": (["grpo", "--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
    "ppo-max-new-tokens": (["ppo", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    "reward-eval-fraction": (["reward", "--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1), got 1.5"),
    "dpo-eval-fraction": (["dpo", "--eval-fraction=-0.1"], "--eval-fraction must be in [0, 1), got -0.1"),
    "pretrain-eval-fraction": (["pretrain", "--eval-fraction", "1"], "--eval-fraction must be in [0, 1), got 1.0"),
    "reward-no-steps": (["reward", "--max-steps", "0", "--epochs", "0"], "give --max-steps > 0 or --epochs > 0"),
    "sft-negative-max-steps": (["sft", "--max-steps=-3"], "give --max-steps > 0 or --epochs > 0"),
    "pretrain-negative-warmup": (["pretrain", "--warmup-steps=-1"], "--warmup-steps must be at least 0, got -1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_training_flag_is_refused_before_the_model_loads(case, tmp_path, capsys, no_model_load):
    argv, message = CASES[case]
    out = tmp_path / "out"
    assert _refused([*argv, "--model", "tiny", "--output-dir", str(out)], capsys) == message
    assert not out.exists()


def test_unknown_target_modules_are_refused_from_the_model_config_alone(tiny_spm, tmp_path, capsys, no_model_load):
    message = _refused(["sft", "--model", str(tiny_spm), "--target-modules", "q_prj,v_prj",
                        "--output-dir", str(tmp_path / "out")], capsys)
    assert message.startswith("--target-modules: none of q_prj, v_prj is a linear layer of ")
    assert message.endswith("its layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not (tmp_path / "out").exists()


APP_CASES = {
    "chat-negative-temperature": (["chat", "m.gguf", "--temperature", "-1"], "--temperature must be at least 0 (0: greedy), got -1.0"),
    "chat-top-p-0": (["chat", "m.gguf", "--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    "chat-top-p-above-1": (["chat", "m.gguf", "--top-p", "1.01"], "--top-p must lie in (0, 1], got 1.01"),
    "chat-negative-ctx": (["chat", "m.gguf", "--ctx", "-5"], "--ctx must be at least 1, got -5"),
    "chat-zero-threads": (["chat", "m.gguf", "--threads", "0"], "--threads must be at least 1, got 0"),
    "app-port-0": (["app", "--port", "0"], "--port must lie in 1-65535, got 0"),
    "app-port-too-high": (["app", "--port", "65536"], "--port must lie in 1-65535, got 65536"),
    "app-negative-ctx": (["app", "--ctx", "-1"], "--ctx must be at least 1, got -1"),
}


@pytest.mark.parametrize("case", list(APP_CASES))
def test_a_bad_chat_or_app_flag_is_refused_before_anything_loads(case, tmp_path, capsys, monkeypatch):
    import lowrank.apps.loading

    monkeypatch.setattr(lowrank.apps.loading, "load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    argv, message = APP_CASES[case]
    assert _refused(argv, capsys) == message


RECIPE_CASES = {
    "list-for-text": ("template: [llama2, chatml]", "field 'template' must be str, got ['llama2', 'chatml']"),
    "mapping-for-text": ("template: {name: llama2}", "field 'template' must be str, got {'name': 'llama2'}"),
    "fraction-for-int": ("max_steps: 2.5", "field 'max_steps' must be int, got 2.5"),
    "bool-for-int": ("max_steps: true", "field 'max_steps' must be int, got True"),
    "bool-for-float": ("learning_rate: yes", "field 'learning_rate' must be float, got True"),
    "mapping-in-a-list": ("target_modules: [{q: 1}]", "field 'target_modules' must be list, got [{'q': 1}]"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_recipe_value_of_the_wrong_kind_is_refused_before_pipeline_json(case, tmp_path, capsys, no_model_load):
    field, message = RECIPE_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny\nstages:\n  - sft: {{{field}}}\n")
    out = tmp_path / "run"
    assert _refused(["run", str(recipe), "--output-dir", str(out)], capsys) == f"{recipe}: stage 'sft': {message}"
    assert not (out / "pipeline.json").exists()


def test_an_integral_float_is_taken_for_an_int():
    from lowrank.config import build_config
    from lowrank.sft import SFTConfig

    assert build_config(SFTConfig, None, max_steps=3.0).max_steps == 3
