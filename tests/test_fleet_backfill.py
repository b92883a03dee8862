"""The scheduler on a simulated cluster (ray.cluster_utils.Cluster, fake GPUs), with a worker body that
sleeps instead of training: backfill, its bound, whole-node placement of 2-GPU jobs, packs."""

from __future__ import annotations

import functools
import io
import time
from collections import deque
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from cluster.capacity import job_shape
from cluster.fleet import FleetJob, FleetRunner, WorkerSet
from cluster.records import RUNNING
from cluster.session import ray_nodes
from cluster.simulation import sleeping_pack
from cluster.view import LogLinesView
from schema.job import JobConfig


@pytest.fixture(scope="module")
def two_nodes_of_two_gpus():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield ray_nodes()
    ray.shutdown()
    cluster.shutdown()


def fleet(tmp_path: Path, gpus: list[int], steps: list[int], models: list[str] | None = None) -> list[FleetJob]:
    """Jobs of `gpus` GPUs and `max_steps` each; jobs of one model (one pack group) unless `models` says."""
    jobs = []
    for index, (count, max_steps, model) in enumerate(zip(gpus, steps, models or ["unused"] * len(gpus))):
        config = JobConfig.model_validate({
            "name": f"j{index}", "model": model, "data": {"train": {"path": "unused.jsonl"}},
            "train": {"max_steps": max_steps}, "resources": {"gpus_per_job": count}, "output_dir": str(tmp_path / f"j{index}"),
        })
        jobs.append(FleetJob(config=config, shape=job_shape(config.resources, cluster_has_gpus=True), max_failures=0))
    return jobs


