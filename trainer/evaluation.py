"""Evaluation: batched greedy generation, task metrics, and the metrics that show forgetting.

One evaluation runs a tasks file (`TasksFile`, YAML) against a model: a bare base model, or a PEFT
model with one or more adapters (the active adapter is evaluated). Task metrics:

- `gsm8k`: every integer in the output is extracted; correct if the first or the last equals the gold.
- `exact_match` / `contains`: whitespace-normalised equality / containment of the gold string.
- `label`: classification; the output is normalised and matched against a label set (see predict_label).
- `loss` / `ppl`: token-mean NLL (and its exp) of the reference responses given the prompts.

Forgetting metrics compare the adapted model with its own base (adapters switched off with peft's
`disable_adapter()`, so no second copy of the model) on held-out general prompts that the *base*
answered (`BaseReference`):

- `drift_kl`: mean per-token KL(p_base || p_adapted) over the base-generated response tokens;
- `response_nll`: mean NLL of those base responses under the adapted model (`response_nll_increase`
  subtracts the base model's own NLL of them);
- `<task>_drop` / `accuracy_drop`: base score minus adapted score on tasks marked `general: true`.

Names follow the design: `eval/<task>/<metric>` and `eval/forgetting/<metric>`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from data_pipeline.config import NAMED_TEMPLATES, PLACEHOLDER, SourceConfig, check_template
from data_pipeline.encoding import resolve_template
from data_pipeline.sources import iter_chunks, parse_example
from data_pipeline.splits import source_splitter

STRICT = ConfigDict(extra="forbid", validate_assignment=True)

# The data pipeline's formats (read and parsed by data_pipeline.sources, so a task row becomes the same
# prompt it would in training), plus self_instruct: the general_prompts files, where the prompt is
# `instruction` + `instances[0].input` and the reference `instances[0].output`.
RowFormat = Literal["prompt_completion", "question_answer", "alpaca", "fields", "self_instruct"]
# Templates mean what they mean in the data pipeline (data_pipeline.config.DataConfig.template), so a
# task is prompted exactly as its training data was.
TEMPLATE_HELP = (
    "'auto' (the chat template when the tokenizer has one, else 'none'), 'chat' (one user turn), 'none' (the prompt as is), "
    f"a named template ({', '.join(NAMED_TEMPLATES)}) or a string with {{column}} placeholders ({{prompt}} is the prompt text)"
)


class EvalTaskConfig(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Task name; metrics are logged as eval/<name>/<metric>.")
    path: Path = Field(description="Rows to evaluate: a JSONL, JSON, Parquet or CSV file, a glob or a directory, read as a data source is.")
    format: RowFormat = Field("prompt_completion", description="Row layout: prompt_completion, question_answer (GSM8K), alpaca, fields (mapped by `fields`) or self_instruct (general_prompts).")
    fields: dict[str, str] = Field(default_factory=dict, description="Column for each role of the format when the file names it differently (as in data sources).")
    split: Literal["train", "validation", "test"] | None = Field(
        None, description="Keep only this part of the data pipeline's content-hash split (same hash as training sources); None keeps all rows."
    )
    split_fractions: tuple[float, float, float] = Field((0.9, 0.05, 0.05), description="Shares of train, validation and test; must equal the training source's.")
    split_key: str = Field("auto", description="What the split hashes: 'auto' (the row's uncommon words) or a column name; must equal the training source's.")
    metric: Literal["gsm8k", "exact_match", "contains", "label", "loss", "ppl"] = Field(
        description="gsm8k (first or last integer), exact_match, contains, label (normalised label match), loss or ppl on the references."
    )
    n: int | None = Field(64, ge=1, description="Rows evaluated (after `where` and the seeded shuffle); None evaluates every row.")
    seed: int | None = Field(0, description="Shuffle rows with this seed before taking n; None keeps file order.")
    where: dict[str, str] = Field(default_factory=dict, description="Keep only rows whose fields equal these values, e.g. {template: Is_this_product_review_positive}.")
    template: str = Field("auto", description=f"How the prompt is rendered for the model: {TEMPLATE_HELP}.")
    max_new_tokens: int = Field(32, ge=1, description="Generation stops after this many new tokens.")
    stop: list[str] = Field(default_factory=list, description="Generation stops at the first of these strings; the output is cut there.")
    labels: list[str] | None = Field(None, description="Label set for metric 'label'; None uses the distinct references of the evaluated rows.")
    general: bool = Field(False, description="A general ability: the drop from the base model's score counts as forgetting (eval/forgetting/<name>_drop).")
    batch_size: int = Field(8, ge=1, description="Prompts per generation or scoring batch.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalTaskConfig:
        if self.labels is not None and self.metric != "label":
            raise ValueError(f"labels are used by metric 'label' only, not '{self.metric}'; remove labels or set metric: label")
        if self.labels == []:
            raise ValueError("labels is empty; list the label set or leave it out to use the distinct references")
        if any(share < 0 for share in self.split_fractions) or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions {list(self.split_fractions)} must be three non-negative shares summing to 1")
        if "" in self.stop:
            raise ValueError("stop holds an empty string, which would cut every output to nothing; remove it")
        check_template(self.template)
        return self


class ForgettingProbeConfig(BaseModel):
    model_config = STRICT
    prompts: Path = Field(description="Held-out general prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV in `format`.")
    format: RowFormat = Field("self_instruct", description="Row layout of the prompts file (ignored for .txt).")
    n: int = Field(32, ge=1, description="Prompts the base model answers; the forgetting metrics are measured on its answers.")
    seed: int | None = Field(0, description="Shuffle prompts with this seed before taking n; None keeps file order.")
    template: str = Field("auto", description=f"How a prompt is rendered: {TEMPLATE_HELP}.")
    max_new_tokens: int = Field(48, ge=1, description="Length cap of the base model's answers.")
    stop: list[str] = Field(default_factory=list, description="The base answers are cut at the first of these strings.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation or scoring batch.")

    @model_validator(mode="after")
    def _template(self) -> ForgettingProbeConfig:
        check_template(self.template)
        return self


class TasksFile(BaseModel):
    model_config = STRICT
    tasks: list[EvalTaskConfig] = Field(default_factory=list, description="Tasks to evaluate, each with its own data, prompt template and metric.")
    forgetting: ForgettingProbeConfig | None = Field(None, description="General prompts for drift and NLL; None skips those two metrics.")

    @model_validator(mode="after")
    def _unique_names(self) -> TasksFile:
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; rename the repeated {duplicates}")
        if not self.tasks and self.forgetting is None:
            raise ValueError("the file lists no tasks and no forgetting probe; add at least one")
        return self


class TasksFileError(ValueError):
    """A tasks file or its data that cannot be evaluated; names the file, line or row, field, value and fix."""


# ---------------------------------------------------------------------------------------------
# Loading tasks files and their rows
# ---------------------------------------------------------------------------------------------


def load_tasks_file(path: str | Path, check_data: bool = True) -> TasksFile:
    """Read and validate a tasks YAML; with check_data, also read every task's rows (cheap) so that a
    missing field or file fails here, before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise TasksFileError(f"{path}: no such tasks file")
    text = path.read_text()
    try:
        node, raw = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TasksFileError(f"{path}: not valid YAML: {err}") from None
    if isinstance(raw, list):  # a bare list of tasks is accepted
        raw, node = {"tasks": raw}, None
    if not isinstance(raw, dict):
        raise TasksFileError(f"{path}: the top level must be a mapping with `tasks` (and optionally `forgetting`)")
    try:
        tasks = TasksFile.model_validate(raw)
    except ValidationError as err:
        raise TasksFileError(f"invalid tasks file {path}:\n  " + "\n  ".join(_describe(err, path, node))) from None
    if check_data:
        for task in tasks.tasks:
            task_rows(task)
        if tasks.forgetting is not None:
            probe_prompts(tasks.forgetting)
    return tasks


