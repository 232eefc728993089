"""`lowrank pairs`: the SFT policy's own answers, ranked by a reward function, become preference pairs.

The rules of choosing a pair are checked case by case on the pure function; the command runs on the
PPO tests' tiny policy (tests/rl_support.py), which answers with a few of eight words, "blue" in
about a third of its answers, against a user's reward function that wants "blue".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowrank.cli import main
from lowrank.errors import UserError
from lowrank.pairs import Candidate, PairsConfig, choose_pair, make_pairs

from rl_support import PROMPTS, TARGET, train_sft_adapter

REWARD_FILE = f'''
def has_target(prompts, completions, **fields):
    return [1.0 if "{TARGET}" in c.split() else 0.0 for c in completions]
'''


def policy(text: str, score: float) -> Candidate:
    return Candidate(text, score, "policy")


def record(text: str, score: float) -> Candidate:
    return Candidate(text, score, "record")


# --- choosing the pair -------------------------------------------------------------------------------

def test_a_wrong_sample_is_the_rejected_answer():
    best, worst = choose_pair([policy("a b", 1.0), policy("a c", 0.0)], record("a b", 1.0), record("b a", 0.0))
    assert (best.text, best.origin) == ("a b", "record")  # the record's chosen wins the tie
    assert (worst.text, worst.origin) == ("a c", "policy")


def test_the_lowest_scoring_sample_is_rejected():
    _, worst = choose_pair([policy("x", 0.5), policy("y", -2.0), policy("z", 0.0)], None, None)
    assert worst.text == "y"


def test_when_every_sample_is_right_the_records_rejected_stays():
    best, worst = choose_pair([policy("a b", 1.0), policy("a b", 1.0)], record("a b", 1.0), record("b a", 0.0))
    assert (worst.text, worst.origin) == ("b a", "record")


def test_samples_alone_make_a_pair_from_best_and_worst():
    best, worst = choose_pair([policy("low", 0.0), policy("high", 2.0)], None, None)
    assert (best.text, worst.text) == ("high", "low")


def test_samples_that_all_score_the_same_give_no_pair():
    assert choose_pair([policy("one", 1.0), policy("two", 1.0)], None, None) is None


def test_a_sample_better_than_the_records_chosen_is_chosen():
    best, worst = choose_pair([policy("great", 3.0), policy("bad", 0.0)], record("good", 1.0), None)
    assert (best.text, best.origin, worst.text) == ("great", "policy", "bad")


def test_a_difference_within_the_margin_is_no_preference():
    assert choose_pair([policy("a", 1.0), policy("b", 0.6)], None, None, margin=0.5) is None
    _, worst = choose_pair([policy("a", 1.0), policy("b", 0.6)], None, record("c", 0.0), margin=0.5)
    assert worst.text == "c"  # the record's rejected is far enough below


def test_no_candidates_give_no_pair():
    assert choose_pair([], None, None) is None


# --- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tiny_spm, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_task")
    sft = train_sft_adapter(tiny_spm, root / "sft")
    with open(root / "prefs.jsonl", "w") as f:
        for i, prompt in enumerate(PROMPTS * 4):
            f.write(json.dumps({"prompt": prompt, "chosen": f"{TARGET} red", "rejected": "cat cat",
                                "answer": TARGET, "id": i}) + "\n")
    (root / "target_reward.py").write_text(REWARD_FILE)
    return {"base": tiny_spm, "sft": sft, "prefs": root / "prefs.jsonl", "root": root,
            "reward": f"{root / 'target_reward.py'}:has_target"}


def _config(task, out_dir, **overrides) -> PairsConfig:
    values = dict(model=str(task["base"]), sft_adapter=str(task["sft"]), prompts=str(task["prefs"]),
                  output_dir=str(out_dir), rewards=[task["reward"]], quant="none", samples_per_prompt=3,
                  max_new_tokens=8, seed=0)
    values.update(overrides)
    return PairsConfig(**values)


@pytest.fixture(scope="module")
def made(task):
    out = make_pairs(_config(task, task["root"] / "pairs"))
    lines = (out / "pairs.jsonl").read_text().splitlines()
    return out, [json.loads(line) for line in lines]


def test_pairs_put_the_policys_wrong_answers_as_rejected(made):
    _, pairs = made
    assert len(pairs) == 20  # one per prompt: every record has a rejected response to fall back on
    from_policy = [p for p in pairs if p["rejected_from"] == "policy"]
    assert from_policy, "the policy misses 'blue' in two of three answers: some rejected answers must be its own"
    for pair in pairs:
        assert TARGET in pair["chosen"].split() and TARGET not in pair["rejected"].split()
        assert pair["rejected"] == pair["rejected"].strip() and pair["rejected"]
    assert all(p["rejected"] != "cat cat" for p in from_policy)
    assert [p["id"] for p in pairs] == list(range(20)) and {p["answer"] for p in pairs} == {TARGET}


def test_the_pairs_file_is_what_reward_and_dpo_read(made):
    from lowrank.data.prompts import load_preference_pairs

    out, pairs = made
    loaded = load_preference_pairs(str(out / "pairs.jsonl"))
    assert [p["rejected"] for p in loaded] == [p["rejected"] for p in pairs]


def test_the_record_counts_what_was_written(made):
    from lowrank import runrecord

    out, pairs = made
    meta = runrecord.read(out)
    assert meta.stage == "pairs" and meta.metrics["pairs"] == len(pairs) == meta.metrics["prompts"]
    assert meta.metrics["rejected_from_policy"] == sum(p["rejected_from"] == "policy" for p in pairs)
    assert meta.metrics["samples"] == 3 * 20 and 0 < meta.metrics["mean_sample_reward"] < 1
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps[-1]["pairs"] == len(pairs)
    assert len(steps) == steps[0]["max_steps"] == 1  # 20 prompts x 3 answers fit one generate call of 64


def test_the_same_seed_gives_the_same_pairs(task, made):
    _, pairs = made
    again = make_pairs(_config(task, task["root"] / "pairs_again"))
    assert [json.loads(line) for line in (again / "pairs.jsonl").read_text().splitlines()] == pairs


def test_the_command_writes_pairs_and_refuses_to_replace_them_silently(task, tmp_path, capsys):
    args = ["pairs", "--model", str(task["base"]), "--sft-adapter", str(task["sft"]), "--prompts", str(task["prefs"]),
            "--rewards", task["reward"], "--quant", "none", "--samples-per-prompt", "2", "--max-new-tokens", "8",
            "--output-dir", str(tmp_path / "p")]
    assert main(args) == 0
    assert "20 pairs from 20 prompts" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


# --- bad input: one line each, before any model loads --------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"samples_per_prompt": 0}, "--samples-per-prompt must be at least 1"),
    ({"margin": -1.0}, "--margin must be 0 or more"),
    ({"temperature": 0.0}, "--temperature must be above 0"),
    ({"rewards": []}, "no reward"),
    ({"prompts": ""}, "no prompts"),
])
def test_bad_settings_are_refused(task, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        make_pairs(_config(task, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_a_missing_reward_file_is_refused(task, tmp_path):
    with pytest.raises(UserError, match="nowhere.py"):
        make_pairs(_config(task, tmp_path / "out", rewards=[str(tmp_path / "nowhere.py") + ":f"]))


def test_an_sft_adapter_of_another_base_is_refused(task, tiny_bpe, tmp_path):
    with pytest.raises(UserError, match="base"):
        make_pairs(_config(task, tmp_path / "out", model=str(tiny_bpe)))


def test_prompts_that_give_no_pair_are_refused(task, tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    (tmp_path / "flat.py").write_text("def flat(prompts, completions, **fields):\n    return [1.0] * len(completions)\n")
    with pytest.raises(UserError, match="no prompt gave a pair"):
        make_pairs(_config(task, tmp_path / "out", prompts=str(tmp_path / "prompts.jsonl"),
                           rewards=[f"{tmp_path / 'flat.py'}:flat"]))
    assert not (tmp_path / "out" / "pairs.jsonl").exists() and not (tmp_path / "out" / "lowrank.json").exists()


def _as_stage(adapter: Path, stage: str, dest: Path) -> Path:
    """A copy of ``adapter`` whose lowrank.json says another stage made it (the weights stay the SFT ones)."""
    import dataclasses
    import shutil

    from lowrank import runrecord

    shutil.copytree(adapter, dest)
    runrecord.write(dest, dataclasses.replace(runrecord.read_optional(dest), stage=stage))
    return dest


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_an_rl_policy_answers_for_another_round_of_pairs(task, made, tmp_path, stage):
    # The same weights under a PPO, GRPO or DPO record give the same samples, so the same pairs as the SFT run's.
    policy = _as_stage(Path(task["sft"]), stage, tmp_path / stage)
    out = make_pairs(_config(task, tmp_path / "out", sft_adapter=str(policy)))
    assert [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()] == made[1]


def test_a_reward_adapter_as_the_policy_is_refused(task, tmp_path):
    policy = _as_stage(Path(task["sft"]), "reward", tmp_path / "reward")
    with pytest.raises(UserError, match="a 'reward' adapter, expected a 'sft' or 'ppo' or 'dpo' or 'grpo' adapter"):
        make_pairs(_config(task, tmp_path / "out", sft_adapter=str(policy)))
    assert not (tmp_path / "out").exists()
