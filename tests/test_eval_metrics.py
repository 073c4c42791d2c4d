"""Classification metrics against hand-computed values and scikit-learn; the results JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from merit_hf.evaluation.metrics import (
    best_f1_thresholds,
    bootstrap_ci,
    classification_metrics,
    macro_auroc,
    macro_f1,
    macro_f1_max_over_thresholds,
    per_class_auroc,
    per_class_f1,
    present_classes,
)
from merit_hf.evaluation.results import (
    EvaluationResults,
    MetricValue,
    build_results,
    format_metric,
    metric_cell,
    read_results,
    write_results,
)
from tests.conftest import REPO_ROOT

# 4 records, 3 classes. Class 0: positives score 0.9 and 0.4, negatives 0.6 and 0.1 -> 3 of 4 pairs ordered: 0.75.
# Class 1: perfectly ordered -> 1.0. Class 2: no positive -> absent.
Y_TRUE = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
Y_SCORE = np.array([[0.9, 0.8, 0.1], [0.6, 0.7, 0.2], [0.4, 0.3, 0.3], [0.1, 0.2, 0.4]])


def test_auroc_hand_computed_and_absent_class_reported():
    np.testing.assert_allclose(per_class_auroc(Y_TRUE, Y_SCORE)[:2], [0.75, 1.0])
    assert math.isnan(per_class_auroc(Y_TRUE, Y_SCORE)[2])
    assert macro_auroc(Y_TRUE, Y_SCORE) == pytest.approx((0.75 + 1.0) / 2)
    report = classification_metrics(Y_TRUE, Y_SCORE, ["A", "B", "C"], num_bootstrap=0)
    assert report["absent_classes"] == ["C"]
    assert report["per_class"]["C"] == {"auroc": None, "f1": None, "num_positive": 0}
    assert report["metrics"]["macro_auroc"] == {"value": pytest.approx(0.875)}


def test_ties_count_one_half():
    assert per_class_auroc([[1], [0]], [[0.5], [0.5]])[0] == pytest.approx(0.5)


def test_f1_at_validation_thresholds_hand_computed():
    # thresholds 0.5 / 0.5 / 0.5: class 0 predicts records 0, 1 -> tp 1, fp 1, fn 1 -> F1 0.5;
    # class 1 predicts records 0, 1 -> tp 2 -> F1 1.0; class 2 absent (NaN, excluded).
    thresholds = np.array([0.5, 0.5, 0.5])
    np.testing.assert_allclose(per_class_f1(Y_TRUE, Y_SCORE, thresholds)[:2], [0.5, 1.0])
    assert macro_f1(Y_TRUE, Y_SCORE, thresholds) == pytest.approx(0.75)


def test_best_thresholds_and_max_f1_variant():
    # class 0: predicting >= 0.4 gives tp 2, fp 1 -> F1 0.8, the best; class 2 has no positive -> +inf.
    thresholds = best_f1_thresholds(Y_TRUE, Y_SCORE)
    assert thresholds[0] == pytest.approx(0.4)
    assert thresholds[1] == pytest.approx(0.7)
    assert thresholds[2] == np.inf
    assert macro_f1_max_over_thresholds(Y_TRUE, Y_SCORE) == pytest.approx((0.8 + 1.0) / 2)


def test_metrics_equal_scikit_learn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, (200, 6))
    y_score = np.round(rng.normal(size=(200, 6)) + y_true, 1)
    expected_auroc = [roc_auc_score(y_true[:, c], y_score[:, c]) for c in range(6)]
    np.testing.assert_allclose(per_class_auroc(y_true, y_score), expected_auroc, atol=1e-12)
    thresholds = best_f1_thresholds(y_true, y_score)
    for c in range(6):
        precision, recall, _ = precision_recall_curve(y_true[:, c], y_score[:, c])
        best = np.max(2 * precision * recall / np.clip(precision + recall, 1e-12, None))
        assert f1_score(y_true[:, c], y_score[:, c] >= thresholds[c]) == pytest.approx(best)
    fixed = np.zeros(6)
    expected_f1 = [f1_score(y_true[:, c], y_score[:, c] >= 0, zero_division=0) for c in range(6)]
    np.testing.assert_allclose(per_class_f1(y_true, y_score, fixed), expected_f1)


def test_of_thresholds_with_the_same_best_f1_the_highest_is_chosen():
    """The tie rule, pinned (the shipped results were computed with it): predicting the top record (F1 2/3) and
    predicting all four (F1 2/3) tie; `best_f1_thresholds` takes the higher threshold, 0.9. The usual sklearn recipe,
    the first maximum over `precision_recall_curve`'s thresholds (low to high), takes the lower one, 0.6; both are
    F1-maximising on this split, and they differ on another."""
    y_true = np.array([[1], [0], [0], [1]])
    y_score = np.array([[0.9], [0.8], [0.7], [0.6]])
    assert best_f1_thresholds(y_true, y_score).tolist() == [0.9]
    precision, recall, thresholds = precision_recall_curve(y_true[:, 0], y_score[:, 0])
    f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1])
    assert f1[0] == f1[-1] == f1.max() and thresholds[np.argmax(f1)] == 0.6
    other_split = (np.array([[1], [1], [0]]), np.array([[0.95], [0.65], [0.1]]))
    assert per_class_f1(*other_split, [0.9])[0] == pytest.approx(2 / 3)
    assert per_class_f1(*other_split, [0.6])[0] == 1.0


def test_a_negative_bootstrap_count_is_refused_naming_it():
    """`num_bootstrap=-1` was taken as "on" (`if num_bootstrap:`) and failed in `bootstrap_ci` as `num_resamples`."""
    from merit_hf.evaluation.zero_shot import evaluate_zero_shot

    with pytest.raises(ValueError, match=r"^num_bootstrap: must be >= 0 \(0: no confidence intervals\), got -1$"):
        classification_metrics(Y_TRUE, Y_SCORE, ["a", "b", "c"], num_bootstrap=-1)
    with pytest.raises(ValueError, match="^num_bootstrap: must be >= 0"):  # before the model (missing) is loaded
        evaluate_zero_shot("missing-model-folder", {}, num_bootstrap=-1)
    with pytest.raises(ValueError, match="^batch_size: must be >= 1, got 0$"):
        evaluate_zero_shot("missing-model-folder", {}, batch_size=0)


def test_bootstrap_interval_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, (120, 3))
    y_score = rng.normal(size=(120, 3)) + y_true
    first = bootstrap_ci(macro_auroc, y_true, y_score, num_resamples=200, seed=3)
    assert first == bootstrap_ci(macro_auroc, y_true, y_score, num_resamples=200, seed=3)
    assert first[0] < macro_auroc(y_true, y_score) < first[1]
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(macro_auroc, y_true, y_score, confidence=1.5)


def test_bootstrap_keeps_the_class_set_of_the_estimate():
    """Rare classes (one positive each) score low; a resample that lost them would average only the good classes and
    lift the interval above the estimate. Resamples are kept only when they hold every class, so it brackets it."""
    rng = np.random.default_rng(0)
    y_true = np.zeros((300, 8), int)
    y_true[:, :4] = rng.random((300, 4)) < 0.3
    for c in range(4, 8):
        y_true[rng.integers(300), c] = 1
    y_score = rng.standard_normal(y_true.shape)
    y_score[:, :4] += 2.0 * y_true[:, :4]
    for metric in (macro_auroc, macro_f1_max_over_thresholds):
        low, high = bootstrap_ci(metric, y_true, y_score, num_resamples=200, seed=0)
        assert low < metric(y_true, y_score) < high, metric.__name__
    low, high = bootstrap_ci(macro_auroc, y_true, y_score, num_resamples=200, seed=0)
    # centred on the estimate (dropping the rare classes per resample put the centre 0.85 half-widths above it)
    assert abs((low + high) / 2 - macro_auroc(y_true, y_score)) < 0.25 * (high - low) / 2
    seen = []
    bootstrap_ci(lambda t, s: seen.append(present_classes(t).all()) or 0.0, y_true, y_score, num_resamples=50)
    assert len(seen) == 50 and all(seen)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multi-hot"):
        macro_auroc([[2, 0]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="must both be"):
        macro_auroc([[1, 0]], [[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="one value per class"):
        macro_f1(Y_TRUE, Y_SCORE, [0.5])


def test_results_json_round_trip(tmp_path):
    report = classification_metrics(Y_TRUE, Y_SCORE, ["A", "B", "C"], thresholds=[0.5] * 3, num_bootstrap=10)
    protocol = {"nan": float("nan"), "numpy": np.float32(0.5)}
    results = build_results("linear-probe", {}, "superclass", ["A", "B", "C"], 1.0, 0, protocol, report, None)
    path = write_results(results, tmp_path / "r.json")
    written = json.loads(path.read_text())
    assert list(written) == [
        "schema", "task", "dataset", "label_set", "label_names", "label_fraction", "seed", "protocol",
        "metric_definitions", "model", "baseline", "environment", "created",
    ]  # fmt: skip
    assert written["protocol"] == {"nan": None, "numpy": 0.5} and written["baseline"] is None
    assert list(written["model"]) == ["metrics", "per_class", "absent_classes", "num_records"]
    loaded = read_results(path)
    assert isinstance(loaded, EvaluationResults) and loaded.to_dict() == written
    assert loaded.model.metrics["macro_f1"].value == pytest.approx(0.75)
    assert loaded.model.metrics["macro_auroc"].ci is not None and loaded.baseline is None
    assert loaded["model"]["metrics"]["macro_f1"] == written["model"]["metrics"]["macro_f1"]  # 0.1's dict access
    (tmp_path / "other.json").write_text(json.dumps({"schema": "x"}))
    with pytest.raises(ValueError, match="other.json: not a merit_hf.results/v1"):
        read_results(tmp_path / "other.json")


@pytest.mark.parametrize(
    "name",
    [
        "linear-probe_superclass_1_seed0",
        "linear-probe_rhythm_1_seed0",
        "zero-shot_superclass_seed0",
        "robustness_superclass_seed0",
    ],
)
def test_results_files_written_before_the_dataclass_read_and_write_back_unchanged(name, tmp_path):
    path = REPO_ROOT / "benchmarks" / "results" / "evaluation" / "quickstart" / f"{name}.json"
    results = read_results(path)
    assert (
        results.model.metrics["macro_auroc"].value
        == json.loads(path.read_text())["model"]["metrics"]["macro_auroc"]["value"]
    )
    assert write_results(results, tmp_path / "again.json").read_text() == path.read_text()


def test_one_formatter_writes_every_metric_cell():
    assert format_metric(MetricValue(0.8305, (0.7594, 0.8971))) == "0.831 [0.759, 0.897]"
    assert format_metric(MetricValue(0.8305)) == "0.831"  # no bootstrap
    assert format_metric(MetricValue(0.8305, (None, None))) == "0.831"  # bootstrap undefined
    assert format_metric(MetricValue(None, (0.1, 0.2))) == format_metric(None) == "n/a"
    entry = {"metrics": {"macro_auroc": {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}}}
    assert metric_cell(entry, "macro_auroc") == "0.500 [0.250, 0.750]"
    assert metric_cell(entry, "macro_f1") == metric_cell(None, "macro_auroc") == "n/a"