def _describe(err: ValidationError, path: Path, node: yaml.Node | None) -> list[str]:
    lines = []
    for problem in err.errors():
        location = tuple(problem["loc"])
        line = _yaml_line(node, location)
        where = f"{path}:{line}" if line else str(path)
        field_name = ".".join(str(p) for p in location) or "(top level)"
        value = "(missing)" if problem["type"] == "missing" else repr(problem.get("input"))[:80]
        fix = {
            "missing": " (fix: add this field)",
            "extra_forbidden": " (fix: remove it or correct its spelling)",
            "literal_error": f" (fix: use one of {problem.get('ctx', {}).get('expected')})",
        }.get(problem["type"], "")
        lines.append(f"{where}: {field_name} = {value}: {problem['msg']}{fix}")
    return lines


def _yaml_line(node: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


@dataclass
class Example:
    """One evaluation row: the prompt text (before the template), the reference answer, and the row's
    values (its columns plus role names, for {column} templates)."""

    prompt: str
    reference: str
    fields: dict[str, Any]


def row_source(path: Path, row_format: str, fields: dict[str, str] | None = None) -> SourceConfig:
    """The data-pipeline view of an evaluation file (self_instruct rows are read as plain rows)."""
    pipeline_format = "prompt_completion" if row_format == "self_instruct" else row_format
    return SourceConfig(path=str(path), format=pipeline_format, fields=fields or {})


def read_examples(path: Path, row_format: str, fields: dict[str, str] | None = None) -> Iterator[Example]:
    """Every row of `path` (file, glob or directory, as for a data source) as an Example; a bad row raises
    DataError / TasksFileError naming the file, the line or row, and the field."""
    source = row_source(path, row_format, fields)
    for chunk in iter_chunks(source):
        for row, place in zip(chunk.rows, chunk.places):
            if row_format == "self_instruct":
                yield self_instruct_example(row, chunk.file, place)
            else:
                parsed = parse_example(source, row, chunk.file, place)
                yield Example(parsed.prompt, parsed.response, parsed.values)


def self_instruct_example(row: dict[str, Any], file: str, place: str) -> Example:
    instances = row.get("instances")
    if not isinstance(row.get("instruction"), str) or not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise TasksFileError(
            f"{file}: {place}: format self_instruct needs 'instruction' (text) and 'instances' (a list of {{input, output}}); "
            f"the row has fields {sorted(row)}. Choose the format that matches the file"
        )
    first = instances[0]
    extra = str(first.get("input") or "").strip()
    prompt = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
    return Example(prompt, str(first.get("output", "")), {**row, "prompt": prompt})


def select(examples: list[Example], n: int | None, seed: int | None) -> list[Example]:
    if seed is not None:
        examples = examples[:]
        random.Random(seed).shuffle(examples)
    return examples if n is None else examples[:n]


def task_rows(task: EvalTaskConfig) -> list[Example]:
    """The task's rows after `where`, the content-hash split, the seeded shuffle and `n`."""
    # The same splitter a training source with these settings uses, so held-out rows are never trained on.
    split = {"split": task.split, "split_fractions": task.split_fractions, "split_key": task.split_key}
    source = row_source(task.path, task.format, task.fields).model_copy(update=split)
    splitter = source_splitter(source) if task.split else None
    examples = []
    for example in read_examples(task.path, task.format, task.fields):
        if any(str(example.fields.get(key)) != value for key, value in task.where.items()):
            continue
        if splitter is not None and splitter.split_of(example.fields) != task.split:
            continue
        examples.append(example)
    if not examples:
        raise TasksFileError(
            f"task '{task.name}': {task.path} has no rows" + (f" matching where={task.where}" if task.where else "")
            + (f" in split '{task.split}'" if task.split else "")
        )
    return select(examples, task.n, task.seed)


def read_prompts(path: Path, row_format: str = "self_instruct") -> list[str]:
    """Prompt texts from a .txt file (one per line) or a data file in `row_format` (its references are ignored)."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise TasksFileError(f"{path}: no such prompts file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [example.prompt for example in read_examples(path, row_format)]
    if not prompts:
        raise TasksFileError(f"{path}: holds no prompts")
    return prompts


def probe_prompts(probe: ForgettingProbeConfig) -> list[str]:
    prompts = read_prompts(probe.prompts, probe.format)
    if probe.seed is not None:
        random.Random(probe.seed).shuffle(prompts)
    return prompts[: probe.n]


def render_prompt(tokenizer: PreTrainedTokenizerBase, template: str, prompt: str, fields: dict[str, Any] | None = None) -> str:
    """The exact text the model sees before its answer, as the data pipeline builds it for training
    (data_pipeline.encoding): the chat frame around one user turn, or the tokenizer's leading special
    tokens (BOS) followed by the prompt, raw or put through a named or {column} template."""
    resolved = resolve_template(template, tokenizer, "prompt_completion")
    if resolved == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if resolved != "none":
        values = {k: v for k, v in (fields or {}).items() if isinstance(v, (str, int, float))}
        values["prompt"] = prompt
        prompt = PLACEHOLDER.sub(lambda match: str(values.get(match.group(1), "")), resolved)
    return leading_special_text(tokenizer) + prompt


def leading_special_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special tokens (e.g. BOS) the tokenizer puts before a text, as text that tokenizes back to them."""
    with_specials = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    lead = with_specials[: len(with_specials) - len(plain)] if with_specials[len(with_specials) - len(plain) :] == plain else []
    return tokenizer.decode(lead) if lead else ""


# ---------------------------------------------------------------------------------------------
# Metrics on text (pure functions)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Model side: batched generation and response scoring
# ---------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off, no autograd, and (on CPU) 4-bit weights dequantized once, for the duration; the
    previous train/eval mode and the 4-bit forward come back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), dequantized_4bit(model):
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def dequantized_4bit(model: torch.nn.Module) -> Iterator[None]:
    """On CPU, bitsandbytes 4-bit linears run from a weight dequantized once, instead of per call.

    bnb on CPU dequantizes every weight on every forward, so one-token decode steps of SmolLM2-135M ran
    ~2.8x slower than fp32 (61 s vs 22 s for 4 x 16 new tokens, 2-core CPU). The cost: 4 bytes per weight
    while evaluating (~0.5 GB for 135M). The weights are the same; only the order of float operations
    differs. On CUDA, bnb's own kernels are kept."""
    if model_device(model).type != "cpu":
        yield
        return
    import bitsandbytes as bnb

    patched = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        already = "forward" in vars(module)  # inside an outer dequantized_4bit: that one restores it
        if isinstance(module, bnb.nn.Linear4bit) and state is not None and not already and not getattr(state, "packing_format_for_cpu", False):
            dtype = module.compute_dtype or state.dtype
            weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(dtype)
            bias = module.bias.to(dtype) if module.bias is not None else None
            module.forward = functools.partial(_dense_linear, weight, bias)  # an instance attribute shadows the class forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def adapters_off(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The base model's view: peft's disable_adapter() on a PEFT model, nothing on a bare model."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and hasattr(model, "peft_config") else contextlib.nullcontext()


