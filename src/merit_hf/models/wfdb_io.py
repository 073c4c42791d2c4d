"""Strict reading of one WFDB record for dataset conversion.

The checks are the input contract's, run by its one implementation: `read_wfdb_record` (the file level: header
present and parseable, signal file present, header and data agree) and `MeritFeatureExtractor.validate_signal` (units
converted to mV, the leads matched case-insensitively with none missing, none repeated and nothing else, finite
values, a plausible amplitude, neither hundreds of mV wide nor flat), so that a record the feature extractor would
refuse is never written to a dataset. What this module adds is what a dataset promises beyond the contract: the
sampling rate and length of its records, and the signal as float32 `(num_samples, num_leads)` in the standard order
`I II III aVR aVL aVF V1-V6`, so that every row of every dataset has the same columns (MIMIC-IV-ECG writes aVF before
aVL, PTB-XL writes `AVR`). Every error is an `EcgInputError` whose message starts with the record's header file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .merit.configuration_merit import STANDARD_LEAD_NAMES
from .merit.feature_extraction_merit import (
    DEFAULT_MAX_AMPLITUDE_MV,
    DEFAULT_MAX_SAMPLE_DEVIATION_MV,
    DEFAULT_MIN_AMPLITUDE_MV,
    EcgInputError,
    MeritFeatureExtractor,
    read_wfdb_record,
)


def read_ecg_record(
    path: str | os.PathLike,
    sampling_rate: float | None = None,
    num_samples: int | None = None,
    lead_names: tuple[str, ...] | list[str] | None = STANDARD_LEAD_NAMES,
    max_amplitude_mv: float = DEFAULT_MAX_AMPLITUDE_MV,
    min_amplitude_mv: float = DEFAULT_MIN_AMPLITUDE_MV,
    flat_lead_policy: str = "raise",
    max_sample_deviation_mv: float = DEFAULT_MAX_SAMPLE_DEVIATION_MV,
    lead_swap_policy: str = "warn",
) -> dict[str, Any]:
    """Read and validate a WFDB record; returns `{"signal": float32 (num_samples, num_leads) in mV, "sampling_rate",
    "lead_names", "record", "flat_leads"}` with the leads in the order of `lead_names`.

    Args:
        path: the record, without extension or with `.hea`.
        sampling_rate: the rate the dataset promises (Hz); another rate in the header raises.
        num_samples: the length the dataset promises; another length raises.
        lead_names: the leads the record must hold, exactly (case-insensitive); the output order. `None` keeps the
            leads the record holds, in its order and spelling (any subset, e.g. a 2-lead Holter; a lead named twice
            still raises).
        max_amplitude_mv: a lead whose 99th percentile of |x - median| exceeds this (in mV, after unit conversion)
            raises: the header's units or ADC gain are wrong (µV stored as mV, gain 1 instead of 1000). The same
            check and default as `MeritFeatureExtractor(max_amplitude_mv=...)`.
        min_amplitude_mv, flat_lead_policy: a lead whose 99th percentile of |x - median| is below `min_amplitude_mv`
            is flat (not recorded, or mV labelled µV): `"raise"` (default), `"zero"` (kept as zeros) or `"drop"`
            (left out of `signal` and `lead_names`, as a lead that was not recorded: the input for reduced-lead
            use). `flat_leads` lists them. The feature extractor's check and defaults (`check_lead_amplitudes`).
        max_sample_deviation_mv: a sample farther than this from its lead's median (in mV) raises, naming the lead
            and the sample (a corrupt value or a saturated amplifier). The same check and default as
            `MeritFeatureExtractor(max_sample_deviation_mv=...)`.
        lead_swap_policy: a record whose limb leads break Einthoven's or Goldberger's law (two leads likely swapped in
            its header) gives an `EcgLeadSwapWarning` naming the file (`"warn"`, default), raises (`"raise"`) or
            passes (`"off"`). The same check and default as `MeritFeatureExtractor(lead_swap_policy=...)`.
    """
    read = read_wfdb_record(path)
    name = read["record"] + ".hea"
    if sampling_rate is not None and read["sampling_rate"] != float(sampling_rate):
        raise EcgInputError(
            f"{name}: sampling rate {read['sampling_rate']:g} Hz, expected {float(sampling_rate):g} Hz"
        )
    if num_samples is not None and read["signal"].shape[0] != num_samples:
        raise EcgInputError(f"{name}: {read['signal'].shape[0]} samples, expected {num_samples}")
    if lead_names is None:  # the record's own leads, once each (a repeated lead then raises when leads are matched)
        own: dict[str, str] = {}
        for lead in read["lead_names"]:
            own.setdefault(lead.strip().lower(), lead.strip())
        lead_names = list(own.values())
    contract = MeritFeatureExtractor(
        lead_names=lead_names,
        max_amplitude_mv=max_amplitude_mv,
        min_amplitude_mv=min_amplitude_mv,
        flat_lead_policy="zero" if flat_lead_policy == "drop" else flat_lead_policy,  # dropped below, by column
        max_sample_deviation_mv=max_sample_deviation_mv,
        lead_swap_policy=lead_swap_policy,
    )
    signal, _, flat_leads = contract.validate_signal(
        read["signal"], read["lead_names"], read["units"], name, from_header=True, sampling_rate=read["sampling_rate"]
    )
    flat = {lead.strip().lower() for lead in flat_leads}
    flat_leads = [lead for lead in lead_names if lead.lower() in flat]  # in the output's order and spelling
    kept = [lead for lead in lead_names if not (flat_lead_policy == "drop" and lead in flat_leads)]
    if len(kept) < len(lead_names):
        signal = signal[:, [column for column, lead in enumerate(lead_names) if lead in kept]]
    return {
        "signal": signal.astype(np.float32),
        "sampling_rate": int(read["sampling_rate"]) if read["sampling_rate"].is_integer() else read["sampling_rate"],
        "lead_names": kept,
        "record": read["record"],
        "flat_leads": flat_leads,
    }


__all__ = ["EcgInputError", "read_ecg_record"]
