"""`MeritProcessor`: the feature extractor and a tokenizer behind one call, for ECG-report pairs and for prompts
with ECG placeholders (report generation). This file is Hub remote code."""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class MeritProcessor(ProcessorMixin):
    r"""
    Wraps a [`MeritFeatureExtractor`] and a tokenizer.

    - `processor(ecgs=..., text=reports)` gives `ecg_values` (validated by the feature extractor) and the tokenised
      reports, for contrastive training and zero-shot scoring.
    - With `ecg_seq_length` set (report generation), each `ecg_token` in a text is expanded into `ecg_seq_length`
      copies, the positions where the model scatters the projected ECG tokens (LLaVA's scheme). The number of
      placeholders must equal the number of ECGs.

    Args:
        feature_extractor ([`MeritFeatureExtractor`]): the input contract.
        tokenizer ([`PreTrainedTokenizerBase`]): tokenizer of the text tower or of the language model.
        ecg_token (`str`, defaults to `"<ecg>"`): placeholder for one ECG in a prompt.
        ecg_seq_length (`int`, *optional*): soft tokens per ECG; `None` leaves placeholders alone.
        max_length (`int`, defaults to 128): truncation length of reports (MERL uses up to 256 for MedCPT).
        chat_template (`str`, *optional*): a chat template, as for any processor.

    Example:

    ```python
    >>> processor = MeritProcessor(MeritFeatureExtractor(), tokenizer)  # doctest: +SKIP
    >>> batch = processor(ecgs=signal, sampling_rate=500, lead_names=leads, text=["sinus rhythm"])  # doctest: +SKIP
    ```"""

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        ecg_token: str = "<ecg>",
        ecg_seq_length: int | None = None,
        max_length: int = 128,
        chat_template: str | None = None,
        **kwargs,
    ):
        self.ecg_token = ecg_token
        self.ecg_seq_length = ecg_seq_length
        self.max_length = max_length
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        ecgs: Any = None,
        text: str | list[str] | None = None,
        sampling_rate: float | list[float] | None = None,
        lead_names: list[str] | list[list[str]] | None = None,
        units: str | list[str] | None = "mV",
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            ecgs: records for the feature extractor (arrays `(num_samples, num_leads)` or WFDB paths).
            text: one report/prompt or a list. An empty report raises (it would train the model to match silence).
            sampling_rate, lead_names, units: passed to the feature extractor (required for arrays).
            return_tensors, padding, truncation, max_length: passed to the tokenizer.
            kwargs: other feature-extractor arguments (`padding` of the window is `ecg_padding`, `crop`).
        """
        if ecgs is None and text is None:
            raise ValueError("MeritProcessor needs ecgs, text, or both")
        data: dict[str, Any] = {}
        num_ecgs = None
        if ecgs is not None:
            fe_kwargs = {"crop": kwargs.pop("crop", None), "padding": kwargs.pop("ecg_padding", None)}
            ecg_features = self.feature_extractor(
                ecgs,
                sampling_rate=sampling_rate,
                lead_names=lead_names,
                units=units,
                return_tensors=return_tensors,
                **fe_kwargs,
            )
            data.update(ecg_features)
            num_ecgs = len(ecg_features["ecg_values"])
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, item in enumerate(texts):
                if not isinstance(item, str) or not item.strip():
                    raise ValueError(f"text {index}: empty report {item!r}; drop the pair or give its report")
            texts = self._expand_ecg_tokens(texts, num_ecgs)
            text_inputs = self.tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length or self.max_length,
                return_tensors=return_tensors,
                **kwargs,
            )
            data.update(text_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_ecg_tokens(self, texts: list[str], num_ecgs: int | None) -> list[str]:
        if self.ecg_seq_length is None:
            return texts
        placeholders = sum(item.count(self.ecg_token) for item in texts)
        if num_ecgs is not None and placeholders != num_ecgs:
            raise ValueError(
                f"{placeholders} {self.ecg_token} placeholders in the text for {num_ecgs} ECGs; put exactly one "
                f"{self.ecg_token} per ECG"
            )
        return [item.replace(self.ecg_token, self.ecg_token * self.ecg_seq_length) for item in texts]

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.feature_extractor.model_input_names + self.tokenizer.model_input_names))


__all__ = ["MeritProcessor"]
