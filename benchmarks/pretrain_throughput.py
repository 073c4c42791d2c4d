"""Pretraining throughput (ECGs/s), peak memory and FLOPs of one MERIT training step, and 1- vs 2-process scaling.

    python benchmarks/pretrain_throughput.py                       # base config, then scaling on the quick-start config
    python benchmarks/pretrain_throughput.py --config configs/quickstart.yaml --skip_scaling

Step benchmark: the model of `--config` (`MeritForPreTraining`, both losses, AdamW), a batch of real PTB-XL records
from `data/ptbxl_sample` through the feature extractor with their real reports, `--warmup_steps` untimed steps, then
`--steps` timed ones. FLOPs of one step (forward + backward) are counted by `merit_hf.utils.throughput`. On a GPU the
step runs under bf16 autocast and model FLOPs utilisation = achieved FLOP/s / the GPU's dense bf16 peak
(`--peak_tflops`, default by GPU name: 989 for an H100 / H200 SXM).

Scaling benchmark: the pretraining script itself (`configs/quickstart.yaml`, `--scaling_steps` steps, same total
batch) as 1 process with 1 thread, 1 process with all cores, and `accelerate launch --multi_gpu --num_processes 2`
with 1 thread each (gloo).

End to end (`--end_to_end`): the pretraining script itself on `--data_dir` (default `../shared/data/ptbxl_2k`, a
PhysioNet PTB-XL folder read with `merit_hf.data.build_ptbxl`), against the same step alone on one real batch of it,
in one run: persistent workers (the default), workers restarted every epoch, `ecg_values` precomputed, without
the per-term gradient norms the default logs every logging step (`--gradient_norm_logging_steps 0`), and the feature
extractor's batched torch path in the workers (`--feature_extraction_device cpu`). The script's
own throughput log gives its rate over the steady intervals (the first, with worker start-up and warm-up, left out),
its data-wait and diagnostics shares; where it is below 90 % of the step alone, `limited_by` says which stage limits.
Writes `results/pretrain_end_to_end_<device>.json` (after the step alone and after each variant). On a GPU, as
issue 18 ran it:

    python benchmarks/pretrain_throughput.py --end_to_end --config configs/base.yaml --e2e_batch_size 128 \
        --e2e_num_workers 8 --e2e_flags --text_model_name_or_path <text encoder folder>

Memory and MFU options (`--memory_options`): one pretraining step of `base-p75` (batch 64 and 256) with each
activation-checkpointing option (`merit_hf.training.activation_checkpointing`; add `compile` and
`"compile + selective"` to `--options` for regional `torch.compile`), and `small-p125` without (batch 64, 256, 512:
where it stops being launch-bound); peak memory and MFU against the GPU's dense bf16 peak. Same step as the GPU
figures of issue 14 (both losses, MiniLM-shaped random text tower, 64-token reports, bf16 autocast, fused AdamW).
Writes `results/pretrain_memory_mfu_<device>.json`.

The default mode writes `--output` (default `benchmarks/results/pretrain_throughput.json`); `benchmarks/README.md`
shows the latest numbers and the machine they came from.
"""

from __future__ import annotations

import argparse
import itertools
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

from merit_hf.utils.throughput import count_flops_per_sample, default_peak_tflops

REPO_ROOT = Path(__file__).resolve().parents[1]
MIMIC_IV_ECG_RECORDS = 800_035  # MIMIC-IV-ECG v1.0 diagnostic ECGs


