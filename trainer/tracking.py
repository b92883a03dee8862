"""Where a job's metrics go: TensorBoard, metrics.jsonl, a progress display, and the caller's `report`."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from schema.atomic import json_text, write_text_atomic
from schema.jobdir import JobDir

log = logging.getLogger("lorafleet.trainer")


def peak_memory_bytes() -> int:
    """CUDA max allocated on a GPU; the process's peak resident set size otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Tracker:
    """Writes each logged step once, even across a resume: both the JSONL and TensorBoard are cut back to
    the resume step (TensorBoard through purge_step, which makes readers drop the orphaned later events)."""

    def __init__(self, job_dir: JobDir, job: str, max_steps: int, resume_step: int, report: Callable[[dict], None] | None, display: bool):
        self.metrics_path = job_dir.metrics
        self.job = job
        self.max_steps = max_steps
        self.report = report
        self._truncate_jsonl(resume_step)
        self.writer = SummaryWriter(log_dir=str(job_dir.tb), purge_step=resume_step + 1 if resume_step else None)
        self.progress = _progress_display(max_steps, resume_step) if display else None
        self.started = time.perf_counter()
        self.first_step = resume_step

    def _truncate_jsonl(self, resume_step: int) -> None:
        """Keep the lines up to the resume step. A line a crash left half-written is dropped, not fatal."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                log.warning("%s: dropped an unreadable line (%r...)", self.metrics_path, line[:60])
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        with self.metrics_path.open("a") as handle:
            handle.write(json_text({"step": step, **metrics}, indent=None))
        if "train/loss" in metrics:
            self._show(step, metrics)
        if self.report is not None:
            self.report({"job": self.job, "step": step, "max_steps": self.max_steps, "eta_s": self.eta_s(step), **metrics})

    def eta_s(self, step: int) -> float:
        done = step - self.first_step
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self.started) / done * (self.max_steps - step)

    def _show(self, step: int, metrics: dict[str, float]) -> None:
        loss, speed = metrics["train/loss"], metrics.get("perf/tokens_per_s", math.nan)
        if self.progress is not None:
            self.progress.update(self.progress.task_ids[0], completed=step, loss=loss, speed=speed)
        else:
            log.info("step %d/%d loss %.4f tokens/s %.0f eta %.0fs", step, self.max_steps, loss, speed, self.eta_s(step))

    def log_hparams(self, hparam_values: dict[str, Any], final_metrics: dict[str, float]) -> None:
        """The job's hyperparameters in TensorBoard's HPARAMS tab, in the same run as its scalars."""
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparam_values.items()}
        for event in hparams(values, {k: v for k, v in final_metrics.items() if isinstance(v, (int, float))}):
            self.writer.file_writer.add_summary(event)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.writer.close()


def plain_console() -> bool:
    """Plain log lines instead of live displays: not a terminal, or LORAFLEET_PLAIN_LOGS is set."""
    return not sys.stderr.isatty() or bool(os.environ.get("LORAFLEET_PLAIN_LOGS"))


def configure_console() -> None:
    """On a plain console, log lines with timestamps, and silence the libraries' progress bars, which
    would otherwise print one line per refresh into log files."""
    if plain_console():
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _progress_display(max_steps: int, start: int) -> Progress | None:
    """A rich progress bar on a terminal; None (plain log lines) anywhere else."""
    if plain_console():
        return None
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.0f} tok/s"),
        TimeRemainingColumn(),
        transient=False,
    )
    progress.add_task("train", total=max_steps, completed=start, loss=math.nan, speed=math.nan)
    progress.start()
    return progress
