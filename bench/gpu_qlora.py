"""7-8B QLoRA on a 24 GB card: lowrank's training step against the Hugging Face QLoRA recipe, same run.

    python bench/gpu_qlora.py              # a CUDA machine: every section (~8 min on an H100)
    python bench/gpu_qlora.py --cpu-smoke  # the same code paths on a tiny shape on the CPU

Each section runs in its own child process (peaks do not mix), with GPU memory capped at --cap-gib
(torch.cuda.set_per_process_memory_fraction, as the reference protocol does, to stand in for a
24 GB card). Models are LLaMA shapes with random weights built on the GPU: nothing is downloaded.

  baseline  the reference protocol (../shared/bench/hf_qlora_baseline.py): Trainer + peft + bnb nf4,
            llama2-7b, batch 4 padded rows, log-normal lengths (mean 256, cap 1024)
  sft       lowrank's step on llama2-7b, same data distribution: rows packed padding-free to 1024
            tokens, --tokens-per-step 16384 (4 micro-batches of 4 rows), chunked loss, paged AdamW
  sft8b     llama3-8b (128k vocabulary), rows of 2048 tokens, 8192 tokens per step
  rl        a 7B reward step (8 pairs) and a 7B PPO step: policy, reference, reward and value
            adapters on one nf4 base, 8 rollouts of 256 new tokens
  rollout   8 x 256 new tokens from the policy: the plain peft path against the merged copy with
            CUDA graphs (--fast-rollout merged-graphs), same seed; ms per step, tokens/s, the ratio
Each training section prints its MFU: FLOPs per token (lowrank.plan.flops: forward, recompute and
backward, from the shapes) x tokens/s / the card's dense bf16 peak.
Every lowrank section prints lowrank plan's prediction beside the measured peak. One JSON line per
section, then a table; the last line is lowrank's tokens/s over the baseline's on llama2-7b.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE_CANDIDATES = [ROOT / ".whl" / "hf_qlora_baseline.py", ROOT.parent / "shared" / "bench" / "hf_qlora_baseline.py"]
TINY_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048, tie_word_embeddings=False)
GiB = 2**30


def _baseline_module(path: Path):
    spec = importlib.util.spec_from_file_location("hf_qlora_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_config(name: str, baseline: Path | None) -> dict:
    if name == "tiny":
        return dict(TINY_SHAPE)
    return dict(_baseline_module(baseline).SHAPES[name])


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cap_memory(cap_gib: float) -> None:
    """Cap this process's CUDA memory as the reference protocol does; reset the peak counter."""
    if device() == "cuda":
        torch.cuda.empty_cache()
        if cap_gib:
            torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / torch.cuda.mem_get_info()[1])
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GiB, 2) if device() == "cuda" else None


def sync() -> None:
    if device() == "cuda":
        torch.cuda.synchronize()


