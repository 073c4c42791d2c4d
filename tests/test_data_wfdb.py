"""Strict WFDB reading: real PTB-XL values, and each bad input with its message naming the file."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import wfdb

from merit_hf.data import EcgInputError, build_ptbxl, read_ecg_record
from tests.conftest import BUNDLED_PTBXL

RECORD_1_LR = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
RECORD_2_LR = BUNDLED_PTBXL / "records100" / "00000" / "00002_lr"
RECORD_1_HR = BUNDLED_PTBXL / "records500" / "00000" / "00001_hr"
PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def copy_record(source, folder, name=None):
    name = name or source.name
    for suffix in (".hea", ".dat"):
        text = source.with_suffix(suffix).read_bytes()
        if suffix == ".hea":
            text = text.replace(source.name.encode(), name.encode())
        (folder / f"{name}{suffix}").write_bytes(text)
    return folder / name


def write_record(folder, name, signal, leads, fs=100):
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal, fmt=["16"] * len(leads),
                adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads), write_dir=str(folder))  # fmt: skip
    return folder / name


def test_real_record_values_and_order():
    record = read_ecg_record(RECORD_1_LR, sampling_rate=100, num_samples=1000)
    assert record["signal"].dtype == np.float32 and record["signal"].shape == (1000, 12)
    assert record["lead_names"] == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert record["sampling_rate"] == 100
    # first samples = the header's initial values (-119 -55 64 86 -91 4 -69 -31 0 -26 -39 -79, gain 1000/mV)
    expected = np.array([-119, -55, 64, 86, -91, 4, -69, -31, 0, -26, -39, -79], dtype=np.float32) / 1000
    np.testing.assert_array_equal(record["signal"][0], expected)


def test_leads_are_reordered_by_name(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    mimic_order = [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]  # MIMIC-IV-ECG writes aVF before aVL
    leads = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
    path = write_record(tmp_path, "mimic_order", signal[:, mimic_order], leads)
    np.testing.assert_array_equal(read_ecg_record(path)["signal"], signal.astype(np.float32))


def test_corrupt_header(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    path.with_suffix(".hea").write_text("00001_lr 12 100\n")
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: corrupt or truncated WFDB header"):
        read_ecg_record(path)


def test_missing_signal_file(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    path.with_suffix(".dat").unlink()
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: signal file 00001_lr.dat is missing"):
        read_ecg_record(path)


def test_missing_header(tmp_path):
    with pytest.raises(EcgInputError, match=rf"{tmp_path}/nothing\.hea: WFDB header not found"):
        read_ecg_record(tmp_path / "nothing")


def test_nan_lead(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    signal[100:110, 9] = np.nan
    path = write_record(tmp_path, "nan_lead", signal, PTBXL_LEADS)
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead V4 has 10 NaN/inf samples"):
        read_ecg_record(path)


def test_wrong_lead_set(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    path = write_record(tmp_path, "v7", signal, PTBXL_LEADS[:11] + ["V7"])
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: unknown lead name 'V7'; expected leads \['I', .*'V6'\]"):
        read_ecg_record(path)
    path = write_record(tmp_path, "eleven", signal[:, :11], PTBXL_LEADS[:11])
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: 11 leads given, 12 expected; missing \['V6'\]"):
        read_ecg_record(path)


def test_duplicate_lead(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    path = write_record(tmp_path, "twice", signal, PTBXL_LEADS[:11] + ["avr"])
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead 'avr' appears twice"):
        read_ecg_record(path)


def test_wrong_rate_and_length(tmp_path):
    with pytest.raises(EcgInputError, match=rf"{RECORD_1_LR}\.hea: sampling rate 100 Hz, expected 500 Hz"):
        read_ecg_record(RECORD_1_LR, sampling_rate=500)
    with pytest.raises(EcgInputError, match=rf"{RECORD_1_LR}\.hea: 1000 samples, expected 5000"):
        read_ecg_record(RECORD_1_LR, num_samples=5000)


def test_truncated_signal_file(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    data = path.with_suffix(".dat")
    data.write_bytes(data.read_bytes()[:2400])
    with pytest.raises(EcgInputError, match=rf"{path}"):
        read_ecg_record(path)


def test_unknown_unit(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    header = path.with_suffix(".hea")
    header.write_text(header.read_text().replace("1000.0(0)/mV 16 0 -79", "1000.0(0)/furlong 16 0 -79"))
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead V6 has unknown unit 'furlong'; expected one of mV"):
        read_ecg_record(path)


def test_shared_copy_reads_the_same(shared_ptbxl_dir):
    shared = read_ecg_record(shared_ptbxl_dir / "records100" / "00000" / "00001_lr")
    np.testing.assert_array_equal(shared["signal"], read_ecg_record(RECORD_1_LR)["signal"])


def set_gain_one(path, lead=None):
    """Make the header say gain 1 /mV (for every lead, or one): the 1000-per-mV data now read as µV labelled mV."""
    header = path.with_suffix(".hea")
    lines = header.read_text().splitlines()
    lines = [line.replace("1000.0(0)/mV", "1.0(0)/mV") if lead in (None, line.split()[-1]) else line for line in lines]
    header.write_text("\n".join(lines) + "\n")


def cut_last_signal_line(path):
    """The header of an interrupted copy: the V6 line ends after `00001_lr.dat 16 1000` (no units, no lead name)."""
    header = path.with_suffix(".hea")
    text = header.read_text()
    header.write_text(text[: text.index(text.splitlines()[12]) + 20])


def test_microvolts_labelled_millivolts_are_refused(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    set_gain_one(path, lead="V2")
    # V2's 99th percentile of |x - median| is 1.217 mV; read at gain 1 it is 1217 "mV"
    with pytest.raises(
        EcgInputError,
        match=rf"{path}\.hea: leads \['V2'\] span up to 1217 mV after unit conversion, above the 30 mV an ECG can "
        r"span: the header's units or ADC gain are probably wrong \(µV stored as mV",
    ):
        read_ecg_record(path)
    set_gain_one(path)
    all_leads = r"\['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6'\]"
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: leads {all_leads} span up to 1217 mV"):
        read_ecg_record(path)
    # the thresholds are arguments: raised above the spread, and above every sample (the largest is 1.4 V from its
    # lead's median here, which the per-sample bound names otherwise), the record reads as 1000 x the true signal
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead I sample \d+ is .* beyond the 50 mV"):
        read_ecg_record(path, max_amplitude_mv=2000.0)
    wide = read_ecg_record(path, max_amplitude_mv=2000.0, max_sample_deviation_mv=2000.0)["signal"]
    np.testing.assert_allclose(wide, read_ecg_record(RECORD_1_LR)["signal"] * 1000, rtol=1e-6)


def test_longer_signal_file_disagrees_with_header(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    shutil.copyfile(RECORD_1_HR.with_suffix(".dat"), path.with_suffix(".dat"))  # the 500 Hz file of the same ECG
    with pytest.raises(
        EcgInputError,
        match=rf"{path}\.dat: header and data disagree: the signal file holds 120000 bytes, the header declares 1000 "
        r"samples x 12 signals in format 16 \(24000 bytes\)",
    ):
        read_ecg_record(path)


def test_checksums_name_the_leads_that_fail(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    data = path.with_suffix(".dat")
    digital = np.fromfile(data, dtype="<i2").reshape(1000, 12)
    digital[500, 9] += 1  # one sample of V4, file size unchanged
    digital.tofile(data)
    with pytest.raises(
        EcgInputError, match=rf"{path}\.dat: header and data disagree: the checksum of leads \['V4'\] does not match"
    ):
        read_ecg_record(path)
    shutil.copyfile(RECORD_2_LR.with_suffix(".dat"), data)  # another record's file of the same size
    leads = r"\['I', 'II', 'III', 'AVR', 'AVL', 'AVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6'\]"
    with pytest.raises(EcgInputError, match=rf"{path}\.dat: header and data disagree: the checksum of leads {leads}"):
        read_ecg_record(path)


def test_checksums_compare_modulo_65536(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    header = path.with_suffix(".hea")
    header.write_text(header.read_text().replace("-119 1508 0 I", f"-119 {1508 - 65536} 0 I"))  # the signed form
    np.testing.assert_array_equal(read_ecg_record(path)["signal"], read_ecg_record(RECORD_1_LR)["signal"])


def test_header_cut_mid_line(tmp_path):
    path = copy_record(RECORD_1_LR, tmp_path)
    cut_last_signal_line(path)
    assert path.with_suffix(".hea").read_text().endswith("00001_lr.dat 16 1000")
    with pytest.raises(
        EcgInputError, match=rf"{path}\.hea: corrupt or truncated WFDB header \(signal line 12 has no lead name\)"
    ):
        read_ecg_record(path)


def test_conversion_lists_bad_records_and_writes_the_rest(tmp_path):
    root = tmp_path / "ptbxl"
    records = root / "records100" / "00000"
    records.mkdir(parents=True)
    shutil.copy(BUNDLED_PTBXL / "scp_statements.csv", root)
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv")
    table[table.ecg_id.isin([1, 2, 3, 4])].to_csv(root / "ptbxl_database.csv", index=False)
    paths = {
        ecg_id: copy_record(BUNDLED_PTBXL / f"records100/00000/{ecg_id:05d}_lr", records) for ecg_id in (1, 2, 3, 4)
    }
    set_gain_one(paths[2])
    shutil.copyfile(RECORD_1_HR.with_suffix(".dat"), paths[3].with_suffix(".dat"))
    cut_last_signal_line(paths[4])
    dataset, report = build_ptbxl(root, 100, on_error="skip", return_report=True)
    assert (report.total, report.written, report.failed) == (4, 1, 3)
    assert [row for part in dataset.values() for row in part["ecg_id"]] == [1]
    reasons = {failure.record: failure.reason for failure in report.failures}
    assert reasons.keys() == {str(paths[ecg_id]) for ecg_id in (2, 3, 4)}
    assert reasons[str(paths[2])].startswith(f"{paths[2]}.hea: leads ") and "ADC gain" in reasons[str(paths[2])]
    assert reasons[str(paths[3])].startswith(f"{paths[3]}.dat: header and data disagree")
    assert (
        reasons[str(paths[4])] == f"{paths[4]}.hea: corrupt or truncated WFDB header (signal line 12 has no lead name)"
    )


def test_one_spike_is_not_a_unit_error(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    signal[500, 6] = 31.0  # a 31 mV artefact in V1 (int16 at 1000/mV holds 32.767): range above 30 mV, spread not
    path = write_record(tmp_path, "spike", signal, PTBXL_LEADS)
    v1 = read_ecg_record(path)["signal"][:, 6]
    assert v1[500] == 31.0 and np.ptp(v1) > 30.0


def test_the_reader_refuses_with_the_feature_extractors_own_message(tmp_path):
    """One implementation of the input contract: what `read_ecg_record` says about a record is what
    `MeritFeatureExtractor` says about it (the reader names the header file, the feature extractor the record)."""
    from merit_hf import MeritFeatureExtractor

    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    with_nan = signal.copy()
    with_nan[100:110, 9] = np.nan
    paths = [
        write_record(tmp_path, "nan_lead", with_nan, PTBXL_LEADS),
        write_record(tmp_path, "v7", signal, PTBXL_LEADS[:11] + ["V7"]),
        write_record(tmp_path, "eleven", signal[:, :11], PTBXL_LEADS[:11]),
        write_record(tmp_path, "twice", signal, PTBXL_LEADS[:11] + ["avr"]),
    ]
    gain_one = copy_record(RECORD_1_LR, tmp_path, "gain_one")
    set_gain_one(gain_one, lead="V2")
    for path in [*paths, gain_one]:
        with pytest.raises(EcgInputError) as reader:
            read_ecg_record(path)
        with pytest.raises(EcgInputError) as extractor:
            MeritFeatureExtractor()(str(path))
        assert str(extractor.value).startswith(f"{path}: ")
        assert str(reader.value) == f"{path}.hea: " + str(extractor.value)[len(f"{path}: ") :]


def write_multi_segment(folder, name, signal, leads, lengths, fs=500, gains=None):
    """A fixed-layout multi-segment record `name` (master header + segments `name_1`, `name_2`, ...) of `signal`,
    cut into parts of `lengths` samples, each segment written with its own ADC gain (`gains`, default 1000/mV)."""
    gains = gains or [1000.0] * len(lengths)
    names, start = [], 0
    for number, (length, gain) in enumerate(zip(lengths, gains), start=1):
        names.append(f"{name}_{number}")
        wfdb.wrsamp(names[-1], fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal[start : start + length],
                    fmt=["16"] * len(leads), adc_gain=[gain] * len(leads), baseline=[0] * len(leads),
                    write_dir=str(folder))  # fmt: skip
        start += length
    segments = [wfdb.rdheader(str(folder / segment)) for segment in names]
    wfdb.MultiRecord(segments=segments, layout="fixed", record_name=name, fs=fs, n_sig=len(leads), sig_len=start,
                     seg_name=names, seg_len=list(lengths)).wrheader(write_dir=str(folder))  # fmt: skip
    return folder / name


def test_a_multi_segment_record_is_read_as_one_record(tmp_path):
    """A real 500 Hz PTB-XL record cut into three segments, the second at another ADC gain: read as one record, equal
    to the original sample for sample, as wfdb's own multi-to-single reading gives it, by every reader."""
    from merit_hf import MeritFeatureExtractor
    from merit_hf.models.merit.feature_extraction_merit import read_wfdb_record

    original = wfdb.rdrecord(str(RECORD_1_HR))
    path = write_multi_segment(tmp_path, "ms", original.p_signal, original.sig_name, [2000, 1500, 1500],
                               gains=[1000.0, 2000.0, 1000.0])  # fmt: skip
    assert path.with_suffix(".hea").read_text().splitlines()[:2] == ["ms/3 12 500 5000", "ms_1 2000"]
    read = read_wfdb_record(path)
    np.testing.assert_array_equal(read["signal"], original.p_signal)
    np.testing.assert_array_equal(read["signal"], wfdb.rdrecord(str(path)).p_signal)
    assert (read["sampling_rate"], read["lead_names"]) == (500.0, PTBXL_LEADS)
    np.testing.assert_array_equal(
        read_ecg_record(path, sampling_rate=500, num_samples=5000)["signal"], read_ecg_record(RECORD_1_HR)["signal"]
    )
    extractor = MeritFeatureExtractor()
    np.testing.assert_array_equal(extractor(str(path))["ecg_values"], extractor(str(RECORD_1_HR))["ecg_values"])


