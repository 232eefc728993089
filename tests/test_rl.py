"""The RL math of lowrank.rl against numbers worked out by hand on 2x4 examples."""

import math

import pytest
import torch

from lowrank import rl

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])  # kept: 1, 2, 5, 6, 7


def test_masked_mean_ignores_masked_positions():
    assert rl.masked_mean(X, MASK).item() == pytest.approx(21 / 5)
    assert rl.masked_mean(X, MASK, dim=1).tolist() == pytest.approx([1.5, 6.0])


def test_masked_var_by_hand():
    # deviations from 4.2: -3.2 -2.2 0.8 1.8 2.8 -> squares sum 26.8
    assert rl.masked_var(X, MASK, unbiased=False).item() == pytest.approx(26.8 / 5)
    assert rl.masked_var(X, MASK).item() == pytest.approx(26.8 / 4)


def test_masked_whiten_zero_mean_unit_variance_on_kept_entries():
    white = rl.masked_whiten(X, MASK)
    std = math.sqrt(6.7)
    expected = torch.tensor([[(1 - 4.2) / std, (2 - 4.2) / std, 0, 0], [(5 - 4.2) / std, (6 - 4.2) / std, (7 - 4.2) / std, 0]])
    assert torch.allclose(white, expected, atol=1e-6)
    kept = rl.masked_whiten(X, MASK, shift_mean=False)
    assert torch.allclose(kept[MASK.bool()], expected[MASK.bool()] + 4.2, atol=1e-6)


REWARDS = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 9.0]])  # 9.0 is padding: must be ignored
GAE_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


def test_gae_gamma_one_lambda_half():
    advantages, returns = rl.compute_gae(REWARDS, VALUES, GAE_MASK, gamma=1.0, lam=0.5)
    # row 0: delta = [0, 0, 0, 0.5] -> A = [0.0625, 0.125, 0.25, 0.5]
    # row 1: delta = [0, 0, 1, -] (V after the end is 0) -> A = [0.25, 0.5, 1, 0]
    assert advantages.tolist() == [[0.0625, 0.125, 0.25, 0.5], [0.25, 0.5, 1.0, 0.0]]
    assert returns.tolist() == [[0.5625, 0.625, 0.75, 1.0], [1.25, 1.5, 2.0, 0.0]]


def test_gae_lambda_one_gives_discounted_return_minus_value():
    advantages, returns = rl.compute_gae(REWARDS, VALUES, GAE_MASK, gamma=0.5, lam=1.0)
    # row 0: discounted returns [0.125, 0.25, 0.5, 1] minus V = 0.5
    assert torch.allclose(returns[0], torch.tensor([0.125, 0.25, 0.5, 1.0]))
    assert torch.allclose(advantages[0], torch.tensor([-0.375, -0.25, 0.0, 0.5]))
    # row 1: returns [0.5, 1, 2] and 0 on the padding
    assert torch.allclose(returns[1], torch.tensor([0.5, 1.0, 2.0, 0.0]))


def test_kl_penalty_k1_and_k3():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    reference = torch.tensor([[math.log(0.25), math.log(0.25)]])
    assert torch.allclose(rl.kl_penalty(logprobs, reference, "k1"), torch.tensor([[math.log(2), 0.0]]))
    # k3 with log p/q = log 2: (q/p - 1) - log(q/p) = -0.5 + log 2
    assert torch.allclose(rl.kl_penalty(logprobs, reference, "k3"), torch.tensor([[math.log(2) - 0.5, 0.0]]))
    with pytest.raises(ValueError):
        rl.kl_penalty(logprobs, reference, "k9")


def test_entropy_and_logprobs_from_logits():
    logits = torch.log(torch.tensor([[[1.0, 1.0, 2.0]]]))  # p = .25 .25 .5
    assert rl.entropy_from_logits(logits).item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(2))
    assert rl.logprobs_from_logits(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(0.5))


