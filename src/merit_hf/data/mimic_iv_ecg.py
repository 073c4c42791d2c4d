"""MIMIC-IV-ECG v1.0 (Gow et al. 2023, PhysioNet, ODbL 1.0) as a `datasets` table of ECG-report pairs.

Input, the PhysioNet layout: `record_list.csv` (one row per ECG: `subject_id`, `study_id`, `file_name`, `ecg_time`,
`path`), `machine_measurements.csv` (per `study_id`: `cart_id`, the machine report in `report_0..report_17`,
`bandwidth`, `filtering` and the interval / axis measurements) and the records
`files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}` (12 leads, 500 Hz, 10 s). One split, `train`.

Row schema, shared with PTB-XL where the fields exist:

| column | type | from |
| --- | --- | --- |
| `ecg_id` | int32 | `study_id` |
| `patient_id` | int32 | `subject_id` |
| `signal` | `Array2D((5000, 12), float32)`, mV | the record, leads reordered to `I II III aVR aVL aVF V1-V6` |
| `lead_names`, `sampling_rate` | list of str, int32 | |
| `report`, `report_language` | str | `report_0..report_17` joined (`merit_hf.data.reports`), `"en"` (`""` if empty) |
| `ecg_time`, `path`, `bandwidth`, `filtering` | str | |
| `cart_id` | int32 | |
| `rr_interval`, `p_onset`, `p_end`, `qrs_onset`, `qrs_end`, `t_end`, `p_axis`, `qrs_axis`, `t_axis` | float32 | as given (MIMIC writes 29999 for "not measured") |

A record with no `machine_measurements.csv` row gets an empty report and null measurements; their number is logged.
Repeated identical `machine_measurements.csv` rows of a study count once; rows of one study that differ are refused
(`ValueError` naming the study_ids). A measurement that is not a number fails its record (named with its study_id),
which `on_error="skip"` leaves out.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset, Features, Value

from ..models.wfdb_io import read_ecg_record
from .conversion import (
    ConversionReport,
    ecg_report_features,
    parse_number,
    raise_first_failure,
    read_rows,
    rows_to_dataset,
    write_parquet_shards,
)
from .reports import MIMIC_REPORT_COLUMNS, join_mimic_report

logger = logging.getLogger(__name__)

LEAD_NAMES_MIMIC = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_SAMPLING_RATE = 500
MIMIC_NUM_SAMPLES = 5000
MIMIC_OUTPUT_FOLDER = "data"
RECORD_LIST_FILE = "record_list.csv"
MEASUREMENTS_FILE = "machine_measurements.csv"
RECORD_LIST_COLUMNS = ("subject_id", "study_id", "ecg_time", "path")
MEASUREMENT_TEXT_COLUMNS = ("bandwidth", "filtering")
MEASUREMENT_NUMBER_COLUMNS = (
    "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end", "p_axis", "qrs_axis", "t_axis",
)  # fmt: skip
MEASUREMENT_NUMBERS = {"cart_id": int, **dict.fromkeys(MEASUREMENT_NUMBER_COLUMNS, float)}


def mimic_iv_ecg_features() -> Features:
    """The explicit `Features` of the MIMIC-IV-ECG dataset."""
    return Features(
        {
            **ecg_report_features(MIMIC_NUM_SAMPLES),
            "ecg_time": Value("string"),
            "path": Value("string"),
            "cart_id": Value("int32"),
            **{name: Value("string") for name in MEASUREMENT_TEXT_COLUMNS},
            **{name: Value("float32") for name in MEASUREMENT_NUMBER_COLUMNS},
        }
    )


@dataclass(frozen=True)
class MimicRecordReader:
    """Turns one record task (record list + measurements fields) into a dataset row (picklable)."""

    root: Path

    def record_name(self, task: dict[str, Any]) -> str:
        return str(self.root / task["path"])

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        for name, kind in MEASUREMENT_NUMBERS.items():
            if isinstance(task[name], str):  # `read_mimic_tasks` keeps a cell that is not a `kind` as its text
                raise ValueError(
                    f"{self.root / MEASUREMENTS_FILE}: {name} {task[name]!r} of study_id {task['study_id']} is not "
                    f"{'an integer' if kind is int else 'a number'}"
                )
        record = read_ecg_record(
            self.record_name(task), sampling_rate=MIMIC_SAMPLING_RATE, num_samples=MIMIC_NUM_SAMPLES
        )
        report = task["report"]
        return {
            "ecg_id": int(task["study_id"]),
            "patient_id": int(task["subject_id"]),
            "signal": record["signal"],
            "lead_names": record["lead_names"],
            "sampling_rate": record["sampling_rate"],
            "report": report,
            "report_language": "en" if report else "",
            "ecg_time": task["ecg_time"],
            "path": task["path"],
            "cart_id": task["cart_id"],
            **{name: task[name] for name in (*MEASUREMENT_TEXT_COLUMNS, *MEASUREMENT_NUMBER_COLUMNS)},
        }


def read_mimic_tasks(mimic_root: str | os.PathLike, study_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """One task per row of `record_list.csv` (in file order), with its report and measurements attached (a
    measurement that is not a number as its text, which `MimicRecordReader` refuses for that record alone). A
    requested study_id missing from `record_list.csv` raises `KeyError` (as PTB-XL's `ecg_ids`), and so does (as
    `ValueError`) a measurements row whose subject_id differs from the record list's for its study."""
    root = Path(mimic_root)
    records = _integer_ids(_read_csv(root / RECORD_LIST_FILE, RECORD_LIST_COLUMNS), root / RECORD_LIST_FILE)
    measurements = _read_csv(root / MEASUREMENTS_FILE, ("study_id", "cart_id", *MIMIC_REPORT_COLUMNS))
    measurements = _integer_ids(measurements, root / MEASUREMENTS_FILE)
    if study_ids is not None:
        wanted = {int(study_id) for study_id in study_ids}
        missing = sorted(wanted - set(records["study_id"]))
        if missing:
            raise KeyError(
                f"{root / RECORD_LIST_FILE}: study_id(s) {missing[:10]} not in the record list ({len(missing)} of the "
                f"{len(wanted)} requested)"
            )
        records = records[records["study_id"].isin(wanted)]
    duplicated = records["study_id"][records["study_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{root / RECORD_LIST_FILE}: study_id(s) {sorted(set(duplicated))[:10]} listed twice")
    measurements = measurements[measurements["study_id"].isin(records["study_id"])].drop_duplicates()
    conflicting = measurements["study_id"][measurements["study_id"].duplicated()]
    if len(conflicting):
        raise ValueError(
            f"{root / MEASUREMENTS_FILE}: study_id(s) {sorted(set(conflicting))[:10]} listed twice with different "
            "values; keep one row per study"
        )
    if "subject_id" in measurements.columns:  # study_id is unique in MIMIC-IV-ECG: another subject is a mixed file
        joined = measurements[["study_id", "subject_id"]].merge(
            records[["study_id", "subject_id"]], on="study_id", suffixes=("_measured", "_listed")
        )
        clashes = joined[joined["subject_id_measured"] != joined["subject_id_listed"]].sort_values("study_id")
        if len(clashes):
            first = clashes.iloc[0]
            raise ValueError(
                f"{root / MEASUREMENTS_FILE}: study_id {first['study_id']} belongs to subject_id "
                f"{first['subject_id_measured']} there but to subject_id {first['subject_id_listed']} in "
                f"{root / RECORD_LIST_FILE} ({len(clashes)} such study_id(s): {list(clashes['study_id'])[:10]}); the "
                "two files do not come from the same MIMIC-IV-ECG release, or one is corrupt, so its reports and "
                "measurements would be attached to another patient's ECG"
            )
    measurements = measurements.set_index("study_id").to_dict("index")  # `.loc` per record took 4x longer
    tasks, unmatched = [], 0
    for record in records.to_dict("records"):
        study_id = int(record["study_id"])
        unmatched += study_id not in measurements
        row = measurements.get(study_id, {})
        tasks.append(
            {
                "subject_id": int(record["subject_id"]),
                "study_id": study_id,
                "ecg_time": _text(record["ecg_time"]),
                "path": str(record["path"]).strip(),
                "cart_id": parse_number(row.get("cart_id"), int),
                "report": join_mimic_report(row),
                **{name: _text(row.get(name)) for name in MEASUREMENT_TEXT_COLUMNS},
                **{name: parse_number(row.get(name), float) for name in MEASUREMENT_NUMBER_COLUMNS},
            }
        )
    if unmatched:
        logger.warning("%s: %d record(s) have no %s row (empty report)", root, unmatched, MEASUREMENTS_FILE)
    return tasks


def build_mimic_iv_ecg(
    mimic_root: str | os.PathLike,
    study_ids: Iterable[int] | None = None,
    num_proc: int = 1,
    on_error: str = "raise",
    return_report: bool = False,
) -> Dataset | tuple[Dataset, ConversionReport]:
    """Build MIMIC-IV-ECG (or the `study_ids` part) in memory: for small parts and tests; use
    `convert_mimic_iv_ecg` for the whole set. `on_error`: `"raise"` or `"skip"` (logged and counted)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    reader = MimicRecordReader(Path(mimic_root))
    tasks = read_mimic_tasks(mimic_root, study_ids)
    rows, report = read_rows(tasks, reader, reader.record_name, num_proc=num_proc, desc="MIMIC-IV-ECG")
    if on_error == "raise":
        raise_first_failure(tasks, reader, reader.record_name, report)
    if report.failures:
        logger.warning("MIMIC-IV-ECG: %s", report.summary())
    dataset = rows_to_dataset(rows, mimic_iv_ecg_features())
    return (dataset, report) if return_report else dataset


def convert_mimic_iv_ecg(
    mimic_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    study_ids: Iterable[int] | None = None,
    num_proc: int = 1,
    records_per_shard: int = 1000,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert MIMIC-IV-ECG to `output_dir/data/train-*.parquet` over `num_proc` processes.

    Resumable: rerun the same command after a crash and the finished shards are kept, the others redone (no record
    lost or duplicated). A finished output is replaced only with `overwrite=True`. Unreadable records are listed
    (file + reason) in `output_dir/data/conversion_report.json`, named relative to `mimic_root` as PhysioNet names
    them (`files/p1000/p10000032/s40689238/40689238`): the report is uploaded with the shards.
    """
    reader = MimicRecordReader(Path(mimic_root))
    return write_parquet_shards(
        {"train": read_mimic_tasks(mimic_root, study_ids)},
        row_fn=reader,
        record_name=reader.record_name,
        features=mimic_iv_ecg_features(),
        output_dir=Path(output_dir) / MIMIC_OUTPUT_FOLDER,
        records_per_shard=records_per_shard,
        num_proc=num_proc,
        overwrite=overwrite,
        desc="MIMIC-IV-ECG",
        root=mimic_root,
    )


# pandas' default missing-value spellings (its `read_csv` documentation), kept for number and id columns
PANDAS_MISSING_VALUES = (
    "", " ", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; mimic_root must be a PhysioNet MIMIC-IV-ECG folder")
    # In the text columns (the report statements, bandwidth, filtering) only an empty cell is missing: pandas' default
    # would also read a statement "NA", "None", "null" or "N/A" as missing and drop it from the report without a word.
    # Number and id columns keep pandas' missing-value spellings.
    columns = pd.read_csv(path, nrows=0).columns
    text = set(MIMIC_REPORT_COLUMNS) | set(MEASUREMENT_TEXT_COLUMNS)
    na_values = {column: [""] if column in text else list(PANDAS_MISSING_VALUES) for column in columns}
    table = pd.read_csv(path, low_memory=False, keep_default_na=False, na_values=na_values)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return table


def _integer_ids(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`table` with its `subject_id` / `study_id` columns as integers; a cell that is not one raises naming the file,
    the column and the values (it would match no study: an empty report, or a bare int() error, without a word)."""
    for column in ("subject_id", "study_id"):
        if column not in table.columns:
            continue
        parsed = [parse_number(value, int) for value in table[column]]
        bad = [value for value in parsed if not isinstance(value, int)]
        if bad:
            raise ValueError(f"{path}: {column} value(s) {bad[:10]} are not integers ({len(bad)} in all)")
        table = table.assign(**{column: pd.array(parsed, dtype="int64")})
    return table


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip()


__all__ = [
    "LEAD_NAMES_MIMIC",
    "MimicRecordReader",
    "build_mimic_iv_ecg",
    "convert_mimic_iv_ecg",
    "mimic_iv_ecg_features",
    "read_mimic_tasks",
]