def wait_until_every_gpu_is_free(timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources().get("GPU", 0):
        assert time.time() < deadline, "the cluster's GPUs were not given back"
        time.sleep(0.2)


def run(tmp_path: Path, nodes, jobs: list[FleetJob], **options):
    view = LogLinesView(Console(file=io.StringIO(), width=200))
    runner = FleetRunner("sim", jobs, tmp_path / "run", nodes, view, slots=4, body=functools.partial(sleeping_pack, step_s=0.05), **options)
    return runner.run()


# A 2-GPU job behind single-GPU ones: while it waits for two GPUs on one node, later jobs may backfill.
GPUS = [1, 1, 1, 2, 1, 1, 1, 1, 2, 1, 1, 1]
STEPS = [30, 6, 12, 4, 6, 8, 6, 10, 4, 6, 8, 6]


def test_backfill_is_bounded_and_no_job_starves(two_nodes_of_two_gpus, tmp_path):
    record = run(tmp_path, two_nodes_of_two_gpus, fleet(tmp_path, GPUS, STEPS), max_adapters=1, backfill=2)
    assert record.state == "finished" and all(job.state == "finished" for job in record.jobs.values())
    assert all(len(job.attempts) == 1 for job in record.jobs.values())  # every job ran exactly once
    assert all(len(job.passed_by) <= 2 for job in record.jobs.values())  # the rule: at most 2 passes per waiting head
    assert any(job.passed_by for job in record.jobs.values())  # and backfill did happen
    order = sorted(record.jobs, key=lambda name: record.jobs[name].attempts[0].submitted_at)
    for name, job in record.jobs.items():  # whoever started before a job, from later in the fleet, is in its passed_by
        index = int(name[1:])
        earlier_starts = {other for other in order[: order.index(name)] if int(other[1:]) > index}
        assert earlier_starts <= set(job.passed_by) | {p for j in record.jobs.values() for p in j.passed_by}, name
    for name in ("j3", "j8"):  # the 2-GPU jobs: two workers, one node
        workers = record.jobs[name].attempts[0].workers
        assert len(workers) == 2 and workers[0]["node_id"] == workers[1]["node_id"], workers


def test_backfill_zero_keeps_strict_fleet_order(two_nodes_of_two_gpus, tmp_path):
    record = run(tmp_path, two_nodes_of_two_gpus, fleet(tmp_path, GPUS[:8], STEPS[:8]), max_adapters=1, backfill=0)
    starts = [record.jobs[f"j{i}"].attempts[0].submitted_at for i in range(8)]
    assert starts == sorted(starts) and all(not job.passed_by for job in record.jobs.values())


def test_packs_and_rolling_joins_on_gpus(two_nodes_of_two_gpus, tmp_path):
    # Two slots for ten jobs in packs of three: six start at once, the other four join as jobs end.
    record = run(tmp_path, two_nodes_of_two_gpus, fleet(tmp_path, [1] * 10, [6, 8, 4, 10, 6, 8, 4, 6, 10, 4]), max_adapters=3, max_concurrent=2)
    assert all(job.state == "finished" and len(job.attempts) == 1 for job in record.jobs.values())
    assert len(record.workers) == 2 and sum(len(w["jobs"]) for w in record.workers.values()) == 10
    assert record.summary["worker_starts"] == len(record.workers)


def test_free_slots_are_filled_before_packs_grow(two_nodes_of_two_gpus, tmp_path):
    # Three jobs of one group on four free GPUs: a worker each; no GPU idles while another trains two adapters.
    spread = run(tmp_path / "spread", two_nodes_of_two_gpus, fleet(tmp_path / "spread", [1] * 3, [6, 6, 6]), max_adapters=4)
    assert sorted(len(w["jobs"]) for w in spread.workers.values()) == [1, 1, 1]
    # Five jobs on two slots: packs as even as the slots allow.
    even = run(tmp_path / "even", two_nodes_of_two_gpus, fleet(tmp_path / "even", [1] * 5, [6] * 5), max_adapters=4, max_concurrent=2)
    assert sorted(len(w["jobs"]) for w in even.workers.values()) == [2, 3]
    # Two groups of two on two slots: two packs at once, not one group's jobs alone while the other waits.
    groups = run(tmp_path / "groups", two_nodes_of_two_gpus, fleet(tmp_path / "groups", [1] * 4, [6] * 4, ["a", "a", "b", "b"]), max_adapters=4, max_concurrent=2)
    assert sorted(sorted(w["jobs"]) for w in groups.workers.values()) == [["j0", "j1"], ["j2", "j3"]]
    assert all(job.state == "finished" for job in [*spread.jobs.values(), *even.jobs.values(), *groups.jobs.values()])


def test_the_waiting_head_gets_the_node_that_frees_first_and_later_jobs_use_the_others(two_nodes_of_two_gpus, tmp_path):
    # Two short and two long 1-GPU jobs fill both nodes; a 2-GPU job waits at the head. Its node is held from
    # the jobs' ETAs: the short jobs' node. Later jobs may not take that node's slots as they free, so the
    # 2-GPU job starts long before the long jobs end; and nothing is starved (no backfill bound: the default).
    wait_until_every_gpu_is_free()  # the previous test's workers give theirs back asynchronously
    record = run(tmp_path, two_nodes_of_two_gpus, fleet(tmp_path, [1, 1, 1, 1, 2, 1, 1, 1, 1], [8, 8, 60, 60, 4, 4, 4, 4, 4]), max_adapters=1)
    assert all(job.state == "finished" and len(job.attempts) == 1 for job in record.jobs.values())
    node_of = {name: job.attempts[0].workers[0]["node_id"] for name, job in record.jobs.items()}
    assert node_of["j0"] == node_of["j1"] != node_of["j2"] == node_of["j3"]  # best fit: one node each
    head = record.jobs["j4"].attempts[0]
    assert node_of["j4"] == node_of["j0"]
    assert head.running_at < min(record.jobs[n].attempts[0].ended_at for n in ("j2", "j3"))
    # Whoever started while the head waited ran elsewhere than its node.
    assert all(node_of[name] != node_of["j4"] for name in record.jobs["j4"].passed_by)


def test_a_head_waits_for_a_worker_set_of_its_shape_rather_than_have_one_closed_for_it(two_nodes_of_two_gpus, tmp_path):
    # The hold decision, on the scheduler's own books: node A runs a 2-GPU job (j0), node B two 1-GPU jobs
    # (j1, j2). Holding A for a waiting 1-GPU head would close A's 2-GPU worker set when j0 ends and start
    # two new processes there; a 1-GPU worker set on B that frees about as soon takes the head in its process.
    jobs = fleet(tmp_path, [2, 1, 1, 1, 2, 1], [10] * 6)
    view = LogLinesView(Console(file=io.StringIO(), width=200))
    nodes = [node for node in two_nodes_of_two_gpus if node.gpus]
    runner = FleetRunner("sim", jobs, tmp_path / "run", nodes, view, slots=4, max_adapters=1)
    node_a, node_b = sorted(runner.capacity)
    for index, node in ((0, node_a), (1, node_b), (2, node_b)):
        job = jobs[index]
        worker = WorkerSet(id=f"w{index}", shape=job.shape, group=job.group, capacity=1, placement=None, state=RUNNING, jobs={job.name}, node_id=node)
        runner.workers[worker.id] = worker
        runner._count(worker, +1)

    def hold(head: int, etas: tuple[float, float, float], start_s: float | None, queue: tuple[int, ...] = ()):
        for name, eta in zip(("j0", "j1", "j2"), etas):
            runner.record.jobs[name].eta_s = eta
        runner.start_times.clear()
        runner.start_times.extend([] if start_s is None else [start_s])
        runner.queue = deque(f"j{index}" for index in (head, *queue))
        return runner._node_to_hold(f"j{head}")

    # A 1-GPU head (j3).
    assert hold(3, (2.0, 5.0, 60.0), start_s=None) == node_a  # no start measured yet: the node that fits it first
    assert hold(3, (2.0, 5.0, 60.0), start_s=1.0) == node_a  # B frees 3 s after A: more than a start costs
    assert hold(3, (2.0, 2.5, 60.0), start_s=1.0) is None  # B frees within a start's cost: the head waits for it
    assert hold(3, (6.0, 5.0, 60.0), start_s=0.0) is None  # B frees first
    assert hold(3, (2.0, 2.5, 60.0), start_s=1.0, queue=(4, 5)) is None  # a 2-GPU job comes next: one 1-GPU set is enough
    # Another 1-GPU job queued right behind the head needs a second 1-GPU set, and B's other one frees at 60 s:
    # the 1-GPU jobs are short of worker sets, so A is held and turned into 1-GPU ones.
    assert hold(3, (2.0, 2.5, 60.0), start_s=1.0, queue=(5, 4)) == node_a
    assert hold(3, (2.0, 2.5, 3.0), start_s=1.0, queue=(5, 4)) is None  # unless both free about as soon
    # A 2-GPU head (j4): B drains long before A's 2-GPU job ends, so B is held; if A's ends about as soon, no hold.
    assert hold(4, (30.0, 5.0, 8.0), start_s=1.0) == node_b
    assert hold(4, (8.5, 5.0, 8.0), start_s=1.0) is None
    assert hold(4, (30.0, 5.0, None), start_s=1.0) is None  # j2 has no ETA yet (never, for now): B cannot beat A's own
