"""METEOR for generated ECG reports, offline (NLTK + a local WordNet 3.0), as a local `evaluate` module.

Load it with `evaluate.load("<path to this folder>")`. Unlike the Hub's `meteor` script it never calls
`nltk.download`: WordNet must already be on `NLTK_DATA` (`python -m nltk.downloader wordnet`, or in a clone
`.ci/setup_env.sh`, which copies Debian's `wordnet-base` + `wordnet-sense-index` there), and it tokenises with a regular expression instead of punkt.
"""

import re

import datasets
import evaluate
from nltk.corpus import wordnet
from nltk.translate.meteor_score import meteor_score

_DESCRIPTION = """
METEOR (Banerjee & Lavie, 2005) by NLTK's `meteor_score` with its defaults (alpha 0.9, beta 3, gamma 0.5):
unigrams are aligned in three stages (exact, Porter stem, WordNet 3.0 synonym), the harmonic mean of precision and
recall weighted 9:1 towards recall is multiplied by (1 - 0.5 * (chunks / matches)^3), averaged over
prediction-reference pairs. Tokens: lower-cased runs of letters and digits (regex `[a-z0-9]+`), not punkt, so numbers
differ slightly from the Hub module. Scores are in [0, 1].
"""

_CITATION = """
@inproceedings{banerjee2005meteor, title={METEOR: An Automatic Metric for MT Evaluation with Improved Correlation
  with Human Judgments}, author={Banerjee, Satanjeev and Lavie, Alon}, booktitle={ACL Workshop}, year={2005}}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated reports.
    references (`list[str]`): one reference report per prediction.
Returns:
    `meteor` (`float` in [0, 1]): mean METEOR over pairs.
"""

TOKEN_PATTERN = re.compile(r"[a-z0-9]+")


def tokenize(text):
    return TOKEN_PATTERN.findall(text.lower())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReportMeteor(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        features = datasets.Features({"predictions": text, "references": text})
        info = evaluate.MetricInfo(_DESCRIPTION, _CITATION, features, _KWARGS_DESCRIPTION)
        info.reference_urls = ["https://www.nltk.org/api/nltk.translate.meteor_score.html"]
        return info

    def _download_and_prepare(self, dl_manager):
        try:
            wordnet.ensure_loaded()
        except LookupError as error:
            raise LookupError(
                "METEOR needs WordNet 3.0 on NLTK_DATA (corpora/wordnet): python -m nltk.downloader wordnet (in a "
                "clone, .ci/setup_env.sh copies Debian's instead), or skip METEOR (compute_report_metrics(..., "
                "meteor=False); report_lora: --compute_meteor false). merit_hf never downloads it."
            ) from error

    def _compute(self, predictions, references):
        scores = [
            meteor_score([tokenize(ref)], tokenize(pred), wordnet=wordnet)
            for pred, ref in zip(predictions, references)
        ]
        return {"meteor": sum(scores) / max(len(scores), 1)}