def test_ppo_policy_loss_clips_by_hand():
    old = torch.zeros(2, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.1], [1.5, 0.5, 3.0, 3.0]]))
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0], [-1.0, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, clip_fraction = rl.ppo_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -2, -1.1 | 1.5, -0.5
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0 - 1.1 + 1.5 - 0.5) / 6)
    assert clip_fraction.item() == pytest.approx(2 / 6)


def test_ppo_policy_loss_gradient_is_zero_when_clipped():
    logprobs = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = rl.ppo_policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    loss.backward()
    assert logprobs.grad.item() == 0.0


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[0.5, -0.1, 0.3, 0.0], [7.0, 7.0, 7.0, 7.0]])
    old = torch.zeros(2, 4)
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    loss, clip_fraction = rl.ppo_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # per token: max(0.25, 0.64) = 0.64 (clipped), 1.21, max(0.09, 0.04) = 0.09, 0
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 0.09 + 0.0) / 4)
    assert clip_fraction.item() == pytest.approx(1 / 4)


def test_adaptive_kl_controller_moves_toward_target_with_clipped_error():
    controller = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(9.0, n_steps=100)  # error 0.5 clipped to 0.2 -> x (1 + 0.2 * 100 / 10000)
    assert controller.value == pytest.approx(0.2 * 1.002)
    controller = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(6.6, n_steps=100)  # error 0.1
    assert controller.value == pytest.approx(0.2 * 1.001)
    controller.update(0.0, n_steps=100)  # error -1 clipped to -0.2
    assert controller.value == pytest.approx(0.2 * 1.001 * 0.998)
    state = controller.state_dict()
    fresh = rl.AdaptiveKLController(1.0, target=6.0, horizon=10000)
    fresh.load_state_dict(state)
    assert fresh.value == controller.value


def test_fixed_kl_controller_never_moves():
    controller = rl.FixedKLController(0.05)
    controller.update(100.0, n_steps=1000)
    assert controller.value == 0.05


def _close(actual: torch.Tensor, expected: list) -> bool:
    """``actual`` equals the hand-worked nested list ``expected`` to fp32 precision."""
    return torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6)


# --------------------------------------------------------------------------------------------
# GRPO: group-relative advantages (DeepSeekMath section 4.1.2, outcome supervision; Dr. GRPO)
# --------------------------------------------------------------------------------------------
# 2 prompts x group 3, each group contiguous: [0, 1, 2] and the constant group [3, 3, 3].
GROUP_REWARDS = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0])


def test_group_advantages_normalise_each_group_by_its_own_mean_and_std():
    advantages = rl.group_advantages(GROUP_REWARDS, group_size=3)
    # DeepSeekMath: A_i = (r_i - mean(r)) / std(r) within the group. The paper does not say which std;
    # the docstring picks the unbiased one (as torch.std and TRL): group 1 mean 1, deviations -1 0 1,
    # variance (1 + 0 + 1) / (3 - 1) = 1, std 1 -> A = [-1, 0, 1] / (1 + eps).
    # Group 2 is constant: deviations 0 -> A = 0 / (0 + eps) = 0, not NaN.
    eps = 1e-4
    assert advantages.tolist() == pytest.approx([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0])


def test_group_advantages_use_the_unbiased_std_of_an_uneven_group():
    # group [1, 0, 0]: mean 1/3, deviations 2/3 -1/3 -1/3, variance (4/9 + 1/9 + 1/9) / 2 = 1/3
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, eps=0.0)
    std = math.sqrt(1 / 3)
    assert advantages.tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std])


def test_group_advantages_without_scale_are_dr_grpo_centred_rewards():
    # Dr. GRPO drops the division by std: A_i = r_i - mean(group).
    # 2 prompts x group 3: [1, 0, 0] (mean 1/3) and [3, 3, 3];  3 prompts x group 2: [5, 1] [2, 2] [0, 4]
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0]), group_size=3, scale=False)
    assert advantages.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    pairs = rl.group_advantages(torch.tensor([5.0, 1.0, 2.0, 2.0, 0.0, 4.0]), group_size=2, scale=False)
    assert pairs.tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0, -2.0, 2.0])


