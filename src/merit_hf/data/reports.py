"""Report text: PTB-XL reports with a language tag, and MIMIC-IV-ECG reports joined from `report_0..report_17`.

Rules (both datasets): leading / trailing whitespace is stripped and runs of whitespace become one space; nothing else
is rewritten (no lower-casing, no spelling fixes, no removal of clinical phrases), so the text stays the source's.

PTB-XL writes reports in German (most), English and Swedish; some Swedish ones carry mis-encoded characters from the
original export, kept as they are. `report_language` is a tag from word markers (below): `"de"`, `"en"`, `"sv"`,
`"und"` (text with no marker) or `""` (empty report, e.g. ecg_id 443, whose report is a single space). "EKG" is
American English as well as German: it tags a report German only when no other marker is in it.

PTB-XL's curators appended a note to 557 of the 21,837 reports (v1.0.1), always last and always introduced by
`Edit:`, e.g. "sinus rhythm. normal ecg. Edit: NORM 100, (NORM 100)". It restates the SCP labels (and free comments,
often German), so left in the report it would hand the label to the text tower in contrastive pretraining, to a
zero-shot prompt match and to report generation's references. `split_ptbxl_edit_note` cuts it off: the dataset's
`report` is the cardiologist's text and `report_edit_note` keeps the note (nothing is lost).

MIMIC-IV-ECG splits the machine report over `report_0..report_17`, with blank fields in between (e.g. study 40689238:
"Sinus rhythm", "Possible right atrial abnormality", blank, "Borderline ECG"). The report is the non-blank fields
in column order, each without a trailing period, joined with ". ":
"Sinus rhythm. Possible right atrial abnormality. Borderline ECG". MIMIC reports are English (`"en"`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping


def has_report(report: str | None) -> bool:
    """Whether a row's `report` holds text: the one test of an empty report (`""`, whitespace, a missing value) that
    every user of reports applies (`drop_empty_reports`, `MeritCollator`'s `empty_report`). A float NaN (pandas'
    missing value, in rows built in Python) is missing too, not the text "nan"."""
    if report is None or (isinstance(report, float) and report != report):
        return False
    return bool(str(report).strip())


def drop_empty_reports(dataset):
    """`dataset` (a `Dataset` or `IterableDataset`) without the rows whose `report` is empty (`has_report`): the
    ECG-report pairs of pretraining and report generation, where a record without a report has nothing to align
    with or to generate. A stream keeps its rows Arrow (`merit_hf.data.streams.filter_stream`)."""
    from datasets import IterableDataset

    from .streams import filter_stream

    if isinstance(dataset, IterableDataset):
        return filter_stream(dataset, rows_with_a_report)
    return dataset.filter(has_report, input_columns=["report"])


def rows_with_a_report(batch) -> list[bool]:
    """`drop_empty_reports`' `keep` on a stream's batch (module level: DataLoader workers get the stream pickled)."""
    from .streams import column_values

    return [has_report(text) for text in column_values(batch, "report")]


MIMIC_REPORT_COLUMNS = tuple(f"report_{index}" for index in range(18))
MIMIC_REPORT_SEPARATOR = ". "
REPORT_LANGUAGES = ("de", "en", "sv", "und", "")

# Words (after case folding) that occur in one language's PTB-XL reports only. A report is tagged with the language
# that has the most marker words; a tie or no marker gives "und".
_LANGUAGE_MARKERS = {
    "de": {
        "sinusrhythmus", "normales", "linkstyp", "rechtstyp", "lagetyp", "steillage", "niederspannung",
        "periphere", "schenkelblock", "rechtsschenkelblock", "linksschenkelblock", "vorhofflimmern", "vorhofflattern",
        "arrhythmie", "sonst", "mit", "und", "nicht", "ausgeschlossen", "auszuschliessen", "wahrscheinlich", "alt",
        "infarkt", "inferiorer", "anteriorer", "unspezifisches", "unspezifische", "abnormales", "pathologische",
        "ueberdrehter", "überdrehter", "bestätigter", "unbestätigter", "bericht", "sinustachykardie",
        "sinusbradykardie", "hemiblock", "linksanteriorer", "linksposteriorer", "kammer", "vorhof", "st-senkung",
        "st-hebung", "erregungsrückbildungsstörung", "myokardschaden", "hypertrophie", "linkshypertrophie",
        "lagetypen", "überleitung", "teilweise", "bei", "jetzt", "nach", "vermutlich", "möglich", "zeichen",
        "schlechte", "neg",
    },
    "en": {
        "rhythm", "the", "with", "and", "of", "is", "are", "may", "be", "to", "due", "or", "this", "no", "not",
        "wave", "waves", "lead", "leads", "axis", "deviation", "fibrillation", "flutter", "infarction", "pathology",
        "ischaemia", "ischemia", "requested", "trace", "possible", "probable", "left", "right", "ventricular",
        "hypertrophy", "bundle", "branch", "unconfirmed", "report", "ecg", "changes", "segments",
        "depressed", "inverted", "definite", "otherwise", "voltage", "voltages", "suggesting", "excluded", "atrial",
        "arrhythmia", "complexes", "incomplete", "old", "myocardial", "consistent", "disease", "heart",
        "bradycardia", "tachycardia",
    },
    "sv": {
        "sinusrytm", "vänster", "höger", "el-axel", "skänkelblock", "vänstersidigt", "högersidigt", "inkomplett",
        "förmaksflimmer", "förmaksfladder", "sänkning", "såsom", "vid", "eller", "belastning", "kammarhypertrofi",
        "ischemi", "normalt", "avvikande", "sinustachykardi", "sinusbradykardi", "ospecifik", "ospecifikt",
        "t-förändring", "förlopp", "sannolikt", "tidigare", "utan", "och", "förändringar",
    },
}  # fmt: skip
# "ekg" is German and American English ("Sinus bradycardia. Normal EKG."), so it decides only where no marker above
# does: then German, as PTB-XL's "schrittmacher ekg" and "pacemaker ekg" are.
_FALLBACK_MARKERS = {"de": {"ekg"}}
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


def clean_report(text: object) -> str:
    """Strip the text and collapse runs of whitespace; `None` / NaN give `""`."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return " ".join(str(text).split())


