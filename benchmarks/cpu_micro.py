"""Three CPU measurements quoted in benchmarks/README.md, each against its alternative in the same process:

1. `optimizer`: one AdamW step over ViT-B/75-shaped parameters (85 M): PyTorch's CPU default (a loop over tensors),
   `foreach=True`, and `fused=True` (what merit_hf's training scripts build). Median of 5 steps after 2.
2. `wfdb_reader`: `read_wfdb_record` on the bundled records with its numpy path for format-16 files, the same with
   that path switched off (`wfdb.rdheader` + `wfdb.rdrecord`), and bare `wfdb.rdsamp` (which validates nothing);
   3 interleaved rounds, records/s.
3. `train_step_profile`: where one `base-p75` pretraining step (batch 4, SDPA, fp32, both losses) spends its time,
   from `torch.profiler`: the share of the matmul kernels (`aten::mm`, `aten::addmm`) and of the attention kernels.

    python benchmarks/cpu_micro.py          # writes benchmarks/results/cpu_micro.json
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def optimizer_step() -> dict:
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(768,)] * 200
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    for param in params:
        param.grad = torch.randn_like(param)
    result = {"parameters_millions": round(sum(p.numel() for p in params) / 1e6, 1)}
    for name, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        optimizer.step()
        optimizer.step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = round(statistics.median(times) * 1000, 1)
    return result


def wfdb_reader() -> dict:
    import wfdb

    import merit_hf.models.merit.feature_extraction_merit as fem

    sample = ROOT.parent / "data" / "ptbxl_sample"
    headers = sorted(sample.glob("records100/*/*.hea"))[:300] + sorted(sample.glob("records500/*/*.hea"))
    numpy_path = fem._is_format16
    rates: dict[str, list[float]] = {"numpy_path": [], "rdheader_rdrecord": [], "bare_rdsamp": []}

    def timed(read) -> float:
        start = time.perf_counter()
        for header in headers:
            read(header)
        return len(headers) / (time.perf_counter() - start)

    try:
        for _ in range(3):
            fem._is_format16 = numpy_path  # format 16 read with numpy from merit_hf's own header parse
            rates["numpy_path"].append(timed(fem.read_wfdb_record))
            fem._is_format16 = lambda meta: False  # every record through wfdb.rdheader + wfdb.rdrecord
            rates["rdheader_rdrecord"].append(timed(fem.read_wfdb_record))
            rates["bare_rdsamp"].append(timed(lambda header: wfdb.rdsamp(str(header.with_suffix("")))))
    finally:
        fem._is_format16 = numpy_path
    return {"records": len(headers), **{f"{k}_records_per_s": round(statistics.median(v)) for k, v in rates.items()}}


def train_step_profile() -> dict:
    import encoder_throughput as bench
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model, make_input = bench.build("merit_pretraining", "base-p75", "sdpa")
    step = bench._step_function(model, make_input(4), "train", "cpu", "fp32")
    step(model)
    step(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model)
    totals = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    everything = sum(totals.values())
    matmul = totals.get("aten::mm", 0) + totals.get("aten::addmm", 0)
    attention = sum(value for key, value in totals.items() if "scaled_dot_product" in key)
    return {
        "step_seconds": round(everything / 1e6, 2),
        "matmul_seconds": round(matmul / 1e6, 2),
        "matmul_share": round(matmul / everything, 3),
        "attention_seconds_forward_and_backward": round(attention / 1e6, 2),
    }


def main() -> dict:
    report = {
        "machine": {"device": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "optimizer": optimizer_step(),
        "wfdb_reader": wfdb_reader(),
        "train_step_profile": train_step_profile(),
    }
    out = ROOT / "results" / "cpu_micro.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
