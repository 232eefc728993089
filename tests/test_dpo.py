"""`lowrank dpo`: DPO raises the held-out pairwise accuracy and margin, IPO/SimPO/ORPO lower their loss,
the reference adapter never moves, log-probs are taken on response tokens only, --resume is exact, it
runs under `accelerate launch`, and each bad input is refused with one line before a model loads."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import pytest
import torch

from lowrank.cli import main

from cli_support import assert_trained_as_one, launch_two_processes, recorded, run_one_process

# The learning test trains on the shipped preference sample (lowrank/assets/preferences_sample.jsonl): every
# chosen response is its rejected twin with "please" added, so the preference is one clear feature. 200 pairs,
# 20% held out; max_length 160 keeps every pair whole (the longest is 147 tokens with the tiny SentencePiece
# tokenizer, see tests/test_reward.py). The other tests use a few pairs of the synthetic sort task.
MAX_LENGTH = "160"
COMMON = ["--quant", "none", "--no-gradient-checkpointing", "--max-length", MAX_LENGTH, "--seed", "0"]
# beta 0.5 rather than the default 0.1 makes the margin (beta times the log-ratio gap) large enough to read.
LEARN_FLAGS = [*COMMON, "--beta", "0.5", "--learning-rate", "1e-3", "--lr-scheduler", "constant", "--max-steps", "20",
               "--batch-size", "8", "--micro-batch-size", "4", "--eval-fraction", "0.2", "--eval-every", "10"]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def make_sft_adapter(base_path, out_dir):
    """A stand-in SFT adapter (random non-zero LoRA on every linear layer but the head, chatml), as `lowrank sft`
    writes it: a policy that starts as this adapter and a reference that is it differ from the base."""
    from peft import LoraConfig, get_peft_model

    from lowrank import train
    from lowrank.models import load_base_model, model_digest
    from lowrank.templates import BUILTIN_TEMPLATES

    from lowrank.runrecord import RunRecord

    torch.manual_seed(3)
    base = load_base_model(str(base_path), "none", gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    meta = {"stage": "sft", "base": {"id": str(base_path), "digest": model_digest(str(base_path))},
            "chat_template": {"name": "chatml", "jinja": BUILTIN_TEMPLATES["chatml"]}, "config": {"quant": "none"}}
    train.write_adapter(model, out_dir, RunRecord.from_dict(meta))
    return out_dir


@pytest.fixture(scope="module")
def sft(tiny_spm, tmp_path_factory):
    return make_sft_adapter(tiny_spm, tmp_path_factory.mktemp("dpo_sft") / "sft")


@pytest.fixture(scope="module")
def sort_pairs(tmp_path_factory):
    """24 pairs of the sort task: chosen the sorted letters, rejected a plausible wrong answer."""
    from lowrank.tasks import generate

    records = generate("sort", seed=0, pretrain=1, sft=1, eval=1, prompts=1, preferences=24)["preferences"]
    return write_jsonl(tmp_path_factory.mktemp("dpo_pairs") / "sort.jsonl", records)


@pytest.fixture(scope="module")
def trained(tiny_spm, sft, sample_data, tmp_path_factory):
    """`lowrank dpo` (sigmoid) from the SFT adapter, with the roles model it trained captured for inspection."""
    from lowrank import roles

    out = tmp_path_factory.mktemp("dpo") / "policy"
    captured = {}

    def build_and_keep(*args, **kwargs):
        captured["model"] = roles_build(*args, **kwargs)
        return captured["model"]

    roles_build = roles.build_roles
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(roles, "build_roles", build_and_keep)
        code = main(["dpo", "--model", str(tiny_spm), "--sft-adapter", str(sft), "--pairs",
                     str(sample_data["preferences"]), "--output-dir", str(out), *LEARN_FLAGS])
    assert code == 0, stderr.getvalue()[-2000:]
    return {"out": out, "model": captured["model"], "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def test_dpo_raises_held_out_pairwise_accuracy_and_margin(trained):
    """Measured (20 steps of 8 pairs): held-out accuracy 0.00 -> 0.95, margin 0.00 -> 0.66 / 0.70 / 0.72 and
    held-out loss ln 2 = 0.693 -> 0.43 / 0.43 / 0.41 with seeds 0 / 1 / 2 (accuracy 0.95 for each). At the start
    the policy is the reference, so every implicit reward is 0."""
    out = trained["out"]
    metrics = json.loads((out / "lowrank.json").read_text())["metrics"]
    assert metrics["initial_eval_accuracy"] == 0.0 and metrics["initial_eval_margin"] == 0.0
    assert metrics["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["eval_accuracy"] >= 0.85, metrics
    assert metrics["eval_margin"] >= 0.4, metrics
    assert metrics["eval_loss"] < 0.55, metrics
    assert metrics["eval_chosen_reward"] > metrics["eval_rejected_reward"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(21))
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 10, 20]  # start, every 10, end
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "lr", "pairs"):
        assert all(key in r for r in records[1:]), key
    assert all(r["pairs"] == 8 for r in records[1:])
    assert sum(r["margin"] for r in records[-5:]) > sum(r["margin"] for r in records[1:6])  # training margin grew
    assert (f"held-out pairwise accuracy 0.000 -> {metrics['eval_accuracy']:.3f}, "
            f"margin 0.0000 -> {metrics['eval_margin']:.4f}") in trained["stdout"]


def test_reference_adapter_stays_bit_identical_and_the_policy_moves(trained, sft):
    from peft import get_peft_model_state_dict, load_peft_weights

    model = trained["model"]
    sft_weights = load_peft_weights(str(sft))
    reference = get_peft_model_state_dict(model, adapter_name="reference")
    policy = get_peft_model_state_dict(model, adapter_name="policy")
    assert reference.keys() == policy.keys() == sft_weights.keys()
    for name, tensor in sft_weights.items():
        assert torch.equal(reference[name], tensor), name  # frozen: not one bit moved
        assert not torch.equal(policy[name], tensor), name  # every LoRA tensor of the policy trained
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    saved = load_peft_weights(str(trained["out"]))  # the written adapter is the trained policy
    assert saved.keys() == policy.keys() and all(torch.equal(saved[k], policy[k]) for k in saved)


def test_output_is_a_policy_adapter_that_merge_accepts(trained, sft, tiny_spm, tmp_path):
    from lowrank.models import model_digest

    out = trained["out"]
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["stage"] == "dpo" and meta["chat_template"]["name"] == "chatml"
    assert meta["base"]["digest"] == model_digest(str(tiny_spm))
    assert meta["config"]["quant"] == "none" and meta["config"]["loss"] == "sigmoid"
    assert meta["sft_adapter"] == str(sft) and meta["reference"] == str(sft) and meta["processes"] == 1
    assert meta["data"]["pairs"] == 200 and meta["data"]["eval_pairs"] == 40 and meta["data"]["digest"]
    assert (out / "dpo_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists()
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_spm), "--adapter", str(out), "--out", str(merged),
                 "--dtype", "float32"]) == 0
    assert (merged / "chat_template.jinja").read_text() == meta["chat_template"]["jinja"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capped logits, in the chunks too
def test_sequence_logprobs_are_the_sum_over_response_tokens_of_the_full_logits(tiny_model_factory, arch):
    """The chunked LM head on response positions gives what log_softmax of the whole logits gives."""
    from peft import LoraConfig, get_peft_model

    from lowrank.dpo_loss import sequence_logprobs
    from lowrank.models import load_base_model

    base = tiny_model_factory(tokenizer="spm", arch=arch)
    model = get_peft_model(load_base_model(str(base), "none", gradient_checkpointing=False),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    input_ids = torch.tensor([[1, 50, 60, 70, 80, 90], [1, 55, 65, 75, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                 "response_mask": response_mask})
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
    expected = [sum(logprobs[row, t - 1, input_ids[row, t]].item() for t in range(6) if response_mask[row, t])
                for row in range(2)]
    assert counts.tolist() == [3, 2]
    assert sums.tolist() == pytest.approx(expected, abs=1e-4)


def test_response_mask_covers_only_the_answer_after_a_multi_turn_prompt(spm_tokenizer):
    from lowrank.data import tokenize_conversation
    from lowrank.dpo import tokenize_response
    from lowrank.templates import BUILTIN_TEMPLATES

    template = BUILTIN_TEMPLATES["chatml"]
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
              {"role": "user", "content": "Sort: c a b"}]
    row = tokenize_response(spm_tokenizer, template, prompt, "a b c", 512)
    full = tokenize_conversation(spm_tokenizer, template, prompt + [{"role": "assistant", "content": "a b c"}], 512)
    assert row["input_ids"] == full["input_ids"]  # the same tokens SFT trains on
    sft_positions = [i for i, label in enumerate(full["labels"]) if label != -100]
    response_positions = [i for i, m in enumerate(row["response_mask"]) if m]
    # SFT's loss covers both assistant turns; the response is the last one only, its end-of-turn included.
    assert response_positions and set(response_positions) < set(sft_positions)
    assert response_positions == sft_positions[-len(response_positions):]
    decoded = spm_tokenizer.decode([row["input_ids"][i] for i in response_positions])
    assert decoded.startswith("a b c") and "Hello" not in decoded and "<|im_end|>" in decoded


@pytest.mark.parametrize("loss,with_sft,quant", [("ipo", False, "nf4"), ("simpo", True, "none"), ("orpo", False, "none")])
def test_ipo_simpo_and_orpo_lower_their_training_loss(loss, with_sft, quant, tiny_spm, sft, sort_pairs, tmp_path,
                                                      caplog):
    """Full-batch steps on 16 sort pairs, each loss with its default beta (ORPO from a bare base: it has its own
    SFT term). IPO without an SFT adapter measures against the base and says so; it runs as QLoRA does (a 4-bit
    base, gradient checkpointing on) to cover the chunked LM head under checkpointing."""
    from lowrank.dpo import DPOConfig, train_dpo

    records = []
    config = DPOConfig(model=str(tiny_spm), sft_adapter=str(sft) if with_sft else "", pairs=sort_pairs,
                       output_dir=str(tmp_path / loss), loss=loss, quant=quant, gradient_checkpointing=quant == "nf4",
                       learning_rate=3e-3, lr_scheduler="constant", max_steps=6, batch_size=16, micro_batch_size=8,
                       eval_fraction=1 / 3, eval_every=0, lora_r=4, lora_alpha=8, max_length=128)
    with caplog.at_level(logging.INFO, logger="lowrank.dpo"):
        out = train_dpo(config, on_step=records.append)
    losses = [r["loss"] for r in records]
    print(loss, [round(x, 4) for x in losses])
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # The same 16 pairs every step: the loss falls at each one, and by more than 2% over six. Measured: IPO
    # 25.0 -> 19.8, SimPO 0.99 -> 0.92, ORPO 6.97 -> 6.74 (its SFT term from a random base dominates).
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.98 * losses[0], losses
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["config"]["loss"] == loss
    if loss == "ipo":
        assert losses[0] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)  # policy == reference: (0 - 1/(2 tau))^2
        assert "the reference of --loss ipo is the base itself" in caplog.text and meta["reference"] == "base"
    else:
        assert meta["reference"] is None  # reference-free: no reference pass at all


def test_resume_continues_exactly_where_the_run_stopped(tiny_spm, sft, sort_pairs, tmp_path):
    from peft import load_peft_weights

    from lowrank.dpo import DPOConfig, train_dpo

    def config(out, **changes):
        return DPOConfig(**{**dict(model=str(tiny_spm), sft_adapter=str(sft), pairs=sort_pairs, output_dir=str(out),
                                   quant="none", gradient_checkpointing=False, learning_rate=1e-3, max_steps=3,
                                   batch_size=4, micro_batch_size=2, eval_fraction=0.25, save_every=1,
                                   max_length=128), **changes})

    straight = train_dpo(config(tmp_path / "straight"))

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(tmp_path / "resumed"), on_step=stop_after_two)
    assert not (tmp_path / "resumed" / "lowrank.json").exists()  # an interrupted run never looks finished
    assert main(["dpo", "--model", str(tiny_spm), "--sft-adapter", str(sft), "--pairs", sort_pairs, "--output-dir",
                 str(tmp_path / "resumed"), "--quant", "none", "--no-gradient-checkpointing", "--learning-rate",
                 "1e-3", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--eval-fraction", "0.25",
                 "--save-every", "1", "--max-length", "128", "--resume"]) == 0
    a, b = load_peft_weights(str(straight)), load_peft_weights(str(tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_two_processes_train_as_one_process_on_both_their_batches(tiny_spm, sft, sort_pairs, tmp_path, monkeypatch):
    """Two CPU processes (DDP over gloo) each take their share of every step's pairs and of the reference pass,
    and train as one process would on all of them: both hold the same policy after each step, the one of a
    single process with the same --batch-size (process r of 2 takes micro-batch 2m + r of the seeded
    lowrank.loop.BatchStream, one process all of them; the loss is divided by the pairs of the whole step).
    Dropout is off in every role (lowrank.roles). fp32, tolerance 1e-4.
    """
    flags = ["--model", str(tiny_spm), "--sft-adapter", str(sft), "--pairs", sort_pairs, "--quant", "none",
             "--no-gradient-checkpointing", "--learning-rate", "1e-3", "--max-steps", "2", "--batch-size", "4",
             "--micro-batch-size", "2", "--eval-fraction", "0.25", "--max-length", "128"]
    out = tmp_path / "ddp"
    launch_two_processes(tmp_path, ["dpo", *flags, "--output-dir", str(out)], record=True)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2 and meta["stage"] == "dpo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # one process logs, once per step
    assert all(r["pairs"] == 4 for r in records[1:])  # 2 pairs from each process
    assert meta["metrics"]["eval_margin"] != 0.0  # the policy moved away from the reference
    assert (out / "adapter_model.safetensors").exists()

    one = run_one_process(monkeypatch, tmp_path, ["dpo", *flags, "--output-dir", str(tmp_path / "one")])
    assert_trained_as_one(recorded(tmp_path), one)


# --- bad input: one line on stderr, exit 2, before any model loads, nothing written ----------------

@pytest.fixture
def refused(tiny_spm, sort_pairs, tmp_path, capsys, monkeypatch):
    """refused(*flags, pairs=...) -> the one error line of `lowrank dpo` that must refuse before loading a model."""
    import lowrank.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(lowrank.models, "load_base_model", no_model)

    def run(*flags, pairs=sort_pairs) -> str:
        out = tmp_path / "out"
        capsys.readouterr()
        code = main(["dpo", "--model", str(tiny_spm), "--pairs", pairs, "--output-dir", str(out), *COMMON, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("lowrank dpo: error: ") and "Traceback" not in err[0]
        assert not out.exists()
        return err[0]

    return run


def _sort_records():
    from lowrank.tasks import generate

    return generate("sort", seed=0, pretrain=1, sft=1, eval=1, prompts=1, preferences=4)["preferences"]


def test_pair_with_identical_chosen_and_rejected_is_refused(refused, tmp_path):
    records = _sort_records()
    records[1]["rejected"] = records[1]["chosen"]
    message = refused(pairs=write_jsonl(tmp_path / "same.jsonl", records))
    assert "line 2" in message and "identical" in message


def test_pair_without_a_chosen_field_is_refused(refused, tmp_path):
    records = _sort_records()
    del records[2]["chosen"]
    message = refused(pairs=write_jsonl(tmp_path / "no_chosen.jsonl", records))
    assert "line 3" in message and "'chosen' is missing" in message


def test_pair_without_a_rejected_field_is_refused(refused, tmp_path):
    records = _sort_records()
    del records[0]["rejected"]
    message = refused(pairs=write_jsonl(tmp_path / "no_rejected.jsonl", records))
    assert "line 1" in message and "'rejected' is missing" in message


@pytest.mark.parametrize("beta", ["-0.1", "0"])
def test_beta_not_above_zero_is_refused(refused, beta):
    assert f"--beta must be positive, got {float(beta)}" in refused("--beta", beta)


def test_unknown_loss_is_refused(refused):
    message = refused("--loss", "hinge")
    assert "--loss: unknown 'hinge'" in message and "sigmoid, ipo, simpo, orpo" in message


def test_label_smoothing_of_a_half_or_more_is_refused(refused):
    assert "--label-smoothing must be in [0, 0.5), got 0.5" in refused("--label-smoothing", "0.5")


@pytest.fixture(scope="module")
def foreign_sft(tiny_model_factory, tmp_path_factory):
    """An SFT adapter of another tiny base with the same shapes and other weights (built before the guard)."""
    return make_sft_adapter(tiny_model_factory(tokenizer="spm", seed=1), tmp_path_factory.mktemp("foreign") / "sft")


def test_sft_adapter_of_another_base_is_refused(foreign_sft, refused):
    """The LoRA would load silently onto a base of the same shapes, so lowrank.json's base digest decides."""
    message = refused("--sft-adapter", str(foreign_sft))
    assert str(foreign_sft) in message and "trained on base" in message


