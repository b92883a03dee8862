"""Templates and tokenisation: a row becomes token ids plus a label mask (1 on response tokens).

Every example is a list of text segments, each labelled or not. Segments are tokenised separately
(prompt, then response), which is also how generation sees them: the prompt is encoded alone and
the model continues it. The response ends with the EOS token, labelled, so the model learns to stop.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from schema.data import NAMED_TEMPLATES, PLACEHOLDER, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import Example, RowChunk, parse_example
from data_pipeline.splits import ContentSplitter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Segments = list[tuple[str, bool]]  # (text, labelled)


def resolve_template(template: str, tokenizer: PreTrainedTokenizerBase, source_format: str) -> str:
    """'auto' becomes 'chat' when the tokenizer has a chat template, else 'none'; names become their text."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "none"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'chat' needs a tokenizer with a chat template, and this one has none; set data.template: none or a prompt template")
    if source_format == "chat" and template != "chat":
        raise DataError(f"format 'chat' needs the chat template (data.template: chat or auto), not {template!r}")
    return NAMED_TEMPLATES.get(template, template)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about the tokenizer that changes token ids: vocabulary, merges, specials, chat template."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id, getattr(tokenizer, "chat_template", None))).encode())
    return digest.hexdigest()


@dataclass
class EncodeCounts:
    """What happened to a source's rows on the way into the cache."""

    rows: int = 0
    kept: int = 0
    tokens: int = 0
    dropped_empty: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    split_out: int = 0
    examples: dict[str, list[str]] = field(default_factory=lambda: {"empty": [], "overlong": []})

    def add(self, other: EncodeCounts) -> None:
        for name in ("rows", "kept", "tokens", "dropped_empty", "dropped_overlong", "truncated", "split_out"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, places in other.examples.items():
            self.examples[kind] = (self.examples[kind] + places)[:3]

    @property
    def affected(self) -> int:
        return self.dropped_empty + self.dropped_overlong + self.truncated


@dataclass
class EncodedChunk:
    """Token ids of the kept rows, flat, with offsets; the label mask is aligned with the ids."""

    source_rows: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int32 [n + 1]
    input_ids: np.ndarray  # int32 [offsets[-1]]
    label_mask: np.ndarray  # int8 [offsets[-1]]
    counts: EncodeCounts


class Encoder:
    """Turns chunks of rows of one source into token ids with label masks, tokenising a chunk in one call."""

    def __init__(
        self,
        source: SourceConfig,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        seq_len: int,
        overlong: str,
        splitter: ContentSplitter | None = None,
    ):
        self.source = source
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer, source.format)
        self.seq_len = seq_len
        self.overlong = overlong
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; responses must end with one so the model learns to stop")
        self.eos_id = int(tokenizer.eos_token_id)
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast (Rust) tokenizer; the pipeline tokenises with one")
        self._backend = tokenizer.backend_tokenizer
        # Special tokens the tokenizer puts before plain text (a BOS, for Llama-style tokenizers).
        self.lead_ids = _leading_special_ids(tokenizer)
        self._chat_frame = _single_turn_frame(tokenizer) if self.template == "chat" else None
        self._splitter = splitter

    def segments(self, example: Example, file: str, place: str) -> Segments:
        if self.source.format == "text":
            return [(example.response, True)]
        if self.template == "chat":
            if example.messages is None and self._chat_frame is not None:
                before, middle = self._chat_frame
                return [(before + example.prompt + middle, False), (example.response, True)]
            messages = example.messages or [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]
            try:
                return _chat_segments(self.tokenizer, messages)
            except DataError as err:
                raise DataError(f"{file}: {place}: {err}") from None
            except Exception as err:  # the template's own checks (e.g. roles must alternate) raise jinja errors
                raise DataError(f"{file}: {place}: the tokenizer's chat template rejects this row ({type(err).__name__}: {err})") from None
        if self.template == "none":
            return [(example.prompt, False), (example.response, True)]
        prompt = fill_template(self.template, example.values, f"{file}: {place}: ")
        return [(prompt, False), (example.response, True)]

    def encode(self, chunk: RowChunk) -> EncodedChunk:
        counts = EncodeCounts(rows=len(chunk.rows))
        kept_rows: list[int] = []
        per_example: list[Segments] = []
        places: list[str] = []
        for row, source_row, place in zip(chunk.rows, chunk.source_rows, chunk.places):
            example = parse_example(self.source, row, chunk.file, place)
            if self._splitter is not None and self._splitter.split_of(example.values) != self.source.split:
                counts.split_out += 1
                continue
            segments = self.segments(example, chunk.file, place)
            if not any(text.strip() for text, labelled in segments if labelled):
                counts.dropped_empty += 1
                counts.examples["empty"] = (counts.examples["empty"] + [f"{chunk.file}: {place}"])[:3]
                continue
            kept_rows.append(source_row)
            per_example.append(segments)
            places.append(place)
        texts = [text for segments in per_example for text, _ in segments]
        # The Rust tokenizer directly: the transformers wrapper spends as long again building Python
        # objects (offsets, attention masks) that the cache does not keep.
        token_lists = [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray] = []
        lengths: list[int] = []
        final_rows: list[int] = []
        cursor = 0
        for source_row, segments, place in zip(kept_rows, per_example, places):
            ids: list[int] = list(self.lead_ids) if self.template != "chat" else []
            mask: list[int] = [0] * len(ids)
            for (_, labelled), tokens in zip(segments, token_lists[cursor : cursor + len(segments)]):
                ids.extend(tokens)
                mask.extend([int(labelled)] * len(tokens))
                if labelled and (not tokens or tokens[-1] != self.eos_id):
                    ids.append(self.eos_id)
                    mask.append(1)
            cursor += len(segments)
            if len(ids) > self.seq_len:
                if self.overlong == "drop" or not any(mask[: self.seq_len]):
                    counts.dropped_overlong += 1
                    counts.examples["overlong"] = (counts.examples["overlong"] + [f"{chunk.file}: {place} ({len(ids)} tokens)"])[:3]
                    continue
                counts.truncated += 1
                ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            mask_parts.append(np.asarray(mask, dtype=np.int8))
            lengths.append(len(ids))
            final_rows.append(source_row)
        counts.kept = len(final_rows)
        counts.tokens = int(sum(lengths))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return EncodedChunk(
            source_rows=np.asarray(final_rows, dtype=np.int64),
            offsets=offsets,
            input_ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
            label_mask=np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.int8),
            counts=counts,
        )


