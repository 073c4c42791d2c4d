"""ROUGE-1 / ROUGE-2 / ROUGE-L for generated ECG reports, offline (rouge-score), as a local `evaluate` module.

Load it with `evaluate.load("<path to this folder>")`: the Hub's `rouge` script needs a download, this one does not.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE-N (N = 1, 2) and ROUGE-L (Lin, 2004) by Google's rouge-score package with the Porter stemmer on: the F1 of
unigram / bigram overlap and of the longest common subsequence between a prediction and its reference (tokens:
lower-cased runs of letters and digits), averaged over prediction-reference pairs. Scores are in [0, 1].
"""

_CITATION = """
@inproceedings{lin2004rouge, title={ROUGE: A Package for Automatic Evaluation of Summaries}, author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out}, year={2004}}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated reports.
    references (`list[str]`): one reference report per prediction.
Returns:
    `rouge1`, `rouge2`, `rougeL` (`float` in [0, 1]): mean F1 over pairs.
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportRouge(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        features = datasets.Features({"predictions": text, "references": text})
        info = evaluate.MetricInfo(_DESCRIPTION, _CITATION, features, _KWARGS_DESCRIPTION)
        info.reference_urls = ["https://github.com/google-research/google-research/tree/master/rouge"]
        return info

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)
            for rouge_type in ROUGE_TYPES:
                totals[rouge_type] += scores[rouge_type].fmeasure
        count = max(len(predictions), 1)
        return {rouge_type: total / count for rouge_type, total in totals.items()}
