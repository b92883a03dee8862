"""The merge rules on hand-made tensors: TIES trim / sign election / disjoint mean, DARE, SVD energy."""

from __future__ import annotations

import pytest
import torch

from compositor import merging


def test_magnitude_mask_keeps_the_largest_entries():
    update = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    mask = merging.magnitude_mask(update, density=0.5)
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert merging.magnitude_mask(update, density=1.0).all()
    with pytest.raises(ValueError, match="density"):
        merging.magnitude_mask(update, density=0.0)


def test_ties_sign_election_and_disjoint_mean_on_hand_made_updates():
    # Three task updates of four entries each.
    updates = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.5],
            [2.0, 1.0, -1.0, -0.5],
            [-4.0, 1.5, -1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    weighted = updates.clone()
    sign = merging.elect_sign(weighted)
    # Column sums: -1.0, 0.5, 1.0, 0.0  ->  signs -1, +1, +1, +1 (an exact tie elects +).
    assert sign.tolist() == [-1.0, 1.0, 1.0, 1.0]
    merged = merging.disjoint_mean(weighted, sign)
    # Column 0: only -4 agrees -> -4. Column 1: 1.0 and 1.5 agree -> 1.25. Column 2: only 3 -> 3.
    # Column 3: only 0.5 agrees (0 has no sign) -> 0.5.
    assert merged.tolist() == [-4.0, 1.25, 3.0, 0.5]


def test_ties_trims_before_electing():
    updates = torch.tensor([[0.1, 4.0], [3.0, -0.2], [-1.0, -0.5]], dtype=torch.float64)
    merged = merging.ties(updates, torch.ones(3, dtype=torch.float64), density=0.5)
    # Trim keeps one entry per row: [0, 4], [3, 0], [-1, 0]. Column 0 sums to 2 (+), and only 3
    # agrees; column 1 is 4 alone. Without the trim column 0 would average 0.1 and 3 to 1.55.
    assert merged.tolist() == [3.0, 4.0]
    untrimmed = merging.ties(updates, torch.ones(3, dtype=torch.float64), density=1.0)
    assert untrimmed.tolist() == [pytest.approx(1.55), pytest.approx(4.0)]


def test_ties_weights_count_in_the_election():
    updates = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    # A negative weight negates a task: here -3·1 outweighs 1·1, so the elected sign is -.
    merged = merging.ties(updates, torch.tensor([1.0, -3.0], dtype=torch.float64), density=1.0)
    assert merged.tolist() == [-3.0]


def test_dare_drops_and_rescales_as_defined():
    update = torch.full((200, 100), 0.3, dtype=torch.float64)
    out = merging.dare(update, density=0.25, generator=torch.Generator().manual_seed(7))
    kept = out != 0
    # Survivors are exactly the input over the density; the rest are zero.
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 0.3 / 0.25, dtype=torch.float64))
    share = kept.double().mean().item()
    assert abs(share - 0.25) < 0.01  # 20,000 Bernoulli(0.25) draws: sd 0.003
    # The rescaling keeps the expected update: the mean over entries stays near 0.3.
    assert abs(out.mean().item() - 0.3) < 0.015
    again = merging.dare(update, density=0.25, generator=torch.Generator().manual_seed(7))
    other = merging.dare(update, density=0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(merging.dare(update, 1.0, torch.Generator().manual_seed(0)), update)


def test_dare_linear_and_dare_ties_combine_dropped_updates():
    updates = torch.tensor([[2.0, -2.0, 1.0], [1.0, 3.0, -1.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    full = [torch.Generator().manual_seed(i) for i in range(2)]
    # At density 1 nothing drops: dare_linear is the weighted sum, dare_ties is TIES without trim.
    assert merging.dare_linear(updates, weights, 1.0, full).tolist() == [3.0, 5.0, -1.5]
    # weighted rows [1, -1, .5] and [2, 6, -2]: signs +, +, -  -> means 1.5, 6, -2
    assert merging.dare_ties(updates, weights, 1.0, full).tolist() == [1.5, 6.0, -2.0]


def test_magnitude_prune_is_a_weighted_sum_of_trimmed_updates():
    updates = torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=torch.float64)
    merged = merging.magnitude_prune(updates, torch.tensor([1.0, 2.0], dtype=torch.float64), density=0.5)
    assert merged.tolist() == [4.0, -3.0]


def test_svd_factoring_is_optimal_and_reports_retained_energy():
    torch.manual_seed(0)
    B, A = torch.randn(40, 6, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    delta = B @ A
    singular = torch.linalg.svdvals(delta)
    for rank in (2, 4, 6):
        low = merging.factor_low_rank(B, A, rank)
        dense = merging.factor_dense(delta, rank)
        expected = float(singular[:rank].square().sum() / singular.square().sum())
        assert low.retained_energy == pytest.approx(expected, rel=1e-9)
        assert dense.retained_energy == pytest.approx(expected, rel=1e-9)
        # Eckart-Young: the residual of the best rank-k approximation is the dropped singular values.
        residual = (delta - low.B @ low.A).norm().item()
        assert residual == pytest.approx(float(singular[rank:].square().sum().sqrt()), abs=1e-8)
        assert torch.allclose(low.B @ low.A, dense.B @ dense.A, atol=1e-8)
    assert merging.factor_low_rank(B, A, 6).retained_energy == pytest.approx(1.0)
