"""Evaluation of merit_hf models: classification metrics (`metrics`), the linear-probe protocol (`probe`), zero-shot
evaluation on a labelled dataset (`zero_shot`), robustness shifts (`shifts`, `robustness`) and the results of a run
(`results.EvaluationResults`), which model cards are rendered from."""

from .metrics import METRIC_DEFINITIONS, classification_metrics, macro_auroc, macro_f1, macro_f1_max_over_thresholds
from .results import EvaluationResults, build_results, format_metric, read_results, write_results
from .zero_shot import evaluate_zero_shot, zero_shot_classify

__all__ = [
    "METRIC_DEFINITIONS",
    "EvaluationResults",
    "build_results",
    "classification_metrics",
    "evaluate_zero_shot",
    "format_metric",
    "macro_auroc",
    "macro_f1",
    "macro_f1_max_over_thresholds",
    "read_results",
    "write_results",
    "zero_shot_classify",
]
