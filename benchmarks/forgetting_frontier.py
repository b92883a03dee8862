"""The forgetting frontier: what share of plain QLoRA's task gain each anti-forgetting setting keeps, and
what share of its drift from the base it avoids.

Runs the sweep fleet examples/forgetting_sweep.yaml (ag_news; LwF weight λ ∈ {0, 0.25, 0.5, 1} crossed
with rehearsal ∈ {none, real general data 5% / 20%, the base's own answers 5% / 20%}; same seed, steps
and data order everywhere) with `lorafleet run`, then `lorafleet report`, and answers from the report:

- for λ = 0.5 with 20% rehearsal (real and prior): the share of plain QLoRA's (lwf0-none) ag_news gain
  kept, and the share of its drift KL avoided;
- the Pareto set: which setting drifts least at each level of kept task gain;
- whether any setting keeps ≥ 98% of the gain while cutting drift KL by ≥ 50%.

    .venv/bin/python benchmarks/forgetting_frontier.py                       # the full sweep
    .venv/bin/python benchmarks/forgetting_frontier.py --model /tmp/tiny --steps 2 --n 8 \
        --work /tmp/ff-smoke --out /tmp/ff-smoke/results                      # a smoke run

A tiny local model for the smoke run: `make_tiny_model_dir(Path("/tmp/tiny"))` from tests/tiny.py.
Re-running with the same --work resumes the fleet (finished jobs are skipped). Writes
<out>/forgetting_frontier.{json,md} and the report's plots as <out>/forgetting_frontier.png (task gain
against forgetting) and <out>/forgetting_frontier_loss.png. Skips (exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
SWEEP = Path("examples/forgetting_sweep.yaml")  # relative: lorafleet runs from the repository root, as a user does
TASKS = Path("examples/forgetting_tasks.yaml")

from _common import describe, machine_description

from data_pipeline.rows import probe_prompts, task_rows
from launch.report import read_run
from schema.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from schema.jobdir import JobDir
from schema.loading import load_fleet_config, load_tasks
from schema.tasks import TasksFile
from schema.yamlfile import dump_yaml, read_yaml_file

DRIFT_KL = "eval/forgetting/drift_kl"
GOAL_GAIN_KEPT, GOAL_DRIFT_CUT = 0.98, 0.50
RECIPE_LWF, RECIPE_SHARE = 0.5, 0.2  # the seeds' recipe: λ = 0.5 with 20% rehearsal


@dataclass(frozen=True)
class Setting:
    """What a job does against forgetting, read from its config.yaml."""

    lwf: float  # the LwF weight λ; 0 without LwF
    rehearsal: str  # none, real (general data sources with role: rehearsal) or prior (the base's own answers)
    share: float  # rehearsal's share of the training tokens

    @property
    def text(self) -> str:
        rehearsal = "no rehearsal" if self.rehearsal == "none" else f"{self.rehearsal} {self.share:.0%}"
        return f"λ={self.lwf:g}, {rehearsal}"


def setting_of(config: dict[str, Any]) -> Setting:
    forgetting = config.get("forgetting") or {}
    lwf = float((forgetting.get("lwf") or {}).get("weight", 0.0))
    prior = forgetting.get("rehearsal")
    if prior:
        return Setting(lwf, "prior", float(prior["ratio"]))
    sources = config["data"]["train"]
    rehearsal = sum(source["weight"] for source in sources if source["role"] == "rehearsal")
    return Setting(lwf, "real" if rehearsal else "none", rehearsal / sum(source["weight"] for source in sources))


# -- statistics ---------------------------------------------------------------------------------------------


def binomial_se(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def gain_share(accuracy: float, plain: float, base: float, n: int) -> tuple[float, float] | tuple[None, None]:
    """(accuracy − base) / (plain − base) and its standard error by the delta method.

    The three accuracies are treated as independent binomials on n rows; the base term is shared by the
    numerator and the denominator, which the covariance accounts for. The adapters are in fact scored on the
    same rows, so their errors correlate positively and the true SE is smaller: this one is conservative."""
    plain_gain = plain - base
    if plain_gain <= 0:
        return None, None  # plain QLoRA gained nothing: there is no gain to keep a share of
    share = (accuracy - base) / plain_gain
    var_job, var_plain, var_base = (binomial_se(p, n) ** 2 for p in (accuracy, plain, base))
    variance = (var_job + var_base + share**2 * (var_plain + var_base) - 2 * share * var_base) / plain_gain**2
    return share, math.sqrt(variance)


# -- running ------------------------------------------------------------------------------------------------


def lorafleet(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *arguments]


def tasks_file(work: Path, n: int | None) -> Path:
    """The sweep's tasks file, or a copy of it in `work` with at most n rows per task and n probe prompts."""
    if n is None:
        return TASKS
    raw, _ = read_yaml_file(ROOT / TASKS, "tasks file")
    for entry in [*raw["tasks"], raw["forgetting"]]:
        entry["n"] = min(n, entry.get("n") or n)
    path = work / "tasks.yaml"
    write_text_atomic(path, dump_yaml(raw))
    return path


