"""Data pipeline throughput and memory, same machine, same run.

1. Tokenisation into the cache, rows/s and tokens/s, against a plain `datasets` baseline
   (`load_dataset("json")` + batched `Dataset.map` with the same template and tokenizer) on the same
   rows: GSM8K train (question_answer, gsm8k template) and T0 (prompt_completion, chat template).
2. Streaming from the warm cache: packed training batches, real (non-pad) tokens/s.
3. Bounded memory: a synthetic source of --rows rows (default 1M) is tokenised and streamed for one
   full epoch in a child process; anonymous memory (RssAnon: what the process itself allocated, not
   the page cache behind the memory-mapped cache) is sampled throughout. A 10x smaller source runs
   the same way, to show how memory grows with the source.

    .venv/bin/python benchmarks/data_throughput.py [--rows 1000000] [--parts tokenisation,streaming,memory] [--repeats 3]

Needs ../shared/data (skips the real-data parts without it) and the smollm2-135m tokenizer.
Writes benchmarks/results/data_throughput.{json,md} atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
GSM8K_TEMPLATE = "Answer the following math question.\n\nQuestion: {question}\n\nAnswer: "
T0_FILES = ["ag_news", "amazon_polarity", "app_reviews", "common_gen", "commonsense_qa", "quarel", "quartz", "sciq", "social_i_qa", "wiqa"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), no GPU used"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


class AnonMemorySampler:
    """Peak RssAnon of this process, sampled every 20 ms on a thread."""

    def __init__(self) -> None:
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> AnonMemorySampler:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def tokenizer():
    from trainer.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def ours_tokenize(source: dict, tok, template: str, seq_len: int, num_proc: int) -> dict:
    from schema.data import DataConfig
    from data_pipeline.cache import open_token_cache

    data = DataConfig(train=source, template=template, num_proc=num_proc, max_bad_frac=1.0)
    started = time.perf_counter()
    cache = open_token_cache(data.train[0], tok, template=template, seq_len=seq_len, overlong="truncate", max_bad_frac=1.0, num_proc=num_proc)
    seconds = time.perf_counter() - started
    assert not cache.hit
    return {"rows": cache.counts["rows"], "tokens": cache.counts["tokens"], "seconds": seconds}


def baseline_tokenize(files: list[str], tok, kind: str, seq_len: int, cache_dir: str) -> dict:
    """The plain way: datasets' JSON loader, then one batched map that formats and tokenises."""
    import datasets

    datasets.disable_progress_bars()
    eos = tok.eos_token_id
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    loaded = time.perf_counter()

    def encode(batch: dict) -> dict:
        if kind == "gsm8k":
            prompts = [GSM8K_TEMPLATE.format(question=q) for q in batch["question"]]
            responses = batch["answer"]
        else:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in batch["prompt"]]
            responses = batch["completion"]
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tok(responses, add_special_tokens=False)["input_ids"]
        ids = [(p + r + [eos])[:seq_len] for p, r in zip(prompt_ids, response_ids)]
        labels = [([-100] * len(p) + r + [eos])[:seq_len] for p, r in zip(prompt_ids, response_ids)]
        return {"input_ids": ids, "labels": labels}

    mapped = dataset.map(encode, batched=True, batch_size=1000, remove_columns=dataset.column_names)
    done = time.perf_counter()
    tokens = sum(len(ids) for ids in mapped.with_format("arrow")["input_ids"].to_pylist())
    return {"rows": len(mapped), "tokens": tokens, "seconds": done - started, "load_seconds": loaded - started, "map_seconds": done - loaded}


