"""Any folder of WFDB records (a hospital export, LUDB, PhysioNet/CinC 2021, CPSC 2021, ...) as a `datasets` table.

Records are found by their `.hea` header, in any sub-folder (a multi-segment record by its master header, its segments
joined into one signal and never listed as records of their own); each is read and validated as PTB-XL records are
(`merit_hf.models.wfdb_io.read_ecg_record`: header and signal file agree, known units converted to mV, no NaN/inf,
a plausible amplitude) but kept **as recorded**: any lead subset, in the header's order and spelling, at the header's
sampling rate, at full length. Records that cannot be read are listed with file and reason in
`conversion_report.json` (`merit_hf.data.conversion`, the machinery the PTB-XL converter uses: resumable Parquet
shards, a finished output never overwritten unless asked).

Labels and reports come from CSV files keyed by an id column. An id matches a record by its path relative to the
folder without extension (`patients/17/rec01`), or by its file name (`rec01`) when that name is unique in the folder.
Each label column becomes a multi-label set (`List(ClassLabel)`, class names sorted), a cell holding one class name or
several separated by `label_separator`; a record without a CSV row has no label (counted and logged, and kept: it can
still be embedded).

Row schema:

| column | type | from |
| --- | --- | --- |
| `ecg_id` | int32 | position of the record in the sorted list of headers |
| `record` | str | path relative to the folder, without extension |
| `patient_id` | str (null if no `patient_column`) | the labels CSV |
| `signal` | float32 `(num_samples, num_leads)`, mV: `Array2D((None, num_leads))` when every header has the same number of leads, else nested lists | the record |
| `lead_names`, `sampling_rate` | list of str, float64 | the header |
| `report`, `report_language` | str | the reports CSV (`""` without one) |
| `header_comments` | str | the header's `#` comment lines (CinC 2021 keeps `Dx`, `Age`, `Sex` there) |
| one column per label column | `List(ClassLabel)` | the labels CSV |
| one column per metadata column | str | the labels CSV (e.g. a `fold` or `split` column) |

The converter writes one split, `records` (`data/records-*.parquet`); `merit_hf.data.load_wfdb_dataset` cuts it into
train / validation / test by a column of the user's or by a seeded split that keeps each patient in one split.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, List, Value

from ..models.merit.wfdb_header_merit import WfdbHeaderError, parse_multi_segment_header, parse_wfdb_header
from ..models.wfdb_io import read_ecg_record
from .conversion import ConversionReport, raise_first_failure, read_rows, rows_to_dataset, write_parquet_shards
from .reports import clean_report, report_language

logger = logging.getLogger(__name__)

WFDB_OUTPUT_FOLDER = "data"
WFDB_CONFIG = "default"
WFDB_RECORDS_SPLIT = "records"  # not "train": the converted folder holds every record, split when loaded
WFDB_SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
FIXED_COLUMNS = (
    "ecg_id", "record", "patient_id", "signal", "lead_names", "sampling_rate", "report", "report_language",
    "header_comments",
)  # fmt: skip


@dataclass(frozen=True)
class WfdbFolderSpec:
    """Where the records are and which CSV columns become labels, metadata, patient ids and reports."""

    wfdb_dir: str
    labels_csv: str | None = None
    id_column: str | None = None
    label_columns: tuple[str, ...] = ()
    label_separator: str = ","
    patient_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    reports_csv: str | None = None
    report_column: str = "report"

    def __post_init__(self):
        if (self.labels_csv or self.reports_csv) and not self.id_column:
            raise ValueError("id_column is required with labels_csv or reports_csv: the column that names the record")
        if (self.label_columns or self.metadata_columns or self.patient_column) and not self.labels_csv:
            raise ValueError("label_columns, metadata_columns and patient_column need labels_csv")
        clashes = sorted(set(self.label_columns + self.metadata_columns) & set(FIXED_COLUMNS))
        if clashes:
            raise ValueError(f"label/metadata columns {clashes} clash with the dataset's own columns {FIXED_COLUMNS}")
        both = sorted(set(self.label_columns) & set(self.metadata_columns))
        if both:
            raise ValueError(f"columns {both} are given both as label_columns and as metadata_columns")
        if not self.label_separator:
            raise ValueError("label_separator must not be empty")


@dataclass(frozen=True)
class WfdbHeaderSummary:
    """What a folder scan reads from one header: the segments a multi-segment master header lists (as records
    relative to the folder; `()` for any other header), the number of signals its record line declares, and its `#`
    comment lines (CinC 2021 keeps `Dx`, `Age`, `Sex` there)."""

    segments: tuple[str, ...] = ()
    num_leads: int = 0
    header_comments: str = ""


def scan_wfdb_headers(wfdb_dir: str | os.PathLike) -> dict[str, WfdbHeaderSummary]:
    """Every record under `wfdb_dir` (found by its `.hea` header, hidden folders skipped), as paths relative to the
    folder without extension, sorted, each with its header's `WfdbHeaderSummary`: every header is read and parsed
    once. A multi-segment record is one record, its master header: the segments it lists are read as its parts
    (`read_wfdb_record`), never as records of their own."""
    root = Path(wfdb_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of WFDB records")
    headers = sorted(
        header.relative_to(root).with_suffix("").as_posix()
        for header in root.rglob("*.hea")
        if not any(part.startswith(".") for part in header.relative_to(root).parts)
    )
    if not headers:
        raise FileNotFoundError(f"{root}: no WFDB header (*.hea) in this folder or below it")
    summaries = {record: _summarise_header(root, record) for record in headers}
    segments = {segment for summary in summaries.values() for segment in summary.segments}
    masters = [record for record, summary in summaries.items() if summary.segments]
    if masters:
        logger.info(
            "%s: %d multi-segment record(s) read as one record each (e.g. %s, segments %s); their %d segment "
            "header(s) are not records of their own",
            root, len(masters), masters[0], list(summaries[masters[0]].segments), len(segments),
        )  # fmt: skip
    return {record: summary for record, summary in summaries.items() if record not in segments}


def find_wfdb_records(wfdb_dir: str | os.PathLike) -> list[str]:
    """Every record under `wfdb_dir`, as paths relative to the folder without extension, sorted (`scan_wfdb_headers`:
    hidden folders skipped, a multi-segment record listed once, by its master header)."""
    return list(scan_wfdb_headers(wfdb_dir))


@dataclass(frozen=True)
class WfdbRecordReader:
    """Turns one record task into a dataset row, leads and rate as recorded (picklable, for worker processes)."""

    root: Path
    label_columns: tuple[str, ...] = ()
    metadata_columns: tuple[str, ...] = ()

    def record_name(self, task: dict[str, Any]) -> str:
        return str(self.root / task["record"])

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        record = read_ecg_record(self.record_name(task), lead_names=None)
        report = task["report"]
        return {
            "ecg_id": task["ecg_id"],
            "record": task["record"],
            "patient_id": task["patient_id"],
            "signal": record["signal"],
            "lead_names": record["lead_names"],
            "sampling_rate": float(record["sampling_rate"]),
            "report": report,
            "report_language": report_language(report) if report else "",
            "header_comments": task["header_comments"],
            **{column: task["labels"][column] for column in self.label_columns},
            **{column: task["metadata"][column] for column in self.metadata_columns},
        }


def wfdb_folder_tasks(spec: WfdbFolderSpec) -> tuple[list[dict[str, Any]], dict[str, list[str]], set[int], dict]:
    """One task per record (its CSV label indices, metadata, report, header comments); the class names of every
    label column; the numbers of leads the headers declare; and counts of what did not match (for the report)."""
    root = Path(spec.wfdb_dir)
    headers = scan_wfdb_headers(root)
    records = list(headers)
    labels_rows, labels_ids_without_record = (
        _csv_rows(spec.labels_csv, spec.id_column, records) if spec.labels_csv else ({}, [])
    )
    reports, reports_ids_without_record = (
        _csv_rows(spec.reports_csv, spec.id_column, records) if spec.reports_csv else ({}, [])
    )
    columns = (*spec.label_columns, *spec.metadata_columns, *([spec.patient_column] if spec.patient_column else []))
    _require_columns(spec.labels_csv, labels_rows, columns)
    _require_columns(spec.reports_csv, reports, (spec.report_column,) if spec.reports_csv else ())
    class_names = {
        column: sorted({name for row in labels_rows.values() for name in _split_labels(row[column], spec)})
        for column in spec.label_columns
    }
    tasks, lead_counts = [], set()
    for ecg_id, record in enumerate(records):
        header = headers[record]
        if header.num_leads:
            lead_counts.add(header.num_leads)
        row = labels_rows.get(record, {})
        tasks.append(
            {
                "ecg_id": ecg_id,
                "record": record,
                "patient_id": _text(row.get(spec.patient_column)) if spec.patient_column else None,
                "labels": {
                    column: [class_names[column].index(name) for name in _split_labels(row.get(column), spec)]
                    for column in spec.label_columns
                },
                "metadata": {column: _text(row.get(column)) for column in spec.metadata_columns},
                "report": clean_report(_text(reports.get(record, {}).get(spec.report_column)) or ""),
                "num_leads": header.num_leads,
                "header_comments": header.header_comments,
            }
        )
    unmatched = {
        "records_without_labels_row": sum(record not in labels_rows for record in records) if spec.labels_csv else 0,
        "records_without_report": sum(not task["report"] for task in tasks) if spec.reports_csv else 0,
        "labels_csv_ids_without_record": len(labels_ids_without_record),
        "reports_csv_ids_without_record": len(reports_ids_without_record),
    }
    for what, count in unmatched.items():
        if count:
            logger.warning("%s: %d of %d records: %s", root, count, len(records), what.replace("_", " "))
    return tasks, class_names, lead_counts, unmatched


def wfdb_folder_features(
    class_names: dict[str, list[str]], lead_counts: set[int], metadata_columns: Sequence[str] = ()
) -> Features:
    """The explicit `Features` of a converted WFDB folder: `signal` is `Array2D((None, num_leads))` when every header
    declares the same number of leads (fast to read as arrays), else nested lists (any lead count per row)."""
    signal = (
        Array2D(shape=(None, next(iter(lead_counts))), dtype="float32")
        if len(lead_counts) == 1
        else List(List(Value("float32")))
    )
    return Features(
        {
            "ecg_id": Value("int32"),
            "record": Value("string"),
            "patient_id": Value("string"),
            "signal": signal,
            "lead_names": List(Value("string")),
            "sampling_rate": Value("float64"),
            "report": Value("string"),
            "report_language": Value("string"),
            "header_comments": Value("string"),
            **{column: List(ClassLabel(names=names)) for column, names in class_names.items()},
            **{column: Value("string") for column in metadata_columns},
        }
    )


def build_wfdb_dataset(
    spec: WfdbFolderSpec, num_proc: int = 1, on_error: str = "raise", return_report: bool = False
) -> Dataset | tuple[Dataset, ConversionReport]:
    """Read a WFDB folder in memory as one `Dataset` (small folders and tests; `convert_wfdb_folder` for large ones).
    `on_error`: `"raise"` (the first unreadable record raises `EcgInputError` naming it) or `"skip"` (left out,
    logged and counted)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    tasks, class_names, lead_counts, _ = wfdb_folder_tasks(spec)
    reader = WfdbRecordReader(Path(spec.wfdb_dir), spec.label_columns, spec.metadata_columns)
    rows, report = read_rows(tasks, reader, reader.record_name, num_proc=num_proc, desc="WFDB records")
    if on_error == "raise":
        raise_first_failure(tasks, reader, reader.record_name, report)
    if report.failures:
        logger.warning("%s: %s", spec.wfdb_dir, report.summary())
    dataset = rows_to_dataset(rows, wfdb_folder_features(class_names, lead_counts, spec.metadata_columns))
    return (dataset, report) if return_report else dataset


