"""The evaluation suite in one command: linear probe, zero-shot and robustness on PTB-XL, each next to a random-init
encoder under the same harness, written as results JSONs plus one markdown summary.

    # the bundled 500 records (smoke-test scale) and the quick-start model:
    python benchmarks/evaluation.py configs/probe_quickstart.yaml   # -> results/probe_quickstart/
    python benchmarks/evaluation.py configs/probe_quickstart.yaml --output_dir benchmarks/results/evaluation/quickstart \\
        --overwrite_output_dir true                                # the shipped results, again
    # the full protocol on the full PTB-XL (all label sets, 1/10/100 %, 3 seeds):
    python benchmarks/evaluation.py configs/probe_ptbxl_full.yaml --model_name_or_path <checkpoint> \\
        --dataset <ptb-xl-1.0.3 folder or converted dataset> --zero_shot_label_sets superclass subclass

Outputs in `output_dir`: `linear-probe_<label set>_<fraction>_seed<seed>.json`, `zero-shot_<label set>_seed<seed>.json`,
`robustness_<label set>_seed<seed>.json` (schema `merit_hf.results/v1`, see `merit_hf.evaluation.results`) and
`summary.md` (the tables, with the machine and the wall time).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit_hf.evaluation.probe import dataset_description, feature_device
from merit_hf.evaluation.results import metric_cell
from merit_hf.evaluation.robustness import robustness_table, run_robustness
from merit_hf.evaluation.zero_shot import evaluate_zero_shot
from merit_hf.training.probe import (
    ProbeArguments,
    check_outputs_free,
    load_dataset_dict,
    load_encoder,
    load_feature_extractor,
    probe_features,
    run_linear_probe,
    run_name,
)
from merit_hf.utils.arguments import parse_arguments
from merit_hf.utils.launch import is_first_launched_process


@dataclass
class SuiteArguments:
    """What the suite adds to the probe's arguments."""

    zero_shot_label_sets: list[str] = field(
        default_factory=lambda: ["superclass"], metadata={"help": "Label sets scored zero-shot; 'none' for none."}
    )
    robustness_label_sets: list[str] = field(
        default_factory=lambda: ["superclass"], metadata={"help": "Label sets of the robustness shifts; 'none'."}
    )

    def __post_init__(self):
        for name in ("zero_shot_label_sets", "robustness_label_sets"):  # `none` (any case) for no label set
            setattr(self, name, [value for value in getattr(self, name) if str(value).lower() != "none"])

    skip_zero_shot: bool = field(default=False, metadata={"help": "For ECG-only checkpoints (no text tower)."})


def _row(results: dict[str, Any], name: str, metrics: tuple[str, ...]) -> str:
    cells = [f"{metric_cell(results['model'], m)} | {metric_cell(results.get('baseline'), m)}" for m in metrics]
    counts = results["dataset"].get("num_records", {})
    size = f"{counts.get('train', '?')}/{counts.get('validation', '?')}/{counts.get('test', '?')}"
    return f"| {name} | {size} | " + " | ".join(cells) + " |"


def summary_markdown(runs: dict[str, dict[str, Any]], arguments: ProbeArguments, seconds: float) -> str:
    metrics = ("macro_auroc", "macro_f1", "macro_f1_max_over_thresholds")
    header = " | ".join(f"{m} model | {m} random-init" for m in metrics)
    lines = [
        f"# Evaluation of `{arguments.model_name_or_path}` on `{arguments.dataset}`",
        "",
        f"Machine: {platform.node() or 'unknown'} ({platform.machine()}, {platform.processor() or 'cpu'}), "
        f"Python {platform.python_version()}; wall time {seconds:.0f} s. Values are fractions (x100 for %), "
        "[95% bootstrap CI]; n = train/validation/test records with a label of the set.",
        "",
        f"| run | n | {header} |",
        "| --- | --- | " + " | ".join("---" for _ in range(2 * len(metrics))) + " |",
    ]
    lines += [_row(results, name, metrics) for name, results in runs.items() if results["task"] != "robustness"]
    for name, results in runs.items():
        if results["task"] == "robustness":
            lines += ["", f"## Robustness ({name}), model", "", robustness_table(results, "model")]
            if results.get("baseline") is not None:  # `--no_baseline` runs have none
                lines += [
                    "",
                    f"## Robustness ({name}), random-init encoder",
                    "",
                    robustness_table(results, "baseline"),
                ]
    return "\n".join(lines) + "\n"


