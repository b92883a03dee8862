"""The training-throughput benchmark's own logic: arm order, ratios, and exact token counting in every arm."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
from conftest import ROOT, write_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_throughput as bench  # noqa: E402


def test_arguments_default_to_the_cpu_job_and_always_include_the_baseline():
    args = bench.parse_args(["--arms", "lorafleet-padded"])
    assert (args.model, args.seq_len, args.micro_batch, args.steps) == ("smollm2-135m", 128, 2, 20)
    assert args.arms == ["lorafleet-padded", "hf-trainer"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--warmup", "0"])  # the timed window opens at the end of a warm-up step


def test_arms_alternate_order_every_round():
    assert bench.arm_schedule(["a", "b", "c"], 3) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c"),
    ]


def run_record(round_index: int, arm: str, tokens: int, step_times_s: list[float], peak_rss_bytes: int) -> dict:
    window_s = sum(step_times_s)
    return {
        "round": round_index, "arm": arm, "tokens": tokens, "timed_steps": len(step_times_s), "window_s": window_s,
        "tokens_per_s": tokens / window_s, "step_times_s": step_times_s, "peak_rss_bytes": peak_rss_bytes,
        "peak_rss_before_window_bytes": peak_rss_bytes // 2, "final_train_loss": 1.0,
    }


def test_throughput_is_pooled_over_runs_and_ratios_are_paired_per_round():
    runs = [
        run_record(0, "lorafleet-padded", 120, [2.0, 2.0, 2.0], 900),
        run_record(0, "hf-trainer", 120, [3.0, 3.0, 3.0], 1000),
        run_record(1, "hf-trainer", 120, [1.0, 1.0, 10.0], 1200),  # one step hit by a burst of load
        run_record(1, "lorafleet-padded", 120, [1.5, 1.5, 1.5], 1100),
    ]
    summary = bench.summarise(runs, ["lorafleet-padded", "hf-trainer"])
    ours, theirs = summary["arms"]["lorafleet-padded"], summary["arms"]["hf-trainer"]
    assert ours["tokens_per_s"] == pytest.approx(240 / 10.5)
    assert theirs["tokens_per_s"] == pytest.approx(240 / 21.0)
    assert theirs["median_step_time_s"] == pytest.approx(3.0)  # of 1, 1, 3, 3, 3, 10
    ratio = summary["ratio_vs_hf-trainer"]["lorafleet-padded"]
    assert ratio["tokens_per_s"] == pytest.approx(21.0 / 10.5)
    assert ratio["tokens_per_s_at_median_step"] == pytest.approx(3.0 / 1.75)
    assert ratio["tokens_per_s_per_round"] == pytest.approx([1.5, 12.0 / 4.5])
    assert ratio["peak_rss"] == pytest.approx(1000 / 1100)


def test_every_arm_counts_exactly_the_non_padding_tokens_of_the_timed_steps(tiny_model_dir, tmp_path):
    """Identical rows give every example the same length L, so the timed steps' non-padding tokens are known:
    micro_batch * L per step when padded, micro_batch * (seq_len // L) * L when packed. L is no multiple of 8
    and seq_len no multiple of L, so a count that included padding would be off in every arm."""
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "What is 12 plus 34?", "completion": "46"}] * 24)
    settings = bench.Settings(
        model=str(tiny_model_dir), model_dir=str(tiny_model_dir), data=str(data), seq_len=96, micro_batch=2, warmup=1, steps=2, seed=0, work_dir=""
    )
    length = len(bench.tokenised_rows(settings, AutoTokenizer.from_pretrained(tiny_model_dir))[0]["input_ids"])
    per_row_packed = (settings.seq_len // length) * length
    assert per_row_packed >= 2 * length  # packing has something to pack
    assert length % 8 and settings.seq_len % length  # rows carry padding in both modes
    expected_per_step = {"lorafleet-packed": 2 * per_row_packed, "lorafleet-padded": 2 * length, "hf-trainer": 2 * length}
    for arm, per_step in expected_per_step.items():
        result = bench.run_arm(arm, replace(settings, work_dir=str(tmp_path / arm)))
        assert result["arm"] == arm
        assert result["tokens"] == per_step * settings.steps, arm
        assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["window_s"])
        assert len(result["step_times_s"]) == settings.steps
        assert sum(result["step_times_s"]) == pytest.approx(result["window_s"])
        assert result["peak_rss_bytes"] >= result["peak_rss_before_window_bytes"] > 0
        assert math.isfinite(result["final_train_loss"])
