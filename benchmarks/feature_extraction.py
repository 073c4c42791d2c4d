"""Feature-extraction throughput: the per-record scipy path against the batched torch path (`device=`), side by side.

The records are real PTB-XL 500 Hz records (the shared subset, else the bundled ones, cycled to `--num_records`)
already in memory as float64 arrays, as `wfdb` gives them; every variant turns the same batch into `base-p75`'s input
(`MeritFeatureExtractor.from_model_config(MeritEcgConfig.from_preset("base-p75"))`: 250 Hz, 2250 samples, 0.67-40 Hz,
z-score per lead), validation included. The variants run interleaved, one batch each per round, and a speed-up is
the median over rounds of `scipy time / variant time`, so drift of a shared machine cancels:

- `scipy`: `fe(records, ...)`, the default path, one record at a time;
- `torch_cpu`: `fe(records, ..., device="cpu")` with torch's default intra-op threads, and `torch_cpu_1_thread`
  with `torch.set_num_threads(1)` (what a DataLoader worker runs with);
- on CUDA, `torch_cuda`: `fe(records, ..., device="cuda")`, from the numpy arrays to `ecg_values` on the GPU
  (validation on the CPU, one host-to-device copy of float32 signals); `validation_only`: the scipy path's checks,
  record by record; `prepare_only`: what the torch path does on the CPU before its DSP (the float32 copies, one
  batched screen that stands in for those checks, the windows: the bound of an end-to-end GPU rate);
  `dsp_only_cuda_<batch>`: the DSP alone on signals already on the GPU
  (`resample_and_filter` + window + z-score) at `--gpu_batches`, what the GPU itself sustains (on a CPU-only
  machine the same two run on the CPU, the DSP at the batch of `--num_records`).

Each variant's minor page faults a batch are kept too (`page_faults_per_batch_median`): a temporary of a few MB that
the C library hands back to the operating system and takes again is paid for in page faults, which depend on what
ran before in the process as much as on the variant (`dsp_only` at a batch of 64 allocates 16 MB intermediates).

    python benchmarks/feature_extraction.py                        # -> results/feature_extraction_<device>.json
    python benchmarks/feature_extraction.py --rounds 3 --num_records 16 --output /tmp/smoke.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None

import numpy as np
import torch

from merit_hf import MeritEcgConfig, MeritFeatureExtractor
from merit_hf.models.merit.feature_extraction_merit import read_wfdb_record
from merit_hf.models.merit.feature_extraction_torch_merit import CPU_RECORDS_PER_CHUNK, normalize, resample_and_filter

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def ptbxl_500hz(num_records: int) -> list[dict]:
    for root in (REPO_ROOT.parent / "shared" / "data" / "ptbxl_subset500", REPO_ROOT / "data" / "ptbxl_sample"):
        paths = sorted((root / "records500" / "00000").glob("*_hr.hea"))
        if paths:
            records = [read_wfdb_record(path.with_suffix("")) for path in paths[:num_records]]
            return [records[i % len(records)] for i in range(num_records)]
    raise FileNotFoundError("no PTB-XL 500 Hz records found")


def minor_faults() -> int:
    """This process's minor page faults so far: first touches of memory the C library has just taken from the
    operating system (a large temporary freed and allocated again can cost more in these than in arithmetic)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def timed(function, device: str) -> tuple[float, int]:
    """Seconds one call of `function` took, and the minor page faults during it."""
    if device == "cuda":
        torch.cuda.synchronize()
    faults = minor_faults()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, minor_faults() - faults


def one_thread(function):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function()
        finally:
            torch.set_num_threads(threads)

    return run


def dsp_only(fe: MeritFeatureExtractor, signals: torch.Tensor, rate: float):
    """The torch path's DSP on `(batch, leads, samples)` already on the device: what the GPU itself sustains."""
    up, down = fe._resample_ratio(rate, "benchmark")
    sos = fe._band_pass_sos()
    batch, leads, length = signals.shape
    start = (-(-length * up // down) - fe.num_samples) // 2
    mask = torch.ones(batch, fe.num_samples, dtype=torch.int64, device=signals.device)

    def run():
        filtered = resample_and_filter(signals.reshape(-1, length), rate, up, down, sos, False)
        window = filtered.reshape(batch, leads, -1)[:, :, start : start + fe.num_samples]
        return normalize(window, mask, fe.normalization, padded=False)

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_records", type=int, default=64, help="the batch: PTB-XL 500 Hz records in memory")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gpu_batches", type=int, nargs="+", default=[64, 1024, 4096])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = ptbxl_500hz(args.num_records)
    signals = [record["signal"] for record in records]
    leads = records[0]["lead_names"]
    fe = MeritFeatureExtractor.from_model_config(MeritEcgConfig.from_preset("base-p75"))
    call = {"sampling_rate": 500, "lead_names": leads, "return_tensors": "pt"}
    variants = {
        "scipy": lambda: fe(signals, **call),
        "torch_cpu": lambda: fe(signals, **call, device="cpu"),
        "torch_cpu_1_thread": one_thread(lambda: fe(signals, **call, device="cpu")),
    }
    if device == "cuda":
        variants["torch_cuda"] = lambda: fe(signals, **call, device="cuda")
    variants["validation_only"] = lambda: [fe.validate_one(signal, 500, leads) for signal in signals]
    chunk = CPU_RECORDS_PER_CHUNK if device == "cpu" else len(signals)
    # the torch path's side of the CPU before its DSP: the batched screen, float32 copies, windows
    variants["prepare_only"] = lambda: fe._prepare_for_device(signals, 500, leads, "mV", False, "center", chunk)
    batches = args.gpu_batches if device == "cuda" else [args.num_records]
    for batch in batches:
        stacked = np.stack([signals[i % len(signals)].T for i in range(batch)]).astype(np.float32)
        variants[f"dsp_only_{device}_{batch}"] = dsp_only(fe, torch.from_numpy(stacked).to(device), 500.0)
    expected = variants["scipy"]()["ecg_values"].numpy()
    max_abs_error = {}
    for name, run in variants.items():  # warm-up: filter design, operators on the device, CUDA kernels
        output = run()
        if isinstance(output, dict) or hasattr(output, "keys"):
            max_abs_error[name] = float(np.abs(output["ecg_values"].float().cpu().numpy() - expected).max())
    seconds = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            took, faulted = timed(run, device if "cuda" in name else "cpu")
            seconds[name].append(took)
            faults[name].append(faulted)
    sizes = dict.fromkeys(variants, args.num_records)
    sizes.update({f"dsp_only_{device}_{batch}": batch for batch in batches})
    results = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "num_records": args.num_records,
        "rounds": args.rounds,
        "input": "PTB-XL 500 Hz, 5000 x 12 float64 in memory -> base-p75 (250 Hz, 2250 samples)",
        "ecgs_per_s_median": {name: sizes[name] / statistics.median(times) for name, times in seconds.items()},
        "ecgs_per_s_best": {name: sizes[name] / min(times) for name, times in seconds.items()},
        "speedup_vs_scipy_median": {
            name: statistics.median(
                (scipy / sizes["scipy"]) / (own / sizes[name]) for scipy, own in zip(seconds["scipy"], times)
            )
            for name, times in seconds.items()
            if name != "scipy"
        },
        "max_abs_error_vs_scipy": max_abs_error,
        "page_faults_per_batch_median": {name: statistics.median(counts) for name, counts in faults.items()},
    }
    output = Path(args.output or RESULTS / f"feature_extraction_{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
