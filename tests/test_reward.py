"""Reward model: structure of the adapter, scoring at the last real token, training to high held-out
accuracy on a task whose preference a program can check, `lowrank score`, and each bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from lowrank import checkpoints
from lowrank.cli import main
from lowrank.config import build_config
from lowrank.errors import UserError
from lowrank.reward import bradley_terry_loss, evaluate_pairs, tokenize_pairs
from lowrank.scoring import SCORE_HEAD, add_score_head, load_reward_adapter, pad_batch, score_sequences, using_adapter

from cli_support import assert_trained_as_one, launch_two_processes, recorded, run_one_process

# The synthetic task is the shipped preference sample (lowrank/assets/preferences_sample.jsonl, what
# `lowrank reward` trains on in the README): every chosen response contains "please" and its rejected
# twin is the same help without it (lowrank.data.sample_property is the check). Bad-input tests use
# small pairs made here.
WORDS = "the cat sat on a mat and looked at the small red house near an old tree while birds sang songs".split()
PROMPTS = ["Tell me about your day.", "Describe the weather.", "What did you eat?", "Say something nice.",
           "Where is the park?", "Write a short line."]


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(4, 9)
        rejected = [rng.choice(WORDS) for _ in range(length)]
        chosen = [rng.choice(WORDS) for _ in range(length)]
        chosen.insert(rng.randint(0, length), "please")
        pairs.append({"prompt": rng.choice(PROMPTS), "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return pairs


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# 200 shipped pairs, 20% held out, lr 1e-3 for 30 steps of 8 pairs. max_length 160 keeps every pair
# whole with the tiny SentencePiece tokenizer and the vicuna preamble (the longest is 147 tokens);
# at 128, 84 pairs would lose their ends, and with them the "please" that tells them apart.
# Seeds 0, 1, 2 all reach held-out accuracy 1.0 by step 20 (checked once by hand), so the > 0.9
# bar below does not depend on a lucky seed.
MAX_LENGTH = 160
TRAIN_FLAGS = ["--quant", "none", "--learning-rate", "1e-3", "--max-steps", "30", "--batch-size", "8",
               "--eval-fraction", "0.2", "--eval-every", "10", "--max-length", str(MAX_LENGTH), "--seed", "0",
               "--no-gradient-checkpointing"]


@pytest.fixture(scope="module")
def pairs_file(sample_data):
    return str(sample_data["preferences"])


@pytest.fixture(scope="module")
def small_pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_pairs(24, seed=0))


@pytest.fixture(scope="module")
def trained(tiny_spm, pairs_file, tmp_path_factory):
    """One reward adapter trained through the CLI, shared by the tests of this module (with its stdout and stderr)."""
    out = tmp_path_factory.mktemp("reward") / "adapter"
    printed, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        code = main(["reward", "--model", str(tiny_spm), "--data", pairs_file, "--output-dir", str(out), *TRAIN_FLAGS])
    assert code == 0, err.getvalue()[-2000:]
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    (out.parent / "stderr.txt").write_text(err.getvalue())
    return out


def load_scoring_model(base_path, reward_dir, adapter_name="reward"):
    from lowrank.models import load_base_model

    base = load_base_model(str(base_path), "none", gradient_checkpointing=False)
    model = load_reward_adapter(base, reward_dir, adapter_name)
    model.eval()
    return model


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_margin():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    expected = torch.log1p(torch.exp(-torch.tensor([2.0, 0.0, -2.0])))  # -log sigmoid(m) = log(1 + e^-m)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    # Stable for large margins (a naive log(sigmoid(.)) gives inf at -200).
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))).all()


def test_reward_reaches_high_heldout_accuracy_on_the_please_task(trained):
    meta = json.loads((trained / "lowrank.json").read_text())
    assert meta["stage"] == "reward"
    assert meta["metrics"]["eval_accuracy"] > 0.9
    assert meta["metrics"]["eval_margin"] > 1.0
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all({"eval_margin", "eval_loss"} <= set(r) for r in evals)
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"] + 1.0  # it learned, not started there
    assert (trained / "reward_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The progress bar shows the held-out accuracy and margin of the last evaluation.
    bar = (trained.parent / "stderr.txt").read_text()
    assert f"acc={evals[-1]['eval_accuracy']:.2f}" in bar and f"margin={evals[-1]['eval_margin']:.2f}" in bar
    assert meta["base"]["digest"] and meta["data"]["pairs"] == 200 and meta["data"]["eval_pairs"] == 40


def test_reward_cli_ends_by_printing_the_held_out_accuracy_and_margin(trained):
    metrics = json.loads((trained / "lowrank.json").read_text())["metrics"]
    printed = (trained.parent / "stdout.txt").read_text().splitlines()
    assert printed == [f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f}, margin {metrics['eval_margin']:.4f}",
                       f"reward adapter written to {trained}"]


def test_reward_cli_default_quant_is_auto_and_records_what_it_resolved_to(tiny_spm, small_pairs_file, tmp_path,
                                                                          capsys):
    """--quant auto, the default, is nf4 on CUDA and none on a CPU; lowrank.json records which."""
    from lowrank.reward import RewardConfig

    assert RewardConfig().quant == "auto"
    out = tmp_path / "out"
    assert main(["reward", "--model", str(tiny_spm), "--data", small_pairs_file, "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0", "--max-length", str(MAX_LENGTH),
                 "--no-gradient-checkpointing"]) == 0
    assert json.loads((out / "lowrank.json").read_text())["config"]["quant"] == ("nf4" if torch.cuda.is_available()
                                                                                 else "none")
    assert capsys.readouterr().out == f"reward adapter written to {out}\n"  # no held-out pairs: no accuracy line


def test_adapter_dir_is_standard_peft_with_score_head_saved(trained):
    from safetensors.torch import load_file

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [SCORE_HEAD]
    assert SCORE_HEAD not in config["target_modules"]  # the head is saved whole, not given a LoRA
    tensors = load_file(str(trained / "adapter_model.safetensors"))
    assert tensors["base_model.model.score.weight"].shape == (1, 64)
    assert tensors["base_model.model.score.weight"].dtype == torch.float32
    assert any("lora_A" in name for name in tensors)
    assert not any("lm_head" in name or "embed_tokens" in name for name in tensors)


def test_saved_adapter_reproduces_training_time_scores(trained, tiny_spm, pairs_file):
    """PeftModel.from_pretrained on a fresh base (plus head) gives the held-out margin logged in training."""
    from lowrank.data import load_preference_pairs
    from lowrank.models import load_tokenizer

    meta = json.loads((trained / "lowrank.json").read_text())
    tokenizer = load_tokenizer(str(tiny_spm))
    examples = tokenize_pairs(tokenizer, meta["chat_template"]["jinja"], load_preference_pairs(pairs_file), MAX_LENGTH)
    assert max(len(e[k]) for e in examples for k in ("chosen", "rejected")) < MAX_LENGTH  # no pair was cut
    from lowrank.loop import split_pairs

    _, eval_examples = split_pairs(examples, 0.2, 0)
    model = load_scoring_model(tiny_spm, trained)
    scores = evaluate_pairs(model, eval_examples, tokenizer.pad_token_id or 0, 8)
    assert scores["margin"] == pytest.approx(meta["metrics"]["eval_margin"], abs=1e-4)
    assert scores["accuracy"] == meta["metrics"]["eval_accuracy"]


def test_score_cli_prints_score_sequences_of_the_same_text(trained, tiny_spm, tmp_path, capsys):
    from lowrank.data import tokenize_conversation
    from lowrank.models import load_tokenizer

    texts = [("How do I save a file?", "Press Control and S, please."), ("How do I save a file?", "Press Control and S.")]
    pairs = write_jsonl(tmp_path / "score.jsonl", [{"prompt": p, "response": r} for p, r in texts[1:]])
    # --model omitted: the base comes from lowrank.json.
    assert main(["score", "--reward", str(trained), "--prompt", texts[0][0], "--response", texts[0][1],
                 "--pairs", pairs]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Each line says what it is and which pair: `score VALUE  "prompt" -> "response"`.
    assert [line.split("  ", 1)[1] for line in lines] == [json.dumps(p) + " -> " + json.dumps(r) for p, r in texts]
    assert all(line.split()[0] == "score" for line in lines)
    printed = [float(line.split()[1]) for line in lines]

    meta = json.loads((trained / "lowrank.json").read_text())
    tokenizer = load_tokenizer(str(tiny_spm))
    model = load_scoring_model(tiny_spm, trained)
    expected = []
    for prompt, response in texts:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenize_conversation(tokenizer, meta["chat_template"]["jinja"], messages, MAX_LENGTH)["input_ids"]
        with torch.no_grad():
            expected.append(score_sequences(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    assert printed == pytest.approx(expected, abs=1e-5)
    assert printed[0] > printed[1]  # "please" is what the model learned to prefer


def _score_pairs_refused(tmp_path, capsys, monkeypatch, text: str | None) -> str:
    """`lowrank score --pairs FILE` with ``text`` in FILE (None: no file): the one-line message; no model loads."""
    import lowrank.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the pairs file was read")

    monkeypatch.setattr(lowrank.models, "load_base_model", refuse)
    path = tmp_path / "score.jsonl"
    if text is not None:
        path.write_text(text)
    capsys.readouterr()
    code = main(["score", "--reward", str(tmp_path / "unused"), "--pairs", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowrank score: error: "), lines
    return lines[0].removeprefix("lowrank score: error: ")


def test_score_pairs_file_that_does_not_exist_is_named(tmp_path, capsys, monkeypatch):
    message = _score_pairs_refused(tmp_path, capsys, monkeypatch, None)
    assert message.startswith(f"data file {tmp_path / 'score.jsonl'} does not exist")


def test_score_pairs_line_that_is_not_json_is_named(tmp_path, capsys, monkeypatch):
    message = _score_pairs_refused(tmp_path, capsys, monkeypatch, '{"prompt": "a", "response": "b"}\n{"prompt": \n')
    assert message.startswith(f"{tmp_path / 'score.jsonl'} line 2: malformed JSON")


def test_score_pairs_record_without_a_response_is_named(tmp_path, capsys, monkeypatch):
    message = _score_pairs_refused(tmp_path, capsys, monkeypatch, '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    assert message == (f"{tmp_path / 'score.jsonl'} line 2: expected fields 'prompt' (text or messages) and "
                       "'response' (text)")


def test_score_is_read_at_last_real_token_for_right_and_left_padding(tiny_spm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_spm))
    add_score_head(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[SCORE_HEAD]))
    model.eval()
    sequences = [[1, 50, 60, 70, 80, 90], [1, 55, 65]]
    with torch.no_grad():
        alone = [score_sequences(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                 for s in sequences]
        right = score_sequences(model, *pad_batch(sequences, 0))
        left_ids = torch.tensor([sequences[0], [0, 0, 0] + sequences[1]])
        left_mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
        left = score_sequences(model, left_ids, left_mask)
    assert right.tolist() == pytest.approx(alone, abs=1e-5)
    assert left.tolist() == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1], abs=1e-4)  # the rows really differ


def test_reward_and_value_named_adapters_switch_on_one_base(trained, tiny_spm):
    """PPO's layout: a policy adapter, the frozen reward adapter and a trainable value copy of it."""
    from peft import LoraConfig, get_peft_model

    from lowrank.models import load_base_model

    base = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="policy")
    load_reward_adapter(model, trained, "reward", base=str(tiny_spm))
    load_reward_adapter(model, trained, "value", trainable=True)
    model.eval()  # no LoRA dropout: scores must match exactly
    assert model.active_adapter == "policy"
    ids = torch.tensor([[1, 50, 60, 70]])
    mask = torch.ones_like(ids)
    reference = score_sequences(load_scoring_model(tiny_spm, trained), ids, mask).item()
    with torch.no_grad():
        assert score_sequences(model, ids, mask, "reward").item() == pytest.approx(reference, abs=1e-5)
    value = score_sequences(model, ids, mask, "value")
    assert value.item() == pytest.approx(reference, abs=1e-5)
    value.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".value" in n for n in grads)  # only the value copy (LoRA + head) gets gradients
    assert model.active_adapter == "policy"  # switching never leaks out of the call
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reward" in n)
    with using_adapter(model, "reward"):
        assert model.active_adapter == "reward"


