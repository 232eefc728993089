"""Activations per token: what autograd keeps for one decoder layer's backward, and what a backward
through a layer holds beyond that (lowrank.plan.estimates builds every stage's phases from these).
docs/plan.md says where each rule and constant comes from.
"""

from __future__ import annotations

from lowrank.plan.structure import Architecture

# Backward through one decoder layer holds, beyond the tensors its forward pass saved, the gradients
# in flight: per token, bytes per hidden unit and per intermediate unit, fitted on H200 runs
# (bf16 stream: llama2-7b; fp32 stream: llama2-7b, llama3-8b and tinyllama-1b, where they come to
# three hidden-size and one intermediate-size fp32 tensor).
BACKWARD_BYTES_PER_TOKEN = {2: (12, 6), 4: (12, 4)}  # stream bytes -> (per hidden unit, per intermediate unit)
# A forward pass without gradients holds about 4 intermediate-size tensors of one layer at once.
FORWARD_INTERMEDIATE_TENSORS = 4


def layer_saved_per_token(arch: Architecture, targets, *, stream: int, dropout: bool, checkpointed: bool,
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


def backward_extra_per_token(arch: Architecture, stream: int) -> int:
    per_hidden, per_inter = BACKWARD_BYTES_PER_TOKEN[4 if stream == 4 else 2]
    return per_hidden * arch.hidden + per_inter * arch.intermediate
