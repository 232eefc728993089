"""The math of PPO for language models, as small pure functions over tensors.

Shapes: every per-token tensor is (batch, response_len); ``mask`` is 1 on response tokens that
count (up to and including the stop token) and 0 on padding after it. Masked positions never
contribute to a mean, a variance or a loss. The PPO loop in lowrank/ppo.py only calls these
functions, and tests/test_rl.py checks each one against numbers worked out by hand, so a bug in
GAE shows up as a failed unit test instead of a flat reward curve.

References for the formulas: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO clipped
surrogate), Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences" (per-token
KL penalty and the adaptive KL controller), Ouyang et al. 2022 (InstructGPT), and John Schulman's
note "Approximating KL divergence" (2020) for the k1/k3 estimators. GRPO: Shao et al. 2024
(DeepSeekMath, eq. 3-4) and Liu et al. 2025 ("Understanding R1-Zero-Like Training", Dr. GRPO).
Preference losses: Rafailov et al. 2023 (DPO, eq. 7), Azar et al. 2023 (IPO, eq. 17), Meng et al.
2024 (SimPO, eq. 6) and Hong et al. 2024 (ORPO, eq. 6-7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (over all of them, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; ``unbiased`` applies Bessel's correction n / (n - 1)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("masked_var needs at least two unmasked values for the unbiased estimate")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries; masked positions become 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes): used for rewards,
    whose sign carries meaning, while advantages are fully whitened.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, and A_t = delta_t + gamma * lam * A_{t+1}, with
    V_{t+1} = 0 and A_{t+1} = 0 after the last unmasked token (the episode ends at the stop
    token). returns = A + V is the value target. Both outputs are 0 on masked positions and carry
    no gradient (they are targets).
    """
    rewards, values = rewards.detach(), values.detach()
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_advantage)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage
        # A masked position resets the recursion: nothing after the episode's end flows back.
        next_advantage = advantage * mask[:, t]
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of the other scores of its group (RLOO; Kool et al. 2019, Ahmadian
    et al. 2024): consecutive runs of ``group_size`` rows are one prompt's responses.

    A baseline that depends only on the prompt leaves the policy gradient unbiased and removes what
    the reward model adds per prompt, offsets a batch-wide baseline cannot see; excluding the score
    itself keeps the baseline independent of the sample it judges.
    """
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs groups of at least 2, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view_as(scores)


def kl_penalty(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    k1 = log p - log q: unbiased, can be negative per token (the classic RLHF penalty).
    k3 = (q/p - 1) - log(q/p): unbiased too, always >= 0, lower variance (Schulman 2020).
    """
    log_ratio = logprobs - reference_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


def kl_from_logits(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) = sum_v p(v) (log p(v) - log q(v)) at each position, from the two models' logits.

    (..., vocab) x 2 -> (...), fp32, never negative. Summed over a sampled response's positions it
    is an unbiased estimate of the sequence-level KL with less variance than k1 or k3 (each
    position's whole distribution is used, not just the sampled token).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked entries: 1 is a perfect value
    function, 0 one no better than a constant, negative one worse than a constant."""
    mask = mask.to(values.dtype)
    target_var = masked_var(returns, mask, unbiased=False)
    if target_var.item() <= 0:
        return float("nan")
    return 1.0 - (masked_var(returns - values, mask, unbiased=False) / target_var).item()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: (batch, seq, vocab), (batch, seq) -> (batch, seq), fp32."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, in nats: (batch, seq, vocab) -> (batch, seq).

    H = logsumexp(z) - sum softmax(z) * z, which avoids log(0) for tokens of zero probability.
    """
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss of PPO and the share of tokens where the clip was active.

    ratio = exp(log pi - log pi_old); loss = mean over tokens of max(-A * ratio, -A * clip(ratio,
    1 - eps, 1 + eps)). The max of the two negatives is the pessimistic (clipped) objective.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) and the share of clipped tokens.

    V_clipped = V_old + clip(V - V_old, -eps, eps) keeps the value function from moving far from
    the values the advantages were computed with (as in OpenAI's baselines PPO2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    clip_fraction = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clip_fraction.detach()


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon). The clip
    bounds each change; ``horizon`` (in samples) sets how fast beta reacts: after ``horizon``
    samples at a constant error e, beta has changed by about a factor exp(e).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("target KL and horizon must be positive")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# GRPO (DeepSeekMath): group-relative advantages, no value function
