"""MIMIC-IV-ECG conversion on records written here in the exact PhysioNet layout (real PTB-XL 500 Hz signals),
with the real `machine_measurements.csv` header and blank-field row."""

import json
import re
import runpy
import shutil

import numpy as np
import pytest
import wfdb
from datasets import load_dataset

import merit_hf.data.conversion as conversion
from merit_hf.data import build_mimic_iv_ecg, convert_mimic_iv_ecg, load_mimic_iv_ecg
from merit_hf.hub import check_dataset_folder
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT
from tests.test_data_reports import MIMIC_MEASUREMENTS_HEADER, MIMIC_MEASUREMENTS_ROW

MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
TO_MIMIC_ORDER = [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]  # PTB-XL order -> MIMIC order (aVF before aVL)
# (subject_id, study_id): the first is the real study of the metadata row; the others follow its id pattern
STUDIES = [(10000032, 40689238), (10000032, 41000001), (10001725, 42000002), (10001725, 43000003),
           (10002428, 44000004), (10002428, 45000005)]  # fmt: skip


def ptbxl_500hz(ecg_id):
    return wfdb.rdsamp(str(BUNDLED_PTBXL / f"records500/00000/{ecg_id:05d}_hr"))[0]


def write_mimic_record(root, subject_id, study_id, signal):
    path = f"files/p{str(subject_id)[:4]}/p{subject_id}/s{study_id}/{study_id}"
    folder = root / path.rsplit("/", 1)[0]
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(str(study_id), fs=500, units=["mV"] * 12, sig_name=MIMIC_LEADS, p_signal=signal[:, TO_MIMIC_ORDER],
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(folder))  # fmt: skip
    return path


@pytest.fixture
def mimic_root(tmp_path):
    return write_mimic_root(tmp_path / "mimic-iv-ecg")


def write_mimic_root(root):
    """Six studies in MIMIC-IV-ECG's PhysioNet layout under `root`, with `record_list.csv` and
    `machine_measurements.csv` (study 6 without a row)."""
    records, measurements = (
        ["subject_id,study_id,file_name,ecg_time,path"],
        [MIMIC_MEASUREMENTS_HEADER, MIMIC_MEASUREMENTS_ROW],
    )
    for ecg_id, (subject_id, study_id) in enumerate(STUDIES, start=1):
        path = write_mimic_record(root, subject_id, study_id, ptbxl_500hz(ecg_id))
        records.append(f"{subject_id},{study_id},{study_id},2180-07-23 08:44:00,{path}")
        if ecg_id not in (1, 6):  # study 6 has no machine_measurements row
            blanks = "," * 15
            measurements.append(
                f"{subject_id},{study_id},6848296,2180-07-23 08:44:00,Sinus rhythm,,Normal ECG{blanks},"
                "0.005-150 Hz,60 Hz notch Baseline filter,659,40,128,170,258,518,81,77,79"
            )
    (root / "record_list.csv").write_text("\n".join(records) + "\n")
    (root / "machine_measurements.csv").write_text("\n".join(measurements) + "\n")
    return root


def test_build_reads_the_layout(mimic_root):
    dataset = build_mimic_iv_ecg(mimic_root)
    assert dataset.num_rows == 6 and dataset.features["signal"].shape == (5000, 12)
    first = dataset.with_format("numpy")[0]
    assert (first["ecg_id"], first["patient_id"], first["cart_id"]) == (40689238, 10000032, 6848296)
    assert first["report"] == "Sinus rhythm. Possible right atrial abnormality. Borderline ECG"
    assert first["report_language"] == "en" and first["bandwidth"] == "0.005-150 Hz"
    assert (first["rr_interval"], first["qrs_axis"]) == (659.0, 77.0)
    assert first["path"] == "files/p1000/p10000032/s40689238/40689238"
    assert list(first["lead_names"]) == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    np.testing.assert_array_equal(first["signal"], ptbxl_500hz(1).astype(np.float32))  # back in standard order
    assert dataset[1]["report"] == "Sinus rhythm. Normal ECG"
    last = dataset[5]
    assert (last["report"], last["report_language"], last["cart_id"], last["rr_interval"]) == ("", "", None, None)


