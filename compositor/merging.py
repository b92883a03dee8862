"""The merge rules, on plain tensors: magnitude trim, DARE drop-and-rescale, TIES sign election and
disjoint mean, and SVD re-compression with its retained energy.

Each function takes the task updates of one module stacked on dim 0 (one row per adapter) and
returns one merged update. They know nothing about files or models, so the tests can check them on
hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def magnitude_mask(update: torch.Tensor, density: float) -> torch.Tensor:
    """True on the round(density·n) entries of largest magnitude (TIES's "trim" step)."""
    _check_density(density)
    keep = int(round(density * update.numel()))
    mask = torch.zeros(update.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(update.abs().flatten(), keep, sorted=False).indices] = True
    return mask.view_as(update)


def dare(update: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each entry with probability 1-density, scale survivors by 1/density,
    which keeps the expected update unchanged."""
    _check_density(density)
    keep = torch.rand(update.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, update / density, torch.zeros((), dtype=update.dtype))


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election: per entry, the sign of the summed (weighted) updates, +1 on exact ties."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: per entry, the mean over the adapters whose nonzero value has the elected
    sign; entries where none agrees stay zero."""
    agrees = torch.sign(weighted) == sign.unsqueeze(0)
    count = agrees.sum(dim=0).clamp(min=1)
    return (weighted * agrees).sum(dim=0) / count


def ties(updates: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each update to its top-density magnitudes, weight it,
    elect a sign per entry, average the agreeing entries. With unit weights this is the paper's τ_m.
    The sign is elected on the weighted updates so that a negative weight (task negation) counts as such."""
    trimmed = torch.stack([u * magnitude_mask(u, density) for u in updates])
    weighted = trimmed * _per_row(weights, updates)
    return disjoint_mean(weighted, elect_sign(weighted))


def dare_linear(updates: torch.Tensor, weights: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Σ wᵢ·DARE(ΔWᵢ)."""
    dropped = torch.stack([dare(u, density, g) for u, g in zip(updates, generators)])
    return (dropped * _per_row(weights, updates)).sum(dim=0)


def dare_ties(updates: torch.Tensor, weights: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE instead of TIES's magnitude trim, then TIES's sign election and disjoint mean."""
    dropped = torch.stack([dare(u, density, g) for u, g in zip(updates, generators)])
    weighted = dropped * _per_row(weights, updates)
    return disjoint_mean(weighted, elect_sign(weighted))


def magnitude_prune(updates: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ wᵢ·trim(ΔWᵢ): each update keeps its top-density magnitudes, then a plain weighted sum."""
    trimmed = torch.stack([u * magnitude_mask(u, density) for u in updates])
    return (trimmed * _per_row(weights, updates)).sum(dim=0)


@dataclass(frozen=True)
class Factored:
    """ΔW ≈ B @ A at `rank`, and the share of ‖ΔW‖²_F (the energy) that the kept singular values carry."""

    A: torch.Tensor
    B: torch.Tensor
    kept_energy: float
    total_energy: float

    @property
    def retained_energy(self) -> float:
        return 1.0 if self.total_energy == 0 else self.kept_energy / self.total_energy


def factor_dense(delta: torch.Tensor, rank: int) -> Factored:
    """Truncated SVD of a dense update, split as B = U√σ, A = √σVᵀ (balanced factors)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _split(U, S, Vh, rank)


def factor_low_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> Factored:
    """Truncated SVD of B @ A without forming it: QR both factors, SVD the small core.
    Costs O((out+in)·R²) instead of O(out·in·min(out, in))."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return _split(Qb @ U, S, Vh @ Qa.T, rank)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> Factored:
    if rank < 1:
        raise ValueError(f"svd rank must be at least 1, got {rank}")
    rank = min(rank, S.numel())
    root = S[:rank].sqrt()
    energy = S.square()
    return Factored(
        A=root.unsqueeze(1) * Vh[:rank],
        B=U[:, :rank] * root.unsqueeze(0),
        kept_energy=float(energy[:rank].sum()),
        total_energy=float(energy.sum()),
    )


def _per_row(weights: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    return weights.to(updates.dtype).view(-1, *([1] * (updates.ndim - 1)))


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
