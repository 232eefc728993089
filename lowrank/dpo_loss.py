"""What a DPO step computes from a micro-batch of pairs: the policy's sequence log-probs of each
response and the pair losses over them (DPO, IPO, SimPO, ORPO, RPO's NLL term), on the pure
functions of lowrank/rl.py. lowrank/dpo.py tokenizes and collates the pairs and runs the loop.
"""

from __future__ import annotations

import torch

from lowrank import lm_loss, rl

LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})  # losses of per-token mean log-probs, without a reference
# beta when none is given: TRL's for DPO, IPO and ORPO (its lambda); SimPO's reward is beta times a per-token
# MEAN log-prob, about 1/length of DPO's scale, and its paper trains with beta of about 2 (Meng et al. 2024).
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


def _token_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return -torch.nn.functional.cross_entropy(lm_loss.head_logits(lm_head, hidden, softcap), targets, reduction="none")


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi over each row's response tokens, number of those tokens), each (rows,), fp32.

    Token t is predicted at position t - 1. The LM head runs only on the positions that predict a
    response token, chunk by chunk under activation checkpointing (as SFT's loss does, see
    lowrank.lm_loss.linear_cross_entropy_sum), so the (rows, seq, vocab) logits never exist.
    """
    from torch.utils.checkpoint import checkpoint

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    keep = batch["response_mask"][:, 1:].bool()  # (rows, seq - 1)
    targets = batch["input_ids"][:, 1:][keep]  # (response tokens,)
    lm = lm_loss.causal_lm(model)
    if lm_loss.plain_lm_head(lm):
        hidden = lm_loss.final_hidden_states(model, inputs)[:, :-1][keep]  # (response tokens, hidden)
        lm_head = lm.get_output_embeddings()
        chunk, softcap = max(16, lm_loss.LOSS_CHUNK_LOGITS // lm_head.weight.shape[0]), lm_loss.logit_softcap(lm)
        pieces = []
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            use_checkpoint = torch.is_grad_enabled() and h.requires_grad
            pieces.append(checkpoint(_token_logprobs, lm_head, h, y, softcap, use_reentrant=False) if use_checkpoint
                          else _token_logprobs(lm_head, h, y, softcap))
        token_logprobs = torch.cat(pieces)
    else:  # scaled logits: the plain path
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # (rows, seq - 1, vocab)
        token_logprobs = rl.logprobs_from_logits(logits[keep], targets)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], device=token_logprobs.device).index_add(0, rows, token_logprobs)
    return sums, keep.sum(1).to(sums.device)


def pair_losses(config, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair of a collated micro-batch (lowrank.dpo.collate_pairs), under
    the active adapter; ``config`` (a DPOConfig) gives the loss, beta, simpo_gamma, label_smoothing and rpo_alpha."""
    sums, counts = sequence_logprobs(model, batch)
    pairs = sums.shape[0] // 2
    if config.loss in REFERENCE_FREE:
        means = sums / counts.clamp(min=1)
        chosen, rejected = means[:pairs], means[pairs:]
        if config.loss == "simpo":
            return rl.simpo_loss(chosen, rejected, config.beta, config.simpo_gamma)
        return rl.orpo_loss(chosen, rejected, config.beta)
    reference = (batch["reference_chosen"].to(sums.device), batch["reference_rejected"].to(sums.device))
    if config.loss == "ipo":
        loss, chosen_rewards, rejected_rewards = rl.ipo_loss(sums[:pairs], sums[pairs:], *reference, config.beta)
    else:
        loss, chosen_rewards, rejected_rewards = rl.dpo_sigmoid_loss(sums[:pairs], sums[pairs:], *reference,
                                                                     config.beta, config.label_smoothing)
    if config.rpo_alpha:
        # RPO (Pang et al. 2024): the SFT loss on the chosen response keeps its likelihood from
        # falling while the margin grows, which plain DPO allows (both log-probs may drop).
        loss = loss - config.rpo_alpha * sums[:pairs] / counts[:pairs].clamp(min=1)
    return loss, chosen_rewards, rejected_rewards
