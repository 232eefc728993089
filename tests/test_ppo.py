"""PPO is shown to work on a task whose reward is known, and adapter swapping inside it is exact.

The task. A random tiny model samples near-uniformly from ~1000 tokens, so any one word would
appear in a sampled response too rarely for PPO to ever see it rewarded. We therefore first
teach the policy (a brief SFT of a LoRA, written out here) to answer with a few words from a
vocabulary of eight one-token words; "blue" is one of them, so about a third of SFT responses
contain it. The reward adapter is trained with `lowrank.reward` on pairs whose chosen response
contains "blue" and whose rejected one does not. PPO must then raise the rate of "blue" and the
mean reward clearly above the SFT policy's, with the KL to the SFT reference bounded.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from lowrank import checkpoints
from lowrank.cli import main
from lowrank.templates import stop_token_ids

from cli_support import (KILL_IN_CHECKPOINT, assert_trained_as_one, launch_two_processes, recorded,
                         run_killed, run_one_process)
from rl_support import PROMPTS, TARGET, train_sft_adapter as _train_sft_adapter, words as _words


@pytest.fixture(scope="module")
def task(tiny_spm, tmp_path_factory):
    """SFT adapter, reward adapter (trained with lowrank.reward), prompts file."""
    from lowrank.reward import RewardConfig, train_reward

    root = tmp_path_factory.mktemp("ppo_task")
    sft = _train_sft_adapter(tiny_spm, root / "sft")
    rng = random.Random(1)
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(240):
            f.write(json.dumps({"prompt": rng.choice(PROMPTS), "chosen": _words(rng, True),
                                "rejected": _words(rng, False)}) + "\n")
    reward = train_reward(RewardConfig(model=str(tiny_spm), data=str(root / "pairs.jsonl"), output_dir=str(root / "reward"),
                                       max_steps=60, batch_size=8, learning_rate=3e-3, quant="none",
                                       gradient_checkpointing=False, eval_fraction=0.15, eval_every=60))
    with open(root / "prompts.jsonl", "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return {"base": tiny_spm, "sft": sft, "reward": reward, "prompts": root / "prompts.jsonl", "root": root}


def _config(task, out_dir, **overrides):
    from lowrank.ppo import PPOConfig

    values = dict(model=str(task["base"]), sft_adapter=str(task["sft"]), reward_adapter=str(task["reward"]),
                  prompts=str(task["prompts"]), output_dir=str(out_dir), max_new_tokens=8, rollout_batch_size=16,
                  minibatch_size=4, ppo_epochs=4, learning_rate=1e-4, init_kl_coef=0.05, target_kl=2.0,
                  kl_horizon=1000, steps=25, seed=0, vf_coef=0.5)
    values.update(overrides)
    return PPOConfig(**values)


def _evaluate(task, policy_dir, samples: int = 64):
    """Sample ``samples`` responses of ``policy_dir`` (fixed seed); rate of TARGET, mean score, KL to SFT."""
    from peft import load_peft_weights, set_peft_model_state_dict

    from lowrank import ppo
    from lowrank.models import load_base_model, load_tokenizer
    from lowrank.roles import build_roles

    config = _config(task, task["root"] / "unused")
    model_path, tokenizer, (_, template), prompt_ids, _ = ppo._load_inputs(config)
    model = build_roles(load_base_model(model_path, "none", gradient_checkpointing=False),
                        reward_adapter=task["reward"], sft_adapter=task["sft"])
    set_peft_model_state_dict(model, load_peft_weights(str(policy_dir)), adapter_name="policy")
    torch.manual_seed(1234)
    batch = [prompt_ids[i % len(prompt_ids)] for i in range(samples)]
    rollout = ppo.collect_rollout(model, batch, config, stop_token_ids(tokenizer, template),
                                  tokenizer.eos_token_id, "cpu")
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(rollout.responses, rollout.mask)]
    kl = ((rollout.old_logprobs - rollout.reference_logprobs) * rollout.mask).sum(1).mean().item()
    return {"rate": sum(TARGET in t.split() for t in texts) / samples, "score": rollout.scores.mean().item(), "kl": kl}


@pytest.fixture(scope="module")
def trained(task):
    from lowrank.ppo import train_ppo

    records = []
    out = train_ppo(_config(task, task["root"] / "ppo"), on_step=records.append)
    return out, records


def test_ppo_raises_the_rewarded_property_with_bounded_kl(task, trained):
    """Measured (seed 0, 25 steps): rate of "blue" 0.20 -> 0.84, mean score -5.3 -> 4.2, KL 1.9 nats."""
    out, records = trained
    before = _evaluate(task, task["sft"])
    after = _evaluate(task, out)
    print(f"SFT: {before}  PPO: {after}")
    assert before["kl"] == pytest.approx(0.0, abs=1e-4)  # sanity: the SFT policy is its own reference
    assert after["rate"] >= before["rate"] + 0.4, (before, after)
    assert after["score"] >= before["score"] + 4.0, (before, after)
    assert 0.0 < after["kl"] < 8.0, after  # nats per response, against the SFT reference
    assert all(r["kl"] < 8.0 for r in records)


def test_output_is_a_peft_dir_with_metadata_metrics_and_plot(task, trained):
    from peft import PeftConfig

    out, records = trained
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["stage"] == "ppo" and meta["chat_template"]["name"] == "vicuna"
    assert PeftConfig.from_pretrained(str(out)).peft_type == "LORA"
    assert (out / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))
    for key in ("score", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "samples"):
        assert key in lines[0], key
    assert (out / "ppo_metrics.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()  # resume data of a finished run is removed


@pytest.fixture(scope="module")
def swapped(task):
    """The roles model after two PPO updates (hundreds of adapter switches), and a fresh rollout of it."""
    from lowrank import ppo
    from lowrank.models import load_base_model
    from lowrank.roles import build_roles, trainable_parameters

    config = _config(task, task["root"] / "unused", rollout_batch_size=8, ppo_epochs=2, learning_rate=1e-3)
    model_path, tokenizer, (_, template), prompt_ids, _ = ppo._load_inputs(config)
    model = build_roles(load_base_model(model_path, "none", gradient_checkpointing=False),
                        reward_adapter=task["reward"], sft_adapter=task["sft"])
    groups = trainable_parameters(model)
    optimizer = torch.optim.AdamW(groups["policy"] + groups["value"], lr=config.learning_rate)
    stop_ids = stop_token_ids(tokenizer, template)
    torch.manual_seed(0)
    for _ in range(2):
        rollout = ppo.collect_rollout(model, prompt_ids[:4] * 2, config, stop_ids, 2, "cpu")
        ppo.ppo_step(model, optimizer, groups["policy"] + groups["value"], rollout, ppo.make_kl_controller(config),
                     config, torch.Generator().manual_seed(0))
    rollout = ppo.collect_rollout(model, prompt_ids[:4] * 2, config, stop_ids, 2, "cpu")
    return model, tokenizer, rollout


def test_reference_logprobs_in_ppo_equal_the_sft_adapter_loaded_alone(task, swapped):
    from peft import PeftModel

    from lowrank.models import load_base_model
    from lowrank.rollout import response_logprobs

    model, _, rollout = swapped
    alone = PeftModel.from_pretrained(load_base_model(str(task["base"]), "none", gradient_checkpointing=False),
                                      str(task["sft"])).eval()
    input_ids, attention_mask = rollout.sequences()
    with torch.no_grad():
        expected, _ = response_logprobs(alone, input_ids, attention_mask, rollout.responses.shape[1])
    mask = rollout.mask.bool()
    assert torch.allclose(rollout.reference_logprobs[mask], expected[mask], atol=1e-5)
    # the policy has moved, so the test would see a policy adapter leaking into the reference
    assert (rollout.old_logprobs[mask] - expected[mask]).abs().max() > 1e-3


def test_reward_scores_in_ppo_equal_lowrank_score_on_the_same_text(task, swapped, tmp_path, capsys):
    from lowrank.ppo_step import score_responses
    from lowrank.data import tokenize_conversation
    from lowrank.templates import render

    model, tokenizer, _ = swapped
    template = json.loads((task["reward"] / "lowrank.json").read_text())["chat_template"]["jinja"]
    pairs = [("Say a few words.", "red blue cat"), ("List a few items, please, now.", "robot story"),
             ("Hi", "weather")]  # prompts of different lengths: left padding inside PPO
    queries, responses = [], []
    for prompt, response in pairs:
        messages = [{"role": "user", "content": prompt}]
        query = tokenizer(render(template, messages, tokenizer, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
        full = tokenize_conversation(tokenizer, template, messages + [{"role": "assistant", "content": response}],
                                     512)["input_ids"]
        assert full[: len(query)] == query
        queries.append(query)
        responses.append(full[len(query):])
    width, length = max(map(len, queries)), max(map(len, responses))
    query_ids = torch.tensor([[2] * (width - len(q)) + q for q in queries])
    query_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries])
    response_ids = torch.tensor([r + [2] * (length - len(r)) for r in responses])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in responses])
    in_ppo = score_responses(model, query_ids, query_mask, response_ids, mask)

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    capsys.readouterr()
    assert main(["score", "--reward", str(task["reward"]), "--model", str(task["base"]),
                 "--pairs", str(tmp_path / "pairs.jsonl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(pairs) and all(line.startswith("score ") for line in lines)
    printed = [float(line.split()[1]) for line in lines]
    assert printed == pytest.approx(in_ppo.tolist(), abs=1e-5)


SMALL = dict(steps=3, rollout_batch_size=8, ppo_epochs=1, save_every=1)


@pytest.fixture(scope="module")
def straight_small(task, tmp_path_factory):
    """An uninterrupted short run, which every interrupted and resumed one must match."""
    from lowrank.ppo import train_ppo

    return train_ppo(_config(task, tmp_path_factory.mktemp("ppo_straight") / "out", **SMALL))


def _resume_args(task, out) -> list[str]:
    return ["ppo", "--model", str(task["base"]), "--sft-adapter", str(task["sft"]), "--reward-adapter",
            str(task["reward"]), "--prompts", str(task["prompts"]), "--output-dir", str(out),
            "--max-new-tokens", "8", "--minibatch-size", "4", "--learning-rate", "1e-4", "--init-kl-coef", "0.05",
            "--target-kl", "2.0", "--kl-horizon", "1000", "--vf-coef", "0.5", "--seed", "0",
            "--steps", "3", "--rollout-batch-size", "8", "--ppo-epochs", "1", "--save-every", "1"]


def _same_policy(a_dir, b_dir) -> None:
    from peft import load_peft_weights

    a, b = load_peft_weights(str(a_dir)), load_peft_weights(str(b_dir))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_continues_exactly_where_the_run_stopped(task, straight_small, tmp_path):
    from lowrank.ppo import train_ppo

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ppo(_config(task, tmp_path / "resumed", **SMALL), on_step=stop_after_two)
    assert not (tmp_path / "resumed" / "lowrank.json").exists()  # an interrupted run never looks finished
    assert main([*_resume_args(task, tmp_path / "resumed"), "--resume"]) == 0
    _same_policy(straight_small, tmp_path / "resumed")


def test_ppo_killed_in_the_middle_of_a_checkpoint_resumes_to_the_same_policy(task, straight_small, tmp_path):
    from lowrank import train

    out = tmp_path / "killed"
    run_killed(KILL_IN_CHECKPOINT.format(n=2), _resume_args(task, out))
    assert checkpoints.list_checkpoints(out) == [1]  # the torn step-2 checkpoint does not count
    assert not (out / "lowrank.json").exists()
    assert main([*_resume_args(task, out), "--resume"]) == 0
    _same_policy(straight_small, out)


def test_two_processes_train_both_roles_as_one_process_on_both_their_rollouts(task, tmp_path, monkeypatch):
    """Under `accelerate launch` each process samples its own prompts, the two trained roles' gradients are
    averaged over the processes (train.average_gradients), and one process logs and writes the adapter.

    Both processes then hold the same policy and value weights after every minibatch update, and those
    of one process that is handed both processes' rollouts (their sampling is replayed, cli_support.
    record_steps) and takes each update on the union of their minibatches: process r of 2 samples
    prompts 2i + r of the seeded prompt stream, and each minibatch here is a process's whole rollout
    batch, so the union is the one process's batch. Advantages are whitened with the statistics of all
    processes' tokens (ppo_step.whiten_over_processes), as the one process whitens the union. Padding
    widths differ between the runs, so the log-probs round differently: fp32, tolerance 1e-4.
    """
    from peft import load_peft_weights

    flags = ["--model", str(task["base"]), "--sft-adapter", str(task["sft"]), "--reward-adapter",
             str(task["reward"]), "--prompts", str(task["prompts"]), "--quant", "none", "--steps", "2",
             "--ppo-epochs", "2", "--max-new-tokens", "6", "--learning-rate", "1e-3"]
    out = tmp_path / "ddp"
    launch_two_processes(tmp_path, ["ppo", *flags, "--output-dir", str(out), "--rollout-batch-size", "2",
                                    "--minibatch-size", "2"], timeout=300, record=True)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2 and meta["stage"] == "ppo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one process logs, once per step
    assert all(r["value_loss"] > 0 and 0 <= r["clip_fraction"] <= 1 for r in records)
    policy, sft = load_peft_weights(str(out)), load_peft_weights(str(task["sft"]))
    assert any(not torch.allclose(policy[k], sft[k]) for k in sft)  # the policy moved

    ranks = recorded(tmp_path)
    assert ranks[0]["samples"] != ranks[1]["samples"]  # each process sampled its own prompts
    one = run_one_process(monkeypatch, tmp_path, ["ppo", *flags, "--output-dir", str(tmp_path / "one"),
                                                  "--rollout-batch-size", "4", "--minibatch-size", "4"], replay=ranks)
    assert len(one["grads"]) == 4  # 2 steps of 2 epochs of one minibatch
    assert_trained_as_one(ranks, one)


def _run_cli(task, tmp_path, capsys, **changes):
    args = {"--model": str(task["base"]), "--sft-adapter": str(task["sft"]), "--reward-adapter": str(task["reward"]),
            "--prompts": str(task["prompts"]), "--output-dir": str(tmp_path / "out"), "--steps": "1"}
    args.update(changes)
    capsys.readouterr()
    code = main(["ppo", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "out").exists()  # nothing half-written
    return code, err


def test_value_head_starts_at_zero_and_the_reward_head_is_untouched(task):
    from lowrank import ppo
    from lowrank.models import load_base_model
    from lowrank.roles import build_roles, zero_value_head

    config = _config(task, task["root"] / "unused")
    model_path, tokenizer, (_, template), prompt_ids, _ = ppo._load_inputs(config)
    model = build_roles(load_base_model(model_path, "none", gradient_checkpointing=False),
                        reward_adapter=task["reward"], sft_adapter=task["sft"])
    batch, stop_ids = prompt_ids[:4], stop_token_ids(tokenizer, template)
    torch.manual_seed(5)
    before = ppo.collect_rollout(model, batch, config, stop_ids, 2, "cpu")
    assert before.values.abs().max() > 0.1  # the reward model's head, as InstructGPT starts it
    zero_value_head(model)
    torch.manual_seed(5)
    after = ppo.collect_rollout(model, batch, config, stop_ids, 2, "cpu")
    assert torch.equal(after.values, torch.zeros_like(after.values))
    assert torch.equal(after.scores, before.scores)  # the reward role keeps its own head
    assert torch.equal(after.responses, before.responses)


def test_value_warmup_trains_the_value_role_and_leaves_the_policy_alone(task):
    from lowrank import ppo
    from lowrank.models import load_base_model
    from lowrank.roles import build_roles, trainable_parameters

    config = _config(task, task["root"] / "unused", rollout_batch_size=4, minibatch_size=4, ppo_epochs=1,
                     learning_rate=1e-2)
    model_path, tokenizer, (_, template), prompt_ids, _ = ppo._load_inputs(config)
    model = build_roles(load_base_model(model_path, "none", gradient_checkpointing=False),
                        reward_adapter=task["reward"], sft_adapter=task["sft"])
    groups = trainable_parameters(model)
    policy_before = [p.detach().clone() for p in groups["policy"]]
    value_before = [p.detach().clone() for p in groups["value"]]
    optimizer = torch.optim.AdamW(groups["policy"] + groups["value"], lr=config.learning_rate)
    torch.manual_seed(0)
    rollout = ppo.collect_rollout(model, prompt_ids[:4], config, stop_token_ids(tokenizer, template), 2, "cpu")
    ppo.ppo_step(model, optimizer, groups["policy"] + groups["value"], rollout, ppo.make_kl_controller(config),
                 config, torch.Generator().manual_seed(0), train_policy=False)
    assert all(torch.equal(a, b) for a, b in zip(policy_before, groups["policy"]))
    assert not all(torch.equal(a, b) for a, b in zip(value_before, groups["value"]))


def test_loo_baseline_gives_each_prompt_responses_rewards_that_sum_to_zero(task, swapped):
    from lowrank.ppo_step import token_rewards

    _, _, rollout = swapped  # 8 responses, read as two groups of 4 (rows 0-3 and 4-7)
    config = _config(task, task["root"] / "unused", samples_per_prompt=4, score_baseline="loo",
                     init_kl_coef=0.0)
    rewards, _ = token_rewards(rollout, 0.0, config)
    per_response = rewards.sum(1)
    assert per_response.view(2, 4).sum(1).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    plain, _ = token_rewards(rollout, 0.0, _config(task, task["root"] / "unused", init_kl_coef=0.0))
    assert torch.allclose(plain.sum(1), rollout.scores)


def test_zero_samples_per_prompt_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--samples-per-prompt": "0"})
    assert code == 2 and len(err) == 1 and "--samples-per-prompt must be at least 1" in err[0]


def test_loo_baseline_with_one_sample_per_prompt_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--score-baseline": "loo"})
    assert code == 2 and len(err) == 1 and "--samples-per-prompt of at least 2" in err[0]


def test_unknown_score_baseline_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--score-baseline": "mean"})
    assert code == 2 and len(err) == 1 and "--score-baseline must be none or loo" in err[0]


def test_unknown_fast_rollout_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--fast-rollout": "turbo"})
    assert code == 2 and len(err) == 1 and "--fast-rollout must be one of off, merged, merged-graphs" in err[0]


def test_unknown_value_head_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--value-head": "random"})
    assert code == 2 and len(err) == 1 and "--value-head must be zero or reward" in err[0]


def test_value_warmup_as_long_as_the_run_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--value-warmup-steps": "1"})
    assert code == 2 and len(err) == 1 and "--value-warmup-steps" in err[0] and "below --steps (1)" in err[0]


def test_minibatch_larger_than_the_rollouts_of_a_step_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--rollout-batch-size": "2", "--samples-per-prompt": "2",
                                                    "--minibatch-size": "5"})
    assert code == 2 and len(err) == 1 and "rollouts per step (4" in err[0]


def _reward_recording(task, out_dir, edit):
    """A copy of the module's reward adapter in ``out_dir`` whose lowrank.json ``edit`` changed in place."""
    import shutil

    shutil.copytree(task["reward"], out_dir)
    meta = json.loads((out_dir / "lowrank.json").read_text())
    edit(meta)
    (out_dir / "lowrank.json").write_text(json.dumps(meta))
    return out_dir