def test_statements_that_pandas_would_read_as_missing_stay_in_the_report(mimic_root):
    """Only an empty cell is a missing statement: "NA", "None", "null", "N/A" are text in the report columns (pandas'
    default would drop them from the report without a word); the number columns keep pandas' missing spellings."""
    measurements = mimic_root / "machine_measurements.csv"
    lines = measurements.read_text().splitlines()
    fields = lines[2].split(",")  # the second study's row: Sinus rhythm,,Normal ECG,...
    fields[4:10] = ["NA", "Sinus rhythm", "None", "null", "N/A", "Normal ECG"]
    fields[-9] = "NA"  # rr_interval
    lines[2] = ",".join(fields)
    measurements.write_text("\n".join(lines) + "\n")
    row = build_mimic_iv_ecg(mimic_root)[1]
    assert row["report"] == "NA. Sinus rhythm. None. null. N/A. Normal ECG"
    assert row["rr_interval"] is None and row["qrs_axis"] == 77.0


def test_unreadable_record_is_reported(mimic_root, tmp_path):
    signal = ptbxl_500hz(7)
    signal[:50, 4] = np.nan  # PTB-XL column 4 is aVL
    path = write_mimic_record(mimic_root, 10003046, 46000006, signal)
    with (mimic_root / "record_list.csv").open("a") as handle:
        handle.write(f"10003046,46000006,46000006,2180-07-23 08:44:00,{path}\n")
    with pytest.raises(ValueError, match=r"46000006\.hea: lead aVL has 50 NaN/inf samples"):
        build_mimic_iv_ecg(mimic_root)
    report = convert_mimic_iv_ecg(mimic_root, tmp_path / "out", records_per_shard=4)
    assert (report.total, report.written, report.failed) == (7, 6, 1)
    saved = json.loads((tmp_path / "out" / "data" / "conversion_report.json").read_text())
    assert saved["failed"] == 1 and saved["failures"][0]["record"] == path  # as PhysioNet names it
    assert "lead aVL has 50 NaN/inf samples" in saved["failures"][0]["reason"]
    assert load_mimic_iv_ecg(tmp_path / "out", streaming=False).num_rows == 6


def measurements_line(root, study_id):
    return next(
        line for line in (root / "machine_measurements.csv").read_text().splitlines() if f",{study_id}," in line
    )


def test_a_repeated_measurements_row_is_collapsed_and_a_conflicting_one_refused(mimic_root):
    line = measurements_line(mimic_root, 41000001)
    with (mimic_root / "machine_measurements.csv").open("a") as handle:
        handle.write(line + "\n")
    assert build_mimic_iv_ecg(mimic_root)[1]["report"] == "Sinus rhythm. Normal ECG"
    with (mimic_root / "machine_measurements.csv").open("a") as handle:
        handle.write(line.replace("Normal ECG", "Abnormal ECG") + "\n")
    with pytest.raises(ValueError, match=r"machine_measurements\.csv: study_id\(s\) \[41000001\] listed twice with "):
        build_mimic_iv_ecg(mimic_root)
    assert build_mimic_iv_ecg(mimic_root, study_ids=[42000002])["ecg_id"] == [42000002]


def test_requested_study_ids_missing_from_the_record_list_raise(mimic_root, tmp_path):
    """As PTB-XL's `ecg_ids`: an id that is not in `record_list.csv` raises, naming it and how many, for build and
    convert alike (it was left out without a word)."""
    absent = [123, 99999999] + list(range(1, 11))
    message = re.escape(
        f"{mimic_root / 'record_list.csv'}: study_id(s) [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] not in the record list (12 of "
        "the 13 requested)"
    )
    with pytest.raises(KeyError, match=message):
        build_mimic_iv_ecg(mimic_root, study_ids=[40689238, *absent])
    with pytest.raises(KeyError, match=r"study_id\(s\) \[123\] not in the record list \(1 of the 2 requested\)"):
        convert_mimic_iv_ecg(mimic_root, tmp_path / "out", study_ids=[40689238, 123])
    assert not (tmp_path / "out").exists()
    assert build_mimic_iv_ecg(mimic_root, study_ids=[40689238])["ecg_id"] == [40689238]


def test_a_measurements_row_of_another_subject_is_refused(mimic_root):
    """study_id is unique in MIMIC-IV-ECG: a measurements row whose subject_id differs from record_list.csv's comes
    from a mixed or corrupt file, and its report would be attached to another patient's ECG."""
    table = mimic_root / "machine_measurements.csv"
    line = measurements_line(mimic_root, 44000004)
    table.write_text(table.read_text().replace(line, line.replace("10002428,", "99999999,", 1)))
    message = re.escape(
        f"{table}: study_id 44000004 belongs to subject_id 99999999 there but to subject_id 10002428 in "
        f"{mimic_root / 'record_list.csv'} (1 such study_id(s): [44000004])"
    )
    with pytest.raises(ValueError, match=message):
        build_mimic_iv_ecg(mimic_root)
    assert build_mimic_iv_ecg(mimic_root, study_ids=[43000003])["patient_id"] == [10001725]  # only joined rows count