class _StopStrings(StoppingCriteria):
    """Marks a sequence done once its new text holds a stop string (decoding ~max_new_tokens short texts
    per step costs far less than the forward pass on these models)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.index(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Answers to already-rendered prompts, batched with left padding. temperature 0 is greedy; otherwise
    sampling draws from `seed` inside a forked RNG, so a training run's random stream is not disturbed.
    Each answer stops at EOS, at max_new_tokens, or just before the first stop string."""
    if not prompts:
        return []
    device = model_device(model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Similar lengths share a batch: less padding to run through the model.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    answers: list[str] = [""] * len(prompts)
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)]) if stop else None
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                stopping_criteria=criteria,
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                answers[i] = cut_at_stop(text, stop)
    return answers


@dataclass
class ResponseScores:
    """Per-example sums over response tokens: NLL under the model, KL(base || model) when asked, token counts."""

    nll: list[float]
    tokens: list[int]
    kl: list[float] | None = None

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / max(sum(self.tokens), 1)

    @property
    def mean_kl(self) -> float:
        assert self.kl is not None
        return sum(self.kl) / max(sum(self.tokens), 1)


def score_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 4,
    with_base_kl: bool = False,
) -> ResponseScores:
    """NLL of each response given its (rendered) prompt; with_base_kl also sums the per-token
    KL(p_base || p_model), the base logits coming from the same model with its adapters off."""
    device = model_device(model)
    pairs = []
    for prompt, response in zip(prompts, responses):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, response_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, counts, kl = [], [], []
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            # target_mask[b, t]: the logits at position t predict a response token (at t + 1).
            target_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (p, r) in enumerate(chunk):
                input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
                attention[row, : len(p) + len(r)] = 1
                target_mask[row, max(len(p) - 1, 0) : len(p) + len(r) - 1] = True
            input_ids, attention, target_mask = input_ids.to(device), attention.to(device), target_mask.to(device)
            targets = torch.roll(input_ids, shifts=-1, dims=1)
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            log_probs = torch.log_softmax(logits[target_mask], dim=-1)  # [tokens, vocab]
            token_nll = -log_probs.gather(1, targets[target_mask].unsqueeze(1)).squeeze(1)
            per_row = target_mask.sum(1).tolist()
            nll.extend(part.sum().item() for part in torch.split(token_nll, per_row))
            counts.extend(per_row)
            if with_base_kl:
                with adapters_off(model):
                    base_logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
                base_log_probs = torch.log_softmax(base_logits[target_mask], dim=-1)
                token_kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1)
                kl.extend(part.sum().item() for part in torch.split(token_kl, per_row))
    return ResponseScores(nll=nll, tokens=counts, kl=kl if with_base_kl else None)


