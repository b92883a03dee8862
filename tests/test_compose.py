"""Composing real peft adapters made on the tiny Llama: exactness, loading, forward, records, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from compositor.adapters import AdapterError, read_adapter
from compositor.compose import compose, compose_dirs

# Three adapters that differ in every way that matters: rank, alpha, rsLoRA, targets, alpha_pattern.
ADAPTER_SHAPES = [
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    dict(r=3, lora_alpha=3, target_modules=["v_proj", "up_proj", "down_proj"], alpha_pattern={"down_proj": 12}),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many tiny matmuls; on a shared 2-core machine two torch threads spin-wait on
    each other and run ~10x slower than one. Other test modules import this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_adapter(base_dir: Path, out: Path, seed: int, b_std: float = 0.2, **lora) -> Path:
    """A peft LoRA adapter on the tiny model with random (non-zero) A and B, saved as a PEFT dir."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * b_std)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=10 + i, **shape) for i, shape in enumerate(ADAPTER_SHAPES)]


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module as peft itself computes it (get_delta_weight), keyed like the composer."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return deltas


def test_linear_is_the_exact_weighted_sum_on_every_module(tiny_model_dir, adapter_dirs, tmp_path):
    weights = [0.5, -0.3, 0.8]
    composition, record = compose_dirs(adapter_dirs, tmp_path / "linear", weights, "linear")
    singles = [peft_deltas(tiny_model_dir, d) for d in adapter_dirs]
    composed = peft_deltas(tiny_model_dir, tmp_path / "linear")
    union = set().union(*singles)
    assert set(composed) == union and len(union) == 12  # 2 layers x (q, k, v, o, up, down)
    for name in union:
        # A module an adapter does not adapt is a zero update there.
        expected = sum(w * s.get(name, torch.zeros_like(composed[name])) for w, s in zip(weights, singles))
        assert (composed[name] - expected).abs().max().item() < 1e-6, name
        assert expected.abs().max().item() > 1e-2  # the check is not vacuous
    # Rank concatenation: each module's rank is the sum of the ranks of the adapters that have it.
    ranks = {name: u.rank for name, u in composition.modules.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 4
    assert ranks["model.layers.1.self_attn.v_proj"] == 2 + 3
    assert ranks["model.layers.0.mlp.up_proj"] == 3
    # The written adapter reads back (rank_pattern / alpha_pattern included) as the same updates.
    reread = read_adapter(tmp_path / "linear")
    assert all(torch.allclose(reread.modules[n].delta(), u.delta(), atol=1e-7) for n, u in composition.modules.items())
    assert record["retained_energy"] is None and record["weights"] == weights
    assert [i["sha256"] for i in record["inputs"]] == [read_adapter(d).fingerprint() for d in adapter_dirs]
    assert json.loads((tmp_path / "linear" / "compose.json").read_text()) == record


def test_composed_adapter_forward_matches_the_manual_delta(tiny_model_dir, adapter_dirs, tmp_path):
    weights = [0.7, 0.2, -0.4]
    compose_dirs(adapter_dirs, tmp_path / "linear", weights, "linear")
    adapters = [read_adapter(d) for d in adapter_dirs]
    manual = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in manual.named_modules():
            for w, adapter in zip(weights, adapters):
                if name in adapter.modules:
                    module.weight += (w * adapter.modules[name].delta()).float()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "linear")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = loaded(ids).logits, manual(ids).logits, base(ids).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-3  # the adapters change the output


def test_per_layer_weights_weight_each_layer_on_its_own(adapter_dirs):
    adapters = [read_adapter(d) for d in adapter_dirs]
    per_layer = compose(adapters, None, "linear", layer_weights={"layer.0": [1.0, 0.0, 0.0], "layer.1": [0.0, 0.0, 2.0]})
    for name, update in per_layer.modules.items():
        source, weight = (0, 1.0) if ".layers.0." in name else (2, 2.0)
        expected = weight * adapters[source].modules[name].delta() if name in adapters[source].modules else torch.zeros(update.shape, dtype=torch.float64)
        assert (update.delta() - expected).abs().max().item() < 1e-6, name
    with pytest.raises(AdapterError, match="linear method only"):
        compose(adapters, None, "ties", layer_weights={"layer.0": [1.0, 1.0, 1.0]})


