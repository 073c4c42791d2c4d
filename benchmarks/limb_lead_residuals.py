"""Einthoven's and Goldberger's residuals of real PTB-XL records, as labelled and with two limb leads exchanged.

    python benchmarks/limb_lead_residuals.py --folders ../shared/data/ptbxl_2k/records100 \
        ../shared/data/ptbxl_subset500/records500     # -> results/limb_lead_residuals.json

Every record (`*.hea`) under each folder is read with merit_hf's reader (`read_wfdb_record`, the
header's units and gains, no filtering) and measured with `limb_lead_residuals` (the RMS of I + III - II and of
aVR + aVL + aVF over the RMS of the law's largest lead, each lead's mean removed, on at most 1,000 samples evenly
spaced: every 5th at 500 Hz), as labelled and with each pair of
the six limb leads exchanged in the header. The feature extractor's `max_limb_lead_residual` (0.1) must lie between the
largest residual of the records as labelled and the smallest of those with I and II exchanged. On 200 records, the
feature extractor's two paths are timed with the check and without it (`lead_swap_policy="off"`), alternating.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np

from merit_hf import MeritFeatureExtractor
from merit_hf.models.merit.feature_extraction_merit import (
    DEFAULT_MAX_LIMB_LEAD_RESIDUAL,
    limb_lead_residuals,
    read_wfdb_record,
)

RESULTS = Path(__file__).parent / "results"
LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")


def exchanged(lead_names: list[str], first: str, second: str) -> list[str]:
    """The header's lead names with `first` and `second` exchanged (case-insensitive)."""
    swap = {first.lower(): second, second.lower(): first}
    return [swap.get(name.lower(), name) for name in lead_names]


def distribution(values: list[float]) -> dict[str, float]:
    values = np.asarray(values)
    return {
        "min": float(values.min()),
        "p1": float(np.percentile(values, 1)),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


def measure_folder(folder: Path, timing_records: int) -> dict:
    records = sorted(folder.rglob("*.hea"))
    as_labelled: dict[str, list[float]] = {"Einthoven": [], "Goldberger": []}
    swapped: dict[str, list[float]] = {f"{a}<->{b}": [] for a, b in itertools.combinations(LIMB_LEADS, 2)}
    swapped_by_law: dict[str, dict[str, list[float]]] = {"I<->II": {"Einthoven": [], "Goldberger": []}}
    signals = []
    for header in records:
        read = read_wfdb_record(header.with_suffix(""))
        signal, names = np.asarray(read["signal"], dtype=np.float64), list(read["lead_names"])
        for law, value in limb_lead_residuals(signal, names).items():
            as_labelled[law].append(value)
        for first, second in itertools.combinations(LIMB_LEADS, 2):
            residuals = limb_lead_residuals(signal, exchanged(names, first, second))
            swapped[f"{first}<->{second}"].append(max(residuals.values()))
            if (first, second) == ("I", "II"):
                for law, value in residuals.items():
                    swapped_by_law["I<->II"][law].append(value)
        if len(signals) < timing_records:
            signals.append((signal.astype(np.float32), names, read["sampling_rate"]))
    return {
        "folder": f"{folder.parent.name}/{folder.name}",
        "records": len(records),
        "as_labelled": {law: distribution(values) for law, values in as_labelled.items()},
        "as_labelled_either_law_max": max(max(values) for values in as_labelled.values()),
        "I<->II_by_law": {law: distribution(values) for law, values in swapped_by_law["I<->II"].items()},
        "exchanged_pairs_larger_law": {pair: distribution(values) for pair, values in swapped.items()},
        "seconds_per_record": timing(signals),
        "timed_records": len(signals),
    }


def timing(signals: list[tuple[np.ndarray, list[str], float]], rounds: int = 3) -> dict[str, float]:
    """Seconds per record of the feature extractor on `signals` with the check (`lead_swap_policy="warn"`) and without
    it (`"off"`): scipy path record by record, batched torch path on the CPU (all `signals` in one call); the settings
    alternate round by round, medians of `rounds`. And `limb_lead_residuals` alone."""
    names, rates = [names for _, names, _ in signals], [rate for _, _, rate in signals]
    arrays = [signal for signal, _, _ in signals]
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for policy in ("off", "warn"):
            extractor = MeritFeatureExtractor(lead_swap_policy=policy)
            extractor(arrays[:3], sampling_rate=rates[:3], lead_names=names[:3], device="cpu")  # warm-up
            start = time.perf_counter()
            for signal, lead_names, rate in signals:
                extractor(signal, sampling_rate=rate, lead_names=lead_names, return_tensors="np")
            runs.setdefault(f"scipy_path_{policy}", []).append((time.perf_counter() - start) / len(signals))
            start = time.perf_counter()
            extractor(arrays, sampling_rate=rates, lead_names=names, device="cpu")
            runs.setdefault(f"torch_path_cpu_{policy}", []).append((time.perf_counter() - start) / len(signals))
        start = time.perf_counter()
        for signal, lead_names, _ in signals:
            limb_lead_residuals(signal, lead_names)
        runs.setdefault("limb_lead_residuals", []).append((time.perf_counter() - start) / len(signals))
    return {name: float(np.median(values)) for name, values in runs.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folders", nargs="+", required=True, help="Folders of WFDB records (e.g. PTB-XL's records500)"
    )
    parser.add_argument("--timing_records", type=int, default=200, help="Records per folder to time the check on")
    parser.add_argument("--output", default=str(RESULTS / "limb_lead_residuals.json"))
    args = parser.parse_args(argv)
    measured = [measure_folder(Path(folder), args.timing_records) for folder in args.folders]
    largest_as_labelled = max(entry["as_labelled_either_law_max"] for entry in measured)
    smallest_swapped = min(entry["exchanged_pairs_larger_law"]["I<->II"]["min"] for entry in measured)
    results = {
        "benchmark": "limb_lead_residuals",
        "machine": platform.processor() or platform.machine(),
        "max_limb_lead_residual": DEFAULT_MAX_LIMB_LEAD_RESIDUAL,
        "largest_as_labelled": largest_as_labelled,
        "smallest_with_I_and_II_exchanged": smallest_swapped,
        "separates": largest_as_labelled < DEFAULT_MAX_LIMB_LEAD_RESIDUAL < smallest_swapped,
        "folders": measured,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: value for key, value in results.items() if key != "folders"}, indent=2))
    return results


if __name__ == "__main__":
    main()
