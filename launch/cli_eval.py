"""`lorafleet eval` (an adapter matrix: task and forgetting metrics) and `lorafleet prior` (self-generated
rehearsal data)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from launch.console import fail, options_error
from launch.options import ListOptionsCommand, split_list_option
from schema.problems import ConfigError, Problem


def base_model_of(adapter_dirs: list[Path]) -> tuple[str, dict]:
    """The model spec and quant section of the jobs that trained these adapters (from each job's
    config.yaml beside its adapter/); all must agree."""
    from schema.jobdir import JobDir

    found: dict[tuple[str, str], list[str]] = {}
    for adapter in adapter_dirs:
        job = JobDir(adapter.parent).saved_config()
        if job is None:
            raise ConfigError(Problem("no job config.yaml beside it names its base model", file=str(adapter), fix="pass --model"))
        spec = (job.get("model", "smollm2-135m"), json.dumps(job.get("quant", {}), sort_keys=True))
        found.setdefault(spec, []).append(str(adapter))
    if len(found) > 1:
        listing = "; ".join(f"{model} {quant}: {', '.join(dirs)}" for (model, quant), dirs in found.items())
        raise ConfigError(f"the adapters were trained on different base models or quantizations ({listing}); evaluate them separately")
    model, quant = next(iter(found))
    return model, json.loads(quant)


def matrix_csv(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", *columns])
    for name, metrics in rows.items():
        writer.writerow([name, *(metrics.get(column, "") for column in columns)])
    return buffer.getvalue()


def matrix_table(rows: dict[str, dict[str, float]], columns: list[str], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model", style="bold")
    for column in columns:
        group, _, metric = column.removeprefix("eval/").rpartition("/")
        table.add_column(f"{group}\n{metric}", justify="right", overflow="fold")
    for name, metrics in rows.items():
        cells = []
        for column in columns:
            value = metrics.get(column)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}")
        table.add_row(name, *cells)
    return table


def register(app: typer.Typer) -> None:
    @app.command("eval", cls=ListOptionsCommand)
    def eval_command(
        tasks_file: Path = typer.Option(..., "--tasks", help="Tasks YAML: tasks (data, template, metric) and a forgetting probe."),
        adapters: list[str] = typer.Option([], "--adapters", help="Adapter directories (PEFT): --adapters A B C (or A,B,C, or repeated). None evaluates the base alone.", metavar="DIR..."),
        model: str | None = typer.Option(None, "--model", help="Base model; default: the `model` of the jobs that trained the adapters."),
        bits: int | None = typer.Option(None, "--bits", help="Base precision 4, 8 or 16; default: the adapters' job config, else 4."),
        out: Path = typer.Option(Path("eval_results"), "--out", help="Directory for matrix.csv, matrix.json and transcripts.jsonl."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier evaluation in --out."),
    ) -> None:
        """Evaluate the base model and each adapter: task metrics and forgetting metrics, one row each, and
        every generated answer (transcripts.jsonl)."""
        from pydantic import ValidationError

        from schema.job import QuantConfig
        from schema.outputs import output_problem
        from trainer.checks import load_tasks_file
        from trainer.evaluation.matrix import evaluate_matrix
        from trainer.models import load_base_model, load_tokenizer
        from trainer.specs import ModelSpecError

        adapters = [Path(item) for item in split_list_option(adapters)]
        try:
            tasks = load_tasks_file(tasks_file)
            missing = [str(a) for a in adapters if not (a / "adapter_config.json").is_file()]
            if missing:
                raise ConfigError(Problem(f"not PEFT adapter directories (no adapter_config.json): {', '.join(missing)}", fix="give adapter/ directories of jobs"))
            if (problem := output_problem(out, overwrite=overwrite, inputs=tuple(adapters))) is not None:
                raise ConfigError(problem)
            quant_section: dict = {}
            if model is None:
                if not adapters:
                    raise ConfigError(Problem("--model is needed when no --adapters are given", fix="pass --model smollm2-135m (or another spec)"))
                model, quant_section = base_model_of(adapters)
            if bits is not None:
                quant_section = {**quant_section, "bits": bits}
            quant = QuantConfig.model_validate(quant_section)
            tokenizer = load_tokenizer(model)
        except ValidationError as err:  # of the quant section: --bits
            fail(options_error(err, QuantConfig))
        except (ConfigError, ModelSpecError, ValueError) as err:
            fail(err)
        base = load_base_model(model, quant)
        transcripts: dict[str, list] = {}
        rows = evaluate_matrix(base, tokenizer, adapters, tasks, transcripts=transcripts)
        # Task columns first, then the forgetting ones.
        columns = sorted({name for metrics in rows.values() for name in metrics}, key=lambda c: (c.startswith("eval/forgetting/"), c))
        console = Console()
        console.print(matrix_table(rows, columns, title=f"{model} ({quant.bits}-bit) on {tasks_file}"))
        summary = {"model": model, "quant": quant.model_dump(mode="json"), "tasks_file": str(tasks_file), "adapters": [str(a) for a in adapters], "rows": rows}
        from schema.atomic import atomic_directory, json_text

        def fill(staging: Path) -> None:
            (staging / "matrix.json").write_text(json_text(summary, indent=2))
            (staging / "matrix.csv").write_text(matrix_csv(rows, columns))
            lines = [json_text({"model": name, **row}, indent=None) for name, rows_of in transcripts.items() for row in rows_of]
            (staging / "transcripts.jsonl").write_text("".join(lines))

        atomic_directory(out, fill)
        console.print(f"wrote {out / 'matrix.csv'}, {out / 'matrix.json'} and {out / 'transcripts.jsonl'} (every generated answer)")

    @app.command("prior")
    def prior_command(
        model: str = typer.Option(..., "--model", help="Base model spec (preset, local HF dir, .gguf)."),
        prompts: Path = typer.Option(..., "--prompts", help="General prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV rows."),
        out: Path = typer.Option(..., "--out", help="Directory to write data.jsonl (prompt_completion) and prior.json into."),
        prompt_format: str = typer.Option("self_instruct", "--format", help="Row layout of the prompts file: self_instruct, prompt_completion, question_answer, alpaca."),
        n: int | None = typer.Option(None, "--n", help="Use the first n prompts."),
        template: str = typer.Option("auto", "--template", help="Prompt template (auto, chat, none, named, or a {column} string); train with the same one."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Length cap of each answer."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 answers greedily; above 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus mass when sampling."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch."),
        bits: int = typer.Option(4, "--bits", help="Base precision: 4, 8 or 16."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier prior dataset in --out."),
    ) -> None:
        """Have the frozen base model answer general prompts; the result is a rehearsal source for training."""
        from pydantic import ValidationError

        from data_pipeline.errors import DataError
        from data_pipeline.rows import read_prompts
        from schema.job import QuantConfig, RehearsalConfig
        from schema.outputs import output_problem
        from trainer.models import load_base_model, load_tokenizer
        from trainer.prior import build_prior_dataset
        from trainer.specs import ModelSpecError

        try:
            settings = RehearsalConfig(
                prompts=prompts, format=prompt_format, n=n, template=template, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
            )
            quant = QuantConfig(bits=bits)
            read_prompts(settings.prompts, settings.format)
            if (problem := output_problem(out, overwrite=overwrite, inputs=(prompts,))) is not None:
                raise ConfigError(problem)
            tokenizer = load_tokenizer(model)
        except ValidationError as err:
            fail(options_error(err, RehearsalConfig))
        except (ConfigError, DataError, ModelSpecError) as err:
            fail(err)
        base = load_base_model(model, quant)
        meta = build_prior_dataset(out.resolve(), base, tokenizer, settings, model_spec=model, quant=quant)
        Console().print(
            f"wrote {meta['rows']} rows to {out / 'data.jsonl'} in {meta['generation_s']:.1f} s; train with "
            f"{{path: {out / 'data.jsonl'}, format: prompt_completion, role: rehearsal, template: {template}}}"
        )
