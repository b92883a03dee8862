"""Faults found by trying lorafleet as a hostile user would (issue: faults measured), each with a test
that failed before the fix: a checkpoint that runs code, NaN training that succeeds, a resume at the
very end that reports NaN, an embedded Ray cluster listening on every interface, and files only their
owner could read."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import trainer.job
from launch.cli import app
from schema.yamlfile import dump_yaml
from trainer.checkpoint import MANIFEST, _write_manifest
from trainer.errors import JobError
from trainer.loop import run_job


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
