"""`lorafleet report`: a real fleet of tiny jobs (task and forgetting evaluation on) read back as report.md,
report.json, report.csv and plots; a fleet with chosen numbers for the frontier; a running fleet, a lone
job directory and the bad inputs."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.records import Attempt, FleetRecord, JobRecord
from conftest import addition_rows, write_jsonl
from launch.report import write_report
from schema.problems import ConfigError
from schema.yamlfile import dump_yaml

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DRIFT_KL, ACCURACY_DROP = "eval/forgetting/drift_kl", "eval/forgetting/accuracy_drop"
# What each job changes over the defaults: lora.r and optim.lr are the swept fields.
SWEEP = {"r4": {"lora": {"r": 4}}, "r8_fast": {"lora": {"r": 8}, "optim": {"lr": 2e-2}}, "r16": {"lora": {"r": 16}}}
# Seconds after the fleet started: submitted, running, ended (two slots: r16 waits for one).
TIMES = {"r4": (0.0, 1.0, 4.0), "r8_fast": (0.0, 1.5, 5.0), "r16": (0.5, 4.5, 8.0)}


@pytest.fixture(scope="module")
def trained_fleet(tmp_path_factory, tiny_model_dir) -> Path:
    """Three tiny jobs, trained as one pack (one base load), laid out as a fleet's run directory with its
    fleet.json. Each evaluates every 2 steps a task by loss (toy), a general task (gen) and drift."""
    from schema.fleet import deep_merge
    from schema.job import JobConfig
    from trainer.loop import run_pack

    root = tmp_path_factory.mktemp("sweep")
    train, held_out = write_jsonl(root / "train.jsonl", addition_rows(64, seed=1)), write_jsonl(root / "val.jsonl", addition_rows(16, seed=2))
    prompts = root / "general.txt"
    prompts.write_text("".join(f"What is the number {i}?\n" for i in range(6)))
    tasks = root / "tasks.yaml"
    tasks.write_text(dump_yaml({
        "tasks": [
            {"name": "toy", "path": str(held_out), "metric": "loss", "n": 4},
            {"name": "gen", "path": str(held_out), "metric": "exact_match", "n": 4, "general": True, "max_new_tokens": 4},
        ],
        "forgetting": {"prompts": str(prompts), "n": 3, "max_new_tokens": 4},
    }))
    run_dir = root / "run"
    defaults = {
        "model": str(tiny_model_dir),
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": 5e-3, "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": 4, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "seed": 7},
        "data": {"train": {"path": str(train)}, "eval": {"path": str(held_out)}},
        "eval": {"every": 2, "tasks": str(tasks)},
        "checkpoint": {"every": 0},
    }
    configs = [
        JobConfig.model_validate(deep_merge(defaults, {**changes, "name": name, "output_dir": str(run_dir / name)}))
        for name, changes in SWEEP.items()
    ]
    outcomes = run_pack(configs)
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes.values()), outcomes
    started = time.time() - 60
    record = FleetRecord(name="sweep", run_dir=str(run_dir), started_at=started, first_started_at=started, slots=2)
    for name, (submitted, running, ended) in TIMES.items():
        attempt = Attempt(number=1, submitted_at=started + submitted, placed_at=started + running, running_at=started + running, ended_at=started + ended)
        record.jobs[name] = JobRecord(name=name, output_dir=str(run_dir / name), workers=1, max_steps=4, state="finished", attempts=[attempt], ended_at=started + ended)
    record.write()
    return run_dir


@pytest.fixture
def run_dir(trained_fleet, tmp_path) -> Path:
    """A copy that a test may change: the report reads <run_dir>/<job>, so the copy is a fleet of its own."""
    return Path(shutil.copytree(trained_fleet, tmp_path / "run"))


def metrics_rows(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def logged(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


def pareto_by_sweep(points: dict[str, tuple[float, float]]) -> list[str]:
    """The front, found another way than the report finds it: walk the jobs by rising x (drift) and keep
    each that gains more than every job before it. (The values here have no ties.)"""
    front, best = [], float("-inf")
    for job, (x, y) in sorted(points.items(), key=lambda item: item[1]):
        if y > best:
            front.append(job)
            best = y
    return front


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path  # a real image, not an empty canvas


def test_a_fleet_report_has_every_file_and_plots_every_logged_step(run_dir):
    directory, _ = write_report(run_dir)
    assert directory == run_dir / "report"
    report = json.loads((directory / "report.json").read_text())  # strict JSON: json.loads would accept NaN, the file has none
    assert "NaN" not in (directory / "report.json").read_text()
    for name in ("loss.png", "frontier.png", "throughput.png", "timeline.png"):
        assert_png(directory / name)
    assert report["kind"] == "fleet" and [job["job"] for job in report["jobs"]] == list(SWEEP)
    assert report["swept"] == ["lora.r", "optim.lr"]
    jobs = {job["job"]: job for job in report["jobs"]}
    assert jobs["r8_fast"]["swept"] == {"lora.r": 8, "optim.lr": 0.02} and jobs["r4"]["label"] == "r4 (lora.r=4, optim.lr=0.005)"

    # The loss figure: one solid train line and one dashed eval line per job, a point per logged step.
    curves = report["plots"]["loss"]["series"]
    assert sorted((c["job"], c["split"]) for c in curves) == sorted((job, split) for job in SWEEP for split in ("train", "eval"))
    for curve in curves:
        steps, losses = logged(metrics_rows(run_dir / curve["job"]), f"{curve['split']}/loss")
        assert (curve["steps"], curve["loss"]) == (steps, losses)
        assert steps == ([1, 2, 3, 4] if curve["split"] == "train" else [0, 2, 4])
    assert len({c["color"] for c in curves}) == len(SWEEP)  # one colour per job

    # Final figures: from the job's own files, the task gain without the general task.
    for name, job in jobs.items():
        final = json.loads((run_dir / name / "final.json").read_text())
        rows = metrics_rows(run_dir / name)
        toy_steps, toy_losses = logged(rows, "eval/toy/loss")
        assert toy_steps[0] == 0
        assert job["task_gain"] == pytest.approx(toy_losses[0] - toy_losses[-1])  # a loss task gains by falling
        assert job["task_gains"].keys() == {"toy"}  # gen is general: it measures forgetting
        assert (job["state"], job["steps"], job["train_loss"], job["eval_loss"]) == ("finished", 4, final["train_loss"], final["eval_loss"])
        assert job["tokens_per_s"] == pytest.approx(final["tokens"] / final["wall_time_s"])
    best_eval = min(jobs, key=lambda name: jobs[name]["eval_loss"])
    assert report["winners"]["eval_loss"]["job"] == best_eval
    assert report["winners"]["task_gain"]["job"] == max(jobs, key=lambda name: jobs[name]["task_gain"])

    # The frontier: one point per job on each forgetting axis, the Pareto set as computed here.
    panels = {panel["x_metric"]: panel for panel in report["plots"]["frontier"]["panels"]}
    assert list(panels) == [DRIFT_KL, ACCURACY_DROP]
    drift = panels[DRIFT_KL]
    assert sorted(p["job"] for p in drift["points"]) == sorted(SWEEP)
    final_drift = {name: json.loads((run_dir / name / "final.json").read_text())["metrics"][DRIFT_KL] for name in SWEEP}
    assert {p["job"]: p["x"] for p in drift["points"]} == pytest.approx(final_drift)
    assert drift["pareto"] == pareto_by_sweep({name: (final_drift[name], jobs[name]["task_gain"]) for name in SWEEP})

    # Throughput and timeline.
    assert [bar["job"] for bar in report["plots"]["throughput"]["bars"]] == list(SWEEP)
    bars = {bar["job"]: bar for bar in report["plots"]["timeline"]["bars"]}
    for name, (submitted, running, ended) in TIMES.items():
        assert bars[name]["queued"] == pytest.approx([submitted, running]) and bars[name]["running"] == pytest.approx([running, ended])

    markdown = (directory / "report.md").read_text()
    for image in ("loss.png", "frontier.png", "throughput.png", "timeline.png"):
        assert f"]({image})" in markdown  # relative: the directory reads well wherever it is copied
    assert "| r4 | finished | 4 | 0.005 | 4 |" in markdown and "| r8_fast | finished | 8 | 0.02 | 4 |" in markdown
    assert f"Lowest eval loss: **{jobs[best_eval]['label']}**" in markdown
    table = list(csv.DictReader((directory / "report.csv").open()))
    assert [(row["job"], row["lora.r"], row["optim.lr"]) for row in table] == [("r4", "4", "0.005"), ("r8_fast", "8", "0.02"), ("r16", "16", "0.005")]
    assert float(table[0]["eval/forgetting/drift_kl"]) == pytest.approx(final_drift["r4"])


def write_job(directory: Path, config: dict, rows: list[dict], final: dict | None) -> None:
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(dump_yaml({"name": directory.name, **config, "output_dir": str(directory)}))
    write_jsonl(directory / "metrics.jsonl", rows)
    if final is not None:
        (directory / "final.json").write_text(json.dumps(final))


def test_the_frontier_and_task_gain_on_chosen_values(tmp_path):
    """Two tasks (accuracy, which outranks exact_match, and a loss) and a general task; the gain is the mean
    of the two tasks' gains, and the Pareto set is known."""
    # job: (lora.r, drift KL, accuracy drop, task gain)
    chosen = {"j1": (2, 0.1, 0.30, 0.10), "j2": (4, 0.2, 0.05, 0.30), "j3": (8, 0.3, 0.20, 0.20), "j4": (16, 0.5, 0.10, 0.50), "j5": (32, 0.6, 0.01, 0.40)}
    run_dir = tmp_path / "run"
    record = FleetRecord(name="chosen", run_dir=str(run_dir), state="running", slots=1)
    for name, (rank, drift, drop, gain) in chosen.items():
        base = {"step": 0, "eval/loss": 2.0, "eval/qa/accuracy": 0.2, "eval/qa/exact_match": 0.5, "eval/sum/loss": 3.0,
                "eval/chat/exact_match": 0.9, "eval/forgetting/chat_drop": 0.0, "eval/forgetting/accuracy_drop": 0.0, DRIFT_KL: 0.0}
        # qa gains gain + 0.05 and sum gain - 0.05 (its loss falls by that); exact_match falls, ignored: accuracy outranks it.
        trained = {"step": 10, "eval/loss": 1.5, "eval/qa/accuracy": 0.25 + gain, "eval/qa/exact_match": 0.0, "eval/sum/loss": 3.05 - gain,
                   "eval/chat/exact_match": 0.0, "eval/forgetting/chat_drop": drop, "eval/forgetting/accuracy_drop": drop, DRIFT_KL: drift}
        steps = [{"step": step, "train/loss": 2.0 - step / 10, "perf/tokens_per_s": 100.0 * step} for step in range(1, 11)]
        final = None if name == "j5" else {"tokens": 1000, "wall_time_s": 2.0}  # j5 is still running
        write_job(run_dir / name, {"lora": {"r": rank, "alpha": 16}}, [base, *steps, trained], final)
        record.jobs[name] = JobRecord(name=name, output_dir=str(run_dir / name), workers=1, max_steps=10, state="running")
    record.write()

    _, report = write_report(run_dir)
    assert report["swept"] == ["lora.r"]
    jobs = {job["job"]: job for job in report["jobs"]}
    for name, (_, _, _, gain) in chosen.items():
        assert jobs[name]["task_gains"] == pytest.approx({"qa": gain + 0.05, "sum": gain - 0.05})
        assert jobs[name]["task_gain"] == pytest.approx(gain)
    assert (jobs["j4"]["state"], jobs["j5"]["state"]) == ("finished", "running")
    assert jobs["j4"]["tokens_per_s"] == 500.0 and jobs["j5"]["tokens_per_s"] == pytest.approx(550.0)  # mean of the logged rates
    assert report["winners"]["task_gain"]["job"] == "j4" and report["winners"]["eval_loss"]["tied_with"] == ["j2", "j3", "j4", "j5"]
    panels = {panel["x_metric"]: panel for panel in report["plots"]["frontier"]["panels"]}
    assert panels[DRIFT_KL]["pareto"] == ["j1", "j2", "j4"] == pareto_by_sweep({n: (v[1], v[3]) for n, v in chosen.items()})
    assert panels[ACCURACY_DROP]["pareto"] == ["j5", "j4"] == pareto_by_sweep({n: (v[2], v[3]) for n, v in chosen.items()})
    assert all(len(panel["points"]) == len(chosen) for panel in panels.values())
    assert "timeline" not in report["plots"]  # no job was submitted in this record


