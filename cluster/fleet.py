"""The fleet scheduler: a queue of jobs placed on worker sets, packed, backfilled, retried.

Placement. A worker set holds one placement group: one bundle (one slot: a GPU, or `cpus_per_job` CPUs
on a CPU-only cluster) for a pack worker, two bundles on one node for a 2-GPU job. Queued jobs that share
a compatibility group (`schema.job.pack_key` plus their resources) train together as one pack of up to
`packing.max_adapters` on one worker. Spread first: while slots are free, a group's queued jobs are spread
evenly over those that other queued groups will not take, one pack per slot; once none is free, a job
joins a running pack of its group with room (no new process, no base reload), which is how a pack
refills as its jobs end. Jobs that run alone (2-GPU, DoRA, AdaLoRA, VeRA,
`packing: false`) get a worker set each.

Order. Jobs start in fleet order, with one exception stated in one sentence: while the job at the head
of the queue cannot be placed, one node is held for it (no new work lands there) and later jobs may
start on the other nodes, at most `backfill` of them (no bound by default). So a 2-GPU job at the head
waiting for two GPUs on one node lets single-slot jobs use every other node, and it is never starved:
its node drains as the jobs on it end. The held node is the one the running jobs' ETAs say will fit the
head soonest. No node is held while running worker sets of the head's shape will free, one for the
head and one for each job of its shape queued right behind it, no later than that node would fit the
head plus the time a new worker set takes to start (measured in this fleet): they take those jobs in
their processes, and nothing is closed and restarted to make room. (Each such round trip costs a
worker start, which for the trainer includes loading its base.) A shape short of worker sets piles
its jobs up at the front of the queue, which makes a node be held and drained for a new one. New
worker sets go to the node that fits them most tightly (best fit), which leaves whole nodes free for
2-GPU jobs. One placement group is asked of Ray at a time, on the node the scheduler chose and counted
(Ray's STRICT_PACK target-node hint), so Ray never places a job where the scheduler did not expect it.

Failure. A worker that dies (a killed process, a lost node, an error outside a job) takes its pack with
it: each of its jobs counts one attempt and goes back to the front of the queue while it has retries,
and resumes from its own newest checkpoint. A job that fails inside a live pack (NaN, bad data: the
trainer's JobError) fails alone and is never retried: it would fail the same way again.

Scale. Per tick the driver drains progress reports, handles the Ray answers that are ready, and scans
the queue from its head; finished jobs cost nothing after their end. fleet.json is written at most once
a second, the live view redraws at most four times a second, and the TensorBoard scalars once a second.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group_table

from cluster.capacity import JobShape, NodeCapacity
from cluster.records import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    PLACING,
    QUEUED,
    RUNNING,
    SKIPPED,
    STARTING,
    Attempt,
    FleetRecord,
    JobRecord,
    read_fleet_record,
    summarize,
)
from cluster.tensorboard import FleetScalars, prepare_serving
from cluster.view import FleetView
from cluster.worker import ProgressSink, distributed_env, release, reserve, start_workers, stop_workers
from schema.job import JobConfig, pack_key
from schema.jobdir import JobDir


class FleetInterrupted(KeyboardInterrupt):
    """The driver got SIGTERM (or Ctrl-C): workers were stopped; a re-run resumes the jobs."""


@dataclass
class FleetJob:
    """One job as the scheduler sees it: its config, its shape, and who it may share a worker with."""

    config: JobConfig
    shape: JobShape
    max_failures: int
    group: tuple = field(init=False)  # jobs of one group may train in one pack: same base and forward pass, same slot shape

    def __post_init__(self) -> None:
        self.group = (*pack_key(self.config), self.shape)  # once: the scheduler compares groups every tick

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class WorkerSet:
    """The live Ray handles of one worker set, and the jobs it trains."""

    id: str
    shape: JobShape
    group: tuple
    capacity: int  # adapters it may hold at once
    placement: PlacementGroup
    state: str = PLACING  # placing, starting, running, closing
    actors: list[Any] = field(default_factory=list)
    infos: dict[int, dict[str, Any]] = field(default_factory=dict)
    jobs: set[str] = field(default_factory=set)  # assigned and not ended
    first_jobs: list[str] = field(default_factory=list)  # what it starts with, once its actors answer
    node_id: str | None = None  # where its slots are counted: the chosen node from the request on, then the actual one
    runs_pending: int = 0
    ran_a_job: bool = False  # its start time (request to first job running) was measured


class FleetRunner:
    """Runs `jobs` on the connected Ray cluster; writes RUN_DIR/fleet.json and RUN_DIR/tb/fleet."""

    def __init__(
        self,
        name: str,
        jobs: list[FleetJob],
        run_dir: str | Path,
        nodes: list[NodeCapacity],
        view: FleetView,
        *,
        slots: int,
        max_adapters: int = 4,
        backfill: int | None = None,
        max_concurrent: int | None = None,
        refresh_s: float = 0.25,
        record_every_s: float = 1.0,
        body: Callable | None = None,
        reuse_workers: bool = True,
    ) -> None:
        self.jobs = {job.name: job for job in jobs}
        self.run_dir = Path(run_dir)
        self.view = view
        self.max_adapters = max_adapters
        self.backfill = math.inf if backfill is None else backfill
        self.max_concurrent = max_concurrent  # slots in use at once
        self.refresh_s = refresh_s
        self.record_every_s = record_every_s
        self.body = body  # the work of a worker; None: the trainer (cluster.worker.train_pack)
        # False: a worker set ends with its first pack (one process per pack, the scheduler before rolling
        # joins; benchmarks/fleet_throughput.py measures packs against it).
        self.reuse_workers = reuse_workers
        self.capacity = {node.node_id: {"CPU": node.cpus, "GPU": node.gpus} for node in nodes}
        self.used = {node.node_id: {"CPU": 0.0, "GPU": 0.0} for node in nodes}
        self.earlier_summary: dict[str, Any] | None = None
        self.record = self._initial_record(name, jobs, slots)
        self.queue: deque[str] = deque(job.name for job in jobs if self.record.jobs[job.name].state == QUEUED)
        self.workers: dict[str, WorkerSet] = {}
        self.placing: WorkerSet | None = None  # the one placement group asked of Ray and not yet ready
        self.passes = 0  # later jobs started while the head waits (the backfill rule)
        self.held: tuple[str, str] | None = None  # (head job, node held for it) while the head waits
        self.start_times: deque[float] = deque(maxlen=16)  # request to first job running, of the latest worker sets
        self.failures: dict[str, int] = {job.name: 0 for job in jobs}
        self.waiting: dict[Any, tuple[str, str, int]] = {}  # ObjectRef -> (worker id, kind, rank)
        self.changed: set[str] = set()  # jobs whose state changed since the view last saw them
        self._dirty = True
        self._last_record_write = 0.0
        self._worker_ids = itertools.count(self._first_worker_number())
        self.sink: Any = None  # the ProgressSink actor, for the length of run()
        self.collecting: Any = None  # its collect() call in flight
        self.workdir = str(Path.cwd())  # where the config's relative paths start

    def _initial_record(self, name: str, jobs: list[FleetJob], slots: int) -> FleetRecord:
        """A fresh record; jobs whose final.json exists are skipped; a previous run's attempts, workers and
        summary are kept (the summary shown when this run trains nothing)."""
        previous: dict[str, JobRecord] = {}
        first_started_at = time.time()
        workers: dict[str, dict[str, Any]] = {}
        try:
            earlier = read_fleet_record(self.run_dir)
            previous, first_started_at, workers, self.earlier_summary = earlier.jobs, earlier.first_started_at, earlier.workers, earlier.summary
        except FileNotFoundError:
            pass
        record = FleetRecord(
            name=name, run_dir=str(self.run_dir), slots=slots, address=ray.get_runtime_context().gcs_address, first_started_at=first_started_at, workers=workers
        )
        for job in jobs:
            job_dir = JobDir(Path(job.config.output_dir).resolve())  # absolute: `lorafleet status|tb` may run from elsewhere
            entry = JobRecord(name=job.name, output_dir=str(job_dir.root), workers=job.shape.workers, max_steps=job.config.train.max_steps)
            if job.name in previous:
                entry.attempts = previous[job.name].attempts
            final = job_dir.read_final()
            if final is not None:
                entry.state, entry.result, entry.adapter_dir = SKIPPED, final, str(job_dir.adapter)
                entry.step, entry.loss = final.get("steps", 0), final.get("train_loss")
            record.jobs[job.name] = entry
        return record

    def _first_worker_number(self) -> int:
        numbers = [int(key[1:]) for key in self.record.workers if key[1:].isdigit()]
        return max(numbers, default=0) + 1

    # ------------------------------------------------------------------ the loop
    def run(self) -> FleetRecord:
        """Run every job to the end (finished or failed). Raises FleetInterrupted/KeyboardInterrupt after
        stopping the workers when the driver is told to stop."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        scalars = FleetScalars(self.run_dir, self.record.first_started_at)
        restore = _raise_on_sigterm()
        self.sink = ProgressSink.remote()
        try:
            self._write_record(force=True)
            prepare_serving(self.run_dir)  # `lorafleet tb` may serve the fleet while it runs
            self.view.update(self.record, set(self.record.jobs))
            self._schedule()
            while self.queue or self.workers:
                reports, ready = self._wait()
                # Reports first: a job's last reports and its worker's end can arrive in the same tick.
                self._apply_reports(reports)
                self._handle(ready)
                self._schedule()  # before closing idle workers: a queued job of their group may join them
                self._close_idle()
                self.view.update(self.record, self.changed)
                self.changed = set()
                scalars.log(self.record)
                self._write_record()
            self.record.state = FAILED if self.record.count(FAILED) else FINISHED
        except KeyboardInterrupt:
            self._stop_all()
            self.record.state = INTERRUPTED
            raise
        finally:
            restore()
            self.record.ended_at = time.time()
            self.record.summary = summarize(self.record, self.earlier_summary)
            self._write_record(force=True)
            scalars.log(self.record, force=True)
            scalars.close()
            prepare_serving(self.run_dir)  # the HPARAMS columns of every job that ran
            ray.kill(self.sink)
            self.view.close(self.record)
        return self.record

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> None:
        """Start what the order rule allows: the head first; while it cannot start, a node is held for it
        and up to `backfill` later jobs start on the others."""
        while self.queue:
            head = self.queue[0]
            if self._start(head):
                self.passes, self.held = 0, None
                continue
            if self.passes >= self.backfill:
                return  # the budget is spent: nothing passes the head any more
            if self.placing is None:  # no room for the head (not just a placement in flight): hold its node
                # Chosen again at every scan: the ETAs that pick it arrive with the jobs' first steps.
                node = self._node_to_hold(head)
                self.held = (head, node) if node is not None else None
            avoid = self.held[1] if self.held else None
            passed = next((name for name in self._first_of_each_group(head) if self._start(name, avoid)), None)
            if passed is None:
                return
            self.passes += 1
            self.record.jobs[head].passed_by.append(passed)

    def _node_to_hold(self, head: str) -> str | None:
        """The node a waiting head will fit on soonest. The ETAs of the jobs running there say when each
        worker set frees its slots (an idle one is free now; a job with no ETA yet counts as never); the
        node whose free slots reach the head's need first is held. Ties go to the node with more free now.
        None when worker sets of the head's shape take it and the jobs of its shape queued right behind it
        about as soon (see _own_shape_serves)."""
        shape = self.jobs[head].shape
        resource = "GPU" if shape.gpus_per_worker else "CPU"
        need = shape.workers * (shape.gpus_per_worker or shape.cpus_per_worker)

        def soonest(node: str) -> tuple[float, float]:
            free_now = self.capacity[node][resource] - self.used[node][resource]
            releases = sorted(
                (self._remaining_s(w), w.shape.workers * (w.shape.gpus_per_worker if resource == "GPU" else w.shape.cpus_per_worker))
                for w in self.workers.values() if w.node_id == node
            )
            free, when = free_now, 0.0
            for eta, slots in releases:
                if free >= need:
                    break
                free, when = free + slots, eta
            return (when if free >= need else math.inf, -free_now)

        big_enough = [node for node, capacity in self.capacity.items() if capacity[resource] >= need]
        if not big_enough:
            return None
        fits = {node: soonest(node) for node in big_enough}
        node = min(big_enough, key=fits.__getitem__)
        if self.reuse_workers and self._own_shape_serves(shape, by_s=fits[node][0] + self._worker_start_s()):
            return None  # worker sets of its shape take the head as they free: nothing closed, no new process
        return node

    def _own_shape_serves(self, shape: JobShape, by_s: float) -> bool:
        """Whether running worker sets of `shape` free, one for the head and one for each job of its shape
        queued right behind it, within `by_s` seconds. The run behind the head counts so that a shape short
        of worker sets (its jobs pile up at the front of the queue while others pass) gets a node drained
        for a new one, rather than waiting for its own kind job after job."""
        releases = sorted(self._remaining_s(w) for w in self.workers.values() if w.shape == shape and w.state == RUNNING)
        # Only the front run matters, and only up to one more than the worker sets there are (bounded work per scan).
        backlog = sum(1 for _ in itertools.takewhile(lambda name: self.jobs[name].shape == shape, itertools.islice(self.queue, len(releases) + 1)))
        return 0 < backlog <= len(releases) and releases[backlog - 1] <= by_s

    def _worker_start_s(self) -> float:
        """What a new worker set costs before it runs a job, as this fleet's latest starts measured it
        (request to running, placement included); 0 before any has started."""
        return statistics.median(self.start_times) if self.start_times else 0.0

    def _remaining_s(self, worker: WorkerSet) -> float:
        """Seconds until `worker` frees its slots: 0 when idle, else its slowest job's ETA."""
        etas = [self.record.jobs[name].eta_s for name in worker.jobs]
        return max((math.inf if eta is None else eta for eta in etas), default=0.0)

    def _first_of_each_group(self, head: str) -> Iterator[str]:
        """The queued jobs behind `head` that could start where the ones before them could not: whether a
        job starts depends on its group alone, so the first of each group not yet tried stands for the rest."""
        tried = {self.jobs[head].group}
        for name in itertools.islice(self.queue, 1, None):
            group = self.jobs[name].group
            if group not in tried:
                tried.add(group)
                yield name

    def _start(self, name: str, avoid: str | None = None) -> bool:
        """Start `name` now if it can, on any node but `avoid` (held for a waiting head). Spread first: while
        worker sets of its shape are free (idle, or room on a node), a new pack starts there, and the queued
        jobs of its group are spread evenly over the free ones that other queued groups will not take
        (`ceil(queued / (free - other groups))` per pack, at most `max_adapters`): a slot that sits idle
        while another trains two adapters costs makespan. Once none is free, the job joins a running pack of
        its group with room (no new process, no base reload)."""
        job = self.jobs[name]
        free = self._free_worker_sets(job.shape, avoid)
        if free == 0:
            joinable = next(
                (w for w in self.workers.values()
                 if w.group == job.group and w.state in (STARTING, RUNNING) and len(w.jobs) < w.capacity and w.shape.workers == 1
                 and self.reuse_workers and w.node_id != avoid),
                None,
            )
            if joinable is None:
                return False
            self.queue.remove(name)
            self._assign(joinable, [name], "join")
            return True
        idle = next(
            (w for w in self.workers.values() if w.state == RUNNING and not w.jobs and w.shape == job.shape and self.reuse_workers and w.node_id != avoid),
            None,
        )
        if idle is None and self.placing is not None:
            return False  # one placement at a time; the next scan comes when it is ready
        if idle is None:
            target = self.held[1] if self.held and self.held[0] == name and self._node_fits(self.held[1], job.shape) else None
            worker = self._place(job.shape, target or self._best_fit(job.shape, avoid))
        else:
            worker = idle
        worker.group = job.group
        capacity = self.max_adapters if job.shape.workers == 1 else 1
        worker.capacity = capacity
        group = [other for other in self.queue if self.jobs[other].group == job.group]
        # Only over the free slots that other queued groups of this shape will take no part of: two groups of two
        # on two slots become two packs at once, not one group's jobs alone while the other waits (and then
        # leaves a slot idle). A group's packs then no longer depend on how many slots happen to be free, so a
        # rerun trains the same packs: a packed adapter's rows share their matmuls with its pack-mates'.
        waiting = {self.jobs[other].group for other in self.queue if self.jobs[other].group != job.group and self.jobs[other].shape == job.shape}
        size = min(capacity, math.ceil(len(group) / max(1, free - len(waiting))))
        companions = [other for other in group if other != name][: size - 1]
        for member in [name, *companions]:
            self.queue.remove(member)
        self._assign(worker, [name, *companions], "next")
        return True

    def _free_worker_sets(self, shape: JobShape, avoid: str | None = None) -> int:
        """Worker sets of `shape` that could take a new pack now, on any node but `avoid`: idle ones, and new
        ones the nodes' free capacity holds, within --max-concurrent."""
        new = sum(self._room(node, shape) for node in self.capacity if node != avoid)
        if self.max_concurrent is not None:
            in_use = sum(w.shape.workers for w in self.workers.values())
            new = min(new, max(0, (self.max_concurrent - in_use) // shape.workers))
        idle = sum(1 for w in self.workers.values() if w.state == RUNNING and not w.jobs and w.shape == shape and w.node_id != avoid) if self.reuse_workers else 0
        return idle + new

    def _room(self, node: str, shape: JobShape) -> int:
        """How many more worker sets of `shape` fit on `node` (the scheduler's own count of what it holds)."""
        need_cpus, need_gpus = shape.workers * shape.cpus_per_worker, shape.workers * shape.gpus_per_worker
        free_cpus, free_gpus = self.capacity[node]["CPU"] - self.used[node]["CPU"], self.capacity[node]["GPU"] - self.used[node]["GPU"]
        fits = min(free_cpus // need_cpus if need_cpus else math.inf, free_gpus // need_gpus if need_gpus else math.inf)
        return int(min(fits, len(self.jobs)))  # a node without any need to meet holds at most every job

    def _node_fits(self, node: str, shape: JobShape) -> bool:
        return self._room(node, shape) > 0

    def _best_fit(self, shape: JobShape, avoid: str | None) -> str:
        """The node with room for `shape` that has the least room left: partly used nodes fill up first, so
        whole nodes stay free for 2-GPU jobs."""
        resource = "GPU" if shape.gpus_per_worker else "CPU"
        fitting = [node for node in self.capacity if node != avoid and self._node_fits(node, shape)]
        return min(fitting, key=lambda node: (self.capacity[node][resource] - self.used[node][resource], node))

    def _place(self, shape: JobShape, node: str) -> WorkerSet:
        """Ask Ray for a new worker set's placement group on `node` (one at a time). Its slots are counted
        there from now on, so nothing else is planned onto them while Ray places it."""
        worker_id = f"w{next(self._worker_ids)}"
        worker = WorkerSet(
            id=worker_id, shape=shape, group=(), capacity=1, node_id=node,
            placement=reserve(shape, name=f"lorafleet-{self.record.name}-{worker_id}", node_id=node),
        )
        self._count(worker, +1)
        self.workers[worker.id] = self.placing = worker
        self.record.workers[worker.id] = {"slots": shape.workers, "jobs": [], "requested_at": time.time(), "state": PLACING}
        self.waiting[worker.placement.ready()] = (worker.id, "placed", 0)
        return worker

    def _count(self, worker: WorkerSet, sign: int) -> None:
        for _ in range(worker.shape.workers):
            self.used[worker.node_id]["CPU"] += sign * worker.shape.cpus_per_worker
            self.used[worker.node_id]["GPU"] += sign * worker.shape.gpus_per_worker

    def _assign(self, worker: WorkerSet, names: list[str], kind: str) -> None:
        """New attempts of `names` on `worker`: sent now to a running worker ("join" into its pack, or
        "next" pack), or kept for its start."""
        now = time.time()
        for name in names:
            entry = self.record.jobs[name]
            entry.attempts.append(Attempt(number=entry.attempt + 1, submitted_at=now, worker=worker.id))
            if worker.state != PLACING:
                entry.attempts[-1].placed_at = now
                entry.attempts[-1].workers = [worker.infos[rank] for rank in sorted(worker.infos)]
            entry.state, entry.ended_at, entry.worker = (STARTING if worker.state != PLACING else PLACING), None, worker.id
            entry.node = worker.infos[0]["node_ip"] if worker.infos else None
            worker.jobs.add(name)
            self.record.workers[worker.id]["jobs"].append(name)
            self.changed.add(name)
        if worker.state == RUNNING:
            assignments = [(self.jobs[n].config, self.record.jobs[n].attempt) for n in names]
            for actor in worker.actors:
                actor.assign.remote(kind, assignments)
        else:
            worker.first_jobs += names
        self._dirty = True

    def _close_idle(self) -> None:
        """A worker whose pack is empty gives its slot back unless a queued job of its group may join it."""
        for worker in list(self.workers.values()):
            if worker.state != RUNNING or worker.jobs:
                continue
            worker.state = "closing"
            self.record.workers[worker.id]["state"] = "closing"
            for actor in worker.actors:
                actor.close.remote()

    # ------------------------------------------------------------------ Ray answers
    def _wait(self) -> tuple[list, list[Any]]:
        """The reports and the Ray answers that are ready: wait until a job starts or ends, a placement
        group is ready, a worker answers or ends, or `refresh_s` passes."""
        if self.collecting is None:
            self.collecting = self.sink.collect.remote(self.refresh_s)
        refs = [self.collecting, *self.waiting]
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.refresh_s * 2)
        if ready:  # take everything else that is ready too, without waiting
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        reports = []
        if self.collecting in ready:
            reports = ray.get(self.collecting)
            self.collecting = None
        return reports, [ref for ref in ready if ref in self.waiting]

    def _handle(self, ready: list[Any]) -> None:
        for ref in ready:
            worker_id, kind, rank = self.waiting.pop(ref)
            worker = self.workers.get(worker_id)
            if worker is None:
                continue  # an answer from a worker set that already ended
            try:
                value = ray.get(ref)
            except RayError as err:
                self._worker_failed(worker, _describe(err, worker.infos.get(rank)), retry=not _bad_input(err))
                continue
            if kind == "placed":
                self._placed(worker)
            elif kind == "info":
                self._answered(worker, value)
            else:
                self._run_done(worker, value)

    def _placed(self, worker: WorkerSet) -> None:
        self.placing = None
        table = placement_group_table(worker.placement)
        placed_on = next(iter(table["bundles_to_node_id"].values()))
        if placed_on != worker.node_id:  # the target is a hint: follow where Ray put it
            self._count(worker, -1)
            worker.node_id = placed_on
            self._count(worker, +1)
        worker.state = STARTING
        now = time.time()
        self.record.workers[worker.id].update(state=STARTING, placed_at=now, node_id=worker.node_id)
        for name in worker.jobs:
            entry = self.record.jobs[name]
            entry.attempts[-1].placed_at, entry.state = now, STARTING
            self.changed.add(name)
        worker.actors = start_workers(worker.shape, worker.placement, self.body)
        for rank, actor in enumerate(worker.actors):
            self.waiting[actor.info.remote()] = (worker.id, "info", rank)
        self._dirty = True

    def _answered(self, worker: WorkerSet, info: dict[str, Any]) -> None:
        worker.infos[info["rank"]] = info
        if len(worker.infos) < worker.shape.workers:
            return
        infos = [worker.infos[rank] for rank in range(worker.shape.workers)]
        worker.state = RUNNING
        now = time.time()
        self.record.workers[worker.id].update(
            state=RUNNING, started_at=now, pids=[i["pid"] for i in infos], node=infos[0]["node_ip"]
        )
        for name in worker.jobs:
            entry = self.record.jobs[name]
            entry.attempts[-1].workers, entry.node = infos, infos[0]["node_ip"]
        assignments = [(self.jobs[n].config, self.record.jobs[n].attempt) for n in worker.first_jobs]
        worker.runs_pending = worker.shape.workers
        command = {"LORAFLEET_COMMAND": os.environ["LORAFLEET_COMMAND"]} if "LORAFLEET_COMMAND" in os.environ else {}
        for rank, actor in enumerate(worker.actors):
            call = actor.run.remote(assignments, {**distributed_env(rank, infos), **command}, self.sink, self.workdir)
            self.waiting[call] = (worker.id, "run", rank)
        self._dirty = True

    def _run_done(self, worker: WorkerSet, outcomes: dict[str, Any]) -> None:
        """A worker's run returned: it was closed. Jobs whose end the reports did not show yet take it from
        the returned outcomes."""
        worker.runs_pending -= 1
        for name, outcome in outcomes.items():
            if name in worker.jobs:
                self._job_ended(worker, name, outcome)
        if worker.runs_pending:
            return
        for name in list(worker.jobs):  # assigned after the worker stopped taking work: back to the queue
            self._job_failed(worker, name, "the worker closed before the job started", retry=True, count=False)
        self._end_worker(worker)

    def _end_worker(self, worker: WorkerSet) -> None:
        self.workers.pop(worker.id, None)
        if self.placing is worker:
            self.placing = None
        stop_workers(worker.actors)
        release(worker.placement)
        self._count(worker, -1)
        self.record.workers[worker.id].update(state="ended", ended_at=time.time())
        self.waiting = {ref: tag for ref, tag in self.waiting.items() if tag[0] != worker.id}
        self._dirty = True

    def _worker_failed(self, worker: WorkerSet, error: str, retry: bool) -> None:
        """The worker set died: every job on it counts an attempt and is retried while it may be."""
        self.record.workers[worker.id]["error"] = error
        for name in sorted(worker.jobs):
            self._job_failed(worker, name, error, retry=retry)
        self._end_worker(worker)

    # ------------------------------------------------------------------ jobs
    def _apply_reports(self, reports: list[tuple[str, int, dict[str, Any]]]) -> None:
        for name, number, metrics in reports:
            entry = self.record.jobs.get(name)
            if entry is None or entry.attempt != number or entry.worker not in self.workers or name not in self.workers[entry.worker].jobs:
                continue  # a report from an attempt that already ended
            worker = self.workers[entry.worker]
            event = metrics.get("event")
            if event == "started":
                attempt = entry.attempts[-1]
                attempt.running_at = time.time()
                entry.started_at = entry.started_at or attempt.running_at  # the job's time counts from its first start, not its queueing
                entry.state = RUNNING
                if not worker.ran_a_job:
                    worker.ran_a_job = True
                    self.start_times.append(attempt.running_at - self.record.workers[worker.id]["requested_at"])
                self.changed.add(name)
                self._dirty = True
            elif event in ("finished", "failed"):
                self._job_ended(worker, name, metrics.get("result") or {"error": metrics.get("error", "")})
            elif "phase" in metrics:
                entry.phase = metrics["phase"]
                self.changed.add(name)
                self._dirty = True
            elif "train/loss" in metrics:
                entry.step = int(metrics.get("step", entry.step))
                entry.loss = _finite(metrics["train/loss"])
                entry.tokens_per_s = _finite(metrics.get("perf/tokens_per_s"))
                entry.eta_s = _finite(metrics.get("eta_s"))
                if entry.attempts[-1].first_step_at is None:
                    entry.attempts[-1].first_step_at = time.time()
                self._dirty = True  # progress reaches fleet.json too, at most once a second

    def _job_ended(self, worker: WorkerSet, name: str, outcome: dict[str, Any]) -> None:
        if "error" in outcome:
            # The trainer refused the job inside a live pack (JobError): it alone fails, never retried.
            self._job_failed(worker, name, f"JobError: {outcome['error']}", retry=False)
            return
        entry = self.record.jobs[name]
        worker.jobs.discard(name)
        entry.attempts[-1].ended_at = entry.ended_at = time.time()
        entry.state, entry.result, entry.error = FINISHED, outcome, None  # earlier attempts keep their errors
        entry.adapter_dir = str(JobDir(entry.output_dir).adapter)
        entry.step, entry.loss, entry.eta_s, entry.phase = outcome.get("steps", entry.step), outcome.get("train_loss"), 0.0, None
        self.changed.add(name)
        self._dirty = True

    def _job_failed(self, worker: WorkerSet, name: str, error: str, retry: bool, count: bool = True) -> None:
        """A crash is retried while the job has retries left; bad input would fail the same way again."""
        entry, job = self.record.jobs[name], self.jobs[name]
        worker.jobs.discard(name)
        entry.attempts[-1].error = error
        entry.attempts[-1].ended_at = entry.ended_at = time.time()
        entry.error, entry.phase = error, None
        if count:
            self.failures[name] += 1
        if retry and self.failures[name] <= job.max_failures:
            entry.state, entry.ended_at = QUEUED, None
            self.queue.appendleft(name)  # a retry keeps its place at the front of the queue
        else:
            entry.state = FAILED
        self.changed.add(name)
        self._dirty = True

    def _stop_all(self) -> None:
        for worker in list(self.workers.values()):
            for name in worker.jobs:
                entry = self.record.jobs[name]
                entry.attempts[-1].error = "interrupted: the driver was stopped"
                entry.attempts[-1].ended_at = entry.ended_at = time.time()
                entry.state, entry.phase = INTERRUPTED, None
            worker.jobs.clear()
            self._end_worker(worker)

    def _write_record(self, force: bool = False) -> None:
        now = time.time()
        if force or (self._dirty and now - self._last_record_write >= self.record_every_s):
            self.record.write()
            self._last_record_write = now
            self._dirty = False


def _finite(value: Any) -> float | None:
    """JSON has no NaN: a metric that is not a finite number is shown as unknown."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _bad_input(err: RayError) -> bool:
    """The trainer refused the job (JobError: its data, config or state cannot work), as opposed to a crash."""
    from trainer.errors import JobError

    return isinstance(err, RayTaskError) and isinstance(err.cause, JobError)


def _describe(err: RayError, worker: dict[str, Any] | None) -> str:
    """A one-paragraph error: the trainer's own exception, or how the worker process died."""
    where = f" (pid {worker['pid']} on {worker['node_ip']})" if worker else ""
    if isinstance(err, RayTaskError):
        cause = err.cause if err.cause is not None else err
        return f"{type(cause).__name__}: {cause}{where}"[:2000]
    if isinstance(err, RayActorError):
        return f"worker process died{where}: {str(err).strip().splitlines()[0][:500]}"
    return f"{type(err).__name__}: {str(err).strip()[:1000]}{where}"


def _raise_on_sigterm():
    """Make SIGTERM behave like Ctrl-C in the driver (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise FleetInterrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)

