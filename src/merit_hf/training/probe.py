"""`python -m merit_hf.training.probe`: the probe protocol's command line (`merit_hf.evaluation.probe`), linear
probing (`--mode linear`, the default) or fine-tuning (`--mode finetune`: `merit_hf.training.finetune`, on
`transformers.Trainer` with early stopping; every weight, or PEFT LoRA adapters and the head with
`--finetune_method lora`, whose adapter is saved beside the results).

Run (1 CPU, N GPUs and M nodes alike):

    python -m merit_hf.training.probe configs/probe_quickstart.yaml
    accelerate launch -m merit_hf.training.probe configs/probe_ptbxl_full.yaml --mode finetune
    accelerate launch -m merit_hf.training.probe configs/probe_ptbxl_full.yaml --mode finetune \
        --resume_from_checkpoint latest   # after an interruption: keeps what was finished, continues the rest
    python -m merit_hf.training.probe configs/probe_quickstart.yaml --mode finetune --finetune_method lora \
        --lora_r 8 --finetune_learning_rate 1e-3 --merge_lora true
    accelerate launch --multi_gpu --num_machines M --num_processes N ... -m merit_hf.training.probe <config>

The linear probe runs on the main process (features are small; the other processes stop at once); fine-tuning uses
every process (without a GPU, add `--use_cpu true` to join them: otherwise each would fine-tune alone, and this is
refused). Fine-tuning trains in bf16 autocast on a CUDA GPU with bf16 and in fp32 elsewhere (`--mixed_precision auto`);
`--mixed_precision no|bf16|fp16`, or `accelerate launch --mixed_precision`, chooses (`finetune_precision`), and the
results JSON records it. The names of `merit_hf.evaluation.probe` stay importable from here for one release.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.probe import *  # noqa: F403  (the old import path, kept for one release)
from ..evaluation.probe import (
    ProbeArguments,
    load_dataset_dict,
    load_encoder,
    load_feature_extractor,
    probe_features,
    run_linear_probe,
    run_name,
)
from ..utils.arguments import parse_arguments
from ..utils.launch import is_first_launched_process
from .finetune import check_fine_tune_resumable, fine_tune, lora_output_dirs, run_fine_tune  # noqa: F401
from .finetune_resume import ROLES, role_checkpoint_dir

logger = logging.getLogger(__name__)


def run_task_name(arguments: ProbeArguments) -> str:
    """The first part of each results file's name: the task, and `-lora` for LoRA fine-tuning, so that a LoRA run
    and a full one of the same setting can share an `output_dir`."""
    if arguments.mode == "linear":
        return "linear-probe"
    return "fine-tune-lora" if arguments.finetune_method == "lora" else "fine-tune"


def units(arguments: ProbeArguments) -> list[tuple[int, str, float, Path]]:
    """`(seed, label set, label fraction, results file)` of each unit of the run, in the order it runs them."""
    return [
        (seed, label_set, fraction,
         Path(arguments.output_dir) / f"{run_name(run_task_name(arguments), label_set, fraction, seed)}.json")
        for seed in arguments.seeds
        for label_set in arguments.label_sets
        for fraction in arguments.label_fractions
    ]  # fmt: skip


def planned_outputs(arguments: ProbeArguments) -> list[Path]:
    """What the run writes into `output_dir`: one results JSON per (seed, label set, fraction) and, for fine-tuning,
    the folders each role keeps while it runs (`<run>_<role>_checkpoints`, an interrupted run's to resume) and, for
    LoRA, the adapter (and merged model) folders beside each."""
    paths = []
    for *_, output_file in units(arguments):
        paths.append(output_file)
        if arguments.mode != "linear":
            paths.extend(role_checkpoint_dir(output_file, role) for role in ROLES)
            paths.extend(lora_output_dirs(output_file, arguments).values())
    return paths


def check_outputs_free(arguments: ProbeArguments, planned: Sequence[Path] | None = None) -> None:
    """Refuse to replace an earlier run's results (another model's, perhaps) unless `--overwrite_output_dir true`:
    results of the same task, label set, fraction and seed share a file name. `planned`: what the run writes
    (default `planned_outputs`; `benchmarks/evaluation.py` passes its suite's files)."""
    if arguments.overwrite_output_dir:
        return
    existing = [path for path in (planned_outputs(arguments) if planned is None else planned) if path.exists()]
    if existing:
        names = ", ".join(path.name for path in existing[:4]) + (
            f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        )
        resume = (
            " To continue an interrupted fine-tune, keeping what it finished, pass --resume_from_checkpoint latest."
            if arguments.mode == "finetune"
            else ""
        )
        raise FileExistsError(
            f"{arguments.output_dir}: holds results this run would replace ({names}). Pass --overwrite_output_dir "
            f"true to replace them, or choose another --output_dir.{resume}"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every (label set, label fraction, seed) of the config; returns `{run name: {"model": auroc, "baseline":
    auroc}}` and writes one results JSON per run to `output_dir`."""
    (arguments,) = parse_arguments([ProbeArguments], sys.argv[1:] if argv is None else argv)
    if not arguments.model_name_or_path:
        raise ValueError("model_name_or_path: required (a MERIT checkpoint folder or Hub id)")
    if arguments.resume_from_checkpoint is None:
        check_outputs_free(arguments)  # before the data and model load, on every process
    if arguments.mode == "linear" and not is_first_launched_process():
        logger.info("linear probe: it runs on the main process; this process has nothing to do")
        return {}
    dataset_dict = load_dataset_dict(arguments.dataset, arguments.sampling_rate, arguments)
    encoder, _ = load_encoder(arguments.model_name_or_path)
    feature_extractor = load_feature_extractor(arguments.model_name_or_path, encoder)
    if arguments.resume_from_checkpoint is not None:  # refuse other settings now, not after hours of training
        for seed, label_set, fraction, output_file in units(arguments):
            check_fine_tune_resumable(encoder, dataset_dict, label_set, fraction, seed, feature_extractor, arguments,
                                      output_file)  # fmt: skip
    summary: dict[str, Any] = {}
    for seed in arguments.seeds:
        features = None
        if arguments.mode == "linear":
            features = probe_features(encoder, feature_extractor, dataset_dict, seed, arguments.baseline, arguments)
        for label_set in arguments.label_sets:
            for fraction in arguments.label_fractions:
                name = run_name(run_task_name(arguments), label_set, fraction, seed)
                output_file = Path(arguments.output_dir) / f"{name}.json"
                if arguments.mode == "linear":
                    results = run_linear_probe(
                        encoder,
                        dataset_dict,
                        label_set,
                        fraction,
                        seed,
                        baseline=arguments.baseline,
                        feature_extractor=feature_extractor,
                        arguments=arguments,
                        features=features,
                        output_file=output_file,
                    )
                else:
                    results = run_fine_tune(
                        encoder,
                        dataset_dict,
                        label_set,
                        fraction,
                        seed,
                        baseline=arguments.baseline,
                        feature_extractor=feature_extractor,
                        arguments=arguments,
                        output_file=output_file,
                    )
                summary[name] = {
                    role: results[role]["metrics"]["macro_auroc"]["value"]
                    for role in ("model", "baseline")
                    if results.get(role)
                }
                logger.info("%s: macro AUROC %s", name, summary[name])
    return summary


if __name__ == "__main__":
    summary = main()
    if is_first_launched_process():
        print(json.dumps(summary, indent=2))
