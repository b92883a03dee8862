"""Fleet-level TensorBoard scalars (RUN_DIR/tb/fleet) and what `lorafleet tb` serves.

Scalars are indexed by whole seconds since the fleet first started, so a re-run continues the
curves instead of drawing over them.

What `lorafleet tb` serves, all under RUN_DIR/tb/ (the job directories are only read):

- `tb/runs`, TensorBoard's --logdir: one symlink per job to its tb/ directory, plus `fleet`.
  TensorBoard names a run by its directory below --logdir, so the runs are named exactly by job
  (a --logdir_spec would name them `job/.` and show every absolute path as the data location).
- The HPARAMS experiment, in the fleet's own run: which hparams and metrics are columns, and which
  columns show by default. Each job writes only its session (its hparams, and its final metrics as
  scalars) into its own run; TensorBoard takes the experiment from the first run it finds carrying
  one, so exactly one run may, and only the fleet knows every job's config, hence which fields the
  fleet sweeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from cluster.records import FAILED, FINISHED, PLACING, QUEUED, RUNNING, SKIPPED, STARTING, FleetRecord, read_fleet_record
from schema.atomic import DIR_MODE, FILE_MODE
from schema.job import RESULT_NEUTRAL_FIELDS
from schema.jobdir import JobDir
from schema.sweep import differing_fields
from trainer.tracking import hparam_values, hparams_summary

FLEET_RUN = "fleet"
FLEET_TB = Path("tb") / FLEET_RUN
SERVED_RUNS = Path("tb") / "runs"

# The experiment's own event file in the fleet's run. "tfevents" in the name makes TensorBoard read it;
# the 0 where a writer puts its start time sorts it first.
HPARAMS_EVENTS = "events.out.tfevents.0.lorafleet-hparams"

# The HPARAMS tab shows the first 5 hparams by default, those flagged `differs` first, in name order
# (TensorBoard sorts them so), and the first 5 metrics; the rest are a checkbox away. The flagged ones
# are the fields the fleet sweeps, topped up from these to 5: a lone job shows lr, r, alpha, max_steps
# and seed.
DEFAULT_COLUMNS = 5
KEY_HPARAMS = ("optim.lr", "lora.r", "lora.alpha", "train.max_steps", "train.seed", "quant.bits", "quant.type")

# Pinned first in the Time Series tab. TensorBoard orders its tag groups by name (data, eval, fleet,
# hparam, mem, perf, train) and opens the first two; a `pinnedCards` link is the one way to put cards
# above them.
PINNED = ("train/loss", "eval/loss")


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


def prepare_serving(run_dir: str | Path) -> Path:
    """Link the runs and write the HPARAMS experiment of the fleet in `run_dir`; returns the --logdir."""
    run_dir = Path(run_dir).resolve()
    record = read_fleet_record(run_dir)
    write_hparams_experiment(run_dir, record)
    return link_runs(run_dir, record)


def link_runs(run_dir: Path, record: FleetRecord) -> Path:
    """RUN_DIR/tb/runs: a symlink to a directory of run links (<job> -> its tb/, fleet -> tb/fleet).

    The links go into a new directory named after them, which a symlink renamed over tb/runs puts in
    place: a TensorBoard already serving tb/runs sees the old set or the new one, never half of one,
    and follows the new one at its next reload. A link to a job that has not written its tb/ yet
    dangles until the job starts; TensorBoard then picks the run up by itself."""
    tb_dir = run_dir / "tb"
    if FLEET_RUN in record.jobs:
        raise ValueError(f"a job is named '{FLEET_RUN}', the name of the fleet's own TensorBoard run: rename the job")
    targets = {name: Path(job.output_dir) / "tb" for name, job in record.jobs.items()}
    targets[FLEET_RUN] = run_dir / FLEET_TB
    digest = hashlib.sha256(json.dumps(sorted((n, str(t)) for n, t in targets.items())).encode()).hexdigest()[:12]
    links = tb_dir / f".runs-{digest}"
    if not links.is_dir():
        tb_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-runs-", dir=tb_dir))
        for name, target in targets.items():
            # Relative, so the links survive moving the whole run directory.
            (staging / name).symlink_to(os.path.relpath(target, links))
        os.chmod(staging, DIR_MODE)
        try:
            staging.rename(links)
        except OSError:  # a concurrent `lorafleet tb` put the same links there first
            shutil.rmtree(staging)
    pointer = tb_dir / f".staging-runs-link-{os.getpid()}"
    pointer.unlink(missing_ok=True)
    pointer.symlink_to(links.name)
    os.replace(pointer, run_dir / SERVED_RUNS)
    for stale in tb_dir.glob(".runs-*"):
        if stale != links:
            shutil.rmtree(stale, ignore_errors=True)  # symlinks only: what they point to is never touched
    return run_dir / SERVED_RUNS


def write_hparams_experiment(run_dir: Path, record: FleetRecord) -> None:
    """The HPARAMS experiment, into the fleet's run (tb/fleet), from the jobs that have started.

    Hparams: every field of the jobs' configs (config.yaml, as each job flattens it for its session),
    the swept ones flagged `differs` so that they are the default columns. Metrics: hparam/train_loss,
    hparam/eval_loss, then each task and forgetting metric that the jobs' step-0 evaluations logged
    (the first line of metrics.jsonl). A running TensorBoard keeps the experiment it read first;
    `lorafleet tb` rewrites it at every start, so a restart shows jobs started since."""
    hparams, eval_tags = {}, set()
    for name, job in record.jobs.items():
        job_dir = JobDir(job.output_dir)
        config = job_dir.saved_config()
        if config is not None:
            hparams[name] = hparam_values(config)
            eval_tags |= _first_eval_tags(job_dir.metrics)
    if not hparams:
        return  # nothing to describe yet
    experiment = api_pb2.Experiment(hparam_infos=_hparam_infos(hparams), metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in _metric_tags(eval_tags)])
    summary = hparams_summary(plugin_data_pb2.HParamsPluginData(experiment=experiment))
    fleet_tb = run_dir / FLEET_TB
    fleet_tb.mkdir(parents=True, exist_ok=True)
    # Written whole under a name TensorBoard does not read, then renamed over the previous experiment.
    fd, staging = tempfile.mkstemp(prefix=".staging-hparams-", dir=fleet_tb)
    try:
        with os.fdopen(fd, "wb") as handle:
            records = RecordWriter(handle)
            records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            records.write(Event(wall_time=time.time(), step=0, summary=summary).SerializeToString())
            records.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, FILE_MODE)
        os.replace(staging, fleet_tb / HPARAMS_EVENTS)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _first_eval_tags(metrics_file: Path) -> set[str]:
    """The eval tags of a job's first metrics.jsonl line: its step-0 evaluation, which reports them all."""
    try:
        with metrics_file.open() as handle:
            first = json.loads(handle.readline())
    except (OSError, ValueError):  # not started, or a half-written first line
        return set()
    return {tag for tag in first if tag.startswith("eval/")}


