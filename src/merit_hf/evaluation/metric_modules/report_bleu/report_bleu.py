"""BLEU-1..4 for generated ECG reports, offline (sacrebleu), as a local `evaluate` module.

Load it with `evaluate.load("<path to this folder>")`: the Hub's `bleu` script needs a download, this one does not.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level cumulative BLEU-n for n = 1..4 (Papineni et al., 2002) computed by sacrebleu: the geometric mean of the
modified 1..n-gram precisions over the whole corpus times the brevity penalty, with sacrebleu's `13a` tokenizer,
lower-casing, and `exp` smoothing (the k-th order with no matching n-gram gets precision 1 / (2^k * its number of
predicted n-grams); Chen & Cherry, 2014, method 3), one reference per prediction. An order of which the predictions
hold no n-gram at all (every prediction shorter than n tokens) is not smoothed: BLEU-n is then 0. Scores are in
[0, 1] (sacrebleu's 0-100 divided by 100).
"""

_CITATION = """
@inproceedings{papineni2002bleu, title={BLEU: a method for automatic evaluation of machine translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing}, booktitle={ACL}, year={2002}}
@inproceedings{post2018sacrebleu, title={A Call for Clarity in Reporting BLEU Scores}, author={Post, Matt},
  booktitle={WMT}, year={2018}}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated reports.
    references (`list[str]`): one reference report per prediction.
Returns:
    `bleu_1` .. `bleu_4` (`float` in [0, 1]) and `signature` (sacrebleu's reproducibility string for BLEU-4).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportBleu(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        features = datasets.Features({"predictions": text, "references": text})
        info = evaluate.MetricInfo(_DESCRIPTION, _CITATION, features, _KWARGS_DESCRIPTION)
        info.reference_urls = ["https://github.com/mjpost/sacrebleu"]
        return info

    def _compute(self, predictions, references):
        results = {}
        for order in range(1, 5):
            bleu = sacrebleu.metrics.BLEU(max_ngram_order=order, smooth_method="exp", tokenize="13a", lowercase=True)
            results[f"bleu_{order}"] = bleu.corpus_score(list(predictions), [list(references)]).score / 100.0
            signature = str(bleu.get_signature())
        results["signature"] = signature
        return results
