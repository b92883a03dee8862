"""What a job asks of the cluster, and whether any node could ever give it. Pure Python: no Ray here.

A *slot* is what one training worker holds: one GPU (with `cpus_per_job` CPUs) on a GPU cluster, or
`cpus_per_job` CPUs on a CPU-only cluster, where a CPU slot stands in for each GPU. A job has one
worker per GPU it asks for (one worker when `gpus_per_job` is 0), and all its workers sit on one node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from schema.job import ResourcesConfig


@dataclass(frozen=True)
class NodeCapacity:
    """The resources one node has in all (not what is free now)."""

    node_id: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class JobShape:
    """How a job is laid out: `workers` processes, each in its own bundle of one placement group."""

    workers: int
    cpus_per_worker: int
    gpus_per_worker: int

    def bundles(self) -> list[dict[str, float]]:
        bundle: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            bundle["GPU"] = float(self.gpus_per_worker)
        return [dict(bundle) for _ in range(self.workers)]

    def fits(self, node: NodeCapacity) -> bool:
        return self.workers * self.cpus_per_worker <= node.cpus and self.workers * self.gpus_per_worker <= node.gpus


def job_shape(resources: ResourcesConfig, cluster_has_gpus: bool) -> JobShape:
    """One worker per GPU (or per CPU slot on a CPU-only cluster); `gpus_per_job: 0` is one CPU worker."""
    workers = max(1, resources.gpus_per_job)
    gpus = 1 if (cluster_has_gpus and resources.gpus_per_job > 0) else 0
    return JobShape(workers=workers, cpus_per_worker=resources.cpus_per_job, gpus_per_worker=gpus)


def cluster_has_gpus(nodes: list[NodeCapacity]) -> bool:
    return any(node.gpus > 0 for node in nodes)


def unsatisfiable(resources: list[ResourcesConfig], nodes: list[NodeCapacity]) -> list[tuple[int, str, str, str]]:
    """(job index, resources field, reason, fix) for every job that no node could ever hold, however long it waits."""
    if not nodes:
        return [(index, "gpus_per_job", "the cluster has no nodes", "start or join a cluster with nodes") for index in range(len(resources))]
    gpus = cluster_has_gpus(nodes)
    biggest_cpus = max(node.cpus for node in nodes)
    biggest_gpus = max(node.gpus for node in nodes)
    problems = []
    for index, wanted in enumerate(resources):
        shape = job_shape(wanted, gpus)
        if any(shape.fits(node) for node in nodes):
            continue
        if shape.workers * shape.gpus_per_worker > biggest_gpus:
            problems.append((index, "gpus_per_job", f"needs {shape.workers} GPUs on one node, but the largest node has {biggest_gpus:g}", f"ask for at most {biggest_gpus:g}"))
        else:
            where = "" if gpus else " (CPU-only cluster: each GPU asked for becomes a worker holding cpus_per_job CPUs)"
            problems.append(
                (
                    index,
                    "cpus_per_job",
                    f"needs {shape.workers} x {shape.cpus_per_worker} CPUs on one node, but the largest node has {biggest_cpus:g}{where}",
                    "lower cpus_per_job or gpus_per_job, or add a bigger node",
                )
            )
    return problems


def local_node(num_cpus: int | None = None, num_gpus: int | None = None) -> NodeCapacity:
    """The node an embedded local cluster would have: this machine's CPUs and CUDA devices unless given."""
    if num_gpus is None:
        num_gpus = visible_gpus()
    return NodeCapacity(node_id="local", cpus=float(num_cpus or os.cpu_count() or 1), gpus=float(num_gpus))


def visible_gpus() -> int:
    """CUDA devices this process would see, found without importing torch (the NVIDIA driver lists them).
    Ray counts them again when the cluster starts, and the fleet is checked against that count too."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    listed = Path("/proc/driver/nvidia/gpus")
    if listed.is_dir():
        return len(list(listed.iterdir()))
    return len([d for d in Path("/dev").glob("nvidia[0-9]*")])


def slot_count(nodes: list[NodeCapacity], default: ResourcesConfig) -> int:
    """Slots of the cluster: its GPUs, or on a CPU-only cluster its CPUs in groups of the default cpus_per_job."""
    if cluster_has_gpus(nodes):
        return int(sum(node.gpus for node in nodes))
    return int(sum(node.cpus // default.cpus_per_job for node in nodes))
