"""Offline report metrics against values computed by hand on tiny strings, METEOR's WordNet synonyms, the clinical
statement F1, and the errors for empty or non-English references."""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO_ROOT  # noqa: F401  (sets HF_HUB_OFFLINE and NLTK_DATA before evaluate is imported)

REFERENCE = "the cat sat on the mat"
PREDICTION = "the cat sat on a mat"


def _module(name):
    from merit_hf.evaluation.report_metrics import load_report_metric_module

    return load_report_metric_module(name)


@pytest.fixture(scope="module")
def wordnet():
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        pytest.skip(
            "WordNet 3.0 not found on NLTK_DATA: METEOR needs it. .ci/setup_env.sh copies it from Debian's "
            "wordnet-base + wordnet-sense-index into .venv/nltk_data"
        )
    return wordnet


def test_bleu_matches_hand_computed_precisions():
    # Modified n-gram precisions of PREDICTION against REFERENCE: 5/6, 3/5, 2/4, 1/3; equal lengths, so BP = 1.
    results = _module("bleu").compute(predictions=[PREDICTION], references=[REFERENCE])
    assert results["bleu_1"] == pytest.approx(5 / 6)
    assert results["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert results["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3))
    assert results["bleu_4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))
    assert "smooth:exp" in results["signature"] and "tok:13a" in results["signature"]


def test_bleu_brevity_penalty():
    # 3 of 4 reference words, all matching: precisions 1, BP = exp(1 - 4/3).
    results = _module("bleu").compute(predictions=["sinus rhythm normal"], references=["sinus rhythm normal ecg"])
    assert results["bleu_1"] == pytest.approx(math.exp(1 - 4 / 3))


def test_bleu_exp_smoothing_by_hand():
    # 13a tokens of "a b c d e" vs "a b x d e": 1..4-gram matches 4/5, 2/4, 0/3, 0/2. sacrebleu's exp smoothing gives
    # the k-th zero order precision 1 / (2^k * its n-gram count): 1 / (2 * 3) and 1 / (4 * 2).
    results = _module("bleu").compute(predictions=["a b c d e"], references=["a b x d e"])
    assert results["bleu_3"] == pytest.approx((4 / 5 * 2 / 4 * 1 / 6) ** (1 / 3))
    assert results["bleu_4"] == pytest.approx((4 / 5 * 2 / 4 * 1 / 6 * 1 / 8) ** (1 / 4))
    # No smoothing when the predictions hold no n-gram of an order at all: exact two-word reports score BLEU-3 0.
    exact = _module("bleu").compute(predictions=["sinus rhythm", "lvh"], references=["sinus rhythm", "lvh"])
    assert exact["bleu_2"] == pytest.approx(1.0) and exact["bleu_3"] == exact["bleu_4"] == 0.0


def test_rouge_matches_hand_computed_f1():
    # ROUGE-1: 5 of 6 unigrams on both sides; ROUGE-2: 3 of 5 bigrams; ROUGE-L: LCS "the cat sat on mat" = 5.
    results = _module("rouge").compute(predictions=[PREDICTION], references=[REFERENCE])
    assert results["rouge1"] == pytest.approx(5 / 6)
    assert results["rouge2"] == pytest.approx(3 / 5)
    assert results["rougeL"] == pytest.approx(5 / 6)


def test_rouge_uses_the_stemmer():
    results = _module("rouge").compute(predictions=["waves inverted"], references=["wave inverted"])
    assert results["rouge1"] == pytest.approx(1.0)


@pytest.mark.slow
def test_meteor_matches_hand_computed_value(wordnet):
    meteor = _module("meteor")
    # Identical 6 words: Fmean 1, one chunk, penalty 0.5 * (1/6)^3.
    same = meteor.compute(predictions=[REFERENCE], references=[REFERENCE])["meteor"]
    assert same == pytest.approx(1 - 0.5 * (1 / 6) ** 3)
    # 3 of 4 reference words in one chunk: P 1, R 3/4, Fmean = 10PR / (R + 9P), penalty 0.5 * (1/3)^3.
    fmean = 10 * 1 * 0.75 / (0.75 + 9 * 1)
    partial = meteor.compute(predictions=["sinus rhythm normal"], references=["sinus rhythm normal ecg"])["meteor"]
    assert partial == pytest.approx(fmean * (1 - 0.5 * (1 / 3) ** 3))


def test_meteor_scores_a_wordnet_synonym_above_a_random_word(wordnet):
    meteor = _module("meteor")
    reference = ["the rhythm is fast and irregular"]
    synonym = meteor.compute(predictions=["the rhythm is quick and irregular"], references=reference)["meteor"]
    unrelated = meteor.compute(predictions=["the rhythm is purple and irregular"], references=reference)["meteor"]
    exact = meteor.compute(predictions=reference, references=reference)["meteor"]
    assert "quick" in {lemma.name() for synset in wordnet.synsets("fast") for lemma in synset.lemmas()}
    assert synonym == pytest.approx(exact)  # the synonym stage aligns quick with fast
    assert synonym > unrelated + 0.1


def test_meteor_without_wordnet_names_the_download_and_how_to_skip_it(tmp_path):
    """Without WordNet, METEOR's error pointed to `.ci/setup_env.sh`, which a pip install does not have. It names
    NLTK's download command and how to skip METEOR. A fresh process, since a loaded WordNet stays loaded."""
    import os
    import subprocess
    import sys

    script = (
        "import nltk.data\n"
        f"nltk.data.path[:] = [{str(tmp_path / 'no_nltk_data')!r}]\n"
        "from merit_hf.evaluation.report_metrics import compute_report_metrics\n"
        "try:\n"
        "    compute_report_metrics(['sinus rhythm'], ['sinus rhythm'])\n"
        "except LookupError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python -m nltk.downloader wordnet" in done.stdout and "meteor=False" in done.stdout
    assert "--compute_meteor false" in done.stdout


def test_clinical_accuracy_macro_f1_by_hand():
    from merit_hf.evaluation.report_metrics import clinical_accuracy, extract_statements

    assert extract_statements("Sinus rhythm. Left bundle branch block.") == {
        "sinus_rhythm",
        "left_bundle_branch_block",
    }
    references = ["sinus rhythm. normal ecg.", "atrial fibrillation. left axis deviation."]
    predictions = ["sinus rhythm. normal ecg.", "sinus rhythm. left axis deviation."]
    results = clinical_accuracy(predictions, references)
    # Statements in the references: sinus_rhythm (tp 1, fp 1 -> F1 2/3), normal_ecg (F1 1), atrial_fibrillation
    # (fn 1 -> F1 0), left_axis_deviation (F1 1): macro F1 = (2/3 + 1 + 0 + 1) / 4.
    assert results["clinical_macro_f1"] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)
    assert set(results["clinical_f1_per_statement"]) == {
        "sinus_rhythm",
        "normal_ecg",
        "atrial_fibrillation",
        "left_axis_deviation",
    }


def test_compute_report_metrics_prints_every_number_with_its_definition():
    from merit_hf.evaluation.report_metrics import (
        REPORT_METRIC_DEFINITIONS,
        compute_report_metrics,
        format_report_metrics,
    )

    results = compute_report_metrics([PREDICTION], [REFERENCE], meteor=False)
    assert results["bleu_4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))
    text = format_report_metrics(results)
    assert f"bleu_4             {results['bleu_4']:.4f}  {REPORT_METRIC_DEFINITIONS['bleu_4']}" in text.splitlines()
    assert "meteor" not in text


def test_report_diversity_counts_distinct_reports_by_hand():
    from merit_hf.evaluation.report_metrics import report_diversity

    # "Sinus rhythm. Normal ECG." and "sinus rhythm.  normal ecg." are one report after normalisation: 3 distinct of 5,
    # the most frequent written 3 times.
    predictions = [
        "Sinus rhythm. Normal ECG.",
        "sinus rhythm.  normal ecg.",
        "sinus rhythm. normal ecg.",
        "atrial fibrillation.",
        "sinus bradycardia.",
    ]
    references = ["sinus rhythm. normal ecg."] * 2 + ["atrial fibrillation.", "lvh.", "rbbb."]
    results = report_diversity(predictions, references)
    assert results["num_distinct_reports"] == 3
    assert results["distinct_report_fraction"] == pytest.approx(3 / 5)
    assert results["top_report_share"] == pytest.approx(3 / 5)
    assert results["top_report"] == "sinus rhythm. normal ecg."
    assert results["reference_num_distinct"] == 4
    assert results["reference_distinct_fraction"] == pytest.approx(4 / 5)


def test_a_collapsed_generator_scores_one_distinct_report():
    from merit_hf.evaluation.report_metrics import compute_report_metrics

    references = ["sinus rhythm. normal ecg.", "atrial fibrillation.", "sinus bradycardia. otherwise normal ecg."]
    collapsed = compute_report_metrics(["sinus rhythm. normal ecg."] * 3, references, meteor=False)
    assert collapsed["num_distinct_reports"] == 1
    assert collapsed["distinct_report_fraction"] == pytest.approx(1 / 3)
    assert collapsed["top_report_share"] == pytest.approx(1.0)
    exact = compute_report_metrics(references, references, meteor=False)
    assert exact["distinct_report_fraction"] == pytest.approx(1.0)
    assert exact["top_report_share"] == pytest.approx(1 / 3)


def test_report_diversity_of_nothing_raises():
    from merit_hf.evaluation.report_metrics import report_diversity

    with pytest.raises(ValueError, match="no generated reports to count"):
        report_diversity([])


@pytest.mark.parametrize(
    ("references", "message"),
    [
        (["sinus rhythm", " "], r"reference 1: empty reference report ' '"),
        (["sinusrhythmus normales ekg"], r"reference 0: report is in language 'de' .* expected English"),
        (["sinusrytm vänster el-axel"], r"reference 0: report is in language 'sv'"),
    ],
)
def test_bad_references_raise(references, message):
    from merit_hf.evaluation.report_metrics import check_reports

    with pytest.raises(ValueError, match=message):
        check_reports(["x"] * len(references), references)


def test_several_references_per_report_are_refused_by_name():
    from merit_hf.evaluation.report_metrics import compute_report_metrics

    message = r"reference 0: one reference string per report is scored, got list \['sinus rhythm', 'normal ecg'\]"
    with pytest.raises(ValueError, match=message):
        compute_report_metrics(["sinus rhythm"], [["sinus rhythm", "normal ecg"]], meteor=False)


def test_length_mismatch_raises():
    from merit_hf.evaluation.report_metrics import check_reports

    with pytest.raises(ValueError, match=r"2 generated reports for 1 references"):
        check_reports(["a", "b"], ["sinus rhythm"])
