"""What every config section shares: unknown keys, NaN and infinities refused; whole numbers stay whole.

Numbers are strict: `max_steps: true` or `lr: "1e-3"` is an error, not 1 and not a silent string
conversion, because a YAML slip should never become a different run.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

Int = StrictInt
Float = StrictFloat
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]  # numpy's and torch's seed range
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
