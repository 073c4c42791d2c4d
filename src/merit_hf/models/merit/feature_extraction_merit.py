"""`MeritFeatureExtractor`: MERIT's input contract as code.

The most common complaint about ECG foundation models is an undocumented preprocessing contract. Ours is this file,
saved with every checkpoint as `preprocessor_config.json`:

1. read: an array `(num_samples, num_leads)` as WFDB gives it, with `lead_names` and a **required** `sampling_rate`;
   or the path of a WFDB record (header + signal file);
2. leads: names matched case-insensitively (`AVR`, `aVR`, `avr`) and reordered to `lead_names` of the config; a
   missing lead raises, unless `derive_limb_leads=True` asks for the documented repair (Einthoven / Goldberger); so
   does a lead the model does not use (e.g. the Frank X/Y/Z leads of a 15-lead record), unless `drop_extra_leads=True`;
   with `missing_leads="mask"`, any subset of the leads is accepted: the missing ones are zeros in `ecg_values` and
   `False` in the returned `lead_mask` `(batch, num_leads)`, and the models leave their tokens out;
3. NaN / inf: raise naming the record and lead, unless `nan_policy="interpolate"` (linear in time), which repairs
   short dropouts only: a gap longer than `max_nan_gap_s` or a lead more than `max_nan_fraction` NaN raises naming
   the lead and the gap or share;
4. units: converted to mV (`V`, `mV`, `uV`/`µV`/`μV`); an unknown unit raises; a signal that says mV but is
   hundreds of mV wide (almost always µV mislabelled) raises, and so does a single sample farther than
   `max_sample_deviation_mv` from its lead's median (a corrupt value), and a flat lead (not recorded, or mV labelled
   µV; an interpolated lead included) unless `flat_lead_policy` asks to zero or drop it; limb leads that break
   Einthoven's law (I + III - II = 0) or Goldberger's (aVR + aVL + aVF = 0), two leads likely swapped in the header,
   give an `EcgLeadSwapWarning` naming the record (`lead_swap_policy`: `"raise"` refuses, `"off"` does not check);
5. resample to `sampling_rate` with a polyphase filter (scipy); an input whose Nyquist frequency is below the
   low-pass cut-off cannot reach the model's band and raises;
6. band-pass (zero-phase Butterworth, 0.67-40 Hz by default, ST-MEM);
7. window: records longer than `num_samples` are cropped (`crop="center"` for inference, `"random"` for
   training, `"start"`); shorter ones raise unless `padding=True`, which pads with zeros at the end and returns
   `ecg_attention_mask`; `window="sliding"` instead cuts the whole record into windows every `window_stride` samples
   (the last one aligned to the record's end) and returns `record_index`, the record each window came from;
8. normalise each record (`normalization="zscore_lead"` by default: every lead to mean 0, std 1).

Every error names the record (its path, or its index in the batch) and the problem. This file is Hub remote code:
it imports numpy, scipy and transformers only; `wfdb` is imported when a path is given, torch and
`feature_extraction_torch_merit.py` (steps 5-8 batched on tensors) when `device=` is.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import signal as sp_signal
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin

from .configuration_merit import STANDARD_LEAD_NAMES
from .wfdb_header_merit import (
    WfdbHeader,
    WfdbHeaderError,
    WfdbMultiSegmentHeader,
    parse_multi_segment_header,
    parse_wfdb_header,
    wfdb_read_differences,
)

UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}
NAN_POLICIES = ("raise", "interpolate")
NORMALIZATIONS = ("zscore_lead", "zscore_record", "none")
CROPS = ("center", "random", "start")
MISSING_LEAD_POLICIES = ("raise", "mask")
WINDOWS = ("single", "sliding")
# transformers' `PaddingStrategy` values: every window is `num_samples` long, so "longest" and "max_length" both pad a
# shorter record to it
PADDING_STRATEGIES = {"longest": True, "max_length": True, "do_not_pad": False}


def padding_flag(padding: Any) -> bool:
    """`padding` as given to a transformers feature extractor (a bool, a `PaddingStrategy` or its string) as the
    bool this one uses; a string is no longer truthy ("do_not_pad" padded)."""
    value = getattr(padding, "value", padding)  # a `PaddingStrategy`
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value in PADDING_STRATEGIES:
        return PADDING_STRATEGIES[value]
    raise ValueError(f"padding must be True, False or one of {tuple(PADDING_STRATEGIES)}, got {padding!r}")


# An ECG spans a few mV; a lead whose 99th percentile of |x - median| exceeds this is almost always a unit error.
DEFAULT_MAX_AMPLITUDE_MV = 30.0
# No sample of a surface ECG lies this far from its lead's median: the largest |x - median| of any sample of the 3,099
# real PTB-XL record files (bundled and ../shared/data, 100 and 500 Hz) is 11.5 mV (ecg_id 710, V2). A sample beyond
# it is a corrupt value or a saturated amplifier, which the 99th percentile (`DEFAULT_MAX_AMPLITUDE_MV`) never sees:
# one such sample in a lead dominates its band-passed, z-scored output (correlation < 0.1 with the clean lead).
DEFAULT_MAX_SAMPLE_DEVIATION_MV = 50.0
# `nan_policy="interpolate"` repairs gaps up to this long: shorter than any QRS complex (60-120 ms), so a straight line
# never stands in for a whole beat of a lead...
DEFAULT_MAX_NAN_GAP_S = 0.05
# ... and up to this share of a lead's samples in all (many short dropouts still leave 95 % of the lead measured).
DEFAULT_MAX_NAN_FRACTION = 0.05
# Below this a lead carries no ECG: not recorded (zeros, a constant), or mV data labelled µV (1000x too small). The
# smallest lead of 1,987 real PTB-XL records spans 0.079 mV (measured; `leads_too_wide`'s statistic).
DEFAULT_MIN_AMPLITUDE_MV = 0.02
FLAT_LEAD_POLICIES = ("raise", "zero", "drop")
# Einthoven's law (I + III - II = 0) and Goldberger's (aVR + aVL + aVF = 0) hold for every correctly labelled 12-lead
# record: III and the augmented leads are defined by the same three electrodes as I and II. A residual above this share
# of the law's largest lead (RMS, `limb_lead_residuals`) says two leads were exchanged in the header (I and II) or a
# lead was inverted. Measured (benchmarks/limb_lead_residuals.py, results/limb_lead_residuals.json) on the 1,987 real
# PTB-XL records of ../shared/data/ptbxl_2k (100 Hz) and the 100 at 500 Hz of ptbxl_subset500: at most 1.6 %
# (Goldberger's; Einthoven's 0.9 %) as labelled, Einthoven's at least 24 % with I and II exchanged.
DEFAULT_MAX_LIMB_LEAD_RESIDUAL = 0.1
LEAD_SWAP_POLICIES = ("warn", "raise", "off")
# The laws are checked on this many samples at most, evenly spaced over the record: a swap shows in every beat, and the
# check's cost stays that of 10 s at 100 Hz whatever the rate or length (a fraction of the feature extractor's).
LIMB_LEAD_CHECK_SAMPLES = 1000
# the two laws: their leads and weights (residual = the weighted sum, which is 0 for a correctly labelled record)
LIMB_LEAD_LAWS = {
    "Einthoven": (("I", "II", "III"), (1.0, -1.0, 1.0), "I + III - II"),
    "Goldberger": (("aVR", "aVL", "aVF"), (1.0, 1.0, 1.0), "aVR + aVL + aVF"),
}


class EcgInputError(ValueError):
    """A record that breaks the input contract. The message names the record and the problem."""


class EcgLeadSwapWarning(UserWarning):
    """A record whose limb leads break Einthoven's or Goldberger's law: two leads likely exchanged in its header
    (`lead_swap_policy="warn"`; filter it with `warnings.filterwarnings("ignore", category=EcgLeadSwapWarning)`)."""


def read_wfdb_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a WFDB record (`path` without extension, or with `.hea`) and validate what the header claims.

    Returns `{"signal": (num_samples, num_leads) float64 in the header's units, "sampling_rate", "lead_names",
    "units", "record": str(path)}`. Raises `EcgInputError` naming the file for a missing, corrupt or truncated header
    (signal lines missing or without a lead name), a field wfdb would replace by a default (`read_wfdb_header`), a
    missing signal file, and a signal file that does not belong to its header (shorter or longer than the header
    declares, or failing the header's checksums). Lead names and units are the header's own text.

    Records stored as PTB-XL and MIMIC-IV-ECG store theirs (one format-16 file) are read with numpy from the header
    as `read_wfdb_header` parsed it; `wfdb` reads every other layout, after a check that it parses the header to the
    same fields (its parser took about 4 ms a header, 17x the rest of reading a PTB-XL record).

    A multi-segment record (a master header listing segments) is read as one record: each segment is read and checked
    as a record of its own, and their signals are joined in order, exactly (each segment converted with its own gain
    and baseline). Its segments must hold the same leads, in the same order, in the same units, at the master's
    sampling rate, and as many samples as the master lists; a gap (a `~` segment) and a variable layout (a layout
    segment of 0 samples) raise: convert such a record to a single-segment one first (e.g. `wfdb.rdrecord` +
    `wfdb.wrsamp`).
    """
    record_path = _wfdb_record_path(path)
    header = record_path.with_suffix(".hea")
    text = _header_text(header)
    try:
        multi_segment = parse_multi_segment_header(text)
    except WfdbHeaderError as error:
        raise EcgInputError(f"{header}: {error}") from error
    if multi_segment is not None:
        return _read_multi_segment_record(record_path, multi_segment)
    return _read_single_segment_record(record_path, _parse_header(header, text))


def _read_single_segment_record(record_path: Path, fields: WfdbHeader) -> dict[str, Any]:
    """`read_wfdb_record` for a single-segment record whose header `fields` are parsed."""
    meta = _as_wfdb_meta(fields)
    if _is_format16(meta):  # PTB-XL's and MIMIC-IV-ECG's layout: read with numpy from the header as written
        _check_signal_files(meta, record_path)
        signal = _read_format16(meta, record_path)
    else:  # any other layout: wfdb reads it, after a check that it reads the header as written
        meta = _wfdb_meta(fields, record_path)
        _check_signal_files(meta, record_path)
        try:
            import wfdb

            record = wfdb.rdrecord(str(record_path), physical=False)
            digital = record.d_signal  # one sample per frame (`_parse_header`): nothing was averaged
            if digital is not None and not any(meta.skew or []):
                _check_checksums(meta, digital, record_path)  # wfdb never checks them: a wrong format reads garbage
            signal = record.dac() if digital is not None else None
        except EcgInputError:
            raise
        except Exception as error:
            raise EcgInputError(f"{record_path}: cannot read the signal ({type(error).__name__}: {error})") from error
    if signal is None or signal.ndim != 2 or signal.shape[1] != meta.n_sig:
        raise EcgInputError(f"{record_path}: signal file does not hold {meta.n_sig} signals")
    if meta.sig_len and signal.shape[0] != meta.sig_len:
        raise EcgInputError(
            f"{record_path}: signal file holds {signal.shape[0]} samples, header declares {meta.sig_len} (truncated?)"
        )
    if signal.shape[0] == 0:
        raise EcgInputError(f"{record_path}: the signal file holds no samples")
    return {  # names and units as the header writes them (wfdb drops their non-ASCII characters: µV would be V)
        "signal": signal,
        "sampling_rate": fields.sampling_rate,
        "lead_names": fields.lead_names,
        "units": [line.units for line in fields.signals],
        "record": str(record_path),
    }


