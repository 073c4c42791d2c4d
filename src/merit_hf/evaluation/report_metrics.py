"""Offline metrics for generated ECG reports: BLEU-1..4, ROUGE-1/2/L, METEOR and a label-based clinical accuracy.

Published ECG report scores are not comparable with each other: each repository tokenises, smooths and picks
references differently (`notes/genanchors.md` §1.4). Every number here therefore carries its definition
(`REPORT_METRIC_DEFINITIONS`, printed by `format_report_metrics`). The n-gram metrics are local `evaluate` modules in
`metric_modules/` (the Hub's `bleu` / `rouge` / `meteor` scripts need a download): sacrebleu, rouge-score, and NLTK with
WordNet 3.0 from `NLTK_DATA`. Nothing here downloads anything.

References must be English: a reference tagged as another language by `merit_hf.data.reports.report_language`
(PTB-XL's German and Swedish reports) raises, because n-gram overlap across languages measures nothing.

Clinical accuracy: n-gram overlap does not say whether a report is right. `REPORT_STATEMENTS` maps 20 common ECG
statements to regular expressions over English report text; each report becomes the set of statements it mentions,
and `clinical_macro_f1` is the mean over statements present in at least one reference of the per-statement F1
(scikit-learn, generated vs reference sets). A negated mention ("no atrial fibrillation") still counts as a mention
(no negation handling): this is a coarse, reproducible check, not a clinical judgement.

Diversity: a model that writes one sentence for every ECG (the most frequent training report) scores as well as that
constant report on every overlap metric, so the scores alone cannot tell it from a model that reads the ECG.
`report_diversity` counts the distinct generated reports (`distinct_report_fraction`, `num_distinct_reports`,
`top_report_share`), beside the same numbers for the references.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from ..data.reports import clean_report, report_language

METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"
ACCEPTED_REFERENCE_LANGUAGES = ("en", "und")
# What the metric modules import (module -> pip name), all in merit_hf's `report` extra; METEOR needs WordNet as well.
REPORT_METRIC_PACKAGES = {
    "evaluate": "evaluate",
    "sacrebleu": "sacrebleu",
    "rouge_score": "rouge-score",
    "nltk": "nltk",
}

# Named apart from `merit_hf.evaluation.metrics.METRIC_DEFINITIONS` (the classification metrics of a results JSON).
REPORT_METRIC_DEFINITIONS = {
    **{
        f"bleu_{n}": f"corpus BLEU-{n} (cumulative 1..{n}-gram precisions x brevity penalty), sacrebleu 13a tokens, "
        "lower-cased, exp smoothing, 1 reference"
        for n in range(1, 5)
    },
    "rouge1": "ROUGE-1 F1 (unigram overlap), rouge-score with Porter stemming, mean over pairs",
    "rouge2": "ROUGE-2 F1 (bigram overlap), rouge-score with Porter stemming, mean over pairs",
    "rougeL": "ROUGE-L F1 (longest common subsequence), rouge-score with Porter stemming, mean over pairs",
    "meteor": "METEOR (NLTK meteor_score, alpha 0.9 beta 3 gamma 0.5; exact, stem and WordNet 3.0 synonym matches), "
    "regex [a-z0-9]+ tokens, mean over pairs",
    "clinical_macro_f1": "macro F1 over the REPORT_STATEMENTS present in >= 1 reference: statements found by regex "
    "in generated vs reference reports (sklearn f1_score, zero_division=0); negations are not handled",
    "distinct_report_fraction": "distinct generated reports / reports (after clean_report, lower-cased, whitespace "
    "collapsed); 1 / n when one report is written for every ECG",
    "top_report_share": "share of the reports that are the most frequent generated report (same normalisation)",
    "reference_distinct_fraction": "distinct reference reports / reports (same normalisation), for comparison",
}

# Statement -> pattern over lower-cased English text. Built from PTB-XL's English reports and SCP statement names.
REPORT_STATEMENTS = {
    "sinus_rhythm": r"\bsinus rhythm\b",
    "sinus_bradycardia": r"\bsinus bradycardia\b",
    "sinus_tachycardia": r"\bsinus tachycardia\b",
    "sinus_arrhythmia": r"\bsinus arrhythmia\b",
    "atrial_fibrillation": r"\batrial fibrillation\b",
    "atrial_flutter": r"\batrial flutter\b",
    "normal_ecg": r"\bnormal ecg\b|\bno definite pathology\b|\bwithin normal limits\b",
    "premature_ventricular_contraction": r"\bpremature ventricular|\bventricular (?:extrasystole|ectopic)",
    "premature_atrial_contraction": r"\b(?:premature atrial|atrial premature|supraventricular extrasystole)",
    "first_degree_av_block": r"\b(?:first|1st) degree a-?v block\b|\bprolonged pr\b",
    "left_bundle_branch_block": r"\bleft bundle branch block\b|\blbbb\b",
    "right_bundle_branch_block": r"\bright bundle branch block\b|\brbbb\b",
    "left_axis_deviation": r"\bleft axis deviation\b",
    "right_axis_deviation": r"\bright(?:ward)? axis\b",
    "left_ventricular_hypertrophy": r"\bleft ventricular hypertrophy\b|\blvh\b",
    "myocardial_infarction": r"\binfarct(?:ion)?\b",
    "ischaemia": r"\bischa?emi[ac]\b",
    "st_depression": r"\bst (?:segments? )?(?:are |is )?depress|\bst depression\b",
    "t_wave_abnormality": r"\bt waves? (?:are |is )?(?:low|flat|invert)|\bt wave (?:flattening|inversion|changes)|\bst-t\b",
    "low_voltage": r"\blow (?:limb lead |qrs )?voltage\b",
}
_STATEMENT_PATTERNS = {name: re.compile(pattern) for name, pattern in REPORT_STATEMENTS.items()}


def check_reports(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise `ValueError` naming the pair for length mismatch, a reference that is not one string (several
    references per report are not supported), an empty reference or a non-English reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} generated reports for {len(references)} references")
    if not references:
        raise ValueError("no reports to score")
    for index, reference in enumerate(references):
        if not isinstance(reference, str):  # e.g. several references for one report, which no module here scores
            raise ValueError(
                f"reference {index}: one reference string per report is scored, got "
                f"{type(reference).__name__} {reference!r}"
            )
        if not clean_report(reference):
            raise ValueError(f"reference {index}: empty reference report {reference!r}; drop the pair")
        language = report_language(reference)
        if language not in ACCEPTED_REFERENCE_LANGUAGES:
            raise ValueError(
                f"reference {index}: report is in language {language!r} ({reference[:60]!r}), expected English; "
                "drop or translate non-English references first (PTB-XL: report_language != 'en')"
            )


@cache
def load_report_metric_module(name: str):
    """The local `evaluate` module `report_<name>` (`bleu`, `rouge` or `meteor`), loaded once per process."""
    import evaluate

    return evaluate.load(str(METRIC_MODULES_DIR / f"report_{name}"))


def wordnet_available() -> bool:
    """Whether NLTK finds WordNet on `NLTK_DATA` where its corpus loader looks (a folder, or the zip that
    `python -m nltk.downloader wordnet` writes), without loading it."""
    import nltk.data

    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            pass
    return False


def extract_statements(report: str) -> set[str]:
    """The `REPORT_STATEMENTS` a report mentions."""
    text = clean_report(report).lower()
    return {name for name, pattern in _STATEMENT_PATTERNS.items() if pattern.search(text)}


def clinical_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Label-based agreement: `clinical_macro_f1` and the per-statement F1 of statements found in the references."""
    names = list(REPORT_STATEMENTS)
    predicted = np.array([[name in extract_statements(text) for name in names] for text in predictions], dtype=int)
    expected = np.array([[name in extract_statements(text) for name in names] for text in references], dtype=int)
    present = [index for index in range(len(names)) if expected[:, index].any()]
    if not present:
        return {"clinical_macro_f1": float("nan"), "clinical_f1_per_statement": {}}
    per_statement = f1_score(expected[:, present], predicted[:, present], average=None, zero_division=0)
    return {
        "clinical_macro_f1": float(np.mean(per_statement)),
        "clinical_f1_per_statement": {names[i]: float(score) for i, score in zip(present, per_statement)},
    }


