"""Any WFDB folder -> `datasets`: real PTB-XL records copied into a hospital-like layout with a custom labels CSV,
converted, loaded with a patient-level split, embedded and probed through the command lines."""

from __future__ import annotations

import ast
import json
import re
import runpy

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from merit_hf import MeritFeatureExtractor, MeritForPreTraining
from merit_hf.data import (
    EcgInputError,
    WfdbFolderSpec,
    build_wfdb_dataset,
    convert_wfdb_folder,
    label_names,
    load_wfdb_dataset,
    read_ecg_record,
)
from merit_hf.data.wfdb_folder import find_wfdb_records
from merit_hf.hub import leak_problems
from tests.conftest import REPO_ROOT, SHARED_DATA, tiny_merit_config

SUBSET = SHARED_DATA / "ptbxl_subset500"


def copy_record(source, folder, name):
    """A PTB-XL record under a new name (the header's record and file names rewritten)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".hea", ".dat"):
        data = source.with_suffix(suffix).read_bytes()
        if suffix == ".hea":
            data = data.replace(source.name.encode(), name.encode())
        (folder / f"{name}{suffix}").write_bytes(data)
    return folder / name


def hospital_folder(tmp_path, num_records: int):
    """`num_records` real PTB-XL 100 Hz records as `export/<site>/<patient>/ecg<ecg_id>.{hea,dat}` (not PTB-XL's
    layout), and a labels CSV keyed by file name: `rhythm` (SR / SBRAD / other, from scp_codes), patient, site."""
    database = pd.read_csv(SUBSET / "ptbxl_database.csv").sort_values("ecg_id").head(num_records)
    wfdb_dir, rows = tmp_path / "export", []
    for meta in database.to_dict("records"):
        codes = ast.literal_eval(meta["scp_codes"])
        rhythm = "sinus rhythm" if "SR" in codes else "sinus bradycardia" if "SBRAD" in codes else "other"
        patient = int(meta["patient_id"]) % 17  # several records per patient, to test the patient-level split
        name = f"ecg{int(meta['ecg_id'])}"
        copy_record(SUBSET / meta["filename_lr"], wfdb_dir / f"site{int(meta['site'] or 0) % 2}" / f"p{patient}", name)
        rows.append({"file": name, "rhythm": rhythm, "patient": f"P{patient}", "report": meta["report"]})
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return wfdb_dir, labels, rows


def write_record(folder, name, signal, leads, fs):
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal, fmt=["16"] * len(leads),
                adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads), write_dir=str(folder))  # fmt: skip
    return folder / name


def test_leads_rate_and_length_are_kept_as_recorded_and_bad_records_are_reported(tmp_path):
    wfdb_dir = tmp_path / "holter"
    time = np.arange(250 * 30) / 250
    two_leads = np.stack([np.sin(2 * np.pi * 1.1 * time), 0.5 * np.cos(2 * np.pi * 1.1 * time)], axis=1)
    write_record(wfdb_dir / "a", "two_lead", two_leads, ["MLII", "V5"], fs=250)  # 30 s, 2 leads, 250 Hz
    copy_record(SUBSET / "records100" / "00000" / "00001_lr", wfdb_dir / "b", "twelve")
    broken = copy_record(SUBSET / "records100" / "00000" / "00002_lr", wfdb_dir / "b", "broken")
    broken.with_suffix(".dat").write_bytes(broken.with_suffix(".dat").read_bytes()[:1000])  # cut short
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["a/two_lead", "twelve", "ghost"], "dx": ["AF,PVC", "NORM", "NORM"]}).to_csv(labels)
    spec = WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="id", label_columns=("dx",))

    report = convert_wfdb_folder(spec, tmp_path / "out")
    assert (report.total, report.written, report.failed) == (3, 2, 1)
    assert report.failures[0].record == "b/broken"  # relative to wfdb_dir: the report is uploaded with the shards
    assert report.failures[0].reason == (
        "b/broken.dat: signal file holds 1000 bytes, the header declares 1000 "
        "samples x 12 signals in format 16 (24000 bytes): truncated"
    )
    saved = json.loads((tmp_path / "out" / "data" / "conversion_report.json").read_text())
    assert saved["failed"] == 1 and saved["settings"]["records_without_labels_row"] == 1  # b/broken has no row
    assert saved["settings"]["labels_csv_ids_without_record"] == 1  # "ghost"
    assert saved["settings"]["labels_csv"] == "labels.csv" and str(tmp_path) not in json.dumps(saved)
    records = load_wfdb_dataset(tmp_path / "out", split_fractions=(1.0, 0.0, 0.0))["train"]
    by_record = {row["record"]: row for row in records}
    holter = by_record["a/two_lead"]
    assert holter["lead_names"] == ["MLII", "V5"] and holter["sampling_rate"] == 250.0
    np.testing.assert_allclose(np.asarray(holter["signal"]), two_leads, atol=5e-4)  # the 1 µV ADC grid
    assert label_names(records, "dx") == ["AF", "NORM", "PVC"]
    assert holter["dx"] == [0, 2] and by_record["b/twelve"]["dx"] == [1]
    twelve = read_ecg_record(SUBSET / "records100" / "00000" / "00001_lr", lead_names=None)
    np.testing.assert_array_equal(np.asarray(by_record["b/twelve"]["signal"], dtype=np.float32), twelve["signal"])
    ptbxl_spelling = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert by_record["b/twelve"]["lead_names"] == twelve["lead_names"] == ptbxl_spelling  # kept as recorded

    with pytest.raises(FileExistsError, match="a finished conversion is already there"):
        convert_wfdb_folder(spec, tmp_path / "out")
    with pytest.raises(EcgInputError, match=r"broken\.dat: signal file holds 1000 bytes.*truncated"):
        build_wfdb_dataset(spec)  # in memory, on_error="raise" names the first bad record


def test_a_multi_segment_record_is_one_row_and_its_segments_none(tmp_path):
    """A folder holding a valid multi-segment record (a real 500 Hz PTB-XL record in two segments): one row, named by
    its master header, with its labels and all 5000 samples; its segment headers are no records of their own."""
    from tests.test_data_wfdb import RECORD_1_HR, write_multi_segment

    wfdb_dir = tmp_path / "export"
    (wfdb_dir / "ward").mkdir(parents=True)
    original = wfdb.rdrecord(str(RECORD_1_HR))
    write_multi_segment(wfdb_dir / "ward", "ms", original.p_signal, original.sig_name, [3000, 2000])
    copy_record(SUBSET / "records100" / "00000" / "00001_lr", wfdb_dir, "twelve")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["ms", "twelve"], "dx": ["NORM", "AF"]}).to_csv(labels, index=False)
    spec = WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="id", label_columns=("dx",))
    assert find_wfdb_records(wfdb_dir) == ["twelve", "ward/ms"]
    dataset = build_wfdb_dataset(spec)  # on_error="raise": nothing is wrong with the folder
    assert dataset["record"] == ["twelve", "ward/ms"] and dataset["dx"] == [[0], [1]]
    row = dataset.with_format("numpy")[1]
    assert row["signal"].shape == (5000, 12) and row["sampling_rate"] == 500.0
    np.testing.assert_array_equal(row["signal"], original.p_signal.astype(np.float32))
    report = convert_wfdb_folder(spec, tmp_path / "out")
    assert (report.total, report.written, report.failed) == (2, 2, 0)
    converted = load_wfdb_dataset(tmp_path / "out", split_fractions=(1.0, 0.0, 0.0))["train"]
    assert sorted(converted["record"]) == ["twelve", "ward/ms"]


def test_each_header_is_read_and_parsed_once_and_gives_what_wfdb_reads(tmp_path, monkeypatch):
    """The folder scan read every header twice: its own parser for multi-segment detection, then `wfdb.rdheader`
    (about 7 ms a header) for the lead count and comments. One read and one parse now give all three, equal to what
    `wfdb.rdheader` reads (comments as ASCII, without their `#`); only headers outside the grammar still go to wfdb."""
    from pathlib import Path

    from merit_hf.data import wfdb_folder
    from tests.test_data_wfdb import RECORD_1_HR, write_multi_segment

    wfdb_dir = tmp_path / "export"
    copy_record(SUBSET / "records100" / "00000" / "00001_lr", wfdb_dir, "twelve")
    commented = copy_record(SUBSET / "records100" / "00000" / "00002_lr", wfdb_dir / "cinc", "commented")
    text = commented.with_suffix(".hea").read_text().replace(" ", "\t").replace("\n", "\r\n")
    commented.with_suffix(".hea").write_text(text + "# Age: 56\r\n#Dx: 426783006,164934002 \u00cf \u00b5V\r\n")
    uncalibrated = copy_record(SUBSET / "records100" / "00000" / "00003_lr", wfdb_dir, "uncalibrated")
    text = uncalibrated.with_suffix(".hea").read_text().replace("1000.0(0)/mV", "0(0)/mV")
    uncalibrated.with_suffix(".hea").write_text(text + "# gain 0: outside the grammar\n")
    latin1 = copy_record(SUBSET / "records100" / "00000" / "00004_lr", wfdb_dir, "latin1")
    latin1.with_suffix(".hea").write_bytes(
        latin1.with_suffix(".hea").read_bytes() + "# Sex: M\xe4\n".encode("latin-1")
    )
    (wfdb_dir / "ward").mkdir()
    original = wfdb.rdrecord(str(RECORD_1_HR))
    write_multi_segment(wfdb_dir / "ward", "ms", original.p_signal, original.sig_name, [3000, 2000])
    records = ["cinc/commented", "latin1", "twelve", "uncalibrated", "ward/ms"]
    expected = {}
    for record in records:  # what the scan took from wfdb.rdheader before
        header = wfdb.rdheader(str(wfdb_dir / record))
        comments = "\n".join(str(line).strip() for line in header.comments or [])
        expected[record] = (int(header.n_sig or 0), comments)
    assert expected["cinc/commented"] == (12, "Age: 56\nDx: 426783006,164934002  V")  # non-ASCII dropped, as wfdb does

    reads, wfdb_reads, read_bytes, rdheader = [], [], Path.read_bytes, wfdb.rdheader
    monkeypatch.setattr(Path, "read_bytes", lambda path: reads.append(path.name) or read_bytes(path))
    monkeypatch.setattr(wfdb, "rdheader", lambda name, *args, **kwargs: wfdb_reads.append(Path(name).name)
                        or rdheader(name, *args, **kwargs))  # fmt: skip
    tasks, _, lead_counts, _ = wfdb_folder.wfdb_folder_tasks(WfdbFolderSpec(str(wfdb_dir)))
    assert sorted(reads) == sorted(f"{Path(name).name}.hea" for name in [*records, "ward/ms_1", "ward/ms_2"])
    assert sorted(wfdb_reads) == ["latin1", "uncalibrated"]  # outside the grammar (not UTF-8; gain 0): wfdb reads it
    assert [task["record"] for task in tasks] == records  # the segments are parts of ward/ms, not records
    assert {task["record"]: (task["num_leads"], task["header_comments"]) for task in tasks} == expected
    assert lead_counts == {12}
    assert wfdb_folder.scan_wfdb_headers(wfdb_dir)["ward/ms"].segments == ("ward/ms_1", "ward/ms_2")


def test_a_multi_frequency_record_in_a_folder_is_refused_by_name(tmp_path):
    """A multi-frequency record is refused by name (build) or listed in the report (convert); the rest is written."""
    from tests.test_data_wfdb import write_multi_frequency

    wfdb_dir = tmp_path / "export"
    wfdb_dir.mkdir()
    copy_record(SUBSET / "records100" / "00000" / "00001_lr", wfdb_dir, "twelve")
    path, _ = write_multi_frequency(wfdb_dir, "multi_rate")
    spec = WfdbFolderSpec(str(wfdb_dir))
    message = f"{path}.hea: a multi-frequency record: signal(s) I (2 samples per frame, 500 Hz), II (2 samples per"
    with pytest.raises(EcgInputError, match=re.escape(message)):
        build_wfdb_dataset(spec)
    report = convert_wfdb_folder(spec, tmp_path / "out")
    assert (report.total, report.written, report.failed) == (2, 1, 1)
    assert report.failures[0].record == "multi_rate"
    assert report.failures[0].reason.startswith("multi_rate.hea: a multi-frequency record: signal(s) I (2 samples")


def test_the_converted_folder_names_no_local_path(tmp_path):
    """The conversion report is uploaded with the shards: a failed record is named relative to --wfdb_dir and the
    CSVs by their file names (absolute paths were refused by the push's leak check)."""
    wfdb_dir, labels, _ = hospital_folder(tmp_path, 3)
    broken = next(wfdb_dir.rglob("*.dat"))
    broken.write_bytes(broken.read_bytes()[:1000])
    convert = runpy.run_path(str(REPO_ROOT / "dataset_scripts" / "wfdb" / "convert.py"), run_name="wfdb_convert")
    out = tmp_path / "out"
    assert convert["main"](["--wfdb_dir", str(wfdb_dir), "--output_dir", str(out), "--labels_csv", str(labels),
                            "--id_column", "file", "--label_columns", "rhythm", "--reports_csv", str(labels)]) == 0  # fmt: skip
    report = (out / "data" / "conversion_report.json").read_text()
    assert str(tmp_path) not in report
    saved = json.loads(report)
    record = broken.relative_to(wfdb_dir).with_suffix("").as_posix()
    assert [failure["record"] for failure in saved["failures"]] == [record]
    assert saved["failures"][0]["reason"].startswith(f"{record}.dat: signal file holds 1000 bytes")
    assert saved["settings"]["labels_csv"] == saved["settings"]["reports_csv"] == "labels.csv"
    assert leak_problems(out) == []  # the push's check (its card, an unedited template here, is checked apart)


def test_a_label_spelled_like_a_missing_value_is_a_label(tmp_path):
    """pandas' default would read the class "NA" (and "None", "null") as a missing cell and leave the record unlabelled."""
    wfdb_dir = tmp_path / "folder"
    for index, name in enumerate(("one", "two", "three"), start=1):
        copy_record(SUBSET / "records100" / "00000" / f"0000{index}_lr", wfdb_dir, name)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,dx\none,NA\ntwo,None|SR\nthree,\n")
    spec = WfdbFolderSpec(
        str(wfdb_dir), labels_csv=str(labels), id_column="id", label_columns=("dx",), label_separator="|"
    )
    rows = {row["record"]: row for row in build_wfdb_dataset(spec)}
    names = label_names(build_wfdb_dataset(spec), "dx")
    assert names == ["NA", "None", "SR"]
    assert [names[i] for i in rows["one"]["dx"]] == ["NA"] and [names[i] for i in rows["two"]["dx"]] == ["None", "SR"]
    assert rows["three"]["dx"] == []


def test_bad_csv_input_is_named(tmp_path):
    wfdb_dir, labels, _ = hospital_folder(tmp_path, 3)
    with pytest.raises(ValueError, match="no id column 'ID'"):
        build_wfdb_dataset(WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="ID"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['Rhythm'\]"):
        build_wfdb_dataset(
            WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="file", label_columns=("Rhythm",))
        )
    with pytest.raises(ValueError, match="clash with the dataset's own columns"):
        WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="file", label_columns=("signal",))
    table = pd.read_csv(labels)
    pd.concat([table, table.head(1)]).to_csv(labels, index=False)
    with pytest.raises(ValueError, match=r"record site\d/p\d/ecg1 has two rows"):
        build_wfdb_dataset(WfdbFolderSpec(str(wfdb_dir), labels_csv=str(labels), id_column="file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no WFDB header"):
        build_wfdb_dataset(WfdbFolderSpec(str(tmp_path / "empty")))


def test_splits_keep_patients_whole_are_seeded_and_follow_a_column(tmp_path):
    wfdb_dir, labels, rows = hospital_folder(tmp_path, 40)
    split_of = {row["file"]: ("train", "validation", "test")[index % 3] for index, row in enumerate(rows)}
    table = pd.read_csv(labels).assign(split=lambda frame: frame["file"].map(split_of))
    table.to_csv(labels, index=False)
    spec = WfdbFolderSpec(
        str(wfdb_dir), labels_csv=str(labels), id_column="file", label_columns=("rhythm",),
        patient_column="patient", metadata_columns=("split",),
    )  # fmt: skip
    convert_wfdb_folder(spec, tmp_path / "out")
    a = load_wfdb_dataset(tmp_path / "out", split_fractions=(0.6, 0.2, 0.2), seed=3)
    b = load_wfdb_dataset(tmp_path / "out", split_fractions=(0.6, 0.2, 0.2), seed=3)
    c = load_wfdb_dataset(tmp_path / "out", split_fractions=(0.6, 0.2, 0.2), seed=4)
    assert sum(len(part) for part in a.values()) == 40 and all(len(part) for part in a.values())
    assert all(a[name]["record"] == b[name]["record"] for name in a)
    assert any(a[name]["record"] != c[name]["record"] for name in a)
    patients = {name: set(part["patient_id"]) for name, part in a.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["validation"])
    by_column = load_wfdb_dataset(tmp_path / "out", split_column="split")
    for name, part in by_column.items():
        assert {split_of[record.rsplit("/", 1)[-1]] for record in part["record"]} == {name}
    # How the splits were drawn travels with them, and evaluation results read it (not PTB-XL's folds).
    from merit_hf.evaluation.results import described_dataset

    assert described_dataset(a) == {
        "source": str(tmp_path / "out"),  # the folder as given, not the datasets cache its shards were read into
        "name": str(tmp_path / "out"),
        "version": None,
        "splits": "WFDB folder: train / validation / test by seeded split [0.6, 0.2, 0.2] (seed 3), patients kept whole",
    }
    assert described_dataset(by_column)["splits"] == "WFDB folder: train / validation / test by column 'split'"
    with pytest.raises(ValueError, match=r"split_column 'rhythm': record .* has .*every value must be one of"):
        load_wfdb_dataset(tmp_path / "out", split_column="rhythm")
    with pytest.raises(ValueError, match="three fractions"):
        load_wfdb_dataset(tmp_path / "out", split_fractions=(0.5, 0.5))


@pytest.mark.slow
def test_wfdb_folder_end_to_end_convert_embed_probe_finetune(tmp_path):
    """The README recipe: convert -> embed -> linear probe -> fine-tune, by the command lines."""
    from merit_hf.embedding import main as embed_main
    from merit_hf.training.probe import main as probe_main

    wfdb_dir, labels, rows = hospital_folder(tmp_path, 60)
    convert = runpy.run_path(str(REPO_ROOT / "dataset_scripts" / "wfdb" / "convert.py"), run_name="wfdb_convert")
    out = tmp_path / "hospital_merit"
    assert convert["main"](["--wfdb_dir", str(wfdb_dir), "--output_dir", str(out), "--labels_csv", str(labels),
                         "--id_column", "file", "--label_columns", "rhythm", "--patient_column", "patient",
                         "--reports_csv", str(labels), "--report_column", "report"]) == 0  # fmt: skip
    assert (out / "README.md").is_file() and "data/records-*.parquet" in (out / "README.md").read_text()
    data = load_wfdb_dataset(out, seed=0)
    row = data["train"][0]
    assert row["report"] and row["report"] == next(r["report"] for r in rows if row["record"].endswith(r["file"]))

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(model_dir)
    MeritFeatureExtractor.from_model_config(model.config.ecg_config).save_pretrained(model_dir)
    summary = embed_main(["--model_name_or_path", str(model_dir), "--dataset_name", "wfdb", "--dataset", str(out),
                          "--keep_columns", "ecg_id", "record", "--output_dir", str(tmp_path / "emb")])  # fmt: skip
    assert {split: info["rows"] for split, info in summary["splits"].items()} == {
        split: len(part) for split, part in data.items()
    }
    # which records each split holds, for the probe's --split_* to match (the README's two commands disagreed)
    assert summary["split"] == {"split_column": None, "split_fractions": [0.8, 0.1, 0.1], "split_seed": 0}
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", "wfdb", "--dataset", str(out),
              "--label_sets", "rhythm", "--num_bootstrap", "0", "--batch_size", "16",
              "--split_fractions", "0.6", "0.2", "0.2", "--split_seed", "1"]  # fmt: skip
    linear = probe_main([*common, "--output_dir", str(tmp_path / "probe"), "--max_epochs", "5"])
    finetune = probe_main([*common, "--output_dir", str(tmp_path / "ft"), "--mode", "finetune",
                           "--finetune_max_epochs", "1"])  # fmt: skip
    for summary, folder in ((linear, "probe"), (finetune, "ft")):
        (name,) = summary
        assert set(summary[name]) == {"model", "baseline"}
        results = json.loads((tmp_path / folder / f"{name}.json").read_text())
        assert (
            results["dataset"]["name"] == str(out)
            and results["dataset"]["source"] == str(out)  # not the datasets cache the shards were read into
            and "seeded split [0.6, 0.2, 0.2] (seed 1)" in results["dataset"]["splits"]
        )
        assert results["label_names"] == sorted({row["rhythm"] for row in rows})


def test_the_converter_fails_when_no_record_was_written(tmp_path, capsys):
    """A folder whose one record has a corrupt header converted to an empty, loadable output with exit code 0."""

    records = tmp_path / "records"
    records.mkdir()
    (records / "rec1.hea").write_text("rec1 12 500 5000\nbroken line\n")
    script = runpy.run_path(str(REPO_ROOT / "dataset_scripts/wfdb/convert.py"), run_name="wfdb_convert")
    assert script["main"](["--wfdb_dir", str(records), "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "error: no record was written (1 of 1 failed" in error and "does --wfdb_dir hold WFDB records" in error