# ---------------------------------------------------------------------------------------------
# Tasks and forgetting
# ---------------------------------------------------------------------------------------------


def task_score_name(metric: str) -> str:
    """The headline metric a task reports: accuracy for gsm8k and label, else the metric itself."""
    return "accuracy" if metric in ("gsm8k", "label") else metric


def evaluate_task(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: EvalTaskConfig, examples: list[Example] | None = None
) -> dict[str, float]:
    """Metrics of one task on the active model, named by metric only (the caller adds eval/<task>/)."""
    examples = examples if examples is not None else task_rows(task)
    prompts = [render_prompt(tokenizer, task.template, ex.prompt, ex.fields) for ex in examples]
    if task.metric in ("loss", "ppl"):
        scores = score_responses(model, tokenizer, prompts, [ex.reference for ex in examples], batch_size=task.batch_size)
        return {"loss": scores.mean_nll, "ppl": math.exp(min(scores.mean_nll, 50.0))}
    outputs = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=task.batch_size)
    if task.metric == "gsm8k":
        hits = [gsm8k_correct(out, ex.reference) for out, ex in zip(outputs, examples)]
    elif task.metric == "exact_match":
        hits = [exact_match(out, ex.reference) for out, ex in zip(outputs, examples)]
    elif task.metric == "contains":
        hits = [contains(out, ex.reference) for out, ex in zip(outputs, examples)]
    else:
        labels = task.labels or sorted({ex.reference for ex in examples})
        hits = [label_correct(out, ex.reference, labels) for out, ex in zip(outputs, examples)]
        named = [predict_label(out, labels) is not None for out in outputs]
        return {"accuracy": sum(hits) / len(hits), "valid_frac": sum(named) / len(named)}
    return {task_score_name(task.metric): sum(hits) / len(hits)}


