"""Model cards rendered from the evaluation results JSON, and checks for model and dataset cards.

Every number on a card comes from the results JSON that `merit_hf.evaluation` wrote, never typed by hand (timm's
habit), and is checked against the folder's weights: each results JSON records the `weights_fingerprint` of the
weights it evaluated ([`check_weights`]). The card's YAML carries `library_name` (`peft` for an adapter folder),
`pipeline_tag`, `inference: false`, `license`, `tags`, `datasets`, `base_model` (report model, adapters) and a
`model-index` with the real values; its body states what the code needs, intended use and limits, the input contract
read from the checkpoint's feature extractor settings, the protocol, and the random-init encoder baseline next to
every number. Its hidden last line records the kind of folder and its weight files, which the push checks.

Results: the `merit_hf.results/v1` files that the evaluation harness writes (any of them, old ones included), read as
`merit_hf.evaluation.results.EvaluationResults`. Each run gives one row group of the card's table, its setting
(`task`, `label_set`, `label_fraction`, `seed`) named from the run's fields, its model entry beside its `baseline`
entry (the random-init encoder of the same run); a robustness run adds one row group per shift. The protocol, the
dataset and the metric definitions come from the same files.

```bash
python -m merit_hf.hub.cards model results.json --model-folder quickstart_output/model --repo-id org/merit-ecg \
    -o README.md
python -m merit_hf.hub.cards check dataset_scripts/ptbxl/README.md --kind dataset
python -m merit_hf.hub.cards check ptbxl_merit/README.md --kind dataset --data-folder ptbxl_merit  # configs have files
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, EvalResult, ModelCard, ModelCardData

from ..evaluation.metrics import METRIC_DEFINITIONS
from ..evaluation.results import EvaluationResults, ResultEntry, format_metric, read_results
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "merit_model_card.md"  # ships in the wheel
# The "How to use" code of each kind of MERIT folder: the Auto class its `auto_map` has, and what that model returns.
MODEL_KINDS = ("encoder", "two_tower", "classifier", "classifier_adapter", "report", "report_adapter")
USAGE_TEMPLATES = {kind: DEFAULT_TEMPLATE.with_name(f"usage_{kind}.md") for kind in MODEL_KINDS}
ADAPTER_KINDS = ("classifier_adapter", "report_adapter")  # PEFT adapter folders: library_name peft, base_model needed
# The Hub metadata of each kind: `library_name` (adapters: `peft`, the Hub's convention) and `pipeline_tag`. The Hub has
# no ECG or time-series classification task, and `feature-extraction` would file a classifier as an embedder: `other`.
# Every MERIT card also sets `inference: false`: the Hub's widgets send text or images, never an ECG, and they do not
# run a repository's own code.
KIND_METADATA = {
    "encoder": ("transformers", "feature-extraction"),
    "two_tower": ("transformers", "feature-extraction"),
    "classifier": ("transformers", "other"),
    "classifier_adapter": ("peft", "other"),
    "report": ("transformers", "text-generation"),
    "report_adapter": ("peft", "text-generation"),
}
METRIC_TYPES = {"auroc": "roc_auc", "auc": "roc_auc", "f1": "f1", "accuracy": "accuracy", "bleu": "bleu"}
# Metrics indexed under a type of their own, never with the metric they bound: MERL's test-split "F1" chooses each
# class's threshold on the test labels themselves (an optimistic upper bound of macro F1).
OWN_METRIC_TYPES = {"macro_f1_max_over_thresholds": "f1-max-over-thresholds"}
# The hidden line a rendered card carries (after its text): the kind of folder it was rendered for and the
# fingerprint of that folder's tensors ([`folder_weights_digest`]), which `merit_hf.hub.push.check_model_folder`
# compares with the folder it pushes. A card rendered without a folder records neither (`<!-- merit_hf card -->`).
# Cards of an earlier merit_hf recorded `weights=`, a digest of the weight files' bytes: its kind is still compared,
# its digest is not (it changed with sharding).
CARD_MARKER = re.compile(
    r"<!-- merit_hf card(?::(?: kind=(?P<kind>[\w-]+))?(?: (?P<field>weights|tensors)=(?P<weights>[0-9a-f]+))?)? -->"
)
DEFAULT_TAGS = [
    "ecg",
    "electrocardiogram",
    "medical",
    "time-series",
    "contrastive-learning",
    "masked-modeling",
    "merit",
]
DATASET_NAMES = {"ptb-xl": "PTB-XL", "ptbxl": "PTB-XL", "mimic": "MIMIC-IV-ECG"}
DATA_CITATIONS = {
    "PTB-XL": "PTB-XL: Wagner, P. et al. (2020). PTB-XL, a large publicly available electrocardiography dataset. "
    "Scientific Data 7, 154. https://doi.org/10.1038/s41597-020-0495-6 (CC BY 4.0).",
    "MIMIC-IV-ECG": "MIMIC-IV-ECG: Gow, B. et al. (2023). MIMIC-IV-ECG: Diagnostic Electrocardiogram Matched Subset "
    "(version 1.0). PhysioNet. https://doi.org/10.13026/4nqg-sb35 (ODbL 1.0).",
}
# What every card merit_hf renders holds (checked when it is rendered). The Hub requires none of it, so a card written
# by hand, by the Trainer or by PEFT is not refused for lacking it at the push; a missing `license` is logged.
REQUIRED_MODEL_METADATA = ("library_name", "license", "tags", "pipeline_tag")
REQUIRED_DATASET_METADATA = ("license", "pretty_name", "tags")
# The Hub's licence identifiers (https://huggingface.co/docs/hub/repositories-licenses). Any other licence is `other`
# with `license_name` (and `license_link` to its text, or a LICENSE file in the repository).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
    cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
    cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
    cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1
    lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
    lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma eupl-1.2 apple-amlr apple-ascl
    fair-noncommercial-research-license grok2-community h-research intel-research openmdw-1.0 unknown
    other""".split()  # noqa: SIM905
)
# Sentences of the shipped dataset-card templates (`dataset_scripts/wfdb/README.md`) that the author must replace
# before sharing: a card that still holds one is the unedited template.
TEMPLATE_PLACEHOLDERS = (
    "Replace this section before sharing",
    "Set the licence and describe the source before you share",
)


class CardError(ValueError):
    """A results JSON or card that cannot give a truthful card; the message says what is missing."""


@dataclass(frozen=True)
class CardRow:
    """One setting of the card's table: the trained model's entry beside the random-init baseline of the same run
    (`None` when the run skipped it)."""

    setting: tuple[tuple[str, str], ...]
    task: str
    label_set: str
    split: str
    model: ResultEntry
    baseline: ResultEntry | None

    def setting_text(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.setting)

    def field(self, name: str) -> str | None:
        return dict(self.setting).get(name)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the results
# ----------------------------------------------------------------------------------------------------------------------