def test_a_multi_segment_record_that_is_not_one_recording_is_refused(tmp_path):
    """Segments are checked as records of their own and against each other; a gap, a variable layout, a missing or
    mismatched segment raise naming the master header and the segment."""
    original = wfdb.rdrecord(str(RECORD_1_HR))
    path = write_multi_segment(tmp_path, "ms", original.p_signal, original.sig_name, [2500, 2500])
    master = path.with_suffix(".hea")
    where = f"{master}: multi-segment record of segments ['ms_1', 'ms_2']"
    second = tmp_path / "ms_2.hea"
    text = second.read_text()
    second.write_text(text.replace(" V6", " V7"))
    with pytest.raises(
        EcgInputError, match=re.escape(f"{where}: segment ms_2 does not match the record: lead names [")
    ):
        read_ecg_record(path)
    second.write_text(text.replace("ms_2 12 500 2500", "ms_2 12 250 2500"))
    with pytest.raises(EcgInputError, match=re.escape("sampling rate 250 Hz (the master: 500 Hz)")):
        read_ecg_record(path)
    second.write_text(text)
    shutil.copyfile(tmp_path / "ms_1.dat", tmp_path / "ms_2.dat")  # same size, another part's samples
    with pytest.raises(EcgInputError, match=re.escape(f"{where}: segment ms_2 cannot be read: {tmp_path / 'ms_2'}")):
        read_ecg_record(path)
    second.unlink()
    with pytest.raises(
        EcgInputError, match=re.escape(f"segment ms_2 cannot be read: {second}: WFDB header not found")
    ):
        read_ecg_record(path)
    master.write_text("ms/3 12 500 5000\nms_1 2500\n~ 100\nms_2 2400\n")
    with pytest.raises(EcgInputError, match=re.escape("segment(s) [2] are gaps ('~', no signal)")):
        read_ecg_record(path)
    master.write_text("ms/3 12 500 5000\nms_0 0\nms_1 2500\nms_2 2500\n")
    with pytest.raises(EcgInputError, match=re.escape("a variable layout (segment ms_0 of 0 samples")):
        read_ecg_record(path)
    master.write_text("ms/2 12 500 6000\nms_1 2500\nms_2 2500\n")
    with pytest.raises(EcgInputError, match=re.escape(f"{master}: record line declares 6000 samples, its 2 segments")):
        read_ecg_record(path)


