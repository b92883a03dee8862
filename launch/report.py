"""`lorafleet report RUN_DIR`: which job won, and what each setting cost.

Reads a fleet's run directory (fleet.json and one directory per job) or a single job's directory and
writes RUN_DIR/report/:

- report.md: the jobs in a table (their swept settings and final metrics), the winners, the plots;
- report.json: the same data, plus every plot's data under "plots"; report.csv: one row per job;
- loss.png, frontier.png (when the jobs evaluate tasks), throughput.png, timeline.png (fleets only).

The swept fields are the dotted config keys whose values differ between the jobs' config.yaml files.
A running fleet is reported with what it has so far: a job without final.json is shown with the
metrics it has logged. Each plot function takes exactly its entry of "plots", so what a test reads
back from report.json is what was drawn.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.records import FINISHED, FLEET_JSON, Attempt, FleetRecordError, read_fleet_record
from schema.atomic import atomic_directory, json_text
from schema.jobdir import JobDir
from schema.problems import ConfigError, Problem
from schema.sweep import differing_fields

REPORT_DIR, REPORT_JSON = "report", "report.json"
RUNNING = "running"
# Identify a job rather than configure it: every job has its own.
NOT_SETTINGS = ("name", "output_dir")
# A task's headline metric, in order of preference; a task that reports only a loss gains by lowering it.
HEADLINE_METRICS = ("accuracy", "exact_match", "contains")
DRIFT_KL, ACCURACY_DROP = "eval/forgetting/drift_kl", "eval/forgetting/accuracy_drop"
FRONTIER_AXES = {
    DRIFT_KL: "drift from the base: KL(base ‖ adapter) on general prompts (nats/token)",
    ACCURACY_DROP: "general-task accuracy drop: base − adapter (fraction of answers)",
}


@dataclass
class JobRun:
    """What one job has written so far."""

    name: str
    directory: Path
    state: str
    config: dict[str, Any] | None
    rows: list[dict[str, Any]]
    final: dict[str, Any] | None
    attempts: list[Attempt] = field(default_factory=list)  # from fleet.json; none for a lone job directory
    ended_at: float | None = None


@dataclass
class Run:
    directory: Path
    kind: str  # "fleet" or "job"
    name: str
    jobs: list[JobRun]
    warnings: list[str]


# -- reading -------------------------------------------------------------------------------------------


def read_metrics(path: Path, finished: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a metrics.jsonl and the warnings about it.

    A job that has not finished may be caught (or have crashed) in the middle of writing its last
    line: that line is skipped with a warning. Any other unreadable line is an error naming the file
    and the line, since the report would silently miss a step."""
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows, warnings = [], []
    for number, line in enumerate(lines, start=1):
        row, error = _metrics_row(line)
        if row is not None:
            rows.append(row)
        elif not finished and number == len(lines):
            warnings.append(f"{path}:{number}: skipped the half-written last line of a job that has not finished ({error})")
        else:
            raise ConfigError(
                Problem(
                    f"line {number} is not a metrics record: {error}",
                    file=str(path),
                    line=number,
                    fix="restore the file from a copy, or delete that line to report without it",
                )
            )
    return rows, warnings


def _metrics_row(line: str) -> tuple[dict[str, Any] | None, str]:
    try:
        row = json.loads(line)
    except ValueError as err:
        return None, f"not valid JSON ({err})"
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return None, "not a JSON object with an integer 'step'"
    return row, ""


def read_job(name: str, directory: Path, state: str | None = None) -> tuple[JobRun, list[str]]:
    """A job directory as it is now; `state` is fleet.json's word for a job that has no final.json."""
    job_dir = JobDir(directory)
    final = job_dir.read_final()
    rows, warnings = read_metrics(job_dir.metrics, finished=final is not None)
    state = FINISHED if final is not None else (state or RUNNING)
    return JobRun(name, directory, state, job_dir.saved_config(), rows, final), warnings


