"""PTB-XL as `datasets` on the real records: folds, labels, reports, both rates, conversion, loading, fractions."""

import json
import re
import runpy
import shutil

import numpy as np
import pandas as pd
import pytest
import wfdb
from datasets import load_dataset
from huggingface_hub import DatasetCard

from merit_hf.data import (
    LABEL_SETS,
    EcgInputError,
    ScpCodeError,
    build_ptbxl,
    convert_ptbxl,
    label_fraction_subset,
    label_names,
    load_ptbxl,
    ptbxl_v1_0_3_changes,
    read_ptbxl_database,
)
from merit_hf.hub import check_dataset_folder
from merit_hf.hub.cards import dataset_card_problems
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT

# The csv's (v1.0.1) rows; the loaders leave out the duplicates v1.0.3 drops (ptbxl_version="1.0.3", the default).
CSV_NO_SUPERCLASS = [17, 18, 20, 23, 34, 143, 144, 190, 382, 385, 449, 498]
CSV_FOLD_SIZES = {1: 58, 2: 51, 3: 34, 4: 42, 5: 47, 6: 33, 7: 44, 8: 44, 9: 81, 10: 66}
_CSV = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv")
DROPPED = _CSV[_CSV.ecg_id.isin(ptbxl_v1_0_3_changes().dropped)]  # 12 rows of ecg_id 137-462
NUM_RECORDS = len(_CSV) - len(DROPPED)
NO_SUPERCLASS = [ecg_id for ecg_id in CSV_NO_SUPERCLASS if ecg_id not in set(DROPPED.ecg_id)]
FOLD_SIZES = {fold: size - int((DROPPED.strat_fold == fold).sum()) for fold, size in CSV_FOLD_SIZES.items()}
SPLIT_SIZES = {
    "train": sum(FOLD_SIZES[fold] for fold in range(1, 9)),
    "validation": FOLD_SIZES[9],
    "test": FOLD_SIZES[10],
}


@pytest.fixture(scope="module")
def ptbxl():
    return build_ptbxl(BUNDLED_PTBXL, sampling_rate=100)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("ptbxl_merit")
    report = convert_ptbxl(BUNDLED_PTBXL, output, sampling_rate=100, records_per_shard=150)
    return output, report


def row_of(dataset, ecg_id):
    index = dataset["ecg_id"][:].index(ecg_id)
    return dataset[index]


@pytest.mark.slow
def test_splits_follow_strat_fold(ptbxl):
    assert {split: ptbxl[split].num_rows for split in ptbxl} == SPLIT_SIZES
    assert len(DROPPED) == 12 and SPLIT_SIZES == {"train": 353 - 9, "validation": 81 - 3, "test": 66}
    raw = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ptbxl_version="as_is")
    assert {split: raw[split].num_rows for split in raw} == {"train": 353, "validation": 81, "test": 66}
    for split, folds in {"train": set(range(1, 9)), "validation": {9}, "test": {10}}.items():
        assert set(ptbxl[split]["strat_fold"]) == folds
    counts = pd.Series(sum((ptbxl[split]["strat_fold"][:] for split in ptbxl), [])).value_counts().to_dict()
    assert counts == FOLD_SIZES
    patients = {split: set(ptbxl[split]["patient_id"]) for split in ptbxl}
    assert not patients["train"] & patients["test"] and not patients["validation"] & patients["test"]


def test_features_are_explicit(ptbxl):
    features = ptbxl["train"].features
    assert features["signal"].shape == (1000, 12) and features["signal"].dtype == "float32"
    assert features["ecg_id"].dtype == "int32"
    assert label_names(ptbxl, "superclass") == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert {name: len(label_names(features, name)) for name in LABEL_SETS} == {
        "superclass": 5, "subclass": 23, "form": 19, "rhythm": 12, "all": 71,
    }  # fmt: skip
    assert features["sex"].names == ["male", "female"]


