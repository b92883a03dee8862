"""The training stream: ratio per window, disjoint covering shards, reshuffled epochs, exact resume,
padded mode, and packing that changes no logits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import write_jsonl
from tiny import make_tokenizer

from data_pipeline import DataError, build_train_stream
from schema.data import DataConfig

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def varied_rows(n: int, seed: int, word: str) -> list[dict]:
    """Rows of uneven length (the ratio must hold with examples of different sizes)."""
    rng = random.Random(seed)
    return [
        {"prompt": f"{word} {' '.join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 8)))}", "completion": f" {i}"}
        for i in range(n)
    ]


@pytest.fixture
def two_sources(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", varied_rows(53, seed=1, word="sum"))
    general = write_jsonl(tmp_path / "general.jsonl", varied_rows(19, seed=2, word="reverse"))
    return task, general


def mixed_config(task, general, by="tokens", window=4, packing="packed", rehearsal_weight=0.3) -> DataConfig:
    return DataConfig(
        train=[
            {"path": str(task), "weight": 1 - rehearsal_weight},
            {"path": str(general), "weight": rehearsal_weight, "role": "rehearsal"},
        ],
        mix={"by": by, "window": window},
        packing=packing,
        template="none",
    )


@pytest.mark.parametrize("by", ["tokens", "examples"])
def test_ratio_holds_within_one_example_in_every_window(two_sources, tokenizer, by):
    window, micro_batch = 4, 2
    stream = build_train_stream(mixed_config(*two_sources, by=by, window=window), tokenizer, seq_len=SEQ_LEN, micro_batch=micro_batch, seed=3)
    longest = max(int(c.lengths.max()) for c in stream.caches)
    worst = 0.0
    for _ in range(40):  # 40 windows, the small source cycles ~10 times
        rehearsal = total = 0
        for _ in range(window):
            batch = next(stream)
            real = batch["attention_mask"].bool()
            if by == "tokens":
                rehearsal += int(batch["rehearsal_mask"].sum())
                total += int(real.sum())
            else:
                ids = stream.last_example_ids
                rehearsal += sum(1 for source, _ in ids if source == 1)
                total += len(ids)
        unit = longest if by == "tokens" else 1
        error = abs(rehearsal - 0.3 * total) / unit
        worst = max(worst, error)
        assert error <= 1.0, f"window off by {error:.2f} examples"
        assert stream.stats()["data/rehearsal_ratio"] == pytest.approx(rehearsal / total)
    assert worst > 0  # the check is not vacuous: windows do deviate, within the bound


def test_rehearsal_mask_marks_exactly_the_rehearsal_examples(two_sources, tokenizer):
    stream = build_train_stream(mixed_config(*two_sources), tokenizer, seq_len=SEQ_LEN, micro_batch=2, seed=0)
    batch = next(stream)
    expected = sum(example_length(stream, s, row) for s, row in stream.last_example_ids if s == 1)
    assert int(batch["rehearsal_mask"].sum()) == expected > 0


def example_length(stream, source: int, row: int) -> int:
    cache = stream.caches[source]
    return int(cache.lengths[np.searchsorted(cache.source_rows, row)])


def drain_ids(stream, batches: int) -> list[tuple[int, int]]:
    ids = []
    for _ in range(batches):
        next(stream)
        ids.extend(stream.last_example_ids)
    return ids


def test_shards_are_disjoint_cover_the_source_and_reshuffle_each_epoch(tmp_path, tokenizer):
    rows = varied_rows(50, seed=4, word="sum")
    # One example per batch (padded, micro_batch 1, window 1): batches come out in the order examples are taken.
    config = DataConfig(train={"path": str(write_jsonl(tmp_path / "t.jsonl", rows))}, template="none", mix={"window": 1}, packing="padded")
    world = 3
    shard_sizes = [17, 17, 16]  # 50 rows over 3 ranks
    epochs = {}
    for rank in range(world):
        stream = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=1, seed=7, rank=rank, world_size=world)
        ids = [row for _, row in drain_ids(stream, 34)]
        epochs[rank] = (ids[: shard_sizes[rank]], ids[shard_sizes[rank] : 2 * shard_sizes[rank]])
    first = [set(epochs[r][0]) for r in range(world)]
    assert all(len(first[r]) == shard_sizes[r] for r in range(world))  # no repeats inside an epoch
    assert not (first[0] & first[1] or first[0] & first[2] or first[1] & first[2])  # disjoint
    assert set().union(*first) == set(range(50))  # covering
    second = [set(epochs[r][1]) for r in range(world)]
    assert set().union(*second) == set(range(50))
    assert any(epochs[r][0] != epochs[r][1] for r in range(world))  # reshuffled
    # Deterministic from the seed; another seed gives another order.
    again = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=1, seed=7, rank=0, world_size=world)
    assert [row for _, row in drain_ids(again, 17)] == epochs[0][0]
    other = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=1, seed=8, rank=0, world_size=world)
    assert [row for _, row in drain_ids(other, 17)] != epochs[0][0]


def test_packing_loses_and_repeats_no_example(tmp_path, tokenizer):
    rows = varied_rows(53, seed=6, word="sum")
    config = DataConfig(train={"path": str(write_jsonl(tmp_path / "t.jsonl", rows))}, template="none", mix={"window": 3})
    stream = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=2, seed=1)
    counts = np.bincount([row for _, row in drain_ids(stream, 90)], minlength=53)
    # Epochs are permutations and only one example waits between windows, so every example has been
    # seen floor(T/53) or ceil(T/53) times, give or take the one in waiting.
    assert counts.min() >= 3 and counts.max() - counts.min() <= 2, counts


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_resume_mid_epoch_yields_the_uninterrupted_tail(two_sources, tokenizer, packing):
    config = mixed_config(*two_sources, window=3, packing=packing)
    kwargs = dict(seq_len=SEQ_LEN, micro_batch=3, seed=11)
    straight = build_train_stream(config, tokenizer, **kwargs)
    expected = [(next(straight), list(straight.last_example_ids)) for _ in range(31)]
    # 53 task rows do not divide into batches of 3, and 13 stops mid-window (window 3).
    interrupted = build_train_stream(config, tokenizer, **kwargs)
    for _ in range(13):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = build_train_stream(config, tokenizer, **kwargs)
    resumed.load_state_dict(state)
    for batch_expected, ids_expected in expected[13:]:
        batch = next(resumed)
        assert resumed.last_example_ids == ids_expected
        for key in batch_expected:
            assert torch.equal(batch[key], batch_expected[key]), key
    assert resumed.state_dict()["cursors"][0][0] >= 1  # the tail crossed an epoch boundary


def test_a_rank_resumes_from_rank_zeros_state(two_sources, tokenizer):
    """Trainers save rank 0's data state only; rank 1 must still continue exactly where it was."""
    config = mixed_config(*two_sources, window=3)
    kwargs = dict(seq_len=SEQ_LEN, micro_batch=2, seed=5, world_size=2)
    straight = build_train_stream(config, tokenizer, rank=1, **kwargs)
    expected = [(next(straight), list(straight.last_example_ids)) for _ in range(40)][20:]
    rank0 = build_train_stream(config, tokenizer, rank=0, **kwargs)
    for _ in range(20):
        next(rank0)
    resumed = build_train_stream(config, tokenizer, rank=1, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(rank0.state_dict())))
    for batch_expected, ids_expected in expected:
        batch = next(resumed)
        assert resumed.last_example_ids == ids_expected
        assert torch.equal(batch["input_ids"], batch_expected["input_ids"])