def load_results(results: str | os.PathLike | Mapping | EvaluationResults | list) -> list[EvaluationResults]:
    """One or several results (paths, loaded JSON objects or `EvaluationResults`) as a list of `EvaluationResults`."""
    if isinstance(results, list):
        return [item for entry in results for item in load_results(entry)]
    if isinstance(results, EvaluationResults):
        return [results]
    try:
        if isinstance(results, Mapping):
            return [EvaluationResults.from_dict(results)]
        path = Path(results)
        if not path.is_file():
            raise CardError(f"{path}: results JSON not found (run the evaluation first)")
        return [read_results(path)]
    except json.JSONDecodeError as error:
        raise CardError(f"{results}: not valid JSON ({error})") from error
    except CardError:
        raise
    except ValueError as error:
        raise CardError(str(error)) from error


def card_rows(runs: list[EvaluationResults]) -> list[CardRow]:
    """Every setting of the runs, in order: each run's model and baseline, then, for a robustness run, each shift's."""
    rows = []
    for run in runs:
        setting = [("task", run.task), *_method(run), ("label_set", run.label_set)]
        setting += [(name, _format_scalar(value)) for name, value in (("label_fraction", run.label_fraction),
                                                                      ("seed", run.seed)) if value is not None]  # fmt: skip
        split = str(run.dataset.get("split") or "test")
        rows.append(CardRow(tuple(setting), run.task, run.label_set, split, run.model, run.baseline))
        for name, shift in (run.shifts or {}).items():
            if shift.model is not None:
                shifted = (*setting, ("shift", name))
                rows.append(CardRow(shifted, run.task, run.label_set, split, shift.model, shift.baseline))
    return rows


def _method(run: EvaluationResults) -> list[tuple[str, str]]:
    """`[("method", "lora")]` for a fine-tuning run that trained LoRA adapters, else nothing: a LoRA run and a full
    one of the same setting would otherwise get rows of the same name."""
    method = (run.protocol or {}).get("finetune_method")
    return [("method", str(method))] if method not in (None, "full") else []