# ------------------------------------------------------------------------------------------
# Bad input: one-line error, exit 2, nothing written
# ------------------------------------------------------------------------------------------

def run_reward_expecting_error(tiny_spm, data, out, capsys, *extra) -> str:
    capsys.readouterr()  # drop what the set-up printed (progress bars of model loading)
    code = main(["reward", "--model", str(tiny_spm), "--data", data, "--output-dir", str(out), *TRAIN_FLAGS, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists()  # nothing half-written
    assert len(err) == 1 and err[0].startswith("lowrank reward: error: ")
    return err[0]


def test_pair_with_empty_chosen_is_refused(tiny_spm, tmp_path, capsys):
    records = make_pairs(4, seed=1)
    records[2]["chosen"] = ""
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    message = run_reward_expecting_error(tiny_spm, data, tmp_path / "out", capsys)
    assert ("line 3" in message or "pair 3" in message) and "chosen" in message


def test_pair_with_empty_rejected_is_refused(tiny_spm, tmp_path, capsys):
    records = make_pairs(4, seed=1)
    records[0]["rejected"] = "  "
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    message = run_reward_expecting_error(tiny_spm, data, tmp_path / "out", capsys)
    assert ("line 1" in message or "pair 1" in message) and "rejected" in message


def test_pair_with_identical_chosen_and_rejected_is_refused(tiny_spm, tmp_path, capsys):
    records = make_pairs(4, seed=1)
    records[1]["rejected"] = records[1]["chosen"]
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    message = run_reward_expecting_error(tiny_spm, data, tmp_path / "out", capsys)
    assert ("line 2" in message or "pair 2" in message) and "identical" in message


def test_missing_sft_adapter_dir_is_refused(tiny_spm, pairs_file, tmp_path, capsys):
    message = run_reward_expecting_error(tiny_spm, pairs_file, tmp_path / "out", capsys,
                                         "--sft-adapter", str(tmp_path / "no-such-sft"))
    assert "SFT adapter directory" in message and "no-such-sft" in message and "does not exist" in message


def test_score_refuses_reward_adapter_of_another_base(trained, tiny_model_factory, capsys):
    other = tiny_model_factory(tokenizer="spm", seed=1)  # same shapes, other weights: LoRA would load silently
    code = main(["score", "--reward", str(trained), "--model", str(other), "--prompt", "hi", "--response", "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lowrank score: error: ") and "trained on base" in err[0]


def test_loading_reward_adapter_onto_another_base_is_refused(trained, tiny_model_factory):
    from lowrank.errors import UserError
    from lowrank.models import load_base_model

    other = tiny_model_factory(tokenizer="spm", seed=1)
    base = load_base_model(str(other), "none", gradient_checkpointing=False)
    with pytest.raises(UserError, match="trained on base"):
        load_reward_adapter(base, trained, "reward", base=str(other))


def make_sft_adapter(base_path, out_dir, template_name="chatml", targets=("q_proj", "v_proj")):
    """A stand-in SFT adapter (non-zero LoRA weights) written the way `lowrank sft` writes its output."""
    from peft import LoraConfig, get_peft_model

    from lowrank import train
    from lowrank.models import load_base_model, model_digest
    from lowrank.templates import BUILTIN_TEMPLATES

    from lowrank.runrecord import RunRecord

    torch.manual_seed(3)
    base = load_base_model(str(base_path), "none", gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                            init_lora_weights=False))  # B != 0: an adapter that does something
    meta = {"stage": "sft", "base": {"id": str(base_path), "digest": model_digest(str(base_path))},
            "chat_template": {"name": template_name, "jinja": BUILTIN_TEMPLATES[template_name]}}
    train.write_adapter(model, out_dir, RunRecord.from_dict(meta))
    return out_dir


def _init_flags() -> list[str]:
    """TRAIN_FLAGS for one step at learning rate 0: the written adapter is its initialisation."""
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--learning-rate") + 1] = "0"
    flags[flags.index("--max-steps") + 1] = "1"
    return flags


def test_reward_adapter_starts_from_sft_lora_and_template(tiny_spm, small_pairs_file, tmp_path):
    from safetensors.torch import load_file

    sft = make_sft_adapter(tiny_spm, tmp_path / "sft")
    out = tmp_path / "reward"
    assert main(["reward", "--model", str(tiny_spm), "--data", small_pairs_file, "--output-dir", str(out),
                 "--sft-adapter", str(sft), *_init_flags()]) == 0
    sft_tensors = load_file(str(sft / "adapter_model.safetensors"))
    reward_tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(sft_tensors) <= set(reward_tensors)  # same LoRA targets and rank, plus the head
    for name, tensor in sft_tensors.items():
        assert torch.equal(reward_tensors[name], tensor), name  # learning rate 0: still the SFT weights
    assert "base_model.model.score.weight" in reward_tensors
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["chat_template"]["name"] == "chatml"  # the pairs were formatted as in SFT
    assert meta["sft_adapter"] == str(sft)


def test_sft_adapter_with_an_lm_head_lora_initialises_the_rest_and_says_so(tiny_spm, small_pairs_file, tmp_path,
                                                                          caplog):
    """The score reads the hidden state before the LM head, so the head's LoRA is left out, with a log line."""
    from safetensors.torch import load_file

    sft = make_sft_adapter(tiny_spm, tmp_path / "sft", targets=("q_proj", "v_proj", "lm_head"))
    sft_tensors = load_file(str(sft / "adapter_model.safetensors"))
    assert any("lm_head.lora_B" in name for name in sft_tensors)
    assert not any("base_layer" in name for name in sft_tensors)  # the unchanged base LM head is not saved
    out = tmp_path / "reward"
    with caplog.at_level(logging.INFO, logger="lowrank.reward"):
        assert main(["reward", "--model", str(tiny_spm), "--data", small_pairs_file, "--output-dir", str(out),
                     "--sft-adapter", str(sft), *_init_flags()]) == 0
    assert "not loading the SFT adapter's weights of lm_head" in caplog.text
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["modules_to_save"] == [SCORE_HEAD]
    reward_tensors = load_file(str(out / "adapter_model.safetensors"))
    assert not any("lm_head" in name for name in reward_tensors)
    kept = {name: t for name, t in sft_tensors.items() if "lm_head" not in name}
    assert kept and all(torch.equal(reward_tensors[name], t) for name, t in kept.items())


def test_sft_adapter_with_a_regex_target_resolves_to_the_layers_without_the_lm_head(tiny_spm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lowrank.models import load_base_model
    from lowrank.reward_lora import reward_lora_config

    sft = tmp_path / "sft"
    get_peft_model(load_base_model(str(tiny_spm), "none", gradient_checkpointing=False),
                   LoraConfig(r=2, target_modules=r".*\.(v_proj|lm_head)|lm_head")).save_pretrained(sft)
    base = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False)
    add_score_head(base)
    config = reward_lora_config(base, r=8, alpha=16, dropout=0.0, sft_adapter=sft)
    assert set(config.target_modules) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    assert config.r == 2 and config.modules_to_save == [SCORE_HEAD]


def test_an_empty_sft_adapter_is_a_fresh_lora_as_none_is(tiny_spm):
    # `sft_adapter: ""` in a YAML config (or an empty flag) once went looking for "/adapter_config.json".
    from lowrank.models import load_base_model
    from lowrank.reward_lora import reward_lora_config

    base = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False)
    add_score_head(base)
    fresh = reward_lora_config(base, r=8, alpha=16, dropout=0.0, sft_adapter=None)
    empty = reward_lora_config(base, r=8, alpha=16, dropout=0.0, sft_adapter="")
    assert empty.to_dict() == fresh.to_dict() and empty.r == 8


def test_sft_adapter_with_only_an_lm_head_lora_is_refused(tiny_spm, small_pairs_file, tmp_path, capsys):
    sft = make_sft_adapter(tiny_spm, tmp_path / "sft", targets=("lm_head",))
    message = run_reward_expecting_error(tiny_spm, small_pairs_file, tmp_path / "out", capsys, "--sft-adapter", str(sft))
    assert str(sft) in message and "only the LM head" in message


def test_sft_adapter_of_another_base_is_refused(tiny_spm, tiny_model_factory, small_pairs_file, tmp_path, capsys):
    sft = make_sft_adapter(tiny_model_factory(tokenizer="spm", seed=1), tmp_path / "sft")
    message = run_reward_expecting_error(tiny_spm, small_pairs_file, tmp_path / "out", capsys, "--sft-adapter", str(sft))
    assert str(sft) in message and "trained on base" in message


def test_nf4_reward_trains_and_scores_on_the_cpu(tiny_spm, small_pairs_file, tmp_path):
    """QLoRA reward: a 4-bit base (the default on CUDA), gradient checkpointing on (the default), two steps, then
    `lowrank score`."""
    from safetensors.torch import load_file

    from lowrank.reward import RewardConfig, train_reward
    from lowrank.scoring import score_texts

    out = train_reward(RewardConfig(model=str(tiny_spm), data=small_pairs_file, output_dir=str(tmp_path / "nf4"),
                                    quant="nf4", max_steps=2, batch_size=4, learning_rate=1e-2, eval_fraction=0.25,
                                    max_length=MAX_LENGTH))
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["config"]["quant"] == "nf4" and meta["config"]["gradient_checkpointing"]
    assert all(math.isfinite(meta["metrics"][k]) for k in ("loss", "eval_accuracy", "eval_margin"))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(tensors[n].abs().max() > 0 for n in tensors if "lora_B" in n)  # B starts at zero: it trained
    pair = make_pairs(1, seed=5)[0]
    scores = score_texts(out, None, [(pair["prompt"], pair["chosen"]), (pair["prompt"], pair["rejected"])])
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores) and scores[0] != scores[1]


