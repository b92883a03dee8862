"""The model side of evaluation: batched generation, response scoring, and the modes they run in."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList, PreTrainedTokenizerBase, TemperatureLogitsWarper, TopPLogitsWarper


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


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model's view: peft's disable_adapter() on a PEFT model, nothing on a bare model.

    peft re-enables only its active adapter's gradients afterwards; every parameter's requires_grad is
    put back as it was, so the other adapters of a pack keep training."""
    disable = getattr(model, "disable_adapter", None)
    if not (callable(disable) and hasattr(model, "peft_config")):
        yield
        return
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        with disable():
            yield
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5.x renamed the forward's past_key_values to cache (the old name goes in 5.40)."""
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    return "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"


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
    warpers = LogitsProcessorList()
    if temperature > 0:
        warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
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
            new_tokens = _decode(model, tokenizer, input_ids.to(device), attention.to(device), max_new_tokens, stop, warpers)
            for i, tokens in zip(chunk, new_tokens):
                answers[i] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    return answers


def _decode(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    max_new_tokens: int,
    stop: Sequence[str],
    warpers: LogitsProcessorList,
) -> list[list[int]]:
    """The new tokens of each left-padded row, decoded with a KV cache; a row leaves the batch as soon as
    it ends (EOS or a stop string), so a batch costs the sum of its answers' lengths. HF's generate runs
    every row until the last one ends: on 64 GSM8K answers of SmolLM2-135M with a GSM8K adapter (256 new
    tokens, mean 180, 31 at the limit; 2-core CPU) it took 104 s, this 84 s, with the same 64 answers.
    Greedy when `warpers` is empty, else sampled from the warped distribution."""
    cache = DynamicCache()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's first real token is position 0
    live = list(range(len(input_ids)))  # the batch rows still decoding, in cache order
    new_tokens: list[list[int]] = [[] for _ in live]
    # logits_to_keep=1: the prompt's other positions would cost batch x width x vocab floats (~2 GB at 64 x 150 x 49k).
    forward = functools.partial(model, **{_cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
    logits = forward(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits[:, -1]
    for step in range(max_new_tokens):
        scores = warpers(input_ids, logits.float())
        picked = torch.multinomial(scores.softmax(-1), 1).squeeze(1) if warpers else scores.argmax(-1)
        keep = []
        for slot, (row, token) in enumerate(zip(live, picked.tolist())):
            if token == tokenizer.eos_token_id:
                continue
            new_tokens[row].append(token)
            if not (stop and any(s in tokenizer.decode(new_tokens[row], skip_special_tokens=True) for s in stop)):
                keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            live, picked, attention, positions = [live[k] for k in keep], picked[index], attention[index], positions[index]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        input_ids = picked.unsqueeze(1)  # temperature and top-p do not read the history, only the scores
        logits = forward(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits[:, -1]
    return new_tokens


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
    reference_model: torch.nn.Module | None = None,
) -> ResponseScores:
    """NLL of each response given its (rendered) prompt; with_base_kl also sums the per-token
    KL(p_base || p_model), the base logits coming from `reference_model` when given (another model with
    the same tokenizer on the same device, e.g. the unquantized base beside a quantized one), else from
    the same model with its adapters off."""
    device = model_device(model)
    pairs = []
    for prompt, response in zip(prompts, responses):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, response_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, counts, kl = [], [], []
    with eval_mode(model), eval_mode(reference_model) if reference_model is not None else contextlib.nullcontext():
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
                base_logits = _base_logits(model, reference_model, input_ids, attention)
                base_log_probs = torch.log_softmax(base_logits[target_mask], dim=-1)
                token_kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1)
                kl.extend(part.sum().item() for part in torch.split(token_kl, per_row))
    return ResponseScores(nll=nll, tokens=counts, kl=kl if with_base_kl else None)


def _base_logits(model: torch.nn.Module, reference_model: torch.nn.Module | None, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """What the KL compares with: `reference_model`'s logits, or the model's own with its adapters off."""
    if reference_model is not None:
        return reference_model(input_ids=input_ids, attention_mask=attention).logits.float()
    with adapters_off(model):
        return model(input_ids=input_ids, attention_mask=attention).logits.float()
