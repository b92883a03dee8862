"""2- and 3-bit bases through HQQ on the tiny Llama: training, a frozen base, the adapter round trip,
exact resume, the quantized-base cache, memory and error per bit width, and named errors for bad
combinations. Real hqq throughout; restoring these adapters is tested in test_restore.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
from peft import PeftModel

from compositor.restore import quantization_error_table, quantized_layers, summarize_errors
from conftest import addition_rows, write_jsonl
from schema.fleet import deep_merge
from schema.job import JobConfig, QuantConfig
from schema.loading import load_job
from schema.yamlfile import dump_yaml
from test_compose import one_thread  # noqa: F401  (autouse: one torch thread)
from test_trainer import train_losses
from trainer.errors import JobError
from trainer.loop import run_job
from trainer.models import HQQ_METADATA, load_base_model, parameter_bytes, quantized_cache_dir

CPU = torch.device("cpu")
# The tiny model's linear layers take 64 or 128 inputs: group size 32 gives each row 2 or 4 groups.
HQQ2 = {"bits": 2, "method": "hqq", "group_size": 32}
HQQ3 = {"bits": 3, "method": "hqq", "group_size": 32}


def tiny_job(model_dir: Path, root: Path, **sections) -> JobConfig:
    """A short job on the tiny model and the toy addition task (conftest's make_job, for module fixtures)."""
    root.mkdir(parents=True, exist_ok=True)
    train, evaluation = write_jsonl(root / "train.jsonl", addition_rows(64, seed=1)), write_jsonl(root / "val.jsonl", addition_rows(16, seed=2))
    raw = {
        "name": "toy",
        "model": str(model_dir),
        "quant": HQQ2,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": 5e-3, "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": 6, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "grad_checkpointing": True, "seed": 7},
        "data": {"train": {"path": str(train), "format": "prompt_completion"}, "eval": {"path": str(evaluation), "format": "prompt_completion"}},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 2},
        "output_dir": str(root / "run"),
    }
    return JobConfig.model_validate(deep_merge(raw, sections))


def hqq_base(model_dir: Path, bits: int, group_size: int = 32):
    return load_base_model(str(model_dir), QuantConfig(bits=bits, method="hqq", group_size=group_size), torch.float32, CPU)


def base_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """Every byte of the frozen base: parameters (HQQ's packed W_q among them), buffers, and each HQQ
    layer's scales and zeros, which hqq keeps outside the parameters."""
    tensors = {name: t for name, t in model.named_parameters() if "lora_" not in name}
    tensors.update(dict(model.named_buffers()))
    for name, layer in quantized_layers(model).items():
        tensors.update({f"{name}.{key}": value for key, value in layer.meta.items() if isinstance(value, torch.Tensor)})
    return {name: t.detach().contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}


@pytest.mark.parametrize("quant", [HQQ2, HQQ3], ids=["2bit", "3bit"])
def test_low_bit_jobs_train_on_an_hqq_base(tiny_model_dir, tmp_path, quant):
    config = tiny_job(tiny_model_dir, tmp_path, quant=quant, train={"max_steps": 4})
    result = run_job(config)
    losses = train_losses(config.output_dir)
    assert result.steps == 4 and sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert result.eval_loss < result.initial_eval_loss  # the adapter learned something through the 2/3-bit base
    metadata = json.loads((config.output_dir / "adapter" / "lorafleet.json").read_text())
    assert metadata["quant"]["bits"] == quant["bits"] and metadata["quant"]["method"] == "hqq"


def test_the_hqq_base_stays_frozen_and_the_adapter_round_trips(tiny_model_dir, tmp_path):
    """Train with the trainer's own adapter (routed forward) on a 2-bit base, compare every base byte,
    then load the saved adapter with plain peft onto a fresh 2-bit base: the same logits."""
    from trainer.adapters import adapter_metadata, attach_adapter, save_adapter
    from trainer.specs import base_identity

    quant = QuantConfig(**HQQ2)
    model = attach_adapter(load_base_model(str(tiny_model_dir), quant, torch.float32, CPU), tiny_job(tiny_model_dir, tmp_path).lora, 10)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "HqqLoraLinear"
    before = base_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = base_bytes(model)
    assert before.keys() == after.keys() and len(before) > 14  # 14 HQQ layers' W_q, scale, zero, and the rest
    assert all(before[name] == after[name] for name in before), [name for name in before if before[name] != after[name]]
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)

    save_adapter(model, "adapter0", tmp_path / "adapter", adapter_metadata(base_identity(str(tiny_model_dir)), quant, "roundtrip", "auto"))
    loaded = PeftModel.from_pretrained(hqq_base(tiny_model_dir, 2), tmp_path / "adapter").eval()
    probe = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained_logits, loaded_logits = model.eval()(input_ids=probe).logits, loaded(input_ids=probe).logits
        with loaded.disable_adapter():
            base_logits = loaded(input_ids=probe).logits
    assert (trained_logits - loaded_logits).abs().max().item() < 1e-5
    assert (loaded_logits - base_logits).abs().max().item() > 1e-3  # the adapter moved and is applied