def test_group_advantages_refuse_rewards_that_do_not_fill_whole_groups():
    with pytest.raises(ValueError, match="group size 4"):
        rl.group_advantages(GROUP_REWARDS, group_size=4)  # 6 rewards are not whole groups of 4
    with pytest.raises(ValueError):
        rl.group_advantages(GROUP_REWARDS.view(2, 3), group_size=3)  # must be flat


@pytest.mark.filterwarnings("ignore:std")
def test_group_advantages_refuse_a_group_of_one():
    # One completion per prompt has no group to be relative to: A = (r - r) / std(one value) = 0 / NaN.
    with pytest.raises(ValueError):
        rl.group_advantages(torch.tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError):
        rl.group_advantages(torch.tensor([1.0, 2.0]), group_size=0)


# --------------------------------------------------------------------------------------------
# GRPO: per-token loss (DeepSeekMath eq. 3) and its reductions
# --------------------------------------------------------------------------------------------
# 2 completions x 4 tokens; old log-probs 0, so ratio = pi / pi_old is the number inside the log.
GRPO_RATIOS = torch.tensor([[1.5, 0.5, 1.1, 1.0], [1.5, 0.5, 0.9, 1.0]])
GRPO_ADVANTAGES = torch.tensor([1.0, -2.0])  # one per completion, shared by its tokens


def test_grpo_token_loss_clips_on_both_sides_for_positive_and_negative_advantages():
    logprobs = torch.log(GRPO_RATIOS)
    loss, kl, clipped = rl.grpo_token_loss(logprobs, torch.zeros(2, 4), GRPO_ADVANTAGES, None, beta=0.0,
                                           cliprange=0.2)
    # loss = -min(r A, clip(r, 0.8, 1.2) A)
    # A = +1:  r 1.5 -> min(1.5, 1.2) = 1.2 (clip binds above);  r 0.5 -> min(0.5, 0.8) = 0.5 (no bind below);
    #          r 1.1 -> 1.1;  r 1.0 -> 1.0
    # A = -2:  r 1.5 -> min(-3.0, -2.4) = -3.0 (no bind above);  r 0.5 -> min(-1.0, -1.6) = -1.6 (binds below);
    #          r 0.9 -> -1.8;  r 1.0 -> -2.0
    assert _close(loss, [[-1.2, -0.5, -1.1, -1.0], [3.0, 1.6, 1.8, 2.0]])
    assert clipped.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert kl.tolist() == [[0.0] * 4, [0.0] * 4]  # no reference: beta 0 needs none


def test_grpo_token_loss_gradient_is_zero_where_the_clip_binds():
    logprobs = torch.log(GRPO_RATIOS).requires_grad_()
    loss, _, _ = rl.grpo_token_loss(logprobs, torch.zeros(2, 4), GRPO_ADVANTAGES, None, beta=0.0)
    loss.sum().backward()
    # d(-r A)/d log pi = -r A where unclipped; 0 where the clipped (constant) branch is the min
    assert _close(logprobs.grad, [[0.0, -0.5, -1.1, -1.0], [3.0, 0.0, 1.8, 2.0]])


def test_grpo_clip_higher_widens_only_the_upper_bound():
    # DAPO: clip(r, 1 - 0.2, 1 + 0.28). A = +1, r 1.25: min(1.25, 1.25) -> not clipped (it was at 1.2);
    # r 0.7: min(0.7, 0.8) = 0.7 as before. A = -2, r 0.7: min(-1.4, -1.6) = -1.6 (low bound unchanged).
    ratios = torch.tensor([[1.25, 0.7], [1.25, 0.7]])
    loss, _, clipped = rl.grpo_token_loss(torch.log(ratios), torch.zeros(2, 2), GRPO_ADVANTAGES, None, beta=0.0,
                                          cliprange=0.2, cliprange_high=0.28)
    assert _close(loss, [[-1.25, -0.7], [2.5, 1.6]])
    assert clipped.tolist() == [[False, False], [False, True]]
    symmetric, _, _ = rl.grpo_token_loss(torch.log(ratios), torch.zeros(2, 2), GRPO_ADVANTAGES, None, beta=0.0)
    assert symmetric[0, 0].item() == pytest.approx(-1.2)


