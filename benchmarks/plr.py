"""Post-LoRA Restoration (PLR) at every bit width: adapters trained on 16-, 8-, 4-, 3- and 2-bit bases,
each evaluated on its training base and restored onto every higher precision, in the shape of the
PLR paper's table. SmolLM2-135M, real data.

Arms: {GSM8K, ag_news} x training precision {16 (LoRA on the original base), 8 (bitsandbytes int8),
4 (NF4 with double quantization), 3 and 2 (HQQ, group size 64)}, trained as one fleet (`lorafleet run`)
with the same seed, steps, learning rate and data order; the two jobs of one precision share a pack.
As in the paper, adapter/ is the adapter at the evaluation with the lowest validation loss
(checkpoint.select: best_eval_loss).

Columns: 16-bit LoRA | 8-bit: QLoRA, PLR16 | 4-bit: QLoRA, PLR8, PLR16 | 3-bit: QLoRA, PLR4, PLR8, PLR16 |
2-bit: QLoRA, PLR3, PLR4, PLR8, PLR16. compositor.restore.restoration_quant names each base (PLR8 is
bitsandbytes int8; PLR4 and PLR3 above HQQ are HQQ with the training group size). Each distinct base is
loaded once per task, and every adapter restored onto it is evaluated on it side by side.

Rows: GSM8K accuracy on gsm8k/test (the paper's prompt and metric: the first or last integer of the
answer) and the NLL of the reference solutions of the same rows; ag_news `classify_with_choices` label
accuracy and NLL on held-out articles of a content-hash split; drift KL(p_16-bit base || p_model) on
general instructions that the 16-bit base answered, one reference for every column. Also the
quantization error ||W - deq(q(W))|| / ||W|| and the base's parameter memory at each bit width.

    .venv/bin/python benchmarks/plr.py [--steps 100] [--gsm8k-n 200] [--n-eval 250] [--model DIR] ...

Writes benchmarks/results/plr.{json,md,png} atomically. Skips (exit 0) when ../shared/data is absent.
On a CPU the full run takes many hours. The same command resumes an interrupted one: trained jobs are
skipped, the others resume from their checkpoints, and each (base, task) evaluation that finished is
read back from benchmarks/results/plr-kept/ (committed with the results) instead of being run again. A fresh
clone has those evaluations but not the adapters: it trains again the packs that the missing evaluations
need, and checks that every job ends with the kept losses, bit for bit. `--report-so-far` writes the table from the
evaluations kept so far, the rest marked "not run", without evaluating more.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

from _common import describe, machine_description, save_png

from schema.atomic import write_json_atomic, write_text_atomic
from schema.job import QuantConfig
from schema.jobdir import JobDir
from schema.yamlfile import dump_yaml

MODEL = "smollm2-135m"
SEED = 0
TASKS = ("gsm8k", "ag_news")
# T0 tasks: (dataset file, template, the labels its prompt offers; None: the references' own).
T0_TASKS = {
    "ag_news": ("ag_news", "classify_with_choices", ["World politics", "Sports", "Business", "Science and technology"]),
    "amazon": ("amazon_polarity", "Is_this_review", None),
}
# A T0 template holds 200 examples: 40% train, 10% validation (picks the best checkpoint), 50% test, so
# about 100 held-out articles. GSM8K keeps its own test file; 5% of train.jsonl is the validation part.
T0_SPLIT = (0.4, 0.1, 0.5)
GSM8K_SPLIT = (0.95, 0.05, 0.0)
# Training precision -> the quant section of its jobs (jobs with equal sections share a pack).
TRAINING_QUANT = {
    16: {"bits": 16},
    8: {"bits": 8},
    4: {"bits": 4, "method": "bnb", "type": "nf4", "double_quant": True},
    3: {"bits": 3, "method": "hqq", "group_size": 64},
    2: {"bits": 2, "method": "hqq", "group_size": 64},
}
# A job trained again must end with exactly these (floats compared bit for bit) to count as the same adapter.
REPRODUCED_KEYS = ("train_loss", "eval_loss", "initial_eval_loss", "selected_step", "tokens")
LIBRARIES = ("hqq", "bitsandbytes", "peft", "transformers", "torch", "ray")


def machine() -> str:
    return describe(machine_description()) + " (cores shared with other processes)"


def t0_file(work: Path, name: str) -> Path:
    """The rows of one template of a T0 task. Training and evaluation both read this file, so its
    content-hash split (whose word statistics cover the whole file) is the same for both."""
    dataset, template, _ = T0_TASKS[name]
    path = work / f"{name}.jsonl"
    if not path.is_file():
        rows = [json.loads(line) for line in (DATA / "t0" / f"{dataset}.jsonl").read_text().splitlines()]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["template"] == template))
    return path


def rows_of(work: Path, task: str, split: str) -> dict:
    """Where a task's rows of `split` come from, as a data source and a tasks-file entry both read them."""
    if task == "gsm8k":
        common = {"format": "question_answer", "template": "gsm8k"}  # the paper's prompt
        if split == "test":
            return {"path": str(DATA / "gsm8k" / "test.jsonl"), **common}
        return {"path": str(DATA / "gsm8k" / "train.jsonl"), "split": split, "split_fractions": GSM8K_SPLIT, **common}
    return {"path": str(t0_file(work, task)), "format": "prompt_completion", "split": split, "split_fractions": T0_SPLIT}