def test_resume_on_a_2bit_base_repeats_the_uninterrupted_losses(tiny_model_dir, tmp_path):
    full = tiny_job(tiny_model_dir, tmp_path / "full", lora={"dropout": 0.1})
    run_job(full)
    broken = tiny_job(tiny_model_dir, tmp_path / "broken", lora={"dropout": 0.1}, checkpoint={"every": 3})

    def crash_after_step_4(metrics: dict) -> None:
        if metrics["step"] == 4 and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run_job(broken, report=crash_after_step_4)
    resumed = run_job(broken)
    assert resumed.resumed_from_step == 3
    expected, got = train_losses(full.output_dir), train_losses(broken.output_dir)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_the_quantized_base_is_cached_once_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    quantized = []
    real_quantize = Quantizer.quantize.__func__

    def counting_quantize(cls, tensor, *args, **kwargs):  # counts, then runs hqq's own quantizer
        quantized.append(tuple(tensor.shape))
        return real_quantize(cls, tensor, *args, **kwargs)

    monkeypatch.setattr(Quantizer, "quantize", classmethod(counting_quantize))
    first = hqq_base(tiny_model_dir, 3)
    assert len(quantized) == 14  # q, k, v, o, gate, up, down in each of two layers; the head stays fp32
    cache = quantized_cache_dir(tiny_model_dir, QuantConfig(**HQQ3))
    stamp = (cache.stat().st_ino, cache.stat().st_mtime_ns, (cache / HQQ_METADATA).stat().st_mtime_ns)
    metadata = json.loads((cache / HQQ_METADATA).read_text())
    assert {"hqq", "torch"} <= set(metadata["versions"]) and metadata["quant"] == {"method": "hqq", "bits": 3, "group_size": 32}

    second = hqq_base(tiny_model_dir, 3)
    assert len(quantized) == 14  # read from the cache: nothing quantized again
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns, (cache / HQQ_METADATA).stat().st_mtime_ns) == stamp
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no second entry, no staging left over
    for name, layer in quantized_layers(first).items():
        twin = quantized_layers(second)[name]
        assert torch.equal(layer.W_q, twin.W_q) and torch.equal(layer.meta["scale"], twin.meta["scale"]), name
    # Another group size is another base.
    hqq_base(tiny_model_dir, 3, group_size=64)
    assert len(quantized) == 28 and len(list(cache.parent.iterdir())) == 2


def test_each_hqq_width_has_its_error_and_memory(tiny_model_dir):
    """HQQ at 2, 3, 4 and 8 bits (group size 64): relative weight error falls and memory grows with the
    width; one row checked against hqq called directly; every width runs a forward pass."""
    full = load_base_model(str(tiny_model_dir), QuantConfig(bits=16), torch.float32, CPU)
    models = {bits: hqq_base(tiny_model_dir, bits, group_size=64) for bits in (2, 3, 4, 8)}
    rows = quantization_error_table(full, models)
    summary = summarize_errors(rows)
    means = [summary[f"rel_err_{bits}bit_mean"] for bits in (2, 3, 4, 8)]
    assert means == sorted(means, reverse=True) and 0.25 < means[0] < 0.6 and means[3] < 0.01, means

    W = full.model.layers[1].mlp.down_proj.weight.detach().clone()
    direct = HQQLinear.from_weights(W.clone(), None, BaseQuantizeConfig(nbits=3, group_size=64), compute_dtype=torch.float32, device="cpu")
    row = next(r for r in rows if r["module"] == "model.layers.1.mlp.down_proj")
    assert row["rel_err_3bit"] == pytest.approx(float((W - direct.dequantize()).norm() / W.norm()), rel=1e-6)

    # Bits per quantized weight: the packed codes plus an fp32 scale and zero per group of 64 (+1 bit);
    # 3-bit codes pack ten to an int32, padded, hence up to half a bit more.
    linear_params = sum(r["params"] for r in rows)
    unquantized = parameter_bytes(full) - 4 * linear_params  # embeddings, norms and the fp32 head
    for bits, model in models.items():
        per_weight = 8 * (parameter_bytes(model) - unquantized) / linear_params
        assert bits + 1 <= per_weight <= bits + 1.5, (bits, per_weight)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.arange(16)[None]).logits).all()


def test_bad_combinations_are_named_before_anything_loads(tiny_model_dir, tmp_path):
    job_file = tmp_path / "job.yaml"
    raw = json.loads(tiny_job(tiny_model_dir, tmp_path).model_dump_json())
    raw["quant"] = {"bits": 3, "method": "bnb"}
    job_file.write_text(dump_yaml(raw))
    loaded = load_job(job_file)
    assert loaded.entry.config is None and len(loaded.problems) == 1
    assert "bits 3 needs method: hqq" in str(loaded.problems[0]) and "quant" in str(loaded.problems[0])

    # 128 divides down_proj's 128 inputs but not q_proj's 64: the first layer it fails is named, with the fix.
    config = tiny_job(tiny_model_dir, tmp_path, quant={"bits": 2, "method": "hqq", "group_size": 128})
    with pytest.raises(JobError, match=r"input size 64 of layer model\.layers\.0\.self_attn\.q_proj.*8, 16, 32 or 64"):
        run_job(config)
    assert not quantized_cache_dir(tiny_model_dir, config.quant).exists() and not (config.output_dir / "adapter").exists()
