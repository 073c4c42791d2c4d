"""Peak memory and time of preparing report-generation examples: the old all-in-memory path against the chunked,
memory-mapped cache of `merit_hf.training.report_examples`, and the read speed of each for training.

Each arm runs in its own fresh process (so `ru_maxrss`, the peak resident set, is that arm's alone):

- `in_memory`: what report_lora did before: `report_examples(rows)` (every signal as a NumPy row) and one feature
  extractor call over all of them into one tensor;
- `cached_build`: `ReportExamples(rows, ..., cache_dir=...)` into an empty cache (chunks of `--chunk_size`);
- `cached_reuse`: the same call again (the cache found by its fingerprint, memory-mapped).

Rows: every PTB-XL record with an English report in `--ptbxl_dir` (a PhysioNet folder, read into memory by
`merit_hf.data`, as report_lora reads it) at the default `MeritEcgConfig` input (250 Hz, 2250 samples). The RSS after
the rows are loaded is given too, since the arms differ only after it; the peak while preparing is the peak resident
set after a reset (`/proc/self/clear_refs`) taken once the rows are loaded. Then `read_items_per_second`: a shuffled
`DataLoader` (batch 8, the collation of the ECGs only) over the prepared examples.

    python benchmarks/report_examples_memory.py --ptbxl_dir ../shared/data/ptbxl_2k
    python benchmarks/report_examples_memory.py --ptbxl_dir data/ptbxl_sample --quick   # smoke run

Writes `benchmarks/results/report_examples_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "report_examples_memory.json"
ARMS = ("in_memory", "cached_build", "cached_reuse")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def current_rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Linux: reset the peak resident set (VmHWM) to the current one (`clear_refs` 5), so that the peak of what
    follows is measured alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_arm(arm: str, ptbxl_dir: str, cache_dir: str, chunk_size: int, limit: int | None) -> dict:
    """One arm in this process: prepare the examples, then read them as training does."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    from merit_hf import MeritEcgConfig, MeritFeatureExtractor
    from merit_hf.training.report_lora import ReportExamples, load_ptbxl_rows, read_ptbxl_reports, report_examples

    rows, _ = read_ptbxl_reports(load_ptbxl_rows(ptbxl_dir, 100), folds=range(1, 11), limit=limit)
    extractor = MeritFeatureExtractor.from_model_config(MeritEcgConfig())
    record = {"arm": arm, "num_examples": rows.num_rows, "rss_after_rows_mb": current_rss_mb()}
    record["peak_rss_loading_rows_mb"] = peak_rss_mb()
    record["peak_reset"] = reset_peak_rss()
    start = time.perf_counter()
    if arm == "in_memory":
        examples = report_examples(rows)
        values = extractor([example["signal"] for example in examples],
                           sampling_rate=[float(example["sampling_rate"]) for example in examples],
                           lead_names=[list(example["lead_names"]) for example in examples],
                           return_tensors="pt", crop="center")["ecg_values"]  # fmt: skip
        dataset = [{"ecg_values": value, "index": index} for index, value in enumerate(values)]
    else:
        dataset = ReportExamples(rows, extractor, cache_dir=cache_dir, chunk_size=chunk_size)
    record["prepare_seconds"] = time.perf_counter() - start
    record["peak_rss_while_preparing_mb"] = current_rss_mb("VmHWM")  # since the reset: the preparation alone
    record["rss_after_prepare_mb"] = current_rss_mb()
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=lambda items: torch.stack(
        [item["ecg_values"] for item in items]))  # fmt: skip
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    record["read_items_per_second"] = count / (time.perf_counter() - start)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptbxl_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "ptbxl_2k"))
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples")
    parser.add_argument("--quick", action="store_true", help="64 examples (a smoke run)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = 64 if args.quick else args.limit
    if args.arm:
        print("ARM " + json.dumps(run_arm(args.arm, args.ptbxl_dir, args.cache_dir, args.chunk_size, limit)))
        return
    records = []
    with tempfile.TemporaryDirectory(prefix="report_examples_bench_") as cache_dir:
        for arm in ARMS:
            command = [sys.executable, __file__, "--arm", arm, "--ptbxl_dir", args.ptbxl_dir, "--cache_dir", cache_dir,
                       "--chunk_size", str(args.chunk_size)] + (["--quick"] if args.quick else [])  # fmt: skip
            command += ["--limit", str(args.limit)] if args.limit is not None and not args.quick else []
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            records.append(json.loads(next(line for line in output.splitlines() if line.startswith("ARM "))[4:]))
            print(json.dumps(records[-1]))
    result = {
        "benchmark": "report_examples_memory",
        "ptbxl_dir": args.ptbxl_dir,
        "chunk_size": args.chunk_size,
        "quick": args.quick,
        "machine": f"{platform.processor() or platform.machine()}, shared by other jobs, 1 torch thread",
        "arms": records,
    }
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