def eval_tasks(work: Path, task: str, args, split: str = "test", accuracy: bool = True) -> list[dict]:
    """A task's evaluated rows (held out from training unless `split` says otherwise): accuracy and
    reference NLL, on the same rows."""
    rows = rows_of(work, task, split)
    if task == "gsm8k":
        common = {"n": args.gsm8k_n, "seed": SEED, "batch_size": args.eval_batch, **rows}
        # A model that runs on past its answer starts a new "Question:"; the cut keeps its last integer its own.
        scored = {"name": "gsm8k", "metric": "gsm8k", "max_new_tokens": args.gsm8k_tokens, "stop": ["Question:"], "batch_size": args.gen_batch}
    else:
        common = {"n": args.n_eval, "seed": SEED, "batch_size": args.eval_batch, **rows}
        labels = T0_TASKS[task][2]
        scored = {"name": task, "metric": "label", "max_new_tokens": 8, "stop": ["\n"], "batch_size": args.gen_batch, **({"labels": labels} if labels else {})}
    nll = {"name": f"{task}_nll", "metric": "loss", **common}
    return [{**common, **scored}, nll] if accuracy else [nll]


def write_tasks(path: Path, tasks: list[dict], args) -> Path:
    """A tasks file with `tasks` and the forgetting probe: general instructions no job trains on."""
    probe = {
        "prompts": str(DATA / "general_prompts" / "user_oriented_instructions.jsonl"), "format": "self_instruct",
        "n": args.probe_n, "max_new_tokens": 48, "batch_size": args.gen_batch,
    }
    write_text_atomic(path, dump_yaml({"tasks": tasks, "forgetting": probe}))
    return path


def training_defaults(args) -> dict:
    """The job settings every adapter of this benchmark (and of benchmarks/composition.py) shares."""
    return {
        "model": args.model,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "attn"},
        "optim": {"name": "adamw", "lr": args.lr, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"max_steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": 1, "seq_len": args.seq_len,
                  "grad_checkpointing": False, "seed": SEED},
        # A GSM8K solution longer than seq_len is cut rather than failing the job.
        "data": {"overlong": "truncate", "max_bad_frac": 0.5},
    }


