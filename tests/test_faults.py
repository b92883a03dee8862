"""Faults found by trying lorafleet as a hostile user would (issue: faults measured), each with a test
that failed before the fix: a checkpoint that runs code, NaN training that succeeds, a resume at the
very end that reports NaN, an embedded Ray cluster listening on every interface, and files only their
owner could read. Then the faults of the hardening issue: a corrupt newest checkpoint, a full disk while
writing one, SIGTERM to `lorafleet train` (SIGKILL at random moments is in test_faults_slow.py)."""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import trainer.checkpoint
import trainer.job
from launch.cli import app
from schema.jobdir import JobDir
from schema.loading import load_job_config
from schema.yamlfile import dump_yaml
from trainer.checkpoint import MANIFEST, _write_manifest, checkpoint_steps, verify
from trainer.errors import JobError
from trainer.loop import run_job

ROOT = Path(__file__).resolve().parents[1]


class PlantedCode:
    """A pickle that creates a file when unpickled: what an attacker would put in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crash_at(step: int):
    def report(metrics: dict) -> None:
        if metrics.get("step") == step and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated crash")

    return report


def job_file(tmp_path, config) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(dump_yaml(config.model_dump(mode="json")))
    return str(path)


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng.safetensors", "adapter/adapter_model.safetensors"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(make_job, tmp_path, planted):
    config = make_job(train={"max_steps": 4}, checkpoint={"every": 2, "keep": 2})
    with pytest.raises(KeyboardInterrupt):
        run_job(config, report=crash_at(3))
    checkpoint = config.output_dir / "checkpoints" / "step-2"
    marker = tmp_path / "code-ran"
    torch.save({"state": PlantedCode(str(marker))}, checkpoint / planted)  # a pickle, under the file's own name

    # With the manifest left as written, the checkpoint no longer verifies: it is set aside, named, never read.
    result = run_job(config)
    assert not marker.exists()
    assert result.resumed_from_step is None and len(result.corrupt_checkpoints) == 1
    assert planted in result.corrupt_checkpoints[0] and "the manifest says" in result.corrupt_checkpoints[0]
    assert (config.output_dir / "checkpoints" / "corrupt-step-2" / planted).is_file()  # kept for a human, not deleted
    assert json.loads((config.output_dir / "final.json").read_text())["corrupt_checkpoints"] == result.corrupt_checkpoints


def test_a_pickle_with_a_forged_manifest_is_refused_by_name(make_job, tmp_path):
    config = make_job(train={"max_steps": 4}, checkpoint={"every": 2, "keep": 2})
    with pytest.raises(KeyboardInterrupt):
        run_job(config, report=crash_at(3))
    checkpoint = config.output_dir / "checkpoints" / "step-2"
    marker = tmp_path / "code-ran"
    with open(checkpoint / "optimizer.pt", "wb") as handle:
        pickle.dump({"optimizer": PlantedCode(str(marker))}, handle)
    _write_manifest(checkpoint)  # the attacker rewrote the manifest too: the file's content itself is refused
    with pytest.raises(JobError, match=r"optimizer\.pt: refused to load .* only tensors and numbers are read"):
        run_job(config)
    assert not marker.exists()


def test_nan_training_fails_and_writes_nothing_non_finite(make_job, tmp_path):
    config = make_job(optim={"lr": 1.0e20}, train={"max_steps": 6}, checkpoint={"every": 1, "keep": 5})
    result = CliRunner().invoke(app, ["train", job_file(tmp_path, config)])
    assert result.exit_code == 1, result.output
    assert "the loss is nan at step 2" in result.output and "step-1" in result.output  # the step and the last good checkpoint
    assert not (config.output_dir / "adapter").exists() and not (config.output_dir / "final.json").exists()
    checkpoints = sorted((config.output_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-1"]
    assert all(torch.isfinite(t).all() for t in load_file(checkpoints[0] / "adapter" / "adapter_model.safetensors").values())


def test_skip_step_skips_non_finite_updates_and_counts_them(make_job):
    config = make_job(optim={"lr": 1.0e20}, train={"max_steps": 5, "on_nonfinite": "skip_step"})
    result = run_job(config)
    assert result.skipped_steps >= 1 and result.steps == 5
    rows = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("train/skipped_steps", 0) for row in rows) == result.skipped_steps
    weights = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_values_are_refused_before_anything_runs(make_job, tmp_path):
    for field, value in (("optim.lr", ".inf"), ("optim.lr", "1.0e999"), ("lora.alpha", ".inf"), ("optim.betas", "[1.5, 2.0]")):
        result = CliRunner().invoke(app, ["train", job_file(tmp_path, make_job()), "--set", f"{field}={value}"])
        assert result.exit_code == 2, (field, value, result.output)
        assert field.split(".")[-1] in result.output and ("finite" in result.output or "[0, 1)" in result.output), result.output
    assert not (tmp_path / "run").exists()


def test_compose_refuses_nan_weights(tmp_path):
    result = CliRunner().invoke(app, ["compose", "--adapters", "a", "b", "--weights", "nan", "nan", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "finite" in result.output
    assert not (tmp_path / "out").exists()


def test_a_resume_at_the_very_end_reports_the_real_result(make_job, tmp_path, monkeypatch):
    reference = make_job(train={"max_steps": 4}, eval={"every": 2}, checkpoint={"every": 2, "keep": 2}, output_dir=str(tmp_path / "reference"))
    expected = json.loads(json.dumps(run_job(reference).to_dict()))
    config = reference.model_copy(update={"output_dir": tmp_path / "killed"})

    def die_before_final_json(self):
        raise KeyboardInterrupt("killed after the last checkpoint, before final.json")

    with monkeypatch.context() as patch:
        patch.setattr(trainer.job.AdapterJob, "finish", die_before_final_json)
        with pytest.raises(KeyboardInterrupt):
            run_job(config)
    assert (config.output_dir / "checkpoints" / "step-4").is_dir() and not (config.output_dir / "final.json").exists()
    # A crash between a checkpoint's rename and the pruning leaves one too many: the resume prunes it.
    shutil.copytree(config.output_dir / "checkpoints" / "step-2", config.output_dir / "checkpoints" / "step-1")
    result = run_job(config)
    final_text = (config.output_dir / "final.json").read_text()
    final = json.loads(final_text, parse_constant=lambda name: pytest.fail(f"final.json holds {name}: not JSON"))
    assert result.resumed_from_step == 4 and final["steps"] == 4
    assert final["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6) and math.isfinite(final["train_loss"])
    assert final["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert final["eval_loss"] != pytest.approx(final["initial_eval_loss"])
    assert final["metrics"] == pytest.approx(expected["metrics"], rel=1e-6) and final["metrics"]
    assert sorted(p.name for p in (config.output_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]  # keep: 2


def test_files_are_readable_by_everyone(make_job, tmp_path):
    from compositor.restore import restore

    config = make_job(train={"max_steps": 2}, checkpoint={"every": 1, "keep": 1})
    run_job(config)
    merged = tmp_path / "merged"
    restore(config.output_dir / "adapter", 16, merged, merge=True, compare_merges=False)
    # The adapter, its checkpoints (safetensors' save_file alone would leave 0600), a merged model, and the
    # caches of this session (token caches, validation markers; conftest points LORAFLEET_CACHE at them).
    cache_entries = [p for p in Path(os.environ["LORAFLEET_CACHE"]).iterdir() if p.is_dir()]  # the root itself is pytest's
    assert cache_entries
    for root in (config.output_dir, merged, *cache_entries):
        for directory, _, files in os.walk(root):
            assert stat.S_IMODE(os.stat(directory).st_mode) & 0o055 == 0o055, directory
            for name in files:
                if name.endswith(".lock") or name.startswith(".lock-"):
                    continue  # lock files hold no data
                mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
                assert mode & 0o044 == 0o044, (os.path.join(directory, name), oct(mode))
    assert (config.output_dir / "checkpoints" / "step-2" / MANIFEST).is_file()


def test_fleet_json_is_readable_by_everyone(tmp_path):
    from cluster.records import FleetRecord

    path = FleetRecord(name="f", run_dir=str(tmp_path)).write()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_the_embedded_ray_cluster_listens_on_loopback_only():
    psutil = pytest.importorskip("psutil")
    import ray

    from cluster.session import ray_session

    if ray.is_initialized():
        ray.shutdown()

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    with ray_session(num_cpus=1, num_gpus=0):
        probe = Probe.remote()
        ray.get(probe.pid.remote())
        ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found none of the cluster's listening sockets"
    exposed = []
    for connection in listening:
        address = ipaddress.ip_address(connection.laddr.ip)
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            exposed.append((connection.laddr, psutil.Process(connection.pid).name()))
    assert exposed == []


def train_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step


@pytest.mark.parametrize("truncated", ["optimizer.pt", "adapter/adapter_model.safetensors"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(make_job, truncated, caplog):
    config = make_job(train={"max_steps": 6}, checkpoint={"every": 2, "keep": 2})
    # The crash comes after step 6 is logged and before its checkpoint: steps 1-6 are an uninterrupted run's losses.
    with pytest.raises(KeyboardInterrupt):
        run_job(config, report=crash_at(6))
    uninterrupted = train_losses(config.output_dir)
    checkpoints = config.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"] and sorted(uninterrupted) == list(range(1, 7))
    damaged = checkpoints / "step-4" / truncated
    truncated_size = damaged.stat().st_size // 2
    os.truncate(damaged, truncated_size)  # as a full disk or a copy that stopped halfway leaves it

    with caplog.at_level("WARNING", logger="lorafleet.trainer"):
        result = run_job(config)
    assert result.resumed_from_step == 2 and result.steps == 6
    assert len(result.corrupt_checkpoints) == 1 and "step-4" in result.corrupt_checkpoints[0] and truncated in result.corrupt_checkpoints[0]
    assert "step-4" in caplog.text and "corrupt" in caplog.text and truncated in caplog.text
    assert json.loads((config.output_dir / "final.json").read_text())["corrupt_checkpoints"] == result.corrupt_checkpoints
    set_aside = checkpoints / "corrupt-step-4"
    assert (set_aside / truncated).stat().st_size == truncated_size and verify(set_aside) is not None  # kept as found, for a human
    assert verify(checkpoints / "step-4") is None  # written again by the resumed run
    assert_same_losses(train_losses(config.output_dir), uninterrupted)


def test_a_full_disk_while_checkpointing_fails_by_name_and_keeps_the_previous_checkpoint(make_job, monkeypatch):
    config = make_job(train={"max_steps": 4}, checkpoint={"every": 2, "keep": 2})
    real_save_file, writes = trainer.checkpoint.save_file, []

    def disk_full_at_the_second_checkpoint(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == 2:  # rng.safetensors of step-4, after its adapter and optimizer.pt were written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.checkpoint, "save_file", disk_full_at_the_second_checkpoint)
        with pytest.raises(JobError) as failure:
            run_job(config)
    uninterrupted = train_losses(config.output_dir)  # steps 1-4, logged before step 4's checkpoint failed
    message = str(failure.value)
    checkpoints = config.output_dir / "checkpoints"
    previous = checkpoints / "step-2"
    mount = trainer.checkpoint._mount_point(checkpoints)
    assert f"the disk at {mount} is full" in message and str(checkpoints / "step-4") in message
    needed = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    assert f"needs about {needed} bytes" in message and "bytes are free" in message
    assert f"the previous checkpoint {previous} is intact and resumable" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]  # no .tmp-* staging directory left behind
    assert verify(previous) is None
    assert not (config.output_dir / "final.json").exists() and sorted(uninterrupted) == [1, 2, 3, 4]

    result = run_job(config)  # space freed: the same job resumes
    assert result.resumed_from_step == 2 and result.corrupt_checkpoints == []
    assert_same_losses(train_losses(config.output_dir), uninterrupted)


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(make_job, monkeypatch):
    config = make_job(train={"max_steps": 3}, checkpoint={"every": 1, "keep": 2})
    checkpoints, real_rmtree = config.output_dir / "checkpoints", shutil.rmtree

    def killed_halfway_through_step_1(path, *args, **kwargs):
        if not Path(path).name.endswith("step-1"):
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "optimizer.pt").unlink()  # the first files are gone, the manifest not yet
        raise KeyboardInterrupt("killed while pruning step-1")

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", killed_halfway_through_step_1)
        with pytest.raises(KeyboardInterrupt):
            run_job(config)  # step 3's checkpoint prunes step-1
    assert [p.name for p in checkpoints.glob("step-*")] and all(verify(p) is None for p in checkpoints.glob("step-*"))
    result = run_job(config)
    assert result.resumed_from_step == 3 and result.corrupt_checkpoints == []
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]  # the half-deleted one is gone


def user_job_file(tmp_path: Path, model: Path, train_data: Path, max_steps: int, checkpoint_every: int) -> Path:
    """A job file as a user writes one, for the tiny model on the toy task."""
    path = tmp_path / "job.yaml"
    path.write_text(
        f"""\
