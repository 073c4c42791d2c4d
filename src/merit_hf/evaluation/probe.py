"""The PTB-XL probe protocol, and the linear probe that runs it; always next to a random-init encoder under the same
harness.

Published PTB-XL numbers for one method differ by up to 31 points between papers because the protocol is not
pinned (`shared/notes/anchors.md` §3). This file is the protocol:

- splits: PTB-XL's `strat_fold`s, folds 1-8 train, 9 validation (early stopping, F1 thresholds), 10 test;
- label sets `superclass`, `subclass`, `form`, `rhythm`, `all` (`merit_hf.data.labels.LABEL_SETS`, names from
  `scp_statements.csv`); records with no label of the set are left out of every split for that set, as in the PTB-XL
  benchmark (Strodthoff et al. 2021) and MERL's split files;
- label fractions 1 / 10 / 100 % of the **training** records, drawn by `merit_hf.data.label_fraction_subset`
  (stratified on each record's rarest class, seeded, nested); validation and test are never subsampled;
- **linear probe** (`run_linear_probe`): the encoder is frozen; its `pooler_output` (the LayerNorm of the mean patch
  token, before the contrastive projection) is computed once per split and cached under the weights' fingerprint
  (`merit_hf.models.fingerprint`); a linear layer is trained on standardised features with BCE and Adam (MERL's
  probe: lr 1e-3), early stopping on validation macro AUROC;
- **baseline**: the same architecture with random weights (`random_init_like`, seeded) through the same code. A
  randomly initialised encoder with a linear probe matches many pretrained ECG models (arXiv 2602.17531), so no
  number is reported without it;
- metrics (`merit_hf.evaluation.metrics`): macro AUROC, macro F1 at per-class thresholds chosen on validation,
  the max-F1-over-thresholds variant (named as such), per-class AUROC, bootstrap 95 % CIs on the test split.

Full fine-tuning under the same protocol trains, so it lives in the training layer (`merit_hf.training.finetune`),
and builds on the pieces here (splits, labels, `evaluate_scores`, `probe_protocol`). The zero-shot and robustness
evaluations (`zero_shot`, `robustness`) reuse the labelled splits and the features. Every run writes a results JSON
(`merit_hf.evaluation.results`, schema in its docstring).

Run (1 CPU, N GPUs and M nodes alike; the command line lives in `merit_hf.training.probe`, which also fine-tunes):

    python -m merit_hf.training.probe configs/probe_quickstart.yaml
    accelerate launch -m merit_hf.training.probe configs/probe_ptbxl_full.yaml --mode finetune

From Python (the quick-start's evaluation step):

    from merit_hf.evaluation.probe import run_linear_probe
    results = run_linear_probe("quickstart_output/model", dataset_dict, "superclass", label_fraction=0.1)
    results.model.metrics["macro_auroc"].value, results.baseline.metrics["macro_auroc"].value
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.labels import LABEL_SETS
from ..data.ptbxl_versions import DEFAULT_PTBXL_VERSION, PTBXL_VERSIONS, check_ptbxl_version_for
from ..data.wfdb_folder import DEFAULT_SPLIT_FRACTIONS
from ..models.fingerprint import model_fingerprint
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.inference_precision import inference_device
from ..models.merit.modeling_merit import MeritEcgModel, pool_window_embeddings
from ..models.merit.pipeline_merit import _in_eval_mode, ecg_encoder_of
from .metrics import best_f1_thresholds, check_evaluation_counts, classification_metrics, macro_auroc
from .results import (
    AS_IS_VERSION,
    EvaluationResults,
    build_results,
    encoder_identity,
    feature_extractor_settings,
    write_results,
)

logger = logging.getLogger(__name__)

MODES = ("linear", "finetune")
FINETUNE_METHODS = ("full", "lora")
# Fine-tuning's `--mixed_precision`, pretraining's names (resolved by `merit_hf.training.finetune_precision`).
FINETUNE_MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# The encoder's linear layers that LoRA adapts by default (`MeritEcgAttention.qkv` / `.proj`, `MeritEcgMLP.fc1` /
# `.fc2` in every layer): attention and MLP, as LoRA for ViTs and peft's image-classification example do.
DEFAULT_LORA_TARGET_MODULES = ("qkv", "proj", "fc1", "fc2")
DATASET_NAMES = ("ptbxl", "wfdb")
SPLITS = ("train", "validation", "test")
# A record transform used by the robustness evaluation: (signal, sampling_rate, lead_names, row index) ->
# (signal, sampling_rate), or (signal, sampling_rate, lead_names) when it changes which leads the record has.
RecordTransform = Callable[[np.ndarray, float, list, int], tuple]


@dataclass
class ProbeArguments:
    """What to evaluate, on which data, and how (the protocol above). Every field can be set in YAML or by flag."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A MERIT checkpoint folder or Hub id (any MERIT class). Required."}
    )
    dataset: str = field(
        default="data/ptbxl_sample",
        metadata={"help": "A PTB-XL folder (PhysioNet layout) or a DatasetDict saved with save_to_disk."},
    )
    dataset_name: str = field(
        default="ptbxl",
        metadata={
            "help": "'ptbxl', or 'wfdb': a folder converted by the repository's dataset_scripts/wfdb or merit_hf.data.convert_wfdb_folder (its own label columns)."
        },
    )
    split_column: str | None = field(
        default=None, metadata={"help": "wfdb: a column of train / validation / test (else a seeded split)."}
    )
    split_fractions: list[float] = field(
        default_factory=lambda: list(DEFAULT_SPLIT_FRACTIONS),  # the embedding command's default too
        metadata={"help": "wfdb: train, validation, test fractions of the seeded split (patients kept whole)."},
    )
    split_seed: int = field(default=0, metadata={"help": "wfdb: the seed of that split."})
    ptbxl_version: str = field(
        default=DEFAULT_PTBXL_VERSION,
        metadata={
            "help": f"ptbxl, one of {PTBXL_VERSIONS}: '1.0.3' rows and labels follow PTB-XL v1.0.3 (its duplicates "
            "dropped, consensus labels), whatever metadata version the folder holds; 'as_is' the rows as stored."
        },
    )
    sampling_rate: int = field(default=100, metadata={"help": "Which PTB-XL records to read (100 or 500 Hz)."})
    mode: str = field(default="linear", metadata={"help": f"One of {MODES}."})
    label_sets: list[str] = field(
        default_factory=lambda: ["superclass"],
        metadata={"help": f"Of {LABEL_SETS}; with wfdb, label columns of the converted folder."},
    )
    label_fractions: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "E.g. 0.01 0.1 1.0."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Label draw, head init, bootstrap."})
    baseline: bool = field(default=True, metadata={"help": "Also run a random-init encoder under the same harness."})
    output_dir: str = field(default="results/probe", metadata={"help": "Where the results JSON files go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace results (and LoRA adapters, and an interrupted fine-tune's checkpoint folders) "
                  "an earlier run wrote under the same names; refused otherwise, before anything is computed."},
    )  # fmt: skip
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "--mode finetune: 'latest' continues an interrupted run in output_dir: results files it finished "
            "with the same settings are kept, each fine-tune it left half-done continues from its newest complete "
            "checkpoint (pretraining's name; with none, that fine-tune starts at epoch 0 and says so)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Feature cache on disk (keyed by model + data)."})
    batch_size: int = field(default=64, metadata={"help": "Feature-extraction and fine-tuning batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Linear probe learning rate (Adam; MERL)."})
    max_epochs: int = field(default=100, metadata={"help": "Linear probe epochs at most (MERL: 100)."})
    patience: int = field(default=10, metadata={"help": "Epochs without validation AUROC gain before stopping."})
    probe_batch_size: int = field(default=128, metadata={"help": "Linear probe mini-batch size."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the linear probe."})
    finetune_learning_rate: float = field(default=1e-4, metadata={"help": "Fine-tuning learning rate (AdamW)."})
    finetune_max_epochs: int = field(default=20, metadata={"help": "Fine-tuning epochs at most."})
    finetune_patience: int = field(default=5, metadata={"help": "Fine-tuning early-stopping patience (epochs)."})
    finetune_save_steps: int | None = field(
        default=None,
        metadata={
            "help": "--mode finetune: also write a full checkpoint every N optimizer steps inside an epoch (each "
            "epoch's end writes one), so that an interrupted epoch of hours resumes near where it stopped; None: at "
            "epoch ends only."
        },
    )
    finetune_method: str = field(
        default="full",
        metadata={
            "help": f"--mode finetune, one of {FINETUNE_METHODS}: 'full' trains every weight; 'lora' trains PEFT LoRA "
            "adapters on the encoder's linear layers and the head, the encoder's own weights frozen (LoRA usually "
            "wants a larger --finetune_learning_rate, e.g. 1e-3)."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "finetune_method lora: the adapters' rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "finetune_method lora: scaling (alpha / r)."})
    lora_dropout: float = field(
        default=0.1, metadata={"help": "finetune_method lora: dropout on the adapters' input."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES),
        metadata={
            "help": "finetune_method lora: names of the encoder's linear layers to adapt (peft target_modules)."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "finetune_method lora: also write the model with the adapters merged in, a plain "
            "MeritForEcgClassification folder (next to the adapter folder)."
        },
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": f"--mode finetune, one of {FINETUNE_MIXED_PRECISIONS} (pretraining's names): 'auto' is bf16 on a "
            "CUDA GPU with bf16 (Ampere and later) and fp32 elsewhere, or what `accelerate launch --mixed_precision` "
            "asked for; 'no' is fp32; 'fp16' (CUDA, with loss scaling) runs only when asked. A value that contradicts "
            "the launcher's is refused."
        },
    )
    num_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the test CIs (0: none)."})
    use_cpu: bool = field(
        default=False,
        metadata={
            "help": "Run on CPU even with a GPU: the probe's frozen features and fine-tuning (with `accelerate "
            "launch`: CPU processes, joined by gloo)."
        },
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.dataset_name not in DATASET_NAMES:
            raise ValueError(f"dataset_name: must be one of {DATASET_NAMES}, got {self.dataset_name!r}")
        check_ptbxl_version_for(self.dataset_name, self.ptbxl_version)
        check_sampling_rate_flag(self.dataset_name, self.sampling_rate, type(self).__dataclass_fields__)
        for label_set in self.label_sets if self.dataset_name == "ptbxl" else ():
            if label_set not in LABEL_SETS:
                raise ValueError(f"label_sets: {label_set!r} is not one of {LABEL_SETS}")
        for fraction in self.label_fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"label_fractions: {fraction} is not in (0, 1]")
        for name in (
            "batch_size",
            "max_epochs",
            "patience",
            "probe_batch_size",
            "finetune_max_epochs",
            "finetune_patience",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        # checked now, not after a fine-tune of hours: the bootstrap runs once training is over, and torch's own
        # "Invalid learning rate" names no setting (a learning rate of 0 would train nothing, silently)
        check_evaluation_counts(num_bootstrap=self.num_bootstrap)
        for name in ("learning_rate", "finetune_learning_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        self._check_finetune_method()
        if self.mixed_precision not in FINETUNE_MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision: must be one of {FINETUNE_MIXED_PRECISIONS}, got {self.mixed_precision!r}"
            )
        if self.mixed_precision != "auto" and self.mode != "finetune":
            raise ValueError(
                f"mixed_precision {self.mixed_precision!r}: set, but mode is {self.mode!r}, so it would be ignored "
                "(the linear probe extracts its features in fp32); it is for --mode finetune"
            )
        self._check_resume()

    def _check_resume(self) -> None:
        """Refuse resume settings that mean nothing here: a resume of the linear probe (it keeps no checkpoints), a
        checkpoint folder (the command runs one fine-tune per label set, fraction, seed and encoder, each with its
        own checkpoints), a resume that --overwrite_output_dir would throw away."""
        if self.finetune_save_steps is not None and self.finetune_save_steps < 1:
            raise ValueError(f"finetune_save_steps: must be >= 1 (or None), got {self.finetune_save_steps}")
        for name in ("resume_from_checkpoint", "finetune_save_steps"):
            if getattr(self, name) is not None and self.mode != "finetune":
                raise ValueError(
                    f"{name} {getattr(self, name)!r}: set, but mode is {self.mode!r}, so it would be ignored (the "
                    "linear probe keeps no checkpoints: run it again); it is for --mode finetune"
                )
        if self.resume_from_checkpoint not in (None, "latest"):
            raise ValueError(
                f"resume_from_checkpoint: 'latest' or unset, got {self.resume_from_checkpoint!r}: the command runs "
                "a fine-tune per label set, label fraction, seed and encoder, each with its own checkpoints in "
                "output_dir, and 'latest' continues each from its newest complete one"
            )
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ValueError(
                "--overwrite_output_dir: replaces the results and removes the checkpoints that "
                f"--resume_from_checkpoint {self.resume_from_checkpoint!r} would continue from; give one or the other"
            )

    def _check_finetune_method(self) -> None:
        """Refuse settings that would be silently ignored: LoRA settings without LoRA, LoRA without fine-tuning."""
        if self.finetune_method not in FINETUNE_METHODS:
            raise ValueError(f"finetune_method: must be one of {FINETUNE_METHODS}, got {self.finetune_method!r}")
        if self.finetune_method == "lora" and self.mode != "finetune":
            raise ValueError(
                f"finetune_method 'lora' trains adapters, which needs --mode finetune (mode is {self.mode!r}: the "
                "linear probe keeps the encoder frozen and trains the head alone)"
            )
        if self.finetune_method != "lora":
            defaults = {name: item.default for name, item in type(self).__dataclass_fields__.items()}
            changed = [name for name in ("lora_r", "lora_alpha", "lora_dropout", "merge_lora")
                       if getattr(self, name) != defaults[name]]  # fmt: skip
            if list(self.lora_target_modules) != list(DEFAULT_LORA_TARGET_MODULES):
                changed.append("lora_target_modules")
            if changed:
                raise ValueError(
                    f"{', '.join(changed)}: set, but finetune_method is {self.finetune_method!r}, so they would be "
                    "ignored; add --finetune_method lora (with --mode finetune)"
                )
            return
        if self.lora_r < 1:
            raise ValueError(f"lora_r: must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha: must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules: name at least one linear layer of the encoder")
        if importlib.util.find_spec("peft") is None:  # now, not after the data and the model are loaded
            raise ImportError(
                "finetune_method 'lora' needs peft, merit_hf's `report` extra: pip install 'merit_hf[report]' (or "
                "pip install 'peft>=0.17')"
            )

    def lora_options(self) -> dict[str, Any]:
        """The LoRA settings as the results JSON's protocol records them (`finetune_method` 'lora')."""
        return {
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "target_modules": list(self.lora_target_modules),
        }

    def linear_probe_options(self, seed: int) -> dict[str, Any]:
        """The keyword arguments of `fit_linear_probe` that these settings give."""
        return {
            "learning_rate": self.learning_rate,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "batch_size": self.probe_batch_size,
            "weight_decay": self.weight_decay,
            "seed": seed,
        }


def check_sampling_rate_flag(dataset_name: str, sampling_rate: int, fields: dict) -> None:
    """Refuse `--sampling_rate` (which of PTB-XL's 100 / 500 Hz records to read) set for another dataset, where it
    would change nothing: MIMIC-IV-ECG and WFDB-folder records are read at their recorded rates (the feature extractor
    resamples every record to the model's). `fields`: the arguments' dataclass fields (its default is not refused)."""
    if dataset_name != "ptbxl" and sampling_rate != fields["sampling_rate"].default:
        raise ValueError(
            f"--sampling_rate {sampling_rate}: only with --dataset_name ptbxl (which of PTB-XL's 100 or 500 Hz "
            f"records to read); {dataset_name} records are read at their recorded rates, which the feature "
            "extractor resamples to the model's, so it would change nothing: leave --sampling_rate out"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Labels and label fractions
# ----------------------------------------------------------------------------------------------------------------------
def label_names(dataset, label_set: str) -> list[str]:
    """Class names of `label_set` from the dataset's `List(ClassLabel)` feature."""
    if label_set not in dataset.features:
        raise ValueError(f"the dataset has no label column {label_set!r}; it has {sorted(dataset.features)}")
    return list(dataset.features[label_set].feature.names)


def label_matrix(dataset, label_set: str) -> np.ndarray:
    """Multi-hot targets `(num_records, num_classes)` float32 from the `List(ClassLabel)` column."""
    names = label_names(dataset, label_set)
    matrix = np.zeros((len(dataset), len(names)), dtype=np.float32)
    for row, indices in enumerate(dataset[label_set]):
        matrix[row, list(indices)] = 1.0
    return matrix


def label_fraction_rows(dataset, label_set: str, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of the `fraction` of `dataset` whose labels are used: `merit_hf.data.label_fraction_subset`
    (stratified on each record's rarest class of `label_set`, seeded, nested across fractions), as indices so that
    features cached for the whole split can be reused."""
    from ..data import label_fraction_subset

    if fraction == 1:
        return np.arange(len(dataset))
    indexed = dataset.select_columns([label_set]).add_column("_row", list(range(len(dataset))))
    return np.asarray(label_fraction_subset(indexed, fraction, label_set, seed)["_row"], dtype=np.int64)


def probe_rows(dataset_dict, label_set: str, label_fraction: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The rows of each split that the protocol uses for `label_set`: records with at least one class of the set
    (the PTB-XL benchmark drops the others from every split, Strodthoff et al. 2021, as MERL's split files do), and
    of those, `label_fraction` of the training rows (`label_fraction_rows`)."""
    rows = {split: labeled_rows(dataset_dict, split, label_set) for split in SPLITS}
    subset = label_fraction_rows(dataset_dict["train"].select(rows["train"]), label_set, label_fraction, seed)
    rows["train"] = rows["train"][subset]
    return rows


def labeled_dataset_dict(dataset_dict, label_set: str, splits: Sequence[str] = SPLITS):
    """`splits` of `dataset_dict`, each restricted to its records with a `label_set` label (as `probe_rows` at label
    fraction 1); a split without one raises, naming it. Zero-shot needs no training split: `("validation", "test")`."""
    from datasets import DatasetDict

    for split in splits:
        if split not in dataset_dict:
            raise ValueError(f"no {split} split (the dataset has {sorted(dataset_dict)})")
    return DatasetDict(
        {split: dataset_dict[split].select(labeled_rows(dataset_dict, split, label_set)) for split in splits}
    )


def labeled_rows(dataset_dict, split: str, label_set: str) -> np.ndarray:
    """The rows of `split` with at least one class of `label_set`; none raises, naming the split."""
    rows = np.flatnonzero(label_matrix(dataset_dict[split], label_set).any(axis=1))
    if len(rows) == 0:
        raise ValueError(f"the {split} split has no record with a {label_set} label")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Models: the encoder of any MERIT checkpoint, and its random-init twin
# ----------------------------------------------------------------------------------------------------------------------
def load_encoder(model_or_path) -> tuple[MeritEcgModel, str]:
    """`(encoder, name)` from a model instance or a checkpoint folder / Hub id of any MERIT class."""
    if isinstance(model_or_path, (str, Path)):
        return MeritEcgModel.from_pretrained(str(model_or_path)), str(model_or_path)
    return ecg_encoder_of(model_or_path), getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__


def random_init_like(encoder: MeritEcgModel, seed: int = 0) -> MeritEcgModel:
    """The random-init baseline: an encoder of the same config with fresh weights drawn under `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        baseline = MeritEcgModel._from_config(copy.deepcopy(encoder.config))
    baseline.name_or_path = "random-init"
    return baseline.eval()


def load_feature_extractor(model_or_path, encoder: MeritEcgModel) -> MeritFeatureExtractor:
    """The checkpoint's saved feature extractor when it has one, else the one matching the encoder config."""
    if isinstance(model_or_path, (str, Path)):
        try:
            return MeritFeatureExtractor.from_pretrained(str(model_or_path))
        except OSError:
            logger.info("%s has no preprocessor_config.json; using the encoder config's contract", model_or_path)
    return MeritFeatureExtractor.from_model_config(encoder.config)


# ----------------------------------------------------------------------------------------------------------------------
# Features (computed once, cached)
# ----------------------------------------------------------------------------------------------------------------------
def ecg_model_inputs(
    feature_extractor: MeritFeatureExtractor,
    rows: dict[str, list],
    transform: RecordTransform | None = None,
    start: int = 0,
    crop: str | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Run a batch of dataset rows (`signal`, `sampling_rate`, `lead_names`), after `transform` when given, through
    the one rows -> batch path (`merit_hf.data.MeritCollator.model_inputs`: the feature extractor's batched torch path
    on `device` when given, its scipy path otherwise); returns its tensors: `ecg_values`, and `lead_mask` /
    `record_index` / `ecg_attention_mask` when its settings give them."""
    from ..data import MeritCollator

    signals, rates, names = rows["signal"], rows["sampling_rate"], rows["lead_names"]
    if transform is not None:
        signals, rates, names = [], [], []
        for offset, (signal, rate, leads) in enumerate(zip(rows["signal"], rows["sampling_rate"], rows["lead_names"])):
            signal, rate, *new_leads = transform(np.asarray(signal, dtype=np.float64), float(rate), list(leads),
                                                 start + offset)  # fmt: skip
            signals.append(signal)
            rates.append(rate)
            names.append(new_leads[0] if new_leads else leads)
    collator = MeritCollator(feature_extractor, feature_extraction_device=device)
    return collator.model_inputs(signals, rates, names, crop=crop)


def encoder_inputs(inputs: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The feature extractor's tensors that a MERIT model takes (`ecg_values`, `ecg_attention_mask`, `lead_mask`),
    on `device`."""
    names = ("ecg_values", "ecg_attention_mask", "lead_mask")
    return {name: inputs[name].to(device) for name in names if inputs.get(name) is not None}


def record_embeddings(
    encoder: MeritEcgModel, inputs: dict[str, torch.Tensor], device: torch.device | str, window_pooling: str = "mean"
) -> torch.Tensor:
    """`pooler_output` of every record `(num_records, hidden_size)` from `ecg_model_inputs`: missing leads left out
    (`lead_mask`), and the windows of `window="sliding"` pooled back per record (`pool_window_embeddings`)."""
    pooled = encoder(**encoder_inputs(inputs, device)).pooler_output
    if "record_index" in inputs:
        pooled = pool_window_embeddings(pooled, inputs["record_index"].to(pooled.device), window_pooling)
    return pooled


@contextmanager
def evaluated_on(module: nn.Module, device: torch.device | str | None = None):
    """`module` in eval mode on `device` (default: where it is) inside the block; afterwards each of its submodules'
    own training mode and its device, as the caller had them: the module may be the caller's model, or part of it,
    and a training loop that evaluates between epochs keeps its dropout and its device."""
    parameter = next(module.parameters(), None)
    home = parameter.device if parameter is not None else None
    with _in_eval_mode(module):
        if device is not None:
            module.to(device)
        try:
            yield module
        finally:
            if home is not None:
                module.to(home)


@torch.no_grad()
def extract_features(
    encoder: MeritEcgModel,
    feature_extractor: MeritFeatureExtractor,
    dataset,
    batch_size: int = 64,
    transform: RecordTransform | None = None,
    cache_dir: str | Path | None = None,
    cache_tag: str = "clean",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """The encoder's `pooler_output` for every record `(num_records, hidden_size)` float32, centre-cropped.

    With `cache_dir`, features are saved as `.npy` under a key of the model weights, the feature-extractor settings,
    the dataset fingerprint and `cache_tag` (name a `transform` there), and read back on the next call. `device`
    (default: the encoder's) is where they are computed, in eval mode; the encoder goes back to its device and its
    modes afterwards (`evaluated_on`), since it may be part of the caller's model (`load_encoder` of a two-tower model
    is its `ecg_model`).
    """
    cache_file = None
    if cache_dir is not None and transform is not None and cache_tag == "clean":
        raise ValueError(
            "extract_features: name the transform in cache_tag, or its features are cached as the clean ones"
        )
    if cache_dir is not None:
        key = hashlib.sha1(
            json.dumps(
                [model_fingerprint(encoder), feature_extractor.to_json_string(), dataset._fingerprint, cache_tag]
            ).encode()
        ).hexdigest()[:20]
        cache_file = Path(cache_dir) / f"features_{key}.npy"
        if cache_file.is_file():
            return np.load(cache_file)
    device = torch.device(device) if device is not None else encoder.device
    outputs = []
    columns = ["signal", "sampling_rate", "lead_names"]
    with evaluated_on(encoder, device):
        for start in tqdm(
            range(0, len(dataset), batch_size), desc="features", leave=False, disable=len(dataset) < 1000
        ):
            rows = dataset.select_columns(columns)[start : start + batch_size]
            inputs = ecg_model_inputs(feature_extractor, rows, transform, start, crop="center")
            outputs.append(record_embeddings(encoder, inputs, device).float().cpu().numpy())
    features = np.concatenate(outputs).astype(np.float32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_file, features)
    return features


# ----------------------------------------------------------------------------------------------------------------------
# The linear probe
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A trained linear probe: standardisation fitted on the training features, then one linear layer."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    best_epoch: int
    epochs_run: int

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Logits `(num_records, num_classes)`."""
        standardised = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return standardised @ self.weight.T + self.bias


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    learning_rate: float = 1e-3,
    max_epochs: int = 100,
    patience: int = 10,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearProbe:
    """Train a linear layer with BCE on standardised features (Adam), keeping the epoch with the best validation
    macro AUROC and stopping after `patience` epochs without improvement. When the validation macro AUROC is
    undefined (no class has both a positive and a negative there), nothing can stop training: all `max_epochs` run
    and the last epoch is kept, never the untrained initialisation."""
    train_features = np.asarray(train_features, dtype=np.float64)
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.as_tensor((train_features - mean) / std, dtype=torch.float32)
    y_train = torch.as_tensor(train_labels, dtype=torch.float32)
    x_val = torch.as_tensor((np.asarray(validation_features) - mean) / std, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(x_train.shape[1], y_train.shape[1])
    optimizer = torch.optim.Adam(layer.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best_score, best_state, best_epoch, stale, epoch = -np.inf, copy.deepcopy(layer.state_dict()), 0, 0, 0
    for epoch in range(1, max_epochs + 1):
        layer.train()
        for rows in torch.randperm(len(x_train), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(layer(x_train[rows]), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            score = macro_auroc(validation_labels, layer(x_val).numpy())
        if math.isnan(score):  # undefined in every epoch (the labels decide): keep the last one
            best_state, best_epoch = copy.deepcopy(layer.state_dict()), epoch
        elif score > best_score:
            best_score, best_state, best_epoch, stale = score, copy.deepcopy(layer.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return LinearProbe(
        mean=mean,
        std=std,
        weight=best_state["weight"].double().numpy(),
        bias=best_state["bias"].double().numpy(),
        best_epoch=best_epoch,
        epochs_run=epoch,
    )


def evaluate_scores(
    test_labels: np.ndarray,
    test_scores: np.ndarray,
    validation_labels: np.ndarray,
    validation_scores: np.ndarray,
    names: Sequence[str],
    num_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """Test metrics with F1 thresholds chosen on validation (see `merit_hf.evaluation.metrics`)."""
    thresholds = best_f1_thresholds(validation_labels, validation_scores)
    return classification_metrics(
        test_labels, test_scores, names, thresholds=thresholds, num_bootstrap=num_bootstrap, seed=seed
    )


def a_label_of(label_set: str) -> str:
    """`a superclass label`, `an arrhythmia label`, `a label of set 'all'`: how the results JSON names the label that
    records need to be kept ('a all label' read as a typo)."""
    if label_set == "all":
        return "a label of set 'all'"
    return f"{'an' if label_set[:1].lower() in tuple('aeiou') else 'a'} {label_set} label"


def dataset_info(dataset_dict, label_set: str, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Record counts, and the classes the probe never saw a positive of (their head is untrained; they stay in the
    macro mean, as in every published protocol, but are named)."""
    counts = dict(
        zip(
            label_names(dataset_dict["train"], label_set),
            label_matrix(dataset_dict["train"], label_set)[rows["train"]].sum(axis=0).astype(int).tolist(),
        )
    )
    return {
        "num_records": {
            "train": int(len(rows["train"])),
            "validation": int(len(rows["validation"])),
            "test": int(len(rows["test"])),
            "in_splits": {split: len(dataset_dict[split]) for split in SPLITS},
        },
        "unlabeled_records": f"records without {a_label_of(label_set)} are left out of every split",
        "train_label_counts": counts,
        "classes_without_training_positives": [name for name, count in counts.items() if count == 0],
    }


def dataset_description(arguments: ProbeArguments) -> dict[str, Any]:
    """What the results JSON says of a dataset that is not PTB-XL (its name, and how its splits were drawn), or of
    PTB-XL read with `ptbxl_version="as_is"` (its labels are then the folder's, not v1.0.3's)."""
    if arguments.dataset_name == "ptbxl" and arguments.ptbxl_version == "as_is":
        return {"version": AS_IS_VERSION}
    if arguments.dataset_name != "wfdb":
        return {}
    splits = (
        f"column {arguments.split_column!r}"
        if arguments.split_column
        else f"seeded split {arguments.split_fractions} (seed {arguments.split_seed}), patients kept whole"
    )
    return {
        "name": arguments.dataset,
        "version": None,
        "splits": f"WFDB folder: train / validation / test by {splits}",
    }


def probe_protocol(arguments: ProbeArguments | None = None, **overrides) -> dict[str, Any]:
    """The protocol fields written into every results JSON; `overrides` replace or add fields (the runs add
    `feature_extractor`, `merit_hf.evaluation.results.feature_extractor_settings`)."""
    arguments = arguments or ProbeArguments()
    protocol = {
        "splits": "PTB-XL strat_fold 1-8 train, 9 validation, 10 test",
        "features": "encoder pooler_output (LayerNorm of the mean patch token), centre crop, frozen",
        "head": "linear layer on features standardised with training mean/std, BCE, Adam",
        "learning_rate": arguments.learning_rate,
        "max_epochs": arguments.max_epochs,
        "patience": arguments.patience,
        "batch_size": arguments.probe_batch_size,
        "weight_decay": arguments.weight_decay,
        "early_stopping": "best validation macro AUROC",
        "f1_thresholds": "per class, the F1-maximising threshold on validation",
        "label_fraction_sampling": "merit_hf.data.label_fraction_subset: stratified on the rarest class, seeded, nested",
        "num_bootstrap": arguments.num_bootstrap,
    }
    protocol.update(overrides)
    return protocol


def feature_device(arguments: ProbeArguments) -> torch.device:
    """Where the probe's frozen features are computed: the GPU when there is one (`--use_cpu true` keeps the CPU), in
    fp32 either way, as the protocol's features always were. Before, they were computed on the CPU the encoder was
    loaded on, also on a GPU machine: the full PTB-XL through ViT-B at a few ECGs/s."""
    return inference_device(use_cpu=arguments.use_cpu)


def probe_features(
    encoder: MeritEcgModel,
    feature_extractor: MeritFeatureExtractor,
    dataset_dict,
    seed: int = 0,
    baseline: bool = True,
    arguments: ProbeArguments | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Frozen features of every split, `{"model": {split: array}, "baseline": {...}}`, computed once and shared by
    every label set and label fraction (the baseline encoder is drawn with `seed`)."""
    arguments = arguments or ProbeArguments()
    encoders = {"model": encoder}
    if baseline:
        encoders["baseline"] = random_init_like(encoder, seed)
    return {
        role: {
            split: extract_features(
                role_encoder,
                feature_extractor,
                dataset_dict[split],
                arguments.batch_size,
                cache_dir=arguments.cache_dir,
                device=feature_device(arguments),
            )
            for split in SPLITS
        }
        for role, role_encoder in encoders.items()
    }


def run_linear_probe(
    model_or_path,
    dataset_dict,
    label_set: str = "superclass",
    label_fraction: float = 1.0,
    seed: int = 0,
    baseline: bool = True,
    feature_extractor: MeritFeatureExtractor | None = None,
    arguments: ProbeArguments | None = None,
    features: dict[str, dict[str, np.ndarray]] | None = None,
    output_file: str | Path | None = None,
) -> EvaluationResults:
    """Linear probe of a MERIT encoder (and of its random-init twin) on one label set and label fraction.

    Args:
        model_or_path: a MERIT model (any class) or checkpoint folder / Hub id.
        dataset_dict: a `DatasetDict` with `train` / `validation` / `test` in the `merit_hf.data` PTB-XL schema.
        label_set: `"superclass"`, `"subclass"`, `"form"`, `"rhythm"` or `"all"`.
        label_fraction: fraction of the training records whose labels are used (stratified, seeded).
        seed: label draw, head init and bootstrap seed; also the random-init seed of the baseline.
        baseline: also probe the random-init encoder.
        feature_extractor: defaults to the checkpoint's, else the one matching the encoder config.
        arguments: hyper-parameters (`ProbeArguments`); defaults to the protocol's.
        features: precomputed `{"model": {split: array}, "baseline": {...}}` (shared across label sets/fractions).
        output_file: write the results JSON there.

    Returns:
        The run's `EvaluationResults` (`merit_hf.evaluation.results`): `results.model.metrics["macro_auroc"].value`
        and the same under `results.baseline`.
    """
    arguments = arguments or ProbeArguments()
    encoder, model_name = load_encoder(model_or_path)
    feature_extractor = feature_extractor or load_feature_extractor(model_or_path, encoder)
    if features is None or (baseline and "baseline" not in features):
        features = probe_features(encoder, feature_extractor, dataset_dict, seed, baseline, arguments)
    names = label_names(dataset_dict["train"], label_set)
    rows = probe_rows(dataset_dict, label_set, label_fraction, seed)
    labels = {split: label_matrix(dataset_dict[split], label_set)[rows[split]] for split in SPLITS}
    entries = {}
    for role in ("model", "baseline") if baseline else ("model",):
        split_features = {split: features[role][split][rows[split]] for split in SPLITS}
        probe = fit_linear_probe(
            split_features["train"],
            labels["train"],
            split_features["validation"],
            labels["validation"],
            **arguments.linear_probe_options(seed),
        )
        scores = evaluate_scores(
            labels["test"],
            probe.decision_function(split_features["test"]),
            labels["validation"],
            probe.decision_function(split_features["validation"]),
            names,
            arguments.num_bootstrap,
            seed,
        )
        scores["training"] = {"best_epoch": probe.best_epoch, "epochs_run": probe.epochs_run}
        entries[role] = {
            **encoder_identity(role, model_name, seed, encoder),
            **scores,
        }
    results = build_results(
        task="linear-probe",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=names,
        label_fraction=label_fraction,
        seed=seed,
        protocol=probe_protocol(arguments, feature_extractor=feature_extractor_settings(feature_extractor)),
        **entries,  # model, and baseline when it ran
        dataset_extra={**dataset_info(dataset_dict, label_set, rows), **dataset_description(arguments)},
    )
    if output_file is not None:
        write_results(results, output_file)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def load_dataset_dict(path: str | Path, sampling_rate: int = 100, arguments: ProbeArguments | None = None):
    """PTB-XL as a `DatasetDict` (a converted dataset: `dataset_scripts/ptbxl`, `save_to_disk` folder or Hub id; or
    the PhysioNet folder itself, read in memory: fine for the bundled sample, slow for the full set); with
    `arguments.dataset_name == "wfdb"`, a converted WFDB folder split as `arguments` say. Through
    `merit_hf.data.load_dataset`."""
    from ..data import load_dataset

    if arguments is None:
        return load_dataset("ptbxl", str(path), sampling_rate=sampling_rate)
    return load_dataset(
        arguments.dataset_name, str(path), sampling_rate=sampling_rate, split_column=arguments.split_column,
        split_fractions=arguments.split_fractions, seed=arguments.split_seed, ptbxl_version=arguments.ptbxl_version,
    )  # fmt: skip


def run_name(task: str, label_set: str, label_fraction: float, seed: int) -> str:
    return f"{task}_{label_set}_{label_fraction:g}_seed{seed}"