def training_line(jobs: dict[str, dict]) -> str:
    return "Training: " + ", ".join(f"{name} loss {job['train_loss']:.3f} in {job['wall_time_s']:.0f} s" for name, job in jobs.items())


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps per adapter (the budget).")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512, help="Tokens per packed row (GSM8K examples reach ~450).")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval", type=int, default=250, help="At most this many held-out T0 rows (ag_news has about 100).")
    parser.add_argument("--gsm8k-n", type=int, default=200, help="GSM8K test problems, generated for accuracy and scored for NLL.")
    parser.add_argument("--gsm8k-tokens", type=int, default=256, help="New tokens per GSM8K answer (98%% of reference solutions fit).")
    parser.add_argument("--probe-n", type=int, default=32, help="General prompts the reference base answers for drift KL.")
    parser.add_argument("--eval-batch", type=int, default=16, help="Rows per scoring batch (NLL).")
    # Measured on 2 CPU cores, SmolLM2-135M, 32 new tokens: 64 prompts a batch give 1.5x (16-bit) to 2.2x
    # (HQQ 2-bit) the tokens/s of 16, as each decoding step's fixed cost (reading, or dequantizing, every weight) is shared.
    parser.add_argument("--gen-batch", type=int, default=64, help="Prompts per generation batch (GSM8K answers, T0 labels, the forgetting probe).")
    parser.add_argument("--model", default=MODEL, help="Base model spec (a local tiny model makes a quick smoke run).")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "plr-bench")
    parser.add_argument("--out", type=Path, default=RESULTS)


# --- training: one fleet -----------------------------------------------------------------------------


def job_name(task: str, bits: int) -> str:
    return f"{task}-{bits}bit"


def read_kept(path: Path, default):
    """A JSON file an earlier run kept, or `default` before there is one."""
    return json.loads(path.read_text()) if path.is_file() else default


def content_name(obj) -> str:
    """A short hash of `obj` that does not depend on where the checkout lies (its paths are read relative to
    the checkout's parent), so a fresh clone finds what an earlier run kept in benchmarks/results."""
    text = json.dumps(obj, sort_keys=True).replace(str(ROOT.parent), "<root>")
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def fleet_config(work: Path, args) -> tuple[dict, Path]:
    """The fleet of every arm and its output directory, named by the fleet's content: the same settings
    resume the same fleet (finished jobs are skipped), other settings train a new one."""
    defaults = training_defaults(args)
    defaults["eval"] = {"every": args.eval_every, "max_batches": 8}
    defaults["checkpoint"] = {"every": args.eval_every, "keep": 1, "select": "best_eval_loss"}
    jobs = [
        {"name": job_name(task, bits), "quant": quant, "data": {"train": rows_of(work, task, "train"), "eval": rows_of(work, task, "validation")}}
        for bits, quant in TRAINING_QUANT.items() for task in TASKS  # one precision after the other: its two jobs form a pack
    ]
    fleet = {"name": "plr", "defaults": defaults, "jobs": jobs}
    # Parsed back from JSON: no object appears twice, which YAML would write as an anchor and an alias.
    return json.loads(json.dumps(fleet)), work / f"fleet-{Path(args.model).name}-{content_name(fleet)}"


def jobs_needed(fleet: dict, kept: Path) -> list[str]:
    """The jobs whose adapters an evaluation not yet kept needs (every job, in a first run), each with its
    pack-mates (the other tasks at its precision), as they trained together in the kept run."""
    missing = missing_evaluations(kept)
    bits = {trained for label, entry in restoration_plan().items() for task in TASKS if f"{label}-{task}" in missing for trained, _ in entry["columns"]}
    names = {job_name(task, trained) for task in TASKS for trained in bits}
    return [job["name"] for job in fleet["jobs"] if job["name"] in names]