name: toy
model: {model}
quant: {{bits: 4, type: nf4}}
lora: {{r: 8, alpha: 16, dropout: 0.0, targets: attn}}
optim: {{name: adamw, lr: 5.0e-3, schedule: constant, warmup_ratio: 0.0}}
train: {{max_steps: {max_steps}, micro_batch: 4, seq_len: 64, seed: 7}}
data:
  train: {{path: {train_data}, format: prompt_completion}}
checkpoint: {{every: {checkpoint_every}, keep: 2}}
output_dir: {tmp_path / "run"}
"""
    )
    return path


def start_training(job: Path, log: Path) -> subprocess.Popen:
    """`lorafleet train JOB` in its own process, its output appended to `log`."""
    with open(log, "a") as sink:
        return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(job)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)


def wait_until(condition, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"lorafleet train exited ({process.returncode}) before the moment to stop it:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"waited {seconds} s in vain:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def logged_steps(output_dir: Path) -> int:
    """How many steps metrics.jsonl holds (a line being written is not counted)."""
    path = output_dir / "metrics.jsonl"
    return path.read_text().count("train/loss") if path.exists() else 0


def test_sigterm_stops_lorafleet_train_with_a_checkpoint_and_a_rerun_resumes_exactly(tiny_model_dir, toy_data, tmp_path):
    job = user_job_file(tmp_path, tiny_model_dir, toy_data["train"], max_steps=24, checkpoint_every=0)
    config = load_job_config(job)
    reference = config.model_copy(update={"output_dir": tmp_path / "uninterrupted"})
    run_job(reference)
    uninterrupted = train_losses(reference.output_dir)
    log = tmp_path / "train.log"
    process = start_training(job, log)
    wait_until(lambda: logged_steps(config.output_dir) >= 3, process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130, log.read_text()[-3000:]
    assert "run the same command again to resume" in log.read_text() and "Traceback" not in log.read_text()

    stopped_at = max(train_losses(config.output_dir))
    assert 3 <= stopped_at < 24
    job_dir = JobDir(config.output_dir)
    assert checkpoint_steps(job_dir)[-1] == stopped_at  # checkpoint.every is 0: SIGTERM wrote it, at the step it stopped at
    assert verify(job_dir.checkpoints / f"step-{stopped_at}") is None

    process = start_training(job, log)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert json.loads(job_dir.final_file.read_text())["resumed_from_step"] == stopped_at
    assert_same_losses(train_losses(config.output_dir), uninterrupted)


def test_every_checkpoint_file_is_fsynced_before_the_directory_is_renamed_into_place(make_job, monkeypatch):
    config = make_job(train={"max_steps": 1}, checkpoint={"every": 1, "keep": 1})
    events, real_fsync, real_rename = [], os.fsync, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self), str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    run_job(config)
    checkpoint = config.output_dir / "checkpoints" / "step-1"
    (moved,) = [index for index, event in enumerate(events) if event[0] == "rename" and event[2] == str(checkpoint)]
    staging = events[moved][1]
    synced_before = {event[1] for event in events[:moved] if event[0] == "fsync"}
    files = [p.relative_to(checkpoint) for p in checkpoint.rglob("*") if p.is_file()]
    assert files and MANIFEST in {str(f) for f in files}
    assert [f for f in files if os.path.join(staging, f) not in synced_before] == []
    assert staging in synced_before  # the staging directory's own entries, too