@dataclass
class BaseReference:
    """What the base model does on the probes, computed once and reused by every evaluation of a job or
    an adapter matrix: its answers to the general prompts, its own NLL of them, its general-task scores."""

    prompts: list[str]
    responses: list[str]
    response_nll: float
    general_scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "responses": self.responses, "response_nll": self.response_nll, "general_scores": self.general_scores}


def build_base_reference(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: TasksFile) -> BaseReference:
    """Run the base model (adapters off, if any) on the forgetting probe and on the general tasks."""
    with adapters_off(model), dequantized_4bit(model):
        general_scores = {}
        for task in tasks.tasks:
            if task.general:
                general_scores[task.name] = evaluate_task(model, tokenizer, task)[task_score_name(task.metric)]
        prompts: list[str] = []
        responses: list[str] = []
        response_nll = float("nan")
        probe = tasks.forgetting
        if probe is not None:
            prompts = [render_prompt(tokenizer, probe.template, p) for p in probe_prompts(probe)]
            responses = generate(model, tokenizer, prompts, max_new_tokens=probe.max_new_tokens, stop=probe.stop, batch_size=probe.batch_size)
            kept = [(p, r) for p, r in zip(prompts, responses) if r.strip()]
            prompts, responses = [p for p, _ in kept], [r for _, r in kept]
            if prompts:
                response_nll = score_responses(model, tokenizer, prompts, responses, batch_size=probe.batch_size).mean_nll
    return BaseReference(prompts, responses, response_nll, general_scores)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: TasksFile,
    *,
    base_reference: BaseReference | None = None,
) -> dict[str, float]:
    """Every task metric as eval/<task>/<metric>, and the forgetting metrics as eval/forgetting/<metric>.

    `base_reference` (from build_base_reference) is computed here when not given; a training loop builds
    it once and passes it to every evaluation. The model's train/eval mode is restored afterwards."""
    with dequantized_4bit(model):  # once for all the tasks' generate and score calls
        return _evaluate_tasks(model, tokenizer, tasks, base_reference)


