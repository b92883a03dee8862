from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SHARED_DATA = ROOT.parent / "shared" / "data"

from tiny import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model/data caches go to a per-session temp dir unless the caller pinned LORAFLEET_CACHE."""
    if "LORAFLEET_CACHE" not in os.environ:
        os.environ["LORAFLEET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the completion is fully determined by the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"prompt": f"Q: What is {a} plus {b}? A:", "completion": f" {a + b}"})
    return rows


@pytest.fixture
def toy_data(tmp_path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", addition_rows(64, seed=1)),
        "eval": write_jsonl(tmp_path / "val.jsonl", addition_rows(16, seed=2)),
    }


@pytest.fixture
def make_job(tmp_path, tiny_model_dir, toy_data):
    """A JobConfig for the tiny model on the toy task; keyword sections are deep-merged over the defaults."""
    from schema.job import JobConfig
    from schema.fleet import deep_merge

    def build(**sections) -> "JobConfig":
        raw = {
            "name": "toy",
            "model": str(tiny_model_dir),
            "quant": {"bits": 4, "type": "nf4", "double_quant": True},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn"},
            "optim": {"name": "adamw", "lr": 5e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "train": {"max_steps": 6, "micro_batch": 4, "grad_accum": 1, "seq_len": 64, "grad_checkpointing": True, "seed": 7},
            "data": {"train": {"path": str(toy_data["train"]), "format": "prompt_completion"},
                     "eval": {"path": str(toy_data["eval"]), "format": "prompt_completion"}},
            "eval": {"every": 0},
            "checkpoint": {"every": 0, "keep": 2},
            "output_dir": str(tmp_path / "run"),
        }
        return JobConfig.model_validate(deep_merge(raw, sections))

    return build
