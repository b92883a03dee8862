"""fleet.json as the driver writes it every second: strict JSON that reads back to the same record, with
each settled job encoded once and re-encoded when it changes after all."""

from __future__ import annotations

import json
import math

from cluster.records import FINISHED, QUEUED, RUNNING, Attempt, FleetRecord, JobRecord, read_fleet_record


def record(tmp_path, jobs: int = 5) -> FleetRecord:
    fleet = FleetRecord(name="r", run_dir=str(tmp_path), slots=2, workers={"w1": {"slots": 1, "jobs": ["j0"]}})
    for index in range(jobs):
        job = JobRecord(name=f"j{index}", output_dir=str(tmp_path / f"j{index}"), workers=1, max_steps=10)
        job.attempts.append(Attempt(number=1, submitted_at=1.0 + index, worker="w1"))
        fleet.jobs[job.name] = job
    return fleet


def test_fleet_json_reads_back_as_the_record_it_was_written_from(tmp_path):
    fleet = record(tmp_path)
    fleet.jobs["j0"].state, fleet.jobs["j0"].loss = RUNNING, math.nan  # NaN is not JSON: written as null
    fleet.jobs["j1"].state, fleet.jobs["j1"].result = FINISHED, {"train_loss": 0.5, "metrics": {"eval/x/accuracy": 0.9}}
    fleet.jobs["j1"].passed_by = ["j3"]
    fleet.write()
    text = (tmp_path / "fleet.json").read_text()
    json.loads(text)  # strict JSON as a whole
    assert "NaN" not in text and len(text.splitlines()) == len(fleet.jobs) + 2  # one line per job
    again = read_fleet_record(tmp_path)
    expected = fleet.to_dict()
    got = again.to_dict()
    expected["jobs"]["j0"]["loss"] = None
    for data in (expected, got):
        data.pop("updated_at")
    assert got == expected


def test_a_settled_job_is_encoded_once_and_again_when_it_changes(tmp_path):
    fleet = record(tmp_path)
    finished = fleet.jobs["j2"]
    finished.state, finished.ended_at, finished.result = FINISHED, 9.0, {"train_loss": 0.25}
    fleet.write()
    assert "j2" in fleet._settled_lines and "j0" not in fleet._settled_lines  # queued jobs move: never cached
    line = fleet._settled_lines["j2"][1]
    fleet.write()
    assert fleet._settled_lines["j2"][1] is line  # not encoded again
    # Retried after all (a worker died after the job's end was recorded): the new attempt shows.
    finished.state = QUEUED
    finished.attempts.append(Attempt(number=2, submitted_at=10.0))
    fleet.write()
    assert read_fleet_record(tmp_path).jobs["j2"].attempt == 2 and read_fleet_record(tmp_path).jobs["j2"].state == QUEUED
