"""The `"zero-shot-ecg-classification"` pipeline, registered with transformers when `merit_hf` is imported.

Example:

```python
>>> import merit_hf  # registers the task
>>> from transformers import pipeline
>>> classifier = pipeline("zero-shot-ecg-classification", model="path/to/merit")  # doctest: +SKIP
>>> classifier("records100/00000/00001_lr", candidate_labels=["NORM", "MI"],
...            class_descriptions="superclass")  # doctest: +SKIP
[{'label': 'NORM', 'score': 0.41}, {'label': 'MI', 'score': 0.12}]
```

The scores are per class (cosine similarities, see `merit_hf.evaluation.zero_shot`); the list is sorted by score, as
transformers' other zero-shot pipelines are. For scores in the order of `candidate_labels`, call
`merit_hf.zero_shot_classify`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .evaluation.zero_shot import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    class_prompts,
    encode_class_prompts,
    encode_ecgs,
    similarity_scores,
)
from .processing_merit import MeritProcessor

ZERO_SHOT_ECG_TASK = "zero-shot-ecg-classification"


class ZeroShotEcgClassificationPipeline(Pipeline):
    r"""
    Zero-shot ECG classification: scores one ECG (an array `(num_samples, num_leads)` with `sampling_rate` and
    `lead_names`, or a WFDB record path) against free-text or PTB-XL class descriptions.

    Call arguments:
        candidate_labels (`list[str]`): the classes.
        class_descriptions (`str` or `dict`, *optional*): a PTB-XL label set of the shipped prompt file
            (`"superclass"`, ...) or a mapping label -> descriptions; by default each label is its own description.
        hypothesis_template (`str` or `list[str]`, defaults to `"{}"`): template(s) with `{}`.
        multi_label (`bool`, defaults to `True`): independent scores per class (no softmax across labels).
        sampling_rate, lead_names, units: for array input, as in the feature extractor.
        precision (`str`, defaults to `"auto"`): of the ECG tower, as `merit_hf.inference_precision` resolves it
            (bf16 weights on a GPU; on CPU bf16 or fp32 from what the CPU reports). Also accepted by
            `pipeline(..., precision=...)`.
    """

    _load_processor = None
    _load_feature_extractor = None
    _load_tokenizer = None
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            if self.feature_extractor is None or self.tokenizer is None:
                raise ValueError(
                    f"{ZERO_SHOT_ECG_TASK} needs a MeritProcessor (processor=...) or both a feature_extractor and a "
                    "tokenizer"
                )
            self.processor = MeritProcessor(self.feature_extractor, self.tokenizer)
        self._class_embedding_cache: dict[tuple, torch.Tensor] = {}

    def _sanitize_parameters(
        self,
        candidate_labels=None,
        class_descriptions=None,
        hypothesis_template=None,
        multi_label=None,
        sampling_rate=None,
        lead_names=None,
        units=None,
        precision=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        preprocess = {}
        for name, value in (("sampling_rate", sampling_rate), ("lead_names", lead_names), ("units", units)):
            if value is not None:
                preprocess[name] = value
        forward, postprocess = {}, {}
        if candidate_labels is not None:
            labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
            forward["candidate_labels"] = postprocess["candidate_labels"] = labels
        if class_descriptions is not None:
            forward["class_descriptions"] = class_descriptions
        if hypothesis_template is not None:
            forward["hypothesis_template"] = hypothesis_template
        if multi_label is not None:
            forward["multi_label"] = multi_label
        if precision is not None:
            from .inference_precision import resolve_precision

            resolve_precision(precision, self.device)  # a precision this device cannot run fails here, not mid-batch
            forward["precision"] = precision
        return preprocess, forward, postprocess

    def preprocess(self, ecg, sampling_rate=None, lead_names=None, units="mV"):
        features = self.processor.feature_extractor(
            ecg, sampling_rate=sampling_rate, lead_names=lead_names, units=units, return_tensors="pt"
        )
        return dict(features)

    def _class_embeddings(self, candidate_labels, hypothesis_template, class_descriptions) -> torch.Tensor:
        prompts = class_prompts(candidate_labels, hypothesis_template, class_descriptions)
        key = tuple(tuple(texts) for texts in prompts)
        if key not in self._class_embedding_cache:
            self._class_embedding_cache[key] = encode_class_prompts(
                self.model, self.processor.tokenizer, prompts, max_length=self.processor.max_length
            )
        return self._class_embedding_cache[key]

    def _forward(
        self,
        model_inputs,
        candidate_labels=None,
        class_descriptions=None,
        hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE,
        multi_label=True,
        precision="auto",
    ):
        if candidate_labels is None:
            raise ValueError(f"{ZERO_SHOT_ECG_TASK} needs candidate_labels")
        class_embeddings = self._class_embeddings(candidate_labels, hypothesis_template, class_descriptions)
        ecg_embeddings = encode_ecgs(
            self.model,
            model_inputs["ecg_values"],
            ecg_attention_mask=model_inputs.get("ecg_attention_mask"),
            lead_mask=model_inputs.get("lead_mask"),
            precision=precision,
        )
        # Keep the batch axis: with batch_size > 1, transformers splits every output along axis 0 into one
        # `(1, num_labels)` row per ECG. The labels, shared by the whole batch, reach `postprocess` as a parameter.
        return {"scores": similarity_scores(self.model, ecg_embeddings, class_embeddings, multi_label=multi_label)}

    def postprocess(self, model_outputs, candidate_labels) -> list[dict[str, Any]]:
        scores = model_outputs["scores"][0]
        order = np.argsort(-scores, kind="stable")
        return [{"label": candidate_labels[index], "score": float(scores[index])} for index in order]


PIPELINE_REGISTRY.register_pipeline(
    ZERO_SHOT_ECG_TASK,
    pipeline_class=ZeroShotEcgClassificationPipeline,
    pt_model=AutoModel,
    type="multimodal",
)

__all__ = ["ZERO_SHOT_ECG_TASK", "ZeroShotEcgClassificationPipeline"]
