"""The corpus of bad inputs (tests/corpus/*.yaml): every case through lorafleet's real entry points.

For each case: no traceback reaches the user, bad input exits with code 2 and a message naming the
file or option, the field, the value or line (the case's `expect`), inputs that must be accepted are,
and files the user planted survive. tests/corpus_runner.py runs the cases (scripts/reliability_report.py
runs them the same way to write docs/reliability.md).
"""

from __future__ import annotations

import sys

import pytest
from corpus_runner import CATEGORIES, all_cases, load_cases, run_case

CASES = all_cases()
# The kinds of bad input each category must cover, at least (the hardening issue).
MINIMUM_CASES = {"job_yaml": 72, "fleet_yaml": 33, "data_files": 35, "cli": 45}


# A case whose fix belongs in a file outside this corpus's change is expected to fail until it is fixed.
PARAMETERS = [
    pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=case.spec["open_issue"])) if case.spec.get("open_issue") else case
    for case in CASES
]


@pytest.mark.parametrize("case", PARAMETERS, ids=lambda case: f"{case.category}/{case.name}")
def test_every_bad_input_gets_a_named_error(case, tiny_model_dir, tmp_path):
    outcome = run_case(case, tmp_path / case.name, tiny_model_dir)
    assert not outcome.failures, f"{case.category}/{case.name} ({case.about}):\n" + "\n".join(outcome.failures)


def test_the_corpus_covers_every_category():
    for category, minimum in MINIMUM_CASES.items():
        cases = load_cases(category)
        names = [case.name for case in cases]
        assert len(cases) >= minimum, f"{CATEGORIES[category]}: {len(cases)} cases, fewer than {minimum}"
        assert len(set(names)) == len(names), f"{category}: repeated case names"
        for case in cases:
            assert case.about, case.name
            assert case.accepted or case.spec["expect"], f"{case.name}: a refusal must say what its message names"


def test_no_case_started_ray():
    # Runs after the cases (pytest keeps the order of a module): they must all end before Ray starts.
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