# --------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion relative to the others sampled for the same prompt.

    ``rewards`` (prompts * group_size,) lists each prompt's group contiguously. A = r - mean(group);
    with ``scale`` (DeepSeekMath's outcome supervision) it is divided by the group's standard
    deviation (unbiased, as torch.std and TRL), plus ``eps`` so that a group whose completions all
    score the same gets advantage 0. ``scale=False`` is Dr. GRPO's unbiased form.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}: a group of one has no relative advantage")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (prompts * group_size,), got {tuple(rewards.shape)} for group size {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (prompts, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    reference_logprobs: torch.Tensor | None, *, beta: float, cliprange: float = 0.2,
                    cliprange_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss (batch, length): -min(ratio * A, clip(ratio) * A) + beta * KL_k3(policy || reference).

    ``advantages`` is (batch,): one value per completion, shared by its tokens (outcome reward).
    ``reference_logprobs`` may be None when ``beta`` is 0 (no reference pass is needed then).
    ``cliprange_high`` (DAPO's clip-higher) defaults to ``cliprange``. Returns (loss per token,
    k3 KL per token, whether the clip was active per token); reduce with :func:`reduce_token_loss`.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.unsqueeze(1).to(logprobs.dtype)  # (batch, 1)
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if reference_logprobs is not None:
        kl = kl_penalty(logprobs, reference_logprobs, "k3")
    else:
        kl = torch.zeros_like(logprobs)
    if beta:
        if reference_logprobs is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        loss = loss + beta * kl
    return loss, kl, (clipped < unclipped)


def reduce_token_loss(token_loss: torch.Tensor, mask: torch.Tensor, normalization: str, *,
                      max_length: int | None = None) -> torch.Tensor:
    """The scalar loss of a batch of completions from a per-token loss (batch, length).

    - "sequence" (DeepSeekMath's GRPO): mean over each completion's tokens, then over completions;
      a long completion's tokens each weigh less than a short one's.
    - "token" (DAPO, and TRL's default): sum over every token of the batch / their number; each
      token weighs the same.
    - "constant" (Dr. GRPO): sum over tokens / (completions * ``max_length``), a normaliser that
      does not depend on the lengths the policy chose, so it adds no length bias.
    """
    mask = mask.to(token_loss.dtype)
    if normalization == "sequence":
        return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    if normalization == "token":
        return (token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if normalization == "constant":
        if not max_length:
            raise ValueError("normalization 'constant' needs max_length")
        return (token_loss * mask).sum() / (token_loss.shape[0] * max_length)
    raise ValueError(f"unknown loss normalization {normalization!r}; use sequence, token or constant")


# --------------------------------------------------------------------------------------------
# Offline preference losses, per pair (batch,): DPO, IPO, SimPO, ORPO
# --------------------------------------------------------------------------------------------
# Inputs are log-probabilities of the chosen and rejected responses given the prompt: summed over
# the response tokens (DPO, IPO) or averaged over them (SimPO, ORPO), as each paper defines.

def dpo_sigmoid_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, reference_chosen_logps: torch.Tensor,
                     reference_rejected_logps: torch.Tensor, beta: float,
                     label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).

    Returns (loss, chosen reward, rejected reward) per pair; the implicit rewards are
    beta * (log pi - log ref). ``label_smoothing`` eps > 0 is the conservative DPO of
    Mitchell (2023): (1 - eps) * loss(h) + eps * loss(-h), for pairs whose labels may be wrong.
    """
    chosen_rewards = beta * (chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (rejected_logps - reference_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, reference_chosen_logps: torch.Tensor,
             reference_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: (h - 1 / (2 * tau))^2 with h = log [pi(y_w) ref(y_l) / (pi(y_l) ref(y_w))] and tau = ``beta``.

    A squared loss pulls the log-ratio margin to a fixed 1/(2 tau) instead of pushing it to
    infinity as DPO's does on deterministic preferences. Returns (loss, chosen reward, rejected
    reward), the rewards as in DPO (beta * log-ratio).
    """
    chosen_ratio = chosen_logps - reference_chosen_logps
    rejected_ratio = rejected_logps - reference_rejected_logps
    loss = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float,
               gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (reference-free): -log sigmoid(beta * avg log pi(y_w) - beta * avg log pi(y_l) - gamma).

    The averages are per response token (length-normalised); ``gamma`` is the target reward margin.
    Returns (loss, chosen reward, rejected reward) with reward = beta * avg log pi.
    """
    chosen_rewards, rejected_rewards = beta * chosen_mean_logps, beta * rejected_mean_logps
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (reference-free): NLL(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l)).

    odds(y) = P(y) / (1 - P(y)) with P(y) = exp(avg log pi(y)), the per-token mean likelihood;
    log odds = avg log pi - log(1 - exp(avg log pi)). The NLL term is the SFT loss on the chosen
    response (its per-token average), so ORPO needs no SFT stage before it. ``beta`` is the
    paper's lambda. Returns (loss, chosen reward, rejected reward) with reward = beta * avg log pi.
    """
    def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
        # log1p(-exp(x)) for x < 0; clamp keeps a response of likelihood 1 finite
        return mean_logps - torch.log1p(-torch.exp(mean_logps.clamp(max=-1e-6)))

    ratio_term = F.logsigmoid(log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps))
    loss = -chosen_mean_logps - beta * ratio_term
    return loss, (beta * chosen_mean_logps).detach(), (beta * rejected_mean_logps).detach()