def test_grpo_kl_term_is_schulman_k3_times_beta():
    # ratio 1 everywhere (logprobs = old), so the policy term is -A; d = ref - logp per token:
    # k3 = exp(d) - d - 1:  d = log 2 -> 1 - log 2;  d = -log 2 -> log 2 - 1/2;  d = 0 -> 0;  d = log 4 -> 3 - log 4
    logprobs = torch.tensor([[-1.0, -1.0, -2.0, -2.0], [-0.5, -0.5, -0.5, -0.5]])
    d = torch.tensor([[math.log(2), -math.log(2), 0.0, math.log(4)], [0.0, 0.0, -1.0, 1.0]])
    loss, kl, _ = rl.grpo_token_loss(logprobs, logprobs, GRPO_ADVANTAGES, logprobs + d, beta=0.1)
    # row 1: d = -1 -> exp(-1) + 1 - 1 = exp(-1);  d = 1 -> e - 2
    expected_kl = [[1 - math.log(2), math.log(2) - 0.5, 0.0, 3 - math.log(4)], [0.0, 0.0, math.exp(-1), math.e - 2]]
    assert _close(kl, expected_kl)
    expected_loss = [[-1.0 + 0.1 * k for k in expected_kl[0]], [2.0 + 0.1 * k for k in expected_kl[1]]]
    assert _close(loss, expected_loss)


def test_k3_is_never_negative():
    # exp(d) >= 1 + d for every real d, so exp(d) - d - 1 >= 0, with equality only at d = 0
    logprobs = torch.zeros(1, 9)
    d = torch.tensor([[-5.0, -2.0, -1.0, -0.1, 0.0, 0.1, 1.0, 2.0, 5.0]])
    _, kl, _ = rl.grpo_token_loss(logprobs, logprobs, torch.zeros(1), logprobs + d, beta=0.04)
    assert (kl >= 0).all() and kl[0, 4].item() == 0.0
    assert kl[0, 0].item() == pytest.approx(math.exp(-5) + 5 - 1)


def test_grpo_with_beta_needs_the_reference_and_beta_zero_does_not():
    logprobs = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="reference"):
        rl.grpo_token_loss(logprobs, logprobs, GRPO_ADVANTAGES, None, beta=0.04)
    # beta 0 with a reference: the k3 is still returned (for logging) but does not enter the loss
    reference = torch.full((2, 4), math.log(2))  # d = log 2 -> k3 = 1 - log 2
    loss, kl, _ = rl.grpo_token_loss(logprobs, logprobs, GRPO_ADVANTAGES, reference, beta=0.0)
    assert _close(loss, [[-1.0] * 4, [2.0] * 4])
    assert _close(kl, [[1 - math.log(2)] * 4] * 2)


# Per-token loss with completions of unequal length: 2 and 3 tokens of 4.
TOKEN_LOSS = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 7.0, 80.0]])  # 30, 40, 80 are padding
TOKEN_MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])


def test_reduce_sequence_mean_weighs_each_completion_equally():
    # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t: (1 + 2) / 2 = 1.5 and (5 + 6 + 7) / 3 = 6 -> 3.75
    assert rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "sequence").item() == pytest.approx(3.75)


def test_reduce_token_mean_weighs_each_token_equally():
    # DAPO: sum over all tokens / their number: (1 + 2 + 5 + 6 + 7) / 5 = 4.2
    assert rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "token").item() == pytest.approx(4.2)


def test_reduce_constant_divides_by_completions_times_max_length():
    # Dr. GRPO: sum over tokens / (G * max_length), whatever lengths were generated: 21 / (2 * 4), 21 / (2 * 10)
    assert rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "constant", max_length=4).item() == pytest.approx(21 / 8)
    assert rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "constant", max_length=10).item() == pytest.approx(21 / 20)
    with pytest.raises(ValueError, match="max_length"):
        rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "constant")
    with pytest.raises(ValueError, match="unknown loss normalization 'mean'"):
        rl.reduce_token_loss(TOKEN_LOSS, TOKEN_MASK, "mean")