def test_ecg_id_1_row(ptbxl):
    row = row_of(ptbxl["train"], 1)
    assert json.loads(row["scp_codes"]) == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    names = {name: label_names(ptbxl, name) for name in LABEL_SETS}
    decoded = {name: [names[name][index] for index in row[name]] for name in LABEL_SETS}
    assert decoded == {
        "superclass": ["NORM"], "subclass": ["NORM"], "form": ["LVOLT"], "rhythm": ["SR"], "all": ["LVOLT", "NORM", "SR"],
    }  # fmt: skip
    assert row["superclass"] == [3] and row["rhythm"] == [names["rhythm"].index("SR")]
    assert (row["patient_id"], row["age"], row["sex"], row["strat_fold"]) == (15709, 56.0, 1, 3)
    assert row["report"] == "sinusrhythmus periphere niederspannung" and row["report_language"] == "de"
    assert row["lead_names"] == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert row["sampling_rate"] == 100 and row["height"] is None and row["device"] == "CS-12   E"
    signal = np.asarray(row["signal"], dtype=np.float32)
    np.testing.assert_array_equal(
        signal, wfdb.rdsamp(str(BUNDLED_PTBXL / "records100/00000/00001_lr"))[0].astype(np.float32)
    )


def test_a_report_with_a_curators_note_keeps_it_in_its_own_column(ptbxl):
    row = row_of(ptbxl["validation"], 293)  # csv: "sinus rhythm. normal ecg. Edit: NORM 100, (NORM 100)"
    assert row["report"] == "sinus rhythm. normal ecg." and row["report_language"] == "en"
    assert row["report_edit_note"] == "NORM 100, (NORM 100)"
    assert row_of(ptbxl["train"], 1)["report_edit_note"] == ""


def test_ecg_id_39_row_in_validation(ptbxl):
    row = row_of(ptbxl["validation"], 39)
    names = label_names(ptbxl, "superclass")
    assert [names[index] for index in row["superclass"]] == ["MI", "STTC"]


def test_records_without_superclass(ptbxl):
    empty = sorted(
        ecg_id
        for split in ptbxl.values()
        for ecg_id, labels in zip(split["ecg_id"][:], split["superclass"][:])
        if not labels
    )
    assert empty == NO_SUPERCLASS


def test_empty_report_of_ecg_id_443(ptbxl):
    rows = [
        (split, ecg_id)
        for split in ptbxl
        for ecg_id, report in zip(ptbxl[split]["ecg_id"][:], ptbxl[split]["report"][:])
        if not report
    ]
    assert [ecg_id for _, ecg_id in rows] == [443]
    assert row_of(ptbxl[rows[0][0]], 443)["report_language"] == ""


def test_500hz_against_100hz():
    hr = build_ptbxl(BUNDLED_PTBXL, sampling_rate=500, ecg_ids=range(1, 13))
    assert hr["train"].features["signal"].shape == (5000, 12)
    assert {split: hr[split].num_rows for split in hr} == {"train": 9, "validation": 2, "test": 1}
    lr = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=[1])
    signal_500 = np.asarray(row_of(hr["train"], 1)["signal"])
    signal_100 = np.asarray(lr["train"][0]["signal"])
    assert row_of(hr["train"], 1)["sampling_rate"] == 500 and row_of(hr["train"], 1)["filename"].endswith("00001_hr")
    # the 100 Hz file is PTB-XL's downsampled copy of the 500 Hz one: same 10 s, closely matching samples
    assert np.corrcoef(signal_500[::5].ravel(), signal_100.ravel())[0, 1] > 0.95
    assert row_of(hr["train"], 1)["superclass"] == lr["train"][0]["superclass"]


def test_missing_500hz_files_are_reported_or_raise():
    with pytest.raises(EcgInputError, match=r"records500/00000/00013_hr\.hea: WFDB header not found"):
        build_ptbxl(BUNDLED_PTBXL, sampling_rate=500, ecg_ids=range(12, 15))
    dataset, report = build_ptbxl(BUNDLED_PTBXL, 500, ecg_ids=range(12, 15), on_error="skip", return_report=True)
    assert (report.total, report.written, report.failed) == (3, 1, 2)
    assert report.failures[0].record.endswith("records500/00000/00013_hr")
    assert "00013_hr.hea: WFDB header not found" in report.failures[0].reason
    assert sum(part.num_rows for part in dataset.values()) == 1


