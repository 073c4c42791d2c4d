"""Evaluation of merit_hf models: classification metrics (`metrics`), zero-shot scoring (`zero_shot`), robustness
shifts (`shifts`, `robustness`) and the results JSON that model cards are rendered from (`results`)."""

from .metrics import METRIC_DEFINITIONS, classification_metrics, macro_auroc, macro_f1, macro_f1_max_over_thresholds
from .results import build_results, read_results, write_results
from .zero_shot import load_class_descriptions, zero_shot_classify

__all__ = [
    "METRIC_DEFINITIONS",
    "build_results",
    "classification_metrics",
    "load_class_descriptions",
    "macro_auroc",
    "macro_f1",
    "macro_f1_max_over_thresholds",
    "read_results",
    "write_results",
    "zero_shot_classify",
]
