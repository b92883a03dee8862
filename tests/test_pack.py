"""Packs: several adapters trained at once on one shared base, each equal to its solo run.

Every adapter of a pack must behave as the whole job it is: with dropout 0 in fp32 its per-step losses
and final weights equal those of the same job run alone, whatever the other adapters do (different
data, rank, learning rate, max_steps, accumulation, targets), whether one of them fails, or whether it
joined the pack later.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import addition_rows, write_jsonl
from safetensors.torch import load_file

import trainer.loop as loop
from schema.job import pack_key
from trainer.errors import JobError
from trainer.job import JobResult
from trainer.loop import run_job, run_pack


def losses(job_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def weights(job_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(job_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(packed: Path, solo: Path) -> None:
    expected, got = losses(solo), losses(packed)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (packed.name, step)
    solo_weights, packed_weights = weights(solo), weights(packed)
    assert solo_weights.keys() == packed_weights.keys()
    for name, tensor in solo_weights.items():
        assert relative_difference(packed_weights[name], tensor) <= 1e-5, (packed.name, name)


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖: float sums over a bigger batch round differently in the last bits, and
    Adam turns those into element-wise differences of ~1e-6 on weights of ~0.1 after a few steps."""
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.fixture
def three_jobs(make_job, tmp_path):
    """Three jobs that differ in data, rank, learning rate, max_steps, accumulation and target modules."""
    other = write_jsonl(tmp_path / "other.jsonl", addition_rows(48, seed=9))

    def configs(root: Path) -> list:
        return [
            make_job(name="a", lora={"r": 4}, optim={"lr": 5e-3}, train={"max_steps": 6}, output_dir=str(root / "a")),
            make_job(name="b", lora={"r": 8, "targets": "qv"}, optim={"lr": 1e-2, "name": "paged_adamw_8bit"}, train={"max_steps": 4},
                     data={"train": {"path": str(other)}}, output_dir=str(root / "b")),
            make_job(name="c", lora={"r": 2, "alpha": 4}, optim={"lr": 2e-3, "schedule": "cosine"}, train={"max_steps": 5, "grad_accum": 2, "micro_batch": 2},
                     eval={"every": 2}, checkpoint={"every": 2, "keep": 1}, output_dir=str(root / "c")),
        ]

    return configs


