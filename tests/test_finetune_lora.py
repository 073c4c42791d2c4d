"""PEFT LoRA on `MeritForEcgClassification` as a user writes it (`get_peft_model`, `save_pretrained`,
`PeftModel.from_pretrained`, `AutoPeftModelForSequenceClassification`, `merge_and_unload`), and the probe command's
`--finetune_method lora` (`merit_hf.training.finetune`, `merit_hf.training.classifier_lora`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from merit_hf import MeritFeatureExtractor, MeritForEcgClassification, MeritForPreTraining
from merit_hf.data.collator import precompute_ecg_values
from merit_hf.evaluation.metrics import macro_auroc
from merit_hf.evaluation.probe import ProbeArguments, label_matrix, load_dataset_dict, probe_rows
from merit_hf.hub import check_model_folder
from merit_hf.training import finetune
from merit_hf.training.classifier_lora import add_lora, parameter_counts
from merit_hf.training.probe import main
from tests.conftest import BUNDLED_PTBXL, tiny_merit_config
from tests.test_eval_probe import synthetic_ptbxl
from tests.test_trainer_classification import tiny_encoder

ID2LABEL = {0: "CD", 1: "HYP", 2: "MI", 3: "NORM", 4: "STTC"}
TARGETS = ["qkv", "proj", "fc1", "fc2"]
# The bundled records' own rate and length: nothing to resample, short sequences (20 patches per lead).
TINY_ECG = {"sampling_rate": 100, "num_samples": 1000, "patch_size": 50}


def user_lora_config(**overrides) -> LoraConfig:
    """What a user writes: the encoder's attention and MLP linears, the head trained whole."""
    values = {"task_type": TaskType.SEQ_CLS, "r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    values["modules_to_save"] = ["classifier"]
    values.update(overrides)
    return LoraConfig(**values)


def lora_parameter_count(config, rank: int, num_labels: int) -> int:
    """Adapters (A: rank x in, B: out x rank) on qkv, proj, fc1, fc2 of every layer, plus the whole head."""
    hidden, inner = config.hidden_size, config.intermediate_size
    per_layer = rank * ((hidden + 3 * hidden) + (hidden + hidden) + (hidden + inner) + (inner + hidden))
    return config.num_hidden_layers * per_layer + hidden * num_labels + num_labels


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A pretraining checkpoint (what users start from) of a tiny MERIT."""
    folder = tmp_path_factory.mktemp("lora") / "pretrained"
    torch.manual_seed(0)
    MeritForPreTraining(tiny_merit_config(TINY_ECG)).save_pretrained(folder)
    return folder


def load_classifier(base_checkpoint) -> MeritForEcgClassification:
    return MeritForEcgClassification.from_pretrained(base_checkpoint, id2label=ID2LABEL)


def batch(seed: int = 1, size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(size, 12, TINY_ECG["num_samples"], generator=generator)
    return values, (torch.rand(size, len(ID2LABEL), generator=generator) > 0.5).float()


def logits_of(model, values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ecg_values=values).logits


@pytest.fixture(scope="module")
def adapted(base_checkpoint, tmp_path_factory):
    """A LoRA classifier trained a few AdamW steps (weight decay on), saved as an adapter."""
    torch.manual_seed(0)
    model = get_peft_model(load_classifier(base_checkpoint), user_lora_config())
    frozen_before = {name: value.clone() for name, value in model.named_parameters() if not value.requires_grad}
    values, labels = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(ecg_values=values, labels=labels).loss.backward()
        optimizer.step()
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(adapter)
    return model, frozen_before, adapter


def test_lora_trains_only_the_adapters_and_the_head(adapted, base_checkpoint):
    model, frozen_before, _ = adapted
    trainable = [name for name, value in model.named_parameters() if value.requires_grad]
    assert trainable and all(
        (".lora_A." in name or ".lora_B." in name)
        and ".ecg_model.layers." in name
        or ".classifier.modules_to_save." in name
        for name in trainable
    ), trainable
    for target in TARGETS:  # every target in every layer is adapted
        assert (
            sum(f".{target}.lora_B." in name for name in trainable)
            == tiny_merit_config(TINY_ECG).ecg_config.num_hidden_layers
        )
    counts = parameter_counts(model)
    assert counts["trainable_parameters"] == lora_parameter_count(
        tiny_merit_config(TINY_ECG).ecg_config, 4, len(ID2LABEL)
    )
    assert counts["total_parameters"] == sum(parameter.numel() for parameter in model.parameters())
    for name, value in model.named_parameters():  # the base weights (and the original head) never moved
        if not value.requires_grad:
            assert torch.equal(value, frozen_before[name]), name
    assert any(".lora_B." in name and value.abs().sum() > 0 for name, value in model.named_parameters())


def test_adapter_holds_only_the_adapters_and_the_head_and_is_small(adapted, base_checkpoint):
    _, _, adapter = adapted
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(".lora_A." in key or ".lora_B." in key or "classifier." in key for key in keys), keys
    assert "base_model.model.classifier.weight" in keys  # the trained head, saved whole
    base_size = (base_checkpoint / "model.safetensors").stat().st_size
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.25 * base_size
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_checkpoint) and config["task_type"] == "SEQ_CLS"


def test_adapter_reloads_on_its_base_with_peft_and_auto_peft(adapted, base_checkpoint):
    model, _, adapter = adapted
    values, _ = batch(seed=2)
    expected = logits_of(model, values)
    reloaded = PeftModel.from_pretrained(load_classifier(base_checkpoint), adapter)
    torch.testing.assert_close(logits_of(reloaded, values), expected, atol=0, rtol=0)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(adapter, trust_remote_code=True, id2label=ID2LABEL)
    torch.testing.assert_close(logits_of(auto, values), expected, atol=0, rtol=0)


def test_merge_and_unload_gives_a_plain_classifier_with_the_same_outputs(adapted, base_checkpoint, tmp_path):
    _, _, adapter = adapted
    values, _ = batch(seed=3)
    adapted_model = PeftModel.from_pretrained(load_classifier(base_checkpoint), adapter)
    expected = logits_of(adapted_model, values)
    merged = adapted_model.merge_and_unload()
    assert type(merged) is MeritForEcgClassification
    assert set(merged.state_dict()) == set(load_classifier(base_checkpoint).state_dict())
    torch.testing.assert_close(logits_of(merged, values), expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    torch.testing.assert_close(logits_of(loaded, values), logits_of(merged, values), atol=0, rtol=0)


def test_lora_gradients_are_the_same_with_activation_checkpointing(base_checkpoint):
    """`get_peft_model` calls `enable_input_require_grads` on a checkpointed model (`get_input_embeddings`: the patch
    projection), so reentrant checkpointing of frozen layers still passes gradients to every adapter."""
    values, labels = batch()
    gradients = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_classifier(base_checkpoint)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model = get_peft_model(model, user_lora_config(init_lora_weights=False))  # B != 0: A gets gradients too
        model.train()
        model(ecg_values=values, labels=labels).loss.backward()
        gradients[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients[True].values())
    for name, gradient in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], gradient, atol=1e-6, rtol=1e-5)


def test_text_model_inputs_from_the_peft_wrapper_are_refused_by_name(base_checkpoint):
    model = get_peft_model(load_classifier(base_checkpoint), user_lora_config())
    values, _ = batch()
    with pytest.raises(ValueError, match=r"not \['input_ids'\].*peft_model\(ecg_values=\.\.\., labels=\.\.\.\)"):
        model(values)  # PeftModelForSequenceClassification passes it on as input_ids
    with pytest.raises(ValueError, match=r"\(padding as ecg_attention_mask\), not \['attention_mask'\]"):
        model(ecg_values=values, attention_mask=torch.ones(3, values.shape[-1]))
    with pytest.raises(ValueError, match="ecg_values is required"):
        load_classifier(base_checkpoint)()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "linear", "finetune_method": "lora"}, "finetune_method 'lora' trains adapters, which needs --mode"),
        ({"mode": "finetune", "lora_r": 4}, r"lora_r: set, but finetune_method is 'full'"),
        ({"mode": "linear", "merge_lora": True}, r"merge_lora: set, but finetune_method is 'full'"),
        ({"mode": "finetune", "lora_target_modules": ["qkv"]}, "lora_target_modules: set, but finetune_method"),
        ({"mode": "finetune", "finetune_method": "qlora"}, r"finetune_method: must be one of \('full', 'lora'\)"),
        ({"mode": "finetune", "finetune_method": "lora", "lora_r": 0}, "lora_r: must be >= 1, got 0"),
        ({"mode": "finetune", "finetune_method": "lora", "lora_dropout": 1.0}, r"lora_dropout: must be in \[0, 1\)"),
        ({"mode": "finetune", "finetune_method": "lora", "lora_alpha": 0}, "lora_alpha: must be > 0"),
        ({"mode": "finetune", "finetune_method": "lora", "lora_target_modules": []}, "name at least one linear"),
    ],
)
def test_lora_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ProbeArguments(**settings)


def test_lora_flags_with_the_linear_probe_are_refused_on_the_command_line():
    with pytest.raises(ValueError, match=r"lora_r, lora_alpha: set, but finetune_method is 'full'"):
        main(["--model_name_or_path", "unused", "--lora_r", "4", "--lora_alpha", "8"])


# A Python without peft (merit_hf's `report` extra): every finder is told to find no `peft`, as in an environment
# that never installed it; then what a plain `pip install merit_hf` runs.
_WITHOUT_PEFT = r"""
import importlib.util, json, sys

class WithoutPeft:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "peft" or name.startswith("peft."):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [WithoutPeft(finder) for finder in sys.meta_path]
assert importlib.util.find_spec("peft") is None
import merit_hf.training.probe
from merit_hf.evaluation.probe import ProbeArguments
from merit_hf.training.classifier_lora import parameter_counts
from torch import nn

ProbeArguments(mode="finetune")  # full fine-tuning needs no peft
try:
    ProbeArguments(mode="finetune", finetune_method="lora")
    refusal = None
except ImportError as error:
    refusal = str(error)
print(json.dumps({"peft_imported": "peft" in sys.modules, "counts": parameter_counts(nn.Linear(2, 3)),
                  "refusal": refusal}))
"""


def test_the_probe_command_and_full_fine_tuning_run_without_peft():
    """peft is the `report` extra, so a plain `pip install merit_hf` has none: the probe command (linear probe and
    full fine-tuning, and the quick-start's probe step, which imports it) must import without it, and LoRA must say
    which extra to install when its settings are read, before any data is loaded."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_PEFT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peft_imported"] is False
    assert result["counts"] == {"trainable_parameters": 9, "total_parameters": 9}
    assert result["refusal"] == (
        "finetune_method 'lora' needs peft, merit_hf's `report` extra: pip install 'merit_hf[report]' (or pip install "
        "'peft>=0.17')"
    )


@pytest.mark.parametrize(
    "targets, message",
    [
        (["query"], r"'query' matches no linear layer of the encoder; its linear layers are \['fc1', 'fc2', "),
        (["qkv", "classifier"], "'classifier' is the head, which is trained whole"),
    ],
)
def test_lora_targets_must_name_linear_layers_of_the_encoder(base_checkpoint, targets, message):
    arguments = ProbeArguments(mode="finetune", finetune_method="lora", lora_target_modules=targets)
    with pytest.raises(ValueError, match=message):
        add_lora(load_classifier(base_checkpoint), arguments)


def test_adapter_folders_are_for_lora_runs_only(tmp_path):
    arguments = ProbeArguments(mode="finetune")
    with pytest.raises(ValueError, match="adapter_dir and merged_dir are for finetune_method 'lora', got 'full'"):
        finetune.fine_tune(None, None, None, "superclass", {}, arguments, adapter_dir=tmp_path)
    lora = ProbeArguments(mode="finetune", finetune_method="lora", merge_lora=True)
    with pytest.raises(ValueError, match="merge_lora writes the merged model beside output_file"):
        finetune.run_fine_tune(None, None, arguments=lora)


def test_lora_fine_tune_leaves_the_encoder_weights_and_trains_less():
    data = synthetic_ptbxl(sizes=(8, 6, 6))
    rows = probe_rows(data, "superclass")
    encoder, feature_extractor = tiny_encoder()
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    trained = {}
    for method in ("full", "lora"):
        arguments = ProbeArguments(
            mode="finetune", finetune_method=method, batch_size=8, finetune_learning_rate=1e-2, finetune_max_epochs=1
        )
        *_, trained[method] = finetune.fine_tune(encoder, feature_extractor, data, "superclass", rows, arguments)
    assert all(torch.equal(value, before[name]) for name, value in encoder.state_dict().items())
    assert trained["lora"]["method"] == "lora" and trained["full"]["method"] == "full"
    # peft's total holds the base with its original head, the adapters and the head's trained copy (parameter_counts)
    assert (
        trained["lora"]["total_parameters"]
        == trained["full"]["total_parameters"] + trained["lora"]["trainable_parameters"]
    )
    assert trained["lora"]["trainable_parameters"] == lora_parameter_count(encoder.config, 8, 5)
    classifier = finetune._classifier_from(encoder, list(ID2LABEL.values()))  # every weight but the sin-cos table
    assert trained["full"]["trainable_parameters"] == sum(
        p.numel() for p in classifier.parameters() if p.requires_grad
    )
    assert trained["full"]["total_parameters"] == sum(p.numel() for p in classifier.parameters())


@pytest.mark.slow  # the command end to end on the bundled records (10-15 s on 2 shared cores)
def test_probe_command_fine_tunes_with_lora_and_saves_adapter_and_merged_model(base_checkpoint, tmp_path):
    output = tmp_path / "results"
    summary = main(
        ["--model_name_or_path", str(base_checkpoint), "--dataset", str(BUNDLED_PTBXL), "--mode", "finetune",
         "--finetune_method", "lora", "--lora_r", "4", "--lora_alpha", "8", "--merge_lora", "true",
         "--finetune_max_epochs", "2", "--finetune_learning_rate", "1e-3", "--batch_size", "32",
         "--num_bootstrap", "0", "--baseline", "false", "--use_cpu", "true", "--output_dir", str(output)]
    )  # fmt: skip
    name = "fine-tune-lora_superclass_1_seed0"
    assert set(summary) == {name}
    results = json.loads((output / f"{name}.json").read_text())
    assert results["task"] == "fine-tune" and results["protocol"]["finetune_method"] == "lora"
    assert results["protocol"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": TARGETS}
    training = results["model"]["training"]
    ecg_config = tiny_merit_config(TINY_ECG).ecg_config
    assert training["method"] == "lora"
    assert training["trainable_parameters"] == lora_parameter_count(ecg_config, 4, len(ID2LABEL))
    adapter, merged = output / f"{name}_model_adapter", output / f"{name}_model_merged"
    assert (training["adapter_dir"], training["merged_dir"]) == (str(adapter), str(merged))
    assert {"adapter_model.safetensors", "adapter_config.json", "preprocessor_config.json"} <= {
        path.name for path in adapter.iterdir()
    }
    assert not (output / f"{name}_model_checkpoints").exists()
    # the weights the numbers are of: the encoder it started from, the adapter, the merged model's encoder
    assert set(results["model"]["weights_fingerprint"]) == {"ecg_encoder", "adapter", "fine_tuned_ecg_encoder"}
    from merit_hf.evaluation.results import read_results
    from merit_hf.hub.cards import check_weights

    run = read_results(output / f"{name}.json")
    assert len(check_weights([run], merged).matched) == len(check_weights([run], adapter).matched) == 1
    assert len(check_weights([run], base_checkpoint).matched) == 1  # the encoder it started from: its card's numbers
    # `hub push` would take the merged folder once it has a card; the adapter once its base is a Hub id
    assert [problem.split(" ")[0] for problem in check_model_folder(merged)] == ["README.md"]
    # PEFT's own card (its unedited template, which `push --results` replaces) names no base and tags it with the
    # local path
    from merit_hf.hub.push import peft_template_card

    assert peft_template_card((adapter / "README.md").read_text())
    assert check_model_folder(adapter) == [
        "README.md has no base_model, and this folder is a classifier_adapter: name the model it was built on (for an "
        "adapter, the Hub id in adapter_config.json's base_model_name_or_path; push with --base-model)",
        f"README.md names local paths ['{base_checkpoint}']: write file names or Hub ids instead, or leave the file "
        "out of the push",
        f"adapter_config.json: base_model_name_or_path is the local path '{base_checkpoint}' (nobody else can load "
        "from it): set it to a Hub id or ''",
    ]

    # the merged folder loads as a plain classifier and gives the adapter's outputs, and the results' test AUROC
    arguments = ProbeArguments(dataset=str(BUNDLED_PTBXL), mode="finetune")
    data = load_dataset_dict(arguments.dataset, 100, arguments)
    rows = probe_rows(data, "superclass")["test"]
    feature_extractor = MeritFeatureExtractor.from_pretrained(merged)
    test = precompute_ecg_values(
        data["test"].select(rows).select_columns(["signal", "sampling_rate", "lead_names"]), feature_extractor, 64
    )
    values = torch.as_tensor(np.asarray(test["ecg_values"]))
    classifier = AutoModelForSequenceClassification.from_pretrained(merged, trust_remote_code=True)
    base = MeritForEcgClassification.from_pretrained(base_checkpoint, id2label=classifier.config.id2label)
    with_adapter = PeftModel.from_pretrained(base, adapter)
    logits = logits_of(classifier, values)
    torch.testing.assert_close(logits, logits_of(with_adapter, values), atol=1e-5, rtol=1e-5)
    labels = label_matrix(data["test"], "superclass")[rows]
    auroc = results["model"]["metrics"]["macro_auroc"]["value"]
    assert macro_auroc(labels, logits.numpy()) == pytest.approx(auroc, abs=1e-5)


def test_readme_trainer_recipe_trains_a_peft_model_with_default_arguments(base_checkpoint, tmp_path):
    """The README's `Trainer` recipe with `get_peft_model(model, ...)` in place of the model: default
    `remove_unused_columns` keeps `ecg_values` (Trainer reads the wrapped model's signature), and `save_model` writes
    the adapter with the feature extractor."""
    from transformers import Trainer, TrainingArguments

    from merit_hf.data import MeritCollator, build_ptbxl
    from merit_hf.data import label_names as dataset_label_names
    from merit_hf.training.classification import add_trainer_columns, compute_metrics_for

    ptbxl = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 61))
    names = dataset_label_names(ptbxl, "superclass")
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_merit_config(TINY_ECG).ecg_config)
    model = get_peft_model(load_classifier(base_checkpoint), user_lora_config())
    data = add_trainer_columns(ptbxl, feature_extractor, "superclass")
    arguments = TrainingArguments(
        str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
        use_cpu=True, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(
        model, arguments, data_collator=MeritCollator(feature_extractor), train_dataset=data["train"],
        eval_dataset=data["validation"], processing_class=feature_extractor, compute_metrics=compute_metrics_for(names),
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2 and "eval_macro_auroc" in trainer.evaluate()
    trainer.save_model()
    saved = {path.name for path in (tmp_path / "run").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "preprocessor_config.json"} <= saved
    assert "model.safetensors" not in saved
