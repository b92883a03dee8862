"""`lorafleet generate`: try adapters on a prompt, each answer side by side with the base model's.

The base is loaded once (at the adapters' training precision unless --base-precision says otherwise,
restored as `lorafleet restore` would) and every adapter sits on it; the base's own answer is the same
model with its adapters switched off. A prompt is rendered as the adapter was trained (lorafleet.json's
template; the chat template when there is none), through the one renderer training uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launch.console import fail

BASE = "base"


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_command(
        adapters: list[Path] = typer.Argument(..., help="Adapter directories (PEFT), e.g. runs/fleet_demo/arithmetic/adapter.", metavar="ADAPTER..."),
        prompt: str | None = typer.Option(None, "--prompt", help="One prompt.", metavar="TEXT"),
        prompts: Path | None = typer.Option(None, "--prompts", help="A file of prompts: .txt (one per line) or JSONL/JSON/Parquet/CSV rows.", metavar="FILE"),
        prompt_format: str = typer.Option("prompt_completion", "--format", help="Row layout of --prompts (ignored for .txt).", metavar="FORMAT"),
        base_precision: int | None = typer.Option(None, "--base-precision", help="Base precision in bits; default: the adapters' training precision.", metavar="BITS"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Length cap of each answer.", metavar="N"),
        sample: bool = typer.Option(False, "--sample", help="Sample instead of answering greedily."),
        temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Sampling temperature (with --sample).", metavar="T"),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (with --sample).", metavar="S"),
        interactive: bool = typer.Option(False, "--interactive", help="A chat loop: type a message, every model answers; an empty line ends it."),
        base: str | None = typer.Option(None, "--base", help="Base model spec; default: the one the adapters record.", metavar="SPEC"),
    ) -> None:
        """Each adapter's answer to a prompt, side by side with the base model's (adapters off)."""
        from compositor.adapters import AdapterError, read_adapter
        from compositor.restore import PrecisionError, base_spec_of, restoration_quant, resolve_dtype, training_quant
        from data_pipeline.errors import DataError
        from data_pipeline.rows import read_prompts
        from schema.problems import ConfigError, Problem
        from trainer.specs import ModelSpecError

        given = [p for p in (prompt is not None, prompts is not None, interactive) if p]
        if len(given) != 1:
            fail(ConfigError(Problem("give exactly one of --prompt TEXT, --prompts FILE or --interactive", fix="for example --prompt 'What is 12 plus 7?'")))
        try:
            missing = [str(a) for a in adapters if not (a / "adapter_config.json").is_file()]
            if missing:
                raise ConfigError(Problem(f"not PEFT adapter directories (no adapter_config.json): {', '.join(missing)}", fix="give adapter/ directories of jobs"))
            for adapter in adapters:  # a damaged adapter is named before any model loads
                read_adapter(adapter)
            specs = {base_spec_of(a, base) for a in adapters}
            if len(specs) > 1:
                raise ConfigError(Problem(f"the adapters were trained on different base models ({', '.join(sorted(specs))})", fix="generate with each base separately, or pass --base"))
            spec = specs.pop()
            trained = [training_quant(a) for a in adapters]
            precision = base_precision or trained[0].bits
            quant = restoration_quant(trained[0], precision)
            texts = [prompt] if prompt is not None else (read_prompts(prompts, prompt_format) if prompts is not None else [])
        except (AdapterError, ConfigError, DataError, ModelSpecError, PrecisionError) as err:
            fail(err)

        from peft import PeftModel

        from trainer.models import load_base_model, load_tokenizer

        console = Console()
        console.print(f"[dim]loading {escape(spec)} ({precision}-bit) and {len(adapters)} adapter(s)...[/]")
        tokenizer = load_tokenizer(spec)
        model = load_base_model(spec, quant, dtype=resolve_dtype(spec, precision, None))
        names = adapter_names(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="adapter0")
        for index, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"adapter{index}")
        model.eval()
        templates = [trained_template(a) for a in adapters]
        options = {"max_new_tokens": max_new_tokens, "temperature": temperature if sample else 0.0, "seed": seed}
        if interactive:
            chat(console, model, tokenizer, names, templates, options)
            return
        stream = console.is_terminal and len(texts) == 1
        for text in texts:
            answers = answer_all(model, tokenizer, text, names, templates, options, console if stream else None)
            console.print(side_by_side(text, answers))


def adapter_names(adapters: list[Path]) -> list[str]:
    from trainer.evaluation.matrix import adapter_row_names

    return adapter_row_names(adapters)


def trained_template(adapter_dir: Path) -> str:
    """The data.template the adapter was trained with (lorafleet.json), else the tokenizer's chat template."""
    metadata = adapter_dir / "lorafleet.json"
    if metadata.is_file():
        return json.loads(metadata.read_text()).get("template") or "auto"
    return "auto"