def test_a_section_set_by_some_jobs_is_swept_by_the_fields_that_vary(tmp_path):
    """An LwF × rehearsal grid, where LwF and a second data source are set by some jobs only. Of a section's
    fields that have one value wherever they are set (LwF's temperature and `on`; the source's path, role,
    weight), none is a swept field when another field of the section varies (LwF's weight), and the first
    is when none does (the source's path). A label names only what its job sets."""
    task = {"path": "task.jsonl", "weight": 1.0}
    general = {"path": "general.jsonl", "role": "rehearsal", "weight": 0.1}
    grid = {
        "plain": {"data": {"train": [task]}, "forgetting": {"lwf": None}},
        "lwf_low": {"data": {"train": [task]}, "forgetting": {"lwf": {"weight": 0.25, "temperature": 1.0, "on": "task"}}},
        "lwf_high_mixed": {"data": {"train": [{**task, "weight": 0.9}, general]}, "forgetting": {"lwf": {"weight": 1.0, "temperature": 1.0, "on": "task"}}},
    }
    run_dir = tmp_path / "run"
    record = FleetRecord(name="grid", run_dir=str(run_dir), state="finished", slots=1)
    for name, config in grid.items():
        write_job(run_dir / name, config, [{"step": 1, "train/loss": 1.0}], {"tokens": 10, "wall_time_s": 1.0})
        record.jobs[name] = JobRecord(name=name, output_dir=str(run_dir / name), workers=1, max_steps=1, state="finished")
    record.write()

    _, report = write_report(run_dir)
    assert report["swept"] == ["data.train.0.weight", "forgetting.lwf.weight", "data.train.1.path"]  # in the order the configs write them
    labels = {job["job"]: job["label"] for job in report["jobs"]}
    assert labels == {
        "plain": "plain (data.train.0.weight=1)",
        "lwf_low": "lwf_low (data.train.0.weight=1, forgetting.lwf.weight=0.25)",
        "lwf_high_mixed": "lwf_high_mixed (data.train.0.weight=0.9, forgetting.lwf.weight=1, data.train.1.path=general.jsonl)",
    }


