"""Peak GPU memory of a training run, predicted before it starts (`lowrank plan`).

The model of memory, term by term, with where each number comes from, is docs/plan.md. In short:
static terms (base weights in their quantized layout, LoRA adapters, optimizer state, cuBLAS
workspaces) plus the activations of the phase with the most live memory: for SFT, the reward
model and DPO the backward pass through the last decoder layer (every layer's checkpointed input,
one layer's recomputed activations and its gradients) or the chunked loss; for PPO the largest of
rollout generation (KV cache), the no-gradient scoring passes and the PPO minibatch update; for
GRPO the largest of generation, reward-adapter scoring, the no-gradient log-prob passes and the
micro-batched update (its loss head or its backward).

Parameters are counted exactly on a model built on the meta device (no weights, no download for
named shapes); the activation terms are per-token sums over the tensors autograd saves, checked
on an H200 against ``torch.cuda.max_memory_allocated`` (the constants below). A plan's ``total``
predicts that figure; the CUDA context and a paged optimizer's state lie outside torch's
allocator and are added for the question whether a card holds the run. Everything is in bytes;
1 GiB = 2**30 bytes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field

from lowrank.errors import UserError

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
# The default card: an RTX 4090, 24 GiB (nvidia-smi reports 24564 MiB, 23.99 GiB).
DEFAULT_CARD_BYTES = 24 * GiB
STAGES = ("sft", "reward", "ppo", "grpo", "dpo")

# --- constants of the memory model (docs/plan.md says where each comes from) ---------------
# Outside torch's allocator, so not in torch.cuda.max_memory_allocated but on the card all the same:
# the CUDA context (driver, kernels of torch, cuBLAS and bitsandbytes); 0.70 GiB measured on an
# H200 with torch 2.11 + CUDA 13 (torch.cuda.mem_get_info after the first matmul).
CUDA_CONTEXT_BYTES = 700 * MiB
# Inside the allocator: one cuBLAS workspace per stream that runs matmuls (the main thread and the
# autograd thread), 32 MiB each on Hopper.
CUBLAS_WORKSPACE_BYTES = 64 * MiB
# bitsandbytes' paged optimizers keep the state of tensors with at least this many elements in
# CUDA managed memory (outside torch's allocator); smaller ones get ordinary tensors.
PAGED_MIN_NUMEL = 100_000
# bitsandbytes' 8-bit optimizers keep 32-bit state for tensors smaller than this (min_8bit_size).
OPTIM_8BIT_MIN_NUMEL = 4096
# Backward through one decoder layer holds, beyond the tensors its forward pass saved, the gradients
# in flight: per token, bytes per hidden unit and per intermediate unit, fitted on H200 runs
# (bf16 stream: llama2-7b; fp32 stream: llama2-7b, llama3-8b and tinyllama-1b, where they come to
# three hidden-size and one intermediate-size fp32 tensor).
BACKWARD_BYTES_PER_TOKEN = {2: (12, 6), 4: (12, 4)}  # stream bytes -> (per hidden unit, per intermediate unit)
# A forward pass without gradients holds about 4 intermediate-size tensors of one layer at once.
FORWARD_INTERMEDIATE_TENSORS = 4
# Chunked loss: per logit of a chunk, bf16 logits (2) + fp32 copy (4) + log-softmax (4) in the
# forward pass; + its gradient (4) in backward, minus the fp32 copy, plus a bf16 gradient (2): 14.
LOSS_LOGIT_BYTES = 14

# Named shapes: config.json fields of well-known models, so that planning needs no download.
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    # LLaMA 3.1: LLaMA 3's shape with its rope scaling and a 128k context (no extra parameters).
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        tie_word_embeddings=False),
    # Qwen2.5: biases on q/k/v (counted by transformers' Qwen2 model).
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    # Qwen3: q/k RMSNorms and a head_dim (128) of its own, not hidden / heads.
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, tie_word_embeddings=False),
    "tinyllama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False),
}


# --------------------------------------------------------------------------------------------
# The model's structure, counted on the meta device
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What memory depends on: shape, and every linear layer of the decoder (name, in, out)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # each nn.Linear inside the decoder layers
    embed_params: int
    head_params: int  # lm_head; 0 when tied to the embeddings
    vector_params: int  # 1-D parameters: norm weights (and biases)
    params: int


def _config_dict(model: str) -> tuple[str, dict]:
    if model in SHAPES:
        return model, dict(SHAPES[model])
    from pathlib import Path

    from lowrank.models import read_model_config
    from lowrank.tiny import NAMED_MODELS, resolve_model_name

    # A bare name that is no dir is a shape name: hub ids are org/name.
    if model not in NAMED_MODELS and not Path(model).expanduser().exists() and "/" not in model:
        raise UserError(f"unknown shape '{model}'; named shapes: {', '.join([*SHAPES, *NAMED_MODELS])} "
                        f"(or give a model dir, or a hub id as org/name)")
    return model, read_model_config(resolve_model_name(model))


@functools.lru_cache(maxsize=32)
def _architecture(name: str, config_json: str) -> Architecture:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank.models import SUPPORTED_ARCHITECTURES

    config = json.loads(config_json)
    model_type = config.pop("model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{name}: unsupported architecture '{model_type or 'none'}'; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("quantization_config", "architectures", "auto_map", "torch_dtype", "dtype"):
        config.pop(key, None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - a config.json transformers cannot build a model from
        raise UserError(f"{name}: cannot build the model from its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    text = hf_config.get_text_config()
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and ".layers." in n)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    heads = text.num_attention_heads
    return Architecture(
        name=name, hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=embed.shape[0],
        linears=linears, embed_params=embed.numel(), head_params=0 if head is embed else head.numel(),
        vector_params=sum(p.numel() for p in model.parameters() if p.ndim == 1),
        params=sum(p.numel() for p in model.parameters()))


def architecture(model: str) -> Architecture:
    """The structure of ``model``: a named shape, 'tiny', a local model dir or a hub id (config only)."""
    name, config = _config_dict(model)
    return _architecture(name, json.dumps(config, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Weights in their quantized layouts
# --------------------------------------------------------------------------------------------

def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """Bytes of one weight in bitsandbytes NF4 with double quantization (Linear4bit, quant_storage uint8).

    Packed weight: 2 values per byte. QuantState: absmax of each block of 64, quantized to uint8;
    its offset (one fp32); the nested state: an fp32 absmax per 256 blocks and the 256-entry fp32
    code it was quantized with; and the 16-entry fp32 NF4 code (bitsandbytes.functional.quantize_4bit).
    """
    blocks = math.ceil(numel / blocksize)
    return math.ceil(numel / 2) + blocks + 4 + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16


def int8_bytes(in_features: int, out_features: int) -> int:
    """Bytes of one weight in LLM.int8 (Linear8bitLt): int8 values and an fp32 scale per output row."""
    return in_features * out_features + 4 * out_features


def weight_bytes(arch: Architecture, quant: str, *, compute_bytes: int = 2, fp32_norms: bool = False
                 ) -> dict[str, int]:
    """Bytes of the base weights: decoder linears (quantized unless ``quant`` is none); embeddings, LM
    head and 1-D parameters (norms) in the compute dtype, as lowrank.models loads them (norms in fp32
    with ``fp32_norms``, as peft's prepare_model_for_kbit_training would cast them)."""
    if quant == "nf4":
        linears = sum(nf4_bytes(i * o) for _, i, o in arch.linears)
    elif quant == "int8":
        linears = sum(int8_bytes(i, o) for _, i, o in arch.linears)
    elif quant == "none":
        linears = sum(i * o for _, i, o in arch.linears) * compute_bytes
    else:
        raise UserError(f"--quant: unknown value '{quant}'; choose nf4, int8 or none")
    return {f"decoder weights ({quant if quant != 'none' else 'bf16'})": linears,
            "embeddings, LM head, norms": (arch.embed_params + arch.head_params) * compute_bytes
            + arch.vector_params * (4 if fp32_norms else compute_bytes)}


# --------------------------------------------------------------------------------------------
# LoRA adapters and optimizer state
# --------------------------------------------------------------------------------------------

def lora_targets(arch: Architecture, target_modules) -> list[tuple[str, int, int]]:
    """(name, in, out) of the layers a LoRA adapts: peft's "all-linear" (every decoder linear, not
    lm_head) or module names, matched as peft does (the name or a dotted suffix of it)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    targets = [t.strip() for part in targets for t in str(part).split(",") if t.strip()]
    if targets == ["all-linear"] or not targets:
        return list(arch.linears)
    found = [(n, i, o) for n, i, o in arch.linears if any(n == t or n.endswith("." + t) for t in targets)]
    if "lm_head" in targets:
        found.append(("lm_head", arch.hidden, arch.vocab))
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears})
        raise UserError(f"--target-modules: none of {', '.join(targets)} is a linear layer of {arch.name}; "
                        f"its layers: {', '.join(names)}")
    return found


def lora_tensors(targets, r: int) -> list[int]:
    """Element counts of the LoRA weight tensors: A (r x in) and B (out x r) per adapted layer."""
    return [n for _, i, o in targets for n in (r * i, o * r)]


def optimizer_bytes(tensors: list[int], *, bits: int, paged: bool) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes in CUDA managed memory) of AdamW state for these tensors.

    32-bit: two fp32 moments (8 bytes per parameter). bitsandbytes 8-bit: two uint8 moments and an
    fp32 absmax per block of 256 for each (tensors under 4096 elements keep 32-bit state). A paged
    bitsandbytes optimizer puts the state of tensors of 100,000+ elements in managed memory.
    """
    inside = outside = 0
    for n in tensors:
        if bits == 8 and n >= OPTIM_8BIT_MIN_NUMEL:
            size = 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            size = 8 * n
        if paged and n >= PAGED_MIN_NUMEL:
            outside += size
        else:
            inside += size
    return inside, outside


# --------------------------------------------------------------------------------------------
# Activations (bytes per token)
# --------------------------------------------------------------------------------------------

def _layer_saved_per_token(arch: Architecture, targets, *, stream: int, dropout: bool, checkpointed: bool,
                           seq: int, r: int, int8: bool = False) -> int:
    """Bytes per token that autograd keeps for one decoder layer's backward (LLaMA / Mistral / Qwen2 layer).

    ``stream``: bytes per value of the residual stream (4 when fp32 norm weights promote it).
    Rules (from the ops' saved tensors): a frozen nf4 or bf16 base linear saves nothing of its input
    (an int8 one, bitsandbytes' MatMul8bitLt, saves it); a LoRA saves its fp32 input (a dropout
    output and a uint8 mask, or with no dropout the input itself, cast to fp32 per layer when the
    stream is bf16) and its r-wide A output; an RMSNorm
    saves its input as fp32; SiLU saves its input, the gate product both factors; attention (sdpa,
    memory-efficient kernel with a boolean block mask made additive) saves q, k and v with grouped
    k/v repeated to every head, its output, the log-sum-exp and the additive mask.
    """
    h, inter, heads = arch.hidden, arch.intermediate, arch.heads
    q = heads * arch.head_dim
    adapted = {n.rsplit(".", 1)[-1] for n, _, _ in targets if ".layers.0." in n}

    def lora(names, width, input_saved_anyway):
        hits = sum(n in adapted for n in names)
        if not hits:
            return 0
        if dropout:
            inputs = 5 * width * hits  # an fp32 dropout output and a uint8 mask per adapted layer
        elif stream == 4:
            inputs = 0 if input_saved_anyway else 4 * width  # the fp32 input itself, shared
        else:
            inputs = 4 * width * hits  # an fp32 cast per adapted layer
        return inputs + 4 * r * hits

    # input norm (its fp32 input is the checkpoint itself when the stream is fp32), post-attention norm, rsqrt
    norms = (0 if (checkpointed and stream == 4) else 4 * h) + 4 * h + 8
    attention = 4 * q * stream + 4 * heads + seq * stream  # q, k, v (repeated), output; log-sum-exp; mask row
    mlp = 3 * inter * stream  # gate (SiLU input), SiLU output and up (the product's factors)
    adapters = (lora(("q_proj", "k_proj", "v_proj"), h, False) + lora(("o_proj",), q, True)
                + lora(("gate_proj", "up_proj"), h, False) + lora(("down_proj",), inter, False))
    if int8:  # the inputs of q/k/v, gate/up and down, unless a LoRA keeps that very tensor (sdpa keeps o's)
        shared = stream == 4 and not dropout
        adapters += sum(width * stream for name, width in (("q_proj", h), ("gate_proj", h), ("down_proj", inter))
                        if not (shared and name in adapted))
    return norms + attention + mlp + adapters


def _backward_extra_per_token(arch: Architecture, stream: int) -> int:
    per_hidden, per_inter = BACKWARD_BYTES_PER_TOKEN[4 if stream == 4 else 2]
    return per_hidden * arch.hidden + per_inter * arch.intermediate


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A predicted peak. ``breakdown`` (term -> bytes) is what torch's allocator holds at the peak
    (its sum, ``total``, is the prediction of torch.cuda.max_memory_allocated); ``outside`` is what
    the card holds besides (the CUDA context, a paged optimizer's state); ``needed`` is both."""

    model: str
    stage: str
    phase: str  # the phase of the step where the peak falls
    breakdown: dict[str, int]
    outside: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # every phase's predicted peak allocated (its total)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def needed(self) -> int:
        return self.total + sum(self.outside.values())

    def fits(self, card_bytes: int = DEFAULT_CARD_BYTES) -> bool:
        return self.needed <= card_bytes


# What each stage's config defaults to (its dataclass in lowrank.<stage>; tests/test_plan.py checks that
# they agree), written out so that planning imports no stage module: the stages import this one.
# lowrank.roles.build_roles sets every dropout to 0 for the stages with a policy and a reference.
STAGE_DEFAULTS = {
    "sft": {"gradient_checkpointing": True, "lora_dropout": 0.05},
    "reward": {"gradient_checkpointing": True, "lora_dropout": 0.05},
    "ppo": {"gradient_checkpointing": False, "lora_dropout": 0.0},
    "grpo": {"gradient_checkpointing": False, "lora_dropout": 0.0},
    "dpo": {"gradient_checkpointing": True, "lora_dropout": 0.0},
}


def _pick_peak(model: str, stage: str, phases: dict[str, dict[str, int]], outside: dict[str, int],
               settings: dict) -> Plan:
    """The plan of the phase with the largest total, with every phase's total beside it."""
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    phase = max(totals, key=totals.get)
    return Plan(model, stage, phase, _nonzero(phases[phase]), _nonzero(outside), settings, totals)


def estimate(model, *, stage: str = "sft", quant: str = "auto", lora_r: int = 16, target_modules=("all-linear",),
             lora_dropout: float | None = None, tokens_per_step: int | None = None,
             tokens_per_micro_batch: int | None = None, max_length: int = 1024, optim_bits: int = 32,
             paged_optimizer: bool | None = None, gradient_checkpointing: bool | None = None,
             loss_chunk_tokens: int | None = None, fp32_norms: bool = False, ppo_rollout_batch: int = 8,
             ppo_minibatch: int = 4, ppo_prompt_len: int = 256, ppo_new_tokens: int = 256,
             ppo_reference_adapter: bool = True, reference_adapter: bool = True, grpo_group_size: int = 8,
             grpo_prompts_per_step: int = 4, grpo_minibatch: int | None = None,
             grpo_micro_batch: int | None = None, grpo_reward_adapter: bool = False) -> Plan:
    """Predict the peak CUDA memory of one training stage (see the module docstring and docs/plan.md).

    ``model``: a named shape, 'tiny', a model dir, a hub id, a dict of config.json fields, or an
    :class:`Architecture`. Memory depends on the micro-batch, not on the step:
    ``tokens_per_micro_batch`` defaults to ``tokens_per_step`` (no gradient accumulation), and a
    larger step is reached by accumulating micro-batches at no extra memory. A micro-batch is
    ceil(tokens / max_length) rows of ``max_length`` (packed SFT rows; reward rows are the chosen and
    rejected sequences). PPO: ``ppo_rollout_batch`` prompts of ``ppo_prompt_len`` tokens get
    ``ppo_new_tokens`` each, and updates take ``ppo_minibatch`` rollouts at a time
    (``tokens_per_step`` is not used). GRPO: ``grpo_prompts_per_step`` prompts of ``ppo_prompt_len``
    tokens get ``grpo_group_size`` completions of ``ppo_new_tokens`` each, all sampled at once; the
    log-prob passes and the update take ``grpo_micro_batch`` completions at a time (default: the
    minibatch, ``grpo_minibatch``, default: all of a step's), as GRPOConfig.micro_batch does;
    ``grpo_reward_adapter`` adds a frozen reward adapter that scores all completions at once. DPO:
    rows are the chosen and the rejected sequence of each pair, so a micro-batch of p pairs is
    ``tokens_per_micro_batch`` = 2 p ``max_length``. ``reference_adapter`` (GRPO, DPO; PPO reads
    ``ppo_reference_adapter``): the frozen reference is a copy of the SFT adapter, not the bare base.
    ``None`` settings take the stage's defaults: gradient checkpointing and LoRA dropout from its
    config (0 for the stages with a reference: lowrank.roles turns dropout off), a paged optimizer
    for every stage on a quantized base (lowrank.train.build_optimizer). ``quant`` "auto" is nf4, what
    a run on CUDA takes.
    """
    from lowrank.models import resolve_quant

    if stage not in STAGES:
        raise UserError(f"--stage: unknown '{stage}'; choose {', '.join(STAGES)}")
    quant = resolve_quant(quant, cuda=True)
    if lora_r < 1:
        raise UserError(f"--lora-r must be at least 1, got {lora_r}")
    if optim_bits not in (8, 32):
        raise UserError(f"--optim-bits must be 8 or 32, got {optim_bits}")
    arch = _as_architecture(model)
    defaults = STAGE_DEFAULTS[stage]
    checkpointed = defaults["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    dropout = (defaults["lora_dropout"] if lora_dropout is None else lora_dropout) > 0
    paged = (quant != "none") if paged_optimizer is None else paged_optimizer
    stream = 4 if (fp32_norms and quant != "none") else 2  # bytes per value of the residual stream
    h, layers, vocab = arch.hidden, arch.layers, arch.vocab

    static = weight_bytes(arch, quant, fp32_norms=fp32_norms and quant != "none")
    static["cuBLAS workspaces"] = CUBLAS_WORKSPACE_BYTES
    outside = {"CUDA context": CUDA_CONTEXT_BYTES}
    targets = lora_targets(arch, target_modules)
    settings = {"quant": quant, "lora_r": lora_r, "gradient_checkpointing": checkpointed, "lora_dropout": dropout,
                "paged_optimizer": paged, "optim_bits": optim_bits if paged else 32, "stream_bytes": stream}
    if stage == "ppo":
        return _estimate_ppo(arch, static, outside, targets, settings, r=lora_r, checkpointed=checkpointed,
                             stream=stream, batch=ppo_rollout_batch, minibatch=min(ppo_minibatch, ppo_rollout_batch),
                             prompt=ppo_prompt_len, new=ppo_new_tokens, reference=ppo_reference_adapter)
    if stage == "grpo":
        completions = grpo_group_size * grpo_prompts_per_step
        minibatch = min(grpo_minibatch or completions, completions)
        return _estimate_grpo(arch, static, outside, targets, settings, r=lora_r, checkpointed=checkpointed,
                              stream=stream, group=grpo_group_size, prompts=grpo_prompts_per_step,
                              minibatch=minibatch, micro=min(grpo_micro_batch or minibatch, minibatch),
                              prompt=ppo_prompt_len, new=ppo_new_tokens, reference=reference_adapter,
                              reward=grpo_reward_adapter)

    tokens = tokens_per_micro_batch or tokens_per_step or 4 * max_length
    if tokens < 1 or max_length < 1:
        raise UserError(f"tokens per micro-batch and --max-length must be at least 1, got {tokens} and {max_length}")
    seq = min(max_length, tokens)
    rows = math.ceil(tokens / seq)
    tokens = rows * seq
    step = max(tokens_per_step or tokens, tokens)
    settings.update(tokens_per_micro_batch=tokens, rows=rows, max_length=seq,
                    accumulation=math.ceil(step / tokens), tokens_per_step=step)

    tensors = lora_tensors(targets, lora_r) + ([h + 1] if stage == "reward" else [])  # + the score head
    trainable = sum(tensors)
    static["adapters"] = 4 * trainable
    if stage == "dpo":
        settings.update(pairs=max(1, rows // 2), reference_adapter=reference_adapter)
        static["adapters (reference)"] = 4 * trainable if reference_adapter else 0
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        tensors, bits=settings["optim_bits"], paged=paged)
    # DPO accumulates micro-batches' gradients in place: from the second on, all of them are alive. (SFT
    # and the reward model do the same; their plans were calibrated without this term.)
    accumulated = {"gradients (accumulated)": 4 * trainable if stage == "dpo" and settings["accumulation"] > 1 else 0}

    saved = _layer_saved_per_token(arch, targets, stream=stream, dropout=dropout, checkpointed=checkpointed,
                                   seq=seq, r=lora_r, int8=quant == "int8")
    mask = rows * seq * seq  # boolean block-causal (packed) or padding mask, (rows, 1, seq, seq)
    if checkpointed:
        stored = {"checkpoints (layer inputs)": tokens * h * (2 + (layers - 1) * stream)}
        layer = {"one layer recomputed": tokens * saved}
    else:
        stored = {"activations (all layers)": tokens * saved * layers}
        layer = {}
    backward = {**static, **accumulated, **stored, "attention mask": mask, **layer,
                "gradients in flight": tokens * (h * stream + _backward_extra_per_token(arch, stream))
                + 4 * trainable // layers}
    phases = {"backward": backward}
    if stage in ("sft", "dpo"):  # lowrank's chunked LM head on the loss (DPO: response) positions only
        chunk = min(loss_chunk_tokens or _loss_chunk_tokens(vocab), tokens)
        phases["loss"] = {**static, **accumulated, **stored, "attention mask": mask,
                          "final norm": tokens * (4 * h + h * stream),  # its fp32 input and its output
                          # the positions with loss, their gradient, and that gradient scattered back
                          "loss hidden states": 3 * tokens * h * 2,
                          "logits (loss chunk)": LOSS_LOGIT_BYTES * chunk * vocab}
        settings["loss_chunk_tokens"] = chunk
    if stage == "dpo":
        # dpo.reference_logprobs, once before training (and evaluate() alike): the same micro-batches
        # without gradient; per chunk of the head bf16 logits, an fp32 copy and its log-softmax.
        phases["reference log-probs (no gradient)"] = {
            **static, "attention mask": mask, "hidden states": tokens * h * (stream + 2),
            "forward temporaries": max(tokens * FORWARD_INTERMEDIATE_TENSORS * arch.intermediate * stream,
                                       (2 + 4 + 4) * chunk * vocab)}
    phases["optimizer step"] = {**static, "gradients": 4 * trainable,
                                "optimizer temporaries": 0 if paged else 8 * trainable}
    return _pick_peak(str(arch.name), stage, phases, outside, settings)


def _estimate_ppo(arch, static, outside, targets, settings, *, r, checkpointed, stream, batch, minibatch, prompt,
                  new, reference) -> Plan:
    """PPO: one base, four adapters; the largest of generation, scoring and minibatch update."""
    if min(batch, minibatch, new) < 1 or prompt < 1:
        raise UserError("PPO rollout batch, minibatch, prompt length and new tokens must be at least 1")
    h, inter, layers, vocab = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    adapter = lora_tensors(targets, r)
    head = arch.hidden + 1
    trainable = 2 * adapter + [head]  # policy LoRA; value LoRA and its head copy
    static["adapters (policy, value)"] = 4 * sum(trainable)
    static["adapters (reference, reward)"] = 4 * ((sum(adapter) if reference else 0) + sum(adapter) + 2 * head)
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        trainable, bits=settings["optim_bits"], paged=settings["paged_optimizer"])
    grads = {"gradients": 4 * sum(trainable)}  # kept from the last minibatch (zeroed before the next)
    seq = prompt + new
    kv = batch * seq * layers * 2 * arch.kv_heads * arch.head_dim * stream
    generation = {**static, **grads, "KV cache": kv + kv // layers, "sampling logits": 2 * batch * vocab * 4}
    tokens = batch * seq
    logits = batch * (new + 1) * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy, the fp32 log-softmax
    scoring = {**static, **grads, "hidden states": tokens * h * stream,
               "rollout logits": max(logits, tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream)}
    mb_tokens = minibatch * seq
    saved = _layer_saved_per_token(arch, targets, stream=stream, dropout=False, checkpointed=checkpointed,
                                   seq=seq, r=r, int8=settings["quant"] == "int8")
    if checkpointed:
        stored = {"checkpoints (layer inputs)": mb_tokens * h * (2 + (layers - 1) * stream),
                  "one layer recomputed": mb_tokens * saved}
    else:
        stored = {"activations (all layers)": mb_tokens * saved * layers}
    update = {**static, **stored, "attention mask": minibatch * seq * seq,
              "gradients in flight": mb_tokens * (h * stream + _backward_extra_per_token(arch, stream))
              + 4 * sum(trainable) // layers,
              "policy logits": minibatch * new * vocab * 4 + 2 * mb_tokens * h * 4}
    phases = {"rollout generation": generation, "scoring": scoring, "PPO update": update}
    settings.update(rollout_batch=batch, minibatch=minibatch, prompt_len=prompt, new_tokens=new,
                    tokens_per_micro_batch=mb_tokens, reference_adapter=reference)
    return _pick_peak(str(arch.name), "ppo", phases, outside, settings)


# Per logit of the GRPO update's head (rollout.response_logprobs with entropy, then rl.grpo_token_loss):
# the bf16 logits (2) and the fp32 log-softmax autograd keeps (4) stay while rl.entropy_from_logits
# holds an fp32 copy, the softmax and their product (3 x 4). The backward through the head needs
# less (log-softmax output, its incoming and outgoing gradient: 12), the no-gradient passes
# 2 + 4 + 4 (bf16 logits, fp32 copy, log-softmax).
GRPO_HEAD_LOGIT_BYTES = 2 + 4 + 3 * 4
SCORING_LOGIT_BYTES = 2 + 4 + 4


def _estimate_grpo(arch, static, outside, targets, settings, *, r, checkpointed, stream, group, prompts,
                   minibatch, micro, prompt, new, reference, reward) -> Plan:
    """GRPO (lowrank/grpo.py): one base with the policy, its frozen reference copy and optionally a
    frozen reward adapter; no value role. Per step, the largest of: sampling all group x prompts
    completions at once (KV cache), the reward adapter scoring them at once, the no-gradient
    log-prob passes (policy, then reference) in micro-batches, and the update in micro-batches, at
    its loss head (logits over the completion tokens only) or in the backward through a layer."""
    if min(group, prompts, minibatch, micro, new, prompt) < 1:
        raise UserError("GRPO group size, prompts per step, micro-batch, prompt length and new tokens must be "
                        "at least 1")
    h, inter, layers, vocab = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    adapter = lora_tensors(targets, r)
    head = h + 1
    static["adapters (policy)"] = 4 * sum(adapter)
    # The reward adapter's score head: the base's module and the adapter's copy (peft's modules_to_save).
    frozen = (sum(adapter) if reference else 0) + (sum(adapter) + 2 * head if reward else 0)
    static["adapters (reference" + (", reward)" if reward else ")")] = 4 * frozen
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        adapter, bits=settings["optim_bits"], paged=settings["paged_optimizer"])
    # optimizer_step zeroes the gradients with set_to_none: none live outside the update.
    completions, seq = group * prompts, prompt + new
    kv_per_token = layers * 2 * arch.kv_heads * arch.head_dim * stream
    kv = completions * seq * kv_per_token
    generation = {**static, "KV cache": kv + kv // layers,  # + one layer's cache being concatenated
                  "sampling logits": 2 * completions * vocab * 4}
    prefill_tokens = completions * prompt
    prefill = {**static, "KV cache (prompts)": prefill_tokens * kv_per_token,
               "prefill activations": prefill_tokens * (h * stream + FORWARD_INTERMEDIATE_TENSORS * inter * stream)
               + completions * prompt * prompt}
    phases = {"generation": max(generation, prefill, key=lambda terms: sum(terms.values()))}
    if reward:  # score_responses: the decoder over all completions at once, no LM head
        tokens = completions * seq
        phases["reward scoring"] = {**static, "attention mask": completions * seq * seq,
                                    "hidden states": tokens * h * stream,
                                    "forward temporaries": tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream}
    tokens = micro * seq  # one micro-batch of completions
    mask = micro * seq * seq
    phases["log-probs (no gradient)"] = {
        **static, "attention mask": mask, "hidden states": tokens * h * stream,
        "forward temporaries": max(micro * (new + 1) * vocab * SCORING_LOGIT_BYTES,
                                   tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream)}
    trainable = sum(adapter)
    accumulated = {"gradients (accumulated)": 4 * trainable if minibatch > micro else 0}
    saved = _layer_saved_per_token(arch, targets, stream=stream, dropout=False, checkpointed=checkpointed,
                                   seq=seq, r=r, int8=settings["quant"] == "int8")
    if checkpointed:
        stored = {"checkpoints (layer inputs)": tokens * h * (2 + (layers - 1) * stream)}
        layer = {"one layer recomputed": tokens * saved}
    else:
        stored, layer = {"activations (all layers)": tokens * saved * layers}, {}
    phases["update: log-probs and entropy"] = {
        **static, **accumulated, **stored, "attention mask": mask,
        "final norm": tokens * (4 * h + h * stream),  # its fp32 input and its output
        "completion logits, log-softmax, entropy": micro * new * vocab * GRPO_HEAD_LOGIT_BYTES}
    phases["update: backward"] = {
        **static, **accumulated, **stored, "attention mask": mask, **layer,
        "gradients in flight": tokens * (h * stream + _backward_extra_per_token(arch, stream))
        + 4 * trainable // layers}
    phases["optimizer step"] = {**static, "gradients": 4 * trainable,
                                "optimizer temporaries": 0 if settings["paged_optimizer"] else 8 * trainable}
    settings.update(group_size=group, prompts_per_step=prompts, completions=completions, minibatch=minibatch,
                    micro_batch=micro, prompt_len=prompt, new_tokens=new, tokens_per_micro_batch=tokens,
                    reference_adapter=reference, reward_adapter=reward)
    return _pick_peak(str(arch.name), "grpo", phases, outside, settings)


def _as_architecture(model) -> Architecture:
    if isinstance(model, Architecture):
        return model
    if isinstance(model, dict):  # config.json fields
        config = {"model_type": "llama", **model}
        return _architecture(str(config.get("_name_or_path") or "custom shape"), json.dumps(config, sort_keys=True))
    return architecture(str(model))


def _nonzero(terms: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in terms.items() if v}


def _loss_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of lowrank's loss: lowrank.train.LOSS_CHUNK_LOGITS logits (at least 16 tokens)."""
    from lowrank.train import LOSS_CHUNK_LOGITS

    return max(16, int(LOSS_CHUNK_LOGITS) // vocab)


def largest_tokens_per_step(model, card_bytes: int = DEFAULT_CARD_BYTES, **settings) -> int:
    """The most tokens per micro-batch that fit ``card_bytes``: whole rows of ``max_length`` (DPO: whole
    pairs of rows; PPO: whole rollouts per minibatch, at most the rollout batch; GRPO: whole
    completions per micro-batch, a divisor of the minibatch); 0 when not even one fits.

    Rule: memory depends on the micro-batch only, so with gradient accumulation a step of any size
    runs at this micro-batch; without accumulation it is also the largest step.
    """
    arch = _as_architecture(model)
    stage = settings.get("stage", "sft")
    if stage in ("ppo", "grpo"):
        unit = settings.get("ppo_prompt_len", 256) + settings.get("ppo_new_tokens", 256)
        if stage == "ppo":
            batch = settings.get("ppo_rollout_batch", 8)
            return unit * _largest(lambda n: estimate(arch, **{**settings, "ppo_minibatch": n}).fits(card_bytes),
                                   batch)
        # GRPO: micro-batches must divide the minibatch (grpo.check_config); generation does not depend on them.
        minibatch = estimate(arch, **settings).settings["minibatch"]
        fitting = (n for n in range(minibatch, 0, -1) if minibatch % n == 0
                   and estimate(arch, **{**settings, "grpo_micro_batch": n}).fits(card_bytes))
        return unit * next(fitting, 0)
    max_length = settings.get("max_length", 1024)
    rest = {k: v for k, v in settings.items() if k not in ("tokens_per_step", "tokens_per_micro_batch")}
    row = 2 if stage == "dpo" else 1  # a DPO pair's chosen and rejected rows go into one micro-batch
    return row * max_length * _largest(
        lambda n: estimate(arch, **rest, tokens_per_micro_batch=n * row * max_length).fits(card_bytes), 1 << 20)


def _largest(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for a monotone fits; 0 when fits(1) is false."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def format_plan(plan: Plan, card_bytes: int = DEFAULT_CARD_BYTES) -> str:
    """The breakdown as a small table in GiB, the totals, and whether it fits the card."""
    s = plan.settings
    if plan.stage == "ppo":
        what = (f"{s['rollout_batch']} rollouts of {s['prompt_len']} prompt + {s['new_tokens']} new tokens, "
                f"minibatch {s['minibatch']}")
    elif plan.stage == "grpo":
        plural = "s" if s["prompts_per_step"] > 1 else ""
        what = (f"{s['prompts_per_step']} prompt{plural} x {s['group_size']} completions of {s['prompt_len']} "
                f"prompt + {s['new_tokens']} new tokens, micro-batch {s['micro_batch']} of minibatch {s['minibatch']}"
                f"{', reward adapter' if s['reward_adapter'] else ''}")
    else:
        what = f"{s['tokens_per_micro_batch']} tokens per micro-batch ({s['rows']} x {s['max_length']})"
        if plan.stage == "dpo":
            what = f"{s['pairs']} pairs per micro-batch ({s['rows']} rows of {s['max_length']}: chosen, rejected)"
        if s["accumulation"] > 1:
            what += f", {s['accumulation']} per step"
    lines = [f"{plan.model}, {plan.stage}, {s['quant']}, LoRA r {s['lora_r']}, {what}, gradient checkpointing "
             f"{'on' if s['gradient_checkpointing'] else 'off'}; peak in: {plan.phase}"]
    width = max(len(k) for k in [*plan.breakdown, *plan.outside, "peak allocated (max_memory_allocated)"]) + 2

    def row(name, value):
        lines.append(f"  {name:<{width}}{value / GiB:7.2f} GiB")
    for name, value in plan.breakdown.items():
        row(name, value)
    row("peak allocated (max_memory_allocated)", plan.total)
    for name, value in plan.outside.items():
        row(f"+ {name}", value)
    row("needed on the card", plan.needed)
    row("card", card_bytes)
    if len(plan.phases) > 1:  # each phase's peak allocated, so the next largest is in view
        lines.append("peak allocated by phase: " + ", ".join(f"{name} {total / GiB:.2f} GiB"
                                                              for name, total in plan.phases.items()))
    lines.append(f"fits: {'yes' if plan.fits(card_bytes) else 'no'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Hooks for the training stages on CUDA
# --------------------------------------------------------------------------------------------

def _adapter_shape(adapter_dir: str) -> dict:
    """lora_r and target_modules of a saved PEFT adapter (its adapter_config.json); {} when unreadable."""
    from pathlib import Path

    try:
        config = json.loads((Path(adapter_dir).expanduser() / "adapter_config.json").read_text())
        return {"lora_r": int(config["r"]), "target_modules": config["target_modules"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def settings_from_config(stage: str, config, *, prompt_len: int | None = None) -> dict:
    """estimate() keyword arguments for a stage's config dataclass (SFTConfig, RewardConfig, PPOConfig,
    GRPOConfig, DPOConfig). Stages that start from an SFT adapter take its rank and target modules."""
    get = functools.partial(getattr, config)
    settings = {"stage": stage, "quant": get("quant", "auto"), "lora_r": get("lora_r", 16),
                "gradient_checkpointing": get("gradient_checkpointing", None)}
    sft_adapter = get("sft_adapter", "") if stage in ("ppo", "grpo", "dpo") else ""
    if sft_adapter:
        settings.update(_adapter_shape(sft_adapter))
    if stage == "ppo":
        settings.update(ppo_rollout_batch=get("rollout_batch_size", 8) * get("samples_per_prompt", 1),
                        ppo_minibatch=get("minibatch_size", 4),
                        ppo_new_tokens=get("max_new_tokens", 256), ppo_prompt_len=prompt_len or 256,
                        ppo_reference_adapter=bool(sft_adapter))
        return settings
    if stage == "grpo":
        completions = get("group_size", 8) * get("prompts_per_step", 4)
        minibatch = get("minibatch_size", 0) or completions  # GRPOConfig.minibatch and .micro_batch
        settings.update(grpo_group_size=get("group_size", 8), grpo_prompts_per_step=get("prompts_per_step", 4),
                        grpo_minibatch=minibatch, grpo_micro_batch=get("micro_batch_size", 0) or minibatch,
                        grpo_reward_adapter=bool(get("reward_adapter", "")), reference_adapter=bool(sft_adapter),
                        ppo_new_tokens=get("max_new_tokens", 128), ppo_prompt_len=prompt_len or 256)
        return settings
    if stage == "dpo":  # rows: the chosen and the rejected sequence of each pair; batch_size is pairs per step
        max_length = get("max_length", 512)
        micro = 2 * get("micro_batch_size", 2) * max_length
        settings.update(max_length=max_length, tokens_per_micro_batch=micro, reference_adapter=bool(sft_adapter),
                        tokens_per_step=max(micro, 2 * get("batch_size", 8) * max_length))
        return settings
    max_length = get("max_length", 1024)
    rows = get("batch_size", 4) * (2 if stage == "reward" else 1)  # reward: chosen and rejected rows
    micro = get("tokens_per_micro_batch", 0) or rows * max_length
    settings.update(target_modules=get("target_modules", ["all-linear"]), lora_dropout=get("lora_dropout", None),
                    max_length=max_length, tokens_per_micro_batch=micro, optim_bits=get("optim_bits", 32),
                    tokens_per_step=get("tokens_per_step", 0) or micro * get("gradient_accumulation_steps", 1))
    return settings


def plan_for_training(model_path: str, stage: str, config, device, *, prompt_len: int | None = None) -> Plan | None:
    """The plan of a run about to start on ``device``; None off CUDA or when it cannot be made.

    Never raises: a plan is advice, and a run must not fail because its plan could not be made.
    """
    if not str(device).startswith("cuda"):
        return None
    try:
        return estimate(model_path, **settings_from_config(stage, config, prompt_len=prompt_len))
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("memory plan: could not estimate (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def report_start(plan: Plan | None, device=None) -> None:
    """Log the plan, warn when it exceeds the free GPU memory, and reset the peak counter. Call before loading."""
    if plan is None:
        return
    import torch

    free, card = torch.cuda.mem_get_info(device)
    # Memory this process already holds in torch's cache can be reused; the CUDA context is already made.
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = plan.needed - plan.outside.get("CUDA context", 0)  # this process's context exists already
    log.info("memory plan:\n%s", format_plan(plan, card))
    if needed > available:
        log.warning("memory plan: this run needs about %.1f GiB of GPU memory and %.1f GiB are free: expect an "
                    "out-of-memory error; lower the tokens per micro-batch (batch size or max length) and "
                    "raise gradient accumulation instead (`lowrank plan` shows what fits)",
                    needed / GiB, available / GiB)
    torch.cuda.reset_peak_memory_stats(device)


def report_end(plan: Plan | None, device=None) -> int | None:
    """Log the measured peak (torch.cuda.max_memory_allocated) beside the plan's; return the measured bytes."""
    if plan is None:
        return None
    import torch

    measured = torch.cuda.max_memory_allocated(device)
    log.info("memory plan: peak allocated %.2f GiB measured, %.2f GiB planned (%+.1f%%)",
             measured / GiB, plan.total / GiB, 100 * (plan.total / max(1, measured) - 1))
    return measured


def peak_metrics(plan: Plan | None, device=None) -> dict:
    """{"peak_gpu_gib", "planned_gpu_gib"} for a stage's lowrank.json metrics (logged too); {} off CUDA."""
    measured = report_end(plan, device)
    if measured is None:
        return {}
    return {"peak_gpu_gib": round(measured / GiB, 3), "planned_gpu_gib": round(plan.total / GiB, 3)}
