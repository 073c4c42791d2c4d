"""Multi-label classification metrics for PTB-XL, with their definitions as data.

Published PTB-XL numbers for the same method differ by up to 31 points between papers, partly because "F1" means
different things. Every number we report therefore carries its name from `METRIC_DEFINITIONS`:

- `macro_auroc`: mean over classes of the per-class ROC AUC (equal to `sklearn.metrics.roc_auc_score` per column;
  computed from ranks so that 1000 bootstrap resamples of 71 classes take seconds, not minutes).
- `macro_f1`: mean over classes of the per-class F1 at a threshold per class **chosen on the validation split**
  (the threshold that maximises that class's F1 there; of tied thresholds the highest, see `best_f1_thresholds`),
  then applied unchanged to the test split. A class with no positive in the validation split gets the threshold
  `+inf` (predict nothing: no threshold is invented), so its test F1 is 0 and, since the test split holds it, it
  stays in the macro mean.
- `macro_f1_max_over_thresholds`: mean over classes of the per-class **best** F1 over all thresholds of the
  precision-recall curve **on the test split itself** (MERL's zero-shot "F1"). It peeks at the test labels, so it is
  an upper bound and never comparable to `macro_f1`.

A class with no positive (or no negative) example in a split has no AUROC there. It is reported by name in
`absent_classes` and left out of the macro mean; it is never silently dropped. Confidence intervals are percentile
bootstrap intervals over records (`bootstrap_ci`). A resample is kept only if it holds every class the split holds
(a positive and a negative; the PTB-XL benchmark of Strodthoff et al. 2021 asks only for a positive of each class),
so that every resample averages over the same classes as the point estimate. Dropping the absent classes per resample instead would drop exactly the rare,
low-scoring ones and shift the interval above the estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

logger = logging.getLogger(__name__)

METRIC_DEFINITIONS = {
    "macro_auroc": "mean over classes of the per-class ROC AUC (= sklearn roc_auc_score per class); classes without "
    "both a positive and a negative example in the split are listed in absent_classes and excluded from the mean",
    "macro_f1": "mean over classes of the per-class F1 (= sklearn f1_score, zero_division=0) at one threshold per "
    "class chosen to maximise that class's F1 on the validation split; absent classes excluded as for AUROC",
    "macro_f1_max_over_thresholds": "mean over classes of the best per-class F1 over all precision-recall-curve "
    "thresholds on the evaluated split itself (MERL's zero-shot F1); an optimistic upper bound, not comparable to "
    "macro_f1",
    "per_class_auroc": "ROC AUC of each class on the evaluated split; null for an absent class",
    "ci": "95% percentile bootstrap interval over records (resampled with replacement, seeded; only resamples holding "
    "every class present in the split, with a positive and a negative, are kept; Strodthoff et al. 2021 keep those with "
    "a positive of every class)",
}


def check_evaluation_counts(num_bootstrap: int = 0, batch_size: int = 1) -> None:
    """Refuse a negative `num_bootstrap` (0 turns the intervals off) and a `batch_size` below 1, naming the setting:
    checked where an evaluation starts, not when its bootstrap runs, after the scoring (or a fine-tune)."""
    if num_bootstrap < 0:
        raise ValueError(f"num_bootstrap: must be >= 0 (0: no confidence intervals), got {num_bootstrap}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")


def _check_arrays(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_score.shape != y_true.shape:
        raise ValueError(
            f"y_true and y_score must both be (num_records, num_classes); got {y_true.shape} and {y_score.shape}"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be multi-hot (0/1 only)")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or inf")
    return y_true.astype(np.int64), y_score


def present_classes(y_true: np.ndarray) -> np.ndarray:
    """Boolean mask of the classes with at least one positive and one negative record."""
    positives = np.asarray(y_true).sum(axis=0)
    return (positives > 0) & (positives < len(y_true))


def per_class_auroc(y_true: Any, y_score: Any) -> np.ndarray:
    """ROC AUC of each class; NaN where a class is absent (all 0 or all 1) in `y_true`.

    Computed for all classes at once as the Mann-Whitney U statistic over average ranks (ties count one half), which
    is exactly `sklearn.metrics.roc_auc_score` per column (the tests check this) and ~100x faster, which the
    bootstrap needs.
    """
    y_true, y_score = _check_arrays(y_true, y_score)
    positives = y_true.sum(axis=0)
    negatives = len(y_true) - positives
    ranks = rankdata(y_score, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = ((ranks * y_true).sum(axis=0) - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where(present_classes(y_true), auroc, np.nan)


def macro_auroc(y_true: Any, y_score: Any) -> float:
    """Mean per-class ROC AUC over the classes present in `y_true` (NaN if none is)."""
    return _nanmean(per_class_auroc(y_true, y_score))


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _f1_at_every_threshold(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one class: the distinct scores (descending) and the F1 of predicting `score >= each of them`."""
    order = np.argsort(-y_score, kind="mergesort")
    scores, labels = y_score[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_tie]
    predicted = last_of_tie + 1
    f1 = 2 * true_positives / (predicted + labels.sum())
    return scores[last_of_tie], f1