def _read_multi_segment_record(record_path: Path, master: WfdbMultiSegmentHeader) -> dict[str, Any]:
    """`read_wfdb_record` for a multi-segment record: its segments read one by one, checked against the master header
    and against each other, and joined."""
    header = record_path.with_suffix(".hea")
    names = [name for name, _ in master.segments]
    where = f"{header}: multi-segment record of segments {names}"
    if "~" in names:
        gaps = [number for number, name in enumerate(names, start=1) if name == "~"]
        raise EcgInputError(
            f"{where}: segment(s) {gaps} are gaps ('~', no signal), which merit_hf does not fill; convert the record "
            "to single-segment records of its recorded parts (e.g. wfdb.rdrecord and wfdb.wrsamp)"
        )
    if any(length == 0 for _, length in master.segments):
        raise EcgInputError(
            f"{where}: a variable layout (segment {names[0]} of 0 samples is its layout header): its segments may "
            "hold different leads; convert it to a single-segment record first (e.g. wfdb.rdrecord with m2s=True and "
            "wfdb.wrsamp)"
        )
    parts, first = [], None
    for name, length in master.segments:
        segment = record_path.parent / name
        segment_header = segment.with_suffix(".hea")
        try:
            text = _header_text(segment_header)
            if parse_multi_segment_header(text) is not None:
                raise EcgInputError(f"{segment_header}: a multi-segment header, which cannot be a segment")
            read = _read_single_segment_record(segment, _parse_header(segment_header, text))
        except (EcgInputError, WfdbHeaderError) as error:
            raise EcgInputError(f"{where}: segment {name} cannot be read: {error}") from error
        first = first or read
        differences = [
            f"{key.replace('_', ' ')} {read[key]} (segment {names[0]}: {first[key]})"
            for key in ("lead_names", "units")
            if read[key] != first[key]
        ]
        if read["sampling_rate"] != master.sampling_rate:
            differences.append(f"sampling rate {read['sampling_rate']:g} Hz (the master: {master.sampling_rate:g} Hz)")
        if len(read["lead_names"]) != master.num_signals:
            differences.append(f"{len(read['lead_names'])} signals (the master: {master.num_signals})")
        if len(read["signal"]) != length:
            differences.append(f"{len(read['signal'])} samples (the master lists {length})")
        if differences:
            raise EcgInputError(f"{where}: segment {name} does not match the record: {'; '.join(differences)}")
        parts.append(read["signal"])
    return {
        "signal": np.concatenate(parts),
        "sampling_rate": master.sampling_rate,
        "lead_names": first["lead_names"],
        "units": first["units"],
        "record": str(record_path),
    }


def _as_wfdb_meta(fields: WfdbHeader) -> SimpleNamespace:
    """The header as written, with the attribute names of `wfdb.rdheader`'s result that this module's readers use."""
    signals = fields.signals
    return SimpleNamespace(
        n_sig=len(signals),
        sig_len=fields.num_samples,
        sig_name=fields.lead_names,
        file_name=[line.file_name for line in signals],
        fmt=[line.fmt for line in signals],
        samps_per_frame=[line.samples_per_frame for line in signals],
        skew=[line.skew for line in signals],
        byte_offset=[line.byte_offset for line in signals],
        adc_gain=[line.adc_gain for line in signals],
        baseline=[line.baseline for line in signals],
        checksum=[line.checksum for line in signals],
    )


def _wfdb_meta(fields: WfdbHeader, record_path: Path):
    """`wfdb.rdheader` of the record, refused where it reads a field differently from the text (`fields`)."""
    header = record_path.with_suffix(".hea")
    try:
        import wfdb
    except ImportError as error:  # pragma: no cover - wfdb is a dependency of merit_hf
        raise ImportError("reading WFDB records needs `pip install wfdb`") from error
    try:
        meta = wfdb.rdheader(str(record_path))
    except Exception as error:  # wfdb raises bare TypeError/IndexError on malformed headers
        raise EcgInputError(f"{header}: corrupt or truncated WFDB header ({type(error).__name__}: {error})") from error
    differences = wfdb_read_differences(fields, meta)
    if differences:
        raise EcgInputError(f"{header}: wfdb reads this header differently from its text: {'; '.join(differences)}")
    return meta


def _check_signal_files(meta, record_path: Path) -> None:
    """Every signal file the header names exists and has the size the header declares."""
    for file_name in sorted(set(meta.file_name or [])):
        data_file = record_path.parent / file_name
        if not data_file.is_file():
            raise EcgInputError(f"{record_path.with_suffix('.hea')}: signal file {data_file.name} is missing")
        _check_signal_file_size(meta, file_name, data_file)


def _wfdb_record_path(path: str | os.PathLike) -> Path:
    record_path = Path(path)
    return record_path.with_suffix("") if record_path.suffix in (".hea", ".dat") else record_path


def read_wfdb_header(path: str | os.PathLike) -> WfdbHeader:
    """The fields of a WFDB record's header (`path` without extension, or with `.hea`) as its text writes them, read
    before `wfdb` substitutes a default for a missing or invalid one (see `wfdb_header_merit`). Raises
    `EcgInputError` naming the header file, the line, the field and its value: for a missing or unreadable header, an
    uncalibrated lead (ADC gain 0 or none), a missing or non-positive sampling frequency, a signal line without a lead
    name, a record or file name wfdb cannot read (non-ASCII), a multi-frequency record (a signal with more than one
    sample per frame, which wfdb would average down to the frame rate), a multi-segment master header (which
    `read_wfdb_record` reads segment by segment). The one check every reader of records uses (the feature extractor,
    the dataset reader and converters, the Space)."""
    header = _wfdb_record_path(path).with_suffix(".hea")
    return _parse_header(header, _header_text(header))


def _header_text(header: Path) -> str:
    if not header.is_file():
        raise EcgInputError(f"{header}: WFDB header not found")
    try:
        return header.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise EcgInputError(f"{header}: not a WFDB header (not UTF-8 or ASCII text: {error})") from error


def _parse_header(header: Path, text: str) -> WfdbHeader:
    """`parse_wfdb_header` with the file named, and multi-frequency records refused."""
    try:
        fields = parse_wfdb_header(text)
    except WfdbHeaderError as error:
        raise EcgInputError(f"{header}: {error}") from error
    faster = [line for line in fields.signals if line.samples_per_frame > 1]
    if faster:
        rates = ", ".join(
            f"{line.lead_name} ({line.samples_per_frame} samples per frame, "
            f"{line.samples_per_frame * fields.sampling_rate:g} Hz)"
            for line in faster
        )
        raise EcgInputError(
            f"{header}: a multi-frequency record: signal(s) {rates} are sampled faster than the record's frame rate of "
            f"{fields.sampling_rate:g} Hz. merit_hf reads one sampling rate per record, and wfdb's default reading "
            "would average their samples down to the frame rate without a word. Resample the record to one rate "
            "first: read it with wfdb.rdrecord(record, smooth_frames=False), bring every signal to one rate (e.g. "
            "wfdb.processing.resample_sig) and write it with wfdb.wrsamp"
        )
    return fields


def _is_format16(meta) -> bool:
    """Whether the record is stored the way PTB-XL and MIMIC-IV-ECG store theirs: one file, format 16, one sample
    per frame, no skew, one byte offset."""
    return not (
        len(set(meta.file_name or [])) != 1
        or any(str(fmt) != "16" for fmt in meta.fmt or [None])
        or any(spf not in (None, 1) for spf in meta.samps_per_frame or [])
        or any(skew not in (None, 0) for skew in meta.skew or [])
        or len(set(meta.byte_offset or [0])) != 1
        or not meta.adc_gain
        or meta.baseline is None
    )


def _read_format16(meta, record_path: Path) -> np.ndarray:
    """The signal of a record in the layout `_is_format16` accepts, read with numpy from the header already parsed,
    converted exactly as `wfdb.rdrecord` converts it (float64 `(digital - baseline) / adc_gain`, the format's invalid
    value -32768 as NaN). The header's per-signal checksums (16-bit sum of the digital samples, invalid values
    included, as `wfdb` computes them when writing) are verified: a mismatch means the file does not hold the
    header's data."""
    offset = (meta.byte_offset or [0])[0] or 0
    data_file = record_path.parent / meta.file_name[0]
    digital = np.fromfile(data_file, dtype="<i2", offset=offset)
    if not meta.sig_len and (data_file.stat().st_size - offset) % (2 * meta.n_sig):
        raise EcgInputError(
            f"{data_file}: the header gives no number of samples, and the signal file's {data_file.stat().st_size} "
            f"bytes are not a whole number of {meta.n_sig}-signal frames (truncated?)"
        )
    length = meta.sig_len or digital.size // meta.n_sig
    digital = digital[: length * meta.n_sig].reshape(length, meta.n_sig)
    _check_checksums(meta, digital, data_file)
    invalid = digital == -32768
    signal = digital.astype(np.float64)
    np.subtract(signal, np.asarray(meta.baseline, dtype=np.float64), signal)
    np.divide(signal, np.asarray(meta.adc_gain, dtype=np.float64), signal)
    signal[invalid] = np.nan
    return signal


def _check_checksums(meta, digital: np.ndarray, data_file: Path) -> None:
    """Compare the header's checksums (where given) with the 16-bit sums of `digital` `(num_samples, num_signals)`."""
    if not meta.checksum:
        return
    sums = digital.sum(axis=0, dtype=np.int64)
    failing = [
        meta.sig_name[column]
        for column, checksum in enumerate(meta.checksum)
        if checksum is not None and (int(sums[column]) - checksum) % 65536
    ]
    if failing:
        raise EcgInputError(
            f"{data_file}: header and data disagree: the checksum of leads {failing} does not match the header "
            "(the signal file belongs to another record, or is corrupt)"
        )


