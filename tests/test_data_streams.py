"""Each process's part of a stream (`stream_part`): whole shards, none read by two processes, every record once."""

from __future__ import annotations

import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from datasets import load_dataset as hf_load_dataset
from torch.utils.data import DataLoader

from merit_hf.data.streams import finer_shards, stream_part

# The converters' layout: 5 files of 3 row groups of 100 records, but the last file's last group (50): 15 shards once
# resharded, all full but one.
FILES, ROWS_PER_FILE, ROWS_PER_GROUP, RECORDS = 5, 300, 100, 1450


@pytest.fixture(scope="module")
def parquet_stream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parquet")
    for index in range(FILES):
        ids = list(range(index * ROWS_PER_FILE, min(RECORDS, (index + 1) * ROWS_PER_FILE)))
        pq.write_table(pa.table({"id": ids}), folder / f"train-{index:05d}.parquet", row_group_size=ROWS_PER_GROUP)
    return lambda: hf_load_dataset("parquet", data_dir=str(folder), split="train", streaming=True)


def read(stream, num_workers: int = 0) -> list[int]:
    return [int(row["id"]) for row in DataLoader(stream, batch_size=None, num_workers=num_workers)]


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_every_record_once_each_process_reading_only_its_own(parquet_stream, world_size):
    """5 files on 2, 3, 4 or 8 processes: `split_dataset_by_node` alone had each process read all 1,450 records and
    keep one in N (the map below saw all of them on every process). The shares differ by at most one row group."""
    parts, mapped = [], []
    for rank in range(world_size):
        seen: list[int] = []
        counted = parquet_stream().map(lambda batch, seen=seen: seen.extend(batch["id"]) or batch, batched=True)
        parts.append(read(stream_part(counted, rank, world_size)))
        mapped.append(sorted(seen))
    assert sorted(record for part in parts for record in part) == list(range(RECORDS))
    assert [sorted(part) for part in parts] == mapped  # a process reads its own records and no other
    assert min(map(len, parts)) > 0 and max(map(len, parts)) - min(map(len, parts)) <= ROWS_PER_GROUP


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_are_dealt_again_each_epoch_with_workers(parquet_stream, num_workers, monkeypatch):
    """Shuffled with one seed and split after (as pretraining does): each epoch deals the shards anew, the same way on
    every process, so every record is still read once per epoch."""
    # datasets waits 5 s after each shuffled pass over Parquet for its reader threads (apache/arrow#45214)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)
    world_size = 2
    streams = [
        stream_part(parquet_stream(), rank, world_size, shards_per_process=max(1, num_workers)).shuffle(
            seed=3, buffer_size=16
        )
        for rank in range(world_size)
    ]
    firsts = []
    for epoch in (0, 1):
        for stream in streams:
            stream.set_epoch(epoch)
        parts = [read(stream, num_workers) for stream in streams]
        assert sorted(record for part in parts for record in part) == list(range(RECORDS))
        firsts.append(parts[0])
    assert firsts[0] != firsts[1]


def test_shards_are_made_finer_only_where_needed(parquet_stream):
    assert finer_shards(parquet_stream(), 5).num_shards == 5  # 5 files, 5 processes: whole files
    assert finer_shards(parquet_stream(), 2).num_shards == 15  # 5 files do not divide among 2: row groups
    assert finer_shards(parquet_stream(), 16).num_shards == 15  # as fine as the files allow


def test_a_stream_too_small_to_share_keeps_one_record_in_n_and_says_so(caplog):
    """One in-memory shard for 3 processes: every process reads it all, which is logged."""
    table = Dataset.from_dict({"id": list(range(10))})
    with caplog.at_level(logging.WARNING, logger="merit_hf.data.streams"):
        parts = [read(stream_part(table.to_iterable_dataset(num_shards=1), rank, 3)) for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert "each process reads all of it and keeps one record in 3" in caplog.text


def test_rank_outside_the_world_is_refused(parquet_stream):
    with pytest.raises(ValueError, match="0 <= rank < world_size; got 2, 2"):
        stream_part(parquet_stream(), 2, 2)