def _normalised_report(report: str) -> str:
    return " ".join(clean_report(report).lower().split())


def report_diversity(predictions: Sequence[str], references: Sequence[str] | None = None) -> dict:
    """How many different reports were written: `num_distinct_reports`, `distinct_report_fraction` (distinct / n),
    `top_report_share` (count of the most frequent report / n) and `top_report` (its text); with `references`, also
    `reference_num_distinct` and `reference_distinct_fraction`, what a model that writes each ECG's own report would
    reach. Reports are compared after `clean_report`, lower-casing and collapsing whitespace, so that "Sinus rhythm."
    and "sinus rhythm. " count as one report."""
    if not predictions:
        raise ValueError("no generated reports to count")
    counts = Counter(_normalised_report(text) for text in predictions)
    top_report, top_count = counts.most_common(1)[0]
    results = {
        "num_distinct_reports": len(counts),
        "distinct_report_fraction": len(counts) / len(predictions),
        "top_report_share": top_count / len(predictions),
        "top_report": top_report,
    }
    if references is not None:
        reference_count = len({_normalised_report(text) for text in references})
        results["reference_num_distinct"] = reference_count
        results["reference_distinct_fraction"] = reference_count / len(references)
    return results


def compute_report_metrics(predictions: Sequence[str], references: Sequence[str], meteor: bool = True) -> dict:
    """All report metrics of generated `predictions` against one English reference each.

    `meteor=False` skips METEOR (for machines without WordNet). See `REPORT_METRIC_DEFINITIONS` for every number.
    """
    predictions = [clean_report(text) for text in predictions]
    check_reports(predictions, references)
    references = [clean_report(text) for text in references]
    results: dict = {}
    for name in ("bleu", "rouge", "meteor") if meteor else ("bleu", "rouge"):
        results.update(load_report_metric_module(name).compute(predictions=predictions, references=references))
    results["bleu_signature"] = results.pop("signature")
    results.update(clinical_accuracy(predictions, references))
    results.update(report_diversity(predictions, references))
    results["num_reports"] = len(references)
    return results


def format_report_metrics(results: dict) -> str:
    """One line per number: `name  value  definition`."""
    lines = []
    for name, definition in REPORT_METRIC_DEFINITIONS.items():
        if name in results:
            lines.append(f"{name:<18} {results[name]:.4f}  {definition}")
    return "\n".join(lines)


__all__ = [
    "METRIC_MODULES_DIR",
    "REPORT_METRIC_DEFINITIONS",
    "REPORT_METRIC_PACKAGES",
    "REPORT_STATEMENTS",
    "check_reports",
    "clinical_accuracy",
    "compute_report_metrics",
    "extract_statements",
    "format_report_metrics",
    "load_report_metric_module",
    "report_diversity",
    "wordnet_available",
]