def suite_outputs(arguments: ProbeArguments, suite: SuiteArguments) -> list[Path]:
    """The files the suite writes into `output_dir`."""
    names = [
        run_name("linear-probe", label_set, fraction, seed)
        for seed in arguments.seeds
        for label_set in arguments.label_sets
        for fraction in arguments.label_fractions
    ]
    for seed in arguments.seeds:
        names += [] if suite.skip_zero_shot else [f"zero-shot_{ls}_seed{seed}" for ls in suite.zero_shot_label_sets]
        names += [f"robustness_{label_set}_seed{seed}" for label_set in suite.robustness_label_sets]
    return [Path(arguments.output_dir) / f"{name}.json" for name in names] + [
        Path(arguments.output_dir) / "summary.md"
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments, suite = parse_arguments([ProbeArguments, SuiteArguments], sys.argv[1:] if argv is None else argv)
    if not arguments.model_name_or_path:
        raise ValueError("model_name_or_path: required")
    if not is_first_launched_process():  # the suite runs on one process; the others would redo it and write alike
        print("benchmarks/evaluation.py runs on the first process of a launch; this one has nothing to do")
        return {}
    start = time.perf_counter()
    output_dir = Path(arguments.output_dir)
    check_outputs_free(arguments, suite_outputs(arguments, suite))  # before anything is computed
    dataset_dict = load_dataset_dict(arguments.dataset, arguments.sampling_rate, arguments)
    encoder, _ = load_encoder(arguments.model_name_or_path)
    feature_extractor = load_feature_extractor(arguments.model_name_or_path, encoder)
    runs: dict[str, dict[str, Any]] = {}
    for seed in arguments.seeds:
        features = probe_features(encoder, feature_extractor, dataset_dict, seed, arguments.baseline, arguments)
        for label_set in arguments.label_sets:
            for fraction in arguments.label_fractions:
                name = run_name("linear-probe", label_set, fraction, seed)
                runs[name] = run_linear_probe(
                    encoder,
                    dataset_dict,
                    label_set,
                    fraction,
                    seed,
                    arguments.baseline,
                    feature_extractor,
                    arguments,
                    features,
                    output_dir / f"{name}.json",
                )
        if not suite.skip_zero_shot:
            for label_set in suite.zero_shot_label_sets:
                name = f"zero-shot_{label_set}_seed{seed}"
                runs[name] = evaluate_zero_shot(
                    arguments.model_name_or_path,
                    dataset_dict,
                    label_set,
                    seed=seed,
                    baseline=arguments.baseline,
                    num_bootstrap=arguments.num_bootstrap,
                    batch_size=arguments.batch_size,
                    output_file=output_dir / f"{name}.json",
                    dataset_extra=dataset_description(arguments),
                    device=feature_device(arguments),
                )
        for label_set in suite.robustness_label_sets:
            name = f"robustness_{label_set}_seed{seed}"
            runs[name] = run_robustness(
                encoder,
                dataset_dict,
                label_set,
                seed,
                arguments.baseline,
                feature_extractor,
                arguments,
                output_file=output_dir / f"{name}.json",
            )
    seconds = time.perf_counter() - start
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.md").write_text(summary_markdown(runs, arguments, seconds), encoding="utf-8")
    summary = {
        name: {
            role: results[role]["metrics"]["macro_auroc"]["value"]
            for role in ("model", "baseline")
            if results.get(role)
        }
        for name, results in runs.items()
    }
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