def test_a_running_fleet_is_reported_with_what_it_has(run_dir):
    """r16 is still training (no final.json, a half-written last line); `later` is queued (no directory)."""
    metrics = run_dir / "r16" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    (run_dir / "r16" / "final.json").unlink()
    from cluster.records import read_fleet_record

    record = read_fleet_record(run_dir)
    record.run_dir = str(run_dir)  # the copy's: fleet.json names the directory it was first written in
    record.jobs["r16"].state, record.jobs["r16"].ended_at, record.jobs["r16"].attempts[0].ended_at = "running", None, None
    record.jobs["later"] = JobRecord(name="later", output_dir=str(run_dir / "later"), workers=1, max_steps=4)
    record.write()

    directory, report = write_report(run_dir)
    jobs = {job["job"]: job for job in report["jobs"]}
    assert (jobs["r16"]["state"], jobs["later"]["state"], jobs["later"]["has_metrics"]) == ("running", "queued", False)
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith(f"{metrics}:5: skipped the half-written last line of a job that has not finished")
    kept = [json.loads(line) for line in lines[:4]]
    r16_train = next(c for c in report["plots"]["loss"]["series"] if (c["job"], c["split"]) == ("r16", "train"))
    assert r16_train["steps"] == logged(kept, "train/loss")[0] and r16_train["steps"]
    assert jobs["r16"]["tokens_per_s"] == pytest.approx(sum(logged(kept, "perf/tokens_per_s")[1]) / len(logged(kept, "perf/tokens_per_s")[1]))
    # Still running: its bar runs up to the moment of the report.
    timeline = report["plots"]["timeline"]
    running = next(bar for bar in timeline["bars"] if bar["job"] == "r16")["running"]
    assert running[1] == pytest.approx(report["generated_at"] - timeline["origin"])
    assert "later" not in {bar["job"] for bar in timeline["bars"]}
    markdown = (directory / "report.md").read_text()
    assert "| r16 | running |" in markdown and "| later | queued (no metrics yet) |" in markdown
    assert f"{metrics}:5" in markdown  # the warning is in the report too


