"""ECG report generation with Accelerate: a MERIT encoder, a projector and a causal LM tuned with PEFT LoRA.

Two stages (LLaVA / ECG-Chat): (1) projector alignment, where only `multi_modal_projector` trains and the encoder and
LM stay frozen; (2) LoRA on the language model only (a regex on its module names, never on the encoder), with the
projector still training through PEFT's `modules_to_save` (and the encoder too with `--freeze_ecg_encoder false`, so
that the adapter holds the encoder that was trained). The loss is the LM's next-token loss on the report tokens
only (`MeritProcessor` puts -100 on the prompt, the ECG tokens and the padding).

One CPU (the quick path; a tiny model in seconds, SmolLM2-135M in minutes):

    python -m merit_hf.training.report_lora configs/report_smollm2.yaml --ecg_encoder quickstart_output/model

N GPUs:

    accelerate launch --multi_gpu --num_processes 8 -m merit_hf.training.report_lora configs/report_smollm2.yaml

Baselines by flag alone: `--ecg_encoder ''` (random-init encoder), `--condition_on_ecg false` (no ECG in the prompt;
the processor saved with the adapter records it, so its `format_prompt()` is the run's prompt, without `<ecg>`),
`--lora_epochs 0` (stage 1 only: the adapter holds the aligned projector and LoRA weights that change nothing).
`--alignment_epochs 0` or `--lora_epochs 0` skips that stage; `report_results.json` names it in `skipped_stages`.

Does the model read the ECG? `--check_folds 9` measures, after each stage, the teacher-forced loss per report token on
those folds with each report's own ECG and with the ECGs shuffled across reports (`ecg_use_check`): a model that
writes the report prior whatever the ECG has the same loss both ways. Generated reports are scored with the fraction
of distinct reports too (`merit_hf.evaluation.report_metrics.report_diversity`).

Data: read through `merit_hf.data` as pretraining reads it (`build_ptbxl` / `load_ptbxl`, `build_mimic_iv_ecg` /
`load_mimic_iv_ecg`), so the references are the datasets' `report` text, cleaned once by `merit_hf.data.reports`:
the same rows and the same text that pretraining aligns the ECGs with. References: PTB-XL reports in English
(`report_language` `"en"`, or `"und"`: no language marker). Rule for the others (German, Swedish):
`non_english_reports: drop` (default) leaves them out and logs how many; `error` raises on the first one. No machine
translation is done. MIMIC-IV-ECG: `report_0..report_17` joined by `merit_hf.data.reports.join_mimic_report`
(English machine statements), streamed: all of it (no `--max_train_reports`) is read once and never held in memory.

Examples: each record runs through the feature extractor once, `--examples_chunk_size` records at a time, into a
memory-mapped Arrow cache (`merit_hf.training.report_examples`) under `--examples_cache_dir` (default
`$HF_DATASETS_CACHE/merit_hf_report_examples`), keyed by the data, the limits and the feature extractor's settings: a
second run with the same ones reuses it, a run killed while preparing leaves nothing that is read as finished. With N
processes each prepares every N-th example of a `Dataset` and its own shards of a stream (MIMIC-IV-ECG without a
limit), and all of them read the one cache; batches are then sharded by
`accelerator.prepare` as before.

Outputs in `output_dir`: `base_model/` (the frozen base: starting encoder + LM + stage-1 projector,
`save_pretrained`), `adapter/` (LoRA weights + projector, and the trained encoder with `--freeze_ecg_encoder false`,
in `adapter_model.safetensors`; `adapter_config.json`, `generation_config.json`, the processor with its `<ecg>` token,
and `merit_report_base.json`, the fingerprint of the base the adapter belongs to), `predictions.jsonl` and
`report_results.json`. Reload with `load_report_adapter(output_dir / "adapter")`, which reads the `base_model/` beside
the adapter, so an `output_dir` moved or copied whole reloads too (`--save_base_model false` writes no base and
records none: pass `base_model=`). An `output_dir` that holds any of these is refused (the two runs would mix);
`--overwrite_output_dir true` removes them first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, get_scheduler

from ..data import drop_empty_reports, load_dataset, load_mimic_iv_ecg
from ..data.mimic_iv_ecg import MEASUREMENTS_FILE, MimicRecordReader, mimic_iv_ecg_features, read_mimic_tasks
from ..data.ptbxl import PTBXL_SAMPLING_RATES, SOURCE_DESCRIPTION_PREFIX, describe_source, described_source
from ..models.merit.configuration_merit import MeritEcgConfig
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.modeling_merit import MeritEcgModel
from ..models.merit.modeling_merit_report import MeritForReportGeneration
from ..models.merit.processing_merit import DEFAULT_REPORT_INSTRUCTION, IGNORE_INDEX, MeritProcessor
from ..utils.arguments import arguments_to_dict, config_from_argument, parse_arguments
from ..utils.launch import require_joined_processes
from ..utils.throughput import ThroughputMeter
from .finetune_precision import launcher_mixed_precision, resolve_finetune_precision, training_device_type
from .pretrain import remove_run_outputs
from .report_examples import (
    DEFAULT_CHUNK_SIZE,
    ReportExamples,
    default_examples_cache_dir,
    files_fingerprint,
    rows_fingerprint,
)

BASE_FINGERPRINT_FILE = "merit_report_base.json"
RESULTS_FILE = "report_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
# Everything a run writes in output_dir; `--overwrite_output_dir true` removes these (and nothing else) first.
RUN_OUTPUTS = ("base_model", "adapter", PREDICTIONS_FILE, RESULTS_FILE)
NON_ENGLISH_RULES = ("drop", "error")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
PTBXL_FOLDS = tuple(range(1, 11))  # PTB-XL's strat_fold
# transformers' schedulers that `get_scheduler` builds from the warm-up and step counts alone (the others need more
# arguments or a metric at every step).
LR_SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)  # fmt: skip
# Generation flags that only sampling uses, and those that only beam search uses. An LM's generation_config.json often
# sets the first (Qwen2.5-Instruct and Llama-3-Instruct sample with temperature / top_p / top_k), and transformers
# refuses to save a greedy config that keeps them: the run's decoding (greedy, or beam search with --num_beams) resets
# them (`report_generation_config`).
SAMPLING_ONLY_GENERATION_FLAGS = (
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
)  # fmt: skip
BEAM_ONLY_GENERATION_FLAGS = ("early_stopping", "length_penalty", "num_beam_groups", "diversity_penalty")


@dataclass
class ReportModelArguments:
    """The three parts. Unset `ecg_config` fields keep `MeritEcgConfig`'s defaults."""

    language_model: str | None = field(
        default=None, metadata={"help": "Folder of a causal LM (AutoModelForCausalLM + its tokenizer); required."}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside `language_model` (SmolLM2)."})
    ecg_encoder: str | None = field(
        default=None, metadata={"help": "MERIT checkpoint holding an encoder; empty or None: random-init encoder."}
    )
    ecg_config: dict | str | None = field(
        default=None, metadata={"help": "MeritEcgConfig fields for a random-init encoder (JSON on the command line)."}
    )
    ecg_tokens_per_lead: int = field(default=5, metadata={"help": "Soft tokens per lead (time-pooled patches)."})
    freeze_ecg_encoder: bool = field(
        default=True, metadata={"help": "False: train the encoder too in stage 2 (saved in the adapter)."}
    )
    condition_on_ecg: bool = field(default=True, metadata={"help": "False: the no-ECG baseline (text prompt only)."})

    def __post_init__(self):
        if self.ecg_tokens_per_lead < 1:
            raise ValueError(f"--ecg_tokens_per_lead: must be at least 1, got {self.ecg_tokens_per_lead}")


@dataclass
class ReportDataArguments:
    ptbxl_dir: str | None = field(
        default="data/ptbxl_sample",
        metadata={"help": "PhysioNet PTB-XL folder, or a converted one (merit_hf.data.load_ptbxl: Parquet, Hub id)."},
    )
    ptbxl_sampling_rate: int = field(default=100, metadata={"help": "100 (records100) or 500 (records500)."})
    mimic_dir: str | None = field(
        default=None,
        metadata={"help": "MIMIC-IV-ECG PhysioNet folder (machine_measurements.csv), or a converted one."},
    )
    train_folds: list[int] = field(default_factory=lambda: list(range(1, 9)), metadata={"help": "PTB-XL folds."})
    eval_folds: list[int] = field(default_factory=lambda: [9, 10], metadata={"help": "PTB-XL folds to score."})
    non_english_reports: str = field(default="drop", metadata={"help": "'drop' or 'error' (see module docstring)."})
    max_train_reports: int | None = field(default=None)
    max_eval_reports: int | None = field(default=None)
    check_folds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "PTB-XL folds for the ECG-use check: the teacher-forced report loss with each report's own ECG "
            "and with the ECGs shuffled across reports, after each stage (`ecg_use_check`); empty: no check."
        },
    )
    max_check_reports: int | None = field(default=None)
    examples_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the preprocessed examples are cached (memory-mapped Arrow, reused by later runs with the same "
            "data, limits and feature extractor; merit_hf.training.report_examples). Default: "
            "$HF_DATASETS_CACHE/merit_hf_report_examples; '' builds them in a temporary folder instead."
        },
    )
    examples_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Records run through the feature extractor at once while the examples are prepared."},
    )
    instruction: str = field(default=DEFAULT_REPORT_INSTRUCTION, metadata={"help": "User turn after <ecg>."})
    max_length: int = field(default=192, metadata={"help": "Prompt + report tokens; the report is cut to fit."})
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": "False: the plain prompt '<ecg>\\n{instruction}\\n' instead of the LM's chat template (SmolLM2's "
            "adds a ~30-token system turn to every sequence: a third of the compute on CPU)."
        },
    )

    def __post_init__(self):
        if self.ptbxl_sampling_rate not in PTBXL_SAMPLING_RATES:
            raise ValueError(
                f"--ptbxl_sampling_rate: must be one of {sorted(PTBXL_SAMPLING_RATES)} (PTB-XL's rates), "
                f"got {self.ptbxl_sampling_rate}"
            )
        if self.non_english_reports not in NON_ENGLISH_RULES:
            raise ValueError(
                f"--non_english_reports: must be one of {NON_ENGLISH_RULES}, got {self.non_english_reports!r}"
            )
        for name in ("train_folds", "eval_folds", "check_folds"):
            outside = sorted(set(getattr(self, name)) - set(PTBXL_FOLDS))
            if outside:  # a fold PTB-XL does not have selects no report, silently
                raise ValueError(f"--{name}: PTB-XL's folds are 1 to 10, got {outside}")
        if self.max_length < 1:
            raise ValueError(f"--max_length: must be at least 1, got {self.max_length}")
        if self.examples_chunk_size < 1:
            raise ValueError(f"--examples_chunk_size: must be at least 1, got {self.examples_chunk_size}")
        for name in ("max_train_reports", "max_eval_reports", "max_check_reports"):
            value = getattr(self, name)
            if value is not None and value < 0:  # a negative slice end would silently drop reports from the end
                raise ValueError(f"--{name}: must be None (all) or at least 0, got {value}")
        overlap = sorted(set(self.eval_folds) & set(self.train_folds))
        if overlap:  # scores of reports trained on would pass for held-out ones
            raise ValueError(
                f"--eval_folds: fold(s) {overlap} are in --train_folds too; the scored reports must be held out"
            )
        overlap = sorted(set(self.check_folds) & set(self.train_folds))
        if overlap:  # a model that remembers its training reports would pass the check without reading the ECG
            raise ValueError(
                f"--check_folds: fold(s) {overlap} are in --train_folds too; the checked reports must be held out"
            )


