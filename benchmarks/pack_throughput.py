"""Packs against separate processes: K SmolLM2-135M QLoRA adapters trained as one pack (one process, one
shared 4-bit base, one forward and backward for all) or as K processes side by side on the same cores.

Every job: SmolLM2-135M-Instruct in NF4 with double quantization, LoRA on q/k/v/o, paged AdamW 8-bit,
gradient checkpointing, seq_len --seq-len, micro-batch --micro-batch, --steps optimizer steps. The jobs
differ in data (the demo's arithmetic and sort_words tasks, alternating), rank (8, 16, 32, cycling) and
learning rate (1e-3 scaled by 1, 0.5, 2, cycling), as a fleet of adapters on one base does.

Arms, for each K of --ks, all in this one run of the script:
- pack: one process runs `trainer.loop.run_pack` over the K jobs;
- separate: K processes start together, each running `trainer.loop.run_job` on one job (what `lorafleet
  train` runs), competing for the same cores.
And for K = 4 (--hf-k): hf: K processes start together, each running the HF Trainer + peft + bitsandbytes
baseline of benchmarks/train_throughput.py on one job (same model, quantization, LoRA, optimizer).

Measured per arm:
- aggregate non-padding tokens/s: all tokens the arm trained / the wall time from starting its processes to
  the last one's end (start-up included: each process loads the model), and the steady-state rate over the
  steps after --warmup steps (start-up excluded);
- peak memory: the sum of the processes' peak RSS (VmHWM, read every 0.2 s), or CUDA max allocated on a GPU;
- start-up: the time from a process's start to each of its adapters' first step.

    .venv/bin/python benchmarks/pack_throughput.py [--ks 1 2 4 8] [--steps 8] [--warmup 2] [--seq-len 256] [--micro-batch 4]

Writes benchmarks/results/pack_throughput_<device>.{json,md,png} atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import describe, machine_description, save_png  # noqa: E402
from schema.atomic import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("arithmetic", "sort_words")
RANKS = (8, 16, 32)
LR_SCALES = (1.0, 0.5, 2.0)


def job_raw(index: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    task = TASKS[index % len(TASKS)]
    rank = RANKS[index % len(RANKS)]
    return {
        "name": f"job{index}",
        "model": args.model,
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "lora": {"r": rank, "alpha": float(rank), "dropout": 0.05, "targets": "attn"},
        "optim": {"name": "paged_adamw_8bit", "lr": 1.0e-3 * LR_SCALES[index % len(LR_SCALES)], "schedule": "constant", "warmup_ratio": 0.0},
        "train": {"max_steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": 1, "seq_len": args.seq_len, "grad_checkpointing": True, "seed": index},
        "data": {"train": {"path": str(ROOT / "examples" / "data" / task / "train.jsonl")}},
        "eval": {"every": 0},
        "checkpoint": {"every": 0, "keep": 1},
        "output_dir": str(work / f"job{index}"),
    }


# -- child processes ----------------------------------------------------------------------------------


def child(raws: list[dict], result_path: Path, started: float) -> None:
    """Train `raws` as one pack in this process; record when each adapter stepped and how many tokens."""
    from schema.job import JobConfig
    from trainer.loop import run_pack

    steps: dict[str, list[tuple[float, int]]] = {raw["name"]: [] for raw in raws}

    def report(metrics: dict) -> None:
        if "train/loss" in metrics:
            steps[metrics["job"]].append((time.time(), round(metrics["perf/tokens_per_s"] * metrics["perf/step_time_s"])))

    outcomes = run_pack([JobConfig.model_validate(raw) for raw in raws], report)
    failed = {name: str(outcome) for name, outcome in outcomes.items() if isinstance(outcome, BaseException)}
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    result = {"started": started, "ended": time.time(), "steps": steps}
    try:
        import torch

        if torch.cuda.is_available():
            result["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    result_path.write_text(json.dumps(result))


def hf_child(raw: dict, result_path: Path, started: float, args: argparse.Namespace, work: Path) -> None:
    """The HF Trainer baseline on one job, recording the same per-step series."""
    import train_throughput

    settings = train_throughput.Settings(
        model=args.model, model_dir=str(_model_dir(args.model)), data=raw["data"]["train"]["path"], seq_len=args.seq_len,
        micro_batch=args.micro_batch, steps=args.steps - args.warmup, warmup=args.warmup, seed=raw["train"]["seed"], work_dir=str(work),
    )
    measured = train_throughput.run_hf_trainer(settings)
    result = {"started": started, "ended": time.time(), "window": measured}
    result_path.write_text(json.dumps(result))


def _model_dir(spec: str) -> Path:
    from trainer.models import resolve_model_dir

    return Path(resolve_model_dir(spec))


# -- the parent: launching arms and measuring them ------------------------------------------------------


def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes (what new processes can take without swapping)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def launch(groups: list[list[dict]], work: Path, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """Start one process per group at once; wait; return their series and the summed peak RSS."""
    processes = []
    env = {**os.environ, "LORAFLEET_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launched = time.time()
    for index, group in enumerate(groups):
        spec = work / f"{kind}-{index}.json"
        spec.write_text(json.dumps(group))
        result = work / f"{kind}-{index}.result.json"
        log = (work / f"{kind}-{index}.log").open("w")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec), "--result", str(result), "--started", str(time.time())]
        command += ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)]
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), result, log))
    peaks = [0] * len(processes)
    while any(p.poll() is None for p, _, _ in processes):
        for i, (p, _, _) in enumerate(processes):
            if p.poll() is None:
                peaks[i] = max(peaks[i], peak_rss(p.pid))
        time.sleep(0.2)
    for p, result, log in processes:
        log.close()
        if p.returncode != 0:
            raise RuntimeError(f"{kind} process failed ({p.returncode}); see {log.name}")
    results = [json.loads(result.read_text()) for _, result, _ in processes]
    return {"launched": launched, "results": results, "peak_rss_bytes_sum": sum(peaks), "processes": len(processes)}


def summarise(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Aggregate tokens/s (over the makespan, and in steady state), start-up per adapter, peak memory."""
    ended = max(r["ended"] for r in run["results"])
    makespan = ended - run["launched"]
    if "window" in run["results"][0]:  # HF children report only their timed window
        tokens = sum(r["window"]["tokens"] for r in run["results"])
        window_start = min(r["ended"] - r["window"]["window_s"] for r in run["results"])
        steady = tokens / (ended - window_start)
        startup = []
        total_tokens = None
    else:
        series = [s for r in run["results"] for s in r["steps"].values()]
        total_tokens = sum(t for s in series for _, t in s)
        startup = [s[0][0] - r["started"] for r in run["results"] for s in r["steps"].values()]
        after = [(when, t) for s in series for when, t in s[warmup:]]
        window_start = min(s[warmup - 1][0] for s in series) if warmup else run["launched"]
        steady = sum(t for _, t in after) / (max(w for w, _ in after) - window_start)
    out = {
        "processes": run["processes"],
        "makespan_s": makespan,
        "steady_tokens_per_s": steady,
        "peak_rss_bytes_sum": run["peak_rss_bytes_sum"],
    }
    if total_tokens is not None:
        out.update(
            tokens=total_tokens,
            aggregate_tokens_per_s=total_tokens / makespan,
            startup_s_mean=sum(startup) / len(startup),
            startup_s_max=max(startup),
        )
    cuda = [r.get("peak_cuda_bytes") for r in run["results"] if r.get("peak_cuda_bytes")]
    if cuda:
        out["peak_cuda_bytes_sum"] = sum(cuda)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Packs against separate processes",
        "",
        f"Machine: {describe(result['machine'])}.",
        f"Command: `{result['command']}` ({result['date']}).",
        f"Each job: {result['settings']['model']} NF4 + double quantization, LoRA r 8/16/32 on q/k/v/o, paged AdamW 8-bit, "
        f"gradient checkpointing, {result['settings']['steps']} steps of {result['settings']['micro_batch']} x {result['settings']['seq_len']} tokens; "
        "data and learning rates differ per job. Tokens are non-padding tokens.",
        *([f"Every process runs torch with its default intra-op threads, one per core ({result['machine']['cpu_cores']} here): K separate "
           "processes share those cores, as K `lorafleet train` commands started side by side do, while a pack is one process."]
          if result["machine"]["device"] == "cpu" else []),
        "",
        "| K | arm | processes | aggregate tokens/s (makespan) | steady tokens/s | makespan (s) | peak memory, sum (MiB) | start to first step (s, mean) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        aggregate = f"{row['aggregate_tokens_per_s']:.1f}" if "aggregate_tokens_per_s" in row else "-"
        startup = f"{row['startup_s_mean']:.1f}" if "startup_s_mean" in row else "-"
        lines.append(
            f"| {row['k']} | {row['arm']} | {row['processes']} | {aggregate} | {row['steady_tokens_per_s']:.1f} | {row['makespan_s']:.1f} | "
            f"{row['peak_rss_bytes_sum'] / 2**20:.0f} | {startup} |"
        )
    lines += ["", "Ratios, pack against separate processes at the same K (higher tokens/s and lower memory are better):", ""]
    lines += ["| K | aggregate tokens/s ratio | steady tokens/s ratio | peak memory ratio |", "|---:|---:|---:|---:|"]
    for k, ratio in result["ratios"].items():
        lines.append(f"| {k} | {ratio['aggregate_tokens_per_s']:.2f}x | {ratio['steady_tokens_per_s']:.2f}x | {ratio['peak_memory']:.2f}x |")
    for k, why in result.get("separate_skipped", {}).items():
        lines += ["", f"K = {k}, separate processes: not run. {why}. The pack of {k} ran in one process."]
    if result.get("hf"):
        hf = result["hf"]
        lines += ["", f"Against the HF Trainer + peft + bitsandbytes baseline run as {hf['k']} processes: the pack of {hf['k']} reaches "
                  f"{hf['steady_ratio']:.2f}x its steady tokens/s at {hf['memory_ratio']:.2f}x its summed peak memory."]
    growth = memory_growth(result)
    if growth:
        lines += ["", growth]
    lines += ["", "![tokens/s and memory against K](pack_throughput_%s.png)" % result["machine"]["device"], ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("pack", "o-"), ("separate", "s--"), ("hf", "^:")):
        picked = [r for r in rows if r["arm"] == arm]
        if not picked:
            continue
        speed.plot([r["k"] for r in picked], [r["steady_tokens_per_s"] for r in picked], style, label=arm)
        memory.plot([r["k"] for r in picked], [r["peak_rss_bytes_sum"] / 2**30 for r in picked], style, label=arm)
    speed.set(xlabel="adapters K", ylabel="aggregate tokens/s (steady state)", title="throughput")
    memory.set(xlabel="adapters K", ylabel="peak memory, summed over processes (GiB)", title="memory")
    for axis in (speed, memory):
        axis.set_xticks(sorted({r["k"] for r in rows}))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"{result['settings']['model']} QLoRA adapters: one pack vs K processes ({result['machine']['device']})")
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def vocab_size(model: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_model_dir(model)).vocab_size


