"""Peak memory of PPO with swapped adapters on one base vs. four separately loaded models, and of PPO,
GRPO and DPO vs. SFT.

Run: python bench/ppo_memory.py [--hidden 1536 --layers 16 --steps 2 --device cpu|cuda --quant none|nf4]
     [--modes sft,swap,four,grpo,dpo]

Each setup runs in its own child process on the same random LLaMA-shaped base (written once to a
temp dir), so peaks do not mix: peak RSS (ru_maxrss) on CPU, torch.cuda.max_memory_allocated on
a GPU. The setups:
- sft:   the base + one trainable LoRA, a few training steps on prompt+response sequences;
- swap:  lowrank's PPO (lowrank.roles + lowrank.ppo): one base, four adapters, a few PPO steps;
- four:  the same PPO algorithm with policy, reference, reward and value each a separate
         base + adapter (what a four-model RLHF setup holds in memory);
- grpo:  lowrank's GRPO (lowrank.roles + lowrank.grpo.grpo_step): policy, reference and reward
         adapter on one base, no value; as many completions (a group of 4 for one prompt) as PPO
         has rollouts, the same minibatches and epochs;
- dpo:   lowrank's DPO (lowrank.dpo): policy and reference on one base, the reference log-probs
         computed once up front (dpo.reference_logprobs), then steps of 2 micro-batches of 2 pairs
         (4 rows each, as SFT's batch) through dpo_loss.pair_losses and lowrank.train's loop.
Every trainable setup uses torch's AdamW, so optimizer state is counted the same way everywhere.
The last lines printed are the ratios to SFT of GRPO and DPO. Targets: swap, grpo and dpo <= 1.5x
sft, four >= 2.5x swap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

PROMPT_LEN, BATCH = 32, 4
MODES = ("sft", "swap", "four", "grpo", "dpo")


def build_base(out: Path, hidden: int, layers: int, vocab: int) -> None:
    """A random LLaMA-shaped model (fp32 safetensors; bf16 when built on a GPU) with the tiny spm tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowrank.tiny import tiny_model_path

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    if torch.cuda.is_available():  # build on the GPU in bf16: much faster for a 1B shape
        with torch.device("cuda"):
            LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
        torch.cuda.empty_cache()
    else:
        LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path(tokenizer="spm")).save_pretrained(out)


