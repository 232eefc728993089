"""The fast training step equals the plain one: the chunked linear + cross-entropy loss (no full
logits), the token budget per step, and the lean k-bit preparation, each against the plain path."""

from __future__ import annotations

import pytest
import torch


def _lora_model(model_dir, targets, *, quant="none", checkpointing=False, seed=0):
    from peft import get_peft_model

    from lowrank.models import load_base_model, lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_base_model(str(model_dir), quant, gradient_checkpointing=checkpointing),
                           lora_config(r=4, dropout=0.0, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero: make it non-zero so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=generator)
    return model


def _packed_batch(tokenizer, lengths=(7, 19, 12, 30), prompt=3, seed=1):
    from lowrank.data import collate, pack_examples
    from lowrank.lm_loss import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, len(tokenizer), (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return collate(pack_examples(examples, 40), tokenizer.pad_token_id)


def _loss_and_grads(model, batch, **kwargs):
    from lowrank import lm_loss

    model.zero_grad(set_to_none=True)
    loss = lm_loss.causal_lm_loss_sum(model, batch, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj", "lm_head"]], ids=["all-linear", "lora-on-head"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(tiny_spm, spm_tokenizer, monkeypatch, targets,
                                                                checkpointing):
    from lowrank import lm_loss

    model = _lora_model(tiny_spm, targets, checkpointing=checkpointing)
    batch = _packed_batch(spm_tokenizer)
    loss_plain, grads_plain = _loss_and_grads(model, batch, chunked=False)
    # Chunks of 16 tokens: the ~50 loss tokens of the batch span four chunks, one of them partial.
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_LOGITS", 16 * len(spm_tokenizer))
    loss_chunked, grads_chunked = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-5, atol=1e-5)
    assert grads_plain.keys() == grads_chunked.keys()
    if "lm_head" in targets:
        assert any("lm_head" in n for n in grads_chunked)
    for name, want in grads_plain.items():
        torch.testing.assert_close(grads_chunked[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_soft_caps_logits_as_gemma2_does(tiny_model_factory, monkeypatch):
    """Gemma 2 soft-caps its logits (cap * tanh(logits / cap)); the chunked loss applies the same cap, so it
    stays the model's loss (and memory stays at one chunk of logits) instead of falling back to full logits."""
    from transformers import AutoTokenizer

    from lowrank import lm_loss

    base = tiny_model_factory(tokenizer="spm", arch="gemma2", random_norms=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = _lora_model(base, ["all-linear"], checkpointing=True)
    batch = _packed_batch(tokenizer)
    loss_plain, grads_plain = _loss_and_grads(model, batch, chunked=False)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_LOGITS", 16 * len(tokenizer))
    loss_chunked, grads_chunked = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-5, atol=1e-5)
    for name, want in grads_plain.items():
        torch.testing.assert_close(grads_chunked[name], want, rtol=1e-4, atol=1e-6, msg=name)
    # The tiny model's cap (0.5) is where its logits lie: without it the summed loss moves by 0.27 (measured),
    # four orders above the 1e-5 the two paths agree to.
    monkeypatch.setattr(lm_loss, "logit_softcap", lambda lm: None)
    uncapped, _ = _loss_and_grads(model, batch)
    assert abs(uncapped - loss_plain) > 0.1


def test_chunked_loss_never_builds_the_full_logits(tiny_spm, spm_tokenizer, monkeypatch):
    """The LM head sees at most one chunk of loss positions per call: never (batch, seq) positions."""
    from lowrank import lm_loss

    model = _lora_model(tiny_spm, ["all-linear"])
    batch = _packed_batch(spm_tokenizer)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_LOGITS", 16 * len(spm_tokenizer))
    rows_seen = []
    head = model.get_base_model().lm_head
    handle = head.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[:-1].numel()))
    try:
        loss = lm_loss.causal_lm_loss_sum(model, batch)
        loss.backward()
    finally:
        handle.remove()
    loss_tokens = lm_loss.count_loss_tokens(batch)
    assert max(rows_seen) <= 16 < loss_tokens
    # forward: one position per row (logits_to_keep=1) + each chunk; backward recomputes each chunk once
    chunks = -(-loss_tokens // 16)
    assert rows_seen[0] == batch["input_ids"].shape[0] and len(rows_seen) == 1 + 2 * chunks


def test_chunked_loss_matches_on_a_quantized_base(tiny_spm, spm_tokenizer, monkeypatch):
    """nf4 base (bitsandbytes on the CPU): the chunked path gives the plain path's loss and gradients."""
    from lowrank import lm_loss

    model = _lora_model(tiny_spm, ["all-linear"], quant="nf4", checkpointing=True)
    batch = _packed_batch(spm_tokenizer, lengths=(9, 14))
    loss_plain, grads_plain = _loss_and_grads(model, batch, chunked=False)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_LOGITS", 8 * len(spm_tokenizer))
    loss_chunked, grads_chunked = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-4, atol=1e-4)
    for name, want in grads_plain.items():
        torch.testing.assert_close(grads_chunked[name], want, rtol=1e-3, atol=1e-5, msg=name)


