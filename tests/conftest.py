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
