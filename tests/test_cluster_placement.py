"""Placement on a real 2-node Ray cluster with fake GPUs: 2-GPU jobs never span nodes, 1-GPU jobs fill both."""

from __future__ import annotations

from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from cluster.capacity import job_shape
from schema.job import ResourcesConfig
from cluster.session import ray_nodes
from cluster.worker import distributed_env, release, reserve, start_workers, stop_workers

GPUS_PER_NODE = 2


@pytest.fixture(scope="module")
def two_nodes():
    """Two raylets on this machine, each with 2 CPUs and 2 (fake) GPUs."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": GPUS_PER_NODE, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def bundle_nodes(group) -> list[str]:
    table = placement_group_table(group)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


def test_two_gpu_jobs_stay_on_one_node_and_one_gpu_jobs_fill_both(two_nodes):
    nodes = ray_nodes()
    assert len(nodes) == 2 and all(node.gpus == GPUS_PER_NODE for node in nodes)
    two = job_shape(ResourcesConfig(gpus_per_job=2, cpus_per_job=1), cluster_has_gpus=True)
    one = job_shape(ResourcesConfig(gpus_per_job=1, cpus_per_job=1), cluster_has_gpus=True)

    pair = [reserve(two) for _ in range(2)]
    ray.get([group.ready() for group in pair], timeout=30)
    placed = [bundle_nodes(group) for group in pair]
    assert all(len(set(nodes_of_job)) == 1 for nodes_of_job in placed), placed  # never spans nodes
    assert {nodes_of_job[0] for nodes_of_job in placed} == {node.node_id for node in nodes}
    for group in pair:
        release(group)

    singles = [reserve(one) for _ in range(4)]
    ray.get([group.ready() for group in singles], timeout=30)
    per_node = Counter(bundle_nodes(group)[0] for group in singles)
    assert sorted(per_node.values()) == [GPUS_PER_NODE, GPUS_PER_NODE]

    # One GPU free on each node: 2 GPUs free in all, but a 2-GPU job must wait (STRICT_PACK).
    release(singles[0])
    freed_node = bundle_nodes(singles[0])[0]
    other = next(group for group in singles[1:] if bundle_nodes(group)[0] != freed_node)
    release(other)
    waiting = reserve(two)
    ready, _ = ray.wait([waiting.ready()], timeout=3)
    assert ready == []
    remaining_on_freed = next(group for group in singles[1:] if bundle_nodes(group)[0] == freed_node)
    release(remaining_on_freed)  # now a whole node is free
    ray.get(waiting.ready(), timeout=30)
    assert bundle_nodes(waiting) == [freed_node, freed_node]
    for group in singles[1:]:
        if group not in (other, remaining_on_freed):
            release(group)
    release(waiting)


def test_workers_of_a_two_gpu_job_run_on_their_bundles_node(two_nodes):
    shape = job_shape(ResourcesConfig(gpus_per_job=2, cpus_per_job=1), cluster_has_gpus=True)
    group = reserve(shape)
    ray.get(group.ready(), timeout=30)
    workers = start_workers(shape, group, "pair")
    infos = ray.get([worker.info.remote() for worker in workers], timeout=60)
    node = bundle_nodes(group)[0]
    assert [info["node_id"] for info in infos] == [node, node]
    assert len({info["pid"] for info in infos}) == 2
    env = [distributed_env(rank, infos) for rank in range(shape.workers)]
    assert [e["RANK"] for e in env] == ["0", "1"] and {e["MASTER_PORT"] for e in env} == {str(infos[0]["port"])}
    assert env[1]["MASTER_ADDR"] == infos[0]["node_ip"] and env[1]["WORLD_SIZE"] == "2"
    # Each worker holds its own GPU, and sees both, its own at index LOCAL_RANK.
    own = [info["gpu_ids"] for info in infos]
    assert all(len(ids) == 1 for ids in own) and own[0] != own[1]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in env] == [f"{own[0][0]},{own[1][0]}"] * 2
    stop_workers(workers)
    release(group)