def convert_wfdb_folder(
    spec: WfdbFolderSpec,
    output_dir: str | os.PathLike,
    num_proc: int = 1,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert a WFDB folder to `output_dir/data/records-*.parquet` (one split, `records`).

    Resumable after a crash (rerun the same command), refuses to replace a finished conversion unless
    `overwrite=True`. Unreadable records are listed (file + reason, named relative to `wfdb_dir`) in
    `output_dir/data/conversion_report.json`, whose `settings` also keep the CSV options and how many records had no labels row or report.
    """
    tasks, class_names, lead_counts, unmatched = wfdb_folder_tasks(spec)
    reader = WfdbRecordReader(Path(spec.wfdb_dir), spec.label_columns, spec.metadata_columns)
    settings = {
        key: (list(value) if isinstance(value, tuple) else value)
        for key, value in vars(spec).items()
        if key != "wfdb_dir"
    }
    for key in ("labels_csv", "reports_csv"):  # the file, not where it lies on this machine (the report is uploaded)
        if settings[key] is not None:
            settings[key] = Path(settings[key]).name
    return write_parquet_shards(
        {WFDB_RECORDS_SPLIT: tasks},
        row_fn=reader,
        record_name=reader.record_name,
        features=wfdb_folder_features(class_names, lead_counts, spec.metadata_columns),
        output_dir=Path(output_dir) / WFDB_OUTPUT_FOLDER,
        records_per_shard=records_per_shard,
        num_proc=num_proc,
        overwrite=overwrite,
        desc="WFDB records",
        settings={**settings, **unmatched},
        root=spec.wfdb_dir,
    )


def split_wfdb_dataset(
    dataset: Dataset,
    split_column: str | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> DatasetDict:
    """`train` / `validation` / `test` of a converted WFDB folder.

    With `split_column`, a column whose values are `train`, `validation` or `test` (e.g. a metadata column of the
    labels CSV) decides; any other value raises, naming the record. Otherwise a seeded random split with
    `split_fractions` (of records): whole patients go to one split when `patient_id` is known (records of one
    patient in train and test would inflate every metric), single records otherwise. Rows keep their order.
    """
    if split_column is not None:
        if split_column not in dataset.column_names:
            raise KeyError(f"split_column {split_column!r} is not a column of the dataset ({dataset.column_names})")
        values = dataset[split_column]
        bad = [(record, value) for record, value in zip(dataset["record"], values) if value not in WFDB_SPLITS]
        if bad:
            raise ValueError(
                f"split_column {split_column!r}: record {bad[0][0]} has {bad[0][1]!r} ({len(bad)} such records); "
                f"every value must be one of {WFDB_SPLITS}"
            )
        assignment = np.asarray(values, dtype=object)
    else:
        assignment = _seeded_split(dataset, split_fractions, seed)
    return DatasetDict({name: dataset.select(np.flatnonzero(assignment == name)) for name in WFDB_SPLITS})


def _seeded_split(dataset: Dataset, split_fractions: Sequence[float], seed: int) -> np.ndarray:
    fractions = [float(fraction) for fraction in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be three fractions (train, validation, test) summing to 1, got "
                         f"{list(split_fractions)}")  # fmt: skip
    groups = [
        f"patient {patient}" if patient is not None else f"record {record}"
        for patient, record in zip(dataset["patient_id"], dataset["record"])
    ]
    names, group_of_row, sizes = np.unique(np.asarray(groups, dtype=object), return_inverse=True, return_counts=True)
    # Groups in a seeded order, each to the split furthest below its target (ties: train, validation, test), so that
    # a small split still gets a patient when patients hold many records.
    deficit = np.asarray(fractions) * len(groups)
    split_of_group = np.empty(len(names), dtype=object)
    for group in np.random.default_rng(seed).permutation(len(names)):
        chosen = int(np.argmax(deficit))
        split_of_group[group] = WFDB_SPLITS[chosen]
        deficit[chosen] -= sizes[group]
    return split_of_group[group_of_row]


def _summarise_header(root: Path, record: str) -> WfdbHeaderSummary:
    """`record`'s header read once: its segments if it is a multi-segment master header, its lead count and its
    comments. Parsed by the header(5) grammar (`wfdb_header_merit`, which the record reader uses too); the lead count
    and comments are then what `wfdb.rdheader` gives for the header: its record line's number of signals, and its
    comment lines read as ASCII (other characters dropped) without their `#`. A header that the grammar refuses goes to
    `wfdb.rdheader` itself (whose parser is the slow part of a folder scan), and one that neither reads has no
    segments, no lead count and no comments: the record reader raises its own error for it."""
    try:
        raw = (root / f"{record}.hea").read_bytes()
        text = raw.decode("utf-8")
        master = parse_multi_segment_header(text)
        num_leads = master.num_signals if master is not None else len(parse_wfdb_header(text).signals)
    except (OSError, UnicodeDecodeError, WfdbHeaderError):
        return _summarise_with_wfdb(root, record)
    lines = (line.strip() for line in raw.decode("ascii", errors="ignore").splitlines())
    comments = "\n".join(line.strip(" \t#").strip() for line in lines if line.startswith("#"))
    if master is None:
        return WfdbHeaderSummary((), num_leads, comments)
    folder = Path(record).parent
    segments = tuple((folder / name).as_posix() for name, _ in master.segments if name != "~")
    return WfdbHeaderSummary(segments, num_leads, comments)


def _summarise_with_wfdb(root: Path, record: str) -> WfdbHeaderSummary:
    """The lead count and comments `wfdb.rdheader` reads from a header outside the grammar (no segments: a master
    header the grammar refuses is no multi-segment record; the record reader says why)."""
    import wfdb

    try:
        header = wfdb.rdheader(str(root / record))
    except Exception:  # reported when the record is read, with the reader's message
        return WfdbHeaderSummary()
    comments = "\n".join(str(line).strip() for line in header.comments or [])
    return WfdbHeaderSummary((), int(header.n_sig or 0), comments)


def _csv_rows(
    path: str | os.PathLike, id_column: str, records: list[str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`{record: csv row}` and the ids that match no record; ids match a relative record path, or a file name that is
    unique in the folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    # only an empty cell is missing: pandas' default would also read "NA", "None", "null", "nan" ... as missing and
    # drop such a label or id without a word (the class "NA" would vanish)
    table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if id_column not in table.columns:
        raise ValueError(f"{path}: no id column {id_column!r}; its columns are {list(table.columns)}")
    by_name: dict[str, list[str]] = {}
    for record in records:
        by_name.setdefault(record.rsplit("/", 1)[-1], []).append(record)
    rows, unknown, known = {}, [], set(records)
    for row in table.to_dict("records"):
        key = str(row[id_column]).strip()
        key = key[: -len(".hea")] if key.lower().endswith((".hea", ".dat")) else key
        if key in by_name and len(by_name[key]) > 1 and key not in known:
            raise ValueError(f"{path}: id {key!r} names several records {by_name[key][:5]}; use relative paths")
        record = key if key in known else (by_name.get(key) or [None])[0]
        if record is None:
            unknown.append(key)
            continue
        if record in rows:
            raise ValueError(f"{path}: record {record} has two rows (id {key!r})")
        rows[record] = row
    if unknown:
        logger.warning("%s: %d id(s) match no record, e.g. %s", path, len(unknown), unknown[:5])
    return rows, unknown


def _require_columns(path, rows: dict[str, dict], columns: Sequence[str]) -> None:
    if not rows:
        if path is not None:
            raise ValueError(f"{path}: no row matches a record of the folder (check the id column)")
        return
    missing = [column for column in columns if column not in next(iter(rows.values()))]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; it has {list(next(iter(rows.values())))}")


def _split_labels(value: Any, spec: WfdbFolderSpec) -> list[str]:
    text = _text(value)
    if text is None:
        return []
    return sorted({name.strip() for name in text.split(spec.label_separator) if name.strip()})


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip()


__all__ = [
    "WFDB_SPLITS",
    "WfdbFolderSpec",
    "WfdbRecordReader",
    "build_wfdb_dataset",
    "convert_wfdb_folder",
    "find_wfdb_records",
    "split_wfdb_dataset",
    "wfdb_folder_features",
    "wfdb_folder_tasks",
]
