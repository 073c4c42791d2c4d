"""SCP-ECG statements -> label sets, checked by hand against PTB-XL's `scp_codes` and `scp_statements.csv`."""

import numpy as np
import pandas as pd
import pytest

from merit_hf.data import LABEL_SETS, ScpCodeError, ScpStatements, multi_hot, parse_scp_codes
from tests.conftest import BUNDLED_PTBXL


@pytest.fixture(scope="module")
def statements():
    return ScpStatements.from_csv(BUNDLED_PTBXL / "scp_statements.csv")


@pytest.fixture(scope="module")
def scp_codes():
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv", index_col="ecg_id")
    return {ecg_id: parse_scp_codes(text) for ecg_id, text in table["scp_codes"].items()}


def test_label_set_sizes_and_names(statements):
    assert len(statements) == 71
    assert {name: len(statements.names[name]) for name in LABEL_SETS} == {
        "superclass": 5,
        "subclass": 23,
        "form": 19,
        "rhythm": 12,
        "all": 71,
    }
    assert statements.names["superclass"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert statements.names["rhythm"] == [
        "AFIB", "AFLT", "BIGU", "PACE", "PSVT", "SARRH", "SBRAD", "SR", "STACH", "SVARR", "SVTAC", "TRIGU",
    ]  # fmt: skip


def test_ecg_id_1(statements, scp_codes):
    # {'NORM': 100.0, 'LVOLT': 0.0, 'SR': 0.0}: NORM is diagnostic (class NORM), LVOLT form, SR rhythm.
    assert scp_codes[1] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert statements.labels(scp_codes[1]) == {
        "superclass": ["NORM"],
        "subclass": ["NORM"],
        "form": ["LVOLT"],
        "rhythm": ["SR"],
        "all": ["LVOLT", "NORM", "SR"],
    }


def test_ecg_id_39_and_the_likelihood_threshold(statements, scp_codes):
    # IMI 15 (MI/IMI), LNGQT, NST_, DIG 100 (STTC; also form statements), ABQRS (form), SR (rhythm)
    assert scp_codes[39] == {"IMI": 15.0, "LNGQT": 100.0, "NST_": 100.0, "DIG": 100.0, "ABQRS": 0.0, "SR": 0.0}
    assert statements.labels(scp_codes[39]) == {
        "superclass": ["MI", "STTC"],
        "subclass": ["IMI", "NST_", "STTC"],
        "form": ["ABQRS", "DIG", "LNGQT", "NST_"],
        "rhythm": ["SR"],
        "all": ["ABQRS", "DIG", "IMI", "LNGQT", "NST_", "SR"],
    }
    # at 50 % the 15 %-likely IMI drops out; form and rhythm statements (likelihood 0 in PTB-XL) stay
    assert statements.labels(scp_codes[39], threshold=50) == {
        "superclass": ["STTC"],
        "subclass": ["NST_", "STTC"],
        "form": ["ABQRS", "DIG", "LNGQT", "NST_"],
        "rhythm": ["SR"],
        "all": ["ABQRS", "DIG", "LNGQT", "NST_", "SR"],
    }


@pytest.mark.parametrize("threshold", [-1, 100.5, 150, float("nan"), "high", True])
def test_a_likelihood_threshold_outside_0_100_is_refused_naming_it(statements, threshold, tmp_path):
    """`labels({"NORM": 100}, threshold=150)` returned no label at all, without a word, and `build_ptbxl` built a
    dataset of unlabelled records with it; a threshold is a likelihood in [0, 100], and is now refused otherwise, by
    the conversion before it reads a record."""
    from merit_hf.data import build_ptbxl

    with pytest.raises(ValueError, match=r"^label_threshold: must be a likelihood in \[0, 100\] \(%\), got"):
        statements.labels({"NORM": 100.0}, threshold=threshold)
    with pytest.raises(ValueError, match="^label_threshold: must be a likelihood in"):
        build_ptbxl(BUNDLED_PTBXL, ecg_ids=[1], label_threshold=threshold)
    assert statements.labels({"NORM": 100.0}, threshold=100)["superclass"] == ["NORM"]  # the ends are fine
    assert statements.labels({"NORM": 0.0}, threshold=0)["superclass"] == ["NORM"]


def test_ecg_ids_45_181_17(statements, scp_codes):
    assert statements.labels(scp_codes[45]) == {
        "superclass": ["CD", "HYP"],
        "subclass": ["IRBBB", "RAO/RAE", "RVH"],
        "form": [],
        "rhythm": ["SR"],
        "all": ["IRBBB", "RAO/RAE", "RVH", "SR"],
    }
    labels_181 = statements.labels(scp_codes[181])  # ASMI, ALMI 100 (MI/AMI), IMI 15 (MI/IMI), ANEUR 50 (STTC)
    assert (labels_181["superclass"], labels_181["subclass"], labels_181["rhythm"]) == (
        ["MI", "STTC"],
        ["AMI", "IMI", "STTC"],
        [],
    )
    labels_17 = statements.labels(scp_codes[17])  # AFLT 100, ABQRS, AFIB: no diagnostic statement
    assert (labels_17["superclass"], labels_17["form"], labels_17["rhythm"]) == ([], ["ABQRS"], ["AFIB", "AFLT"])


def test_records_without_superclass(statements, scp_codes):
    empty = sorted(ecg_id for ecg_id, codes in scp_codes.items() if not statements.labels(codes)["superclass"])
    assert empty == [17, 18, 20, 23, 34, 143, 144, 190, 382, 385, 449, 498]


def test_unknown_scp_code_is_named(statements):
    with pytest.raises(ScpCodeError, match=r"ecg_id 7: unknown SCP code\(s\) \['XYZ'\], not in .*scp_statements.csv"):
        statements.labels({"NORM": 100.0, "XYZ": 50.0}, record="ecg_id 7")


def test_parse_scp_codes_forms():
    assert parse_scp_codes("{'NORM': 80.0, 'SBRAD': 0.0}") == {"NORM": 80.0, "SBRAD": 0.0}
    assert parse_scp_codes('{"NORM": 80.0}') == {"NORM": 80.0}
    with pytest.raises(ScpCodeError, match="ecg_id 3: unreadable scp_codes"):
        parse_scp_codes("{'NORM': 80.0", record="ecg_id 3")
    with pytest.raises(ScpCodeError, match="is not a dict"):
        parse_scp_codes("['NORM']")
    for empty in ("", "  ", None, float("nan")):
        with pytest.raises(ScpCodeError, match="ecg_id 3: scp_codes is empty"):
            parse_scp_codes(empty, record="ecg_id 3")
    for text in ("{'NORM': 'abc'}", "{'NORM': -5.0}", "{'NORM': 100.5}", "{'NORM': True}", '{"NORM": NaN}'):
        with pytest.raises(ScpCodeError, match=r"ecg_id 3: scp_codes .* gives 'NORM' the likelihood .*not a number"):
            parse_scp_codes(text, record="ecg_id 3")


def test_multi_hot():
    np.testing.assert_array_equal(multi_hot([2, 4], 5), np.array([0, 0, 1, 0, 1], dtype=np.float32))
    np.testing.assert_array_equal(multi_hot([[], [0]], 2), np.array([[0, 0], [1, 0]], dtype=np.float32))
    assert multi_hot([], 3).dtype == np.float32
    with pytest.raises(ValueError, match=r"label index 5 is outside \[0, 5\)"):
        multi_hot([5], 5)
