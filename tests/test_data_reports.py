"""Report cleaning: PTB-XL language tags on real reports, MIMIC report_0..report_17 joining on the real row."""

import csv
import io

import pandas as pd
import pytest

from merit_hf.data import clean_report, join_mimic_report, report_language, split_ptbxl_edit_note
from tests.conftest import BUNDLED_PTBXL, SHARED_DATA

# MIMIC-IV-ECG v1.0 (ODbL 1.0, Gow et al. 2023), machine_measurements.csv: the real header and the one real row of
# ../shared/data/mimic_iv_ecg_metadata (study 40689238, blank report_2 between two statements).
MIMIC_MEASUREMENTS_HEADER = (
    "subject_id,study_id,cart_id,ecg_time,report_0,report_1,report_2,report_3,report_4,report_5,report_6,report_7,"
    "report_8,report_9,report_10,report_11,report_12,report_13,report_14,report_15,report_16,report_17,bandwidth,"
    "filtering,rr_interval,p_onset,p_end,qrs_onset,qrs_end,t_end,p_axis,qrs_axis,t_axis"
)
MIMIC_MEASUREMENTS_ROW = (
    "10000032,40689238,6848296,2180-07-23 08:44:00,Sinus rhythm,Possible right atrial abnormality,,Borderline ECG,"
    ",,,,,,,,,,,,,,0.005-150 Hz,60 Hz notch Baseline filter,659,40,128,170,258,518,81,77,79"
)


def mimic_row() -> dict:
    return next(csv.DictReader(io.StringIO(MIMIC_MEASUREMENTS_HEADER + "\n" + MIMIC_MEASUREMENTS_ROW + "\n")))


def test_vendored_mimic_row_is_the_real_one():
    path = SHARED_DATA / "mimic_iv_ecg_metadata" / "machine_measurements.csv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert path.read_text().splitlines() == [MIMIC_MEASUREMENTS_HEADER, MIMIC_MEASUREMENTS_ROW]


def test_mimic_report_joins_in_order_and_skips_blanks():
    row = mimic_row()
    assert row["report_2"] == ""
    assert join_mimic_report(row) == "Sinus rhythm. Possible right atrial abnormality. Borderline ECG"


def test_mimic_report_rules():
    row = {"report_0": "  Sinus  rhythm. ", "report_1": float("nan"), "report_3": "Normal ECG", "report_17": " "}
    assert join_mimic_report(row) == "Sinus rhythm. Normal ECG"
    assert join_mimic_report({}) == ""


def test_clean_report():
    assert clean_report("sinus rhythm.   normal\tecg. ") == "sinus rhythm. normal ecg."
    assert clean_report(None) == clean_report(float("nan")) == clean_report(" ") == ""


def test_ptbxl_report_languages_on_real_reports():
    reports = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv", index_col="ecg_id")["report"]
    assert reports[1] == "sinusrhythmus periphere niederspannung" and report_language(reports[1]) == "de"
    assert reports[443] == " " and report_language(reports[443]) == ""
    english = reports[reports.str.startswith("sinus rhythm. normal ecg")]
    swedish = reports[reports.str.startswith("sinusrytm")]
    assert len(english) > 10 and {report_language(text) for text in english} == {"en"}
    assert len(swedish) > 10 and {report_language(text) for text in swedish} == {"sv"}
    counts = pd.Series([report_language(text) for text in reports]).value_counts().to_dict()
    assert counts == {"de": 269, "en": 160, "sv": 70, "": 1}


def test_the_curators_edit_note_is_cut_off_every_real_ptbxl_report_and_kept_whole():
    table = pd.read_csv(SHARED_DATA / "ptbxl_metadata_full" / "ptbxl_database_v1.0.1.csv", index_col="ecg_id")
    split = {ecg_id: split_ptbxl_edit_note(text) for ecg_id, text in table["report"].items()}
    with_note = {ecg_id: parts for ecg_id, parts in split.items() if parts[1]}
    assert len(with_note) == 557  # every report holding "Edit:" (v1.0.1)
    assert not any("edit:" in report.casefold() for report, _ in split.values())
    for ecg_id, (report, note) in with_note.items():  # nothing lost: report + the note give the cleaned csv text
        assert report and f"{report} Edit: {note}".strip() == clean_report(table.at[ecg_id, "report"]), ecg_id
    assert split[293] == ("sinus rhythm. normal ecg.", "NORM 100, (NORM 100)")
    assert split[480] == ("sinus rhythm. no definite pathology.", "NORM 100,")
    assert split[1] == ("sinusrhythmus periphere niederspannung", "")
    assert split_ptbxl_edit_note(float("nan")) == ("", "")


def test_report_language_undetermined():
    assert report_language("12345 ...") == "und"


def test_ekg_is_english_too_and_german_only_where_nothing_else_marks_the_report():
    """ "EKG" is American English as well as German: English reports that write it are English (they were "de"), and
    it still tags PTB-XL's German reports whose only marker it is."""
    assert report_language("Sinus bradycardia. Normal EKG.") == "en"
    assert report_language("Sinus tachycardia. Abnormal EKG.") == "en"
    assert report_language("sinus rhythm. normal ekg") == "en"
    assert report_language("EKG: sinus rhythm") == "en"
    assert report_language("sinusrhythmus normales ekg") == "de"
    assert report_language("schrittmacher ekg") == "de"
    assert report_language("sinus arytmi eljest normalt ekg") == "sv"
