"""Scoring a task's outputs: pure functions on text, and the registry of task metrics.

- `gsm8k`: every integer in the output is extracted; correct if the first or the last equals the gold.
- `exact_match` / `contains`: whitespace-normalised equality / containment of the gold string.
- `label`: classification; the output is normalised and matched against a label set (see predict_label).
- `loss` / `ppl`: token-mean NLL (and its exp) of the reference responses given the prompts.

Each name of `schema.tasks.METRICS` has one entry in `TASK_METRICS`.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from schema.tasks import METRICS, EvalTaskConfig

# A number: optional sign (not after a word character, so "3-4" is 3 and 4), digits with optional
# thousands commas, optional decimals. "1,234" is 1234; "12.5" stays 12.5 and so never equals an integer.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?|(?<=\w)\d+(?:\.\d+)?")


def extract_numbers(text: str) -> list[float]:
    """Every number in `text`, in order, commas removed."""
    return [float(match.replace(",", "")) for match in _NUMBER.findall(text)]


def gsm8k_gold(reference: str) -> float | None:
    """The gold answer: the number after '#### ' when present (GSM8K solutions), else the last number."""
    tail = reference.rsplit("####", 1)[1] if "####" in reference else reference
    numbers = extract_numbers(tail)
    if not numbers:
        return None
    return numbers[0] if "####" in reference else numbers[-1]


def gsm8k_correct(output: str, reference: str) -> bool:
    """Correct when the first or the last number in the output equals the gold integer."""
    gold = gsm8k_gold(reference)
    numbers = extract_numbers(output)
    if gold is None or not numbers:
        return False
    return numbers[0] == gold or numbers[-1] == gold


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(output: str, reference: str) -> bool:
    return normalize_whitespace(output) == normalize_whitespace(reference)


def contains(output: str, reference: str) -> bool:
    return normalize_whitespace(reference) in normalize_whitespace(output)


def normalize_label(text: str) -> str:
    """Lower case, outer punctuation stripped, whitespace collapsed: ' Positive.' -> 'positive'."""
    return normalize_whitespace(text.lower()).strip(string.punctuation + " ")


def predict_label(output: str, labels: Sequence[str]) -> str | None:
    """The label the output names: an exact normalised match; else the longest label the output starts
    with (at a word boundary); else the one label named anywhere as whole words ("The review is
    positive." -> Positive); None when no label or several are named."""
    said = normalize_label(output)
    by_norm = {normalize_label(label): label for label in labels}
    if said in by_norm:
        return by_norm[said]
    for norm in sorted(by_norm, key=len, reverse=True):
        if norm and said.startswith(norm) and (len(said) == len(norm) or not said[len(norm)].isalnum()):
            return by_norm[norm]
    named = [norm for norm in by_norm if norm and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", said)]
    # A label inside a longer named label ("equivalent" in "not equivalent") is not named on its own.
    named = [norm for norm in named if not any(norm != other and norm in other for other in named)]
    return by_norm[named[0]] if len(named) == 1 else None


def label_correct(output: str, reference: str, labels: Sequence[str]) -> bool:
    predicted = predict_label(output, labels)
    return predicted is not None and normalize_label(predicted) == normalize_label(reference)


@dataclass(frozen=True)
class TaskMetric:
    """How one metric scores a task. A generation metric compares each generated output with its
    reference (`hit`); a likelihood metric scores the references themselves (`from_nll`)."""

    headline: str  # the number a task reports: accuracy, or the metric itself
    hit: Callable[[str, str, EvalTaskConfig, Sequence[str]], bool] | None = None
    from_nll: Callable[[float], dict[str, float]] | None = None
    higher_is_better: bool = True

    @property
    def generates(self) -> bool:
        return self.hit is not None


def _likelihood(nll: float) -> dict[str, float]:
    return {"loss": nll, "ppl": math.exp(min(nll, 50.0))}


TASK_METRICS: dict[str, TaskMetric] = {
    "gsm8k": TaskMetric("accuracy", hit=lambda output, reference, task, labels: gsm8k_correct(output, reference)),
    "exact_match": TaskMetric("exact_match", hit=lambda output, reference, task, labels: exact_match(output, reference)),
    "contains": TaskMetric("contains", hit=lambda output, reference, task, labels: contains(output, reference)),
    "label": TaskMetric("accuracy", hit=lambda output, reference, task, labels: label_correct(output, reference, labels)),
    "loss": TaskMetric("loss", from_nll=_likelihood, higher_is_better=False),
    "ppl": TaskMetric("ppl", from_nll=_likelihood, higher_is_better=False),
}
assert set(TASK_METRICS) == set(METRICS), "every metric a tasks file may name needs a scorer"
