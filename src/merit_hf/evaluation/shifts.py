"""Named input shifts for the robustness evaluation, applied to raw records before the feature extractor.

Each shift takes one record as WFDB gives it, `signal` `(num_samples, num_leads)` in mV with its `lead_names` and
`sampling_rate`, and returns a new `(signal, sampling_rate)`. They change the input exactly as their name says, and
the tests measure it:

- `acquired_at_rate(signal, rate, device_rate)`: what a device sampling at `device_rate` keeps of the record (resampled
  down to `device_rate` and back to its own rate with scipy's polyphase filter: nothing above `device_rate / 2`).
  Presenting a record at another rate alone would change nothing the model sees: the feature extractor resamples
  every input to the model's rate;
- `resample_record(signal, rate, target_rate)`: the polyphase resampling itself;
- `add_white_noise(signal, snr_db, rng)`: Gaussian noise scaled per lead so that
  `10 log10(P_signal / P_noise) = snr_db`, with powers measured around each lead's mean;
- `add_baseline_wander(signal, rate, snr_db, frequency_hz, rng)`: a sinusoid at `frequency_hz` (respiration-like,
  0.3 Hz by default) with random phase per lead, scaled to the same SNR definition;
- `zero_leads(signal, lead_names, keep)`: every lead not in `keep` set to 0 (a missing lead, as zeros);
  `LIMB_LEADS` keeps the six frontal leads, `("I",)` a single-lead recording;
- `keep_leads(signal, lead_names, keep)`: the record as a device with only the `keep` leads records it (the other
  columns gone, not zeroed), for a feature extractor with `missing_leads="mask"`; `LEAD_SUBSETS` are the reduced
  lead sets by lead count.

Group shifts (devices, sites, age, sex) select records instead of changing them; they live in
`merit_hf.evaluation.robustness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from scipy import signal as sp_signal

LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
PRECORDIAL_LEADS = ("V1", "V2", "V3", "V4", "V5", "V6")
# The reduced lead sets of the PhysioNet/CinC Challenge 2021 ("Will Two Do?": 2, 3 and 6 leads), plus a single lead
# (lead I, as a watch or a handheld device records it), the eight independent leads (the other four limb leads are
# linear combinations of I and II) and all twelve.
LEAD_SUBSETS = {
    1: ("I",),
    2: ("I", "II"),
    3: ("I", "II", "V2"),
    6: LIMB_LEADS,
    8: ("I", "II", *PRECORDIAL_LEADS),
    12: LIMB_LEADS + PRECORDIAL_LEADS,
}


def _as_signal(signal: np.ndarray) -> np.ndarray:
    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim != 2:
        raise ValueError(f"signal must be (num_samples, num_leads), got shape {signal.shape}")
    return signal


def signal_power(signal: np.ndarray) -> np.ndarray:
    """Mean power of each lead around its mean, `(num_leads,)`."""
    signal = _as_signal(signal)
    return np.mean((signal - signal.mean(axis=0)) ** 2, axis=0)


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """`10 log10(P(clean) / P(noisy - clean))` per lead, the definition `add_*` use."""
    return 10 * np.log10(signal_power(clean) / signal_power(np.asarray(noisy) - np.asarray(clean)))


def _scale_to_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    signal_pow, noise_pow = signal_power(signal), signal_power(noise)
    if np.any(noise_pow <= 0):
        raise ValueError("the generated noise has zero power")
    target = signal_pow / 10 ** (snr_db / 10)
    return noise * np.sqrt(target / noise_pow)[None, :]


def add_white_noise(signal: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise at `snr_db` dB per lead (a flat lead, power 0, stays flat)."""
    signal = _as_signal(signal)
    noise = rng.standard_normal(signal.shape)
    return signal + _scale_to_snr(signal, noise, snr_db)