def fleet_overrides(args: argparse.Namespace, work: Path) -> list[str]:
    """The fleet-file overrides (KEY=VALUE) that point the fleet at `work` and shrink it for a smoke run."""
    settings = [f"output_dir={work / 'run'}", f"defaults.eval.tasks={tasks_file(work, args.n)}"]
    if args.steps is not None:
        settings.append(f"defaults.train.max_steps={args.steps}")
    if args.model is not None:
        settings.append(f"defaults.model={args.model}")
    return settings + args.set


def sweep_file(work: Path, jobs: list[str] | None) -> tuple[Path, list[str]]:
    """The sweep fleet file, or a copy of it in `work` with only `jobs` (anchors expanded); the jobs dropped."""
    if jobs is None:
        return SWEEP, []
    raw, _ = read_yaml_file(ROOT / SWEEP, "fleet file")
    names = [job["name"] for job in raw["jobs"]]
    unknown = sorted(set(jobs) - set(names))
    if unknown:
        sys.exit(f"--jobs: {', '.join(unknown)} not in {SWEEP} (its jobs: {', '.join(names)})")
    raw["jobs"] = [job for job in raw["jobs"] if job["name"] in jobs]
    path = work / "sweep.yaml"
    write_text_atomic(path, dump_yaml(json.loads(json.dumps(raw))))  # through JSON: no YAML aliases in the copy
    return path, [name for name in names if name not in jobs]


def run(command: list[str]) -> float:
    """Run a lorafleet command from the repository root (the fleet's paths start there); its seconds."""
    print("$ " + shlex.join(command), flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, check=False)  # a failure is reported below, with the command
    if finished.returncode != 0:
        sys.exit(f"{shlex.join(command)} exited with status {finished.returncode}; its output is above")
    return time.perf_counter() - started


# -- the answer ---------------------------------------------------------------------------------------------


def evaluated_rows(tasks: TasksFile) -> dict[str, int]:
    """How many rows each task and the forgetting probe evaluate (n, or fewer when the data holds fewer)."""
    rows = {task.name: len(task_rows(task)) for task in tasks.tasks}
    rows["probe"] = len(probe_prompts(tasks.forgetting))
    return rows


