"""Fine-tuning under each `--mixed_precision`, full and LoRA, on the bundled PTB-XL superclass split: the precision
each run resolved to and recorded, seconds per step, peak CUDA memory, test macro AUROC, and the refusals.

    python benchmarks/finetune_precision.py              # CUDA: a ViT-B-shaped encoder; CPU: the quick-start shape
    # -> results/finetune_precision_cuda.json (results/finetune_precision_cpu.json without a GPU; written after each
    #    run, "partial" until the last); exits 1 if a check fails, naming it

Every run goes through the probe protocol's fine-tuning (`merit_hf.training.finetune.run_fine_tune`, the code behind
`python -m merit_hf.training.probe --mode finetune`): random-init encoder (seed 0), batch 32, `--epochs` epochs with
early stopping off, so every variant takes the same optimizer steps. Precisions: 'no', 'auto' and 'bf16' everywhere,
and 'fp16' on CUDA (fp16 off CUDA is refused). Checks: 'auto' resolves to bf16 on a GPU with bf16 (compute capability
8.0+) and to 'no' on CPU; each run records the precision it was asked for (auto: the resolved one) in the results'
protocol and training sections; every test AUROC is finite (an fp16 overflow would make the logits NaN); a
`--mixed_precision` that contradicts `accelerate launch`'s (its environment, set here by hand) is refused by name.

The bundled sample is 344 / 78 / 66 records, resampled to the encoder's rate: the AUROCs show that every path learns,
not which precision is better. On the ViT-B shape the step times include no data wait (`ThroughputMeter`'s step time);
compare them within one run of this script only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import yaml

from merit_hf import MeritEcgConfig, MeritEcgModel
from merit_hf.evaluation.probe import ProbeArguments, load_dataset_dict
from merit_hf.models.merit.inference_precision import cpu_capability
from merit_hf.training.finetune import run_fine_tune
from merit_hf.training.finetune_precision import resolve_finetune_precision, training_device_type

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3}  # each method's usual one (benchmarks/finetune_lora.py)


def encoder_of(shape: str, seed: int) -> MeritEcgModel:
    """`base`: `MeritEcgConfig`'s defaults (ViT-B/75, 250 Hz, 9 s); `quickstart`: `configs/quickstart.yaml`'s."""
    settings = {}
    if shape == "quickstart":
        settings = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())["ecg_config"]
    torch.manual_seed(seed)
    return MeritEcgModel(MeritEcgConfig(**settings))


def measure(method: str, precision: str, shape: str, epochs: int, seed: int, dataset_dict) -> dict:
    arguments = ProbeArguments(
        mode="finetune",
        finetune_method=method,
        finetune_learning_rate=LEARNING_RATES[method],
        mixed_precision=precision,
        batch_size=32,
        finetune_max_epochs=epochs,
        finetune_patience=epochs,  # no early stop: every variant takes the same steps
        num_bootstrap=0,
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    results = run_fine_tune(encoder_of(shape, seed), dataset_dict, "superclass", 1.0, seed, baseline=False,
                            arguments=arguments)  # fmt: skip
    training = results.model.extra["training"]
    throughput = training["throughput"]
    return {
        "method": method,
        "asked": precision,
        "protocol_mixed_precision": results.protocol["mixed_precision"],
        "training_mixed_precision": training["mixed_precision"],
        "optimizer_steps": throughput["steps_measured"],
        "seconds_per_step": round(throughput["seconds_per_step"], 4),
        "data_wait_seconds_per_step": round(throughput["data_wait_seconds_per_step"], 4),
        **(
            {"peak_cuda_memory_gib": round(throughput["peak_memory_gib"], 3)}
            if "peak_memory_gib" in throughput
            else {}
        ),
        "test_macro_auroc": results.model.metrics["macro_auroc"].value,
    }


def refusal_under_launcher() -> str:
    """`accelerate launch --mixed_precision bf16` with `--mixed_precision fp16` on the script: the message."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    try:
        from merit_hf.training.finetune_precision import finetune_precision_arguments

        finetune_precision_arguments("fp16")
    except ValueError as error:
        return str(error)
    finally:
        del os.environ["ACCELERATE_MIXED_PRECISION"]
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["base", "quickstart"], default=None,
                        help="encoder shape (default: base on CUDA, quickstart on CPU)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2, help="epochs of 11 steps (344 records, batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # this script is the launcher here
    device = training_device_type()
    shape = args.shape or ("base" if device == "cuda" else "quickstart")
    precisions = ["no", "auto", "bf16", *(["fp16"] if device == "cuda" else [])]
    dataset_dict = load_dataset_dict(REPO_ROOT / "data" / "ptbxl_sample", 100, ProbeArguments(mode="finetune"))
    cpu = cpu_capability()
    header = {
        "benchmark": "finetune_precision",
        "command": " ".join(["python", "benchmarks/finetune_precision.py", *sys.argv[1:]]),
        "model": f"random init, {shape} shape"
        + (" (MeritEcgConfig defaults: ViT-B/75, 250 Hz, 9 s)" if shape == "base" else " (configs/quickstart.yaml)"),
        "data": "data/ptbxl_sample superclass, PTB-XL v1.0.3 rows with a superclass label, 100 Hz",
        "protocol": f"run_fine_tune: batch 32, AdamW, constant learning rate (full 1e-4, LoRA 1e-3), {args.epochs} "
        "epochs, no early stop, no bootstrap",
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else cpu.model_name or platform.machine(),
            "cuda_capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
            "cpu_native_bf16": cpu.native_bf16,  # AMX-BF16 or AVX512-BF16: CPU bf16 autocast is not emulated
            "torch_threads": args.threads,
            "note": "CPU shared with other jobs: times are indicative" if device == "cpu" else "",
        },
        "torch": torch.__version__,
    }
    output = Path(args.output or RESULTS / f"finetune_precision_{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = [(method, precision) for method in ("full", "lora") for precision in precisions]
    rows = []
    for method, precision in runs:
        rows.append(measure(method, precision, shape, args.epochs, args.seed, dataset_dict))
        print(json.dumps(rows[-1]), flush=True)
        # after every run, so that a run cut short (a time limit) keeps the rows that finished
        partial = f"{len(rows)} of {len(runs)} runs; the checks come after the last"
        output.write_text(json.dumps({**header, "partial": partial, "results": rows}, indent=2) + "\n")
    auto = resolve_finetune_precision("auto", device)
    refusal = refusal_under_launcher()
    checks = {
        "auto_resolves_as_the_device_rule_says": auto
        == ("bf16" if device == "cuda" and torch.cuda.get_device_capability() >= (8, 0) else "no"),
        "every_run_records_its_precision": all(
            row["protocol_mixed_precision"]
            == row["training_mixed_precision"]
            == (auto if row["asked"] == "auto" else row["asked"])
            for row in rows
        ),
        "every_test_auroc_is_finite": all(math.isfinite(row["test_macro_auroc"]) for row in rows),
        "contradiction_with_accelerate_launch_is_refused": "contradicts `accelerate launch`" in refusal,
    }
    by_key = {(row["method"], row["asked"]): row for row in rows}
    report = {
        **header,
        "auto_resolves_to": auto,
        "refusal_under_accelerate_launch_bf16_with_fp16": refusal,
        "results": rows,
        "step_time_vs_fp32": {
            f"{method}/{precision}": round(
                by_key[method, precision]["seconds_per_step"] / by_key[method, "no"]["seconds_per_step"], 3
            )
            for method, precision in by_key
            if precision != "no"
        },  # fmt: skip
        "checks": checks,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"checks": checks, "step_time_vs_fp32": report["step_time_vs_fp32"]}, indent=2))
    print(f"wrote {output}")
    failed = [name for name, passed in checks.items() if not passed]
    if failed:
        sys.exit(f"failed checks: {failed}")


if __name__ == "__main__":
    main()
