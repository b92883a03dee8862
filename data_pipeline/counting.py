"""Rows and tokens of a data source, counted without torch or transformers (for `lorafleet check`).

Tokens are counted as the pipeline encodes them (data_pipeline.encoding): the leading special tokens,
the templated prompt, the response, and the EOS that ends it. The raw `tokenizers` library reads the
model's tokenizer.json, and a chat template is rendered once with Jinja to find the text it puts around
a user turn. A template the quick renderer cannot handle leaves the count without that frame, marked
approximate. Truncation and dropping of overlong rows are not applied: the count is of the data as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.encoding import fill_template
from data_pipeline.sources import iter_chunks, parse_example
from schema.data import NAMED_TEMPLATES, SourceConfig

SENTINEL = "\x00PROMPT\x00"


@dataclass
class SourceCount:
    rows: int
    tokens: int | None  # None when the model's tokenizer is not on disk yet
    exact: bool


def count_source(source: SourceConfig, template: str, tokenizer_dir: Path | None) -> SourceCount:
    from data_pipeline.splits import source_splitter

    counter = _TokenCounter(tokenizer_dir, source.template or template, source.format) if tokenizer_dir is not None else None
    splitter = source_splitter(source) if source.split is not None else None
    rows = tokens = 0
    for chunk in iter_chunks(source):
        for row, place in zip(chunk.rows, chunk.places):
            example = parse_example(source, row, chunk.file, place)
            if splitter is not None and splitter.split_of(example.values) != source.split:
                continue
            rows += 1
            if counter is not None:
                tokens += counter.count(example, f"{chunk.file}: {place}: ")
    if counter is None:
        return SourceCount(rows, None, False)
    return SourceCount(rows, tokens, counter.exact)


class _TokenCounter:
    def __init__(self, tokenizer_dir: Path, template: str, source_format: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config = _read_json(tokenizer_dir / "tokenizer_config.json")
        chat_template = config.get("chat_template") or _read_text(tokenizer_dir / "chat_template.jinja")
        if template == "auto":
            template = "chat" if chat_template else "none"
        self.template = NAMED_TEMPLATES.get(template, template)
        self.text_format = source_format == "text"
        self.exact = True
        self.frame = ("", "")
        self.lead = 0
        if self.template == "chat":
            self.frame = self._chat_frame(chat_template, config)
        else:
            with_specials = self.tokenizer.encode("x").ids
            plain = self.tokenizer.encode("x", add_special_tokens=False).ids
            self.lead = len(with_specials) - len(plain)

    def _chat_frame(self, chat_template: str | None, config: dict) -> tuple[str, str]:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
            rendered = environment.from_string(chat_template or "").render(
                messages=[{"role": "user", "content": SENTINEL}],
                add_generation_prompt=True,
                bos_token=_special(config.get("bos_token")),
                eos_token=_special(config.get("eos_token")),
            )
            before, middle = rendered.split(SENTINEL)
            return before, middle
        except Exception:  # an unusual template: count the rows' own text only
            self.exact = False
            return "", ""

    def count(self, example, where: str) -> int:
        encode = lambda text: len(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0  # noqa: E731
        if self.text_format:
            return encode(example.response) + 1
        if self.template == "chat":
            if example.messages is not None and len(example.messages) > 2:
                self.exact = False  # multi-turn rows: each turn has its own frame
                return sum(encode(m["content"]) for m in example.messages) + 1
            before, middle = self.frame
            return encode(before + example.prompt + middle) + encode(example.response) + 1
        prompt = example.prompt if self.template == "none" else fill_template(self.template, example.values, where)
        return self.lead + encode(prompt) + encode(example.response) + 1


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _special(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")
