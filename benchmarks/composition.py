"""Composition experiment: three task adapters (two T0 classification tasks and GSM8K, QLoRA on
SmolLM2-135M, real data) combined by the composer, against each single adapter and one adapter trained
on the mixed data. Everything is evaluated on the NF4 base the adapters were trained on.

Tasks: ag_news `classify_with_choices` and amazon_polarity `Is_this_review` (label accuracy and
reference NLL on the held-out part of a content-hash split), GSM8K in the PLR paper's prompt
(reference-solution NLL on the test set; --gsm8k-accuracy adds generated-answer accuracy, slow on CPU).
Forgetting: drift KL(base || model) and the NLL increase of the base's own answers to held-out general
instructions. Data, prompts and training settings are those of benchmarks/plr.py.

Rows: base; each single adapter; the mixed-data adapter (same steps as one single adapter); and the
compositions: linear (the exact average, wᵢ = 1/3), task_arithmetic (λ = 1, Σ ΔWᵢ), ties and dare_ties
(density 0.5, λ = 1, seed 0), learned (weights fit on training-split examples of the three tasks).

    .venv/bin/python benchmarks/composition.py [--steps 20] [--n-eval 32] [--methods linear ties ...]

Finished adapters are reused when the script runs again with the same options (run_job returns their result).
Writes benchmarks/results/composition.{json,md} atomically. Skips (exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from plr import (
    DATA,
    common_args,
    eval_tasks,
    machine,
    rows_of,
    training_defaults,
    training_line,
    write_tasks,
)

from compositor.pipeline import run_compose
from compositor.restore import load_base
from schema.atomic import write_json_atomic, write_text_atomic
from schema.compose import ComposeConfig
from schema.fleet import deep_merge
from schema.job import JobConfig
from trainer import run_job
from trainer.checks import load_tasks_file
from trainer.evaluation.matrix import evaluate_matrix
from trainer.models import load_tokenizer

TASKS = ["ag_news", "amazon", "gsm8k"]
METHODS = {
    "linear": {"method": "linear"},
    "task_arithmetic": {"method": "task_arithmetic", "lambda": 1.0},
    "ties": {"method": "ties", "density": 0.5},
    "dare_linear": {"method": "dare_linear", "density": 0.5, "seed": 0},
    "dare_ties": {"method": "dare_ties", "density": 0.5, "seed": 0},
    "learned": {"method": "learned"},
}


def train(name: str, sources: list[dict], work: Path, args) -> dict:
    """One NF4 QLoRA job with plr.py's settings; the same name and options give the same directory, so
    a finished job is reused (run_job returns its recorded result without training)."""
    config = JobConfig.model_validate(deep_merge(training_defaults(args), {
        "name": name,
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "data": {"train": sources},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "output_dir": str(work / "runs" / name),
    }))
    result = run_job(config).to_dict()
    print(f"{name}: {result['steps']} steps, train loss {result['train_loss']:.3f}, {result['wall_time_s']:.0f} s", flush=True)
    return result


def markdown(summary: dict) -> str:
    columns = summary["table_columns"]
    lines = [
        "# Composing task adapters: singles, mixed-data training, and merge methods (SmolLM2-135M QLoRA, real data)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Setup: {summary['setup']}",
        "",
        "| model | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in summary["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.4f}" if key in metrics else "-" for key, _ in columns) + " |")
    lines += ["", "Accuracy: higher is better. NLL, drift KL and NLL increase: lower is better.", "", "Compositions:", ""]
    for name, record in summary["compositions"].items():
        detail = f"weights {[round(w, 3) for w in record['weights']]}"
        if record.get("retained_energy") is not None:
            detail += f", SVD retained energy {record['retained_energy']:.3f}"
        if "learned" in record:
            fit = record["learned"]
            detail += f", fit loss {fit['initial_loss']:.3f} -> {fit['final_loss']:.3f} in {fit['fit_s']:.0f} s"
        lines.append(f"- {name}: {detail}")
    lines += ["", training_line(summary["jobs"]), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--mixed-steps", type=int, default=None, help="Steps of the mixed-data adapter (default: --steps).")
    parser.add_argument("--gsm8k-accuracy", action="store_true", help="Also generate GSM8K answers for accuracy (slow on CPU).")
    parser.add_argument("--learn-examples", type=int, default=12, help="Training-split examples the learned weights are fit on.")
    parser.add_argument("--learn-steps", type=int, default=25)
    args = parser.parse_args()
    if not (DATA / "gsm8k").is_dir() or not (DATA / "t0").is_dir() or not (DATA / "general_prompts").is_dir():
        print(f"skipped: real data not found at {DATA} (needs gsm8k/, t0/ and general_prompts/)")
        return
    started = time.perf_counter()
    work = args.work / f"{Path(args.model).name}-steps{args.steps}-mb{args.micro_batch}-seq{args.seq_len}-lr{args.lr}"
    work.mkdir(parents=True, exist_ok=True)

    jobs = {f"{task}-4bit": train(f"{task}-4bit", [rows_of(work, task, "train")], work, args) for task in TASKS}
    mixed_args = argparse.Namespace(**{**vars(args), "steps": args.mixed_steps or args.steps})
    jobs["mixed-4bit"] = train("mixed-4bit", [rows_of(work, task, "train") for task in TASKS], work, mixed_args)
    train_s = time.perf_counter() - started

    singles = [jobs[f"{task}-4bit"]["adapter_dir"] for task in TASKS]
    learn_tasks = write_tasks(work / "learn-tasks.yaml", [t for task in TASKS for t in eval_tasks(work, task, args, split="train", accuracy=False)], args)
    compositions: dict[str, dict] = {}
    compose_started = time.perf_counter()
    for name in args.methods:
        settings = dict(METHODS[name])
        if name == "learned":
            settings["learn"] = {"tasks": learn_tasks, "examples": args.learn_examples, "steps": args.learn_steps, "base_precision": 4}
        compositions[name] = run_compose(ComposeConfig(name=name, adapters=singles, **settings), work / "compose" / name)
        print(f"{name}: weights {compositions[name]['weights']}", flush=True)
    compose_s = time.perf_counter() - compose_started

    evaluated = [row for task in TASKS for row in eval_tasks(work, task, args, accuracy=task != "gsm8k" or args.gsm8k_accuracy)]
    tasks = load_tasks_file(write_tasks(work / "tasks-composition.yaml", evaluated, args))
    tokenizer = load_tokenizer(args.model)
    eval_started = time.perf_counter()
    adapter_dirs = [Path(a) for a in singles] + [Path(jobs["mixed-4bit"]["adapter_dir"])] + [work / "compose" / name for name in args.methods]
    rows = evaluate_matrix(load_base(args.model, 4, torch.float32), tokenizer, adapter_dirs, tasks)
    eval_s = time.perf_counter() - eval_started

    table_columns = [
        ("eval/ag_news/accuracy", "ag_news acc"),
        ("eval/amazon/accuracy", "amazon acc"),
        ("eval/ag_news_nll/loss", "ag_news NLL"),
        ("eval/amazon_nll/loss", "amazon NLL"),
        ("eval/gsm8k_nll/loss", "GSM8K NLL"),
    ]
    if args.gsm8k_accuracy:
        table_columns.insert(2, ("eval/gsm8k/accuracy", "GSM8K acc"))
    table_columns += [("eval/forgetting/drift_kl", "drift KL"), ("eval/forgetting/response_nll_increase", "general NLL increase")]
    summary = {
        "command": "python benchmarks/composition.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "setup": (
            f"{args.model} NF4 QLoRA r16 alpha32 attn, {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens per single adapter "
            f"(mixed: {mixed_args.steps} steps over the three sources, equal token shares), lr {args.lr} cosine, seed 0, fp32 compute; "
            f"eval on the NF4 base: T0 held-out split n<={args.n_eval}, GSM8K test n={args.gsm8k_n} (NLL); drift probe {args.probe_n} "
            f"user_oriented_instructions (48 new tokens); learned: {args.learn_examples} training-split examples, {args.learn_steps} Adam steps, L1 0.01"
        ),
        "table_columns": table_columns,
        "rows": rows,
        "jobs": jobs,
        "compositions": compositions,
        "timings_s": {"train": round(train_s, 1), "compose": round(compose_s, 1), "eval": round(eval_s, 1), "total": round(time.perf_counter() - started, 1)},
    }
    write_json_atomic(args.out / "composition.json", summary)
    write_text_atomic(args.out / "composition.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
