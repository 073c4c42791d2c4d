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
through the checkpoint's own feature extractor, so its input contract (leads, units, rate, window) applies; a feature
extractor whose `sampling_rate`, `lead_names` or `num_samples` differ from the model config's raises
(`check_feature_extractor_matches`). Missing leads (`missing_leads="mask"`) are left out, never fed as zeros, and a
long record cut into windows (`window="sliding"`) gets one result from all its windows: the mean of their embeddings,
as the embedding command line pools them (`pool_window_embeddings`, `window_pooling="mean"`).

`"zero-shot-ecg-classification"` (two-tower MeritModel / MeritForPreTraining folders) scores an ECG against class
descriptions: free-text `candidate_labels`, or `class_descriptions="superclass"` (a PTB-XL label set of the prompt file
that `save_pretrained` writes beside the model, `zero_shot_prompts.json`). Per-class cosine similarities of prompt-
ensembled class embeddings; `zero_shot_classify` is the same scoring as a function over many ECGs
(`merit_hf.zero_shot_classify`), and `merit_hf.evaluation.zero_shot` evaluates it on a labelled dataset.
"""

from __future__ import annotations

import copy
import importlib
import json
import numbers
import shutil
import string
from collections.abc import Mapping, Sequence, Sized
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Pipeline

from .processing_merit import MeritProcessor

ECG_FEATURE_EXTRACTION_TASKS = ("feature-extraction", "ecg-feature-extraction")
ECG_CLASSIFICATION_TASK = "ecg-classification"
ZERO_SHOT_ECG_TASK = "zero-shot-ecg-classification"
ZERO_SHOT_PROMPTS_FILE = "zero_shot_prompts.json"  # the prompt file save_pretrained writes beside a two-tower model
# the shipped PTB-XL prompt file (present when this file runs from the merit_hf package, not from a Hub folder)
PTBXL_PROMPTS_PATH = Path(__file__).resolve().parent / "prompts" / "ptbxl_prompts.json"
DEFAULT_HYPOTHESIS_TEMPLATE = "{}"
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
ECG_INPUT_NAMES = ("ecg_values", "ecg_attention_mask", "lead_mask")  # the feature extractor's tensors a model takes
INPUT_CONTRACT_FIELDS = ("sampling_rate", "lead_names", "num_samples")  # what a feature extractor and model must share


def check_feature_extractor_matches(feature_extractor, model) -> None:
    """Raise `ValueError` when `feature_extractor` prepares ECGs for another model than `model`: its `sampling_rate`,
    `lead_names` (in order; case-insensitively, as the feature extractor and the config compare lead names) and
    `num_samples` must be those of the model's ECG config (`config.ecg_config` of a two-tower, classification or
    report model, the config itself of an encoder). A folder whose preprocessor_config.json disagrees with its
    config.json would otherwise run and embed a resampled or lead-swapped ECG (V6 in lead I's slot)."""
    config = getattr(model.config, "ecg_config", model.config)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    for field in INPUT_CONTRACT_FIELDS:
        given, expected = getattr(feature_extractor, field, None), getattr(config, field, None)
        if given is None or expected is None:
            continue
        if field == "lead_names":
            same = [str(lead).strip().lower() for lead in given] == [str(lead).strip().lower() for lead in expected]
        else:
            same = float(given) == float(expected)
        if not same:
            raise ValueError(
                f"{name}: the feature extractor's {field} {given!r} does not match the model config's {field} "
                f"{expected!r}; use the feature extractor saved with the model, or "
                "MeritFeatureExtractor.from_model_config(<the model's ECG config>)"
            )


def check_finite_ecg_values(ecg_values: torch.Tensor) -> None:
    """`ValueError` naming the rows of `ecg_values` `(num_ecgs, num_leads, num_samples)` that hold NaN or inf: the
    feature extractor never returns them, but values built by hand can, and a NaN input gives NaN scores."""
    finite = torch.isfinite(ecg_values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(
            f"ecg_values rows {rows} hold NaN or inf values; pass raw records as ecgs (the feature extractor "
            "interpolates or names each bad lead) or repair them first"
        )


def _record_item(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One record's feature-extractor output as one pipeline item: each tensor `(num_windows, ...)` (one window, or
    every window of `window="sliding"`) under a new leading axis, and `num_windows` `(1,)`. transformers' batching
    (`pad_collate_fn`) concatenates 1-D tensors and pads the others along axis 1 after taking row 0 of each item, so
    a batch keeps every window of every record (`(batch, max_windows, ...)`); `_record_windows` undoes it."""
    item = {name: features[name][None] for name in ECG_INPUT_NAMES if features.get(name) is not None}
    item["num_windows"] = torch.tensor([len(features["ecg_values"])])
    return item


def _record_windows(model_inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The windows of every record of a batch of `_record_item`s, `(num_windows, ...)` as the model takes them, and
    the record of each window `(num_windows,)`."""
    counts = model_inputs["num_windows"].to(model_inputs["ecg_values"].device)
    present = torch.arange(model_inputs["ecg_values"].shape[1], device=counts.device) < counts[:, None]
    windows = {name: model_inputs[name][present] for name in ECG_INPUT_NAMES if model_inputs.get(name) is not None}
    record_index = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)
    return windows, record_index


WINDOW_POOLINGS = ("mean", "max")


def pool_window_embeddings(
    window_embeddings: torch.Tensor,
    record_index: torch.Tensor,
    pooling: str = "mean",
    num_records: int | None = None,
) -> torch.Tensor:
    """One embedding per record from the embeddings of its windows (`MeritFeatureExtractor(window="sliding")`).

    A long record (a 60 s rhythm strip, a Holter hour) is embedded window by window, since the encoder's positions
    cover one window; `"mean"` pools the windows (the record's average state), `"max"` takes each feature's largest
    value over the windows (keeps what one window shows, e.g. a short run of ectopy).

    Args:
        window_embeddings (`torch.FloatTensor` of shape `(num_windows, hidden_size)`): e.g. `pooler_output`.
        record_index (`torch.LongTensor` of shape `(num_windows,)`): the record of each window, as the feature
            extractor returns it.
        pooling (`str`, defaults to `"mean"`): `"mean"` or `"max"`.
        num_records (`int`, *optional*): defaults to `record_index.max() + 1`; every record needs a window.

    Returns:
        `torch.FloatTensor` of shape `(num_records, hidden_size)`.
    """
    if pooling not in WINDOW_POOLINGS:
        raise ValueError(f"pooling must be one of {WINDOW_POOLINGS}, got {pooling!r}")
    record_index = torch.as_tensor(record_index, device=window_embeddings.device).long()
    if window_embeddings.dim() != 2 or tuple(record_index.shape) != (window_embeddings.shape[0],):
        raise ValueError(
            f"window_embeddings (num_windows, hidden_size) and record_index (num_windows,) must agree, got "
            f"{tuple(window_embeddings.shape)} and {tuple(record_index.shape)}"
        )
    num_records = int(record_index.max()) + 1 if num_records is None else int(num_records)
    counts = torch.bincount(record_index, minlength=num_records)
    if len(counts) != num_records or bool((counts == 0).any()):
        raise ValueError(
            f"record_index must give every one of {num_records} records at least one window, got counts "
            f"{counts.tolist()}"
        )
    pooled = window_embeddings.new_zeros(num_records, window_embeddings.shape[1])
    index = record_index[:, None].expand_as(window_embeddings)
    reduce = "mean" if pooling == "mean" else "amax"
    return pooled.scatter_reduce(0, index, window_embeddings, reduce=reduce, include_self=False)


class _NumberedItem:
    """One item of a list (or dataset) given to a pipeline, with its position there, so that an error names it."""

    __slots__ = ("position", "value")

    def __init__(self, position: int, value: Any):
        self.position, self.value = position, value


class _NumberedItems:
    """A list or dataset whose items come as `_NumberedItem`s (sized and indexable, as transformers' pipelines and a
    `DataLoader` with workers take it)."""

    def __init__(self, items: Sequence[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _NumberedItem:
        return _NumberedItem(index, self.items[index])


def _numbered_iterator(pipeline: Pipeline, inputs, *args, **kwargs):
    """transformers' `get_iterator` over `inputs` (a list, a dataset or a generator) with each item numbered."""
    if isinstance(inputs, Sized):
        numbered = _NumberedItems(inputs)
    else:
        numbered = (_NumberedItem(position, item) for position, item in enumerate(inputs))
    return Pipeline.get_iterator(pipeline, numbered, *args, **kwargs)


def _extract_features(feature_extractor, ecg, sampling_rate=None, lead_names=None, units=None):
    """The feature extractor's tensors for one pipeline item, cut at the centre whatever crop the folder was saved
    with. An item of a list is one record to the feature extractor, which would name it "record 0": its errors name
    the item's position among the inputs instead ("item 1 of the inputs: lead aVR has 1 NaN/inf samples")."""
    position = None
    if isinstance(ecg, _NumberedItem):
        position, ecg = ecg.position, ecg.value
    try:
        return feature_extractor(
            ecg, sampling_rate=sampling_rate, lead_names=lead_names, units=units, return_tensors="pt", crop="center"
        )
    except ValueError as error:
        if position is None:
            raise
        message = f"item {position} of the inputs: {str(error).removeprefix('record 0: ')}"
        try:
            renamed = type(error)(message)  # EcgInputError, a ValueError
        except TypeError:
            renamed = ValueError(message)
        raise renamed from error


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
        check_feature_extractor_matches(self.feature_extractor, self.model)

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

    def get_iterator(self, inputs, *args, **kwargs):
        return _numbered_iterator(self, inputs, *args, **kwargs)

    def preprocess(self, ecg, sampling_rate=None, lead_names=None, units=None):
        features = _extract_features(self.feature_extractor, ecg, sampling_rate, lead_names, units)
        item = _record_item(features)
        return {key: value.to(self.dtype) if value.is_floating_point() else value for key, value in item.items()}


def ecg_encoder_of(model):
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
    `return_tensors=True`). Leads the feature extractor masks (`missing_leads="mask"`) are left out; a record cut
    into windows (`window="sliding"`) gets the mean of its windows' `pooler_output`, the embedding
    `python -m merit_hf.embedding --window sliding` writes for it.
    """

    def _postprocess_parameters(self, return_tensors=None, **kwargs) -> dict[str, Any]:
        super()._postprocess_parameters(**kwargs)
        return {} if return_tensors is None else {"return_tensors": return_tensors}

    def _forward(self, model_inputs):
        windows, record_index = _record_windows(model_inputs)
        output = ecg_encoder_of(self.model)(**windows)
        return {"embedding": pool_window_embeddings(output.pooler_output.float(), record_index)}

    def postprocess(self, model_outputs, return_tensors: bool = False):
        embedding = model_outputs["embedding"][0].float()
        return embedding if return_tensors else embedding.tolist()


CLASSIFICATION_FUNCTIONS = ("sigmoid", "softmax", "none")  # transformers' `ClassificationFunction` values


class MeritEcgClassificationPipeline(_MeritEcgPipeline):
    r"""
    Per-class scores of a fine-tuned `MeritForEcgClassification`, sorted by score: `[{"label", "score"}, ...]`
    (`top_k`, an int >= 1, keeps the first k; `None`, the default, every class, as in text classification).
    As transformers' text-classification pipeline, the function applied to the logits follows `problem_type`:
    multi-label models (the default) score every class with its own sigmoid,
    `problem_type="single_label_classification"` models with a softmax over the classes, and `"regression"` models
    give their raw outputs; `function_to_apply` (`"sigmoid"`, `"softmax"` or `"none"`) overrides it. A record cut
    into windows (`window="sliding"`) is scored from the mean of its windows' logits: the linear head applied to the
    mean of the windows' embeddings, the record embedding the `feature-extraction` task and the embedding command line
    give.
    """

    def _postprocess_parameters(self, top_k=None, function_to_apply=None, **kwargs) -> dict[str, Any]:
        super()._postprocess_parameters(**kwargs)
        postprocess = {}
        if function_to_apply is not None:
            # a string, or transformers' `ClassificationFunction` (a str enum), in any case
            name = str(getattr(function_to_apply, "value", function_to_apply)).lower()
            if name not in CLASSIFICATION_FUNCTIONS:
                raise ValueError(
                    f"function_to_apply must be one of {CLASSIFICATION_FUNCTIONS} (as in text classification), "
                    f"got {function_to_apply!r}"
                )
            postprocess["function_to_apply"] = name
        if top_k is None:
            return postprocess
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(
                f"top_k must be a whole number >= 1 (the classes to return, the highest scores first) or None for "
                f"every class, got {top_k!r}"
            )
        return {**postprocess, "top_k": int(top_k)}

    def _forward(self, model_inputs):
        windows, record_index = _record_windows(model_inputs)
        return {"logits": pool_window_embeddings(self.model(**windows).logits.float(), record_index)}

    def postprocess(
        self, model_outputs, top_k: int | None = None, function_to_apply: str | None = None
    ) -> list[dict[str, Any]]:
        logits = model_outputs["logits"][0].float()
        if function_to_apply is None:
            # the classifier's `_loss` reads a missing problem_type as multi-label
            function_to_apply = {"regression": "none", "single_label_classification": "softmax"}.get(
                self.model.config.problem_type, "sigmoid"
            )
        if function_to_apply == "softmax":
            scores = logits.softmax(dim=-1)
        elif function_to_apply == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        id2label = self.model.config.id2label
        return [{"label": id2label[index], "score": float(scores[index])} for index in order][:top_k]


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot classification: prompt ensembling and scoring, here so that a saved folder runs it without merit_hf
# (`merit_hf.zero_shot_classify`; the dataset-level evaluation, `merit_hf.evaluation.zero_shot`, imports them)


@lru_cache(maxsize=4)
def _read_prompt_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        prompts = json.load(handle)
    if not isinstance(prompts.get("label_sets"), dict):
        raise ValueError(f"{path}: a prompt file needs a 'label_sets' object of {{label_set: {{class: [texts]}}}}")
    return prompts


def load_class_descriptions(label_set: str, path: str | Path | None = None) -> dict[str, list[str]]:
    """The descriptions of every class of `label_set` from a prompt file (default: the shipped PTB-XL file),
    in the file's class order (alphabetical, as `merit_hf.data` orders classes)."""
    path = str(path or PTBXL_PROMPTS_PATH)
    label_sets = _read_prompt_file(path)["label_sets"]
    if label_set not in label_sets:
        raise ValueError(f"{path}: no label set {label_set!r}; it has {sorted(label_sets)}")
    return {name: list(texts) for name, texts in label_sets[label_set].items()}


def hypothesis_templates(hypothesis_template: str | Sequence[str]) -> list[str]:
    """`hypothesis_template` as a list of templates, each checked to hold exactly one `{}`, where a description goes
    (as transformers' zero-shot pipeline requires); literal braces are written `{{` and `}}`."""
    templates = [hypothesis_template] if isinstance(hypothesis_template, str) else list(hypothesis_template)
    if not templates:
        raise ValueError("hypothesis_template is empty; give a string with '{}', e.g. 'an ECG showing {}'")
    for template in templates:
        if not isinstance(template, str):
            raise ValueError(
                f"hypothesis_template {template!r} is not a string with '{{}}', e.g. 'an ECG showing {{}}'"
            )
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:
            raise ValueError(
                f"hypothesis_template {template!r} is not a format string ({error}); write literal braces as "
                "'{{' and '}}'"
            ) from error
        if not fields:
            raise ValueError(
                f"hypothesis_template {template!r} has no '{{}}' placeholder for the class description, "
                "e.g. 'an ECG showing {}'"
            )
        if fields != [""]:
            placeholders = ["{" + field + "}" for field in fields]
            raise ValueError(
                f"hypothesis_template {template!r} has the placeholders {placeholders}; it needs exactly one '{{}}', "
                "filled with each class description (write literal braces as '{{' and '}}')"
            )
    return templates


def class_prompts(
    candidate_labels: Sequence[str],
    hypothesis_template: str | Sequence[str] = DEFAULT_HYPOTHESIS_TEMPLATE,
    class_descriptions: Mapping[str, str | Sequence[str]] | str | None = None,
    prompt_file: str | Path | None = None,
) -> list[list[str]]:
    """The texts that describe each candidate label: `template.format(description)` for every template and
    description (a label's descriptions are one string or a list of them). Without `class_descriptions` the label
    itself is the description (free text).

    Raises `ValueError` for an empty or duplicated candidate list, a template without `{}`, and a label that
    `class_descriptions` (a mapping, or the name of a label set of `prompt_file`, by default the shipped PTB-XL
    prompt file) does not know.
    """
    if isinstance(candidate_labels, str):
        candidate_labels = [candidate_labels]
    labels = list(candidate_labels)
    if not labels:
        raise ValueError("candidate_labels is empty; give at least one class name")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"candidate_labels has duplicates {duplicates}")
    templates = hypothesis_templates(hypothesis_template)
    if isinstance(class_descriptions, str):
        class_descriptions = load_class_descriptions(class_descriptions, prompt_file)
    prompts = []
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate label {label!r} is not a non-empty string")
        if class_descriptions is None:
            descriptions = [label]
        elif label in class_descriptions:
            given = class_descriptions[label]
            descriptions = [given] if isinstance(given, str) else list(given)  # one text, or several
        else:
            raise ValueError(f"unknown label {label!r}: the class descriptions know {sorted(class_descriptions)}")
        if not descriptions:
            raise ValueError(f"label {label!r} has no description")
        for description in descriptions:
            if not isinstance(description, str) or not description.strip():
                raise ValueError(f"label {label!r} has a description {description!r} that is not a non-empty string")
        prompts.append([template.format(description) for description in descriptions for template in templates])
    return prompts


def two_tower_model(model):
    """The two-tower `MeritModel` inside `model` (itself, or `MeritForPreTraining.merit`); `TypeError` for a model
    without a text tower."""
    for candidate in (model, getattr(model, "merit", None)):
        if (
            candidate is not None
            and hasattr(candidate, "get_ecg_features")
            and hasattr(candidate, "get_text_features")
        ):
            return candidate
    raise TypeError(
        f"zero-shot classification needs MERIT's two towers (MeritModel or MeritForPreTraining), got "
        f"{type(model).__name__}; a classification checkpoint has no text tower"
    )


@contextmanager
def _in_eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block, each submodule's own mode restored after: class embeddings must not
    depend on the text tower's dropout, and a model scored between training steps goes on training (the ECG tower
    runs an eval copy, `_prepare_for_inference`)."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for child, training in modes:
            child.training = training


