"""The resources section of fleet and job configs (owned by cluster)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    gpus_per_job: int = Field(1, ge=0, le=2, description="GPUs per job: 1, or 2 on one node (two workers, DeepSpeed ZeRO-2); 0 runs on CPU slots.")
    cpus_per_job: int = Field(1, ge=1, description="CPUs per job (per worker); on a CPU-only cluster a CPU slot stands in for each GPU.")
    max_failures: int = Field(2, ge=0, description="Retries after a failure, each resuming from the job's newest complete checkpoint.")
