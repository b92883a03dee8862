"""`lorafleet run | status | tb`: a fleet of adapter jobs on Ray."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from launch.console import fail

# Off a terminal rich assumes 80 columns and would truncate the job table in log files.
out = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)

# Exit codes: 1 = some job failed, 2 = bad input (launch.console), 130 = stopped by Ctrl-C/SIGTERM.
EXIT_JOB_FAILED, EXIT_INTERRUPTED = 1, 130


def run(
    fleet_file: Path = typer.Argument(..., help="Fleet YAML: name, defaults, resources, jobs, output_dir.", metavar="FLEET.yaml"),
    address: str = typer.Option(None, "--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local cluster)."),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=1, help="Use at most this many slots at once (default: every slot of the cluster).", metavar="SLOTS"),
    num_cpus: int = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded local cluster (default: all of this machine's)."),
    set_: list[str] = typer.Option([], "--set", help="Override a fleet-file field, e.g. --set defaults.train.max_steps=20 (repeatable).", metavar="KEY=VALUE"),
) -> None:
    """Train every job of a fleet: queued, placed, retried from checkpoints, shown live. Re-running resumes."""
    from cluster.capacity import cluster_has_gpus, job_shape, local_node, slot_count
    from cluster.session import cluster_address
    from launch.checks import capacity_problems, load_checked_fleet
    from schema.problems import ConfigError

    embedded = cluster_address(address) is None
    # An embedded cluster's one node is known before Ray starts, so the capacity check joins the others.
    nodes = [local_node(num_cpus)] if embedded else None
    try:
        loaded = load_checked_fleet(fleet_file, set_, nodes=nodes)
    except ConfigError as err:
        fail(err)
    fleet = loaded.config

    from cluster.fleet import FleetJob, FleetRunner
    from cluster.session import ClusterUnreachable, ray_session
    from cluster.view import make_view

    try:
        with ray_session(address, num_cpus=num_cpus, num_gpus=int(nodes[0].gpus) if nodes else None) as live_nodes:
            problems = capacity_problems(loaded, live_nodes)
            if problems:
                fail(ConfigError(problems, title="the cluster cannot hold every job"))
            gpus = cluster_has_gpus(live_nodes)
            jobs = [FleetJob(config=job, shape=job_shape(job.resources, gpus), max_failures=job.resources.max_failures) for job in fleet.jobs]
            slots = slot_count(live_nodes, fleet.resources)
            usable = min(slots, max_concurrent) if max_concurrent else slots  # what tokens/s per slot divides by
            runner = FleetRunner(
                fleet.name, jobs, fleet.output_dir, live_nodes, make_view(out), slots=usable,
                max_adapters=fleet.packing.max_adapters, backfill=fleet.backfill, max_concurrent=max_concurrent,
            )
            record = runner.run()
    except ClusterUnreachable as err:
        fail(err)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (FleetInterrupted)
        err_console.print(f"stopped; the workers were stopped. Run the same command again to resume from the newest checkpoints ({fleet.output_dir}/fleet.json).")
        raise typer.Exit(EXIT_INTERRUPTED)
    out.print(f"fleet.json: {Path(fleet.output_dir) / 'fleet.json'}")
    if record.count("failed"):
        raise typer.Exit(EXIT_JOB_FAILED)
    if fleet.compose:
        # After every job has finished: the compositions read the jobs' final adapters.
        from compositor.pipeline import run_fleet_compositions

        records = run_fleet_compositions(fleet.compose, fleet.output_dir, {job.name: Path(job.output_dir) / "adapter" for job in fleet.jobs})
        for name in records:
            out.print(f"composed {name}: {Path(fleet.output_dir) / 'compose' / name}")


def status(run_dir: Path = typer.Argument(..., help="A fleet's output_dir (holds fleet.json).", metavar="RUN_DIR")) -> None:
    """Print the job table of a running or finished fleet."""
    from cluster.records import read_fleet_record
    from cluster.view import errors_table, jobs_table, summary_table

    try:
        record = read_fleet_record(run_dir)
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    out.print(jobs_table(record))
    age = time.time() - Path(run_dir, "fleet.json").stat().st_mtime
    out.print(f"fleet {record.name}: {record.state} (fleet.json written {age:.0f}s ago)", highlight=False)
    if record.summary:
        out.print(summary_table(record))
    errors = errors_table(record)
    if errors is not None:
        out.print(errors)


def tb(
    run_dir: Path = typer.Argument(..., help="A fleet's output_dir.", metavar="RUN_DIR"),
    port: int = typer.Option(6006, "--port", help="Port on 127.0.0.1."),
) -> None:
    """Start TensorBoard on 127.0.0.1 over every job's logs (one run per job) and the fleet's own scalars."""
    from cluster.tensorboard import pinned_url, prepare_serving

    try:
        logdir = prepare_serving(run_dir)
    except (OSError, ValueError) as err:
        fail(err)
    # TensorBoard shows its --logdir as the data location: given from the fleet directory's parent, it
    # reads "fleet_demo/tb/runs" rather than an absolute path.
    parent = logdir.parents[2]
    os.chdir(parent)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir.relative_to(parent)), "--host", "127.0.0.1", "--port", str(port)]
    home = f"http://127.0.0.1:{port}/"
    for line in (
        f"TensorBoard on {home} (Ctrl-C stops it)",
        f"  train/loss and eval/loss pinned above the tag groups: {pinned_url(port)}",
        f"  train and eval, task and forgetting metrics: {home}#custom_scalars",
        f"  each job's hparams and final metrics: {home}#hparams",
    ):
        err_console.print(line, highlight=False, soft_wrap=True)
    # Become TensorBoard, so that a signal to this process reaches it and no server outlives us.
    os.execv(sys.executable, command)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("status")(status)
    app.command("tb")(tb)