def test_task_arithmetic_scales_the_sum_and_svd_keeps_the_energy_it_reports(adapter_dirs):
    adapters = [read_adapter(d) for d in adapter_dirs]
    linear = compose(adapters, [1.0, 1.0, 1.0], "linear").deltas()
    scaled = compose(adapters, None, "task_arithmetic", lambda_=0.4).deltas()
    for name in linear:
        assert torch.allclose(scaled[name], 0.4 * linear[name], atol=1e-6)
    svd = compose(adapters, [1.0, 1.0, 1.0], "svd", svd_rank=2)
    assert {u.rank for u in svd.modules.values()} == {2}
    kept = total = 0.0
    for name, delta in linear.items():
        singular = torch.linalg.svdvals(delta)
        kept += float(singular[:2].square().sum())
        total += float(singular.square().sum())
        residual = (svd.modules[name].delta() - delta).norm().item()
        assert residual == pytest.approx(float(singular[2:].square().sum().sqrt()), rel=1e-4, abs=1e-6)
    assert svd.retained_energy == pytest.approx(kept / total, rel=1e-6)
    assert 0.3 < svd.retained_energy < 1.0
    assert compose(adapters, [1.0, 1.0, 1.0], "svd", svd_rank=8).retained_energy == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude"])
def test_dense_methods_write_loadable_adapters_with_their_record(tiny_model_dir, adapter_dirs, tmp_path, method):
    out = tmp_path / method
    composition, record = compose_dirs(adapter_dirs, out, [1.0, 0.5, 1.0], method, density=0.4, seed=3)
    assert record["method"] == method and record["density"] == 0.4
    assert 0.0 < record["retained_energy"] <= 1.0
    assert set(record["module_retained_energy"]) == set(composition.modules)
    deltas = peft_deltas(tiny_model_dir, out)
    for name, update in composition.modules.items():
        assert torch.allclose(deltas[name], update.delta(), atol=1e-6)
    if method.startswith("dare"):
        again = compose([read_adapter(d) for d in adapter_dirs], [1.0, 0.5, 1.0], method, density=0.4, seed=3)
        other = compose([read_adapter(d) for d in adapter_dirs], [1.0, 0.5, 1.0], method, density=0.4, seed=4)
        name = "model.layers.0.self_attn.q_proj"
        assert torch.equal(again.modules[name].A, composition.modules[name].A)
        assert not torch.allclose(other.modules[name].delta(), composition.modules[name].delta())


def test_dense_methods_at_full_rank_reproduce_the_rule_exactly(adapter_dirs):
    adapters = [read_adapter(d) for d in adapter_dirs]
    name = "model.layers.1.self_attn.q_proj"  # in adapters 0 and 1 only; adapter 2 counts as zero
    composition = compose(adapters, [1.0, 1.0, 1.0], "magnitude", density=0.3, svd_rank=64)
    from compositor import merging

    updates = torch.stack([a.modules[name].delta() if name in a.modules else torch.zeros(64, 64, dtype=torch.float64) for a in adapters])
    expected = merging.magnitude_prune(updates, torch.ones(3, dtype=torch.float64), 0.3)
    assert composition.module_energy[name] == pytest.approx(1.0)
    assert (composition.modules[name].delta() - expected).abs().max().item() < 1e-5


def test_bad_inputs_are_refused_with_the_reason(tiny_model_dir, adapter_dirs, tmp_path):
    with pytest.raises(AdapterError, match="2 weights for 3 adapters"):
        compose_dirs(adapter_dirs, tmp_path / "x", [1.0, 2.0], "linear")
    with pytest.raises(AdapterError, match="method 'mean' is unknown"):
        compose_dirs(adapter_dirs, tmp_path / "x", None, "mean")
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        read_adapter(tmp_path)
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=1, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter(dora)
    assert not (tmp_path / "x").exists()


def test_peft_linear_combination_is_not_the_exact_sum_but_ours_is(tiny_model_dir, tmp_path):
    """peft's `linear` scales A and B by √w and adds them, which brings in cross terms BᵢAⱼ."""
    dirs = [make_adapter(tiny_model_dir, tmp_path / n, seed=s, r=4, lora_alpha=8, target_modules=["q_proj"]) for n, s in (("p", 1), ("q", 2))]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), dirs[0], adapter_name="p")
    model.load_adapter(dirs[1], adapter_name="q")
    model.add_weighted_adapter(["p", "q"], [0.5, 0.5], "mix", combination_type="linear")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    exact = 0.5 * layer.get_delta_weight("p") + 0.5 * layer.get_delta_weight("q")
    peft_error = (layer.get_delta_weight("mix") - exact).abs().max().item()
    ours = compose([read_adapter(d) for d in dirs], [0.5, 0.5], "linear").modules["model.layers.0.self_attn.q_proj"].delta()
    assert peft_error > 1e-2 * exact.abs().max().item()
    assert (ours - exact.double()).abs().max().item() < 1e-6
