"""Turning records into dataset rows, in memory or as resumable Parquet shards; the conversion report.

Both dataset builders (PTB-XL, MIMIC-IV-ECG) hand this module a list of tasks (one per record) and a function that
turns one task into a row. A record whose reading raises `ValueError` (`EcgInputError`, `ScpCodeError`: the message
names the file and the problem) becomes a `RecordFailure` in the `ConversionReport`; it is never dropped silently.
Any other exception is a bug and stops the conversion.

Sharded conversion (`write_parquet_shards`) is resumable: the tasks are cut into shards in a fixed order, written to
`conversion_plan.json` on the first run; each shard is written to a temporary file and renamed when complete (the
rename is the commit), after its failures were saved beside it. A rerun after a crash checks that the plan still
matches the input, skips the committed shards and redoes the others, so no record is lost or written twice. A folder
whose `conversion_report.json` exists is finished and is only replaced when `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import Array2D, Dataset, Features, List, Value
from datasets.arrow_writer import get_parquet_column_options
from tqdm.auto import tqdm

from ..models.merit.configuration_merit import STANDARD_LEAD_NAMES


def parse_number(value: Any, kind: type) -> int | float | str | None:
    """A metadata cell as `kind` (`int` or `float`); `None` when blank. A cell that is not one (text, NaN as text, or
    a fraction for `int`) comes back as its text, for the record's reader to refuse by name: one such cell makes
    pandas read its whole column as text ('15709.0'), so every cell is parsed on its own."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number) or (kind is int and not number.is_integer()):
        return str(value)
    return kind(number)


def ecg_report_features(num_samples: int) -> dict:
    """The columns every merit_hf ECG dataset shares (PTB-XL, MIMIC-IV-ECG), so that one collator reads them all:
    the signal as float32 `(num_samples, 12)` in the standard lead order, its lead names and rate, and the report."""
    return {
        "ecg_id": Value("int32"),
        "patient_id": Value("int32"),
        "signal": Array2D(shape=(num_samples, len(STANDARD_LEAD_NAMES)), dtype="float32"),
        "lead_names": List(Value("string")),
        "sampling_rate": Value("int32"),
        "report": Value("string"),
        "report_language": Value("string"),
    }


logger = logging.getLogger(__name__)

PLAN_FILE = "conversion_plan.json"
REPORT_FILE = "conversion_report.json"
PROGRESS_DIR = ".progress"
# `ShardPaths.parquet` names: split, shard index, shard count (the loaders parse them to find a missing shard).
SHARD_FILE_PATTERN = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.parquet")
PARQUET_ROWS_PER_GROUP = 100  # streaming reads a row group at a time: 100 ECGs at 500 Hz are 24 MB as float32
PARQUET_COMPRESSION = "zstd"