def job_rows(report: dict[str, Any], run_dir: Path, task: str, general: list[str], rows: dict[str, int]) -> list[dict[str, Any]]:
    """One record per job: its setting, task accuracy and gain, drift and general-task accuracies."""
    records = []
    for job in report["jobs"]:
        metrics = job["metrics"]
        accuracy = metrics[f"eval/{task}/accuracy"]
        record = {
            "job": job["job"],
            "setting": asdict(setting_of(JobDir(run_dir / job["job"]).saved_config())),
            "accuracy": accuracy,
            "accuracy_se": binomial_se(accuracy, rows[task]),
            "base_accuracy": accuracy - job["task_gains"][task],  # the report's gain is final − step 0 (the base)
            "drift_kl": metrics[DRIFT_KL],
            "general": {},
            "accuracy_drop": metrics["eval/forgetting/accuracy_drop"],
            "train_loss": job["train_loss"],
            "wall_time_s": job["wall_time_s"],
            "tokens_per_s": job["tokens_per_s"],
        }
        for name in general:
            value, drop = metrics[f"eval/{name}/accuracy"], metrics[f"eval/forgetting/{name}_drop"]
            base = value + drop
            # The drop is base − adapter on the same rows, read as two independent binomials (conservative).
            drop_se = math.sqrt(binomial_se(value, rows[name]) ** 2 + binomial_se(base, rows[name]) ** 2)
            record["general"][name] = {"accuracy": value, "base_accuracy": base, "drop": drop, "drop_se": drop_se}
        records.append(record)
    return records


def against_plain(records: list[dict[str, Any]], plain: dict[str, Any], n: int) -> None:
    """Add each job's share of plain QLoRA's gain kept (with its SE) and share of plain's drift KL avoided."""
    for record in records:
        kept, kept_se = gain_share(record["accuracy"], plain["accuracy"], record["base_accuracy"], n)
        record["gain_kept"], record["gain_kept_se"] = kept, kept_se
        record["drift_cut"] = 1.0 - record["drift_kl"] / plain["drift_kl"] if plain["drift_kl"] > 0 else None


def best_by_gain_level(records: dict[str, dict[str, Any]], pareto: list[str]) -> list[dict[str, Any]]:
    """The Pareto jobs from the most gain kept down: each is the least-drifting setting that keeps at least
    its share of the gain."""
    front = [records[name] for name in pareto if records[name]["gain_kept"] is not None]
    return sorted(front, key=lambda record: -record["gain_kept"])


