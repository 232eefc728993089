"""The data order the training loops share: seeded, the same whichever step a run resumes from."""

from __future__ import annotations

import random

from lowrank.loop import BatchStream, PairStream, split_held_out, split_pairs


def test_pair_stream_runs_on_across_reshuffles_with_no_short_batch():
    stream = PairStream(10, 4, seed=3)
    batches = stream.take(5, 1, 0)  # 20 rows: two full reshuffles of 10
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    rng = random.Random(3)
    expected = []
    for _ in range(2):
        fresh = list(range(10))
        rng.shuffle(fresh)
        expected += fresh
    assert sum(batches, []) == expected
    assert stream.consumed == 5 and stream.epoch() == 2.0


def test_pair_stream_resumed_at_a_position_gives_the_same_batches():
    straight = PairStream(13, 4, seed=0)
    first = [straight.take(2, 1, 0) for _ in range(6)]
    resumed = PairStream(13, 4, seed=0, consumed=8)  # a checkpoint after 4 steps of 2 micro-batches
    assert [resumed.take(2, 1, 0) for _ in range(2)] == first[4:]


def test_two_processes_share_one_pair_stream():
    one = PairStream(9, 2, seed=1)
    both = [PairStream(9, 2, seed=1), PairStream(9, 2, seed=1)]
    for _ in range(3):
        alone = one.take(2, 1, 0)
        assert [b.take(1, 2, r)[0] for r, b in enumerate(both)] == alone


def test_the_pair_split_holds_out_the_last_of_a_seeded_shuffle():
    rows = list(range(20))
    train, held = split_pairs(rows, 0.25, seed=5)
    order = list(range(20))
    random.Random(5).shuffle(order)
    assert train == order[:15] and held == order[15:]
    assert split_pairs(rows, 0.0, seed=5) == (order, [])


def test_the_sft_split_keeps_the_file_order_and_holds_out_a_seeded_subset():
    rows = list(range(20))
    train, held = split_held_out(rows, 0.25, seed=5)
    assert len(held) == 5 and sorted(train + held) == rows and train == sorted(train)


def test_batch_stream_epochs_are_fresh_permutations_with_a_short_last_batch():
    stream = BatchStream(10, 4, seed=2)
    epoch = stream.take(3, 1, 0)
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))


def test_average_gradients_gives_every_parameter_the_mean_over_processes():
    """PPO's roles are not DDP-wrapped: their gradients are averaged in one flat all-reduce and split
    back. Here the other process's gradients are known, so the mean of each parameter is too."""
    import torch

    from lowrank.train import average_gradients

    shapes = [(3, 2), (4,), (2, 2)]
    mine = [torch.randn(s) for s in shapes]
    theirs = [torch.randn(s) for s in shapes]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(5))]
    for p, g in zip(params, mine):
        p.grad = g.clone()  # the last parameter has no gradient (a role that did not backpropagate)

    class TwoProcesses:
        num_processes = 2

        def reduce(self, flat, reduction):
            assert reduction == "mean"
            return (flat + torch.cat([g.reshape(-1) for g in theirs])) / 2

    average_gradients(TwoProcesses(), params)
    for p, a, b in zip(params, mine, theirs):
        assert torch.allclose(p.grad, (a + b) / 2)
    assert params[-1].grad is None
