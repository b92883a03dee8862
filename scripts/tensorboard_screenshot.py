"""Screenshot what `lorafleet tb RUN_DIR` shows, in headless Chromium.

    python scripts/tensorboard_screenshot.py RUN_DIR docs/tensorboard.png --view hparams --size 2200,560

Starts TensorBoard the way a user does (`lorafleet tb`), waits until it has read the final metrics
of every finished job, points Debian's chromium at the view, and renames the finished PNG over OUT,
so OUT is never half a picture. Chromium is not a dependency of lorafleet: `apt-get install -y chromium`.
(The HPARAMS table needs about 2200 pixels to show its five default hparams and the metrics beside.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.records import read_fleet_record  # noqa: E402
from cluster.tensorboard import pinned_url  # noqa: E402

VIEWS = {
    "hparams": lambda port: f"http://127.0.0.1:{port}/#hparams",
    "custom_scalars": lambda port: f"http://127.0.0.1:{port}/#custom_scalars",
    "timeseries": pinned_url,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def wait_until_loaded(port: int, finished_jobs: int, server: subprocess.Popen, timeout_s: float) -> None:
    """Until TensorBoard has read the final metrics of every finished job (written last, with its session)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"TensorBoard exited with {server.returncode}")
        try:
            tags = get(port, "/data/plugin/scalars/tags")
            if sum("hparam/train_loss" in run_tags for run_tags in tags.values()) >= finished_jobs:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    sys.exit(f"TensorBoard did not load {finished_jobs} finished jobs in {timeout_s:.0f}s")


def screenshot(url: str, out: Path, size: str, wait_ms: int) -> None:
    chromium = shutil.which("chromium") or sys.exit("chromium is not installed (apt-get install -y chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="tb-screenshot-profile-")
    fd, staging = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={staging}", f"--window-size={size}",
            # Virtual time runs the page's timers and fetches before the shot: TensorBoard draws after loading.
            f"--virtual-time-budget={wait_ms}", url,
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        if os.path.getsize(staging) == 0:
            sys.exit("chromium wrote no screenshot")
        os.chmod(staging, 0o644)
        os.replace(staging, out)
    finally:
        Path(staging).unlink(missing_ok=True)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a fleet's output_dir (holds fleet.json)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--view", choices=sorted(VIEWS), default="hparams")
    parser.add_argument("--size", default="1400,900", help="window size, WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=15000, help="page time to let TensorBoard load and draw")
    args = parser.parse_args()

    finished = sum(job.state in ("finished", "skipped") for job in read_fleet_record(args.run_dir).jobs.values())
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "launch.cli", "tb", str(args.run_dir.resolve()), "--port", str(port)], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        wait_until_loaded(port, finished, server, timeout_s=90)
        screenshot(VIEWS[args.view](port), args.out.resolve(), args.size, args.wait_ms)
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(args.out)


if __name__ == "__main__":
    main()
