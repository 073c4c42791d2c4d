"""Convert a PhysioNet MIMIC-IV-ECG v1.0 download into the merit_hf dataset: Parquet shards plus the dataset card.

    python dataset_scripts/mimic_iv_ecg/convert.py --mimic_root physionet.org/files/mimic-iv-ecg/1.0 \
        --output_dir mimic_iv_ecg_merit --num_proc 16
    # crashed or interrupted? run the same command again: finished shards are kept, no record is lost or repeated

A finished output is replaced only with `--overwrite`. Unreadable records are listed (file + reason) in
`<output_dir>/data/conversion_report.json`; the command fails (exit code 1) when no record was written. All logic lives in `merit_hf.data.mimic_iv_ecg`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from merit_hf.data import convert_mimic_iv_ecg

CARD = Path(__file__).with_name("README.md")


@dataclass
class MimicConversionArguments:
    mimic_root: str = field(metadata={"help": "folder with record_list.csv, machine_measurements.csv and files/"})
    output_dir: str = field(metadata={"help": "output folder (a Hub dataset repo once uploaded)"})
    num_proc: int = field(default=1, metadata={"help": "worker processes"})
    records_per_shard: int = field(
        default=1000,
        metadata={
            "help": "records per Parquet shard (240 MB of float32 signals when read, 10 s x 500 Hz x 12 leads each; less on disk)"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a finished conversion"})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(MimicConversionArguments).parse_args_into_dataclasses(argv)
    report = convert_mimic_iv_ecg(
        args.mimic_root,
        args.output_dir,
        num_proc=args.num_proc,
        records_per_shard=args.records_per_shard,
        overwrite=args.overwrite,
    )
    shutil.copyfile(CARD, Path(args.output_dir) / "README.md")
    print(report.summary())
    return report.command_status(
        args.output_dir, "is --mimic_root the MIMIC-IV-ECG folder with its waveforms under files/?"
    )


if __name__ == "__main__":
    raise SystemExit(main())
