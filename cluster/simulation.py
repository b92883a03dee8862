"""A stand-in for the trainer, for the scheduler's own tests and its scale benchmark: a worker that sleeps.

`sleeping_pack` has the signature of `trainer.loop.run_pack` (the body a FleetWorker runs). Each of its
jobs takes `train.max_steps` ticks of `step_s` seconds, all jobs of a pack side by side; it reports
steps and the same events as the trainer, takes joins between ticks, and writes nothing to disk. Give it
to `FleetRunner(body=functools.partial(sleeping_pack, step_s=...))`. It is not a user option: `lorafleet
run` always trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class SleptResult(dict):
    """What a finished sleeping job returns, shaped like the trainer's JobResult.to_dict()."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def sleeping_pack(configs: list, report: Callable[[dict], None] | None, joins: Callable[[list[str]], list] | None, step_s: float = 0.1) -> dict[str, Any]:
    emit = report or (lambda event: None)
    running: dict[str, list] = {}  # name -> [config, steps done, started]
    outcomes: dict[str, Any] = {}

    def admit(config) -> None:
        running[config.name] = [config, 0, time.time()]
        emit({"job": config.name, "event": "started", "step": 0})

    for config in configs:
        admit(config)
    while True:
        for config in joins(list(running)) if joins is not None else []:
            admit(config)
        if not running:
            return outcomes
        time.sleep(step_s)
        for name, state in list(running.items()):
            config, done, started = state
            state[1] = done = done + 1
            emit({"job": name, "step": done, "max_steps": config.train.max_steps, "train/loss": 1.0 / done, "perf/tokens_per_s": 1000.0, "eta_s": (config.train.max_steps - done) * step_s})
            if done >= config.train.max_steps:
                del running[name]
                result = SleptResult(
                    output_dir=str(config.output_dir), adapter_dir=str(config.output_dir), steps=done, tokens=1000 * done,
                    wall_time_s=time.time() - started, train_loss=1.0 / done, eval_loss=None, initial_eval_loss=None,
                    peak_memory_bytes=0, resumed_from_step=None,
                )
                outcomes[name] = result
                emit({"job": name, "event": "finished", "result": result.to_dict()})
