"""PEFT LoRA on `MeritForEcgClassification`: low-rank adapters on the encoder's linear layers, a fully trained head,
the encoder's own weights frozen. With 1 % of PTB-XL's labels (a few hundred records) there is little to tune ViT-B's
86M weights with; LoRA trains about 1 % of them, and its output is an adapter of a few MB beside the base checkpoint.

The model needs nothing special: it is what a user writes with peft.

```python
>>> from peft import LoraConfig, PeftModel, TaskType, get_peft_model
>>> from merit_hf import MeritForEcgClassification
>>> model = MeritForEcgClassification.from_pretrained("quickstart_output/model", id2label=...)  # doctest: +SKIP
>>> config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
...                     target_modules=["qkv", "proj", "fc1", "fc2"], modules_to_save=["classifier"])
>>> peft_model = get_peft_model(model, config)  # doctest: +SKIP
>>> peft_model(ecg_values=ecg_values, labels=labels).loss  # doctest: +SKIP
>>> peft_model.save_pretrained("adapter")  # doctest: +SKIP
>>> base = MeritForEcgClassification.from_pretrained("quickstart_output/model", id2label=...)  # doctest: +SKIP
>>> PeftModel.from_pretrained(base, "adapter").merge_and_unload()  # a plain MeritForEcgClassification  # doctest: +SKIP
```

The names: each `MeritEcgLayer` has `attention.qkv` (the fused query/key/value projection, one `nn.Linear`),
`attention.proj`, `mlp.fc1` and `mlp.fc2`; the embeddings have `patch_projection`; the head is `classifier`. Call a
`task_type=SEQ_CLS` model with keywords (`ecg_values=`): peft's sequence-classification wrapper passes a positional
tensor on as `input_ids`, which the model refuses. `AutoPeftModelForSequenceClassification.from_pretrained(adapter,
trust_remote_code=True, id2label=...)` loads the base from the adapter's `base_model_name_or_path`; the base has no
head of the right size until `id2label` (or `num_labels`) says how many classes there are.

`merit_hf.training.finetune` uses this under `python -m merit_hf.training.probe --mode finetune --finetune_method lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..evaluation.probe import ProbeArguments
from ..models.merit.modeling_merit import MeritForEcgClassification

# peft is imported where it is used, as in `report_lora`: it is the `report` extra, and `merit_hf.training.finetune`
# imports this module for full fine-tuning and the linear probe's command too, which must run without it.
if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# The head that is trained whole and saved in the adapter (peft's `modules_to_save`).
CLASSIFIER_HEAD = "classifier"


def encoder_linear_names(model: MeritForEcgClassification) -> list[str]:
    """The full names of the encoder's `nn.Linear` layers (what LoRA can adapt), e.g. `ecg_model.layers.0.mlp.fc1`."""
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != CLASSIFIER_HEAD
    ]


def check_lora_targets(model: MeritForEcgClassification, target_modules: list[str]) -> None:
    """Raise unless every target names a linear layer of the encoder, as peft matches a list of names: the full
    name, or its last dotted parts (`qkv`, `attention.qkv`). peft itself only refuses when none of them matches."""
    names = encoder_linear_names(model)
    for target in target_modules:
        if target == CLASSIFIER_HEAD or target.endswith(f".{CLASSIFIER_HEAD}"):
            raise ValueError(
                f"lora_target_modules: {target!r} is the head, which is trained whole (modules_to_save), not adapted"
            )
        if not any(name == target or name.endswith(f".{target}") for name in names):
            choices = sorted({name.rpartition(".")[2] for name in names})
            raise ValueError(
                f"lora_target_modules: {target!r} matches no linear layer of the encoder; its linear layers are "
                f"{choices} (full names like {names[0]!r})"
            )


def lora_config(arguments: ProbeArguments) -> LoraConfig:
    """The `LoraConfig` of `arguments` (`finetune_method="lora"`): the targets adapted, the head in `modules_to_save`,
    `task_type=SEQ_CLS` so that the adapter reloads with `AutoPeftModelForSequenceClassification`."""
    from peft import LoraConfig, TaskType

    options = arguments.lora_options()
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=options["target_modules"],
        modules_to_save=[CLASSIFIER_HEAD],
    )


def add_lora(model: MeritForEcgClassification, arguments: ProbeArguments) -> PeftModel:
    """`model` wrapped by `get_peft_model`: only the adapters and the head train. Its `name_or_path` becomes the
    adapter's `base_model_name_or_path`, what `AutoPeftModelForSequenceClassification` loads the base from."""
    from peft import get_peft_model

    check_lora_targets(model, list(arguments.lora_target_modules))
    return get_peft_model(model, lora_config(arguments))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """`{"trainable_parameters", "total_parameters"}` of `model`. For a PEFT model (peft's
    `get_nb_trainable_parameters`), `trainable_parameters` is the adapters and the head's trained copy, and
    `total_parameters` counts every parameter it holds: the frozen base, its original head included, the adapters and
    the head's trained copy (so the head is counted twice; e.g. 66,181 trained of 871,790 = 805,609 base + 65,536
    adapters + 645 head copy on the quick-start shape with r = 8)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a `PeftModel` (without importing peft for a plain model)
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        total = sum(parameter.numel() for parameter in model.parameters())
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}


def save_lora_classifier(
    model: PeftModel, feature_extractor, adapter_dir: str | Path, merged_dir: str | Path | None = None
) -> dict[str, Any]:
    """Write the adapter and the head (`adapter_model.safetensors`, `adapter_config.json`) with the feature extractor
    to `adapter_dir`; with `merged_dir`, also merge the adapters into the weights (`merge_and_unload`, which changes
    `model` in place, so call this last) and write that plain `MeritForEcgClassification`, which loads with
    `AutoModelForSequenceClassification.from_pretrained(merged_dir, trust_remote_code=True)`. Returns the folders."""
    model.save_pretrained(adapter_dir)
    feature_extractor.save_pretrained(adapter_dir)
    saved = {"adapter_dir": str(adapter_dir)}
    if merged_dir is not None:
        merged = model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        feature_extractor.save_pretrained(merged_dir)
        saved["merged_dir"] = str(merged_dir)
    return saved
