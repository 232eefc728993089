"""SFT throughput: lowrank's loop against transformers' Trainer + peft, same model, data, LoRA and quantization.

Both sides train one epoch over the same tokenized examples (lowrank.data, so the tokens and the
assistant-only labels are identical) with LoRA r=16/alpha=32/dropout 0.05 on all linear layers,
gradient checkpointing on, AdamW, the same learning rate and the same quantization. Each side runs
in its own subprocess so that peak memory (ru_maxrss on the CPU, torch.cuda.max_memory_allocated on
a GPU) is its own. Instruction data have long-tailed lengths: the examples here are synthetic alpaca
records whose lengths are log-normal.

Trained tokens/s counts non-padding tokens only. The baseline pads each batch to its longest row
(Trainer with DataCollatorForSeq2Seq, the usual recipe); lowrank packs examples padding-free.

    python bench/sft_throughput.py                 # CPU, tiny-shaped model, nf4
    python bench/sft_throughput.py --gpu           # CUDA, ~1B LLaMA shape (TinyLlama), nf4, bf16

The last line printed is the ratio lowrank / baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the cat dog house tree river light small large green blue quickly slowly write explain list "
         "sort count number answer question sentence word story poem reason because however").split()


def make_data(path: Path, n: int, mean_words: int, seed: int = 0) -> None:
    """Alpaca records with log-normal instruction and response lengths (sigma 0.8: a long tail)."""
    rng = random.Random(seed)
    sigma = 0.8
    mu = math.log(mean_words) - sigma * sigma / 2

    def text(mean_scale: float) -> str:
        k = max(2, int(math.exp(rng.gauss(mu, sigma)) * mean_scale))
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": text(0.3), "input": "", "output": text(0.7)}) + "\n")


def build_model(out: Path, gpu: bool) -> Path:
    from lowrank.tiny import build_tiny_model

    # The tokenizer is trained on the shipped corpus, which caps its vocabulary (~1000 pieces for
    # SentencePiece), so on the CPU the output layer is smaller than a real model's.
    if gpu:  # TinyLlama-1.1B shape, random weights, built on the GPU in bf16 (as the reference protocol does)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        path = build_tiny_model(out, tokenizer="bpe", hidden_size=2048, num_layers=1, num_heads=32, num_kv_heads=4,
                                intermediate_size=5632, max_position_embeddings=2048)
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = 22
        config.vocab_size = 32000  # a real vocabulary's output layer; the tokenizer uses the first ids only
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
        return path
    return build_tiny_model(out, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                            intermediate_size=704, max_position_embeddings=1024)


def _peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_lowrank(args) -> dict:
    from lowrank.sft import SFTConfig, train_sft

    config = SFTConfig(model=args.model, data=args.data, output_dir=args.out, overwrite=True, quant=args.quant,
                       max_length=args.max_length, batch_size=args.pack_rows, eval_fraction=0.0, save_every=0,
                       epochs=1.0, learning_rate=2e-4, seed=0, template="alpaca")
    out = train_sft(config)
    metrics = json.loads((Path(out) / "lowrank.json").read_text())["metrics"]
    return {"tokens": metrics["train_tokens"], "tokens_per_second": metrics["tokens_per_second"],
            "steps": metrics["steps"]}


def run_trainer(args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lowrank.data import build_sft_dataset
    from lowrank.models import load_base_model, load_tokenizer, lora_config
    from lowrank.templates import BUILTIN_TEMPLATES

    tokenizer = load_tokenizer(args.model)
    examples = build_sft_dataset(tokenizer, BUILTIN_TEMPLATES["alpaca"], args.data, args.max_length)
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in examples]
    # The plain recipe: from_pretrained with a BitsAndBytesConfig, prepare_model_for_kbit_training,
    # get_peft_model (load_base_model does exactly these steps).
    model = get_peft_model(load_base_model(args.model, args.quant), lora_config())
    cuda = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=2e-4,
        lr_scheduler_type="cosine", logging_steps=10_000, save_strategy="no", report_to=[],
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="paged_adamw_32bit" if cuda and args.quant != "none" else "adamw_torch", bf16=cuda,
        use_cpu=not cuda, dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(r["input_ids"]) for r in rows)  # one epoch: every example once
    return {"tokens": tokens, "tokens_per_second": tokens / seconds, "steps": trainer.state.global_step}


def child(args) -> None:
    result = run_lowrank(args) if args.side == "lowrank" else run_trainer(args)
    result["peak_memory_mib"] = _peak_memory_mib()
    print("RESULT " + json.dumps(result), flush=True)


def run_side(side: str, args, work: Path, model: Path, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--data", str(data),
           "--out", str(work / side), "--quant", args.quant, "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size), "--pack-rows", str(args.pack_rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def machine() -> str:
    import platform

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, ~1B LLaMA shape in nf4 (bf16 compute)")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--examples", type=int, default=0, help="number of examples (default: 400 CPU, 2000 GPU)")
    parser.add_argument("--mean-words", type=int, default=60, help="mean words per example (log-normal)")
    parser.add_argument("--max-length", type=int, default=512, help="truncation (and lowrank's packed row length)")
    parser.add_argument("--batch-size", type=int, default=8, help="baseline examples per batch")
    parser.add_argument("--pack-rows", type=int, default=4, help="lowrank packed rows per micro-batch")
    parser.add_argument("--child", choices=["lowrank", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return
    import torch

    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device here")
    n = args.examples or (2000 if args.gpu else 400)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model", args.gpu)
        data = work / "data.jsonl"
        make_data(data, n, args.mean_words)
        print(f"machine: {machine()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
        print(f"model: {json.loads((model / 'config.json').read_text())['hidden_size']} hidden, quant {args.quant}; "
              f"{n} examples, log-normal lengths, max_length {args.max_length}")
        results = {}
        for side in ("trainer", "lowrank"):
            results[side] = run_side(side, args, work, model, data)
            r = results[side]
            print(f"{side:8s} {r['tokens']} tokens in {r['steps']} steps: {r['tokens_per_second']:.0f} tokens/s, "
                  f"peak memory {r['peak_memory_mib']:.0f} MiB")
    ratio = results["lowrank"]["tokens_per_second"] / results["trainer"]["tokens_per_second"]
    mem = results["lowrank"]["peak_memory_mib"] / results["trainer"]["peak_memory_mib"]
    print(f"peak memory lowrank/trainer: {mem:.2f}")
    print(f"tokens/s lowrank/trainer: {ratio:.2f}x")


if __name__ == "__main__":
    main()
