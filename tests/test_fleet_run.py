"""Real fleets of tiny jobs on a real local Ray cluster (2 CPU slots), through the `lorafleet` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from schema.yamlfile import dump_yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cluster.records import read_fleet_record
from test_pack import relative_difference
from cluster.tensorboard import prepare_serving
from launch.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """One embedded 2-CPU cluster for the module (Ray start-up costs seconds on 2 cores)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_fleet(
    tmp_path: Path, model_dir: Path, data: dict[str, Path], jobs: list[dict], compose: list[dict] | None = None, fleet_keys: dict | None = None, **defaults
) -> Path:
    base = {
        "model": str(model_dir),
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": 5e-3, "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": 4, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "seed": 7, "dtype": "fp32"},
        "data": {"train": {"path": str(data["train"])}, "eval": {"path": str(data["eval"])}},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 2},
    }
    for key, value in defaults.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    fleet = {"name": "test", "defaults": base, "resources": {"gpus_per_job": 1, "cpus_per_job": 1}, "jobs": jobs, "output_dir": str(tmp_path / "run")}
    if compose is not None:
        fleet["compose"] = compose
    fleet.update(fleet_keys or {})
    path = tmp_path / "fleet.yaml"
    path.write_text(dump_yaml(fleet))
    return path


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def adapter_weights(job_dir: Path) -> dict:
    return load_file(job_dir / "adapter" / "adapter_model.safetensors")


def test_three_jobs_on_two_slots_queue_in_order_and_a_rerun_trains_nothing(local_ray, tmp_path, tiny_model_dir, toy_data):
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    compose = [{"name": "a_plus_c", "adapters": ["a", "c"], "method": "linear", "weights": [0.5, 0.5]}]
    jobs = [{"name": "a"}, {"name": "b", "lora": {"r": 4}}, {"name": "c"}]
    path = write_fleet(tmp_path, tiny_model_dir, toy_data, jobs, compose=compose, fleet_keys={"packing": {"max_adapters": 1}})
    output = run_cli("run", str(path))
    assert "fleet summary" in output and "makespan" in output and "aggregate tokens/s" in output

    # The fleet's compose: section ran after the jobs, on their final adapters.
    composed = tmp_path / "run" / "compose" / "a_plus_c"
    record_of_composition = json.loads((composed / "compose.json").read_text())
    assert record_of_composition["method"] == "linear" and record_of_composition["weights"] == [0.5, 0.5]
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), composed).peft_config["default"].r == 16  # ranks 8 + 8

    run_dir = tmp_path / "run"
    record = read_fleet_record(run_dir)
    assert record.state == "finished" and [job.state for job in record.jobs.values()] == ["finished"] * 3
    attempts = [job.attempts[0] for job in record.jobs.values()]
    assert all(len(job.attempts) == 1 for job in record.jobs.values())
    workers = list(record.workers.values())
    assert most_at_once([(w["started_at"], w["ended_at"]) for w in workers]) == 2  # 2 slots: never 3 workers, but 2 at once
    assert attempts[0].submitted_at < attempts[1].submitted_at < attempts[2].submitted_at  # fleet order
    assert attempts[2].submitted_at >= min(attempts[0].ended_at, attempts[1].ended_at)  # c waited for a free slot
    # max_adapters 1: one job per worker at a time, and c took over a finished job's worker (no new process).
    assert len(workers) == 2 and record.summary["worker_starts"] == 2 and sorted(len(w["jobs"]) for w in workers) == [1, 2]
    for name, job in record.jobs.items():
        assert job.result["steps"] == 4 and job.step == 4 and job.adapter_dir == str(run_dir / name / "adapter")
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, job.adapter_dir)
        assert model.peft_config["default"].r == (4 if name == "b" else 8)
    summary = record.summary
    assert summary["finished"] == 3 and summary["slots"] == 2
    assert summary["tokens"] == sum(job.result["tokens"] for job in record.jobs.values())
    assert summary["aggregate_tokens_per_s"] == pytest.approx(summary["tokens"] / summary["makespan_s"])
    assert 0 < summary["job_time_s_sum"] < summary["makespan_s"] * 2

    fleet_tb = EventAccumulator(str(run_dir / "tb" / "fleet"))
    fleet_tb.Reload()
    assert fleet_tb.Scalars("fleet/finished_jobs")[-1].value == 3
    assert max(s.value for s in fleet_tb.Scalars("fleet/running_jobs")) <= 2
    assert sorted(p.name for p in prepare_serving(run_dir).iterdir()) == ["a", "b", "c", "fleet"]

    status = run_cli("status", str(run_dir))
    assert "fleet test: finished" in status and status.count("finished") >= 4

    finals = {name: (run_dir / name / "final.json").stat().st_mtime_ns for name in "abc"}
    run_cli("run", str(path))
    again = read_fleet_record(run_dir)
    assert [job.state for job in again.jobs.values()] == ["skipped"] * 3
    assert all(len(job.attempts) == 1 for job in again.jobs.values())  # no new attempt: nothing trained
    assert finals == {name: (run_dir / name / "final.json").stat().st_mtime_ns for name in "abc"}
    # Nothing was trained again: the summary keeps the figures of the run that trained the jobs.
    assert again.summary["from_earlier_run"] and again.summary["skipped"] == 3
    assert again.summary["tokens"] == summary["tokens"] and again.summary["makespan_s"] == summary["makespan_s"]