def test_accumulation_for_a_token_budget():
    from lowrank.train import accumulation_for_tokens

    rows = [100, 100, 100, 40]  # mean 85 tokens
    assert accumulation_for_tokens(1700, rows, batch_size=4, processes=1) == 5  # 20 rows
    assert accumulation_for_tokens(1700, rows, batch_size=4, processes=2) == 3  # 20 rows over 8 per micro-step
    assert accumulation_for_tokens(10, rows, batch_size=4, processes=1) == 1


def test_sft_steps_take_the_token_budget(tiny_spm, tmp_path):
    """--tokens-per-step 512 on rows packed to 64 tokens: 4 micro-batches of 2 rows, ~512 tokens per step."""
    import json

    from lowrank.sft import SFTConfig, default_data, train_sft

    out = train_sft(SFTConfig(model=str(tiny_spm), data=default_data(), output_dir=str(tmp_path / "sft"), quant="none",
                              max_steps=2, batch_size=2, max_length=64, tokens_per_step=512, eval_fraction=0.02,
                              gradient_checkpointing=False, save_every=0))
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["metrics"]["micro_batches_per_step"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert len(steps) == 2 and all(448 <= r["tokens"] <= 512 for r in steps), [r["tokens"] for r in steps]


@pytest.mark.parametrize("value", [-1])
def test_negative_token_budget_is_refused(tiny_spm, tmp_path, value):
    from lowrank.errors import UserError
    from lowrank.sft import SFTConfig, train_sft

    with pytest.raises(UserError, match="--tokens-per-step"):
        train_sft(SFTConfig(model=str(tiny_spm), output_dir=str(tmp_path / "sft"), tokens_per_step=value))


def test_optimizer_bits_other_than_8_or_32_are_refused():
    from lowrank import train
    from lowrank.errors import UserError

    with pytest.raises(UserError, match="--optim-bits must be 8 or 32"):
        train.build_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, optim_bits=16)


def test_quantized_base_keeps_embeddings_and_head_in_the_compute_dtype(tiny_spm, monkeypatch):
    """No fp32 copies of the (vocab x hidden) embeddings and LM head, unlike peft's k-bit preparation."""
    import bitsandbytes as bnb

    from lowrank import models

    # bf16 compute as on a GPU (the CPU's default is fp32, where there is nothing to upcast)
    monkeypatch.setattr(models, "compute_dtype", lambda device=None: torch.bfloat16)
    model = models.load_base_model(str(tiny_spm), "nf4", gradient_checkpointing=False)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "norm" in n)
    assert not any(p.requires_grad for p in model.parameters())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_training_stages_plan_before_loading_and_record_the_peak(tiny_spm, tmp_path, monkeypatch, stage):
    """On CUDA a stage asks lowrank.plan for its plan before the model loads, and records the peak beside it.

    CI has no GPU: the plan hooks are replaced by recorders, which is what the CUDA path calls.
    """
    import json

    from lowrank import models, plan
    from lowrank.data import SAMPLE_FILES

    events = []
    fake = plan.Plan(model=str(tiny_spm), stage=stage, phase="backward", breakdown={"weights": 3 * 2**30})
    monkeypatch.setattr(plan, "plan_for_training", lambda path, name, config, device, **kw:
                        events.append(("plan", name, config.lora_r)) or fake)
    monkeypatch.setattr(plan, "report_start", lambda p, device=None: events.append(("start", p is fake)))
    monkeypatch.setattr(plan, "report_end", lambda p, device=None: events.append(("end", p is fake)) or 2 * 2**30)
    real_load = models.load_base_model
    monkeypatch.setattr(models, "load_base_model", lambda *a, **kw: events.append(("load",)) or real_load(*a, **kw))
    out = tmp_path / stage
    if stage == "sft":
        from lowrank.sft import SFTConfig, default_data, train_sft

        train_sft(SFTConfig(model=str(tiny_spm), data=default_data(), output_dir=str(out), quant="none", max_steps=1,
                            batch_size=2, max_length=64, lora_r=4, eval_fraction=0.02, gradient_checkpointing=False))
    else:
        from lowrank.reward import RewardConfig, train_reward

        train_reward(RewardConfig(model=str(tiny_spm), data=str(SAMPLE_FILES["preferences"]), output_dir=str(out),
                                  quant="none", max_steps=1, batch_size=2, max_length=64, lora_r=4,
                                  gradient_checkpointing=False))
    assert events == [("plan", stage, 4), ("start", True), ("load",), ("end", True)]
    metrics = json.loads((out / "lowrank.json").read_text())["metrics"]
    assert (metrics["peak_gpu_gib"], metrics["planned_gpu_gib"]) == (2.0, 3.0)


def test_reward_steps_take_the_token_budget(tiny_spm, tmp_path):
    """Reward --tokens-per-step: pairs of at most 2 x 64 tokens and a budget of 960 take 4+ micro-batches of 2 pairs."""
    import json

    from lowrank.data import SAMPLE_FILES
    from lowrank.reward import RewardConfig, train_reward

    out = train_reward(RewardConfig(model=str(tiny_spm), data=str(SAMPLE_FILES["preferences"]), quant="none",
                                    output_dir=str(tmp_path / "reward"), max_steps=1, batch_size=2, max_length=64,
                                    tokens_per_step=960, gradient_checkpointing=False, lora_r=4))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["micro_batches"] >= 4 and records[-1]["pairs"] == 2 * records[-1]["micro_batches"], records[-1]
