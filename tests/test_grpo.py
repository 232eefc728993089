"""GRPO is shown to raise a programmatic reward on a task whose reward is known, the reference adapter
never moves, it runs under `accelerate launch`, and bad input is refused in one line.

The task is the PPO tests' (tests/rl_support.py): a brief SFT teaches a tiny model to answer with
2-4 words from eight one-token words, "blue" in about a third of the answers. The reward is a
user's function in a file, 1 when the completion contains "blue": GRPO must raise its rate.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowrank.cli import main

from cli_support import assert_trained_as_one, launch_two_processes, recorded, run_one_process
from rl_support import PROMPTS, TARGET, train_sft_adapter

REWARD_FILE = f'''
def has_target(prompts, completions, **fields):
    return [1.0 if "{TARGET}" in c.split() else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def task(tiny_spm, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_task")
    sft = train_sft_adapter(tiny_spm, root / "sft")
    with open(root / "prompts.jsonl", "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt, "answer": TARGET}) + "\n")
    (root / "target_reward.py").write_text(REWARD_FILE)
    return {"base": tiny_spm, "sft": sft, "prompts": root / "prompts.jsonl", "root": root,
            "reward": f"{root / 'target_reward.py'}:has_target"}


def _config(task, out_dir, **overrides):
    from lowrank.grpo import GRPOConfig

    values = dict(model=str(task["base"]), sft_adapter=str(task["sft"]), prompts=str(task["prompts"]),
                  output_dir=str(out_dir), rewards=[task["reward"]], quant="none", group_size=8, prompts_per_step=2,
                  max_new_tokens=8, beta=0.04, learning_rate=2e-3, steps=14, seed=0, minibatch_size=8,
                  log_samples=2)
    values.update(overrides)
    return GRPOConfig(**values)


def _target_rate(task, adapter_dir, samples: int = 96) -> float:
    """Share of ``samples`` sampled answers of ``adapter_dir`` (fixed seed) that contain TARGET."""
    from peft import PeftModel

    from lowrank.data import tokenize_prompt
    from lowrank.models import load_base_model, load_tokenizer
    from lowrank.rollout import decode_responses, sample
    from lowrank.templates import stop_token_ids

    tokenizer = load_tokenizer(str(task["base"]))
    template = json.loads((task["sft"] / "lowrank.json").read_text())["chat_template"]["jinja"]
    model = PeftModel.from_pretrained(load_base_model(str(task["base"]), "none", gradient_checkpointing=False),
                                      str(adapter_dir)).eval()
    ids = [tokenize_prompt(tokenizer, template, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
           for i in range(samples)]
    torch.manual_seed(1234)
    drawn = sample(model, ids, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
                   stop_ids=stop_token_ids(tokenizer, template), pad_id=tokenizer.pad_token_id, device="cpu")
    return sum(TARGET in text.split() for text in decode_responses(tokenizer, drawn)) / samples


@pytest.fixture(scope="module")
def trained(task):
    from lowrank.grpo import train_grpo

    records = []
    out = train_grpo(_config(task, task["root"] / "grpo"), on_step=records.append)
    return out, records


def test_grpo_raises_a_programmatic_reward(task, trained):
    """Measured (seed 0, 14 steps of 2 prompts x 8): rate of "blue" 0.23 -> 0.94, mean reward 0.31 -> 1.0."""
    out, records = trained
    before, after = _target_rate(task, task["sft"]), _target_rate(task, out)
    print(f"rate of {TARGET!r}: SFT {before:.2f} -> GRPO {after:.2f}; rewards {[r['reward'] for r in records]}")
    assert after >= before + 0.3, (before, after)
    first, last = records[0]["reward"], sum(r["reward"] for r in records[-3:]) / 3
    assert last > first + 0.2
    assert all(r["kl"] >= 0 for r in records) and records[-1]["kl"] > 0  # k3: a divergence, never negative


def test_output_is_a_peft_dir_with_metadata_and_every_metric(task, trained):
    from peft import PeftConfig

    out, records = trained
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["stage"] == "grpo" and meta["rewards"] == [task["reward"]]
    assert PeftConfig.from_pretrained(str(out)).peft_type == "LORA"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 15))
    for key in ("reward", f"reward/{task['reward']}", "reward_std", "zero_std_groups", "kl", "entropy",
                "clip_fraction", "approx_kl", "response_length", "truncated", "loss", "samples"):
        assert key in lines[0], key
    assert (out / "grpo_metrics.png").stat().st_size > 1000


def test_reference_adapter_never_changes_and_beta_zero_trains(task):
    """Several GRPO steps, beta 0 (no KL term): the policy moves, the reference stays bit for bit."""
    from lowrank import grpo, train
    from lowrank.models import load_base_model
    from lowrank.roles import build_roles, trainable_parameters
    from lowrank.templates import stop_token_ids

    config = _config(task, task["root"] / "unused", beta=0.0, epochs=2, minibatch_size=4)
    model_path, tokenizer, (_, template), prompts, (functions, weights), _ = grpo._load_inputs(config)
    model = build_roles(load_base_model(model_path, "none", gradient_checkpointing=False), sft_adapter=task["sft"])
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference." in n or ".policy." in n}
    assert any(".reference." in n for n in snapshot)
    accelerator = train.make_accelerator()
    parameters = trainable_parameters(model)["policy"]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=100, kind="constant")
    torch.manual_seed(0)
    for step in range(3):
        record, _ = grpo.grpo_step(accelerator, model, tokenizer, optimizer, scheduler, parameters, prompts, [0, 1],
                                   functions, weights, config, stop_token_ids(tokenizer, template),
                                   tokenizer.pad_token_id, torch.Generator().manual_seed(step))
        assert record["clip_fraction"] >= 0 and record["kl"] >= 0
    moved = [n for n, p in model.named_parameters() if n in snapshot and not torch.equal(p, snapshot[n])]
    assert moved and all(".policy." in n for n in moved), moved


def test_two_processes_train_as_one_process_on_both_their_completions(task, tmp_path, monkeypatch):
    """Under `accelerate launch` (DDP over gloo) each process samples the groups of its own prompts and both
    hold the same policy after every update: that of one process that is handed both processes'
    completions (their sampling is replayed, cli_support.record_steps) and takes each update on all of
    them. Process r of 2 takes prompts 2i + r of the seeded prompt stream; a group's advantages are
    relative to its own completions only, and the loss is divided by the completion tokens of the whole
    step over both processes, so the union is exact. Padding widths differ between the runs, so the
    log-probs round differently: fp32, tolerance 1e-4.
    """
    flags = ["--model", str(task["base"]), "--sft-adapter", str(task["sft"]), "--prompts", str(task["prompts"]),
             "--rewards", task["reward"], "--quant", "none", "--steps", "2", "--group-size", "4",
             "--max-new-tokens", "6", "--learning-rate", "1e-3"]
    out = tmp_path / "ddp"
    launch_two_processes(tmp_path, ["grpo", *flags, "--output-dir", str(out), "--prompts-per-step", "1"],
                         timeout=300, record=True)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2 and meta["stage"] == "grpo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one process logs, once per step
    assert (out / "adapter_model.safetensors").exists()

    ranks = recorded(tmp_path)
    assert ranks[0]["samples"] != ranks[1]["samples"]  # each process sampled its own prompts
    one = run_one_process(monkeypatch, tmp_path, ["grpo", *flags, "--output-dir", str(tmp_path / "one"),
                                                  "--prompts-per-step", "2"], replay=ranks)
    assert_trained_as_one(ranks, one)


def test_resume_continues_where_the_run_stopped(task, tmp_path):
    from peft import load_peft_weights

    from lowrank.grpo import train_grpo

    small = dict(steps=3, prompts_per_step=1, group_size=4, minibatch_size=4, save_every=1)
    straight = train_grpo(_config(task, tmp_path / "straight", **small))

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_grpo(_config(task, tmp_path / "resumed", **small), on_step=stop_after_two)
    assert not (tmp_path / "resumed" / "lowrank.json").exists()
    resumed = train_grpo(_config(task, tmp_path / "resumed", resume=True, **small))
    a, b = load_peft_weights(str(straight)), load_peft_weights(str(resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fast_rollout_trains_the_same_policy_as_the_plain_path(task, tmp_path):
    """Sampling from the merged copy draws the same completions (same distribution, same seed), so the
    whole run, updates included, ends at the plain path's policy; the copy is refreshed each step."""
    from peft import load_peft_weights

    from lowrank.grpo import train_grpo

    plain, fast = [], []
    train_grpo(_config(task, tmp_path / "plain", steps=3), on_step=plain.append)
    train_grpo(_config(task, tmp_path / "fast", steps=3, fast_rollout="merged"), on_step=fast.append)
    assert [r["samples"] for r in fast] == [r["samples"] for r in plain]
    assert [r["reward"] for r in fast] == [r["reward"] for r in plain]
    a, b = load_peft_weights(str(tmp_path / "plain")), load_peft_weights(str(tmp_path / "fast"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((tmp_path / "fast" / "lowrank.json").read_text())["config"]["fast_rollout"] == "merged"


# --- bad input: one line, exit 2, before any model loads where possible ------------------------------

def _run_cli(task, tmp_path, capsys, **flags):
    args = {"--model": str(task["base"]), "--sft-adapter": str(task["sft"]), "--prompts": str(task["prompts"]),
            "--rewards": task["reward"], "--output-dir": str(tmp_path / "out"), "--quant": "none", "--steps": "1",
            "--group-size": "2", "--prompts-per-step": "1", "--max-new-tokens": "4"}
    args.update(flags)
    capsys.readouterr()
    code = main(["grpo", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _refused(code, err, *needles):
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lowrank grpo: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_group_size_below_two_is_refused(task, tmp_path, capsys):
    _refused(*_run_cli(task, tmp_path, capsys, **{"--group-size": "1"}), "--group-size must be at least 2")
    assert not (tmp_path / "out").exists()


def test_unknown_fast_rollout_is_refused(task, tmp_path, capsys):
    _refused(*_run_cli(task, tmp_path, capsys, **{"--fast-rollout": "turbo"}), "--fast-rollout must be one of")
    assert not (tmp_path / "out").exists()


def test_negative_beta_is_refused(task, tmp_path, capsys):
    _refused(*_run_cli(task, tmp_path, capsys, **{"--beta": "-0.1"}), "--beta must be 0 or more")
    assert not (tmp_path / "out").exists()


def test_missing_reward_file_is_refused(task, tmp_path, capsys):
    _refused(*_run_cli(task, tmp_path, capsys, **{"--rewards": str(tmp_path / "nowhere.py") + ":f"}), "nowhere.py")
    assert not (tmp_path / "out").exists()


def test_reward_that_is_not_callable_is_refused(task, tmp_path, capsys):
    (tmp_path / "r.py").write_text("score = 3\n")
    _refused(*_run_cli(task, tmp_path, capsys, **{"--rewards": f"{tmp_path / 'r.py'}:score"}), "r.py:score",
             "not a function")
    assert not (tmp_path / "out").exists()


def test_reward_with_the_wrong_signature_is_refused(task, tmp_path, capsys):
    (tmp_path / "r.py").write_text("def score(completions):\n    return [0.0 for _ in completions]\n")
    _refused(*_run_cli(task, tmp_path, capsys, **{"--rewards": f"{tmp_path / 'r.py'}:score"}), "r.py:score")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, needle", [
    ("return [1.0]", "returned 1 value"),
    ("return [float('nan')] * len(completions)", "returned nan"),
    ("return ['good'] * len(completions)", "str"),
], ids=["wrong-count", "nan", "non-number"])
def test_reward_that_returns_bad_values_is_refused_at_the_first_call(task, tmp_path, capsys, body, needle):
    (tmp_path / "r.py").write_text(f"def score(prompts, completions, **fields):\n    {body}\n")
    code, err = _run_cli(task, tmp_path, capsys, **{"--rewards": f"{tmp_path / 'r.py'}:score"})
    # The model has loaded (and said so) by the first call; the error is still one line, the last.
    errors = [line for line in err if "error" in line.lower()]
    assert code == 2 and errors == [err[-1]] and not any("Traceback" in line for line in err), err
    assert err[-1].startswith("lowrank grpo: error: reward function ") and "r.py:score" in err[-1] and needle in err[-1]
    assert not (tmp_path / "out" / "lowrank.json").exists()


def test_reference_adapter_of_another_base_is_refused(task, tiny_model_factory, tmp_path, capsys):
    import shutil

    from lowrank.models import model_digest

    other = tiny_model_factory(tokenizer="spm", num_layers=1)
    foreign = tmp_path / "foreign_sft"
    shutil.copytree(task["sft"], foreign)
    meta = json.loads((foreign / "lowrank.json").read_text())
    meta["base"] = {"id": str(other), "digest": model_digest(str(other))}
    (foreign / "lowrank.json").write_text(json.dumps(meta))
    _refused(*_run_cli(task, tmp_path, capsys, **{"--sft-adapter": str(foreign)}), str(foreign), "base")
    assert not (tmp_path / "out").exists()


def test_no_reward_source_is_refused(task, tmp_path, capsys):
    _refused(*_run_cli(task, tmp_path, capsys, **{"--rewards": ""}), "no reward")


NEVER_REWARD = '''
def never(prompts, completions, **fields):
    return [0.0 for _ in completions]
'''


def test_a_reward_no_completion_earns_is_named_in_the_log(task, tmp_path, caplog):
    """Every group scoring the same gives every advantage 0: the run says so instead of silently
    training nothing (a base that never solves the task gives exactly this)."""
    import logging

    from lowrank.grpo import train_grpo

    (tmp_path / "never.py").write_text(NEVER_REWARD)
    with caplog.at_level(logging.WARNING, logger="lowrank.grpo"):
        out = train_grpo(_config(task, tmp_path / "out", rewards=[f"{tmp_path / 'never.py'}:never"], steps=3,
                                 group_size=4, minibatch_size=8))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["zero_std_groups"] == 1.0 for r in records)
    warnings = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 3:"), warnings


def test_the_signal_alarm_waits_for_a_whole_window_of_flat_groups():
    from lowrank.rollout import signal_alarm

    assert signal_alarm([1.0, 1.0]) is None  # too few steps to say
    assert signal_alarm([1.0, 0.5, 1.0, 1.0]) is None  # one group in two still had a spread at step 2
    assert "no learning signal" in signal_alarm([0.5, 1.0, 1.0, 1.0])
