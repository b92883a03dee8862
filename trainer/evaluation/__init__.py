"""Evaluation of a model on tasks and on forgetting probes.

- `generation`: batched greedy or sampled generation, response scoring, eval mode and the base view;
- `metrics`: pure metrics on text and the registry of task metrics (one per `schema.tasks.METRICS`);
- `tasks`: a tasks file on the active model, and the forgetting measures against its own base;
- `matrix`: the base and several adapters side by side.

Rows and prompts come from `data_pipeline` (read and rendered exactly as training reads them).
"""