def fill_template(template: str, values: dict[str, Any], where: str = "") -> str:
    """`template` with each {column} replaced by the row's value; a column the row lacks is an error
    (for training and evaluation alike: an empty string would silently change the prompt)."""

    def value_of(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise DataError(
                f"{where}the template names {{{name}}}, which the row lacks; the row has fields {sorted(values)}. "
                "Fix the template or map the field with fields:"
            )
        value = values[name]
        return value if isinstance(value, str) else str(value)

    return PLACEHOLDER.sub(value_of, template)


def render_prompt(tokenizer: PreTrainedTokenizerBase, template: str, prompt: str, fields: dict[str, Any] | None = None) -> str:
    """The exact text the model sees before its answer, as training builds it: the chat frame around one
    user turn, or the tokenizer's leading special tokens (BOS) followed by the prompt, raw or put through
    a named or {column} template. Evaluation, rehearsal generation and `lorafleet generate` all use it."""
    resolved = resolve_template(template, tokenizer, "prompt_completion")
    if resolved == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    if resolved != "none":
        prompt = fill_template(resolved, {**(fields or {}), "prompt": prompt})
    lead = _leading_special_ids(tokenizer)
    return (tokenizer.decode(lead) if lead else "") + prompt


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    with_specials = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    if plain and with_specials[-len(plain) :] == plain:
        return list(with_specials[: len(with_specials) - len(plain)])
    return []


SENTINEL_USER, SENTINEL_ASSISTANT = "\x00USER\x00", "\x00ASSISTANT\x00"


def _single_turn_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """The text around the user message in a one-turn chat, found by rendering the template once with
    sentinels, so each row costs a string concatenation instead of a Jinja render (~50x faster).
    None when the template does something content-dependent (then each row is rendered)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL_USER}], tokenize=False, add_generation_prompt=True)
    if rendered.count(SENTINEL_USER) != 1:
        return None
    before, middle = rendered.split(SENTINEL_USER)
    probe = [{"role": "user", "content": "probe question?"}, {"role": "assistant", "content": "probe answer."}]
    if _chat_segments(tokenizer, probe)[:1] != [(before + "probe question?" + middle, False)]:
        return None
    return before, middle


def _chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Segments:
    """Segments of a conversation: each assistant turn's content and its closing markup up to the first
    EOS-like token are labelled; everything else (system, user turns, headers) is not."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    eos_text = tokenizer.eos_token or ""
    segments: Segments = []
    consumed = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        turn = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        start = len(head)
        if not (full.startswith(head) and full.startswith(turn) and full[start:].startswith(message["content"])):
            raise DataError("the chat template rewrites assistant messages, so their tokens cannot be located for labels; use a prompt template")
        end = len(turn)
        closing = turn[start + len(message["content"]) : end]
        if eos_text and eos_text in closing:
            end = start + len(message["content"]) + closing.index(eos_text) + len(eos_text)
        else:
            end = start + len(message["content"]) + len(closing.rstrip())
        segments.append((full[consumed:start], False))
        segments.append((full[start:end], True))
        consumed = end
    if consumed < len(full) and full[consumed:].strip():
        segments.append((full[consumed:], False))
    return [(text, labelled) for text, labelled in segments if text]