def _metric_tags(eval_tags: set[str]) -> list[str]:
    tasks = sorted(t for t in eval_tags if t.count("/") == 2 and not t.startswith("eval/forgetting/"))
    forgetting = sorted(t for t in eval_tags if t.startswith("eval/forgetting/"))
    return ["hparam/train_loss", *(["hparam/eval_loss"] if "eval/loss" in eval_tags else []), *tasks, *forgetting]


def _hparam_infos(hparams: dict[str, dict[str, Any]]) -> list[api_pb2.HParamInfo]:
    names = sorted({name for values in hparams.values() for name in values})
    values_of = {name: [values[name] for values in hparams.values() if name in values] for name in names}
    swept = swept_hparams(list(hparams.values()))
    top_up = [name for name in KEY_HPARAMS if name in values_of and name not in swept][: max(0, DEFAULT_COLUMNS - len(swept))]
    shown = swept | set(top_up)
    return [_hparam_info(name, values_of[name], name in shown) for name in names]


def swept_hparams(jobs: list[dict[str, Any]]) -> set[str]:
    """The fields that tell the jobs apart (schema.sweep.differing_fields), from their hparams, where a
    section a job leaves out is written "None"."""
    unset = [{name: None if value == "None" else value for name, value in values.items()} for values in jobs]
    return set(differing_fields(unset, ignore=_identifies_job))


def _identifies_job(name: str) -> bool:
    """Fields that name, place or feed a job rather than tune it: they differ from job to job in most
    fleets, and the job's name (the table's Trial ID) already says which it is and what data it learns."""
    return any(name == field or name.startswith(field + ".") for field in (*RESULT_NEUTRAL_FIELDS, "data.train", "data.eval"))


def _hparam_info(name: str, values: list[Any], shown: bool) -> api_pb2.HParamInfo:
    """Typed as TensorBoard types hparams it finds in sessions: numbers as an interval, bools and text
    (and a mix of types) as their distinct values."""
    info = api_pb2.HParamInfo(name=name, differs=shown)
    if all(isinstance(v, bool) for v in values):
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.extend(sorted(set(values)))
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
    else:
        info.type = api_pb2.DATA_TYPE_STRING
        info.domain_discrete.extend(sorted({str(v) for v in values}))
    return info


def pinned_url(port: int) -> str:
    """The Time Series tab with train/loss and eval/loss pinned above every tag group."""
    cards = json.dumps([{"plugin": "scalars", "tag": tag} for tag in PINNED], separators=(",", ":"))
    return f"http://127.0.0.1:{port}/?{urllib.parse.urlencode({'pinnedCards': cards})}#timeseries"