def test_reductions_differ_in_the_gradient_a_token_of_a_short_completion_gets():
    token_loss = torch.zeros(2, 4, requires_grad=True)
    grads = {}
    for normalization in ("sequence", "token", "constant"):
        token_loss.grad = None
        rl.reduce_token_loss(token_loss, TOKEN_MASK, normalization, max_length=4).backward()
        grads[normalization] = token_loss.grad.clone()
    # sequence: 1/(G |o_i|) = 1/4 (2 tokens) and 1/6 (3 tokens); token: 1/5 each; constant: 1/8 each
    assert _close(grads["sequence"], [[1 / 4, 1 / 4, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]])
    assert _close(grads["token"], [[1 / 5, 1 / 5, 0, 0], [1 / 5, 1 / 5, 1 / 5, 0]])
    assert _close(grads["constant"], [[1 / 8, 1 / 8, 0, 0], [1 / 8, 1 / 8, 1 / 8, 0]])


# --------------------------------------------------------------------------------------------
# Preference losses, per pair
# --------------------------------------------------------------------------------------------
# Summed log-probs of 2 pairs; the reference gives both responses of a pair the same log-prob.
CHOSEN, REJECTED = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
REFERENCE_CHOSEN, REFERENCE_REJECTED = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
# log-ratios log pi - log ref: chosen [0.5, -1], rejected [-0.5, 1]


def test_dpo_loss_and_implicit_rewards_by_hand():
    loss, chosen_rewards, rejected_rewards = rl.dpo_sigmoid_loss(CHOSEN, REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                                                                 beta=0.5)
    # DPO eq. 7: -log sigmoid(beta (ratio_w - ratio_l)); -log sigmoid(h) = log(1 + exp(-h))
    # pair 1: h = 0.5 * (0.5 + 0.5) = 0.5;  pair 2: h = 0.5 * (-1 - 1) = -1 (the policy prefers the rejected one)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))])
    assert chosen_rewards.tolist() == pytest.approx([0.25, -0.5])  # beta * ratio
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])


def test_dpo_label_smoothing_mixes_in_the_loss_of_the_flipped_pair():
    loss, _, _ = rl.dpo_sigmoid_loss(CHOSEN, REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.5,
                                     label_smoothing=0.1)
    # cDPO: 0.9 * log(1 + exp(-h)) + 0.1 * log(1 + exp(h)), h = 0.5 and -1
    expected = [0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)),
                0.9 * math.log(1 + math.exp(1.0)) + 0.1 * math.log(1 + math.exp(-1.0))]
    assert loss.tolist() == pytest.approx(expected)
    # at h = 0 both halves are log 2, whatever the smoothing
    tied, _, _ = rl.dpo_sigmoid_loss(CHOSEN, CHOSEN, REFERENCE_CHOSEN, REFERENCE_CHOSEN, beta=0.5, label_smoothing=0.3)
    assert tied.tolist() == pytest.approx([math.log(2)] * 2)


def test_dpo_rewards_carry_no_gradient():
    chosen = CHOSEN.clone().requires_grad_()
    loss, chosen_rewards, rejected_rewards = rl.dpo_sigmoid_loss(chosen, REJECTED, REFERENCE_CHOSEN,
                                                                 REFERENCE_REJECTED, beta=0.5)
    assert loss.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_ipo_loss_pulls_the_margin_to_one_over_two_tau():
    loss, chosen_rewards, rejected_rewards = rl.ipo_loss(CHOSEN, REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                                                         beta=0.5)
    # IPO eq. 17: (h - 1 / (2 tau))^2, tau = 0.5 -> target margin 1
    # pair 1: h = 0.5 - (-0.5) = 1 -> 0;  pair 2: h = -1 - 1 = -2 -> (-3)^2 = 9
    assert loss.tolist() == pytest.approx([0.0, 9.0])
    assert chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])
    # a margin past the target is penalised too (DPO's loss would keep falling): h = 3 -> (3 - 1)^2 = 4
    past, _, _ = rl.ipo_loss(torch.tensor([1.0]), torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1), beta=0.5)
    assert past.item() == pytest.approx(4.0)


