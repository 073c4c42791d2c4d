"""Zero-shot evaluation on a labelled dataset: every class of a PTB-XL label set scored with the shipped prompts, for
the model and for its random-ECG-tower twin, through the same metrics and results JSON as the linear probe.

The scoring itself (prompt ensembling, cosine similarity per (ECG, class), no softmax across classes) lives with the
model, in the Hub remote-code file `merit_hf.models.merit.pipeline_merit`, so that a saved folder's
`"zero-shot-ecg-classification"` pipeline runs without merit_hf; `merit_hf.zero_shot_classify` is its function form.
This module adds only what an evaluation needs: the baseline, dataset-level scoring in fp32, the thresholds chosen
on validation and the results JSON.

Class descriptions are data: `prompts/ptbxl_prompts.json` holds several descriptions of every class of every PTB-XL
label set (`superclass`, `subclass`, `form`, `rhythm`, `all`), written by us from `scp_statements.csv`.

Example:

```python
>>> from merit_hf.evaluation.zero_shot import evaluate_zero_shot
>>> results = evaluate_zero_shot("quickstart_output/model", dataset_dict, "superclass")  # doctest: +SKIP
>>> results.model.metrics["macro_auroc"].value, results.baseline.metrics["macro_auroc"].value  # doctest: +SKIP
```
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.merit.inference_precision import inference_device

# `zero_shot_classify` is imported only to keep its 0.1 path (`merit_hf.evaluation.zero_shot.zero_shot_classify`)
from ..models.merit.pipeline_merit import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    PTBXL_PROMPTS_PATH,
    check_feature_extractor_matches,
    class_prompts,
    encode_class_prompts,
    encode_ecgs,
    hypothesis_templates,
    load_class_descriptions,
    similarity_scores,
    two_tower_model,
    zero_shot_classify,
)
from .metrics import best_f1_thresholds, check_evaluation_counts, classification_metrics
from .probe import a_label_of, ecg_model_inputs, evaluated_on, label_matrix, label_names, labeled_dataset_dict
from .results import EvaluationResults, build_results, feature_extractor_settings, write_results


def random_ecg_tower_like(model, seed: int = 0):
    """The zero-shot baseline: a copy of the two-tower model whose ECG encoder and ECG projection are re-drawn at
    random under `seed`; the text tower, its projection and the temperature are kept, so only the ECG side is
    untrained."""
    baseline = copy.deepcopy(two_tower_model(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(baseline)._from_config(baseline.config)
    baseline.ecg_model.load_state_dict(fresh.ecg_model.state_dict())
    baseline.ecg_projection.load_state_dict(fresh.ecg_projection.state_dict())
    baseline.name_or_path = "random-init ECG tower"
    return baseline.eval()


def _dataset_scores(model, processor, dataset, prompts, batch_size: int) -> np.ndarray:
    """Scores `(num_records, num_classes)`: missing leads left out (`lead_mask`), the windows of `window="sliding"`
    pooled per record (as `encode_ecgs` does)."""
    class_embeddings = encode_class_prompts(model, processor.tokenizer, prompts, max_length=processor.max_length)
    columns = dataset.select_columns(["signal", "sampling_rate", "lead_names"])
    embeddings = []
    for start in range(0, len(dataset), batch_size):
        rows = columns[start : start + batch_size]
        inputs = ecg_model_inputs(processor.feature_extractor, rows, crop="center")
        # fp32: evaluation numbers must not depend on the CPU they were computed on
        embeddings.append(
            encode_ecgs(
                model,
                inputs["ecg_values"],
                batch_size,
                ecg_attention_mask=inputs.get("ecg_attention_mask"),
                lead_mask=inputs.get("lead_mask"),
                precision="fp32",
                record_index=inputs.get("record_index"),
            )
        )
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
    dataset_extra: dict | None = None,
    device: torch.device | str | None = None,
) -> EvaluationResults:
    """Zero-shot PTB-XL evaluation of every class of `label_set` with the shipped prompts, for the model and its
    random-ECG-tower twin (`random_ecg_tower_like`), on the records with a `label_set` label (as the probe). Scores
    are cosine similarities; `macro_auroc` needs no threshold, `macro_f1` uses per-class thresholds chosen on the
    validation split, and `macro_f1_max_over_thresholds` is MERL's test-split "F1". Returns the run's
    `EvaluationResults` (`merit_hf.evaluation.results`). `dataset_extra` overrides what the results say of the dataset
    (PTB-XL v1.0.3 by default; `merit_hf.evaluation.probe.dataset_description(arguments)` for other data).
    `device`: where the towers run (fp32 either way); default, the GPU when there is one for a model loaded here from
    a path, and a given model's own device. A given model runs in eval mode and is put back in its own training mode
    and on its own device afterwards."""
    check_evaluation_counts(num_bootstrap=num_bootstrap, batch_size=batch_size)  # before a model is loaded
    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(model_or_path)).eval()
        processor = processor or AutoProcessor.from_pretrained(str(model_or_path))
        device = inference_device(device)
    else:
        model = model_or_path
    with evaluated_on(model, device):  # a given model keeps its training mode and device
        # a model instance is named by where it was loaded from (its repr is the whole module tree)
        model_name = (
            str(model_or_path)
            if isinstance(model_or_path, (str, Path))
            else model.name_or_path or type(model).__name__
        )
        if processor is None:
            raise ValueError("evaluate_zero_shot needs a processor (MeritProcessor) when given a model instance")
        check_feature_extractor_matches(processor.feature_extractor, model)
        # the training records with a label, as the probe counts them (zero-shot does not use them; 0 when none)
        num_records = (
            {"train": int(label_matrix(dataset_dict["train"], label_set).any(axis=1).sum())}
            if "train" in dataset_dict
            else {}
        )
        dataset_dict = labeled_dataset_dict(dataset_dict, label_set, splits=("validation", "test"))  # no training
        names = label_names(dataset_dict["test"], label_set)
        descriptions = load_class_descriptions(label_set, prompt_file)
        prompts = class_prompts(names, hypothesis_template, descriptions)
        models = {"model": two_tower_model(model)}
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
                **({"weights_fingerprint": zero_shot_fingerprints(role_model)} if role == "model" else {}),
                **classification_metrics(
                    label_matrix(dataset_dict["test"], label_set), test_scores, names, thresholds, num_bootstrap, seed
                ),
            }
        protocol = {
            "scores": "cosine similarity of L2-normalised ECG and class embeddings; no softmax across classes",
            # the shipped file by its place in the package, not this machine's path (results travel to the Hub)
            "prompts": str(prompt_file) if prompt_file else shipped_prompts_name(),
            "hypothesis_templates": hypothesis_templates(hypothesis_template),
            "prompt_ensembling": "mean of normalised prompt embeddings per class, re-normalised",
            "f1_thresholds": "per class, the F1-maximising threshold on the validation split",
            "num_bootstrap": num_bootstrap,
            "feature_extractor": feature_extractor_settings(processor.feature_extractor),
        }
        results = build_results(
            task="zero-shot",
            dataset_dict=dataset_dict,
            label_set=label_set,
            label_names=names,
            label_fraction=None,
            seed=seed,
            protocol=protocol,
            **entries,  # model, and baseline when it ran
            dataset_extra={
                "num_records": {
                    **num_records,
                    **{split: len(dataset_dict[split]) for split in ("validation", "test")},
                },
                "unlabeled_records": f"records without {a_label_of(label_set)} are left out of validation and test",
                **(dataset_extra or {}),
            },
        )
        if output_file is not None:
            write_results(results, output_file)
        return results


def zero_shot_fingerprints(model) -> dict[str, str]:
    """What a zero-shot results file records of the evaluated weights: `ecg_encoder`, the `weights_fingerprint` of the
    ECG tower's encoder (as the probe records it), and `two_tower`, of the whole two-tower model (projections and text
    tower included), which a model card checks against its folder (`merit_hf.hub.cards`)."""
    from ..models.fingerprint import weights_fingerprint
    from ..models.merit.pipeline_merit import ecg_encoder_of

    return {"ecg_encoder": weights_fingerprint(ecg_encoder_of(model)), "two_tower": weights_fingerprint(model)}


def shipped_prompts_name() -> str:
    """The shipped prompt file as `merit_hf/...`, its place in the package (the same on every machine)."""
    package = Path(__file__).resolve().parents[1]
    return f"merit_hf/{Path(PTBXL_PROMPTS_PATH).resolve().relative_to(package).as_posix()}"


__all__ = ["evaluate_zero_shot", "random_ecg_tower_like", "zero_shot_classify"]
