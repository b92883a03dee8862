"""The demo's data, generated deterministically by the project (`python -m launch.demo_data`).

Two small tasks whose answers follow from the prompt, so an adapter can visibly learn them in minutes:
- arithmetic: two-digit additions answered as "a + b = c";
- sort_words: four words sorted alphabetically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger maple ocean pencil garden window silver rocket candle forest violin "
    "planet mirror basket dragon lemon castle harbor meadow pepper saddle thunder velvet walnut zebra "
    "anchor bridge copper desert engine falcon glacier hammer island jungle kettle ladder magnet needle "
    "orchid parrot quartz ribbon summer tunnel umbrella valley wagon yellow"
).split()


def arithmetic_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}"})
    return rows


def sort_words_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, 4)
        rows.append({"prompt": f"Sort these words alphabetically: {', '.join(words)}", "completion": ", ".join(sorted(words))})
    return rows


TASKS = {"arithmetic": arithmetic_rows, "sort_words": sort_words_rows}


def write_demo_data(root: Path, train_rows: int = 400, val_rows: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write <root>/<task>/{train,val}.jsonl for every task; returns the task directories."""
    written = {}
    for index, (task, make_rows) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + index)
        rows = make_rows(train_rows + val_rows, rng)
        directory = root / task
        directory.mkdir(parents=True, exist_ok=True)
        for split, part in (("train", rows[:train_rows]), ("val", rows[train_rows:])):
            tmp = directory / f".{split}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(row) + "\n" for row in part))
            tmp.replace(directory / f"{split}.jsonl")
        written[task] = directory
    return written


if __name__ == "__main__":
    for task, directory in write_demo_data(Path(__file__).resolve().parents[1] / "examples" / "data").items():
        print(f"{task}: {directory}")
