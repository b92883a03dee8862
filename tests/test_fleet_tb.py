"""`lorafleet tb RUN_DIR` as a user meets it: a real TensorBoard over a fleet of tiny trained jobs, read
back through TensorBoard's own HTTP API (what its tabs show)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.records import FleetRecord, JobRecord
from cluster.tensorboard import FleetScalars, prepare_serving
from schema.jobdir import JobDir
from schema.yamlfile import dump_yaml
from trainer.loop import run_pack
from trainer.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"math": {"lora": {"r": 8}, "optim": {"lr": 5e-3}}, "news": {"lora": {"r": 4}, "optim": {"lr": 1e-3}}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_jobs(run_dir: Path, make_job, toy_data, jobs: dict[str, dict]) -> list:
    """Train `jobs` in one pack into run_dir/<name>, each evaluating a task."""
    tasks = run_dir.parent / "tasks.yaml"
    tasks.write_text(dump_yaml({"tasks": [{"name": "toy", "path": str(toy_data["eval"]), "metric": "exact_match", "n": 4, "max_new_tokens": 3}]}))
    configs = [make_job(name=name, output_dir=str(run_dir / name), eval={"tasks": str(tasks)}, **sections) for name, sections in jobs.items()]
    outcomes = run_pack(configs)
    assert not any(isinstance(outcome, BaseException) for outcome in outcomes.values()), outcomes
    return configs


def train_fleet(run_dir: Path, make_job, toy_data, jobs: dict[str, dict]) -> FleetRecord:
    """A finished fleet of `jobs`: their directories, fleet.json and the fleet's own scalars."""
    record = FleetRecord(name="tiny", run_dir=str(run_dir))
    for config in train_jobs(run_dir, make_job, toy_data, jobs):
        record.jobs[config.name] = JobRecord(name=config.name, output_dir=config.output_dir, workers=1, max_steps=config.train.max_steps, state="finished")
    record.write()
    scalars = FleetScalars(run_dir, time.time())
    scalars.log(record, force=True)
    scalars.close()
    return record


