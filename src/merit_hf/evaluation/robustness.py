"""Robustness of a trained linear probe under named distribution shifts, for a model and its random-init twin.

The probe (`merit_hf.evaluation.probe`) is trained once on clean training features (records with a label of the set,
as in the probe protocol); its F1 thresholds are chosen on the clean validation split. Then the **test** split is evaluated under each shift:

| kind | shift | what changes |
| --- | --- | --- |
| input | `acquired_at_<rate>hz` | the record resampled to that rate and back, through the anti-aliasing filter twice: a low-pass at -3 dB at 0.465 x the rate, -6 dB at 0.48 x, -21 dB at 0.52 x and -45 dB at 0.55 x (`shifts.acquired_at_rate`; a real recording at 50 Hz is refused by the input contract) |
| input | `white_noise_<snr>db` | Gaussian noise in the model's band-pass band at the stated SNR per lead (`shifts.add_white_noise`), the same SNR at the model whatever the record's rate |
| input | `baseline_wander_<snr>db` | 0.3 Hz sinusoidal drift at the stated SNR per lead on the raw record (`shifts.add_baseline_wander`); the extractor's 0.67 Hz high-pass removes most of it, so this measures the input contract more than the encoder |
| input | `limb_leads_only`, `precordial_leads_only`, `lead_II_only` | the other leads are zeroed (`limb_leads_only` is the input of `leads_6_zeroed`: computed once, reported under both names) |
| input | `leads_<n>_masked` / `leads_<n>_zeroed` for n in 1, 2, 3, 6, 8, 12 | only the `shifts.LEAD_SUBSETS[n]` leads recorded: left out of the encoder (`lead_mask`, feature extractor with `missing_leads="mask"`), or fed as zeros (what a model without `lead_mask` has to do) |
| group | `device_<group>_to_other` | the probe is retrained on training records of the most frequent device family (the
  device name's first word, e.g. `CS-12`), with early stopping and F1 thresholds on that family's validation records,
  and tested on test records of the other families; `device_<group>_in` is the same probe on test records of its own
  family (the shift's effect is `to_other` minus `in`; the change column compares each with the clean probe) |
| group | `site_<site>_to_other` / `site_<site>_in` | the same with the recording site |
| subgroup | `age_<lo>_<hi>`, `sex_<name>` | the clean probe on a test subgroup (PTB-XL codes age > 89 as 300) |

SNR: `10 log10(P_signal / P_noise)` with powers around each lead's mean, measured on the record in mV.

An input shift changes the record as the model's feature extractor reads it (`shifted_as_read`: its leads in the
model's order, its flat leads zeroed, dropped, derived or left out and its NaN gaps repaired as the extractor's
settings say), and the shifted record is then embedded by `reduced_lead_extractor`; so a shift that changes nothing
gives the clean features exactly, whatever `flat_lead_policy`, `derive_limb_leads` and `missing_leads` the checkpoint's
feature extractor was saved with.

Every entry reports macro AUROC and macro F1 (with clean-validation thresholds) with bootstrap CIs, and the number
of records; the results JSON is `task="robustness"` with a `shifts` mapping (schema in
`merit_hf.evaluation.results`). `robustness_table` renders one markdown table per model.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import best_f1_thresholds, classification_metrics
from .probe import (
    ProbeArguments,
    dataset_description,
    extract_features,
    feature_device,
    fit_linear_probe,
    label_matrix,
    label_names,
    labeled_dataset_dict,
    load_encoder,
    load_feature_extractor,
    probe_features,
    probe_protocol,
    random_init_like,
)
from .results import (
    EvaluationResults,
    build_results,
    encoder_identity,
    feature_extractor_settings,
    format_metric,
    write_results,
)
from .shifts import (
    ACQUIRED_AT_RATE_RESPONSE_DB,
    LEAD_SUBSETS,
    LIMB_LEADS,
    PRECORDIAL_LEADS,
    acquired_at_rate,
    add_baseline_wander,
    add_white_noise,
    keep_leads,
    zero_leads,
)

AGE_BINS = ((0, 40), (40, 65), (65, 1000))
# PTB-XL gives age 300 to patients older than 89 (anonymisation); the last bin includes them.


def input_shifts(
    device_rates: Sequence[int] = (50,),
    noise_snrs_db: Sequence[float] = (20, 10, 5),
    wander_snrs_db: Sequence[float] = (10, 0),
    wander_frequency_hz: float = 0.3,
    seed: int = 0,
    lead_counts: Sequence[int] = tuple(LEAD_SUBSETS),
    noise_band_hz: tuple[float | None, float | None] | None = (0.67, 40.0),
) -> dict[str, tuple[str, Callable]]:
    """`{name: (description, transform)}`; a transform maps `(signal, rate, lead_names, row) -> (signal, rate)`, or
    `(signal, rate, lead_names)` for a record that has fewer leads (the `leads_<n>_masked` rows).
    Random shifts draw from `numpy.random.default_rng([seed, row])`, so every record gets the same noise on every run;
    their descriptions name `seed`, so shifts of another seed never share cached features (the cache is keyed by the
    description). `noise_band_hz`: the band the white noise is limited to, the model's band-pass (`run_robustness`
    passes its feature extractor's), so that the stated SNR is what reaches the model at any record rate; `None`:
    white up to the record's Nyquist frequency.
    """
    shifts: dict[str, tuple[str, Callable]] = {}
    for rate in device_rates:
        response = ", ".join(
            f"{db} dB at {fraction * rate:g} Hz" for fraction, db in ACQUIRED_AT_RATE_RESPONSE_DB.items()
        )
        shifts[f"acquired_at_{rate}hz"] = (
            f"records resampled to {rate} Hz and back to their own rate (scipy polyphase, edges padded with their "
            f"line; its anti-aliasing filter applied twice): a low-pass at {response}",
            lambda signal, sr, leads, row, rate=rate: acquired_at_rate(signal, sr, rate),
        )
    band = "" if noise_band_hz is None else " in the model's {:g}-{:g} Hz band".format(*noise_band_hz)
    for snr in noise_snrs_db:
        shifts[f"white_noise_{snr:g}db"] = (
            f"additive Gaussian noise{band}, SNR {snr:g} dB per lead (noise seed {seed})",
            lambda signal, sr, leads, row, snr=snr: (
                add_white_noise(signal, snr, np.random.default_rng([seed, row]), noise_band_hz, sr),
                sr,
            ),
        )
    for snr in wander_snrs_db:
        shifts[f"baseline_wander_{snr:g}db"] = (
            f"{wander_frequency_hz:g} Hz baseline wander, SNR {snr:g} dB per lead on the raw record (before the "
            f"extractor's high-pass, which removes most of it; phase seed {seed})",
            lambda signal, sr, leads, row, snr=snr: (
                add_baseline_wander(signal, sr, snr, np.random.default_rng([seed, row]), wander_frequency_hz),
                sr,
            ),
        )
    zeroing: dict[tuple[str, ...], Callable] = {}  # one transform per lead set, which run_robustness computes once

    def other_leads_zeroed(keep: Sequence[str]) -> Callable:
        return zeroing.setdefault(tuple(keep), _other_leads_zeroed(keep))

    for name, keep in (
        ("limb_leads_only", LIMB_LEADS),
        ("precordial_leads_only", PRECORDIAL_LEADS),
        ("lead_II_only", ("II",)),
    ):
        shifts[name] = (f"only {', '.join(keep)} kept; the other leads zeroed", other_leads_zeroed(keep))
    for count in lead_counts:
        keep = LEAD_SUBSETS[count]
        shifts[f"leads_{count}_masked"] = (
            f"{count} leads recorded ({', '.join(keep)}); the others left out of the encoder (lead_mask)",
            _recorded_leads_only(keep),
        )
        shifts[f"leads_{count}_zeroed"] = (
            f"{count} leads recorded ({', '.join(keep)}); the others fed as zeros (no lead_mask)",
            other_leads_zeroed(keep),
        )
    return shifts


def _leads_it_has(keep: Sequence[str], lead_names: Sequence[str]) -> list[str]:
    """The leads of `keep` that the record has: a lead the clean feature extractor left out (a flat lead it dropped,
    with `missing_leads="mask"`) is not recorded in any shift of the record either."""
    names = {str(name).lower() for name in lead_names}
    return [lead for lead in keep if lead.lower() in names]


def _recorded_leads_only(keep: Sequence[str]) -> Callable:
    """A transform to the record that has only the `keep` leads (their columns and names; the others are gone)."""

    def transform(signal, sampling_rate, lead_names, row):
        kept, names = keep_leads(signal, lead_names, _leads_it_has(keep, lead_names))
        return kept, sampling_rate, names

    return transform


def _other_leads_zeroed(keep: Sequence[str]) -> Callable:
    """A transform that feeds every lead but the `keep` leads as zeros."""

    def transform(signal, sampling_rate, lead_names, row):
        return zero_leads(signal, lead_names, _leads_it_has(keep, lead_names)), sampling_rate

    return transform


def reduced_lead_extractor(feature_extractor):
    """The feature extractor of the input shifts, run on a record as `feature_extractor` read it and then shifted
    (`shifted_as_read`): records with fewer leads are embedded from the leads they have (`missing_leads="mask"`),
    never from limb leads derived from them (`derive_limb_leads` off: `leads_2_masked` must feed I and II, not the six
    limb leads rebuilt from them), and zeroed leads are fed as zeros (the `*_zeroed` shifts). The record's own repairs
    (a flat lead zeroed, or dropped and then derived or masked; NaN gaps interpolated) were made by `feature_extractor`
    before the shift, so an unshifted record gets exactly the clean features."""
    reduced_leads = copy.deepcopy(feature_extractor)
    reduced_leads.missing_leads = "mask"
    reduced_leads.derive_limb_leads = False
    reduced_leads.flat_lead_policy = "zero"
    reduced_leads.lead_swap_policy = "off"  # the shifts break Einthoven's law on purpose (noise, zeroed leads)
    return reduced_leads


def shifted_as_read(feature_extractor, transform: Callable) -> Callable:
    """`transform` applied to the record as `feature_extractor` reads it (`validate_signal`: its leads in mV in the
    model's order, its flat leads zeroed, or dropped and derived or left out, as `flat_lead_policy`,
    `derive_limb_leads` and `missing_leads` say, its NaN gaps repaired by `nan_policy`), for `reduced_lead_extractor`.
    Shifting the raw record instead fed a flat lead that a `flat_lead_policy="drop"` extractor leaves out (or rebuilds)
    as zeros in every shift, so the shifted features differed from the clean ones the probe was fitted on by more
    than the shift. The leads the extractor left out are not in the record the shift gets."""

    reader = copy.deepcopy(feature_extractor)
    reader.lead_swap_policy = "off"  # the clean extraction checked (and warned about) every record already

    def transform_as_read(signal, sampling_rate, lead_names, row):
        read, present, _ = reader.validate_signal(
            signal, lead_names, None, f"record {row}", sampling_rate=sampling_rate
        )
        names = [lead for lead, recorded in zip(feature_extractor.lead_names, present) if recorded]
        shifted, shifted_rate, *shifted_names = transform(read[:, present], sampling_rate, names, row)
        return shifted, shifted_rate, shifted_names[0] if shifted_names else names

    return transform_as_read


def device_family(device: str | None) -> str:
    """The device family: the first word of PTB-XL's `device` field (`"CS-12   E"` -> `"CS-12"`)."""
    return (device or "unknown").split()[0] if (device or "").strip() else "unknown"