def test_packed_adapters_equal_their_solo_runs(three_jobs, tmp_path, tiny_model_dir):
    for config in three_jobs(tmp_path / "solo"):
        run_job(config)
    configs = three_jobs(tmp_path / "pack")
    assert len({pack_key(c) for c in configs}) == 1
    outcomes = run_pack(configs)
    assert all(isinstance(outcomes[c.name], JobResult) for c in configs), outcomes
    for config in configs:
        assert_same_run(tmp_path / "pack" / config.name, tmp_path / "solo" / config.name)
        # The directory does not show whether the job trained in a pack.
        solo_files = sorted(str(p.relative_to(tmp_path / "solo" / config.name)) for p in (tmp_path / "solo" / config.name).rglob("*") if "tb" not in p.parts)
        packed_files = sorted(str(p.relative_to(tmp_path / "pack" / config.name)) for p in (tmp_path / "pack" / config.name).rglob("*") if "tb" not in p.parts)
        assert packed_files == solo_files
    c_eval = [json.loads(line) for line in (tmp_path / "pack" / "c" / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert [row["step"] for row in c_eval] == [0, 2, 4, 5]  # c's own eval cadence, and at its end

    # A packed adapter is a plain PEFT adapter: peft loads it onto the base with its own rank and targets.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "pack" / "b" / "adapter")
    assert loaded.peft_config["default"].r == 8 and set(loaded.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    state = {name: tensor for name, tensor in loaded.state_dict().items() if "lora_" in name}
    saved = weights(tmp_path / "pack" / "b")
    assert len(state) == len(saved) > 0
    for name, tensor in saved.items():
        (loaded_name,) = [key for key in state if key.replace(".default", "").endswith(name.removeprefix("base_model.model."))]
        assert torch.equal(state[loaded_name], tensor), name


def test_a_failing_adapter_leaves_the_pack_and_the_others_carry_on(three_jobs, make_job, tmp_path):
    configs = three_jobs(tmp_path / "pack")
    exploding = make_job(name="nan", optim={"lr": 1.0e20}, train={"max_steps": 6}, output_dir=str(tmp_path / "pack" / "nan"))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n{broken\n")
    broken_data = make_job(name="bad", data={"train": {"path": str(bad_rows)}}, output_dir=str(tmp_path / "pack" / "bad"))
    events = []
    outcomes = run_pack([configs[0], exploding, configs[1], broken_data, configs[2]], report=lambda e: events.append(e) if "event" in e else None)
    assert isinstance(outcomes["nan"], JobError) and "the loss is nan at step 2" in str(outcomes["nan"])
    assert isinstance(outcomes["bad"], JobError) and "bad.jsonl:2" in str(outcomes["bad"])
    assert not (tmp_path / "pack" / "nan" / "adapter").exists() and not (tmp_path / "pack" / "nan" / "final.json").exists()
    assert {e["job"]: e["event"] for e in events} == {"a": "finished", "b": "finished", "c": "finished", "nan": "failed", "bad": "failed"}
    for config in configs:
        run_job(config.model_copy(update={"output_dir": tmp_path / "solo" / config.name}))
        assert_same_run(tmp_path / "pack" / config.name, tmp_path / "solo" / config.name)


def test_a_job_joins_a_running_pack_without_reloading_the_base(three_jobs, tmp_path, monkeypatch):
    a, b, _ = three_jobs(tmp_path / "pack")
    loads = []
    real_load = loop.load_base_model
    monkeypatch.setattr(loop, "load_base_model", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    asked = []

    def joins(running: list[str]) -> list:
        asked.append(list(running))
        return [b] if len(asked) == 3 else []  # a has run two micro-steps when b joins

    outcomes = run_pack([a], joins=joins)
    assert set(outcomes) == {"a", "b"} and all(isinstance(o, JobResult) for o in outcomes.values())
    assert len(loads) == 1
    assert ["a", "b"] in asked  # both trained side by side
    for config in (a, b):
        run_job(config.model_copy(update={"output_dir": tmp_path / "solo" / config.name}))
        assert_same_run(tmp_path / "pack" / config.name, tmp_path / "solo" / config.name)


def test_a_job_interrupted_in_a_pack_resumes_alone_exactly(three_jobs, tmp_path):
    a, b, _ = [c.model_copy(update={"checkpoint": c.checkpoint.model_copy(update={"every": 2})}) for c in three_jobs(tmp_path / "pack")]

    def crash_at_step_3(metrics: dict) -> None:
        if metrics.get("job") == "a" and metrics.get("step") == 3 and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run_pack([a, b], report=crash_at_step_3)
    resumed = run_job(a)  # alone, from the pack's checkpoint
    assert resumed.resumed_from_step == 2
    run_job(a.model_copy(update={"output_dir": tmp_path / "solo" / "a"}))
    assert_same_run(tmp_path / "pack" / "a", tmp_path / "solo" / "a")


def test_jobs_that_cannot_share_a_base_are_refused(make_job, tmp_path):
    a = make_job(name="a", output_dir=str(tmp_path / "a"))
    longer = make_job(name="b", train={"seq_len": 128}, output_dir=str(tmp_path / "b"))
    dora = make_job(name="d", lora={"dora": True}, output_dir=str(tmp_path / "d"))
    assert pack_key(a) != pack_key(longer) and pack_key(dora)[:2] == ("alone", "d")
    outcomes = run_pack([a, longer])
    assert isinstance(outcomes["a"], JobResult)
    assert isinstance(outcomes["b"], JobError) and "does not share this pack's" in str(outcomes["b"])
