"""The demo's data, generated deterministically by the project (`python -m launch.demo_data`).

Two small tasks whose answers follow from the prompt, so an adapter can visibly learn them in minutes:
- arithmetic: two-digit additions answered as "a + b = c";
- sort_words: four words sorted alphabetically;
and general_prompts.txt, everyday instructions for the forgetting probe of examples/tasks.yaml.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from schema.atomic import write_text_atomic

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

# General instructions the demo's tasks have nothing to do with: examples/tasks.yaml asks the base model
# these, and measures how far each adapter drifts from its answers (the forgetting probe).
GENERAL_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain what a rainbow is in one sentence.",
    "Name two primary colors.",
    "Write a short greeting for a birthday card.",
    "What does a thermometer measure?",
    "Suggest a name for a pet goldfish.",
    "Describe the taste of a lemon.",
    "Why do leaves change color in autumn?",
    "List three things you might find in a kitchen.",
    "What is the opposite of cold?",
    "How many days are in a week?",
    "Translate 'thank you' into Spanish.",
    "What do bees make?",
    "Give an example of a mammal that can fly.",
    "Write one sentence about the ocean.",
    "What is water made of?",
    "Recommend a book genre for a rainy day.",
    "What is the largest planet in our solar system?",
    "Summarize the plot of Cinderella in one sentence.",
    "What instrument has black and white keys?",
    "Name a fruit that is yellow.",
    "What do you call a baby cat?",
    "Explain why we need sleep.",
)


def write_demo_data(root: Path, train_rows: int = 400, val_rows: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write <root>/<task>/{train,val}.jsonl for every task; returns the task directories."""
    written = {}
    for index, (task, make_rows) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + index)
        rows = make_rows(train_rows + val_rows, rng)
        directory = root / task
        for split, part in (("train", rows[:train_rows]), ("val", rows[train_rows:])):
            write_text_atomic(directory / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in part))
        written[task] = directory
    write_text_atomic(root / "general_prompts.txt", "".join(prompt + "\n" for prompt in GENERAL_PROMPTS))
    return written


if __name__ == "__main__":
    for task, directory in write_demo_data(Path(__file__).resolve().parents[1] / "examples" / "data").items():
        print(f"{task}: {directory}")
