"""A tiny policy whose reward is known, shared by the PPO and GRPO tests.

A random tiny model samples near-uniformly from ~1000 tokens, so any one word would appear in a
sampled response too rarely for RL to ever see it rewarded. A brief SFT of a LoRA (written out
here) first teaches the policy to answer with a few words from a vocabulary of eight one-token
words; "blue" is one of them, so about a third of SFT responses contain it.
"""

from __future__ import annotations

import json
import random

import torch

WORDS = ["red", "blue", "cat", "morning", "window", "robot", "story", "weather"]  # one spm token each
TARGET = "blue"
PROMPTS = ["Say a few words.", "Name some things.", "Give me words.", "List a few items.", "Tell me words."]


def words(rng: random.Random, with_target: bool | None) -> str:
    while True:
        words = rng.choices(WORDS, k=rng.randint(2, 4))
        if with_target is None or (TARGET in words) == with_target:
            return " ".join(words)


# The LM head gets a LoRA too: a random tiny model's head has weights of std 0.02, so with the
# final norm frozen its logits stay within about +-1.3 whatever the layers below do, and the
# policy could never become peaked (entropy stays at log 1000 = 6.9 nats). A rank-8 LoRA on the
# head can raise the logits of the eight words.
SFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def train_sft_adapter(model_path, out_dir, steps: int = 40):
    """A brief SFT of a LoRA on responses of 2-4 random words from WORDS (loss on the response only)."""
    from peft import get_peft_model

    from lowrank import train
    from lowrank.models import load_base_model, load_tokenizer, lora_config, model_digest
    from lowrank.templates import render, resolve_template

    tokenizer = load_tokenizer(str(model_path))
    template_name, template = resolve_template(tokenizer, None)
    rng = random.Random(0)
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(model_path), "none", gradient_checkpointing=False),
                           lora_config(r=8, alpha=16, dropout=0.0, target_modules=SFT_TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        rows = []
        for _ in range(16):
            messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
            prompt = tokenizer(render(template, messages, tokenizer, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
            response = tokenizer(words(rng, None), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt + response, [-100] * len(prompt) + response))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != 0), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    meta = {"stage": "sft", "base": {"id": str(model_path), "digest": model_digest(str(model_path))},
            "chat_template": {"name": template_name, "jinja": template}, "metrics": {"loss": loss.item()}}
    (out_dir / "lowrank.json").write_text(json.dumps(meta))
    return out_dir


