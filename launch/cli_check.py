"""`lorafleet check FLEET_OR_JOB.yaml`: what would run, where, on how much data, and what is wrong.

Reads the file, every data source and tasks file, and the model's tokenizer files; loads no model and
starts no Ray. A fleet is told from a job file by its `jobs:` list.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launch.console import fail

EXIT_PROBLEMS = 2


def check_command(config_file: Path, overrides: list[str], show_config: bool) -> None:
    from schema.loading import load_fleet, load_job
    from schema.problems import ConfigError
    from schema.yamlfile import read_yaml_file

    out = Console()
    try:
        raw, _ = read_yaml_file(config_file)
        is_fleet = isinstance(raw, dict) and "jobs" in raw
        loaded = load_fleet(config_file, overrides) if is_fleet else load_job(config_file, overrides)
    except ConfigError as err:
        fail(err)
    if is_fleet:
        from launch.checks import fleet_problems

        jobs = loaded.config.jobs if loaded.config else []
        out.print(f"[bold]fleet[/]: {len(loaded.entries)} jobs ({len(jobs)} valid) into {escape(str(loaded.output_dir))}", highlight=False)
        problems = fleet_problems(loaded, nodes=_local_nodes())
    else:
        from trainer.checks import check_entry

        jobs = [loaded.entry.config] if loaded.entry.config else []
        problems = loaded.problems + check_entry(loaded.entry)
    for job in jobs:
        _describe_job(out, job, show_config)
    out.print(_placement_table(jobs, loaded.config.packing.max_adapters if is_fleet and loaded.config else None))
    if problems:
        fail(ConfigError(problems, title=f"{config_file}"), code=EXIT_PROBLEMS)
    out.print(f"[green]no problems[/] in {escape(str(config_file))}", highlight=False)


def _describe_job(out: Console, job, show_config: bool) -> None:
    from data_pipeline.counting import count_source
    from data_pipeline.errors import DataError
    from trainer.specs import ModelSpecError, locate_model

    out.rule(f"job {job.name}")
    if show_config:
        out.print(escape(job.to_yaml().rstrip()), highlight=False)
    try:
        source = locate_model(job.model)
        tokenizer_dir = source.local if source.ready else None
    except ModelSpecError:
        tokenizer_dir = None
    table = Table(title=f"data of {job.name}", title_justify="left")
    for column in ("source", "path", "role", "weight", "rows", "tokens"):
        table.add_column(column, justify="right" if column in ("weight", "rows", "tokens") else "left")
    sources = [(f"train[{i}]", s) for i, s in enumerate(job.data.train)] + ([("eval", job.data.eval)] if job.data.eval else [])
    for label, data_source in sources:
        try:
            counted = count_source(data_source, job.data.template, tokenizer_dir)
            rows = f"{counted.rows:,}"
            tokens = "(model not on disk yet)" if counted.tokens is None else f"{'' if counted.exact else '≈'}{counted.tokens:,}"
        except (DataError, OSError) as err:
            rows, tokens = "unreadable", escape(str(err).splitlines()[0][:60])
        table.add_row(label, escape(data_source.path), data_source.role, f"{data_source.weight:g}", rows, tokens)
    out.print(table)


def _local_nodes() -> list:
    """The embedded cluster's node, or None when RAY_ADDRESS names a cluster (checked when it is joined)."""
    from cluster.capacity import local_node
    from cluster.session import cluster_address

    return [local_node()] if cluster_address(None) is None else None


def _placement_table(jobs: list, max_adapters: int | None) -> Table:
    """Each job's worker shape, and which jobs may share a worker and its base (one pack group per
    schema.job.pack_key and shape; None for a job file, which always trains alone)."""
    from cluster.capacity import cluster_has_gpus, job_shape
    from schema.job import pack_key

    gpus = cluster_has_gpus(_local_nodes() or [])
    title = "placement" if max_adapters is None else f"placement (packs of up to {max_adapters} adapters share a worker and its base)"
    table = Table(title=title, title_justify="left")
    for column in ("job", "workers", "per worker", "engine", *(["pack group"] if max_adapters is not None else [])):
        table.add_column(column)
    shapes = [job_shape(job.resources, gpus) for job in jobs]
    groups: dict[tuple, list[str]] = {}
    for job, shape in zip(jobs, shapes):
        groups.setdefault((*pack_key(job), shape), []).append(job.name)
    labels = {key: _group_label(index) for index, key in enumerate(groups)}
    for job, shape in zip(jobs, shapes):
        per_worker = f"{shape.cpus_per_worker} CPU" + (f" + {shape.gpus_per_worker} GPU" if shape.gpus_per_worker else "")
        engine = "DeepSpeed ZeRO-2" if shape.workers > 1 else "one process"
        row = [escape(job.name), str(shape.workers), per_worker, engine]
        if max_adapters is not None:
            key = (*pack_key(job), shape)
            row.append("alone" if key[0] == "alone" else f"{labels[key]} ({len(groups[key])} jobs)")
        table.add_row(*row)
    return table


def _group_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ...: short names for pack groups."""
    label = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        label = chr(ord("A") + remainder) + label
    return label