def best_f1_thresholds(y_true: Any, y_score: Any) -> np.ndarray:
    """Per class, the score threshold (predict `score >= threshold`) that maximises F1 on (`y_true`, `y_score`);
    `+inf` for a class without positives (predict nothing), so that a threshold chosen on validation never invents
    positives.

    The candidates are the class's distinct scores, the thresholds of `sklearn.metrics.precision_recall_curve`, and
    the best F1 is the same as there (the tests check this). Ties: when several thresholds give the same best F1, this
    picks the **highest** of them (the fewest records predicted positive). A recomputation that takes the first
    maximum over `precision_recall_curve`'s thresholds (`np.argmax` of its F1), which run from low to high, picks the
    **lowest** one instead: same F1 here, but another test F1 when the threshold is applied to another split. The
    results shipped so far were computed with this rule, and it stays."""
    y_true, y_score = _check_arrays(y_true, y_score)
    thresholds = np.full(y_true.shape[1], np.inf)
    for c in range(y_true.shape[1]):
        if y_true[:, c].sum() == 0:
            continue
        candidates, f1 = _f1_at_every_threshold(y_true[:, c], y_score[:, c])
        thresholds[c] = candidates[int(np.argmax(f1))]
    return thresholds


def per_class_f1(y_true: Any, y_score: Any, thresholds: Any) -> np.ndarray:
    """F1 of each class, predicting positive where `y_score >= thresholds[class]` (0 when nothing is predicted, as
    `sklearn.metrics.f1_score(zero_division=0)`); NaN for an absent class."""
    y_true, y_score = _check_arrays(y_true, y_score)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (y_true.shape[1],):
        raise ValueError(f"thresholds must have one value per class ({y_true.shape[1]}), got {thresholds.shape}")
    predictions = y_score >= thresholds[None, :]
    true_positives = (predictions & (y_true == 1)).sum(axis=0)
    denominator = predictions.sum(axis=0) + y_true.sum(axis=0)
    f1 = np.divide(2 * true_positives, denominator, out=np.zeros(len(thresholds)), where=denominator > 0)
    return np.where(present_classes(y_true), f1, np.nan)


def macro_f1(y_true: Any, y_score: Any, thresholds: Any) -> float:
    """Mean per-class F1 at the given per-class thresholds, over the classes present in `y_true`."""
    return _nanmean(per_class_f1(y_true, y_score, thresholds))


