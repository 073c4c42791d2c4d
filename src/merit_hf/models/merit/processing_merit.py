"""`MeritProcessor`: the feature extractor and a tokenizer behind one call, for ECG-report pairs and for prompts
with ECG placeholders (report generation). This file is Hub remote code."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin, TextKwargs

DEFAULT_REPORT_INSTRUCTION = "Write the report of this 12-lead ECG."
IGNORE_INDEX = -100  # label value that `CrossEntropyLoss` (and every transformers LM loss) skips


class MeritProcessor(ProcessorMixin):
    r"""
    Wraps a [`MeritFeatureExtractor`] and a tokenizer.

    - `processor(ecgs=..., text=reports)` gives `ecg_values` (validated by the feature extractor) and the tokenised
      reports, for contrastive training and zero-shot scoring.
    - With `ecg_seq_length` set (report generation), each `ecg_token` in a text is expanded into `ecg_seq_length`
      copies, the positions where the model scatters the projected ECG tokens (LLaVA's scheme). The number of
      placeholders must equal the number of ECGs (and with one prompt per ECG, each prompt holds exactly one).
      `format_prompt()` writes the prompt, through the tokenizer's chat template when it has one. Prompts alone are
      left-padded for `generate()` and never truncated; with `reports=` the report follows each prompt (then EOS),
      padding is on the right and `labels` copy the report tokens and hold -100 on the prompt, the ECG tokens and
      the padding, so the loss is taken on the report only.

    Args:
        feature_extractor ([`MeritFeatureExtractor`]): the input contract.
        tokenizer ([`PreTrainedTokenizerBase`]): tokenizer of the text tower or of the language model.
        ecg_token (`str`, defaults to `"<ecg>"`): placeholder for one ECG in a prompt.
        ecg_seq_length (`int`, *optional*): soft tokens per ECG; `None` leaves placeholders alone.
        max_length (`int`, defaults to 128): truncation length of reports (MERL uses up to 256 for MedCPT); for
            prompt + report, the report is cut so that the whole fits. Prompts for `generate()` are never cut.
        report_instruction (`str`): the user turn after `<ecg>` in `format_prompt()`.
        use_chat_template (`bool`, defaults to `True`): let `format_prompt()` use the tokenizer's chat template when
            it has one (an instruct LLM); a plain `"<ecg>\n{instruction}\n"` otherwise.
        condition_on_ecg (`bool`, defaults to `True`): `False` for a text-only model (report generation's no-ECG
            baseline): `format_prompt()` leaves `<ecg>` out and ECGs are refused. Saved with the processor, so that a
            reloaded adapter prompts as it was trained.
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
        report_instruction: str = DEFAULT_REPORT_INSTRUCTION,
        use_chat_template: bool = True,
        condition_on_ecg: bool = True,
        chat_template: str | None = None,
        **kwargs,
    ):
        self.ecg_token = ecg_token
        self.ecg_seq_length = ecg_seq_length
        self.max_length = max_length
        self.report_instruction = report_instruction
        self.use_chat_template = use_chat_template
        self.condition_on_ecg = condition_on_ecg
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        ecgs: Any = None,
        text: str | list[str] | None = None,
        sampling_rate: float | list[float] | None = None,
        lead_names: list[str] | list[list[str]] | None = None,
        units: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        reports: str | list[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            ecgs: records for the feature extractor (arrays `(num_samples, num_leads)` or WFDB paths).
            text: one report/prompt or a list. An empty report raises (it would train the model to match silence);
                with `ecgs` (and no `ecg_seq_length`) there must be one report per row of `ecg_values`: per ECG, or
                per window when the feature extractor cuts records into windows (`window="sliding"`; a report per
                record then raises: repeated in a batch, a report would be a negative of its own ECG's other windows).
            sampling_rate, lead_names, units: passed to the feature extractor (rate and names required for arrays;
                units default to mV for arrays and come from the header for paths).
            return_tensors, padding, truncation, max_length: passed to the tokenizer (for reports; prompts for
                `generate()`, with `ecg_seq_length` and no `reports`, are never truncated).
            reports: target reports for report generation, one per prompt in `text` (`text` defaults to
                `format_prompt()` once per ECG); adds `labels`. Needs `ecg_seq_length`.
            kwargs: other feature-extractor arguments (`padding` of the window is `ecg_padding`, `crop`, `device`:
                its batched torch path, `crop_seeds`) and tokenizer arguments (transformers' `TextKwargs`, such as
                `padding_side`); any other name raises a `TypeError` (`ecg=` for `ecgs=` would go unnoticed).
        """
        if ecgs is None and text is None:
            raise ValueError("MeritProcessor needs ecgs, text, or both")
        if reports is not None and self.ecg_seq_length is None:
            raise ValueError("reports= is for report generation: set ecg_seq_length on the processor")
        if ecgs is not None and not self.condition_on_ecg:
            raise ValueError(
                "this processor prompts without ECGs (condition_on_ecg=False: a text-only model, such as report "
                "generation's no-ECG baseline); call it with text=[processor.format_prompt()] and no ecgs"
            )
        fe_kwargs = {
            "crop": kwargs.pop("crop", None),
            "padding": kwargs.pop("ecg_padding", None),
            "device": kwargs.pop("device", None),
            "crop_seeds": kwargs.pop("crop_seeds", None),
        }
        for modality in ("images", "videos", "audio"):  # what `ProcessorMixin.apply_chat_template` passes, as None
            if kwargs.get(modality, 0) is None:
                del kwargs[modality]
        unknown = sorted(set(kwargs) - self._tokenizer_kwargs())
        if unknown:  # a typo (`ecg=` for `ecgs=`) would otherwise vanish into the tokenizer's kwargs
            raise TypeError(
                f"{type(self).__name__}() got unexpected arguments {unknown}; it takes ecgs=, text=, reports=, the "
                "feature extractor's crop, ecg_padding, device and crop_seeds, and the tokenizer's arguments"
            )
        data: dict[str, Any] = {}
        num_ecgs = None
        if ecgs is not None:
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
        if reports is not None:
            reports = [reports] if isinstance(reports, str) else list(reports)
            if text is None:
                text = [self.format_prompt()] * (num_ecgs if num_ecgs is not None else len(reports))
            data.update(self._prompt_report_inputs(text, reports, num_ecgs, return_tensors, max_length))
            return BatchFeature(data=data, tensor_type=return_tensors)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, item in enumerate(texts):
                if not isinstance(item, str) or not item.strip():
                    raise ValueError(f"text {index}: empty report {item!r}; drop the pair or give its report")
            if self.ecg_seq_length is None and num_ecgs is not None and len(texts) != num_ecgs:
                record_index = data.get("record_index")
                if record_index is not None:  # window="sliding": the rows are windows, not records
                    num_records = len({int(index) for index in record_index})
                    raise ValueError(
                        f"{num_records} ECGs cut into {num_ecgs} windows (the feature extractor's window='sliding') "
                        f"for {len(texts)} reports: the processor pairs each report with one row of ecg_values; "
                        "for ECG-report pairs use a feature extractor with window='single', or give one report per "
                        "window (repeat each record's report as record_index says)"
                    )
                raise ValueError(f"{num_ecgs} ECGs for {len(texts)} reports; give one report per ECG")
            texts = self._expand_ecg_tokens(texts, num_ecgs)
            max_length = max_length or self.max_length
            if self.ecg_seq_length is not None:
                # Prompts for generate(): left padding, so that every prompt ends where generation starts, and no
                # truncation, which would drop <ecg> tokens or the end of the prompt (the opened assistant turn).
                kwargs.setdefault("padding_side", "left")
                kwargs.setdefault("add_special_tokens", not self._starts_with_bos(texts[0]))
                truncation, max_length = False, None
            text_inputs = self.tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                **kwargs,
            )
            data.update(text_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenizer_kwargs(self) -> set[str]:
        """The keyword arguments a processor passes on to its tokenizer: transformers' `TextKwargs` and the named
        parameters of this tokenizer's `__call__`."""
        names = set(TextKwargs.__annotations__)
        for name, parameter in inspect.signature(self.tokenizer.__call__).parameters.items():
            if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                names.add(name)
        return names

    def _expand_ecg_tokens(self, texts: list[str], num_ecgs: int | None) -> list[str]:
        if self.ecg_seq_length is None:
            return texts
        counts = [item.count(self.ecg_token) for item in texts]
        if num_ecgs is not None and sum(counts) != num_ecgs:
            raise ValueError(
                f"{sum(counts)} {self.ecg_token} placeholders in the text for {num_ecgs} ECGs; put exactly one "
                f"{self.ecg_token} per ECG"
            )
        if num_ecgs is not None and len(texts) == num_ecgs:
            for index, count in enumerate(counts):
                if count != 1:
                    raise ValueError(
                        f"text {index}: {count} {self.ecg_token} placeholders; with one prompt per ECG each prompt "
                        f"needs exactly one {self.ecg_token}"
                    )
        return [item.replace(self.ecg_token, self.ecg_token * self.ecg_seq_length) for item in texts]

    def format_prompt(self, instruction: str | None = None) -> str:
        """The generation prompt for one ECG: `<ecg>` then the instruction, as the user turn of the tokenizer's chat
        template (with the assistant turn opened) when it has one, else `"<ecg>\n{instruction}\n"`; without `<ecg>`
        when `condition_on_ecg` is `False`."""
        content = instruction or self.report_instruction
        if self.condition_on_ecg:
            content = f"{self.ecg_token}\n{content}"
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if self.use_chat_template and template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )
        return content + "\n"

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos) and text.startswith(bos)

    def _prompt_report_inputs(
        self,
        prompts: str | list[str],
        reports: list[str],
        num_ecgs: int | None,
        return_tensors: str | None,
        max_length: int | None,
    ) -> dict[str, Any]:
        """`input_ids = prompt + report + EOS`, right-padded; `labels` = the report + EOS, -100 elsewhere."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(reports):
            raise ValueError(f"{len(prompts)} prompts for {len(reports)} reports; give one prompt per report")
        for index, report in enumerate(reports):
            if not isinstance(report, str) or not report.strip():
                raise ValueError(
                    f"report {index}: empty reference report {report!r}; drop the pair or give its report"
                )
        tokenizer = self.tokenizer
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos_token and a pad_token to build report labels")
        expanded = self._expand_ecg_tokens(prompts, num_ecgs)
        max_length = max_length or self.max_length
        ecg_token_id = tokenizer.convert_tokens_to_ids(self.ecg_token)
        rows = []
        for index, (prompt, report) in enumerate(zip(expanded, reports)):
            prompt_ids = tokenizer(prompt, add_special_tokens=not self._starts_with_bos(prompt))["input_ids"]
            report_ids = tokenizer(report.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"text {index}: the prompt alone is {len(prompt_ids)} tokens (with {self.ecg_seq_length} per "
                    f"ECG), leaving no room for the report within max_length {max_length}"
                )
            report_ids = report_ids[:room]
            labels = [IGNORE_INDEX] * len(prompt_ids) + report_ids
            input_ids = prompt_ids + report_ids
            labels = [IGNORE_INDEX if token == ecg_token_id else label for token, label in zip(input_ids, labels)]
            rows.append((input_ids, labels))
        width = max(len(ids) for ids, _ in rows)
        padded = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in rows:
            pad = width - len(ids)
            padded["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
            padded["attention_mask"].append([1] * len(ids) + [0] * pad)
            padded["labels"].append(labels + [IGNORE_INDEX] * pad)
        return BatchFeature(padded, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.feature_extractor.model_input_names + self.tokenizer.model_input_names))


__all__ = ["DEFAULT_REPORT_INSTRUCTION", "IGNORE_INDEX", "MeritProcessor"]
