"""Forgetting experiment: does self-generated rehearsal and/or LwF keep SmolLM2-135M's general abilities
while a QLoRA adapter learns a task? Real data from ../shared/data, same steps and seed in every arm.

Task: amazon_polarity, one T0 template ("Is_this_review": Positive / Negative), trained on the train part
of a content-hash split and scored (label accuracy) on its held-out test part.
General abilities: two other labelled T0 tasks (ag_news with choices, paws Yes/No; their accuracy drop
from the base), and held-out general instructions (general_prompts/user_oriented_instructions) that the
base answers: drift = mean per-token KL(base || adapted) over those answers, and their NLL.
Rehearsal data is self-generated: the base answers general_prompts/seed_tasks (a disjoint file), cached.

Arms: plain QLoRA; + rehearsal (20% of tokens); + LwF (weight 0.5); + both. Plus the base, no adapter.

    .venv/bin/python benchmarks/forgetting.py [--steps 16] [--micro-batch 2] [--n-eval 32] [--probe-n 16] [--prior-n 32]

Writes benchmarks/results/forgetting.{json,md} atomically. Skips (exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

import torch  # noqa: E402
import yaml  # noqa: E402

from _common import describe, machine_description  # noqa: E402
from launch.config import JobConfig  # noqa: E402
from trainer import run_job  # noqa: E402
from trainer.checkpoint import atomic_write_text  # noqa: E402
from schema.job import QuantConfig
from trainer.config import RehearsalConfig  # noqa: E402
from trainer.evaluation.matrix import evaluate_matrix
from trainer.evaluation import load_tasks_file  # noqa: E402
from trainer.models import load_base_model, load_tokenizer  # noqa: E402
from trainer.prior import ensure_prior_dataset, with_prior_rehearsal  # noqa: E402

MODEL = "smollm2-135m"
TASK_TEMPLATE = "Is_this_review"  # completions: Positive / Negative
GENERAL_TASKS = {"ag_news": "classify_with_choices", "paws": "labeled_final_Concatenation"}
SPLIT = [0.7, 0.0, 0.3]  # 200 rows per template: 60 held out is enough to see a change of ~15 points
ARMS = {
    "plain": {"rehearsal": False, "lwf": None},
    "rehearsal": {"rehearsal": True, "lwf": None},
    "lwf": {"rehearsal": False, "lwf": 0.5},
    "both": {"rehearsal": True, "lwf": 0.5},
}


def write_json_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def template_rows(dataset: str, template: str) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "t0" / f"{dataset}.jsonl").read_text().splitlines()]
    return [row for row in rows if row["template"] == template]


def prepare(work: Path, args) -> tuple[Path, Path]:
    """The task file (one template) and the tasks YAML: held-out task rows, general tasks, probe."""
    work.mkdir(parents=True, exist_ok=True)
    task_file = write_json_rows(work / "amazon_polarity.jsonl", template_rows("amazon_polarity", TASK_TEMPLATE))
    tasks = [{
        "name": "amazon", "path": str(task_file), "metric": "label", "split": "test", "split_fractions": SPLIT,
        "n": args.n_eval, "max_new_tokens": 8, "stop": ["\n"],
    }]
    for dataset, template in GENERAL_TASKS.items():
        general_file = write_json_rows(work / f"{dataset}.jsonl", template_rows(dataset, template))
        tasks.append({"name": dataset, "path": str(general_file), "metric": "label", "general": True, "n": args.n_eval, "max_new_tokens": 8, "stop": ["\n"]})
    probe = {"prompts": str(DATA / "general_prompts" / "user_oriented_instructions.jsonl"), "format": "self_instruct", "n": args.probe_n, "max_new_tokens": 48}
    tasks_yaml = work / "tasks.yaml"
    tasks_yaml.write_text(yaml.safe_dump({"tasks": tasks, "forgetting": probe}, sort_keys=False))
    return task_file, tasks_yaml


def job_config(name: str, arm: dict, task_file: Path, prior: Path | None, rehearsal: RehearsalConfig, work: Path, args) -> JobConfig:
    data = {"train": [{"path": str(task_file), "format": "prompt_completion", "split": "train", "split_fractions": SPLIT}],
            "mix": {"by": "tokens", "window": 4}, "overlong": "drop", "max_bad_frac": 0.2}  # ~6% of reviews exceed 256 tokens
    config = JobConfig.model_validate({
        "name": name,
        "model": MODEL,
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": args.lr, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"max_steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": 1, "seq_len": args.seq_len,
                  "grad_checkpointing": False, "seed": 0, "dtype": "fp32"},
        "data": data,
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "forgetting": {"lwf": {"weight": arm["lwf"], "on": "all"} if arm["lwf"] else None},
        "output_dir": str(work / "runs" / name),
    })
    if arm["rehearsal"]:
        # What a job with forgetting.rehearsal does inline: the cached prior dataset as a 20% source.
        config.data = with_prior_rehearsal(config.data, prior, rehearsal)
    return config


COLUMNS = [
    ("eval/amazon/accuracy", "task acc (amazon, held out)"),
    ("eval/forgetting/drift_kl", "drift KL(base‖adapted)"),
    ("eval/forgetting/response_nll_increase", "NLL of base answers, rise"),
    ("eval/ag_news/accuracy", "ag_news acc"),
    ("eval/paws/accuracy", "paws acc"),
    ("eval/forgetting/accuracy_drop", "mean general acc drop"),
]


def markdown(summary: dict) -> str:
    lines = [
        "# Forgetting: plain QLoRA vs self-generated rehearsal vs LwF (SmolLM2-135M, real data)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Setup: {summary['setup']}",
        "",
        "| arm | " + " | ".join(title for _, title in COLUMNS) + " | train loss, last step (incl. 0.5·KL in LwF arms) | train wall s |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for name, metrics in summary["rows"].items():
        job = summary["jobs"].get(name, {})
        cells = [f"{metrics[key]:.4f}" if key in metrics else "-" for key, _ in COLUMNS]
        loss = f"{job['train_loss']:.3f}" if job else "-"
        wall = f"{job['wall_time_s']:.0f}" if job else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss} | {wall} |")
    n_eval = summary.get("n_eval")
    if n_eval:
        lines += ["", f"Accuracies are over n={n_eval} rows per task: one row is {1 / n_eval:.3f}, and the binomial standard error "
                  f"at 0.6 is {(0.6 * 0.4 / n_eval) ** 0.5:.3f}; differences below ~0.15 are noise."]
    base_task = summary["rows"].get("base", {}).get("eval/amazon/accuracy")
    if base_task is not None:
        gains = ", ".join(f"{name} {metrics['eval/amazon/accuracy'] - base_task:+.3f}" for name, metrics in summary["rows"].items() if name != "base")
        lines += ["", f"Task accuracy gain over the base: {gains}."]
    lines += ["", "Drift relative to plain QLoRA (same run):", ""]
    plain = summary["rows"].get("plain", {}).get("eval/forgetting/drift_kl")
    for name in ("rehearsal", "lwf", "both"):
        value = summary["rows"].get(name, {}).get("eval/forgetting/drift_kl")
        if plain and value is not None:
            lines.append(f"- {name}: {value / plain:.2f}x plain's drift")
    prior = summary["prior"]
    lines += [
        "",
        f"Self-generated rehearsal data: {prior['rows']} base answers to {prior['prompts']} prompts, "
        f"generated in {prior['generation_s']:.0f} s, cached at {prior['path']}.",
        f"Timings (s): {summary['timings_s']}.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="Optimizer steps per arm (the budget).")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval", type=int, default=32, help="Rows per evaluated task.")
    parser.add_argument("--probe-n", type=int, default=16, help="General prompts the base answers for drift/NLL.")
    parser.add_argument("--prior-n", type=int, default=32, help="Prompts the base answers for rehearsal data.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "forgetting-bench")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where forgetting.{json,md} go.")
    args = parser.parse_args()
    if not (DATA / "t0").is_dir() or not (DATA / "general_prompts").is_dir():
        print(f"skipped: real data not found at {DATA} (needs t0/ and general_prompts/)")
        return
    started = time.perf_counter()
    work = args.work / f"steps{args.steps}-mb{args.micro_batch}-seq{args.seq_len}-lr{args.lr}"
    task_file, tasks_yaml = prepare(work, args)
    tasks = load_tasks_file(tasks_yaml)
    quant = QuantConfig(bits=4)
    rehearsal = RehearsalConfig(
        prompts=DATA / "general_prompts" / "seed_tasks.jsonl", format="self_instruct", n=args.prior_n, ratio=0.2, max_new_tokens=64
    )
    prior_started = time.perf_counter()
    tokenizer = load_tokenizer(MODEL)
    base = load_base_model(MODEL, quant, dtype=torch.float32)
    prior = ensure_prior_dataset(MODEL, rehearsal, quant=quant, dtype=torch.float32, model=base, tokenizer=tokenizer)
    prior_s = time.perf_counter() - prior_started

    jobs = {}
    for name in args.arms:
        config = job_config(name, ARMS[name], task_file, prior, rehearsal, work, args)
        result = run_job(config)
        jobs[name] = {"train_loss": result.train_loss, "wall_time_s": result.wall_time_s, "tokens": result.tokens, "adapter": str(result.adapter_dir)}
        print(f"{name}: {result.steps} steps, loss {result.train_loss:.3f}, {result.wall_time_s:.0f} s", flush=True)

    eval_started = time.perf_counter()
    rows = evaluate_matrix(base, tokenizer, [Path(jobs[name]["adapter"]) for name in args.arms], tasks)
    # Adapter rows are named by job directory: the arm names.
    eval_s = time.perf_counter() - eval_started
    summary = {
        "command": "python benchmarks/forgetting.py " + " ".join(sys.argv[1:]),
        "machine": describe(machine_description()) + " (cores shared with other processes)",
        "setup": (
            f"{MODEL} 4-bit NF4 QLoRA r16 attn, {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens (packed), "
            f"lr {args.lr} cosine, seed 0; task amazon_polarity/{TASK_TEMPLATE} split {SPLIT} (eval on test part, n={args.n_eval}); "
            f"general tasks {GENERAL_TASKS} n={args.n_eval}; drift probe: {args.probe_n} user_oriented_instructions, 48 new tokens; "
            f"rehearsal: 20% of tokens, base answers to {args.prior_n} seed_tasks prompts (64 new tokens, greedy); LwF weight 0.5, T=1, on all tokens"
        ),
        "prior": {"path": str(prior), **json.loads((prior.parent / "meta.json").read_text())},
        "n_eval": args.n_eval,
        "jobs": jobs,
        "rows": rows,
        "timings_s": {"prior": round(prior_s, 1), "eval": round(eval_s, 1), "total": round(time.perf_counter() - started, 1)},
    }
    atomic_write_text(args.out / "forgetting.json", json.dumps(summary, indent=2))
    atomic_write_text(args.out / "forgetting.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