def read_run(run_dir: str | Path) -> Run:
    """A fleet's run directory (fleet.json) or a single job's directory (config.yaml)."""
    run_dir = Path(run_dir)
    if (run_dir / FLEET_JSON).is_file():
        run = _read_fleet(run_dir)
    elif JobDir(run_dir).config_file.is_file():
        job, warnings = read_job(run_dir.name, run_dir)
        job.name = str(job.config.get("name") or run_dir.name)
        run = Run(run_dir, "job", job.name, [job], warnings)
    else:
        raise ConfigError(
            Problem(
                "is not a run directory: it holds neither fleet.json (a fleet's output_dir) nor config.yaml (a job's output_dir)",
                file=str(run_dir),
                fix="pass the output_dir of a fleet or of a job",
            )
        )
    if not any(job.rows for job in run.jobs):
        raise ConfigError(
            Problem(
                f"no job has logged metrics yet ({', '.join(job.name for job in run.jobs)}): metrics.jsonl is missing or empty",
                file=str(run_dir),
                fix="report again once the first step is logged",
            )
        )
    return run


def _read_fleet(run_dir: Path) -> Run:
    try:
        record = read_fleet_record(run_dir)
    except FleetRecordError as err:
        raise ConfigError(str(err)) from None
    jobs, warnings = [], []
    for name, entry in record.jobs.items():
        # A fleet job always writes to <run_dir>/<name> (schema.loading), so a run directory that was
        # copied or moved is reported from its own files, not from the absolute paths fleet.json recorded.
        job, job_warnings = read_job(name, run_dir / name, entry.state)
        job.attempts, job.ended_at = entry.attempts, entry.ended_at
        jobs.append(job)
        warnings.extend(job_warnings)
    return Run(run_dir, "fleet", record.name, jobs, warnings)