def write_ptbxl(root, table):
    """A PTB-XL folder with `table` as its `ptbxl_database.csv` and the bundled sample's 100 Hz records of its rows."""
    (root / "records100" / "00000").mkdir(parents=True)
    shutil.copy(BUNDLED_PTBXL / "scp_statements.csv", root)
    table.to_csv(root / "ptbxl_database.csv", index=False)
    for filename in table["filename_lr"]:
        for suffix in (".hea", ".dat"):
            shutil.copy(BUNDLED_PTBXL / f"{filename}{suffix}", root / "records100" / "00000")
    return root


def test_unknown_scp_code_names_the_record(tmp_path):
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv").head(2)
    table.loc[1, "scp_codes"] = "{'NORM': 80.0, 'XYZ': 0.0}"
    root = write_ptbxl(tmp_path / "ptbxl", table)
    with pytest.raises(ScpCodeError, match=r"00002_lr\.hea \(ecg_id 2\): unknown SCP code\(s\) \['XYZ'\]"):
        build_ptbxl(root)


def test_signal_files_named_by_two_ecg_ids_are_refused(tmp_path):
    table = _CSV.head(3).copy()
    table.loc[2, "filename_lr"] = table.loc[1, "filename_lr"]  # ecg_id 3 points at ecg_id 2's record
    root = write_ptbxl(tmp_path / "ptbxl", table)
    with pytest.raises(ValueError, match=r"filename_lr 'records100/00000/00002_lr' belongs to ecg_ids \[2, 3\]"):
        build_ptbxl(root)


@pytest.mark.parametrize(
    "cell, problem", [("", "scp_codes is empty"), ("{'NORM': 'abc'}", "the likelihood 'abc', not a number")]
)
def test_a_bad_scp_codes_cell_names_the_csv_and_ecg_id_and_can_be_skipped(tmp_path, cell, problem):
    table = _CSV.head(3).copy()
    table.loc[1, "scp_codes"] = cell
    root = write_ptbxl(tmp_path / "ptbxl", table)
    with pytest.raises(ScpCodeError, match=re.escape(f"{root / 'ptbxl_database.csv'} (ecg_id 2): ") + ".*" + problem):
        build_ptbxl(root)
    _, report = build_ptbxl(root, on_error="skip", return_report=True)
    assert (report.total, report.written, report.failed) == (3, 2, 1)


@pytest.mark.parametrize(
    "column, cell, problem",
    [("patient_id", "abc", "is not an integer"), ("age", "old", "is not a number"), ("sex", 0.5, "is not an integer"),
     ("site", "?", "is not an integer"), ("validated_by_human", "yes", "is not True or False"),
     ("sex", 2, "is not 0 (male) or 1 (female)")],
)  # fmt: skip
def test_a_bad_metadata_cell_names_its_record_and_spoils_no_other(tmp_path, column, cell, problem):
    table = _CSV.head(3).astype({column: object})  # ecg_id 1-3, folds 3, 2, 5
    table.loc[1, column] = cell  # ecg_id 2; pandas now reads the whole column as text
    root = write_ptbxl(tmp_path / "ptbxl", table)
    reason = f"{root / 'ptbxl_database.csv'}: {column} {cell!r} of ecg_id 2 {problem}"
    with pytest.raises(ValueError, match=re.escape(reason)):
        build_ptbxl(root)
    dataset, report = build_ptbxl(root, on_error="skip", return_report=True)
    assert (report.total, report.written, report.failed) == (3, 2, 1)
    assert report.failures[0].record.endswith("00002_lr") and report.failures[0].reason == reason
    first, third = dataset["train"]  # ecg_id 1 and 3
    # '15709.0' read as text is still the integer 15709: the other records keep their values
    assert (first["ecg_id"], first["patient_id"], first["age"], first["sex"], first["validated_by_human"]) == (
        1, 15709, 56.0, 1, True,
    )  # fmt: skip
    assert (third["ecg_id"], third["patient_id"], third["site"], third["initial_autogenerated_report"]) == (
        3, 20372, 0, False,
    )  # fmt: skip
    assert build_ptbxl(root, ecg_ids=[1, 3])["train"]["ecg_id"][:] == [1, 3]


