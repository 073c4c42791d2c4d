"""Strict WFDB reading: real PTB-XL values, and each bad input with its message naming the file."""

import numpy as np
import pytest
import wfdb

from merit_hf.data import EcgInputError, read_ecg_record
from tests.conftest import BUNDLED_PTBXL

RECORD_1_LR = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
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
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: NaN/inf values in lead V4 \(10 samples\)"):
        read_ecg_record(path)


def test_wrong_lead_set(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    path = write_record(tmp_path, "v7", signal, PTBXL_LEADS[:11] + ["V7"])
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: wrong lead set .* missing \['V6'\], unexpected \['V7'\]"):
        read_ecg_record(path)
    path = write_record(tmp_path, "eleven", signal[:, :11], PTBXL_LEADS[:11])
    with pytest.raises(EcgInputError, match=r"missing \['V6'\], unexpected \[\]"):
        read_ecg_record(path)


def test_duplicate_lead(tmp_path):
    signal = wfdb.rdsamp(str(RECORD_1_LR))[0]
    path = write_record(tmp_path, "twice", signal, PTBXL_LEADS[:11] + ["avr"])
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead avr appears twice"):
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
    with pytest.raises(EcgInputError, match=rf"{path}\.hea: lead V6 has unknown unit 'furlong'"):
        read_ecg_record(path)


def test_shared_copy_reads_the_same(shared_ptbxl_dir):
    shared = read_ecg_record(shared_ptbxl_dir / "records100" / "00000" / "00001_lr")
    np.testing.assert_array_equal(shared["signal"], read_ecg_record(RECORD_1_LR)["signal"])