def _format_scalar(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def evaluation_table(rows: list[CardRow]) -> str:
    """A Markdown table: one row per (setting, metric), the model next to its random-init baseline."""
    lines = [
        "| setting | metric | this model | random-init encoder | records |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for name, metric in row.model.metrics.items():
            base = format_metric(row.baseline.metrics.get(name)) if row.baseline else "not run"
            records = row.model.num_records if row.model.num_records is not None else ""
            lines.append(f"| {row.setting_text()} | {name} | {format_metric(metric)} | {base} | {records} |")
    return "\n".join(lines)


def eval_results_for_index(rows: list[CardRow], dataset_id: str, dataset_name: str) -> list[EvalResult]:
    """`model-index` entries for the trained model's values on the evaluation split (the baseline stays in the card
    body). Each entry is told apart by its keys, not only by its display name: `dataset.config` is the label set and
    `metric.config` the rest of the setting (task, method, label fraction, seed), so no two entries share
    `(task.type, dataset.type, dataset.config, dataset.split, metric.type, metric.config)`. Robustness shifts are left
    out: their inputs are shifted or their records a subgroup, so they are no results on the dataset's split (they
    stay in the card's table). `macro_f1_max_over_thresholds` (thresholds chosen on the test labels) is indexed as
    `f1-max-over-thresholds`, never as `f1`."""
    results = []
    for row in rows:
        if row.field("shift") is not None:
            continue
        zero_shot = row.task == "zero-shot"
        for name, metric in row.model.metrics.items():
            if metric.value is None:
                continue
            metric_type = OWN_METRIC_TYPES.get(name) or next(
                (t for key, t in METRIC_TYPES.items() if key in name.lower()), name
            )
            results.append(
                EvalResult(
                    task_type="zero-shot-classification" if zero_shot else "multi-label-classification",
                    task_name="Zero-shot ECG classification" if zero_shot else "ECG classification",
                    dataset_type=dataset_id,
                    dataset_name=dataset_name,
                    dataset_config=row.label_set,
                    dataset_split=row.split,
                    metric_type=metric_type,
                    metric_name=f"{name} ({row.setting_text()})",
                    metric_config=", ".join(f"{key}={value}" for key, value in row.setting if key != "label_set"),
                    metric_value=round(metric.value, 4),
                )
            )
    return results


def feature_extractor_config(model_folder: str | os.PathLike | None) -> dict | None:
    """The feature extractor's saved settings: `preprocessor_config.json`, or the `feature_extractor` entry of a
    processor's `processor_config.json` (a report model's folder and its adapter folder keep it there; transformers
    reads it from either); `None` when the folder has neither."""
    if model_folder is None:
        return None
    folder = Path(model_folder)
    if (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text())
    if (folder / "processor_config.json").is_file():
        nested = json.loads((folder / "processor_config.json").read_text()).get("feature_extractor")
        return nested if isinstance(nested, dict) else None
    return None


def input_contract(model_folder: str | os.PathLike | None) -> str:
    """The preprocessing contract as read from the checkpoint's feature extractor settings
    ([`feature_extractor_config`])."""
    config = feature_extractor_config(model_folder)
    if config is None:
        return (
            "No feature extractor settings (`preprocessor_config.json`, or `processor_config.json` holding them) were "
            "found next to this card: load the feature extractor from the same repository and read its settings there."
        )
    settings = MeritFeatureExtractor.from_dict(config)  # a folder saved before a setting existed has its default
    rate, window = config.get("sampling_rate"), config.get("num_samples")
    seconds = f" ({window / rate:g} s)" if rate and window else ""
    low, high = config.get("highpass_hz"), config.get("lowpass_hz")
    minimum = (config.get("min_sampling_rate_factor") or 2) * high if high else None
    rows = [
        ("leads, in this order", " ".join(config.get("lead_names", []))),
        (
            "sampling rate",
            f"{rate} Hz (any input rate >= {minimum:g} Hz is resampled, polyphase)" if minimum else rate,
        ),
        (
            "window",
            f"{window} samples{seconds}; longer records cropped ({config.get('crop')}), shorter ones "
            f"{'zero-padded with a mask' if config.get('padding') else 'refused'}",
        ),
        ("band-pass", f"{low}-{high} Hz, Butterworth order {config.get('filter_order')}, zero-phase"),
        ("units", "converted to mV (V, mV, uV); unknown units refused"),
        ("normalisation", config.get("normalization")),
        ("NaN / inf", _nan_row(settings)),
        (
            "amplitude bounds",
            f"refused: a lead whose 99th percentile of abs(x - median) exceeds {_bound(settings.max_amplitude_mv)} or "
            f"is below {_bound(settings.min_amplitude_mv)} (flat leads: {settings.flat_lead_policy}), a sample more "
            f"than {_bound(settings.max_sample_deviation_mv)} from its lead's median",
        ),
        ("missing limb leads", "derived (Einthoven/Goldberger)" if config.get("derive_limb_leads") else "refused"),
    ]
    return "\n".join(["| item | value |", "| --- | --- |", *[f"| {key} | {value} |" for key, value in rows]])


def _nan_row(settings) -> str:
    if settings.nan_policy != "interpolate":
        return "refused, naming the lead" if settings.nan_policy == "raise" else str(settings.nan_policy)
    gap = "any length" if settings.max_nan_gap_s is None else f"up to {settings.max_nan_gap_s:g} s"
    share = "any share" if settings.max_nan_fraction is None else f"up to {settings.max_nan_fraction:.0%}"
    return f"interpolated (linear) in gaps of {gap}, {share} of a lead; beyond that refused"


def _bound(value, unit: str = " mV") -> str:
    return "no bound" if value is None or value == float("inf") else f"{value:g}{unit}"


def adapter_task(model_folder: str | os.PathLike | None) -> str | None:
    """The `task_type` of a PEFT adapter folder (`adapter_config.json`: `"SEQ_CLS"` for a classifier's LoRA adapter
    and head, `"CAUSAL_LM"` for a report model's, or none: `save_report_adapter` writes `task_type: null`), or None
    when the folder holds none."""
    config = adapter_config(model_folder)
    return None if config is None else config.get("task_type")


def adapter_config(model_folder: str | os.PathLike | None) -> dict | None:
    """The folder's `adapter_config.json` (a PEFT adapter folder), or None."""
    if model_folder is None or not (Path(model_folder) / "adapter_config.json").is_file():
        return None
    return json.loads((Path(model_folder) / "adapter_config.json").read_text())


def folder_kind(model_folder: str | os.PathLike | None) -> str:
    """The kind of MERIT folder (one of `MODEL_KINDS`) whose card is rendered: [`model_kind`] of its `config.json`;
    for a PEFT adapter folder (`adapter_config.json` and no `config.json`), `"report_adapter"` when it adapts a report
    model (`task_type` `CAUSAL_LM`, or `auto_mapping.base_model_class` `MeritForReportGeneration`: what
    `save_report_adapter` writes), `"classifier_adapter"` for a classifier's (`task_type` `SEQ_CLS`, the probe
    command's LoRA output), and `"adapter"` (no kind a card is rendered for) for any other adapter; `"two_tower"`
    without a folder (the card's code is then a guess, and the card records no kind: [`CARD_MARKER`])."""
    config = {}
    if model_folder is not None and (Path(model_folder) / "config.json").is_file():
        config = json.loads((Path(model_folder) / "config.json").read_text())
    adapter = adapter_config(model_folder)
    if config or adapter is None:
        return model_kind(config)
    base_class = (adapter.get("auto_mapping") or {}).get("base_model_class")
    if adapter.get("task_type") == "CAUSAL_LM" or base_class == "MeritForReportGeneration":
        return "report_adapter"
    if adapter.get("task_type") == "SEQ_CLS" or base_class == "MeritForEcgClassification":
        return "classifier_adapter"
    return "adapter"


def model_kind(config: Mapping) -> str:
    """The kind of MERIT model a folder's `config.json` holds (one of `MODEL_KINDS`): `"encoder"` (`MeritEcgModel`),
    `"report"` (`MeritForReportGeneration`), `"classifier"` (`MeritForEcgClassification`: its `architectures`, or
    an `auto_map` with `AutoModelForSequenceClassification` and either no `AutoModel` (folders saved before
    merit_hf named one) or `MeritClassifierFolderAutoModel`, the entry that refuses), else `"two_tower"`
    (`MeritModel` / `MeritForPreTraining`, and a card rendered without a model folder)."""
    model_type = config.get("model_type")
    if model_type == "merit_ecg":
        return "encoder"
    if model_type == "merit_report":
        return "report"
    if "MeritForEcgClassification" in (config.get("architectures") or ()):
        return "classifier"
    auto_map = config.get("auto_map") or {}
    auto_model = auto_map.get("AutoModel")
    refusing = auto_model is None or str(auto_model).endswith("MeritClassifierFolderAutoModel")
    if "AutoModelForSequenceClassification" in auto_map and refusing:
        return "classifier"
    return "two_tower"


def _training_text(runs: list[EvaluationResults], model_folder: str | os.PathLike | None) -> str:
    parts = []
    for training in (run.extra.get("training") for run in runs):
        if isinstance(training, str):
            parts.append(training)
        elif isinstance(training, Mapping):
            parts.append("\n".join(f"- `{key}`: {value}" for key, value in training.items()))
    if model_folder is not None and (Path(model_folder) / "config.json").is_file():
        config = json.loads((Path(model_folder) / "config.json").read_text())
        ecg = config.get("ecg_config", config)
        keys = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "patch_size",
            "mask_ratio",
            "decoder_attention",
        )
        shape = ", ".join(f"{key}={ecg[key]}" for key in keys if key in ecg)
        weights = ", ".join(
            f"{key}={config[key]}" for key in ("reconstruction_weight", "contrastive_weight") if key in config
        )
        if weights and config.get("loss_balancing") == "gradient_norm":  # the weight moved during training
            weights += (
                f" (loss_balancing=gradient_norm: the reconstruction weight starts there and follows the two terms' "
                f"gradient norms into the encoder, re-measured every {config.get('loss_balancing_interval')} steps, "
                f"within {config.get('loss_balancing_max_ratio')}x of it)"
            )
        parts.append(f"Architecture (`config.json`): {shape}." + (f" Loss weights: {weights}." if weights else ""))
    return "\n\n".join(parts) or "The training run did not record its settings in the results JSON."


def _protocol_text(runs: list[EvaluationResults]) -> str:
    """Each run's harness settings, as the evaluation recorded them (but its `feature_extractor` settings: the card's
    preprocessing section gives them, from `preprocessor_config.json`), and the records' sampling rate where the
    results record it."""
    lines = []
    for run in runs:
        if run.protocol:
            settings = "; ".join(
                f"{key}={public_path(value)}" for key, value in run.protocol.items() if key != "feature_extractor"
            )
            lines.append(f"- {run_name(run, with_seed=False)}: {settings}")
    splits = {run.dataset.get("splits") for run in runs} - {None}
    recorded: set[float] = set()  # one rate per file, or a list where its records differ; older files lack it
    for run in runs:
        rate = run.dataset.get("sampling_rate")
        recorded.update(rate if isinstance(rate, list) else [] if rate is None else [rate])
    rates = sorted(recorded)
    text = "\n".join(lines) or "- The results JSON does not record the harness settings."
    if splits:
        text += "\n\nSplits: " + "; ".join(sorted(splits))
    if rates:
        listed = " / ".join(f"{rate:g}" for rate in rates)
        text += f"\n\nRecords' sampling rate: {listed} Hz (before the feature extractor resamples them)."
    return text


def public_path(value: Any) -> Any:
    """A local absolute path (a prompt file in a virtualenv, a data folder) as its file name: a card is public, and
    the path says nothing to its readers but tells them the author's folder layout. Other values unchanged."""
    if isinstance(value, str) and _is_local_path(value):
        return Path(value.replace("\\", "/")).name
    return value


def _is_local_path(text: str) -> bool:
    return bool(re.match(r"^(/|~/|[A-Za-z]:[\\/])", text)) and "://" not in text


def _evaluation_dataset(runs: list[EvaluationResults], datasets: list[str] | None) -> tuple[str, str]:
    """`(id, display name)` of the evaluation data: the Hub id when one is given, else the results' name."""
    name = runs[0].dataset.get("name")
    dataset_id = str(name or (datasets or ["PTB-XL"])[0])
    if datasets:
        dataset_id = next((d for d in datasets if _display_name(d) == _display_name(dataset_id)), dataset_id)
    return dataset_id, _display_name(dataset_id)


def _display_name(dataset_id: str) -> str:
    lowered = dataset_id.lower().replace("_", "-")
    return next((name for key, name in DATASET_NAMES.items() if key in lowered), dataset_id)


# ----------------------------------------------------------------------------------------------------------------------
# Which weights the numbers are of
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class WeightsCheck:
    """How each run's numbers relate to the folder's weights: `matched`, `mismatched` (`(run, recorded, folder's)`),
    `unrecorded` (results files that record no `weights_fingerprint`) and `unchecked` (`(run, why)`)."""

    matched: list[tuple[str, dict[str, str]]]
    mismatched: list[tuple[str, dict[str, str], dict[str, str]]]
    unrecorded: list[str]
    unchecked: list[tuple[str, str]]

    def text(self) -> str:
        """The card's paragraph about it (in its Evaluation section)."""
        parts = []
        if self.matched:
            fingerprints = sorted({value for _, recorded in self.matched for value in recorded.values()})
            parts.append(
                f"Weights: the results of {_runs_text([name for name, _ in self.matched])} record the fingerprint of "
                f"the weights they evaluated ({', '.join(f'`{f}`' for f in fingerprints)}; "
                "`merit_hf.models.fingerprint.weights_fingerprint`), and it is that of this checkpoint's weights: "
                "checked when this card was rendered."
            )
        for name, recorded, found in self.mismatched:
            parts.append(
                f"**Warning: these are not this checkpoint's numbers.** The results of {name} were computed on other "
                f"weights ({_fingerprints_text(recorded)}), not on this checkpoint's ({_fingerprints_text(found)})."
            )
        if self.unrecorded:
            parts.append(
                f"**Not checked against these weights:** the results files of {_runs_text(self.unrecorded)} record no "
                "weights fingerprint (written before merit_hf recorded one), so nothing ties their numbers to this "
                "checkpoint's weights."
            )
        reasons: dict[str, list[str]] = {}
        for name, why in self.unchecked:
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            parts.append(f"**Not checked against these weights:** the results of {_runs_text(names)}: {why}.")
        return "\n\n".join(parts)


def _runs_text(names: list[str]) -> str:
    return "; ".join(f"`{name}`" for name in names)


def _fingerprints_text(fingerprints: Mapping[str, str]) -> str:
    return ", ".join(f"{key} `{value}`" for key, value in sorted(fingerprints.items()))


def run_name(run: EvaluationResults, *, with_seed: bool = True) -> str:
    """A run as the card's weights check names it: `linear-probe, superclass, label_fraction=1, seed=0`; with
    `with_seed=False`, as its protocol lines name it: `linear-probe, superclass, label_fraction=1`."""
    method = [value for _, value in _method(run)]
    fraction = [] if run.label_fraction is None else [f"label_fraction={_format_scalar(run.label_fraction)}"]
    seed = [f"seed={run.seed}"] if with_seed else []
    return ", ".join([*(_format_scalar(v) for v in (run.task, *method, run.label_set)), *fraction, *seed])


class FolderWeights:
    """The fingerprints of a model folder's weights, each computed once and only when asked for, as the evaluation
    computed them of the weights it evaluated: `ecg_encoder` (the encoder `merit_hf.evaluation.probe.load_encoder`
    reads from the folder), `two_tower` (the model `evaluate_zero_shot` loads with `AutoModel`; the same load gives
    `ecg_encoder` too, as [`merit_hf.evaluation.zero_shot.zero_shot_fingerprints`] records both), `adapter` (a PEFT
    adapter folder's `adapter_model.safetensors`) and `tensors` (the card's [`folder_weights_digest`]). A value is
    `None` when the folder has no such weights; `why` says why."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._values: dict[str, str | None] = {}
        self.why: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        if key not in self._values:
            self._values[key] = self._compute(key)
        return self._values[key]

    def _compute(self, key: str) -> str | None:
        from ..models.fingerprint import safetensors_fingerprint, weights_fingerprint

        if key == "tensors":
            adapter = self.folder / "adapter_model.safetensors"
            if self._values.get("adapter") is not None and sorted(self.folder.glob("*.safetensors")) == [adapter]:
                # the adapter's tensors are all the folder's, and they were read: the same fingerprint
                return self._values["adapter"]
            return folder_weights_digest(self.folder)
        if key == "adapter":
            path = self.folder / "adapter_model.safetensors"
            if not path.is_file():
                self.why[key] = "the folder holds no PEFT adapter"
                return None
            return safetensors_fingerprint(path)
        if not (self.folder / "config.json").is_file() or not any(self.folder.glob("*.safetensors")):
            self.why[key] = "the folder holds no model weights (config.json and *.safetensors)"
            return None
        try:
            if key == "ecg_encoder":
                from ..evaluation.probe import load_encoder

                return weights_fingerprint(load_encoder(self.folder)[0])
            if key == "two_tower":
                from transformers import AutoModel

                from ..evaluation.zero_shot import zero_shot_fingerprints
                from ..models.merit.pipeline_merit import two_tower_model

                fingerprints = zero_shot_fingerprints(two_tower_model(AutoModel.from_pretrained(str(self.folder))))
                self._values.setdefault("ecg_encoder", fingerprints["ecg_encoder"])
                return fingerprints["two_tower"]
        except (OSError, ValueError, TypeError, KeyError) as error:
            self.why[key] = f"its weights could not be loaded as the evaluation loads them ({error})"
            return None
        raise KeyError(key)


def check_weights(
    runs: list[EvaluationResults], model_folder: str | os.PathLike | FolderWeights | None
) -> WeightsCheck:
    """Compare the `weights_fingerprint` each run recorded (`merit_hf.evaluation.results`) with the weights of
    `model_folder`. A run matches when the folder's ECG encoder is the one it evaluated (or, for a LoRA fine-tuning
    run, the merged model's encoder it saved) and, for zero-shot, the folder's two towers are too; a PEFT adapter
    folder matches the run that saved that adapter. Runs without a fingerprint (files written before merit_hf
    recorded one) are `unrecorded`; without a folder, or a folder with no weights of the kind the run recorded, a run
    is `unchecked`. A [`FolderWeights`] given for the folder keeps the fingerprints computed here for its caller."""
    check = WeightsCheck([], [], [], [])
    if model_folder is None or isinstance(model_folder, FolderWeights):
        folder = model_folder
    else:
        folder = FolderWeights(model_folder)
    for run in runs:
        name, recorded = run_name(run), run.model.weights_fingerprint or {}
        if not recorded:
            check.unrecorded.append(name)
            continue
        if folder is None:
            check.unchecked.append((name, "the card was rendered without the model folder"))
            continue
        if (folder.folder / "adapter_config.json").is_file() and not (folder.folder / "config.json").is_file():
            if "adapter" not in recorded:
                check.unchecked.append((name, "this folder holds a PEFT adapter, and the results record the weights of "
                                              f"no adapter ({_fingerprints_text(recorded)})"))  # fmt: skip
                continue
            keys = ["adapter"]
        else:
            keys = ["ecg_encoder"]
            if "two_tower" in recorded:
                keys.append("two_tower")
                folder.get("two_tower")  # first: its one load of the folder gives ecg_encoder too
        found = {key: folder.get(key) for key in keys}
        if any(value is None for value in found.values()):
            missing = next(key for key, value in found.items() if value is None)
            check.unchecked.append((name, f"{folder.why.get(missing, 'no weights')}; the results record "
                                          f"{_fingerprints_text(recorded)}"))  # fmt: skip
            continue
        accepted = {
            "adapter": {recorded.get("adapter")},
            "ecg_encoder": {recorded.get("ecg_encoder"), recorded.get("fine_tuned_ecg_encoder")},
            "two_tower": {recorded.get("two_tower")},
        }
        if all(value in accepted[key] - {None} for key, value in found.items()):
            check.matched.append((name, {key: value for key, value in found.items() if value is not None}))
        else:
            check.mismatched.append((name, recorded, {key: value for key, value in found.items() if value}))
    return check


def folder_weights_digest(model_folder: str | os.PathLike | None) -> str | None:
    """The fingerprint of the tensors in the folder's weight files (`*.safetensors` at its top, read with safetensors'
    `safe_open`, no model built; [`merit_hf.models.fingerprint.safetensors_files_fingerprint`]: names, shapes and
    values), or None when it has none. The same weights re-saved with other sharding or another safetensors header
    give the same fingerprint; one changed value gives another. A file that safetensors cannot read is hashed by its
    name and bytes into the fingerprint. The card records it ([`CARD_MARKER`]), and the push refuses a card recorded
    for other tensors ([`card_marker`])."""
    if model_folder is None:
        return None
    files = sorted(Path(model_folder).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import SafetensorError, safe_open

    from ..models.fingerprint import safetensors_files_fingerprint

    readable, unreadable = [], []
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                readable.append(path)
        except (SafetensorError, OSError):
            unreadable.append(path)
    if not unreadable:
        return safetensors_files_fingerprint(readable)
    digest = hashlib.sha256(safetensors_files_fingerprint(readable).encode() if readable else b"")
    for path in unreadable:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def card_marker(card_text: str) -> tuple[str | None, str | None] | None:
    """`(kind, tensors fingerprint)` that a card rendered by merit_hf records, or None for any other card. The kind is
    None for a card rendered without a folder; the fingerprint is None then, and for a card of an earlier merit_hf
    (its `weights=` digest of the files' bytes cannot be compared with [`folder_weights_digest`])."""
    match = CARD_MARKER.search(card_text)
    if not match:
        return None
    return match["kind"], match["weights"] if match["field"] == "tensors" else None


# ----------------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------------
SUMMARIES = {
    "encoder": "A 12-lead ECG encoder pretrained with MERIT's two branches on one encoder: masked ECG modelling "
    "(structure) and ECG-report contrastive alignment (semantics).",
    "two_tower": "A 12-lead ECG encoder pretrained with MERIT's two branches on one encoder: masked ECG modelling "
    "(structure) and ECG-report contrastive alignment (semantics), with a text tower for zero-shot classification.",
    "classifier": "A 12-lead ECG classifier: a MERIT ECG encoder with a linear head, fine-tuned on the labels named "
    "in its config (`id2label`).",
    "classifier_adapter": "A LoRA adapter and classification head for a MERIT ECG encoder (the base model named "
    "below), fine-tuned on the labels given at loading.",
    "report": "An ECG-conditioned report generator: the MERIT ECG encoder, a projector and a causal language model.",
    "report_adapter": "A LoRA adapter (and projector) for an ECG-conditioned report generator: the MERIT ECG encoder, "
    "a projector and a causal language model, the base model named below.",
}


def render_model_card(
    results: str | os.PathLike | Mapping | EvaluationResults | list,
    repo_id: str,
    *,
    model_folder: str | os.PathLike | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's metadata key
    datasets: list[str] | None = None,
    base_model: str | list[str] | None = None,
    pipeline_tag: str | None = None,
    extra_tags: list[str] | None = None,
    template: str | os.PathLike = DEFAULT_TEMPLATE,
    allow_weights_mismatch: bool = False,
) -> ModelCard:
    """Render a MERIT model card from a results JSON; the returned `ModelCard` parses and carries `model-index`.

    Args:
        results: the results written by `merit_hf.evaluation` (paths, loaded JSON or `EvaluationResults`; a list for
            several runs, e.g. linear probe at 1/10/100 % labels and zero-shot).
        repo_id: the Hub repository the card is for (used in the usage snippet).
        model_folder: the `save_pretrained` folder; its feature extractor settings give the input contract, its
            `config.json` the architecture and the kind of model ([`folder_kind`]), whose loading and inference code
            the card shows, `library_name` (`peft` for an adapter folder) and `pipeline_tag` (`feature-extraction`
            for an encoder or two towers, `text-generation` for a report model, `other` for a classifier), and its
            weights are checked against the `weights_fingerprint` each results file recorded ([`check_weights`]).
        datasets: Hub ids of the training/evaluation datasets (YAML `datasets`).
        base_model: the report model's language model (required); for an adapter folder, the model it adapts
            (default: `adapter_config.json`'s `base_model_name_or_path`; required); for a classifier, the encoder it
            was fine-tuned from (optional). YAML `base_model`.
        template: a `string.Template` Markdown file with `$metadata`, `$title`, ... placeholders.
        allow_weights_mismatch: render results whose recorded weights are not the folder's; the card then says so in
            bold. Without it they raise `CardError`. Results that record no fingerprint (older files), or a card
            rendered without the folder, are not refused: the card says that they were not checked, and a warning is
            logged.
    """
    runs = load_results(results)
    rows = card_rows(runs)
    kind = folder_kind(model_folder)
    if kind not in MODEL_KINDS:
        raise CardError(
            f"{model_folder}: a PEFT adapter of task_type {adapter_task(model_folder)!r}; merit_hf renders cards for "
            "classifier (SEQ_CLS) and report-generation adapters"
        )
    adapter = adapter_config(model_folder) if kind in ADAPTER_KINDS else None
    if adapter is not None and not base_model:
        base_model = adapter.get("base_model_name_or_path") or None
    if kind == "report" and not base_model:
        raise CardError("a report-generation card needs base_model (the language model it was adapted from)")
    if kind in ADAPTER_KINDS and not base_model:
        raise CardError(
            f"an adapter card needs base_model (the model the adapter is loaded onto): {model_folder}/"
            "adapter_config.json names none in base_model_name_or_path; pass base_model (--base-model) with its Hub id"
        )
    folder_weights = FolderWeights(model_folder) if model_folder is not None else None
    weights = check_weights(runs, folder_weights)
    if weights.mismatched and not allow_weights_mismatch:
        raise CardError(
            "the results are not of this folder's weights: "
            + "; ".join(
                f"{name} evaluated {_fingerprints_text(recorded)}, {model_folder} holds {_fingerprints_text(found)}"
                for name, recorded, found in weights.mismatched
            )
            + ". Evaluate this folder and render the card from those results, or pass allow_weights_mismatch=True "
            "(--allow-weights-mismatch) to publish them with a warning on the card"
        )
    for problem in [*weights.mismatched, *weights.unrecorded, *weights.unchecked]:
        logger.warning("model card for %s: not checked against the weights, or of other weights: %s", repo_id, problem)
    library_name, default_tag = KIND_METADATA[kind]
    is_report = kind in ("report", "report_adapter")
    dataset_id, dataset_name = _evaluation_dataset(runs, datasets)
    name = model_name or repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=name,
        library_name=library_name,
        pipeline_tag=pipeline_tag or default_tag,
        license=license,
        tags=[*DEFAULT_TAGS, *(["report-generation"] if is_report else []), "custom_code", *(extra_tags or [])],
        datasets=datasets,
        base_model=base_model,
        eval_results=eval_results_for_index(rows, dataset_id, dataset_name),
        inference=False,
    )
    definitions = {key: value for run in runs for key, value in run.metric_definitions.items()}
    definitions = definitions or dict(METRIC_DEFINITIONS)
    evaluation = "\n\n".join(
        [
            "Protocol, as each evaluation run recorded it:\n\n" + _protocol_text(runs),
            f"Evaluation data: {dataset_name} (`{dataset_id}`). Values are from the results JSON written by "
            "`merit_hf.evaluation`; brackets are 95% bootstrap intervals when the evaluation computed them. The "
            "random-init column is the same architecture with untrained weights, run through the same harness: "
            "the gap between the two columns is what pretraining adds.",
            *filter(None, [weights.text()]),
            evaluation_table(rows),
            *(
                [
                    "Rows with a `shift` are the model under a distribution shift (robustness): they are not results "
                    "on the dataset's split, so the `model-index` metadata leaves them out."
                ]
                if any(row.field("shift") is not None for row in rows)
                else []
            ),  # fmt: skip
            "Metric definitions:\n\n" + "\n".join(f"- `{key}`: {value}" for key, value in definitions.items()),
        ]
    )
    used = {dataset_name, *(_display_name(d) for d in (datasets or []))}
    citations = "\n".join(f"- {DATA_CITATIONS[key]}" for key in DATA_CITATIONS if key in used)
    digest = folder_weights.get("tensors") if folder_weights is not None else None
    if model_folder is None:
        logger.warning(
            "the card is rendered without the model folder: its code assumes a two-tower model, and it records no "
            "kind of folder or weights (render it with the folder to have them checked at the push)"
        )
        marker = "<!-- merit_hf card -->"
    else:
        marker = f"<!-- merit_hf card: kind={kind}{f' tensors={digest}' if digest else ''} -->"
    body = string.Template(Path(template).read_text()).substitute(
        metadata=card_data.to_yaml(),
        title=name,
        repo_id=repo_id,
        usage=string.Template(USAGE_TEMPLATES[kind].read_text())
        .substitute(repo_id=repo_id, id2label=repr(dict(enumerate(runs[0].label_names))) if runs else "{}")
        .strip(),
        summary=SUMMARIES[kind],
        intended_use=(
            "- Intended: research on ECG representation learning; embeddings for linear probes and fine-tuning; "
            "zero-shot scoring of ECGs against text descriptions"
            + ("; drafting report text for review" if is_report else "")
            + ".\n- Not intended: diagnosis, triage or any clinical decision; use on populations, devices or lead "
            "systems unlike the training data without new validation.\n- Known limits: the evaluation data come "
            "from few hospitals and devices; performance across age, sex and ethnicity was not audited; "
            "zero-shot scores are cosine similarities, not calibrated probabilities."
        ),
        requirements=requirements_text(kind),
        input_contract=input_contract(model_folder),
        evaluation=evaluation,
        training=_training_text(runs, model_folder),
        data_citations=("Data:\n\n" + citations) if citations else "",
        transformers_requirement=transformers_requirement(),
        card_marker=marker,
    )
    card = ModelCard(body)
    problems = model_card_problems(card, required=REQUIRED_MODEL_METADATA)
    if problems:
        raise CardError("rendered card is invalid: " + "; ".join(problems))
    return card


