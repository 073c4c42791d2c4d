"""PTB-XL v1.0.3's changes (`merit_hf.data.ptbxl_versions`): the vendored table against the official change log and
v1.0.1's full metadata, and the loaders' `ptbxl_version` on real records in the PhysioNet layout."""

import ast
import json
import re
import runpy
import shutil

import numpy as np
import pandas as pd
import pytest
from datasets import load_from_disk

from merit_hf.data import (
    PTBXL_SPLITS,
    apply_ptbxl_version,
    build_ptbxl,
    convert_ptbxl,
    label_names,
    load_dataset,
    load_ptbxl,
    ptbxl_v1_0_3_changes,
    read_ptbxl_database,
)
from merit_hf.data.ptbxl_versions import CHANGES_FILE
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, SHARED_DATA

METADATA_FULL = SHARED_DATA / "ptbxl_metadata_full"
PTBXL_2K = SHARED_DATA / "ptbxl_2k"
SCRIPT = REPO_ROOT / "dataset_scripts" / "ptbxl" / "v1_0_3_changes.py"
TWINS = tuple(range(137, 146))  # 137, 139-143 and 145 are duplicates v1.0.3 drops; 138 and 144 stay
DROPPED_IN_SAMPLE = [137, 139, 140, 141, 142, 143, 145, 456, 458, 459, 461, 462]


def _needs(path):
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared data folder sits beside the checkout)")
    return path


