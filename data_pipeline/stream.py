"""The training stream: sharded, shuffled, mixed, packed batches that resume exactly.

Schedule. Batches come in windows of `mix.window` batches. Within a window, each next example is
taken from the source furthest below its share (largest deficit first, counting tokens or
examples), with the counters reset at every window start. That keeps every source within one
example of its share at every point of the window, so the ratio holds per window, not on average.

Order. Source s in epoch e is read in the order np.random.default_rng([seed, s, e]).permutation(n),
and rank r reads positions r, r + world_size, ... of it: the ranks' shards are disjoint and
together cover the source every epoch. A source that runs out starts its next epoch (cycles).

Resume. The state is the position at the start of the current window (per-source epoch and offset,
plus the example carried over a row boundary) and the number of batches already taken from the
window. Loading it rebuilds the window from that position and skips those batches: the same
examples come out, in the same order, as in an uninterrupted run. All ranks take the same number of
batches, so a rank given another rank's state (trainers save rank 0's) replays its own schedule up
to the same window instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.cache import TokenCache
from schema.data import DataConfig
from data_pipeline.errors import DataError

STATE_FORMAT = 1
IGNORE_INDEX = -100


@dataclass
class _Window:
    batches: list[dict[str, torch.Tensor]]
    example_ids: list[list[tuple[int, int]]]  # per batch: (source index, source row) of each example
    rehearsal_ratio: float  # of the tokens (or examples) in the window, the rehearsal sources' share
    padding_frac: float


class TrainStream:
    """Infinite iterator of training batches (dicts of tensors) with state_dict()/load_state_dict()."""

    def __init__(
        self,
        data: DataConfig,
        caches: list[TokenCache],
        *,
        seq_len: int,
        micro_batch: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        for source, cache in zip(data.train, caches):
            if len(cache) < world_size:
                raise DataError(f"{source.path}: {len(cache)} examples cannot give each of {world_size} ranks a shard")
        self.data = data
        self.caches = caches
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        total = sum(s.weight for s in data.train)
        self.shares = np.array([s.weight / total for s in data.train])
        self.rehearsal = np.array([s.role == "rehearsal" for s in data.train])
        self.by_tokens = data.mix.by == "tokens"
        self.window_size = data.mix.window
        self._shards: dict[int, tuple[int, np.ndarray]] = {}
        # Position at the start of the current window, and how far into it we are.
        self._cursors = [[0, 0] for _ in caches]
        self._carry: tuple[int, int] | None = None
        self._window_index = 0
        self._batch_in_window = 0
        self._window: _Window | None = None
        self._last_window: _Window | None = None  # the window finished most recently, for stats()
        self._next_cursors: list[list[int]] = []
        self._next_carry: tuple[int, int] | None = None
        self.last_example_ids: list[tuple[int, int]] = []  # (source index, source row) of the latest batch's examples

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._window is None:
            self._window = self._build_window()
        batch = self._window.batches[self._batch_in_window]
        self.last_example_ids = self._window.example_ids[self._batch_in_window]
        self._batch_in_window += 1
        if self._batch_in_window == self.window_size:
            self._cursors, self._carry = self._next_cursors, self._next_carry
            self._window_index += 1
            self._batch_in_window = 0
            self._last_window, self._window = self._window, None
        return batch

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "sources": [c.directory.name for c in self.caches],
            "window_index": self._window_index,
            "batch_in_window": self._batch_in_window,
            "cursors": [list(c) for c in self._cursors],
            "carry": list(self._carry) if self._carry else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"data state has format {state.get('format')!r}, this pipeline reads format {STATE_FORMAT}")
        if state["world_size"] != self.world_size:
            raise DataError(
                f"the checkpoint's data position was saved with world size {state['world_size']}, and this run has "
                f"{self.world_size}: the shards would not line up. Resume with {state['world_size']} workers, or start a new output_dir"
            )
        if state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data position is for seed {state['seed']}, this run has train.seed {self.seed}")
        names = [c.directory.name for c in self.caches]
        if state["sources"] != names:
            raise DataError(
                "the checkpoint's data position belongs to other data (sources, tokenizer, template or seq_len changed); "
                "restore the data config of that run, or start a new output_dir"
            )
        if state["rank"] == self.rank:
            self._cursors = [list(c) for c in state["cursors"]]
            self._carry = tuple(state["carry"]) if state["carry"] else None
        else:
            # Another rank's state (the trainer saves rank 0's): every rank is at the same window, so
            # replay this rank's schedule up to it. Costs a few microseconds per example, no tensors.
            self._cursors, self._carry = [[0, 0] for _ in self.caches], None
            for index in range(state["window_index"]):
                _, self._cursors, self._carry = self._schedule(self._cursors, self._carry, index)
        self._window_index = state["window_index"]
        self._window = self._last_window = None
        skip = state["batch_in_window"]
        self._batch_in_window = 0
        if skip:
            self._window = self._build_window()
            self._batch_in_window = skip

    def stats(self) -> dict[str, float]:
        """Metrics of the window the latest batch came from: padding waste, the epochs finished (the trainer
        logs it when it changes), and only where they apply, since a constant zero charts as a flat line:
        the achieved rehearsal ratio when there are rehearsal sources, the share of rows dropped when any were."""
        window = self._window if self._window is not None and self._batch_in_window else self._last_window
        if window is None:  # nothing taken yet: the window the first batch will come from
            window = self._window = self._build_window()
        stats = {
            "data/padding_frac": window.padding_frac,
            "data/epoch": float(self._cursors[0][0]),  # epochs of the first source finished at the window start
        }
        if self.rehearsal.any():
            stats["data/rehearsal_ratio"] = window.rehearsal_ratio
        dropped = max((c["dropped_empty"] + c["dropped_overlong"]) / max(1, c["rows"] - c["split_out"]) for c in (k.counts for k in self.caches))
        if dropped:
            stats["data/dropped_frac"] = dropped  # the worst source's share of rows dropped (empty or overlong)
        return stats

    # -- schedule ----------------------------------------------------------------------------------
    def _shard(self, source: int, epoch: int) -> np.ndarray:
        cached = self._shards.get(source)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, source, epoch]).permutation(len(self.caches[source]))
            cached = (epoch, order[self.rank :: self.world_size])
            self._shards[source] = cached
        return cached[1]

    def _take(self, cursors: list[list[int]], source: int) -> int:
        epoch, offset = cursors[source]
        shard = self._shard(source, epoch)
        if offset == len(shard):
            epoch, offset = epoch + 1, 0
            shard = self._shard(source, epoch)
        cursors[source] = [epoch, offset + 1]
        return int(shard[offset])

    def _pick(self, placed: np.ndarray) -> int:
        deficit = self.shares * placed.sum() - placed
        return int(np.argmax(deficit))

    def _build_window(self) -> _Window:
        batches_rows, self._next_cursors, self._next_carry = self._schedule(self._cursors, self._carry, self._window_index)
        return self._assemble(batches_rows)

    def _schedule(
        self, start_cursors: list[list[int]], carry: tuple[int, int] | None, window_index: int
    ) -> tuple[list[list[list[tuple[int, int]]]], list[list[int]], tuple[int, int] | None]:
        """Which examples go where in one window: per batch, per row, (source, example index); and the
        position after the window. Pure: it reads and changes nothing of the stream but the shard cache."""
        cursors = [list(c) for c in start_cursors]
        placed = np.zeros(len(self.caches))  # tokens or examples of each source in this window
        rows: list[list[tuple[int, int]]] = []

        def next_example() -> tuple[int, int]:
            source = self._pick(placed)
            return source, self._take(cursors, source)

        def account(item: tuple[int, int]) -> None:
            placed[item[0]] += self.caches[item[0]].lengths[item[1]] if self.by_tokens else 1

        count = self.window_size * self.micro_batch
        if self.data.packing == "packed":
            # First fit over all rows of the window: an example goes into the first row with room for
            # it, a new row opens when none has room, and the window closes at the first example that
            # fits nowhere once all its rows are open; that example is carried into the next window.
            free: list[int] = []
            while True:
                item, carry = (carry, None) if carry else (next_example(), None)
                length = int(self.caches[item[0]].lengths[item[1]])
                target = next((r for r, room in enumerate(free) if room >= length), None)
                if target is None:
                    if len(rows) == count:
                        carry = item
                        break
                    rows.append([])
                    free.append(self.seq_len)
                    target = len(rows) - 1
                rows[target].append(item)
                free[target] -= length
                account(item)
            return [rows[i : i + self.micro_batch] for i in range(0, count, self.micro_batch)], cursors, carry
        items = []
        for _ in range(count):
            item = next_example()
            account(item)
            items.append(item)
        # Length grouping: sorted by length, cut into batches, batches in a seeded order.
        items.sort(key=lambda it: int(self.caches[it[0]].lengths[it[1]]))
        grouped = [[[it] for it in items[i : i + self.micro_batch]] for i in range(0, count, self.micro_batch)]
        order = np.random.default_rng([self.seed, self.rank, window_index, 1]).permutation(len(grouped))
        return [grouped[i] for i in order], cursors, carry

    def _assemble(self, batches_rows: list[list[list[tuple[int, int]]]]) -> _Window:
        batches, ids = [], []
        counted = np.zeros(len(self.caches))  # tokens or examples of each source, as the mix counts them
        real = padded = 0
        for rows in batches_rows:
            batch = pack_rows(rows, self.caches, self.rehearsal, self.seq_len, self.pad_id, self.data.packing == "padded")
            batches.append(batch)
            ids.append([(s, int(self.caches[s].source_rows[i])) for row in rows for s, i in row])
            for row in rows:
                for s, i in row:
                    length = int(self.caches[s].lengths[i])
                    counted[s] += length if self.by_tokens else 1
                    real += length
            padded += batch["input_ids"].numel()
        return _Window(
            batches=batches,
            example_ids=ids,
            rehearsal_ratio=float(counted[self.rehearsal].sum() / max(1, counted.sum())),
            padding_frac=1.0 - real / max(1, padded),
        )


def pack_rows(
    rows: list[list[tuple[int, int]]], caches: list[TokenCache], rehearsal: Sequence[bool], seq_len: int, pad_id: int, padded: bool
) -> dict[str, torch.Tensor]:
    """One batch. Packed: each row holds its examples back to back, position ids restart at 0 for
    each, and the tail is padding (its own position run, label -100). Padded: one example per row,
    right-padded to the longest row of the batch (rounded up to a multiple of 8)."""
    if padded:
        longest = max(sum(int(caches[s].lengths[i]) for s, i in row) for row in rows)
        width = min(seq_len, int(math.ceil(longest / 8) * 8))
    else:
        width = seq_len
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    rehearsal_mask = np.zeros((len(rows), width), dtype=bool)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for s, i in row:
            stored, mask = caches[s].example(i)
            ids = stored.astype(np.int64)  # uint16 in the cache; -100 below must not wrap around
            end = at + len(ids)
            input_ids[r, at:end] = ids
            labels[r, at:end] = np.where(mask.astype(bool), ids, IGNORE_INDEX)
            # An example's first token has no context of its own; labelling it would train the previous
            # example's last token to predict it across the packing boundary.
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at:end] = np.arange(len(ids))
            rehearsal_mask[r, at:end] = rehearsal[s]
            attention_mask[r, at:end] = 1
            at = end
        position_ids[r, at:] = np.arange(width - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "rehearsal_mask": torch.from_numpy(rehearsal_mask),
        # 1 on real tokens in both modes (the trainer counts tokens with it). A packed batch must reach the
        # model without it: transformers derives block-diagonal masks from position ids only when it is absent.
        "attention_mask": torch.from_numpy(attention_mask),
    }
