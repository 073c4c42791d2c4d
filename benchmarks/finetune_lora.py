"""Full fine-tuning against LoRA fine-tuning of the quick-start-sized encoder, the same steps each, on the bundled
PTB-XL superclass split: trainable parameters, seconds per step, peak RSS, test macro AUROC.

    python benchmarks/finetune_lora.py                                   # random-init quick-start shape
    python benchmarks/finetune_lora.py --model quickstart_output/model   # the quick-start's pretrained model
    # -> results/finetune_lora_cpu.json (results/finetune_lora_cuda.json on a GPU)

Both methods run through the probe protocol's fine-tuning (`merit_hf.training.finetune.run_fine_tune`, the code
behind `python -m merit_hf.training.probe --mode finetune [--finetune_method lora]`): batch 32, a constant learning
rate, `--epochs` epochs with early stopping switched off (patience = epochs), so all take the same optimizer steps,
and the test logits come from the best validation epoch. Variants: full; LoRA (r 8, alpha 16, dropout 0.1 on qkv,
proj, fc1, fc2, the CLI's defaults); LoRA without adapter dropout. Each runs in its own process so that its peak RSS
is its own (`ru_maxrss`, read after the data is loaded and again after the run). The learning rate is each method's
usual one (full: the protocol's 1e-4; LoRA: 1e-3, as LoRA recipes use), written in the JSON.

The bundled sample is 344 / 78 / 66 records: the AUROCs are a smoke-scale check that both paths learn, not a
comparison of the methods, and on a shared CPU the step times are only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from merit_hf import MeritEcgConfig, MeritEcgModel
from merit_hf.evaluation.probe import ProbeArguments, load_dataset_dict, load_encoder, load_feature_extractor
from merit_hf.training.finetune import run_fine_tune

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# What each variant sets on `ProbeArguments`; every other setting is shared. LoRA without adapter dropout shows what
# the dropout costs: peft then skips the dropped copy of each adapted layer's input.
VARIANTS = {
    "full": {"finetune_method": "full", "finetune_learning_rate": 1e-4},
    "lora": {"finetune_method": "lora", "finetune_learning_rate": 1e-3},
    "lora_no_dropout": {"finetune_method": "lora", "finetune_learning_rate": 1e-3, "lora_dropout": 0.0},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def quickstart_shaped_encoder(seed: int) -> MeritEcgModel:
    """A random-init encoder of `configs/quickstart.yaml`'s `ecg_config`."""
    settings = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())["ecg_config"]
    torch.manual_seed(seed)
    return MeritEcgModel(MeritEcgConfig(**settings))


def measure(variant: str, model: str | None, epochs: int, seed: int) -> dict:
    """One variant in this process: the run's numbers and this process's peak RSS before and after it."""
    arguments = ProbeArguments(
        mode="finetune",
        **VARIANTS[variant],
        batch_size=32,
        finetune_max_epochs=epochs,
        finetune_patience=epochs,  # no early stop: both methods take the same steps
        num_bootstrap=0,
        use_cpu=not torch.cuda.is_available(),
    )
    dataset_dict = load_dataset_dict(REPO_ROOT / "data" / "ptbxl_sample", 100, arguments)
    encoder = load_encoder(model)[0] if model else quickstart_shaped_encoder(seed)
    feature_extractor = load_feature_extractor(model, encoder) if model else None
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    results = run_fine_tune(
        encoder, dataset_dict, "superclass", 1.0, seed, baseline=False, feature_extractor=feature_extractor,
        arguments=arguments,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    training = results.model.extra["training"]
    throughput = training["throughput"]
    return {
        "variant": variant,
        "method": arguments.finetune_method,
        "learning_rate": arguments.finetune_learning_rate,
        **({"lora": arguments.lora_options()} if arguments.finetune_method == "lora" else {}),
        "trainable_parameters": training["trainable_parameters"],
        "total_parameters": training["total_parameters"],
        "optimizer_steps": throughput["steps_measured"],
        "seconds_per_step": round(throughput["seconds_per_step"], 4),
        "data_wait_seconds_per_step": round(throughput["data_wait_seconds_per_step"], 4),
        "run_seconds_with_evaluation": round(seconds, 1),
        "peak_rss_mib_after_data_load": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **(
            {"peak_cuda_memory_gib": round(throughput["peak_memory_gib"], 3)}
            if "peak_memory_gib" in throughput
            else {}
        ),
        "best_epoch": training["best_epoch"],
        "epochs_run": training["epochs_run"],
        "test_macro_auroc": results.model.metrics["macro_auroc"].value,
        "records": {split: results.dataset["num_records"][split] for split in ("train", "validation", "test")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a MERIT checkpoint (default: random init, quick-start shape)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of 11 steps (344 records, batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one variant, JSON out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        row = measure(args.child, args.model, args.epochs, args.seed)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--child", variant, "--epochs", str(args.epochs), "--seed", str(args.seed),
                   "--threads", str(args.threads), *(["--model", args.model] if args.model else [])]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps(rows[-1]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "benchmark": "finetune_lora",
        "command": " ".join(["python", "benchmarks/finetune_lora.py", *sys.argv[1:]]),
        "model": args.model or "random init, configs/quickstart.yaml ecg_config",
        "data": "data/ptbxl_sample superclass, PTB-XL v1.0.3 rows with a superclass label, 100 Hz (records below)",
        "protocol": "merit_hf.training.finetune.run_fine_tune: batch 32, AdamW, constant learning rate, "
        f"{args.epochs} epochs, no early stop, test logits of the best validation epoch, no bootstrap",
        "scale": f"smoke: {rows[0]['records']['test']} test records; the AUROCs show that the paths learn, not "
        "which method is better",
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
            "torch_threads": args.threads,
            "note": "2 CPU cores shared with other jobs while this ran: times are indicative; the variants ran "
            "back to back in one invocation"
            if device == "cpu"
            else "",
        },
        "torch": torch.__version__,
        "results": rows,
        "vs_full": {
            row["variant"]: {
                "trainable_parameter_ratio": round(row["trainable_parameters"] / rows[0]["trainable_parameters"], 4),
                "seconds_per_step_ratio": round(row["seconds_per_step"] / rows[0]["seconds_per_step"], 3),
                "peak_rss_mib_difference": round(row["peak_rss_mib"] - rows[0]["peak_rss_mib"], 1),
            }
            for row in rows[1:]
        },
    }
    output = Path(args.output or RESULTS / f"finetune_lora_{device}.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