def test_simpo_loss_by_hand():
    # length-normalised log-probs: chosen [-0.5, -1.0], rejected [-1.5, -0.5]; beta 2, gamma 1
    loss, chosen_rewards, rejected_rewards = rl.simpo_loss(torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -0.5]),
                                                           beta=2.0, gamma=1.0)
    # SimPO eq. 6: -log sigmoid(beta avg_w - beta avg_l - gamma)
    # pair 1: -1 + 3 - 1 = 1 -> log(1 + e^-1);  pair 2: -2 + 1 - 1 = -2 -> log(1 + e^2)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0))])
    assert chosen_rewards.tolist() == pytest.approx([-1.0, -2.0])
    assert rejected_rewards.tolist() == pytest.approx([-3.0, -1.0])


def test_orpo_loss_is_nll_plus_lambda_times_log_odds_ratio_loss():
    # ORPO eq. 6-7 with P(y) = exp(avg log pi(y)): odds = P / (1 - P)
    # pair 1: P_w 0.5 (odds 1), P_l 0.2 (odds 1/4): log odds ratio log 4, sigmoid(log 4) = 4/5
    #         -> NLL -log 0.5 = log 2, L_OR = -log(4/5) = log 1.25
    # pair 2: P_w 0.5 (odds 1), P_l 0.8 (odds 4): sigmoid(-log 4) = 1/5 -> L_OR = log 5
    chosen, rejected = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.2, 0.8]))
    loss, chosen_rewards, rejected_rewards = rl.orpo_loss(chosen, rejected, beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2) + 0.1 * math.log(1.25), math.log(2) + 0.1 * math.log(5)])
    assert chosen_rewards.tolist() == pytest.approx([0.1 * math.log(0.5)] * 2)
    assert rejected_rewards.tolist() == pytest.approx([0.1 * math.log(0.2), 0.1 * math.log(0.8)])


def test_orpo_with_lambda_zero_is_the_sft_loss_on_the_chosen_response():
    chosen = torch.log(torch.tensor([0.5, 0.9]))
    loss, _, _ = rl.orpo_loss(chosen, torch.log(torch.tensor([0.2, 0.1])), beta=0.0)
    assert loss.tolist() == pytest.approx([-math.log(0.5), -math.log(0.9)])  # per-token NLL of y_w
    # a chosen response of likelihood 1 (avg log-prob 0) has infinite odds; the loss stays finite
    certain, _, _ = rl.orpo_loss(torch.zeros(1), torch.log(torch.tensor([0.5])), beta=0.1)
    assert math.isfinite(certain.item()) and certain.item() == pytest.approx(0.0, abs=1e-4)


# --------------------------------------------------------------------------------------------
# Explained variance of the PPO value function
# --------------------------------------------------------------------------------------------

def test_explained_variance_by_hand():
    # returns X, kept entries 1 2 5 6 7: mean 4.2, Var 26.8 / 5 = 5.36 (population, both variances alike)
    # residuals returns - values on kept entries: 1 -1 1 -1 0 -> mean 0, Var 4 / 5 = 0.8
    residual = torch.tensor([[1.0, -1.0, 99.0, 99.0], [1.0, -1.0, 0.0, 99.0]])  # 99: padding, ignored
    assert rl.explained_variance(X - residual, X, MASK) == pytest.approx(1 - 0.8 / 5.36)
    assert rl.explained_variance(X, X, MASK) == pytest.approx(1.0)  # perfect values
    assert rl.explained_variance(torch.full_like(X, 4.2), X, MASK) == pytest.approx(0.0, abs=1e-6)  # a constant
    assert rl.explained_variance(X - 2 * residual, X, MASK) == pytest.approx(1 - 3.2 / 5.36)  # residual Var 16/5