@pytest.mark.parametrize("columns", [["report"], ["age", "strat_fold", "filename_hr"]])
def test_a_missing_column_is_named(tmp_path, columns):
    root = write_ptbxl(tmp_path / "ptbxl", _CSV.head(2).drop(columns=columns))
    message = re.escape(f"{root / 'ptbxl_database.csv'}: missing column(s) {columns}")
    with pytest.raises(ValueError, match=message):
        read_ptbxl_database(root)
    with pytest.raises(ValueError, match=message):
        build_ptbxl(root)


def test_a_bad_ecg_id_or_strat_fold_is_named(tmp_path):
    table = _CSV.head(3).astype({"ecg_id": object, "strat_fold": object})
    table.loc[0, "ecg_id"] = "1a"
    root = write_ptbxl(tmp_path / "ptbxl", table)
    message = f"{root / 'ptbxl_database.csv'}: ecg_id value(s) ['1a'] are not integers"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_ptbxl_database(root, ecg_ids=[3])
    table.loc[0, "ecg_id"], table.loc[1, "strat_fold"] = "1.0", "x"  # '1.0' is ecg_id 1
    table.to_csv(root / "ptbxl_database.csv", index=False)
    assert [row["ecg_id"] for row in read_ptbxl_database(root, ecg_ids=[3, 1])] == [1, 3]
    with pytest.raises(ValueError, match=re.escape("unexpected strat_fold values ['x'] of ecg_id(s) [2] (PTB-XL has")):
        read_ptbxl_database(root)


def test_bad_sampling_rate():
    with pytest.raises(ValueError, match="sampling_rate must be one of \\[100, 500\\]"):
        build_ptbxl(BUNDLED_PTBXL, sampling_rate=250)


@pytest.mark.slow
def test_convert_then_load_round_trip(converted, ptbxl):
    output, report = converted
    assert (report.total, report.written, report.failed) == (NUM_RECORDS, NUM_RECORDS, 0)
    assert sorted(path.name for path in (output / "100hz").glob("*.parquet")) == [
        "test-00000-of-00001.parquet", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet", "validation-00000-of-00001.parquet",
    ]  # fmt: skip
    assert json.loads((output / "100hz" / "conversion_report.json").read_text())["written"] == NUM_RECORDS
    loaded = load_ptbxl(output)
    assert list(loaded) == ["train", "validation", "test"]
    assert loaded["train"].features == ptbxl["train"].features
    assert loaded["validation"]["ecg_id"][:5] == ptbxl["validation"]["ecg_id"][:5]
    assert (
        loaded["test"].with_format("numpy")[3]["signal"].tolist()
        == ptbxl["test"].with_format("numpy")[3]["signal"].tolist()
    )
    assert loaded["train"].cache_files, "a loaded dataset is memory-mapped from Arrow files"


def test_streaming_load(converted):
    stream = load_ptbxl(converted[0], split="validation", streaming=True)
    first = next(iter(stream))
    assert first["ecg_id"] == 8 and first["superclass"] == [2]


def test_refuses_to_overwrite_a_finished_conversion(converted):
    with pytest.raises(FileExistsError, match="a finished conversion is already there"):
        convert_ptbxl(BUNDLED_PTBXL, converted[0], sampling_rate=100)


def test_missing_config_is_named(converted):
    with pytest.raises(FileNotFoundError, match=r"converted at 100 Hz, not 500 Hz \(no 500hz/ folder\): pass "
                       r"--sampling_rate 100 \(sampling_rate=100\), or convert the 500 Hz records too"):  # fmt: skip
        load_ptbxl(converted[0], sampling_rate=500)


def test_label_set_drops_unlabeled_records(converted):
    loaded = load_ptbxl(converted[0], label_set="superclass")
    assert sum(part.num_rows for part in loaded.values()) == NUM_RECORDS - len(NO_SUPERCLASS)


