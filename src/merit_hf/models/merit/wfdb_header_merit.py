"""A WFDB header's fields as written, read before `wfdb` substitutes its defaults.

`wfdb.rdheader` matches each line with permissive regular expressions and fills in what it cannot read, without a
warning: an ADC gain of 0 or none (the WFDB specification's "uncalibrated") becomes 200, so amplitudes come out 5x
too large for PTB-XL's 1000/mV; a missing sampling frequency becomes 250 Hz, and so does a negative one (`-500` is read
as the counter frequency); non-ASCII characters are dropped from names, so the record `écg_ü` looks for `cg_.dat`,
the lead `Ï` has no name, and the unit `µV` becomes `V` (10^6 x). `parse_wfdb_header` reads the text by the header(5)
grammar (https://physionet.org/physiotools/wag/header-5.htm) and raises `WfdbHeaderError` for anything it cannot
read exactly; `feature_extraction_merit.read_wfdb_record` adds the file name and checks that wfdb read the same.

Hub remote code, imported by `feature_extraction_merit`: the standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ASCII only: wfdb drops other characters from record, file and unit names, so they cannot be read back faithfully.
_RECORD_NAME = re.compile(r"[A-Za-z0-9_-]+")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_]+)?")
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FREQUENCY = re.compile(rf"(?P<fs>{_NUMBER})(?:/(?P<counter>{_NUMBER})(?:\((?P<base>-?{_NUMBER})\))?)?")
_FORMAT = re.compile(r"(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<offset>\d+))?")
_GAIN = re.compile(
    rf"(?P<gain>[-+]?{_NUMBER}|[-+]?(?:nan|inf))(?:\((?P<baseline>-?\d+)\))?(?:/(?P<units>[^\s]*))?", re.I
)
_INTEGER = re.compile(r"-?\d+")
# Storage formats of the WFDB signal specification (signal(5)).
WFDB_FORMATS = ("8", "16", "24", "32", "61", "80", "160", "212", "310", "311", "508", "516", "524")
# The optional integer fields after the gain, in order, with their names in the header(5) specification.
_INTEGER_FIELDS = ("ADC resolution", "ADC zero", "initial value", "checksum", "block size")


class WfdbHeaderError(ValueError):
    """A header that does not follow the WFDB grammar, or says something wfdb would silently replace."""


@dataclass(frozen=True)
class WfdbSignalLine:
    """One signal line, as written (units `"mV"` when absent, as the specification says)."""

    file_name: str
    fmt: str
    samples_per_frame: int
    skew: int
    byte_offset: int
    adc_gain: float
    baseline: int
    units: str
    adc_zero: int
    checksum: int | None
    lead_name: str


@dataclass(frozen=True)
class WfdbHeader:
    """The fields of a single-segment WFDB header that a reader uses; `num_samples` is `None` when not given."""

    record_name: str
    sampling_rate: float
    num_samples: int | None
    signals: tuple[WfdbSignalLine, ...]

    @property
    def lead_names(self) -> list[str]:
        return [signal.lead_name for signal in self.signals]


@dataclass(frozen=True)
class WfdbMultiSegmentHeader:
    """The master header of a multi-segment record: its record line and its segments `(name, num_samples)` in order
    (`"~"` names a gap, a null segment; a first segment of 0 samples is the layout header of a variable layout)."""

    record_name: str
    num_signals: int
    sampling_rate: float
    num_samples: int | None
    segments: tuple[tuple[str, int], ...]


def parse_multi_segment_header(text: str) -> WfdbMultiSegmentHeader | None:
    """The master header of a multi-segment record (record line `name/segments signals Hz [samples]`, then one line
    `segment samples` per segment), or `None` when `text` is a single-segment header (or has no record line, which
    `parse_wfdb_header` refuses). Raises `WfdbHeaderError` for a master header outside the grammar."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines or "/" not in lines[0].split()[0]:
        return None
    fields = lines[0].split()
    name, _, count = fields[0].partition("/")
    if not count.isdigit() or int(count) == 0:
        raise WfdbHeaderError(f"record line: number of segments {count!r} of multi-segment record {name!r} is not a "
                              "positive whole number")  # fmt: skip
    record_name, num_signals, sampling_rate, num_samples = _parse_record_line(" ".join([name, *fields[1:]]))
    if len(lines) - 1 != int(count):
        raise WfdbHeaderError(
            f"corrupt or truncated WFDB header (record line declares {count} segments, {len(lines) - 1} segment lines "
            "found)"
        )
    segments = []
    for number, line in enumerate(lines[1:], start=1):
        parts = line.split()
        if len(parts) != 2 or not (parts[0] == "~" or _RECORD_NAME.fullmatch(parts[0])) or not parts[1].isdigit():
            raise WfdbHeaderError(
                f"segment line {number}: {line!r} is not 'segment_name number_of_samples' (a plain ASCII record name "
                "or '~')"
            )
        segments.append((parts[0], int(parts[1])))
    total = sum(length for _, length in segments)
    if num_samples is not None and total != num_samples:
        raise WfdbHeaderError(
            f"record line declares {num_samples} samples, its {len(segments)} segments hold {total} together"
        )
    return WfdbMultiSegmentHeader(record_name, num_signals, sampling_rate, num_samples, tuple(segments))