# ------------------------------------------------------------------------------------------
# The shared loop: --resume and `accelerate launch`
# ------------------------------------------------------------------------------------------

RESUME_FLAGS = ["--quant", "none", "--learning-rate", "1e-3", "--max-steps", "4", "--batch-size", "4",
                "--eval-fraction", "0.25", "--eval-every", "0", "--max-length", "96", "--save-every", "1",
                "--no-gradient-checkpointing"]


def test_reward_resume_continues_exactly_where_the_run_stopped(tiny_spm, small_pairs_file, tmp_path):
    from peft import load_peft_weights

    from lowrank import reward

    args = ["reward", "--model", str(tiny_spm), "--data", small_pairs_file, *RESUME_FLAGS]
    assert main([*args, "--output-dir", str(tmp_path / "straight")]) == 0

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    config = build_config(reward.RewardConfig, None, **_flags_to_fields(args[1:]), output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        reward.train_reward(config, on_step=stop_after_two)
    assert not (tmp_path / "resumed" / "lowrank.json").exists()  # an interrupted run never looks finished
    assert checkpoints.list_checkpoints(tmp_path / "resumed") == [1, 2]
    assert main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    a, b = load_peft_weights(str(tmp_path / "straight")), load_peft_weights(str(tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    straight = json.loads((tmp_path / "straight" / "lowrank.json").read_text())["metrics"]
    resumed = json.loads((tmp_path / "resumed" / "lowrank.json").read_text())["metrics"]
    assert resumed["eval_margin"] == pytest.approx(straight["eval_margin"], abs=1e-6)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # a finished run keeps no resume data


def _flags_to_fields(flags: list[str]) -> dict:
    """{"model": ..., "learning_rate": "1e-3", ...} from --flag value pairs (booleans as --no-x)."""
    fields, i = {}, 0
    while i < len(flags):
        name = flags[i].removeprefix("--").replace("-", "_")
        if name.startswith("no_"):
            fields[name[3:]] = False
            i += 1
        else:
            fields[name] = flags[i + 1]
            i += 2
    return fields


def test_reward_resume_with_changed_settings_is_refused(tiny_spm, small_pairs_file, tmp_path, capsys, monkeypatch):
    from lowrank import reward

    args = ["reward", "--model", str(tiny_spm), "--data", small_pairs_file, "--output-dir", str(tmp_path / "run"),
            *RESUME_FLAGS]

    def stop(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reward.train_reward(build_config(reward.RewardConfig, None, **_flags_to_fields(args[1:])), on_step=stop)
    capsys.readouterr()
    assert main([*args[:-1], "--no-gradient-checkpointing", "--resume", "--learning-rate", "5e-4"]) == 2
    assert "was written with different learning_rate" in capsys.readouterr().err


def test_two_reward_processes_train_as_one_process_on_both_their_batches(tiny_spm, small_pairs_file, tmp_path,
                                                                         monkeypatch):
    """Two CPU processes (DDP over gloo) each take their share of every step's pairs, and train as one process
    would on all of them: both hold the same adapter and score head after each step, the one of a single
    process with twice the accumulation (process r of 2 takes micro-batch 2m + r of the seeded
    lowrank.loop.PairStream; the loss is divided by the pairs of the whole step). fp32, tolerance 1e-4.
    """
    flags = ["--model", str(tiny_spm), "--data", small_pairs_file, "--quant", "none", "--learning-rate", "1e-3",
             "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.25", "--max-length", "96",
             "--lora-dropout", "0", "--no-gradient-checkpointing"]
    out = tmp_path / "ddp"
    launch_two_processes(tmp_path, ["reward", *flags, "--output-dir", str(out)], record=True)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2 and meta["stage"] == "reward"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one process logs, once per step
    assert all(r["pairs"] == 4 for r in records)  # 2 pairs from each process
    assert (out / "adapter_model.safetensors").exists()

    one = run_one_process(monkeypatch, tmp_path, ["reward", *flags, "--output-dir", str(tmp_path / "one"),
                                                  "--gradient-accumulation-steps", "2"])
    assert_trained_as_one(recorded(tmp_path), one)


# ------------------------------------------------------------------------------------------
# Ensembles: several reward models on the same pairs, their scores averaged
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ensemble(tiny_spm, small_pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "reward"
    flags = [flag if flag != "30" else "6" for flag in TRAIN_FLAGS]  # 6 steps each
    assert main(["reward", "--model", str(tiny_spm), "--data", small_pairs_file, "--output-dir", str(out),
                 "--ensemble", "3", *flags]) == 0
    return out


def test_an_ensemble_trains_its_members_with_their_own_seeds_and_lists_them(ensemble):
    from lowrank.scoring import ensemble_members

    meta = json.loads((ensemble / "lowrank.json").read_text())
    assert meta["members"] == ["members/2", "members/3"]
    members = ensemble_members(ensemble)
    seeds = [json.loads((m / "lowrank.json").read_text())["seed"] for m in members]
    assert seeds == [1, 2] and meta["seed"] == 0
    assert meta["member_eval_accuracy"] == [json.loads((m / "lowrank.json").read_text())["metrics"]["eval_accuracy"]
                                           for m in members]
    heads = [load_file(str(d / "adapter_model.safetensors")) for d in (ensemble, *members)]
    key = next(k for k in heads[0] if "score" in k and k.endswith("weight"))
    assert not torch.equal(heads[0][key], heads[1][key]) and not torch.equal(heads[1][key], heads[2][key])


def test_ppo_scores_with_the_mean_of_the_ensemble(ensemble, tiny_spm):
    from lowrank.models import load_base_model
    from lowrank.ppo_step import score_responses
    from lowrank.roles import REWARD, build_roles, reward_roles
    from lowrank.scoring import ensemble_members

    base = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False)
    from peft import LoraConfig

    model = build_roles(base, reward_adapter=ensemble, policy_lora_config=LoraConfig(r=4, target_modules=["q_proj"]))
    model.eval()
    assert reward_roles(model) == [REWARD, "reward_2", "reward_3"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reward_" in n)
    queries, query_mask = torch.tensor([[0, 1, 50, 60], [1, 51, 61, 71]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    responses, mask = torch.tensor([[70, 80, 2], [72, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
    singles = []
    for directory in (ensemble, *ensemble_members(ensemble)):
        with torch.no_grad():
            singles.append(score_sequences(load_scoring_model(tiny_spm, directory), ids, attention))
    scores = score_responses(model, queries, query_mask, responses, mask)
    assert scores.tolist() == pytest.approx(torch.stack(singles).mean(0).tolist(), abs=1e-5)
    assert not torch.allclose(singles[0], singles[1])  # the mean is not one member's score


def test_score_cli_prints_the_ensembles_mean(ensemble, tiny_spm, capsys):
    from lowrank.scoring import score_texts

    capsys.readouterr()
    assert main(["score", "--reward", str(ensemble), "--prompt", "Hi", "--response", "Hello, please."]) == 0
    printed = float(capsys.readouterr().out.split()[1])
    assert printed == pytest.approx(score_texts(ensemble, None, [("Hi", "Hello, please.")])[0], abs=1e-5)


def test_an_ensemble_with_a_missing_member_is_refused(ensemble, tmp_path):
    import shutil

    from lowrank.scoring import ensemble_members

    copy = tmp_path / "reward"
    shutil.copytree(ensemble, copy)
    (copy / "members" / "3" / "lowrank.json").unlink()
    with pytest.raises(UserError, match=r"members/3: a member of the reward ensemble .* is missing or unfinished"):
        ensemble_members(copy)


def test_ensemble_below_one_is_refused(tiny_spm, small_pairs_file, tmp_path, capsys):
    message = run_reward_expecting_error(tiny_spm, small_pairs_file, tmp_path / "out", capsys, "--ensemble", "0")
    assert "--ensemble must be at least 1 (got 0)" in message