@torch.no_grad()
def check_token_ids(input_ids: torch.Tensor, embeddings: torch.nn.Module | None) -> None:
    """A token id beyond the text tower's embedding table (a tokenizer of another model, or tokens added without
    `resize_token_embeddings`) raises naming both sizes, instead of the embedding's bare "index out of range"."""
    size = getattr(embeddings, "num_embeddings", None)
    if size is None or input_ids.numel() == 0:
        return
    largest = int(input_ids.max())
    if largest >= size:
        raise ValueError(
            f"token id {largest} is beyond the text tower's {size} embeddings: the tokenizer does not belong to this "
            "model (or tokens were added to it without model.resize_token_embeddings)"
        )


def encode_class_prompts(model, tokenizer, prompts: Sequence[Sequence[str]], max_length: int = 128) -> torch.Tensor:
    """One L2-normalised embedding per class `(num_classes, projection_dim)`: the normalised mean of the normalised
    embeddings of its prompts (prompt ensembling)."""
    merit = two_tower_model(model)
    texts = [text for class_texts in prompts for text in class_texts]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if merit.device.type != "cpu":  # checked before the ids reach a GPU; on a CPU `get_text_features` checks them
        check_token_ids(tokens["input_ids"], merit.text_model.get_input_embeddings())
    tokens = {key: value.to(merit.device) for key, value in tokens.items() if key in TEXT_INPUT_NAMES}
    with _in_eval_mode(merit):
        embeddings = F.normalize(merit.get_text_features(**tokens).pooler_output.float(), dim=-1)
    sizes = [len(class_texts) for class_texts in prompts]
    means = torch.stack([chunk.mean(dim=0) for chunk in embeddings.split(sizes)])
    return F.normalize(means, dim=-1)


