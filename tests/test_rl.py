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
