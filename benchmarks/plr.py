"""Post-LoRA Restoration experiment: does an adapter trained on the NF4 base do better when it is put
back onto the int8 (PLR8) or original (PLR16) base? SmolLM2-135M, real data, same steps and seed
in every arm.

Tasks: GSM8K (train on gsm8k/train, score on gsm8k/test: integer answer accuracy, and the NLL of
the reference solutions) and one T0 task, ag_news `classify_with_choices` (content-hash split 70/30,
label accuracy and reference NLL on the held-out part). Forgetting: drift KL(base || adapted) on
held-out general instructions, each column against its own base.

Arms, per task: a 16-bit LoRA (trained and evaluated on the fp32 base); QLoRA (trained on NF4) evaluated
as trained, on the int8 base (PLR8) and on the original base (PLR16); with --with-8bit also a LoRA
trained on the int8 base. The table has the shape of the published PLR table: columns
16-bit LoRA | QLoRA | PLR8 | PLR16, rows tasks.

    .venv/bin/python benchmarks/plr.py [--steps 20] [--n-eval 32] [--gsm8k-n 16] [--with-8bit]

Writes benchmarks/results/plr.{json,md} atomically. Skips (exit 0) when ../shared/data is absent.
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
from compositor.restore import load_base, merge_comparison, probe_ids, quantization_error_table, summarize_errors  # noqa: E402
from launch.config import JobConfig  # noqa: E402
from trainer import run_job  # noqa: E402
from trainer.checkpoint import atomic_write_text  # noqa: E402
from trainer.evaluation.matrix import adapter_row_names, evaluate_matrix
from trainer.evaluation import load_tasks_file  # noqa: E402
from trainer.models import load_tokenizer  # noqa: E402

MODEL = "smollm2-135m"
SPLIT = [0.7, 0.0, 0.3]
# T0 tasks as (dataset, template): the completions are short labels.
T0_TASKS = {"ag_news": ("ag_news", "classify_with_choices"), "amazon": ("amazon_polarity", "Is_this_review")}


def machine() -> str:
    return describe(machine_description()) + " (cores shared with other processes)"


def t0_file(work: Path, name: str) -> Path:
    dataset, template = T0_TASKS[name]
    rows = [json.loads(line) for line in (DATA / "t0" / f"{dataset}.jsonl").read_text().splitlines()]
    path = work / f"{name}.jsonl"
    if not path.is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r["template"] == template))
    return path


def train_source(work: Path, task: str) -> dict:
    """The training source of a task (train part only)."""
    if task == "gsm8k":
        return {"path": str(DATA / "gsm8k" / "train.jsonl"), "format": "question_answer"}
    return {"path": str(t0_file(work, task)), "format": "prompt_completion", "split": "train", "split_fractions": SPLIT}


def eval_tasks(work: Path, task: str, args, split: str = "test", accuracy: bool = True) -> list[dict]:
    """The evaluated rows of a task (held out from training): accuracy and reference NLL."""
    if task == "gsm8k":
        path = DATA / "gsm8k" / ("test.jsonl" if split == "test" else "train.jsonl")
        common = {"path": str(path), "format": "question_answer", "seed": 0 if split == "test" else 1}
        rows = [{"name": "gsm8k_nll", "metric": "loss", "n": args.n_eval, **common}]
        if accuracy:
            rows.insert(0, {"name": "gsm8k", "metric": "gsm8k", "n": args.gsm8k_n, "max_new_tokens": args.gsm8k_tokens, **common})
        return rows
    common = {"path": str(t0_file(work, task)), "split": split, "split_fractions": SPLIT}
    rows = [{"name": f"{task}_nll", "metric": "loss", "n": args.n_eval, **common}]
    if accuracy:
        rows.insert(0, {"name": task, "metric": "label", "n": args.n_eval, "max_new_tokens": 6, "stop": ["\n"], **common})
    return rows


def probe(args) -> dict:
    return {"prompts": str(DATA / "general_prompts" / "user_oriented_instructions.jsonl"), "format": "self_instruct", "n": args.probe_n, "max_new_tokens": 32}


def write_tasks(path: Path, tasks: list[dict], args) -> Path:
    atomic_write_text(path, yaml.safe_dump({"tasks": tasks, "forgetting": probe(args)}, sort_keys=False))
    return path


def job_config(name: str, sources: list[dict], bits: int, work: Path, args) -> JobConfig:
    """One adapter job; the same name and settings give the same directory, so a finished job is reused
    (run_job returns its result without training) by this script and by benchmarks/composition.py."""
    return JobConfig.model_validate({
        "name": name,
        "model": args.model,
        "quant": {"bits": bits, "type": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": args.lr, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"max_steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": 1, "seq_len": args.seq_len,
                  "grad_checkpointing": False, "seed": 0, "dtype": "fp32"},
        # GSM8K solutions run past seq_len now and then: truncate those rather than fail the job.
        "data": {"train": sources, "overlong": "truncate", "max_bad_frac": 0.5},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "output_dir": str(work / "runs" / name),
    })


def train(name: str, sources: list[dict], bits: int, work: Path, args) -> dict:
    result = run_job(job_config(name, sources, bits, work, args))
    print(f"{name}: {result.steps} steps, train loss {result.train_loss:.3f}, {result.wall_time_s:.0f} s", flush=True)
    return {"adapter": str(result.adapter_dir), "train_loss": result.train_loss, "wall_time_s": result.wall_time_s, "tokens": result.tokens, "bits": bits}


def training_line(jobs: dict[str, dict]) -> str:
    return "Training: " + ", ".join(f"{name} loss {job['train_loss']:.3f} in {job['wall_time_s']:.0f} s" for name, job in jobs.items())


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per adapter (the budget).")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval", type=int, default=32, help="Rows per label / NLL task.")
    parser.add_argument("--gsm8k-n", type=int, default=16, help="GSM8K problems generated for accuracy.")
    parser.add_argument("--gsm8k-tokens", type=int, default=96, help="New tokens per GSM8K answer.")
    parser.add_argument("--probe-n", type=int, default=12, help="General prompts the base answers for drift KL.")
    parser.add_argument("--model", default=MODEL, help="Base model spec (a local tiny model makes a quick smoke run).")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "composer-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)


COLUMNS = ["16-bit LoRA", "QLoRA", "PLR8", "PLR16"]


def markdown(summary: dict) -> str:
    columns = summary["columns"]
    lines = [
        "# Post-LoRA Restoration: QLoRA adapters on 4-, 8- and 16-bit bases (SmolLM2-135M, real data)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Setup: {summary['setup']}",
        "",
        "| task / metric | base (16-bit) | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for row_name, row in summary["table"].items():
        cells = [f"{row[c]:.4f}" if row.get(c) is not None else "-" for c in ["base (16-bit)", *columns]]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    q = summary["quantization_error_summary"]
    lines += [
        "",
        "Accuracy: higher is better; NLL (reference answers) and drift KL: lower is better. PLR8/PLR16 use the QLoRA adapter unchanged.",
        "",
        f"Quantization error ‖W − deq(q(W))‖/‖W‖ over the {summary['quantized_layers']} linear layers (parameter-weighted mean / max): "
        f"NF4 {q['rel_err_4bit_mean']:.4f} / {q['rel_err_4bit_max']:.4f}; int8 {q['rel_err_8bit_mean']:.4f} / {q['rel_err_8bit_max']:.4f}. "
        "Per-layer values are in plr.json.",
        "",
        (f"Merging the {summary['merge_comparison_task']} QLoRA adapter, distance from the model it was trained as (adapter on NF4, unmerged), "
         "on a 2-sentence probe:"),
        "",
        "| merge | max abs logit diff | mean KL |",
        "|---|---:|---:|",
    ]
    for label, row in summary["merge_comparison"]["variants"].items():
        lines.append(f"| {label} | {row['max_abs_logit_diff']:.4g} | {row['mean_kl_from_trained']:.3g} |")
    if "requantization_loss_mean" in summary["merge_comparison"]:
        lines.append(f"\nRe-quantizing after the merge loses {summary['merge_comparison']['requantization_loss_mean']:.1%} of ‖ΔW‖ per layer on average.")
    lines += ["", training_line(summary["jobs"]), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--tasks", nargs="+", default=["gsm8k", "ag_news"], choices=["gsm8k", *T0_TASKS])
    parser.add_argument("--with-8bit", action="store_true", help="Also train a LoRA on the int8 base (slow on CPU).")
    args = parser.parse_args()
    if not (DATA / "gsm8k").is_dir() or not (DATA / "t0").is_dir():
        print(f"skipped: real data not found at {DATA} (needs gsm8k/ and t0/)")
        return
    started = time.perf_counter()
    work = args.work / f"{Path(args.model).name}-steps{args.steps}-mb{args.micro_batch}-seq{args.seq_len}-lr{args.lr}"
    work.mkdir(parents=True, exist_ok=True)

    jobs: dict[str, dict] = {}
    for task in args.tasks:
        for bits in (4, 16, 8) if args.with_8bit else (4, 16):
            jobs[f"{task}-{bits}bit"] = train(f"{task}-{bits}bit", [train_source(work, task)], bits, work, args)
    train_s = time.perf_counter() - started

    tokenizer = load_tokenizer(args.model)
    metrics: dict[str, dict[str, dict]] = {}  # task -> column -> metrics
    eval_started = time.perf_counter()
    for task in args.tasks:
        tasks = load_tasks_file(write_tasks(work / f"tasks-{task}.yaml", eval_tasks(work, task, args), args))
        qlora = Path(jobs[f"{task}-4bit"]["adapter"])
        # (base precision, column -> adapter) : one base load and one base reference per precision.
        plan = {16: {"16-bit LoRA": Path(jobs[f"{task}-16bit"]["adapter"]), "PLR16": qlora}, 8: {"PLR8": qlora}, 4: {"QLoRA": qlora}}
        if args.with_8bit:
            plan[8]["8-bit LoRA"] = Path(jobs[f"{task}-8bit"]["adapter"])
        for bits, columns in plan.items():
            base = load_base(args.model, bits, torch.float32)
            # All adapters of one precision share one base, one base row and one base reference.
            rows = evaluate_matrix(base, tokenizer, list(columns.values()), tasks)
            for column, row_name in zip(columns, adapter_row_names(list(columns.values()))):
                metrics.setdefault(task, {})[column] = rows[row_name]
                print(f"{task} {column}: {rows[row_name]}", flush=True)
            metrics[task][f"base ({bits}-bit)"] = rows["base"]
    eval_s = time.perf_counter() - eval_started

    table: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        for key, label in ((f"eval/{task}/accuracy", f"{task} accuracy"), (f"eval/{task}_nll/loss", f"{task} reference NLL"),
                           ("eval/forgetting/drift_kl", f"drift KL, {task} adapter")):
            table[label] = {column: values.get(key) for column, values in metrics[task].items()}

    full, q8, q4 = (load_base(args.model, bits, torch.float32) for bits in (16, 8, 4))
    error_rows = quantization_error_table(full, {4: q4, 8: q8})
    comparison = merge_comparison(Path(jobs[f"{args.tasks[0]}-4bit"]["adapter"]), probe_ids(tokenizer))
    columns = COLUMNS + (["8-bit LoRA"] if args.with_8bit else [])
    evaluated = [f"T0 {task} held-out split n={args.n_eval} (label accuracy and NLL)" for task in args.tasks if task != "gsm8k"]
    if "gsm8k" in args.tasks:
        evaluated.insert(0, f"GSM8K test n={args.gsm8k_n} ({args.gsm8k_tokens} new tokens) for accuracy and n={args.n_eval} for NLL")
    summary = {
        "command": "python benchmarks/plr.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "setup": (
            f"{args.model}, LoRA r16 alpha32 attn, {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens (packed), lr {args.lr} cosine, "
            f"seed 0, fp32 compute; eval: {'; '.join(evaluated)}; drift probe {args.probe_n} user_oriented_instructions (32 new tokens)"
        ),
        "columns": columns,
        "table": table,
        "metrics": metrics,
        "jobs": jobs,
        "quantized_layers": len(error_rows),
        "quantization_error_summary": summarize_errors(error_rows),
        "quantization_error": error_rows,
        "merge_comparison_task": args.tasks[0],
        "merge_comparison": comparison,
        "timings_s": {"train": round(train_s, 1), "eval": round(eval_s, 1), "total": round(time.perf_counter() - started, 1)},
    }
    atomic_write_text(args.out / "plr.json", json.dumps(summary, indent=2))
    atomic_write_text(args.out / "plr.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