def test_a_single_job_directory_is_reported_alone(run_dir):
    job_dir = run_dir / "r8_fast"
    directory, report = write_report(job_dir)
    assert directory == job_dir / "report"
    assert (report["kind"], report["name"], [job["job"] for job in report["jobs"]], report["swept"]) == ("job", "r8_fast", ["r8_fast"], [])
    assert set(report["plots"]) == {"loss", "frontier", "throughput"}  # no fleet, no timeline
    assert [len(panel["points"]) for panel in report["plots"]["frontier"]["panels"]] == [1, 1]
    assert sorted(path.name for path in directory.iterdir()) == ["frontier.png", "loss.png", "report.csv", "report.json", "report.md", "throughput.png"]
    assert "timeline" not in (directory / "report.md").read_text()


def test_bad_input_is_named(run_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"is not a run directory: it holds neither fleet.json"):
        write_report(tmp_path / "elsewhere")

    metrics = run_dir / "r4" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # A finished job never half-writes a line: a damaged line is an error, the last one as well as any other.
    for number in (3, len(lines)):
        damaged = list(lines)
        damaged[number - 1] = damaged[number - 1][:20]
        metrics.write_text("\n".join(damaged) + "\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(metrics))}:{number}: line {number} is not a metrics record: not valid JSON"):
            write_report(run_dir)
    metrics.write_text("\n".join(lines[:2] + ['{"train/loss": 1.0}'] + lines[2:]) + "\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(metrics))}:3: .*integer 'step'"):
        write_report(run_dir)
    assert not (run_dir / "report").exists()  # nothing written

    for name in SWEEP:
        (run_dir / name / "metrics.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"no job has logged metrics yet \(r4, r8_fast, r16\)"):
        write_report(run_dir)


def test_the_report_replaces_its_own_directory_and_never_a_foreign_one(run_dir):
    directory, first = write_report(run_dir)
    (directory / "stale.png").write_bytes(PNG_SIGNATURE)  # left by an earlier version of the report
    again, second = write_report(run_dir)
    assert again == directory and not (directory / "stale.png").exists() and second["generated_at"] > first["generated_at"]
    assert oct(directory.stat().st_mode & 0o777) == "0o755" and oct((directory / "report.md").stat().st_mode & 0o777) == "0o644"

    shutil.rmtree(directory)
    directory.mkdir()
    (directory / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"report: exists and is not a lorafleet report \(it holds no report.json\)"):
        write_report(run_dir)
    assert [path.name for path in directory.iterdir()] == ["notes.txt"] and (directory / "notes.txt").read_text() == "my notes"


def test_the_report_command(run_dir, tmp_path):
    from launch.cli import app

    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report" / "report.json").read_text())
    best = report["winners"]["eval_loss"]
    assert f"lowest eval loss: {best['label']}" in result.output and f"report: {run_dir / 'report' / 'report.md'}" in result.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "is not a run directory" in bad.output