_FALLBACK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# int8 and fp8 quantise the encoder's Transformer blocks only: what the projection head runs beside such an encoder
# (as merit_hf's inference_precision.QUANTISED_HEAD_PRECISIONS; this file runs without merit_hf too)
QUANTISED_HEAD_PRECISIONS = {"int8": "fp32", "fp8": "bf16"}


def _precision_module():
    """`merit_hf.models.merit.inference_precision` when merit_hf is installed (CPU capability detection, int8, fp8), else None:
    a Hub folder run without merit_hf falls back to plain dtype casts. It recognises the Transformer blocks of this
    folder's own `modeling_merit.py` classes (remote code) as it does merit_hf's, so both convert alike."""
    try:
        return importlib.import_module("merit_hf.models.merit.inference_precision")
    except ImportError:
        return None


def _fallback_precision(precision: str, device) -> torch.dtype:
    """Without merit_hf: `"auto"` is bf16 on a GPU with bf16 (compute capability 8.0+, Ampere and later) and fp32
    elsewhere, as merit_hf resolves it; fp32/bf16/fp16 are dtype casts, bf16 refused on a GPU without it (a T4,
    a V100)."""
    device = torch.device(device)
    bf16_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "auto":
        precision = "bf16" if bf16_gpu else "fp32"
    if precision not in _FALLBACK_DTYPES:
        raise ValueError(
            f"precision {precision!r} needs merit_hf installed (pip install merit_hf); without it this pipeline "
            f"runs 'auto' or {sorted(_FALLBACK_DTYPES)}"
        )
    if precision == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise ValueError(
            f"precision 'bf16' needs a GPU with bf16 (compute capability 8.0+: Ampere and later); {device} has "
            "none. Use 'fp16' or 'fp32'"
        )
    return _FALLBACK_DTYPES[precision]


