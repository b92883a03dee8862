"""Training throughput and peak memory: the lorafleet trainer against HF `transformers.Trainer` + peft + bitsandbytes.

Every arm trains the same QLoRA job, in the same run of this script:
- base: --model (default the smollm2-135m preset, SmolLM2-135M-Instruct), 4-bit NF4 with double quantization,
  compute dtype chosen automatically (bf16 on a CUDA device that supports it, fp32 on CPU);
- adapter: LoRA r=16, alpha=16, dropout 0.05 on q/k/v/o; optimizer paged_adamw_8bit, lr 2e-4, cosine schedule
  with 3% warm-up, gradient clipping at 1.0; non-reentrant gradient checkpointing; seed 42;
- data: examples/data/arithmetic/train.jsonl (`python -m launch.demo_data`) through the tokenizer's chat template.
  Both trainers get the same token ids and labels: the HF arm reads them from lorafleet's token cache, so only
  the batching differs;
- --seq-len, --micro-batch (gradient accumulation 1) and --warmup + --steps optimizer steps.

Arms (how each one batches):
- lorafleet-packed: `trainer.run_job`, `data.packing: packed` (lorafleet's default): examples packed back to back
  into seq_len rows, position ids restarting per example (no attention across examples);
- lorafleet-padded: `trainer.run_job`, `data.packing: padded`: one example per row, padded to the batch's longest
  (multiple of 8), batches length-grouped within windows of 8;
- hf-trainer: `Trainer` on a `datasets.Dataset` of the tokenised rows, `DataCollatorForSeq2Seq` padding to the
  batch's longest (multiple of 8), `train_sampling_strategy="group_by_length"`.
lorafleet-padded against hf-trainer compares the trainers on equal batches; lorafleet-packed adds packing.

Measurement. Each arm runs in its own subprocess, so its peak RSS (getrusage ru_maxrss: model load included, the
same load for every arm) is its own; arms repeat in alternating order (A B C, C B A, ...) so drift in the load of
the shared machine falls on every arm alike. The timed window runs from the end of optimizer step --warmup to the
end of the last step, taken at the same point in both trainers (lorafleet's `report` callback, HF's
`on_step_end`, both right after the optimizer step): model load, tokenisation and the warm-up steps are outside
it, per-step logging inside it for both. Tokens are non-padding tokens (attention mask) of the timed steps:
lorafleet's per-step count, and HF's own `include_num_input_tokens_seen="non_padding"`.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--warmup 2] [--rounds 2] [--seq-len 128]
        [--micro-batch 2] [--model smollm2-135m] [--arms lorafleet-packed lorafleet-padded hf-trainer]

Writes benchmarks/results/train_throughput_<device>.{json,md} (device: cpu or cuda) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import describe, machine_description  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT / "examples" / "data" / "arithmetic" / "train.jsonl"
BASELINE = "hf-trainer"
ARMS = ("lorafleet-packed", "lorafleet-padded", BASELINE)
BATCHING = {
    "lorafleet-packed": "packed: examples back to back in seq_len rows, position ids restart per example",
    "lorafleet-padded": "padded: one example per row, to the batch's longest (x8), length-grouped per 8 batches",
    "hf-trainer": "padded: DataCollatorForSeq2Seq to the batch's longest (x8), group_by_length sampler",
}
# The job both trainers run; lorafleet reads these through its JobConfig, the HF arm through the same values.
QUANT = {"bits": 4, "type": "nf4", "double_quant": True}
LORA = {"r": 16, "alpha": 16.0, "dropout": 0.05, "targets": "attn"}
OPTIM = {"name": "paged_adamw_8bit", "lr": 2.0e-4, "schedule": "cosine", "warmup_ratio": 0.03, "max_grad_norm": 1.0}
TEMPLATE = "chat"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Settings:
    """What every arm of one benchmark run shares."""

    model: str  # the spec lorafleet is given (preset or directory)
    model_dir: str  # the same model as a local HF directory, for the HF arm
    data: str
    seq_len: int
    micro_batch: int
    warmup: int
    steps: int
    seed: int
    work_dir: str

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TimedWindow:
    """Optimizer steps warmup+1 .. last: the wall time from the end of step `warmup` to the end of step `last`,
    and the non-padding tokens those steps trained on. Both trainers call `step_end` right after their
    optimizer step."""

    def __init__(self, warmup: int, last: int):
        import torch

        self.warmup, self.last = warmup, last
        # On a GPU the step's kernels may still be queued when the trainer hands back control: wait for them.
        self._synchronize = torch.cuda.synchronize if torch.cuda.is_available() else None
        self.started: float | None = None
        self.ended: float | None = None
        self.tokens = 0
        self.step_times_s: list[float] = []
        self.rss_before_bytes = 0
        self._previous: float | None = None

    def step_end(self, step: int, step_tokens: int) -> None:
        if self._synchronize is not None:
            self._synchronize()
        now = time.perf_counter()
        if step == self.warmup:
            self.started = now
            self.rss_before_bytes = peak_rss_bytes()
        elif step > self.warmup:
            self.tokens += step_tokens
            self.step_times_s.append(now - self._previous)
            if step == self.last:
                self.ended = now
        self._previous = now

    def result(self) -> dict[str, Any]:
        if self.started is None or self.ended is None:
            raise RuntimeError(f"the trainer never reported steps {self.warmup} and {self.last}; the timed window is incomplete")
        seconds = self.ended - self.started
        steps = self.last - self.warmup
        return {
            "timed_steps": steps,
            "window_s": seconds,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / seconds,
            "tokens_per_step": self.tokens / steps,
            "step_time_s": seconds / steps,
            # Robust to a burst of load from other processes on a shared machine, unlike the mean.
            "median_step_time_s": statistics.median(self.step_times_s),
            "step_times_s": self.step_times_s,
            # The process's peak RSS when the window opened: how much of the final peak training itself added.
            "peak_rss_before_window_bytes": self.rss_before_bytes,
        }


def run_lorafleet(settings: Settings, packing: str) -> dict[str, Any]:
    """`trainer.run_job` on the benchmark's job, with the given packing."""
    from schema.job import JobConfig
    from trainer.loop import run_job

    config = JobConfig.model_validate(
        {
            "name": f"bench-{packing}",
            "model": settings.model,
            "quant": QUANT,
            "lora": LORA,
            "optim": OPTIM,
            "train": {
                "max_steps": settings.total_steps,
                "micro_batch": settings.micro_batch,
                "grad_accum": 1,
                "seq_len": settings.seq_len,
                "grad_checkpointing": True,
                "seed": settings.seed,
                "log_every": 1,
            },
            "data": {"train": {"path": settings.data, "format": "prompt_completion"}, "template": TEMPLATE, "packing": packing},
            "eval": {"every": 0},
            # The one checkpoint (at the end) and the adapter are written after the timed window closes.
            "checkpoint": {"every": 0, "keep": 1},
            "output_dir": str(Path(settings.work_dir) / f"lorafleet-{packing}"),
        }
    )
    window = TimedWindow(settings.warmup, settings.total_steps)
    losses: list[float] = []

    def report(metrics: dict) -> None:
        if "train/loss" not in metrics:
            return
        # The trainer logs tokens/s = step tokens / step time; their product gives the step's count back exactly.
        window.step_end(metrics["step"], round(metrics["perf/tokens_per_s"] * metrics["perf/step_time_s"]))
        losses.append(metrics["train/loss"])

    run_job(config, report)
    return {**window.result(), "first_train_loss": losses[0], "final_train_loss": losses[-1]}


