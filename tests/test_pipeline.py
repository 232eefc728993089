"""`lowrank run RECIPE.yaml`: every stage of a recipe chained through one output dir, a table whose
numbers all come from the stages' files, finished stages skipped on a second run, an interrupted
stage run again with the ones after it, and a bad recipe refused in one line before anything runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

# Every stage, each as short as it can be: a task of a few problems, a few optimizer steps.
RECIPE = """\
model: tiny
seed: 0
stages:
  - task: {name: sort, sizes: {pretrain: 160, sft: 24, eval: 8, preferences: 16, prompts: 4}, eval_max_new_tokens: 8,
           sft_errors: 1.0}
  - pretrain: {max_steps: 3, batch_size: 4, max_length: 96, warmup_steps: 1}
  - sft: {max_steps: 2, batch_size: 2, max_length: 128, eval_every: 0, save_every: 0, gradient_checkpointing: false}
  - reward: {max_steps: 2, batch_size: 2, max_length: 128, gradient_checkpointing: false}
  - ppo: {steps: 1, rollout_batch_size: 2, minibatch_size: 2, ppo_epochs: 1, max_new_tokens: 6}
  - merge: {}
  - export: {type: [f16]}
  - verify: {greedy_tokens: 4, sample_max_tokens: 8}
"""
STAGES = ["task", "pretrain", "sft", "reward", "ppo", "merge", "export", "verify"]
# What loads a model or runs a stage: none of it may run when every stage is finished.
HEAVY = {"lowrank.cli.pipeline": ["run_stage"], "lowrank.report": ["measure_task_accuracy", "run_verify"],
         "lowrank.models": ["load_base_model"], "lowrank.export.verify": ["load_hf_model"]}


def _run(args: list[str]) -> tuple[int, str]:
    from lowrank.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", *args])
    return code, stdout.getvalue()


def _table(printed: str) -> list[str]:
    """The lines of the final table, its first line (the header) left out."""
    lines = printed.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("lowrank run "))
    return lines[start + 1:]


def _spy(monkeypatch, calls: list, *, block: bool) -> None:
    """Record each call of HEAVY (and raise when ``block``); stage runs record the stage's name."""
    import importlib

    for module_name, names in HEAVY.items():
        module = importlib.import_module(module_name)
        for name in names:
            real = getattr(module, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                stage = args[0] if args and hasattr(args[0], "name") and _name == "run_stage" else None
                calls.append(stage.name if stage is not None else _name)
                if block:
                    raise AssertionError(f"{_name} called")
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recipe run in one output dir: finished, again, after its merge was interrupted, with a failed
    verification. Made once per session (under pytest-xdist too: the workers share it behind a lock)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp_path_factory.getbasetemp()
    root = shared / "pipeline-runs"
    with FileLock(str(shared / "pipeline-runs.lock")):
        summary = root / "runs.json"
        if not summary.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            (root / "recipe.yaml").write_text(RECIPE)
            args = [str(root / "recipe.yaml"), "--output-dir", str(root / "run")]
            result = {"first": _run(args)}
            with pytest.MonkeyPatch.context() as mp:
                calls: list = []
                _spy(mp, calls, block=True)
                result["again"] = (*_run(args), calls)
            (root / "run" / "merged" / "lowrank.json").unlink()  # the merge never finished
            with pytest.MonkeyPatch.context() as mp:
                calls = []
                _spy(mp, calls, block=False)
                result["interrupted"] = (*_run(args), calls)
            verify = root / "run" / "gguf" / "verify.json"
            saved = verify.read_text()
            failed = json.loads(saved)
            failed["files"][0].update(passed=False, problems=["logits differ by 1.00e-01"])
            verify.write_text(json.dumps(failed))
            result["failed"] = _run(args)
            verify.write_text(saved)
            summary.write_text(json.dumps(result))
    return {**json.loads(summary.read_text()), "out": root / "run", "recipe": root / "recipe.yaml"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_recipe_runs_every_stage_in_order_and_chains_their_files(runs):
    code, printed = runs["first"]
    out = runs["out"]
    assert code == 0, printed
    starts = [line.split(":")[0] for line in printed.splitlines() if line.startswith("[")]
    assert starts == [f"[{i}/8] {name}" for i, name in enumerate(STAGES, 1)]
    task = out / "task"
    sft, reward, ppo = (_read(out / s / "lowrank.json") for s in ("sft", "reward", "ppo"))
    # The task's files feed the stages; the pretrained model is the base of every later one.
    assert (sft["data"]["source"], sft["data"]["eval_source"]) == (str(task / "sft.jsonl"), str(task / "eval.jsonl"))
    # sft_errors 1.0: every demonstration of 5 or 6 letters leaves the last one out, the others are right.
    for demo in (json.loads(line) for line in (task / "sft.jsonl").read_text().splitlines()):
        letters = demo["instruction"].split(": ", 1)[1].split()
        assert demo["output"].split() == sorted(letters)[:len(letters) - (len(letters) > 4)], demo
    assert reward["data"]["source"] == str(task / "preferences.jsonl")
    assert ppo["data"]["source"] == str(task / "prompts.jsonl")
    assert {m["base"]["path"] for m in (sft, reward, ppo)} == {str(out / "pretrain")}
    assert _read(out / "pretrain" / "lowrank.json")["data"]["source"] == str(task / "pretrain.jsonl")
    assert reward["sft_adapter"] == str(out / "sft")
    assert (ppo["sft_adapter"], ppo["reward_adapter"]) == (str(out / "sft"), str(out / "reward"))
    assert _read(out / "merged" / "lowrank.json")["adapters"] == [str(out / "ppo")]
    assert sft["chat_template"] == ppo["chat_template"] and sft["chat_template"]["jinja"]
    verified = _read(out / "gguf" / "verify.json")
    assert [(Path(f["path"]).name, f["passed"]) for f in verified["files"]] == [("run-f16.gguf", True)]
    state = _read(out / "pipeline.json")["stages"]
    assert list(state) == STAGES and {s["status"] for s in state.values()} == {"done"}
    assert state["sft"]["settings"]["max_steps"] == 2
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not list(out.glob(".*tmp*"))


def test_table_shows_every_number_as_the_stages_wrote_it(runs):
    _, printed = runs["first"]
    out = runs["out"]
    table = "\n".join(_table(printed))
    pretrain, sft, reward = (_read(out / s / "lowrank.json")["metrics"] for s in ("pretrain", "sft", "reward"))
    assert f"held-out loss {pretrain['initial_eval_loss']:.3f} -> {pretrain['eval_loss']:.3f}" in table
    assert f"held-out loss {sft['initial_eval_loss']:.3f} -> {sft['eval_loss']:.3f}  (8 held-out examples)" in table
    accuracy = {s: _read(out / s / "task_eval.json")["accuracy"] for s in ("pretrain", "sft", "ppo")}
    practice = _read(out / "pretrain" / "task_eval.json")["practice_accuracy"]
    assert (f"base {accuracy['pretrain']:.1%} (practice format {practice:.1%}),  after SFT {accuracy['sft']:.1%},  "
            f"after PPO {accuracy['ppo']:.1%}  (greedy exact match, 8 held-out problems)") in table
    pairs = _read(out / "reward" / "lowrank.json")["data"]["eval_pairs"]
    assert f"pairwise accuracy {reward['eval_accuracy']:.1%} on {pairs} held-out pairs" in table
    step = json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert f"mean reward {step['score']:.3f} -> {step['score']:.3f} (first / last 1 of 1 steps)" in table
    assert f"KL to the reference {step['kl']:.3f} nats" in table
    size = (out / "gguf" / "run-f16.gguf").stat().st_size / 2**20
    assert any(line.split()[-4:] == [f"{size:.1f}", "MiB", "verify", "PASS"] and "run-f16.gguf" in line
               for line in table.splitlines())
    sample = _read(out / "gguf" / "verify.json")["sample"]
    question = json.loads((out / "task" / "eval.jsonl").read_text().splitlines()[0])
    assert sample["messages"] == [{"role": "user", "content": question["instruction"]}]
    assert sample["expected"] == question["output"] and Path(sample["file"]).name == "run-f16.gguf"
    verdict = "(correct)" if sample["correct"] else f"(wrong: expected {question['output']})"
    answer = sample["answer"].strip().replace("\n", "\\n") or "(empty answer)"
    assert f"    user       {question['instruction']}" in table.splitlines()
    assert f"    assistant  {answer}  {verdict}" in table.splitlines()


def test_task_accuracy_is_measured_on_the_held_out_split(runs):
    from lowrank.task_scoring import is_correct

    out = runs["out"]
    held_out = [json.loads(line) for line in (out / "task" / "eval.jsonl").read_text().splitlines()]
    for stage in ("pretrain", "sft", "ppo"):
        result = _read(out / stage / "task_eval.json")
        assert result["eval_data"] == str(out / "task" / "eval.jsonl") and result["problems"] == len(held_out) == 8
        assert result["accuracy"] == result["correct"] / 8
        for example, record in zip(result["examples"], held_out):
            assert example["prompt"] == record["instruction"] and example["expected"] == record["output"]
            assert example["correct"] == is_correct(record, example["answer"])
    assert _read(out / "ppo" / "task_eval.json")["adapter"] == str(out / "ppo")


def test_the_base_is_also_scored_in_its_practice_format_and_a_base_without_the_skill_is_flagged(runs):
    from lowrank.cli.pipeline import BASE_SKILL_FLOOR
    from lowrank.task_scoring import is_correct

    _, printed = runs["first"]
    out = runs["out"]
    held_out = [json.loads(line) for line in (out / "task" / "eval.jsonl").read_text().splitlines()]
    result = _read(out / "pretrain" / "task_eval.json")
    assert len(result["practice_examples"]) == 5
    for example, record in zip(result["practice_examples"], held_out):
        assert example["prompt"] == record["practice"] and "\n" not in example["answer"]
        assert example["correct"] == is_correct(record, example["answer"])
    assert f"in its practice format (the skill without the chat): {result['practice_accuracy']:.1%}" in printed
    flagged = "warning: the base has not learned the task" in printed
    assert flagged == (result["practice_accuracy"] < BASE_SKILL_FLOOR)
    for stage in ("sft", "ppo"):  # adapters are scored in the chat only
        assert "practice_accuracy" not in _read(out / stage / "task_eval.json")


def test_ppo_is_scored_by_the_reward_model_on_the_held_out_prompts_against_sft(runs):
    """The reward model's mean score of PPO's and of SFT's greedy answers to the same held-out prompts:
    recomputed here from the adapters, and shown in the table."""
    from peft import PeftModel

    from lowrank.models import load_base_model, load_tokenizer
    from lowrank.runrecord import read
    from lowrank.scoring import score_texts
    from lowrank.task_scoring import generate_answers, prompt_messages

    out = runs["out"]
    records = [json.loads(line) for line in (out / "task" / "eval.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(out / "pretrain"))
    template = read(out / "ppo").chat_template.jinja
    measured = _read(out / "ppo" / "task_eval.json")["reward_score"]
    assert measured["reward_adapter"] == str(out / "reward")
    prompts = [prompt_messages(r) for r in records]
    for role, adapter in (("policy", out / "ppo"), ("reference", out / "sft")):
        model = PeftModel.from_pretrained(load_base_model(str(out / "pretrain"), "none", gradient_checkpointing=False),
                                          str(adapter))
        answers = generate_answers(model, tokenizer, template, records, max_new_tokens=8)
        scores = score_texts(out / "reward", str(out / "pretrain"), list(zip(prompts, answers)), quant="none")
        assert measured[role] == pytest.approx(sum(scores) / len(scores), abs=1e-4), role
    table = "\n".join(_table(runs["first"][1]))
    assert (f"reward-model score of the greedy answers to the held-out prompts: SFT {measured['reference']:.3f}, "
            f"PPO {measured['policy']:.3f}") in table


def test_second_run_prints_the_same_table_without_loading_a_model(runs):
    code, printed, calls = runs["again"]
    assert code == 0 and calls == []
    assert not [line for line in printed.splitlines() if line.startswith("[")]  # no stage line: only the table
    assert "(every stage finished earlier: nothing ran)" in printed
    assert _table(printed) == _table(runs["first"][1])


def test_interrupted_stage_runs_again_with_every_stage_after_it(runs):
    code, printed, calls = runs["interrupted"]
    assert code == 0, printed
    assert [c for c in calls if c in STAGES] == ["merge", "export", "verify"]  # what run_stage ran
    assert "measure_task_accuracy" not in calls and "load_base_model" not in calls  # nothing earlier measured again
    assert [line for line in printed.splitlines() if "done (skipped)" in line] == [
        f"[{i}/8] {name}: done (skipped)" for i, name in enumerate(STAGES[:5], 1)]
    assert _table(printed)[:5] == _table(runs["first"][1])[:5]  # the trained stages' rows are unchanged


def test_failed_verification_shows_in_the_table_and_exits_1(runs):
    code, printed = runs["failed"]
    assert code == 1
    assert "verify FAIL (logits differ by 1.00e-01)" in printed


def test_a_quantized_file_that_fails_verification_on_numbers_exits_1(runs, tmp_path, capsys, monkeypatch):
    """A Q8_0 file whose largest tensor has its block scales negated as it is written: verify FAIL, exit 1."""
    from lowrank.export import gguf as gguf_module

    from test_verify_quality import scramble_scales

    real = gguf_module.write_direct

    def write_then_break(source, vocab, gtype, path, *args, **kwargs):
        written = real(source, vocab, gtype, path, *args, **kwargs)
        if gtype.name == "q8_0":
            scramble_scales(written, written.with_name("scrambled"))
            shutil.move(written.with_name("scrambled"), written)
        return written

    out = tmp_path / "run"
    shutil.copytree(runs["out"], out)
    recipe = tmp_path / "q8.yaml"
    recipe.write_text(runs["recipe"].read_text().replace("export: {type: [f16]}", "export: {type: [f16, q8_0]}"))
    monkeypatch.setattr(gguf_module, "write_direct", write_then_break)
    code, printed, _ = _cli([str(recipe), "--output-dir", str(out), "--overwrite"], capsys)
    assert code == 1
    assert re.search(r"verify FAIL \(.*KL to run-f16.gguf \S+ nats exceeds the limit", printed), printed


def test_changed_settings_of_a_finished_stage_are_refused_without_overwrite(runs, tmp_path, capsys):
    out = runs["out"]
    recipe = tmp_path / "changed.yaml"
    recipe.write_text(runs["recipe"].read_text().replace("reward: {max_steps: 2,", "reward: {max_steps: 3,"))
    before = (out / "pipeline.json").read_bytes()
    code, _, err = _cli([str(recipe), "--output-dir", str(out)], capsys)
    assert code == 2
    assert err == (f"lowrank run: error: {out / 'reward'}: the reward stage finished with other settings "
                   "(max_steps: 2 -> 3); pass --overwrite to run it again, and every stage after it, "
                   "or choose another --output-dir\n")
    assert (out / "pipeline.json").read_bytes() == before


def test_overwrite_runs_a_changed_stage_again_and_every_stage_after_it(runs, tmp_path):
    from lowrank.pipeline.state import decide, read_state

    changed = runs["recipe"].read_text().replace("reward: {max_steps: 2,", "reward: {max_steps: 3,")
    _, stages = _plan(tmp_path, changed, "--output-dir", str(runs["out"]))
    assert decide(list(stages.values()), read_state(runs["out"]), overwrite=True) == ["skip"] * 3 + ["run"] * 5


def test_interrupted_training_resumes_only_with_the_settings_it_started_with(tmp_path):
    from lowrank.pipeline.state import may_resume, settings

    _, stages = _plan(tmp_path, None)
    sft, reward = stages["sft"], stages["reward"]
    for stage in (sft, reward):
        (stage.dir / "checkpoints" / "step-2").mkdir(parents=True)
        (stage.dir / "checkpoints" / "step-2" / "state.pt").write_bytes(b"")
    state = {"stages": {s.name: {"settings": settings(s), "status": "started"} for s in (sft, reward)}}
    assert may_resume(sft, state) and may_resume(reward, state)  # reward training resumes too (issue 15)
    state["stages"]["sft"]["settings"]["learning_rate"] = 1.0
    assert not may_resume(sft, state)
    del state["stages"]["reward"]  # a stage the state never saw start has nothing of its own to resume
    assert not may_resume(reward, state)


def test_chat_loads_the_ppo_adapter_on_the_pretrained_base(runs):
    from lowrank.apps.backends import SamplingConfig
    from lowrank.apps.loading import load_backend

    backend = load_backend(runs["out"] / "ppo", device="cpu")
    try:
        assert backend.kind == "adapter" and backend.template_source.endswith("from lowrank.json")
        assert "".join(backend.generate([{"role": "user", "content": "Hi"}], SamplingConfig(max_tokens=4, seed=0)))
    finally:
        backend.close()


# --- refused before anything runs ----------------------------------------------------------------

def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lowrank.cli import main

    capsys.readouterr()
    code = main(["run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(tmp_path, capsys, recipe: str | None, *flags: str) -> str:
    """Run a recipe that must be refused: exit 2, one line, nothing written; return the message."""
    args = ["--output-dir", str(tmp_path / "run"), *flags]
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        args.insert(0, str(tmp_path / "recipe.yaml"))
    code, _, err = _cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("lowrank run: error: "), err
    assert not (tmp_path / "run").exists()
    return err.removeprefix("lowrank run: error: ").rstrip("\n")


def test_missing_recipe_file_is_a_one_line_error(tmp_path, capsys):
    message = _refused(tmp_path, capsys, None, str(tmp_path / "nope.yaml"))
    assert message == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_binary_recipe_file_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.bin"
    recipe.write_bytes(b"stages:\n  - sft: {}\n\xff\xfe\x00binary")
    message = _refused(tmp_path, capsys, None, str(recipe))
    assert message == f"{recipe}: not a text file (byte 20 is not UTF-8); give a YAML recipe"


def test_unknown_stage_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - rewrd: {}\n")
    assert message == (f"{tmp_path / 'recipe.yaml'}: stage 2: unknown stage 'rewrd' (did you mean 'reward'?); "
                       "stages are task, pretrain, sft, pairs, reward, ppo, dpo, grpo, merge, export, verify")


def test_unknown_field_of_a_stage_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - reward: {}\n  - ppo: {stpes: 3}\n")
    assert message == (f"{tmp_path / 'recipe.yaml'}: unknown field 'stpes' in stage 'ppo' (PPOConfig) "
                       "(did you mean 'steps'?); see `lowrank ppo --help` for its fields")


def test_field_of_the_wrong_type_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {learning_rate: fast}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: stage 'sft': field 'learning_rate' must be float, got 'fast'"


def test_unknown_top_level_field_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "modle: tiny\nstages: [sft]\n")
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}: unknown field 'modle' (did you mean 'model'?)")


def test_stage_out_of_order_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - reward: {}\n  - sft: {}\n")
    assert message == (f"{tmp_path / 'recipe.yaml'}: stage 'sft' comes after 'reward'; stages run in the order "
                       "task -> pretrain -> sft -> pairs -> reward -> ppo -> dpo -> grpo -> merge -> export -> verify")


def test_stage_listed_twice_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - sft: {max_steps: 2}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: stage 'sft' is listed twice; each stage runs once"


def test_stage_without_the_stage_it_reads_is_refused(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - merge: {}\n  - verify: {}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: stage 'verify' needs an 'export' stage (the files to check) before it"


def test_recipe_may_not_set_what_the_pipeline_wires(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - reward: {sft_adapter: elsewhere}\n")
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}: reward.sft_adapter is set by `lowrank run` itself")


def test_data_of_a_task_stage_may_not_be_set(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - task: {}\n  - sft: {data: mine.jsonl}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: sft.data is set by `lowrank run` itself from the task stage"


def test_unknown_task_size_is_refused(tmp_path, capsys):
    from lowrank.tasks import DEFAULT_SIZES

    message = _refused(tmp_path, capsys, "stages:\n  - task: {sizes: {evl: 5}}\n  - sft: {}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: task: unknown size 'evl'; sizes are {', '.join(DEFAULT_SIZES)}"


def test_bad_task_length_is_refused_before_anything_runs(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - task: {length: [6, 3]}\n  - sft: {}\n")
    assert message == (f"{tmp_path / 'recipe.yaml'}: task: length [6, 3] must have 1 <= low <= high <= 26 "
                       "(letters per problem)")


def test_task_sft_errors_above_one_is_refused_before_anything_runs(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - task: {sft_errors: 1.5}\n  - sft: {}\n")
    assert message == f"{tmp_path / 'recipe.yaml'}: task: sft_errors must be a share from 0 to 1, got 1.5"


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    message = _refused(tmp_path, capsys, None, "--model", str(tmp_path / "no-such-model"))
    assert message.startswith(str(tmp_path / "no-such-model"))


def test_unknown_gguf_type_is_refused_before_training(tmp_path, capsys):
    message = _refused(tmp_path, capsys, None, "--type", "f16,q3_z")
    assert message.startswith("--type: unknown GGUF type 'q3_z'")


def test_missing_data_file_is_refused_before_training(tmp_path, capsys):
    message = _refused(tmp_path, capsys, None, "--prompts", str(tmp_path / "p.jsonl"))
    assert message == f"--prompts {tmp_path / 'p.jsonl'}: file not found"


def test_finished_output_the_pipeline_did_not_record_is_refused(tmp_path, capsys):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "lowrank.json").write_text("{}")
    code, _, err = _cli(["--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err == (f"lowrank run: error: {tmp_path / 'run' / 'sft'} holds a finished sft output that pipeline.json "
                   "does not record (another run's?); pass --overwrite to replace it and every later stage, "
                   "or choose another --output-dir\n")


# --- configuration: recipe, flags, defaults, wiring -----------------------------------------------

def _plan(tmp_path, recipe: str | None, *flags: str):
    from lowrank.cli import build_parser
    from lowrank.cli.pipeline import build_pipeline_config
    from lowrank.pipeline import plan_stages

    args = ["run", "--output-dir", str(tmp_path / "run"), *flags]
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        args.insert(1, str(tmp_path / "recipe.yaml"))
    config, listed, source = build_pipeline_config(build_parser("run").parse_args(args))
    return config, {s.name: s for s in plan_stages(config, listed, source)}


def _configs(tmp_path, recipe: str | None, *flags: str):
    config, stages = _plan(tmp_path, recipe, *flags)
    return config, {name: stage.config for name, stage in stages.items()}


def test_flags_override_the_recipe_and_stage_fields_fill_stage_configs(tmp_path):
    config, configs = _configs(tmp_path, "quant: int8\nseed: 3\nstages:\n  - sft: {lora_r: 4}\n  - reward: {}\n"
                                      "  - ppo: {steps: 3, max-new-tokens: 5}\n  - merge: {dtype: bfloat16}\n"
                                      "  - export: {type: q8_0}\n", "--quant", "none")
    run = tmp_path / "run"
    assert (config.quant, config.seed) == ("none", 3)
    assert {configs[s].quant for s in ("sft", "reward", "ppo")} == {"none"}
    assert {configs[s].seed for s in ("sft", "reward", "ppo")} == {3}
    assert (configs["ppo"].steps, configs["ppo"].max_new_tokens, configs["sft"].lora_r) == (3, 5, 4)
    assert configs["ppo"].rollout_batch_size == 16  # a recipe's stage starts from the stage's own defaults
    assert (configs["ppo"].sft_adapter, configs["ppo"].reward_adapter) == (str(run / "sft"), str(run / "reward"))
    assert (configs["merge"].adapters, configs["merge"].out, configs["merge"].dtype) == ([str(run / "ppo")], str(run / "merged"), "bfloat16")
    assert (configs["export"].type, configs["export"].name, configs["export"].verify) == (["q8_0"], "run", False)


def test_the_sft_line_names_its_base_in_words(tmp_path):
    from lowrank.cli.pipeline import describe

    for quant, words in (("none", "(unquantized)"), ("nf4", "(4-bit NF4, QLoRA)"), ("int8", "(8-bit)")):
        _, stages = _plan(tmp_path, "stages: [sft]\n", "--quant", quant)
        assert describe(stages["sft"]).startswith(f"LoRA on tiny {words} with "), describe(stages["sft"])


def test_config_flag_names_the_recipe_too(tmp_path, capsys):
    from lowrank.cli import build_parser
    from lowrank.cli.pipeline import build_pipeline_config

    (tmp_path / "a.yaml").write_text("stages: [sft, merge]\n")
    args = build_parser("run").parse_args(["run", "--config", str(tmp_path / "a.yaml"), "--output-dir", "x"])
    assert [name for name, _ in build_pipeline_config(args)[1]] == ["sft", "merge"]
    message = _refused(tmp_path, capsys, "stages: [sft]\n", "--config", str(tmp_path / "a.yaml"))
    assert message == f"two recipes: {tmp_path / 'recipe.yaml'} and --config {tmp_path / 'a.yaml'}; give one"


def test_without_a_recipe_tiny_models_run_the_default_stages_short(tmp_path):
    from lowrank.data import SAMPLE_FILES
    from lowrank.ppo import PPOConfig

    _, configs = _configs(tmp_path, None)
    assert list(configs) == ["sft", "reward", "ppo", "merge", "export", "verify"]
    assert configs["ppo"].steps == 16 and configs["ppo"].prompts == str(SAMPLE_FILES["prompts"])
    assert configs["export"].type == ["f16", "q8_0", "q4_k_m"]
    _, configs = _configs(tmp_path, None, "--quick")
    assert configs["ppo"].steps == 1 and configs["sft"].max_steps == 2
    _, configs = _configs(tmp_path, None, "--model", str(tmp_path / "some-model"))
    assert configs["ppo"].steps == PPOConfig().steps and configs["ppo"].model == str(tmp_path / "some-model")


def test_shipped_recipes_are_valid(tmp_path):
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert {r.name for r in recipes} >= {"demo.yaml", "demo-grpo.yaml", "demo-dpo.yaml", "llama2-7b-qlora.yaml",
                                         "llama2-7b-int8.yaml", "llama2-7b-dpo.yaml", "llama2-7b-grpo-gsm8k.yaml"}
    for recipe in recipes:
        _, configs = _configs(tmp_path, recipe.read_text())
        assert list(configs)[-3:] == ["merge", "export", "verify"], recipe.name
        if "grpo" in configs:  # what the pipeline checks before any stage starts
            from lowrank.grpo import check_config
            from lowrank.rewards import load_reward_function

            check_config(configs["grpo"])
            assert configs["grpo"].rewards and all(load_reward_function(r) for r in configs["grpo"].rewards)
        policy = [name for name in ("grpo", "dpo", "ppo", "sft") if name in configs][0]
        assert configs["merge"].adapters == [str(tmp_path / "run" / policy)], recipe.name


def test_rl_recipes_wire_their_data(tmp_path):
    root = Path(__file__).resolve().parents[1] / "recipes"
    _, configs = _configs(tmp_path, (root / "llama2-7b-grpo-gsm8k.yaml").read_text())
    grpo = configs["grpo"]
    assert (grpo.prompts, grpo.prompt_field, grpo.rewards) == ("openai/gsm8k:main", "question", ["numeric"])
    assert grpo.sft_adapter == str(tmp_path / "run" / "sft") and grpo.gradient_checkpointing
    _, configs = _configs(tmp_path, (root / "llama2-7b-dpo.yaml").read_text())
    assert configs["dpo"].pairs == "trl-lib/ultrafeedback_binarized" and configs["dpo"].loss == "sigmoid"
    _, configs = _configs(tmp_path, (root / "demo-grpo.yaml").read_text())
    assert configs["grpo"].rewards == ["exact"] and configs["grpo"].prompts == str(tmp_path / "run" / "task" / "prompts.jsonl")


# --- dpo and grpo stages ----------------------------------------------------------------------------

RL_RECIPE = """\
model: tiny
seed: 0
stages:
  - task: {name: sort, sizes: {pretrain: 16, sft: 24, eval: 6, preferences: 24, prompts: 4}, eval_max_new_tokens: 8}
  - sft: {max_steps: 2, batch_size: 2, max_length: 128, eval_every: 0, save_every: 0, gradient_checkpointing: false}
  - dpo: {max_steps: 2, batch_size: 4, micro_batch_size: 4, max_length: 128, eval_every: 0, save_every: 0,
          gradient_checkpointing: false, eval_fraction: 0.25}
  - grpo: {steps: 2, group_size: 2, prompts_per_step: 2, max_new_tokens: 6}
  - merge: {}
"""


def test_dpo_and_grpo_stages_start_from_sft_and_report_accuracy_and_kl(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RL_RECIPE)
    out = tmp_path / "run"
    code, printed = _run([str(tmp_path / "recipe.yaml"), "--output-dir", str(out)])
    assert code == 0, printed
    dpo, grpo = _read(out / "dpo" / "lowrank.json"), _read(out / "grpo" / "lowrank.json")
    assert dpo["sft_adapter"] == grpo["sft_adapter"] == str(out / "sft")
    assert dpo["data"]["source"] == str(out / "task" / "preferences.jsonl")
    assert grpo["data"]["source"] == str(out / "task" / "prompts.jsonl") and grpo["rewards"] == ["exact"]
    assert _read(out / "merged" / "lowrank.json")["adapters"] == [str(out / "grpo")]  # the last policy stage
    table = "\n".join(_table(printed))
    accuracy = {s: _read(out / s / "task_eval.json") for s in ("sft", "dpo", "grpo")}
    assert (f"after SFT {accuracy['sft']['accuracy']:.1%},  after DPO {accuracy['dpo']['accuracy']:.1%},  "
            f"after GRPO {accuracy['grpo']['accuracy']:.1%}") in table
    for stage in ("dpo", "grpo"):
        kl = accuracy[stage]["kl_to_reference"]
        assert kl >= 0 and f"KL to SFT on held-out prompts {kl:.3f} nats" in table
    metrics = dpo["metrics"]
    assert (f"held-out pairwise accuracy {metrics['initial_eval_accuracy']:.1%} -> {metrics['eval_accuracy']:.1%}"
            in table)
    steps = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert f"mean reward {steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f} (first / last 1 of 2 steps)" in table
    # No pretrain stage: the base never saw the practice format, so it is scored in the chat only; and GRPO
    # scored with the checker has no reward model to score its held-out answers.
    assert "practice_accuracy" not in _read(out / "task" / "task_eval.json") and "practice format" not in printed
    assert "reward-model score of the greedy answers" not in table


def test_grpo_stage_reads_the_reward_model_of_a_reward_stage_only_when_weighed_in(tmp_path):
    stages = "  - sft: {}\n  - reward: {}\n  - grpo: {%s}\n"
    _, configs = _configs(tmp_path, "stages:\n" + stages % "rewards: [numeric]")
    assert (configs["grpo"].reward_adapter, configs["grpo"].rewards) == ("", ["numeric"])
    _, configs = _configs(tmp_path, "stages:\n" + stages % "reward_adapter_weight: 0.5, rewards: [exact]")
    assert configs["grpo"].reward_adapter == str(tmp_path / "run" / "reward")


def test_grpo_without_any_reward_is_refused_before_training(tmp_path, capsys):
    from lowrank.cli import main

    (tmp_path / "recipe.yaml").write_text("stages:\n  - sft: {}\n  - grpo: {}\n")
    capsys.readouterr()
    assert main(["run", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no reward" in err[0], err


# --- the pairs stage ----------------------------------------------------------------------------------

def test_a_pairs_stage_feeds_reward_and_dpo_with_the_policys_pairs(tmp_path):
    recipe = ("stages:\n  - task: {name: sort}\n  - sft: {}\n  - pairs: {samples_per_prompt: 2}\n  - reward: {}\n"
              "  - ppo: {}\n  - dpo: {}\n")
    _, configs = _configs(tmp_path, recipe)
    run = tmp_path / "run"
    pairs = configs["pairs"]
    assert (pairs.prompts, pairs.sft_adapter, pairs.rewards) == (str(run / "task" / "preferences.jsonl"),
                                                                 str(run / "sft"), ["exact"])
    assert configs["reward"].data == configs["dpo"].pairs == str(run / "pairs" / "pairs.jsonl")
    _, configs = _configs(tmp_path, recipe.replace("  - pairs: {samples_per_prompt: 2}\n", ""))
    assert configs["reward"].data == configs["dpo"].pairs == str(run / "task" / "preferences.jsonl")


def test_a_pairs_stage_without_a_task_ranks_the_given_preferences(tmp_path):
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    _, configs = _configs(tmp_path, "stages:\n  - sft: {}\n  - pairs: {rewards: [numeric]}\n  - reward: {}\n",
                          "--preferences", str(tmp_path / "prefs.jsonl"))
    assert configs["pairs"].prompts == str(tmp_path / "prefs.jsonl") and configs["pairs"].rewards == ["numeric"]
    assert configs["reward"].data == str(tmp_path / "run" / "pairs" / "pairs.jsonl")


def test_a_recipe_may_not_set_the_prompts_of_a_pairs_stage_after_a_task(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - task: {}\n  - sft: {}\n  - pairs: {prompts: x.jsonl}\n")
    assert "pairs.prompts is set by `lowrank run` itself from the task stage" in message


def test_a_pairs_stage_without_a_reward_is_refused_before_training(tmp_path, capsys):
    message = _refused(tmp_path, capsys, "stages:\n  - sft: {}\n  - pairs: {}\n  - reward: {}\n")
    assert "stage 'pairs': no reward" in message


def test_base_skill_line_warns_only_below_the_floor():
    from lowrank.cli.pipeline import BASE_SKILL_FLOOR, base_skill_line

    assert "warning" in base_skill_line(BASE_SKILL_FLOOR / 2) and "a base that has it" in base_skill_line(0.0)
    assert "warning" not in base_skill_line(BASE_SKILL_FLOOR) and "95.0%" in base_skill_line(0.95)
