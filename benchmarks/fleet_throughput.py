"""Fleet throughput with packs: N short SmolLM2-135M QLoRA jobs on an embedded Ray cluster, run one
process per job and packed with rolling joins, side by side in one run of this script.

Both modes train the same jobs (the demo's arithmetic and sort_words tasks, alternating; ranks 8, 16 and 32;
NF4 + double quantization; paged AdamW 8-bit; --steps steps each) on the same --slots CPU slots, into fresh
output directories:
- one process per job: every job gets a worker process of its own, which loads the base, trains, and ends
  (`packing: {max_adapters: 1}`, workers not reused: what the scheduler did before packs);
- packed: up to --max-adapters jobs share a worker and its base; when one ends, the next queued job joins
  the same process without a new base load.

Reports the makespan ratio, aggregate tokens/s, worker processes started, and the start-up per job (from
asking for a slot to the job's first step, split into waiting, worker start and the job's own start).

    .venv/bin/python benchmarks/fleet_throughput.py [--jobs 16] [--steps 20] [--slots 2] [--max-adapters 4]

Writes benchmarks/results/fleet_throughput.{json,md,png} atomically.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import ray  # noqa: E402
from rich.console import Console  # noqa: E402

from _common import describe, machine_description, save_png  # noqa: E402
from cluster.capacity import job_shape  # noqa: E402
from cluster.fleet import FleetJob, FleetRunner  # noqa: E402
from cluster.records import FleetRecord  # noqa: E402
from cluster.session import ray_session  # noqa: E402
from cluster.view import LogLinesView  # noqa: E402
from launch.demo_data import write_demo_data  # noqa: E402
from schema.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from schema.job import JobConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("arithmetic", "sort_words")
RANKS = (8, 16, 32)


def job_configs(run_dir: Path, args: argparse.Namespace) -> list[JobConfig]:
    return [
        JobConfig.model_validate(
            {
                "name": f"job{i:02d}",
                "model": args.model,
                "quant": {"bits": 4, "type": "nf4", "double_quant": True},
                "lora": {"r": RANKS[i % len(RANKS)], "alpha": float(RANKS[i % len(RANKS)]), "dropout": 0.05, "targets": "attn"},
                "optim": {"name": "paged_adamw_8bit", "lr": 1e-3},
                "train": {"max_steps": args.steps, "micro_batch": 4, "grad_accum": 1, "seq_len": 128, "seed": i},
                "data": {"train": {"path": str(ROOT / "examples" / "data" / TASKS[i % len(TASKS)] / "train.jsonl")}},
                "eval": {"every": 0},
                "checkpoint": {"every": 0},
                "output_dir": str(run_dir / f"job{i:02d}"),
            }
        )
        for i in range(args.jobs)
    ]


def run_mode(args: argparse.Namespace, run_dir: Path, nodes: list, max_adapters: int, reuse_workers: bool) -> FleetRecord:
    configs = job_configs(run_dir, args)
    jobs = [FleetJob(config=c, shape=job_shape(c.resources, cluster_has_gpus=False), max_failures=0) for c in configs]
    view = LogLinesView(Console(stderr=True), progress_every_s=60)
    runner = FleetRunner(
        f"bench-{run_dir.name}", jobs, run_dir, nodes, view, slots=args.slots, max_adapters=max_adapters, max_concurrent=args.slots, reuse_workers=reuse_workers
    )
    record = runner.run()
    failed = {name: job.error for name, job in record.jobs.items() if job.state != "finished"}
    if failed:
        raise SystemExit(f"benchmark jobs did not finish: {failed}")
    return record


def startup(record: FleetRecord) -> dict[str, float]:
    """Mean seconds per job from asking for its slot to its first step, and the parts: waiting for the slot,
    the worker process starting (zero for a job joining a running worker), and the job's own start (base load,
    data, adapter) until its first step."""
    workers = record.workers
    parts: dict[str, list[float]] = {"wait_s": [], "worker_start_s": [], "job_start_s": [], "total_s": []}
    for job in record.jobs.values():
        attempt = job.attempts[-1]
        worker = workers[attempt.worker]
        ready = max(attempt.placed_at or attempt.submitted_at, worker.get("started_at") or attempt.submitted_at)
        parts["wait_s"].append((attempt.placed_at or attempt.submitted_at) - attempt.submitted_at)
        parts["worker_start_s"].append(ready - (attempt.placed_at or attempt.submitted_at))
        parts["job_start_s"].append(attempt.first_step_at - ready)
        parts["total_s"].append(attempt.first_step_at - attempt.submitted_at)
    return {name: statistics.mean(values) for name, values in parts.items()}


def timeline(record: FleetRecord) -> list[dict[str, Any]]:
    """Each job's last attempt, in seconds from the mode's first submit: asked for a slot, first step, end."""
    zero = min(job.attempts[-1].submitted_at for job in record.jobs.values())
    return [
        {"job": name, "worker": job.attempts[-1].worker, "submitted_s": job.attempts[-1].submitted_at - zero,
         "first_step_s": job.attempts[-1].first_step_at - zero, "ended_s": job.attempts[-1].ended_at - zero}
        for name, job in record.jobs.items()
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per mode: a bar per job, grey from asking for a slot to its first step, coloured (by worker
    process) while it trains. Both panels share the time axis, so the makespans compare at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    figure, axes = plt.subplots(len(modes), 1, figsize=(10, 2.0 + 0.28 * result["settings"]["jobs"] * len(modes)), sharex=True)
    colors = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (14, 15)]  # tab20's greys are the waiting colour
    for axis, (name, mode) in zip(axes, modes.items()):
        workers = {}
        for row, job in enumerate(mode["timeline"]):
            color = colors[workers.setdefault(job["worker"], len(workers)) % len(colors)]
            axis.barh(row, job["first_step_s"] - job["submitted_s"], left=job["submitted_s"], color="lightgrey", height=0.7)
            axis.barh(row, job["ended_s"] - job["first_step_s"], left=job["first_step_s"], color=color, height=0.7)
        axis.set_yticks(range(len(mode["timeline"])), [job["job"] for job in mode["timeline"]], fontsize="x-small")
        axis.invert_yaxis()
        axis.set_title(f"{name}: makespan {mode['makespan_s']:.0f} s, {mode['worker_starts']} worker processes", fontsize="medium")
        axis.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since the first job asked for a slot (grey: waiting and start-up; colour: training, one colour per worker)")
    figure.suptitle(f"{result['settings']['jobs']} jobs on {result['settings']['slots']} slots ({describe(result['machine'])[:70]})", fontsize="medium")
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--max-adapters", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    write_demo_data(ROOT / "examples" / "data")
    from trainer.models import resolve_model_dir

    resolve_model_dir(args.model)  # convert the GGUF once, before any timing
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, ray_session(num_cpus=args.slots, num_gpus=0) as nodes:
        work = Path(tmp)
        load_before = os.getloadavg()[0]
        started = time.time()
        separate = run_mode(args, work / "separate", nodes, max_adapters=1, reuse_workers=False)
        packed = run_mode(args, work / "packed", nodes, max_adapters=args.max_adapters, reuse_workers=True)
        total_s = time.time() - started
    modes = {"one process per job": separate, "packed, rolling joins": packed}
    result = {
        "benchmark": "fleet_throughput",
        "machine": machine_description(),
        "ray": ray.__version__,
        "command": " ".join(["python", "benchmarks/fleet_throughput.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": vars(args) | {"out": str(args.out)},
        "modes": {name: {**record.summary, "startup": startup(record), "timeline": timeline(record)} for name, record in modes.items()},
        "makespan_ratio": separate.summary["makespan_s"] / packed.summary["makespan_s"],
        "aggregate_tokens_per_s_ratio": packed.summary["aggregate_tokens_per_s"] / separate.summary["aggregate_tokens_per_s"],
        "benchmark_wall_s": total_s,
        # Other processes on the machine compete for the same cores; a load above the core count means they did.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    write_json_atomic(args.out / "fleet_throughput.json", result)
    plot(result, args.out / "fleet_throughput.png")
    text = render(result)
    write_text_atomic(args.out / "fleet_throughput.md", text)
    print(text)


def render(result: dict) -> str:
    names = list(result["modes"])
    a, b = (result["modes"][n] for n in names)
    rows = [
        ("makespan (s)", f"{a['makespan_s']:.1f}", f"{b['makespan_s']:.1f}"),
        ("aggregate tokens/s", f"{a['aggregate_tokens_per_s']:.1f}", f"{b['aggregate_tokens_per_s']:.1f}"),
        ("worker processes started", str(a["worker_starts"]), str(b["worker_starts"])),
        ("mean wait for a slot (s)", f"{a['startup']['wait_s']:.1f}", f"{b['startup']['wait_s']:.1f}"),
        ("mean worker process start (s)", f"{a['startup']['worker_start_s']:.1f}", f"{b['startup']['worker_start_s']:.1f}"),
        ("mean job start to first step (s)", f"{a['startup']['job_start_s']:.1f}", f"{b['startup']['job_start_s']:.1f}"),
        ("mean asking for a slot to first step (s)", f"{a['startup']['total_s']:.1f}", f"{b['startup']['total_s']:.1f}"),
    ]
    settings = result["settings"]
    return "\n".join([
        "# Fleet throughput: one process per job against packs with rolling joins",
        "",
        f"Machine: {describe(result['machine'])}; Ray {result['ray']}; 1-min load average {result['load_average_1min']['before']:.1f} before, "
        f"{result['load_average_1min']['after']:.1f} after.",
        f"Command: `{result['command']}` ({result['date']}).",
        f"{settings['jobs']} {settings['model']} QLoRA jobs (NF4 + double quantization, LoRA r 8/16/32 on q/k/v/o, paged AdamW 8-bit), "
        f"{settings['steps']} steps of 4 x 128 tokens each, on {settings['slots']} CPU slots; packs of up to {settings['max_adapters']}.",
        "",
        f"| | {names[0]} | {names[1]} |",
        "|---|---:|---:|",
        *[f"| {label} | {x} | {y} |" for label, x, y in rows],
        "",
        f"Makespan ratio ({names[0]} / {names[1]}): **{result['makespan_ratio']:.2f}x**; aggregate tokens/s ratio: "
        f"**{result['aggregate_tokens_per_s_ratio']:.2f}x** (target: makespan ≥ 1.5x better packed).",
        "",
        "![when each job waited and trained, in both modes](fleet_throughput.png)",
        "",
    ])


if __name__ == "__main__":
    main()
