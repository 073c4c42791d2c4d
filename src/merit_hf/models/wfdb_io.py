"""Strict reading of one 12-lead WFDB record for dataset conversion.

`merit_hf.models.merit.feature_extraction_merit.read_wfdb_record` checks the file level (header present and parseable, signal file
present, header and data agree). This module adds what a dataset row needs: the 12 standard leads (names matched
case-insensitively, none missing, none repeated, nothing else), the expected sampling rate, a known unit converted to
mV, finite values, and a plausible amplitude, neither hundreds of mV wide nor flat (the feature extractor's check,
so that a record it would refuse is never written to a dataset). The row stores the signal as float32 `(num_samples, 12)` in the standard order
`I II III aVR aVL aVF V1-V6`, so that every row of every dataset has the same columns (MIMIC-IV-ECG writes aVF before
aVL, PTB-XL writes `AVR`). Every error is an `EcgInputError` whose message starts with the record's path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .merit.configuration_merit import STANDARD_LEAD_NAMES
from .merit.feature_extraction_merit import (
    DEFAULT_MAX_AMPLITUDE_MV,
    DEFAULT_MIN_AMPLITUDE_MV,
    UNIT_TO_MV,
    EcgInputError,
    check_lead_amplitudes,
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
    """
    read = read_wfdb_record(path)
    name = read["record"] + ".hea"
    if sampling_rate is not None and read["sampling_rate"] != float(sampling_rate):
        raise EcgInputError(
            f"{name}: sampling rate {read['sampling_rate']:g} Hz, expected {float(sampling_rate):g} Hz"
        )
    signal = read["signal"]
    if num_samples is not None and signal.shape[0] != num_samples:
        raise EcgInputError(f"{name}: {signal.shape[0]} samples, expected {num_samples}")
    if read["signal"].shape[0] == 0:
        raise EcgInputError(f"{name}: the record holds no samples")
    if lead_names is None:
        lead_names = [lead.strip() for lead in read["lead_names"]]
    columns = _lead_columns(read["lead_names"], lead_names, name)
    factors = []
    for lead, unit in zip(read["lead_names"], read["units"]):
        key = str(unit).strip().lower()
        if key not in UNIT_TO_MV:
            raise EcgInputError(f"{name}: lead {lead} has unknown unit {unit!r}; expected mV, uV (µV) or V")
        factors.append(UNIT_TO_MV[key])
    signal = (signal * np.asarray(factors)[None, :])[:, columns]
    finite = np.isfinite(signal)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=0))
        details = ", ".join(f"{lead_names[i]} ({int((~finite[:, i]).sum())} samples)" for i in bad)
        raise EcgInputError(f"{name}: NaN/inf values in lead {details}")
    signal, flat_leads = check_lead_amplitudes(
        signal, list(lead_names), name, max_amplitude_mv, min_amplitude_mv, flat_lead_policy, from_header=True
    )
    kept = [lead for lead in lead_names if not (flat_lead_policy == "drop" and lead in flat_leads)]
    return {
        "signal": signal.astype(np.float32),
        "sampling_rate": int(read["sampling_rate"]) if read["sampling_rate"].is_integer() else read["sampling_rate"],
        "lead_names": kept,
        "record": read["record"],
        "flat_leads": flat_leads,
    }


def _lead_columns(found: list[str], wanted: tuple[str, ...] | list[str], name: str) -> list[int]:
    """Column of each wanted lead in the file; raises if the file's lead set is not exactly `wanted`."""
    position: dict[str, int] = {}
    for column, lead in enumerate(found):
        key = lead.strip().lower()
        if key in position:
            raise EcgInputError(f"{name}: lead {lead} appears twice (leads {found})")
        position[key] = column
    wanted_keys = [lead.lower() for lead in wanted]
    missing = [lead for lead in wanted if lead.lower() not in position]
    extra = [lead for lead in found if lead.strip().lower() not in wanted_keys]
    if missing or extra:
        raise EcgInputError(
            f"{name}: wrong lead set {found}: missing {missing}, unexpected {extra}; expected the {len(wanted)} leads "
            f"{list(wanted)} (case-insensitive)"
        )
    return [position[key] for key in wanted_keys]


__all__ = ["EcgInputError", "read_ecg_record"]
