"""Self-generated rehearsal ("prior preservation" for LLMs): the frozen base model answers general prompts,
and those prompt/answer pairs are mixed into training so the adapter keeps doing what the base did.

The dataset is a `prompt_completion` JSONL (`prompt` is the raw prompt, `completion` the base model's answer,
which starts with no template text), read by the data pipeline as a rehearsal source with the *same*
template it was generated under (`with_prior_rehearsal` sets that). It is cached under
`cache_root()/prior/<key>/`, the key hashing the base model's files, the quantization, the prompts file's
bytes and every generation setting, so jobs on the same base share one copy. A file lock makes
concurrent jobs generate it once; the directory appears atomically (temp dir, then rename).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from data_pipeline.encoding import render_prompt
from data_pipeline.rows import read_prompts
from schema.atomic import atomic_directory
from schema.data import DataConfig, SourceConfig
from schema.job import QuantConfig, RehearsalConfig
from schema.outputs import cache_root
from trainer.evaluation.generation import adapters_off, generate
from trainer.models import compute_dtype, load_base_model, load_tokenizer, resolve_model_dir

DATA_FILE = "data.jsonl"
META_FILE = "prior.json"  # also the marker that a directory holds a prior dataset (schema.outputs)


def generate_prior_rows(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: RehearsalConfig
) -> list[dict[str, str]]:
    """The model's answers to `prompts` (rendered with settings.template) as prompt/completion rows.
    Empty answers are dropped: they would teach nothing but the end-of-text token."""
    rendered = [render_prompt(tokenizer, settings.template, prompt) for prompt in prompts]
    with adapters_off(model):  # a job may pass its PEFT model: the answers must be the base's
        answers = generate(
            model,
            tokenizer,
            rendered,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
        )
    return [{"prompt": prompt, "completion": answer} for prompt, answer in zip(prompts, answers) if answer.strip()]


def prior_cache_key(model_spec: str, quant: QuantConfig, settings: RehearsalConfig, dtype: torch.dtype) -> str:
    """Hash of everything that changes the generated rows. The ratio only changes how they are mixed."""
    model_dir = resolve_model_dir(model_spec)
    if isinstance(model_dir, Path):
        # File names, sizes and mtimes identify the weights without hashing hundreds of MB.
        model_id = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    else:
        model_id = model_dir
    generation = settings.model_dump(mode="json", exclude={"ratio", "prompts", "batch_size"})
    identity = {
        "model": model_id,
        "quant": quant.model_dump(mode="json"),
        "dtype": str(dtype),
        "prompts_sha256": hashlib.sha256(settings.prompts.read_bytes()).hexdigest(),
        "generation": generation,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The compute dtype: that of the first floating-point parameter (4-bit weights are stored as uint8)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def ensure_prior_dataset(
    model_spec: str,
    settings: RehearsalConfig,
    *,
    quant: QuantConfig,
    dtype: torch.dtype | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """The JSONL of the base model's answers to the rehearsal prompts, generated on first use and cached.

    Pass the job's already-loaded `model` (bare, or with its adapter: generation switches adapters off)
    and `tokenizer` to avoid loading the base twice; otherwise the base is loaded here, quantized as
    `quant` says. `dtype` defaults to the model's compute dtype; it is part of the cache key."""
    dtype = dtype or (model_dtype(model) if model is not None else compute_dtype("auto"))
    target = cache_root() / "prior" / prior_cache_key(model_spec, quant, settings, dtype)
    if (target / DATA_FILE).is_file():
        return target / DATA_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / DATA_FILE).is_file():  # another job generated it while we waited
            return target / DATA_FILE
        tokenizer = tokenizer or load_tokenizer(model_spec)
        model = model if model is not None else load_base_model(model_spec, quant, dtype)
        build_prior_dataset(target, model, tokenizer, settings, model_spec=model_spec, quant=quant)
    return target / DATA_FILE


def build_prior_dataset(
    target: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    settings: RehearsalConfig,
    *,
    model_spec: str,
    quant: QuantConfig,
) -> dict:
    """Generate the rows and write them (with prior.json, which it returns) into `target` atomically."""
    prompts = read_prompts(settings.prompts, settings.format)[: settings.n]
    started = time.perf_counter()
    rows = generate_prior_rows(model, tokenizer, prompts, settings)
    meta = {
        "model": model_spec,
        "quant": quant.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json"),
        "prompts": len(prompts),
        "rows": len(rows),
        "generation_s": round(time.perf_counter() - started, 3),
    }
    write_prior_dataset(target, rows, meta)
    return meta


def write_prior_dataset(target: Path, rows: list[dict[str, str]], meta: dict) -> None:
    """Write rows and meta into a temp dir beside `target`, then rename it into place."""
    if not rows:
        raise ValueError(f"the base model gave no non-empty answer to any prompt of {meta['settings']['prompts']}; check the template")

    def fill(staging: Path) -> None:
        (staging / DATA_FILE).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))

    # An older dataset or an incomplete attempt at `target` is replaced only once this one is complete.
    atomic_directory(target, fill)


def with_prior_rehearsal(data: DataConfig, prior_path: Path, settings: RehearsalConfig) -> DataConfig:
    """`data` with the prior dataset added as a rehearsal source holding `settings.ratio` of the mix.

    The existing sources keep their relative weights and share 1 - ratio. The prior source is read with
    the template it was generated under, so training sees exactly the prompts the base answered."""
    total = sum(source.weight for source in data.train)
    scaled = [source.model_copy(update={"weight": source.weight / total * (1 - settings.ratio)}) for source in data.train]
    prior = SourceConfig(
        path=str(prior_path), format="prompt_completion", weight=settings.ratio, role="rehearsal", template=settings.template
    )
    return data.model_copy(update={"train": [*scaled, prior]})