def get(port: int, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def wait_for(check, server: subprocess.Popen, log: Path, seconds: float = 60):
    """`check()`'s first truthy answer, polling while TensorBoard starts up and loads."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert server.poll() is None, log.read_text()
        try:
            answer = check()
            if answer:
                return answer
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"TensorBoard did not answer in {seconds}s:\n{log.read_text()}")


def test_tb_shows_job_named_runs_no_flat_zeros_and_filled_hparams(tmp_path, make_job, toy_data):
    run_dir = tmp_path / "fleet_run"
    record = train_fleet(run_dir, make_job, toy_data, JOBS)
    trained = sorted(path for path in run_dir.rglob("*") if path.relative_to(run_dir).parts[0] != "tb")

    port, log = free_port(), tmp_path / "tensorboard.log"
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "launch.cli", "tb", str(run_dir), "--port", str(port)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # Runs: named exactly by job, plus the fleet's own; the data location is relative.
        runs = wait_for(lambda: (runs := get(port, "/data/runs")) and len(runs) == 3 and runs, server, log)
        assert sorted(runs) == ["fleet", "math", "news"]
        assert get(port, "/data/environment")["data_location"] == "fleet_run/tb/runs"

        # Scalars: no chart that would be a flat zero; train and eval are there.
        tags = wait_for(lambda: (tags := get(port, "/data/plugin/scalars/tags")) and all("hparam/train_loss" in tags.get(job, {}) for job in JOBS) and tags, server, log)
        for job in JOBS:
            assert {"train/loss", "eval/loss", "eval/toy/exact_match", "perf/tokens_per_s", "mem/peak_bytes", "hparam/eval_loss"} <= set(tags[job])
            # No rehearsal, nothing dropped, no epoch ended in 6 steps, no LwF or L2 term.
            assert not {"data/rehearsal_ratio", "data/dropped_frac", "data/epoch", "train/kl", "train/l2"} & set(tags[job]), sorted(tags[job])
        assert set(tags["fleet"]) >= {"fleet/finished_jobs", "fleet/running_jobs"}

        # Custom Scalars: train/loss with eval/loss first, then the task metric.
        layout = get(port, "/data/plugin/custom_scalars/layout")
        assert [category["title"] for category in layout["category"]] == ["train and eval", "task metrics"]
        assert layout["category"][0]["chart"][0]["multiline"]["tag"] == ["^train/loss$", "^eval/loss$"]

        # HPARAMS: every config field is a column; the swept ones (r, lr) and key fields are shown by default.
        experiment = get(port, "/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {info["name"]: info for info in experiment["hparamInfos"]}
        assert len(infos) > 40 and {"checkpoint.every", "quant.bits", "data.train"} <= set(infos)
        assert sorted(name for name, info in infos.items() if info.get("differs")) == ["lora.alpha", "lora.r", "optim.lr", "train.max_steps", "train.seed"]
        metric_tags = [info["name"]["tag"] for info in experiment["metricInfos"]]
        assert metric_tags == ["hparam/train_loss", "hparam/eval_loss", "eval/toy/exact_match"]

        # ... and every job's row has real numbers under every metric column.
        columns = [{"hparam": name, "includeInResult": True} for name in ("lora.r", "optim.lr")]
        columns += [{"metric": {"tag": tag}, "includeInResult": True} for tag in metric_tags]
        request = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                   "colParams": columns, "startIndex": 0, "sliceSize": 100}
        groups = {group["name"]: group for group in get(port, "/data/plugin/hparams/session_groups", request)["sessionGroups"]}
        assert sorted(groups) == ["math", "news"]
        for name, group in groups.items():
            assert group["hparams"]["lora.r"] == JOBS[name]["lora"]["r"] and group["hparams"]["optim.lr"] == JOBS[name]["optim"]["lr"]
            values = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
            assert set(values) == set(metric_tags), values
            assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
            final = json.loads((run_dir / name / "final.json").read_text())
            assert (values["hparam/train_loss"], values["hparam/eval_loss"]) == pytest.approx((final["train_loss"], final["eval_loss"]), rel=1e-6)

        # A job that joins the fleet later shows up in the running TensorBoard once `lorafleet tb` links
        # the runs again, even when that happens before the job has written anything.
        record.jobs["late"] = JobRecord(name="late", output_dir=str(run_dir / "late"), workers=1, max_steps=6)
        record.write()
        prepare_serving(run_dir)
        train_jobs(run_dir, make_job, toy_data, {"late": {}})
        wait_for(lambda: "late" in get(port, "/data/runs"), server, log, seconds=30)
    finally:
        server.terminate()
        server.wait(timeout=20)
    # Serving wrote under RUN_DIR/tb only: the first jobs' directories hold just what training wrote.
    assert sorted(path for path in run_dir.rglob("*") if path.relative_to(run_dir).parts[0] in JOBS) == [path for path in trained if path.relative_to(run_dir).parts[0] in JOBS]


def test_epoch_is_logged_where_it_changes_not_as_a_line_every_step(tmp_path):
    job_dir = JobDir(tmp_path / "job")
    tracker = Tracker(job_dir, "job", max_steps=6, resume_step=0, report=None, display=False)
    for step, epoch in enumerate([0, 0, 1, 1, 1, 2], start=1):
        tracker.log(step, {"train/loss": 1.0, "data/epoch": float(epoch)})
    tracker.close()
    events = EventAccumulator(str(job_dir.tb))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("data/epoch")] == [(3, 1.0), (6, 2.0)]
    assert [row.get("data/epoch") for row in map(json.loads, job_dir.metrics.read_text().splitlines())] == [None, None, 1.0, None, None, 2.0]


def test_a_section_only_some_jobs_set_is_a_swept_hparam():
    """The demo fleet: two jobs without LwF, one with it. LwF's weight is what tells them apart, shown once,
    not the unset jobs' placeholder nor the section's other fields; a swept rank still shows."""
    from cluster.tensorboard import swept_hparams

    common = {"lora.r": 16, "optim.lr": 0.001, "data.train.0.path": "a.jsonl"}
    jobs = [
        {**common, "forgetting.lwf": "None"},
        {**common, "forgetting.lwf.weight": 0.5, "forgetting.lwf.temperature": 1.0, "forgetting.lwf.on": "task"},
        {**common, "forgetting.lwf": "None", "data.train.0.path": "b.jsonl"},
    ]
    assert swept_hparams(jobs) == {"forgetting.lwf.weight"}
    jobs[2]["lora.r"] = 8
    assert swept_hparams(jobs) == {"forgetting.lwf.weight", "lora.r"}
    jobs[2] = {**common, "forgetting.lwf.weight": 1.0, "forgetting.lwf.temperature": 1.0, "forgetting.lwf.on": "task"}
    assert swept_hparams(jobs) == {"forgetting.lwf.weight"}  # varies where set: its constant siblings stay hidden
