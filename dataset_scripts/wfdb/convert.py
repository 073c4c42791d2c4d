"""Convert any folder of WFDB records (and CSV files of labels and reports) into a merit_hf dataset: Parquet shards
plus this folder's dataset card.

    python dataset_scripts/wfdb/convert.py --wfdb_dir lobachevsky-university-electrocardiography-database-1.0.1/data \
        --output_dir ludb_merit --labels_csv ludb.csv --id_column ID --label_columns Rhythm --patient_column ID
    python -m merit_hf.hub push ludb_merit <user>/ludb-merit --repo-type dataset   # optional: checked upload

Records are found by their `.hea` in any sub-folder and kept as recorded (any leads, rate and length). Rerunning after
a crash resumes; a finished conversion is replaced only with `--overwrite`. Unreadable records are listed in
`<output_dir>/data/conversion_report.json`; the command fails (exit code 1) when no record was written. All logic lives in `merit_hf.data.wfdb_folder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from merit_hf.data import WfdbFolderSpec, convert_wfdb_folder
from merit_hf.hub.cards import write_dataset_card

CARD = Path(__file__).with_name("README.md")


@dataclass
class WfdbConversionArguments:
    wfdb_dir: str = field(metadata={"help": "folder of WFDB records (.hea + signal files), searched recursively"})
    output_dir: str = field(metadata={"help": "output folder (a Hub dataset repo once uploaded)"})
    labels_csv: str | None = field(default=None, metadata={"help": "CSV with one row per record"})
    id_column: str | None = field(
        default=None, metadata={"help": "CSV column naming the record (relative path or unique file name)"}
    )
    label_columns: list[str] = field(
        default_factory=list, metadata={"help": "CSV columns that become label sets (List(ClassLabel))"}
    )
    label_separator: str = field(default=",", metadata={"help": "separates several classes in one label cell"})
    patient_column: str | None = field(
        default=None, metadata={"help": "CSV column of patient ids (the seeded split keeps a patient in one split)"}
    )
    metadata_columns: list[str] = field(
        default_factory=list, metadata={"help": "CSV columns kept as strings (e.g. a train/validation/test column)"}
    )
    reports_csv: str | None = field(default=None, metadata={"help": "CSV of reports (may be the labels CSV)"})
    report_column: str = field(default="report", metadata={"help": "the reports CSV's report column"})
    num_proc: int = field(default=1, metadata={"help": "worker processes"})
    records_per_shard: int = field(default=1000, metadata={"help": "records per Parquet shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished conversion"})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(WfdbConversionArguments).parse_args_into_dataclasses(argv)
    spec = WfdbFolderSpec(
        wfdb_dir=args.wfdb_dir,
        labels_csv=args.labels_csv,
        id_column=args.id_column,
        label_columns=tuple(args.label_columns),
        label_separator=args.label_separator,
        patient_column=args.patient_column,
        metadata_columns=tuple(args.metadata_columns),
        reports_csv=args.reports_csv,
        report_column=args.report_column,
    )
    report = convert_wfdb_folder(
        spec, args.output_dir, num_proc=args.num_proc, records_per_shard=args.records_per_shard,
        overwrite=args.overwrite,
    )  # fmt: skip
    write_dataset_card(CARD, args.output_dir)
    print(report.summary())
    return report.command_status(
        args.output_dir, "does --wfdb_dir hold WFDB records (each .hea with its signal files)?"
    )


if __name__ == "__main__":
    raise SystemExit(main())