# -- what differs between the jobs ------------------------------------------------------------------


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values. A list of mappings (the data sources) is flattened by index, so a
    changed source reads `data.train.0.path`; a list of plain values (betas) is one value."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(item, dict) for item in config):
        items = enumerate(config)
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def swept_fields(configs: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values differ between the configs (schema.sweep.differing_fields)."""
    return differing_fields([flatten(config) for config in configs], ignore=lambda key: key in NOT_SETTINGS)


def show_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- per-job figures ------------------------------------------------------------------------------


def final_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's last logged value (a null, which a non-finite number is written as, is skipped)."""
    values: dict[str, float] = {}
    for row in rows:
        values.update({key: value for key, value in row.items() if key != "step" and isinstance(value, (int, float))})
    return values


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def task_gains(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each task's headline gain over the base: its final value minus its value at step 0 (adapters start
    at zero, so step 0 is the base model). General tasks measure forgetting, not gain, and are left out."""
    final = final_values(rows)
    base = final_values([row for row in rows if row["step"] == 0])
    tasks = dict.fromkeys(key.split("/")[1] for key in final if key.count("/") == 2 and key.startswith("eval/") and not key.startswith("eval/forgetting/"))
    gains = {}
    for task in tasks:
        if f"eval/forgetting/{task}_drop" in final:
            continue
        headline = next((f"eval/{task}/{metric}" for metric in HEADLINE_METRICS if f"eval/{task}/{metric}" in final), None)
        key, sign = (headline, 1.0) if headline else (f"eval/{task}/loss", -1.0)
        if key in final and key in base:
            gains[task] = sign * (final[key] - base[key])
    return gains


def tokens_per_s(job: JobRun) -> tuple[float | None, str]:
    """The job's throughput and where it came from: final.json (all tokens over the whole wall time), else
    the mean of the per-step rates logged so far."""
    if job.final and job.final.get("tokens") and job.final.get("wall_time_s"):
        return job.final["tokens"] / job.final["wall_time_s"], "final.json"
    _, rates = series(job.rows, "perf/tokens_per_s")
    return (sum(rates) / len(rates), "metrics.jsonl") if rates else (None, "")


def summarize_job(job: JobRun, swept: list[str], color: str) -> dict[str, Any]:
    final = final_values(job.rows)
    flat = flatten(job.config or {})
    settings = {key: flat.get(key) for key in swept}
    # What the job sets: a field it leaves out (no LwF, no second source) is in the table, not in the label.
    shown = ", ".join(f"{key}={show_value(value)}" for key, value in settings.items() if value is not None)
    gains = task_gains(job.rows)
    throughput, throughput_source = tokens_per_s(job)
    _, initial_eval = series([row for row in job.rows if row["step"] == 0], "eval/loss")
    return {
        "job": job.name,
        "state": job.state,
        "has_metrics": bool(job.rows),
        "label": f"{job.name} ({shown})" if shown and job.config is not None else job.name,  # a queued job has no config yet
        "color": color,
        "swept": settings,
        "steps": max((row["step"] for row in job.rows), default=0),
        "train_loss": final.get("train/loss"),
        "initial_eval_loss": initial_eval[-1] if initial_eval else None,
        "eval_loss": final.get("eval/loss"),
        "task_gain": sum(gains.values()) / len(gains) if gains else None,
        "task_gains": gains,
        "tokens_per_s": throughput,
        "tokens_per_s_from": throughput_source,
        "wall_time_s": (job.final or {}).get("wall_time_s"),
        "metrics": {key: value for key, value in final.items() if key.startswith("eval/") and key != "eval/loss"},
    }


def job_colors(names: list[str]) -> dict[str, str]:
    """One colour per job, the same in every plot; distinct qualitative colours while they last."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if len(names) <= 20:
        palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
        return {name: to_hex(palette(index)) for index, name in enumerate(names)}
    palette = colormaps["turbo"]
    return {name: to_hex(palette(index / (len(names) - 1))) for index, name in enumerate(names)}


# -- plot data ------------------------------------------------------------------------------------------


def loss_plot(run: Run, summaries: dict[str, dict]) -> dict[str, Any]:
    curves = []
    for job in run.jobs:
        for split in ("train", "eval"):
            steps, losses = series(job.rows, f"{split}/loss")
            if steps:
                curves.append({"job": job.name, "color": summaries[job.name]["color"], "split": split, "steps": steps, "loss": losses})
    return {"file": "loss.png", "series": curves}


def pareto_front(points: list[dict[str, Any]]) -> list[str]:
    """The jobs no other job beats on both counts (a gain at least as high and an x at most as low, one of
    them strictly), ordered by x so that joining them draws the front."""
    front = [
        p for p in points
        if not any(q["y"] >= p["y"] and q["x"] <= p["x"] and (q["y"] > p["y"] or q["x"] < p["x"]) for q in points)
    ]
    return [p["job"] for p in sorted(front, key=lambda p: (p["x"], -p["y"]))]


def frontier_plot(summaries: list[dict]) -> dict[str, Any] | None:
    """Task gain against each forgetting measure the jobs logged; None when no job has a task gain."""
    panels = []
    for metric, axis_label in FRONTIER_AXES.items():
        points = [
            {"job": s["job"], "label": s["label"], "color": s["color"], "x": s["metrics"][metric], "y": s["task_gain"]}
            for s in summaries
            if s["task_gain"] is not None and metric in s["metrics"]
        ]
        if points:
            panels.append({"x_metric": metric, "x_label": axis_label, "points": points, "pareto": pareto_front(points)})
    return {"file": "frontier.png", "panels": panels} if panels else None


def throughput_plot(summaries: list[dict]) -> dict[str, Any] | None:
    bars = [{"job": s["job"], "color": s["color"], "tokens_per_s": s["tokens_per_s"], "from": s["tokens_per_s_from"]} for s in summaries if s["tokens_per_s"]]
    return {"file": "throughput.png", "bars": bars} if bars else None


def timeline_plot(run: Run, summaries: dict[str, dict], now: float) -> dict[str, Any] | None:
    """Each job queued (first attempt submitted, until it ran) and running (until it ended, or now), in
    seconds since the first job was submitted."""
    submitted = [job for job in run.jobs if job.attempts]
    if not submitted:
        return None
    origin = min(job.attempts[0].submitted_at for job in submitted)
    bars = []
    for job in submitted:
        first = job.attempts[0]
        end = job.ended_at or job.attempts[-1].ended_at or now
        started = first.running_at
        bars.append({
            "job": job.name,
            "color": summaries[job.name]["color"],
            "state": job.state,
            "queued": [first.submitted_at - origin, (started or end) - origin],
            "running": [started - origin, end - origin] if started is not None else None,
        })
    return {"file": "timeline.png", "origin": origin, "bars": bars}


# -- the report -----------------------------------------------------------------------------------------


def winner(summaries: list[dict], key: str, best) -> dict[str, Any] | None:
    candidates = [s for s in summaries if s[key] is not None]
    if not candidates:
        return None
    chosen = best(candidates, key=lambda s: s[key])
    tied = [s["job"] for s in candidates if s[key] == chosen[key] and s is not chosen]
    return {"job": chosen["job"], "label": chosen["label"], "state": chosen["state"], "value": chosen[key], "tied_with": tied}


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Everything report.json holds: the jobs, the swept fields, the winners and every plot's data."""
    run = read_run(run_dir)
    now = time.time()
    swept = swept_fields([job.config for job in run.jobs if job.config is not None])
    colors = job_colors([job.name for job in run.jobs])
    summaries = {job.name: summarize_job(job, swept, colors[job.name]) for job in run.jobs}
    listed = list(summaries.values())
    plots = {"loss": loss_plot(run, summaries), "frontier": frontier_plot(listed), "throughput": throughput_plot(listed)}
    if run.kind == "fleet":
        plots["timeline"] = timeline_plot(run, summaries, now)
    return {
        "run_dir": str(run.directory.resolve()),
        "kind": run.kind,
        "name": run.name,
        "generated_at": now,
        "swept": swept,
        "jobs": listed,
        "winners": {"eval_loss": winner(listed, "eval_loss", min), "task_gain": winner(listed, "task_gain", max)},
        "warnings": run.warnings,
        "plots": {key: plot for key, plot in plots.items() if plot is not None},
    }


def report_target(run_dir: str | Path) -> Path:
    """RUN_DIR/report, when lorafleet may write it: absent, or an earlier report (it holds report.json)."""
    target = Path(run_dir) / REPORT_DIR
    if target.exists() and not (target / REPORT_JSON).is_file():
        raise ConfigError(
            Problem(
                f"exists and is not a lorafleet report (it holds no {REPORT_JSON}); lorafleet never replaces files it did not write",
                file=str(target),
                fix="move it aside or rename it, then run lorafleet report again",
            )
        )
    return target


def write_report(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Build the report and write RUN_DIR/report/ in one piece (an earlier report is replaced)."""
    target = report_target(run_dir)
    report = build_report(run_dir)

    def fill(staging: Path) -> None:
        for key, plot in report["plots"].items():
            PLOTTERS[key](plot, staging / plot["file"])
        (staging / REPORT_JSON).write_text(json_text(report, indent=1))
        (staging / "report.csv").write_text(report_csv(report))
        (staging / "report.md").write_text(report_markdown(report))

    return atomic_directory(target, fill), report


# -- report.csv and report.md -----------------------------------------------------------------------------

SUMMARY_COLUMNS = ("state", "steps", "train_loss", "initial_eval_loss", "eval_loss", "task_gain", "tokens_per_s", "wall_time_s")


def metric_columns(report: dict[str, Any]) -> list[str]:
    """Every final eval metric any job has: the tasks' first, then the forgetting ones."""
    names = {name for job in report["jobs"] for name in job["metrics"]}
    return sorted(names, key=lambda name: (name.startswith("eval/forgetting/"), name))


def report_csv(report: dict[str, Any]) -> str:
    metrics = metric_columns(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["job", *report["swept"], *SUMMARY_COLUMNS, *metrics])
    for job in report["jobs"]:
        row = [job["job"], *job["swept"].values(), *(job[column] for column in SUMMARY_COLUMNS), *(job["metrics"].get(m) for m in metrics)]
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue()


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.4g}" if signed and isinstance(value, float) else show_value(value)
    return text.replace("|", "\\|")  # a value with a pipe would split the table cell


def _winner_text(best: dict[str, Any], value_format: str) -> str:
    notes = ([best["state"]] if best["state"] != FINISHED else []) + ([f"tied with {', '.join(best['tied_with'])}"] if best["tied_with"] else [])
    return f"**{best['label']}**, {best['value']:{value_format}}" + (f" ({'; '.join(notes)})" if notes else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def report_markdown(report: dict[str, Any]) -> str:
    jobs, plots, winners = report["jobs"], report["plots"], report["winners"]
    states: dict[str, int] = {}
    for job in jobs:
        states[job["state"]] = states.get(job["state"], 0) + 1
    generated = datetime.fromtimestamp(report["generated_at"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {'Fleet' if report['kind'] == 'fleet' else 'Job'} `{report['name']}`",
        "",
        f"Run directory `{report['run_dir']}`: {len(jobs)} job{'s' if len(jobs) != 1 else ''} "
        f"({', '.join(f'{count} {state}' for state, count in states.items())}); report generated {generated}.",
        "",
    ]
    if report["swept"]:
        lines += [f"Swept (the settings that differ between the jobs): {', '.join(f'`{key}`' for key in report['swept'])}.", ""]
    lines += ["## Winners", ""]
    for criterion, text, value_format in (("eval_loss", "Lowest eval loss", ".4g"), ("task_gain", "Highest task gain over the base", "+.4g")):
        if winners[criterion]:
            lines.append(f"- {text}: {_winner_text(winners[criterion], value_format)}")
    if not winners["eval_loss"] and not winners["task_gain"]:
        lines.append("No job has logged an eval loss or a task metric yet.")
    lines += ["", "## Jobs", ""]
    header = ["job", "state", *report["swept"], "steps", "train loss", "eval loss (base → final)", "task gain", "tokens/s"]
    rows = [
        [
            job["job"],
            job["state"] if job["has_metrics"] else f"{job['state']} (no metrics yet)",
            *(_cell(value) for value in job["swept"].values()),
            str(job["steps"]),
            _cell(job["train_loss"]),
            _cell(None) if job["eval_loss"] is None else f"{_cell(job['initial_eval_loss'])} → {_cell(job['eval_loss'])}",
            _cell(job["task_gain"], signed=True),
            _cell(None if job["tokens_per_s"] is None else round(job["tokens_per_s"])),
        ]
        for job in jobs
    ]
    lines += _table(header, rows)
    metrics = metric_columns(report)
    if metrics:
        lines += ["", "### Final task and forgetting metrics", ""]
        lines += _table(["job", *(m.removeprefix("eval/") for m in metrics)], [[job["job"], *(_cell(job["metrics"].get(m)) for m in metrics)] for job in jobs])
    lines += ["", "## Loss curves", "", "Train loss (solid) and eval loss (dashed) of every job against the optimizer step.", "", f"![loss curves]({plots['loss']['file']})"]
    if "frontier" in plots:
        lines += ["", "## Task gain against forgetting", "", "Each job's gain on its tasks over the base model against how far it drifted from the base; "
                  "the line joins the Pareto-optimal jobs (no other job has a higher gain and less drift).", ""]
        for panel in plots["frontier"]["panels"]:
            lines.append(f"- Pareto-optimal by `{panel['x_metric']}`: {', '.join(panel['pareto'])}")
        lines += ["", f"![task gain against forgetting]({plots['frontier']['file']})"]
    if "throughput" in plots:
        lines += ["", "## Throughput", "", f"![tokens per second per job]({plots['throughput']['file']})"]
    if "timeline" in plots:
        lines += ["", "## Timeline", "", "When each job waited for a slot (queued) and trained (running).", "", f"![fleet timeline]({plots['timeline']['file']})"]
    if report["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {warning}" for warning in report["warnings"])]
    return "\n".join(lines) + "\n"


# -- plots (matplotlib's Agg canvas: no display, no pyplot state) ------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_loss(plot: dict[str, Any], path: Path) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure = _figure(9, 5)
    axes = figure.add_subplot()
    labelled: set[str] = set()
    for curve in plot["series"]:
        style = {"linestyle": "-"} if curve["split"] == "train" else {"linestyle": "--", "marker": "o", "markersize": 4}
        label = None if curve["job"] in labelled else curve["job"]
        labelled.add(curve["job"])
        axes.plot(curve["steps"], curve["loss"], color=curve["color"], label=label, **style)
    handles, _ = axes.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", linestyle="-", label="train loss"), Line2D([], [], color="grey", linestyle="--", marker="o", label="eval loss")]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes.set(title="Loss per job: train (solid) and eval (dashed)", xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


FRONTIER_LEGEND_COLUMNS = 2  # entries side by side under the panels: a sweep's labels are long


def plot_frontier(plot: dict[str, Any], path: Path) -> None:
    panels = plot["panels"]
    entries = len({point["job"] for panel in panels for point in panel["points"]}) + 2  # + the front and the base line
    legend_rows = -(-entries // FRONTIER_LEGEND_COLUMNS)
    # The legend is the figure's, under the panels, and the figure grows with it: inside one panel a
    # fleet's worth of entries would squeeze the axes to nothing.
    figure = _figure(max(7.0 * len(panels), 10.0), 5.5 + 0.18 * legend_rows)
    legend: dict[str, Any] = {}
    for index, panel in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        by_job = {point["job"]: point for point in panel["points"]}
        for point in panel["points"]:
            # The legend names each point's swept values; the short job name beside it finds the entry.
            legend[point["label"]] = axes.scatter(point["x"], point["y"], color=point["color"], s=50, zorder=3)
            axes.annotate(point["job"], (point["x"], point["y"]), textcoords="offset points", xytext=(6, 6), fontsize="small")
        front = [by_job[job] for job in panel["pareto"]]
        # Rings as well as the line: a front of one job has no line to draw.
        (legend["Pareto front (higher gain, lower forgetting)"],) = axes.plot(
            [p["x"] for p in front], [p["y"] for p in front], color="black", linewidth=1, marker="o", markersize=12, markerfacecolor="none", zorder=2
        )
        legend["the base model (no gain)"] = axes.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        axes.set(title=f"Task gain vs {panel['x_metric'].removeprefix('eval/forgetting/')}", xlabel=panel["x_label"],
                 ylabel="task gain over the base (Δ headline metric)")
        axes.grid(alpha=0.3)
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=FRONTIER_LEGEND_COLUMNS, fontsize="x-small")
    figure.savefig(path, dpi=120)


def plot_throughput(plot: dict[str, Any], path: Path) -> None:
    bars = plot["bars"]
    figure = _figure(max(5.0, 0.7 * len(bars) + 2), 4.5)
    axes = figure.add_subplot()
    drawn = axes.bar([bar["job"] for bar in bars], [bar["tokens_per_s"] for bar in bars], color=[bar["color"] for bar in bars])
    axes.bar_label(drawn, fmt="%.0f", fontsize="small")
    axes.set(title="Training throughput per job", xlabel="job", ylabel="throughput (tokens/s)")
    axes.tick_params(axis="x", labelrotation=30)
    figure.savefig(path, dpi=120)


def plot_timeline(plot: dict[str, Any], path: Path) -> None:
    from matplotlib.patches import Patch

    bars = plot["bars"]
    figure = _figure(9, max(2.5, 0.45 * len(bars) + 1.5))
    axes = figure.add_subplot()
    for row, bar in enumerate(bars):
        start, end = bar["queued"]
        axes.barh(row, end - start, left=start, color="lightgrey", hatch="//", edgecolor="grey")
        if bar["running"] is not None:
            start, end = bar["running"]
            axes.barh(row, end - start, left=start, color=bar["color"])
    axes.set_yticks(range(len(bars)), [f"{bar['job']} ({bar['state']})" for bar in bars])
    axes.invert_yaxis()  # the first job on top, as in fleet.json
    axes.legend(handles=[Patch(facecolor="lightgrey", hatch="//", edgecolor="grey", label="queued"), Patch(facecolor="tab:blue", label="running (job colour)")],
                fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.set(title="Fleet timeline: waiting for a slot, then training", xlabel="time since the first job was submitted (s)")
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=120)


PLOTTERS = {"loss": plot_loss, "frontier": plot_frontier, "throughput": plot_throughput, "timeline": plot_timeline}
