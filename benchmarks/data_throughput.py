"""Data pipeline throughput: MIMIC-IV-ECG conversion rate, training-time read rate, bytes per record on disk.

    python benchmarks/data_throughput.py                        # 240 records, writes benchmarks/results/data_throughput_cpu.json
    python benchmarks/data_throughput.py --num_records 2000 --max_proc 8

MIMIC-IV-ECG waveforms cannot be downloaded here, so the source is written in the exact MIMIC layout
(`files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}`, 12 leads with aVF before aVL, 500 Hz, 5000 samples, 16-bit)
from the real PTB-XL 500 Hz records, cycled. Measured:

1. conversion records/s with 1, 2, ... `--max_proc` processes (`convert_mimic_iv_ecg`, shards of
   `num_records / 8`), and the bytes per record of the Parquet output against the `.hea` + `.dat` source;
2. training-time read rate, ECGs/s into a `DataLoader` (batch 32, no workers) with `MeritCollator` +
   `MeritFeatureExtractor`, from the converted dataset (memory-mapped Arrow, and streamed Parquet) against reading
   the same records with `wfdb.rdsamp` at every step through the same feature extractor; the same without the
   feature extractor (reading alone); and from `ecg_values` stored once with `precompute_ecg_values`;
3. projected wall time and disk for the full MIMIC-IV-ECG (800,035 records), assuming the measured rate scales
   linearly with processes (an assumption: disk bandwidth is not measured).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import wfdb
from torch.utils.data import DataLoader, Dataset
from transformers import HfArgumentParser

from merit_hf import MeritFeatureExtractor
from merit_hf.data import (
    MeritCollator,
    convert_mimic_iv_ecg,
    load_mimic_iv_ecg,
    precompute_ecg_values,
    read_ecg_record,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIMIC_FULL_RECORDS = 800_035  # MIMIC-IV-ECG v1.0 record_list.csv
MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
TO_MIMIC_ORDER = [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]


@dataclass
class BenchmarkArguments:
    num_records: int = field(default=240, metadata={"help": "records in the MIMIC-layout source"})
    max_proc: int = field(default=2, metadata={"help": "conversion is timed with 1, 2, 4, ... up to this"})
    batch_size: int = field(default=32, metadata={"help": "DataLoader batch size"})
    read_batches: int = field(default=6, metadata={"help": "batches timed per read method"})
    output: str = field(default=str(REPO_ROOT / "benchmarks" / "results" / "data_throughput_cpu.json"))
    work_dir: str | None = field(default=None, metadata={"help": "scratch folder (default: a temporary one)"})


def ptbxl_500hz_records() -> list[Path]:
    for root in (REPO_ROOT.parent / "shared" / "data" / "ptbxl_subset500", REPO_ROOT / "data" / "ptbxl_sample"):
        records = sorted((root / "records500" / "00000").glob("*_hr.hea"))
        if records:
            return [record.with_suffix("") for record in records]
    raise FileNotFoundError("no PTB-XL 500 Hz records found")


def write_mimic_source(root: Path, num_records: int) -> list[Path]:
    sources = [wfdb.rdsamp(str(path))[0][:, TO_MIMIC_ORDER] for path in ptbxl_500hz_records()]
    lines, paths = ["subject_id,study_id,file_name,ecg_time,path"], []
    measurements = ["subject_id,study_id,cart_id,ecg_time," + ",".join(f"report_{i}" for i in range(18))]
    for index in range(num_records):
        subject_id, study_id = 10_000_000 + index // 3, 40_000_000 + index
        relative = f"files/p{str(subject_id)[:4]}/p{subject_id}/s{study_id}/{study_id}"
        folder = root / relative.rsplit("/", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(str(study_id), fs=500, units=["mV"] * 12, sig_name=MIMIC_LEADS, p_signal=sources[index % len(sources)],
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip
        lines.append(f"{subject_id},{study_id},{study_id},2180-07-23 08:44:00,{relative}")
        measurements.append(f"{subject_id},{study_id},1,2180-07-23 08:44:00,Sinus rhythm,,Normal ECG" + "," * 15)
        paths.append(root / relative)
    (root / "record_list.csv").write_text("\n".join(lines) + "\n")
    (root / "machine_measurements.csv").write_text("\n".join(measurements) + "\n")
    return paths


class WfdbEveryStep(Dataset):
    """The baseline: every item is read from its WFDB files with `wfdb.rdsamp`."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        signal, fields = wfdb.rdsamp(str(self.paths[index]))
        return {"signal": signal, "sampling_rate": fields["fs"], "lead_names": fields["sig_name"]}


