"""`transformers.Trainer` with default arguments fine-tunes `MeritForEcgClassification`, reports the project's
metrics, saves the feature extractor, and its output folder passes `hub push`'s checks; the probe protocol's
fine-tuning (`merit_hf.training.finetune`) runs on the same Trainer, with early stopping and the best epoch kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerState,
    TrainingArguments,
)

from merit_hf import MeritEcgModel, MeritFeatureExtractor, MeritForEcgClassification, MeritForPreTraining
from merit_hf.data import MeritCollator, build_ptbxl, label_names
from merit_hf.evaluation.metrics import macro_auroc
from merit_hf.evaluation.probe import ProbeArguments, label_matrix, probe_rows
from merit_hf.hub import check_model_folder
from merit_hf.hub.push import MISSING_MODEL_CARD
from merit_hf.training import finetune
from merit_hf.training.classification import add_trainer_columns, compute_metrics_for
from tests.conftest import BUNDLED_PTBXL, tiny_ecg_config, tiny_merit_config
from tests.test_eval_probe import synthetic_ptbxl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    MeritForPreTraining(tiny_merit_config()).save_pretrained(pretrained)
    ptbxl = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 121))
    names = label_names(ptbxl, "superclass")
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_merit_config().ecg_config)
    model = MeritForEcgClassification.from_pretrained(
        pretrained, id2label=dict(enumerate(names)), label2id={name: index for index, name in enumerate(names)}
    )
    data = add_trainer_columns(ptbxl, feature_extractor, "superclass")
    arguments = TrainingArguments(  # only what a tiny CPU run needs; remove_unused_columns keeps its default (True)
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no", logging_steps=2,
    )  # fmt: skip
    trainer = Trainer(
        model,
        arguments,
        data_collator=MeritCollator(feature_extractor),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=feature_extractor,
        compute_metrics=compute_metrics_for(names),
    )
    before = {name: value.clone() for name, value in model.named_parameters()}
    trainer.train()
    trainer.save_model()
    return trainer, data, names, before, tmp_path / "run"


@pytest.mark.slow  # a real Trainer run end to end (about 25 s on 2 shared cores)
def test_trainer_trains_with_default_arguments_and_reports_the_project_metrics(trained):
    trainer, data, names, before, _ = trained
    assert trainer.args.remove_unused_columns is True
    assert trainer.state.global_step == 4
    changed = [name for name, value in trainer.model.named_parameters() if not torch.equal(value, before[name])]
    assert "classifier.weight" in changed and any(name.startswith("ecg_model.layers") for name in changed)
    metrics = trainer.evaluate()
    assert {f"eval_auroc_{name}" for name in names} <= set(metrics)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(data["validation"]["ecg_values"]))).logits.numpy()
    labels = np.asarray(data["validation"]["labels"])
    assert metrics["eval_macro_auroc"] == pytest.approx(macro_auroc(labels, logits), abs=1e-6)
    assert "eval_macro_f1_max_over_thresholds" in metrics


@pytest.mark.slow
def test_trainer_output_loads_and_passes_the_push_checks(trained):
    trainer, data, names, _, folder = trained
    assert (folder / "preprocessor_config.json").is_file() and (folder / "training_args.bin").is_file()
    problems = check_model_folder(folder)
    assert problems == [MISSING_MODEL_CARD]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    feature_extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    assert feature_extractor.to_dict() == trainer.processing_class.to_dict()
    assert [model.config.id2label[index] for index in range(len(names))] == names
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")  # real pickled weights are still refused
    (folder / "preprocessor_config.json").rename(folder / "preprocessor_config.json.away")
    try:
        problems = check_model_folder(folder)
        assert (
            "pickled weights ['pytorch_model.bin'] (merit_hf loads safetensors only; re-save with save_pretrained)"
            in (problems)
        )
        assert any(problem.startswith("preprocessor_config.json is missing") for problem in problems)
    finally:
        (folder / "pytorch_model.bin").unlink()
        (folder / "preprocessor_config.json.away").rename(folder / "preprocessor_config.json")


# ----------------------------------------------------------------------------------------------------------------------
# The probe protocol's fine-tuning on the Trainer (tiny encoder, synthetic records: seconds)
# ----------------------------------------------------------------------------------------------------------------------
def tiny_encoder(seed: int = 123):
    """A one-layer encoder at the synthetic records' own rate and length (no resampling, a 9 s crop of 10 s)."""
    torch.manual_seed(seed)
    config = tiny_ecg_config(sampling_rate=100, num_samples=900, patch_size=50, num_hidden_layers=1)
    encoder = MeritEcgModel(config)
    return encoder, MeritFeatureExtractor.from_model_config(config)


def recording_compute_metrics(monkeypatch) -> list[float]:
    """The macro AUROC of every `compute_metrics` call of `fine_tune`'s Trainer, in order: one per epoch on
    validation, then the two final `predict` calls (validation, test)."""
    recorded = []

    def recording(names, **kwargs):
        compute = compute_metrics_for(names, **kwargs)

        def compute_and_record(prediction):
            metrics = compute(prediction)
            recorded.append(metrics["macro_auroc"])
            return metrics

        return compute_and_record

    monkeypatch.setattr(finetune, "compute_metrics_for", recording)
    return recorded


