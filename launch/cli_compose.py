"""`lorafleet compose` (combine adapters), `lorafleet restore` (PLR: an adapter on its base at 16, 8, 4,
3 or 2 bits, from its training precision up, optionally merged) and `lorafleet plr` (the adapter
evaluated on its training base and every higher precision)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from launch.console import fail, options_error
from launch.options import ListOptionsCommand, split_list_option
from schema.compose import COMPOSE_METHODS
from schema.problems import ConfigError, Problem


def energy_table(record: dict) -> Table:
    table = Table(title=f"composed: {record['method']}")
    table.add_column("adapter")
    table.add_column("weight", justify="right")
    for spec, weight in zip(record["inputs"], record["weights"]):
        table.add_row(spec["path"], f"{weight:.4g}")
    if record.get("retained_energy") is not None:
        table.caption = f"SVD retained energy {record['retained_energy']:.4f} (rank {record['svd_rank'] or 'Σr per module'})"
    return table


def error_summary_table(summary: dict[str, float], layers: int) -> Table:
    """‖W − deq(q(W))‖/‖W‖ per bit width: the parameter-weighted mean and the worst layer."""
    table = Table(title=f"quantization error ‖W−deq(q(W))‖/‖W‖ over {layers} linear layers")
    for column in ("base", "mean (weighted by parameters)", "max"):
        table.add_column(column, justify="right" if column != "base" else "left")
    for key in sorted({k.removesuffix("_mean").removesuffix("_max") for k in summary}):
        table.add_row(key.removeprefix("rel_err_"), f"{summary[key + '_mean']:.4f}", f"{summary[key + '_max']:.4f}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("compose", cls=ListOptionsCommand)
    def compose_command(
        adapters: list[str] = typer.Option(..., "--adapters", help="PEFT adapter directories: --adapters A B C (or A,B,C, or repeated)."),
        out: Path = typer.Option(..., "--out", help="Directory for the composed PEFT adapter and compose.json."),
        weights: list[str] = typer.Option([], "--weights", help="One weight per adapter, in order: --weights 0.5 0.3 0.2 (or 0.5,0.3,0.2). Default: 1/n for linear and svd, 1 otherwise."),
        method: str = typer.Option("linear", "--method", help=f"How to combine: {' | '.join(COMPOSE_METHODS)}."),
        lambda_: float = typer.Option(1.0, "--lambda", help="Overall strength λ for task_arithmetic, ties, dare_* and magnitude."),
        density: float = typer.Option(0.5, "--density", help="Share of entries kept by ties, dare_* and magnitude."),
        seed: int = typer.Option(0, "--seed", help="Seed of the DARE drop masks."),
        svd_rank: int | None = typer.Option(None, "--svd-rank", help="Re-compress to this rank (truncated SVD) and report the retained energy."),
        tasks: Path | None = typer.Option(None, "--tasks", help="learned: tasks YAML whose rows are the validation examples."),
        examples: int = typer.Option(16, "--examples", help="learned: number of validation examples."),
        steps: int = typer.Option(60, "--steps", help="learned: Adam steps."),
        l1: float = typer.Option(0.01, "--l1", help="learned: L1 penalty on the weights."),
        per_layer: bool = typer.Option(False, "--per-layer", help="learned: one weight per adapter and layer."),
        average: str = typer.Option("example", "--average", help="learned: the fit's NLL is a mean over examples (example) or over tokens (token)."),
        base: str | None = typer.Option(None, "--base", help="Base model spec, when the adapters name none or disagree."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier composition in --out."),
    ) -> None:
        """Combine adapters into one PEFT adapter (exact linear sum, task arithmetic, TIES, DARE, magnitude, SVD, learned)."""
        from compositor.adapters import AdapterError
        from compositor.pipeline import run_compose
        from schema.compose import ComposeConfig
        from schema.outputs import output_problem

        adapter_list = split_list_option(adapters)
        try:
            weight_list = [float(item) for item in split_list_option(weights)]
        except ValueError as err:
            fail(f"--weights {weights}: {err}; give numbers, e.g. --weights 0.5 0.3 0.2")
        try:
            learn = None
            if method == "learned":
                if tasks is None:
                    fail("--method learned needs --tasks TASKS.yaml (the validation examples to fit the weights on)")
                learn = {"tasks": tasks, "examples": examples, "steps": steps, "l1": l1, "per_layer": per_layer, "average": average}
            config = ComposeConfig(
                name=re.sub(r"[^A-Za-z0-9_.-]", "-", out.name).lstrip("-._") or "composed", adapters=adapter_list, method=method, weights=weight_list or None,
                lambda_=lambda_, density=density, seed=seed, svd_rank=svd_rank, learn=learn,
            )
        except ValidationError as err:
            fail(options_error(err, ComposeConfig, renamed={"name": "out"}))  # the composition is named after --out
        if (problem := output_problem(out, overwrite=overwrite, inputs=tuple(adapter_list))) is not None:
            fail(ConfigError(problem))
        try:
            record = run_compose(config, out, base=base)
        except (AdapterError, ValueError) as err:
            fail(err)
        console = Console()
        console.print(energy_table(record))
        if "learned" in record:
            fit = record["learned"]
            console.print(f"learned weights {[round(w, 4) for w in fit['weights']]}: loss {fit['initial_loss']:.4f} -> {fit['final_loss']:.4f} in {fit['fit_s']:.1f} s")
        console.print(f"wrote {out} (PEFT adapter) and {out / 'compose.json'}")

    @app.command("restore")
    def restore_command(
        adapter: Path = typer.Argument(..., help="PEFT adapter directory (its lorafleet.json says the precision it was trained at; 4-bit NF4 if it has none).", metavar="ADAPTER"),
        base_precision: int = typer.Option(
            ...,
            "--base-precision",
            help="At or above the training precision: 16 (original weights), 8 (int8), 4 (NF4; HQQ 4-bit for an adapter trained with HQQ), "
            "3 (HQQ 3-bit, for an adapter trained at 2 bits), or the training precision itself (its training base).",
        ),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        merge: bool = typer.Option(False, "--merge", help="Write a merged model (AutoModelForCausalLM.from_pretrained loads it); at 16, 8 or NF4, not onto an HQQ base."),
        dtype: str | None = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16; default: the base's own dtype at 16 bits, fp32 compute when quantized."),
        base: str | None = typer.Option(None, "--base", help="Base model spec; default: the adapter's base_model_name_or_path."),
        compare: bool = typer.Option(True, "--compare-merges/--no-compare-merges", help="With --merge: measure how merging into W, into deq(q(W)) and into the quantized training base differ from the trained model."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier restore in --out."),
    ) -> None:
        """Post-LoRA Restoration: apply the adapter to the base at its training precision or any above (16, 8, 4, 3 bits), optionally merged."""
        from compositor.adapters import AdapterError
        from compositor.restore import PRECISIONS, restore
        from schema.outputs import output_problem
        from trainer.specs import ModelSpecError

        if base_precision not in PRECISIONS:
            fail(ConfigError(Problem(f"--base-precision {base_precision} is not one of {', '.join(map(str, PRECISIONS))}", fix="choose one of those")))
        if (problem := output_problem(out, overwrite=overwrite, inputs=(adapter,))) is not None:
            fail(ConfigError(problem))
        try:
            result = restore(adapter, base_precision, out, merge=merge, dtype=dtype, base=base, compare_merges=compare)
        except (AdapterError, ConfigError, ModelSpecError) as err:
            fail(err)
        console = Console()
        report = result.record.get("merge_comparison")
        console.print_json(json.dumps({k: v for k, v in result.record.items() if k != "merge_comparison"}))
        if report is not None:
            table = Table(title=f"merging the adapter: distance from the trained model (adapter on {report['trained_on'].upper()}, unmerged)")
            for column in ("merge", "max |Δlogit|", "mean KL"):
                table.add_column(column)
            for label, row in report["variants"].items():
                table.add_row(label, f"{row['max_abs_logit_diff']:.3g}", f"{row['mean_kl_from_trained']:.3g}")
            console.print(table)
            if "requantization_loss_mean" in report:
                console.print(f"re-quantizing after the merge loses {report['requantization_loss_mean']:.1%} of ‖ΔW‖ on average per layer")
        console.print(f"wrote {out}")

    @app.command("plr")
    def plr_command(
        adapter: Path = typer.Argument(..., help="PEFT adapter directory.", metavar="ADAPTER"),
        tasks: Path = typer.Option(..., "--tasks", help="Tasks YAML: task metrics and the forgetting probe."),
        out: Path | None = typer.Option(None, "--out", help="Write plr.json (everything, the per-layer errors too) into this directory."),
        dtype: str | None = typer.Option(None, "--dtype", help="Dtype of the 16-bit base (default: its own)."),
        base: str | None = typer.Option(None, "--base", help="Base model spec; default: the adapter's base_model_name_or_path."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier plr.json in --out."),
    ) -> None:
        """Evaluate the adapter on its training base and every higher precision side by side (4-bit NF4: 4, 8, 16; 2-bit HQQ: 2, 3, 4, 8, 16), with the quantization error per bit width."""
        from compositor.adapters import AdapterError
        from compositor.pipeline import plr_report
        from compositor.restore import DTYPES
        from schema.outputs import output_problem
        from trainer.specs import ModelSpecError

        if dtype is not None and dtype not in DTYPES:  # checked here: the report loads the tokenizer before it reads --dtype
            fail(ConfigError(Problem(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", fix="choose one of those")))
        if out is not None and (problem := output_problem(out, overwrite=overwrite, inputs=(adapter,))) is not None:
            fail(ConfigError(problem))
        try:
            report = plr_report(adapter, tasks, dtype=dtype, base=base)
        except (AdapterError, ConfigError, ModelSpecError) as err:
            fail(err)
        console = Console()
        names = sorted({k for col in report["columns"].values() for k in col["adapter"]}, key=lambda c: (c.startswith("eval/forgetting/"), c))
        table = Table(title=f"PLR: {adapter} on {report['base_model']}")
        table.add_column("metric")
        for label in report["columns"]:
            column = report["columns"][label]
            table.add_column(f"{label} {column['base_quant']} ({column['dtype']})", justify="right")
        for name in names:
            table.add_row(name.removeprefix("eval/"), *(f"{col['adapter'].get(name, float('nan')):.4g}" for col in report["columns"].values()))
        console.print(table)
        console.print(error_summary_table(report["quantization_error_summary"], len(report["quantization_error"])))
        if out is not None:
            from schema.atomic import atomic_directory, json_text

            atomic_directory(out, lambda staging: (staging / "plr.json").write_text(json_text(report, indent=2)))
            console.print(f"wrote {out / 'plr.json'} (with the error of each of the {len(report['quantization_error'])} layers)")
