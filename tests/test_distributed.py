"""Two workers over gloo with DeepSpeed ZeRO-2 (real processes, no Ray): equivalence and exact resume."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_faults import PlantedCode

from trainer.checkpoint import _write_manifest, verify
from trainer.errors import JobError
from trainer.loop import run_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, config_json: str, port: int, cache: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LORAFLEET_CACHE=cache
    )
    from schema.job import JobConfig

    run_job(JobConfig.model_validate_json(config_json))


def run_two_workers(config) -> None:
    mp.spawn(_worker, args=(config.model_dump_json(), free_port(), os.environ["LORAFLEET_CACHE"]), nprocs=2)


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_workers_follow_one_worker_with_twice_the_micro_batch_and_resume_exactly(make_job, tmp_path):
    common = {"optim": {"name": "paged_adamw_8bit"}, "checkpoint": {"every": 2}}
    single = make_job(train={"max_steps": 4, "micro_batch": 4, "grad_accum": 2}, output_dir=str(tmp_path / "one"), **common)
    double = make_job(train={"max_steps": 4, "micro_batch": 2, "grad_accum": 2}, output_dir=str(tmp_path / "two"), **common)
    run_job(single)
    run_two_workers(double)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    # Rank r streams examples r, r+2, ... so the two micro-batches of 2 are the single worker's batch of 4;
    # what remains is float summation order (measured: ~2e-8 relative).
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    zero_shards = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-4" / "shards" / "zero" / "state").iterdir())
    assert [n for n in zero_shards if "optim_states" in n] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # Resume from step 2 (as after a crash) and repeat steps 3 and 4 exactly.
    out = tmp_path / "two"
    (out / "final.json").unlink()
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "step-4")
    run_two_workers(double)
    assert losses(out) == two

    # A different world size cannot resume a two-worker checkpoint.
    (out / "final.json").unlink()
    with pytest.raises(JobError, match="2 worker"):
        run_job(double)


def test_a_planted_pickle_in_a_zero_shard_is_refused_and_never_runs(make_job, tmp_path):
    config = make_job(train={"max_steps": 1, "micro_batch": 2}, optim={"name": "paged_adamw_8bit"}, checkpoint={"every": 1})
    run_two_workers(config)
    out = config.output_dir
    (out / "final.json").unlink()  # as after a crash right after the last checkpoint: the re-run loads it
    shutil.rmtree(out / "adapter")
    checkpoint = out / "checkpoints" / "step-1"
    shard = checkpoint / "shards" / "zero" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": PlantedCode(str(marker))}, shard)

    # The manifest covers DeepSpeed's shards: the altered one is named.
    assert "shards/zero/state/zero_pp_rank_0_mp_rank_00_optim_states.pt" in verify(checkpoint)
    # An attacker who rewrote the manifest too meets DeepSpeed's loads, made weights-only.
    _write_manifest(checkpoint)
    with pytest.raises(mp.ProcessRaisedException) as failure:
        run_two_workers(config)
    assert f"JobError: {shard}: refused to load (Unsupported global" in str(failure.value)
    assert not marker.exists()