@pytest.mark.slow
def test_fine_tune_keeps_the_best_epoch_and_stops_after_patience(monkeypatch, tmp_path):
    recorded = recording_compute_metrics(monkeypatch)
    data = synthetic_ptbxl(sizes=(16, 8, 6))
    rows = probe_rows(data, "superclass")
    encoder, feature_extractor = tiny_encoder()
    arguments = ProbeArguments(
        mode="finetune", batch_size=8, finetune_learning_rate=3e-3, finetune_max_epochs=5, finetune_patience=1
    )
    validation_logits, test_logits, training = finetune.fine_tune(
        encoder, feature_extractor, data, "superclass", rows, arguments, seed=0, checkpoint_dir=tmp_path / "run"
    )
    epochs = recorded[: training["epochs_run"]]
    assert len(recorded) == training["epochs_run"] + 2
    assert training["best_epoch"] == int(np.argmax(epochs)) + 1 < training["epochs_run"]  # not simply the last epoch
    assert training["epochs_run"] == min(5, training["best_epoch"] + 1)
    validation_labels = label_matrix(data["validation"].select(rows["validation"]), "superclass")
    assert macro_auroc(validation_labels, validation_logits) == pytest.approx(max(epochs), abs=1e-9)
    assert test_logits.shape == (len(rows["test"]), 5) and test_logits.dtype == np.float32
    assert not (tmp_path / "run").exists()  # the Trainer's checkpoints are removed
    assert (training["num_processes"], training["global_batch_size"]) == (1, 8)  # the batch each step really trained


@pytest.mark.slow
def test_fine_tune_without_improvement_stops_at_epoch_one_plus_patience(monkeypatch):
    recorded = recording_compute_metrics(monkeypatch)
    data = synthetic_ptbxl(sizes=(8, 6, 6))
    encoder, feature_extractor = tiny_encoder()
    arguments = ProbeArguments(  # a step of 1e-30 is below every weight's rounding (0 is refused): every epoch
        mode="finetune", batch_size=8, finetune_learning_rate=1e-30, finetune_max_epochs=10, finetune_patience=1
    )  # scores the same, so only epoch 1 is ever best
    *_, training = finetune.fine_tune(encoder, feature_extractor, data, "superclass", probe_rows(data, "superclass"),
                                      arguments)  # fmt: skip
    assert (training["best_epoch"], training["epochs_run"]) == (1, 2)
    assert len(set(recorded[:2])) == 1


@pytest.mark.slow
def test_fine_tune_is_reproducible_under_its_seed():
    data = synthetic_ptbxl(sizes=(8, 6, 6))
    rows = probe_rows(data, "superclass")
    arguments = ProbeArguments(mode="finetune", batch_size=8, finetune_learning_rate=1e-3, finetune_max_epochs=1)

    def test_logits(seed: int) -> np.ndarray:
        encoder, feature_extractor = tiny_encoder()
        return finetune.fine_tune(encoder, feature_extractor, data, "superclass", rows, arguments, seed=seed)[1]

    first = test_logits(0)
    np.testing.assert_array_equal(first, test_logits(0))
    assert not np.allclose(first, test_logits(1))  # head initialisation, shuffling and crops follow the seed


def test_fine_tune_crops_randomly_in_training_and_centrally_in_evaluation():
    encoder, feature_extractor = tiny_encoder()
    random_crops = finetune.with_crop(feature_extractor, "random", seed=3)
    assert (random_crops.crop, random_crops.seed, feature_extractor.crop) == ("random", 3, "center")
    signal = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)  # longer than the window
    leads = feature_extractor.lead_names

    def crops(extractor, times: int) -> list[np.ndarray]:
        return [extractor(signal, sampling_rate=100, lead_names=leads)["ecg_values"] for _ in range(times)]

    first, second = crops(random_crops, 2)
    assert not np.array_equal(first, second)
    again = crops(finetune.with_crop(feature_extractor, "random", seed=3), 2)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])
    centre = crops(finetune.with_crop(random_crops, "center"), 1)[0]
    np.testing.assert_array_equal(centre, crops(feature_extractor, 1)[0])


@pytest.mark.slow
def test_fine_tune_without_a_defined_validation_auroc_runs_every_epoch_and_keeps_the_last():
    """One validation record: no class has both a positive and a negative there, so the macro AUROC is NaN in every
    epoch and nothing can stop training, as in `fit_linear_probe` (before: early stopping counted the NaN epochs
    against its patience and stopped at epoch 1 + patience)."""
    data = synthetic_ptbxl(sizes=(8, 1, 6))
    encoder, feature_extractor = tiny_encoder()
    arguments = ProbeArguments(
        mode="finetune", batch_size=8, finetune_learning_rate=1e-3, finetune_max_epochs=4, finetune_patience=1
    )
    *_, training = finetune.fine_tune(encoder, feature_extractor, data, "superclass", probe_rows(data, "superclass"),
                                      arguments)  # fmt: skip
    assert (training["best_epoch"], training["epochs_run"]) == (4, 4)