def test_a_non_numeric_measurement_names_its_study(mimic_root):
    path = mimic_root / "machine_measurements.csv"
    text = path.read_text()
    for study_id, old, new in ((41000001, ",659,", ",abc,"), (42000002, ",6848296,", ",x1,")):
        line = measurements_line(mimic_root, study_id)
        text = text.replace(line, line.replace(old, new))
    path.write_text(text)
    with pytest.raises(ValueError, match=r"machine_measurements\.csv: rr_interval 'abc' of study_id 41000001 is not"):
        build_mimic_iv_ecg(mimic_root)
    dataset, report = build_mimic_iv_ecg(mimic_root, on_error="skip", return_report=True)
    assert (report.total, report.written, report.failed) == (6, 4, 2)
    assert [failure.reason for failure in report.failures] == [
        f"{path}: rr_interval 'abc' of study_id 41000001 is not a number",
        f"{path}: cart_id 'x1' of study_id 42000002 is not an integer",
    ]
    assert dataset["ecg_id"] == [40689238, 43000003, 44000004, 45000005]
    assert dataset["cart_id"] == [6848296, 6848296, 6848296, None]
    assert dataset["rr_interval"] == [659.0, 659.0, 659.0, None]


@pytest.mark.parametrize("file_name", ["record_list.csv", "machine_measurements.csv"])
def test_a_study_id_that_is_not_an_integer_is_named(mimic_root, file_name):
    """Read as text, it would match no study: a bare int() error, or (measurements) an empty report logged as a count."""
    path = mimic_root / file_name
    path.write_text(path.read_text().replace("41000001", "41000001x", 1))
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: study_id value(s) ['41000001x'] are not integers (1 in all)")
    ):
        build_mimic_iv_ecg(mimic_root)