def test_label_fraction_is_reproducible_nested_and_stratified(ptbxl):
    train = ptbxl["train"]
    ten = label_fraction_subset(train, 0.1, "superclass", seed=0)
    assert ten.num_rows == round(0.1 * SPLIT_SIZES["train"])
    assert ten["ecg_id"][:] == label_fraction_subset(train, 0.1, "superclass", seed=0)["ecg_id"][:]
    assert ten["ecg_id"][:] != label_fraction_subset(train, 0.1, "superclass", seed=1)["ecg_id"][:]
    assert ten["ecg_id"][:] == sorted(ten["ecg_id"][:])
    one = label_fraction_subset(train, 0.01, "superclass", seed=0)
    assert one.num_rows == round(0.01 * SPLIT_SIZES["train"]) and set(one["ecg_id"][:]) <= set(ten["ecg_id"][:])
    thirty = label_fraction_subset(train, 0.3, "superclass", seed=0)
    assert set(ten["ecg_id"][:]) <= set(thirty["ecg_id"][:])
    # every superclass keeps roughly its share (rarest-class strata)
    names = label_names(train, "superclass")
    full = pd.Series([names[i] for row in train["superclass"][:] for i in row]).value_counts(normalize=True)
    part = pd.Series([names[i] for row in thirty["superclass"][:] for i in row]).value_counts(normalize=True)
    assert set(part.index) == set(full.index)
    assert (part - full).abs().max() < 0.05


def test_a_small_fraction_still_has_every_class_its_budget_reaches(ptbxl):
    train = ptbxl["train"]
    for label_set in ("subclass", "form", "rhythm"):
        present = {index for row in train[label_set][:] for index in row}
        ten = label_fraction_subset(train, 0.1, label_set, seed=0)
        covered = {index for row in ten[label_set][:] for index in row}
        assert ten.num_rows == round(0.1 * train.num_rows)
        # every class is some row's rarest class here, and 35 rows are more than the classes
        assert covered == present, (label_set, sorted(present - covered))
        assert set(ten["ecg_id"][:]) <= set(label_fraction_subset(train, 0.3, label_set, seed=0)["ecg_id"][:])


def test_a_resumed_conversion_keeps_its_label_rules(tmp_path, monkeypatch):
    from merit_hf.data import conversion, load_ptbxl

    output, write_shard = tmp_path / "out", conversion._write_shard

    def crash_on_second_shard(job, **kwargs):
        if job[0].index == 1:
            raise KeyboardInterrupt("killed")
        return write_shard(job, **kwargs)

    monkeypatch.setattr(conversion, "_write_shard", crash_on_second_shard)
    ids = range(1, 41)
    with pytest.raises(KeyboardInterrupt):
        convert_ptbxl(BUNDLED_PTBXL, output, ecg_ids=ids, records_per_shard=10, label_threshold=0)
    monkeypatch.setattr(conversion, "_write_shard", write_shard)
    with pytest.raises(ValueError, match=r"an unfinished conversion \(conversion_plan.json is there"):
        load_ptbxl(output)
    with pytest.raises(ValueError, match=r"differs in \['settings'\].*'label_threshold': \(0.0, 100.0\)"):
        convert_ptbxl(BUNDLED_PTBXL, output, ecg_ids=ids, records_per_shard=10, label_threshold=100)
    convert_ptbxl(BUNDLED_PTBXL, output, ecg_ids=ids, records_per_shard=10, label_threshold=0)
    report = json.loads((output / "100hz" / "conversion_report.json").read_text())
    assert report["settings"] == {"sampling_rate": 100, "label_threshold": 0.0, "ptbxl_version": "1.0.3"}
    assert report["written"] == 40
    assert sum(part.num_rows for part in load_ptbxl(output).values()) == 40
    # a shard lost after the conversion finished is named, not skipped
    next((output / "100hz").glob("train-00001-of-*.parquet")).unlink()
    with pytest.raises(ValueError, match=r"split 'train' is incomplete or mixed: shards \[1\]"):
        load_ptbxl(output)


def test_load_with_label_fraction(converted):
    loaded = load_ptbxl(converted[0], label_fraction=0.1, label_set="superclass", seed=0)
    # of the 11 records without a superclass (143 is a v1.0.3 duplicate), 1 is in train (fold 1), 8 in validation, 2 in
    # test
    assert loaded["train"].num_rows == round(0.1 * (SPLIT_SIZES["train"] - 1))
    assert loaded["validation"].num_rows == SPLIT_SIZES["validation"] - 8
    assert loaded["test"].num_rows == SPLIT_SIZES["test"] - 2
    with pytest.raises(ValueError, match="label_fraction < 1 needs the whole train split"):
        load_ptbxl(converted[0], streaming=True, label_fraction=0.1)