def check_precision(precision: str, device) -> None:
    """Fail at call time for a precision this device cannot run, not mid-batch."""
    tools = _precision_module()
    if tools is not None:
        tools.resolve_precision(precision, device)
    else:
        _fallback_precision(precision, device)


def _prepare_for_inference(module: torch.nn.Module, precision: str, device) -> torch.nn.Module:
    tools = _precision_module()
    if tools is not None:
        return tools.prepare_for_inference(module, precision, device)
    dtype = _fallback_precision(precision, device)
    parameter = next(module.parameters(), None)
    if parameter is None or (parameter.dtype == dtype and not module.training):
        return module
    return copy.deepcopy(module).to(dtype).eval()  # the model itself is never cast, nor its training mode changed


@torch.no_grad()
def encode_ecgs(
    model,
    ecg_values: torch.Tensor,
    batch_size: int = 32,
    ecg_attention_mask=None,
    lead_mask=None,
    precision: str = "auto",
    record_index=None,
) -> torch.Tensor:
    """L2-normalised projected ECG embeddings `(num_ecgs, projection_dim)`, computed in batches on the model's device
    in `precision` (`merit_hf.models.merit.inference_precision`: `"auto"` is bf16 weights on a GPU and the CPU's fastest accurate
    path; the model itself is never cast, a converted copy of its ECG tower runs). `lead_mask`: the missing leads are
    left out. `record_index` (`window="sliding"`): the rows are windows, and each record's embedding is the projection
    of the mean of its windows' encoder embeddings (the record embedding of the embedding command line), so the
    result has one row per record."""
    merit = two_tower_model(model)
    encoder = _prepare_for_inference(merit.ecg_model, precision, merit.device)
    head_precision = QUANTISED_HEAD_PRECISIONS.get(precision, precision)
    projection = _prepare_for_inference(merit.ecg_projection, head_precision, merit.device)
    pooled = []
    for start in range(0, len(ecg_values), batch_size):
        batch = ecg_values[start : start + batch_size].to(merit.device, dtype=torch.float32)
        mask = None if ecg_attention_mask is None else ecg_attention_mask[start : start + batch_size].to(merit.device)
        leads = None if lead_mask is None else torch.as_tensor(lead_mask[start : start + batch_size]).to(merit.device)
        pooled.append(encoder(batch, ecg_attention_mask=mask, lead_mask=leads).pooler_output)  # as `get_ecg_features`
    pooled = torch.cat(pooled)
    if record_index is not None:
        pooled = pool_window_embeddings(pooled.float(), torch.as_tensor(record_index).to(pooled.device))
    outputs = [projection(chunk.to(_input_dtype(projection))).float() for chunk in pooled.split(batch_size)]
    return F.normalize(torch.cat(outputs), dim=-1)