def add_baseline_wander(
    signal: np.ndarray,
    sampling_rate: float,
    snr_db: float,
    rng: np.random.Generator,
    frequency_hz: float = 0.3,
) -> np.ndarray:
    """Add a `frequency_hz` sinusoid (random phase per lead) at `snr_db` dB per lead: breathing-like drift.

    Note that the feature extractor's 0.67 Hz high-pass removes most of a 0.3 Hz wander; that is part of what this
    shift measures (the contract's robustness, not only the encoder's)."""
    signal = _as_signal(signal)
    if frequency_hz <= 0 or frequency_hz >= sampling_rate / 2:
        raise ValueError(f"frequency_hz must be in (0, {sampling_rate / 2}) Hz, got {frequency_hz}")
    time = np.arange(len(signal))[:, None] / sampling_rate
    phase = rng.uniform(0, 2 * np.pi, size=(1, signal.shape[1]))
    wander = np.sin(2 * np.pi * frequency_hz * time + phase)
    return signal + _scale_to_snr(signal, wander, snr_db)


def _lowercase_names_holding(signal: np.ndarray, lead_names: Sequence[str], keep: Sequence[str]) -> list[str]:
    """The record's lead names in lower case, after checking there is one per column and `keep` names only those."""
    if len(lead_names) != signal.shape[1]:
        raise ValueError(f"{len(lead_names)} lead names for {signal.shape[1]} leads")
    names = [str(name).lower() for name in lead_names]
    unknown = [lead for lead in keep if lead.lower() not in names]
    if unknown:
        raise ValueError(f"leads to keep {unknown} are not in the record's leads {list(lead_names)}")
    return names


def zero_leads(signal: np.ndarray, lead_names: Sequence[str], keep: Sequence[str]) -> np.ndarray:
    """Set every lead whose name (case-insensitive) is not in `keep` to zero."""
    signal = _as_signal(signal)
    names = _lowercase_names_holding(signal, lead_names, keep)
    wanted = {lead.lower() for lead in keep}
    shifted = signal.copy()
    shifted[:, [name not in wanted for name in names]] = 0.0
    return shifted


def keep_leads(signal: np.ndarray, lead_names: Sequence[str], keep: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The columns of the leads in `keep` (case-insensitive, in `keep` order) and their names, as a record that only
    has those leads; returns `(signal (num_samples, len(keep)), lead_names)`."""
    signal = _as_signal(signal)
    names = _lowercase_names_holding(signal, lead_names, keep)
    columns = [names.index(lead.lower()) for lead in keep]
    return signal[:, columns].copy(), [lead_names[column] for column in columns]


def resample_record(signal: np.ndarray, sampling_rate: float, target_rate: float) -> tuple[np.ndarray, float]:
    """Resample with scipy's polyphase filter (the feature extractor's own method); returns `(signal, target_rate)`."""
    signal = _as_signal(signal)
    ratio = Fraction(target_rate / sampling_rate).limit_denominator(1000)
    if abs(float(ratio) * sampling_rate - target_rate) > 1e-6 * target_rate:
        raise ValueError(f"cannot resample {sampling_rate:g} Hz to {target_rate:g} Hz exactly")
    return sp_signal.resample_poly(signal, ratio.numerator, ratio.denominator, axis=0), float(target_rate)


def acquired_at_rate(signal: np.ndarray, sampling_rate: float, device_rate: float) -> tuple[np.ndarray, float]:
    """The record as a `device_rate` Hz device would have captured it, returned at its own `sampling_rate`."""
    if not 0 < device_rate < sampling_rate:
        raise ValueError(
            f"device_rate must be below the record's {sampling_rate:g} Hz to change it, got {device_rate:g} Hz"
        )
    low, _ = resample_record(signal, sampling_rate, device_rate)
    restored, _ = resample_record(low, device_rate, sampling_rate)
    return restored[: len(signal)], float(sampling_rate)


__all__ = [
    "LEAD_SUBSETS",
    "LIMB_LEADS",
    "PRECORDIAL_LEADS",
    "acquired_at_rate",
    "add_baseline_wander",
    "add_white_noise",
    "keep_leads",
    "measured_snr_db",
    "resample_record",
    "signal_power",
    "zero_leads",
]