def test_sigkilled_pack_worker_retries_its_jobs_and_each_resumes_exactly(local_ray, tmp_path, tiny_model_dir, toy_data):
    from schema.loading import load_fleet_config
    from trainer.loop import run_job

    jobs = [{"name": "a"}, {"name": "b", "optim": {"lr": 1e-2}, "lora": {"r": 4}}]
    path = write_fleet(tmp_path, tiny_model_dir, toy_data, jobs, train={"max_steps": 60}, checkpoint={"every": 5, "keep": 2})
    fleet_json = tmp_path / "run" / "fleet.json"
    killed: list[int] = []

    def kill_mid_job() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            try:
                job = json.loads(fleet_json.read_text())["jobs"]["a"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                job = None
            # Past step 5, the step-5 checkpoint is complete.
            if job and job["state"] == "running" and job["attempt"] == 1 and 6 <= job["step"] < 50:
                pid = job["attempts"][-1]["workers"][0]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_job, daemon=True)
    killer.start()
    run_cli("run", str(path), "--max-concurrent", "1")  # one slot: a and b share one pack
    killer.join()
    assert killed, "the job finished before the test could kill it"

    record = read_fleet_record(tmp_path / "run")
    assert record.jobs["a"].attempts[0].worker == record.jobs["b"].attempts[0].worker  # one pack, one worker
    for name in ("a", "b"):
        job = record.jobs[name]
        assert job.state == "finished" and job.attempt == 2, name  # the worker's death counts one attempt for each
        assert "worker process died" in job.attempts[0].error and str(killed[0]) in job.attempts[0].error
        assert job.result["resumed_from_step"] >= 5 and job.result["steps"] == 60
    # Each job ends with the weights of an uninterrupted solo run.
    for config in load_fleet_config(path).jobs:
        reference = run_job(config.model_copy(update={"output_dir": tmp_path / "solo" / config.name}))
        resumed, expected = adapter_weights(tmp_path / "run" / config.name), adapter_weights(reference.output_dir)
        assert resumed.keys() == expected.keys()
        for key in expected:
            assert relative_difference(resumed[key], expected[key]) <= 1e-5, (config.name, key)


def test_a_fleet_of_six_jobs_on_two_slots_starts_at_most_two_workers(local_ray, tmp_path, tiny_model_dir, toy_data):
    from schema.loading import load_fleet_config
    from trainer.loop import run_job

    jobs = [{"name": f"j{i}", "lora": {"r": 2 + i}, "optim": {"lr": 1e-3 * (i + 1)}, "train": {"max_steps": 3 + i}} for i in range(6)]
    path = write_fleet(tmp_path, tiny_model_dir, toy_data, jobs, fleet_keys={"packing": {"max_adapters": 3}})
    run_cli("run", str(path))
    record = read_fleet_record(tmp_path / "run")
    assert all(job.state == "finished" for job in record.jobs.values())
    pids = {pid for worker in record.workers.values() for pid in worker["pids"]}
    assert len(record.workers) <= 2 and len(pids) <= 2 and record.summary["worker_starts"] <= 2
    assert max(len(worker["jobs"]) for worker in record.workers.values()) >= 3  # packs, and rolling joins into them
    for config in load_fleet_config(path).jobs:
        reference = run_job(config.model_copy(update={"output_dir": tmp_path / "solo" / config.name}))
        packed, expected = adapter_weights(tmp_path / "run" / config.name), adapter_weights(reference.output_dir)
        for key in expected:
            assert relative_difference(packed[key], expected[key]) <= 1e-5, (config.name, key)