def test_resume_with_another_world_size_fails_clearly(two_sources, tokenizer):
    config = mixed_config(*two_sources)
    saved = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=2, seed=0, rank=0, world_size=2)
    next(saved)
    other = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="world size 2.*this run has 1"):
        other.load_state_dict(saved.state_dict())


def test_padded_mode_groups_lengths_and_masks_padding(two_sources, tokenizer):
    stream = build_train_stream(mixed_config(*two_sources, packing="padded", window=4), tokenizer, seq_len=SEQ_LEN, micro_batch=4, seed=0)
    widths, spreads = [], []
    for _ in range(8):
        batch = next(stream)
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(np.ceil(lengths.max().item() / 8) * 8)
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        widths.append(batch["input_ids"].shape[1])
        spreads.append(int(lengths.max() - lengths.min()))
    assert len(set(widths)) > 1  # batches of short examples are narrower
    all_lengths = np.concatenate([c.lengths for c in stream.caches])
    assert np.mean(spreads) < all_lengths.max() - all_lengths.min()  # grouped: less spread than random


def test_padding_frac_counts_the_pad_tokens(two_sources, tokenizer):
    stream = build_train_stream(mixed_config(*two_sources, window=2), tokenizer, seq_len=SEQ_LEN, micro_batch=2, seed=0)
    total = real = 0
    for _ in range(2):
        batch = next(stream)
        total += batch["input_ids"].numel()
        real += sum(example_length(stream, s, row) for s, row in stream.last_example_ids)
    assert stream.stats()["data/padding_frac"] == pytest.approx(1 - real / total)
    assert 0 < stream.stats()["data/padding_frac"] < 0.5


def test_packed_logits_equal_unpacked_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = varied_rows(12, seed=5, word="sum")
    config = DataConfig(train={"path": str(write_jsonl(tmp_path / "t.jsonl", rows))}, template="none")
    stream = build_train_stream(config, tokenizer, seq_len=SEQ_LEN, micro_batch=1, seed=0)
    batch = next(stream)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # at least two examples and the padding run
    with torch.no_grad():
        # use_cache=False as in training: transformers derives block-diagonal masks from position ids only without a cache.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for start, end in zip(starts[:-1], starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=0)
        # Without position ids the same row attends across examples, and the logits move: the check has teeth.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert (leaky[starts[1] : starts[2]] - packed[starts[1] : starts[2]]).abs().max() > 1e-3