def train_fleet(fleet: dict, fleet_dir: Path, names: list[str], kept: Path, work: Path) -> float:
    """Train the jobs `names` of the fleet with the real CLI (`lorafleet run` on a fleet file of those jobs,
    into the fleet's output_dir; finished jobs are skipped) and keep each job's final.json. A fresh clone has
    the kept evaluations but not the adapters, so it trains the jobs the missing evaluations need again,
    with the same seed, data and packs, and each must end with the kept losses bit for bit; otherwise the
    table would mix two different adapters, and the report says which. Returns seconds."""
    started = time.perf_counter()
    subset = {**fleet, "jobs": [job for job in fleet["jobs"] if job["name"] in names], "output_dir": str(fleet_dir)}
    path = write_text_atomic(work / f"{fleet_dir.name}.yaml", dump_yaml(subset))
    cli = Path(sys.executable).with_name("lorafleet")  # the console script of this environment
    print(f"$ lorafleet run {path}  # {', '.join(names)}", flush=True)
    subprocess.run([str(cli), "run", str(path)], check=True)
    reproduced = {}
    for job in subset["jobs"]:
        final, kept_final = JobDir(fleet_dir / job["name"]).read_final(), kept / "jobs" / f"{job['name']}.json"
        if not kept_final.is_file():
            write_json_atomic(kept_final, final)
            continue
        earlier = json.loads(kept_final.read_text())
        if final["wall_time_s"] == earlier["wall_time_s"]:
            continue  # the kept run itself
        reproduced[job["name"]] = {"same": all(earlier.get(key) == final.get(key) for key in REPRODUCED_KEYS),
                                   **{key: [earlier.get(key), final.get(key)] for key in REPRODUCED_KEYS}}
        if not reproduced[job["name"]]["same"]:
            print(f"WARNING: {job['name']} trained again differs from the kept run: {reproduced[job['name']]}", flush=True)
    summary = json.loads((fleet_dir / "fleet.json").read_text()).get("summary", {})
    if not (kept / "fleet.json").is_file():
        write_json_atomic(kept / "fleet.json", summary)
    elif reproduced:
        runs = read_kept(kept / "retrained.json", [])
        already = any(all(run["jobs"].get(name) == check for name, check in reproduced.items()) for run in runs)
        if not already:  # a resumed run, or one on the adapters an earlier run left, checks the same jobs again
            write_json_atomic(kept / "retrained.json", [*runs, {"fleet": summary, "jobs": reproduced}])
    return time.perf_counter() - started


# --- evaluation: each restoration base once per task --------------------------------------------------


def column_name(trained_bits: int, precision: int) -> str:
    if trained_bits == 16:
        return "16-bit LoRA"
    return f"{trained_bits}-bit " + ("QLoRA" if precision == trained_bits else f"PLR{precision}")


def restoration_plan() -> dict[str, dict]:
    """Base label (compositor.restore.quant_label) -> its precision, its QuantConfig, and the
    (training bits, column) of every adapter restored onto it."""
    from compositor.restore import (
        quant_label,
        restoration_precisions,
        restoration_quant,
    )

    plan: dict[str, dict] = {}
    for bits, quant in TRAINING_QUANT.items():
        trained = QuantConfig.model_validate(quant)
        for precision in restoration_precisions(trained):
            target = restoration_quant(trained, precision)
            entry = plan.setdefault(quant_label(target), {"precision": precision, "quant": target, "columns": []})
            entry["columns"].append((bits, column_name(bits, precision)))
    # The 16-bit base first (the drift reference, and PLR16 of every adapter), then the lowest precisions: a run
    # stopped part-way (hours on a CPU) has the 2- and 3-bit columns, the paper's headline, before the 8-bit ones.
    return dict(sorted(plan.items(), key=lambda item: (item[1]["precision"] != 16, item[1]["precision"])))


def kept_dir(fleet_dir: Path, specs: dict, args) -> Path:
    """Where the finished (base, task) evaluations of this fleet, and its jobs' final.json, are kept: in the
    results folder, committed, so an interrupted run (this is hours on a CPU), or a fresh clone, goes on where
    it stopped. Named by the fleet and the evaluation settings: other settings start a new folder."""
    settings = {"model": args.model, "tasks": specs, "probe_n": args.probe_n}
    return args.out / "plr-kept" / f"{fleet_dir.name}-eval-{content_name(settings)}"


def missing_evaluations(kept: Path) -> list[str]:
    return [f"{label}-{task}" for label in restoration_plan() for task in TASKS if not (kept / f"{label}-{task}.json").is_file()]