def test_two_worker_zero2_job_follows_the_one_worker_loss_curve(local_ray, tmp_path, tiny_model_dir, toy_data):
    """Two workers with micro-batch 2 each see the same global batch of 4 as one worker with micro-batch 4."""
    path = write_fleet(
        tmp_path,
        tiny_model_dir,
        toy_data,
        [
            {"name": "zero2", "train": {"micro_batch": 2}, "resources": {"gpus_per_job": 2}},
            {"name": "single", "train": {"micro_batch": 4}, "resources": {"gpus_per_job": 1}},
        ],
        train={"max_steps": 6},
    )
    run_cli("run", str(path))
    record = read_fleet_record(tmp_path / "run")
    assert [len(w) for w in (record.jobs["zero2"].attempts[-1].workers, record.jobs["single"].attempts[-1].workers)] == [2, 1]

    def losses(name: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()]
        return [row["train/loss"] for row in rows if "train/loss" in row]

    two, one = losses("zero2"), losses("single")
    assert len(two) == len(one) == 6
    assert one[-1] < one[0]  # it trains
    for step, (a, b) in enumerate(zip(two, one), start=1):
        # Same data, same global batch: only the order of float sums differs (all-reduce vs one batch).
        assert a == pytest.approx(b, abs=1e-4), (step, two, one)


def test_sigterm_stops_the_workers_and_a_rerun_resumes(local_ray, tmp_path, tiny_model_dir, toy_data):
    path = write_fleet(tmp_path, tiny_model_dir, toy_data, [{"name": "long"}], train={"max_steps": 100}, checkpoint={"every": 5, "keep": 1})
    fleet_json = tmp_path / "run" / "fleet.json"
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    driver = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, job = time.time() + 240, None
        while time.time() < deadline and driver.poll() is None:
            if fleet_json.is_file():
                job = json.loads(fleet_json.read_text())["jobs"]["long"]
                if job["state"] == "running" and job["step"] >= 6:
                    break
            time.sleep(0.1)
        assert job and job["step"] >= 6, driver.communicate()[0] if driver.poll() is not None else job
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output
    assert "Run the same command again to resume" in output
    record = read_fleet_record(tmp_path / "run")
    assert record.state == "interrupted" and record.jobs["long"].state == "interrupted"
    pid = record.jobs["long"].attempts[-1].workers[0]["pid"]
    deadline = time.time() + 20
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "the worker outlived the driver"

    run_cli("run", str(path))
    again = read_fleet_record(tmp_path / "run")
    job = again.jobs["long"]
    assert job.state == "finished" and job.result["resumed_from_step"] >= 5 and job.attempt == 2
    assert job.attempts[0].error == "interrupted: the driver was stopped"
    # This run's figures count only the steps trained after the resume.
    share = (100 - job.result["resumed_from_step"]) / 100
    assert again.summary["tokens"] == pytest.approx(job.result["tokens"] * share)


def test_a_job_that_fails_on_its_own_is_not_retried_and_the_fleet_carries_on(local_ray, tmp_path, tiny_model_dir, toy_data):
    # lr 1e20 drives the loss to NaN at step 2: the trainer stops the job with a JobError, which
    # would happen again on every retry, so the fleet marks it failed at once (before: retried max_failures times).
    path = write_fleet(
        tmp_path,
        tiny_model_dir,
        toy_data,
        [{"name": "broken", "optim": {"lr": 1.0e20}, "train": {"max_steps": 12}, "resources": {"max_failures": 2}}, {"name": "fine"}],
    )
    result = CliRunner().invoke(app, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    record = read_fleet_record(tmp_path / "run")
    broken, fine = record.jobs["broken"], record.jobs["fine"]
    assert broken.state == "failed" and broken.attempt == 1
    assert broken.error.startswith("JobError: ") and "training stopped and nothing non-finite was saved" in broken.error, broken.error
    assert not (tmp_path / "run" / "broken" / "adapter").exists() and not (tmp_path / "run" / "broken" / "final.json").exists()
    assert fine.state == "finished" and fine.result["steps"] == 4
    assert record.state == "failed" and record.summary["failed"] == 1 and record.summary["finished"] == 1
    assert "broken" in result.output and "errors" in result.output