# Bytes per sample of the common WFDB storage formats (the WFDB "signal" specification).
_WFDB_BYTES_PER_SAMPLE = {"8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0, "212": 1.5}


def _check_signal_file_size(meta, file_name: str, data_file: Path) -> None:
    """A signal file shorter than its header declares is truncated, one longer belongs to another header: say so
    before wfdb fails on a reshape or silently reads the first samples of the wrong data."""
    columns = [i for i, name in enumerate(meta.file_name) if name == file_name]
    formats = {str(meta.fmt[i]) for i in columns}
    if len(formats) != 1 or not meta.sig_len or (fmt := formats.pop()) not in _WFDB_BYTES_PER_SAMPLE:
        return
    offset = max((meta.byte_offset or [0] * len(meta.fmt))[i] or 0 for i in columns)
    samples = meta.sig_len * sum((meta.samps_per_frame or [1] * len(meta.fmt))[i] or 1 for i in columns)
    # Format 212 packs two samples in 3 bytes; an odd sample count ends on a padded 2-byte pair.
    expected = samples * _WFDB_BYTES_PER_SAMPLE[fmt]
    shortest, longest = offset + int(expected), offset + int(np.ceil(expected))
    actual = data_file.stat().st_size
    declares = (
        f"the header declares {meta.sig_len} samples x {len(columns)} signals in format {fmt} ({shortest} bytes)"
    )
    if actual < shortest:
        raise EcgInputError(f"{data_file}: signal file holds {actual} bytes, {declares}: truncated")
    skewed = any((meta.skew or [0] * len(meta.fmt))[i] for i in columns)  # skew reads frames past sig_len
    if actual > longest and not skewed:
        raise EcgInputError(f"{data_file}: header and data disagree: the signal file holds {actual} bytes, {declares}")


def leads_too_wide(signal: np.ndarray, max_amplitude_mv: float) -> tuple[np.ndarray, float]:
    """Columns of `signal` `(num_samples, num_leads)` in mV whose 99th percentile of |x - median| exceeds
    `max_amplitude_mv`, and the widest of those spreads (0 if none). An ECG spans a few mV: a lead hundreds of mV wide
    is almost always µV labelled mV (a wrong unit or ADC gain). Shared by the feature extractor and dataset reading."""
    if max_amplitude_mv == np.inf or (signal.size and signal.max() - signal.min() <= max_amplitude_mv):
        # the record's range bounds every lead's: one pass (none without a limit)
        return np.array([], dtype=np.int64), 0.0
    if not (np.ptp(signal, axis=0) > max_amplitude_mv).any():
        # |x - median| never exceeds the peak-to-peak range: the usual record skips the order statistics (exact)
        return np.array([], dtype=np.int64), 0.0
    spread = np.percentile(np.abs(signal - np.median(signal, axis=0)), 99, axis=0)
    too_wide = np.flatnonzero(spread > max_amplitude_mv)
    return too_wide, float(spread[too_wide].max()) if too_wide.size else 0.0


def all_finite(signal: np.ndarray) -> bool:
    """Whether every value of `signal` is finite, in one pass that allocates nothing: a sum is finite only if every
    term is (NaN and inf propagate; an overflow to inf falls back to the element-wise test)."""
    return bool(np.isfinite(signal.sum())) or bool(np.isfinite(signal).all())


def _most_in_three_bins(signal: np.ndarray, min_amplitude_mv: float) -> np.ndarray:
    """Per column of `signal` `(num_samples, num_leads)` (finite): the most samples in three consecutive bins
    `min_amplitude_mv * 2` wide. The bins of all leads share one origin (the minimum) and sit side by side in one
    histogram, each lead's row padded so that rounding never moves a sample into its neighbour's row. A record wider
    than `4 * num_samples` bins (hundreds of mV) counts each lead from its own minimum and caps the far values, which
    only merges bins."""
    num_samples, num_leads = signal.shape
    scale = 0.5 / min_amplitude_mv
    low = signal.min()
    span = (signal.max() - low) * scale
    if span < 4 * num_samples:
        width = int(span) + 4  # bins 1 .. span + 2 of each row are used: rounding stays inside it
        scaled = np.multiply(signal, scale)
        scaled += np.arange(num_leads) * width + (1.0 - low * scale)
        bins = scaled.astype(np.intp)  # truncation = floor (all >= 0)
    else:  # each lead from its own minimum, so that one wide lead leaves the others' bins apart
        scaled = signal - signal.min(axis=0)  # finite input: at worst inf, capped next
        scaled *= scale
        bins = np.minimum(scaled, 4 * num_samples, out=scaled).astype(np.int64)
        width = int(bins.max()) + 3
        bins += np.arange(num_leads) * width
    counts = np.bincount(bins.ravel(), minlength=num_leads * width).reshape(num_leads, width)
    return (counts[:, :-2] + counts[:, 1:-1] + counts[:, 2:]).max(axis=1)


# Every this many samples of a lead go through `_maybe_flat_columns`' first, cheap test. It cleared 99.4 % of the
# leads of the 1,987 PTB-XL records at 100 Hz in ../shared/data/ptbxl_2k and all leads of its 100 records at 500 Hz;
# the rest take the full test.
FLAT_TEST_STRIDE = 8


def flat_outside(num_samples: int) -> int:
    """How many samples of a flat lead of `num_samples` may lie `min_amplitude_mv` or more from its median. Its 99th
    percentile of |x - median| (linear interpolation at position `0.99 * (num_samples - 1)` of the sorted values) is
    below `min_amplitude_mv`, so are all sorted values up to that position's floor."""
    return num_samples - (int(np.floor(0.99 * (num_samples - 1))) + 1)


def _maybe_flat_columns(signal: np.ndarray, min_amplitude_mv: float) -> np.ndarray:
    """Columns that may be flat, found without sorting (the exact percentile costs 5x more and would slow every
    record down). A flat lead has 99 % of its samples within `min_amplitude_mv` of its median, an interval that meets
    at most three consecutive bins `min_amplitude_mv` * 2 wide (two, plus one for rounding at a bin's edge), wherever
    the bins start; a lead with no three bins holding that many samples cannot be flat, so no flat lead is ever
    missed. `signal` is finite. First every `FLAT_TEST_STRIDE`-th sample: a flat lead has at most `outside` samples
    off its interval, so at least `len(subsample) - outside` of the subsample in three bins; a lead with fewer cannot
    be flat, and only the others are counted in full."""
    num_samples, num_leads = signal.shape
    if min_amplitude_mv <= 0 or not num_leads or not num_samples:
        return np.array([], dtype=np.int64)
    outside = flat_outside(num_samples)
    threshold = num_samples - outside
    candidates = np.arange(num_leads)
    subsample = signal[::FLAT_TEST_STRIDE]
    if len(subsample) > outside:
        candidates = np.flatnonzero(_most_in_three_bins(subsample, min_amplitude_mv) >= len(subsample) - outside)
        if not candidates.size:
            return candidates
        if len(candidates) < num_leads:
            signal = signal[:, candidates]
    return candidates[_most_in_three_bins(signal, min_amplitude_mv) >= threshold]


def sample_too_far(signal: np.ndarray, max_deviation_mv: float) -> tuple[int, int, float, float, int] | None:
    """The first lead of `signal` `(num_samples, num_leads)` in mV (finite) with a sample more than `max_deviation_mv`
    from the lead's median: `(column, sample index, value, median, how many such samples in the lead)`, or `None`.
    Cheap for every record that passes: a lead's peak-to-peak range bounds each |x - median|, so only leads wider than
    the bound (none of the real records) take a median."""
    if max_deviation_mv == np.inf or not signal.size or signal.max() - signal.min() <= max_deviation_mv:
        return None
    candidates = np.flatnonzero(np.ptp(signal, axis=0) > max_deviation_mv)
    if not candidates.size:
        return None
    part = signal[:, candidates]
    median = np.median(part, axis=0)
    far = np.abs(part - median) > max_deviation_mv
    leads = np.flatnonzero(far.any(axis=0))
    if not leads.size:
        return None
    lead = int(leads[0])
    row = int(np.argmax(far[:, lead]))
    return int(candidates[lead]), row, float(part[row, lead]), float(median[lead]), int(far[:, lead].sum())


def check_max_amplitude(
    signal: np.ndarray,
    lead_names: list[str],
    record: str,
    max_amplitude_mv: float,
    from_header: bool = False,
    max_sample_deviation_mv: float = np.inf,
) -> None:
    """Raise if a lead of `signal` `(num_samples, num_leads)` in mV is wider than `max_amplitude_mv` (`leads_too_wide`):
    almost always µV labelled mV. The hint names what to fix: the header's units or gain for a WFDB record
    (`from_header`), the `units` argument for an array. Then raise if a sample lies more than `max_sample_deviation_mv`
    from its lead's median (`sample_too_far`: a corrupt value or a saturated amplifier, which the 99th percentile does
    not see), naming the lead, the sample's index in the record as given and its value. A record whose range is within
    both bounds (every real one) is cleared by one pass."""
    limit = min(max_amplitude_mv, max_sample_deviation_mv)
    if limit == np.inf or not signal.size or signal.max() - signal.min() <= limit:
        return  # the record's range bounds every lead's |x - median|
    too_wide, widest = leads_too_wide(signal, max_amplitude_mv)
    if too_wide.size:
        hint = (
            "the header's units or ADC gain are probably wrong (µV stored as mV, or a gain of 1 instead of 1000)"
            if from_header
            else "the signal is probably in µV: pass units='uV'"
        )
        raise EcgInputError(
            f"{record}: leads {[lead_names[i] for i in too_wide]} span up to {widest:.0f} mV after unit conversion, "
            f"above the {max_amplitude_mv:g} mV an ECG can span: {hint}"
        )
    far = sample_too_far(signal, max_sample_deviation_mv)
    if far is not None:
        column, row, value, median, count = far
        raise EcgInputError(
            f"{record}: lead {lead_names[column]} sample {row} is {value:.6g} mV, {abs(value - median):.4g} mV from "
            f"the lead's median ({median:.3g} mV), beyond the {max_sample_deviation_mv:g} mV no surface ECG reaches "
            f"({count} sample{'s' if count > 1 else ''} of the lead that far): a corrupt value or a saturated "
            "amplifier (set such samples to NaN and pass nan_policy='interpolate' to repair short gaps, or raise "
            "max_sample_deviation_mv)"
        )


def check_lead_amplitudes(
    signal: np.ndarray,
    lead_names: list[str],
    record: str,
    max_amplitude_mv: float = DEFAULT_MAX_AMPLITUDE_MV,
    min_amplitude_mv: float = DEFAULT_MIN_AMPLITUDE_MV,
    flat_lead_policy: str = "raise",
    from_header: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """The amplitude check of every reader (the feature extractor and `merit_hf.data.read_ecg_record`): a lead wider
    than `max_amplitude_mv` raises (µV labelled mV); a flat lead (99th percentile of |x - median| below
    `min_amplitude_mv`: not recorded, or mV labelled µV) raises, or with `flat_lead_policy="zero"` is set to 0, or
    with `"drop"` is removed (the caller treats it as a lead that was not recorded). A record whose every lead is flat
    always raises: nothing is left to read.

    Args:
        signal: `(num_samples, num_leads)` in mV, finite.
        lead_names: the name of each column (for the messages and the result).
        record: the record's name (its path or batch index), which every message starts with.
        from_header: the units came from a WFDB header (the hint then names the header's units and ADC gain, not the
            `units` argument).

    Returns:
        `(signal, flat_leads)`: the signal (flat columns zeroed or removed) and the names of the flat leads, in order.
    """
    if flat_lead_policy not in FLAT_LEAD_POLICIES:
        raise ValueError(f"flat_lead_policy must be one of {FLAT_LEAD_POLICIES}, got {flat_lead_policy!r}")
    check_max_amplitude(signal, lead_names, record, max_amplitude_mv, from_header)
    if all_finite(signal):
        candidates = _maybe_flat_columns(signal, min_amplitude_mv)
    else:  # a lead with NaN/inf is left to the NaN check
        checkable = np.flatnonzero(np.isfinite(signal).all(axis=0))
        candidates = checkable[_maybe_flat_columns(signal[:, checkable], min_amplitude_mv)]
    if not candidates.size:
        return signal, []
    spread = np.full(signal.shape[1], np.inf)
    part = signal[:, candidates]
    spread[candidates] = np.percentile(np.abs(part - np.median(part, axis=0)), 99, axis=0)
    flat = np.flatnonzero(spread < min_amplitude_mv)
    if not flat.size:
        return signal, []
    flat_leads = [lead_names[i] for i in flat]
    described = (
        f"{record}: leads {flat_leads} are flat (at most {spread[flat].max():.2g} mV of signal, below "
        f"min_amplitude_mv={min_amplitude_mv:g})"
    )
    units = "the header's units and ADC gain" if from_header else "`units`"
    if flat.size == signal.shape[1]:
        cause = "no lead was recorded" if not spread.any() else f"mV labelled µV (1000x too small)? check {units}"
        raise EcgInputError(f"{described}: every lead is flat, {cause}")
    if flat_lead_policy == "raise":
        raise EcgInputError(
            f"{described}: a lead that was not recorded, or a unit 1000x too small (check {units}); "
            "flat_lead_policy='zero' or 'drop' reads the record without these leads"
        )
    if flat_lead_policy == "zero":
        signal = signal.copy()
        signal[:, flat] = 0.0
        return signal, flat_leads
    return np.delete(signal, flat, axis=1), flat_leads


def limb_lead_residuals(signal: np.ndarray, lead_names: Sequence[str], skip: Iterable[str] = ()) -> dict[str, float]:
    """The residual of Einthoven's law (I + III - II) and of Goldberger's (aVR + aVL + aVF) of a record, each as the
    RMS of the sum over the largest RMS of its three leads (every lead's mean removed; on at most
    `LIMB_LEAD_CHECK_SAMPLES` samples evenly spaced over the record): about 0 for a correctly
    labelled record, whose III and augmented leads are computed from I and II, and of the order of 1 when two of the
    leads were exchanged (e.g. I and II, for Einthoven's). A law is left out when one of its leads is not in
    `lead_names` (case-insensitive), is in `skip` (flat, zeroed or missing leads), or all three are constant.

    Args:
        signal: `(num_samples, num_leads)`, finite.
        lead_names: the name of each column.
        skip: leads not to use.

    Returns:
        `{"Einthoven": residual, "Goldberger": residual}`, the laws that could be checked."""
    columns, laws = _limb_lead_laws(tuple(str(name).lower() for name in lead_names), frozenset(map(str.lower, skip)))
    if not laws:
        return {}
    stride = -(-len(signal) // LIMB_LEAD_CHECK_SAMPLES)  # every sample of a 10 s record at 100 Hz, every 5th at 500
    part = np.asarray(signal[::stride, columns], dtype=np.float64)
    part -= part.mean(axis=0)
    gram = (part.T @ part).tolist()  # every lead's power and each law's sum's, from one product
    residuals = {}
    for law, position, weights in laws:
        largest = max(gram[i][i] for i in position)
        if largest > 0:
            power = sum(wi * wj * gram[i][j] for wi, i in zip(weights, position) for wj, j in zip(weights, position))
            residuals[law] = math.sqrt(max(power, 0.0) / largest)
    return residuals


@lru_cache(maxsize=64)
def _limb_lead_laws(lead_names: tuple[str, ...], skip: frozenset[str]) -> tuple[list[int], list[tuple]]:
    """The columns `limb_lead_residuals` reads for the laws whose leads are all in `lead_names` (lower case) and not in
    `skip`, and each such law as `(name, its leads' positions among those columns, weights)`."""
    available = {name: column for column, name in enumerate(lead_names) if name not in skip}
    columns, laws = [], []
    for law, (leads, weights, _) in LIMB_LEAD_LAWS.items():
        if all(lead.lower() in available for lead in leads):
            laws.append((law, list(range(len(columns), len(columns) + 3)), weights))
            columns += [available[lead.lower()] for lead in leads]
    return columns, laws


class MeritFeatureExtractor(FeatureExtractionMixin):
    r"""
    Turns raw 12-lead ECG records into MERIT's `ecg_values` `(batch, num_leads, num_samples)` float32.

    Args:
        lead_names (`list[str]`): output lead order (the model's `lead_names`).
        sampling_rate (`int`, defaults to 250): output sampling rate in Hz (ST-MEM).
        num_samples (`int`, defaults to 2250): output window (9 s at 250 Hz, ST-MEM).
        highpass_hz (`float` or `None`, defaults to 0.67): high-pass cut-off; `None` turns it off (ST-MEM).
        lowpass_hz (`float` or `None`, defaults to 40.0): low-pass cut-off; `None` turns it off (ST-MEM).
        filter_order (`int`, defaults to 2): order of each Butterworth stage (applied forwards and backwards).
        normalization (`str`, defaults to `"zscore_lead"`): `"zscore_lead"`, `"zscore_record"` (one mean and std
            over all leads and samples, ST-MEM) or `"none"` (keep mV).
        crop (`str`, defaults to `"center"`): where to cut a longer record: `"center"`, `"random"` or `"start"`.
        padding (`bool`, defaults to `False`): zero-pad shorter records (and return `ecg_attention_mask`) instead of
            raising. transformers' `PaddingStrategy` values work too: `"longest"` and `"max_length"` pad (to the
            `num_samples` window), `"do_not_pad"` does not.
        nan_policy (`str`, defaults to `"raise"`): `"raise"` or `"interpolate"`: linear in time, for gaps no longer
            than `max_nan_gap_s` making up no more than `max_nan_fraction` of a lead; anything more raises naming the
            lead and the gap. An interpolated lead then goes through the flat-lead check like any other.
        max_nan_gap_s (`float` or `None`, defaults to 0.05): the longest run of NaN/inf samples, in seconds at the
            record's rate, that `nan_policy="interpolate"` repairs (50 ms: shorter than any QRS complex, so a straight
            line never stands in for a whole beat); `None`: no bound.
        max_nan_fraction (`float` or `None`, defaults to 0.05): the largest share of a lead's samples that
            `nan_policy="interpolate"` may invent, all gaps together; `None`: no bound.
        derive_limb_leads (`bool`, defaults to `False`): rebuild missing limb leads from two measured ones
            (III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2). Off by default: a missing lead
            is an error unless you ask for the repair.
        drop_extra_leads (`bool`, defaults to `False`): drop leads that are not in `lead_names` (e.g. the Frank
            leads `vx`, `vy`, `vz` of PTB's 15-lead records) instead of raising on them.
        missing_leads (`str`, defaults to `"raise"`): what a record without some of `lead_names` does: `"raise"`,
            or `"mask"`: any non-empty subset is accepted, the missing leads are zeros in `ecg_values`, and
            `lead_mask` `(batch, num_leads)` (`True` = recorded) is returned; the models then leave the missing
            leads' tokens out (a wearable's lead I, a Holter's two leads). With `derive_limb_leads=True` the limb
            leads that can be derived are derived first, and only the rest is masked.
        window (`str`, defaults to `"single"`): `"single"` (one `num_samples` window per record, see `crop`) or
            `"sliding"`: every window of `num_samples` samples, `window_stride` apart, the last one aligned to the
            record's end so that the whole record is covered; each window is normalised on its own (as the model
            saw its training crops) and `record_index` `(num_windows,)` says which record it came from
            (`pool_window_embeddings` pools the window embeddings back per record).
        window_stride (`int`, *optional*): samples (at `sampling_rate`) between window starts with
            `window="sliding"`; defaults to `num_samples` (windows that touch, no overlap).
        max_amplitude_mv (`float`, defaults to 30.0): a lead whose 99th percentile of |x - median| exceeds this
            (after unit conversion) raises as a likely unit error (an ECG spans a few mV).
        max_sample_deviation_mv (`float`, defaults to 50.0): a single sample farther than this from its lead's median
            (after unit conversion) raises, naming the lead, the sample's index and its value: a corrupt value or a
            saturated amplifier, which the 99th percentile does not see (no sample of 3,099 real PTB-XL record files
            lies more than 11.5 mV from its lead's median). To repair such samples, set them to NaN and pass
            `nan_policy="interpolate"`.
        min_amplitude_mv (`float`, defaults to 0.02): a lead whose 99th percentile of |x - median| is below this is
            flat: not recorded, or mV data labelled µV (1000x too small). What happens is `flat_lead_policy`.
        flat_lead_policy (`str`, defaults to `"raise"`): `"raise"`; `"zero"` (the lead is fed as zeros, never
            z-scored noise); or `"drop"` (the lead is removed from the record before leads are matched, exactly as
            if it had not been recorded: for reduced-lead input, where a missing lead is left out; a limb lead is
            rebuilt with `derive_limb_leads=True`; otherwise it raises). A record whose every lead is flat always
            raises.
        lead_swap_policy (`str`, defaults to `"warn"`): what a record whose limb leads break Einthoven's law
            (I + III - II = 0) or Goldberger's (aVR + aVL + aVF = 0) by more than `max_limb_lead_residual` does: `"warn"`
            (an `EcgLeadSwapWarning` naming the record, the law and the likely swap), `"raise"` (an `EcgInputError`) or
            `"off"` (no check; e.g. for a device that digitises each limb lead through its own noisy amplifier, where
            the laws hold only roughly).
            Two limb leads exchanged in a header (I and II) give a valid-looking record that the model would read with
            the wrong lead embeddings. Checked on the leads the record has (flat ones left out), after they are matched.
        max_limb_lead_residual (`float`, defaults to 0.1): the largest residual of either law, as a share of the RMS of
            its largest lead (`limb_lead_residuals`), that passes (measured: at most 0.016 on 2,087 real PTB-XL
            records, at least 0.24 with their I and II exchanged).
        min_sampling_rate_factor (`float`, defaults to 2.0): inputs below `factor * lowpass_hz` Hz raise (their
            Nyquist band does not reach the low-pass cut-off).
        seed (`int` or `None`): seed of the generator used by `crop="random"`.

    Example:

    ```python
    >>> import numpy as np
    >>> from merit_hf import MeritFeatureExtractor
    >>> fe = MeritFeatureExtractor()
    >>> rng = np.random.default_rng(0)
    >>> i, ii = rng.normal(0, 0.1, (2, 5000))  # two recorded limb leads in mV; the other four follow from them
    >>> limb = np.stack([i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2], axis=1)
    >>> signal = np.concatenate([limb, rng.normal(0, 0.1, (5000, 6))], axis=1)  # (num_samples, num_leads), as wfdb
    >>> leads = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    >>> fe(signal, sampling_rate=500, lead_names=leads, return_tensors="np")["ecg_values"].shape
    (1, 12, 2250)
    ```"""

    model_input_names = ["ecg_values", "ecg_attention_mask", "lead_mask"]

    def __init__(
        self,
        lead_names: list[str] | tuple[str, ...] = STANDARD_LEAD_NAMES,
        sampling_rate: int = 250,
        num_samples: int = 2250,
        highpass_hz: float | None = 0.67,
        lowpass_hz: float | None = 40.0,
        filter_order: int = 2,
        normalization: str = "zscore_lead",
        crop: str = "center",
        padding: bool = False,
        nan_policy: str = "raise",
        derive_limb_leads: bool = False,
        drop_extra_leads: bool = False,
        max_amplitude_mv: float = DEFAULT_MAX_AMPLITUDE_MV,
        min_sampling_rate_factor: float = 2.0,
        min_amplitude_mv: float = DEFAULT_MIN_AMPLITUDE_MV,
        flat_lead_policy: str = "raise",
        seed: int | None = None,
        missing_leads: str = "raise",
        window: str = "single",
        window_stride: int | None = None,
        max_sample_deviation_mv: float = DEFAULT_MAX_SAMPLE_DEVIATION_MV,
        max_nan_gap_s: float | None = DEFAULT_MAX_NAN_GAP_S,
        max_nan_fraction: float | None = DEFAULT_MAX_NAN_FRACTION,
        lead_swap_policy: str = "warn",
        max_limb_lead_residual: float = DEFAULT_MAX_LIMB_LEAD_RESIDUAL,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.lead_names = list(lead_names)
        self.sampling_rate = int(sampling_rate)
        self.num_samples = int(num_samples)
        self.highpass_hz = highpass_hz
        self.lowpass_hz = lowpass_hz
        self.filter_order = int(filter_order)
        self.normalization = normalization
        self.crop = crop
        self.padding = padding_flag(padding)
        self.nan_policy = nan_policy
        self.derive_limb_leads = bool(derive_limb_leads)
        self.drop_extra_leads = bool(drop_extra_leads)
        self.max_amplitude_mv = float(max_amplitude_mv)
        self.min_sampling_rate_factor = float(min_sampling_rate_factor)
        self.min_amplitude_mv = float(min_amplitude_mv)
        self.flat_lead_policy = flat_lead_policy
        self.seed = seed
        self.missing_leads = missing_leads
        self.window = window
        self.window_stride = None if window_stride is None else int(window_stride)
        self.max_sample_deviation_mv = float(max_sample_deviation_mv)
        self.max_nan_gap_s = None if max_nan_gap_s is None else float(max_nan_gap_s)
        self.max_nan_fraction = None if max_nan_fraction is None else float(max_nan_fraction)
        self.lead_swap_policy = lead_swap_policy
        self.max_limb_lead_residual = float(max_limb_lead_residual)
        self._validate_settings()
        self._rng = np.random.default_rng(seed)
        self._rng_worker_seed = None  # the DataLoader worker the generator was last seeded for

    def _validate_settings(self) -> None:
        name = type(self).__name__
        checks = [
            (self.sampling_rate > 0, "sampling_rate", f"must be positive, got {self.sampling_rate}"),
            (self.num_samples > 0, "num_samples", f"must be positive, got {self.num_samples}"),
            (self.normalization in NORMALIZATIONS, "normalization", f"must be one of {NORMALIZATIONS}"),
            (self.crop in CROPS, "crop", f"must be one of {CROPS}, got {self.crop!r}"),
            (self.nan_policy in NAN_POLICIES, "nan_policy", f"must be one of {NAN_POLICIES}"),
            (self.flat_lead_policy in FLAT_LEAD_POLICIES, "flat_lead_policy", f"must be one of {FLAT_LEAD_POLICIES}"),
            (
                0 <= self.min_amplitude_mv < self.max_amplitude_mv,
                "min_amplitude_mv",
                "must be in [0, max_amplitude_mv)",
            ),
            (
                self.min_amplitude_mv < self.max_sample_deviation_mv,
                "max_sample_deviation_mv",
                f"must be above min_amplitude_mv, got {self.max_sample_deviation_mv}",
            ),
            (
                self.max_nan_gap_s is None or self.max_nan_gap_s >= 0,
                "max_nan_gap_s",
                f"must be None or at least 0 s, got {self.max_nan_gap_s}",
            ),
            (
                self.max_nan_fraction is None or 0 <= self.max_nan_fraction <= 1,
                "max_nan_fraction",
                f"must be None or in [0, 1], got {self.max_nan_fraction}",
            ),
            (len({n.lower() for n in self.lead_names}) == len(self.lead_names), "lead_names", "has duplicates"),
            (
                self.missing_leads in MISSING_LEAD_POLICIES,
                "missing_leads",
                f"must be one of {MISSING_LEAD_POLICIES}, got {self.missing_leads!r}",
            ),
            (self.window in WINDOWS, "window", f"must be one of {WINDOWS}, got {self.window!r}"),
            (
                self.lead_swap_policy in LEAD_SWAP_POLICIES,
                "lead_swap_policy",
                f"must be one of {LEAD_SWAP_POLICIES}, got {self.lead_swap_policy!r}",
            ),
            (
                self.max_limb_lead_residual > 0,
                "max_limb_lead_residual",
                f"must be positive, got {self.max_limb_lead_residual}",
            ),
            (
                self.window_stride is None or self.window_stride > 0,
                "window_stride",
                f"must be positive, got {self.window_stride}",
            ),
        ]
        nyquist = self.sampling_rate / 2
        if self.lowpass_hz is not None:
            checks.append((0 < self.lowpass_hz < nyquist, "lowpass_hz", f"must be in (0, {nyquist}) Hz"))
        if self.highpass_hz is not None:
            upper = self.lowpass_hz if self.lowpass_hz is not None else nyquist
            checks.append((0 < self.highpass_hz < upper, "highpass_hz", f"must be in (0, {upper}) Hz"))
        for ok, field, problem in checks:
            if not ok:
                raise ValueError(f"{name}.{field}: {problem}")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["window"] = self.window  # transformers drops a `window` attribute (audio extractors' window arrays)
        output.pop("_rng", None)
        output.pop("_rng_worker_seed", None)
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and "AutoProcessor" in auto_map:
            # `ProcessorMixin.save_pretrained` writes the processor's entry onto this object (it removes it from the
            # tokenizer only), so a feature extractor saved alone later, in an encoder or classifier folder without
            # a tokenizer, sent `AutoProcessor` to a processor it could not build. The processor's own entry lives in
            # `processor_config.json`.
            output["auto_map"] = {key: value for key, value in auto_map.items() if key != "AutoProcessor"}
        return output

    @classmethod
    def from_model_config(cls, ecg_config, **kwargs) -> MeritFeatureExtractor:
        """The feature extractor that matches a `MeritEcgConfig` (leads, rate, window)."""
        return cls(
            lead_names=ecg_config.lead_names,
            sampling_rate=ecg_config.sampling_rate,
            num_samples=ecg_config.num_samples,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        ecgs: Any,
        sampling_rate: float | list[float] | None = None,
        lead_names: list[str] | list[list[str]] | None = None,
        units: str | list[str] | None = None,
        return_tensors: str | None = None,
        padding: bool | None = None,
        crop: str | None = None,
        return_attention_mask: bool | None = None,
        device: str | Any | None = None,
        return_lead_mask: bool | None = None,
        crop_seeds: Sequence[Any] | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            ecgs: one record or a list: arrays `(num_samples, num_leads)` (the WFDB layout), or paths of WFDB records.
            sampling_rate: sampling rate in Hz of the arrays (one for all, or one per record as a list, tuple or 1-D
                array). Required for arrays; read from the header for paths (passing a different one for a path
                raises).
            lead_names: lead names of the arrays' columns (one list for all, or one per record). Required for arrays;
                read from the header for paths (passing different ones for a path raises).
            units: unit of the arrays (`"mV"`, `"uV"`/`"µV"`, `"V"`), one for all leads or one per lead; `None`
                (default) is mV for arrays. Read from the header for paths (passing different ones raises).
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            padding, crop: override the instance settings for this call.
            return_attention_mask: return `ecg_attention_mask` (1 on signal, 0 on padding): `True` always (all ones
                when nothing was padded), `False` never, `None` (default) when `padding` is on.
            device: `None` (default) resamples and filters one record at a time with scipy; `"cpu"`, `"cuda"` (or a
                `torch.device`) does it for the whole batch at once on tensors there (`feature_extraction_torch_merit`:
                the same validation and errors, scipy's filters, float32; tests/test_core_feature_extraction_torch.py
                bounds the difference, benchmarks/README.md the speed). With `return_tensors="pt"` the tensors stay on
                that device.
            return_lead_mask: return `lead_mask` `(batch, num_leads)` bool (`True` = the lead was recorded): `True`
                always, `False` never, `None` (default) when `missing_leads="mask"`.
            crop_seeds: with `crop="random"`, one seed per record (an int or a sequence of ints, as
                `numpy.random.default_rng` takes: pretraining passes `(seed, epoch, ecg_id)`): each record's crop is
                drawn from its own seed, so it does not depend on the records batched with it, on the process or on
                the worker; `None` (default) draws from the feature extractor's generator (`seed`).

        With `window="sliding"` the batch holds one row per window, and `record_index` `(num_windows,)` gives the
        index of the record each window came from.
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(kwargs)}")
        records = self._as_list(ecgs)
        if not records:
            raise EcgInputError("no ECG given (empty list)")
        padding = self.padding if padding is None else padding_flag(padding)
        crop = self.crop if crop is None else crop
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        with_mask = padding if return_attention_mask is None else return_attention_mask
        with_lead_mask = self.missing_leads == "mask" if return_lead_mask is None else return_lead_mask
        crop_rngs = self._crop_rngs(crop_seeds, crop, len(records))
        if device is not None:
            return self._batched_on_device(records, sampling_rate, lead_names, units, padding, crop, device,
                                           with_mask, with_lead_mask, return_tensors, crop_rngs)  # fmt: skip
        values, masks, lead_masks, record_index = [], [], [], []
        for index, record in enumerate(records):
            rate = self._per_record(sampling_rate, index, len(records), "sampling_rate")
            names = self._per_record_names(lead_names, index, len(records))
            ecg, mask, present = self.process_one(
                record, rate, names, units, padding=padding, crop=crop, index=index, crop_rng=crop_rngs[index]
            )
            values.append(ecg)
            masks.append(mask)
            lead_masks.append(np.broadcast_to(present, (len(ecg), len(present))))
            record_index.append(np.full(len(ecg), index, dtype=np.int64))
        data = {"ecg_values": np.concatenate(values).astype(np.float32)}
        if with_mask:
            data["ecg_attention_mask"] = np.concatenate(masks).astype(np.int64)
        if with_lead_mask:
            data["lead_mask"] = np.concatenate(lead_masks).astype(bool)
        if self.window == "sliding":
            data["record_index"] = np.concatenate(record_index)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _batched_on_device(
        self,
        records,
        sampling_rate,
        lead_names,
        units,
        padding,
        crop,
        device,
        with_mask,
        with_lead_mask,
        return_tensors,
        crop_rngs,
    ) -> BatchFeature:
        """`__call__` with `device=`: the batched torch DSP, the outputs left on `device` for `return_tensors="pt"`."""
        import torch

        from .feature_extraction_torch_merit import CPU_RECORDS_PER_CHUNK, extract_batch

        device = torch.device(device)
        chunk = CPU_RECORDS_PER_CHUNK if device.type == "cpu" else len(records)
        prepared = self._prepare_for_device(records, sampling_rate, lead_names, units, padding, crop, chunk, crop_rngs)
        outputs = extract_batch(self, prepared, device)
        data = {"ecg_values": outputs["ecg_values"]}
        if with_mask:
            data["ecg_attention_mask"] = outputs["ecg_attention_mask"]
        if with_lead_mask:
            data["lead_mask"] = outputs["lead_mask"]
        if self.window == "sliding":
            data["record_index"] = outputs["record_index"]
        if return_tensors != "pt":
            data = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prepare_for_device(
        self, records, sampling_rate, lead_names, units, padding, crop, chunk: int = 1, crop_rngs=None
    ) -> list[dict[str, Any]]:
        """Every record through this class's own checks, before the batched DSP (`extract_batch`) builds any tensor,
        with the scipy path's errors in its order (the first bad record raises): validation, the band-pass filter's
        minimum length (what `sosfiltfilt` raises on the scipy path), and the windows, which are `_fit_window` /
        `_sliding_windows` applied to sample positions (so random crops draw the same numbers as on the scipy path;
        after an error the generator may have drawn for records past the bad one, which the scipy path never reached).

        Validation is batched where it can be: a record whose columns are the model's leads in order and in mV is
        copied as it is and screened with the others of its batch (`_validate_pending`, `screen_records`); the few
        the screen does not clear, and every other record, go through `validate_signal` record by record. Before any
        error is raised the records screened so far are checked, so that an earlier record's error comes first.

        One dict per record: `signal` (`(num_leads, num_samples)` float32, mV, model lead order, less `offset`),
        `offset` (`(num_leads,)` float64: each lead's first sample, `_write_centred`; zeros for a record copied as it
        is, `_write_cast`), `rounded` (that copy rounded: the screen decides whether to copy it again centred),
        `stack` (`(array, slot)`: the signal is `array[slot]`; the records of one rate and length fill `(chunk,
        num_leads, num_samples)` arrays in order, which the DSP reads as they are), `sampling_rate`, `up` / `down`
        (the resampling ratio), `present`, `windows` (each window's sample positions after resampling) and
        `masks`."""
        from .feature_extraction_torch_merit import filtfilt_padlen

        sos = self._band_pass_sos()
        padlen = filtfilt_padlen(sos) if sos is not None else 0
        prepared: list[dict[str, Any]] = []
        pending: list[tuple] = []  # records copied unchecked, to screen: (entry, signal as given, lead names, ...)
        stacks: dict[tuple[int, int, int], tuple[np.ndarray, int]] = {}  # the array each group fills, its next slot
        for index, record in enumerate(records):
            unchecked = None  # this record as read, while its validation is deferred to the screen
            try:
                rate = self._per_record(sampling_rate, index, len(records), "sampling_rate")
                names = self._per_record_names(lead_names, index, len(records))
                signal, rate, name, names, record_units, from_header = self._read_input(
                    record, rate, names, units, index
                )
                if self._screenable(signal, names, record_units):
                    self._check_shape(signal, names, name)
                    unchecked = (signal, names, record_units, name, from_header, rate)
                    present = np.ones(len(self.lead_names), dtype=bool)
                else:
                    signal, present, _ = self._validate_read(signal, names, record_units, name, from_header, rate)
                entry = self._place(signal, rate, name, present, padding, crop, chunk, len(records) - index, stacks,
                                    sos, padlen, None if crop_rngs is None else crop_rngs[index],
                                    cast=unchecked is not None)  # fmt: skip
            except Exception:
                try:  # earlier records' errors, then this record's validation, come first on the scipy path
                    self._validate_pending(pending)
                    if unchecked is not None:
                        self._validate_read(*unchecked)
                except EcgInputError as earlier:
                    raise earlier from None
                raise
            prepared.append(entry)
            if unchecked is not None:
                pending.append((entry, *unchecked))
                if len(pending) == chunk:
                    self._validate_pending(pending)
        self._validate_pending(pending)
        return prepared

    def _place(
        self, signal, rate, name, present, padding, crop, chunk, left, stacks, sos, padlen, crop_rng=None, cast=False
    ) -> dict[str, Any]:
        """A record's `_prepare_for_device` entry: its resampling ratio, the filter's length check, its windows, and
        its signal copied (float32, leads first) into the next slot of its group's array: around its first samples
        (`_write_centred`), or with `cast` as it is (`_write_cast`; the screen then says whether that rounded more)."""
        up, down = self._resample_ratio(rate, name)
        length = len(signal)
        pad = min(int(round(rate)), length - 1)
        if sos is not None and -(-(length + 2 * pad) * up // down) <= padlen:  # what the scipy path raises
            raise EcgInputError(
                f"{name}: {length} samples are too short for the band-pass filter (The length of the input "
                f"vector x must be greater than padlen, which is {padlen}.)"
            )
        positions = np.arange(-(-length * up // down))[:, None]
        if self.window == "sliding":
            record_windows = self._sliding_windows(positions, name, padding=padding)
        else:
            record_windows = [self._fit_window(positions, name, padding=padding, crop=crop, crop_rng=crop_rng)]
        stack, slot = stacks.get((up, down, length), (None, chunk))
        if slot == chunk:  # a new array: at most `chunk` records, and no more than are left
            stack, slot = np.empty((min(chunk, left), signal.shape[1], length), np.float32), 0
        if cast:
            rounded, offset = _write_cast(stack[slot], signal), np.zeros(signal.shape[1])
        else:
            rounded, offset = False, _write_centred(stack[slot], signal)
        stacks[(up, down, length)] = (stack, slot + 1)
        return {
            "signal": stack[slot],
            "stack": (stack, slot),
            "offset": offset,
            "rounded": rounded,
            "sampling_rate": rate,
            "up": up,
            "down": down,
            "present": present,
            "windows": [window[0].astype(np.int64) for window, _ in record_windows],
            "masks": [mask for _, mask in record_windows],
        }

    def _validate_pending(self, pending: list[tuple]) -> None:
        """Validation of the records `_prepare_for_device` copied unchecked, in order, then forgotten: the batched
        screen (`screen_records`) on each array they were copied into; the exact flat-lead test on the leads it
        could not clear; `validate_signal` on the rest, which raises the scipy path's error or repairs the record
        (its slot and `present` rewritten). A record that passes but whose float32 cast rounded more than a copy
        around its first samples would (`off_zero`) is copied again that way."""
        if not pending:
            return
        import torch

        from .feature_extraction_torch_merit import screen_records

        filled: dict[int, tuple[np.ndarray, int]] = {}  # each array, and the slots to screen
        for entry, *_ in pending:
            stack, slot = entry["stack"]
            filled[id(stack)] = (stack, max(slot + 1, filled.get(id(stack), (stack, 0))[1]))
        verdicts = {}
        for key, (stack, count) in filled.items():
            checked, may_be_flat, off_zero = screen_records(
                torch.from_numpy(stack[:count]),
                self.min_amplitude_mv,
                min(self.max_amplitude_mv, self.max_sample_deviation_mv),  # a lead's range bounds both
                flat_outside(stack.shape[-1]),
            )
            verdicts[key] = (checked.numpy(), may_be_flat.numpy(), off_zero.numpy())
        for entry, signal, names, record_units, name, from_header, rate in pending:
            stack, slot = entry["stack"]
            checked, may_be_flat, off_zero = verdicts[id(stack)]
            leads = np.flatnonzero(may_be_flat[slot])
            if checked[slot] and (
                not leads.size
                or not _maybe_flat_columns(_as_float_array(signal, name)[:, leads], self.min_amplitude_mv).size
            ):
                if entry["rounded"] and off_zero[slot]:
                    entry["offset"] = _write_centred(stack[slot], _as_float_array(signal, name))
                self.check_limb_leads(signal, name)  # validate_signal's last check: its leads are all there, none flat
                continue
            signal = _as_float_array(signal, name)  # float64, as the checks see it
            signal_mv, present, _ = self.validate_signal(signal, names, record_units, name, from_header, rate)
            entry["offset"] = _write_centred(stack[slot], signal_mv)
            entry["present"] = present
        pending.clear()

    @staticmethod
    def _as_list(ecgs: Any) -> list:
        if isinstance(ecgs, (str, os.PathLike)):
            return [ecgs]
        if isinstance(ecgs, np.ndarray):
            if ecgs.ndim == 3:
                return list(ecgs)
            return [ecgs]
        if hasattr(ecgs, "numpy") and hasattr(ecgs, "dim"):  # a torch tensor
            array = ecgs.detach().cpu().numpy()
            return list(array) if array.ndim == 3 else [array]
        if isinstance(ecgs, Iterable) and not isinstance(ecgs, (bytes, Mapping)):  # a list, a data set's column
            return list(ecgs)
        raise EcgInputError(
            "ecgs: expected an array (num_samples, num_leads), a WFDB record's path, or a list of them; got "
            f"{type(ecgs).__name__}"
        )

    @staticmethod
    def _per_record_names(lead_names, index: int, count: int):
        """One list of lead names for every record, or one list per record."""
        if not _is_list_of_lists(lead_names):
            return lead_names
        if len(lead_names) != count:
            raise EcgInputError(f"lead_names: {len(lead_names)} lists of lead names given for {count} records")
        return lead_names[index]

    @staticmethod
    def _per_record(value, index: int, count: int, field: str):
        if hasattr(value, "tolist") and np.ndim(value) == 1:  # a 1-D numpy array or torch tensor: one per record
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise EcgInputError(f"{field}: {len(value)} values given for {count} records")
            return value[index]
        return value

    def process_one(
        self,
        record: Any,
        sampling_rate: float | None,
        lead_names: list[str] | None,
        units: str | list[str] | None = None,
        padding: bool = False,
        crop: str = "center",
        index: int = 0,
        crop_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One record through the whole contract; returns `(ecg (num_windows, num_leads, num_samples), attention masks
        (num_windows, num_samples), lead_mask (num_leads,) bool)`, with one window unless `window="sliding"`.
        `crop_rng`: the generator of a random crop (default: the feature extractor's)."""
        signal, sampling_rate, name, present = self.validate_one(record, sampling_rate, lead_names, units, index=index)
        signal = self._resample_and_filter(signal, sampling_rate, name)
        if self.window == "sliding":
            windows = self._sliding_windows(signal, name, padding=padding)
        else:
            windows = [self._fit_window(signal, name, padding=padding, crop=crop, crop_rng=crop_rng)]
        ecgs = np.stack([self._normalize(window, mask, present) for window, mask in windows])
        return ecgs, np.stack([mask for _, mask in windows]), present

    def validate_one(
        self,
        record: Any,
        sampling_rate: float | None,
        lead_names: list[str] | None,
        units: str | list[str] | None = None,
        index: int = 0,
    ) -> tuple[np.ndarray, float, str, np.ndarray]:
        """Steps 1-4 of the contract for one record (read, leads, NaN, units and amplitude): returns `(signal
        (num_samples, num_leads) in mV in the model's lead order (missing leads zero), sampling_rate, name, present
        (num_leads,) bool)`. The one validation of the scipy path; the batched torch path (`device=`) runs the same
        code on every record that its batched screen does not clear (`_prepare_for_device`)."""
        signal, sampling_rate, name, lead_names, units, from_header = self._read_input(
            record, sampling_rate, lead_names, units, index
        )
        signal, present, _ = self._validate_read(signal, lead_names, units, name, from_header, sampling_rate)
        return signal, sampling_rate, name, present

    def _validate_read(self, signal, lead_names, units, name: str, from_header: bool, sampling_rate: float):
        """`validate_signal` on a signal as `_read_input` returned it (its checks run in float64)."""
        return self.validate_signal(_as_float_array(signal, name), lead_names, units, name, from_header, sampling_rate)

    def _read_input(
        self, record: Any, sampling_rate: float | None, lead_names: list[str] | None, units: Any, index: int
    ) -> tuple[np.ndarray, float, str, list[str], Any, bool]:
        """Step 1 of the contract: `(signal (num_samples, num_leads) float32 or float64, sampling_rate, name,
        lead_names, units, from_header)` of an array or a WFDB record's path."""
        if isinstance(record, (str, os.PathLike)):
            read = read_wfdb_record(record)
            name = read["record"]
            if sampling_rate is not None and float(sampling_rate) != read["sampling_rate"]:
                raise EcgInputError(
                    f"{name}: sampling_rate={sampling_rate} given but the header says {read['sampling_rate']} Hz"
                )
            if lead_names is not None and _lead_keys(lead_names) != _lead_keys(read["lead_names"]):
                raise EcgInputError(
                    f"{name}: lead_names={list(lead_names)} given but the header names {list(read['lead_names'])}; "
                    "a record's lead names come from its header (leave lead_names unset for paths)"
                )
            if units is not None and _unit_factors(units, len(read["units"])) != _unit_factors(read["units"]):
                raise EcgInputError(
                    f"{name}: units={units!r} given but the header says {list(read['units'])}; a record's units come "
                    "from its header (leave units unset for paths)"
                )
            signal, sampling_rate, lead_names, units = (
                read["signal"],
                read["sampling_rate"],
                read["lead_names"],
                read["units"],
            )
        else:
            name = f"record {index}"
            signal = _as_float_array(record, name, keep_float32=True)
        if sampling_rate is None:
            raise EcgInputError(
                f"{name}: sampling_rate is required (the rate in Hz of this array); the model expects "
                f"{self.sampling_rate} Hz and resamples from whatever you give"
            )
        if lead_names is None:
            raise EcgInputError(
                f"{name}: lead_names is required (the name of each column), e.g. {list(self.lead_names)}"
            )
        return signal, float(sampling_rate), name, lead_names, units, isinstance(record, (str, os.PathLike))

    def _screenable(self, signal: np.ndarray, lead_names: list[str], units: Any) -> bool:
        """Whether validation of this record would only check it (`screen_records` can clear it): its columns are
        the model's leads in order, in mV (nothing to reorder, derive, mask or convert)."""
        if signal.ndim != 2 or signal.shape[1] != len(self.lead_names) or len(lead_names) != len(self.lead_names):
            return False
        if _lead_keys(lead_names) != _lead_keys(self.lead_names):
            return False
        factors = _unit_factors("mV" if units is None else units, signal.shape[1])
        return len(factors) == signal.shape[1] and all(factor == 1.0 for factor in factors)  # else validation says why

    def validate_signal(
        self,
        signal: np.ndarray,
        lead_names: list[str],
        units: str | list[str] | None,
        name: str,
        from_header: bool = False,
        sampling_rate: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Steps 2-4 of the contract on a signal already read: shape, units to mV, NaN/inf (raised, or interpolated
        within `max_nan_gap_s` and `max_nan_fraction`), flat leads (interpolated ones included), lead matching and
        order, amplitude (the 99th percentile and every sample). Returns `(signal (num_samples, num_leads) in mV in
        the model's lead order (missing leads zero), present (num_leads,) bool, flat leads)`. The one implementation
        of these checks: the feature extractor's two paths and the dataset reader
        (`merit_hf.models.wfdb_io.read_ecg_record`) call it.

        Args:
            name: what every error starts with (a path, a header file, `record 3`).
            from_header: the units came from a WFDB header (the hints then name its units and ADC gain).
            sampling_rate: the record's rate in Hz, which `max_nan_gap_s` is measured in (needed only to interpolate).
        """
        signal = self._check_shape(signal, lead_names, name)
        signal = self._to_millivolt(signal, units, name, lead_names)
        self._check_duplicate_leads(lead_names, name)  # before a flat copy could be dropped with its twin's name
        signal = self._handle_non_finite(signal, lead_names, name, sampling_rate)  # before the flat-lead check sees it
        signal, lead_names, flat_leads = self._check_flat_leads(signal, list(lead_names), name, from_header)
        signal, present = self._select_leads(signal, list(lead_names), name)
        check_max_amplitude(
            signal, self.lead_names, name, self.max_amplitude_mv, from_header, self.max_sample_deviation_mv
        )
        missing = [lead for lead, recorded in zip(self.lead_names, present) if not recorded]
        self.check_limb_leads(signal, name, skip=[*missing, *flat_leads])
        return signal, present, flat_leads

    def check_limb_leads(self, signal: np.ndarray, name: str, skip: Iterable[str] = ()) -> None:
        """Warn about (or with `lead_swap_policy="raise"` refuse) a record whose limb leads break Einthoven's or
        Goldberger's law by more than `max_limb_lead_residual` (`limb_lead_residuals`): two leads likely exchanged in
        its header. `signal`: `(num_samples, num_leads)` in mV in `lead_names` order; `skip`: leads not recorded or
        flat (a zeroed lead would break the law by itself)."""
        policy = getattr(self, "lead_swap_policy", "warn")  # an extractor pickled before the setting existed
        if policy == "off":
            return
        limit = getattr(self, "max_limb_lead_residual", DEFAULT_MAX_LIMB_LEAD_RESIDUAL)
        broken = {
            law: value for law, value in limb_lead_residuals(signal, self.lead_names, skip).items() if value > limit
        }
        if not broken:
            return
        likely = {  # I and III, and two augmented leads, exchanged leave both sums as they are
            "Einthoven": "I or III exchanged with II, a limb lead exchanged with an augmented one, or one inverted",
            "Goldberger": "an augmented lead exchanged with I, II or III, or one inverted (aVR stored as -aVR)",
        }
        laws = "; ".join(
            f"{law}'s law does not hold: {LIMB_LEAD_LAWS[law][2]} has {value:.0%} of the RMS of its largest lead "
            f"({likely[law]})"
            for law, value in broken.items()
        )
        message = (
            f"{name}: {laws}; correctly labelled records stay within max_limb_lead_residual={limit:g}: two limb leads "
            "are likely swapped in the header. Check the lead names; lead_swap_policy='off' turns this check off, "
            "'raise' refuses such records"
        )
        if policy == "raise":
            raise EcgInputError(message)
        warnings.warn(message, EcgLeadSwapWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------------------------------
    def _check_shape(self, signal: np.ndarray, lead_names: list[str], name: str) -> np.ndarray:
        if signal.ndim != 2:
            raise EcgInputError(f"{name}: expected a 2-D array (num_samples, num_leads), got shape {signal.shape}")
        if signal.shape[0] < 2:
            raise EcgInputError(f"{name}: {signal.shape[0]} samples; a record needs at least 2")
        if signal.shape[1] != len(lead_names):
            hint = " (transposed? arrays are (num_samples, num_leads) as WFDB gives them)"
            raise EcgInputError(
                f"{name}: {len(lead_names)} lead names for an array of shape {signal.shape}"
                + (hint if signal.shape[0] == len(lead_names) else "")
            )
        return signal

    def _check_duplicate_leads(self, lead_names: list[str], name: str) -> None:
        """A lead the model uses may name one column only (leads it does not use are lead matching's)."""
        keys = _lead_keys(lead_names)
        if keys == _lead_keys(self.lead_names):  # the model's leads in order: nothing twice
            return
        wanted, seen = set(_lead_keys(self.lead_names)), set()
        for lead, key in zip(lead_names, keys):
            if key in seen:
                raise EcgInputError(f"{name}: lead {lead!r} appears twice")
            if key in wanted:
                seen.add(key)

    def _select_leads(self, signal: np.ndarray, lead_names: list[str], name: str) -> tuple[np.ndarray, np.ndarray]:
        """The record's columns in `self.lead_names` order, and which of them were recorded (`(num_leads,)` bool; a
        missing lead is a column of zeros, allowed only with `missing_leads="mask"`)."""
        keys = _lead_keys(lead_names)
        if keys == _lead_keys(self.lead_names):  # already the model's leads in order: no copy
            return signal, np.ones(len(self.lead_names), dtype=bool)
        wanted = {lead.lower(): lead for lead in self.lead_names}
        position: dict[str, int] = {}
        for column, (lead, key) in enumerate(zip(lead_names, keys)):
            if key not in wanted:
                if self.drop_extra_leads:
                    continue
                raise EcgInputError(
                    f"{name}: unknown lead name {lead!r}; expected leads {list(self.lead_names)} "
                    "(drop_extra_leads=True drops leads the model does not use)"
                )
            position[key] = column
        missing = [lead for key, lead in wanted.items() if key not in position]
        columns = {key: signal[:, col] for key, col in position.items()}
        if missing and self.derive_limb_leads and (self.missing_leads == "raise" or _can_derive_limb_leads(columns)):
            columns = _derive_limb_leads(columns, name)
            missing = [lead for key, lead in wanted.items() if key not in columns]
        if missing and self.missing_leads == "mask":
            if not columns:
                raise EcgInputError(f"{name}: none of the leads {list(self.lead_names)} is in the record")
            present = np.array([lead.lower() in columns for lead in self.lead_names])
            absent = np.zeros(len(signal))
            ordered = np.stack([columns.get(lead.lower(), absent) for lead in self.lead_names], axis=1)
            return ordered, present
        if missing:
            derivable = {"i", "ii", "iii", "avr", "avl", "avf"}
            helps = {lead.lower() for lead in missing} <= derivable and len({"i", "ii", "iii"} & position.keys()) >= 2
            repair = (
                "derive_limb_leads=True rebuilds limb leads from two; " if helps and not self.derive_limb_leads else ""
            )
            raise EcgInputError(
                f"{name}: {len(position)} leads given, {len(self.lead_names)} expected; missing {missing} ({repair}"
                "missing_leads='mask' leaves the missing leads out)"
            )
        if [position.get(lead.lower()) for lead in self.lead_names] == list(range(signal.shape[1])):
            return signal, np.ones(len(self.lead_names), dtype=bool)  # already the model's leads in order: no copy
        ordered = np.stack([columns[lead.lower()] for lead in self.lead_names], axis=1)
        return ordered, np.ones(len(self.lead_names), dtype=bool)

    def _check_flat_leads(
        self, signal: np.ndarray, lead_names: list[str], name: str, from_header: bool
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """`check_lead_amplitudes`' lower bound on the record's own columns (mV) of the model's leads, before leads
        are matched: a flat lead raises, or is zeroed, or is dropped (`flat_lead_policy`), and a dropped lead then
        goes through lead matching as one the record does not have. Leads the model does not use are lead matching's
        (`drop_extra_leads`); the model's leads hold no NaN/inf any more (`_handle_non_finite` ran first, so an
        interpolated lead is checked as repaired); the upper bounds are `check_max_amplitude`'s, after leads are
        matched. Returns `(signal, lead_names, flat leads)`."""
        wanted = set(_lead_keys(self.lead_names))
        keys = _lead_keys(lead_names)
        used = [column for column, key in enumerate(keys) if key in wanted]
        if not used:
            return signal, lead_names, []
        drop = self.flat_lead_policy == "drop"
        if drop and getattr(self, "missing_leads", "raise") == "raise" and not self.derive_limb_leads:
            policy = "raise"  # nothing could stand in for a dropped lead: say so rather than "missing lead"
        else:
            policy = "zero" if drop else self.flat_lead_policy  # the zeroed columns are then removed below
        try:
            checked, flat = check_lead_amplitudes(
                signal if len(used) == signal.shape[1] else signal[:, used],  # every column used: no copy
                [lead_names[column] for column in used],
                name,
                np.inf,
                self.min_amplitude_mv,
                policy,
                from_header=from_header,
            )
        except EcgInputError as error:
            if policy == self.flat_lead_policy:
                raise
            raise EcgInputError(
                f"{error}. flat_lead_policy='drop' leaves them out, which needs missing_leads='mask' (reduced-lead "
                "input) or, for limb leads, derive_limb_leads=True"
            ) from error
        if not flat:
            return signal, lead_names, []
        if drop:
            kept = [column for column, lead in enumerate(lead_names) if lead not in flat]
            return signal[:, kept], [lead_names[column] for column in kept], flat
        signal = signal.copy()
        signal[:, used] = checked
        return signal, lead_names, flat

    def _to_millivolt(
        self, signal: np.ndarray, units: str | list[str] | None, name: str, lead_names: list[str]
    ) -> np.ndarray:
        units = "mV" if units is None else units
        if isinstance(units, str) and UNIT_TO_MV.get(units.strip().lower()) == 1.0:
            return signal  # already mV: no copy
        per_lead = [units] * signal.shape[1] if isinstance(units, str) else list(units)
        if len(per_lead) != signal.shape[1]:
            raise EcgInputError(f"{name}: {len(per_lead)} units given for {signal.shape[1]} leads")
        factors = []
        for lead, unit in zip(lead_names, per_lead):
            key = str(unit).strip().lower()
            if key not in UNIT_TO_MV:
                which = "" if isinstance(units, str) else f"lead {lead} has "
                raise EcgInputError(f"{name}: {which}unknown unit {unit!r}; expected one of mV, uV (µV), V")
            factors.append(UNIT_TO_MV[key])
        if all(factor == 1.0 for factor in factors):
            return signal  # already mV: no copy
        return signal * np.asarray(factors)[None, :]

    def _handle_non_finite(
        self, signal: np.ndarray, lead_names: list[str], name: str, sampling_rate: float | None
    ) -> np.ndarray:
        """NaN/inf in the record's columns of the model's leads (others are lead matching's): raise naming the lead,
        or with `nan_policy="interpolate"` fill each gap linearly in time (an edge gap holds the nearest value), after
        checking that no gap is longer than `max_nan_gap_s` and no lead more than `max_nan_fraction` invented: a
        repair is for short dropouts, never a lead made of straight lines. Leads are named as the model names them."""
        if all_finite(signal):
            return signal
        bad = ~np.isfinite(signal)
        model_names = dict(zip(_lead_keys(self.lead_names), self.lead_names))
        keys = _lead_keys(lead_names)
        columns = [column for column in np.flatnonzero(bad.any(axis=0)) if keys[column] in model_names]
        if not columns:
            return signal
        for column in columns:
            lead = model_names[keys[column]]
            count = int(bad[:, column].sum())
            if self.nan_policy == "raise":
                raise EcgInputError(
                    f"{name}: lead {lead} has {count} NaN/inf samples (nan_policy='interpolate' repairs gaps)"
                )
            if count == len(signal):
                raise EcgInputError(f"{name}: lead {lead} is entirely NaN/inf; nothing to interpolate from")
            if self.max_nan_fraction is not None and count > self.max_nan_fraction * len(signal):
                raise EcgInputError(
                    f"{name}: lead {lead} has {count} NaN/inf samples of {len(signal)} ({count / len(signal):.2%}), "
                    f"more than the {self.max_nan_fraction:.1%} nan_policy='interpolate' repairs (max_nan_fraction)"
                )
            if self.max_nan_gap_s is not None:
                start, length = _longest_run(bad[:, column])
                if sampling_rate is None:
                    raise ValueError(f"{name}: validate_signal needs the sampling_rate to bound NaN gaps in seconds")
                # an invalid rate is left to the rate check, which raises after validation on both paths
                if np.isfinite(sampling_rate) and sampling_rate > 0 and length > self.max_nan_gap_s * sampling_rate:
                    raise EcgInputError(
                        f"{name}: lead {lead} has a gap of {length} NaN/inf samples ({length / sampling_rate:.3g} s "
                        f"at {sampling_rate:g} Hz, samples {start}-{start + length - 1}), longer than the "
                        f"{self.max_nan_gap_s:g} s nan_policy='interpolate' repairs (max_nan_gap_s)"
                    )
        signal = signal.copy()
        time = np.arange(len(signal))
        for column in columns:
            good = ~bad[:, column]
            signal[:, column] = np.interp(time, time[good], signal[good, column])
        return signal

    def _resample_and_filter(self, signal: np.ndarray, sampling_rate: float, name: str) -> np.ndarray:
        """Resample to `self.sampling_rate` and band-pass, with neither touching the record's edges: each lead is
        taken around its mean and extended by 1 s of odd reflection (value and slope continue) before both steps,
        and the extension is cut off after. Without this, `resample_poly`'s zero padding turns a lead's offset into
        a step at each end, which the 0.67 Hz high-pass rings out for about half a second into the window, and the
        output would depend on a DC offset that the high-pass is meant to remove."""
        up, down = self._resample_ratio(sampling_rate, name)
        length = len(signal)
        mean = signal.mean(axis=0)
        pad = min(int(round(sampling_rate)), length - 1)
        centred = signal - mean
        extended = np.concatenate(
            [2 * centred[:1] - centred[pad:0:-1], centred, 2 * centred[-1:] - centred[-2 : -pad - 2 : -1]]
        )
        if (up, down) != (1, 1):
            extended = sp_signal.resample_poly(extended, up, down, axis=0)
        try:
            extended = self._band_pass(extended)
        except ValueError as error:  # sosfiltfilt's minimum length
            raise EcgInputError(
                f"{name}: {length} samples are too short for the band-pass filter ({error})"
            ) from error
        start = int(round(pad * up / down))  # whole samples for every integer rate (1 s -> `self.sampling_rate`)
        resampled = extended[start : start + -(-length * up // down)]
        return resampled if self.highpass_hz is not None else resampled + mean  # DC is signal when nothing removes it

    def _resample_ratio(self, sampling_rate: float, name: str) -> tuple[int, int]:
        if not np.isfinite(sampling_rate) or sampling_rate <= 0:
            raise EcgInputError(f"{name}: invalid sampling_rate {sampling_rate}")
        if self.lowpass_hz is not None and sampling_rate < self.min_sampling_rate_factor * self.lowpass_hz:
            raise EcgInputError(
                f"{name}: {sampling_rate:g} Hz cannot reach the model's band: its Nyquist frequency "
                f"{sampling_rate / 2:g} Hz is below the {self.lowpass_hz:g} Hz low-pass cut-off "
                f"(at least {self.min_sampling_rate_factor * self.lowpass_hz:g} Hz needed)"
            )
        up, down = _resampling_ratio(self.sampling_rate, float(sampling_rate))
        if abs(up / down * sampling_rate - self.sampling_rate) > 1e-6 * self.sampling_rate:
            raise EcgInputError(f"{name}: cannot resample {sampling_rate:g} Hz to {self.sampling_rate} Hz exactly")
        return up, down

    def _band_pass(self, signal: np.ndarray) -> np.ndarray:
        sos = self._band_pass_sos()
        return signal if sos is None else sp_signal.sosfiltfilt(sos, signal, axis=0)

    def _band_pass_sos(self) -> np.ndarray | None:
        """The Butterworth filter as second-order sections (`None` when both cut-offs are off): the one design of
        both paths, cached (designing it took a quarter of the per-record time)."""
        return _butterworth_sos(self.filter_order, self.highpass_hz, self.lowpass_hz, self.sampling_rate)

    def _fit_window(
        self, signal: np.ndarray, name: str, padding: bool, crop: str, crop_rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        length, window = signal.shape[0], self.num_samples
        mask = np.ones(window, dtype=np.int64)
        if length < window:
            if not padding:
                raise EcgInputError(
                    f"{name}: {length} samples at {self.sampling_rate} Hz ({length / self.sampling_rate:.2f} s) is "
                    f"shorter than the {window}-sample window; pass padding=True to zero-pad it"
                )
            padded = np.zeros((window, signal.shape[1]))
            padded[:length] = signal
            mask[length:] = 0
            return padded.T, mask
        if crop == "start":
            start = 0
        elif crop == "random":
            start = int((crop_rng or self._crop_generator()).integers(0, length - window + 1))
        else:
            start = (length - window) // 2
        return signal[start : start + window].T, mask

    def _sliding_windows(self, signal: np.ndarray, name: str, padding: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every `num_samples` window `window_stride` apart, plus one aligned to the end when the stride leaves a
        tail, so that no part of the record is left out; a record no longer than one window gives that window."""
        length, window = signal.shape[0], self.num_samples
        if length <= window:
            return [self._fit_window(signal, name, padding=padding, crop="start")]
        starts = list(range(0, length - window + 1, self.window_stride or window))
        if starts[-1] + window < length:
            starts.append(length - window)
        mask = np.ones(window, dtype=np.int64)
        return [(signal[start : start + window].T, mask) for start in starts]

    @staticmethod
    def _crop_rngs(crop_seeds, crop: str, num_records: int) -> list[np.random.Generator | None]:
        """One generator per record from `crop_seeds` (see `__call__`), or `None`s: the feature extractor's own."""
        if crop_seeds is None:
            return [None] * num_records
        if crop != "random":
            raise ValueError(f"crop_seeds are the seeds of random crops; this call crops {crop!r}")
        crop_seeds = list(crop_seeds)
        if len(crop_seeds) != num_records:
            raise ValueError(f"crop_seeds: one seed per record, got {len(crop_seeds)} for {num_records} records")
        return [np.random.default_rng(seed) for seed in crop_seeds]

    def _crop_generator(self) -> np.random.Generator:
        """The generator of random crops. In a DataLoader worker it is re-seeded from the worker's own seed (set by
        torch per worker and epoch, reproducible under a seeded DataLoader), combined with `seed`: forked workers
        would otherwise all inherit one generator state and cut the same crops."""
        try:
            from torch.utils.data import get_worker_info
        except ImportError:  # pragma: no cover - torch is a dependency of merit_hf
            return self._rng
        worker = get_worker_info()
        if worker is not None and worker.seed != self._rng_worker_seed:
            self._rng_worker_seed = worker.seed
            self._rng = np.random.default_rng([0 if self.seed is None else self.seed, worker.seed])
        return self._rng

    def _normalize(self, signal: np.ndarray, mask: np.ndarray, present: np.ndarray, eps: float = 1e-6) -> np.ndarray:
        """Normalise over the recorded samples of the recorded leads (a missing lead's zeros never shift the record's
        statistics); padding and missing leads stay exactly 0."""
        if self.normalization == "none":
            return signal
        valid = signal[:, mask.astype(bool)]
        if self.normalization == "zscore_record":
            mean, std = valid[present].mean(), valid[present].std()
        else:
            mean, std = valid.mean(axis=1, keepdims=True), valid.std(axis=1, keepdims=True)
        normalized = (signal - mean) / (std + eps)
        normalized[:, ~mask.astype(bool)] = 0.0
        normalized[~present] = 0.0
        return normalized


@lru_cache(maxsize=32)
def _butterworth_sos(order: int, low: float | None, high: float | None, sampling_rate: int) -> np.ndarray | None:
    if low is None and high is None:
        return None
    if low is not None and high is not None:
        sos = sp_signal.butter(order, [low, high], btype="bandpass", fs=sampling_rate, output="sos")
    elif low is not None:
        sos = sp_signal.butter(order, low, btype="highpass", fs=sampling_rate, output="sos")
    else:
        sos = sp_signal.butter(order, high, btype="lowpass", fs=sampling_rate, output="sos")
    return sos


def _as_float_array(record: Any, name: str, keep_float32: bool = False) -> np.ndarray:
    """`record` as float64 (not copied when it already is: nothing downstream writes into it; nor when it is float32
    and `keep_float32`); text or anything else that is not numbers raises naming the record."""
    try:
        array = np.asarray(record)
        if array.dtype.kind in "US":  # numbers as text mean a parsing step went wrong upstream: say so
            raise TypeError(f"an array of text (dtype {array.dtype})")
        if array.dtype.kind == "c":  # numpy would drop the imaginary part with a warning: a silent wrong signal
            raise TypeError(f"complex values (dtype {array.dtype}); an ECG is real")
        if keep_float32 and array.dtype == np.float32:
            return array
        return array.astype(np.float64, copy=False)
    except (TypeError, ValueError) as error:
        raise EcgInputError(
            f"{name}: not an array of numbers ({error}); pass the signal as numbers (num_samples, num_leads) or the "
            "path of a WFDB record"
        ) from error


def _torch_can_copy(signal: np.ndarray, out: np.ndarray) -> bool:
    """Whether torch can read float64 `signal` and write `out` in place (`torch.from_numpy` of either; it takes no
    read-only, non-native or negatively strided array): then the copy runs on torch's intra-op threads, where
    numpy runs it on one core."""
    return (
        signal.dtype == np.float64
        and signal.dtype.isnative
        and signal.flags.writeable
        and min(signal.strides, default=0) >= 0  # a flipped view
        and out.flags.writeable
    )


def _write_centred(out: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """Write `signal` `(num_samples, num_leads)` into `out` `(num_leads, num_samples)` float32 (the batched DSP's
    input) less each lead's first sample, subtracted in float64, and return those offsets `(num_leads,)` float64.
    float32 keeps 24 bits of a value, not of the ECG riding on it: a lead 300 mV off zero (electrode offsets reach
    that, and a DC-coupled recording keeps them; `max_amplitude_mv` bounds |x - median|, not |x|) would be rounded to
    3e-5 mV, 5e-4 of a z-scored sample. Any value of the lead will do as its offset; the first costs no pass. A
    NaN or inf there makes the whole lead non-finite, which the batched screen sends to the record-by-record
    checks."""
    offset = np.array(signal[0], dtype=np.float64)
    if _torch_can_copy(signal, out):
        import torch  # the same float64 arithmetic as numpy's below

        torch.sub(torch.from_numpy(signal).T, torch.from_numpy(offset)[:, None], out=torch.from_numpy(out))
        return offset
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, as wanted
        np.subtract(signal.T, offset[:, None], out=out, dtype=np.float64, casting="same_kind")
    return offset


def _write_cast(out: np.ndarray, signal: np.ndarray) -> bool:
    """Write `signal` `(num_samples, num_leads)` into `out` `(num_leads, num_samples)` float32 as it is (1.5x faster
    than `_write_centred`: one pass, no float64 intermediate) and return whether that rounded (a float64 signal).
    `screen_records`'s `off_zero` says where the rounding exceeds `_write_centred`'s."""
    if _torch_can_copy(signal, out):
        import torch

        torch.from_numpy(out).copy_(torch.from_numpy(signal).T)
    else:
        out[...] = signal.T
    return signal.dtype != np.float32


@lru_cache(maxsize=256)
def _resampling_ratio(target_rate: int, sampling_rate: float) -> tuple[int, int]:
    """`(up, down)` with `up / down` the closest fraction to `target_rate / sampling_rate` (denominator up to 10,000),
    cached: a batch repeats one or two rates, and building the fraction costs 15 µs."""
    ratio = (Fraction(target_rate) / Fraction(sampling_rate)).limit_denominator(10_000)
    return ratio.numerator, ratio.denominator


@lru_cache(maxsize=256)
def _cached_lead_keys(lead_names: tuple) -> tuple[str, ...]:
    return tuple(str(lead).strip().lower() for lead in lead_names)


def _lead_keys(lead_names) -> tuple[str, ...]:
    """Lead names as the matching compares them (stripped, lower case), cached per list of names: a batch repeats
    the same dozen names for every record."""
    try:
        return _cached_lead_keys(tuple(lead_names))
    except TypeError:  # names that cannot be hashed: no cache
        return tuple(str(lead).strip().lower() for lead in lead_names)


def _unit_factors(units, num_leads: int | None = None) -> list:
    """Each lead's factor to mV (`UNIT_TO_MV`; an unknown unit stands for itself), to compare two spellings."""
    per_lead = [units] * (num_leads or 1) if isinstance(units, str) else list(units)
    return [UNIT_TO_MV.get(str(unit).strip().lower(), str(unit)) for unit in per_lead]


def _longest_run(flags: np.ndarray) -> tuple[int, int]:
    """`(start, length)` of the longest run of `True` in the 1-D bool array `flags` (the first, on a tie)."""
    edges = np.diff(flags.astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest] - starts[longest])


def _is_list_of_lists(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple))


def _can_derive_limb_leads(columns: dict[str, np.ndarray]) -> bool:
    """Whether two of I, II, III are there, from which Einthoven and Goldberger give the other four limb leads."""
    return sum(lead in columns for lead in ("i", "ii", "iii")) >= 2


def _derive_limb_leads(columns: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Einthoven (I + III = II) and Goldberger (augmented leads) from any two of I, II, III."""
    lead_i, lead_ii, lead_iii = columns.get("i"), columns.get("ii"), columns.get("iii")
    if lead_i is None and lead_ii is not None and lead_iii is not None:
        lead_i = lead_ii - lead_iii
    if lead_ii is None and lead_i is not None and lead_iii is not None:
        lead_ii = lead_i + lead_iii
    if lead_i is None or lead_ii is None:
        raise EcgInputError(f"{name}: cannot derive limb leads: two of I, II, III are needed")
    derived = {
        "i": lead_i,
        "ii": lead_ii,
        "iii": lead_ii - lead_i,
        "avr": -(lead_i + lead_ii) / 2,
        "avl": lead_i - lead_ii / 2,
        "avf": lead_ii - lead_i / 2,
    }
    return {**derived, **columns}


__all__ = [
    "EcgInputError",
    "MeritFeatureExtractor",
    "check_lead_amplitudes",
    "check_max_amplitude",
    "read_wfdb_header",
    "read_wfdb_record",
]
