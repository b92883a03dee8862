"""Where a job's metrics go: TensorBoard, metrics.jsonl, a progress display, and the caller's `report`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import sys
import time
from typing import Any, Callable

import torch
from google.protobuf.struct_pb2 import Value
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from schema.atomic import json_text, write_text_atomic
from schema.jobdir import JobDir

log = logging.getLogger("lorafleet.trainer")

# Logged only when their value changes: an epoch count is a step function, and a point every step would
# draw a flat line (at zero for a job shorter than an epoch).
ON_CHANGE = {"data/epoch": 0.0}  # the value before the first change

# The HPARAMS tab's summaries, by the field of HParamsPluginData they carry.
_HPARAMS_TAGS = {
    "experiment": metadata.EXPERIMENT_TAG,
    "session_start_info": metadata.SESSION_START_INFO_TAG,
    "session_end_info": metadata.SESSION_END_INFO_TAG,
}


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
        self._step_times: list[float] = []
        self._last_line = "starting"
        self.started = time.perf_counter()
        self.first_step = resume_step
        self._last_logged = dict(ON_CHANGE)
        self._laid_out: set[str] | None = None  # the eval tags in the custom-scalars layout written so far

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
        metrics = {name: value for name, value in metrics.items() if self._changed(name, value)}
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self._lay_out(metrics)
        with self.metrics_path.open("a") as handle:
            handle.write(json_text({"step": step, **metrics}, indent=None))
        if "train/loss" in metrics:
            self._show(step, metrics)
        if self.report is not None:
            self.report({"job": self.job, "step": step, "max_steps": self.max_steps, "eta_s": self.eta_s(step), **metrics})

    def _changed(self, name: str, value: float) -> bool:
        if name not in self._last_logged:
            return True
        changed = value != self._last_logged[name]
        self._last_logged[name] = value
        return changed

    def _lay_out(self, metrics: dict[str, float]) -> None:
        """(Re)write the Custom Scalars layout when this step brings eval tags it does not chart yet (in
        practice once, at the step-0 evaluation). TensorBoard keeps a run's latest layout."""
        eval_tags = {name for name in metrics if name.startswith("eval/")}
        if self._laid_out is None or not eval_tags <= self._laid_out:
            self._laid_out = (self._laid_out or set()) | eval_tags
            self.writer.add_custom_scalars(scalars_layout(self._laid_out))

    def eta_s(self, step: int) -> float:
        done = step - self.first_step
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self.started) / done * (self.max_steps - step)

    def _show(self, step: int, metrics: dict[str, float]) -> None:
        loss, speed = metrics["train/loss"], metrics.get("perf/tokens_per_s", math.nan)
        self._step_times.append(metrics.get("perf/step_time_s", math.nan))
        if self.progress is not None:
            self._last_line = f"loss {loss:.4f}  {speed:,.0f} tok/s"
            self.progress.update(self.progress.task_ids[0], completed=step, state=self._last_line, eta=_clock(self.training_eta_s(step)))
        else:
            log.info("%s: step %d/%d loss %.4f tokens/s %.0f eta %.0fs", self.job, step, self.max_steps, loss, speed, self.eta_s(step))

    def training_eta_s(self, step: int) -> float:
        """Remaining steps times the mean time of the steps trained so far (evaluations not counted)."""
        times = [t for t in self._step_times if math.isfinite(t)]
        return sum(times) / len(times) * (self.max_steps - step) if times else math.nan

    def phase(self, text: str | None, step: int) -> None:
        """What the job is doing at `step`, between steps ("evaluating"); None: back to training. A fleet's
        view shows it too: an evaluation can take minutes, in which the step does not move."""
        if self.progress is not None:
            self.progress.update(self.progress.task_ids[0], state=text or self._last_line)
        elif text:
            log.info("%s: %s", self.job, text)
        if self.report is not None:
            self.report({"job": self.job, "step": step, "max_steps": self.max_steps, "phase": text})

    def log_hparams(self, config: dict[str, Any], final_metrics: dict[str, float], step: int) -> None:
        """The job's session in the HPARAMS tab, in the same run as its scalars: `config` flattened as its
        hparams, and `final_metrics` (hparam/train_loss, ...) as scalars at the final step, because the tab
        shows the last value of a scalar in the session's run. Which columns the tab offers and shows is the
        experiment's, written for the whole fleet (cluster.tensorboard.write_hparams_experiment): one
        experiment per job would leave TensorBoard to pick one of them at random."""
        for tag, value in final_metrics.items():
            self.writer.add_scalar(tag, value, step)
        start = plugin_data_pb2.SessionStartInfo()
        for name, value in hparam_values(config).items():
            start.hparams[name].MergeFrom(_protobuf_value(value))
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        for data in (plugin_data_pb2.HParamsPluginData(session_start_info=start), plugin_data_pb2.HParamsPluginData(session_end_info=end)):
            self.writer.file_writer.add_summary(hparams_summary(data), step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.writer.close()


def scalars_layout(eval_tags: set[str]) -> dict[str, dict[str, list]]:
    """The Custom Scalars tab (SummaryWriter.add_custom_scalars): train/loss with eval/loss on one chart,
    then each task metric, then each forgetting metric. Chart tags are regular expressions, matched in
    every run: a fleet's runs write the same charts, and TensorBoard merges the layouts of all runs,
    keeping one of each chart."""
    tasks = sorted(tag for tag in eval_tags if tag.count("/") == 2 and not tag.startswith("eval/forgetting/"))
    forgetting = sorted(tag for tag in eval_tags if tag.startswith("eval/forgetting/"))
    layout = {"train and eval": {"train/loss and eval/loss": ["Multiline", [_exactly("train/loss"), _exactly("eval/loss")]]}}
    if tasks:
        layout["task metrics"] = {tag: ["Multiline", [_exactly(tag)]] for tag in tasks}
    if forgetting:
        layout["forgetting"] = {tag: ["Multiline", [_exactly(tag)]] for tag in forgetting}
    return layout


def _exactly(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def hparam_values(config: dict[str, Any]) -> dict[str, bool | float | str]:
    """A job's hparams: its config (model_dump(mode="json")) flattened, with None and lists as text."""
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value) for name, value in flatten_config(config).items()}


def _protobuf_value(value: bool | float | str) -> Value:
    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, (int, float)):
        return Value(number_value=value)
    return Value(string_value=value)


def hparams_summary(data: plugin_data_pb2.HParamsPluginData) -> Summary:
    """A summary of the HPARAMS tab's plugin: what it reads is the metadata; the value is a null tensor."""
    tag = _HPARAMS_TAGS[data.WhichOneof("data")]
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)])


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


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _progress_display(max_steps: int, start: int) -> Progress | None:
    """A rich progress bar on a terminal; None (plain log lines) anywhere else."""
    if plain_console():
        return None
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TextColumn("eta {task.fields[eta]}"),
        transient=False,
    )
    progress.add_task("train", total=max_steps, completed=start, state="starting", eta="-")
    progress.start()
    return progress