def parse_wfdb_header(text: str) -> WfdbHeader:
    """The header's record line and signal lines (comment lines skipped). Raises `WfdbHeaderError` naming the line,
    the field and its value for anything outside the grammar, for an uncalibrated lead (gain 0 or none), a missing,
    zero or negative sampling frequency, and a signal line without a lead name."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise WfdbHeaderError("corrupt or truncated WFDB header (no record line)")
    record_name, num_signals, sampling_rate, num_samples = _parse_record_line(lines[0])
    if len(lines) - 1 != num_signals:
        raise WfdbHeaderError(
            f"corrupt or truncated WFDB header (record line declares {num_signals} signals, {len(lines) - 1} signal "
            "lines found)"
        )
    signals = tuple(_parse_signal_line(line, number) for number, line in enumerate(lines[1:], start=1))
    return WfdbHeader(record_name, sampling_rate, num_samples, signals)


def _parse_record_line(line: str) -> tuple[str, int, float, int | None]:
    fields = line.split()
    name = fields[0]
    if "/" in name:
        raise WfdbHeaderError(
            f"record line: {name!r} is the master header of a multi-segment record (segments, no signals of its own); "
            "read_wfdb_record reads the record, segment by segment"
        )
    if not _RECORD_NAME.fullmatch(name):
        raise WfdbHeaderError(
            f"record line: record name {name!r} holds characters other than ASCII letters, digits, '_' and '-', "
            "which wfdb cannot read (it drops them); rename the record's files and the names inside its header"
        )
    if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) == 0:
        given = repr(fields[1]) if len(fields) > 1 else "nothing"
        raise WfdbHeaderError(f"corrupt or truncated WFDB header (record line: number of signals is {given})")
    if len(fields) < 3:
        raise WfdbHeaderError(
            "record line gives no sampling frequency (wfdb would assume 250 Hz); write it after the number of "
            f"signals: '{name} {fields[1]} <Hz> <samples>'"
        )
    frequency = _FREQUENCY.fullmatch(fields[2])
    if frequency is None or not 0 < float(frequency["fs"]) < math.inf:
        raise WfdbHeaderError(
            f"record line: sampling frequency {fields[2]!r} is not a positive number of Hz (wfdb would read 250 Hz)"
        )
    num_samples = None
    if len(fields) > 3:
        if not fields[3].isdigit():
            raise WfdbHeaderError(f"record line: number of samples {fields[3]!r} is not a whole number")
        num_samples = int(fields[3])
        if num_samples == 0:
            raise WfdbHeaderError("record line: the record declares 0 samples")
    return name, int(fields[1]), float(frequency["fs"]), num_samples


def _parse_signal_line(line: str, number: int) -> WfdbSignalLine:
    fields = line.split(maxsplit=8)
    where = f"signal line {number}"
    if len(fields) == 9 and fields[8].strip():
        where += f" (lead {fields[8].strip()})"
    file_name = fields[0]
    if not _FILE_NAME.fullmatch(file_name):
        raise WfdbHeaderError(
            f"{where}: signal file name {file_name!r} is not a plain ASCII file name (letters, digits, '_', '-' and "
            "one '.'), which wfdb cannot open; rename the file and the name in its header"
        )
    if len(fields) < 2:
        raise WfdbHeaderError(f"corrupt or truncated WFDB header ({where} has no storage format)")
    storage = _FORMAT.fullmatch(fields[1])
    if storage is None or storage["fmt"] not in WFDB_FORMATS:
        raise WfdbHeaderError(f"{where}: storage format {fields[1]!r} is not a WFDB format {list(WFDB_FORMATS)}")
    if len(fields) < 3:
        raise WfdbHeaderError(
            f"{where}: no ADC gain: the lead is uncalibrated (wfdb would assume 200 units per mV); write the gain, "
            "e.g. '1000(0)/mV'"
        )
    calibration = _GAIN.fullmatch(fields[2])
    if calibration is None:
        raise WfdbHeaderError(f"{where}: ADC gain field {fields[2]!r} is not 'gain(baseline)/units'")
    gain = float(calibration["gain"])
    if gain == 0:
        raise WfdbHeaderError(
            f"{where}: ADC gain 0 means uncalibrated in WFDB (wfdb would silently use 200 units per mV, so amplitudes "
            "would be wrong); write the recording's real gain, e.g. '1000(0)/mV'"
        )
    if not 0 < gain < math.inf:
        raise WfdbHeaderError(
            f"{where}: ADC gain {calibration['gain']} is not a positive number (a negative gain turns the lead "
            "upside down; often a field is missing and the next one was read as the gain)"
        )
    units = calibration["units"]
    integers = []
    for field_name, value in zip(_INTEGER_FIELDS, fields[3:8]):
        if not _INTEGER.fullmatch(value):
            raise WfdbHeaderError(f"{where}: {field_name} {value!r} is not a whole number")
        integers.append(int(value))
    if len(fields) < 9 or not fields[8].strip():
        raise WfdbHeaderError(f"corrupt or truncated WFDB header (signal line {number} has no lead name)")
    adc_zero = integers[1] if len(integers) > 1 else 0
    baseline = calibration["baseline"]
    return WfdbSignalLine(
        file_name=file_name,
        fmt=storage["fmt"],
        samples_per_frame=int(storage["spf"] or 1),
        skew=int(storage["skew"] or 0),
        byte_offset=int(storage["offset"] or 0),
        adc_gain=gain,
        baseline=adc_zero if baseline is None else int(baseline),  # the specification: baseline defaults to ADC zero
        units=units or "mV",  # the specification's default; the amplitude bounds catch a wrong unit
        adc_zero=adc_zero,
        checksum=integers[3] if len(integers) > 3 else None,
        lead_name=fields[8].strip(),
    )


def wfdb_read_differences(header: WfdbHeader, meta) -> list[str]:
    """The fields where `wfdb.rdheader`'s result `meta` differs from `header` (read from the same text): one
    `"field (signal line n): wfdb reads X, the header says Y"` each. Empty for every header `parse_wfdb_header`
    accepts, unless wfdb changes how it reads; checked so that no value wfdb substituted is ever used. Units and lead
    names are not compared: wfdb drops their non-ASCII characters, and the reader uses the header's own."""
    differences = []

    def compare(field: str, read, written) -> None:
        if read != written:
            differences.append(f"{field}: wfdb reads {read!r}, the header says {written!r}")

    compare("number of signals", meta.n_sig, len(header.signals))
    compare("sampling frequency", float(meta.fs or 0), header.sampling_rate)
    compare("number of samples", meta.sig_len, header.num_samples)
    for index, signal in enumerate(header.signals):
        line = f" (signal line {index + 1})"
        column = {name: (getattr(meta, name, None) or [None] * len(header.signals))[index] for name in _META_FIELDS}
        compare("signal file" + line, column["file_name"], signal.file_name)
        compare("storage format" + line, str(column["fmt"]), signal.fmt)
        compare("samples per frame" + line, column["samps_per_frame"] or 1, signal.samples_per_frame)
        compare("skew" + line, column["skew"] or 0, signal.skew)
        compare("byte offset" + line, column["byte_offset"] or 0, signal.byte_offset)
        compare("ADC gain" + line, column["adc_gain"], signal.adc_gain)
        compare("baseline" + line, column["baseline"], signal.baseline)
    return differences


_META_FIELDS = ("file_name", "fmt", "samps_per_frame", "skew", "byte_offset", "adc_gain", "baseline")

__all__ = [
    "WfdbHeader",
    "WfdbHeaderError",
    "WfdbMultiSegmentHeader",
    "WfdbSignalLine",
    "parse_multi_segment_header",
    "parse_wfdb_header",
    "wfdb_read_differences",
]
