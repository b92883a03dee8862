"""checkpoint.select: best_eval_loss keeps the adapter of the evaluation with the lowest eval/loss, across
a resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from schema.loading import load_job_config
from schema.yamlfile import dump_yaml
from trainer.loop import run_job


def evals(job_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["eval/loss"] for row in rows if "eval/loss" in row}


def best_job(make_job, tmp_path, name: str):
    # lr 0.05 on the toy task: eval/loss falls to its lowest at step 4, then rises (measured).
    return make_job(
        optim={"lr": 0.05}, train={"max_steps": 12}, eval={"every": 2}, checkpoint={"every": 4, "keep": 1, "select": "best_eval_loss"},
        output_dir=str(tmp_path / name),
    )


def test_the_adapter_is_the_one_with_the_lowest_eval_loss(make_job, tmp_path):
    config = best_job(make_job, tmp_path, "best")
    result = run_job(config)
    losses = {step: loss for step, loss in evals(config.output_dir).items() if step > 0}  # step 0 is the untrained adapter
    best_step = min(losses, key=losses.get)
    assert best_step != 12, losses  # the case worth testing: the last step is not the best
    assert result.selected_step == best_step and result.eval_loss == pytest.approx(losses[best_step])
    final = json.loads((config.output_dir / "final.json").read_text())
    assert final["selected_step"] == best_step and final["metrics"]["eval/loss"] == pytest.approx(losses[best_step])
    chosen = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    kept = load_file(config.output_dir / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors")
    last = load_file(config.output_dir / "checkpoints" / "step-12" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(chosen[k], kept[k]) for k in kept) and any(not torch.equal(chosen[k], last[k]) for k in last)


def test_resume_keeps_track_of_the_best_so_far(make_job, tmp_path):
    reference = run_job(best_job(make_job, tmp_path, "reference"))
    config = best_job(make_job, tmp_path, "resumed")

    def crash_at_step_7(metrics: dict) -> None:
        if metrics.get("step") == 7 and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        run_job(config, report=crash_at_step_7)
    result = run_job(config)
    assert result.resumed_from_step == 4 and result.selected_step == reference.selected_step
    chosen = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference.adapter_dir / "adapter_model.safetensors")
    assert all(torch.allclose(chosen[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)


def test_best_eval_loss_needs_eval_data(make_job, tmp_path):
    raw = make_job().model_dump(mode="json")
    raw["data"]["eval"] = None
    raw["checkpoint"]["select"] = "best_eval_loss"
    path = tmp_path / "job.yaml"
    path.write_text(dump_yaml(raw))
    with pytest.raises(Exception, match="best_eval_loss needs an eval/loss"):
        load_job_config(path)
