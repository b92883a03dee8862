"""`lorafleet tb RUN_DIR`: a real TensorBoard on 127.0.0.1 with one run per job plus the fleet's own."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from cluster.records import FleetRecord, JobRecord
from cluster.tensorboard import FLEET_TB

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tb_serves_one_run_per_job_and_the_fleet_on_localhost(tmp_path):
    run_dir = tmp_path / "run"
    record = FleetRecord(name="f", run_dir=str(run_dir))
    for name in ("math", "news"):
        record.jobs[name] = JobRecord(name=name, output_dir=str(run_dir / name), workers=1, max_steps=1)
        with SummaryWriter(str(run_dir / name / "tb")) as writer:
            writer.add_scalar("train/loss", 1.0, 1)
    with SummaryWriter(str(run_dir / FLEET_TB)) as writer:
        writer.add_scalar("fleet/running_jobs", 2, 0)
    record.write()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "launch.cli", "tb", str(run_dir), "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        runs, deadline = None, time.time() + 90
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as answer:
                    runs = json.loads(answer.read())
                    if len(runs) == 3:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs is not None, server.stderr.read() if server.poll() is not None else "no answer"
        assert sorted(run.split("/")[0] for run in runs) == ["fleet", "math", "news"]
    finally:
        server.terminate()
        server.wait(timeout=20)