def requirements_text(kind: str) -> str:
    """What the card's code needs besides transformers: the packages the remote code imports (the feature
    extractor's filters and resampling are SciPy's), `wfdb` for the WFDB layouts that merit_hf does not read itself,
    and `peft` for an adapter."""
    text = (
        "PyTorch, NumPy and SciPy (the feature extractor's band-pass filter and resampling; transformers and PyTorch do "
        "not install it)"
    )
    if kind in ADAPTER_KINDS:
        text += ", and `peft` (this repository holds a PEFT adapter, loaded onto the base model named in its metadata)"
    return (
        text + ". Reading a WFDB record by its path also needs `wfdb` when its signals are stored in a format other "
        "than 16 (PTB-XL's and MIMIC-IV-ECG's records are read without it)"
    )


def transformers_requirement() -> str:
    """The transformers version range the remote code needs: merit_hf's own requirement (pyproject.toml), read from
    the installed package's metadata so that the card and the package cannot disagree."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        requirements = requires("merit_hf") or []
    except PackageNotFoundError as error:
        raise CardError(
            "merit_hf is not installed (pip install -e .): its transformers requirement is unknown"
        ) from error
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name.lower() == "transformers" and requirement.marker is None:
            specifiers = sorted(str(specifier) for specifier in requirement.specifier)
            return "transformers" + ",".join(sorted(specifiers, key=lambda specifier: specifier.startswith("<")))
    raise CardError("merit_hf's metadata names no transformers requirement")


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


def model_card_problems(card: ModelCard | str | os.PathLike, required: tuple[str, ...] = ()) -> list[str]:
    """Problems of a model card, found locally with huggingface_hub's own parsing (`ModelCard`, `ModelCardData`):
    metadata that does not parse, a licence that is no Hub licence identifier ([`license_problems`]), a `model-index`
    with results that do not parse back into eval results, and missing metadata among `required` (what a card
    merit_hf renders must hold, `REQUIRED_MODEL_METADATA`; the push requires none: the Hub does not). A card without a
    `license` passes with a logged warning; so does a `model-index` whose entries have no results (`results: []`, what
    the Trainer writes when no evaluation ran)."""
    try:
        card = card if isinstance(card, ModelCard) else ModelCard.load(card)
    except Exception as error:  # huggingface_hub raises ValueError, yaml its own errors, model-index KeyError  # noqa: BLE001
        return [f"the card's metadata does not parse ({type(error).__name__}: {error})"]
    data = card.data.to_dict()
    problems = [f"metadata {key!r} is missing" for key in required if not data.get(key)]
    if "license" not in required and not data.get("license"):
        logger.warning("the model card names no license: the Hub shows none (add `license:` to its metadata)")
    problems += license_problems(data)
    index = data.get("model-index")
    has_results = any(isinstance(entry, dict) and entry.get("results") for entry in _as_list_of_dicts(index))
    if index is not None and has_results and not card.data.eval_results:
        problems.append("model-index does not parse into eval results")
    return problems


def license_problems(metadata: Mapping) -> list[str]:
    """A `license` that is not one of the Hub's identifiers (`HUB_LICENSES`), or `license: other` without the
    `license_name` the Hub asks for."""
    problems = []
    for license_id in _as_list_of_strings(metadata.get("license")):
        if license_id not in HUB_LICENSES:
            problems.append(
                f"license {license_id!r} is not a Hub licence identifier (https://huggingface.co/docs/hub/"
                "repositories-licenses): use one, or `license: other` with `license_name` and `license_link`"
            )
        elif license_id == "other" and not metadata.get("license_name"):
            problems.append(
                "license is `other` without `license_name`: name the licence (and link its text with `license_link`, "
                "or add a LICENSE file), or use a Hub licence identifier"
            )
    return problems


def template_problems(card: ModelCard | DatasetCard) -> list[str]:
    """The placeholder sentences of a shipped card template (`TEMPLATE_PLACEHOLDERS`) that a card still holds: it is
    the unedited template (the WFDB dataset card, which cannot know the records' licence or source)."""
    text = " ".join(card.text.split())
    return [
        f"the card still holds the template's {placeholder!r}: replace that section (licence and source of the data) "
        "before sharing"
        for placeholder in TEMPLATE_PLACEHOLDERS
        if placeholder in text
    ]


def _as_list_of_strings(value) -> list[str]:
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def dataset_card_problems(
    card: DatasetCard | str | os.PathLike, data_folder: str | os.PathLike | None = None
) -> list[str]:
    """Problems of a dataset card (the converted PTB-XL / MIMIC-IV-ECG cards beside `dataset_scripts/`): metadata that
    does not parse (`DatasetCard`), required metadata, a Hub licence identifier ([`license_problems`]: the WFDB
    template's `license: other` without `license_name` is refused), no sentence left of a template
    ([`template_problems`]), a citation of the source data, and a licence statement in the text. With `data_folder` (the converted
    folder the card goes with), also every `configs:` entry must have its data there ([`dataset_config_problems`])."""
    try:
        card = card if isinstance(card, DatasetCard) else DatasetCard.load(card)
    except Exception as error:  # huggingface_hub raises ValueError, yaml its own errors  # noqa: BLE001
        return [f"the card's metadata does not parse ({type(error).__name__}: {error})"]
    data = card.data.to_dict()
    problems = [f"metadata {key!r} is missing" for key in REQUIRED_DATASET_METADATA if not data.get(key)]
    problems += license_problems(data)
    problems += template_problems(card)
    text = card.text.lower()
    if "doi.org" not in text and "citation" not in text and "cite" not in text:
        problems.append("no citation of the source data")
    if "licen" not in text:
        problems.append("the text does not state the licence")
    problems.extend(dataset_info_problems(card))
    if data_folder is not None:
        problems.extend(dataset_config_problems(card, data_folder))
    return problems


def dataset_config_problems(card: DatasetCard | str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """The `configs:` entries of a dataset card with `data_files` patterns that match no file in `folder` (resolved as
    `load_dataset(folder)` resolves them): after a push, `load_dataset(repo, name)` would fail on each of them."""
    card = card if isinstance(card, DatasetCard) else DatasetCard.load(card)
    problems = [
        f"configs entry {name!r}: data_files {', '.join(patterns)} match no file in {folder}"
        for name, patterns in _unmatched_data_files(card, folder).items()
    ]
    held = split_rows(card, folder)
    for info in _as_list_of_dicts(card.data.to_dict().get("dataset_info")):
        name = info.get("config_name", "default")
        for split in info.get("splits") or []:
            stated, found = split.get("num_examples"), held.get(name, {}).get(split.get("name"))
            if stated is not None and found is not None and int(stated) != found:
                problems.append(
                    f"dataset_info {name!r} split {split.get('name')!r}: num_examples {stated}, but the files in "
                    f"{folder} hold {found} rows (write the card with write_dataset_card)"
                )
    return problems


def dataset_info_problems(card: DatasetCard | str | os.PathLike) -> list[str]:
    """The `dataset_info` splits of a dataset card that `datasets` cannot read: each needs `name`, `num_examples` and
    `num_bytes`, or `load_dataset` ignores all of the card's split counts (and warns "Ignoring part of dataset_info
    from the dataset card: The 'splits' field in YAML is malformed ..." on every load)."""
    card = card if isinstance(card, DatasetCard) else DatasetCard.load(card)
    problems = []
    for info in _as_list_of_dicts(card.data.to_dict().get("dataset_info")):
        for split in info.get("splits") or []:
            split = split if isinstance(split, Mapping) else {"name": split}
            missing = [key for key in ("name", "num_examples", "num_bytes") if split.get(key) is None]
            if missing:
                name = split.get("name")
                problems.append(
                    f"dataset_info {info.get('config_name', 'default')!r} split {name!r} lacks "
                    f"{', '.join(missing)}: datasets.load_dataset would ignore the card's split counts (write the "
                    "card with write_dataset_card)"
                )
    return problems


def split_files(card: DatasetCard, folder: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """`{config_name: {split: files}}` of the card's `configs:` entries, each split's patterns resolved in `folder`
    as `load_dataset(folder)` resolves them (a pattern that matches nothing adds no file)."""
    from datasets.data_files import resolve_pattern

    files: dict[str, dict[str, list[str]]] = {}
    for config in card.data.to_dict().get("configs") or []:
        for split, patterns in _split_patterns(config):
            if split is None:
                continue
            found = files.setdefault(config.get("config_name", "default"), {}).setdefault(split, [])
            for pattern in patterns:
                try:
                    found.extend(resolve_pattern(pattern, str(folder)))
                except FileNotFoundError:
                    continue
    return files


def split_rows(card: DatasetCard, folder: str | os.PathLike) -> dict[str, dict[str, int]]:
    """`{config_name: {split: rows}}` of the card's `configs:` entries whose Parquet files are in `folder` (rows read
    from the files' footers)."""
    import pyarrow.parquet as pq

    counts: dict[str, dict[str, int]] = {}
    for name, splits in split_files(card, folder).items():
        for split, files in splits.items():
            rows = 0
            for file in files:
                try:
                    rows += pq.read_metadata(file).num_rows
                except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                    raise ValueError(f"{file}: not a readable Parquet file ({error})") from error
            counts.setdefault(name, {})[split] = rows
    return counts


def arrow_num_bytes(files: list[str]) -> int:
    """A split's `num_bytes` as `datasets` defines it: the Arrow size (`pa.Table.nbytes`) of the tables its Parquet
    builder writes into the cache. They are read as that builder reads them (one batch per row group, the size of the
    first one; cast to the features of the first file's schema), since the offsets and validity buffers of each batch
    count. The Parquet footers cannot give it (they hold encoded sizes), so the data are read, one batch at a time."""
    import pyarrow as pa
    import pyarrow.dataset as pds
    from datasets import Features
    from datasets.table import table_cast

    total, schema = 0, None
    file_format = pds.ParquetFileFormat()
    for file in files:
        with open(file, "rb") as stream:
            fragment = file_format.make_fragment(stream)
            if schema is None:
                schema = Features.from_arrow_schema(fragment.physical_schema).arrow_schema
            if not fragment.row_groups:
                continue
            batches = fragment.to_batches(  # an empty file's one row group has 0 rows, which pyarrow refuses as a size
                batch_size=max(1, fragment.row_groups[0].num_rows), batch_readahead=0, fragment_readahead=0
            )
            for batch in batches:
                total += table_cast(pa.Table.from_batches([batch]).combine_chunks(), schema).nbytes
    return total


def size_category(num_rows: int) -> str:
    """The Hub's `size_categories` bucket of a data set of `num_rows` examples."""
    for bound, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")):
        if num_rows < bound:
            return name
    return "1M<n<10M" if num_rows < 10**7 else "n>10M"


def _as_list_of_dicts(value) -> list[dict]:
    if not value:
        return []
    return [value] if isinstance(value, Mapping) else list(value)


def write_dataset_card(template: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the dataset card `template` (which lists every configuration a conversion can produce) to
    `folder/README.md`, keeping only the `configs:` entries that have data in `folder`: a 100 Hz conversion must not
    announce a `500hz` config. An entry with only some of its files stays, for [`dataset_config_problems`] to name.
    The YAML's `dataset_info` then gives each kept config's splits with the rows their files hold (`num_examples`)
    and their Arrow size (`num_bytes`, [`arrow_num_bytes`]; without it `datasets` ignores the counts), and
    `size_categories` the bucket of the largest config: the numbers of this folder (a subset, or records the
    conversion skipped), not of the data set the template describes."""
    card = DatasetCard.load(template)
    unmatched = _unmatched_data_files(card, folder)
    configs = card.data.to_dict().get("configs")
    if configs:  # an entry goes when all of its patterns are unmatched
        card.data.configs = [
            config
            for config in configs
            if unmatched.get(config.get("config_name", "default")) != _data_file_patterns(config)
        ]
    counts = split_rows(card, folder)
    if counts:
        files = split_files(card, folder)
        card.data.dataset_info = [
            {
                "config_name": name,
                "splits": [
                    {"name": split, "num_bytes": arrow_num_bytes(files[name][split]), "num_examples": rows}
                    for split, rows in splits.items()
                ],
            }
            for name, splits in counts.items()
        ]
        card.data.size_categories = [size_category(max(sum(splits.values()) for splits in counts.values()))]
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def _split_patterns(config: Mapping) -> list[tuple[str | None, list[str]]]:
    """`(split, path patterns)` of each `data_files` entry of one `configs:` entry (split `None` for a bare pattern);
    `data_files` is a pattern, a list of patterns, or a list of `{split, path}` whose `path` is a pattern or a list of
    them (the `datasets` card format)."""
    data_files = config.get("data_files") or []
    entries = []
    for entry in data_files if isinstance(data_files, list) else [data_files]:
        paths = entry.get("path", []) if isinstance(entry, Mapping) else entry
        entries.append(
            (entry.get("split") if isinstance(entry, Mapping) else None, paths if isinstance(paths, list) else [paths])
        )
    return entries


def _data_file_patterns(config: Mapping) -> list[str]:
    """The path patterns of one `configs:` entry, of every split."""
    return [pattern for _, patterns in _split_patterns(config) for pattern in patterns]


def _unmatched_data_files(card: DatasetCard, folder: str | os.PathLike) -> dict[str, list[str]]:
    """`{config_name: [patterns that match no file in folder]}` for the card's `configs:` entries with such patterns."""
    from datasets.data_files import resolve_pattern

    unmatched = {}
    for config in card.data.to_dict().get("configs") or []:
        missing = []
        for pattern in _data_file_patterns(config):
            try:
                resolve_pattern(pattern, str(folder))
            except FileNotFoundError:
                missing.append(pattern)
        if missing:
            unmatched[config.get("config_name", "default")] = missing
    return unmatched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m merit_hf.hub.cards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="render a model card from a results JSON")
    model.add_argument("results", nargs="+", help="one or several results JSONs")
    model.add_argument("--repo-id", required=True)
    model.add_argument("--model-folder")
    add_card_arguments(model)
    model.add_argument("-o", "--output", required=True)
    check = commands.add_parser("check", help="check a model or dataset card")
    check.add_argument("card")
    check.add_argument("--kind", choices=("model", "dataset"), default="model")
    check.add_argument("--data-folder", help="dataset only: the converted folder whose files the `configs:` name")
    args = parser.parse_args(argv)
    if args.command == "model":
        card = render_model_card(
            args.results if len(args.results) > 1 else args.results[0],
            args.repo_id,
            model_folder=args.model_folder,
            **card_options(args),
        )
        card.save(args.output)
        print(f"wrote {args.output}")
        return
    if args.kind == "model":
        problems = model_card_problems(args.card)
    else:
        problems = dataset_card_problems(args.card, data_folder=args.data_folder)
    if problems:
        raise SystemExit(f"{args.card}: " + "; ".join(problems))
    print(f"{args.card}: ok")


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """The card options that `python -m merit_hf.hub.cards model` and `python -m merit_hf.hub push` share."""
    parser.add_argument("--dataset", action="append", dest="datasets", help="Hub dataset id (repeatable)")
    parser.add_argument(
        "--base-model",
        help="the model this one was built on (YAML base_model): required for a report model (its language model); "
        "for an adapter folder, default: adapter_config.json's base_model_name_or_path",
    )
    parser.add_argument("--license", help="a Hub licence identifier (default: apache-2.0)")
    parser.add_argument(
        "--allow-weights-mismatch",
        action="store_true",
        help="render results whose recorded weights are not the folder's; the card says so in bold",
    )


def card_options(args: argparse.Namespace) -> dict[str, Any]:
    """`render_model_card` keywords from the options of [`add_card_arguments`] that were given."""
    options = {
        "datasets": args.datasets,
        "base_model": args.base_model,
        "license": args.license,
        "allow_weights_mismatch": args.allow_weights_mismatch,
    }
    return {key: value for key, value in options.items() if value not in (None, False)}


def cli(argv: list[str] | None = None) -> None:
    """`python -m merit_hf.hub.cards`: `main`, a card that cannot be rendered as one `error:` line."""
    try:
        main(argv)
    except CardError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    # `python -m merit_hf.hub.cards` runs this file a second time, as `__main__`: the imported module's `cli` catches the
    # CardError its own functions raise
    from merit_hf.hub.cards import cli as _cli

    _cli()


__all__ = [
    "CardError",
    "CardRow",
    "arrow_num_bytes",
    "card_rows",
    "dataset_card_problems",
    "dataset_config_problems",
    "dataset_info_problems",
    "size_category",
    "split_files",
    "split_rows",
    "evaluation_table",
    "input_contract",
    "load_results",
    "model_card_problems",
    "model_kind",
    "folder_kind",
    "check_weights",
    "license_problems",
    "template_problems",
    "card_marker",
    "cli",
    "render_model_card",
    "write_dataset_card",
]
