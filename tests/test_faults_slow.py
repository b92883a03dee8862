"""SIGKILL at random moments while `lorafleet train` writes a checkpoint every step: a re-run always
resumes from a complete checkpoint and repeats an uninterrupted run's losses (hardening issue, faults)."""

from __future__ import annotations

import json
import random
import time

import pytest
from test_faults import (
    assert_same_losses,
    start_training,
    train_losses,
    user_job_file,
    wait_until,
)

from schema.jobdir import JobDir
from schema.loading import load_job_config
from trainer.checkpoint import checkpoint_steps, verify
from trainer.loop import run_job

TRIALS = 20


def newest_checkpoint(job_dir: JobDir) -> int:
    steps = checkpoint_steps(job_dir)
    return steps[-1] if steps else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint_taken(tiny_model_dir, toy_data, tmp_path):
    max_steps = 3 * TRIALS + 5  # each trial trains two or three steps before its kill
    job = user_job_file(tmp_path, tiny_model_dir, toy_data["train"], max_steps=max_steps, checkpoint_every=1)
    config = load_job_config(job)
    reference = config.model_copy(update={"output_dir": tmp_path / "uninterrupted"})
    run_job(reference)
    job_dir, log, delays = JobDir(config.output_dir), tmp_path / "train.log", random.Random(16)
    killed_mid_write = 0
    started = time.monotonic()
    for trial in range(TRIALS):
        process = start_training(job, log)
        resumed_at = newest_checkpoint(job_dir)
        # This process is training once it writes a checkpoint; the next one shows how long a step takes.
        wait_until(lambda resumed_at=resumed_at: newest_checkpoint(job_dir) > resumed_at, process, log)
        first = time.monotonic()
        wait_until(lambda resumed_at=resumed_at: newest_checkpoint(job_dir) > resumed_at + 1, process, log)
        period = time.monotonic() - first
        # The next checkpoint is written during the last part of the coming step: aim there, and around it.
        time.sleep(period * delays.uniform(0.6, 1.05))
        process.kill()
        process.wait()
        staging = list(job_dir.checkpoints.glob(".tmp-step-*"))
        killed_mid_write += bool(staging)
        steps = checkpoint_steps(job_dir)
        assert steps and steps[-1] < max_steps, f"trial {trial}: the job finished before its kill; raise max_steps"
        for step in steps:  # whatever the moment of the kill, every step-N there is complete
            assert verify(job_dir.checkpoints / f"step-{step}") is None, (trial, step, [p.name for p in staging])
        assert not list(job_dir.checkpoints.glob("corrupt-*")), f"trial {trial}: a re-run met a partial checkpoint"

    process = start_training(job, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    final = json.loads(job_dir.final_file.read_text())
    assert final["steps"] == max_steps and final["corrupt_checkpoints"] == []
    assert_same_losses(train_losses(config.output_dir), train_losses(reference.output_dir))
    print(f"\n{TRIALS} SIGKILLs, {killed_mid_write} of them during a checkpoint write, in {time.monotonic() - started:.0f} s")
