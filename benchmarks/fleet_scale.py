"""The scheduler at scale: --jobs queued jobs on a simulated cluster of --nodes x --gpus fake GPUs.

Everything real runs: the scheduler (cluster.fleet.FleetRunner), Ray placement groups and worker actors
on a `ray.cluster_utils.Cluster` (one raylet per node, all on this machine), fleet.json, the TensorBoard
scalars and the plain-log live view (written to a file). The only stand-in is the job body: each worker
sleeps `--steps` x `--step-s` seconds per job and reports its steps (cluster.simulation.sleeping_pack).
Packing is off (max_adapters 1), so a slot's time is one job's; a worker whose job ends takes the next
queued job of its shape (rolling joins) without a new process.

Measured, for a fleet of 1-GPU jobs:
- scheduler overhead per job: (makespan − jobs × sleep / slots) / jobs, the ideal being a perfect packing
  of the sleeps on the slots with no start-up at all (worker processes starting is part of the overhead);
- placement latency: asking Ray for a worker's placement group to its being ready;
- the driver's CPU time; the size of fleet.json and the time to write it;
- that every job ran exactly once (one attempt, finished) and none was lost.
And for a mixed fleet (every --mixed-every-th job needs 2 GPUs on one node) with backfill and without
(backfill 0: strict fleet order): the fleet efficiency Σ(job time x slots) / (makespan x slots of the cluster).
Then the mixed fleet with backfill again, with jobs of --steps x --long-step-s seconds: the start-up of the
simulated cluster's processes on this machine weighs less against longer jobs.

    .venv/bin/python benchmarks/fleet_scale.py [--jobs 1000] [--nodes 16] [--gpus 4] [--steps 10] [--step-s 0.5] [--long-step-s 4]

Writes benchmarks/results/fleet_scale.{json,md,png} atomically.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import describe, machine_description, save_png  # noqa: E402
from schema.atomic import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def fleet_jobs(count: int, run_dir: Path, steps: int, mixed_every: int | None) -> list:
    from cluster.capacity import job_shape
    from cluster.fleet import FleetJob
    from schema.job import JobConfig

    jobs = []
    for index in range(count):
        gpus = 2 if mixed_every and index % mixed_every == mixed_every - 1 else 1
        config = JobConfig.model_validate({
            "name": f"j{index:04d}", "model": "simulated", "data": {"train": {"path": "simulated.jsonl"}},
            "train": {"max_steps": steps}, "resources": {"gpus_per_job": gpus, "max_failures": 0}, "output_dir": str(run_dir / f"j{index:04d}"),
        })
        jobs.append(FleetJob(config=config, shape=job_shape(config.resources, cluster_has_gpus=True), max_failures=0))
    return jobs


def run_fleet(args: argparse.Namespace, nodes: list, work: Path, name: str, mixed_every: int | None, backfill: int | None, step_s: float) -> dict[str, Any]:
    from rich.console import Console

    from cluster.fleet import FleetRunner
    from cluster.simulation import sleeping_pack
    from cluster.view import LogLinesView

    run_dir = work / name
    jobs = fleet_jobs(args.jobs, run_dir, args.steps, mixed_every)
    slots = int(sum(node.gpus for node in nodes))
    with (work / f"{name}.log").open("w") as log:
        view = LogLinesView(Console(file=log, width=200))
        runner = FleetRunner(
            name, jobs, run_dir, nodes, view, slots=slots, max_adapters=1, backfill=backfill,
            body=functools.partial(sleeping_pack, step_s=step_s),
        )
        cpu_before, wall_before = time.process_time(), time.time()
        record = runner.run()
        cpu_s, wall_s = time.process_time() - cpu_before, time.time() - wall_before
    write_times = []
    for _ in range(5):
        started = time.perf_counter()
        path = record.write()
        write_times.append(time.perf_counter() - started)
    sleep_s = args.steps * step_s
    job_slot_time = sum(
        (a.ended_at - a.running_at) * job.workers for job in record.jobs.values() for a in job.attempts if a.running_at and a.ended_at
    )
    makespan = record.summary["makespan_s"]
    placements = [w["placed_at"] - w["requested_at"] for w in record.workers.values() if w.get("placed_at")]
    # Where the overhead goes: the time until every worker has started its first job (worker processes
    # starting, one placement at a time), and the hand-off from a job's end to the next job on its worker.
    by_worker: dict[str, list] = {}
    for job in record.jobs.values():
        for attempt in job.attempts:
            if attempt.running_at and attempt.ended_at:
                by_worker.setdefault(attempt.worker, []).append(attempt)
    handoffs = []
    for attempts in by_worker.values():
        attempts.sort(key=lambda a: a.running_at)
        handoffs += [after.running_at - before.ended_at for before, after in zip(attempts, attempts[1:])]
    all_started_s = max(min(a.running_at for a in attempts) for attempts in by_worker.values()) - record.started_at
    intervals = [(a.running_at, a.ended_at, job.workers) for job in record.jobs.values() for a in job.attempts if a.running_at and a.ended_at]
    # The order rule's cost to 2-GPU jobs: how much later each started than the 1-GPU jobs near it in fleet order.
    first_start = {name: job.attempts[0].running_at for name, job in record.jobs.items()}
    names = list(record.jobs)
    lags = sorted(
        first_start[name] - statistics.median(first_start[other] for other in names[max(0, index - 8): index + 9] if record.jobs[other].workers == 1)
        for index, name in enumerate(names) if record.jobs[name].workers == 2
    )
    slot_need = sum(job.workers for job in record.jobs.values())
    ideal = slot_need * sleep_s / slots
    return {
        "name": name,
        "job_s": sleep_s,
        "jobs": args.jobs,
        "two_gpu_jobs": sum(job.workers == 2 for job in record.jobs.values()),
        "backfill": None if runner.backfill == float("inf") else runner.backfill,  # None: no cap
        "slots": slots,
        "makespan_s": makespan,
        "ideal_s": ideal,
        "overhead_per_job_s": (makespan - ideal) / args.jobs,
        "efficiency": job_slot_time / (makespan * slots),
        "steady_efficiency": steady_efficiency(intervals, slots),
        "driver_cpu_s": cpu_s,
        "driver_wall_s": wall_s,
        "placement_latency_s": {"median": statistics.median(placements), "p95": sorted(placements)[int(0.95 * (len(placements) - 1))], "max": max(placements), "count": len(placements)},
        "two_gpu_start_lag_s": {"median": statistics.median(lags), "max": lags[-1]} if lags else None,
        "worker_starts": len(record.workers),
        "all_workers_started_s": all_started_s,
        "handoff_s": {"median": statistics.median(handoffs), "p95": sorted(handoffs)[int(0.95 * (len(handoffs) - 1))]} if handoffs else None,
        "fleet_json_bytes": path.stat().st_size,
        "fleet_json_write_s": statistics.median(write_times),
        "all_finished": all(job.state == "finished" for job in record.jobs.values()),
        "each_ran_once": all(len(job.attempts) == 1 for job in record.jobs.values()),
        "max_passes_per_head": max((len(job.passed_by) for job in record.jobs.values()), default=0),
        "timeline": [
            [int(job_name[1:]), a.running_at - record.started_at, a.ended_at - record.started_at, job.workers]
            for job_name, job in record.jobs.items()
            for a in job.attempts
            if a.running_at and a.ended_at
        ],
    }


def steady_efficiency(intervals: list[tuple[float, float, int]], slots: int) -> float | None:
    """Busy slot-time over slot-time between the moment 90% of the slots first ran jobs at once and the last
    job's start: the scheduler's own packing, without this machine's start-up ramp (every simulated node's
    processes start on its 2 cores) or the tail that no schedule avoids (the last jobs ending unevenly)."""
    events = sorted([(start, slots_) for start, _, slots_ in intervals] + [(end, -slots_) for _, end, slots_ in intervals])
    busy, full_at = 0, None
    for when, change in events:
        busy += change
        if full_at is None and busy >= 0.9 * slots:
            full_at = when
    last_start = max(start for start, _, _ in intervals)
    if full_at is None or last_start <= full_at:
        return None
    used = sum(max(0.0, min(end, last_start) - max(start, full_at)) * slots_ for start, end, slots_ in intervals)
    return used / ((last_start - full_at) * slots)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The scheduler at scale (simulated cluster)",
        "",
        f"Machine: {describe(result['machine'])}; Ray {result['ray']}.",
        f"Command: `{result['command']}` ({result['date']}).",
        f"Cluster: `ray.cluster_utils.Cluster`, {result['settings']['nodes']} nodes x {result['settings']['gpus']} fake GPUs "
        f"({result['settings']['nodes'] * result['settings']['gpus']} slots), all on this machine. Each job sleeps "
        f"{result['settings']['steps']} x {result['settings']['step_s']} s in its worker (the only stand-in)"
        + (f", {result['settings']['steps']} x {result['settings']['long_step_s']} s in the last fleet" if result["settings"]["long_step_s"] else "")
        + "; max_adapters 1.",
        "",
        "| fleet | jobs (2-GPU) | job (s) | backfill | makespan (s) | ideal (s) | overhead per job (ms) | efficiency | steady-state efficiency | placement latency median / p95 (ms) | worker starts | every worker busy after (s) | hand-off median / p95 (ms) | driver CPU (s) | fleet.json | write (ms) | 2-GPU start lag median / max (s) | every job once |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["runs"]:
        lat = run["placement_latency_s"]
        handoff = f"{1000 * run['handoff_s']['median']:.0f} / {1000 * run['handoff_s']['p95']:.0f}" if run.get("handoff_s") else "-"
        steady = f"{run['steady_efficiency']:.3f}" if run.get("steady_efficiency") is not None else "-"
        lag = f"{run['two_gpu_start_lag_s']['median']:.1f} / {run['two_gpu_start_lag_s']['max']:.1f}" if run.get("two_gpu_start_lag_s") else "-"
        lines.append(
            f"| {run['name']} | {run['jobs']} ({run['two_gpu_jobs']}) | {run['job_s']:g} | {'no cap' if run['backfill'] is None else run['backfill']} | {run['makespan_s']:.1f} | {run['ideal_s']:.1f} | "
            f"{1000 * run['overhead_per_job_s']:.1f} | {run['efficiency']:.3f} | {steady} | {1000 * lat['median']:.0f} / {1000 * lat['p95']:.0f} | {run['worker_starts']} | "
            f"{run['all_workers_started_s']:.1f} | {handoff} | "
            f"{run['driver_cpu_s']:.1f} | {run['fleet_json_bytes'] / 1024:.0f} KiB | {1000 * run['fleet_json_write_s']:.1f} | {lag} | "
            f"{'yes' if run['all_finished'] and run['each_ran_once'] else 'NO'} |"
        )
    lines += [
        "",
        "- overhead per job = (makespan − ideal) / jobs, ideal = Σ slots x sleep / cluster slots: a perfect packing with no start-up.",
        "- efficiency = Σ(job running time x its slots) / (makespan x cluster slots).",
        "- steady-state efficiency: the same, between the moment 90% of the slots first ran jobs at once and the last job's "
        "start (without this machine's start-up ramp and the unavoidable tail).",
        "- every worker busy after: from the fleet's start until the last worker set started its first job. All the worker "
        "processes of the simulated nodes start on this one machine's cores, which a real cluster spreads over its nodes.",
        "- hand-off: from a job's end to the next job's start on the same worker (no new process).",
        "- 2-GPU start lag: how much later each 2-GPU job started than the median 1-GPU job within 8 places of it in "
        "fleet order (the order rule's cost to the jobs that need a whole node).",
        f"- Targets: overhead < 50 ms per job; every job once; efficiency ≥ 0.9 with backfill. Measured: {result['verdict']}",
        "- The whole-run efficiency counts the start-up: every simulated node's worker processes start on this machine's "
        f"cores, which took {result['runs'][0]['all_workers_started_s']:.0f} s for the uniform fleet's {result['runs'][0]['slots']} "
        f"slots. Against {result['runs'][0]['job_s']:g} s jobs that is a large share of the run; the fleet of longer jobs shows "
        "the same scheduler with the start-up weighing less.",
        "",
        "![timelines](fleet_scale.png)",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    runs = result["runs"]
    figure = Figure(figsize=(6 * len(runs), 4.5))
    for index, run in enumerate(runs):
        axis = figure.add_subplot(1, len(runs), index + 1)
        for job, start, end, workers in run["timeline"]:
            axis.plot([start, end], [job, job], color="tab:red" if workers == 2 else "tab:blue", linewidth=1.5 if workers == 2 else 0.6)
        axis.set(xlabel="seconds since the fleet started", ylabel="job (fleet order)", title=f"{run['name']}: efficiency {run['efficiency']:.2f}")
        axis.invert_yaxis()
    figure.suptitle("when each job ran (blue: 1 GPU, red: 2 GPUs on one node)")
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.5)
    parser.add_argument("--mixed-every", type=int, default=4, help="every n-th job needs 2 GPUs in the mixed fleets")
    parser.add_argument("--long-step-s", type=float, default=4.0, help="step time of a last mixed fleet with backfill, of longer jobs (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from cluster.session import ray_nodes

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.gpus, num_gpus=args.gpus)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = [node for node in ray_nodes() if node.gpus > 0]
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
            fleets = [("uniform", None, None, args.step_s), ("mixed, backfill", args.mixed_every, None, args.step_s), ("mixed, no backfill", args.mixed_every, 0, args.step_s)]
            if args.long_step_s:
                fleets.append((f"mixed, backfill, {args.steps * args.long_step_s:g} s jobs", args.mixed_every, None, args.long_step_s))
            for name, mixed, backfill, step_s in fleets:
                runs.append(run_fleet(args, nodes, Path(tmp), name.replace(", ", "-").replace(" ", "-"), mixed, backfill, step_s))
                runs[-1]["name"] = name
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "timeline"}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    uniform = runs[0]
    once = all(r["all_finished"] and r["each_ran_once"] for r in runs)
    backfilled = [r for r in runs if r["two_gpu_jobs"] and r["backfill"] is None]
    verdict = [
        f"overhead {1000 * uniform['overhead_per_job_s']:.1f} ms per job ({'met' if uniform['overhead_per_job_s'] < 0.05 else 'missed'})",
        f"every job once: {'met' if once else 'missed'}",
        *(f"{r['name']}: efficiency {r['efficiency']:.3f} over the whole run ({'met' if r['efficiency'] >= 0.9 else 'missed'}), "
          f"{r['steady_efficiency']:.3f} in the steady state" for r in backfilled),
    ]
    result = {
        "machine": machine_description(),
        "ray": ray.__version__,
        "command": " ".join(["python", "benchmarks/fleet_scale.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": vars(args) | {"out": str(args.out)},
        "runs": runs,
        "verdict": "; ".join(verdict) + ".",
    }
    write_json_atomic(args.out / "fleet_scale.json", result)
    write_text_atomic(args.out / "fleet_scale.md", markdown(result))
    plot(result, args.out / "fleet_scale.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