def tokenisation_benchmark(tok, seq_len: int, repeats: int) -> list[dict]:
    cases = [
        ("gsm8k train, question_answer + gsm8k template", "gsm8k", [str(SHARED_DATA / "gsm8k" / "train.jsonl")],
         {"path": str(SHARED_DATA / "gsm8k" / "train.jsonl"), "format": "question_answer", "template": GSM8K_TEMPLATE}, "auto"),
    ]
    t0_dir = Path(tempfile.mkdtemp(prefix="t0-subset-"))
    for name in T0_FILES:
        (t0_dir / f"{name}.jsonl").symlink_to(SHARED_DATA / "t0" / f"{name}.jsonl")
    cases.append((f"t0 ({len(T0_FILES)} files), prompt_completion + chat template", "t0", sorted(str(p) for p in t0_dir.iterdir()), {"path": str(t0_dir)}, "chat"))
    results = []
    for label, kind, files, source, template in cases:
        row = {"case": label, "repeats": repeats}
        runs: dict[str, list[dict]] = {"ours_1proc": [], "ours_2proc": [], "baseline_datasets_map": []}
        for _ in range(repeats):  # interleaved, so a burst of load from other processes hits all three alike
            with tempfile.TemporaryDirectory() as cache:
                os.environ["LORAFLEET_CACHE"] = cache
                runs["ours_1proc"].append(ours_tokenize(source, tok, template, seq_len, num_proc=1))
            with tempfile.TemporaryDirectory() as cache:
                os.environ["LORAFLEET_CACHE"] = cache
                runs["ours_2proc"].append(ours_tokenize(source, tok, template, seq_len, num_proc=2))
            with tempfile.TemporaryDirectory() as cache:
                runs["baseline_datasets_map"].append(baseline_tokenize(files, tok, kind, seq_len, cache))
        for key, measured in runs.items():
            part = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]  # the median run
            part["all_seconds"] = [m["seconds"] for m in measured]
            part["rows_per_s"] = part["rows"] / part["seconds"]
            part["tokens_per_s"] = part["tokens"] / part["seconds"]
            row[key] = part
        # > 1: ours is faster. Both spend most of their time in the same Rust tokenizer.
        row["speedup_1proc_vs_baseline"] = row["baseline_datasets_map"]["seconds"] / row["ours_1proc"]["seconds"]
        row["speedup_2proc_vs_baseline"] = row["baseline_datasets_map"]["seconds"] / row["ours_2proc"]["seconds"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def streaming_benchmark(tok, seq_len: int, micro_batch: int, batches: int) -> dict:
    from data_pipeline import build_train_stream
    from schema.data import DataConfig

    with tempfile.TemporaryDirectory() as cache:
        os.environ["LORAFLEET_CACHE"] = cache
        data = DataConfig(
            train=[
                {"path": str(SHARED_DATA / "gsm8k" / "train.jsonl"), "format": "question_answer", "template": GSM8K_TEMPLATE, "weight": 0.8},
                {"path": str(SHARED_DATA / "t0" / "quarel.jsonl"), "weight": 0.1, "role": "rehearsal"},
                {"path": str(SHARED_DATA / "t0" / "ag_news.jsonl"), "weight": 0.1, "role": "rehearsal"},
            ],
            max_bad_frac=1.0,
        )
        build_train_stream(data, tok, seq_len=seq_len, micro_batch=micro_batch, seed=0)  # warm the cache
        started = time.perf_counter()
        stream = build_train_stream(data, tok, seq_len=seq_len, micro_batch=micro_batch, seed=0)
        opened = time.perf_counter()
        assert all(c.hit for c in stream.caches)
        tokens = 0
        for _ in range(batches):
            tokens += int(next(stream)["attention_mask"].sum())
        done = time.perf_counter()
    result = {
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "batches": batches,
        "open_warm_cache_s": opened - started,
        "tokens": tokens,
        "seconds": done - opened,
        "tokens_per_s": tokens / (done - opened),
        "batches_per_s": batches / (done - opened),
        "padding_frac": stream.stats()["data/padding_frac"],
    }
    print(json.dumps(result), flush=True)
    return result


def synthetic_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    words = "the a of to and is in what answer question sum plus minus equals number word reverse upper lower".split()
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            handle.write(json.dumps({"prompt": f"{prompt} ({i})?", "completion": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))}) + "\n")


def memory_child(rows: int, seq_len: int, micro_batch: int) -> dict:
    """Runs in a fresh process: tokenise a synthetic source of `rows` rows, then stream one epoch."""
    from data_pipeline import build_train_stream
    from schema.data import DataConfig

    tok = tokenizer()  # from the usual model cache (a fresh one would convert the GGUF model in this process)
    work = Path(tempfile.mkdtemp(prefix="data-memory-"))
    os.environ["LORAFLEET_CACHE"] = str(work / "cache")
    source = work / "source.jsonl"
    synthetic_rows(source, rows)
    data = DataConfig(train={"path": str(source)}, template="chat")
    baseline_anon = AnonMemorySampler.current()
    started = time.perf_counter()
    with AnonMemorySampler() as during_build:
        stream = build_train_stream(data, tok, seq_len=seq_len, micro_batch=micro_batch, seed=0)
    built = time.perf_counter()
    examples = 0
    with AnonMemorySampler() as during_stream:
        while examples < rows:  # one full epoch
            next(stream)
            examples += len(stream.last_example_ids)
    done = time.perf_counter()
    cache_bytes = sum(p.stat().st_size for p in (work / "cache" / "data").rglob("*") if p.is_file())
    status = {line.split(":")[0]: line.split(":")[1].strip() for line in Path("/proc/self/status").read_text().splitlines() if ":" in line}
    return {
        "rows": rows,
        "source_bytes": source.stat().st_size,
        "cache_bytes": cache_bytes,
        "tokens": stream.caches[0].counts["tokens"],
        "tokenize_s": built - started,
        "stream_epoch_s": done - built,
        "stream_tokens_per_s": stream.caches[0].counts["tokens"] / (done - built),
        "anon_before_bytes": baseline_anon,
        "anon_peak_tokenize_bytes": during_build.peak,
        "anon_peak_stream_bytes": during_stream.peak,
        "vm_hwm": status.get("VmHWM"),
    }


