"""Named input shifts for the robustness evaluation, applied to raw records before the feature extractor.

Each shift takes one record as WFDB gives it, `signal` `(num_samples, num_leads)` in mV with its `lead_names` and
`sampling_rate`, and returns a new `(signal, sampling_rate)`. They change the input exactly as their name says, and
the tests measure it:

- `acquired_at_rate(signal, rate, device_rate)`: the record resampled down to `device_rate` and back to its own rate
  with scipy's polyphase filter (edges padded with the line through them, so a lead's offset adds no step). Its
  anti-aliasing low-pass (-6 dB at half `device_rate`) filters the record twice, down and back up, so the shift's
  response is -3 dB at 0.465 x `device_rate`, -6 dB at 0.48 x, -21 dB at 0.52 x and -45 dB at 0.55 x (-3 dB at
  23.25 Hz, -6 dB at 24 Hz, -21 dB at 26 Hz and -45 dB at 27.5 Hz for 50 Hz; `ACQUIRED_AT_RATE_RESPONSE_DB`,
  measured by the tests). Content just above half `device_rate` also comes back folded below it (26 Hz returns at
  24 Hz, 14 dB down), and a tone at exactly half of it keeps between -6 dB and nothing, by its phase against the
  device's samples. Presenting a record at another rate alone would change nothing the model sees: the feature
  extractor resamples every input to the model's rate (and refuses a real 50 Hz recording);
- `resample_record(signal, rate, target_rate)`: the polyphase resampling itself;
- `add_white_noise(signal, snr_db, rng, band_hz)`: Gaussian noise scaled per lead so that
  `10 log10(P_signal / P_noise) = snr_db`, with powers measured around each lead's mean; with `band_hz` (the model's
  band-pass, as the robustness evaluation passes it) the noise is band-limited first, so the stated SNR is what
  reaches the model whatever the record's rate (white noise up to a 500 Hz record's Nyquist frequency lost 8 dB of its
  power to the feature extractor's 40 Hz low-pass, up to a 100 Hz record's 1 dB);
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

import warnings
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from scipy import signal as sp_signal

from ..models.merit.feature_extraction_merit import _butterworth_sos

# the response of `acquired_at_rate` (both passes of the anti-aliasing filter) in dB, by frequency as a fraction of
# the device rate: what the docs and the robustness descriptions quote, measured by tests/test_eval_robustness.py
ACQUIRED_AT_RATE_RESPONSE_DB = {0.465: -3, 0.48: -6, 0.52: -21, 0.55: -45}
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
    """Mean power of each lead around its mean, `(num_leads,)`, over its finite samples (a record the feature
    extractor repairs with `nan_policy="interpolate"` may hold a few NaNs)."""
    signal = _as_signal(signal)
    finite = np.where(np.isfinite(signal), signal, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN lead has no power: nan
        return np.nanmean((finite - np.nanmean(finite, axis=0)) ** 2, axis=0)


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """`10 log10(P(clean) / P(noisy - clean))` per lead, the definition `add_*` use."""
    return 10 * np.log10(signal_power(clean) / signal_power(np.asarray(noisy) - np.asarray(clean)))


def _scale_to_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    signal_pow, noise_pow = signal_power(signal), signal_power(noise)
    if np.any(noise_pow <= 0):
        raise ValueError("the generated noise has zero power")
    target = np.nan_to_num(signal_pow) / 10 ** (snr_db / 10)  # an all-NaN lead gets none (it stays what it was)
    return noise * np.sqrt(target / noise_pow)[None, :]


def band_limited(noise: np.ndarray, sampling_rate: float, band_hz: tuple[float | None, float | None]) -> np.ndarray:
    """`noise` filtered to `band_hz` (low, high; either `None`: open) with a zero-phase 4th-order Butterworth, designed
    as the feature extractor designs its (2nd-order) band-pass; a band edge at or above the record's Nyquist frequency
    is left open."""
    low, high = band_hz
    nyquist = sampling_rate / 2
    low = low if low is not None and 0 < low < nyquist else None
    high = high if high is not None and high < nyquist else None
    sos = _butterworth_sos(4, low, high, sampling_rate)  # the feature extractor's design function (cached)
    return noise if sos is None else sp_signal.sosfiltfilt(sos, noise, axis=0)


def add_white_noise(
    signal: np.ndarray,
    snr_db: float,
    rng: np.random.Generator,
    band_hz: tuple[float | None, float | None] | None = None,
    sampling_rate: float | None = None,
) -> np.ndarray:
    """Add zero-mean Gaussian noise at `snr_db` dB per lead (a flat lead, power 0, stays flat; NaN samples stay NaN).
    With `band_hz` (and the record's `sampling_rate`) the noise is limited to that band before it is scaled."""
    signal = _as_signal(signal)
    noise = rng.standard_normal(signal.shape)
    if band_hz is not None:
        if sampling_rate is None:
            raise ValueError("add_white_noise: band_hz needs the record's sampling_rate")
        noise = band_limited(noise, sampling_rate, band_hz)
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


def resample_record(
    signal: np.ndarray, sampling_rate: float, target_rate: float, padtype: str = "constant"
) -> tuple[np.ndarray, float]:
    """Resample with scipy's polyphase filter (the feature extractor's own method); returns `(signal, target_rate)`.
    `padtype` as `scipy.signal.resample_poly`'s (its default pads with zeros)."""
    signal = _as_signal(signal)
    ratio = Fraction(target_rate / sampling_rate).limit_denominator(1000)
    if abs(float(ratio) * sampling_rate - target_rate) > 1e-6 * target_rate:
        raise ValueError(f"cannot resample {sampling_rate:g} Hz to {target_rate:g} Hz exactly")
    resampled = sp_signal.resample_poly(signal, ratio.numerator, ratio.denominator, axis=0, padtype=padtype)
    return resampled, float(target_rate)


def acquired_at_rate(signal: np.ndarray, sampling_rate: float, device_rate: float) -> tuple[np.ndarray, float]:
    """The record as a `device_rate` Hz device would have captured it, returned at its own `sampling_rate`. The edges
    are padded with the line through them (zeros would pull each lead towards 0 there, by its offset); NaN samples
    are bridged linearly for the filter and are NaN again afterwards, so a repairable record stays repairable."""
    if not 0 < device_rate < sampling_rate:
        raise ValueError(
            f"device_rate must be below the record's {sampling_rate:g} Hz to change it, got {device_rate:g} Hz"
        )
    signal = _as_signal(signal)
    missing = ~np.isfinite(signal)
    bridged = signal.copy()
    for lead in np.flatnonzero(missing.any(axis=0)):
        finite = np.flatnonzero(~missing[:, lead])
        if len(finite):
            bridged[:, lead] = np.interp(np.arange(len(signal)), finite, signal[finite, lead])
    low, _ = resample_record(bridged, sampling_rate, device_rate, padtype="line")
    restored, _ = resample_record(low, device_rate, sampling_rate, padtype="line")
    restored = restored[: len(signal)]
    restored[missing] = signal[missing]
    return restored, float(sampling_rate)


__all__ = [
    "ACQUIRED_AT_RATE_RESPONSE_DB",
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