def macro_f1_max_over_thresholds(y_true: Any, y_score: Any) -> float:
    """MERL's zero-shot "F1": per class the best F1 over all thresholds on this very split, averaged over classes."""
    return macro_f1(y_true, y_score, best_f1_thresholds(y_true, y_score))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_score: Any,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_draws_per_resample: int = 100,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(y_true, y_score)` over records (rows), seeded.

    Only resamples that hold every class present in `y_true` (a positive and a negative) are kept, so each one is
    computed over the same classes as the point estimate; at most `max_draws_per_resample * num_resamples` are drawn
    (a warning says when fewer than `num_resamples` were kept). Resamples where the metric is undefined (NaN) are
    skipped; `(nan, nan)` if every resample is.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    y_true, y_score = _check_arrays(y_true, y_score)
    rng = np.random.default_rng(seed)
    present = present_classes(y_true)
    values = []
    for _ in range(max_draws_per_resample * num_resamples):
        rows = rng.integers(0, len(y_true), len(y_true))
        if present_classes(y_true[rows])[present].all():
            values.append(metric(y_true[rows], y_score[rows]))
            if len(values) == num_resamples:
                break
    if len(values) < num_resamples:
        logger.warning(
            "bootstrap: %d of %d resamples held every class present in the split (rare classes); the interval uses "
            "those",
            len(values),
            num_resamples,
        )
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def classification_metrics(
    y_true: Any,
    y_score: Any,
    label_names: Sequence[str],
    thresholds: Any | None = None,
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All test-split numbers in the results-JSON layout.

    Args:
        y_true: multi-hot `(num_records, num_classes)`.
        y_score: scores `(num_records, num_classes)` (logits, probabilities or similarities: only order matters for
            AUROC; thresholds must be on the same scale).
        label_names: one name per class, in column order.
        thresholds: per-class thresholds chosen on validation (`best_f1_thresholds` there); without them
            `macro_f1` is omitted (zero-shot without a validation pass).
        num_bootstrap: bootstrap resamples for the CIs (0 turns CIs off).

    Returns:
        `{"metrics": {name: {"value", "ci_low", "ci_high"}}, "per_class": {label: {"auroc", "f1", "num_positive"}},
        "absent_classes": [...], "num_records": n}`; NaN becomes `None` (JSON `null`).
    """
    check_evaluation_counts(num_bootstrap=num_bootstrap)
    y_true, y_score = _check_arrays(y_true, y_score)
    if len(label_names) != y_true.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {y_true.shape[1]} classes")
    metric_functions: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "macro_auroc": macro_auroc,
        "macro_f1_max_over_thresholds": macro_f1_max_over_thresholds,
    }
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float64)
        metric_functions["macro_f1"] = lambda t, s: macro_f1(t, s, thresholds)
    metrics = {}
    for name, function in metric_functions.items():
        entry = {"value": _nan_to_none(function(y_true, y_score))}
        if num_bootstrap:
            low, high = bootstrap_ci(function, y_true, y_score, num_resamples=num_bootstrap, seed=seed)
            entry.update(ci_low=_nan_to_none(low), ci_high=_nan_to_none(high))
        metrics[name] = entry
    aurocs = per_class_auroc(y_true, y_score)
    f1s = per_class_f1(y_true, y_score, thresholds) if thresholds is not None else np.full(len(aurocs), np.nan)
    present = present_classes(y_true)
    per_class = {
        name: {
            "auroc": _nan_to_none(aurocs[c]),
            "f1": _nan_to_none(f1s[c]),
            "num_positive": int(y_true[:, c].sum()),
        }
        for c, name in enumerate(label_names)
    }
    return {
        "metrics": metrics,
        "per_class": per_class,
        "absent_classes": [name for c, name in enumerate(label_names) if not present[c]],
        "num_records": int(len(y_true)),
    }


__all__ = [
    "METRIC_DEFINITIONS",
    "best_f1_thresholds",
    "bootstrap_ci",
    "check_evaluation_counts",
    "classification_metrics",
    "macro_auroc",
    "macro_f1",
    "macro_f1_max_over_thresholds",
    "per_class_auroc",
    "per_class_f1",
    "present_classes",
]