def _evaluate_tasks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: TasksFile, base_reference: BaseReference | None
) -> dict[str, float]:
    if base_reference is None:
        base_reference = build_base_reference(model, tokenizer, tasks)
    metrics: dict[str, float] = {}
    drops = []
    for task in tasks.tasks:
        for name, value in evaluate_task(model, tokenizer, task).items():
            metrics[f"eval/{task.name}/{name}"] = value
        if task.general:
            drop = base_reference.general_scores[task.name] - metrics[f"eval/{task.name}/{task_score_name(task.metric)}"]
            if task.metric in ("loss", "ppl"):
                drop = -drop  # a lower loss is better: a rise is the drop
            metrics[f"eval/forgetting/{task.name}_drop"] = drop
            if task.metric in ("gsm8k", "label", "exact_match", "contains"):
                drops.append(drop)
    if drops:
        metrics["eval/forgetting/accuracy_drop"] = sum(drops) / len(drops)
    if base_reference.prompts:
        scores = score_responses(
            model, tokenizer, base_reference.prompts, base_reference.responses,
            batch_size=tasks.forgetting.batch_size if tasks.forgetting else 4, with_base_kl=True,
        )
        metrics["eval/forgetting/drift_kl"] = scores.mean_kl
        metrics["eval/forgetting/response_nll"] = scores.mean_nll
        metrics["eval/forgetting/response_nll_increase"] = scores.mean_nll - base_reference.response_nll
    return metrics


def adapter_row_names(adapter_dirs: Sequence[Path]) -> list[str]:
    """Row names for adapter directories: a job's `<job>/adapter` is named by its job, others by their
    directory; repeats get a numeric suffix."""
    names: list[str] = []
    for path in adapter_dirs:
        path = Path(path)
        name = path.parent.name if path.name == "adapter" and path.parent.name else path.name
        candidate, suffix = name, 2
        while candidate in names or candidate == "base":
            candidate, suffix = f"{name}-{suffix}", suffix + 1
        names.append(candidate)
    return names


def evaluate_matrix(
    base_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    adapter_dirs: Sequence[Path],
    tasks: TasksFile,
) -> dict[str, dict[str, float]]:
    """Metrics of the base alone and of each adapter on it: {"base": {...}, "<adapter>": {...}}.

    The adapters are loaded side by side into one PEFT model over the one base (a few MB each) and
    switched with set_adapter; the base reference is computed once for all rows. peft injects the adapter
    layers into `base_model` in place: use a base loaded for this evaluation."""
    from peft import PeftModel  # peft is only needed when adapters are evaluated

    for path in adapter_dirs:
        if not (Path(path) / "adapter_config.json").is_file():
            raise TasksFileError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    reference = build_base_reference(base_model, tokenizer, tasks)
    rows = {"base": evaluate_tasks(base_model, tokenizer, tasks, base_reference=reference)}
    model = None
    for name, path in zip(adapter_row_names(adapter_dirs), adapter_dirs):
        if model is None:
            model = PeftModel.from_pretrained(base_model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(name)
        rows[name] = evaluate_tasks(model, tokenizer, tasks, base_reference=reference)
    return rows
