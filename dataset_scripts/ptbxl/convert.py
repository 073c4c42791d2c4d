"""Convert a PhysioNet PTB-XL download into the merit_hf dataset: Parquet shards plus this folder's dataset card.

    # one rate per run; both can go to the same output folder (configs `100hz` and `500hz`)
    python dataset_scripts/ptbxl/convert.py --ptbxl_root physionet.org/files/ptb-xl/1.0.3 --output_dir ptbxl_merit \
        --sampling_rate 500 --num_proc 8
    python -m merit_hf.hub push ptbxl_merit <user>/ptbxl-merit --repo-type dataset   # optional: checked upload

Rerunning after a crash resumes; a finished configuration is replaced only with `--overwrite`. Unreadable records
are listed in `<output_dir>/<config>/conversion_report.json`; the command fails (exit code 1) when no record was
written. The dataset card `<output_dir>/README.md` is this
folder's, listing only the configs converted so far. All logic lives in `merit_hf.data.ptbxl`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from merit_hf.data import DEFAULT_LABEL_THRESHOLD, DEFAULT_PTBXL_VERSION, PTBXL_VERSIONS, convert_ptbxl
from merit_hf.hub.cards import write_dataset_card

CARD = Path(__file__).with_name("README.md")


@dataclass
class PtbxlConversionArguments:
    ptbxl_root: str = field(metadata={"help": "PhysioNet PTB-XL folder (ptbxl_database.csv, records100/, ...)"})
    output_dir: str = field(metadata={"help": "output folder (a Hub dataset repo once uploaded)"})
    sampling_rate: int = field(default=100, metadata={"help": "100 (records100) or 500 (records500)"})
    label_threshold: float = field(
        default=DEFAULT_LABEL_THRESHOLD, metadata={"help": "likelihood (%%) a diagnostic statement needs to count"}
    )
    ptbxl_version: str = field(
        default=DEFAULT_PTBXL_VERSION,
        metadata={
            "help": f"one of {PTBXL_VERSIONS}: '1.0.3' writes v1.0.3's rows and labels whatever metadata version the "
            "folder holds (its duplicates dropped, consensus labels); 'as_is' the csv's rows"
        },
    )
    num_proc: int = field(default=1, metadata={"help": "worker processes"})
    records_per_shard: int = field(default=2000, metadata={"help": "records per Parquet shard"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished conversion of this rate"})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(PtbxlConversionArguments).parse_args_into_dataclasses(argv)
    report = convert_ptbxl(
        args.ptbxl_root,
        args.output_dir,
        sampling_rate=args.sampling_rate,
        label_threshold=args.label_threshold,
        ptbxl_version=args.ptbxl_version,
        num_proc=args.num_proc,
        records_per_shard=args.records_per_shard,
        overwrite=args.overwrite,
    )
    write_dataset_card(CARD, args.output_dir)
    print(report.summary())
    return report.command_status(
        args.output_dir, f"is --ptbxl_root the PTB-XL folder with its records{args.sampling_rate} waveforms?"
    )


if __name__ == "__main__":
    raise SystemExit(main())