def _input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its weights' (a dynamically quantised layer takes float32)."""
    parameter = next(module.parameters(), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32


@torch.no_grad()
def similarity_scores(
    model, ecg_embeddings: torch.Tensor, class_embeddings: torch.Tensor, multi_label: bool = True
) -> np.ndarray:
    """Cosine similarities `(num_ecgs, num_classes)`; with `multi_label=False`, a softmax over the classes of the
    similarities times the model's clamped temperature (CLIP)."""
    similarities = ecg_embeddings.float() @ class_embeddings.float().T
    if not multi_label:
        scale = two_tower_model(model).clamped_logit_scale().float().to(similarities.device)
        similarities = (scale * similarities).softmax(dim=-1)
    return similarities.cpu().numpy()


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
    units: str | Sequence[str] | None = None,
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
        ecg_values: already extracted `(num_ecgs, num_leads, num_samples)` input instead of `ecgs`; NaN or inf
            values raise, naming the rows.
        lead_mask: with `ecg_values`, the feature extractor's `lead_mask` `(num_ecgs, num_leads)` (missing leads
            are left out); with `ecgs` it comes from the feature extractor (`missing_leads="mask"`).
        precision: of the ECG tower (`merit_hf.models.merit.inference_precision`): `"auto"` (default) runs bf16 weights on a GPU
            and the fastest accurate path on a CPU; `"fp32"`, `"bf16"`, `"fp16"`, `"int8"` (CPU), `"fp8"` (Hopper).
            The model is never cast: a converted copy of its ECG tower runs, kept until its weights change.

    Returns:
        `{"labels": list(candidate_labels), "scores": np.ndarray (num_ecgs, num_labels)}`: one row per record, also
        when the feature extractor cuts records into windows (`window="sliding"`; a record's ECG embedding is then
        the projection of the mean of its windows' embeddings, as `encode_ecgs` pools them).

    Raises `ValueError` for a hypothesis template without exactly one `{}`, for `ecgs` when the processor's feature
    extractor has another `sampling_rate`, `lead_names` or `num_samples` than the model
    (`check_feature_extractor_matches`), and for non-finite `ecg_values`.
    """
    prompts = class_prompts(candidate_labels, hypothesis_template, class_descriptions)
    if (ecgs is None) == (ecg_values is None):
        raise ValueError("give exactly one of ecgs (raw records) and ecg_values (feature-extractor output)")
    ecg_attention_mask = record_index = None
    if ecg_values is None:
        check_feature_extractor_matches(processor.feature_extractor, model)
        features = processor.feature_extractor(  # the centre, whatever crop the folder was saved with
            ecgs, sampling_rate=sampling_rate, lead_names=lead_names, units=units, return_tensors="pt", crop="center"
        )
        ecg_values, ecg_attention_mask = features["ecg_values"], features.get("ecg_attention_mask")
        lead_mask, record_index = features.get("lead_mask"), features.get("record_index")
    else:  # the feature extractor's own output is finite
        ecg_values = torch.as_tensor(ecg_values)
        check_finite_ecg_values(ecg_values)
    class_embeddings = encode_class_prompts(model, processor.tokenizer, prompts, max_length=processor.max_length)
    ecg_embeddings = encode_ecgs(
        model, ecg_values, batch_size, ecg_attention_mask, lead_mask, precision, record_index=record_index
    )
    scores = similarity_scores(model, ecg_embeddings, class_embeddings, multi_label=multi_label)
    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    return {"labels": labels, "scores": scores}


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter; 0 for an inference tensor (made under `torch.inference_mode()`, for example
    a model converted there), which has none: such a tensor is then told apart by its storage only."""
    return 0 if tensor.is_inference() else tensor._version


def weights_signature(*modules: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `modules` is replaced or written in place (an optimizer step,
    `load_state_dict`, `.to()`): each tensor's storage and write counter (`tensor_version`), except for an inference
    tensor written in place under `torch.inference_mode()`, which keeps no counter. What the zero-shot pipeline keys its
    class embeddings by, and `merit_hf.models.merit.inference_precision` its converted copy of the ECG tower."""
    tensors = [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]
    return tuple((tensor.data_ptr(), tensor_version(tensor)) for tensor in tensors)


def _folder_prompt_file(name_or_path: str | None) -> str | None:
    """The `zero_shot_prompts.json` of a saved model (a local folder or a Hub repository), or None."""
    if not name_or_path:
        return None
    local = Path(str(name_or_path)) / ZERO_SHOT_PROMPTS_FILE
    if local.is_file():
        return str(local)
    if Path(str(name_or_path)).is_dir():
        return None
    try:
        from transformers.utils import cached_file

        return cached_file(
            str(name_or_path),
            ZERO_SHOT_PROMPTS_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):
        return None


def save_zero_shot_prompts(save_directory: str | Path, name_or_path: str | None = None) -> Path | None:
    """Write the zero-shot prompt file beside a saved two-tower model, so that `class_descriptions="superclass"`
    works from the folder without merit_hf: the shipped PTB-XL file, or else the one the model was loaded with.
    Returns the written path (None when neither exists)."""
    source = PTBXL_PROMPTS_PATH if PTBXL_PROMPTS_PATH.is_file() else _folder_prompt_file(name_or_path)
    if source is None:
        return None
    target = Path(save_directory) / ZERO_SHOT_PROMPTS_FILE
    if Path(source).resolve() != target.resolve():
        _read_prompt_file(str(source))  # never ship a broken prompt file
        shutil.copyfile(source, target)
    return target


class ZeroShotEcgClassificationPipeline(Pipeline):
    r"""
    Zero-shot ECG classification: scores one ECG (an array `(num_samples, num_leads)` with `sampling_rate` and
    `lead_names`, or a WFDB record path) against free-text or PTB-XL class descriptions. As `zero_shot_classify`:
    masked leads are left out, and a record cut into windows (`window="sliding"`) is scored with the projection of the
    mean of its windows' embeddings; a feature extractor that does not match the model config raises. A
    `feature_extractor=` given to `pipeline(...)` (beside a processor or a folder) replaces the processor's, as the
    other ECG pipelines take it.

    Call arguments:
        candidate_labels (`list[str]`): the classes.
        class_descriptions (`str` or `dict`, *optional*): a label set of the model folder's `zero_shot_prompts.json`
            (the shipped PTB-XL prompts: `"superclass"`, ...) or a mapping label -> descriptions; by default each
            label is its own description.
        hypothesis_template (`str` or `list[str]`, defaults to `"{}"`): template(s) with `{}`.
        multi_label (`bool`, defaults to `True`): independent scores per class (no softmax across labels).
        sampling_rate, lead_names, units: for array input, as in the feature extractor.
        precision (`str`, defaults to `"auto"`): of the ECG tower, as `merit_hf.models.merit.inference_precision` resolves it
            (bf16 weights on a GPU with bf16; on CPU bf16 or fp32 from what the CPU reports). Without merit_hf
            installed, `"auto"` is bf16 on a GPU with bf16 (Ampere and later) and fp32 elsewhere. Also accepted by
            `pipeline(..., precision=...)`.
    """

    _load_processor = None
    _load_feature_extractor = False  # the folder's is inside its processor: a feature_extractor here is the caller's
    _load_tokenizer = None
    _load_image_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        given = self.feature_extractor
        if isinstance(given, (str, Path)):  # a folder or Hub id, which transformers loads only for the other pipelines
            from transformers import AutoFeatureExtractor

            given = AutoFeatureExtractor.from_pretrained(given)
        if self.processor is None:
            if given is None or self.tokenizer is None:
                raise ValueError(
                    f"{ZERO_SHOT_ECG_TASK} needs a MeritProcessor (processor=...) or both a feature_extractor and a "
                    "tokenizer"
                )
            self.processor = MeritProcessor(given, self.tokenizer)
        elif given is not None and given is not self.processor.feature_extractor:
            self.processor = copy.copy(self.processor)  # the given feature extractor wins; the caller's is unchanged
            self.processor.feature_extractor = given
        self.feature_extractor = self.processor.feature_extractor
        check_feature_extractor_matches(self.processor.feature_extractor, self.model)
        # prompts -> (the text tower's weights signature, class embeddings): recomputed once the weights change
        self._class_embedding_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}

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
            check_precision(precision, self.device)
            forward["precision"] = precision
        return preprocess, forward, postprocess

    def get_iterator(self, inputs, *args, **kwargs):
        return _numbered_iterator(self, inputs, *args, **kwargs)

    def preprocess(self, ecg, sampling_rate=None, lead_names=None, units=None):
        features = _extract_features(self.processor.feature_extractor, ecg, sampling_rate, lead_names, units)
        return _record_item(features)

    def _prompt_file(self) -> str | None:
        """The model folder's prompt file; inside the merit_hf package the shipped one when the folder has none."""
        found = _folder_prompt_file(getattr(self.model, "name_or_path", None))
        if found is None and not PTBXL_PROMPTS_PATH.is_file():
            raise ValueError(
                f"class_descriptions names a label set, but the model folder {self.model.name_or_path!r} has no "
                f"{ZERO_SHOT_PROMPTS_FILE} (save the model with merit_hf to write it); pass free-text candidate_labels "
                "or a mapping label -> descriptions instead"
            )
        return found

    def _class_embeddings(self, candidate_labels, hypothesis_template, class_descriptions) -> torch.Tensor:
        prompt_file = self._prompt_file() if isinstance(class_descriptions, str) else None
        prompts = class_prompts(candidate_labels, hypothesis_template, class_descriptions, prompt_file)
        key = tuple(tuple(texts) for texts in prompts)
        merit = two_tower_model(self.model)
        signature = weights_signature(merit.text_model, merit.text_projection)
        cached = self._class_embedding_cache.get(key)
        if cached is None or cached[0] != signature:
            embeddings = encode_class_prompts(
                self.model, self.processor.tokenizer, prompts, max_length=self.processor.max_length
            )
            self._class_embedding_cache[key] = cached = (signature, embeddings)
        return cached[1]

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
        windows, record_index = _record_windows(model_inputs)
        ecg_embeddings = encode_ecgs(
            self.model,
            windows["ecg_values"],
            ecg_attention_mask=windows.get("ecg_attention_mask"),
            lead_mask=windows.get("lead_mask"),
            precision=precision,
            record_index=record_index,
        )
        # Keep the batch axis: with batch_size > 1, transformers splits every output along axis 0 into one
        # `(1, num_labels)` row per ECG. The labels, shared by the whole batch, reach `postprocess` as a parameter.
        return {"scores": similarity_scores(self.model, ecg_embeddings, class_embeddings, multi_label=multi_label)}

    def postprocess(self, model_outputs, candidate_labels) -> list[dict[str, Any]]:
        scores = model_outputs["scores"][0]
        order = np.argsort(-scores, kind="stable")
        return [{"label": candidate_labels[index], "score": float(scores[index])} for index in order]


def custom_pipelines_for(
    auto_class: str, classifier: bool = False, two_tower: bool = False
) -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entry of a MERIT model saved for the Hub: the embedding tasks for every model,
    `ecg-classification` for a classifier, `zero-shot-ecg-classification` for a two-tower model. `auto_class` is the
    transformers Auto class that loads the model."""
    tasks = {
        task: {"impl": f"pipeline_merit.{MeritEcgFeatureExtractionPipeline.__name__}", "pt": [auto_class]}
        for task in ECG_FEATURE_EXTRACTION_TASKS
    }
    if classifier:
        tasks[ECG_CLASSIFICATION_TASK] = {"impl": f"pipeline_merit.{MeritEcgClassificationPipeline.__name__}",
                                          "pt": [auto_class]}  # fmt: skip
    if two_tower:
        tasks[ZERO_SHOT_ECG_TASK] = {"impl": f"pipeline_merit.{ZeroShotEcgClassificationPipeline.__name__}",
                                     "pt": [auto_class], "type": "multimodal"}  # fmt: skip
    return tasks


__all__ = [
    "CLASSIFICATION_FUNCTIONS",
    "DEFAULT_HYPOTHESIS_TEMPLATE",
    "ECG_CLASSIFICATION_TASK",
    "ECG_FEATURE_EXTRACTION_TASKS",
    "MeritEcgClassificationPipeline",
    "MeritEcgFeatureExtractionPipeline",
    "PTBXL_PROMPTS_PATH",
    "ZERO_SHOT_ECG_TASK",
    "ZERO_SHOT_PROMPTS_FILE",
    "ZeroShotEcgClassificationPipeline",
    "check_feature_extractor_matches",
    "check_finite_ecg_values",
    "check_token_ids",
    "class_prompts",
    "custom_pipelines_for",
    "encode_class_prompts",
    "encode_ecgs",
    "hypothesis_templates",
    "load_class_descriptions",
    "save_zero_shot_prompts",
    "similarity_scores",
    "two_tower_model",
    "zero_shot_classify",
]