def answer_all(
    model, tokenizer, text: str, names: list[str], templates: list[str], options: dict, console: Console | None, histories: dict[str, list] | None = None
) -> dict[str, str]:
    """The base's answer and each adapter's, to one prompt; streamed to `console` when given. With
    `histories` (the chat loop), a chat-template model sees its own earlier turns and they grow."""
    from trainer.evaluation.generation import adapters_off

    answers = {}
    with adapters_off(model):
        answers[BASE] = answer(model, tokenizer, rendered(tokenizer, templates[0], text, histories, BASE), options, console, BASE)
    for index, (name, template) in enumerate(zip(names, templates)):
        model.set_adapter(f"adapter{index}")
        answers[name] = answer(model, tokenizer, rendered(tokenizer, template, text, histories, name), options, console, name)
    for who, reply in answers.items():
        if histories is not None:
            histories.setdefault(who, []).extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}])
    return answers


def rendered(tokenizer, template: str, text: str, histories: dict[str, list] | None, who: str) -> str:
    """The prompt as training rendered it; in the chat loop, a chat template also gets the earlier turns."""
    from data_pipeline.encoding import render_prompt, resolve_template

    history = (histories or {}).get(who)
    if history and resolve_template(template, tokenizer, "prompt_completion") == "chat":
        return tokenizer.apply_chat_template([*history, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return render_prompt(tokenizer, template, text)


def answer(model, tokenizer, rendered: str, options: dict, console: Console | None, who: str) -> str:
    """One answer; on a terminal its tokens are printed as they come."""
    if console is None:
        from trainer.evaluation.generation import generate

        return generate(model, tokenizer, [rendered], max_new_tokens=options["max_new_tokens"], temperature=options["temperature"], seed=options["seed"])[0]
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from trainer.evaluation.generation import model_device

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model_device(model))
    sampling = options["temperature"] > 0
    settings = dict(
        input_ids=ids, max_new_tokens=options["max_new_tokens"], do_sample=sampling, streamer=streamer,
        temperature=options["temperature"] if sampling else None, top_p=None, top_k=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(options["seed"])
    worker = threading.Thread(target=lambda: model.generate(**settings))
    console.print(f"[bold]{escape(who)}:[/] ", end="")
    worker.start()
    parts = []
    for piece in streamer:
        parts.append(piece)
        console.print(escape(piece), end="", highlight=False)
        sys.stdout.flush()
    worker.join()
    console.print()
    return "".join(parts)


def side_by_side(text: str, answers: dict[str, str]) -> Table:
    table = Table(title=f"prompt: {text[:100]}{'...' if len(text) > 100 else ''}", show_lines=True, title_justify="left")
    for name in answers:
        table.add_column(name, overflow="fold", ratio=1)
    table.add_row(*(escape(a.strip()) for a in answers.values()))
    return table


def chat(console: Console, model, tokenizer, names: list[str], templates: list[str], options: dict) -> None:
    """Type a message; every model answers it, in its own conversation (models trained with a chat
    template see their earlier turns). An empty line (or the end of input) ends the loop."""
    console.print("[dim]chat: every model answers each message; an empty line ends it[/]")
    histories: dict[str, list] = {}
    while True:
        try:
            text = console.input("[bold]you:[/] ")
        except EOFError:
            return
        if not text.strip():
            return
        answers = answer_all(model, tokenizer, text, names, templates, options, console if console.is_terminal else None, histories)
        console.print(side_by_side(text, answers))
