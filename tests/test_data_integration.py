"""The trainer runs on the pipeline with real data: GSM8K mixed with T0 general data, and the ratio it
logs (TensorBoard and metrics.jsonl) is the configured one, within one example per window."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir() or not (SHARED_DATA / "t0").is_dir(), reason="../shared/data is absent")

SPLIT = [0.9, 0.05, 0.05]
GSM8K_TEMPLATE = "Answer the following math question.\n\nQuestion: {question}\n\nAnswer: "


def test_gsm8k_with_t0_rehearsal_trains_and_logs_the_configured_ratio(tmp_path, tiny_model_dir):
    from schema.job import JobConfig
    from trainer.loop import run_job

    window, micro_batch, seq_len, steps = 2, 2, 1024, 6
    config = JobConfig.model_validate(
        {
            "name": "gsm8k-rehearsal",
            "model": str(tiny_model_dir),
            "quant": {"bits": 16},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "qv"},
            "optim": {"name": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "train": {"max_steps": steps, "micro_batch": micro_batch, "grad_accum": 1, "seq_len": seq_len, "grad_checkpointing": False, "seed": 3},
            "data": {
                "train": [
                    {"path": str(SHARED_DATA / "gsm8k" / "test.jsonl"), "format": "question_answer", "template": GSM8K_TEMPLATE, "weight": 0.8, "split": "train", "split_fractions": SPLIT},
                    {"path": str(SHARED_DATA / "t0" / "quarel.jsonl"), "weight": 0.1, "role": "rehearsal"},
                    {"path": str(SHARED_DATA / "t0" / "commonsense_qa.jsonl"), "weight": 0.1, "role": "rehearsal"},
                ],
                "mix": {"by": "tokens", "window": window},
                "max_bad_frac": 0.1,  # the tiny test tokenizer spends ~2 tokens per word
            },
            "checkpoint": {"every": 0},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = run_job(config)
    assert result.steps == steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "data/rehearsal_ratio" in r]
    assert len(logged) == steps
    # One example is at most seq_len tokens; a window holds window * micro_batch rows of real tokens.
    for row in logged:
        window_tokens = window * micro_batch * seq_len * (1 - row["data/padding_frac"])
        assert abs(row["data/rehearsal_ratio"] - 0.2) <= seq_len / window_tokens, row
    assert sum(r["data/rehearsal_ratio"] for r in logged) / steps == pytest.approx(0.2, abs=0.05)
    # Building a window of packed batches costs milliseconds against a step of a few hundred.
    assert sum(r["perf/data_wait_frac"] for r in logged) / steps < 0.01
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/rehearsal_ratio")] == pytest.approx([r["data/rehearsal_ratio"] for r in logged])
