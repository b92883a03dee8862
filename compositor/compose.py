"""Combine LoRA adapters into one: exact linear sums by rank concatenation, task arithmetic, TIES,
DARE, magnitude pruning and SVD re-compression; and the compose.json record of what was done.

`linear` is the exact ΔW = Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ. Stacking the A's as rows and the scaled B's as columns
gives one adapter of rank Σrᵢ whose B·A is that sum term by term. (peft's `linear` combination
scales A and B by √w each and adds them, which yields cross terms BᵢAⱼ for distinct adapters: it is
not this sum.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compositor import merging
from compositor.adapters import Adapter, AdapterError, LowRank, read_adapter, write_adapter
from compositor.learned import layer_group
from schema.compose import COMPOSE_METHODS

# Every method of schema.compose but `learned`, which fits weights and then composes with `linear`.
METHODS: tuple[str, ...] = tuple(m for m in COMPOSE_METHODS if m != "learned")
# Methods whose result is a sum of the inputs' low-rank terms, so exact at rank Σrᵢ.
LOW_RANK_METHODS = ("linear", "task_arithmetic", "svd")
# Methods that act entry by entry on the dense ΔW; their result is full-rank and is re-factored by SVD.
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude")


@dataclass
class Composition:
    """The composed adapter (one LowRank per module) and what it took to make it."""

    modules: dict[str, LowRank]
    method: str
    weights: list[float]
    lambda_: float
    density: float | None
    seed: int | None
    svd_rank: int | None
    # Retained energy of the SVD step per module, and over all modules (None when no SVD was needed).
    module_energy: dict[str, float] = field(default_factory=dict)
    retained_energy: float | None = None

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: update.delta() for name, update in self.modules.items()}


def default_weights(method: str, count: int) -> list[float]:
    """linear and svd average the adapters (1/n each); the other methods add them (1 each), as in
    task arithmetic, where λ then sets the overall strength."""
    return [1.0 / count] * count if method in ("linear", "svd") else [1.0] * count


def compose(
    adapters: list[Adapter],
    weights: list[float] | None = None,
    method: str = "linear",
    *,
    lambda_: float = 1.0,
    density: float = 0.5,
    seed: int = 0,
    svd_rank: int | None = None,
    layer_weights: dict[str, list[float]] | None = None,
) -> Composition:
    """Combine `adapters` by `method`; `svd_rank` re-compresses the result by truncated SVD.

    Dense methods (ties, dare_*, magnitude) always end in an SVD; without `svd_rank` they keep, per
    module, Σrᵢ of the inputs (the rank an exact linear sum would have), and report retained energy.
    `layer_weights` (linear only) gives each layer group (learned.layer_group) its own weights.
    """
    if method not in METHODS:
        raise AdapterError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if not adapters:
        raise AdapterError("compose needs at least one adapter")
    weights = list(weights) if weights is not None else default_weights(method, len(adapters))
    if len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if method == "linear" and lambda_ != 1.0:
        raise AdapterError("linear is Σ wᵢ·ΔWᵢ exactly; put the strength into the weights, or use task_arithmetic for λ·Σ wᵢ·ΔWᵢ")
    if layer_weights is not None and method != "linear":
        raise AdapterError("per-layer weights apply to the linear method only")
    if method == "svd" and svd_rank is None:
        svd_rank = max(u.rank for a in adapters for u in a.modules.values())
    shapes = _module_shapes(adapters)

    modules: dict[str, LowRank] = {}
    energy: dict[str, tuple[float, float]] = {}
    for name, shape in shapes.items():
        present = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        if method in LOW_RANK_METHODS:
            # A missing module is a zero update: it simply contributes no rank there.
            module_weights = layer_weights[layer_group(name)] if layer_weights is not None else weights
            A = torch.cat([u.A.double() for _, u in present])
            B = torch.cat([u.B.double() * (lambda_ * module_weights[i]) for i, u in present], dim=1)
            if svd_rank is None:
                modules[name] = LowRank(A=A.float(), B=B.float())
                continue
            factored = merging.factor_low_rank(B, A, svd_rank)
        else:
            updates = torch.stack(
                [adapters[i].modules[name].delta() if name in adapters[i].modules else torch.zeros(shape, dtype=torch.float64) for i in range(len(adapters))]
            )
            dense = lambda_ * _merge_dense(method, updates, torch.tensor(weights, dtype=torch.float64), density, seed, name)
            factored = merging.factor_dense(dense, svd_rank or min(sum(u.rank for _, u in present), *shape))
        modules[name] = LowRank(A=factored.A.float(), B=factored.B.float())
        energy[name] = (factored.kept_energy, factored.total_energy)

    total = sum(t for _, t in energy.values())
    return Composition(
        modules=modules,
        method=method,
        weights=[float(w) for w in weights],
        lambda_=float(lambda_),
        density=density if method in DENSE_METHODS else None,
        seed=seed if method in ("dare_linear", "dare_ties") else None,
        svd_rank=svd_rank,
        module_energy={name: (k / t if t else 1.0) for name, (k, t) in energy.items()},
        retained_energy=(sum(k for k, _ in energy.values()) / total if total else 1.0) if energy else None,
    )


def _merge_dense(method: str, updates: torch.Tensor, weights: torch.Tensor, density: float, seed: int, module: str) -> torch.Tensor:
    if method == "ties":
        return merging.ties(updates, weights, density)
    if method == "magnitude":
        return merging.magnitude_prune(updates, weights, density)
    # One generator per (module, adapter), seeded from the config seed and the module's name, so a
    # module's DARE mask does not depend on which other modules are present or their order.
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{module}#{i}".encode())) for i in range(len(updates))]
    if method == "dare_linear":
        return merging.dare_linear(updates, weights, density, generators)
    return merging.dare_ties(updates, weights, density, generators)


def _module_shapes(adapters: list[Adapter]) -> dict[str, tuple[int, int]]:
    """The union of adapted modules with their ΔW shape; adapters must agree on the shape."""
    shapes: dict[str, tuple[int, int]] = {}
    owners: dict[str, Path] = {}
    for adapter in adapters:
        for name, update in adapter.modules.items():
            if name in shapes and shapes[name] != update.shape:
                raise AdapterError(
                    f"module {name!r} is {shapes[name]} in {owners[name]} but {update.shape} in {adapter.path}: "
                    f"the adapters were trained on different base models"
                )
            shapes.setdefault(name, update.shape)
            owners.setdefault(name, adapter.path)
    return dict(sorted(shapes.items()))


def common_base_model(adapters: list[Adapter], override: str | None = None) -> str | None:
    """The base model all adapters name; a disagreement is an error unless `override` settles it."""
    if override is not None:
        return override
    named = {a.base_model for a in adapters if a.base_model}
    if len(named) > 1:
        raise AdapterError(
            f"the adapters name different base models ({', '.join(sorted(named))}); "
            f"pass --base to state which one the composition is for"
        )
    return next(iter(named), None)


def composition_record(adapters: list[Adapter], composition: Composition, base_model: str | None, extra: dict | None = None) -> dict:
    """What compose.json holds: the inputs (with their sha256), the method, its parameters, the
    weights and any retained energy."""
    record = {
        "method": composition.method,
        "weights": composition.weights,
        "lambda": composition.lambda_,
        "density": composition.density,
        "seed": composition.seed,
        "svd_rank": composition.svd_rank,
        "retained_energy": composition.retained_energy,
        "module_retained_energy": composition.module_energy or None,
        "base_model": base_model,
        "inputs": [a.summary() for a in adapters],
        "output_ranks": sorted({u.rank for u in composition.modules.values()}),
    }
    record.update(extra or {})
    return record


def compose_dirs(
    adapter_dirs: list[str | Path],
    out: str | Path,
    weights: list[float] | None = None,
    method: str = "linear",
    *,
    base_model: str | None = None,
    extra_record: dict | None = None,
    **options,
) -> tuple[Composition, dict]:
    """Read the adapter directories, compose them (`options`: compose()'s lambda_, density, seed, svd_rank,
    layer_weights), write a PEFT directory + compose.json to `out`."""
    adapters = [read_adapter(path) for path in adapter_dirs]
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(fan_in_fan_out) > 1:
        raise AdapterError("the adapters disagree on fan_in_fan_out: they were trained on different layer types")
    base = common_base_model(adapters, base_model)
    composition = compose(adapters, weights, method, **options)
    record = composition_record(adapters, composition, base, extra_record)
    task_type = next((a.task_type for a in adapters if a.task_type), "CAUSAL_LM")
    write_adapter(out, composition.modules, base, task_type, record=record, fan_in_fan_out=fan_in_fan_out.pop())
    return composition, record
