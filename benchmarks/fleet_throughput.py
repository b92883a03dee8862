"""Fleet throughput: N tiny jobs run concurrently vs the same N jobs one after another, same machine, same run.

Reports the makespan ratio (sequential / concurrent), each job's start-up overhead (submit to first
training step, split into waiting for a slot, starting the worker process, and loading model and data
inside run_job), and the aggregate tokens/s of both modes. Both modes use one embedded Ray cluster,
the same job configs and fresh output directories, so neither resumes anything.

    .venv/bin/python benchmarks/fleet_throughput.py [--jobs 4] [--steps 40] [--num-cpus 2]

Writes benchmarks/results/fleet_throughput.{json,md} atomically.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ray  # noqa: E402
from rich.console import Console  # noqa: E402

from cluster.capacity import job_shape, slot_count  # noqa: E402
from cluster.config import ResourcesConfig  # noqa: E402
from cluster.fleet import FleetJob, FleetRunner  # noqa: E402
from cluster.records import FleetRecord, write_json_atomic  # noqa: E402
from cluster.session import ray_session  # noqa: E402
from cluster.view import LogLinesView  # noqa: E402
from launch.config import JobConfig  # noqa: E402
from launch.demo_data import write_demo_data  # noqa: E402
from tiny import make_tiny_model_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def job_configs(work: Path, run_dir: Path, count: int, steps: int) -> list[JobConfig]:
    model = work / "tiny-llama"
    if not model.exists():
        make_tiny_model_dir(model)
    data = write_demo_data(work / "data", train_rows=200, val_rows=20)["arithmetic"]  # fits seq_len 64 with the tiny tokenizer
    return [
        JobConfig.model_validate(
            {
                "name": f"job{i}",
                "model": str(model),
                "quant": {"bits": 4},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "optim": {"name": "adamw", "lr": 2e-3},
                "train": {"max_steps": steps, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "seed": i, "dtype": "fp32"},
                "data": {"train": {"path": str(data / "train.jsonl")}},
                "eval": {"every": 0},
                "checkpoint": {"every": 0},
                "output_dir": str(run_dir / f"job{i}"),
            }
        )
        for i in range(count)
    ]


def run_mode(configs: list[JobConfig], run_dir: Path, slots: int, max_concurrent: int | None) -> FleetRecord:
    jobs = [FleetJob(config=c, shape=job_shape(c.resources, cluster_has_gpus=False), max_failures=0) for c in configs]
    view = LogLinesView(Console(stderr=True), progress_every_s=30)
    record = FleetRunner(f"bench-{run_dir.name}", jobs, run_dir, slots=slots, view=view, max_concurrent=max_concurrent).run()
    failed = {name: job.error for name, job in record.jobs.items() if job.state != "finished"}
    if failed:
        raise SystemExit(f"benchmark jobs did not finish: {failed}")
    return record


def startup(record: FleetRecord) -> dict[str, float]:
    """Mean seconds from submit to first step, and its parts, over the jobs of one mode."""
    attempts = [job.attempts[-1] for job in record.jobs.values()]
    parts = {
        "wait_for_slot_s": [a.placed_at - a.submitted_at for a in attempts],
        "worker_start_s": [a.running_at - a.placed_at for a in attempts],
        "job_init_to_first_step_s": [a.first_step_at - a.running_at for a in attempts],
        "placed_to_first_step_s": [a.first_step_at - a.placed_at for a in attempts],
        "submit_to_first_step_s": [a.first_step_at - a.submitted_at for a in attempts],
    }
    return {name: statistics.mean(values) for name, values in parts.items()}


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    gpus = f"{torch.cuda.device_count()} CUDA GPUs" if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), {gpus}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, ray_session(num_cpus=args.num_cpus, num_gpus=0) as nodes:
        work = Path(tmp)
        os.environ.setdefault("LORAFLEET_CACHE", str(work / "cache"))
        slots = slot_count(nodes, ResourcesConfig())
        load_before = os.getloadavg()[0]
        started = time.time()
        # Sequential first: it also warms the OS page cache for both, which favours the concurrent run
        # only by what a second read of the same files saves (the tiny model is ~1 MB).
        sequential = run_mode(job_configs(work, work / "sequential", args.jobs, args.steps), work / "sequential", slots, max_concurrent=1)
        concurrent = run_mode(job_configs(work, work / "concurrent", args.jobs, args.steps), work / "concurrent", slots, max_concurrent=None)
        total_s = time.time() - started

    result = {
        "benchmark": "fleet_throughput",
        "machine": machine(),
        "ray": ray.__version__,
        "jobs": args.jobs,
        "steps_per_job": args.steps,
        "slots": slots,
        "sequential": {**sequential.summary, "startup": startup(sequential)},
        "concurrent": {**concurrent.summary, "startup": startup(concurrent)},
        "makespan_ratio_sequential_over_concurrent": sequential.summary["makespan_s"] / concurrent.summary["makespan_s"],
        "aggregate_tokens_per_s_ratio": concurrent.summary["aggregate_tokens_per_s"] / sequential.summary["aggregate_tokens_per_s"],
        "benchmark_wall_s": total_s,
        # Other processes on the machine compete for the same cores; a load above the core count means they did.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "fleet_throughput.json", result)
    markdown = render(result)
    tmp_md = RESULTS / ".fleet_throughput.md.tmp"
    tmp_md.write_text(markdown)
    tmp_md.replace(RESULTS / "fleet_throughput.md")
    print(markdown)


def render(result: dict) -> str:
    seq, con = result["sequential"], result["concurrent"]
    rows = [
        ("makespan (s)", f"{seq['makespan_s']:.1f}", f"{con['makespan_s']:.1f}"),
        ("sum of job times (s)", f"{seq['job_time_s_sum']:.1f}", f"{con['job_time_s_sum']:.1f}"),
        ("aggregate tokens/s", f"{seq['aggregate_tokens_per_s']:.1f}", f"{con['aggregate_tokens_per_s']:.1f}"),
        ("mean wait for a slot (s)", f"{seq['startup']['wait_for_slot_s']:.2f}", f"{con['startup']['wait_for_slot_s']:.2f}"),
        ("mean worker process start (s)", f"{seq['startup']['worker_start_s']:.2f}", f"{con['startup']['worker_start_s']:.2f}"),
        ("mean run_job start to first step (s)", f"{seq['startup']['job_init_to_first_step_s']:.2f}", f"{con['startup']['job_init_to_first_step_s']:.2f}"),
        ("mean placed to first step (s)", f"{seq['startup']['placed_to_first_step_s']:.2f}", f"{con['startup']['placed_to_first_step_s']:.2f}"),
        ("mean submit to first step (s)", f"{seq['startup']['submit_to_first_step_s']:.2f}", f"{con['startup']['submit_to_first_step_s']:.2f}"),
    ]
    lines = [
        "# Fleet throughput",
        "",
        f"Machine: {result['machine']}; Ray {result['ray']}; {result['jobs']} tiny jobs x {result['steps_per_job']} steps; {result['slots']} slots; "
        f"1-min load average {result['load_average_1min']['before']:.1f} before, {result['load_average_1min']['after']:.1f} after.",
        "",
        "| | one after another | concurrent |",
        "|---|---:|---:|",
        *[f"| {label} | {a} | {b} |" for label, a, b in rows],
        "",
        f"Makespan ratio (sequential / concurrent): **{result['makespan_ratio_sequential_over_concurrent']:.2f}x**; "
        f"aggregate tokens/s ratio: **{result['aggregate_tokens_per_s_ratio']:.2f}x**.",
        "",
        "Start-up overhead is from asking Ray for the job's placement group to the job's first reported step: "
        "waiting for a slot, then the worker process, then run_job's imports and model/data loading.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