def build_adapters(base_dir: Path, out: Path) -> tuple[Path, Path]:
    """An SFT adapter and a reward adapter (LoRA + score head) for the base, r=16."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lowrank.models import lora_config
    from lowrank.reward_lora import reward_lora_config
    from lowrank.scoring import add_score_head

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(base, lora_config(r=16, alpha=32, dropout=0.0)).save_pretrained(out / "sft")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    add_score_head(base)
    get_peft_model(base, reward_lora_config(base, r=16, alpha=32, dropout=0.0)).save_pretrained(out / "reward")
    (out / "reward" / "lowrank.json").write_text(json.dumps({"stage": "reward"}))
    return out / "sft", out / "reward"


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prompts(vocab_limit: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, vocab_limit, (PROMPT_LEN - 1,), generator=generator).tolist() for _ in range(BATCH)]


def child(mode: str, base_dir: Path, sft_dir: Path, reward_dir: Path, steps: int, new_tokens: int,
          quant: str, device: str) -> dict:
    from peft import PeftModel

    from lowrank import ppo
    from lowrank.models import load_base_model

    torch.manual_seed(0)
    config = ppo.PPOConfig(max_new_tokens=new_tokens, rollout_batch_size=BATCH, minibatch_size=BATCH // 2,
                           ppo_epochs=2, learning_rate=1e-5)
    prompts = _prompts(1000)

    def load():
        return load_base_model(str(base_dir), quant, gradient_checkpointing=True, device=device)

    start = time.perf_counter()
    if mode == "sft":
        model = PeftModel.from_pretrained(load(), str(sft_dir), is_trainable=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        model.train()
        ids = torch.tensor([p + p[1: new_tokens + 1] for p in prompts], device=device)  # prompt + "response"
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    elif mode == "swap":
        from lowrank.roles import POLICY, VALUE, build_roles, trainable_parameters

        model = build_roles(load(), reward_adapter=reward_dir, sft_adapter=sft_dir)
        groups = trainable_parameters(model)
        params = groups[POLICY] + groups[VALUE]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        controller = ppo.make_kl_controller(config)
        for _ in range(steps):
            rollout = ppo.collect_rollout(model, prompts, config, [2], 0, device)
            ppo.ppo_step(model, optimizer, params, rollout, controller, config, torch.Generator().manual_seed(0))
    elif mode == "four":
        from lowrank.scoring import load_reward_adapter
        four_model_ppo(load, sft_dir, reward_dir, prompts, config, steps, device, load_reward_adapter)
    elif mode == "grpo":
        grpo_steps(load(), base_dir, sft_dir, reward_dir, prompts, steps, new_tokens)
    elif mode == "dpo":
        dpo_steps(load(), sft_dir, prompts, steps, new_tokens, device)
    else:
        raise ValueError(mode)
    return {"mode": mode, "peak_bytes": _peak_bytes(device), "seconds": time.perf_counter() - start}


def grpo_steps(base, base_dir, sft_dir, reward_dir, prompts, steps: int, new_tokens: int) -> None:
    """lowrank.grpo.grpo_step as train_grpo calls it: one prompt's group of BATCH completions per step,
    scored by the reward adapter (the reward functions cost no GPU memory), minibatches of BATCH // 2,
    2 epochs, as the PPO setups run."""
    from lowrank import grpo, train
    from lowrank.models import load_tokenizer
    from lowrank.roles import POLICY, build_roles, trainable_parameters

    config = grpo.GRPOConfig(reward_adapter=str(reward_dir), group_size=BATCH, prompts_per_step=1,
                             max_new_tokens=new_tokens, minibatch_size=BATCH // 2, epochs=2, learning_rate=1e-5)
    model = build_roles(base, sft_adapter=sft_dir, reward_adapter=reward_dir, value=False)
    parameters = trainable_parameters(model)[POLICY]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=steps * 4, kind="constant")
    accelerator = train.make_accelerator()
    inputs = grpo.Prompts(ids=prompts, texts=[""] * len(prompts), fields=[{} for _ in prompts])
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        grpo.grpo_step(accelerator, model, load_tokenizer(str(base_dir)), optimizer, scheduler, parameters, inputs,
                       [step % len(prompts)], [], [], config, [2], 0, generator)


def dpo_steps(base, sft_dir, prompts, steps: int, new_tokens: int, device: str) -> None:
    """lowrank.dpo's step as train_dpo runs it: the reference log-probs of every pair once, then per
    optimizer step 2 micro-batches of BATCH // 2 pairs (BATCH rows, as SFT's batch) through
    dpo_loss.pair_losses, train.accumulate_gradients and train.optimizer_step."""
    from lowrank import dpo, dpo_loss, train
    from lowrank.roles import POLICY, build_roles, trainable_parameters

    config = dpo.DPOConfig(beta=0.1, batch_size=BATCH, micro_batch_size=BATCH // 2, learning_rate=1e-5)
    model = build_roles(base, sft_adapter=sft_dir)
    generator = torch.Generator().manual_seed(1)

    def row(prompt):  # prompt + a response of new_tokens random tokens, loss on the response
        response = torch.randint(3, 1000, (new_tokens,), generator=generator).tolist()
        return {"input_ids": prompt + response, "response_mask": [0] * len(prompt) + [1] * new_tokens}

    examples = [{"index": i, "chosen": row(p), "rejected": row(p)} for i, p in enumerate(prompts * 2)]
    accelerator = train.make_accelerator()
    reference = dpo.reference_logprobs(accelerator, model, examples, config.micro_batch_size, 0)
    parameters = trainable_parameters(model)[POLICY]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=steps, kind="constant")
    model.train()
    size = config.micro_batch_size
    for step in range(steps):
        part = examples[(step * BATCH) % len(examples):][:BATCH]
        micro = [dpo.collate_pairs(part[i:i + size], 0, reference) for i in range(0, len(part), size)]
        train.accumulate_gradients(accelerator, model, micro,
                                   loss_sum_fn=lambda m, b: dpo_loss.pair_losses(config, m, b)[0].sum(),
                                   count_fn=lambda b: b["reference_chosen"].shape[0])
        train.optimizer_step(accelerator, parameters, optimizer, scheduler, config.max_grad_norm)


def four_model_ppo(load, sft_dir, reward_dir, prompts, config, steps, device, load_reward_adapter) -> None:
    """The same PPO step as lowrank.ppo, but each role its own model (the setup adapter swapping avoids)."""
    from peft import PeftModel

    from lowrank import ppo_step, rl
    from lowrank.rollout import response_logprobs, response_mask
    from lowrank.scoring import score_sequences

    policy = PeftModel.from_pretrained(load(), str(sft_dir), is_trainable=True)
    reference = PeftModel.from_pretrained(load(), str(sft_dir)).eval()
    reward = load_reward_adapter(load(), reward_dir).eval()
    value = load_reward_adapter(load(), reward_dir, adapter_name="default", trainable=True)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    queries = torch.tensor(prompts, device=device)
    query_mask = torch.ones_like(queries)
    for _ in range(steps):
        with torch.no_grad():
            policy.eval()
            generated = policy.generate(input_ids=queries, attention_mask=query_mask, do_sample=True,
                                        max_new_tokens=config.max_new_tokens, eos_token_id=[2], pad_token_id=0)
            responses = generated[:, queries.shape[1]:]
            mask = response_mask(responses, [2])
            ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
            length = responses.shape[1]
            old, _ = response_logprobs(policy, ids, attention, length)
            ref, _ = response_logprobs(reference, ids, attention, length)
            values = ppo_step.response_values(value, ids, attention, length)
            scores = score_sequences(reward, ids, attention)
        rollout = ppo_step.Rollout(queries, query_mask, responses, mask, torch.ones(len(responses), dtype=torch.bool),
                              old, ref, values, scores)
        rewards, _ = ppo_step.token_rewards(rollout, config.init_kl_coef, config)
        advantages, returns = rl.compute_gae(rewards, values, mask, config.gamma, config.lam)
        advantages = rl.masked_whiten(advantages, mask)
        policy.train()
        value.train()
        for _ in range(config.ppo_epochs):
            for start in range(0, BATCH, config.minibatch_size):
                rows = slice(start, start + config.minibatch_size)
                logprobs, _ = response_logprobs(policy, ids[rows], attention[rows], length)
                loss, _ = rl.ppo_policy_loss(logprobs, old[rows], advantages[rows], mask[rows])
                new_values = ppo_step.response_values(value, ids[rows], attention[rows], length)
                value_loss, _ = rl.ppo_value_loss(new_values, values[rows], returns[rows], mask[rows])
                (loss + config.vf_coef * value_loss).backward()
                optimizer.step()
                optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--quant", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default=",".join(MODES), help=f"setups to run, of {','.join(MODES)} (sft always)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        result = child(args.child, work / "base", work / "sft", work / "reward", args.steps, args.new_tokens,
                       args.quant, args.device)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_base(work / "base", args.hidden, args.layers, args.vocab)
        build_adapters(work / "base", work)
        n_params = 0
        for f in (work / "base").glob("*.safetensors"):
            with safe_open(str(f), "pt") as handle:
                n_params += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
        print(f"base: LLaMA-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"{n_params / 1e6:.0f}M params, quant {args.quant}, device {args.device}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}")
        peaks = {}
        modes = ["sft", *(m for m in MODES[1:] if m in args.modes.split(","))]
        for mode in modes:
            command = [sys.executable, __file__, "--child", mode, "--work", str(work), "--steps", str(args.steps),
                       "--new-tokens", str(args.new_tokens), "--quant", args.quant, "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            out = done.stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            peaks[mode] = result["peak_bytes"]
            print(f"{mode:5s} peak {result['peak_bytes'] / 2**30:6.2f} GiB  ({result['seconds']:.0f} s)")
        if "swap" in peaks:
            print(f"swap / sft = {peaks['swap'] / peaks['sft']:.2f}x (target <= 1.5)")
        if "four" in peaks and "swap" in peaks:
            print(f"four / swap = {peaks['four'] / peaks['swap']:.2f}x (target >= 2.5)")
        for mode in ("grpo", "dpo"):
            if mode in peaks:
                print(f"{mode} / sft = {peaks[mode] / peaks['sft']:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
