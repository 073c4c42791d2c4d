"""CPU inference with the C library's memory kept for reuse or handed back (`MERIT_CPU_ALLOCATOR=keep|system`).

`prepare_for_inference(model, precision, "cpu")` makes glibc keep the memory the process frees
(`inference_precision.keep_freed_cpu_memory`). The setting is the process's, so each measurement runs in a child
process of its own: the model (`MeritEcgModel` of the preset, random weights) prepared for the CPU in each precision,
timed over `--rounds` forwards after a warm-up at each batch size, with its minor page faults a forward. The two
settings alternate, child after child, `--repeats` times, and a speed-up is the median over repeats of the paired
ratio `system seconds / keep seconds`, so drift of a shared machine cancels.

    python benchmarks/cpu_allocator.py                         # -> benchmarks/results/cpu_allocator.json
    python benchmarks/cpu_allocator.py --presets tiny-p75 --batches 2 --repeats 1 --rounds 1 --output /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_extraction import minor_faults  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALLOCATORS = ("system", "keep")


def child(preset: str, precisions: list[str], batches: list[int], rounds: int, threads: int) -> dict:
    """In this process (whose `MERIT_CPU_ALLOCATOR` the parent set): seconds and page faults a forward."""
    from encoder_throughput import build

    from merit_hf.models.merit.inference_precision import keep_freed_cpu_memory, prepare_for_inference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, make_input = build("merit_encoder", preset, "sdpa")
    model.eval()
    results = {"kept": None}
    for precision in precisions:
        prepared = prepare_for_inference(model, precision, "cpu")
        results["kept"] = keep_freed_cpu_memory()
        for batch in batches:
            inputs = make_input(batch)
            with torch.inference_mode():
                prepared(**inputs)  # warm-up: kernels chosen, memory taken
                seconds, faults = [], []
                for _ in range(rounds):
                    faulted, start = minor_faults(), time.perf_counter()
                    prepared(**inputs)
                    seconds.append(time.perf_counter() - start)
                    faults.append(minor_faults() - faulted)
            results[f"{precision}/{batch}"] = {
                "seconds": statistics.median(seconds),
                "faults": statistics.median(faults),
            }
    return results


def run_child(allocator: str, args) -> dict:
    env = {
        **os.environ,
        "MERIT_CPU_ALLOCATOR": allocator,
        "MERIT_CPU_CHOICES": os.environ.get("MERIT_CPU_CHOICES", "off"),
    }
    command = [
        sys.executable, __file__, "--child", "--presets", *args.presets, "--precisions", *args.precisions,
        "--batches", *map(str, args.batches), "--rounds", str(args.rounds), "--threads", str(args.threads),
    ]  # fmt: skip
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base-p75", "small-p125"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8", "fp32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "cpu_allocator.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        results = {
            preset: child(preset, args.precisions, args.batches, args.rounds, args.threads) for preset in args.presets
        }
        print(json.dumps(results))
        return results
    runs = {allocator: [] for allocator in ALLOCATORS}
    for _ in range(args.repeats):
        for allocator in ALLOCATORS:
            runs[allocator].append(run_child(allocator, args))
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            for batch in args.batches:
                key = f"{precision}/{batch}"
                system = [run[preset][key] for run in runs["system"]]
                keep = [run[preset][key] for run in runs["keep"]]
                rows.append({
                    "preset": preset,
                    "precision": precision,
                    "batch": batch,
                    "ecgs_per_s": {
                        "system": round(batch / statistics.median(r["seconds"] for r in system), 2),
                        "keep": round(batch / statistics.median(r["seconds"] for r in keep), 2),
                    },
                    "keep_speedup_median": round(
                        statistics.median(s["seconds"] / k["seconds"] for s, k in zip(system, keep)), 3
                    ),
                    "page_faults_per_forward_median": {
                        "system": statistics.median(r["faults"] for r in system),
                        "keep": statistics.median(r["faults"] for r in keep),
                    },
                })  # fmt: skip
    from merit_hf.models.merit.inference_precision import cpu_capability

    report = {
        "machine": {"cpu": cpu_capability().summary(), "threads": args.threads, "torch": torch.__version__},
        "kept_in_keep_children": [run[args.presets[0]]["kept"] for run in runs["keep"]],
        "repeats": args.repeats,
        "rounds": args.rounds,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