def test_resume_after_crash_gives_one_row_per_record(mimic_root, tmp_path, monkeypatch):
    output = tmp_path / "out"
    write_shard = conversion._write_shard

    def crash_on_second_shard(job, **kwargs):
        shard, _ = job
        if shard.index == 1:
            shard.parquet.with_name(shard.parquet.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed mid-shard")
        return write_shard(job, **kwargs)

    monkeypatch.setattr(conversion, "_write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_mimic_iv_ecg(mimic_root, output, records_per_shard=2)
    assert sorted(path.name for path in (output / "data").glob("*.parquet")) == ["train-00000-of-00003.parquet"]
    assert not (output / "data" / "conversion_report.json").exists()
    with pytest.raises(ValueError, match="an unfinished conversion .*rerun the same conversion command"):
        load_mimic_iv_ecg(output)  # never a silently partial dataset

    monkeypatch.setattr(conversion, "_write_shard", write_shard)
    with pytest.raises(ValueError, match=r"the interrupted conversion differs in \['records_per_shard', 'splits'\]"):
        convert_mimic_iv_ecg(mimic_root, output, records_per_shard=3)
    measurements = (mimic_root / "machine_measurements.csv").read_text()
    (mimic_root / "machine_measurements.csv").write_text(measurements.replace("Normal ECG", "Abnormal ECG", 1))
    with pytest.raises(ValueError, match=r"differs in \['splits'\]"):  # a changed report is another input
        convert_mimic_iv_ecg(mimic_root, output, records_per_shard=2)
    (mimic_root / "machine_measurements.csv").write_text(measurements)
    report = convert_mimic_iv_ecg(mimic_root, output, records_per_shard=2)
    assert (report.total, report.written, report.failed) == (6, 6, 0)
    ids = load_mimic_iv_ecg(output, streaming=False)["ecg_id"][:]
    assert sorted(ids) == sorted(study for _, study in STUDIES) and len(ids) == len(set(ids))
    assert not list((output / "data").glob("*.tmp"))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        convert_mimic_iv_ecg(mimic_root, output, records_per_shard=2)
    assert convert_mimic_iv_ecg(mimic_root, output, records_per_shard=6, overwrite=True).written == 6
    assert len(list((output / "data").glob("*.parquet"))) == 1


def test_a_conversion_killed_while_finishing_resumes(mimic_root, tmp_path, monkeypatch):
    """Killed as it writes the final report (every shard done): the rerun finishes it from the shards' saved failures.
    The folder of saved failures used to be removed first, so the rerun failed on it and only overwrite=True helped."""
    output, write_json = tmp_path / "out", conversion._write_json_atomic

    def killed_at_the_report(path, value):
        if path.name == conversion.REPORT_FILE:
            raise KeyboardInterrupt("killed while finishing")
        write_json(path, value)

    (mimic_root / "files/p1000/p10000032/s41000001/41000001.dat").unlink()
    monkeypatch.setattr(conversion, "_write_json_atomic", killed_at_the_report)
    with pytest.raises(KeyboardInterrupt):
        convert_mimic_iv_ecg(mimic_root, output, records_per_shard=4)
    monkeypatch.setattr(conversion, "_write_json_atomic", write_json)
    report = convert_mimic_iv_ecg(mimic_root, output, records_per_shard=4)
    assert (report.total, report.written, report.failed) == (6, 5, 1)
    assert "signal file 41000001.dat is missing" in report.failures[0].reason
    assert sorted(path.name for path in (output / "data").iterdir()) == [
        "conversion_report.json", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"
    ]  # fmt: skip
    assert load_mimic_iv_ecg(output, streaming=False)["ecg_id"] == [s for _, s in STUDIES if s != 41000001]
    (output / "data" / conversion.PLAN_FILE).write_text("{}")  # killed after the report, before the plan was removed
    assert load_mimic_iv_ecg(output, streaming=False).num_rows == 5


def test_parallel_conversion_and_split_by_node(mimic_root, tmp_path):
    output = tmp_path / "out"
    report = convert_mimic_iv_ecg(mimic_root, output, records_per_shard=2, num_proc=2)
    assert report.written == 6
    full = load_mimic_iv_ecg(output)  # streaming by default
    assert [row["ecg_id"] for row in full] == [study for _, study in STUDIES]
    parts = [[row["ecg_id"] for row in load_mimic_iv_ecg(output, rank=rank, world_size=2)] for rank in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(s for _, s in STUDIES)
    with pytest.raises(ValueError, match="rank and world_size go together"):
        load_mimic_iv_ecg(output, rank=2, world_size=2)


def test_convert_cli(mimic_root, tmp_path):
    script = runpy.run_path(str(REPO_ROOT / "dataset_scripts/mimic_iv_ecg/convert.py"), run_name="mimic_convert")
    output = tmp_path / "out"
    assert (
        script["main"](["--mimic_root", str(mimic_root), "--output_dir", str(output), "--records_per_shard", "3"]) == 0
    )
    card = (output / "README.md").read_text()
    assert "license: odbl" in card and "path: data/train-*.parquet" in card
    assert len(list((output / "data").glob("train-*-of-00002.parquet"))) == 2
    by_card = load_dataset(str(output), name="default", split="train", streaming=True)  # as from the Hub
    assert [row["ecg_id"] for row in by_card] == [study for _, study in STUDIES]


def test_convert_cli_fails_when_no_record_was_written(mimic_root, tmp_path, capsys):
    """A folder with the metadata but no waveforms converted to an empty, loadable output with exit code 0."""
    shutil.rmtree(mimic_root / "files")
    script = runpy.run_path(str(REPO_ROOT / "dataset_scripts/mimic_iv_ecg/convert.py"), run_name="mimic_convert")
    assert script["main"](["--mimic_root", str(mimic_root), "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert f"no record was written ({len(STUDIES)} of {len(STUDIES)} failed" in error
    assert "conversion_report.json" in error


def test_the_converted_folder_names_no_local_path(mimic_root, tmp_path):
    """A failed record is named as PhysioNet names it, relative to --mimic_root: the conversion report is uploaded
    with the shards, and its absolute path (the converting machine's folders) was refused by the push's leak check."""
    signal = ptbxl_500hz(7)
    signal[:50, 4] = np.nan
    path = write_mimic_record(mimic_root, 10003046, 46000006, signal)
    with (mimic_root / "record_list.csv").open("a") as handle:
        handle.write(f"10003046,46000006,46000006,2180-07-23 08:44:00,{path}\n")
    script = runpy.run_path(str(REPO_ROOT / "dataset_scripts/mimic_iv_ecg/convert.py"), run_name="mimic_convert")
    output = tmp_path / "out"
    assert script["main"](["--mimic_root", str(mimic_root), "--output_dir", str(output)]) == 0
    report = (output / "data" / "conversion_report.json").read_text()
    assert str(tmp_path) not in report
    (failure,) = json.loads(report)["failures"]
    assert failure["record"] == path == "files/p1000/p10003046/s46000006/46000006"
    assert failure["reason"].startswith(f"{path}.hea: lead aVL has 50 NaN/inf samples")
    assert check_dataset_folder(output) == []
