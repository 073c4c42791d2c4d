"""Streamed (`IterableDataset`) splits: filters that keep their rows Arrow, and each process's part in whole shards.

A `filter` on Python rows hands the rows on as Python lists, which `with_format("numpy")` then converts value by
value: a MIMIC-IV-ECG record took 40x longer to read, and its signal came back float64. `filter_stream` filters the
Arrow batches instead, where the stream still has them.

`split_dataset_by_node` gives each process whole shards only when their count is a multiple of the number of
processes; otherwise every process reads every shard and keeps one example in `world_size`. MIMIC-IV-ECG converts to
801 files, which no GPU count of 2, 4 or 8 divides, so each of 8 processes would read all 190 GB of it every epoch.
`stream_part` cuts a stream into its Parquet row groups first where its files are too few or do not divide evenly,
and gives each process whole shards.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

logger = logging.getLogger(__name__)


def filter_stream(part: IterableDataset, keep, with_indices: bool = False, transform=None) -> IterableDataset:
    """`part` with the rows for which `keep(batch)` (or `keep(batch, indices)`) is true, `part`'s format kept; `keep`
    reads a column as a list with `column_values(batch, name)`. `transform(batch)`, if given, then changes the kept
    rows' values (not their columns or types) and returns the batch in its form, an Arrow table or a dict of lists. The batches are Arrow tables where the stream still has
    them, so the rows after the filter stay Arrow; this is a `map` that returns fewer rows, since two Arrow `filter`s
    in a row fail in datasets 5.2 (their mask columns clash). After a Python step (a `filter` or `map` on rows) the
    rows are Python: an Arrow batch of them takes its types from their values (an empty label list as `list<null>`)
    and cannot be joined to the next one, so they are filtered as Python batches. `keep` and `transform` must be
    picklable (module-level functions or classes, `functools.partial` of them), as DataLoader workers started with
    `spawn` receive the stream pickled."""
    if part._ex_iterable.iter_arrow is None:
        kept_rows = part.filter(keep, with_indices=with_indices, batched=True)
        return kept_rows if transform is None else kept_rows.map(transform, batched=True, features=part.features)
    format_type = part._formatting.format_type if part._formatting is not None else None
    arrow = part.with_format("arrow")
    kept = KeptArrowRows(keep, transform)
    return arrow.map(kept, with_indices=with_indices, batched=True, features=part.features).with_format(format_type)


@dataclass(frozen=True)
class KeptArrowRows:
    """The function `filter_stream` maps over Arrow batches: the rows `keep` keeps, then `transform`d. A module-level
    class, not a closure, like every function a stream holds (`keep` and `transform` too): a DataLoader worker started
    with `spawn` (macOS and Windows' default) gets the stream pickled, and a local function cannot be."""

    keep: Callable
    transform: Callable | None = None

    def __call__(self, table: pa.Table, *indices) -> pa.Table:
        table = table.filter(pa.array(self.keep(table, *indices), type=pa.bool_()))
        return table if self.transform is None else self.transform(table)


def every_nth_row(batch, indices: list[int], rank: int, world_size: int) -> list[bool]:
    """`keep` of `stream_part`'s fallback: the rows whose index is `rank` modulo `world_size`."""
    return [index % world_size == rank for index in indices]


def column_values(batch, name: str) -> list:
    """Column `name` of a batch `filter_stream` hands to `keep` (an Arrow table or a dict of lists) as a list."""
    values = batch[name]
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def finer_shards(stream: IterableDataset, wanted: int) -> IterableDataset:
    """`stream` cut into one shard per Parquet row group (`IterableDataset.reshard`) when it has fewer than `wanted`
    shards or a count that `wanted` does not divide, and when that gives more shards; else `stream` itself. Must come
    before any `shuffle` (a shuffled stream's shard order is drawn from its shard count)."""
    if stream.num_shards >= wanted and stream.num_shards % wanted == 0:
        return stream
    finer = stream.reshard()
    return finer if finer.num_shards > stream.num_shards else stream


def stream_part(stream: IterableDataset, rank: int, world_size: int, shards_per_process: int = 1) -> IterableDataset:
    """Process `rank`'s part of `stream` among `world_size` processes, in whole shards, none read by two processes.

    The shards are first made finer where needed (`finer_shards`, to at least `world_size * shards_per_process`: give
    `shards_per_process` = DataLoader workers, since each worker reads whole shards). Each process then reads its
    own shards (`split_dataset_by_node(strategy="shards")`: after a seeded `shuffle`, the shards are dealt again each
    epoch, the same way on every process). Each process gets as many shards as the others, or one fewer: in the
    converters' files a row group of 100 records, all full but a split's last. Only a stream with fewer shards than processes even then (a single in-memory table, a file of
    one row group) falls back to one example in `world_size`, kept here so that the `map`s added later run on the kept
    examples only; every process then reads the whole stream, which is logged."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank and world_size go together, with 0 <= rank < world_size; got {rank}, {world_size}")
    stream = finer_shards(stream, world_size * max(1, shards_per_process))
    if world_size == 1:
        return stream
    if stream.num_shards >= world_size:
        return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="shards")
    logger.warning(
        "a stream of %d shard(s) for %d processes: each process reads all of it and keeps one record in %d "
        "(convert it with more, smaller shards to give each process its own)",
        stream.num_shards,
        world_size,
        world_size,
    )
    return filter_stream(stream, functools.partial(every_nth_row, rank=rank, world_size=world_size), True)


__all__ = ["KeptArrowRows", "column_values", "every_nth_row", "filter_stream", "finer_shards", "stream_part"]