def test_explained_variance_of_constant_returns_is_nan():
    assert math.isnan(rl.explained_variance(X, torch.full_like(X, 3.0), MASK))


def test_leave_one_out_subtracts_the_mean_of_the_other_responses_to_the_prompt():
    # prompt 1: 1, 2, 6 -> 1 - 4, 2 - 3.5, 6 - 1.5; prompt 2: 0, 0, 3 -> -1.5, -1.5, 3
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert rl.leave_one_out(scores, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_leave_one_out_removes_an_offset_shared_by_a_prompt():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    shifted = scores + torch.tensor([100.0, 100.0, -7.0, -7.0])  # each prompt's own offset
    assert torch.allclose(rl.leave_one_out(shifted, 2), rl.leave_one_out(scores, 2))


def test_leave_one_out_refuses_groups_of_one_and_ragged_batches():
    with pytest.raises(ValueError, match="at least 2"):
        rl.leave_one_out(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        rl.leave_one_out(torch.ones(5), 2)


def test_step_size_alarm_waits_for_a_window_and_reads_its_mean():
    from lowrank.rollout import step_size_alarm

    assert step_size_alarm([0.5, 0.5, 0.5]) is None  # too few steps after the first to say
    assert step_size_alarm([0.5, 0.01, 0.01, 0.01]) is None  # the first step (Adam's first update) is left out
    assert "0.023 nats a token" in step_size_alarm([0.0, 0.01, 0.01, 0.05])  # above the default limit, 0.02
    assert step_size_alarm([0.0, 0.01, 0.01, 0.05], limit=0.025) is None
    message = step_size_alarm([0.0, 0.5, 0.01, 0.03, 0.05], limit=0.025)  # the last 3: mean 0.03
    assert "0.030 nats a token" in message and "lower --learning-rate" in message


def test_length_alarm_on_collapse():
    from lowrank.rollout import length_alarm

    assert length_alarm([9.0, 9.0, 9.0, 2.0, 2.0], 24) is None  # fewer than two windows of steps
    assert "collapsed: 9.0 -> 2.0" in length_alarm([9.0, 9.0, 9.0, 2.0, 2.0, 2.0], 24)
    assert "collapsed" in length_alarm([1.2] * 6, 24)  # under 1.5 tokens, whatever the start


def test_length_alarm_on_explosion():
    from lowrank.rollout import length_alarm

    assert length_alarm([4.0] * 3 + [12.0] * 3, 64) is None  # 3x the start is the edge
    assert "exploded: 4.0 -> 12.5" in length_alarm([4.0] * 3 + [12.5] * 3, 64)
    assert "exploded" in length_alarm([20.0] * 3 + [22.0] * 3, 24)  # most responses at the limit


def test_length_alarm_is_quiet_on_a_length_that_drifts():
    from lowrank.rollout import length_alarm

    assert length_alarm([7.0, 7.2, 7.4, 8.0, 6.5, 9.0], 24) is None


def test_each_alarm_is_logged_when_it_starts_and_again_only_after_a_quiet_step():
    import logging

    from lowrank.rollout import warn_new_alarms

    log = logging.getLogger("test_alarms")
    seen = []
    log.warning = lambda fmt, *args: seen.append(fmt % args)
    active = warn_new_alarms(log, 1, {"length": None, "step size": "too far 0.05"}, set())
    active = warn_new_alarms(log, 2, {"length": "collapsed", "step size": "too far 0.06"}, active)
    active = warn_new_alarms(log, 3, {"length": None, "step size": None}, active)
    active = warn_new_alarms(log, 4, {"length": None, "step size": "too far 0.07"}, active)
    assert seen == ["step 1: too far 0.05", "step 2: collapsed", "step 4: too far 0.07"]
    assert warn_new_alarms(None, 5, {"length": "collapsed"}, set()) == {"length"}  # counted, not written
