"""Full fine-tuning of a MERIT encoder with a linear head (`MeritForEcgClassification`) under the probe protocol
(`merit_hf.evaluation.probe`), next to its random-init twin: `run_fine_tune` returns the same results layout as
`run_linear_probe`. Run it with `python -m merit_hf.training.probe --mode finetune`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.probe import (
    SPLITS,
    ProbeArguments,
    _dataset_description,
    _dataset_info,
    _validation_score,
    ecg_model_inputs,
    encoder_inputs,
    evaluate_scores,
    label_matrix,
    label_names,
    load_encoder,
    load_feature_extractor,
    probe_protocol,
    probe_rows,
    random_init_like,
)
from ..evaluation.results import build_results, encoder_identity, write_results
from ..models.merit.feature_extraction_merit import MeritFeatureExtractor
from ..models.merit.modeling_merit import MeritEcgModel, MeritForEcgClassification
from ..utils.throughput import ThroughputMeter

logger = logging.getLogger(__name__)


def _classifier_from(encoder: MeritEcgModel, names: Sequence[str]) -> MeritForEcgClassification:
    from ..models.merit.configuration_merit import MeritConfig

    config = MeritConfig(
        ecg_config=encoder.config.to_dict(),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
        problem_type="multi_label_classification",
    )
    model = MeritForEcgClassification(config)
    model.ecg_model.load_state_dict(encoder.state_dict())
    return model


@torch.no_grad()
def _predict(accelerator, model, feature_extractor, dataset, batch_size) -> np.ndarray:
    model.eval()
    logits = []
    columns = dataset.select_columns(["signal", "sampling_rate", "lead_names"])
    for start in range(0, len(dataset), batch_size):
        inputs = ecg_model_inputs(feature_extractor, columns[start : start + batch_size], crop="center")
        logits.append(model(**encoder_inputs(inputs, accelerator.device)).logits.float().cpu().numpy())
    return np.concatenate(logits)


def fine_tune(
    encoder: MeritEcgModel,
    feature_extractor: MeritFeatureExtractor,
    dataset_dict,
    label_set: str,
    rows: dict[str, np.ndarray],
    arguments: ProbeArguments,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Fine-tune encoder + head on `rows` of each split (`probe_rows`); returns `(validation_logits, test_logits,
    training_info)` of the best epoch."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    set_seed(seed)
    names = label_names(dataset_dict["train"], label_set)
    model = _classifier_from(encoder, names)
    train, validation, test = (dataset_dict[split].select(rows[split]) for split in SPLITS)
    train_labels = torch.as_tensor(label_matrix(train, label_set))
    validation_labels = label_matrix(validation, label_set)
    train_columns = train.select_columns(["signal", "sampling_rate", "lead_names"])
    random_crops = copy.deepcopy(feature_extractor)
    random_crops.set_crop_seed(seed)

    loader = torch.utils.data.DataLoader(range(len(train)), batch_size=arguments.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=arguments.finetune_learning_rate, fused=True)
    meter = ThroughputMeter(accelerator.device, num_processes=accelerator.num_processes, model=model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    best_score, best_state, best_epoch, stale, epoch = -np.inf, None, 0, 0, 0
    for epoch in range(1, arguments.finetune_max_epochs + 1):
        model.train()
        batches = tqdm(loader, desc=f"fine-tune epoch {epoch}", disable=not accelerator.is_main_process)
        for rows in meter.timed(batches):
            rows = rows.cpu().tolist()
            with meter.waiting():
                inputs = ecg_model_inputs(random_crops, train_columns[rows], crop="random")
            batch = {**encoder_inputs(inputs, accelerator.device), "labels": train_labels[rows].to(accelerator.device)}
            meter.count_flops_once(lambda batch: meter.model(**batch).loss, batch)
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad()
            meter.step(len(rows) * accelerator.num_processes)
        logger.info("fine-tune epoch %d: %s", epoch, meter.interval())
        with meter.excluded():
            score = _validation_score(
                validation_labels,
                _predict(accelerator, model, feature_extractor, validation, arguments.batch_size),
            )
        if best_state is None or score > best_score:  # a NaN score (one class in validation) still keeps a state
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
        else:
            stale += 1
            if stale >= arguments.finetune_patience:
                break
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best_state)
    validation_logits = _predict(accelerator, unwrapped, feature_extractor, validation, arguments.batch_size)
    test_logits = _predict(accelerator, unwrapped, feature_extractor, test, arguments.batch_size)
    training = {"best_epoch": best_epoch, "epochs_run": epoch, "throughput": meter.totals()}
    return validation_logits, test_logits, training


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
    """Full fine-tuning (`MeritForEcgClassification`) of the encoder and of its random-init twin; same arguments
    and results layout as `run_linear_probe`."""
    arguments = arguments or ProbeArguments(mode="finetune")
    encoder, model_name = load_encoder(model_or_path)
    feature_extractor = feature_extractor or load_feature_extractor(model_or_path, encoder)
    names = label_names(dataset_dict["train"], label_set)
    rows = probe_rows(dataset_dict, label_set, label_fraction, seed)
    labels = {split: label_matrix(dataset_dict[split], label_set)[rows[split]] for split in SPLITS}
    entries = {}
    encoders = {"model": encoder}
    if baseline:
        encoders["baseline"] = random_init_like(encoder, seed)
    for role, role_encoder in encoders.items():
        validation_logits, test_logits, training = fine_tune(
            role_encoder, feature_extractor, dataset_dict, label_set, rows, arguments, seed
        )
        scores = evaluate_scores(
            labels["test"], test_logits, labels["validation"], validation_logits, names, arguments.num_bootstrap, seed
        )
        scores["training"] = training
        entries[role] = {
            **encoder_identity(role, model_name, seed),
            **scores,
        }
    protocol = probe_protocol(
        arguments,
        features="end to end: MeritForEcgClassification (encoder + linear head on pooler_output)",
        head="linear head, BCE, AdamW; random crop in training, centre crop in evaluation",
        learning_rate=arguments.finetune_learning_rate,
        max_epochs=arguments.finetune_max_epochs,
        patience=arguments.finetune_patience,
        batch_size=arguments.batch_size,
    )
    results = build_results(
        task="fine-tune",
        dataset_dict=dataset_dict,
        label_set=label_set,
        label_names=names,
        label_fraction=label_fraction,
        seed=seed,
        protocol=protocol,
        model=entries["model"],
        baseline=entries.get("baseline"),
        dataset_extra={**_dataset_info(dataset_dict, label_set, rows), **_dataset_description(arguments)},
    )
    if output_file is not None:
        write_results(results, output_file)
    return results
