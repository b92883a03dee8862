"""The single-job trainer, end to end on a tiny random Llama with real bitsandbytes and peft."""

from __future__ import annotations

import json
import math
import time

import pytest
from schema.yamlfile import dump_yaml, read_yaml_text
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.errors import JobError
from trainer.loop import run_job
from schema.job import QuantConfig
from trainer.models import ModelSpecError, compute_dtype, load_base_model, resolve_model_dir


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(output_dir) if "train/loss" in row}


def test_learns_the_toy_task_and_writes_every_output(make_job):
    config = make_job(train={"max_steps": 30}, eval={"every": 10}, checkpoint={"every": 10, "keep": 2})
    result = run_job(config)
    out = config.output_dir
    assert result.steps == 30
    assert result.eval_loss < 0.7 * result.initial_eval_loss, (result.initial_eval_loss, result.eval_loss)
    assert result.tokens > 0 and result.wall_time_s > 0 and result.peak_memory_bytes > 0
    for name in ("config.yaml", "metrics.jsonl", "final.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep: 2
    final = json.loads((out / "final.json").read_text())
    assert final["steps"] == 30 and final["eval_loss"] == pytest.approx(result.eval_loss)
    # The model card: front matter the hub and peft read, and the training's facts.
    card = (out / "adapter" / "README.md").read_text()
    front, _ = read_yaml_text(card.split("---")[1], "card")
    assert front["library_name"] == "peft" and front["base_model"] == str(config.model) and "lorafleet" in front["tags"]
    assert "30 optimizer steps" in card and f"{final['tokens']:,} tokens trained" in card and f"{result.eval_loss:.4g} after" in card
    assert json.loads((out / "adapter" / "lorafleet.json").read_text())["quant"]["bits"] == 4

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/tokens_per_s", "perf/step_time_s", "mem/peak_bytes"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 10, 20, 30]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")

    # Re-running a finished job does no training and returns the recorded result.
    rows_before = len(read_metrics(out))
    again = run_job(config)
    assert again.eval_loss == pytest.approx(result.eval_loss) and len(read_metrics(out)) == rows_before


def test_base_weights_stay_frozen_byte_for_byte(make_job, tiny_model_dir):
    """Train with the loop's own parts (adapter, optimizer, engine, loss) and compare every base byte."""
    from trainer.adapters import attach_adapter, parameter_groups
    from schema.job import ForgettingConfig
    from trainer.engines import LocalEngine
    from trainer.losses import compute_loss
    from trainer.optim import build_optimizer, build_scheduler

    config = make_job(optim={"name": "paged_adamw_8bit", "lr": 1e-2})
    base = load_base_model(str(tiny_model_dir), config.quant, torch.float32)
    model = attach_adapter(base, config.lora, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(parameter_groups(trainable, config.optim, config.lora), config.optim)
    engine = LocalEngine([p for _, p in trainable], optimizer, build_scheduler(optimizer, config.optim, 10), 1.0, after_update=lambda step: None)
    ids = torch.randint(0, 300, (4, 24))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(24).expand(4, 24)}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    for step in range(1, 4):
        engine.backward(compute_loss(model, batch, float(ids.numel()), ForgettingConfig()).total)
        engine.step(step)
    after = dict(model.named_parameters())
    assert before, "no base parameters found"
    for name, tensor in before.items():
        assert not after[name].requires_grad, name
        assert torch.equal(tensor.view(torch.uint8), after[name].detach().view(torch.uint8)), name
    assert any(not torch.equal(lora_before[n], after[n]) for n in lora_before)  # while the adapter did move