def write_multi_frequency(folder, name):
    """A real 500 Hz PTB-XL record as a multi-frequency record of frame rate 250 Hz: leads I and II keep all their
    samples (2 per frame), the other leads every second one. Returns the path and the original signal."""
    original = wfdb.rdrecord(str(RECORD_1_HR))
    fast = {"I", "II"}
    expanded = [
        original.p_signal[:, column] if lead in fast else original.p_signal[::2, column]
        for column, lead in enumerate(original.sig_name)
    ]
    wfdb.wrsamp(name, fs=250, units=["mV"] * 12, sig_name=original.sig_name, e_p_signal=expanded,
                samps_per_frame=[2 if lead in fast else 1 for lead in original.sig_name], fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip
    return folder / name, original.p_signal


def test_a_multi_frequency_record_is_refused_by_every_reader(tmp_path):
    """wfdb's default reading (`smooth_frames=True`) averages each frame's samples: lead I would come back at 250 Hz
    with half its samples averaged away, without a word. Every reader refuses it, naming the header and the leads."""
    from merit_hf import MeritFeatureExtractor
    from merit_hf.models.merit.feature_extraction_merit import read_wfdb_header, read_wfdb_record

    path, original = write_multi_frequency(tmp_path, "multi_rate")
    smoothed = wfdb.rdrecord(str(path)).p_signal
    assert smoothed.shape == (2500, 12) and not np.allclose(smoothed[:, 0], original[::2, 0])  # the hazard
    exact = wfdb.rdrecord(str(path), smooth_frames=False).e_p_signal  # what the message recommends
    np.testing.assert_array_equal(exact[0], original[:, 0])
    message = re.escape(
        f"{path}.hea: a multi-frequency record: signal(s) I (2 samples per frame, 500 Hz), II (2 samples per frame, "
        "500 Hz) are sampled faster than the record's frame rate of 250 Hz."
    )
    for read in (read_wfdb_header, read_wfdb_record, read_ecg_record):
        with pytest.raises(EcgInputError, match=message + ".*smooth_frames=False"):
            read(path)
    with pytest.raises(EcgInputError, match=message):
        MeritFeatureExtractor()(str(path))
