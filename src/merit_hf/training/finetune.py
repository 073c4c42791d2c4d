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

Resume: an interrupted fine-tune continues with the same command plus `--resume_from_checkpoint latest`
(`finetune_resume`). While a fine-tune runs, `<run>_<role>_checkpoints/` beside its results file keeps the unit's
settings and the Trainer's full checkpoints (weights, AdamW state, scheduler, RNG states, trainer state with the best
epoch and the early-stopping counter), written at each epoch's end and every `--finetune_save_steps` steps: the newest
and the best epoch's (or the newest two), so at most two per fine-tune, and a third while one is written; each holds
the weights (for LoRA the adapters and head) and AdamW's two moments of every trained weight. A resume keeps the
results files and the roles (the encoder, its random-init twin) that an earlier run finished with the same settings,
and refuses those of other settings, naming each setting that differs; each role left half-done continues from its
newest intact checkpoint, passing over (with a warning) one a kill interrupted or that does not read back whole, and
refusing when only damaged ones are left. The resumed run trains on as the uninterrupted one would have: the same
steps, batches, crops, dropout and early stopping, so the same results (tested on CPU: equal to the last bit). The
checkpoints are removed when the role is scored, the role folders when the results file is written; a run that stops
on an error or a kill keeps them, and a run that does not resume refuses an `output_dir` that holds them
(`--overwrite_output_dir true` starts again).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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
from ..evaluation.results import (
    EvaluationResults,
    build_results,
    encoder_identity,
    feature_extractor_settings,
    results_dataset,
    write_results,
)
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.modeling_merit import MeritEcgModel, MeritForEcgClassification
from ..utils.launch import is_first_launched_process, launched_processes, require_joined_processes
from ..utils.throughput import ThroughputMeter
from .classification import compute_metrics_for
from .classifier_lora import add_lora, parameter_counts, save_lora_classifier
from .finetune_precision import finetune_precision_arguments
from .finetune_resume import (
    RunHistoryCallback,
    SaveStepsCallback,
    checkpoint_step,
    find_resume_checkpoint,
    finish_role,
    finished_role_entry,
    finished_unit,
    load_run_history,
    remove_checkpoints_after,
    remove_role_folders,
    role_checkpoint_dir,
    start_role,
    stopped_at_step,
    unit_settings,
)

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
    between `on_step_begin` and `on_step_end`; evaluation and checkpoints (after `on_epoch_end`, and those
    `--finetune_save_steps` asks for inside an epoch, between `on_step_end` and `on_save`) are excluded. FLOPs are
    counted once at `on_train_begin` on `flops_batch` (centre-cropped training rows: the count does not depend on the
    crop, and the random crops stay as they would be). Each step trained `min(global batch, rows left in the epoch)`
    ECGs, `num_train_rows` per epoch (less the steps before the checkpoint in an epoch a resume starts inside)."""

    def __init__(self, meter: ThroughputMeter, flops_batch: dict[str, torch.Tensor], num_train_rows: int):
        self.meter = meter
        self.flops_batch = flops_batch
        self.num_train_rows = num_train_rows
        self._open = contextlib.ExitStack()  # the meter's `waiting()` or `excluded()` span now open, if any
        self._rows_left = 0
        self._inside_epoch = False

    def _switch(self, span: contextlib.AbstractContextManager | None) -> None:
        self._open.close()
        if span is not None:
            self._open.enter_context(span)

    @staticmethod
    def _global_batch(args) -> int:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        batch = {name: value.to(model.device) for name, value in self.flops_batch.items()}
        self.meter.count_flops_once(lambda rows: model(**rows).loss, batch)

    def on_epoch_begin(self, args, state, control, **kwargs):
        steps_per_epoch = math.ceil(self.num_train_rows / self._global_batch(args))
        steps_done = state.global_step - int(state.epoch or 0) * steps_per_epoch  # > 0 only in a resumed epoch
        self._rows_left = self.num_train_rows - steps_done * self._global_batch(args)
        self._inside_epoch = True
        self._switch(self.meter.waiting())

    def on_step_begin(self, args, state, control, **kwargs):
        self._switch(None)

    def on_step_end(self, args, state, control, **kwargs):
        rows = min(self._global_batch(args), self._rows_left)
        self._rows_left -= rows
        self.meter.step(rows)
        self._switch(self.meter.excluded() if control.should_save else self.meter.waiting())

    def on_save(self, args, state, control, **kwargs):
        if self._inside_epoch:  # a checkpoint inside the epoch: back to waiting for the next batch
            self._switch(self.meter.waiting())

    def on_epoch_end(self, args, state, control, **kwargs):
        self._inside_epoch = False
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
    same sequence of windows. A resumed fine-tune (`trainer.train(resume_from_checkpoint=...)`, as
    `--resume_from_checkpoint latest` runs it) takes the epoch from the restored state, also when it resumes inside an
    epoch (`state.epoch` 1.5 is epoch 1), so the resumed epochs get the crops they would have had."""

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
    resume_from_checkpoint: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fine-tune encoder + head on `rows` of each split (`probe_rows`) with `transformers.Trainer`; returns
    `(validation_logits, test_logits, training_info)` of the best epoch. `arguments.batch_size` is the batch of each
    process; `training_info` names the number of processes and the global batch they make, the method
    (`arguments.finetune_method`), the mixed precision it trained in (`arguments.mixed_precision` resolved by
    `finetune_precision`: `"no"`, `"bf16"` or `"fp16"`), how many parameters it trained and, for a resumed run, the
    steps it resumed at (`resumed_at_steps`).

    With `finetune_method="lora"` the encoder's weights stay as they are and only LoRA adapters and the head train
    (`classifier_lora.add_lora`). `adapter_dir` (LoRA only) receives the best epoch's adapter and head with the
    feature extractor, and `merged_dir` the classifier with the adapters merged in; the first process writes them.
    The adapter's base is `encoder.name_or_path`, the checkpoint it was loaded from.

    `checkpoint_dir` holds the Trainer's full checkpoints while the run goes on (at each epoch's end and every
    `arguments.finetune_save_steps` steps; the newest and the best epoch's are kept) and loses them when it has
    finished; a run that stops on an error or a kill keeps them. `resume_from_checkpoint` continues such a run:
    `"latest"` from the newest intact checkpoint in `checkpoint_dir` (`finetune_resume.find_resume_checkpoint`: from
    epoch 0 when there is none), or a checkpoint folder; the caller makes sure the run has the interrupted one's
    settings (`run_fine_tune` does). Without it, checkpoints an earlier run left in `checkpoint_dir` are removed first.
    `checkpoint_dir=None` is a temporary folder with the best epoch's weights only, which only works on one process
    (every process must read the best checkpoint back: on several, give a folder they all see). When the validation
    macro AUROC cannot be computed in any epoch (no class with both positives and negatives), no epoch is best: all
    epochs run and the last one is kept, as in `fit_linear_probe`.
    """
    if (adapter_dir is not None or merged_dir is not None) and arguments.finetune_method != "lora":
        raise ValueError(
            f"fine_tune: adapter_dir and merged_dir are for finetune_method 'lora', got {arguments.finetune_method!r}"
        )
    if merged_dir is not None and adapter_dir is None:
        raise ValueError("fine_tune: merged_dir needs adapter_dir (the adapter is saved before it is merged)")
    if resume_from_checkpoint is not None and checkpoint_dir is None:
        raise ValueError("fine_tune: resume_from_checkpoint needs checkpoint_dir, where the interrupted run saved")
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
    resume_path = (
        None
        if resume_from_checkpoint is None
        else find_resume_checkpoint(Path(checkpoint_dir), resume_from_checkpoint, launched_processes())
    )
    if resume_path is not None and not keyed:
        logger.warning(
            "%s: resumed without an ecg_id column, so the random crops after it come from a generator the checkpoint "
            "does not hold: the resumed run cuts other windows than an uninterrupted one",
            resume_path,
        )
    stopped_at = stopped_at_step(resume_path)
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
        # a run resumed from the checkpoint at which it had stopped trains no further step (the Trainer would train
        # one of another epoch before it reads the restored stop); it loads the best epoch and scores it
        **({"max_steps": stopped_at} if stopped_at is not None else {}),
        eval_strategy="epoch",
        save_strategy="epoch",  # where a resume continues; `load_best_model_at_end` keeps the best one too
        metric_for_best_model="macro_auroc",
        greater_is_better=True,
        load_best_model_at_end=True,
        save_only_model=temporary is not None,  # a temporary folder is never resumed: the best weights suffice
        save_total_limit=2,  # the newest two, or the newest and the best epoch's (which the Trainer never rotates out)
        restore_callback_states_from_checkpoint=True,  # the early-stopping counter, kept in trainer_state.json
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
    history = load_run_history(resume_path)
    meter.add_run_counts(history["throughput"])  # the run before the checkpoint
    resumed_at = history["resumed_at_steps"] + ([checkpoint_step(resume_path)] if resume_path is not None else [])
    flops_batch = MeritCollator(centre_crops, label_set=label_set, num_classes=len(names))(
        [train[index] for index in range(min(2, len(train)))]
    )
    save_steps = arguments.finetune_save_steps if temporary is None else None
    trainer = Trainer(
        model,
        training_arguments,
        data_collator=random_crops,
        train_dataset=train,
        eval_dataset=evaluation["validation"],
        compute_metrics=compute_metrics_for(names),
        callbacks=[
            DefinedMetricEarlyStoppingCallback(early_stopping_patience=arguments.finetune_patience),
            *([SaveStepsCallback(save_steps)] if save_steps else []),  # before ThroughputCallback reads should_save
            ThroughputCallback(meter, flops_batch, len(train)),
            *([CropEpochCallback(random_crops)] if keyed else []),
            *([RunHistoryCallback(meter, resumed_at)] if temporary is None else []),
        ],
    )
    output_dir = Path(training_arguments.output_dir)
    trainer.accelerator.wait_for_everyone()  # every process has chosen its checkpoint before any is removed
    if temporary is None and trainer.is_world_process_zero():
        # those after the checkpoint resumed from (interrupted or damaged), or all of an earlier run's
        remove_checkpoints_after(output_dir, -1 if resume_path is None else checkpoint_step(resume_path))
    trainer.accelerator.wait_for_everyone()
    finished = False
    try:
        trainer.train(resume_from_checkpoint=None if resume_path is None else str(resume_path))
        validation_logits = trainer.predict(evaluation["validation"]).predictions
        test_logits = trainer.predict(evaluation["test"]).predictions
        saved = {}
        if adapter_dir is not None and trainer.is_world_process_zero():
            saved = save_lora_classifier(trainer.model, feature_extractor, adapter_dir, merged_dir)
        finished = True
    finally:
        trainer.accelerator.wait_for_everyone()
        # an interrupted run keeps its checkpoints, to be resumed; a temporary folder goes in any case
        if trainer.is_world_process_zero() and (finished or temporary is not None):
            _remove_checkpoints(output_dir, whole=temporary is not None)
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
        **({"resumed_at_steps": resumed_at} if resumed_at else {}),
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


@dataclass
class FineTuneUnit:
    """One unit of a fine-tuning run (a label set, label fraction and seed), before anything trains: its encoder, data
    rows and labels, the protocol and dataset entries its results file will hold, and its `settings`
    (`finetune_resume.unit_settings`), which a resume compares with what an earlier run left."""

    encoder: MeritEcgModel
    identity: dict[str, Any]
    feature_extractor: MeritFeatureExtractor
    names: list[str]
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    protocol: dict[str, Any]
    dataset_extra: dict[str, Any]
    settings: dict[str, Any]

    @property
    def roles(self) -> tuple[str, ...]:
        return ("model", "baseline") if self.settings["baseline"] else ("model",)


def fine_tune_protocol(arguments: ProbeArguments, feature_extractor: MeritFeatureExtractor, precision: str) -> dict:
    """The `protocol` entry of a fine-tuning results file (`probe_protocol` with the fine-tuning settings)."""
    return probe_protocol(
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
        mixed_precision=precision,  # the same for the baseline
        **({"lora": arguments.lora_options()} if arguments.finetune_method == "lora" else {}),
        weight_decay=WEIGHT_DECAY,
        learning_rate=arguments.finetune_learning_rate,
        max_epochs=arguments.finetune_max_epochs,
        patience=arguments.finetune_patience,
        batch_size=arguments.batch_size,
        feature_extractor=feature_extractor_settings(feature_extractor),
    )


def plan_fine_tune(
    model_or_path,
    dataset_dict,
    label_set: str,
    label_fraction: float,
    seed: int,
    baseline: bool,
    feature_extractor: MeritFeatureExtractor | None,
    arguments: ProbeArguments,
) -> FineTuneUnit:
    """Everything of a unit that is known before it trains (`FineTuneUnit`)."""
    encoder, model_name = load_encoder(model_or_path)
    feature_extractor = feature_extractor or load_feature_extractor(model_or_path, encoder)
    names = label_names(dataset_dict["train"], label_set)
    rows = probe_rows(dataset_dict, label_set, label_fraction, seed)
    labels = {split: label_matrix(dataset_dict[split], label_set)[rows[split]] for split in SPLITS}
    identity = encoder_identity("model", model_name, seed, encoder)  # before training: the weights it started from
    precision, _ = finetune_precision_arguments(arguments.mixed_precision, arguments.use_cpu)
    protocol = fine_tune_protocol(arguments, feature_extractor, precision)
    dataset_extra = {**dataset_info(dataset_dict, label_set, rows), **dataset_description(arguments)}
    settings = unit_settings(
        task="fine-tune",
        label_set=label_set,
        label_names=names,
        label_fraction=label_fraction,
        seed=seed,
        protocol=protocol,
        dataset=results_dataset(dataset_dict, dataset_extra),
        ecg_encoder=identity["weights_fingerprint"]["ecg_encoder"],
        num_processes=launched_processes(),
        baseline=baseline,
        merged_model=arguments.merge_lora,
    )
    return FineTuneUnit(encoder, identity, feature_extractor, names, rows, labels, protocol, dataset_extra, settings)


def check_fine_tune_resumable(
    model_or_path,
    dataset_dict,
    label_set: str,
    label_fraction: float,
    seed: int,
    feature_extractor: MeritFeatureExtractor | None,
    arguments: ProbeArguments,
    output_file: str | Path,
) -> None:
    """Refuse now, before anything trains, a unit that `run_fine_tune` with `--resume_from_checkpoint` would refuse
    later: a results file or an interrupted fine-tune of other settings (`finetune_resume.finished_unit`). The
    command checks every unit of its run with it first."""
    unit = plan_fine_tune(model_or_path, dataset_dict, label_set, label_fraction, seed, arguments.baseline,
                          feature_extractor, arguments)  # fmt: skip
    finished_unit(Path(output_file), unit.settings, unit.roles)


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
) -> EvaluationResults:
    """Fine-tuning (`MeritForEcgClassification`, every weight or LoRA as `arguments.finetune_method` says) of the
    encoder and of its random-init twin; same arguments and results layout as `run_linear_probe`. A LoRA run with an
    `output_file` saves the encoder's adapter and head beside it (`lora_output_dirs`); the baseline's adapter is not
    kept (its base is a random draw, not a checkpoint).

    With an `output_file`, each role keeps its settings, checkpoints and, once scored, its results entry in
    `<run>_<role>_checkpoints/` beside it until the results file is written (`finetune_resume`).
    `arguments.resume_from_checkpoint="latest"` continues an interrupted run: it returns the results file when an
    earlier run finished it with these settings, keeps a role finished with them, and continues a role left half-done
    from its newest intact checkpoint; it refuses a results file or a role folder of other settings."""
    arguments = arguments or ProbeArguments(mode="finetune")
    check_evaluation_counts(num_bootstrap=arguments.num_bootstrap)  # now, not after the fine-tune (if set since)
    if arguments.merge_lora and output_file is None:
        raise ValueError("run_fine_tune: merge_lora writes the merged model beside output_file; give output_file")
    resume = arguments.resume_from_checkpoint is not None
    if resume and output_file is None:
        raise ValueError(
            "run_fine_tune: resume_from_checkpoint continues the fine-tunes whose checkpoints lie beside output_file; "
            "give output_file"
        )
    unit = plan_fine_tune(
        model_or_path, dataset_dict, label_set, label_fraction, seed, baseline, feature_extractor, arguments
    )
    if resume and (finished := finished_unit(Path(output_file), unit.settings, unit.roles)) is not None:
        logger.info("%s: finished by an earlier run with these settings; kept, not run again", output_file)
        if is_first_launched_process():
            remove_role_folders(Path(output_file))  # left by a run stopped after writing the results
        return finished
    encoders = {"model": unit.encoder}
    if baseline:
        encoders["baseline"] = random_init_like(unit.encoder, seed)
    entries = {}
    for role, role_encoder in encoders.items():
        folder = None if output_file is None else role_checkpoint_dir(output_file, role)
        entry = finished_role_entry(folder) if resume else None  # on every process; only the first writes
        if entry is None and folder is not None and is_first_launched_process():
            start_role(folder, unit.settings, resume)
        if entry is not None:
            logger.info("%s: the %s fine-tune finished with these settings; kept, not trained again", folder, role)
            entries[role] = entry
            continue
        saved_dirs = lora_output_dirs(output_file, arguments) if role == "model" else {}
        validation_logits, test_logits, training = fine_tune(
            role_encoder, unit.feature_extractor, dataset_dict, label_set, unit.rows, arguments, seed, folder,
            **saved_dirs, resume_from_checkpoint="latest" if resume else None,
        )  # fmt: skip
        scores = evaluate_scores(
            unit.labels["test"], test_logits, unit.labels["validation"], validation_logits, unit.names,
            arguments.num_bootstrap, seed,
        )  # fmt: skip
        scores["training"] = training
        entries[role] = {
            **(
                fine_tuned_identity(unit.identity, training)
                if role == "model"
                else encoder_identity(role, unit.identity["name_or_path"], seed)
            ),
            **scores,
        }
        if folder is not None and is_first_launched_process():
            finish_role(folder, entries[role])
    results = build_results(
        task="fine-tune",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=unit.names,
        label_fraction=label_fraction,
        seed=seed,
        protocol=unit.protocol,
        **entries,  # model, and baseline when it ran
        dataset_extra=unit.dataset_extra,
    )
    if output_file is not None and is_first_launched_process():  # one writer: every process has the same results
        write_results(results, output_file)
        remove_role_folders(Path(output_file))
    return results