@dataclass
class RecordFailure:
    """A record that could not be converted: which one and why (the reader's message)."""

    record: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion read, wrote and could not read."""

    total: int = 0
    written: int = 0
    failures: list[RecordFailure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def merge(self, other: ConversionReport) -> ConversionReport:
        return ConversionReport(self.total + other.total, self.written + other.written, self.failures + other.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "written": self.written, "failed": self.failed,
                "failures": [asdict(failure) for failure in self.failures]}  # fmt: skip

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), self.to_dict())

    def command_status(self, output_dir: str | os.PathLike, question: str) -> int:
        """A conversion command's exit status: 0, or 1 after an error on stderr when no record was written (an empty
        output still loads, so a run that read nothing must not look like one that worked). `question` names what
        to check, e.g. whether the root folder holds the waveforms."""
        if self.written:
            return 0
        print(
            f"error: no record was written ({self.failed} of {self.total} failed; the reasons are in the "
            f"{REPORT_FILE} under {output_dir}): {question}",
            file=sys.stderr,
        )
        return 1

    def summary(self, max_failures: int = 20) -> str:
        """One line of counts, then one line per failure (the first `max_failures`)."""
        lines = [f"{self.written}/{self.total} records written, {self.failed} failed"]
        lines += [f"  {failure.reason}" for failure in self.failures[:max_failures]]
        if self.failed > max_failures:
            lines.append(f"  ... and {self.failed - max_failures} more (all are in the conversion report)")
        return "\n".join(lines)


def convert_records(
    tasks: Sequence[Any], row_fn: Callable[[Any], dict], record_name: Callable[[Any], str]
) -> tuple[list[dict], list[RecordFailure]]:
    """Rows of the tasks that read, and a failure (record + reason) for each task that raised `ValueError`."""
    rows, failures = [], []
    for task in tasks:
        try:
            rows.append(row_fn(task))
        except ValueError as error:
            failures.append(RecordFailure(record_name(task), str(error)))
    return rows, failures


def read_rows(
    tasks: Sequence[Any],
    row_fn: Callable[[Any], dict],
    record_name: Callable[[Any], str],
    num_proc: int = 1,
    chunk_size: int = 64,
    desc: str = "reading records",
) -> tuple[list[dict], ConversionReport]:
    """Convert the tasks in memory (in task order), over `num_proc` processes."""
    chunks = [tasks[start : start + chunk_size] for start in range(0, len(tasks), chunk_size)]
    work = partial(convert_records, row_fn=row_fn, record_name=record_name)
    rows, failures = [], []
    with tqdm(total=len(tasks), desc=desc, unit="rec", disable=len(tasks) < 1000) as progress:
        for chunk_rows, chunk_failures in _map(work, chunks, num_proc):
            rows += chunk_rows
            failures += chunk_failures
            progress.update(len(chunk_rows) + len(chunk_failures))
    return rows, ConversionReport(total=len(tasks), written=len(rows), failures=failures)


def raise_first_failure(
    tasks: Sequence[Any], row_fn: Callable[[Any], dict], record_name: Callable[[Any], str], report: ConversionReport
) -> None:
    """Raise the first failure of `report` with its own exception (`EcgInputError`, `ScpCodeError`, ...): the task
    is read again here, in the calling process, so the type and message are the reader's."""
    if not report.failures:
        return
    failure = report.failures[0]
    row_fn(next(task for task in tasks if record_name(task) == failure.record))
    raise ValueError(failure.reason)  # the record read this time (a file changed during the conversion)


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a finished conversion unless `overwrite`; keep a partial one (to resume) unless `overwrite`."""
    output_dir = Path(output_dir)
    if (output_dir / REPORT_FILE).exists():
        if not overwrite:
            raise FileExistsError(
                f"{output_dir}: a finished conversion is already there ({REPORT_FILE}); pass overwrite=True "
                "(--overwrite) to replace it"
            )
        shutil.rmtree(output_dir)
    elif overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    elif output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / PLAN_FILE).exists():
        raise FileExistsError(f"{output_dir}: not empty and not a conversion in progress; choose an empty folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def write_parquet_shards(
    tasks: dict[str, Sequence[Any]],
    row_fn: Callable[[Any], dict],
    record_name: Callable[[Any], str],
    features: Features,
    output_dir: str | os.PathLike,
    records_per_shard: int = 1000,
    num_proc: int = 1,
    overwrite: bool = False,
    desc: str = "converting",
    settings: dict[str, Any] | None = None,
    root: str | os.PathLike | None = None,
) -> ConversionReport:
    """Write `tasks` (`{split: [task, ...]}`) as `output_dir/{split}-{i:05d}-of-{n:05d}.parquet`, resumably (a split
    with no task writes no file: an empty Parquet file breaks `datasets`' Parquet builder).

    `settings` (JSON values, e.g. a label threshold) are what else decides the rows. A resumed conversion must have the
    same records (their content: metadata and reports), `features`, `records_per_shard` and `settings` as the
    interrupted one, so that no dataset mixes two rule sets; the settings are kept in the finished report.

    `root` is the folder the records are read from: the failures written (record names and reasons) name files
    relative to it (`files/p1000/.../40689238`, as the source names its records), so that no local path of the
    converting machine reaches the report, which is uploaded with the shards.

    Returns the report of the whole conversion (also saved as `conversion_report.json`, which marks the folder as
    finished).
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    output_dir = prepare_output_dir(output_dir, overwrite)
    plan = {
        split: {
            "records": len(split_tasks),
            "num_shards": -(-len(split_tasks) // records_per_shard),  # an empty split writes no file
            "records_sha256": _sha256(split_tasks),
        }
        for split, split_tasks in tasks.items()
    }
    plan = {
        "records_per_shard": records_per_shard,
        "settings": settings or {},
        "features_sha256": _sha256(features.to_dict()),
        "splits": plan,
    }
    plan_path = output_dir / PLAN_FILE
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            differ = sorted(key for key in plan.keys() | previous.keys() if plan.get(key) != previous.get(key))
            details = {key: (previous.get("settings", {}).get(key), value) for key, value in plan["settings"].items()}
            changed = {key: pair for key, pair in details.items() if pair[0] != pair[1]}
            raise ValueError(
                f"{plan_path}: the interrupted conversion differs in {differ}"
                + (f" (settings before -> now: {changed})" if changed else "")
                + "; rerun it with its settings and input to resume, or pass overwrite=True to start again"
            )
        logger.info("%s: resuming an interrupted conversion", output_dir)
    else:
        _write_json_atomic(plan_path, plan)
    (output_dir / PROGRESS_DIR).mkdir(exist_ok=True)

    jobs = []
    for split, split_tasks in tasks.items():
        num_shards = plan["splits"][split]["num_shards"]
        for index in range(num_shards):
            shard = ShardPaths(output_dir, split, index, num_shards)
            if not shard.parquet.exists():
                jobs.append((shard, split_tasks[index * records_per_shard : (index + 1) * records_per_shard]))
    total = sum(len(split_tasks) for split_tasks in tasks.values())
    done = total - sum(len(job_tasks) for _, job_tasks in jobs)
    work = partial(_write_shard, row_fn=row_fn, record_name=record_name, features=features, root=root)
    with tqdm(total=total, initial=done, desc=desc, unit="rec") as progress:
        for written in _map(work, jobs, num_proc):
            progress.update(written)

    report = ConversionReport()
    for split in tasks:
        num_shards = plan["splits"][split]["num_shards"]
        for index in range(num_shards):
            saved = json.loads(ShardPaths(output_dir, split, index, num_shards).failures.read_text())
            failures = [RecordFailure(**failure) for failure in saved["failures"]]
            report = report.merge(ConversionReport(saved["total"], saved["total"] - len(failures), failures))
    # The report is the commit: until it is written, a rerun still finds the plan and the shards' failures to finish
    # from (removing them first left a run killed here unable to resume or to load).
    _write_json_atomic(output_dir / REPORT_FILE, {**report.to_dict(), "settings": plan["settings"]})
    plan_path.unlink()
    shutil.rmtree(output_dir / PROGRESS_DIR)
    if report.failures:
        logger.warning("%s: %s", output_dir, report.summary())
    return report


def _sha256(value: Any) -> str:
    """Of a JSON rendering; values JSON cannot hold (NaN, timestamps) go through `str`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ShardPaths:
    output_dir: Path
    split: str
    index: int
    num_shards: int

    @property
    def parquet(self) -> Path:
        return self.output_dir / f"{self.split}-{self.index:05d}-of-{self.num_shards:05d}.parquet"

    @property
    def failures(self) -> Path:
        return self.output_dir / PROGRESS_DIR / f"{self.split}-{self.index:05d}.json"


def relative_failure(failure: RecordFailure, root: str | os.PathLike | None) -> RecordFailure:
    """`failure` with the paths under `root` written relative to it (its record name and, in its reason, every path
    that starts with `root`); an absolute `root` left alone in the reason is written as its last component."""
    if root is None or str(Path(root)) == ".":
        return failure
    root = str(Path(root))
    # `root/` where a path starts (not inside a longer one: `root` "data" leaves "metadata/x" alone)
    under_root = re.compile(r"(?<![\w.~/\\-])" + re.escape(root.rstrip(os.sep) + os.sep))
    record, reason = under_root.sub("", failure.record), under_root.sub("", failure.reason)
    if os.path.isabs(root):
        record, reason = record.replace(root, Path(root).name), reason.replace(root, Path(root).name)
    return RecordFailure(record, reason)


def _write_shard(job: tuple[ShardPaths, Sequence[Any]], row_fn, record_name, features: Features, root=None) -> int:
    shard, tasks = job
    rows, failures = convert_records(tasks, row_fn, record_name)
    failures = [relative_failure(failure, root) for failure in failures]
    report = ConversionReport(len(tasks), len(rows), failures)
    _write_json_atomic(shard.failures, report.to_dict())
    temporary = shard.parquet.with_name(shard.parquet.name + ".tmp")
    write_dataset_parquet(rows_to_dataset(rows, features), temporary)
    os.replace(temporary, shard.parquet)
    return len(tasks)


def rows_to_dataset(rows: list[dict], features: Features) -> Dataset:
    """An in-memory `Dataset` of `rows` with `features` (also when there are no rows)."""
    if not rows:
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return Dataset.from_list(rows, features=features)


def write_dataset_parquet(dataset: Dataset, path: str | os.PathLike) -> None:
    """`dataset.to_parquet` with zstd instead of snappy, in row groups of `PARQUET_ROWS_PER_GROUP`; the `Features`
    travel in the schema metadata. `datasets`' dictionary encoding stays on: ECG samples lie on the ADC grid
    (0.001 mV in PTB-XL), so a record has few distinct values and the float32 signal ends up smaller than the
    int16 `.dat` file (17 kB against 24 kB for a PTB-XL 100 Hz record)."""
    schema = dataset.features.arrow_schema
    options = get_parquet_column_options(dataset.features, schema)
    options["compression"] = dict.fromkeys(options["compression"], PARQUET_COMPRESSION)
    with pq.ParquetWriter(str(path), schema=schema, **options) as writer:
        writer.write_table(dataset.data.table.cast(schema), row_group_size=PARQUET_ROWS_PER_GROUP)


def _map(function: Callable, items: Sequence[Any], num_proc: int):
    if num_proc <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(max_workers=min(num_proc, len(items))) as pool:
        yield from pool.map(function, items)


def _write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


__all__ = [
    "ConversionReport",
    "RecordFailure",
    "parse_number",
    "prepare_output_dir",
    "raise_first_failure",
    "read_rows",
    "rows_to_dataset",
    "write_dataset_parquet",
    "write_parquet_shards",
]
