"""ECG pipelines that travel with a saved MERIT folder (Hub remote code: torch, numpy and transformers only).

`save_pretrained` copies this file beside the model and writes `custom_pipelines` into `config.json`, so a user who
never installed merit_hf runs

```python
>>> from transformers import pipeline
>>> embed = pipeline("feature-extraction", model="org/merit-ecg", trust_remote_code=True)  # doctest: +SKIP
>>> embed("records100/00000/00001_lr")  # a WFDB record path, or an array with sampling_rate= and lead_names=
>>> classify = pipeline("ecg-classification", model="org/merit-ecg-superclass", trust_remote_code=True)  # doctest: +SKIP
>>> classify(signal, sampling_rate=500, lead_names=leads)  # doctest: +SKIP
[{'label': 'NORM', 'score': 0.91}, {'label': 'MI', 'score': 0.07}, ...]
```

`"feature-extraction"` (the task the model card's `pipeline_tag` declares) and its alias `"ecg-feature-extraction"`
give the encoder's `pooler_output` (`hidden_size` floats per ECG), the embedding `python -m merit_hf.embedding` and the
linear probe use. `"ecg-classification"` gives a fine-tuned `MeritForEcgClassification`'s per-class scores: one sigmoid
per class for multi-label models (the default; they do not sum to 1), a softmax for single-label ones. Inputs go
through the checkpoint's own feature extractor, so its input contract (leads, units, rate, window) applies.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

ECG_FEATURE_EXTRACTION_TASKS = ("feature-extraction", "ecg-feature-extraction")
ECG_CLASSIFICATION_TASK = "ecg-classification"


class _MeritEcgPipeline(Pipeline):
    """One ECG in (array `(num_samples, num_leads)` with `sampling_rate` and `lead_names`, or a WFDB record path),
    through the checkpoint's feature extractor."""

    _load_processor = False
    _load_feature_extractor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.feature_extractor is None:
            raise ValueError(
                f"{type(self).__name__} needs the checkpoint's feature extractor (preprocessor_config.json) or "
                "feature_extractor=..."
            )

    def _sanitize_parameters(self, sampling_rate=None, lead_names=None, units=None, **kwargs):
        preprocess = {
            name: value
            for name, value in (("sampling_rate", sampling_rate), ("lead_names", lead_names), ("units", units))
            if value is not None
        }
        forward, postprocess = {}, self._postprocess_parameters(**kwargs)
        return preprocess, forward, postprocess

    def _postprocess_parameters(self, **kwargs) -> dict[str, Any]:
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        return {}

    def preprocess(self, ecg, sampling_rate=None, lead_names=None, units="mV"):
        features = self.feature_extractor(
            ecg, sampling_rate=sampling_rate, lead_names=lead_names, units=units, return_tensors="pt"
        )
        return {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in features.items()}


def _ecg_encoder(model):
    """The MERIT ECG encoder inside any MERIT model (itself, `.ecg_model`, or `.merit.ecg_model`)."""
    for path in ("", "ecg_model", "merit.ecg_model"):
        module = model
        for name in filter(None, path.split(".")):
            module = getattr(module, name, None)
        if module is not None and hasattr(module, "embeddings") and hasattr(module, "pooler_norm"):
            return module
    raise TypeError(f"{type(model).__name__} holds no MERIT ECG encoder")


class MeritEcgFeatureExtractionPipeline(_MeritEcgPipeline):
    r"""
    The MERIT embedding of an ECG: the encoder's `pooler_output`, a list of `hidden_size` floats (a tensor with
    `return_tensors=True`).
    """

    def _postprocess_parameters(self, return_tensors=None, **kwargs) -> dict[str, Any]:
        super()._postprocess_parameters(**kwargs)
        return {} if return_tensors is None else {"return_tensors": return_tensors}

    def _forward(self, model_inputs):
        encoder = _ecg_encoder(self.model)
        output = encoder(model_inputs["ecg_values"], ecg_attention_mask=model_inputs.get("ecg_attention_mask"))
        return {"embedding": output.pooler_output}

    def postprocess(self, model_outputs, return_tensors: bool = False):
        embedding = model_outputs["embedding"][0].float()
        return embedding if return_tensors else embedding.tolist()


class MeritEcgClassificationPipeline(_MeritEcgPipeline):
    r"""
    Per-class scores of a fine-tuned `MeritForEcgClassification`, sorted by score: `[{"label", "score"}, ...]`
    (`top_k` keeps the first k). Multi-label models (the default) score every class with its own sigmoid;
    `problem_type="single_label_classification"` models with a softmax over the classes.
    """

    def _postprocess_parameters(self, top_k=None, **kwargs) -> dict[str, Any]:
        super()._postprocess_parameters(**kwargs)
        return {} if top_k is None else {"top_k": top_k}

    def _forward(self, model_inputs):
        return {"logits": self.model(**model_inputs).logits}

    def postprocess(self, model_outputs, top_k: int | None = None) -> list[dict[str, Any]]:
        logits = model_outputs["logits"][0].float()
        single_label = self.model.config.problem_type == "single_label_classification"
        scores = logits.softmax(dim=-1) if single_label else torch.sigmoid(logits)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        id2label = self.model.config.id2label
        return [{"label": id2label[index], "score": float(scores[index])} for index in order][:top_k]


def custom_pipelines_for(auto_class: str, classifier: bool = False) -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entry of a MERIT model saved for the Hub: the embedding tasks for every model,
    `ecg-classification` for a classifier. `auto_class` is the transformers Auto class that loads the model."""
    tasks = {
        task: {"impl": f"pipeline_merit.{MeritEcgFeatureExtractionPipeline.__name__}", "pt": [auto_class]}
        for task in ECG_FEATURE_EXTRACTION_TASKS
    }
    if classifier:
        tasks[ECG_CLASSIFICATION_TASK] = {"impl": f"pipeline_merit.{MeritEcgClassificationPipeline.__name__}",
                                          "pt": [auto_class]}  # fmt: skip
    return tasks


__all__ = [
    "ECG_CLASSIFICATION_TASK",
    "ECG_FEATURE_EXTRACTION_TASKS",
    "MeritEcgClassificationPipeline",
    "MeritEcgFeatureExtractionPipeline",
    "custom_pipelines_for",
]