def _physionet_folder(root, source, ecg_ids, database=None):
    """A PhysioNet PTB-XL folder of `ecg_ids` copied from `source` (records100 only), its csv rows from `database`."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "scp_statements.csv", root)
    table = pd.read_csv(database if database is not None else source / "ptbxl_database.csv")
    table = table[table.ecg_id.isin(ecg_ids)]
    assert sorted(table.ecg_id) == sorted(ecg_ids)
    table.to_csv(root / "ptbxl_database.csv", index=False)
    for name in table.filename_lr:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".hea", ".dat"):
            shutil.copy(source / f"{name}{suffix}", root / f"{name}{suffix}")
    return root


def _ids(dataset):
    return sorted(ecg_id for split in dataset.values() for ecg_id in split["ecg_id"][:])


def _row(dataset, ecg_id):
    for split in dataset.values():
        ids = split["ecg_id"][:]
        if ecg_id in ids:
            return split[ids.index(ecg_id)]
    raise KeyError(ecg_id)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """ecg_id 137-145 of the bundled sample (v1.0.1 metadata): seven of them are duplicates v1.0.3 drops."""
    return _physionet_folder(tmp_path_factory.mktemp("ptbxl") / "twins", BUNDLED_PTBXL, TWINS)


@pytest.fixture(scope="module")
def consensus(tmp_path_factory):
    """ecg_id 1, 1370 and 1371 of shared/data/ptbxl_2k with v1.0.1's rows: v1.0.3 relabels 1371 (IVCD goes) and gives
    1370 the codes it already has."""
    return _physionet_folder(tmp_path_factory.mktemp("ptbxl") / "consensus", _needs(PTBXL_2K), (1, 1370, 1371))


# ----------------------------------------------------------------------------------------------------------------------
# The vendored table
# ----------------------------------------------------------------------------------------------------------------------
def test_vendored_table_is_what_the_script_parses_from_the_official_changelog():
    changelog = _needs(METADATA_FULL) / "ptbxl_v103_changelog.txt"
    script = runpy.run_path(str(SCRIPT), run_name="ptbxl_v1_0_3_changes")
    table = script["parse_changelog"](changelog.read_text(encoding="utf-8"))
    assert json.loads(CHANGES_FILE.read_text(encoding="utf-8")) == table
    assert CHANGES_FILE.read_text(encoding="utf-8") == script["render"](table)  # byte for byte, as regenerated
    assert script["main"](["--changelog", str(changelog), "--check"]) == 0
    assert (table["num_dropped"], len(table["dropped"]), table["num_consensus"]) == (38, 38, 16)
    listed = {int(line) for line in (METADATA_FULL / "v1.0.3_dropped_ecg_ids.txt").read_text().split()}
    assert set(map(int, table["dropped"])) == listed
    assert "CC BY 4.0" in table["license"] and "Scientific Data 7, 154" in table["citation"]


def test_the_parser_refuses_a_log_it_does_not_understand():
    parse = runpy.run_path(str(SCRIPT), run_name="ptbxl_v1_0_3_changes")["parse_changelog"]
    good = "#### Change 1\n->drop row with ecg_id=137 [strat_fold=8]\n->keep row with ecg_id=138 [strat_fold=8]\n"
    assert parse(good + "Dropped ecg_ids [1 in total] =[137]\n")["dropped"] == {"137": 138}
    with pytest.raises(ValueError, match="differs from its changes"):
        parse(good + "Dropped ecg_ids [2 in total] =[137, 139]\n")
    with pytest.raises(ValueError, match="line 2: not understood"):
        parse(good.replace("->drop row", "->dorp row") + "Dropped ecg_ids [1 in total] =[137]\n")


def test_every_change_matches_the_v1_0_1_database():
    """Every id of the log is a v1.0.1 row in the fold the log names; each consensus is what its 'derived from' rows
    (v1.0.1 codes of that change's ids) share, at their lowest likelihood; v1.0.3's RECORDS are v1.0.1's ids less the
    dropped ones."""
    table = pd.read_csv(_needs(METADATA_FULL) / "ptbxl_database_v1.0.1.csv", index_col="ecg_id")
    codes = {ecg_id: ast.literal_eval(text) for ecg_id, text in table["scp_codes"].items()}
    changes = json.loads(CHANGES_FILE.read_text(encoding="utf-8"))
    for change in changes["changes"]:
        rows = [*change["drop"], change["keep"]]
        for row in rows:
            assert table.loc[row["ecg_id"], "strat_fold"] == row["strat_fold"], (change["change"], row)
        if change["consensus_scp_codes"] is None:
            continue
        derived = change["consensus_derived_from"]
        assert all(any(item == codes[row["ecg_id"]] for row in rows) for item in derived), change["change"]
        shared = set.intersection(*(set(item) for item in derived))
        assert change["consensus_scp_codes"] == {code: min(item[code] for item in derived) for code in shared}
    records = (METADATA_FULL / "RECORDS_v1.0.3").read_text()
    for suffix in ("lr", "hr"):
        kept = {int(ecg_id) for ecg_id in re.findall(rf"(\d{{5}})_{suffix}", records)}
        assert kept == set(table.index) - set(map(int, changes["dropped"]))
    relabeled = [ecg_id for ecg_id, new in ptbxl_v1_0_3_changes().consensus.items() if codes[ecg_id] != new]
    assert len(relabeled) == 13 and 1371 in relabeled and 1370 not in relabeled


# ----------------------------------------------------------------------------------------------------------------------
# The loaders
# ----------------------------------------------------------------------------------------------------------------------
def test_v1_0_3_drops_the_duplicates_and_as_is_keeps_them(twins):
    default = build_ptbxl(twins)
    assert _ids(default) == [138, 144]
    assert "dropped 7 of v1.0.3's 38 duplicate ECGs (ecg_id 137, 139, 140, 141, 142, 143, 145)" in (
        default["train"].info.description
    )
    raw = load_dataset("ptbxl", twins, ptbxl_version="as_is")
    assert _ids(raw) == list(TWINS) and "as is" in raw["validation"].info.description
    for ecg_id in (138, 144):  # the kept twins are the same rows either way
        assert _row(default, ecg_id)["scp_codes"] == _row(raw, ecg_id)["scp_codes"]


def test_the_consensus_relabels_the_kept_twin_and_its_labels(consensus):
    default, raw = build_ptbxl(consensus), build_ptbxl(consensus, ptbxl_version="as_is")
    assert _ids(default) == _ids(raw) == [1, 1370, 1371]
    assert json.loads(_row(default, 1371)["scp_codes"]) == {"ASMI": 100.0, "ALMI": 100.0, "1AVB": 100.0, "SR": 0.0}
    assert json.loads(_row(raw, 1371)["scp_codes"]) == {
        "ASMI": 100.0, "ALMI": 100.0, "IVCD": 100.0, "1AVB": 100.0, "SR": 0.0,
    }  # fmt: skip
    names = label_names(default, "subclass")
    assert sorted(names[i] for i in _row(raw, 1371)["subclass"]) == ["AMI", "IVCD", "_AVB"]
    assert sorted(names[i] for i in _row(default, 1371)["subclass"]) == ["AMI", "_AVB"]  # MERL's v1.0.3 labels too
    for ecg_id in (1, 1370):  # 1370's consensus is its own codes: unchanged
        assert _row(default, ecg_id)["scp_codes"] == _row(raw, ecg_id)["scp_codes"]
    description = default["train"].info.description
    assert "consensus scp_codes into 1 kept twin(s) (1371 ['1AVB', 'ALMI', 'ASMI', 'IVCD', 'SR'] -> " in description


def test_v1_0_3_metadata_is_left_as_it_is(consensus, tmp_path):
    """Metadata that is already v1.0.3 (no duplicate, consensus codes, written as PTB-XL writes them) is a no-op, and
    applying the change twice changes nothing."""
    folder = tmp_path / "v103"
    shutil.copytree(consensus, folder)
    table = pd.read_csv(folder / "ptbxl_database.csv")
    table.loc[table.ecg_id == 1371, "scp_codes"] = "{'ASMI': 100.0, 'ALMI': 100.0, '1AVB': 100.0, 'SR': 0.0}"
    table.to_csv(folder / "ptbxl_database.csv", index=False)
    default, raw = build_ptbxl(folder), build_ptbxl(folder, ptbxl_version="as_is")
    for split in PTBXL_SPLITS:
        assert default[split]["scp_codes"][:] == raw[split]["scp_codes"][:]
        assert default[split]["subclass"][:] == raw[split]["subclass"][:]
    assert "already matched v1.0.3" in default["train"].info.description
    once, report = apply_ptbxl_version(read_ptbxl_database(consensus))
    assert list(report.relabeled) == [1371]
    twice, again = apply_ptbxl_version(once)
    assert twice == once and not again.changed


def test_ages_over_89_are_stored_as_300_as_v1_0_2_began_to():
    """v1.0.2's "Change 0": ages above 89 are 300 for privacy. v1.0.1's csv holds 204 real ones (3 in the sample)."""
    raw = {row["ecg_id"]: row["age"] for row in read_ptbxl_database(BUNDLED_PTBXL)}
    rows, report = apply_ptbxl_version(read_ptbxl_database(BUNDLED_PTBXL))
    assert report.ages_capped == [279, 282, 351] and [raw[ecg_id] for ecg_id in report.ages_capped] == [91, 91, 90]
    ages = {row["ecg_id"]: row["age"] for row in rows}
    assert [ages[ecg_id] for ecg_id in report.ages_capped] == [300.0] * 3 and max(
        age for age in ages.values() if age is not None
    ) == 300.0
    assert all(ages[ecg_id] == raw[ecg_id] for ecg_id in ages if ecg_id not in report.ages_capped)
    assert "stored the age of 3 patient(s) over 89 as 300" in report.summary()
    assert apply_ptbxl_version(read_ptbxl_database(BUNDLED_PTBXL), "as_is")[0][278]["age"] == 91  # ecg_id 279
    again = apply_ptbxl_version(rows)[1]
    assert not again.ages_capped and not again.changed
    full = _needs(METADATA_FULL) / "ptbxl_database_v1.0.1.csv"
    table = pd.read_csv(full)
    over = table[table.age > 89]
    _, report = apply_ptbxl_version(table.to_dict("records"))
    expected = sorted(set(over.ecg_id) - set(ptbxl_v1_0_3_changes().dropped))
    assert len(over) == 204 and report.ages_capped == expected


def test_the_bundled_sample_keeps_488_records_as_its_readme_says():
    rows, report = apply_ptbxl_version(read_ptbxl_database(BUNDLED_PTBXL))
    assert report.dropped == DROPPED_IN_SAMPLE and not report.relabeled
    counts = {split: sum(row["strat_fold"] in folds for row in rows) for split, folds in PTBXL_SPLITS.items()}
    assert counts == {"train": 344, "validation": 78, "test": 66} and len(rows) == 500 - len(DROPPED_IN_SAMPLE)
    readme = (BUNDLED_PTBXL / "README.md").read_text(encoding="utf-8")
    assert f"{len(DROPPED_IN_SAMPLE)} of them in this range" in readme and f"{len(rows)} records" in readme


def test_a_converted_dataset_gets_the_drops_and_a_stale_twin_raises(twins, consensus, tmp_path):
    convert_ptbxl(twins, tmp_path / "twins", ptbxl_version="as_is")
    assert _ids(load_ptbxl(tmp_path / "twins", ptbxl_version="as_is")) == list(TWINS)
    loaded = load_ptbxl(tmp_path / "twins")
    assert _ids(loaded) == [138, 144]
    assert (
        "dropped 5 of v1.0.3's 38 duplicate ECGs (ecg_id 137, 139, 141, 142, 145)" in loaded["train"].info.description
    )
    assert "dropped 2 of" in loaded["validation"].info.description  # each split says what it lost
    streamed = load_ptbxl(tmp_path / "twins", split="validation", streaming=True)
    assert [row["ecg_id"] for row in streamed] == [144]  # 140 and 143 (fold 9) are left out as rows are read
    # filtered on Arrow batches: the rows stay Arrow, so numpy reads the signal as stored (float32, not float64)
    assert [row["signal"].dtype for row in streamed.with_format("numpy")] == [np.dtype("float32")]
    convert_ptbxl(consensus, tmp_path / "stale", ptbxl_version="as_is")
    again = r"convert the dataset again \(dataset_scripts/ptbxl/convert.py in the merit_hf repository, or "
    again += r"merit_hf.data.convert_ptbxl, applies v1.0.3's changes\)"  # a pip install has no dataset_scripts/
    with pytest.raises(ValueError, match=rf"ecg_id 1371 has scp_codes .* {again}"):
        load_ptbxl(tmp_path / "stale")
    with pytest.raises(ValueError, match="ecg_id 1371"):
        list(load_ptbxl(tmp_path / "stale", split="train", streaming=True))
    convert_ptbxl(consensus, tmp_path / "fresh")  # the converter applies v1.0.3 by default
    fresh = load_ptbxl(tmp_path / "fresh")
    assert json.loads(_row(fresh, 1371)["scp_codes"]) == ptbxl_v1_0_3_changes().consensus[1371]


def test_filtered_streams_pickle_for_spawned_dataloader_workers(twins, tmp_path):
    """The functions that filter a stream (v1.0.3's rows, labelled rows, rows with a report, one row in N of
    `stream_part`) and `filter_stream`'s own map were closures: `pickle` refused every filtered stream ("Can't pickle
    local object 'filter_stream.<locals>.kept'"), so a DataLoader worker started with `spawn` (macOS and Windows'
    default) could not receive one."""
    import pickle

    from torch.utils.data import DataLoader

    from merit_hf.data.streams import stream_part

    convert_ptbxl(twins, tmp_path / "twins", ptbxl_version="as_is")
    streams = {
        "v1.0.3 rows": load_ptbxl(tmp_path / "twins", split="validation", streaming=True),
        "labelled rows": load_ptbxl(tmp_path / "twins", split="validation", streaming=True, label_set="superclass"),
        "rows with a report": load_dataset(
            "ptbxl", tmp_path / "twins", split="validation", streaming=True, drop_empty_reports=True
        ),
    }
    streams["one row in two"] = stream_part(streams["v1.0.3 rows"], 0, 2)  # a single shard: the fallback filter
    for name, stream in streams.items():
        expected = [row["ecg_id"] for row in stream]
        assert [row["ecg_id"] for row in pickle.loads(pickle.dumps(stream))] == expected, name
    assert [row["ecg_id"] for row in streams["rows with a report"]] == [144]  # 140 and 143 left out
    ecg_ids = streams["rows with a report"].select_columns(["ecg_id"])
    loader = DataLoader(ecg_ids, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert [int(row["ecg_id"]) for row in loader] == [144]


def test_a_dataset_converted_as_is_gets_v1_0_3_ages_when_loaded_as_v1_0_3(tmp_path):
    """ecg_id 279 and 282 are 91 in v1.0.1's csv: converted as is, a v1.0.3 load stores them as 300, as the
    in-memory path does, map-style (the column order kept, the count in the description) and streamed."""
    folder = _physionet_folder(tmp_path / "old", BUNDLED_PTBXL, range(277, 284))
    convert_ptbxl(folder, tmp_path / "as_is", ptbxl_version="as_is")

    def ages(dataset):
        return {ecg_id: age for split in dataset.values() for ecg_id, age in zip(split["ecg_id"], split["age"])}

    kept = load_ptbxl(tmp_path / "as_is", ptbxl_version="as_is")
    assert ages(kept)[279] == 91 and ages(kept)[282] == 91
    loaded = load_ptbxl(tmp_path / "as_is")
    assert ages(loaded) == {**ages(kept), 279: 300.0, 282: 300.0}
    assert {split: loaded[split].column_names for split in loaded} == {
        split: kept[split].column_names for split in kept
    }
    assert {split: loaded[split].features for split in loaded} == {split: kept[split].features for split in kept}
    descriptions = " ".join(split.info.description for split in loaded.values())
    assert "stored the age of 2 patient(s) over 89 as 300" in descriptions
    streamed = {
        row["ecg_id"]: row["age"]
        for split in loaded
        for row in load_ptbxl(tmp_path / "as_is", split=split, streaming=True)
    }
    assert streamed == ages(loaded)


def test_the_description_travels_with_save_to_disk(twins, tmp_path):
    build_ptbxl(twins)["train"].save_to_disk(str(tmp_path / "saved"))  # (an empty split does not load back)
    assert "dropped 7 of" in load_from_disk(str(tmp_path / "saved")).info.description


def test_an_unknown_version_is_refused(twins):
    from merit_hf.embedding import EmbeddingArguments
    from merit_hf.evaluation.probe import ProbeArguments

    for call in (
        lambda: build_ptbxl(twins, ptbxl_version="1.0.1"),
        lambda: load_dataset("ptbxl", twins, ptbxl_version="v1.0.3"),
        lambda: ProbeArguments(ptbxl_version="latest"),
        lambda: EmbeddingArguments(ptbxl_version="1.0.2"),
    ):
        with pytest.raises(ValueError, match=r"ptbxl_version must be one of \('1.0.3', 'as_is'\)"):
            call()


def test_requested_ecg_ids_that_v1_0_3_drops_are_named_in_a_warning(caplog):
    """`ecg_ids=[137, 139]` are both v1.0.3 duplicates: the splits come out empty, and a warning (the default log level
    shows it) names each id, the twin it duplicates, and `ptbxl_version="as_is"`."""
    with caplog.at_level("WARNING", logger="merit_hf.data.ptbxl"):
        built = build_ptbxl(BUNDLED_PTBXL, ecg_ids=[137, 139, 138])
    assert _ids(built) == [138]
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    twin_of = ptbxl_v1_0_3_changes().dropped
    assert str(BUNDLED_PTBXL / "ptbxl_database.csv") in message and "2 requested ecg_id(s)" in message
    assert f"137 (a duplicate of {twin_of[137]}), 139 (a duplicate of {twin_of[139]})" in message
    assert "ptbxl_version='as_is'" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="merit_hf.data.ptbxl"):
        assert _ids(build_ptbxl(BUNDLED_PTBXL, ecg_ids=[137, 139], ptbxl_version="as_is")) == [137, 139]
        build_ptbxl(BUNDLED_PTBXL, ecg_ids=[1, 2])  # nothing asked for is dropped: no warning
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
