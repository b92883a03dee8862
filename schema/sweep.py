"""Which settings tell a fleet's jobs apart: the one rule behind `lorafleet report`'s swept fields and
the HPARAMS tab's default columns."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def differing_fields(flats: list[dict[str, Any]], ignore: Callable[[str], bool] = lambda key: False) -> list[str]:
    """The dotted keys whose values differ between flattened configs, in the order the configs write them
    (None, or a key a config lacks, is a setting it leaves out).

    A section that some jobs set and others leave out (LwF, a prior rehearsal, a second data source)
    makes every one of its fields differ, most of them only by being there: `forgetting.lwf.on=task`
    against nothing. Of the fields set in the same jobs, those with one value wherever they are set are
    left out when another of them varies, and only the first of them is kept when none does. So a
    sweep of LwF weights shows `forgetting.lwf.weight` alone, not also its temperature and `on`."""
    keys = dict.fromkeys(key for flat in flats for key in flat if not ignore(key))

    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    differing = [key for key in keys if len({text(flat.get(key)) for flat in flats}) > 1]
    set_in = {key: frozenset(index for index, flat in enumerate(flats) if flat.get(key) is not None) for key in differing}
    varies = {key: len({text(flats[index][key]) for index in set_in[key]}) > 1 for key in differing}
    varying_groups = {set_in[key] for key in differing if varies[key]}
    first_of_group: dict[frozenset, str] = {}
    for key in differing:
        first_of_group.setdefault(set_in[key], key)
    return [key for key in differing if varies[key] or (set_in[key] not in varying_groups and first_of_group[set_in[key]] == key)]
