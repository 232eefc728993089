"""The causal LM loss every training stage uses: next-token cross-entropy summed over the positions
that carry a label, with the LM head run only on those positions and chunk by chunk, so the
(batch, seq, vocab) logits never exist (torchtune keeps its chunked cross-entropy apart the same
way). Also the pieces DPO and the reward model reuse: the causal LM inside a wrapped model, its
final hidden states without the full logits, and the head's logits with Gemma 2's soft-cap.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of a position that carries no loss (the transformers convention)


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry loss after the causal shift (label t+1 is predicted at t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# Logits elements per chunk of the loss: 1,024 tokens at a 32k vocabulary, 256 at Llama-3's 128k.
# One chunk's logits (bf16, then fp32 with its gradient) is all the loss ever holds in memory.
LOSS_CHUNK_LOGITS = 1 << 25


def causal_lm(model):
    """The transformers causal LM inside ``model`` (a DDP wrapper and/or a PeftModel, or the model itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_lm_head(lm) -> bool:
    """True when logits = lm_head(final hidden state), soft-capped at most (which :func:`head_logits` repeats):
    no scaling the chunked loss does not know."""
    config = lm.config
    return not any(getattr(config, name, None) for name in ("logit_scale", "logits_scaling"))


def sharded_head(lm) -> bool:
    """True when FSDP shards the LM head: its weight is whole only inside the model's forward, so the
    chunked loss, which calls the head after the forward, cannot run it (the plain path does)."""
    head = lm.get_output_embeddings()
    return type(getattr(head, "weight", None)).__name__ == "DTensor"


def logit_softcap(lm) -> float | None:
    """Gemma 2's final_logit_softcapping (logits = cap * tanh(logits / cap)); None for a model without one."""
    return getattr(lm.config, "final_logit_softcapping", None) or None


def head_logits(lm_head, hidden: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """(n, vocab) fp32 logits of (n, hidden) final hidden states, soft-capped as the model's forward does it."""
    logits = lm_head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def final_hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden state (batch, seq, hidden) of ``model(**inputs)``, without the full logits.

    The model is called as a whole (so DDP's hooks and the active adapters apply) with
    ``logits_to_keep=1``: the LM head then runs on one position per row, and the hidden states
    are taken from the decoder's output by a forward hook.
    """
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def _chunk_cross_entropy_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head_logits(lm_head, hidden, softcap), labels, reduction="sum")


def linear_cross_entropy_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor, *,
                             chunk_tokens: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """sum_i CE(lm_head(hidden[i]), labels[i]) for (n, hidden) states and (n,) labels, chunk by chunk.

    Each chunk runs under non-reentrant activation checkpointing: the forward keeps only the
    chunk's hidden states, and the backward recomputes the chunk's logits, so at most one chunk of
    (chunk_tokens, vocab) logits exists at a time instead of the (tokens, vocab) fp32 tensor (which
    is 2 GiB for 4,096 tokens of Llama-3's 128k vocabulary, before its gradient). ``lm_head`` is
    called as a module, so a LoRA on it trains as usual. ``softcap``: the model's final logit soft-cap
    (Gemma 2), applied to each chunk's logits.
    """
    from torch.utils.checkpoint import checkpoint

    vocab = lm_head.weight.shape[0] if hasattr(lm_head, "weight") else lm_head.out_features
    chunk = chunk_tokens or max(16, LOSS_CHUNK_LOGITS // vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_cross_entropy_sum, lm_head, h, y, softcap, use_reentrant=False)
        else:
            total = total + _chunk_cross_entropy_sum(lm_head, h, y, softcap)
    return total


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], *, chunked: bool = True) -> torch.Tensor:
    """Summed (not averaged) next-token cross-entropy over the positions that carry loss.

    ``chunked`` (the default): the LM head runs only on the positions that carry loss (not on
    prompts or padding) and chunk by chunk (:func:`linear_cross_entropy_sum`), so the
    (batch, seq, vocab) logits never exist. ``chunked=False`` is the plain path (full logits,
    then cross-entropy) that tests hold the chunked one against.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    lm = causal_lm(model)
    if chunked and plain_lm_head(lm) and not sharded_head(lm):
        hidden = final_hidden_states(model, inputs)[:, :-1]  # position t predicts label t + 1
        labels = batch["labels"][:, 1:].to(hidden.device)
        keep = labels != IGNORE_INDEX
        return linear_cross_entropy_sum(lm.get_output_embeddings(), hidden[keep], labels[keep], softcap=logit_softcap(lm))
    # No KV cache: with one, transformers would not read packed position_ids as separate examples.
    logits = model(**inputs, use_cache=False).logits  # (batch, seq, vocab)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:].to(shift_logits.device)
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")
