"""Zero-shot ECG classification with MERIT's two towers: one score per (ECG, class), no softmax across classes.

A class is described by text, never by a trained head. For every class we embed each of its descriptions through
every hypothesis template, L2-normalise, average and re-normalise (prompt ensembling, as CLIP and open_clip do).
The score of an ECG for a class is the cosine similarity of the normalised ECG embedding and that class embedding
(MERL's zero-shot score, `utils/zeroshot_val.py`), in [-1, 1]. Classes are scored independently because PTB-XL
statements co-occur (`multi_label=True`); `multi_label=False` applies a softmax over the candidates, scaled by the
model's learnt temperature, for one-of-N questions.

Class descriptions are data: `prompts/ptbxl_prompts.json` holds several descriptions of every class of every PTB-XL
label set (`superclass`, `subclass`, `form`, `rhythm`, `all`), written by us from `scp_statements.csv`.

Example:

```python
>>> from merit_hf import zero_shot_classify
>>> out = zero_shot_classify(model, processor, signal, ["NORM", "MI"], class_descriptions="superclass",
...                          sampling_rate=100, lead_names=leads)  # doctest: +SKIP
>>> out["labels"], out["scores"].shape  # doctest: +SKIP
(['NORM', 'MI'], (1, 2))
```
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The prompt-ensembling helpers live in the Hub remote-code file so that a saved folder's zero-shot pipeline runs
# without merit_hf; they are re-exported here under their established names.
from ..models.merit.pipeline_merit import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    PTBXL_PROMPTS_PATH,
    _templates,
    _two_tower,
    class_prompts,
    encode_class_prompts,
    encode_ecgs,
    load_class_descriptions,
    similarity_scores,
)


def zero_shot_classify(
    model,
    processor,
    ecgs: Any = None,
    candidate_labels: Sequence[str] = (),
    hypothesis_template: str | Sequence[str] = DEFAULT_HYPOTHESIS_TEMPLATE,
    multi_label: bool = True,
    class_descriptions: Mapping[str, Sequence[str]] | str | None = None,
    sampling_rate: float | Sequence[float] | None = None,
    lead_names: Sequence[str] | None = None,
    units: str | Sequence[str] | None = "mV",
    ecg_values: torch.Tensor | None = None,
    batch_size: int = 32,
    lead_mask: torch.Tensor | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    r"""
    Score ECGs against class descriptions with a MERIT two-tower model.

    Args:
        model: a `MeritModel` (or `MeritForPreTraining`).
        processor: a `MeritProcessor` (its feature extractor validates the records, its tokenizer the prompts).
        ecgs: one record or a list, as the feature extractor takes them (arrays `(num_samples, num_leads)` with
            `sampling_rate` and `lead_names`, or WFDB paths). Alternatively pass `ecg_values`.
        candidate_labels: the classes to score, in the order the scores come back.
        hypothesis_template: a string with `{}` (or a list of them, ensembled), filled with each description.
        multi_label: `True` (default): independent per-class cosine similarities, no softmax across labels.
            `False`: a softmax over the candidates.
        class_descriptions: `None` (each label is its own description), a mapping label -> descriptions, or the
            name of a PTB-XL label set of the shipped prompt file (`"superclass"`, `"subclass"`, `"form"`, `"rhythm"`,
            `"all"`); a label it does not know raises.
        ecg_values: already extracted `(num_ecgs, num_leads, num_samples)` input instead of `ecgs`.
        lead_mask: with `ecg_values`, the feature extractor's `lead_mask` `(num_ecgs, num_leads)` (missing leads
            are left out); with `ecgs` it comes from the feature extractor (`missing_leads="mask"`).
        precision: of the ECG tower (`merit_hf.models.merit.inference_precision`): `"auto"` (default) runs bf16 weights on a GPU
            and the fastest accurate path on a CPU; `"fp32"`, `"bf16"`, `"fp16"`, `"int8"` (CPU), `"fp8"` (Hopper).
            The model is never cast: a converted copy of its ECG tower runs, kept until its weights change.

    Returns:
        `{"labels": list(candidate_labels), "scores": np.ndarray (num_ecgs, num_labels)}`.
    """
    prompts = class_prompts(candidate_labels, hypothesis_template, class_descriptions)
    if (ecgs is None) == (ecg_values is None):
        raise ValueError("give exactly one of ecgs (raw records) and ecg_values (feature-extractor output)")
    ecg_attention_mask = None
    if ecg_values is None:
        features = processor.feature_extractor(
            ecgs, sampling_rate=sampling_rate, lead_names=lead_names, units=units, return_tensors="pt"
        )
        ecg_values, ecg_attention_mask = features["ecg_values"], features.get("ecg_attention_mask")
        lead_mask = features.get("lead_mask")
    class_embeddings = encode_class_prompts(model, processor.tokenizer, prompts, max_length=processor.max_length)
    ecg_embeddings = encode_ecgs(
        model, torch.as_tensor(ecg_values), batch_size, ecg_attention_mask, lead_mask, precision
    )
    scores = similarity_scores(model, ecg_embeddings, class_embeddings, multi_label=multi_label)
    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    return {"labels": labels, "scores": scores}


def random_ecg_tower_like(model, seed: int = 0):
    """The zero-shot baseline: a copy of the two-tower model whose ECG encoder and ECG projection are re-drawn at
    random under `seed`; the text tower, its projection and the temperature are kept, so only the ECG side is
    untrained."""
    baseline = copy.deepcopy(_two_tower(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(baseline)._from_config(baseline.config)
    baseline.ecg_model.load_state_dict(fresh.ecg_model.state_dict())
    baseline.ecg_projection.load_state_dict(fresh.ecg_projection.state_dict())
    baseline.name_or_path = "random-init ECG tower"
    return baseline.eval()


def _dataset_scores(model, processor, dataset, prompts, batch_size: int) -> np.ndarray:
    from .probe import ecg_model_inputs

    class_embeddings = encode_class_prompts(model, processor.tokenizer, prompts, max_length=processor.max_length)
    columns = dataset.select_columns(["signal", "sampling_rate", "lead_names"])
    embeddings = []
    for start in range(0, len(dataset), batch_size):
        rows = columns[start : start + batch_size]
        ecg_values = ecg_model_inputs(processor.feature_extractor, rows, crop="center")["ecg_values"]
        # fp32: evaluation numbers must not depend on the CPU they were computed on
        embeddings.append(encode_ecgs(model, ecg_values, batch_size, precision="fp32"))
    return similarity_scores(model, torch.cat(embeddings), class_embeddings)


def evaluate_zero_shot(
    model_or_path,
    dataset_dict,
    label_set: str = "superclass",
    processor=None,
    hypothesis_template: str | Sequence[str] = DEFAULT_HYPOTHESIS_TEMPLATE,
    prompt_file: str | Path | None = None,
    seed: int = 0,
    baseline: bool = True,
    num_bootstrap: int = 1000,
    batch_size: int = 64,
    output_file: str | Path | None = None,
) -> dict[str, Any]:
    """Zero-shot PTB-XL evaluation of every class of `label_set` with the shipped prompts, for the model and its
    random-ECG-tower twin (`random_ecg_tower_like`), on the records with a `label_set` label (as the probe). Scores are cosine similarities; `macro_auroc` needs no
    threshold, `macro_f1` uses per-class thresholds chosen on the validation split, and
    `macro_f1_max_over_thresholds` is MERL's test-split "F1". Returns the results dict
    (`merit_hf.evaluation.results`)."""
    from .metrics import best_f1_thresholds, classification_metrics
    from .probe import label_matrix, label_names, labeled_dataset_dict
    from .results import build_results, write_results

    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(model_or_path)).eval()
        processor = processor or AutoProcessor.from_pretrained(str(model_or_path))
    else:
        model = model_or_path.eval()
    # a model instance is named by where it was loaded from (its repr is the whole module tree)
    model_name = (
        str(model_or_path) if isinstance(model_or_path, (str, Path)) else model.name_or_path or type(model).__name__
    )
    if processor is None:
        raise ValueError("evaluate_zero_shot needs a processor (MeritProcessor) when given a model instance")
    dataset_dict = labeled_dataset_dict(dataset_dict, label_set)
    names = label_names(dataset_dict["test"], label_set)
    descriptions = load_class_descriptions(label_set, prompt_file)
    prompts = class_prompts(names, hypothesis_template, descriptions)
    models = {"model": _two_tower(model)}
    if baseline:
        models["baseline"] = random_ecg_tower_like(model, seed)
    entries = {}
    for role, role_model in models.items():
        validation_scores = _dataset_scores(role_model, processor, dataset_dict["validation"], prompts, batch_size)
        test_scores = _dataset_scores(role_model, processor, dataset_dict["test"], prompts, batch_size)
        thresholds = best_f1_thresholds(label_matrix(dataset_dict["validation"], label_set), validation_scores)
        entries[role] = {
            "name_or_path": model_name if role == "model" else "random-init ECG tower",
            "init": "pretrained" if role == "model" else f"ECG encoder + projection random (seed {seed})",
            **classification_metrics(
                label_matrix(dataset_dict["test"], label_set), test_scores, names, thresholds, num_bootstrap, seed
            ),
        }
    protocol = {
        "scores": "cosine similarity of L2-normalised ECG and class embeddings; no softmax across classes",
        "prompts": str(prompt_file or PTBXL_PROMPTS_PATH),
        "hypothesis_templates": _templates(hypothesis_template),
        "prompt_ensembling": "mean of normalised prompt embeddings per class, re-normalised",
        "f1_thresholds": "per class, the F1-maximising threshold on the validation split",
        "num_bootstrap": num_bootstrap,
    }
    results = build_results(
        task="zero-shot",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=names,
        label_fraction=None,
        seed=seed,
        protocol=protocol,
        model=entries["model"],
        baseline=entries.get("baseline"),
        dataset_extra={
            "num_records": {split: len(dataset_dict[split]) for split in ("train", "validation", "test")},
            "unlabeled_records": f"records without a {label_set} label are left out of every split",
        },
    )
    if output_file is not None:
        write_results(results, output_file)
    return results


__all__ = [
    "DEFAULT_HYPOTHESIS_TEMPLATE",
    "evaluate_zero_shot",
    "random_ecg_tower_like",
    "PTBXL_PROMPTS_PATH",
    "class_prompts",
    "encode_class_prompts",
    "encode_ecgs",
    "load_class_descriptions",
    "similarity_scores",
    "zero_shot_classify",
]
