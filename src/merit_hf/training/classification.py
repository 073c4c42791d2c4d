"""Fine-tuning `MeritForEcgClassification` with `transformers.Trainer`, default arguments and all.

`Trainer` keeps only the dataset columns that the model's `forward` takes (`remove_unused_columns=True`), so the rows
must already hold the model inputs, as in transformers' audio and image classification examples:
`add_trainer_columns` adds `ecg_values` (the feature extractor's output, centre-cropped) and multi-hot `labels`
(records without a label of the set are left out, as in the probe protocol); `MeritCollator` stacks them. Pass the
feature extractor as `processing_class` and `Trainer.save_model` writes `preprocessor_config.json` beside the
weights, so the output folder loads with `trust_remote_code=True` and passes
`python -m merit_hf.hub push`. `compute_metrics_for(label_names)` reports the project's metrics
(`merit_hf.evaluation.metrics`).

Example (the README recipe):

```python
>>> from transformers import Trainer, TrainingArguments
>>> from merit_hf import MeritFeatureExtractor, MeritForEcgClassification
>>> from merit_hf.data import MeritCollator, build_ptbxl, label_names
>>> from merit_hf.training.classification import add_trainer_columns, compute_metrics_for
>>> ptbxl = build_ptbxl("data/ptbxl_sample")
>>> names = label_names(ptbxl, "superclass")
>>> feature_extractor = MeritFeatureExtractor.from_pretrained("quickstart_output/model")
>>> model = MeritForEcgClassification.from_pretrained(
...     "quickstart_output/model", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
... )  # doctest: +SKIP
>>> data = add_trainer_columns(ptbxl, feature_extractor, "superclass")
>>> trainer = Trainer(model, TrainingArguments("superclass_ft"), data_collator=MeritCollator(feature_extractor),
...                   train_dataset=data["train"], eval_dataset=data["validation"],
...                   processing_class=feature_extractor, compute_metrics=compute_metrics_for(names))  # doctest: +SKIP
>>> trainer.train(); trainer.save_model()  # doctest: +SKIP
```

Precomputed inputs are fixed: the random-crop augmentation of the probe protocol's fine-tuning is not applied. For
it, do as `merit_hf.training.finetune` does: keep the raw columns (`TrainingArguments(remove_unused_columns=False)`)
and give `MeritCollator(feature_extractor, label_set=..., num_classes=...)` a feature extractor with `crop="random"`
(`merit_hf.data.collator.with_crop`); evaluation rows that hold precomputed centre-cropped `ecg_values` are stacked as they are.
Raw training rows keep records without a label of the set: leave them out as the protocol does
(`merit_hf.evaluation.probe.labeled_dataset_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data.collator import precompute_ecg_values
from ..data.labels import label_names as dataset_label_names
from ..data.labels import multi_hot
from ..evaluation.metrics import classification_metrics

logger = logging.getLogger(__name__)


def add_trainer_columns(dataset, feature_extractor, label_set: str, batch_size: int = 64, num_proc: int | None = None):
    """`dataset` (a `Dataset` or `DatasetDict` in the merit_hf schema: PTB-XL, MIMIC-IV-ECG, a converted WFDB
    folder) with the two columns `MeritForEcgClassification.forward` takes: `ecg_values` `(num_leads, num_samples)`
    float32 and `labels`, the multi-hot float32 vector of `label_set` (a `List(ClassLabel)` column), with what
    `precompute_ecg_values` stores beside `ecg_values` (the masks the feature extractor returns, which `forward` takes
    too, and `ecg_values_settings`). The other columns stay; `Trainer` drops them.

    Records without a class of `label_set` are left out (logged), as the probe protocol leaves them out of every split
    (`merit_hf.evaluation.probe.probe_rows`, after the PTB-XL benchmark): their all-zero targets would train "no
    class" on records that were never annotated for the set (two thirds of PTB-XL's records for `form`), and
    `compute_metrics_for` would score validation rows that the protocol does not."""
    from datasets import DatasetDict, List, Value

    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {
                name: add_trainer_columns(part, feature_extractor, label_set, batch_size, num_proc)
                for name, part in dataset.items()
            }
        )
    num_classes = len(dataset_label_names(dataset, label_set))
    labeled = dataset.filter(lambda indices: len(indices) > 0, input_columns=label_set, desc=f"{label_set} labeled")
    if len(labeled) < len(dataset):
        logger.info("add_trainer_columns: left out %d of %d records without a %s label", len(dataset) - len(labeled),
                    len(dataset), label_set)  # fmt: skip
    with_values = precompute_ecg_values(labeled, feature_extractor, batch_size=batch_size, num_proc=num_proc)
    features = with_values.features.copy()
    features["labels"] = List(Value("float32"), length=num_classes)
    return with_values.map(
        lambda batch: {"labels": [multi_hot(indices, num_classes) for indices in batch[label_set]]},
        batched=True,
        features=features,
        desc=f"{label_set} labels",
    )


def compute_metrics_for(
    label_names: Sequence[str], num_bootstrap: int = 0, seed: int = 0
) -> Callable[[Any], dict[str, float]]:
    """A `Trainer(compute_metrics=...)` function: macro AUROC, MERL's max-F1-over-thresholds (named as such) and the
    AUROC of every class (`auroc_<label>`), from `merit_hf.evaluation.metrics.classification_metrics` on the logits.
    A metric that cannot be computed (a class without positives in the split) is NaN, never dropped. The
    validation-tuned `macro_f1` of the probe protocol needs thresholds from another split, so it is not here."""
    names = list(label_names)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        results = classification_metrics(
            np.asarray(labels), np.asarray(logits, dtype=np.float64), names, num_bootstrap=num_bootstrap, seed=seed
        )
        metrics = {name: _number(entry["value"]) for name, entry in results["metrics"].items()}
        for name, entry in results["metrics"].items():
            if "ci_low" in entry:
                metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = (
                    _number(entry["ci_low"]),
                    _number(entry["ci_high"]),
                )
        metrics.update({f"auroc_{label}": _number(entry["auroc"]) for label, entry in results["per_class"].items()})
        return metrics

    return compute_metrics


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


__all__ = ["add_trainer_columns", "compute_metrics_for"]
