"""Fleet-level TensorBoard scalars (RUN_DIR/tb/fleet) and the layout `lorafleet tb` serves.

Scalars are indexed by whole seconds since the fleet first started, so a re-run continues the
curves instead of drawing over them.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from cluster.records import FAILED, FINISHED, PLACING, QUEUED, RUNNING, SKIPPED, STARTING, FleetRecord, read_fleet_record

FLEET_TB = Path("tb") / "fleet"


class FleetScalars:
    """Writes fleet/{running,waiting,finished,failed}_jobs and fleet/aggregate_tokens_per_s, at most once a second."""

    def __init__(self, run_dir: Path, first_started_at: float, every_s: float = 1.0) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / FLEET_TB))
        self.first_started_at = first_started_at
        self.every_s = every_s
        self._last = 0.0

    def log(self, record: FleetRecord, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        step = int(now - self.first_started_at)
        running = [job for job in record.jobs.values() if job.state == RUNNING]
        values = {
            # Jobs holding slots; a job whose placement group is still pending is waiting, like a queued one.
            "fleet/running_jobs": record.count(STARTING, RUNNING),
            "fleet/waiting_jobs": record.count(QUEUED, PLACING),
            "fleet/finished_jobs": record.count(FINISHED, SKIPPED),
            "fleet/failed_jobs": record.count(FAILED),
            "fleet/aggregate_tokens_per_s": sum(job.tokens_per_s or 0.0 for job in running),
        }
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=now)

    def close(self) -> None:
        self.writer.close()


def logdir_spec(run_dir: str | Path) -> str:
    """TensorBoard's --logdir_spec: one run per job (its tb/ directory) plus `fleet`."""
    run_dir = Path(run_dir)
    record = read_fleet_record(run_dir)
    runs = {name: Path(job.output_dir) / "tb" for name, job in record.jobs.items()}
    runs["fleet"] = run_dir / FLEET_TB
    return ",".join(f"{name}:{path.resolve()}" for name, path in runs.items())
