"""Fuzzing the WFDB reader: a few hundred seeded mutations of a real PTB-XL header (numbers, units, names, counts, file
names, formats, checksums, layout). Every outcome must be either the signal the mutated header describes, computed
here from the record's own samples, or an `EcgInputError`: never another exception, never a silently different array.

Each mutation says what a correct reader does with it: `"ok"` (the header is valid: the result is checked value by
value), `"error"` (it must be refused) or `"either"` (valid WFDB that wfdb may not read the same way: refusing is
allowed, a result is still checked). A case applies one to three mutations; it is an error if any of them is.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from merit_hf.data import read_ecg_record
from merit_hf.models.merit.feature_extraction_merit import EcgInputError, read_wfdb_record
from tests.conftest import SHARED_DATA

SOURCE = SHARED_DATA / "ptbxl_subset500" / "records100" / "00000" / "00317_lr"
NUM_CASES = 300
SEED = 20261204


@dataclass
class Line:
    file_name: str
    fmt: str
    gain: str  # the whole `gain(baseline)/units` field
    numbers: list[str]  # ADC resolution, ADC zero, initial value, checksum, block size
    lead: str
    gain_value: float = 1000.0
    baseline: int = 0
    units: str = "mV"
    digital: str = "int16"  # how the data file's bytes are read under this line's format

    def text(self) -> str:
        return " ".join([self.file_name, self.fmt, self.gain, *self.numbers, self.lead]).rstrip()


@dataclass
class Header:
    name: str
    num_signals: str
    rate: str
    length: str
    lines: list[Line]
    extra: list[str] = field(default_factory=list)  # comment lines, appended
    separator: str = " "
    newline: str = "\n"
    expected_rate: float = 100.0
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        fields = (self.name, self.num_signals, self.rate, self.length) if self.rate else (self.name, self.num_signals)
        record = self.separator.join(part for part in fields if part)
        return self.newline.join([record, *(line.text() for line in self.lines), *self.extra]) + self.newline

    def verdict(self, verdict: str, note: str) -> None:
        self.verdicts.append(verdict)
        self.notes.append(note)


def base_header() -> Header:
    lines = SOURCE.with_suffix(".hea").read_text().splitlines()
    name, num_signals, rate, length = lines[0].split()
    parsed = []
    for line in lines[1:]:
        file_name, fmt, gain, *numbers, lead = line.split()
        parsed.append(Line("rec.dat", fmt, gain, numbers, lead))
    assert name == SOURCE.name and gain == "1000.0(0)/mV"
    return Header("rec", num_signals, rate, length, parsed)


# ----------------------------------------------------------------------------------------------------------------------
# Mutations: each edits the header and records what a correct reader must do
# ----------------------------------------------------------------------------------------------------------------------

RATES = {"250": "ok", "500.0": "ok", "1000": "ok", "0": "error", "-500": "error", "": "error", "abc": "error",
         "5OO": "error", "100/1000": "either", "1e2": "either", "0.0": "error", "nan": "error"}  # fmt: skip
GAINS = {"500": 500.0, "2000.0": 2000.0, "2e3": 2000.0, "1000(7)": 1000.0, "1000(-25)/uV": 1000.0, "1000/V": 1000.0,
         "1000(0)/µV": 1000.0, "1000(0)": 1000.0, "0": None, "0(0)/mV": None, "-1000(0)/mV": None, "abc": None,
         "nan(0)/mV": None, "inf": None, "1E3(0)/mV": "either", "1000(0)/mV(": 1000.0}  # fmt: skip
LEADS = {"Ï": "ok", "V 1": "ok", "aVR": "ok", "lead II": "ok", "": "error"}
FORMATS = {"16": "ok", "16x1": "ok", "16+0": "ok", "16:0": "ok", "160": "either", "61": "error", "212": "error",
           "8": "error", "24": "error", "16+24": "error", "17": "error", "x16": "error", "": "error"}  # fmt: skip
FILE_NAMES = {"copy.dat": "ok", "missing.dat": "error", "ü.dat": "error", "../rec.dat": "error",
              "rec (1).dat": "error", "rec.dat.dat": "error"}  # fmt: skip
NAMES = {"rec-1": "ok", "REC_2": "ok", "écg": "error", "rec/2": "error", "": "error"}
LENGTHS = {"": "ok", "999": "error", "1001": "error", "0": "error", "abc": "error", "-1000": "error"}
COUNTS = {"11": "error", "13": "error", "0": "error", "x": "error", "": "error"}


def mutate_rate(header: Header, rng: random.Random) -> None:
    text = rng.choice(sorted(RATES))
    header.rate = text
    if RATES[text] != "error":
        header.expected_rate = float(text.split("/")[0])
    # an empty rate leaves the length out too (`Header.text`): otherwise the length would be read as the rate
    header.verdict(RATES[text], f"rate {text!r}")


def mutate_gain(header: Header, rng: random.Random) -> None:
    line = rng.choice(header.lines)
    text = rng.choice(sorted(GAINS))
    line.gain = text
    value = GAINS[text]
    if value is None:
        header.verdict("error", f"gain {text!r}")
        return
    if value == "either":
        line.gain_value = 1000.0
        header.verdict("either", f"gain {text!r}")
    else:
        line.gain_value = value
        header.verdict("ok", f"gain {text!r}")
    line.baseline = int(text.split("(")[1].split(")")[0]) if "(" in text else 0
    line.units = text.split("/", 1)[1] if "/" in text else "mV"


def mutate_drop_gain(header: Header, rng: random.Random) -> None:
    """No gain and nothing after it (uncalibrated, and no lead name), or the gain cut out of a full line (the next
    field is then read as the gain)."""
    line = rng.choice(header.lines)
    if rng.random() < 0.5:
        line.gain, line.numbers, line.lead = "", [], ""
    else:
        line.gain = ""
    header.verdict("error", "gain removed")


def mutate_lead(header: Header, rng: random.Random) -> None:
    line = rng.choice(header.lines)
    text = rng.choice(sorted(LEADS))
    line.lead = text
    header.verdict(LEADS[text], f"lead name {text!r}")


def mutate_format(header: Header, rng: random.Random) -> None:
    text = rng.choice(sorted(FORMATS))
    for line in header.lines:  # one storage format per file
        line.fmt = text
        line.digital = "offset_binary" if text == "160" else "int16"
    header.verdict(FORMATS[text], f"format {text!r}")


def mutate_file_name(header: Header, rng: random.Random) -> None:
    text = rng.choice(sorted(FILE_NAMES))
    lines = header.lines if text == "copy.dat" else [rng.choice(header.lines)]  # a copy only works for all lines
    for line in lines:
        line.file_name = text
    header.verdict(FILE_NAMES[text], f"file name {text!r}")


def mutate_record_name(header: Header, rng: random.Random) -> None:
    text = rng.choice(sorted(NAMES))
    header.name = text
    header.verdict(NAMES[text], f"record name {text!r}")


def mutate_length(header: Header, rng: random.Random) -> None:
    text = rng.choice(sorted(LENGTHS))
    header.length = text
    header.verdict(LENGTHS[text], f"length {text!r}")


def mutate_count(header: Header, rng: random.Random) -> None:
    choice = rng.choice(["declared", "drop_line", "repeat_line"])
    if choice == "declared":
        text = rng.choice(sorted(COUNTS))
        header.num_signals = text
        header.verdict("error", f"number of signals {text!r}")
    elif choice == "drop_line":
        header.lines.pop(rng.randrange(len(header.lines)))
        header.verdict("error", "a signal line removed")
    else:
        header.lines.insert(0, header.lines[rng.randrange(len(header.lines))])
        header.verdict("error", "a signal line repeated")


def mutate_checksum(header: Header, rng: random.Random) -> None:
    line = rng.choice(header.lines)
    checksum = int(line.numbers[3])
    if rng.random() < 0.5:
        line.numbers[3] = str(checksum + rng.choice([1, -1, 7, 32768]))
        header.verdict("error", "checksum changed")
    else:
        line.numbers[3] = str(checksum + rng.choice([65536, -65536]))
        header.verdict("ok", "checksum plus or minus 65536")


def mutate_number_field(header: Header, rng: random.Random) -> None:
    line = rng.choice(header.lines)
    position = rng.randrange(5)
    text = rng.choice(["x", "1.5", ""])
    line.numbers[position] = text
    if text == "":  # a field left out shifts the later ones into its place
        header.verdict("error", f"number field {position} removed")
    else:
        header.verdict("error", f"number field {position} = {text!r}")


def mutate_layout(header: Header, rng: random.Random) -> None:
    choice = rng.choice(["comment", "tabs", "blank", "crlf"])
    if choice == "comment":
        header.extra.append("# age: 56  sex: M  " + rng.choice(["", "Ï µV hf_x"]))
    elif choice == "tabs":
        header.separator = "\t"
    elif choice == "blank":
        header.extra.append("")
    else:
        header.newline = "\r\n"
    header.verdict("ok", f"layout {choice}")


MUTATIONS = [
    mutate_rate, mutate_gain, mutate_drop_gain, mutate_lead, mutate_format, mutate_file_name, mutate_record_name,
    mutate_length, mutate_count, mutate_checksum, mutate_number_field, mutate_layout,
]  # fmt: skip


def expected_signal(header: Header, digital: np.ndarray) -> np.ndarray:
    columns = []
    for index, line in enumerate(header.lines):
        samples = digital[:, index].astype(np.float64)
        if line.digital == "offset_binary":  # format 160 reads the same bytes as unsigned, minus 32768
            samples = (samples % 65536) - 32768
        column = (samples - line.baseline) / line.gain_value
        column[samples == -32768] = np.nan  # both formats' invalid-sample value
        columns.append(column)
    return np.stack(columns, axis=1)


@pytest.mark.slow
def test_fuzzed_headers_give_the_described_signal_or_an_ecg_input_error(tmp_path):
    if not SOURCE.with_suffix(".hea").is_file():
        pytest.skip(f"{SOURCE} not present (the shared data folder sits beside the checkout)")
    digital = np.fromfile(SOURCE.with_suffix(".dat"), dtype="<i2").reshape(-1, 12)
    rng = random.Random(SEED)
    outcomes = {"read": 0, "refused": 0}
    started = time.perf_counter()
    for case in range(NUM_CASES):
        folder = tmp_path / f"case{case:03d}"
        folder.mkdir()
        for name in ("rec.dat", "copy.dat"):
            shutil.copyfile(SOURCE.with_suffix(".dat"), folder / name)
        header = base_header()
        for mutation in rng.sample(MUTATIONS, rng.randint(1, 3)):
            mutation(header, rng)
        (folder / "rec.hea").write_bytes(header.text().encode("utf-8"))
        context = f"case {case}: {header.notes}\n{header.text()}"
        try:
            read = read_wfdb_record(folder / "rec")
        except EcgInputError as error:
            assert "error" in header.verdicts or "either" in header.verdicts, f"{context}refused: {error}"
            assert str(folder) in str(error), f"{context}the message does not name the file: {error}"
            outcomes["refused"] += 1
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{context}raised {type(error).__name__}: {error}")
        else:
            assert "error" not in header.verdicts, f"{context}was read without an error"
            np.testing.assert_array_equal(read["signal"], expected_signal(header, digital), err_msg=context)
            assert read["sampling_rate"] == header.expected_rate, context
            assert read["lead_names"] == [line.lead for line in header.lines], context
            assert read["units"] == [line.units for line in header.lines], context
            outcomes["read"] += 1
        try:  # the dataset reader on top: its own checks, and still nothing but EcgInputError
            read_ecg_record(folder / "rec")
        except EcgInputError:
            pass
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"{context}read_ecg_record raised {type(error).__name__}: {error}")
    assert outcomes["read"] > 30 and outcomes["refused"] > 100, outcomes  # both paths were exercised
    assert time.perf_counter() - started < 30, "the fuzz test must stay within seconds"


def test_the_unmutated_header_reads_as_the_record():
    if not SOURCE.with_suffix(".hea").is_file():
        pytest.skip(f"{SOURCE} not present")
    header = base_header()
    header.name = SOURCE.name
    for line in header.lines:
        line.file_name = SOURCE.name + ".dat"
    assert header.text() == SOURCE.with_suffix(".hea").read_text()