def build_base(shape: dict):
    """A random LLaMA of ``shape`` with its decoder linears in bitsandbytes nf4 (double quantization),
    built on the GPU layer by layer as `lowrank.models.load_base_model` would load it, then frozen
    with gradient checkpointing by `lowrank.models.prepare_for_training`."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank.models import _disable_cpu_weight_repacking, compute_dtype, prepare_for_training

    dtype = compute_dtype(device())
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device()):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                              device="meta")
                weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", module=quantized)
                quantized.weight = weight.to(device())  # quantizes
                setattr(parent, name, quantized)
        if device() == "cuda":
            torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # what from_pretrained with a BitsAndBytesConfig sets; peft reads it
    if device() == "cpu":
        _disable_cpu_weight_repacking(model)
    prepare_for_training(model, gradient_checkpointing=True)
    return model


def sft_examples(n: int, vocab: int, mean_len: int, max_len: int, seed: int = 1) -> list[dict]:
    """The protocol's data: log-normal lengths, random tokens, the first third of each a prompt without loss."""
    from lowrank.lm_loss import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    sigma = 0.6
    mu = math.log(mean_len) - sigma * sigma / 2
    lengths = torch.exp(mu + sigma * torch.randn(n, generator=generator)).clamp(16, max_len).long().tolist()
    examples = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 3) + ids[length // 3:]})
    return examples


def predicted_peak(stage: str, shape_name: str, shape: dict, **kwargs) -> float | None:
    """lowrank plan's prediction in GiB (None when the planner does not know this setup)."""
    try:
        from lowrank.plan import estimate
    except ImportError:
        return None
    plan = estimate(shape if shape_name == "tiny" else shape_name, stage=stage, quant="nf4", lora_r=16, **kwargs)
    return round(plan.total / GiB, 2)


# --- sections (each in a child process) ------------------------------------------------------

def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def with_mfu(result: dict, shape: dict, seq_len: int, tokens_per_s: float, *, decode: bool = False) -> dict:
    """``result`` with the FLOPs per token and the MFU (lowrank.plan.flops) of ``tokens_per_s`` added.

    ``decode``: one forward per generated token (2 FLOPs per weight, attention over the context),
    else a LoRA training step with gradient checkpointing."""
    from lowrank.plan.flops import mfu, train_flops_per_token
    from lowrank.plan.structure import as_architecture

    arch = as_architecture(shape)
    if decode:
        per_token = (2 * sum(i * o for _, i, o in arch.linears) + 2 * arch.hidden * arch.vocab
                     + 4 * arch.head_dim * arch.heads * seq_len / 2 * arch.layers)
    else:
        per_token = train_flops_per_token(arch, seq_len)
    utilisation = mfu(per_token, tokens_per_s, gpu_name())
    return {**result, "gflop_per_token": round(per_token / 1e9, 2),
            "mfu": None if utilisation is None else round(utilisation, 4)}


def section_sft(args, shape_name: str, max_length: int, micro_rows: list[int], tokens_per_step: int) -> list[dict]:
    """lowrank's SFT step on one built model, once per micro-batch size in ``micro_rows`` (rows of ``max_length``)."""
    from accelerate import Accelerator
    from peft import get_peft_model

    from lowrank import train
    from lowrank.data import collate, pack_examples
    from lowrank.models import lora_config

    shape = shape_config(shape_name, args.baseline)
    built = time.perf_counter()
    model = get_peft_model(build_base(shape), lora_config(r=16, alpha=32, dropout=0.05))
    model.train()
    build_s = time.perf_counter() - built
    steps = args.warmup + args.steps
    mean_len = args.mean_len * max(1, max_length // 1024)
    examples = sft_examples(int(tokens_per_step * steps * 1.3 / mean_len) + 16, shape["vocab_size"], mean_len, max_length)
    rows = pack_examples(examples, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(params, 2e-4, paged=True)
    scheduler = train.build_scheduler(optimizer, warmup_steps=0, max_steps=steps * len(micro_rows), kind="constant")
    accelerator = Accelerator()
    results = []
    for rows_per_micro in micro_rows:
        cap_memory(args.cap_gib)
        accumulation = train.accumulation_for_tokens(tokens_per_step, [len(r["input_ids"]) for r in rows], rows_per_micro)
        per_step = rows_per_micro * accumulation
        timed_tokens, started, losses = 0, None, []
        for step in range(steps):
            if step == args.warmup:
                sync()
                started = time.perf_counter()
            chunk = [rows[(step * per_step + i) % len(rows)] for i in range(per_step)]
            micro = [collate(chunk[i:i + rows_per_micro], 0) for i in range(0, per_step, rows_per_micro)]
            loss_sum, loss_tokens = train.accumulate_gradients(accelerator, model, micro)
            train.optimizer_step(accelerator, params, optimizer, scheduler, 1.0)
            losses.append(loss_sum / max(1, loss_tokens))
            if step >= args.warmup:
                timed_tokens += sum(len(r["input_ids"]) for r in chunk)
        sync()
        seconds = time.perf_counter() - started
        results.append({
            "section": f"sft-{shape_name}", "who": "lowrank", "shape": shape_name, "max_length": max_length,
            "tokens_per_step": round(timed_tokens / args.steps), "micro_batch_tokens": rows_per_micro * max_length,
            "tok_per_s": round(timed_tokens / seconds, 1), "s_per_step": round(seconds / args.steps, 3),
            "peak_alloc_gib": peak_gib(), "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
            "plan_gib": predicted_peak("sft", shape_name, shape, tokens_per_step=per_step * max_length,
                                       tokens_per_micro_batch=rows_per_micro * max_length, max_length=max_length),
            "build_s": round(build_s, 1)})
        results[-1] = with_mfu(results[-1], shape, max_length, timed_tokens / seconds)
        print("RESULT " + json.dumps(results[-1]), flush=True)
    return results


def section_rl(args, shape_name: str = "llama2-7b") -> list[dict]:
    """A reward step, then a PPO step with all four roles on the same nf4 base."""
    from peft import get_peft_model

    from lowrank import ppo, train
    from lowrank.models import lora_config
    from lowrank.reward import bradley_terry_loss, pair_rewards
    from lowrank.reward_lora import reward_lora_config
    from lowrank.scoring import add_score_head
    from lowrank.roles import POLICY, VALUE, build_roles, trainable_parameters

    shape = shape_config(shape_name, args.baseline)
    base = build_base(shape)
    vocab = shape["vocab_size"]
    generator = torch.Generator().manual_seed(2)
    work = Path(tempfile.mkdtemp(prefix="gpu-qlora-"))
    results = []

    # Reward: 8 pairs of prompt + response, 256-token prompts and 256-token responses.
    add_score_head(base)
    model = get_peft_model(base, reward_lora_config(base, r=16, alpha=32, dropout=0.05))
    model.train()
    cap_memory(args.cap_gib)
    pairs = []
    for _ in range(8):
        prompt = torch.randint(3, vocab, (args.rl_prompt_len,), generator=generator).tolist()
        pairs.append({"chosen": prompt + torch.randint(3, vocab, (args.rl_new_tokens,), generator=generator).tolist(),
                      "rejected": prompt + torch.randint(3, vocab, (args.rl_new_tokens,), generator=generator).tolist()})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(params, 1e-5, paged=True)
    times = []
    for _ in range(1 + args.rl_steps):
        sync()
        started = time.perf_counter()
        chosen, rejected = pair_rewards(model, pairs, 0, device())
        bradley_terry_loss(chosen, rejected).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - started)
    reward_tokens_per_s = 2 * len(pairs) * (args.rl_prompt_len + args.rl_new_tokens) / (sum(times[1:]) / len(times[1:]))
    results.append({"section": f"reward-{shape_name}", "who": "lowrank", "pairs": len(pairs),
                    "tokens_per_pair": args.rl_prompt_len + args.rl_new_tokens,
                    "s_per_step": round(sum(times[1:]) / len(times[1:]), 3), "peak_alloc_gib": peak_gib(),
                    "plan_gib": predicted_peak("reward", shape_name, shape, tokens_per_step=2 * len(pairs) * (
                        args.rl_prompt_len + args.rl_new_tokens), max_length=args.rl_prompt_len + args.rl_new_tokens)})
    results[-1] = with_mfu(results[-1], shape, args.rl_prompt_len + args.rl_new_tokens, reward_tokens_per_s)
    # The adapters PPO starts from: this reward adapter and a fresh SFT LoRA (B = 0).
    model.save_pretrained(work / "reward")
    (work / "reward" / "lowrank.json").write_text(json.dumps({"stage": "reward"}))
    del optimizer, params
    base = model.unload()
    del base.score  # PPO's roles attach their own heads; an "all-linear" SFT LoRA must not wrap this one
    sft = get_peft_model(base, lora_config(r=16, alpha=32, dropout=0.05))
    sft.save_pretrained(work / "sft")
    base = sft.unload()
    del model, sft

    # PPO: one base, four adapters; 8 rollouts of 256 new tokens, then the PPO update.
    model = build_roles(base, reward_adapter=work / "reward", sft_adapter=work / "sft")
    cap_memory(args.cap_gib)
    groups = trainable_parameters(model)
    params = groups[POLICY] + groups[VALUE]
    optimizer = train.build_optimizer(params, 1e-5, paged=True)
    config = ppo.PPOConfig(max_new_tokens=args.rl_new_tokens, rollout_batch_size=8, minibatch_size=4, ppo_epochs=1)
    controller = ppo.make_kl_controller(config)
    prompts = [torch.randint(3, vocab, (args.rl_prompt_len,), generator=generator).tolist() for _ in range(8)]
    timings = []
    for _ in range(args.ppo_steps):
        sync()
        started = time.perf_counter()
        rollout = ppo.collect_rollout(model, prompts, config, [2], 0, device())
        sync()
        rolled = time.perf_counter()
        ppo.ppo_step(model, optimizer, params, rollout, controller, config, torch.Generator().manual_seed(0))
        sync()
        timings.append((rolled - started, time.perf_counter() - rolled, int(rollout.mask.sum())))
    rollout_s, update_s, new_tokens = timings[-1]
    results.append({"section": f"ppo-{shape_name}", "who": "lowrank", "rollouts": 8, "new_tokens": new_tokens,
                    "rollout_s": round(rollout_s, 2), "update_s": round(update_s, 2), "peak_alloc_gib": peak_gib(),
                    "plan_gib": predicted_peak("ppo", shape_name, shape, tokens_per_step=8 * (
                        args.rl_prompt_len + args.rl_new_tokens), ppo_rollout_batch=8,
                        ppo_prompt_len=args.rl_prompt_len, ppo_new_tokens=args.rl_new_tokens,
                        gradient_checkpointing=True, paged_optimizer=True)})
    # The update trains on every rollout row (prompt + response) once per epoch (config.ppo_epochs = 1).
    results[-1] = with_mfu(results[-1], shape, args.rl_prompt_len + args.rl_new_tokens,
                           8 * (args.rl_prompt_len + args.rl_new_tokens) / update_s)
    return results


def section_rollout(args, shape_name: str = "llama2-7b") -> list[dict]:
    """8 prompts x --rl-new-tokens sampled with the policy adapter on the nf4 base: the plain peft path
    against the merged copy (lowrank.fast_rollout), with CUDA graphs on a CUDA device, same seed.

    Every path must draw the same tokens (same distribution, same generator); each row reports
    ms per decoding step and tokens/s, and the last result line the ratio fast / plain."""
    from peft import get_peft_model

    from lowrank.fast_rollout import MergedPolicy
    from lowrank.models import lora_config
    from lowrank.rollout import sample
    from lowrank.roles import POLICY

    shape = shape_config(shape_name, args.baseline)
    model = get_peft_model(build_base(shape), lora_config(r=16, alpha=32, dropout=0.0), adapter_name=POLICY)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking policy: B != 0, so the merge has something to add
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * 1e-3)
    cap_memory(args.cap_gib)
    prompts = [torch.randint(3, shape["vocab_size"], (args.rl_prompt_len,), generator=generator).tolist()
               for _ in range(8)]
    settings = dict(max_new_tokens=args.rl_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=[-1],
                    pad_id=0, device=device())
    # One merged copy (13.5 GB for a 7B in bf16): with CUDA graphs on CUDA, without them elsewhere.
    merged = MergedPolicy(model, POLICY, graphs=device() == "cuda")
    paths = {"plain": None, "merged-graphs" if merged.graphs else "merged": merged}
    results, drawn = [], {}
    for name, merged in paths.items():
        times = []
        for _ in range(1 + args.rl_steps):  # the first call warms up (and compiles the graphs)
            torch.manual_seed(7)
            sync()
            started = time.perf_counter()
            samples = sample(model, prompts, merged=merged, **settings)
            sync()
            times.append(time.perf_counter() - started)
        drawn[name] = samples.responses.cpu()
        seconds = min(times[1:])
        steps = samples.responses.shape[1]
        results.append(with_mfu({"section": f"rollout-{shape_name}", "who": f"lowrank {name}", "rollouts": 8,
                                  "new_tokens": int(samples.mask.sum()), "rollout_s": round(seconds, 3),
                                  "ms_per_step": round(1000 * seconds / steps, 2),
                                  "tok_per_s": round(int(samples.mask.sum()) / seconds, 1),
                                  "peak_alloc_gib": peak_gib()},
                                 shape, args.rl_prompt_len + steps, int(samples.mask.sum()) / seconds, decode=True))
        print("RESULT " + json.dumps(results[-1]), flush=True)
    fast = results[-1]
    results.append({"section": f"rollout-{shape_name}", "who": "ratio", "fast": fast["who"], "fast_over_plain":
                    round(fast["tok_per_s"] / results[0]["tok_per_s"], 2),
                    "same_tokens": all(torch.equal(drawn["plain"], d) for d in drawn.values())})
    return results


def run_baseline(args) -> dict:
    if args.baseline is None:
        return {"section": "baseline", "error": "reference protocol script not found"}
    command = [sys.executable, str(args.baseline), "--shape", args.shape, "--batch", "4", "--steps", str(args.baseline_steps),
               "--warmup", "3", "--cap-gib", str(args.cap_gib)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.section_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{") and '"anchor"' in line]
    if done.returncode != 0 or not lines:
        return {"section": "baseline", "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return {"section": f"baseline-{args.shape}", "who": "hf-trainer-peft-bnb", **json.loads(lines[-1])}


def child(args) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.child == "sft":
        section_sft(args, args.shape, 1024, [4, 8], args.tokens_per_step)
    elif args.child == "sft8b":
        section_sft(args, args.shape8b, 2048, [2, 4], 8192)
    elif args.child == "rl":
        for result in section_rl(args, args.shape):
            print("RESULT " + json.dumps(result), flush=True)
    elif args.child == "rollout":
        print("RESULT " + json.dumps(section_rollout(args, args.shape)[-1]), flush=True)
    else:
        raise SystemExit(f"unknown section {args.child}")


def run_child(args, section: str) -> list[dict]:
    command = [sys.executable, __file__, "--child", section, *args.passthrough]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.section_timeout)
        stdout, stderr, failed = done.stdout, done.stderr, done.returncode != 0
    except subprocess.TimeoutExpired as e:
        stdout, stderr, failed = e.stdout or "", f"timed out after {args.section_timeout} s", True
        stdout, stderr = (x.decode() if isinstance(x, bytes) else x for x in (stdout, stderr))
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if failed or not results:
        tail = [line for line in stderr.splitlines() if line.strip()][-3:]
        results.append({"section": section, "error": " | ".join(tail)})
    return results


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="baseline,sft,sft8b,rl,rollout")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the code paths")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--shape8b", default="llama3-8b")
    parser.add_argument("--cap-gib", type=float, default=23.0)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--mean-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--baseline-steps", type=int, default=10)
    parser.add_argument("--rl-steps", type=int, default=2)
    parser.add_argument("--ppo-steps", type=int, default=1)
    parser.add_argument("--rl-prompt-len", type=int, default=128)
    parser.add_argument("--rl-new-tokens", type=int, default=256)
    parser.add_argument("--section-timeout", type=int, default=300)
    parser.add_argument("--baseline", type=Path, default=next((p for p in BASELINE_CANDIDATES if p.is_file()), None))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_smoke:
        args.shape = args.shape8b = "tiny"
        args.tokens_per_step, args.mean_len, args.steps, args.rl_new_tokens, args.rl_prompt_len = 4096, 64, 1, 16, 16
        args.sections = args.sections.replace("baseline,", "").replace("baseline", "")
    if args.child:
        return child(args)
    args.passthrough = [a for a in sys.argv[1:] if a != "--cpu-smoke"] + (
        ["--shape", "tiny", "--shape8b", "tiny", "--tokens-per-step", "4096", "--mean-len", "64", "--steps", "1",
         "--rl-new-tokens", "16", "--rl-prompt-len", "16"] if args.cpu_smoke else [])
    print(f"# gpu_qlora on {machine()}, cap {args.cap_gib} GiB, {time.strftime('%Y-%m-%d')}", flush=True)
    results = []
    for section in [s for s in args.sections.split(",") if s]:
        started = time.perf_counter()
        got = [run_baseline(args)] if section == "baseline" else run_child(args, section)
        for result in got:
            result["section_s"] = round(time.perf_counter() - started, 1)
            print(json.dumps(result), flush=True)
        results += got
    if importlib.util.find_spec("unsloth") is None:
        print("# unsloth: not installed, no third column")
    print(f"\n{'section':<18} {'who':<22} {'tokens/step':>11} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>8} "
          f"{'plan GiB':>8} {'MFU':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['section']:<18} error: {r['error']}")
            continue
        tokens_step = r.get("tokens_per_step") or (round(r["tok_per_s"] * r.get("s_per_step", r.get("rollout_s", 0)))
                                               if "tok_per_s" in r else "")
        print(f"{r['section']:<18} {r.get('who', ''):<22} {tokens_step!s:>11} {r.get('tok_per_s', '')!s:>9} "
              f"{r.get('s_per_step', r.get('rollout_s', ''))!s:>7} {r.get('peak_alloc_gib')!s:>8} {r.get('plan_gib')!s:>8} "
              f"{'' if r.get('mfu') is None else format(r['mfu'], '.1%'):>6}")
    ratio = next((r for r in results if r.get("who") == "ratio"), None)
    if ratio:
        print(f"rollout, {ratio['fast']} / lowrank plain tokens/s: {ratio['fast_over_plain']:.2f}x "
              f"(same tokens: {ratio['same_tokens']})")
    base = next((r for r in results if r["section"].startswith("baseline") and "tok_per_s" in r), None)
    ours = next((r for r in results if r["section"] == f"sft-{args.shape}" and "tok_per_s" in r), None)
    if base and ours:
        print(f"lowrank / HF QLoRA recipe tokens/s on {args.shape}: {ours['tok_per_s'] / base['tok_per_s']:.2f}x")
    else:
        print("lowrank / HF QLoRA recipe tokens/s: n/a (no baseline or no lowrank SFT result in this run)")


if __name__ == "__main__":
    main()