def build(config_path: Path, batch_size: int, device: torch.device):
    """Model, optimizer and one real batch for the config's model."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from merit_hf.data import MeritCollator, build_ptbxl
    from merit_hf.models.merit.feature_extraction_merit import MeritFeatureExtractor
    from merit_hf.training.pretrain import ARGUMENT_CLASSES, build_model, parameter_groups, resolve_text_model
    from merit_hf.utils.arguments import parse_arguments

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

    flops_per_step = count_flops_per_sample(model, lambda rows: model(**rows).loss, batch) * args.batch_size
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
    two_processes = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                     "29731"]  # fmt: skip
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


# ----------------------------------------------------------------------------------------------------------------------
# End to end: the pretraining script against its own step alone (issue: does the data path keep the GPU busy?)
# ----------------------------------------------------------------------------------------------------------------------
END_TO_END_VARIANTS = {  # name: extra flags of the pretraining script
    "persistent workers (default)": [],
    "workers restarted every epoch": ["--dataloader_persistent_workers", "false"],
    "ecg_values precomputed": ["--precompute_ecg_values", "true", "--train_crop", "center"],
    "no per-term gradient norms": ["--gradient_norm_logging_steps", "0"],
    "batched torch feature extractor": ["--feature_extraction_device", "cpu"],
}


def end_to_end_step_alone(args, device: torch.device) -> dict:
    """The config's training step on real batches of `--data_dir`, collated before the clock starts: what the script
    would reach if data and loop cost nothing. Same precision as the script (bf16 autocast on a GPU), same fused AdamW
    and clipping. The batches are drawn at random as the script draws them (one per timed step, cycled), not the
    split's first rows: reports are padded to the batch's longest, and the first 32 PTB-XL reports pad to 33 tokens
    where a random 32 pad to 61 on average, which the text tower (most of a small model's step) pays for."""
    from transformers import AutoTokenizer

    from merit_hf.models.merit.feature_extraction_merit import MeritFeatureExtractor
    from merit_hf.training.pretrain import (
        ARGUMENT_CLASSES,
        PretrainingCollator,
        build_model,
        load_pretraining_splits,
        masking_noise,
        parameter_groups,
        resolve_text_model,
    )
    from merit_hf.utils.arguments import parse_arguments

    model_args, data_args, train_args = parse_arguments(ARGUMENT_CLASSES, [args.config, *_data_flags(args)])
    text_path = resolve_text_model(model_args.text_model_name_or_path)
    torch.manual_seed(0)
    model = build_model(model_args, text_path).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, train_args.weight_decay), lr=1e-4, fused=True)
    train_split, _ = load_pretraining_splits(data_args)
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    collator = PretrainingCollator(
        feature_extractor, AutoTokenizer.from_pretrained(text_path), model_args.max_report_length
    )
    ecg = model.config.ecg_config
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for first in range(0, min(args.e2e_step_alone_steps, len(order) // args.e2e_batch_size) * args.e2e_batch_size,
                       args.e2e_batch_size):  # fmt: skip
        batch = collator([train_split[index] for index in order[first : first + args.e2e_batch_size]])
        ecg_ids = batch.pop("ecg_id").tolist()
        batch["noise"] = masking_noise(ecg_ids, (0, 0), (ecg.num_leads, ecg.num_patches_per_lead))
        batches.append({key: value.to(device) for key, value in batch.items()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    next_batch = itertools.cycle(batches)

    def train_step():
        batch = next(next_batch)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time_steps(train_step, args.e2e_warmup_steps, args.e2e_step_alone_steps, device)
    return {
        "batch_size": args.e2e_batch_size,
        "distinct_batches": len(batches),
        "seconds_per_step": seconds,
        "ecgs_per_second": args.e2e_batch_size / seconds,
    }


def _time_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def _data_flags(args) -> list[str]:
    """Flags the step alone and every script run share: the data and `--e2e_flags` (e.g. a frozen text tower)."""
    return ["--dataset_name", "ptbxl", "--data_dir", args.data_dir, "--source_sampling_rate",
            str(args.source_sampling_rate), "--streaming", "false", *args.e2e_flags]  # fmt: skip


def end_to_end_script(args, extra: list[str]) -> dict:
    """The pretraining script itself (a fresh process) on `--data_dir`; its `train_results.json` throughput totals,
    and the same over the steady intervals (the first logged interval, with worker start-up and warm-up, left out)."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "merit_hf.training.pretrain", args.config, *_data_flags(args),
            "--output_dir", output_dir, "--max_steps", str(args.e2e_steps), "--logging_steps", str(args.e2e_logging_steps),
            "--save_steps", "1000000", "--eval_split", "validation", "--max_eval_samples", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--per_device_train_batch_size", str(args.e2e_batch_size),
            "--dataloader_num_workers", str(args.e2e_num_workers), "--seed", "0", *extra,
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                              text=True, timeout=3600)  # fmt: skip
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        results = json.loads((Path(output_dir) / "train_results.json").read_text())
        log = [json.loads(line) for line in (Path(output_dir) / "log_history.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    seconds = sum(entry["seconds_per_step"] * args.e2e_logging_steps for entry in steady)
    waited = sum(entry["data_wait_seconds_per_step"] * args.e2e_logging_steps for entry in steady)
    diagnostics = sum(entry.get("diagnostics_seconds_per_step", 0.0) * args.e2e_logging_steps for entry in steady)
    return {
        "flags": extra,
        "process_wall_seconds": wall,
        "whole_run": results["throughput"],
        "steady": {
            "intervals": len(steady),
            "ecgs_per_second": args.e2e_batch_size * args.e2e_logging_steps * len(steady) / seconds,
            "data_wait_fraction": waited / seconds,
            "diagnostics_fraction": diagnostics / seconds,
            "seconds_per_step": seconds / (args.e2e_logging_steps * len(steady)),
        },
    }


def end_to_end_benchmark(args, written=None) -> dict:
    """Step alone and the script's variants, in one run; which stage limits where the script is below 90 %.
    `written(result so far)` is called after the step alone and after each variant (to write it: a run cut short
    keeps what finished)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    step = end_to_end_step_alone(args, device)
    chosen = args.e2e_variants or list(END_TO_END_VARIANTS)
    result = {"config": args.config, "data_dir": args.data_dir, "device": str(device), "step_alone": step,
              "script": {}, "num_workers": args.e2e_num_workers}  # fmt: skip
    for name in [None, *chosen]:
        if name is not None:
            variant = end_to_end_script(args, END_TO_END_VARIANTS[name])
            steady = variant["steady"]
            steady["of_step_alone"] = steady["ecgs_per_second"] / step["ecgs_per_second"]
            steady["limited_by"] = _limiting_stage(steady)
            result["script"][name] = variant
        if written is not None:
            written(result)
    return result


def _limiting_stage(steady: dict) -> str:
    if steady["of_step_alone"] >= 0.9:
        return "nothing: end to end is at least 90 % of the step alone"
    if steady["data_wait_fraction"] > 0.1:
        return (f"data: the loop waits {steady['data_wait_fraction']:.0%} of the time for batches (feature extractor "
                "in the workers); add workers or precompute ecg_values")  # fmt: skip
    if steady["diagnostics_fraction"] > 0.1:
        return (f"diagnostics: the per-term gradient norms take {steady['diagnostics_fraction']:.0%} of the time "
                "(two extra backward passes each; --gradient_norm_logging_steps)")  # fmt: skip
    return ("the loop around the step (host work between steps: masking noise, loss gathering, host syncs, "
            "optimizer/scheduler), not data")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Memory and MFU options of one pretraining step (issue: base-p75 at batch 256 within 40 GB, >= 35 % MFU)
# ----------------------------------------------------------------------------------------------------------------------
MEMORY_OPTIONS = {  # name: (activation checkpointing mode, layers or None for all, regional torch.compile)
    "none": ("none", None, False),
    "selective": ("selective", None, False),
    "full, half the layers": ("full", "half", False),
    "full": ("full", None, False),
}
COMPILE_OPTIONS = {"compile": ("none", None, True), "compile + selective": ("selective", None, True)}


def memory_options_group(preset: str, batch_size: int, options: list[str], warmup: int, steps: int,
                         peak_tflops: float | None, device: str | None = None,
                         bf16_autocast: bool | None = None) -> list[dict]:  # fmt: skip
    """Every option of one (preset, batch) in one process on the same weights and inputs: the step of the GPU
    measurements in issue 14 (both losses, MiniLM-shaped text tower, 64-token reports, bf16 autocast on CUDA, fused
    AdamW). Peak memory per option after `reset_peak_memory_stats`; an option that runs out of memory says so.
    `device`: default CUDA when present; `bf16_autocast`: default on CUDA only. Under selective checkpointing
    autocast's cache is off, as the pretraining script runs it (`make_accelerator`)."""
    from accelerate.utils import compile_regions
    from transformers import BertConfig

    from merit_hf import MeritConfig, MeritEcgConfig, MeritForPreTraining
    from merit_hf.training.activation_checkpointing import enable_activation_checkpointing

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16_autocast = device.type == "cuda" if bf16_autocast is None else bf16_autocast
    ecg_config = MeritEcgConfig.from_preset(preset)
    text = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    model = MeritForPreTraining(MeritConfig(ecg_config=ecg_config, text_config=text)).to(device).train()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "ecg_values": torch.randn(batch_size, 12, ecg_config.num_samples, generator=generator),
        "input_ids": torch.randint(1000, 20000, (batch_size, 64), generator=generator),
        "attention_mask": torch.ones(batch_size, 64, dtype=torch.long),
        "noise": torch.rand(batch_size, 12, ecg_config.num_patches_per_lead, generator=generator),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    flops_per_ecg = count_flops_per_sample(model, lambda rows: model(**rows).loss, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    peak = peak_tflops if peak_tflops is not None else default_peak_tflops(device)
    results = []
    for name in options:
        mode, layers, compiled = {**MEMORY_OPTIONS, **COMPILE_OPTIONS}[name]
        num_layers = ecg_config.num_hidden_layers // 2 if layers == "half" else layers
        enable_activation_checkpointing(model, mode, num_layers)
        forward = compile_regions(model) if compiled else model
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast,
                                  cache_enabled=mode != "selective")  # fmt: skip

        def train_step(forward=forward, autocast=autocast):
            with autocast:
                loss = forward(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        result = {"preset": preset, "batch_size": batch_size, "option": name, "device": str(device)}
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            result["first_step_seconds"] = _time_steps(train_step, 0, 1, device)  # compiling included
            seconds = _time_steps(train_step, warmup, steps, device)
        except Exception as error:  # out of memory above all: the other options still run
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(result)
            continue
        result.update(seconds_per_step=seconds, ecgs_per_second=batch_size / seconds,
                      gflops_per_ecg=flops_per_ecg / 1e9, achieved_tflops=batch_size * flops_per_ecg / seconds / 1e12)  # fmt: skip
        if peak:
            result["mfu"] = result["achieved_tflops"] / peak
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["gpu"] = torch.cuda.get_device_name()
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    return results


def memory_options_benchmark(args) -> list[dict]:
    """One process per (preset, batch), so peak memory starts clean and an out-of-memory stays in its group."""
    base, small = args.memory_presets
    groups = [(base, batch, args.options) for batch in args.base_batches]
    groups += [(small, batch, ["none"]) for batch in args.small_batches]
    results = []
    for preset, batch, options in groups:
        command = [sys.executable, __file__, "--single_memory_group", preset, str(batch), "--options", *options,
                   "--memory_warmup_steps", str(args.memory_warmup_steps), "--memory_steps", str(args.memory_steps)]  # fmt: skip
        if args.peak_tflops is not None:
            command += ["--peak_tflops", str(args.peak_tflops)]
        if args.cpu:
            command.append("--cpu")
        # Its stderr goes straight to this run's log, where each row it prints as measured stays if the run is cut
        # short (a GPU call's deadline); the finished group's rows come back on its stdout.
        done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, timeout=3600)
        if done.returncode != 0:
            results.append({"preset": preset, "batch_size": batch,
                            "error": f"exit status {done.returncode}; its traceback is in this run's log (stderr)"})  # fmt: skip
            continue
        results.extend(json.loads(done.stdout.strip().splitlines()[-1]))
        for result in results[-len(options) :]:
            print({key: value for key, value in result.items() if key != "gpu"}, flush=True)
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


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU even when a GPU is present")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="GPU dense bf16 peak; default by GPU name (merit_hf.utils.throughput; H100/H200: 989)")  # fmt: skip
    parser.add_argument("--assumed_mfu", type=float, default=0.4, help="for the GPU estimate when no GPU ran")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of MIMIC-IV-ECG for the projection")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--skip_scaling", action="store_true")
    parser.add_argument("--skip_step", action="store_true", help="reuse the step result already in --output")
    parser.add_argument("--scaling_config", default="configs/quickstart.yaml")
    parser.add_argument("--scaling_steps", type=int, default=20)
    parser.add_argument("--scaling_batch_size", type=int, default=32)
    parser.add_argument("--output", default=None, help="results JSON (default: one file per mode in results/)")
    end_to_end = parser.add_argument_group("--end_to_end: the script against its step alone, on --data_dir")
    end_to_end.add_argument("--end_to_end", action="store_true")
    end_to_end.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data" / "ptbxl_2k"))
    end_to_end.add_argument("--source_sampling_rate", type=int, default=100)
    end_to_end.add_argument("--e2e_batch_size", type=int, default=128)
    end_to_end.add_argument("--e2e_num_workers", type=int, default=8)
    end_to_end.add_argument("--e2e_steps", type=int, default=60, help="script steps (4 epochs of ptbxl_2k at 128)")
    end_to_end.add_argument("--e2e_logging_steps", type=int, default=5)
    end_to_end.add_argument("--e2e_warmup_steps", type=int, default=3)
    end_to_end.add_argument("--e2e_step_alone_steps", type=int, default=20)
    end_to_end.add_argument("--e2e_variants", nargs="+", default=None, choices=list(END_TO_END_VARIANTS),
                            help="script variants to run (default: all), e.g. to fit a GPU time budget")  # fmt: skip
    end_to_end.add_argument("--e2e_flags", nargs=argparse.REMAINDER, default=[],
                            help="last: pretraining-script flags for both, e.g. --e2e_flags --freeze_text_model true")  # fmt: skip
    memory = parser.add_argument_group("--memory_options: peak memory and MFU per activation-checkpointing option")
    memory.add_argument("--memory_options", action="store_true")
    memory.add_argument("--options", nargs="+", default=list(MEMORY_OPTIONS),
                        help=f"of {list(MEMORY_OPTIONS) + list(COMPILE_OPTIONS)}")  # fmt: skip
    memory.add_argument("--memory_presets", nargs=2, default=["base-p75", "small-p125"],
                        help="the preset measured with every option, and the one measured without (launch-bound)")  # fmt: skip
    memory.add_argument("--base_batches", type=int, nargs="*", default=[64, 256])
    memory.add_argument("--small_batches", type=int, nargs="*", default=[64, 256, 512])
    memory.add_argument("--memory_warmup_steps", type=int, default=3)
    memory.add_argument("--memory_steps", type=int, default=10)
    memory.add_argument("--single_memory_group", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device_name = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.single_memory_group:
        preset, batch = args.single_memory_group
        group = memory_options_group(preset, int(batch), args.options, args.memory_warmup_steps, args.memory_steps,
                                     args.peak_tflops, device_name)  # fmt: skip
        print(json.dumps(group))
        return
    if args.end_to_end or args.memory_options:
        name = "pretrain_end_to_end" if args.end_to_end else "pretrain_memory_mfu"
        result = {"machine": _machine()}
        output = Path(args.output or REPO_ROOT / "benchmarks" / "results" / f"{name}_{device_name}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        if args.end_to_end:

            def written(part: dict) -> None:
                output.write_text(json.dumps({**result, "end_to_end": part}, indent=2) + "\n")

            result["end_to_end"] = end_to_end_benchmark(args, written)
        else:
            result["memory_options"] = memory_options_benchmark(args)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {output}")
        return
    args.output = args.output or str(REPO_ROOT / "benchmarks" / "results" / "pretrain_throughput.json")
    # The step's MFU and the MIMIC projection's GPU estimate: this GPU's peak, else an H100 SXM's.
    args.peak_tflops = args.peak_tflops or default_peak_tflops(device_name) or 989.0

    previous = Path(args.output)
    if args.skip_step and previous.is_file():
        step = json.loads(previous.read_text())["step"]
    else:
        step = step_benchmark(args)
    result = {
        "machine": _machine(),
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
