"""The Ray side of a fleet's work: placement groups, worker actors, and the sink their progress flows to.

A worker holds one slot (a placement group of one bundle) and trains an adapter pack in its process:
`trainer.loop.run_pack` over the jobs it was given, taking more between steps as the scheduler assigns
them (rolling joins), until the scheduler closes it. A 2-GPU job is two workers (ranks 0 and 1 of one
DeepSpeed ZeRO-2 job), one per bundle of a two-bundle placement group on one node.

Why own actors and placement groups rather than Ray Train's TorchTrainer:
- Retry and resume are already the trainer's: `run_pack` resumes each job from the newest complete
  checkpoint in its output_dir. TorchTrainer would add a second checkpoint system (ray.train.Checkpoint,
  its storage path and FailureConfig) that has to be kept in step with ours, for nothing.
- A retry here is: kill the worker, free its placement group, queue its jobs again, each on any free
  slot. TorchTrainer's restarts happen inside one fit() that holds its resources.
- A worker outlives its first jobs: new adapters join its pack without a new process or a base reload.
  Each TorchTrainer.fit() starts a trainable actor, a controller and a worker group per job.
- The trainer already initialises torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT;
  giving two actors those variables is all a 2-GPU job needs.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import trainer  # noqa: F401  (light; filters bitsandbytes' import-time notice in the worker process)
from cluster.capacity import JobShape


def reserve(shape: JobShape, name: str = "", node_id: str | None = None) -> PlacementGroup:
    """A placement group for one worker set: one bundle per worker, all on one node (STRICT_PACK), on
    `node_id` when it has room (Ray's target-node hint, private in Ray 2.60 and for STRICT_PACK only)."""
    return placement_group(shape.bundles(), strategy="STRICT_PACK", name=name, _soft_target_node_id=node_id)


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects the workers' reports (step metrics and job events). The driver keeps one collect() call
    waiting: it returns at once when a job starts or ends (so a free slot is filled without waiting for
    a tick), else after `timeout_s` with the step metrics gathered meanwhile. Reports from one worker
    arrive in order. (An async actor: report() calls are not held up by a waiting collect().)"""

    def __init__(self) -> None:
        self._pending: list[tuple[str, int, dict[str, Any]]] = []
        self._event = asyncio.Event()

    async def report(self, job: str, attempt: int, metrics: dict[str, Any]) -> None:
        self._pending.append((job, attempt, metrics))
        if "event" in metrics:
            self._event.set()

    async def collect(self, timeout_s: float) -> list[tuple[str, int, dict[str, Any]]]:
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._event.clear()
        pending, self._pending = self._pending, []
        return pending


def train_pack(configs: list, report: Callable[[dict], None] | None, joins: Callable[[list[str]], list] | None) -> dict[str, Any]:
    """What a worker runs: the trainer's run_pack. (The scheduler's tests and its scale benchmark give
    workers a stand-in body with the same signature; it is not a user option.)"""
    from trainer.loop import run_pack

    return run_pack(configs, report, joins)


@ray.remote(max_restarts=0, max_concurrency=2)  # two threads: assign() and close() arrive while run() trains
class FleetWorker:
    """One training process holding one bundle: rank `rank` of a worker set of `world_size`.

    It trains one pack after another until closed. The scheduler sends work with assign(): a "join"
    adds jobs to the pack in progress (same base, no reload); a "next" starts a new pack once the
    current one has ended (another base or config group, same process)."""

    def __init__(self, rank: int, world_size: int, body: Callable | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.body = body or train_pack
        self.inbox: queue.Queue = queue.Queue()
        self.attempts: dict[str, int] = {}

    def info(self) -> dict[str, Any]:
        """Where this worker runs, and (rank 0 of several) a free port for torch.distributed's rendezvous."""
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

    def run(self, assignments: list[tuple[Any, int]], env: dict[str, str], sink: Any, workdir: str) -> dict[str, Any]:
        """Train `assignments` ((config, attempt) pairs) as a pack, then every pack that assign("next", ...)
        sends, until close(). Returns each job's outcome: a JobResult as a dict, or {"error": ...}.

        Relative paths in the configs are the driver's: work from its directory when this node has it
        (always on the driver's node; elsewhere on a shared file system). A node without it keeps its
        own working directory, e.g. the copy `ray job submit --working-dir` unpacked there."""
        os.environ.update(env)
        if os.path.isdir(workdir):
            os.chdir(workdir)

        def report(metrics: dict[str, Any]) -> None:
            job = metrics["job"]
            sink.report.remote(job, self.attempts.get(job, 0), metrics)  # fire and forget: a step never waits on the driver

        outcomes: dict[str, Any] = {}
        pack = self._accept(assignments)
        while pack:
            done = self.body(pack, report if self.rank == 0 else None, self._joins if self.world_size == 1 else None)
            outcomes.update({name: (o.to_dict() if hasattr(o, "to_dict") else {"error": str(o)}) for name, o in done.items()})
            pack = self._next_pack()
        return outcomes

    def assign(self, kind: str, assignments: list[tuple[Any, int]]) -> None:
        """kind "join": into the pack in progress; "next": the pack to start when this one ends."""
        self.inbox.put((kind, assignments))

    def close(self) -> None:
        """No more work: run() returns once the pack in progress has ended."""
        self.inbox.put(None)

    def _accept(self, assignments: list[tuple[Any, int]]) -> list:
        for config, attempt in assignments:
            self.attempts[config.name] = attempt
        return [config for config, _ in assignments]

    def _joins(self, running: list[str]) -> list:
        """Jobs joining the pack in progress, between steps. With jobs running, whatever joins are waiting;
        with none, wait for the scheduler's word: a join continues this pack, anything else ends it."""
        taken: list = []
        block = not running
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return taken
            if item is None or item[0] != "join":
                self._putback(item)  # a next pack, or the close: for _next_pack
                return taken
            taken += self._accept(item[1])
            block = False

    def _next_pack(self) -> list:
        """The next pack's jobs, waiting for the scheduler; [] when it closes this worker."""
        item = self.inbox.get()
        return [] if item is None else self._accept(item[1])  # a join that came as its pack ended starts one of its own

    def _putback(self, item) -> None:
        """Return an item to the front of the inbox (only this worker's own threads read it)."""
        with self.inbox.mutex:
            self.inbox.queue.appendleft(item)
            self.inbox.not_empty.notify()


def start_workers(shape: JobShape, group: PlacementGroup, body: Callable | None) -> list[Any]:
    """One FleetWorker per bundle of `group`, each pinned to its bundle."""
    workers = []
    for rank in range(shape.workers):
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank)
        workers.append(
            FleetWorker.options(num_cpus=shape.cpus_per_worker, num_gpus=shape.gpus_per_worker, scheduling_strategy=strategy).remote(rank, shape.workers, body)
        )
    return workers


def distributed_env(rank: int, infos: list[dict[str, Any]]) -> dict[str, str]:
    """torch.distributed's variables for one worker of a multi-worker job (nothing for a one-worker set).

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
    """Kill a worker set now. Safe mid-step: checkpoints are written atomically, so a resume sees only
    complete ones."""
    for worker in workers:
        ray.kill(worker, no_restart=True)
