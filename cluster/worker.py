"""The Ray side of one job: its placement group, its worker actors, and the sink their progress flows to.

Why own actors and placement groups rather than Ray Train's TorchTrainer:
- Retry and resume are already the trainer's: `run_job` resumes from the newest complete checkpoint
  in the job's output_dir. TorchTrainer would add a second checkpoint system (ray.train.Checkpoint,
  its storage path and FailureConfig) that has to be kept in step with ours, for nothing.
- A retry here is: kill the job's actors, free its placement group, queue it again. That is a few
  lines the scheduler owns, and it lands on *any* free slot. TorchTrainer's restarts happen inside
  one fit() that holds its resources, so a failed job could not yield its slot to a waiting one.
- Each TorchTrainer.fit() starts a trainable actor, a controller and a worker group before the first
  step. Here a job costs one placement group and one actor per worker: about a second, plus the
  trainer's own imports and model loading (benchmarks/fleet_throughput.py measures each part).
- The trainer already initialises torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
  giving two actors those variables is all a 2-GPU job needs.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.capacity import JobShape


def reserve(shape: JobShape, name: str = "") -> PlacementGroup:
    """A placement group for one job: one bundle per worker, all on one node (STRICT_PACK)."""
    return placement_group(shape.bundles(), strategy="STRICT_PACK", name=name)


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects rank 0's per-step reports; the driver drains it. Reports from one worker arrive in order."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, int, dict[str, Any]]] = []

    def report(self, job: str, attempt: int, metrics: dict[str, Any]) -> None:
        self._pending.append((job, attempt, metrics))

    def drain(self) -> list[tuple[str, int, dict[str, Any]]]:
        pending, self._pending = self._pending, []
        return pending


@ray.remote(max_restarts=0)
class JobWorker:
    """One training process of a job (rank `rank` of `world_size`); lives for one attempt only."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def info(self) -> dict[str, Any]:
        """Where this worker runs, and (rank 0) a free port for torch.distributed's rendezvous."""
        node_ip = ray.util.get_node_ip_address()
        port = None
        if self.rank == 0 and self.world_size > 1:
            with socket.socket() as probe:  # the usual race-prone trick; the port is used within a second
                probe.bind((node_ip, 0))
                port = probe.getsockname()[1]
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": node_ip,
            "port": port,
        }

    def run(self, config: Any, env: dict[str, str], sink: Any, attempt: int, workdir: str) -> dict[str, Any]:
        """`trainer.run_job(config, report)` in this process; returns the JobResult as a dict.

        Relative paths in the config are the driver's: work from its directory when this node has it
        (always on the driver's node; elsewhere on a shared file system). A node without it keeps its
        own working directory, e.g. the copy `ray job submit --working-dir` unpacked there.
        """
        os.environ.update(env)
        if os.path.isdir(workdir):
            os.chdir(workdir)
        from trainer.loop import run_job

        def report(metrics: dict[str, Any]) -> None:
            sink.report.remote(config.name, attempt, metrics)  # fire and forget: a step never waits on the driver

        return run_job(config, report).to_dict()


def start_workers(shape: JobShape, group: PlacementGroup, job_name: str) -> list[Any]:
    """One JobWorker per bundle of `group`, each pinned to its bundle."""
    workers = []
    for rank in range(shape.workers):
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank)
        workers.append(
            JobWorker.options(
                num_cpus=shape.cpus_per_worker,
                num_gpus=shape.gpus_per_worker,
                scheduling_strategy=strategy,
            ).remote(rank, shape.workers)
        )
    return workers


def distributed_env(rank: int, infos: list[dict[str, Any]]) -> dict[str, str]:
    """torch.distributed's variables for one worker of a multi-worker job (nothing for a one-worker job).

    All workers of a job share a node (STRICT_PACK), so the local rank is the rank. On GPUs every worker
    sees all of the job's GPUs, listed in rank order, so that NCCL can use peer-to-peer links between
    them (Ray alone would show each worker only its own); the trainer picks the device of its LOCAL_RANK.
    """
    world_size = len(infos)
    if world_size == 1:
        return {}
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": infos[0]["node_ip"],
        "MASTER_PORT": str(infos[0]["port"]),
    }
    gpus = [gpu for info in infos for gpu in info["gpu_ids"]]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def stop_workers(workers: list[Any]) -> None:
    """Kill a job's workers now. Safe mid-step: checkpoints are written atomically, so a resume sees
    only complete ones."""
    for worker in workers:
        ray.kill(worker, no_restart=True)