@dataclass
class ReportTrainingArguments:
    output_dir: str = field(default="outputs/report-lora")
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start again in an output_dir that holds an earlier run: remove its base_model/, adapter/, "
            "predictions and results first. Without it, such a folder is refused."
        },
    )
    seed: int = field(default=0)
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=16)
    gradient_accumulation_steps: int = field(default=1)
    alignment_epochs: int = field(default=1, metadata={"help": "Stage 1 (projector only); 0 skips it."})
    alignment_learning_rate: float = field(default=1e-3)
    lora_epochs: int = field(
        default=3,
        metadata={"help": "Stage 2 (LoRA on the LM + projector); 0 skips it (the adapter then holds the base)."},
    )
    learning_rate: float = field(default=2e-4)
    weight_decay: float = field(default=0.0)
    warmup_ratio: float = field(default=0.03)
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"One of {', '.join(LR_SCHEDULER_TYPES)}."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this (more than 0); None: no clipping."}
    )
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling is lora_alpha / lora_r; at least 1."})
    lora_dropout: float = field(default=0.05, metadata={"help": "From 0 to less than 1."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "LM module names (suffixes) that get LoRA; matched only under `language_model.`"},
    )
    max_new_tokens: int = field(default=64)
    num_beams: int = field(default=1)
    repetition_penalty: float = field(default=1.0, metadata={"help": "More than 0; 1 is no penalty."})
    do_eval: bool = field(default=True)
    compute_meteor: bool = field(default=True, metadata={"help": "False on machines without WordNet."})
    save_base_model: bool = field(default=True, metadata={"help": "Write base_model/ (needed to reload)."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "'no', 'bf16' or 'fp16' (CUDA only); unset: `accelerate launch`'s mixed precision, else 'no'. A "
            "value that contradicts the launcher's is refused."
        },
    )
    use_cpu: bool = field(default=False)
    logging_steps: int = field(default=10)

    def __post_init__(self):
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed_precision: must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_new_tokens",
            "num_beams",
            "lora_r",
            "lora_alpha",  # 0 scales the LoRA update to nothing: stage 2 would train weights that change nothing
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("alignment_epochs", "lora_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: must be 0 (skip the stage) or more, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup_ratio: must be between 0 and 1, got {self.warmup_ratio}")
        for name in ("alignment_learning_rate", "learning_rate", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: must be 0 or more, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:  # would scale the gradients by 0 or flip them
            raise ValueError(f"--max_grad_norm: must be more than 0 (None: no clipping), got {self.max_grad_norm}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout: must be at least 0 and less than 1, got {self.lora_dropout}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"--repetition_penalty: must be more than 0 (1: no penalty), got {self.repetition_penalty}"
            )
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(
                f"--lr_scheduler_type: must be one of {LR_SCHEDULER_TYPES}, got {self.lr_scheduler_type!r}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Reference reports
# ----------------------------------------------------------------------------------------------------------------------


def load_ptbxl_rows(ptbxl_dir: str | Path, sampling_rate: int = 100) -> Dataset:
    """Every PTB-XL record as `merit_hf.data` gives it to pretraining, all folds in one `Dataset` in `ecg_id` order:
    `merit_hf.data.load_dataset("ptbxl", ...)`: a PhysioNet folder (in memory) or a converted one (Parquet shards,
    `save_to_disk`, Hub id).

    Its fingerprint (the report examples' cache key, `rows_fingerprint`) does not depend on how the folder was named:
    `concatenate_datasets` hashes the splits' `info.description`, whose `PTB-XL source:` line
    (`merit_hf.data.ptbxl.describe_source`) names the folder as given, so the same data by a relative or an absolute
    path or through a link rebuilt the whole cache. The line is left out of the join and put back after it (naming
    `ptbxl_dir` as given), and a local folder is read by its resolved path (the Parquet files' cache, which a
    converted folder's fingerprint is made of, is keyed by their paths; a moved converted folder is still new data to
    `datasets`, a PhysioNet folder is not: it is hashed by content).
    """
    local = Path(ptbxl_dir).expanduser()
    splits = load_dataset("ptbxl", local.resolve() if local.exists() else ptbxl_dir, sampling_rate=sampling_rate)
    described = next((found for split in splits.values() if (found := described_source(split))), {})
    for split in splits.values():
        lines = (split.info.description or "").splitlines()
        split.info.description = "\n".join(line for line in lines if not line.startswith(SOURCE_DESCRIPTION_PREFIX))
    rows = concatenate_datasets(list(splits.values())).sort("ecg_id")
    if described:  # after the join and the sort: a description set now is in no fingerprint
        describe_source(rows, ptbxl_dir, described.get("label_threshold"), described["format"])
    return rows


def read_ptbxl_reports(
    ptbxl: Dataset, folds: Sequence[int], non_english: str = "drop", limit: int | None = None
) -> tuple[Dataset, dict[str, int]]:
    """The rows of the English reports of `folds` (at most `limit`, in `ecg_id` order; the `report_examples` columns,
    selected, not copied: memory-mapped when `ptbxl` is) for `ReportExamples`, plus the count of each
    `report_language` in those folds.

    `ptbxl` comes from `load_ptbxl_rows`: the report text is the dataset's `report` (`merit_hf.data.reports`), the
    very text pretraining aligns the ECGs with. Empty reports are left out; non-English ones are left out
    (`"drop"`) or raise (`"error"`).
    """
    if non_english not in NON_ENGLISH_RULES:
        raise ValueError(f"non_english_reports must be one of {NON_ENGLISH_RULES}, got {non_english!r}")
    wanted = {int(fold) for fold in folds}
    metadata = ptbxl.select_columns(["ecg_id", "strat_fold", "report", "report_language"])
    keep, counts = [], {}
    for index, row in enumerate(metadata):
        if row["strat_fold"] not in wanted:
            continue
        language = row["report_language"]
        counts[language or "empty"] = counts.get(language or "empty", 0) + 1
        if not language:
            continue
        if language not in ("en", "und"):
            if non_english == "error":
                raise ValueError(
                    f"PTB-XL ecg_id {row['ecg_id']}: report in language {language!r} ({row['report'][:50]!r}); "
                    "only English references are used (non_english_reports: drop leaves these out)"
                )
            continue
        keep.append(index)
    rows = ptbxl.select(keep[:limit])
    return rows.select_columns([name for name in REPORT_EXAMPLE_COLUMNS if name in rows.column_names]), counts


def read_mimic_reports(mimic_dir: str | Path, limit: int | None = None) -> IterableDataset:
    """The first `limit` (or all) MIMIC-IV-ECG records with a report, as a stream for `ReportExamples` (read once,
    never held in memory): `load_mimic_iv_ecg` from a converted folder, or the records of a PhysioNet folder read one
    by one as `build_mimic_iv_ecg` reads them (the studies without a report are not read). The report is
    `merit_hf.data.reports.join_mimic_report`'s, as in pretraining."""
    if (Path(mimic_dir) / MEASUREMENTS_FILE).is_file():
        tasks = [task for task in read_mimic_tasks(mimic_dir) if task["report"]][:limit]
        mimic = IterableDataset.from_generator(
            _read_mimic_records,
            features=mimic_iv_ecg_features(),
            gen_kwargs={"reader": MimicRecordReader(Path(mimic_dir)), "tasks": tasks},
        )
    else:
        mimic = load_mimic_iv_ecg(mimic_dir, split="train", streaming=True)
    with_report = drop_empty_reports(mimic)
    return with_report.take(limit) if limit is not None else with_report


def mimic_reports_fingerprint(mimic_dir: str | Path) -> str:
    """The identity of `read_mimic_reports(mimic_dir)` for the examples cache: a PhysioNet folder's two CSV files, a
    converted folder's shards and conversion report (names, sizes, modification times)."""
    if (Path(mimic_dir) / MEASUREMENTS_FILE).is_file():
        return files_fingerprint(mimic_dir, ["*.csv"])
    return files_fingerprint(mimic_dir, ["**/*.parquet", "**/*.arrow", "**/*.json"])


def _read_mimic_records(reader: MimicRecordReader, tasks: list[dict[str, Any]]):
    for task in tasks:
        yield reader(task)


REPORT_EXAMPLE_COLUMNS = ("ecg_id", "report", "signal", "sampling_rate", "lead_names", "filename")


def report_examples(rows: Dataset | IterableDataset) -> list[dict[str, Any]]:
    """`[{"ecg_id", "report", "signal", "sampling_rate", "lead_names"}]` from rows of a `merit_hf.data` dataset (the
    columns PTB-XL and MIMIC-IV-ECG share), plus `filename` for PTB-XL (the record, relative to its folder), in
    memory: for a few rows (`ReportExamples` reads the rows themselves, a chunk at a time)."""
    columns = [name for name in REPORT_EXAMPLE_COLUMNS if name in (rows.column_names or ())]
    return [dict(row) for row in rows.select_columns(columns).with_format("numpy")]


class ReportCollator:
    """Prompt + report + labels through `MeritProcessor`, and the ECGs stacked (`ecg_values` left out without ECG)."""

    def __init__(self, processor: MeritProcessor, prompt: str, condition_on_ecg: bool, with_reports: bool):
        self.processor, self.prompt = processor, prompt
        self.condition_on_ecg, self.with_reports = condition_on_ecg, with_reports

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [self.prompt] * len(items)
        reports = [item["report"] for item in items] if self.with_reports else None
        if reports is None:
            batch = self.processor(text=prompts, return_tensors="pt")
        else:
            batch = self.processor(text=prompts, reports=reports, return_tensors="pt")
        batch = dict(batch)
        if self.condition_on_ecg:
            batch["ecg_values"] = torch.stack([item["ecg_values"] for item in items])
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# Model, adapter and fingerprint
# ----------------------------------------------------------------------------------------------------------------------


def load_language_model(path: str, gguf_file: str | None = None):
    """Tokenizer and causal LM (float32) from a folder, or from a GGUF file in it (dequantised by transformers)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    language_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, language_model


def build_report_model(model_args: ReportModelArguments, tokenizer, language_model) -> MeritForReportGeneration:
    if model_args.ecg_encoder:
        ecg_encoder = MeritEcgModel.from_pretrained(model_args.ecg_encoder)
        if model_args.ecg_config:  # a YAML's block for a random-init encoder (configs/report_tiny.yaml has one)
            asked = config_from_argument(MeritEcgConfig, model_args.ecg_config, "ecg_config").to_dict()
            loaded = ecg_encoder.config.to_dict()
            differing = [f"{key}: ecg_config {asked[key]!r}, the encoder's {loaded.get(key)!r}"
                         for key in sorted(set(asked) & set(loaded)) if asked[key] != loaded.get(key)
                         and key not in ("_name_or_path", "transformers_version", "architectures", "dtype")]  # fmt: skip
            if differing:
                logging.getLogger(__name__).warning(
                    "ecg_config is for a random-init encoder and is not used with --ecg_encoder %s, whose own config "
                    "differs: %s",
                    model_args.ecg_encoder,
                    "; ".join(differing),
                )
    else:
        ecg_encoder = MeritEcgModel(config_from_argument(MeritEcgConfig, model_args.ecg_config, "ecg_config"))
    return MeritForReportGeneration.from_parts(
        ecg_encoder,
        language_model,
        tokenizer,
        ecg_tokens_per_lead=model_args.ecg_tokens_per_lead,
        freeze_ecg_encoder=model_args.freeze_ecg_encoder,
    )


def lora_config(training_args: ReportTrainingArguments, train_ecg_encoder: bool = False):
    """LoRA on the language model only: a regex that `re.fullmatch`es `language_model.<...>.<target>` (never the
    encoder or the projector, unlike `target_modules="all-linear"`); the projector trains fully via
    `modules_to_save`, and so does the encoder when `train_ecg_encoder`: PEFT saves only LoRA weights and
    `modules_to_save`, so an encoder trained any other way would be lost from the adapter."""
    from peft import LoraConfig

    targets = "|".join(re.escape(name) for name in training_args.lora_target_modules)
    return LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        target_modules=rf"language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector"] + (["ecg_model"] if train_ecg_encoder else []),
    )


def base_fingerprint(model: MeritForReportGeneration) -> dict[str, Any]:
    """What an adapter must match: the shapes of both parts and a hash of the LM's and the encoder's weights."""
    config = model.config

    def digest(module: torch.nn.Module) -> str:
        hasher = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            hasher.update(name.encode())
            hasher.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
        return hasher.hexdigest()[:16]

    return {
        "text_model_type": config.text_config.model_type,
        "text_vocab_size": config.text_config.vocab_size,
        "text_hidden_size": config.text_config.hidden_size,
        "text_num_hidden_layers": config.text_config.num_hidden_layers,
        "ecg_hidden_size": config.ecg_config.hidden_size,
        "ecg_seq_length": config.ecg_seq_length,
        "ecg_token_index": config.ecg_token_index,
        "language_model_sha256": digest(model.language_model),
        "ecg_encoder_sha256": digest(model.ecg_model),
    }


def save_report_adapter(
    peft_model,
    processor: MeritProcessor,
    generation_config: GenerationConfig,
    directory: str | Path,
    base: dict,
    base_model_path: str | Path | None = None,
) -> None:
    """Adapter (LoRA + projector), processor, `generation_config.json` and the base fingerprint in one folder.

    `base_model_path` (the base's folder or Hub id) goes to `adapter_config.json` as `base_model_name_or_path`, so
    that `load_report_adapter(directory)` and PEFT's `AutoPeftModelForCausalLM` find the base; without it PEFT records
    the base's own `name_or_path` (none for a model built with `from_parts`). `load_report_adapter` looks for a
    `base_model/` folder beside `directory` first (the run layout `report_lora` writes), so a run folder moved or
    copied whole still reloads.
    """
    directory = Path(directory)
    if base_model_path is not None:
        for adapter_config in peft_model.peft_config.values():
            adapter_config.base_model_name_or_path = str(base_model_path)
    peft_model.save_pretrained(directory)
    processor.save_pretrained(directory)
    generation_config.save_pretrained(directory)
    (directory / BASE_FINGERPRINT_FILE).write_text(json.dumps(base, indent=2) + "\n")


def saved_base_model(adapter_dir: str | Path) -> str:
    """Where the base of the adapter in `adapter_dir` is: `base_model/` beside it when that holds a model (the layout
    `report_lora` writes, wherever the run folder has been moved or copied to), else the `base_model_name_or_path`
    of its `adapter_config.json` (a folder or a Hub id). Raises `ValueError` when neither names one, and
    `FileNotFoundError` when the recorded base is a local folder that no longer exists."""
    adapter_dir = Path(adapter_dir)
    beside = adapter_dir.parent / "base_model"
    if (beside / "config.json").is_file():
        return str(beside)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise ValueError(
            f"{adapter_dir}: adapter_config.json names no base model (base_model_name_or_path is empty), and there is "
            "no base_model/ beside the adapter (a run with --save_base_model false writes none); pass base_model=... "
            "(the base MeritForReportGeneration or its folder)"
        )
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        raise FileNotFoundError(
            f"{adapter_dir}: adapter_config.json names the base model {recorded}, which does not exist, and there is "
            f"no base_model/ beside the adapter ({beside}); pass base_model=... (the base MeritForReportGeneration "
            "or its folder)"
        )
    return recorded


def load_report_adapter(adapter_dir: str | Path, base_model: MeritForReportGeneration | str | None = None):
    """`(PeftModel, MeritProcessor)` from an adapter folder written by this script (`save_report_adapter`).

    `base_model` defaults to the `base_model/` folder beside `adapter_dir` (the run layout `report_lora` writes: a
    run folder moved or copied whole reloads from its own copy), else the `base_model_name_or_path` recorded in
    `adapter_config.json` (`ValueError` when it names none, `FileNotFoundError` when it names a local folder that is
    gone: pass `base_model=`). Raises `ValueError` naming the differences when the adapter was trained on another base model. An
    encoder trained with the adapter (`--freeze_ecg_encoder false`) is in the adapter and replaces the base's
    (PEFT's `modules_to_save`); adapters saved while the encoder was named `ecg_encoder` load too (the module and its
    weights are renamed to `ecg_model` on the way in).
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    fingerprint_file = adapter_dir / BASE_FINGERPRINT_FILE
    if not fingerprint_file.is_file():
        raise FileNotFoundError(f"{fingerprint_file}: not a merit_hf report adapter (no base fingerprint)")
    if base_model is None:
        base_model = saved_base_model(adapter_dir)
    if isinstance(base_model, (str, Path)):
        base_model = MeritForReportGeneration.from_pretrained(base_model)
    expected = json.loads(fingerprint_file.read_text())
    found = base_fingerprint(base_model)
    differences = {key: (value, found.get(key)) for key, value in expected.items() if found.get(key) != value}
    if differences:
        described = ", ".join(f"{key}: adapter {want!r} vs base {got!r}" for key, (want, got) in differences.items())
        raise ValueError(f"{adapter_dir}: adapter was saved for another base model ({described})")
    base_model.generation_config = base_model.suppress_ecg_token(GenerationConfig.from_pretrained(adapter_dir))
    adapter_config = PeftConfig.from_pretrained(adapter_dir)
    if adapter_config.modules_to_save:
        adapter_config.modules_to_save = [
            "ecg_model" if name == "ecg_encoder" else name for name in adapter_config.modules_to_save
        ]
    model = PeftModel.from_pretrained(
        base_model, adapter_dir, config=adapter_config, key_mapping=MeritForReportGeneration._checkpoint_key_mapping
    )
    processor = MeritProcessor.from_pretrained(adapter_dir)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------------


def optimizer_steps(loader: DataLoader, epochs: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps of `epochs` passes over `loader`: the loader as `accelerator.prepare` returns it (this
    process's shard, so the total every process prints and schedules by), and one step per
    `gradient_accumulation_steps` batches, the last partial group included (Accelerate syncs at the end of the
    loader)."""
    return epochs * math.ceil(len(loader) / gradient_accumulation_steps)


def _train_stage(
    name: str,
    accelerator: Accelerator,
    model,
    loader: DataLoader,
    epochs: int,
    learning_rate: float,
    training_args: ReportTrainingArguments,
) -> tuple[list[float], dict[str, Any]]:
    """One stage: AdamW on the parameters that require grad, warm-up + schedule; returns the loss of each optimizer
    step and the stage's throughput totals (`merit_hf.utils.throughput`; `ecgs_seen` counts the ECGs of every
    micro-batch on every process, the ones Accelerate repeats to give every process a full last batch included: they
    are trained on too).

    A step's loss, and the gradient it steps on, are the mean per report token over the step's whole batch (every
    micro-batch on every process), as one process given that batch at once computes them: each micro-batch
    back-propagates its summed token losses, and the gradients are divided by the step's token count before they are
    clipped. A mean per micro-batch, averaged by DDP and by gradient accumulation, weighted the tokens of a
    micro-batch with fewer report tokens more, so N processes or N accumulated micro-batches trained otherwise than
    one batch."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=training_args.weight_decay, fused=True)
    meter = ThroughputMeter(accelerator.device, num_processes=accelerator.num_processes, model=model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = optimizer_steps(loader, epochs, training_args.gradient_accumulation_steps)
    # The prepared scheduler advances num_processes times per optimizer step (Accelerate's AcceleratedScheduler).
    schedule_steps = steps * accelerator.num_processes
    scheduler = get_scheduler(
        training_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(training_args.warmup_ratio * schedule_steps),
        num_training_steps=schedule_steps,
    )
    scheduler = accelerator.prepare(scheduler)
    model.train()
    losses, step, micro_losses, micro_ecgs = [], 0, [], 0
    progress = tqdm(total=steps, desc=name, disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        for batch in meter.timed(loader):
            batch.pop("index")
            meter.count_flops_once(lambda rows: meter.model(**rows).loss, batch)
            with accelerator.accumulate(model):
                labels = batch.pop("labels")
                loss_sums, token_counts = report_token_loss_sums(model(**batch).logits, labels)
                accelerator.backward(loss_sums.sum())
                micro_losses.append(torch.stack([loss_sums.sum().detach().float(), token_counts.sum()]))
                micro_ecgs += len(batch["input_ids"])
                if accelerator.sync_gradients:
                    # One gather per step: this process's loss sum, report tokens and ECGs.
                    local = torch.cat([torch.stack(micro_losses).sum(dim=0), token_counts.new_tensor([micro_ecgs])])
                    totals = accelerator.gather(local[None]).sum(dim=0)
                    # accelerate divided each micro-batch's loss by the accumulation steps and DDP averages the
                    # processes' gradients: undo both, then divide by the step's report tokens.
                    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / totals[1]
                    for parameter in parameters:
                        if parameter.grad is not None:
                            parameter.grad.mul_(scale.to(parameter.grad.dtype))
                    if training_args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(parameters, training_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                mean_loss, ecgs = (totals[0] / totals[1]).item(), int(totals[2].item())
                micro_losses, micro_ecgs = [], 0
                meter.step(ecgs)
                progress.update(1)
                losses.append(mean_loss)
                if step % training_args.logging_steps == 0 or step == steps:
                    interval = meter.interval()
                    progress.set_postfix(loss=f"{mean_loss:.4f}", **meter.postfix)
                    accelerator.print(
                        f"{name} step {step}/{steps} loss {mean_loss:.4f}, "
                        + ", ".join(f"{key} {value:.4g}" for key, value in interval.items())
                    )
    progress.close()
    return losses, meter.totals()


def report_token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss summed over each row's label tokens (those not `IGNORE_INDEX`), and their count:
    `(loss_sums, token_counts)`, both `(batch_size,)` float32. The LM's own loss is their ratio over the batch."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1).float()


def report_token_losses(accelerator: Accelerator, model, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced next-token loss summed over each report's label tokens, and their count, per example in loader
    order (gathered from every process without duplicates): `(loss_sums, token_counts)`, both `(num_examples,)`."""
    model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for batch in loader:
            batch.pop("index")
            labels = batch.pop("labels")
            per_example = torch.stack(report_token_loss_sums(model(**batch).logits, labels), dim=1)
            gathered = accelerator.gather_for_metrics(per_example)
            sums.append(gathered[:, 0].cpu())
            counts.append(gathered[:, 1].cpu())
    return torch.cat(sums), torch.cat(counts)


def ecg_use_check(
    accelerator: Accelerator,
    model,
    dataset: ReportExamples,
    collator: ReportCollator,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Does the model read the ECG? The mean loss per report token on `dataset` with each report's own ECG
    (`real_ecg`) and with the ECGs shuffled across reports (`shuffled_ecg`, `ReportExamples.with_shuffled_ecgs`),
    and `shuffled_minus_real`: about 0 when the ECG tokens carry nothing the LM uses (it writes the report prior
    whatever the ECG), positive when it does; `real_ecg_better_fraction` is the share of reports whose own ECG
    gives them the lower loss, an exact tie counting half, so that it is 0.5 by chance and for an ECG-blind model
    (whose two losses are equal). Without ECG conditioning only `no_ecg` (the text-only loss)."""

    def losses(examples: ReportExamples) -> tuple[torch.Tensor, torch.Tensor]:
        loader = accelerator.prepare_data_loader(DataLoader(examples, batch_size=batch_size, collate_fn=collator))
        return report_token_losses(accelerator, model, loader)

    real_sums, counts = losses(dataset)
    result: dict[str, Any] = {"num_reports": len(dataset), "num_report_tokens": int(counts.sum())}
    if not collator.condition_on_ecg:
        return {**result, "no_ecg": float(real_sums.sum() / counts.sum())}
    shuffled_sums, _ = losses(dataset.with_shuffled_ecgs(seed))
    real, shuffled = float(real_sums.sum() / counts.sum()), float(shuffled_sums.sum() / counts.sum())
    return {
        **result,
        "real_ecg": real,
        "shuffled_ecg": shuffled,
        "shuffled_minus_real": shuffled - real,
        "real_ecg_better_fraction": float(((real_sums < shuffled_sums) + 0.5 * (real_sums == shuffled_sums)).mean()),
    }


def generated_lengths(new_tokens: torch.Tensor, eos_token_id, pad_token_id: int) -> torch.Tensor:
    """Tokens generated per row of `generate`'s new tokens: up to and including the first EOS (what follows is
    padding, also where the pad token is the EOS token), or every non-pad token of a row that never ended."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device))
    first_eos = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first_eos + 1, (new_tokens != pad_token_id).sum(dim=1))


def generate_reports(
    accelerator: Accelerator, model, processor: MeritProcessor, loader: DataLoader, generation_config: GenerationConfig
) -> tuple[dict[int, str], dict[str, float]]:
    """Generated report per example index (gathered from every process), and generation speed over all processes:
    the tokens generated for the examples (EOS included, `generated_lengths`; not for the copies Accelerate adds to
    give every process a full last batch, so the count is the same with any number of processes) over the longest
    process's time."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    texts, new_tokens, seconds = {}, 0, 0.0
    synchronize = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    for batch in tqdm(loader, desc="generate", disable=not accelerator.is_local_main_process):
        indices = batch.pop("index")
        synchronize()  # the timed work is the GPU's, not only its launch
        start = time.perf_counter()
        output = unwrapped.generate(**batch, generation_config=generation_config)
        synchronize()
        seconds += time.perf_counter() - start
        output = output[:, batch["input_ids"].shape[1] :]  # generate() returns the prompt, then the new tokens
        eos_token_id = generation_config.eos_token_id
        eos_token_id = processor.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        lengths = generated_lengths(output, eos_token_id, processor.tokenizer.pad_token_id).tolist()
        decoded = processor.batch_decode(output, skip_special_tokens=True)
        gathered = accelerator.gather_for_metrics(
            list(zip(indices.tolist(), decoded, lengths)), use_gather_object=True
        )
        texts.update({index: text for index, text, _ in gathered})
        new_tokens += sum(length for _, _, length in gathered)
    seconds = float(accelerator.gather(torch.tensor([seconds], dtype=torch.float64, device=accelerator.device)).max())
    speed = {
        "generated_tokens": new_tokens,
        "generation_seconds": seconds,
        "tokens_per_second": new_tokens / seconds,
        "processes": accelerator.num_processes,
    }
    return texts, speed


def refuse_earlier_run(output_dir: Path) -> None:
    """Refuse an `output_dir` holding an earlier run's outputs: the new run would leave them beside its own (a stale
    `predictions.jsonl`, a `base_model/` that the new adapter does not belong to)."""
    earlier = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if earlier:
        raise FileExistsError(
            f"{output_dir}: holds an earlier run ({', '.join(earlier)}). Start again with --overwrite_output_dir "
            "true (removes them), or choose another --output_dir."
        )


def report_mixed_precision(choice: str | None, use_cpu: bool) -> str:
    """The run's mixed precision: `choice`, or unset `accelerate launch`'s (`ACCELERATE_MIXED_PRECISION`), else
    "no". A choice that contradicts the launcher's is refused (the Accelerator's argument would silently overrule it),
    and so is fp16 off CUDA (Accelerate would train in fp32 under that name): fine-tuning's rules."""
    launcher = launcher_mixed_precision()
    if choice is None and launcher is None:
        return "no"
    return resolve_finetune_precision(choice or "auto", training_device_type(use_cpu), launcher=launcher)


def report_generation_config(
    base: GenerationConfig, training_args: ReportTrainingArguments, tokenizer
) -> GenerationConfig:
    """The run's decoding settings (saved as the adapter's `generation_config.json` and used for `predictions.jsonl`):
    the report model's generation config (the LM's, with `<ecg>` suppressed) with the run's flags
    (`--max_new_tokens`, `--num_beams`, `--repetition_penalty`), no sampling, one sequence per prompt, and the
    tokenizer's pad and EOS tokens. The LM's sampling-only flags (`SAMPLING_ONLY_GENERATION_FLAGS`), and its
    beam-only ones with `--num_beams 1`, are reset: kept, transformers refused to save the config, after training.

    Validated strictly (as `save_pretrained` does) when built, so that `main` refuses a combination that cannot be
    saved before anything trains; the `ValueError` names transformers' objections."""
    settings = base.to_dict()
    reset = SAMPLING_ONLY_GENERATION_FLAGS + (BEAM_ONLY_GENERATION_FLAGS if training_args.num_beams == 1 else ())
    for name in reset:
        settings.pop(name, None)  # the default (None): unset
    settings.update(
        max_new_tokens=training_args.max_new_tokens,
        num_beams=training_args.num_beams,
        do_sample=False,
        num_return_sequences=1,  # one report per ECG
        repetition_penalty=training_args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generation_config = GenerationConfig.from_dict(settings)
    try:
        generation_config.validate(strict=True)
    except ValueError as error:
        raise ValueError(
            "The language model's generation settings (its generation_config.json) together with the run's decoding "
            f"flags (--max_new_tokens, --num_beams, --repetition_penalty; no sampling) cannot be saved with the "
            f"adapter. Fix the language model's generation_config.json. transformers says: {error}"
        ) from error
    return generation_config


def check_report_requirements(model_args: ReportModelArguments, training_args: ReportTrainingArguments) -> None:
    """Refuse, before anything loads or is written, a run that lacks a package it needs (merit_hf's `report` extra)
    or, with METEOR on, NLTK's WordNet: such a run failed only after training, its base_model/ already written and its
    generated reports lost."""
    from ..evaluation.report_metrics import REPORT_METRIC_PACKAGES, wordnet_available

    needed = {"peft": "peft"}  # LoRA (stage 2) and the adapter
    if model_args.gguf_file:
        needed["gguf"] = "gguf"
    if training_args.do_eval:  # the scores of the generated reports
        needed.update(REPORT_METRIC_PACKAGES)
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        scoring = [package for package in missing if package in REPORT_METRIC_PACKAGES.values()]
        raise ImportError(
            f"report_lora needs {', '.join(missing)}, not installed: pip install 'merit_hf[report]'"
            + (f" (or --do_eval false: no scores, so no {', '.join(scoring)})" if scoring else "")
        )
    if training_args.do_eval and training_args.compute_meteor and not wordnet_available():
        raise LookupError(
            "--compute_meteor: METEOR needs NLTK's WordNet 3.0 (corpora/wordnet on NLTK_DATA), not found: "
            "python -m nltk.downloader wordnet, or --compute_meteor false to skip METEOR"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_arguments(
        (ReportModelArguments, ReportDataArguments, ReportTrainingArguments),
        sys.argv[1:] if argv is None else argv,
    )
    if not model_args.language_model:
        raise ValueError("--language_model is required: a folder holding a causal LM and its tokenizer")
    check_report_requirements(model_args, training_args)
    output_dir = Path(training_args.output_dir)
    if not training_args.overwrite_output_dir:
        refuse_earlier_run(output_dir)
    accelerator = Accelerator(
        cpu=training_args.use_cpu,
        mixed_precision=report_mixed_precision(training_args.mixed_precision, training_args.use_cpu),
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
    )
    require_joined_processes(accelerator.num_processes)
    set_seed(training_args.seed)
    if training_args.overwrite_output_dir and accelerator.is_main_process:
        remove_run_outputs(output_dir, RUN_OUTPUTS)
    accelerator.wait_for_everyone()
    output_dir.mkdir(parents=True, exist_ok=True)

    # --- model and processor
    tokenizer, language_model = load_language_model(model_args.language_model, model_args.gguf_file)
    model = build_report_model(model_args, tokenizer, language_model)
    del language_model
    # Built and validated now: a combination transformers refuses to save failed only after training.
    generation_config = report_generation_config(model.generation_config, training_args, tokenizer)
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    processor = MeritProcessor(
        feature_extractor,
        tokenizer,
        ecg_seq_length=model.config.ecg_seq_length,
        max_length=data_args.max_length,
        report_instruction=data_args.instruction,
        use_chat_template=data_args.use_chat_template,
        condition_on_ecg=model_args.condition_on_ecg,  # saved with the adapter: its prompts are the run's
    )
    prompt = processor.format_prompt()

    # --- data
    # Rows are selected here (PTB-XL) or streamed (MIMIC) and run through the feature extractor once, a chunk at a
    # time, into a memory-mapped cache that every process reads (merit_hf.training.report_examples).
    train_rows, train_fingerprints, eval_rows, check_rows, language_counts = [], [], None, None, {}
    if data_args.ptbxl_dir:
        ptbxl = load_ptbxl_rows(data_args.ptbxl_dir, data_args.ptbxl_sampling_rate)
        ptbxl_train, language_counts = read_ptbxl_reports(
            ptbxl, data_args.train_folds, data_args.non_english_reports, data_args.max_train_reports
        )
        train_rows.append(ptbxl_train)
        train_fingerprints.append(rows_fingerprint(ptbxl_train))
        eval_rows, _ = read_ptbxl_reports(
            ptbxl, data_args.eval_folds, data_args.non_english_reports, data_args.max_eval_reports
        )
        if data_args.check_folds:
            check_rows, _ = read_ptbxl_reports(
                ptbxl, data_args.check_folds, data_args.non_english_reports, data_args.max_check_reports
            )
    if data_args.mimic_dir:  # English machine statements; trained on, scored on PTB-XL's eval folds
        train_rows.append(read_mimic_reports(data_args.mimic_dir, data_args.max_train_reports))
        train_fingerprints.append(mimic_reports_fingerprint(data_args.mimic_dir))
    if not train_rows:
        raise ValueError("no training data: give --ptbxl_dir and/or --mimic_dir")
    examples_cache_dir = data_args.examples_cache_dir
    if examples_cache_dir is None:
        examples_cache_dir = str(default_examples_cache_dir())

    def report_examples_of(rows, limit: int | None = None, fingerprint: str | None = None) -> ReportExamples:
        return ReportExamples(
            rows,
            feature_extractor,
            cache_dir=examples_cache_dir or None,
            limit=limit,
            chunk_size=data_args.examples_chunk_size,
            fingerprint=fingerprint,
            process=accelerator,
        )

    # PTB-XL's train reports first, then MIMIC's, at most max_train_reports in all
    train_set = report_examples_of(train_rows, data_args.max_train_reports, json.dumps(train_fingerprints))
    if not len(train_set):
        raise ValueError("no training reports left after the language rule; check ptbxl_dir / mimic_dir and folds")
    num_eval_reports = 0 if eval_rows is None else eval_rows.num_rows
    accelerator.print(
        f"reports: {len(train_set)} train, {num_eval_reports} eval; languages in the train folds "
        f"(non-English {data_args.non_english_reports}ped): {language_counts}"
    )
    teacher_forced = ReportCollator(processor, prompt, model_args.condition_on_ecg, with_reports=True)
    # The shuffle has its own generator seeded by --seed: without one, one process drew each epoch's order from the
    # global RNG when the epoch began and N processes drew a generator's seed when the loader was prepared, so the
    # order depended on the number of processes (and on whatever had used the global RNG before).
    train_loader = DataLoader(
        train_set,
        batch_size=training_args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=teacher_forced,
        generator=torch.Generator().manual_seed(training_args.seed),
    )

    # --- stage 1: projector alignment (nothing else trains)
    results: dict[str, Any] = {"arguments": arguments_to_dict(model_args, data_args, training_args)}
    results["mixed_precision"] = accelerator.mixed_precision  # what the run trained in (the launcher's included)
    results["num_train_reports"], results["num_eval_reports"] = len(train_set), num_eval_reports

    check_set = report_examples_of(check_rows) if check_rows is not None and check_rows.num_rows else None

    def skip_stage(stage: str, reason: str) -> None:
        results.setdefault("skipped_stages", {})[stage] = reason
        accelerator.print(f"{stage}: skipped ({reason})")

    def train_stage(stage: str, module, epochs: int, learning_rate: float):
        """One stage through `_train_stage`; its first and last loss, its throughput and the ECG-use check on
        `check_folds` after it go into `results`. With 0 epochs the stage is skipped, and `results["skipped_stages"]`
        says so."""
        if epochs == 0:
            skip_stage(stage, f"--{stage}_epochs 0")
            return module.to(accelerator.device)  # where prepare would have put it, for generation
        if accelerator.num_processes > 1:
            # The processes' RNG states are equal here: dropout (--lora_dropout, the LM's own) should draw its own masks
            # on each. The order is the loader's own seeded generator's and is unchanged; one process keeps its stream.
            set_seed(training_args.seed, device_specific=True)
        losses, results[f"{stage}_throughput"] = _train_stage(
            stage, accelerator, module, train_loader, epochs, learning_rate, training_args
        )
        results[f"{stage}_loss_first"], results[f"{stage}_loss_last"] = losses[0], losses[-1]
        module = accelerator.unwrap_model(module)
        if check_set is not None:
            check = ecg_use_check(
                accelerator, module, check_set, teacher_forced, training_args.per_device_eval_batch_size,
                training_args.seed,
            )  # fmt: skip
            results[f"{stage}_ecg_use_check"] = check
            accelerator.print(f"{stage}: ECG-use check on folds {data_args.check_folds}: {json.dumps(check)}")
        return module

    if not model_args.condition_on_ecg:
        skip_stage("alignment", "--condition_on_ecg false: no ECG tokens, so no projector to align")
    else:
        model.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(True)
        model = train_stage("alignment", model, training_args.alignment_epochs, training_args.alignment_learning_rate)
        accelerator.free_memory()
    model.requires_grad_(False)
    base_dir = (output_dir / "base_model").resolve()
    fingerprint = base_fingerprint(model)
    if training_args.save_base_model and accelerator.is_main_process:
        model.save_pretrained(base_dir)
        processor.save_pretrained(base_dir)

    # --- stage 2: LoRA on the language model, projector (and a trained encoder) in modules_to_save
    from peft import get_peft_model

    train_ecg_encoder = not model_args.freeze_ecg_encoder and model_args.condition_on_ecg
    # Seeded again here, so that LoRA's initial weights and dropout depend on --seed alone: the ECG-use check's
    # loaders (--check_folds) draw from the global RNG after stage 1, and made a run with the check train another model.
    set_seed(training_args.seed)
    peft_model = get_peft_model(model, lora_config(training_args, train_ecg_encoder))
    if not model_args.condition_on_ecg:  # the projector gets no gradient without ECG tokens
        for parameter in peft_model.base_model.model.multi_modal_projector.parameters():
            parameter.requires_grad_(False)
    peft_model = train_stage("lora", peft_model, training_args.lora_epochs, training_args.learning_rate)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The base's absolute path, for PEFT's AutoPeftModelForCausalLM (which reads it relative to the working
        # folder); load_report_adapter finds base_model/ beside the adapter wherever the run folder goes. Without a
        # saved base nothing is recorded: the LM alone is no base (PEFT would build a MERIT model from its config).
        save_report_adapter(
            peft_model,
            processor,
            generation_config,
            output_dir / "adapter",
            fingerprint,
            base_model_path=base_dir if training_args.save_base_model else None,
        )

    # --- evaluation: generate for the eval reports and score them
    if training_args.do_eval and num_eval_reports:
        eval_set = report_examples_of(eval_rows)
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(
                eval_set,
                batch_size=training_args.per_device_eval_batch_size,
                collate_fn=ReportCollator(processor, prompt, model_args.condition_on_ecg, with_reports=False),
            )
        )
        texts, speed = generate_reports(accelerator, peft_model, processor, eval_loader, generation_config)
        results["generation_speed"] = speed
        if accelerator.is_main_process:
            from ..evaluation.report_metrics import compute_report_metrics, format_report_metrics

            predictions = [texts[index] for index in range(len(eval_set))]
            # Written before the scoring, so that a scoring failure keeps the generated reports.
            with (output_dir / PREDICTIONS_FILE).open("w") as handle:
                for example, prediction in zip(eval_set.dataset.select_columns(["ecg_id", "filename", "report"]),
                                               predictions, strict=True):  # fmt: skip
                    record = {"ecg_id": int(example["ecg_id"]), "filename": example["filename"]}
                    handle.write(json.dumps({**record, "report": example["report"], "generated": prediction}) + "\n")
            references = eval_set.reports
            metrics = compute_report_metrics(predictions, references, meteor=training_args.compute_meteor)
            results["eval"] = metrics
            accelerator.print(format_report_metrics(metrics))
    if accelerator.is_main_process:
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str) + "\n")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