def evaluate(fleet_dir: Path, kept: Path, specs: dict, work: Path, args) -> tuple[dict, dict, dict]:
    """Per task and column, the adapter's metrics; per base label, the base alone and its figures
    (parameter memory, quantization error); the evaluated rows of each task (n, and the label counts).
    Evaluations kept in `kept` are read back; with --report-so-far the others are left out."""
    from compositor.restore import (
        quantization_error_table,
        resolve_dtype,
        summarize_errors,
    )
    from data_pipeline.rows import task_rows
    from trainer.checks import load_tasks_file
    from trainer.evaluation.matrix import adapter_row_names, evaluate_matrix
    from trainer.models import load_base_model, load_tokenizer, parameter_bytes

    tokenizer = load_tokenizer(args.model)
    tasks = {task: load_tasks_file(write_tasks(work / f"tasks-{task}.yaml", specs[task], args)) for task in TASKS}
    held_out = {}
    for task_config in (t for tasks_file in tasks.values() for t in tasks_file.tasks):
        examples = task_rows(task_config)
        held_out[task_config.name] = {"n": len(examples)}
        if task_config.metric == "label":  # what always answering the commonest label scores
            held_out[task_config.name]["labels"] = dict(Counter(example.reference for example in examples).most_common())
    # drift is measured against the 16-bit base in every column, so the columns are comparable; loaded once, when first needed
    reference_model = functools.cache(lambda: load_base_model(args.model, QuantConfig(bits=16), dtype=resolve_dtype(args.model, 16, None)))
    metrics: dict[str, dict[str, dict]] = {task: {} for task in TASKS}
    bases: dict[str, dict] = {}
    for label, entry in restoration_plan().items():
        dtype = resolve_dtype(args.model, entry["precision"], None)
        for task in ("ag_news", "gsm8k"):  # within a base the cheaper task first (an ag_news row costs a fifth of a GSM8K row)
            adapters = [JobDir(fleet_dir / job_name(task, bits)).adapter for bits, _ in entry["columns"]]
            saved = kept / f"{label}-{task}.json"
            done = read_kept(saved, None)
            # What is still to run: everything, or only the base alone that a --skip-base-alone run left out.
            run_adapters = [] if done is not None else adapters
            run_base = (entry["precision"] == 16 or task not in args.skip_base_alone) and (done is None or "base" not in done["rows"])
            if (run_adapters or run_base) and not args.report_so_far:
                started = time.perf_counter()
                # evaluate_matrix injects the adapters into the base it is given: a fresh load per task.
                model = load_base_model(args.model, entry["quant"], dtype=dtype)
                if not (kept / f"{label}.json").is_file():
                    errors = quantization_error_table(reference_model(), {entry["precision"]: model}) if entry["precision"] != 16 else []
                    write_json_atomic(kept / f"{label}.json", {
                        "precision": entry["precision"], "quant": entry["quant"].model_dump(mode="json"), "dtype": str(dtype).removeprefix("torch."),
                        "parameter_bytes": parameter_bytes(model), "quantization_error": summarize_errors(errors), "quantization_error_layers": errors,
                    })
                rows = evaluate_matrix(model, tokenizer, run_adapters, tasks[task], reference_model=reference_model(), base_row=run_base)
                del model
                earlier = done or {"rows": {}, "eval_s": 0.0}
                done = {"rows": {**rows, **earlier["rows"]}, "eval_s": round(earlier["eval_s"] + time.perf_counter() - started, 1)}
                write_json_atomic(saved, done)
                print(f"{label} base, {task}: {len(run_adapters)} adapter(s)" + (" + the base" if run_base else "") + f" in {time.perf_counter() - started:.0f} s", flush=True)
            if done is None:
                continue  # --report-so-far: not run yet
            base = bases.setdefault(label, json.loads((kept / f"{label}.json").read_text()))
            if "base" in done["rows"]:
                base[task] = done["rows"]["base"]
            base.setdefault("eval_s", {})[task] = done["eval_s"]
            for (_, column), row_name in zip(entry["columns"], adapter_row_names(adapters)):
                metrics[task][column] = done["rows"][row_name]
    return metrics, bases, held_out


# --- the report ----------------------------------------------------------------------------------------


