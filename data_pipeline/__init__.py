"""lorafleet data_pipeline: sources -> templates -> Arrow token cache -> sharded, mixed, packed batches.

Public API (imported lazily, so that `lorafleet check` reads rows without loading torch or pyarrow):
- validate_data / validate_source: cheap checks before any model loads;
- build_train_stream: the infinite, resumable batch stream; build_eval_batches: a finite list;
- render_prompt: the exact text a model sees before its answer, as training builds it;
- read_examples, task_rows, read_prompts, probe_prompts: evaluation rows and prompts;
- DataError; the content-hash split helpers split_rows, split_of_key and content_key.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "data_pipeline.errors",
    "validate_data": "data_pipeline.validation",
    "validate_source": "data_pipeline.validation",
    "build_train_stream": "data_pipeline.batches",
    "build_eval_batches": "data_pipeline.batches",
    "TrainStream": "data_pipeline.stream",
    "render_prompt": "data_pipeline.encoding",
    "read_examples": "data_pipeline.rows",
    "task_rows": "data_pipeline.rows",
    "read_prompts": "data_pipeline.rows",
    "probe_prompts": "data_pipeline.rows",
    "content_key": "data_pipeline.splits",
    "split_of_key": "data_pipeline.splits",
    "split_rows": "data_pipeline.splits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