def memory_benchmark(rows: int, seq_len: int, micro_batch: int) -> list[dict]:
    results = []
    for count in (rows // 10, rows):
        output = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(count), "--seq-len", str(seq_len), "--micro-batch", str(micro_batch)],
            check=True, capture_output=True, text=True,
        ).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    return results


def markdown(result: dict) -> str:
    lines = ["# Data pipeline throughput", "", f"Machine: {result['machine']}. Tokenizer: smollm2-135m.", ""]

    def header(part: dict) -> str:
        return f"`{part['command']}`; load average {part['load_start']:.1f} -> {part['load_end']:.1f} on {os.cpu_count()} cores (other processes share them)."

    if "tokenisation" in result:
        part = result["tokenisation"]
        lines += ["## Tokenisation into the cache vs plain `datasets` (load_dataset json + batched map)", "", header(part),
                  f"Median of {part['results'][0]['repeats']} interleaved runs each.", "",
                  "| case | rows | ours 1 proc rows/s | ours 1 proc tokens/s | ours 2 proc rows/s | baseline rows/s | baseline tokens/s | ours/baseline 1 proc | ours/baseline 2 proc |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in part["results"]:
            a, b, c = row["ours_1proc"], row["ours_2proc"], row["baseline_datasets_map"]
            lines.append(f"| {row['case']} | {a['rows']} | {a['rows_per_s']:.0f} | {a['tokens_per_s']:.0f} | {b['rows_per_s']:.0f} | {c['rows_per_s']:.0f} | {c['tokens_per_s']:.0f} | {row['speedup_1proc_vs_baseline']:.2f}x | {row['speedup_2proc_vs_baseline']:.2f}x |")
        lines.append("")
    if "streaming" in result:
        part = result["streaming"]
        s = part["results"]
        lines += ["## Streaming from the warm cache", "", header(part), "",
                  f"{s['batches']} packed batches of {s['micro_batch']} x {s['seq_len']} (GSM8K + 2 T0 rehearsal sources): {s['tokens_per_s']:.0f} real tokens/s "
                  f"({s['batches_per_s']:.0f} batches/s), padding {s['padding_frac']:.1%}; opening the warm cache took {s['open_warm_cache_s']:.2f} s.", ""]
    if "memory" in result:
        part = result["memory"]
        lines += ["## Bounded memory (one process per size: tokenise, then stream one full epoch)", "", header(part),
                  "RssAnon is the memory the process allocated itself; the memory-mapped cache lives in the page cache.", "",
                  "| rows | source MB | cache MB | tokens | tokenise s | stream tokens/s | RssAnon before MB | growth while tokenising MB | growth while streaming MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in part["results"]:
            mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
            lines.append(f"| {m['rows']} | {mb(m['source_bytes'])} | {mb(m['cache_bytes'])} | {m['tokens']} | {m['tokenize_s']:.1f} | {m['stream_tokens_per_s']:.0f} | "
                         f"{mb(m['anon_before_bytes'])} | {mb(m['anon_peak_tokenize_bytes'] - m['anon_before_bytes'])} | {mb(m['anon_peak_stream_bytes'] - m['anon_before_bytes'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic source in the memory benchmark")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--stream-batches", type=int, default=2000)
    parser.add_argument("--parts", default="tokenisation,streaming,memory", help="comma-separated parts to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tokenisation variant; the median is reported")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.seq_len, args.micro_batch)))
        return
    parts = set(args.parts.split(","))
    # Parts not run this time keep their previous results (each part records its own load and command).
    previous = RESULTS / "data_throughput.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result["machine"] = machine()
    command = "python benchmarks/data_throughput.py " + " ".join(sys.argv[1:])
    tok = tokenizer()
    if parts & {"tokenisation", "streaming"} and not SHARED_DATA.is_dir():
        print(f"{SHARED_DATA} is absent: skipping the real-data tokenisation and streaming parts", flush=True)
        parts -= {"tokenisation", "streaming"}
    for part in ("tokenisation", "streaming", "memory"):
        if part not in parts:
            continue
        load_start = os.getloadavg()[0]
        if part == "tokenisation":
            measured = tokenisation_benchmark(tok, args.seq_len, args.repeats)
        elif part == "streaming":
            measured = streaming_benchmark(tok, args.seq_len, args.micro_batch, args.stream_batches)
        else:
            measured = memory_benchmark(args.rows, args.seq_len, args.micro_batch)
        result[part] = {"command": command, "load_start": load_start, "load_end": os.getloadavg()[0], "results": measured}
    write_atomic(RESULTS / "data_throughput.json", json.dumps(result, indent=1))
    write_atomic(RESULTS / "data_throughput.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