def tokenised_rows(settings: Settings, tokenizer) -> list[dict[str, list[int]]]:
    """The training examples exactly as lorafleet tokenises them (its token cache), as plain HF rows."""
    import numpy as np

    from data_pipeline.cache import open_token_cache
    from schema.data import DataConfig

    data = DataConfig.model_validate({"train": {"path": settings.data, "format": "prompt_completion"}, "template": TEMPLATE})
    cache = open_token_cache(
        data.train[0], tokenizer, template=data.template, seq_len=settings.seq_len, overlong=data.overlong, max_bad_frac=data.max_bad_frac
    )
    rows = []
    for index in range(len(cache)):
        ids, label_mask = cache.example(index)
        ids = ids.astype(np.int64)  # the cache stores the narrowest dtype the vocabulary fits
        labels = np.where(label_mask.astype(bool), ids, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX  # as lorafleet labels it: the first token has nothing to be predicted from
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
    return rows


def run_hf_trainer(settings: Settings) -> dict[str, Any]:
    """The baseline: the usual QLoRA recipe with transformers.Trainer, peft and bitsandbytes."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainer.adapters import TARGET_PRESETS
    from trainer.models import compute_dtype

    dtype = compute_dtype("auto")  # the same automatic choice lorafleet makes: bf16 on CUDA, fp32 on CPU
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(tokenised_rows(settings, tokenizer))

    model = AutoModelForCausalLM.from_pretrained(
        settings.model_dir,
        dtype=dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=QUANT["type"],
            bnb_4bit_use_double_quant=QUANT["double_quant"],
            bnb_4bit_compute_dtype=dtype,
        ),
        device_map={"": device},
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGET_PRESETS[LORA["targets"]]
        ),
    )
    args = TrainingArguments(
        output_dir=str(Path(settings.work_dir) / "hf-trainer"),
        max_steps=settings.total_steps,
        per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=1,
        learning_rate=OPTIM["lr"],
        lr_scheduler_type=OPTIM["schedule"],
        warmup_steps=OPTIM["warmup_ratio"],  # below 1: a ratio of max_steps
        max_grad_norm=OPTIM["max_grad_norm"],
        weight_decay=0.0,
        optim=OPTIM["name"],
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=checkpointing,
        bf16=dtype == torch.bfloat16,
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=settings.seed,
    )
    window = TimedWindow(settings.warmup, settings.total_steps)
    losses: list[float] = []

    class Timing(TrainerCallback):
        tokens_seen = 0

        def on_step_end(self, args, state, control, **kwargs):
            window.step_end(state.global_step, state.num_input_tokens_seen - self.tokens_seen)
            self.tokens_seen = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer, callbacks=[Timing()]).train()
    return {**window.result(), "first_train_loss": losses[0], "final_train_loss": losses[-1]}


def run_arm(arm: str, settings: Settings) -> dict[str, Any]:
    """One arm, in this process: its timed-window numbers and this process's peak memory."""
    import torch

    if arm == BASELINE:
        measured = run_hf_trainer(settings)
    else:
        measured = run_lorafleet(settings, packing=arm.removeprefix("lorafleet-"))
    measured["peak_rss_bytes"] = peak_rss_bytes()
    if torch.cuda.is_available():
        measured["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return {"arm": arm, **measured}


def arm_schedule(arms: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, arm) in run order: forward in even rounds, backward in odd ones (A B C, C B A, A B C, ...)."""
    return [(r, arm) for r in range(rounds) for arm in (arms if r % 2 == 0 else arms[::-1])]


def run_arm_subprocess(arm: str, settings: Settings, log_path: Path) -> dict[str, Any]:
    result_path = log_path.with_suffix(".json")
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--arm-settings", json.dumps(asdict(settings)), "--arm-result", str(result_path)]
    env = {**os.environ, "LORAFLEET_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if finished.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"arm {arm} exited with {finished.returncode}; the end of its log:\n{tail}")
    return json.loads(result_path.read_text())


def summarise(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm, pooled over its runs: tokens/s = all timed tokens / all timed seconds, and tokens/s at the median
    step time (robust to bursts of load from other processes). Against the baseline: ratios of those, of the
    mean peak memory, and the tokens/s ratio within each round (whose arms ran back to back, under similar load)."""
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        tokens_per_step = sum(r["tokens"] for r in mine) / sum(r["timed_steps"] for r in mine)
        median_step_s = statistics.median(t for r in mine for t in r["step_times_s"])
        entry: dict[str, Any] = {
            "batching": BATCHING[arm],
            "runs": len(mine),
            "tokens_per_s": sum(r["tokens"] for r in mine) / sum(r["window_s"] for r in mine),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in mine],
            "tokens_per_step": tokens_per_step,
            "median_step_time_s": median_step_s,
            "tokens_per_s_at_median_step": tokens_per_step / median_step_s,
            "final_train_loss_runs": [r["final_train_loss"] for r in mine],
        }
        for key in ("peak_rss_bytes", "peak_rss_before_window_bytes", "peak_cuda_bytes"):
            if all(key in r for r in mine):
                entry[key] = statistics.mean(r[key] for r in mine)
                entry[f"{key}_runs"] = [r[key] for r in mine]
        per_arm[arm] = entry
    baseline = per_arm[BASELINE]
    ratios: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm == BASELINE:
            continue
        paired = []
        for round_index in sorted({r["round"] for r in runs}):
            ours = [r for r in runs if r["round"] == round_index and r["arm"] == arm]
            theirs = [r for r in runs if r["round"] == round_index and r["arm"] == BASELINE]
            if ours and theirs:
                paired.append(ours[0]["tokens_per_s"] / theirs[0]["tokens_per_s"])
        ratios[arm] = {
            "tokens_per_s": per_arm[arm]["tokens_per_s"] / baseline["tokens_per_s"],
            "tokens_per_s_at_median_step": per_arm[arm]["tokens_per_s_at_median_step"] / baseline["tokens_per_s_at_median_step"],
            "tokens_per_s_per_round": paired,
            "peak_rss": per_arm[arm]["peak_rss_bytes"] / baseline["peak_rss_bytes"],
        }
        if "peak_cuda_bytes" in baseline:
            ratios[arm]["peak_cuda"] = per_arm[arm]["peak_cuda_bytes"] / baseline["peak_cuda_bytes"]
    return {"arms": per_arm, f"ratio_vs_{BASELINE}": ratios}


def markdown(result: dict[str, Any]) -> str:
    s, summary = result["settings"], result["summary"]
    ratios = summary[f"ratio_vs_{BASELINE}"]
    cuda = result["machine"]["device"] == "cuda"
    mib = 2**20
    data = Path(s["data"])
    lines = [
        "# Training throughput: lorafleet vs HF Trainer + peft + bitsandbytes",
        "",
        f"Machine: {describe(result['machine'])}. Run at {result['started_utc']}; 1-min load average at start / end: "
        f"{result['load_average_1min']['start']:.2f} / {result['load_average_1min']['end']:.2f} (other processes share the cores).",
        f"Command: `{result['command']}`",
        "",
        f"Job: {s['model']} in 4-bit NF4 + double quant, compute {result['compute_dtype']}; LoRA r={LORA['r']} alpha={LORA['alpha']:g} "
        f"dropout={LORA['dropout']} on q/k/v/o; {OPTIM['name']} lr {OPTIM['lr']:g}, {OPTIM['schedule']}; gradient checkpointing; "
        f"seq_len {s['seq_len']}, micro-batch {s['micro_batch']}, grad accum 1; data {data.relative_to(ROOT) if data.is_relative_to(ROOT) else data} "
        f"with the chat template. Timed: steps {s['warmup'] + 1}..{s['warmup'] + s['steps']} of each run "
        f"(runs per arm: {s['rounds']}, in alternating order). Tokens = non-padding tokens.",
        "",
        "| arm | batching | non-pad tokens/step | tokens/s, all timed steps | x HF | tokens/s at median step | x HF | x HF per round | tokens/s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in summary["arms"].items():
        ratio = ratios.get(arm)
        lines.append(
            f"| {arm} | {entry['batching']} | {entry['tokens_per_step']:.1f} | {entry['tokens_per_s']:.2f} | "
            + (f"**{ratio['tokens_per_s']:.2f}x** | " if ratio else "1 | ")
            + f"{entry['tokens_per_s_at_median_step']:.2f} | "
            + (f"{ratio['tokens_per_s_at_median_step']:.2f}x | " if ratio else "1 | ")
            + (", ".join(f"{x:.2f}x" for x in ratio["tokens_per_s_per_round"]) if ratio else "baseline")
            + f" | {', '.join(f'{x:.2f}' for x in entry['tokens_per_s_runs'])} |"
        )
    lines += [
        "",
        "| arm | peak RSS MiB (mean) | x HF | per run | of it reached before the timed window |"
        + (" peak CUDA allocated MiB | x HF |" if cuda else "")
        + " final train loss per run |",
        "|---|---|---|---|---|" + ("---|---|" if cuda else "") + "---|",
    ]
    for arm, entry in summary["arms"].items():
        ratio = ratios.get(arm)
        row = (
            f"| {arm} | {entry['peak_rss_bytes'] / mib:.0f} | " + (f"**{ratio['peak_rss']:.2f}x**" if ratio else "1")
            + f" | {', '.join(f'{x / mib:.0f}' for x in entry['peak_rss_bytes_runs'])}"
            + f" | {', '.join(f'{x / mib:.0f}' for x in entry['peak_rss_before_window_bytes_runs'])} |"
        )
        if cuda:
            row += f" {entry['peak_cuda_bytes'] / mib:.0f} | " + (f"{ratio['peak_cuda']:.2f}x |" if ratio else "1 |")
        row += f" {', '.join(f'{x:.3f}' for x in entry['final_train_loss_runs'])} |"
        lines.append(row)
    lines += [
        "",
        "tokens/s, all timed steps: the arm's timed non-padding tokens over its timed seconds, pooled over its runs. "
        "tokens/s at median step: tokens per step over the median step time, which a burst of load from other "
        "processes moves less. x HF per round: the tokens/s ratio within each round, whose arms ran back to back. "
        "Peak RSS is each arm's whole process (getrusage ru_maxrss), model load included.",
        "",
    ]
    return "\n".join(lines)


def prepare(args: argparse.Namespace) -> str:
    """Data on disk, the model converted once, the token cache built: none of it lands inside an arm's run.
    Returns the model as a local HF directory."""
    if not Path(args.data).is_file():
        if Path(args.data).resolve() != DEFAULT_DATA:
            sys.exit(f"--data {args.data}: no such file; give a prompt/completion JSONL, or leave --data out for the demo data")
        from launch.demo_data import write_demo_data

        write_demo_data(DEFAULT_DATA.parents[1])

    from data_pipeline.cache import open_token_cache
    from schema.data import DataConfig
    from trainer.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    data = DataConfig.model_validate({"train": {"path": args.data, "format": "prompt_completion"}, "template": TEMPLATE})
    open_token_cache(data.train[0], load_tokenizer(args.model), template=TEMPLATE, seq_len=args.seq_len, overlong=data.overlong, max_bad_frac=data.max_bad_frac)
    return str(model_dir)


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from trainer.models import compute_dtype

    started_utc = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    load_start = os.getloadavg()[0]
    began = time.perf_counter()
    model_dir = prepare(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for index, (round_index, arm) in enumerate(arm_schedule(args.arms, args.rounds)):
            work = Path(tmp) / f"{index:02d}-{arm}"
            work.mkdir()
            settings = Settings(
                args.model, model_dir, str(Path(args.data).resolve()), args.seq_len, args.micro_batch, args.warmup, args.steps, args.seed, str(work)
            )
            record = {"round": round_index, **run_arm_subprocess(arm, settings, work / "arm.log")}
            runs.append(record)
            print(
                f"round {round_index} {arm:17s} {record['tokens_per_s']:8.1f} tokens/s  {record['tokens_per_step']:6.1f} tokens/step  "
                f"{record['step_time_s']:.2f} s/step  peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    machine = machine_description()
    return {
        "benchmark": "train_throughput",
        "command": " ".join(["python", "benchmarks/train_throughput.py", *map(shlex.quote, argv)]),
        "started_utc": started_utc,
        "machine": machine,
        "compute_dtype": str(compute_dtype("auto")).removeprefix("torch."),
        "settings": {
            "model": args.model,
            "data": str(Path(args.data).resolve()),
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "grad_accum": 1,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "seed": args.seed,
            "quant": QUANT,
            "lora": LORA,
            "optim": OPTIM,
            "template": TEMPLATE,
            "gradient_checkpointing": True,
        },
        "runs": runs,
        "summary": summarise(runs, args.arms),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - began,
        "torch_threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="preset or local HF directory (default smollm2-135m)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="prompt/completion JSONL (default the arithmetic demo data)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones (at least 1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every arm, in alternating order")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help=f"arms to run; {BASELINE} is the baseline and always runs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    # Internal: how the parent starts one arm in a child process.
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--arm-settings", help=argparse.SUPPRESS)
    parser.add_argument("--arm-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("seq_len", "micro_batch", "steps", "warmup", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if BASELINE not in args.arms:
        args.arms.append(BASELINE)
    args.arms = list(dict.fromkeys(args.arms))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # Imported here, not at the top: it loads torch and peft, which the driver does not otherwise need.
    from schema.atomic import write_text_atomic

    if args.arm:
        write_text_atomic(args.arm_result, json.dumps(run_arm(args.arm, Settings(**json.loads(args.arm_settings))), indent=1) + "\n")
        return
    result = run_benchmark(args, argv)
    name = f"train_throughput_{result['machine']['device']}"
    write_text_atomic(args.results_dir / f"{name}.json", json.dumps(result, indent=1) + "\n")
    report = markdown(result)
    write_text_atomic(args.results_dir / f"{name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
