"""A fleet: many jobs in one file, each deep-merged over shared defaults."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from schema.base import NAME_MAX_CHARS, NAME_PATTERN, Int, PathValue, Section
from schema.compose import ComposeConfig
from schema.job import JobConfig, ResourcesConfig

# Entries of a fleet's run directory that are not job directories; a job may not take these names.
RUN_DIR_ENTRIES = ("fleet.json", "tb", "compose", "report")


class PackingConfig(Section):
    max_adapters: Int = Field(
        4,
        ge=1,
        description=(
            "Most adapters one worker trains at once on its shared base (an adapter pack); 1 gives every job its own "
            "worker. Default 4: on a 2-core CPU a pack of 4 SmolLM2 adapters trained at 3.6x the tokens/s of 4 separate "
            "processes, and a pack of 8 was slower than 4 at 2.2x its memory (benchmarks/results/pack_throughput_cpu.md)."
        ),
    )


class FleetFile(Section):
    """The fleet file as written: jobs are still raw mappings (they are validated after merging)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS, description="Fleet name, shown in the live view, fleet.json and TensorBoard.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Any job-config keys; each job's own keys are deep-merged over these.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Default resources of every job; a job's `resources` overrides them field by field."
    )
    jobs: list[dict[str, Any]] = Field(min_length=1, description="The jobs, queued in this order; each needs a unique `name`.")
    output_dir: PathValue = Field(description="Run directory: one sub-directory per job (named after it), plus fleet.json and tb/fleet/.")
    compose: list[ComposeConfig] = Field(
        default_factory=list, description="Adapter compositions run after the jobs finish; each writes <output_dir>/compose/<name>."
    )
    packing: PackingConfig = Field(default_factory=PackingConfig, description="Adapter packs: compatible jobs share a worker and its base.")
    backfill: Int | None = Field(
        None,
        ge=0,
        description=(
            "While the job at the head of the queue cannot be placed, one node is held for it (no new work lands there: "
            "it drains) and later jobs may start on the other nodes, at most this many of them; then nothing else starts "
            "until it has its slots. Default: no bound (the held node already keeps the head from starving). "
            "0 keeps strict fleet order."
        ),
    )


class FleetConfig(Section):
    """A validated fleet: every job is a complete JobConfig whose output_dir is `output_dir/<job name>`."""

    name: str = Field(pattern=NAME_PATTERN, max_length=NAME_MAX_CHARS, description="Fleet name, shown in the live view, fleet.json and TensorBoard.")
    jobs: list[JobConfig] = Field(min_length=1, description="Fully merged job configs, in queue order.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="The fleet-wide default resources (used to count slots).")
    output_dir: PathValue = Field(description="Run directory holding the job directories, fleet.json and tb/fleet/.")
    compose: list[ComposeConfig] = Field(default_factory=list, description="Compositions of the jobs' adapters, run after the jobs finish.")
    packing: PackingConfig = Field(default_factory=PackingConfig, description="Adapter packs: compatible jobs share a worker and its base.")
    backfill: Int | None = Field(None, ge=0, description="Later jobs that may start ahead of a waiting head job (see FleetFile.backfill).")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base`; mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
