"""Fine-tuning of a MERIT encoder with a linear head (`MeritForEcgClassification`) under the probe protocol
(`merit_hf.evaluation.probe`), next to its random-init twin: `run_fine_tune` returns the same results layout as
`run_linear_probe`. Run it with `python -m merit_hf.training.probe --mode finetune`: every weight trains, or, with
`--finetune_method lora`, PEFT LoRA adapters on the encoder's linear layers and the head (`classifier_lora`), saved
as an adapter beside the results (and merged into a plain classifier with `--merge_lora true`).

The loop is `transformers.Trainer`'s: one evaluation per epoch on the validation split, `EarlyStoppingCallback` on
its macro AUROC (`compute_metrics_for`, the metrics of `merit_hf.evaluation.metrics`) and `load_best_model_at_end`, so
the test logits come from the best epoch. Training rows go through `MeritCollator` with a feature extractor that cuts
a seeded random crop per record and epoch; validation and test rows get centre crops, computed once
(`precompute_ecg_values`), which the same collator stacks. `ThroughputCallback` puts the `ThroughputMeter` of every
other loop of the package on the Trainer's events. `--mixed_precision` (`finetune_precision`: bf16 autocast on a
CUDA GPU with bf16 by default, fp32 elsewhere, and what `accelerate launch --mixed_precision` asks for) sets the
Trainer's `bf16` / `fp16`; the precision used is written next to the method in the results.

No resume: a fine-tune keeps only its best epoch's weights while it runs (`save_only_model`: no optimizer, scheduler
or RNG state) and removes them at the end, and nothing passes `resume_from_checkpoint`. An interrupted run is started
again with the same command, from epoch 0; that is safe (the `checkpoint-*` folders the interrupted run left in
`<run>_<role>_checkpoints/` are removed at the end, and the results equal a clean run's), but the epochs already
trained are lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..data.collator import MeritCollator, precompute_ecg_values, with_crop
from ..evaluation.metrics import check_evaluation_counts
from ..evaluation.probe import (
    SPLITS,
    ProbeArguments,
    dataset_description,
    dataset_info,
    evaluate_scores,
    label_matrix,
    label_names,
    load_encoder,
    load_feature_extractor,
    probe_protocol,
    probe_rows,
    random_init_like,
)
from ..evaluation.results import build_results, encoder_identity, feature_extractor_settings, write_results
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.modeling_merit import MeritEcgModel, MeritForEcgClassification
from ..utils.launch import is_first_launched_process, require_joined_processes
from ..utils.throughput import ThroughputMeter
from .classification import compute_metrics_for
from .classifier_lora import add_lora, parameter_counts, save_lora_classifier
from .finetune_precision import finetune_precision_arguments

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ["signal", "sampling_rate", "lead_names"]
# AdamW's weight decay: torch.optim.AdamW's default, which the protocol has used since its first runs; the Trainer
# leaves biases and LayerNorm weights out of it.
WEIGHT_DECAY = 0.01


def _classifier_from(encoder: MeritEcgModel, names: Sequence[str]) -> MeritForEcgClassification:
    from ..models.merit.configuration_merit import MeritConfig

    # without the encoder's `_name_or_path`: a saved classifier (`--merge_lora`) must not carry a local folder
    ecg_config = {key: value for key, value in encoder.config.to_dict().items() if key != "_name_or_path"}
    config = MeritConfig(
        ecg_config=ecg_config,
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
        problem_type="multi_label_classification",
    )
    model = MeritForEcgClassification(config)
    model.ecg_model.load_state_dict(encoder.state_dict())
    return model


class ThroughputCallback(TrainerCallback):
    """`ThroughputMeter` on `Trainer` events. The Trainer fetches (and collates: the feature extractor runs there)
    each batch between one step's end and the next step's begin, so that gap is the data wait; the step itself runs
    between `on_step_begin` and `on_step_end`; evaluation and checkpoints (after `on_epoch_end`) are excluded. FLOPs
    are counted once at `on_train_begin` on `flops_batch` (centre-cropped training rows: the count does not depend on
    the crop, and the random crops stay as they would be). Each step trained `min(global batch, rows left in the
    epoch)` ECGs, `num_train_rows` per epoch."""

    def __init__(self, meter: ThroughputMeter, flops_batch: dict[str, torch.Tensor], num_train_rows: int):
        self.meter = meter
        self.flops_batch = flops_batch
        self.num_train_rows = num_train_rows
        self._open = contextlib.ExitStack()  # the meter's `waiting()` or `excluded()` span now open, if any
        self._rows_left = 0

    def _switch(self, span: contextlib.AbstractContextManager | None) -> None:
        self._open.close()
        if span is not None:
            self._open.enter_context(span)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        batch = {name: value.to(model.device) for name, value in self.flops_batch.items()}
        self.meter.count_flops_once(lambda rows: model(**rows).loss, batch)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._rows_left = self.num_train_rows
        self._switch(self.meter.waiting())

    def on_step_begin(self, args, state, control, **kwargs):
        self._switch(None)

    def on_step_end(self, args, state, control, **kwargs):
        rows = min(args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                   self._rows_left)  # fmt: skip
        self._rows_left -= rows
        self.meter.step(rows)
        self._switch(self.meter.waiting())

    def on_epoch_end(self, args, state, control, **kwargs):
        self._switch(None)
        logger.info("fine-tune epoch %d: %s", round(state.epoch), self.meter.interval())
        self._switch(self.meter.excluded())

    def on_train_end(self, args, state, control, **kwargs):
        self._switch(None)


class CropEpochCallback(TrainerCallback):
    """Tells a `MeritCollator` with a `crop_seed` the epoch that begins (0, 1, ...), from the Trainer's state, so that
    each epoch gets its own crops, whatever the number of processes. The crops are drawn from `(seed, epoch, ecg_id)`,
    as pretraining's are: they came from one generator seeded with the seed in each process, so they depended on the
    number of processes (2 processes of batch 16 fine-tuned otherwise than one of batch 32), and every process cut the
    same sequence of windows. `fine_tune` itself never resumes (see the module docstring); in a Trainer of your own
    that resumes from a full checkpoint (`trainer.train(resume_from_checkpoint=...)`), the epoch comes from the
    restored state, so the resumed epochs get the crops they would have had."""

    def __init__(self, collator: MeritCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class DefinedMetricEarlyStoppingCallback(EarlyStoppingCallback):
    """`EarlyStoppingCallback` for which an undefined (NaN) validation macro AUROC neither improves nor uses up the
    patience. It is NaN in every epoch or in none (the validation labels decide: no class with both positives and
    negatives), and then, as in `fit_linear_probe`, nothing can stop training: all epochs run and the last is kept."""

    def check_metric_value(self, args, state, control, metric_value):
        if not math.isnan(metric_value):
            super().check_metric_value(args, state, control, metric_value)


def _remove_checkpoints(folder: Path, whole: bool) -> None:
    """Remove the Trainer's `checkpoint-<step>` folders, and `folder` itself when it is ours or left empty."""
    if whole:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def fine_tune(
    encoder: MeritEcgModel,
    feature_extractor: MeritFeatureExtractor,
    dataset_dict,
    label_set: str,
    rows: dict[str, np.ndarray],
    arguments: ProbeArguments,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    merged_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fine-tune encoder + head on `rows` of each split (`probe_rows`) with `transformers.Trainer`; returns
    `(validation_logits, test_logits, training_info)` of the best epoch. `arguments.batch_size` is the batch of each
    process; `training_info` names the number of processes and the global batch they make, the method
    (`arguments.finetune_method`), the mixed precision it trained in (`arguments.mixed_precision` resolved by
    `finetune_precision`: `"no"`, `"bf16"` or `"fp16"`) and how many parameters it trained.

    With `finetune_method="lora"` the encoder's weights stay as they are and only LoRA adapters and the head train
    (`classifier_lora.add_lora`). `adapter_dir` (LoRA only) receives the best epoch's adapter and head with the
    feature extractor, and `merged_dir` the classifier with the adapters merged in; the first process writes them.
    The adapter's base is `encoder.name_or_path`, the checkpoint it was loaded from.

    `checkpoint_dir` holds the Trainer's best checkpoint during the run (weights only, so not a point to resume from)
    and is removed at the end; `None` is a temporary folder, which only works on one process (every process must read
    the best checkpoint back: on several, give a folder they all see). An interrupted fine-tune cannot be resumed: run
    it again, from epoch 0. When the validation macro AUROC cannot be computed in any epoch (no class with both
    positives and negatives), no epoch is best: all epochs run and the last one is kept, as in `fit_linear_probe`.
    """
    if (adapter_dir is not None or merged_dir is not None) and arguments.finetune_method != "lora":
        raise ValueError(
            f"fine_tune: adapter_dir and merged_dir are for finetune_method 'lora', got {arguments.finetune_method!r}"
        )
    if merged_dir is not None and adapter_dir is None:
        raise ValueError("fine_tune: merged_dir needs adapter_dir (the adapter is saved before it is merged)")
    names = label_names(dataset_dict["train"], label_set)
    columns = [*RECORD_COLUMNS, label_set]
    keyed = "ecg_id" in dataset_dict["train"].column_names  # PTB-XL and WFDB folders: crops keyed by the record
    train = dataset_dict["train"].select(rows["train"]).select_columns(columns + ["ecg_id"] * keyed)
    centre_crops = with_crop(feature_extractor, "center")
    evaluation = {
        split: precompute_ecg_values(
            dataset_dict[split].select(rows[split]).select_columns(columns), centre_crops, arguments.batch_size
        )
        for split in ("validation", "test")
    }
    random_crops = MeritCollator(with_crop(feature_extractor, "random", seed), label_set=label_set,
                                 num_classes=len(names), crop_seed=seed if keyed else None)  # fmt: skip
    precision, precision_arguments = finetune_precision_arguments(arguments.mixed_precision, arguments.use_cpu)
    temporary = tempfile.mkdtemp(prefix="merit_fine_tune_") if checkpoint_dir is None else None
    training_arguments = TrainingArguments(
        output_dir=str(checkpoint_dir or temporary),
        per_device_train_batch_size=arguments.batch_size,
        per_device_eval_batch_size=arguments.batch_size,
        learning_rate=arguments.finetune_learning_rate,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping, as in the protocol's runs so far
        num_train_epochs=arguments.finetune_max_epochs,
        eval_strategy="epoch",
        save_strategy="best",
        metric_for_best_model="macro_auroc",
        greater_is_better=True,
        load_best_model_at_end=True,
        save_only_model=True,
        save_total_limit=1,
        logging_strategy="epoch",
        remove_unused_columns=False,  # the collator reads the raw record columns
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
        seed=seed,
        **precision_arguments,  # bf16, fp16, use_cpu
    )
    require_joined_processes(training_arguments.world_size)
    if temporary is not None and training_arguments.world_size > 1:
        raise ValueError(
            f"fine_tune on {training_arguments.world_size} processes: give checkpoint_dir, a folder every process "
            "sees (each reads the best checkpoint back)"
        )
    set_seed(seed)  # the head's initialisation
    model = _classifier_from(encoder, names)
    if arguments.finetune_method == "lora":
        model.name_or_path = encoder.name_or_path  # the adapter's base_model_name_or_path
        model = add_lora(model, arguments)
    parameters = parameter_counts(model)  # before training: a merge at the end unwraps the adapters in place
    meter = ThroughputMeter(training_arguments.device, num_processes=training_arguments.world_size, model=model)
    flops_batch = MeritCollator(centre_crops, label_set=label_set, num_classes=len(names))(
        [train[index] for index in range(min(2, len(train)))]
    )
    trainer = Trainer(
        model,
        training_arguments,
        data_collator=random_crops,
        train_dataset=train,
        eval_dataset=evaluation["validation"],
        compute_metrics=compute_metrics_for(names),
        callbacks=[
            DefinedMetricEarlyStoppingCallback(early_stopping_patience=arguments.finetune_patience),
            ThroughputCallback(meter, flops_batch, len(train)),
            *([CropEpochCallback(random_crops)] if keyed else []),
        ],
    )
    try:
        trainer.train()
        validation_logits = trainer.predict(evaluation["validation"]).predictions
        test_logits = trainer.predict(evaluation["test"]).predictions
        saved = {}
        if adapter_dir is not None and trainer.is_world_process_zero():
            saved = save_lora_classifier(trainer.model, feature_extractor, adapter_dir, merged_dir)
    finally:
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            _remove_checkpoints(Path(training_arguments.output_dir), whole=temporary is not None)
    epochs_run = round(trainer.state.epoch)
    best_epoch = next(
        (round(entry["epoch"]) for entry in trainer.state.log_history
         if "eval_macro_auroc" in entry and entry["step"] == trainer.state.best_global_step),
        epochs_run,
    )  # fmt: skip
    training = {
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        # `batch_size` is per process: on N processes each step trains N times as many records
        "num_processes": training_arguments.world_size,
        "global_batch_size": arguments.batch_size * training_arguments.world_size,
        "method": arguments.finetune_method,
        "mixed_precision": precision,
        **parameters,
        **saved,
        "throughput": meter.totals(),
    }
    return np.asarray(validation_logits, dtype=np.float32), np.asarray(test_logits, dtype=np.float32), training


def lora_output_dirs(output_file: str | Path | None, arguments: ProbeArguments) -> dict[str, Path]:
    """Where a LoRA run of `output_file` (`<name>.json`) saves the fine-tuned encoder: `adapter_dir`
    `<name>_model_adapter`, and with `arguments.merge_lora` `merged_dir` `<name>_model_merged`; none for a full
    fine-tune or without an output file."""
    if output_file is None or arguments.finetune_method != "lora":
        return {}
    stem = Path(output_file).with_suffix("")
    dirs = {"adapter_dir": stem.with_name(f"{stem.name}_model_adapter")}
    if arguments.merge_lora:
        dirs["merged_dir"] = stem.with_name(f"{stem.name}_model_merged")
    return dirs


def fine_tuned_identity(identity: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The model entry's identity (`encoder_identity`, its `weights_fingerprint` of the encoder the run started from),
    plus the fingerprints of what a LoRA run saved (`training`'s `adapter_dir` and `merged_dir`): `adapter`, the
    adapter file's tensors, and `fine_tuned_ecg_encoder`, the merged model's encoder. A card of either folder is then
    checked against the numbers it shows (`merit_hf.hub.cards`)."""
    from ..models.fingerprint import safetensors_fingerprint, weights_fingerprint

    fingerprints = dict(identity.get("weights_fingerprint") or {})
    adapter_file = Path(training["adapter_dir"]) / "adapter_model.safetensors" if training.get("adapter_dir") else None
    if adapter_file is not None and adapter_file.is_file():
        fingerprints["adapter"] = safetensors_fingerprint(adapter_file)
    if training.get("merged_dir") and Path(training["merged_dir"]).is_dir():
        fingerprints["fine_tuned_ecg_encoder"] = weights_fingerprint(load_encoder(training["merged_dir"])[0])
    return {**identity, "weights_fingerprint": fingerprints} if fingerprints else identity


def run_fine_tune(
    model_or_path,
    dataset_dict,
    label_set: str = "superclass",
    label_fraction: float = 1.0,
    seed: int = 0,
    baseline: bool = True,
    feature_extractor: MeritFeatureExtractor | None = None,
    arguments: ProbeArguments | None = None,
    output_file: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tuning (`MeritForEcgClassification`, every weight or LoRA as `arguments.finetune_method` says) of the
    encoder and of its random-init twin; same arguments and results layout as `run_linear_probe`. A LoRA run with an
    `output_file` saves the encoder's adapter and head beside it (`lora_output_dirs`); the baseline's adapter is not
    kept (its base is a random draw, not a checkpoint)."""
    arguments = arguments or ProbeArguments(mode="finetune")
    check_evaluation_counts(num_bootstrap=arguments.num_bootstrap)  # now, not after the fine-tune (if set since)
    if arguments.merge_lora and output_file is None:
        raise ValueError("run_fine_tune: merge_lora writes the merged model beside output_file; give output_file")
    encoder, model_name = load_encoder(model_or_path)
    feature_extractor = feature_extractor or load_feature_extractor(model_or_path, encoder)
    names = label_names(dataset_dict["train"], label_set)
    rows = probe_rows(dataset_dict, label_set, label_fraction, seed)
    labels = {split: label_matrix(dataset_dict[split], label_set)[rows[split]] for split in SPLITS}
    entries = {}
    identity = encoder_identity("model", model_name, seed, encoder)  # before training: the weights it started from
    encoders = {"model": encoder}
    if baseline:
        encoders["baseline"] = random_init_like(encoder, seed)
    for role, role_encoder in encoders.items():
        checkpoint_dir = (
            None
            if output_file is None
            else Path(output_file).with_name(f"{Path(output_file).stem}_{role}_checkpoints")
        )
        saved_dirs = lora_output_dirs(output_file, arguments) if role == "model" else {}
        validation_logits, test_logits, training = fine_tune(
            role_encoder, feature_extractor, dataset_dict, label_set, rows, arguments, seed, checkpoint_dir,
            **saved_dirs,
        )  # fmt: skip
        scores = evaluate_scores(
            labels["test"], test_logits, labels["validation"], validation_logits, names, arguments.num_bootstrap, seed
        )
        scores["training"] = training
        entries[role] = {
            **(
                fine_tuned_identity(identity, training)
                if role == "model"
                else encoder_identity(role, model_name, seed)
            ),
            **scores,
        }
    protocol = probe_protocol(
        arguments,
        features=(
            "end to end: MeritForEcgClassification (encoder + linear head on pooler_output)"
            if arguments.finetune_method == "full"
            else "end to end: MeritForEcgClassification with PEFT LoRA adapters on the encoder's linear layers "
            f"{list(arguments.lora_target_modules)}, the encoder's own weights frozen, the linear head trained whole"
        ),
        head=(
            "linear head, BCE, transformers.Trainer: AdamW (weight decay on all but biases and norms), constant "
            "learning rate; random crop in training, centre crop in evaluation"
        ),
        finetune_method=arguments.finetune_method,
        mixed_precision=entries["model"]["training"]["mixed_precision"],  # the same for the baseline
        **({"lora": arguments.lora_options()} if arguments.finetune_method == "lora" else {}),
        weight_decay=WEIGHT_DECAY,
        learning_rate=arguments.finetune_learning_rate,
        max_epochs=arguments.finetune_max_epochs,
        patience=arguments.finetune_patience,
        batch_size=arguments.batch_size,
        feature_extractor=feature_extractor_settings(feature_extractor),
    )
    results = build_results(
        task="fine-tune",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=names,
        label_fraction=label_fraction,
        seed=seed,
        protocol=protocol,
        **entries,  # model, and baseline when it ran
        dataset_extra={**dataset_info(dataset_dict, label_set, rows), **dataset_description(arguments)},
    )
    if output_file is not None and is_first_launched_process():  # one writer: every process has the same results
        write_results(results, output_file)
    return results