def test_adapter_round_trips_through_peft(make_job, tiny_model_dir):
    config = make_job(train={"max_steps": 4})
    run_job(config)
    base = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), torch.float32)
    loaded = PeftModel.from_pretrained(base, config.output_dir / "adapter")
    adapter_config = json.loads((config.output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
        adapted = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter was trained (B != 0) and is applied


def test_resume_repeats_the_uninterrupted_losses(make_job, tmp_path):
    full = make_job(train={"max_steps": 8}, lora={"dropout": 0.1}, optim={"name": "paged_adamw_8bit"}, output_dir=str(tmp_path / "full"))
    run_job(full)

    broken = full.model_copy(update={"output_dir": tmp_path / "broken"})
    broken.checkpoint.every = 3

    def crash_after_step_5(metrics: dict) -> None:
        if metrics["step"] == 5 and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run_job(broken, report=crash_after_step_5)
    assert (tmp_path / "broken" / "checkpoints" / "step-3").is_dir()
    # TensorBoard orders a run's event files by name: a timestamp in whole seconds, then a counter per
    # process (".9" sorts after ".10"). A resume is a new process a second later; in this one, wait a second.
    time.sleep(1.1)
    resumed = run_job(broken)
    assert resumed.resumed_from_step == 3

    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "broken")
    assert sorted(got) == list(range(1, 9))  # metrics.jsonl was cut back to step 3: no duplicates
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    events = EventAccumulator(str(tmp_path / "broken" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_resume_refuses_a_changed_config(make_job):
    config = make_job(train={"max_steps": 4}, checkpoint={"every": 2})
    with pytest.raises(KeyboardInterrupt):
        run_job(config, report=lambda m: (_ for _ in ()).throw(KeyboardInterrupt()) if m["step"] == 3 else None)
    changed = config.model_copy(deep=True)
    changed.optim.lr = 1e-3
    changed.lora.r = 4
    with pytest.raises(JobError) as err:
        run_job(changed)
    assert "optim.lr" in str(err.value) and "lora.r" in str(err.value)


def test_accumulated_loss_is_the_true_token_mean(make_job):
    """grad_accum 2 x micro 2 must give the same update as one micro-batch of 4 (not a mean of means)."""
    one = make_job(train={"max_steps": 2, "micro_batch": 4, "grad_accum": 1}, output_dir="unused-a")
    two = make_job(train={"max_steps": 2, "micro_batch": 2, "grad_accum": 2}, output_dir="unused-b")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        one.output_dir, two.output_dir = Path(tmp) / "a", Path(tmp) / "b"
        run_job(one)
        run_job(two)
        losses_one, losses_two = train_losses(one.output_dir), train_losses(two.output_dir)
    for step in (1, 2):
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"])
def test_each_optimizer_takes_a_step(make_job, optimizer):
    config = make_job(optim={"name": optimizer}, train={"max_steps": 2})
    result = run_job(config)
    assert math.isfinite(result.train_loss)
    rows = [r for r in read_metrics(config.output_dir) if "train/grad_norm" in r]
    assert all(r["train/grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("quant", [{"bits": 4, "type": "nf4", "double_quant": True}, {"bits": 4, "type": "fp4", "double_quant": False}, {"bits": 8}, {"bits": 16}])
def test_each_quant_mode_takes_a_step(make_job, tiny_model_dir, quant):
    config = make_job(quant=quant, train={"max_steps": 2})
    model = load_base_model(str(tiny_model_dir), config.quant, torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected_type = {4: "Linear4bit", 8: "Linear8bitLt", 16: "Linear"}[quant["bits"]]
    assert type(q_proj).__name__ == expected_type
    if quant["bits"] == 4:
        assert q_proj.weight.quant_type == quant["type"]
        assert (q_proj.weight.quant_state.nested is True) == quant["double_quant"]
    result = run_job(config)
    assert math.isfinite(result.train_loss) and result.steps == 2


@pytest.mark.parametrize(
    "lora",
    [
        {"rslora": True},
        {"dora": True},
        {"plus_lr_ratio": 16.0},
        {"method": "vera", "r": 8, "targets": "qv"},
        {"targets": "all-linear"},
        {"targets": ["q_proj", "o_proj"]},
    ],
)
def test_adapter_variants_train(make_job, lora):
    config = make_job(lora=lora, train={"max_steps": 3})
    result = run_job(config)
    assert math.isfinite(result.train_loss)
    saved = json.loads((config.output_dir / "adapter" / "adapter_config.json").read_text())
    if lora.get("method") == "vera":
        assert saved["peft_type"] == "VERA"
    if lora.get("dora"):
        assert saved["use_dora"] is True
    if lora.get("rslora"):
        assert saved["use_rslora"] is True
    if isinstance(lora.get("targets"), list):
        assert sorted(saved["target_modules"]) == ["o_proj", "q_proj"]


def test_lora_plus_gives_b_its_own_learning_rate(make_job, tiny_model_dir):
    from trainer.adapters import attach_adapter, parameter_groups

    config = make_job(lora={"plus_lr_ratio": 16.0})
    model = attach_adapter(load_base_model(str(tiny_model_dir), config.quant, torch.float32), config.lora, 10)
    groups = parameter_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], config.optim, config.lora)
    assert [g["lr"] for g in groups] == [config.optim.lr, config.optim.lr * 16]
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    assert {id(p) for p in groups[1]["params"]} == b_ids


def test_adalora_reallocates_ranks_inside_the_loop(make_job):
    config = make_job(lora={"method": "adalora", "r": 2, "adalora": {"init_r": 6, "tinit": 1, "tfinal": 2, "delta_t": 1}}, train={"max_steps": 8})
    run_job(config)
    saved = json.loads((config.output_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA"
    # The allocator pruned ranks during training: the saved rank pattern keeps fewer than init_r per module.
    pattern = saved["rank_pattern"]
    assert pattern, "AdaLoRA never reallocated ranks"
    kept = [sum(mask) for mask in pattern.values()]
    assert sum(kept) < 6 * len(kept)


def test_gradient_checkpointing_does_not_change_the_losses(make_job, tmp_path):
    on = make_job(train={"max_steps": 3, "grad_checkpointing": True}, output_dir=str(tmp_path / "on"))
    off = make_job(train={"max_steps": 3, "grad_checkpointing": False}, output_dir=str(tmp_path / "off"))
    run_job(on)
    run_job(off)
    a, b = train_losses(tmp_path / "on"), train_losses(tmp_path / "off")
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)


def test_compute_dtype_is_fp32_on_cpu():
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("bf16") == torch.bfloat16


def test_unreachable_hub_id_names_the_ways_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError) as err:
        resolve_model_dir("some-org/some-model")
    assert "smollm2-135m" in str(err.value) and "local directory" in str(err.value)


def test_missing_local_model_directory_is_explained(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_model_dir(str(tmp_path))


def test_job_evaluates_tasks_and_forgetting_and_rehearses_on_the_bases_own_answers(make_job, toy_data, tmp_path):
    prompts = tmp_path / "general.txt"
    prompts.write_text("".join(f"What is the number {i}?\n" for i in range(12)))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        dump_yaml(
            {
                "tasks": [{"name": "toy", "path": str(toy_data["eval"]), "metric": "exact_match", "n": 8, "max_new_tokens": 4}],
                "forgetting": {"prompts": str(prompts), "n": 6, "max_new_tokens": 6},
            }
        )
    )
    config = make_job(
        train={"max_steps": 6},
        eval={"every": 3, "tasks": str(tasks)},
        forgetting={"rehearsal": {"source": "prior", "prompts": str(prompts), "ratio": 0.25, "max_new_tokens": 6}},
        data={"mix": {"by": "examples", "window": 4}},
    )
    result = run_job(config)
    rows = read_metrics(config.output_dir)
    evals = {r["step"]: r for r in rows if "eval/toy/exact_match" in r}
    assert sorted(evals) == [0, 3, 6]
    # At step 0 the adapter is the identity (B = 0): no drift from the base at all.
    assert evals[0]["eval/forgetting/drift_kl"] == pytest.approx(0.0, abs=1e-6)
    assert evals[6]["eval/forgetting/drift_kl"] > 0
    assert 0.0 <= evals[6]["eval/toy/exact_match"] <= 1.0
    assert result.metrics["eval/forgetting/drift_kl"] == evals[6]["eval/forgetting/drift_kl"]
    # The prior source (the base's answers) makes up a quarter of every window of examples.
    ratios = [r["data/rehearsal_ratio"] for r in rows if "data/rehearsal_ratio" in r]
    assert ratios and all(abs(ratio - 0.25) <= 1 / 16 for ratio in ratios)


def test_atomic_directory_replaces_only_when_complete_and_is_readable(tmp_path):
    from schema.atomic import atomic_directory, write_text_atomic

    target = tmp_path / "adapter"
    atomic_directory(target, lambda d: (d / "a.txt").write_text("old"))
    assert (target / "a.txt").read_text() == "old"
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700

    def crash(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_directory(target, crash)
    assert (target / "a.txt").read_text() == "old"
    atomic_directory(target, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging or retired directory left
    write_text_atomic(tmp_path / "r" / "x.json", "{}")
    assert (tmp_path / "r" / "x.json").stat().st_mode & 0o777 == 0o644