def memory_growth(result: dict[str, Any]) -> str | None:
    """Where a pack's memory goes: its peak grows per adapter by about the activations of one more
    micro-batch, of which the fp32 logits over the vocabulary are the largest tensor (held several times
    over in the loss and its backward). None with fewer than two pack sizes."""
    packs = sorted((r for r in result["rows"] if r["arm"] == "pack"), key=lambda r: r["k"])
    if len(packs) < 2 or "vocab_size" not in result:
        return None
    first, last = packs[0], packs[-1]
    per_adapter = (last["peak_rss_bytes_sum"] - first["peak_rss_bytes_sum"]) / (last["k"] - first["k"])
    settings = result["settings"]
    logits = settings["micro_batch"] * settings["seq_len"] * result["vocab_size"] * 4
    return (
        f"Where a pack's memory goes: from K = {first['k']} to K = {last['k']} its peak grew by {per_adapter / 2**20:.0f} MiB per adapter, "
        f"the activations of one more micro-batch; the base ({first['peak_rss_bytes_sum'] / 2**20:.0f} MiB with one adapter, "
        f"libraries included) is paid once. The largest single activation is one adapter's fp32 logits, "
        f"{settings['micro_batch']} x {settings['seq_len']} tokens x {result['vocab_size']:,} vocabulary = {logits / 2**20:.0f} MiB, and the loss "
        f"and its backward hold several tensors of that size. A loss computed over chunks of rows (or fused with the output layer) would "
        f"never hold them whole; how much of the growth that saves is not measured here."
    )


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from launch.demo_data import write_demo_data

    write_demo_data(ROOT / "examples" / "data")
    _model_dir(args.model)  # convert the GGUF once, before any timing
    rows = []
    skipped = {}
    available = memory_available()
    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        for k in args.ks:
            for arm in ("separate", "pack"):
                per_process = [r["peak_rss_bytes_sum"] / r["processes"] for r in rows if r["arm"] == "separate"]
                if arm == "separate" and per_process and k * max(per_process) > 0.9 * available:
                    # K processes would not fit in memory: that is a result too (the pack's K does).
                    skipped[str(k)] = (
                        f"{k} processes would need about {k * max(per_process) / 2**30:.1f} GiB "
                        f"({max(per_process) / 2**30:.2f} GiB each, measured), the machine had {available / 2**30:.1f} GiB available"
                    )
                    print(f"separate arm at K={k} skipped: {skipped[str(k)]}", flush=True)
                    continue
                work = Path(tmp) / f"{arm}-{k}"
                work.mkdir()
                raws = [job_raw(i, args, work) for i in range(k)]
                groups = [raws] if arm == "pack" else [[raw] for raw in raws]
                rows.append({"k": k, "arm": arm, **summarise(launch(groups, work, args, "pack"), args.warmup)})
                print(json.dumps(rows[-1]), flush=True)
        hf = None
        if args.hf_k:
            work = Path(tmp) / "hf"
            work.mkdir()
            raws = [job_raw(i, args, work) for i in range(args.hf_k)]
            hf_row = {"k": args.hf_k, "arm": "hf", **summarise(launch([[raw] for raw in raws], work, args, "hf"), args.warmup)}
            rows.append(hf_row)
            pack_row = next(r for r in rows if r["arm"] == "pack" and r["k"] == args.hf_k)
            hf = {"k": args.hf_k, "steady_ratio": pack_row["steady_tokens_per_s"] / hf_row["steady_tokens_per_s"], "memory_ratio": pack_row["peak_rss_bytes_sum"] / hf_row["peak_rss_bytes_sum"]}
    ratios = {}
    for k in args.ks:
        if str(k) in skipped:
            continue
        pack = next(r for r in rows if r["arm"] == "pack" and r["k"] == k)
        separate = next(r for r in rows if r["arm"] == "separate" and r["k"] == k)
        ratios[str(k)] = {
            "aggregate_tokens_per_s": pack["aggregate_tokens_per_s"] / separate["aggregate_tokens_per_s"],
            "steady_tokens_per_s": pack["steady_tokens_per_s"] / separate["steady_tokens_per_s"],
            "peak_memory": pack["peak_rss_bytes_sum"] / separate["peak_rss_bytes_sum"],
        }
    return {
        "vocab_size": vocab_size(args.model),
        "machine": machine_description(),
        "command": " ".join(["python", "benchmarks/pack_throughput.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": vars(args) | {"ks": list(args.ks)},
        "rows": rows,
        "ratios": ratios,
        "separate_skipped": skipped,
        "memory_available_bytes": available,
        "hf": hf,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--hf-k", type=int, default=4, help="K of the HF baseline arm (0 skips it)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["pack", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child == "pack":
        child(json.loads(args.spec.read_text()), args.result, args.started)
        return
    if args.child == "hf":
        raw = json.loads(args.spec.read_text())[0]
        hf_child(raw, args.result, args.started, args, args.result.parent)
        return
    result = run(args, argv)
    device = result["machine"]["device"]
    write_json_atomic(args.out / f"pack_throughput_{device}.json", result)
    write_text_atomic(args.out / f"pack_throughput_{device}.md", markdown(result))
    plot(result, args.out / f"pack_throughput_{device}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
