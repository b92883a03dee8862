"""What every config section shares: unknown keys, NaN and infinities refused; whole numbers stay whole.

Numbers are strict: `max_steps: true` or `lr: "1e-3"` is an error, not 1 and not a silent string
conversion, because a YAML slip should never become a different run. Whole numbers fit in 64 bits, and
a path is never empty (Path("") would quietly be the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _fits_64_bits(value: int) -> int:
    # A validator, not Field(ge=, le=): a field's own bounds (Field(8, ge=1)) would replace those.
    if value > INT64_MAX:
        raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": INT64_MAX})
    if value < INT64_MIN:
        raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": INT64_MIN})
    return value


# Whole numbers fit in 64 bits, as torch and numpy hold them: a larger one could only fail mid-run.
Int = Annotated[StrictInt, AfterValidator(_fits_64_bits)]
Float = StrictFloat
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]  # numpy's and torch's seed range
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_MAX_CHARS = 100  # a name is a directory name, and file systems cap those at 255 bytes


def _not_blank(value: Any) -> Any:
    # Path("") is the working directory, which nobody means by writing nothing. Checked before the
    # conversion to Path, which would turn "" into ".".
    if isinstance(value, str) and not value.strip():
        raise ValueError("the path is empty (it would mean the working directory); give a file or directory path")
    return value


PathText = Annotated[str, BeforeValidator(_not_blank)]  # a path kept as text (it may also be a glob or hf:<name>)
PathValue = Annotated[Path, BeforeValidator(_not_blank)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