def per_step_timings(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Per job: the mean optimizer-step time logged in metrics.jsonl, and the job's wall time."""
    timings = {}
    for job in read_run(run_dir).jobs:
        steps = [row["perf/step_time_s"] for row in job.rows if isinstance(row.get("perf/step_time_s"), (int, float))]
        timings[job.name] = {
            "mean_step_s": sum(steps) / len(steps) if steps else None,
            "wall_time_s": (job.final or {}).get("wall_time_s"),
        }
    return timings


# -- markdown -------------------------------------------------------------------------------------------


def percent(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.0%}" + (f" ± {se:.0%}" if se is not None else "")


def recipe_sentence(record: dict[str, Any] | None, source: str) -> str:
    if record is None:
        return f"- λ = {RECIPE_LWF:g} + {RECIPE_SHARE:.0%} {source} rehearsal: not in this run."
    return (
        f"- **λ = {RECIPE_LWF:g} + {RECIPE_SHARE:.0%} {source} rehearsal** (`{record['job']}`): keeps "
        f"**{percent(record['gain_kept'], record['gain_kept_se'])}** of plain QLoRA's ag_news gain "
        f"(accuracy {record['accuracy']:.3f} ± {record['accuracy_se']:.3f}) and avoids **{percent(record['drift_cut'])}** "
        f"of its drift KL ({record['drift_kl']:.4f} nats/token)."
    )


def goal_sentences(records: list[dict[str, Any]]) -> list[str]:
    reached = [r for r in records if r["gain_kept"] is not None and r["drift_cut"] is not None
               and r["gain_kept"] >= GOAL_GAIN_KEPT and r["drift_cut"] >= GOAL_DRIFT_CUT]
    goal = f"keep ≥ {GOAL_GAIN_KEPT:.0%} of the gain and cut drift KL by ≥ {GOAL_DRIFT_CUT:.0%}"
    if reached:
        names = ", ".join(f"`{r['job']}` ({percent(r['gain_kept'], r['gain_kept_se'])} kept, {percent(r['drift_cut'])} cut)" for r in reached)
        return [f"Goal ({goal}): **reached** on the point estimates by {names}."]
    lines = [f"Goal ({goal}): **not reached** by any setting."]
    keeping = [r for r in records if r["gain_kept"] is not None and r["gain_kept"] >= GOAL_GAIN_KEPT and r["drift_cut"] is not None]
    cutting = [r for r in records if r["drift_cut"] is not None and r["drift_cut"] >= GOAL_DRIFT_CUT and r["gain_kept"] is not None]
    if keeping:
        best = max(keeping, key=lambda r: r["drift_cut"])
        lines.append(f"Closest that keeps the gain: `{best['job']}`, {percent(best['gain_kept'], best['gain_kept_se'])} kept, {percent(best['drift_cut'])} cut.")
    if cutting:
        best = max(cutting, key=lambda r: r["gain_kept"])
        lines.append(f"Closest that cuts the drift: `{best['job']}`, {percent(best['gain_kept'], best['gain_kept_se'])} kept, {percent(best['drift_cut'])} cut.")
    return lines


def general_sentence(records: list[dict[str, Any]], plain: dict[str, Any]) -> str:
    """The other measure of forgetting, which need not agree with drift KL: the mean accuracy drop on the
    general labelled tasks, for each setting that keeps most of the gain."""
    keeping = sorted((r for r in records if r["gain_kept"] is not None and r["gain_kept"] >= 0.9), key=lambda r: r["accuracy_drop"])
    listed = "; ".join(f"`{r['job']}` {r['accuracy_drop']:+.3f}" for r in keeping)
    return (
        f"By the general tasks' mean accuracy drop (base − adapter) instead of drift KL: plain QLoRA loses {plain['accuracy_drop']:.3f}. "
        f"The settings that keep ≥ 90% of the gain, least drop first: {listed}."
    )


def dropped_sentence(summary: dict[str, Any]) -> str:
    """Which cells of the sweep's grid this run left out, and the measured cost that made it leave them."""
    ran, dropped = len(summary["jobs"]), summary["dropped_jobs"]
    per_job_s = summary["timings_s"]["fleet"] / ran
    return (
        f"**A smaller grid.** {ran} of the {ran + len(dropped)} jobs of examples/forgetting_sweep.yaml ran: the fleet took "
        f"{summary['timings_s']['fleet'] / 60:.0f} min for them on this machine ({per_job_s / 60:.0f} min per job, evaluations included), "
        f"so the whole grid would take about {per_job_s * (ran + len(dropped)) / 3600:.1f} h. Dropped: "
        + ", ".join(f"`{name}`" for name in dropped) + "."
    )


def markdown(summary: dict[str, Any]) -> str:
    records = summary["jobs"]
    by_name = {r["job"]: r for r in records}
    plain = by_name[summary["plain"]]
    rows, general = summary["evaluated_rows"], summary["general_tasks"]
    lines = [
        "# The forgetting frontier: LwF × rehearsal on ag_news (QLoRA, real data)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Budget: {summary['budget']}  ",
        f"Evaluation: {summary['evaluation']}  ",
        f"Wall time: fleet {summary['timings_s']['fleet']:.0f} s, report {summary['timings_s']['report']:.0f} s.",
        *([dropped_sentence(summary)] if summary.get("dropped_jobs") else []),
        "",
        "## The answer",
        "",
        (
            f"Plain QLoRA (`{plain['job']}`) took ag_news accuracy from {plain['base_accuracy']:.3f} (the base) to "
            f"{plain['accuracy']:.3f} ± {plain['accuracy_se']:.3f}, with drift KL {plain['drift_kl']:.4f} nats/token."
            + ("" if plain["accuracy"] > plain["base_accuracy"] else " It gained nothing, so no share of its gain can be kept: the shares below are undefined (–).")
        ),
        "",
        *(recipe_sentence(by_name.get(summary["recipe"].get(source)), source) for source in ("real", "prior")),
        "",
        *goal_sentences(records),
        "",
        general_sentence(records, plain),
        "",
        "Best setting at each level of kept task gain (the Pareto set by drift KL: no other setting keeps more gain",
        "with less drift). Read a row as: to keep at least this much of the gain, this setting drifts least.",
        "",
        "| keeps at least | setting | job | drift KL | drift avoided |",
        "|---:|---|---|---:|---:|",
    ]
    for record in summary["best_by_gain_level"]:
        lines.append(
            f"| {percent(record['gain_kept'], record['gain_kept_se'])} | {Setting(**record['setting']).text} | `{record['job']}` "
            f"| {record['drift_kl']:.4f} | {percent(record['drift_cut'])} |"
        )
    general_headers = " | ".join(f"{name} acc (drop)" for name in general)
    lines += [
        "",
        "## Every setting",
        "",
        f"| job | setting | ag_news acc | gain kept | drift KL | drift avoided | {general_headers} | train loss | wall s |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(general) + "---:|---:|",
    ]
    for r in records:
        general_cells = " | ".join(f"{r['general'][name]['accuracy']:.3f} ({r['general'][name]['drop']:+.3f} ± {r['general'][name]['drop_se']:.3f})" for name in general)
        lines.append(
            f"| `{r['job']}` | {Setting(**r['setting']).text} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} "
            f"| {percent(r['gain_kept'], r['gain_kept_se'])} | {r['drift_kl']:.4f} | {percent(r['drift_cut'])} | {general_cells} "
            f"| {r['train_loss']:.3f} | {r['wall_time_s']:.0f} |"
        )
    general_base = ", ".join(f"{name} {plain['general'][name]['base_accuracy']:.3f}" for name in general)
    lines += [
        "",
        f"Base model: ag_news {plain['base_accuracy']:.3f}, {general_base}. A general task's drop is base − adapter (positive: forgotten).",
        "",
        "## How the numbers were computed",
        "",
        (
            f"- Accuracy standard error: √(p(1−p)/n), n = {rows[summary['task']]} held-out ag_news articles "
            f"({', '.join(f'{rows[name]} rows of {name}' for name in general)})."
        ),
        (
            "- Gain kept = (acc − base) / (plain acc − base). Its ± is one standard error by the **delta method** (error "
            "propagation), the three accuracies read as independent binomials with the shared base term's covariance included. "
            "All adapters are scored on the same rows, so their errors correlate and the true SE is smaller: the ± is conservative."
        ),
        "- A general task's drop: base − adapter on the same rows; its ± treats the two as independent (conservative).",
        (
            f"- Drift avoided = 1 − drift KL / plain QLoRA's drift KL. Drift KL is the mean per-token KL(base ‖ adapter) "
            f"over the base's own answers to {rows['probe']} held-out general instructions. **Its standard error is not "
            "available**: the run directory holds only each evaluation's mean (eval/forgetting/drift_kl), not per-prompt "
            "values, so the spread over prompts cannot be computed from it."
        ),
        (
            "- The Pareto set is `lorafleet report`'s (task gain against drift KL); gain kept is a fixed rescaling of the "
            "task gain, so the set is the same."
        ),
        "",
        "## Plots (from `lorafleet report`)",
        "",
        "![task gain against forgetting](forgetting_frontier.png)",
        "",
        "![loss curves](forgetting_frontier_loss.png)",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per job (default: the fleet file's 40).")
    parser.add_argument("--n", type=int, default=None, help="At most this many rows per eval task and probe prompts (default: the tasks file's).")
    parser.add_argument("--model", default=None, help="Base model (default: the fleet file's smollm2-135m); a tiny local model makes a smoke run.")
    parser.add_argument("--jobs", nargs="+", default=None, metavar="JOB", help="Run only these jobs of the sweep (a smaller grid); the dropped ones are named in the results.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Any other fleet-file override, passed to lorafleet run (repeatable).")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "forgetting_frontier", help="Work directory: the fleet runs into WORK/run.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where forgetting_frontier.{json,md,png} go.")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if not (DATA / "t0").is_dir() or not (DATA / "general_prompts").is_dir():
        print(f"skipped: real data not found at {DATA} (needs t0/ and general_prompts/)")
        return
    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    settings = fleet_overrides(args, work)
    sweep, dropped = sweep_file(work, args.jobs)
    fleet = load_fleet_config(ROOT / sweep, settings)
    fleet_s = run(lorafleet("run", str(sweep), *(option for setting in settings for option in ("--set", setting))))
    report_s = run(lorafleet("report", str(run_dir)))
    report = json.loads((run_dir / "report" / "report.json").read_text())

    tasks = load_tasks(ROOT / fleet.jobs[0].eval.tasks)  # an absolute path stays as it is
    task = next(t.name for t in tasks.tasks if not t.general)
    general = [t.name for t in tasks.tasks if t.general]
    rows = evaluated_rows(tasks)
    records = job_rows(report, run_dir, task, general, rows)
    by_setting = {Setting(**r["setting"]): r for r in records}
    plain = by_setting[Setting(0.0, "none", 0.0)]
    against_plain(records, plain, rows[task])
    panel = next(p for p in report["plots"]["frontier"]["panels"] if p["x_metric"] == DRIFT_KL)
    recipe = {source: by_setting[key]["job"] for source in ("real", "prior") if (key := Setting(RECIPE_LWF, source, RECIPE_SHARE)) in by_setting}

    train = fleet.jobs[0].train
    summary = {
        "command": "python benchmarks/forgetting_frontier.py " + shlex.join(sys.argv[1:]),
        "machine": describe(machine_description()),
        "budget": (
            f"{len(fleet.jobs)} jobs of {train.max_steps} steps x {train.micro_batch} x {train.seq_len} tokens "
            f"({train.max_steps * train.micro_batch * train.seq_len:,} tokens each), seed {train.seed}, {fleet.jobs[0].model} "
            f"{fleet.jobs[0].quant.bits}-bit {fleet.jobs[0].quant.type} QLoRA r{fleet.jobs[0].lora.r} {fleet.jobs[0].lora.targets}, "
            f"lr {fleet.jobs[0].optim.lr:g} {fleet.jobs[0].optim.schedule}"
        ),
        "evaluation": (
            f"{task} label accuracy on {rows[task]} held-out articles; general tasks "
            f"{', '.join(f'{name} ({rows[name]} rows)' for name in general)}; drift KL on {rows['probe']} held-out general instructions"
        ),
        "dropped_jobs": dropped,
        "task": task,
        "general_tasks": general,
        "evaluated_rows": rows,
        "plain": plain["job"],
        "recipe": recipe,
        "goal": {"gain_kept": GOAL_GAIN_KEPT, "drift_cut": GOAL_DRIFT_CUT},
        "jobs": records,
        "pareto_by_drift_kl": panel["pareto"],
        "best_by_gain_level": best_by_gain_level({r["job"]: r for r in records}, panel["pareto"]),
        "timings_s": {"fleet": fleet_s, "report": report_s, "per_job": per_step_timings(run_dir)},
        "report_dir": str(run_dir / "report"),
    }
    for plot, name in (("frontier", "forgetting_frontier.png"), ("loss", "forgetting_frontier_loss.png")):
        write_bytes_atomic(out / name, (run_dir / "report" / report["plots"][plot]["file"]).read_bytes())
    write_json_atomic(out / "forgetting_frontier.json", summary, indent=2)
    write_text_atomic(out / "forgetting_frontier.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
