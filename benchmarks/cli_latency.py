"""How long the `lorafleet` commands a user types most take to answer, against the Python interpreter's own
start and against importing torch (what every command paid before the CLI imported heavy libraries only
where a command needs them).

Commands, each run --repeats times as a fresh process (the installed `lorafleet` script), median reported:
- `lorafleet --help` and `lorafleet --version`;
- `lorafleet status RUN_DIR` on a fleet.json of --jobs finished jobs (written here, no training);
- `lorafleet check examples/fleet_demo.yaml` (three jobs: reads the configs, counts the data's rows and
  tokens with the model's tokenizer files, loads no model, starts no Ray).
Baselines in the same run: `python -c pass`, and `python -c "import torch"`.

    .venv/bin/python benchmarks/cli_latency.py [--repeats 5] [--jobs 50]

Writes benchmarks/results/cli_latency.{json,md,png} atomically. The target (issue 14): --help, status and
check of a small fleet each within 1.5 s on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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
TARGET_S = 1.5
BIN = Path(sys.executable).parent


def timed(command: list[str], repeats: int) -> dict[str, Any]:
    """Wall seconds of `repeats` fresh runs of `command` (after one untimed run that warms the page cache)."""
    env = {**os.environ, "COLUMNS": "120"}
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def fake_fleet(run_dir: Path, jobs: int) -> None:
    """A finished fleet's fleet.json, as the driver writes it."""
    from cluster.records import FINISHED, Attempt, FleetRecord, JobRecord

    record = FleetRecord(name="latency", run_dir=str(run_dir), slots=2, state=FINISHED, ended_at=time.time())
    for index in range(jobs):
        job = JobRecord(name=f"job{index}", output_dir=str(run_dir / f"job{index}"), workers=1, max_steps=100, state=FINISHED, step=100, loss=0.5)
        job.attempts.append(Attempt(number=1, submitted_at=time.time(), placed_at=time.time(), ended_at=time.time(), worker="w1"))
        job.result = {"steps": 100, "tokens": 51200, "train_loss": 0.5, "eval_loss": 0.6, "initial_eval_loss": 1.2, "wall_time_s": 60.0}
        record.jobs[job.name] = job
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# CLI latency",
        "",
        f"Machine: {describe(result['machine'])}; 1-, 5-, 15-minute load average at the end: {', '.join(f'{x:.1f}' for x in result['load_average'])}.",
        f"Command: `{result['command']}` ({result['date']}). Each row: {result['repeats']} fresh processes after one warm-up run; wall time.",
        "",
        "| command | median (s) | min / max (s) | x `python -c pass` | x `import torch` | within 1.5 s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    python, torch = result["rows"]["python -c pass"]["median_s"], result["rows"]["python -c 'import torch'"]["median_s"]
    for label, row in result["rows"].items():
        within = "yes" if row["median_s"] <= TARGET_S else "no"
        target = within if label.startswith("lorafleet") else "-"
        lines.append(
            f"| `{label}` | {row['median_s']:.2f} | {row['min_s']:.2f} / {row['max_s']:.2f} | {row['median_s'] / python:.1f}x | {row['median_s'] / torch:.2f}x | {target} |"
        )
    lines += ["", f"`status` reads a fleet.json of {result['jobs']} finished jobs. ![latency](cli_latency.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    labels = list(result["rows"])
    medians = [result["rows"][label]["median_s"] for label in labels]
    figure = Figure(figsize=(8, 0.5 * len(labels) + 1.5))
    axis = figure.add_subplot(1, 1, 1)
    colors = ["tab:blue" if label.startswith("lorafleet") else "tab:gray" for label in labels]
    axis.barh(range(len(labels)), medians, color=colors)
    axis.axvline(TARGET_S, color="tab:red", linestyle="--", label=f"target {TARGET_S} s")
    axis.set_yticks(range(len(labels)), labels=labels)
    axis.invert_yaxis()
    axis.set(xlabel="median wall time (s)", title=f"lorafleet commands vs. baselines ({describe(result['machine'])[:60]})")
    axis.legend()
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=50, help="jobs in the fleet.json that `status` reads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from launch.demo_data import write_demo_data
    from trainer.models import resolve_model_dir

    write_demo_data(ROOT / "examples" / "data")
    resolve_model_dir("smollm2-135m")  # the tokenizer files `check` reads, converted once before timing
    lorafleet = str(BIN / "lorafleet")
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as tmp:
        run_dir = Path(tmp) / "fleet"
        fake_fleet(run_dir, args.jobs)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "lorafleet --help": [lorafleet, "--help"],
            "lorafleet --version": [lorafleet, "--version"],
            "lorafleet status RUN_DIR": [lorafleet, "status", str(run_dir)],
            "lorafleet check examples/fleet_demo.yaml": [lorafleet, "check", "examples/fleet_demo.yaml", "--no-config"],
        }
        rows = {}
        for label, command in commands.items():
            rows[label] = timed(command, args.repeats)
            print(f"{label}: {rows[label]['median_s']:.2f} s", flush=True)
    result = {
        "machine": machine_description(),
        "command": " ".join(["python", "benchmarks/cli_latency.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats,
        "jobs": args.jobs,
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    write_json_atomic(args.out / "cli_latency.json", result)
    write_text_atomic(args.out / "cli_latency.md", markdown(result))
    plot(result, args.out / "cli_latency.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