def test_rpo_alpha_adds_the_chosen_responses_per_token_nll(monkeypatch):
    """RPO: loss = DPO loss + alpha * (-sum log pi(chosen) / chosen tokens), worked by hand.

    Pair: chosen sum -6 over 3 tokens, rejected -8; reference -7 and -7; beta 0.5.
    h = 0.5 * ((-6 + 7) - (-8 + 7)) = 1;  DPO = -log sigmoid(1) = 0.313262;  NLL = 6 / 3 = 2;
    with alpha 0.5: 0.313262 + 1.0 = 1.313262.
    """
    from lowrank import dpo, dpo_loss

    monkeypatch.setattr(dpo_loss, "sequence_logprobs",
                        lambda model, batch: (torch.tensor([-6.0, -8.0]), torch.tensor([3.0, 4.0])))
    batch = {"reference_chosen": torch.tensor([-7.0]), "reference_rejected": torch.tensor([-7.0])}
    plain = dpo_loss.pair_losses(dpo.DPOConfig(beta=0.5), None, batch)[0]
    with_rpo = dpo_loss.pair_losses(dpo.DPOConfig(beta=0.5, rpo_alpha=0.5), None, batch)[0]
    assert plain.item() == pytest.approx(0.313262, abs=1e-6)
    assert with_rpo.item() == pytest.approx(1.313262, abs=1e-6)


def test_negative_rpo_alpha_is_refused(refused):
    assert "--rpo-alpha must be 0 or positive, got -1.0" in refused("--rpo-alpha", "-1")
