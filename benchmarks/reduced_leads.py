"""Reduced-lead robustness: a checkpoint's PTB-XL linear probe on records with 1, 2, 3, 6, 8 or 12 leads, the missing
leads left out of the encoder (`lead_mask`) against the same leads fed as zeros (what a model without `lead_mask` has
to do), for the model and its random-init twin under the same harness.

    python benchmarks/reduced_leads.py configs/probe_quickstart.yaml \\
        --output_dir benchmarks/results/reduced_leads/quickstart

The probe is trained once on clean 12-lead features; only the test split loses leads (`merit_hf.evaluation.shifts`,
`LEAD_SUBSETS`: lead I; I+II; I+II+V2; the six limb leads; I+II+V1-V6; all twelve). Outputs in `output_dir`:
`robustness_<label set>_seed<seed>.json` (the robustness results schema) and `reduced_leads.md`, one table per label
set and role: one row per lead count, with the masked and the zero-filled macro AUROC and their difference.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

from merit_hf.evaluation.results import metric_cell
from merit_hf.evaluation.robustness import input_shifts, run_robustness
from merit_hf.evaluation.shifts import LEAD_SUBSETS
from merit_hf.training.probe import ProbeArguments, load_dataset_dict, load_encoder, load_feature_extractor
from merit_hf.utils.arguments import parse_arguments


def lead_count_shifts(seed: int) -> dict:
    """The `leads_<n>_masked` and `leads_<n>_zeroed` shifts of the robustness evaluation, and no other."""
    return {name: shift for name, shift in input_shifts(seed=seed).items() if name.startswith("leads_")}


def _value(entry: dict | None, metric: str) -> float | None:
    return (((entry or {}).get("metrics") or {}).get(metric) or {}).get("value")


def lead_table(results: dict[str, Any], role: str = "model", metric: str = "macro_auroc") -> str:
    """Markdown: one row per lead count, the metric with its CI when the missing leads are left out and when they are
    zeros, and the difference (left out minus zeros)."""
    lines = [
        f"| leads | recorded | {metric}, left out (lead_mask) | {metric}, fed as zeros | left out - zeros |",
        "| --- | --- | --- | --- | --- |",
        f"| clean 12 | all | {metric_cell(results[role], metric)} | - | - |",
    ]
    for count, leads in LEAD_SUBSETS.items():
        masked = results["shifts"].get(f"leads_{count}_masked", {}).get(role)
        zeroed = results["shifts"].get(f"leads_{count}_zeroed", {}).get(role)
        if masked is None or zeroed is None:
            continue
        a, b = _value(masked, metric), _value(zeroed, metric)
        difference = f"{a - b:+.3f}" if a is not None and b is not None else "n/a"
        recorded = ", ".join(leads) if count < 12 else "all"
        lines.append(
            f"| {count} | {recorded} | {metric_cell(masked, metric)} | {metric_cell(zeroed, metric)} | {difference} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Returns `{run name: {lead count: {"masked": value, "zeroed": value}}}` for the model."""
    (arguments,) = parse_arguments((ProbeArguments,), sys.argv[1:] if argv is None else argv)
    if not arguments.model_name_or_path:
        raise ValueError("model_name_or_path: required")
    start = time.perf_counter()
    output_dir = Path(arguments.output_dir)
    dataset_dict = load_dataset_dict(arguments.dataset, arguments.sampling_rate)
    encoder, _ = load_encoder(arguments.model_name_or_path)
    feature_extractor = load_feature_extractor(arguments.model_name_or_path, encoder)
    runs, summary = {}, {}
    for seed in arguments.seeds:
        for label_set in arguments.label_sets:
            name = f"robustness_{label_set}_seed{seed}"
            runs[name] = run_robustness(
                encoder,
                dataset_dict,
                label_set,
                seed,
                arguments.baseline,
                feature_extractor,
                arguments,
                shifts=lead_count_shifts(seed),
                group_columns=(),
                output_file=output_dir / f"{name}.json",
            )
            summary[name] = {
                count: {
                    kind: _value(runs[name]["shifts"][f"leads_{count}_{kind}"]["model"], "macro_auroc")
                    for kind in ("masked", "zeroed")
                }
                for count in LEAD_SUBSETS
            }
    seconds = time.perf_counter() - start
    lines = [
        f"# Reduced leads: `{arguments.model_name_or_path}` on `{arguments.dataset}`",
        "",
        f"Machine: {platform.node() or 'unknown'} ({platform.machine()}), wall time {seconds:.0f} s. Linear probe "
        "trained on clean 12-lead records; the test split keeps only the listed leads. [95% bootstrap CI].",
    ]
    for name, results in runs.items():
        for role in ("model", "baseline"):
            if results.get(role):
                lines += ["", f"## {name}, {role}", "", lead_table(results, role)]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "reduced_leads.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    main()
