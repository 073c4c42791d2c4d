"""`merit_hf.data.load_dataset(name, path)`: the one loader of the probe, the embedding CLI, the quick-start and
pretraining; PTB-XL from its PhysioNet folder or converted, MIMIC-IV-ECG streamed by default, empty reports dropped
on request."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, IterableDataset, IterableDatasetDict

from merit_hf.data import (
    build_ptbxl,
    conversion,
    convert_mimic_iv_ecg,
    drop_empty_reports,
    has_report,
    is_physionet_ptbxl,
    load_dataset,
)
from tests.conftest import BUNDLED_PTBXL
from tests.test_data_mimic import mimic_root  # noqa: F401 (fixture)

ECG_IDS = (440, 441, 442, 443, 444, 445)  # 443's report is a single space


@pytest.fixture(scope="module")
def small_ptbxl(tmp_path_factory):
    """A PhysioNet PTB-XL folder of six real records (100 Hz), in the exact PhysioNet layout."""
    root = tmp_path_factory.mktemp("ptbxl")
    shutil.copy(BUNDLED_PTBXL / "scp_statements.csv", root)
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv")
    table[table.ecg_id.isin(ECG_IDS)].to_csv(root / "ptbxl_database.csv", index=False)
    (root / "records100" / "00000").mkdir(parents=True)
    for ecg_id in ECG_IDS:
        for suffix in (".hea", ".dat"):
            name = f"records100/00000/{ecg_id:05d}_lr{suffix}"
            shutil.copy(BUNDLED_PTBXL / name, root / name)
    return root


def ecg_ids(dataset):
    return [int(row["ecg_id"]) for row in dataset]


def test_the_physionet_folder_is_told_apart_from_a_converted_one(small_ptbxl, tmp_path):
    assert is_physionet_ptbxl(small_ptbxl) and is_physionet_ptbxl(str(small_ptbxl))
    build_ptbxl(small_ptbxl).save_to_disk(str(tmp_path / "saved"))
    assert not is_physionet_ptbxl(tmp_path / "saved")
    assert not is_physionet_ptbxl("org/ptb-xl")  # a Hub id


def test_ptbxl_from_the_physionet_folder_and_converted_are_the_same_rows(small_ptbxl, tmp_path):
    built = build_ptbxl(small_ptbxl)
    built.save_to_disk(str(tmp_path / "saved"))
    for source in (small_ptbxl, tmp_path / "saved"):
        loaded = load_dataset("ptbxl", source)
        assert sorted(loaded) == sorted(built)
        for split in built:
            assert loaded[split]["ecg_id"][:] == built[split]["ecg_id"][:]
            assert loaded[split]["report"][:] == built[split]["report"][:]
    everything = [ecg_id for split in built.values() for ecg_id in split["ecg_id"][:]]
    assert sorted(everything) == list(ECG_IDS)


def test_every_split_names_its_source_its_format_and_its_label_threshold(small_ptbxl, tmp_path, monkeypatch):
    """Each split of a converted or saved PTB-XL folder says where it was read from, in which format, and the label
    threshold of its labels (the conversion's report, or what the saved split said), loaded whole, one split at a
    time, or streamed; the folder's format and report are read once for all its splits."""
    from merit_hf.data import convert_ptbxl
    from merit_hf.data.ptbxl import described_source

    build_ptbxl(small_ptbxl, label_threshold=50).save_to_disk(str(tmp_path / "saved"))
    convert_ptbxl(small_ptbxl, tmp_path / "converted", records_per_shard=10, label_threshold=35)
    for folder, data_format, threshold in (
        ("saved", "a dataset saved with save_to_disk", 50.0),
        ("converted", "converted Parquet shards", 35.0),
    ):
        expected = {"source": str(tmp_path / folder), "format": data_format, "label_threshold": threshold}
        whole = load_dataset("ptbxl", tmp_path / folder)
        assert len(whole) > 1 and all(described_source(part) == expected for part in whole.values())
        split = next(iter(whole))
        assert described_source(load_dataset("ptbxl", tmp_path / folder, split=split)) == expected
        if folder == "converted":
            streamed = load_dataset("ptbxl", tmp_path / folder, streaming=True)
            assert all(described_source(part) == expected for part in streamed.values())
    reports, read_text = [], Path.read_text

    def counting_read_text(path: Path, *args, **kwargs) -> str:
        if path.name == conversion.REPORT_FILE:
            reports.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    load_dataset("ptbxl", tmp_path / "converted")
    assert len(reports) == 1, "the conversion's report was read for each split"


def test_a_saved_split_without_rows_loads_empty_with_its_features(small_ptbxl, tmp_path):
    """`save_to_disk` writes a split with no rows (a PTB-XL subset with no record of fold 10) without a data file, and
    `datasets.load_from_disk` fails on it (IndexError in datasets 5.2); `load_dataset` brings it back empty."""
    built = build_ptbxl(small_ptbxl)
    built["test"] = built["test"].select([])
    built.save_to_disk(str(tmp_path / "saved"))
    loaded = load_dataset("ptbxl", tmp_path / "saved")
    assert sorted(loaded) == sorted(built)
    assert len(loaded["test"]) == 0 and loaded["test"].features == built["test"].features
    assert loaded["train"]["ecg_id"][:] == built["train"]["ecg_id"][:]
    assert len(load_dataset("ptbxl", tmp_path / "saved", split="test")) == 0
    # streamed: an empty stream with the split's columns and source line (datasets cannot cut 0 rows into shards)
    streamed = load_dataset("ptbxl", tmp_path / "saved", streaming=True)
    assert list(streamed["test"]) == [] and streamed["test"].features == built["test"].features
    assert streamed["test"].info.description == loaded["test"].info.description != ""
    assert ecg_ids(streamed["train"]) == built["train"]["ecg_id"][:]


def test_a_saved_ptbxl_at_another_rate_than_asked_is_refused(small_ptbxl, tmp_path):
    """A `save_to_disk` folder holds the rate it was built at, and `sampling_rate` (the CLIs' --sampling_rate) was
    ignored for it: 500 Hz asked, 100 Hz records returned without a word, map-style and streamed."""
    build_ptbxl(small_ptbxl, sampling_rate=100).save_to_disk(str(tmp_path / "saved"))
    message = (
        rf"{tmp_path / 'saved'} \(train\): its records are 100 Hz, not the 500 Hz that sampling_rate=500 asks for "
        r"\(the probe's and embedding's --sampling_rate, pretraining's --source_sampling_rate\); .* pass "
        r"--sampling_rate 100 \(sampling_rate=100\)"
    )
    for streaming in (False, True):
        with pytest.raises(ValueError, match=message):
            load_dataset("ptbxl", tmp_path / "saved", sampling_rate=500, streaming=streaming)
    with pytest.raises(ValueError, match=r"\(test\): its records are 100 Hz, not the 500 Hz"):
        load_dataset("ptbxl", tmp_path / "saved", split="test", sampling_rate=500)
    assert load_dataset("ptbxl", tmp_path / "saved", sampling_rate=100)["train"].unique("sampling_rate") == [100]


def test_one_split_streamed_and_cut_by_node(small_ptbxl):
    split = next(name for name, part in build_ptbxl(small_ptbxl).items() if part.num_rows >= 2)
    whole = load_dataset("ptbxl", small_ptbxl, split=split)
    assert isinstance(whole, Dataset)
    streamed = load_dataset("ptbxl", small_ptbxl, split=split, streaming=True)
    assert isinstance(streamed, IterableDataset) and ecg_ids(streamed) == whole["ecg_id"][:]
    parts = [ecg_ids(load_dataset("ptbxl", small_ptbxl, split=split, rank=rank, world_size=2)) for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(whole["ecg_id"][:]) and parts[0] and parts[1]


def test_empty_reports_are_dropped_on_request_only(small_ptbxl):
    kept = load_dataset("ptbxl", small_ptbxl)
    assert 443 in [ecg_id for part in kept.values() for ecg_id in part["ecg_id"][:]]
    paired = load_dataset("ptbxl", small_ptbxl, drop_empty_reports=True)
    remaining = [ecg_id for part in paired.values() for ecg_id in part["ecg_id"][:]]
    assert sorted(remaining) == [440, 441, 442, 444, 445]
    assert all(report.strip() for part in paired.values() for report in part["report"][:])


def test_has_report_is_the_one_test_of_an_empty_report():
    assert [has_report(text) for text in ("sinus rhythm", "", " ", "\n\t", None)] == [True, False, False, False, False]
    assert not has_report(float("nan")) and has_report("nan")  # pandas' missing value, not the text "nan"
    rows = Dataset.from_dict({"ecg_id": [1, 2, 3], "report": ["a", " ", ""]})
    assert drop_empty_reports(rows)["ecg_id"] == [1]
    assert [row["ecg_id"] for row in drop_empty_reports(rows.to_iterable_dataset())] == [1]


def test_mimic_streams_by_default(mimic_root, tmp_path):  # noqa: F811
    convert_mimic_iv_ecg(mimic_root, tmp_path / "out", records_per_shard=4)
    streamed = load_dataset("mimic_iv_ecg", tmp_path / "out")
    assert isinstance(streamed, IterableDatasetDict) and list(streamed) == ["train"]
    assert len(ecg_ids(streamed["train"])) == 6
    # study 6 has no machine_measurements row: an empty report
    paired = load_dataset("mimic_iv_ecg", tmp_path / "out", split="train", streaming=False, drop_empty_reports=True)
    assert isinstance(paired, Dataset) and paired.num_rows == 5


def test_an_unknown_name_is_refused(small_ptbxl):
    with pytest.raises(
        ValueError, match=r"dataset name must be one of \('ptbxl', 'mimic_iv_ecg', 'wfdb'\), got 'ptb'"
    ):
        load_dataset("ptb", small_ptbxl)


@pytest.mark.parametrize("name", ["ptbxl", "mimic_iv_ecg", "wfdb"])
def test_an_unconverted_folder_names_converters_a_pip_install_can_find(name, tmp_path):
    """dataset_scripts/ is in a clone only: the message says whose it is, and names the package's own converters."""
    import merit_hf.data

    converters = ("convert_ptbxl", "convert_mimic_iv_ecg", "convert_wfdb_folder")
    assert all(callable(getattr(merit_hf.data, converter)) for converter in converters)
    with pytest.raises(FileNotFoundError) as raised:
        load_dataset(name, tmp_path)
    assert str(raised.value).endswith(
        "convert the dataset first (a script in dataset_scripts/ of the merit_hf repository, or merit_hf.data's "
        f"{', '.join(converters)})"
    )


def test_a_wfdb_dataset_without_records_names_the_repository_converter(tmp_path):
    from datasets import DatasetDict

    from merit_hf.data import load_wfdb_dataset

    DatasetDict({"train": Dataset.from_dict({"ecg_id": ["a"]})}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError) as raised:
        load_wfdb_dataset(tmp_path / "saved")
    assert str(raised.value).endswith(
        "convert the folder with dataset_scripts/wfdb/convert.py in the merit_hf repository "
        "(or merit_hf.data.convert_wfdb_folder)"
    )


def test_streamed_filters_keep_the_rows_arrow(mimic_root, tmp_path):  # noqa: F811
    """The empty-report filter and the node filter (2 shards, 3 processes), alone and together, run on Arrow batches:
    after a filter on Python rows, `with_format("numpy")` rebuilt each signal value by value, as float64 (40x slower
    per record)."""
    convert_mimic_iv_ecg(mimic_root, tmp_path / "out", records_per_shard=4)
    paired = load_dataset("mimic_iv_ecg", tmp_path / "out", split="train", drop_empty_reports=True)
    rows = list(paired.with_format("numpy"))
    assert [int(row["ecg_id"]) for row in rows] == [40689238, 41000001, 42000002, 43000003, 44000004]
    assert {(row["signal"].dtype, row["signal"].shape) for row in rows} == {(np.dtype("float32"), (5000, 12))}
    for drop, expected in (
        (False, [[40689238, 43000003], [41000001, 44000004], [42000002, 45000005]]),
        (True, [[40689238, 43000003], [41000001, 44000004], [42000002]]),
    ):
        nodes = [
            load_dataset(
                "mimic_iv_ecg", tmp_path / "out", split="train", rank=rank, world_size=3, drop_empty_reports=drop
            )
            for rank in range(3)
        ]
        parts = [list(node.with_format("numpy")) for node in nodes]
        assert [[int(row["ecg_id"]) for row in part] for part in parts] == expected
        assert {row["signal"].dtype for part in parts for row in part} == {np.dtype("float32")}


def test_mimic_on_more_processes_than_files_reads_row_groups(mimic_root, tmp_path, monkeypatch):  # noqa: F811
    """2 files for 3 processes: each process reads its own row groups (2 per file here) instead of every record."""
    monkeypatch.setattr(conversion, "PARQUET_ROWS_PER_GROUP", 2)
    convert_mimic_iv_ecg(mimic_root, tmp_path / "out", records_per_shard=3)
    nodes = [
        load_dataset("mimic_iv_ecg", tmp_path / "out", split="train", rank=rank, world_size=3) for rank in range(3)
    ]
    assert [node.num_shards for node in nodes] == [2, 1, 1]  # 2 files x 2 row groups, dealt to 3 processes
    parts = [ecg_ids(node) for node in nodes]
    assert sorted(sum(parts, [])) == sorted(ecg_ids(load_dataset("mimic_iv_ecg", tmp_path / "out", split="train")))
    assert sorted(map(len, parts)) == [1, 2, 3]  # shards of 2, 1, 2, 1 records: (0, 3), (1,), (2,)


@pytest.mark.parametrize("name", ["mimic_iv_ecg", "wfdb"])
def test_a_ptbxl_version_with_another_dataset_is_refused_before_anything_is_read(name, tmp_path):
    """load_dataset (pretraining's, the probe's and the embedding command's entry point) took ptbxl_version="as_is"
    for MIMIC-IV-ECG and WFDB folders and did nothing with it."""
    from merit_hf.data import load_dataset

    with pytest.raises(ValueError, match=rf"^--ptbxl_version as_is: only with --dataset_name ptbxl .* {name} has no"):
        load_dataset(name, tmp_path / "not read", ptbxl_version="as_is")
