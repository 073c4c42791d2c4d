"""Report-generation examples preprocessed once into a memory-mapped Arrow cache, whatever the number of records.

`ReportExamples` (what `merit_hf.training.report_lora` trains and scores on) runs the feature extractor over its rows
`chunk_size` records at a time and writes each chunk's `ecg_values` straight to an Arrow file (`datasets`'
`ArrowWriter`), so peak memory is one chunk whatever the number of records: all of MIMIC-IV-ECG (800k ECGs, ~86 GB
of `ecg_values` at 12 x 2250 float32) is read once, as a stream, and never held in memory. The examples are then
read back memory-mapped (`Dataset.from_file`); every process of a multi-process run maps the same files.

Cache layout, `cache_dir/report-examples-<fingerprint>/`:

- `part-<rank>-of-<world_size>.arrow`: the rows one process prepared (with N processes, process r prepares rows
  r, r + N, ... of a `Dataset`, and its own shards of a stream: the reading and the feature extraction run in
  parallel), columns `position` (the order of the source), `ecg_id`, `report`,
  `filename`, `ecg_values` `Array2D((num_leads, num_samples), float32)`;
- `report_examples.json`: written last (atomically) once every part is complete; it lists the parts and their row
  counts. Only a folder with it is read as finished: a killed run leaves at most `*.incomplete-*` files and finished
  parts (a rerun with the same number of processes keeps those), never a cache that passes for complete.

The fingerprint covers what the values depend on: the rows (a `Dataset`'s `datasets` fingerprint, the content of a
list of rows, or the `fingerprint` a caller gives for a stream, e.g. `files_fingerprint` of its folder), `limit`, the
feature extractor's settings (`crop` and `seed` aside: the examples are always centre crops) and
`REPORT_EXAMPLES_FORMAT_VERSION`; not the chunk size or the number of processes (the examples are the same). Change
any of them and a new folder is built; old folders stay until removed: `python -m merit_hf.training.report_examples
list|prune [--older_than_days 30]` (`prune_report_examples`; a reuse counts as a use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Dataset, Features, IterableDataset, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from ..data.collator import first_failing_record
from ..data.streams import finer_shards
from ..models.merit.feature_extraction_merit import EcgInputError, MeritFeatureExtractor

logger = logging.getLogger(__name__)

REPORT_EXAMPLES_FORMAT_VERSION = 1  # bump when the stored values change for the same inputs and settings
DEFAULT_CHUNK_SIZE = 256  # records per feature-extractor call: ~60 MB of MIMIC signals + their ecg_values
FINISHED_FILE = "report_examples.json"
ROW_COLUMNS = ("ecg_id", "report", "signal", "sampling_rate", "lead_names")
# What a feature extractor's output does not depend on here: `ReportExamples` always cuts the centre window, and
# `auto_map` / `processor_class` are what saving it (`MeritProcessor.save_pretrained`) adds to it in place, on the main
# process only: with them, the processes of a run computed different keys for the same examples once one had saved.
IGNORED_SETTINGS = ("crop", "seed", "auto_map", "processor_class")

Rows = Dataset | IterableDataset | Sequence[dict[str, Any]]


def report_examples_features(feature_extractor: MeritFeatureExtractor) -> Features:
    """The cached columns: `position` (the row's place in the source order), `ecg_id` (null for rows without one),
    `report`, `filename` (the PTB-XL record, `""` for sources without one) and the feature extractor's `ecg_values`."""
    return Features(
        {
            "position": Value("int64"),
            "ecg_id": Value("int64"),
            "report": Value("string"),
            "filename": Value("string"),
            "ecg_values": Array2D(
                shape=(len(feature_extractor.lead_names), feature_extractor.num_samples), dtype="float32"
            ),
        }
    )


def feature_extractor_settings(feature_extractor: MeritFeatureExtractor) -> dict[str, Any]:
    """The settings the cached `ecg_values` depend on (`to_dict` less `IGNORED_SETTINGS`)."""
    settings = feature_extractor.to_dict()
    return {key: value for key, value in sorted(settings.items()) if key not in IGNORED_SETTINGS}


def files_fingerprint(path: str | os.PathLike, patterns: Sequence[str]) -> str:
    """A fingerprint of the files matching `patterns` under `path` (their names, sizes and modification times): the
    identity of a streamed source (a converted Parquet folder), which has no `datasets` fingerprint. A `path` that is
    not a local folder (a Hub id) is fingerprinted by its name alone."""
    folder = Path(path)
    if not folder.is_dir():
        return Hasher.hash(str(path))
    entries = sorted(
        (str(file.relative_to(folder)), file.stat().st_size, file.stat().st_mtime_ns)
        for pattern in patterns
        for file in folder.glob(pattern)
        if file.is_file()
    )
    return Hasher.hash([str(folder.resolve()), entries])


def rows_fingerprint(rows: Rows | Sequence[Rows]) -> str | None:
    """The identity of `rows` (one source or a sequence of sources, read in order): a `Dataset`'s `datasets`
    fingerprint (its files and the transforms that made it), a list of rows by its content; `None` for a stream
    (`IterableDataset`), which has none (pass `fingerprint=` to cache one)."""
    parts = _parts(rows)
    fingerprints = []
    for part in parts:
        if isinstance(part, IterableDataset):
            return None
        fingerprints.append(part._fingerprint if isinstance(part, Dataset) else Hasher.hash(list(part)))
    return Hasher.hash(fingerprints)


def examples_fingerprint(source: str, limit: int | None, feature_extractor: MeritFeatureExtractor) -> str:
    """The cache key: the rows' identity, `limit`, the feature extractor's settings and the format version."""
    return Hasher.hash(
        {
            "format_version": REPORT_EXAMPLES_FORMAT_VERSION,
            "rows": source,
            "limit": limit,
            "feature_extractor": feature_extractor_settings(feature_extractor),
        }
    )


def prepare_report_examples(
    rows: Rows | Sequence[Rows],
    feature_extractor: MeritFeatureExtractor,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fingerprint: str | None = None,
    process=None,
) -> tuple[Dataset, Path | None]:
    """The examples of `rows` (the first `limit` of them, in order) as a memory-mapped `Dataset`
    (`report_examples_features`), and the folder it lives in when that folder is temporary (the caller removes it).

    Args:
        rows: a `Dataset`, an `IterableDataset` or a list of row dicts with the columns `ROW_COLUMNS` (and optionally
            `filename`); or a sequence of those, read one after the other.
        feature_extractor: run on `chunk_size` records at a time (centre crop; `window="single"` only).
        cache_dir: where `report-examples-<fingerprint>/` is looked up and built. `None`: a temporary folder (built
            anew, by every process for itself).
        limit: at most this many examples (`None`: all); a stream is read no further.
        fingerprint: the identity of `rows` (what `rows_fingerprint` gives for a `Dataset` or a list); required to
            cache a stream, which is otherwise built in a temporary folder (logged).
        process: an `Accelerator` or `PartialState` (`process_index`, `num_processes`, `wait_for_everyone`). With a
            `cache_dir` and several processes, each prepares every `num_processes`-th row of a `Dataset` and its own
            shards of a stream (without a `limit`), and they share one cache.
    """
    if feature_extractor.window != "single":
        raise ValueError(
            "ReportExamples stores one window per record; use a feature extractor with window='single', got "
            f"window={feature_extractor.window!r}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be None (all) or at least 0, got {limit}")
    parts = _parts(rows)
    _refuse_rows_without_reports(parts, limit)
    source = fingerprint if fingerprint is not None else rows_fingerprint(parts)
    rank, world_size = (0, 1) if process is None else (process.process_index, process.num_processes)
    if cache_dir is None or source is None:
        if cache_dir is not None:
            logger.warning("report examples: a stream without a fingerprint is not cached; building it in a temporary "
                           "folder (pass fingerprint=, e.g. files_fingerprint(folder, ['**/*.parquet']))")  # fmt: skip
        directory = Path(tempfile.mkdtemp(prefix="report-examples-", dir=cache_dir))
        try:
            _build_part(directory, parts, feature_extractor, limit, chunk_size, 0, 1, show_progress=rank == 0)
            _write_finished(directory, "uncached", {"limit": limit})
            return _load(directory), directory
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    key = examples_fingerprint(source, limit, feature_extractor)
    if world_size > 1:
        _check_same_key(key, source, limit, feature_extractor)
    directory = Path(cache_dir) / f"report-examples-{key}"
    # The processes that see this folder (all of them on a shared filesystem; those of one node where the cache is
    # on each node's own disk) build it together; its first process decides for them and writes the finished record.
    group = _processes_sharing(Path(cache_dir), process) if world_size > 1 else [0]
    leader, group_rank, group_size = group[0], group.index(rank), len(group)
    finished = _finished(directory) if rank == leader else None
    if world_size > 1:  # one decision per folder, and every process takes part in every barrier below
        from accelerate.utils import gather_object

        finished = gather_object([finished])[leader]
    if finished:
        logger.info("report examples: reusing %s (%d examples)", directory, finished["num_rows"])
        if rank == leader:  # the finished record's time is the folder's last use (`prune_report_examples`)
            with contextlib.suppress(OSError):  # a cache on a read-only filesystem is still read
                os.utime(directory / FINISHED_FILE)
        return _load(directory), None
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _build_part(directory, parts, feature_extractor, limit, chunk_size, group_rank, group_size,
                show_progress=rank == leader)  # fmt: skip
    if world_size > 1:
        process.wait_for_everyone()
    if rank == leader:
        settings = {"rows": source, "limit": limit, "feature_extractor": feature_extractor_settings(feature_extractor)}
        _write_finished(directory, key, settings, group_size)
        logger.info("report examples: built %s in %.1f s over %d process(es)", directory,
                    time.perf_counter() - start, group_size)  # fmt: skip
    if world_size > 1:
        process.wait_for_everyone()
    return _load(directory), None


class ReportExamples(torch.utils.data.Dataset):
    """ECGs run through the feature extractor once (centre crop), with their reports, backed by a memory-mapped Arrow
    cache (`prepare_report_examples`): an item is `{"ecg_values": (num_leads, num_samples) float32, "report", "index"}`.

    Args:
        examples: a `Dataset`, an `IterableDataset` (streamed once) or a list of rows with `ecg_id`, `report`,
            `signal`, `sampling_rate`, `lead_names` (and optionally `filename`); or a sequence of those, in order.
            Every `report` must be text (`has_report_text`): rows with None, NaN or an empty report are refused with
            a `ValueError` that counts them and names the first by its `ecg_id` (else its row), before anything is
            cached (a stream's as its chunk is read); drop them first (`merit_hf.data.drop_empty_reports`).
        feature_extractor: the model's input contract.
        args, options: `cache_dir`, `limit`, `chunk_size`, `fingerprint`, `process`, as `prepare_report_examples`
            takes them. Without `cache_dir` the examples go to a temporary folder removed with this object.
    """

    def __init__(
        self, examples: Rows | Sequence[Rows], feature_extractor: MeritFeatureExtractor, *args: Any, **options: Any
    ):
        self.dataset, temporary = prepare_report_examples(examples, feature_extractor, *args, **options)
        if temporary is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(temporary), True)
        self._reports = self.dataset.select_columns(["report"])
        self._values = self.dataset.with_format("torch", columns=["ecg_values"])
        self._ecg_rows: np.ndarray | None = None  # with_shuffled_ecgs: the row whose ECG each report gets

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items in one read (`DataLoader` calls this when a dataset has it)."""
        indices = [int(index) for index in indices]
        if any(not -len(self) <= index < len(self) for index in indices):
            raise IndexError(f"ReportExamples: index out of range for {len(self)} examples: {indices}")
        indices = [index % len(self) for index in indices]
        reports = self._reports[indices]["report"]
        ecg_rows = indices if self._ecg_rows is None else self._ecg_rows[indices].tolist()
        ecg_values = self._values[ecg_rows]["ecg_values"]
        return [
            {"ecg_values": values, "report": report, "index": index}
            for values, report, index in zip(ecg_values, reports, indices, strict=True)
        ]

    @property
    def ecg_values(self) -> torch.Tensor:
        """Every example's `ecg_values` `(num_examples, num_leads, num_samples)` in memory: for small sets only."""
        rows = np.arange(len(self)) if self._ecg_rows is None else self._ecg_rows
        return self._values[rows.tolist()]["ecg_values"]

    @property
    def reports(self) -> list[str]:
        """Every example's report, in order."""
        return list(self._reports["report"])

    def with_shuffled_ecgs(self, seed: int = 0) -> ReportExamples:
        """The same reports, each paired with another report's ECG (a derangement: no report keeps its own ECG, as a
        cyclic shift of a random order moves every item), for the ECG-use check. Only the row order is stored (no
        ECG is copied); the same `seed` gives the same pairs in every process."""
        if len(self) < 2:
            raise ValueError(f"shuffling ECGs across reports needs at least 2 reports, got {len(self)}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).numpy()
        base = np.arange(len(self)) if self._ecg_rows is None else self._ecg_rows
        ecg_rows = base.copy()
        ecg_rows[order] = base[np.roll(order, -1)]
        shuffled = object.__new__(type(self))
        shuffled.__dict__.update(self.__dict__)
        shuffled._ecg_rows = ecg_rows
        return shuffled


# ----------------------------------------------------------------------------------------------------------------------
# Building and reading the cache
# ----------------------------------------------------------------------------------------------------------------------


def _parts(rows: Rows | Sequence[Rows]) -> list[Rows]:
    """`rows` as a list of sources: a single `Dataset` / `IterableDataset` / list of row dicts, or several."""
    if isinstance(rows, (Dataset, IterableDataset)):
        return [rows]
    rows = list(rows)
    if rows and all(isinstance(part, (Dataset, IterableDataset, list, tuple)) for part in rows):
        return rows
    return [rows]


# A cached row's `position` orders the examples as the source gives them: (source part << 56) + the row's place in its
# part, which for a stream read by shards (below) is (shard << 32) + the row's place in its shard.
PART_SHIFT, SHARD_SHIFT = 56, 32
MAX_PARTS, MAX_STREAM_SHARDS = 1 << (63 - PART_SHIFT), 1 << (PART_SHIFT - SHARD_SHIFT)  # int64 positions


def _row_chunks(
    parts: list[Rows], limit: int | None, chunk_size: int, rank: int, world_size: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """`(positions, columns)` of at most `chunk_size` rows each: this process's rows among the first `limit` rows of
    `parts` read in order. A `Dataset` is read at this process's rows only (`rank`, `rank + world_size`, ...). A stream
    split among processes without a `limit` is read by whole shards, each process its own (`_stream_shard_chunks`);
    with a `limit`, or a list of rows, every process reads it in order up to the limit and keeps its own rows."""
    if len(parts) > MAX_PARTS:
        raise ValueError(f"report examples: {len(parts)} sources; at most {MAX_PARTS} (join them into fewer)")
    taken = 0  # rows of the sequence so far, for the limit and the share of each process
    for number, part in enumerate(parts):
        base = number << PART_SHIFT
        remaining = None if limit is None else limit - taken
        if remaining is not None and remaining <= 0:
            return
        if isinstance(part, Dataset):
            count = part.num_rows if remaining is None else min(part.num_rows, remaining)
            readable = part.select_columns(_columns(part.column_names)).with_format("numpy")
            mine = np.flatnonzero((taken + np.arange(count)) % world_size == rank)
            for start in range(0, len(mine), chunk_size):
                chosen = mine[start : start + chunk_size]
                yield base + chosen, readable[chosen.tolist()]
            taken += count
            continue
        if isinstance(part, IterableDataset) and limit is None and world_size > 1:
            yield from _stream_shard_chunks(part, base, chunk_size, rank, world_size)
            continue
        local = 0
        for batch in _batches(part, chunk_size):
            size = len(batch["signal"])
            if remaining is not None:
                size = min(size, remaining - local)
            keep = np.flatnonzero((taken + local + np.arange(size)) % world_size == rank)
            if len(keep):
                yield base + local + keep, {name: [values[index] for index in keep] for name, values in batch.items()}
            local += size
            if remaining is not None and local >= remaining:
                return
        taken += local


def _stream_shard_chunks(
    stream: IterableDataset, base: int, chunk_size: int, rank: int, world_size: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """This process's whole shards of `stream` (shards `rank`, `rank + world_size`, ...; cut into Parquet row groups
    first where too few, `finer_shards`): no record is read by two processes. Before, every process read the whole
    stream and kept one row in `world_size`: all of MIMIC-IV-ECG, 8 times over on 8 GPUs. The positions follow the
    stream's own order (shard, then row), so the cache is the same on any number of processes."""
    stream = finer_shards(stream, world_size)
    if stream.num_shards > MAX_STREAM_SHARDS:
        raise ValueError(
            f"report examples: a stream of {stream.num_shards} shards; at most {MAX_STREAM_SHARDS} are supported"
        )
    for shard in range(rank, stream.num_shards, world_size):
        row = 0
        for batch in _batches(stream.shard(num_shards=stream.num_shards, index=shard), chunk_size):
            size = len(batch["signal"])
            if row + size > 1 << SHARD_SHIFT:
                raise ValueError(f"report examples: shard {shard} of the stream holds over {1 << SHARD_SHIFT} rows")
            yield base + (shard << SHARD_SHIFT) + row + np.arange(size), batch
            row += size


def _batches(part: IterableDataset | Sequence[dict[str, Any]], chunk_size: int) -> Iterable[dict[str, Any]]:
    if isinstance(part, IterableDataset):
        columns = _columns(part.column_names or list(part.features or ROW_COLUMNS))
        return part.select_columns(columns).with_format("numpy").iter(batch_size=chunk_size)
    columns = _columns(part[0]) if part else list(ROW_COLUMNS)
    return (
        {name: [row[name] for row in part[start : start + chunk_size]] for name in columns}
        for start in range(0, len(part), chunk_size)
    )


def _columns(names: Iterable[str]) -> list[str]:
    names = list(names)
    required = [name for name in ROW_COLUMNS if name != "ecg_id"]
    missing = [name for name in required if name not in names]
    if missing:
        raise KeyError(
            f"report examples need the columns {required} (ecg_id and filename are optional); missing {missing} "
            f"(found {names})"
        )
    return [name for name in (*ROW_COLUMNS, "filename") if name in names]


def has_report_text(report: Any) -> bool:
    """Whether `report` is text a model can be trained on and scored against: a string with more than whitespace
    (not `None`, NaN, another type, `""`)."""
    return isinstance(report, str) and bool(report.strip())


def _missing_reports_error(count: int, total: int, where: str, first: str, report: Any) -> ValueError:
    return ValueError(
        f"Report examples need report text, but {count} of the {total} rows {where} have none (None, NaN, not a "
        f"string, or empty or only whitespace); the first is {first} (report {report!r}). Drop those rows first "
        "(merit_hf.data.drop_empty_reports drops the empty ones of a Dataset): a missing report is never stored as "
        "the text 'None' or 'nan', nor left to fail during training."
    )


def _refuse_rows_without_reports(parts: list[Rows], limit: int | None) -> None:
    """Raise `_missing_reports_error` when a row among the first `limit` of the `Dataset`s and lists of rows in
    `parts` has no report text (`has_report_text`), naming the first by its `ecg_id` (else its row) and counting them
    all, before anything is cached. A stream is checked as it is read (`_build_part`), and the parts after it are
    left to that check too (where the limit ends in them is not known yet)."""
    missing, total, first, taken = 0, 0, None, 0
    for number, part in enumerate(parts):
        remaining = None if limit is None else limit - taken
        if isinstance(part, IterableDataset) or (remaining is not None and remaining <= 0):
            break
        _columns(part.column_names if isinstance(part, Dataset) else part[0] if part else ROW_COLUMNS)
        if isinstance(part, Dataset):
            count = part.num_rows if remaining is None else min(part.num_rows, remaining)
            columns = [name for name in ("ecg_id", "report") if name in part.column_names]
            rows = part.select(range(count)).select_columns(columns).iter(batch_size=10_000)
            batches = ((batch.get("ecg_id", [None] * len(batch["report"])), batch["report"]) for batch in rows)
        else:
            count = len(part) if remaining is None else min(len(part), remaining)
            batches = [([row.get("ecg_id") for row in part[:count]], [row.get("report") for row in part[:count]])]
        index = 0
        for ecg_ids, reports in batches:
            for ecg_id, report in zip(ecg_ids, reports, strict=True):
                if not has_report_text(report):
                    missing += 1
                    if first is None:
                        name = f"row {index}" + (f" of source {number}" if len(parts) > 1 else "")
                        first = (f"ecg_id {int(ecg_id)}" if ecg_id is not None else name, report)
                index += 1
        total, taken = total + count, taken + count
    if missing:
        raise _missing_reports_error(missing, total, "given", *first)


def _extract(batch: dict[str, Any], feature_extractor: MeritFeatureExtractor) -> np.ndarray:
    """The chunk's `ecg_values` (records processed one by one, so a chunk gives the values of a single call); a
    record that breaks the input contract is named by its `ecg_id`."""
    signals = [np.asarray(signal) for signal in batch["signal"]]
    kwargs = {
        "sampling_rate": [float(rate) for rate in batch["sampling_rate"]],
        "lead_names": [list(names) for names in batch["lead_names"]],
        "return_tensors": "np",
        "crop": "center",
    }
    try:
        return feature_extractor(signals, **kwargs)["ecg_values"]
    except EcgInputError:
        found = first_failing_record(
            batch,
            lambda one: feature_extractor(
                [np.asarray(one["signal"][0])],
                sampling_rate=float(one["sampling_rate"][0]),
                lead_names=list(one["lead_names"][0]),
                crop="center",
            ),
        )
        if found is None:
            raise
        index, error = found
        ids = batch.get("ecg_id")
        name = f"ecg_id {int(ids[index])}" if ids is not None else f"example {index} of its chunk"
        raise EcgInputError(f"{name}: {str(error).removeprefix('record 0: ')}") from error


def _processes_sharing(cache_dir: Path, process) -> list[int]:
    """The ranks of the processes that see the same `cache_dir` as this one, in order. Each process leaves a probe
    file there and looks for the others': on a filesystem every process shares, all of them; with the cache on each
    node's own disk (`$HF_DATASETS_CACHE` often is), the processes of this node. Without this, the main process waited
    for the parts that other nodes had written to their own disks. A shared filesystem that shows a probe late only
    makes its nodes build the same parts twice (each part is written under a temporary name and renamed)."""
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world_size = process.process_index, process.num_processes
    token = broadcast_object_list([uuid.uuid4().hex if rank == 0 else None])[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    probe = cache_dir / f".report-examples-probe-{token}-{rank:05d}"
    probe.touch()
    try:
        process.wait_for_everyone()
        seen = [
            other
            for other in range(world_size)
            if (cache_dir / f".report-examples-probe-{token}-{other:05d}").exists()
        ]
        groups = gather_object([seen])
        process.wait_for_everyone()
    finally:
        probe.unlink(missing_ok=True)
    if any(groups[other] != seen for other in seen):
        raise RuntimeError(
            f"report examples: the processes see {cache_dir} inconsistently ({dict(enumerate(groups))}: the ranks whose "
            "files each process sees there); give --examples_cache_dir a folder every process shares, or one on each "
            "node's own disk"
        )
    return seen


def _check_same_key(key: str, source: str, limit: int | None, feature_extractor: MeritFeatureExtractor) -> None:
    """Raise, in every process, when the processes computed different cache keys: each would build the part of its
    own folder, and the main process would find the others' parts missing. The error names what differs from the
    main process's inputs (rows, limit, feature-extractor settings)."""
    from accelerate.utils import gather_object

    inputs = {"rows": source, "limit": limit, **feature_extractor_settings(feature_extractor)}
    gathered = gather_object([(key, inputs)])
    if len({gathered_key for gathered_key, _ in gathered}) == 1:
        return
    main = gathered[0][1]
    differences = {
        rank: {
            name: (main.get(name), theirs.get(name))
            for name in sorted(main.keys() | theirs.keys())
            if main.get(name) != theirs.get(name)
        }  # fmt: skip
        for rank, (_, theirs) in enumerate(gathered)
        if rank
    }
    raise RuntimeError(
        "report examples: the processes disagree on the examples' cache key (keys "
        f"{[gathered_key for gathered_key, _ in gathered]}); what differs from process 0, as {{process: {{input: "
        f"(process 0's, its own)}}}}: {differences}"
    )


def _part_file(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.arrow"


def _build_part(
    directory: Path,
    parts: list[Rows],
    feature_extractor: MeritFeatureExtractor,
    limit: int | None,
    chunk_size: int,
    rank: int,
    world_size: int,
    show_progress: bool,
) -> None:
    """This process's part file, written under a temporary name and renamed once complete (a finished part of an
    earlier, killed run with the same settings and number of processes is kept)."""
    path = directory / _part_file(rank, world_size)
    if path.is_file() and _readable(path):
        return
    temporary = directory / f"{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    features = report_examples_features(feature_extractor)
    total = None if limit is None else -(-limit // world_size)
    progress = tqdm(total=total, desc="report examples", unit="ECG", disable=not show_progress)
    try:
        with ArrowWriter(features=features, path=str(temporary)) as writer:
            for positions, batch in _row_chunks(parts, limit, chunk_size, rank, world_size):
                filenames, ecg_ids = batch.get("filename"), batch.get("ecg_id")
                missing = [index for index, report in enumerate(batch["report"]) if not has_report_text(report)]
                if missing:  # a stream's rows (the others were checked before the build)
                    first = missing[0]
                    name = f"ecg_id {int(ecg_ids[first])}" if ecg_ids is not None else f"row {first} of the chunk"
                    where = "of a chunk read from a stream (counted in this chunk only)"
                    raise _missing_reports_error(
                        len(missing), len(batch["report"]), where, name, batch["report"][first]
                    )
                values = _extract(batch, feature_extractor)
                writer.write_batch(
                    {
                        "position": positions.tolist(),
                        "ecg_id": [int(ecg_id) for ecg_id in ecg_ids] if ecg_ids is not None else [None] * len(values),
                        "report": [str(report) for report in batch["report"]],
                        "filename": [str(name) for name in filenames] if filenames is not None else [""] * len(values),
                        "ecg_values": values,
                    }
                )
                progress.update(len(values))
            writer.finalize()
        with open(temporary, "rb") as handle:  # on disk before the name says it is complete
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        progress.close()


def _readable(path: Path) -> bool:
    try:
        Dataset.from_file(str(path))
    except Exception:  # a part cut short (disk full, a copy interrupted) is rebuilt
        logger.warning("report examples: %s is unreadable; rebuilding it", path)
        return False
    return True


def _write_finished(directory: Path, key: str, settings: dict[str, Any], world_size: int = 1) -> None:
    parts = sorted(directory.glob(f"part-*-of-{world_size:05d}.arrow"))
    if len(parts) != world_size:
        raise RuntimeError(f"{directory}: expected {world_size} part file(s), found {[part.name for part in parts]}")
    record = {
        "format_version": REPORT_EXAMPLES_FORMAT_VERSION,
        "fingerprint": key,
        "num_rows": 0,
        "parts": [],
        "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for part in parts:
        rows = Dataset.from_file(str(part)).num_rows
        record["parts"].append({"file": part.name, "num_rows": rows})
        record["num_rows"] += rows
    temporary = directory / f"{FINISHED_FILE}.incomplete-{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(temporary, directory / FINISHED_FILE)


def _finished(directory: Path) -> dict[str, Any] | None:
    """The finished record of `directory` when its parts are all there with the rows it lists; `None` when it was
    never finished. A finished folder whose parts are missing or changed is removed (and rebuilt), with a warning."""
    path = directory / FINISHED_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    for part in record["parts"]:
        file = directory / part["file"]
        rows = Dataset.from_file(str(file)).num_rows if file.is_file() and _readable(file) else None
        if rows != part["num_rows"]:
            logger.warning("report examples: %s holds %s rows, %s expected; rebuilding %s", file, rows,
                           part["num_rows"], directory)  # fmt: skip
            shutil.rmtree(directory)
            return None
    return record


def _load(directory: Path) -> Dataset:
    """The examples of a finished folder, memory-mapped, in source order."""
    record = json.loads((directory / FINISHED_FILE).read_text())
    parts = [Dataset.from_file(str(directory / part["file"])) for part in record["parts"]]
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    positions = dataset.data.column("position").to_numpy()
    if np.any(positions[1:] < positions[:-1]):
        dataset = dataset.select(np.argsort(positions, kind="stable"))
    return dataset


# ----------------------------------------------------------------------------------------------------------------------
# The cache folder: what is there, and removing what has not been used for a while
# ----------------------------------------------------------------------------------------------------------------------
def default_examples_cache_dir() -> Path:
    """Where `report_lora` caches its examples unless `--examples_cache_dir` says otherwise."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "merit_hf_report_examples"


def cached_report_examples(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The `report-examples-*` folders of `cache_dir` (default `default_examples_cache_dir()`), oldest use first:
    `{"path", "finished", "num_rows", "size_bytes", "last_used"}`. `last_used` (seconds since the epoch) is when the
    folder was last built or reused (its finished record's time), or, for a build that never finished (killed, or
    still running), when a file in it was last written."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_examples_cache_dir()
    entries = []
    for directory in sorted(cache_dir.glob("report-examples-*")) if cache_dir.is_dir() else []:
        if not directory.is_dir():
            continue
        files = [path for path in directory.iterdir() if path.is_file()]
        marker = directory / FINISHED_FILE
        record = json.loads(marker.read_text()) if marker.is_file() else None
        last_used = marker.stat().st_mtime if record else max((f.stat().st_mtime for f in files), default=0.0)
        entries.append(
            {
                "path": directory,
                "finished": record is not None,
                "num_rows": record["num_rows"] if record else None,
                "size_bytes": sum(path.stat().st_size for path in files),
                "last_used": last_used or directory.stat().st_mtime,
            }
        )
    return sorted(entries, key=lambda entry: entry["last_used"])


def prune_report_examples(
    cache_dir: str | os.PathLike | None = None, older_than_days: float = 30.0, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Remove the `report-examples-*` folders of `cache_dir` not built or used for `older_than_days` (finished ones by
    their last use, unfinished ones by their last write, so that a build in progress is kept); returns their entries
    (`cached_report_examples`), removed unless `dry_run`. Every setting change builds a new folder and nothing else
    removes the old ones: all of MIMIC-IV-ECG takes ~86 GB."""
    if older_than_days < 0:
        raise ValueError(f"older_than_days: must be at least 0, got {older_than_days}")
    cutoff = time.time() - older_than_days * 86400
    stale = [entry for entry in cached_report_examples(cache_dir) if entry["last_used"] < cutoff]
    for entry in stale if not dry_run else ():
        shutil.rmtree(entry["path"])
        logger.info("report examples: removed %s (%.1f GB)", entry["path"], entry["size_bytes"] / 1e9)
    return stale


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """`python -m merit_hf.training.report_examples list|prune [--cache_dir DIR] [--older_than_days N] [--dry_run]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m merit_hf.training.report_examples",
        description="The report-generation examples caches (report_lora's --examples_cache_dir): list them, or "
        "remove those not built or used for --older_than_days.",
    )
    parser.add_argument("action", choices=["list", "prune"])
    parser.add_argument("--cache_dir", default=None, help=f"default: {default_examples_cache_dir()}")
    parser.add_argument("--older_than_days", type=float, default=30.0, help="prune: last built or used before this")
    parser.add_argument("--dry_run", action="store_true", help="prune: list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    if args.action == "list":
        entries = cached_report_examples(args.cache_dir)
    else:
        entries = prune_report_examples(args.cache_dir, args.older_than_days, args.dry_run)
    verb = {"list": "", "prune": "would remove " if args.dry_run else "removed "}[args.action]
    for entry in entries:
        rows = f"{entry['num_rows']} examples" if entry["finished"] else "unfinished"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["last_used"]))
        print(f"{verb}{entry['path']}  {rows}  {entry['size_bytes'] / 1e9:.2f} GB  last used {used}")
    total = sum(entry["size_bytes"] for entry in entries) / 1e9
    print(f"{len(entries)} folder(s), {total:.2f} GB" + (f" {verb.strip()}" if verb else ""))
    return entries


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "REPORT_EXAMPLES_FORMAT_VERSION",
    "ReportExamples",
    "cached_report_examples",
    "default_examples_cache_dir",
    "examples_fingerprint",
    "feature_extractor_settings",
    "files_fingerprint",
    "prepare_report_examples",
    "prune_report_examples",
    "report_examples_features",
    "rows_fingerprint",
]


if __name__ == "__main__":
    main()
