"""Pretraining throughput (ECGs/s), peak memory and FLOPs of one MERIT training step, and 1- vs 2-process scaling.

    python benchmarks/pretrain_throughput.py                       # base config, then scaling on the quick-start config
    python benchmarks/pretrain_throughput.py --config configs/quickstart.yaml --skip_scaling

Step benchmark: the model of `--config` (`MeritForPreTraining`, both losses, AdamW), a batch of real PTB-XL records
from `data/ptbxl_sample` through the feature extractor with their real reports, `--warmup_steps` untimed steps, then
`--steps` timed ones. FLOPs of one step (forward + backward) are counted with `torch.utils.flop_counter`. On a GPU the
step runs under bf16 autocast and model FLOPs utilisation = achieved FLOP/s / the GPU's dense bf16 peak
(`--peak_tflops`, 989 for an H100 SXM).

Scaling benchmark: the pretraining script itself (`configs/quickstart.yaml`, `--scaling_steps` steps, same total
batch) as 1 process with 1 thread, 1 process with all cores, and `accelerate launch --multi_gpu --num_processes 2`
with 1 thread each (gloo).

Writes JSON (`--output`, default `benchmarks/results/pretrain_throughput.json`); `benchmarks/README.md`
shows the latest numbers and the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
MIMIC_IV_ECG_RECORDS = 800_035  # MIMIC-IV-ECG v1.0 diagnostic ECGs


def build(config_path: Path, batch_size: int, device: torch.device):
    """Model, optimizer and one real batch for the config's model."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from merit_hf.data import MeritCollator, build_ptbxl
    from merit_hf.feature_extraction_merit import MeritFeatureExtractor
    from merit_hf.training.arguments import parse_arguments
    from merit_hf.training.pretrain import ARGUMENT_CLASSES, build_model, parameter_groups, resolve_text_model

    model_args, _, train_args = parse_arguments(ARGUMENT_CLASSES, [str(config_path)])
    text_path = resolve_text_model(model_args.text_model_name_or_path)
    torch.manual_seed(0)
    model = build_model(model_args, text_path).to(device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, train_args.weight_decay), lr=train_args.learning_rate, fused=True
    )  # as the pretraining script builds it
    with tempfile.TemporaryDirectory() as scratch:
        build_ptbxl(REPO_ROOT / "data" / "ptbxl_sample", sampling_rate=100, ecg_ids=range(1, 200)).save_to_disk(
            scratch
        )
        rows = [row for row in load_from_disk(scratch)["train"].with_format("numpy") if row["report"].strip()]
    rows = (rows * (batch_size // len(rows) + 1))[:batch_size]
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    collator = MeritCollator(
        feature_extractor, AutoTokenizer.from_pretrained(text_path), max_length=model_args.max_report_length
    )
    batch = {key: value.to(device) for key, value in collator(rows).items()}
    return model, optimizer, batch, model_args


def step_benchmark(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, optimizer, batch, model_args = build(Path(args.config), args.batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()
    for _ in range(args.warmup_steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds_per_step = (time.perf_counter() - start) / args.steps
    ecg = model.config.ecg_config
    result = {
        "config": args.config,
        "device": str(device),
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "ecg_tower": f"{ecg.hidden_size} wide, {ecg.num_hidden_layers} layers, {ecg.num_leads} x "
        f"{ecg.num_patches_per_lead} patches of {ecg.patch_size} samples at {ecg.sampling_rate} Hz",
        "text_tower": model_args.text_model_name_or_path,
        "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_parameters_millions": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "seconds_per_step": seconds_per_step,
        "ecgs_per_second": args.batch_size / seconds_per_step,
        "gflops_per_ecg": flops_per_step / args.batch_size / 1e9,
        "achieved_tflops": flops_per_step / seconds_per_step / 1e12,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
        result["mfu"] = result["achieved_tflops"] / args.peak_tflops
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return result


def scaling_benchmark(args) -> dict:
    """The real script, same total batch, 1 process x all cores vs 2 processes x 1 core."""
    results = {}
    cores = os.cpu_count() or 1
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    two_processes = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29731"]  # fmt: skip
    layouts = {  # name: (launcher, threads per process, batch per process, extra flags)
        "1 process x 1 thread": ([sys.executable], 1, args.scaling_batch_size, []),
        f"1 process x {cores} threads": ([sys.executable], cores, args.scaling_batch_size, []),
        "2 processes x 1 thread": (two_processes, 1, args.scaling_batch_size // 2, ["--use_cpu", "true"]),
    }
    for name, (launcher, threads, per_device, extra) in layouts.items():
        with tempfile.TemporaryDirectory() as output_dir:
            command = [
                *launcher, "-m", "merit_hf.training.pretrain", args.scaling_config, *extra,
                "--output_dir", output_dir, "--max_steps", str(args.scaling_steps), "--save_steps", "100000",
                "--eval_steps", "0", "--max_eval_samples", "1", "--report_to", "none", "--disable_tqdm", "true",
                "--per_device_train_batch_size", str(per_device),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
            subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=3600)
            train = json.loads((Path(output_dir) / "train_results.json").read_text())
        results[name] = {
            "threads_per_process": threads,
            "total_batch_size": train["total_batch_size"],
            "steps": train["global_step"],
            "train_runtime_s": train["train_runtime_s"],
            "ecgs_per_second": train["train_ecgs_per_second"],
        }
    results["speedup_2_processes_vs_1_process_1_thread"] = (
        results["2 processes x 1 thread"]["ecgs_per_second"] / results["1 process x 1 thread"]["ecgs_per_second"]
    )
    return results


def mimic_projection(step: dict, epochs: int, gpus: int, assumed_mfu: float, peak_tflops: float) -> dict:
    """Time for `epochs` passes over MIMIC-IV-ECG on `gpus` GPUs: from the measured rate when the step ran on a GPU,
    otherwise from the counted FLOPs at an assumed utilisation (an estimate, said so in the output)."""
    ecgs = MIMIC_IV_ECG_RECORDS * epochs
    projection = {"records": MIMIC_IV_ECG_RECORDS, "epochs": epochs, "gpus": gpus}
    if step["device"].startswith("cuda"):
        projection["hours_from_measured_rate"] = ecgs / (step["ecgs_per_second"] * gpus) / 3600
    else:
        projection["hours_at_measured_cpu_rate_one_process"] = ecgs / step["ecgs_per_second"] / 3600
        rate = assumed_mfu * peak_tflops * 1e12 * gpus / (step["gflops_per_ecg"] * 1e9)
        projection["estimated_hours_on_gpus"] = ecgs / rate / 3600
        projection["estimate_basis"] = (
            f"counted {step['gflops_per_ecg']:.1f} GFLOP per ECG per step x {ecgs} ECGs / ({gpus} GPUs x "
            f"{peak_tflops:g} TFLOP/s bf16 peak x assumed MFU {assumed_mfu}); not measured on a GPU"
        )
    return projection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU even when a GPU is present")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--assumed_mfu", type=float, default=0.4, help="for the GPU estimate when no GPU ran")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of MIMIC-IV-ECG for the projection")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--skip_scaling", action="store_true")
    parser.add_argument("--skip_step", action="store_true", help="reuse the step result already in --output")
    parser.add_argument("--scaling_config", default="configs/quickstart.yaml")
    parser.add_argument("--scaling_steps", type=int, default=20)
    parser.add_argument("--scaling_batch_size", type=int, default=32)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "pretrain_throughput.json"))
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    previous = Path(args.output)
    if args.skip_step and previous.is_file():
        step = json.loads(previous.read_text())["step"]
    else:
        step = step_benchmark(args)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },  # fmt: skip
        "step": step,
        "mimic_iv_ecg_projection": mimic_projection(step, args.epochs, args.gpus, args.assumed_mfu, args.peak_tflops),
    }
    if not args.skip_scaling:
        result["cpu_scaling"] = scaling_benchmark(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