_PTBXL_EDIT_NOTE = re.compile(r"\s*\bEdit:\s*")


def split_ptbxl_edit_note(text: object) -> tuple[str, str]:
    """`(report, note)` of a PTB-XL report: the text before the curators' `Edit:` note, and the note after it (`""`
    when there is none), each whitespace-normalised (`clean_report`). See the module docstring for why."""
    cleaned = clean_report(text)
    parts = _PTBXL_EDIT_NOTE.split(cleaned, maxsplit=1)
    return (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else (cleaned, "")


def report_language(text: str) -> str:
    """Language tag of a PTB-XL report: `"de"`, `"en"`, `"sv"`, `"und"` (no marker) or `""` (empty)."""
    cleaned = clean_report(text)
    if not cleaned:
        return ""
    words = _WORD.findall(cleaned.casefold())
    for table in (_LANGUAGE_MARKERS, _FALLBACK_MARKERS):  # the fallback's weaker markers only where none is found
        scores = {language: sum(word in markers for word in words) for language, markers in table.items()}
        if any(scores.values()):
            break
    best = max(scores.values())
    winners = [language for language, score in scores.items() if score == best]
    return winners[0] if best > 0 and len(winners) == 1 else "und"


def join_mimic_report(row: Mapping[str, object]) -> str:
    """The report of one `machine_measurements.csv` row: `report_0..report_17` in order, blanks skipped."""
    statements = []
    for column in MIMIC_REPORT_COLUMNS:
        statement = clean_report(row.get(column)).rstrip(".").rstrip()
        if statement:
            statements.append(statement)
    return MIMIC_REPORT_SEPARATOR.join(statements)


__all__ = [
    "MIMIC_REPORT_COLUMNS",
    "REPORT_LANGUAGES",
    "clean_report",
    "drop_empty_reports",
    "has_report",
    "join_mimic_report",
    "report_language",
    "split_ptbxl_edit_note",
]