def ecgs_per_second(dataset, collate_fn, batch_size: int, batches: int) -> float:
    loader = iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn))
    next(loader)  # warm-up: opens files, builds filters
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        batch = next(loader)
        count += len(batch["ecg_values"]) if isinstance(batch, dict) else len(batch)
    return count / (time.perf_counter() - start)


def stack_signals(rows: list[dict]) -> dict:
    return {"ecg_values": torch.from_numpy(np.stack([np.asarray(row["signal"], dtype=np.float32) for row in rows]))}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="merit_data_bench_"))
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    source = work / "mimic-iv-ecg"
    paths = write_mimic_source(source, args.num_records)
    source_bytes = sum(path.with_suffix(suffix).stat().st_size for path in paths for suffix in (".hea", ".dat"))
    results: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible",
        "num_records": args.num_records,
        "source_bytes_per_record": source_bytes / len(paths),
        "conversion_records_per_s": {},
    }
    shard = max(1, args.num_records // 8)
    start = time.perf_counter()
    for path in paths[:50]:
        read_ecg_record(path, sampling_rate=500, num_samples=5000)
    results["read_ecg_record_per_s"] = 50 / (time.perf_counter() - start)
    output = work / "converted"
    num_proc = 1
    while num_proc <= args.max_proc:
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        report = convert_mimic_iv_ecg(source, output, num_proc=num_proc, records_per_shard=shard)
        results["conversion_records_per_s"][str(num_proc)] = report.written / (time.perf_counter() - start)
        num_proc *= 2
    parquet_bytes = sum(path.stat().st_size for path in (output / "data").glob("*.parquet"))
    results["parquet_bytes_per_record"] = parquet_bytes / args.num_records

    extractor = MeritFeatureExtractor()
    collator = MeritCollator(extractor)
    arrow = load_mimic_iv_ecg(output, streaming=False).with_format("numpy")
    stream = load_mimic_iv_ecg(output, streaming=True).with_format("numpy")
    baseline = WfdbEveryStep(paths)
    start = time.perf_counter()
    precomputed = precompute_ecg_values(load_mimic_iv_ecg(output, streaming=False), extractor).with_format("numpy")
    results["precompute_ecg_values_per_s"] = args.num_records / (time.perf_counter() - start)
    timing = {"batch_size": args.batch_size, "batches": args.read_batches}
    for name, dataset in (("arrow", arrow), ("streaming_parquet", stream), ("wfdb_rdsamp_each_step", baseline)):
        timing[f"{name}_with_feature_extractor"] = ecgs_per_second(
            dataset, collator, args.batch_size, args.read_batches
        )
        timing[f"{name}_read_only"] = ecgs_per_second(dataset, stack_signals, args.batch_size, args.read_batches)
    timing["arrow_precomputed_ecg_values"] = ecgs_per_second(precomputed, collator, args.batch_size, args.read_batches)
    timing["ratio_arrow_precomputed_vs_wfdb_with_feature_extractor"] = (
        timing["arrow_precomputed_ecg_values"] / timing["wfdb_rdsamp_each_step_with_feature_extractor"]
    )
    for mode in ("with_feature_extractor", "read_only"):
        for name in ("arrow", "streaming_parquet"):
            timing[f"ratio_{name}_vs_wfdb_{mode}"] = timing[f"{name}_{mode}"] / timing[f"wfdb_rdsamp_each_step_{mode}"]
    results["training_read_ecgs_per_s"] = timing

    best_proc, best_rate = max(results["conversion_records_per_s"].items(), key=lambda item: item[1])
    per_process = results["conversion_records_per_s"]["1"]
    results["projection_full_mimic_iv_ecg"] = {
        "records": MIMIC_FULL_RECORDS,
        "parquet_gb": MIMIC_FULL_RECORDS * results["parquet_bytes_per_record"] / 1e9,
        "arrow_cache_gb_if_not_streamed": MIMIC_FULL_RECORDS * 5000 * 12 * 4 / 1e9,
        "hours_1_process": MIMIC_FULL_RECORDS / per_process / 3600,
        f"hours_{best_proc}_processes_measured_rate": MIMIC_FULL_RECORDS / best_rate / 3600,
        "hours_16_processes_if_linear": MIMIC_FULL_RECORDS / (16 * per_process) / 3600,
    }
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