def test_trainer_columns_leave_out_records_without_a_label_of_the_set():
    """`add_trainer_columns` keeps the probe protocol's rows (`probe_rows`): a record with no class of the set is left
    out of every split, not trained and scored as negative for every class (before: 5 of ecg_id 1-40 stayed, with
    all-zero targets; for PTB-XL `form`, 65 % of the training records)."""
    ptbxl = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 41))
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_merit_config().ecg_config)
    data = add_trainer_columns(ptbxl, feature_extractor, "superclass")
    rows = probe_rows(ptbxl, "superclass")
    assert sum(len(ptbxl[split]) - len(rows[split]) for split in rows) > 0  # the sample has unlabeled records
    for split, kept in rows.items():
        assert data[split]["ecg_id"] == ptbxl[split].select(kept)["ecg_id"]
        assert np.asarray(data[split]["labels"]).sum(axis=1).min() >= 1


@pytest.mark.parametrize("model_class", [MeritForEcgClassification, MeritForPreTraining])
def test_gradient_accumulation_under_trainer_gives_the_update_of_the_whole_batch(model_class, tmp_path):
    """MERIT's losses are batch means and take no `num_items_in_batch` (`accepts_loss_kwargs = False`): one SGD step
    of 4 records equals one step of 2 x 2 accumulated; before, `Trainer` skipped its division by the accumulation
    steps (it saw `**kwargs` in `forward`), which doubled the update and the logged loss."""
    torch.manual_seed(0)
    values = torch.randn(4, 12, tiny_ecg_config().num_samples)
    rows = [{"ecg_values": values[index], "labels": torch.tensor([1.0, 0.0])} for index in range(4)]
    if model_class is MeritForPreTraining:
        rows = [{"ecg_values": row["ecg_values"]} for row in rows]  # reconstruction only: no text needed

    def one_step(batch_size: int, accumulation: int) -> tuple[torch.Tensor, float]:
        torch.manual_seed(1)
        config = tiny_merit_config(reconstruction_weight=1.0, contrastive_weight=0.0)
        config.ecg_config.hidden_dropout_prob = config.ecg_config.attention_probs_dropout_prob = 0.0
        if model_class is MeritForEcgClassification:
            config.id2label = {0: "A", 1: "B"}
        model = model_class(config)
        before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
        arguments = TrainingArguments(
            str(tmp_path / f"run{batch_size}"), max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd", max_grad_norm=0.0,
            lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
            dataloader_drop_last=False,
        )  # fmt: skip
        noise = torch.rand(4, 12, config.ecg_config.num_patches_per_lead, generator=torch.Generator().manual_seed(2))

        def collate(batch):
            start = next(index for index, row in enumerate(rows) if row["ecg_values"] is batch[0]["ecg_values"])
            stacked = {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
            if model_class is MeritForPreTraining:
                stacked["noise"] = noise[start : start + len(batch)]
            return stacked

        trainer = Trainer(model, arguments, data_collator=collate, train_dataset=rows)
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
        return after - before, trainer.state.log_history[0]["loss"]

    whole, whole_loss = one_step(4, 1)
    accumulated, accumulated_loss = one_step(2, 2)
    assert whole.norm() > 0
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)


def test_fine_tuning_crops_are_keyed_by_seed_epoch_and_ecg_id():
    """A record's random crop comes from `(seed, epoch, ecg_id)`: the same in any batch and in another process's
    collator, new in the next epoch (`CropEpochCallback`). One generator seeded with the seed per process made the
    crops depend on the number of processes, and every process cut the same windows."""
    rows = list(build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 12))["train"].with_format("numpy"))[:6]
    extractor = MeritFeatureExtractor(sampling_rate=100, num_samples=800, crop="random")  # 10 s records: 201 positions

    def collator():
        return MeritCollator(extractor, label_set="superclass", num_classes=5, crop_seed=3)

    one, other = collator(), collator()
    whole = one(rows)["ecg_values"]
    halves = torch.cat([other(rows[3:])["ecg_values"], other(rows[:3])["ecg_values"]])
    torch.testing.assert_close(torch.cat([halves[3:], halves[:3]]), whole, rtol=0, atol=0)
    callback = finetune.CropEpochCallback(one)
    callback.on_epoch_begin(None, TrainerState(epoch=0.0), None)
    assert torch.equal(one(rows)["ecg_values"], whole)
    callback.on_epoch_begin(None, TrainerState(epoch=1.0), None)
    second = one(rows)["ecg_values"]
    assert not torch.equal(second, whole)
    callback.on_epoch_begin(None, TrainerState(epoch=1.5), None)  # resumed half-way through epoch 1
    assert torch.equal(one(rows)["ecg_values"], second)