def _group_values(dataset, column: str) -> np.ndarray:
    values = dataset[column]
    if column == "device":
        return np.array([device_family(value) for value in values], dtype=object)
    return np.array(["unknown" if value is None else str(value) for value in values], dtype=object)


def _metrics(y_true, scores, names, thresholds, arguments, seed) -> dict[str, Any]:
    return classification_metrics(
        y_true, scores, names, thresholds=thresholds, num_bootstrap=arguments.num_bootstrap, seed=seed
    )


def run_robustness(
    model_or_path,
    dataset_dict,
    label_set: str = "superclass",
    seed: int = 0,
    baseline: bool = True,
    feature_extractor=None,
    arguments: ProbeArguments | None = None,
    shifts: dict[str, tuple[str, Callable]] | None = None,
    group_columns: Sequence[str] = ("device", "site"),
    output_file: str | Path | None = None,
) -> EvaluationResults:
    """Train the linear probe on clean features, then evaluate the test split under every shift (see the module
    docstring) for the model and, with `baseline`, its random-init twin. Returns the run's `EvaluationResults`, the
    shifts in `results.shifts`."""
    arguments = arguments or ProbeArguments()
    encoder, model_name = load_encoder(model_or_path)
    feature_extractor = feature_extractor or load_feature_extractor(model_or_path, encoder)
    if shifts is None:  # the noise in the band the model keeps (its feature extractor's band-pass)
        shifts = input_shifts(seed=seed, noise_band_hz=(feature_extractor.highpass_hz, feature_extractor.lowpass_hz))
    dataset_dict = labeled_dataset_dict(dataset_dict, label_set)
    features = probe_features(encoder, feature_extractor, dataset_dict, seed, baseline, arguments)
    encoders = {"model": encoder}
    if baseline:
        encoders["baseline"] = random_init_like(encoder, seed)
    names = label_names(dataset_dict["train"], label_set)
    labels = {split: label_matrix(dataset_dict[split], label_set) for split in ("train", "validation", "test")}
    test = dataset_dict["test"]

    def fit(role: str, rows: np.ndarray | None = None, validation_rows: np.ndarray | None = None):
        def part(split: str, chosen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            """`split`'s features and labels, only the `chosen` rows when given (all of them without a copy)."""
            if chosen is None:
                return features[role][split], labels[split]
            return features[role][split][chosen], labels[split][chosen]

        (train_x, train_y), (validation_x, validation_y) = part("train", rows), part("validation", validation_rows)
        probe = fit_linear_probe(train_x, train_y, validation_x, validation_y, **arguments.linear_probe_options(seed))
        thresholds = best_f1_thresholds(validation_y, probe.decision_function(validation_x))
        return probe, thresholds

    def score_test_rows(role: str, probe, thresholds, rows: np.ndarray) -> dict[str, Any]:
        if not len(rows):
            return {"metrics": {}, "num_records": 0}
        scores = probe.decision_function(features[role]["test"][rows])
        return _metrics(labels["test"][rows], scores, names, thresholds, arguments, seed)

    clean = {role: fit(role) for role in encoders}
    entries = {}
    for role, (probe, thresholds) in clean.items():
        entries[role] = {
            **encoder_identity(role, model_name, seed, encoder),
            **_metrics(
                labels["test"], probe.decision_function(features[role]["test"]), names, thresholds, arguments, seed
            ),
        }

    reduced_leads = reduced_lead_extractor(feature_extractor)
    read_by = feature_extractor.to_json_string()
    shift_results: dict[str, dict[str, Any]] = {}
    # Shifts that share one transform are one input: `limb_leads_only` and `leads_6_zeroed` (the six limb leads are
    # the 6-lead set) are computed once and reported under both names (only shared features are kept in memory).
    uses = Counter(transform for _, transform in shifts.values())
    shared: dict[tuple[Callable, str], np.ndarray] = {}
    for name, (description, transform) in shifts.items():
        shift_results[name] = {"kind": "input", "description": description}
        for role, role_encoder in encoders.items():
            probe, thresholds = clean[role]
            shifted = shared.get((transform, role))
            if shifted is None:
                # the description carries the shift's parameters, and the clean extractor's settings how the record
                # was read before it (the key names only the reduced extractor's): neither two shifts of one name nor
                # one shift after two extractors share a cache entry
                cache_tag = f"{name}_{hashlib.sha1((description + read_by).encode()).hexdigest()[:12]}_seed{seed}"
                try:
                    shifted = extract_features(
                        role_encoder,
                        reduced_leads,
                        test,
                        arguments.batch_size,
                        transform=shifted_as_read(feature_extractor, transform),
                        cache_dir=arguments.cache_dir,
                        cache_tag=cache_tag,
                        device=feature_device(arguments),
                    )
                except ValueError as error:  # a record the shift made unreadable: say which shift
                    raise ValueError(f"shift {name}: {error}") from error
                if uses[transform] > 1:
                    shared[transform, role] = shifted
            shift_results[name][role] = _metrics(
                labels["test"], probe.decision_function(shifted), names, thresholds, arguments, seed
            )

    for column in group_columns:
        train_groups = _group_values(dataset_dict["train"], column)
        test_groups = _group_values(test, column)
        values, counts = np.unique(train_groups, return_counts=True)
        source = values[np.argmax(counts)]
        source_rows = np.flatnonzero(train_groups == source)
        # Early stopping and thresholds on the source group's validation records only: the other groups' would tune
        # the probe on the very shift it is tested under.
        source_validation = np.flatnonzero(_group_values(dataset_dict["validation"], column) == source)
        chosen_on = (
            f"its {len(source_validation)} validation records"
            if len(source_validation)
            else "all validation records (the group has none)"
        )
        fitted = {
            role: fit(role, source_rows, source_validation if len(source_validation) else None) for role in encoders
        }
        for suffix, test_rows in (("in", test_groups == source), ("to_other", test_groups != source)):
            key = f"{column}_{source}_{suffix}"
            target = f"{column} {source}" if suffix == "in" else f"{column}s other than {source}"
            shift_results[key] = {
                "kind": "group",
                "description": f"probe trained on {len(source_rows)} training records of {column} {source}, early "
                f"stopping and F1 thresholds on {chosen_on}, tested on test records of {target}",
            }
            rows = np.flatnonzero(test_rows)
            for role in encoders:
                shift_results[key][role] = score_test_rows(role, *fitted[role], rows)

    subgroups = []
    ages = np.array([np.nan if age is None else age for age in test["age"]], dtype=np.float64)
    for low, high in AGE_BINS:
        label = f"age_{low}_{high}" if high < 1000 else f"age_{low}_plus"
        subgroups.append((label, f"test records with {low} <= age < {high}", (ages >= low) & (ages < high)))
    sex_feature = test.features["sex"]
    sexes = np.array(test["sex"])
    for index, sex in enumerate(getattr(sex_feature, "names", [])):
        subgroups.append((f"sex_{sex}", f"test records of sex {sex}", sexes == index))
    for key, description, mask in subgroups:
        rows = np.flatnonzero(mask)
        shift_results[key] = {"kind": "subgroup", "description": description}
        for role, (probe, thresholds) in clean.items():
            shift_results[key][role] = score_test_rows(role, probe, thresholds, rows)

    results = build_results(
        task="robustness",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=names,
        label_fraction=1.0,
        seed=seed,
        protocol=probe_protocol(
            arguments,
            robustness="linear probe trained on clean data; test split shifted",
            feature_extractor=feature_extractor_settings(feature_extractor),
        ),
        **entries,  # model, and baseline when it ran
        shifts=shift_results,
        dataset_extra=dataset_description(arguments),
    )
    if output_file is not None:
        write_results(results, output_file)
    return results


def robustness_table(results: EvaluationResults, role: str = "model", metric: str = "macro_auroc") -> str:
    """One markdown table for `role` (`"model"` or `"baseline"`): every shift, its n, the metric with CI, and the
    change from the clean test split."""
    clean_entry = getattr(results, role)
    if clean_entry is None:
        raise ValueError(f"these {results.task} results have no {role!r} entry (the run skipped it)")
    clean = clean_entry.metrics.get(metric)
    lines = [
        f"| shift | kind | n | {metric} [95% CI] | change |",
        "| --- | --- | --- | --- | --- |",
        f"| clean | - | {clean_entry.num_records} | {format_metric(clean)} | - |",
    ]
    for name, shift in (results.shifts or {}).items():
        entry = getattr(shift, role)
        metric_value = entry.metrics.get(metric) if entry is not None else None
        value = metric_value.value if metric_value is not None else None
        clean_value = clean.value if clean is not None else None
        change = f"{value - clean_value:+.3f}" if value is not None and clean_value is not None else "n/a"
        num_records = (entry.num_records or 0) if entry is not None else 0
        lines.append(f"| {name} | {shift.kind} | {num_records} | {format_metric(metric_value)} | {change} |")
    return "\n".join(lines)


__all__ = [
    "AGE_BINS",
    "device_family",
    "input_shifts",
    "reduced_lead_extractor",
    "robustness_table",
    "run_robustness",
    "shifted_as_read",
]
