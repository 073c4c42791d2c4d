"""Runtime loaders: saved PTB-XL / MIMIC-IV-ECG / WFDB-folder datasets from a local folder or a Hub dataset repo.

`load_dataset(name, path)` is the one entry point of the probe, the embedding CLI, the quick-start and pretraining;
it hands over to `load_ptbxl`, `load_mimic_iv_ecg` or `load_wfdb_dataset`. Only Arrow / Parquet files are read, never a loading script (no `trust_remote_code` for data). What is accepted:

- a folder written by `dataset.save_to_disk(...)` (read with `load_from_disk`, memory-mapped, no copy);
- a folder written by the converters (`dataset_scripts/`): `{config}/{split}-*.parquet` (PTB-XL, `config` =
  `100hz` / `500hz`) or `data/{split}-*.parquet` (MIMIC-IV-ECG); read with the `parquet` builder, which converts
  them once into the `datasets` cache, memory-mapped after that (or streams them with `streaming=True`);
- a Hub dataset id with the same files and a `configs:` card (`datasets.load_dataset(repo_id, name=config)`);
- for PTB-XL only, the PhysioNet folder itself (`is_physionet_ptbxl`): built in memory with `build_ptbxl` (fine for
  a sample, slow for the whole set: convert it once instead).

Multi-process training: pass `rank` and `world_size` (e.g. `accelerator.process_index`, `accelerator.num_processes`)
and each process gets its part: `datasets.distributed.split_dataset_by_node` for a map-style split; for a stream,
whole shards (`merit_hf.data.streams.stream_part`), cut into Parquet row groups first where the files are fewer than
the processes or their count is not a multiple of it, so no process reads another's records (MIMIC-IV-ECG's 801
files on 8 processes: its 8,001 row groups of up to 100 records, 1,000 or 1,001 to each process).
Streamed splits are filtered on Arrow batches where the stream has them (`merit_hf.data.streams.filter_stream`),
so the rows after a filter stay Arrow and `with_format("numpy")` reads them fast, as float32.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, IterableDataset, IterableDatasetDict, load_from_disk
from datasets import load_dataset as hf_load_dataset
from datasets.distributed import split_dataset_by_node

from .labels import LABEL_SETS
from .mimic_iv_ecg import MIMIC_OUTPUT_FOLDER
from .ptbxl import (
    PTBXL_SPLITS,
    build_ptbxl,
    describe_source,
    described_source,
    is_physionet_ptbxl,
    ptbxl_config_name,
)
from .ptbxl_versions import (
    DEFAULT_PTBXL_VERSION,
    apply_ptbxl_version_to_dataset,
    check_ptbxl_version,
    check_ptbxl_version_for,
)
from .reports import drop_empty_reports as _drop_empty_reports
from .streams import column_values, filter_stream, stream_part
from .wfdb_folder import DEFAULT_SPLIT_FRACTIONS

logger = logging.getLogger(__name__)

DATASET_NAMES = ("ptbxl", "mimic_iv_ecg", "wfdb")
MIMIC_CONFIG = "default"  # Hub configuration; its files are data/train-*.parquet (MIMIC_OUTPUT_FOLDER)
MIMIC_SPLITS = ("train",)
SPLIT_ORDER = ("train", "validation", "test")
AnyDataset = Dataset | DatasetDict | IterableDataset | IterableDatasetDict


def load_dataset(
    name: str,
    path_or_repo_id: str | os.PathLike,
    split: str | None = None,
    streaming: bool | None = None,
    sampling_rate: int = 100,
    rank: int | None = None,
    world_size: int | None = None,
    drop_empty_reports: bool = False,
    label_fraction: float = 1.0,
    label_set: str | None = None,
    drop_unlabeled: bool = True,
    split_column: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    ptbxl_version: str = DEFAULT_PTBXL_VERSION,
) -> AnyDataset:
    """Load dataset `name` from `path_or_repo_id`: the one entry point of the probe, the embedding CLI, the quick-start
    and pretraining, so that every one of them accepts the same inputs.

    Args:
        name: `"ptbxl"` (`load_ptbxl`: a converted folder, a Hub id, or the PhysioNet folder itself), `"mimic_iv_ecg"`
            (`load_mimic_iv_ecg`) or `"wfdb"` (a converted WFDB folder, `load_wfdb_dataset`).
        split: one split, or `None` for a `DatasetDict` of all.
        streaming: `IterableDataset`s; `None` is the loader's default (MIMIC-IV-ECG streams, the others do not).
        sampling_rate: PTB-XL only: which records, 100 or 500 Hz (the other datasets keep their recorded rates).
        rank, world_size: this process's part of the data (`split_dataset_by_node`).
        drop_empty_reports: keep only the records with a report (`merit_hf.data.reports.drop_empty_reports`): the
            ECG-report pairs of pretraining and report generation, with the cleaned report text of the conversion.
        label_fraction, label_set, drop_unlabeled: PTB-XL only, see `load_ptbxl` (`seed` seeds the label fraction).
        ptbxl_version: PTB-XL only: `"1.0.3"` (default: rows and labels follow PTB-XL v1.0.3 whatever metadata
            version the folder holds) or `"as_is"`; see `load_ptbxl`. Another value with another dataset raises
            (`check_ptbxl_version_for`): it would change nothing.
        split_column, split_fractions: WFDB folders only, see `load_wfdb_dataset` (`seed` seeds the split).

    Example:

    ```python
    >>> from merit_hf.data import load_dataset
    >>> ptbxl = load_dataset("ptbxl", "data/ptbxl_sample", sampling_rate=100)  # the PhysioNet folder, in memory
    >>> sorted(ptbxl), ptbxl["validation"].num_rows  # 81 v1.0.1 rows, 3 of them duplicates v1.0.3 drops
    (['test', 'train', 'validation'], 78)
    ```"""
    check_ptbxl_version_for(name, ptbxl_version)
    if name == "ptbxl":
        dataset = load_ptbxl(
            path_or_repo_id,
            split=split,
            streaming=bool(streaming),
            label_fraction=label_fraction,
            label_set=label_set,
            seed=seed,
            sampling_rate=sampling_rate,
            drop_unlabeled=drop_unlabeled,
            rank=rank,
            world_size=world_size,
            ptbxl_version=ptbxl_version,
        )
    elif name == "mimic_iv_ecg":
        dataset = load_mimic_iv_ecg(
            path_or_repo_id, split=split, streaming=True if streaming is None else streaming, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    elif name == "wfdb":
        dataset = load_wfdb_dataset(
            path_or_repo_id, split=split, split_column=split_column, split_fractions=split_fractions, seed=seed,
            streaming=bool(streaming),
        )  # fmt: skip
        dataset = _split_by_node(dataset, rank, world_size)
    else:
        raise ValueError(f"dataset name must be one of {DATASET_NAMES}, got {name!r}")
    if drop_empty_reports:
        dataset = _map_splits(dataset, lambda part, _: _drop_empty_reports(part))
    return dataset


def load_ptbxl(
    path_or_repo_id: str | os.PathLike,
    split: str | None = None,
    streaming: bool = False,
    label_fraction: float = 1.0,
    label_set: str | None = None,
    seed: int = 0,
    sampling_rate: int = 100,
    drop_unlabeled: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    ptbxl_version: str = DEFAULT_PTBXL_VERSION,
) -> AnyDataset:
    """Load a converted PTB-XL dataset (all splits as a `DatasetDict`, or one `split`).

    Args:
        path_or_repo_id: a local folder (converter output or `save_to_disk`), a Hub dataset id, or the PhysioNet
            PTB-XL folder itself (built in memory with `build_ptbxl`).
        split: `"train"`, `"validation"`, `"test"` or `None` for all three.
        streaming: return an `IterableDataset(Dict)` that reads the Parquet shards as it goes.
        label_fraction: keep this fraction of the **train** split (validation and test stay whole), chosen by
            `label_fraction_subset` (stratified on `label_set`, or on `superclass` when none is given).
        label_set: one of `LABEL_SETS`; with `drop_unlabeled` the records without any class of this set are dropped
            from every split (the PTB-XL benchmark protocol, Strodthoff et al. 2021), and the count is logged.
        seed: seed of the label-fraction subset.
        sampling_rate: 100 or 500: which configuration (`100hz` / `500hz`) of a converter folder or Hub repo.
        rank, world_size: this process's part of the data (`split_dataset_by_node`).
        ptbxl_version: `"1.0.3"` (default): rows and labels follow PTB-XL v1.0.3 whatever metadata version the
            source holds: v1.0.3's duplicate ECGs are dropped and, for a PhysioNet folder, its consensus `scp_codes`
            (and the label columns) written into the kept twins; what changed is logged and in each split's
            `info.description`; a no-op on v1.0.3 data. A converted dataset with a stale kept twin raises (its labels
            were computed at conversion). `"as_is"`: the rows as stored (e.g. v1.0.1's). See
            `merit_hf.data.ptbxl_versions`.
    """
    check_ptbxl_version(ptbxl_version)
    if label_set is not None and label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {LABEL_SETS}, got {label_set!r}")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if streaming and label_fraction < 1.0:
        raise ValueError("label_fraction < 1 needs the whole train split to stratify; load with streaming=False")
    if split is not None and split not in PTBXL_SPLITS:
        raise ValueError(f"split must be one of {list(PTBXL_SPLITS)} or None, got {split!r}")
    if is_physionet_ptbxl(path_or_repo_id):
        dataset = build_ptbxl(path_or_repo_id, sampling_rate=sampling_rate, ptbxl_version=ptbxl_version)
        dataset = dataset[split] if split is not None else dataset
        dataset = _to_iterable(dataset) if streaming else dataset
    else:
        dataset = _load(path_or_repo_id, ptbxl_config_name(sampling_rate), split, streaming)
        _map_splits(dataset, lambda part, name: _check_records_rate(part, sampling_rate, path_or_repo_id, name), split)
        dataset = _map_splits(
            dataset,
            lambda part, name: apply_ptbxl_version_to_dataset(part, ptbxl_version, f"{path_or_repo_id} ({name})"),
            split,
        )
        _describe_ptbxl_source(dataset, path_or_repo_id, sampling_rate, split)
    if label_set is not None and drop_unlabeled:
        dataset = _map_splits(dataset, lambda part, _: _drop_unlabeled(part, label_set))
    if label_fraction < 1.0:
        stratify_on = label_set or "superclass"
        dataset = _map_splits(
            dataset,
            lambda part, name: (
                label_fraction_subset(part, label_fraction, stratify_on, seed) if name == "train" else part
            ),
            split,
        )
    return _split_by_node(dataset, rank, world_size)


def load_mimic_iv_ecg(
    path_or_repo_id: str | os.PathLike,
    split: str | None = "train",
    streaming: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> AnyDataset:
    """Load a converted MIMIC-IV-ECG dataset, streaming by default (about 800k ECGs, ~190 GB as float32 Arrow).

    Example (one process of a multi-GPU run):

    ```python
    >>> from accelerate import PartialState
    >>> state = PartialState()
    >>> mimic = load_mimic_iv_ecg("mimic_iv_ecg_merit", rank=state.process_index, world_size=state.num_processes)
    >>> mimic = mimic.shuffle(seed=0, buffer_size=10_000, max_buffer_input_shards=1).with_format("numpy")
    ```

    `max_buffer_input_shards=1` is what pretraining uses (`--shuffle_buffer_input_shards`): with datasets' default of
    10, a `StatefulDataLoader` with 2 or more workers fails to resume such a stream from its `state_dict` (an
    `IndexError` inside datasets 5.2)."""
    if split is not None and split not in MIMIC_SPLITS:
        raise ValueError(f"split must be one of {MIMIC_SPLITS} or None, got {split!r}")
    dataset = _load(path_or_repo_id, MIMIC_CONFIG, split, streaming, folder=MIMIC_OUTPUT_FOLDER)
    return _split_by_node(dataset, rank, world_size)


def load_wfdb_dataset(
    path_or_repo_id: str | os.PathLike,
    split: str | None = None,
    split_column: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    streaming: bool = False,
) -> AnyDataset:
    """Load a converted WFDB folder (`dataset_scripts/wfdb/convert.py`; a folder, a `save_to_disk` folder or a Hub
    id) as train / validation / test (a `DatasetDict`, or one `split`).

    Args:
        split_column: a column holding `train` / `validation` / `test` per record (e.g. kept from the labels CSV
            with `--metadata_columns split`); without it, a seeded split by `split_fractions` that keeps every
            patient in one split (`merit_hf.data.wfdb_folder.split_wfdb_dataset`).
        split_fractions: train, validation and test fractions of the records (summing to 1).
        seed: the seed of that split: the same seed gives the same split.
        streaming: the splits as `IterableDataset`s (the split is drawn on the memory-mapped table first).

    Example:

    ```python
    >>> from merit_hf.data import load_wfdb_dataset
    >>> ludb = load_wfdb_dataset("ludb_merit", split_fractions=(0.7, 0.15, 0.15), seed=0)  # doctest: +SKIP
    >>> ludb["train"].features["rhythm"].feature.names  # doctest: +SKIP
    ```"""
    from .wfdb_folder import WFDB_CONFIG, WFDB_OUTPUT_FOLDER, WFDB_RECORDS_SPLIT, WFDB_SPLITS, split_wfdb_dataset

    if split is not None and split not in WFDB_SPLITS:
        raise ValueError(f"split must be one of {WFDB_SPLITS} or None, got {split!r}")
    records = _load(path_or_repo_id, WFDB_CONFIG, None, False, folder=WFDB_OUTPUT_FOLDER)
    if isinstance(records, DatasetDict):
        if WFDB_RECORDS_SPLIT not in records:
            raise ValueError(
                f"{path_or_repo_id}: no {WFDB_RECORDS_SPLIT!r} split (it has {sorted(records)}); convert the folder with "
                "dataset_scripts/wfdb/convert.py in the merit_hf repository (or merit_hf.data.convert_wfdb_folder)"
            )
        records = records[WFDB_RECORDS_SPLIT]
    dataset = split_wfdb_dataset(records, split_column, split_fractions, seed)
    how = (
        f"column {split_column!r}"
        if split_column
        else f"seeded split {list(split_fractions)} (seed {seed}), patients kept whole"
    )
    data_format = _source_format(Path(path_or_repo_id))
    for part in dataset.values():  # what the splits are travels with them (evaluation results read it)
        previous = [line for line in (part.info.description or "").splitlines() if not line.startswith("WFDB folder ")]
        part.info.description = "\n".join(
            [*previous, f"WFDB folder {path_or_repo_id}: train / validation / test by {how}"]
        )
        # the folder or Hub id as given, as for PTB-XL (not the datasets cache its shards were read into)
        describe_source(part, path_or_repo_id, None, data_format)
    if split is not None:
        dataset = dataset[split]
    return _to_iterable(dataset) if streaming else dataset


def label_fraction_subset(dataset: Dataset, fraction: float, label_set: str, seed: int = 0) -> Dataset:
    """A reproducible, stratified `fraction` of `dataset` (rows kept in their original order).

    Each row is put in the group of its rarest class of `label_set` (counted in `dataset`; rows without a class form
    one group). Rows are shuffled within their group with `seed`. One row of every class group comes first, rarest
    class first, so that a small fraction still has a positive of every class the budget can reach (proportional
    sampling alone reaches a class of g rows only above a fraction of about 0.5 / g). The other rows follow, ranked by
    their position in their group, `(rank + 0.5) / group_size`, ties broken by a seeded draw; the first
    `round(fraction * num_rows)` rows of that one order are kept (at least one). So the subsets are nested (with the
    same seed the 1 % subset lies inside the 10 % subset) and every group is represented in proportion beyond its
    first row.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if label_set not in dataset.column_names:
        raise KeyError(f"no {label_set!r} column to stratify on; the dataset has {dataset.column_names}")
    labels = dataset[label_set][:]
    counts: dict[int, int] = {}
    for row in labels:
        for index in row:
            counts[index] = counts.get(index, 0) + 1
    groups = np.array([min(row, key=lambda index: (counts[index], index)) if row else -1 for row in labels])
    rng = np.random.default_rng(seed)
    rank = np.empty(len(groups), dtype=np.int64)
    size = np.empty(len(groups), dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        rank[rng.permutation(members)] = np.arange(len(members))
        size[members] = len(members)
    first = (rank == 0) & (groups != -1)
    within = np.where(first, size, (rank + 0.5) / size)  # first rows: rarest class first; the rest: by position
    order = np.lexsort((rng.random(len(groups)), within, ~first))
    keep = max(1, round(fraction * len(groups)))
    return dataset.select(np.sort(order[:keep]))


def _load(
    path_or_repo_id: str | os.PathLike, config: str, split: str | None, streaming: bool, folder: str | None = None
) -> AnyDataset:
    """`folder`: the sub-folder of a local converter output (defaults to `config`)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset = load_saved(path)
            if split is not None:
                dataset = dataset[split]
            return _to_iterable(dataset) if streaming else dataset
        data_dir = path / (folder or config)
        if not data_dir.is_dir() and not any(path.glob("*.parquet")):
            found = sorted(child.name for child in path.iterdir() if child.is_dir() and any(child.glob("*.parquet")))
            rates = [name.removesuffix("hz") for name in found if name.endswith("hz") and name[:-2].isdigit()]
            if rates and config.endswith("hz"):  # a PTB-XL conversion at another rate
                raise FileNotFoundError(
                    f"{path}: converted at {' and '.join(rate + ' Hz' for rate in rates)}, not {config[:-2]} Hz (no "
                    f"{data_dir.name}/ folder): pass --sampling_rate {rates[0]} (sampling_rate={rates[0]}), or convert "
                    f"the {config[:-2]} Hz records too"
                )
            raise FileNotFoundError(
                f"{path}: no {data_dir.name}/ folder of Parquet shards (found {found or 'none'}) and no save_to_disk "
                "folder; convert the dataset first (a script in dataset_scripts/ of the merit_hf repository, or "
                "merit_hf.data's convert_ptbxl, convert_mimic_iv_ecg, convert_wfdb_folder)"
            )
        data_dir = data_dir if data_dir.is_dir() else path
        _check_finished(data_dir)
        data_files = {
            name: str(data_dir / f"{name}-*.parquet") for name in _splits_in(data_dir) if split in (None, name)
        }
        if not data_files:
            raise FileNotFoundError(f"{data_dir}: no {split or '{split}'}-*.parquet shards")
        dataset = hf_load_dataset("parquet", data_files=data_files, streaming=streaming)
        return dataset[split] if split is not None else dataset
    if os.path.exists(path):
        raise NotADirectoryError(f"{path}: expected a dataset folder or a Hub dataset id")
    try:
        return hf_load_dataset(str(path_or_repo_id), name=config, split=split, streaming=streaming)
    except (ConnectionError, FileNotFoundError) as error:  # offline, or no such Hub dataset
        clone_only = path.name == "ptbxl_sample"  # the bundled sample the configs name
        sample = (
            "; data/ptbxl_sample, which the configs name, is in a clone of the repository only" if clone_only else ""
        )
        where = "no such folder" if path.is_absolute() else f"no such folder in {Path.cwd()}"
        raise FileNotFoundError(
            f"{path_or_repo_id}: {where}, and no Hub dataset of that id ({error}). Give the dataset's folder (the "
            "probe, evaluation and embedding commands' --dataset, pretraining's --data_dir, report LoRA's "
            "--ptbxl_dir), as downloaded from PhysioNet or converted by the repository's dataset_scripts/ (a "
            f"clone){sample}"
        ) from error


def load_saved(path: str | os.PathLike) -> Dataset | DatasetDict:
    """`datasets.load_from_disk`, and also a folder in which a split was saved with no rows: `save_to_disk` writes
    such a split without a data file, which `load_from_disk` then fails to read back (`IndexError` in datasets 5.2),
    e.g. a PTB-XL subset with no record of fold 10. That split comes back empty, with its saved features."""
    path = Path(path)
    try:
        return load_from_disk(str(path))
    except IndexError:
        if (path / "dataset_dict.json").is_file():
            names = json.loads((path / "dataset_dict.json").read_text())["splits"]
            return DatasetDict({name: _load_split(path / name) for name in names})
        return _load_split(path)


def _load_split(folder: Path) -> Dataset:
    """One `save_to_disk` split folder; one without data files is rebuilt empty from its `dataset_info.json`."""
    if json.loads((folder / "state.json").read_text()).get("_data_files"):
        return Dataset.load_from_disk(str(folder))
    info = DatasetInfo.from_directory(str(folder))
    logger.info("%s: a split saved with no rows; loaded as an empty split", folder)
    return Dataset.from_dict({name: [] for name in info.features}, features=info.features, info=info)


def _check_finished(folder: Path) -> None:
    """A converter's output folder is loaded only when its conversion finished and no shard is missing."""
    from .conversion import PLAN_FILE, REPORT_FILE, SHARD_FILE_PATTERN

    if (folder / PLAN_FILE).exists() and not (folder / REPORT_FILE).exists():  # the report marks it finished
        raise ValueError(
            f"{folder}: an unfinished conversion ({PLAN_FILE} is there, {REPORT_FILE} is not); rerun the same "
            "conversion command to finish it before loading"
        )
    shards: dict[tuple[str, int], set[int]] = {}
    for file in folder.glob("*.parquet"):
        match = SHARD_FILE_PATTERN.fullmatch(file.name)
        if match:
            shards.setdefault((match[1], int(match[3])), set()).add(int(match[2]))
    for (split, count), found in sorted(shards.items()):
        missing = sorted(set(range(count)) - found)
        if missing or len({n for s, n in shards if s == split}) > 1:
            raise ValueError(
                f"{folder}: split {split!r} is incomplete or mixed: shards {missing[:10]} of {count} are missing "
                f"(or shards of two conversions are there); convert it again"
            )


def _splits_in(folder: Path) -> list[str]:
    """Split names of `{split}-*.parquet` files, train / validation / test first."""
    names = {file.name.split("-")[0] for file in folder.glob("*.parquet")}
    return sorted(names, key=lambda name: (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name))


IN_MEMORY_STREAM_SHARDS = 64  # a table built in memory cannot be resharded later: enough for processes x workers


def _to_iterable(dataset: Dataset | DatasetDict) -> IterableDataset | IterableDatasetDict:
    """A split built in memory as a stream of up to `IN_MEMORY_STREAM_SHARDS` contiguous shards (in order), so that
    processes and DataLoader workers each read their own."""
    if isinstance(dataset, DatasetDict):
        return IterableDatasetDict({name: _to_iterable(part) for name, part in dataset.items()})
    if dataset.num_rows == 0:  # datasets cannot cut 0 rows into shards: an empty stream of the same columns
        stream = IterableDataset.from_generator(_no_rows, features=dataset.features)
        stream.info.description = dataset.info.description
        return stream
    return dataset.to_iterable_dataset(num_shards=max(1, min(dataset.num_rows, IN_MEMORY_STREAM_SHARDS)))


def _no_rows():
    """The rows of an empty split (a module-level generator, so that DataLoader workers can unpickle its stream)."""
    yield from ()


def _source_format(path: Path) -> str:
    """How a dataset's folder or Hub id holds it, as `describe_source` records it."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return "a dataset saved with save_to_disk"
    return "converted Parquet shards" if path.is_dir() else "a Hub dataset"


def _describe_ptbxl_source(dataset: AnyDataset, path_or_repo_id, sampling_rate: int, split: str | None) -> None:
    """Write into each split's `info.description` where it was read from (`describe_source`): the folder or Hub id as
    given, and the label threshold its labels were made with, from the conversion's report (a converted folder) or
    from what the split already said (a `save_to_disk` copy of `build_ptbxl`'s output); the results JSON records
    both. The source's format and report are read once, for all its splits."""
    from .conversion import REPORT_FILE

    path = Path(path_or_repo_id)
    from_report, report_threshold = False, None  # a converted folder's report says the threshold of every split
    data_format = _source_format(path)
    if data_format == "converted Parquet shards":
        report = path / ptbxl_config_name(sampling_rate) / REPORT_FILE
        report = report if report.is_file() else path / REPORT_FILE  # shards right in the folder
        if report.is_file():
            from_report = True
            report_threshold = (
                json.loads(report.read_text(encoding="utf-8")).get("settings", {}).get("label_threshold")
            )

    def describe(part: Dataset | IterableDataset, _) -> None:
        threshold = report_threshold if from_report else described_source(part).get("label_threshold")
        describe_source(part, path_or_repo_id, threshold, data_format)

    _map_splits(dataset, describe, split)


def _check_records_rate(part: Dataset | IterableDataset, sampling_rate: int, source, name: str | None) -> None:
    """Refuse a PTB-XL split whose records are not at `sampling_rate`: a converter folder and a Hub repo hold one
    configuration per rate and `sampling_rate` picks it, but a `save_to_disk` folder (or shards right in the folder)
    holds the rate it was built at, which was returned whatever `sampling_rate` asked for. A stream is checked on its
    first record (a PTB-XL split has one rate)."""
    if "sampling_rate" not in (part.column_names or ()):
        return
    if isinstance(part, IterableDataset):
        first = next(iter(part.select_columns(["sampling_rate"]).take(1)), None)
        rates = set() if first is None else {first["sampling_rate"]}
    else:
        rates = set(part.unique("sampling_rate"))
    other = sorted(rate for rate in rates if rate != sampling_rate)
    if other:
        found = " and ".join(f"{rate:g} Hz" for rate in other)
        raise ValueError(
            f"{source}{f' ({name})' if name else ''}: its records are {found}, not the {sampling_rate} Hz that "
            f"sampling_rate={sampling_rate} asks for (the probe's and embedding's --sampling_rate, pretraining's "
            "--source_sampling_rate); a dataset saved with save_to_disk holds the rate it was built at: pass "
            f"--sampling_rate {other[0]:g} (sampling_rate={other[0]:g}), or build it again at {sampling_rate} Hz"
        )


def _map_splits(dataset: AnyDataset, function, split: str | None = None) -> AnyDataset:
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return type(dataset)({name: function(part, name) for name, part in dataset.items()})
    return function(dataset, split)


def _drop_unlabeled(dataset: Dataset | IterableDataset, label_set: str) -> Dataset | IterableDataset:
    if isinstance(dataset, IterableDataset):
        return filter_stream(dataset, functools.partial(rows_with_labels, label_set=label_set))
    keep = [index for index, row in enumerate(dataset[label_set][:]) if row]
    if len(keep) < dataset.num_rows:
        logger.info(
            "dropped %d of %d records with no %s label", dataset.num_rows - len(keep), dataset.num_rows, label_set
        )
    return dataset.select(keep) if len(keep) < dataset.num_rows else dataset


def rows_with_labels(batch, label_set: str) -> list[bool]:
    """`_drop_unlabeled`'s `keep` on a stream's batch (module level: DataLoader workers get the stream pickled)."""
    return [len(labels) > 0 for labels in column_values(batch, label_set)]


def _split_by_node(dataset: AnyDataset, rank: int | None, world_size: int | None) -> AnyDataset:
    if rank is None and world_size is None:
        return dataset
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"rank and world_size go together, with 0 <= rank < world_size; got {rank}, {world_size}")
    return _map_splits(dataset, lambda part, _: _node_part(part, rank, world_size))


def _node_part(part: Dataset | IterableDataset, rank: int, world_size: int) -> Dataset | IterableDataset:
    if isinstance(part, IterableDataset):
        return stream_part(part, rank, world_size)
    if rank >= part.num_rows:  # more processes than records: the last parts are empty (`shard` raised IndexError)
        return part.select([])
    return split_dataset_by_node(part, rank=rank, world_size=world_size)


__all__ = [
    "DATASET_NAMES",
    "label_fraction_subset",
    "load_dataset",
    "load_mimic_iv_ecg",
    "load_ptbxl",
    "load_wfdb_dataset",
]
