"""The fleet's figures, its live views and fleet.json, on hand-made records (no Ray)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from cluster.records import Attempt, FleetRecord, JobRecord, read_fleet_record, summarize
from cluster.view import LiveTableView, LogLinesView, make_view


def record_of_two_jobs(tmp_path) -> FleetRecord:
    record = FleetRecord(name="f", run_dir=str(tmp_path), slots=2, started_at=99.0)
    # Job a was interrupted in an earlier run into the same directory (before 99 s): kept, but not counted.
    record.jobs["a"] = JobRecord(
        name="a", output_dir="a", workers=1, max_steps=10, state="finished",
        attempts=[
            Attempt(number=1, submitted_at=10.0, placed_at=10.0, running_at=11.0, ended_at=50.0, error="interrupted: the driver was stopped"),
            Attempt(number=2, submitted_at=100.0, placed_at=100.0, running_at=101.0, first_step_at=105.0, ended_at=121.0),
        ],
        started_at=101.0, ended_at=121.0, result={"steps": 10, "tokens": 4000, "resumed_from_step": None, "initial_eval_loss": 2.5, "eval_loss": 0.75},
    )
    # Failed once at 110 s, retried, resumed from step 4 of 10: only 6/10 of its tokens were trained in this run.
    record.jobs["b"] = JobRecord(
        name="b", output_dir="b", workers=2, max_steps=10, state="finished",
        attempts=[
            Attempt(number=1, submitted_at=100.0, placed_at=100.5, running_at=102.0, ended_at=110.0, error="worker process died"),
            Attempt(number=2, submitted_at=110.0, placed_at=111.0, running_at=112.0, ended_at=130.0),
        ],
        started_at=102.0, ended_at=130.0, result={"steps": 10, "tokens": 5000, "resumed_from_step": 4},
    )
    record.jobs["c"] = JobRecord(name="c", output_dir="c", workers=1, max_steps=10, state="skipped", result={"steps": 10, "tokens": 999})
    return record


def test_summary_figures(tmp_path):
    summary = summarize(record_of_two_jobs(tmp_path))
    assert summary["makespan_s"] == pytest.approx(30.0)  # first submit 100 s, last end 130 s
    assert summary["job_time_s_sum"] == pytest.approx(20.0 + 8.0 + 18.0)
    assert summary["tokens"] == pytest.approx(4000 + 5000 * 6 / 10)  # the skipped job adds nothing
    assert summary["aggregate_tokens_per_s"] == pytest.approx(7000 / 30)
    assert summary["tokens_per_s_per_slot"] == pytest.approx(7000 / 30 / 2)
    assert (summary["finished"], summary["skipped"], summary["failed"]) == (2, 1, 0)


def test_fleet_json_round_trips_and_is_replaced_whole(tmp_path):
    record = record_of_two_jobs(tmp_path)
    record.summary = summarize(record)
    path = record.write()
    again = read_fleet_record(tmp_path)
    assert again.jobs["b"].attempts[0].error == "worker process died" and again.jobs["b"].attempt == 2
    assert again.to_dict()["jobs"] == record.to_dict()["jobs"]
    assert json.loads(path.read_text())["summary"]["tokens"] == 7000
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.json"]  # no temp file left behind


def test_views(tmp_path, monkeypatch):
    record = record_of_two_jobs(tmp_path)
    record.jobs["b"].state, record.jobs["b"].step, record.jobs["b"].loss, record.jobs["b"].tokens_per_s = "running", 7, 1.25, 1234.0

    plain = io.StringIO()
    view = make_view(Console(file=plain, width=200))
    assert isinstance(view, LogLinesView)
    view.update(record, {"a", "b", "c"})
    record.jobs["b"].state = "finished"
    record.summary = summarize(record)
    view.close(record)
    lines = [line.split(" ", 2)[2] for line in plain.getvalue().splitlines() if line[:2] == "20"]  # after the date and time
    assert "job b: running, attempt 2, step 7/10, loss 1.2500, 1,234 tok/s" in lines
    assert any(line.startswith("job b: finished, attempt 2") for line in lines)
    assert "fleet summary" in plain.getvalue() and "0:30" in plain.getvalue()  # the makespan
    assert "2.500 -> 0.750" in plain.getvalue()  # job a's eval loss before and after

    monkeypatch.setenv("LORAFLEET_PLAIN_LOGS", "1")
    assert isinstance(make_view(Console(file=io.StringIO(), force_terminal=True)), LogLinesView)
    monkeypatch.delenv("LORAFLEET_PLAIN_LOGS")
    terminal = io.StringIO()
    live = make_view(Console(file=terminal, force_terminal=True, width=200))
    assert isinstance(live, LiveTableView)
    live.update(record, {"a", "b", "c"})
    live.close(record)
    drawn = terminal.getvalue()
    assert "fleet f" in drawn and "fleet summary" in drawn and "233.3" in drawn  # aggregate tokens/s


def test_a_phase_shows_once_and_progress_lines_only_when_the_step_moves(tmp_path):
    record = FleetRecord(name="f", run_dir=str(tmp_path), slots=1)
    job = record.jobs["a"] = JobRecord(name="a", output_dir="a", workers=1, max_steps=40, state="starting", attempts=[Attempt(number=1, submitted_at=1.0)])
    out = io.StringIO()
    view = LogLinesView(Console(file=out, width=200), progress_every_s=0.0)

    def lines() -> list[str]:
        return [line.split(" ", 2)[2] for line in out.getvalue().splitlines()]

    view.update(record, {"a"})
    job.phase = "evaluating before training"
    for _ in range(3):  # a long evaluation: the driver ticks, nothing moves
        view.update(record, {"a"})
    assert lines() == ["job a: starting, attempt 1, step 0/40", "job a: starting (evaluating before training), attempt 1, step 0/40"]
    job.phase, job.state = None, "running"
    view.update(record, {"a"})
    job.step, job.loss = 1, 2.5
    view.update(record, set())
    view.update(record, set())
    assert lines()[2:] == ["job a: running, attempt 1, step 0/40", "job a: running, attempt 1, step 1/40, loss 2.5000"]

    # The trainer reports its phases to the fleet as it enters and leaves them.
    from schema.jobdir import JobDir
    from trainer.tracking import Tracker

    reports = []
    tracker = Tracker(JobDir(tmp_path / "a"), "a", max_steps=40, resume_step=0, report=reports.append, display=False)
    tracker.phase("evaluating", 5)
    tracker.phase(None, 5)
    tracker.close()
    assert reports == [{"job": "a", "step": 5, "max_steps": 40, "phase": "evaluating"}, {"job": "a", "step": 5, "max_steps": 40, "phase": None}]