def columns() -> list[str]:
    """The paper's column order: grouped by training precision, restorations rising within a group."""
    from compositor.restore import restoration_precisions

    return [column_name(bits, p) for bits, quant in TRAINING_QUANT.items() for p in restoration_precisions(QuantConfig.model_validate(quant))]


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def table_rows(metrics: dict, held_out: dict) -> dict[str, dict]:
    """Row label -> {key, n (accuracy rows, for the standard error), cells: column -> value}."""
    rows = {}
    for task in TASKS:
        title = "GSM8K" if task == "gsm8k" else task
        for label, key, n in (
            (f"{title} accuracy", f"eval/{task}/accuracy", held_out[task]["n"]),
            (f"{title} reference NLL", f"eval/{task}_nll/loss", None),
            (f"drift KL vs 16-bit base, {title} adapters", "eval/forgetting/drift_kl", None),
        ):
            rows[label] = {"key": key, "n": n, "cells": {column: values.get(key) for column, values in metrics[task].items()}}
    return rows


def cell(value: float | None, n: int | None) -> str:
    if value is None:
        return "not run"
    return f"{value:.3f} ± {standard_error(value, n):.3f}" if n else f"{value:.3f}"


def markdown(summary: dict) -> str:
    order = summary["columns"]
    setup = summary["setup"]
    lines = [
        "# Post-LoRA Restoration at 16, 8, 4, 3 and 2 bits (SmolLM2-135M, real data)",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}",
        "",
        f"Budget: {setup['budget']}. Seed {setup['seed']} in every arm (same data order). {setup['selection']}  ",
        f"Evaluation: {setup['evaluation']}",
        "",
        *(
            [
                f"**Part of the table**: {summary['evaluations']['kept']} of the {summary['evaluations']['kept'] + len(summary['evaluations']['missing'])} "
                f"(base, task) evaluations are kept (`{summary['kept']}`); not run yet: {', '.join(summary['evaluations']['missing'])}. "
                "The command without `--report-so-far` evaluates the rest (in a fresh clone it first trains again the packs those evaluations need).",
                "",
            ]
            if summary["evaluations"]["missing"]
            else []
        ),
        "| row | " + " | ".join(order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    for label, row in summary["table"].items():
        lines.append(f"| {label} | " + " | ".join(cell(row["cells"].get(c), row.get("n")) for c in order) + " |")
    lines += [
        "",
        (
            "Accuracy ± its standard error sqrt(p(1-p)/n): higher is better. Reference NLL and drift KL: lower is better. "
            "QLoRA: the adapter on the base it was trained on; PLRp: the same adapter, unchanged, on the p-bit base "
            "(PLR4 and PLR3 above HQQ are HQQ bases with the training group size; PLR8 is bitsandbytes int8; PLR16 the original weights)."
        ),
        "",
        setup["base_note"],
        "",
        setup["data_note"],
        "",
        "## The bases",
        "",
        "| base | bits | parameter memory | rel. error mean / max | GSM8K acc (base alone) | GSM8K NLL | ag_news acc | drift KL vs 16-bit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, base in summary["bases"].items():
        errors = base["quantization_error"]
        bits = base["precision"]
        error = f"{errors[f'rel_err_{bits}bit_mean']:.4f} / {errors[f'rel_err_{bits}bit_max']:.4f}" if errors else "0"
        gsm, news = base.get("gsm8k", {}), base.get("ag_news", {})
        drift = gsm.get("eval/forgetting/drift_kl", news.get("eval/forgetting/drift_kl"))
        lines.append(
            f"| {label} | {bits} | {base['parameter_bytes'] / 2**20:.1f} MiB | {error} | {cell(gsm.get('eval/gsm8k/accuracy'), None)} | "
            f"{cell(gsm.get('eval/gsm8k_nll/loss'), None)} | {cell(news.get('eval/ag_news/accuracy'), None)} | "
            + ("not run" if drift is None else f"{drift:.4f}") + " |"
        )
    lines += [
        "",
        "Relative error ‖W − deq(q(W))‖/‖W‖ over the quantized linear layers (parameter-weighted mean / max; per layer in plr.json). "
        "Parameter memory counts every weight and quantization constant; the embeddings and the output head stay in full "
        "precision at every width" + (f", and the 16-bit base is held in {summary['bases']['original']['dtype']}." if "original" in summary["bases"] else ".")
        + (" A base alone marked not run beside its adapters' columns was left out (`--skip-base-alone`): a GSM8K row costs ~10 min here."
           if any(task not in base for base in summary["bases"].values() for task in TASKS) else ""),
        "",
        "## Training",
        "",
        "| job | train loss | eval loss before → selected | selected step | wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, job in summary["jobs"].items():
        lines.append(
            f"| {name} | {job['train_loss']:.3f} | {job['initial_eval_loss']:.3f} → {job['eval_loss']:.3f} | "
            f"{job.get('selected_step') or job['steps']} | {job['wall_time_s']:.0f} s |"
        )
    for run in summary["retrained"]:
        differ = [name for name, job in run["jobs"].items() if not job["same"]]
        lines.append(
            f"\nTrained again from the same seed, data and schedule (a fresh clone keeps the evaluations, not the adapters): "
            f"{len(run['jobs']) - len(differ)} of {len(run['jobs'])} jobs ended with bit-identical {', '.join(REPRODUCED_KEYS)}"
            + (f"; {', '.join(differ)} differ (plr.json `retrained`), so their columns mix two trainings." if differ else ".")
        )
    fleet = summary["fleet"]
    if fleet.get("makespan_s"):
        lines.append(
            f"\nFleet makespan {fleet['makespan_s']:.0f} s for {fleet.get('jobs')} jobs. "
            f"Evaluation {summary['timings_s']['eval']:.0f} s (the kept (base, task) evaluations, summed)."
        )
    lines += ["", "![accuracy against training bits](plr.png)", ""]
    return "\n".join(lines) + "\n"


def plot(summary: dict):
    """Accuracy (and GSM8K NLL) against training bits, one line per restoration level, SE error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained_bits = list(TRAINING_QUANT)
    levels = {"as trained": None, **{f"PLR{p}": p for p in (3, 4, 8, 16)}}
    panels = [(label, row) for label, row in summary["table"].items() if "accuracy" in label or label == "GSM8K reference NLL"]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for axis, (label, row) in zip(axes, panels):
        for color, (level, precision) in enumerate(levels.items()):  # one colour per level in every panel
            ys, errs = [], []
            for bits in trained_bits:
                column = column_name(bits, bits if precision is None else precision)
                value = row["cells"].get(column) if precision is None or precision > bits else None
                ys.append(math.nan if value is None else value)  # a gap in the line: no such column, or not run
                errs.append(standard_error(value, row["n"]) if value is not None and row.get("n") else 0.0)
            if any(not math.isnan(y) for y in ys):
                axis.errorbar(range(len(trained_bits)), ys, yerr=errs, marker="o", capsize=3, label=level, color=f"C{color}")
        if label == "ag_news accuracy":  # what always answering the commonest held-out label scores
            labels = summary["held_out"]["ag_news"]["labels"]
            axis.axhline(max(labels.values()) / summary["held_out"]["ag_news"]["n"], color="grey", linestyle=":", label="commonest label")
            axis.legend(fontsize="small")
        axis.set_xticks(range(len(trained_bits)), [str(b) for b in trained_bits])
        axis.set_xlabel("training bits")
        axis.set_ylabel("accuracy (± SE)" if row.get("n") else "NLL (lower is better)")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0].legend(title="evaluated on")
    figure.tight_layout()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--eval-every", type=int, default=20, help="Steps between validation-loss evaluations (and checkpoints) in training.")
    parser.add_argument(
        "--skip-base-alone", action="append", default=[], choices=TASKS, metavar="TASK",
        help="Leave out the quantized bases alone in TASK's evaluations (a GSM8K row is ~10 min on 2 CPU cores); the adapters' rows are unchanged. A later run without it adds the rows left out.",
    )
    parser.add_argument(
        "--report-so-far", action="store_true",
        help="Evaluate nothing more: write the report from the evaluations an interrupted run kept, the rest marked 'not run'.",
    )
    args = parser.parse_args()
    if not all((DATA / part).is_dir() for part in ("gsm8k", "t0", "general_prompts")):
        print(f"skipped: real data not found at {DATA} (needs gsm8k/, t0/ and general_prompts/)")
        return
    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    fleet_spec, fleet_dir = fleet_config(work, args)
    specs = {task: eval_tasks(work, task, args) for task in TASKS}
    kept = kept_dir(fleet_dir, specs, args)
    needed = [] if args.report_so_far else jobs_needed(fleet_spec, kept)
    train_s = train_fleet(fleet_spec, fleet_dir, needed, kept, work) if needed else 0.0
    metrics, bases, held_out = evaluate(fleet_dir, kept, specs, work, args)
    missing = missing_evaluations(kept)  # after evaluating
    jobs = {job["name"]: read_kept(kept / "jobs" / f"{job['name']}.json", None) for job in fleet_spec["jobs"]}
    jobs = {name: final for name, final in jobs.items() if final is not None}
    labels = held_out["ag_news"]["labels"]
    kept_eval_s = [seconds for base in bases.values() for seconds in base["eval_s"].values()]

    order = columns()
    summary = {
        "command": " ".join(["python", "benchmarks/plr.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": {name: version(name) for name in LIBRARIES},
        "setup": {
            "model": args.model,
            "seed": SEED,
            "budget": (
                f"{args.steps} optimizer steps per adapter, {args.micro_batch} x {args.seq_len} packed tokens per step, "
                f"LoRA r16 alpha32 on attention, AdamW lr {args.lr} cosine (10% warm-up)"
            ),
            "selection": f"adapter/ is the adapter at the lowest validation loss, evaluated every {args.eval_every} steps.",
            "evaluation": (
                f"GSM8K test n={held_out['gsm8k']['n']} (the paper's prompt, greedy, {args.gsm8k_tokens} new tokens, cut at 'Question:'; "
                f"first or last integer), NLL on the same {held_out['gsm8k_nll']['n']} rows; ag_news classify_with_choices "
                f"n={held_out['ag_news']['n']} held-out articles (label accuracy and NLL); drift KL on {args.probe_n} "
                "user_oriented_instructions answered by the 16-bit base (48 new tokens)."
            ),
            "base_note": (
                "**The 16-bit base is not the released bf16 model**: the `smollm2-135m` preset is SmolLM2-135M-Instruct dequantized "
                "from a GGUF Q4_1 file, so every precision here, PLR16 included, starts from weights that already carry 4-bit rounding."
                if args.model == MODEL else f"Base model: {args.model}."
            ),
            "data_note": (
                f"ag_news has 200 articles per T0 template ({T0_SPLIT[0]:.0%} train, {T0_SPLIT[1]:.0%} validation, {T0_SPLIT[2]:.0%} test "
                f"by content hash), so its n is capped near 100, and its held-out articles hold only {len(labels)} of the 4 classes "
                f"({', '.join(f'{k} {v}' for k, v in labels.items())}): always answering '{next(iter(labels))}' scores "
                f"{max(labels.values()) / held_out['ag_news']['n']:.3f}."
            ),
        },
        "columns": order,
        "table": table_rows(metrics, held_out),
        "held_out": held_out,
        "metrics": metrics,
        "bases": bases,
        "jobs": jobs,
        "fleet": read_kept(kept / "fleet.json", {}),
        "retrained": read_kept(kept / "retrained.json", []),
        "fleet_dir": str(fleet_dir.relative_to(ROOT) if fleet_dir.is_relative_to(ROOT) else fleet_dir),
        "kept": str(kept.relative_to(ROOT) if kept.is_relative_to(ROOT) else kept),
        "evaluations": {"kept": len(kept_eval_s), "missing": missing},
        "timings_s": {"train": round(train_s, 1), "eval": round(sum(kept_eval_s), 1), "this_run": round(time.perf_counter() - started, 1)},
    }
    write_json_atomic(args.out / "plr.json", summary)
    save_png(plot(summary), args.out / "plr.png", dpi=120)
    write_text_atomic(args.out / "plr.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