def test_reward_adapter_of_another_base_is_refused(task, tiny_model_factory, tmp_path, capsys):
    from lowrank.models import model_digest

    other = tiny_model_factory(tokenizer="spm", num_layers=1)
    foreign = _reward_recording(task, tmp_path / "foreign_reward", lambda meta: meta.update(
        base={"id": str(other), "digest": model_digest(str(other))}))
    code, err = _run_cli(task, tmp_path, capsys, **{"--reward-adapter": str(foreign)})
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lowrank ppo: error:") and str(foreign) in err[0] and "base" in err[0]


def test_prompt_longer_than_the_context_is_refused(task, tmp_path, capsys):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "robot story " * 400}) + "\n")
    code, err = _run_cli(task, tmp_path, capsys, **{"--prompts": str(long_prompts)})
    assert code == 2 and len(err) == 1
    assert "prompt 2 has" in err[0] and "context of 512 tokens" in err[0]


def test_missing_sft_adapter_is_refused(task, tmp_path, capsys):
    code, err = _run_cli(task, tmp_path, capsys, **{"--sft-adapter": str(tmp_path / "no_such_sft")})
    assert code == 2 and len(err) == 1
    assert "SFT adapter directory" in err[0] and "no_such_sft" in err[0]


def test_a_learning_rate_that_moves_the_policy_too_far_is_named_in_the_log_once(task, tmp_path, caplog):
    """At 3e-3 every update moves the policy far past PPO's clip: the run says so in the first step
    where 3 steps after the first are known (step 4), and not again while it stays there."""
    import logging

    from lowrank.ppo import train_ppo
    from lowrank.rollout import STEP_SIZE_LIMIT

    with caplog.at_level(logging.WARNING, logger="lowrank.ppo"):
        out = train_ppo(_config(task, tmp_path / "out", learning_rate=3e-3, steps=5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warnings = [r.getMessage() for r in caplog.records if "lower --learning-rate" in r.getMessage()]
    assert sum(r["approx_kl"] for r in records[-3:]) / 3 > STEP_SIZE_LIMIT, records  # the alarm is real
    assert len(warnings) == 1 and warnings[0].startswith("step 4:"), warnings


def test_the_step_size_alarm_is_quiet_at_a_learning_rate_ppo_can_bound(task, trained, caplog):
    """The module's run (1e-4) stays under the limit in every 3 steps after the first (one step reached
    0.04), so the warning does not cry wolf."""
    from lowrank.rollout import step_size_alarm

    _, records = trained
    kls = [r["approx_kl"] for r in records]
    assert all(step_size_alarm(kls[:n]) is None for n in range(1, len(kls) + 1)), kls


def _weak_reward(task, tmp_path, accuracy: float):
    """The module's reward adapter, recorded as ranking ``accuracy`` of its held-out pairs right."""
    return _reward_recording(task, tmp_path / "weak_reward",
                             lambda meta: meta["metrics"].update(eval_accuracy=accuracy))


def test_weak_reward_adapter_is_refused_when_asked(task, tmp_path, capsys):
    weak = _weak_reward(task, tmp_path, 0.55)
    args = ["--model", str(task["base"]), "--sft-adapter", str(task["sft"]), "--reward-adapter", str(weak),
            "--prompts", str(task["prompts"]), "--output-dir", str(tmp_path / "out"), "--refuse-weak-reward"]
    capsys.readouterr()
    code = main(["ppo", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "out").exists()
    assert code == 2 and len(err) == 1 and err[0].startswith("lowrank ppo: error:"), err
    assert str(weak) in err[0] and "55.0%" in err[0] and "threshold 60%" in err[0]


def test_weak_reward_adapter_is_named_in_a_warning_and_the_run_goes_on(task, tmp_path, caplog):
    import logging

    from lowrank.ppo import train_ppo

    weak = _weak_reward(task, tmp_path, 0.55)
    with caplog.at_level(logging.WARNING, logger="lowrank.ppo"):
        out = train_ppo(_config(task, tmp_path / "out", reward_adapter=str(weak), steps=1))
    warnings = [r.getMessage() for r in caplog.records if "ranks only 55.0%" in r.getMessage()]
    assert len(warnings) == 1 and "--refuse-weak-reward" in warnings[0], warnings
    assert (out / "adapter_model.safetensors").is_file()


def test_reward_adapter_at_the_threshold_passes_quietly(task, tmp_path, caplog):
    import logging

    from lowrank.rollout import check_reward_accuracy
    from lowrank.runrecord import read_adapter

    log = logging.getLogger("test_weak_reward")
    for accuracy, threshold in ((0.6, 0.6), (0.55, 0.0)):  # at the threshold; the check turned off
        weak = _weak_reward(task, tmp_path / f"{accuracy}-{threshold}", accuracy)
        with caplog.at_level(logging.WARNING, logger="test_weak_reward"):
            check_reward_accuracy(read_adapter(weak, stage="reward"), weak, threshold, True, log)
    assert not caplog.records


def test_missing_eos_penalty_lowers_only_the_responses_that_never_ended():
    from types import SimpleNamespace

    from lowrank.ppo_step import penalised_scores

    rollout = SimpleNamespace(scores=torch.tensor([1.0, 2.0, 3.0]), ended=torch.tensor([True, False, True]))
    config = SimpleNamespace(score_clip=0.0, missing_eos_penalty=10.0)
    assert penalised_scores(rollout, config).tolist() == [1.0, -8.0, 3.0]
    config.score_clip = 2.5  # clipped first, then penalised
    assert penalised_scores(rollout, config).tolist() == [1.0, -8.0, 2.5]
    config.missing_eos_penalty = 0.0
    assert penalised_scores(rollout, config).tolist() == [1.0, 2.0, 2.5]