def test_shared_subset_500hz(shared_ptbxl_dir):
    hr = build_ptbxl(shared_ptbxl_dir, sampling_rate=500, ecg_ids=range(1, 101))
    assert sum(part.num_rows for part in hr.values()) == 100
    assert {split: hr[split].num_rows for split in hr} == {"train": 67, "validation": 21, "test": 12}


def load_script(path):
    return runpy.run_path(str(path), run_name=f"{path.parent.name}_{path.stem}")


def test_convert_cli_writes_shards_and_card(tmp_path):
    root = tmp_path / "ptbxl"
    (root / "records100" / "00000").mkdir(parents=True)
    shutil.copy(BUNDLED_PTBXL / "scp_statements.csv", root)
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv")
    table[table["ecg_id"].isin([1, 8, 9])].to_csv(root / "ptbxl_database.csv", index=False)
    for ecg_id in (1, 8, 9):  # folds 3, 9, 10: one record per split
        for suffix in (".hea", ".dat"):
            shutil.copy(BUNDLED_PTBXL / f"records100/00000/{ecg_id:05d}_lr{suffix}", root / "records100" / "00000")
    script = load_script(REPO_ROOT / "dataset_scripts" / "ptbxl" / "convert.py")
    assert script["main"](["--ptbxl_root", str(root), "--output_dir", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: cc-by-4.0" in card and "path: 100hz/train-*.parquet" in card
    loaded = load_ptbxl(tmp_path / "out")
    assert {split: loaded[split]["ecg_id"][:] for split in loaded} == {"train": [1], "validation": [8], "test": [9]}
    # the card's `configs:` resolve as they would on the Hub
    by_card = load_dataset(str(tmp_path / "out"), name="100hz", split="validation")
    assert by_card["ecg_id"][:] == [8] and by_card.features["superclass"].feature.names[0] == "CD"
    # a 100 Hz conversion does not announce the 500hz config (the shipped template keeps both)
    template = REPO_ROOT / "dataset_scripts" / "ptbxl" / "README.md"
    assert [config["config_name"] for config in DatasetCard.load(template).data.configs] == ["100hz", "500hz"]
    written = DatasetCard.load(tmp_path / "out" / "README.md")
    assert [config["config_name"] for config in written.data.configs] == ["100hz"]
    assert written.text == DatasetCard.load(template).text
    assert dataset_card_problems(tmp_path / "out" / "README.md", data_folder=tmp_path / "out") == []
    assert check_dataset_folder(tmp_path / "out") == []
    shutil.copyfile(template, tmp_path / "out" / "README.md")  # the template as-is: push refuses it
    assert check_dataset_folder(tmp_path / "out") == [
        "README.md: configs entry '500hz': data_files 500hz/train-*.parquet, 500hz/validation-*.parquet, "
        f"500hz/test-*.parquet match no file in {tmp_path / 'out'}"
    ]


def test_the_converter_fails_when_no_record_was_written(tmp_path, capsys):
    """A PTB-XL folder with its CSVs but no records: every record failed, the dataset card's writer crashed on the
    empty Parquet shards (pyarrow refuses a batch size of 0) with a traceback, and nothing said why."""
    root = tmp_path / "ptbxl"
    root.mkdir()
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy(BUNDLED_PTBXL / name, root / name)
    script = runpy.run_path(str(REPO_ROOT / "dataset_scripts/ptbxl/convert.py"), run_name="ptbxl_convert")
    assert script["main"](["--ptbxl_root", str(root), "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "error: no record was written (488 of 488 failed; the reasons are in the conversion_report.json" in error
    assert "is --ptbxl_root the PTB-XL folder with its records100 waveforms?" in error
    card = DatasetCard.load(tmp_path / "out" / "README.md")  # the card of an empty conversion says 0 rows
    assert {split["num_examples"] for config in card.data.dataset_info for split in config["splits"]} == {0}
