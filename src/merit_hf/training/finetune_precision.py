"""Mixed precision of fine-tuning (`--mixed_precision`, `ProbeArguments.mixed_precision`), as `TrainingArguments`.

The names are pretraining's: `"auto"`, `"no"` (fp32), `"bf16"`, `"fp16"`. `"auto"` is bf16 autocast on a CUDA GPU
with bf16 (compute capability 8.0+: Ampere and later) and fp32 everywhere else: on CPU, as in pretraining (without
AMX or AVX512-BF16, CPU bf16 is emulated and slower than fp32); on GPUs before Ampere, as in inference
(`inference_precision`, precision `"auto"`); on other accelerators. Pretraining's `"auto"` documents fp16 on GPUs
before Ampere; fine-tuning's does not: fp16 needs loss scaling (the Trainer's GradScaler) and its range ends at 65504,
so it runs only when asked.

fp16 autocast is for CUDA: on CPU Accelerate keeps the name `fp16` but trains in fp32 (measured: the head's output is
float32), so it is refused there. bf16 on CPU is CPU autocast; the Trainer accepts it only with `use_cpu=True`, which
says no more than that the CPU is the device (under `accelerate launch`, it also joins the CPU processes).

`accelerate launch --mixed_precision X`, or `mixed_precision: X` in an accelerate config file, reaches the script as
`ACCELERATE_MIXED_PRECISION`, which `TrainingArguments` reads itself when `bf16` and `fp16` are False: before this
module a launcher's bf16 fine-tuned in bf16 with nothing recorded, and its fp16 on CPU ran in fp32. The rule here:
`"auto"` follows the launcher's bf16 or fp16; a precision given to the script must agree with the launcher's, or it is
refused, naming both (the launcher's may come from a config file one has forgotten). The launcher's `"no"` is also
what it sets when nothing was asked, so it does not count: `--mixed_precision bf16` under a plain `accelerate launch`
trains in bf16.
"""

from __future__ import annotations

import os

import torch

from ..evaluation.probe import FINETUNE_MIXED_PRECISIONS
from ..models.merit.inference_precision import BF16_MIN_CUDA_CAPABILITY

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"


def training_device_type(use_cpu: bool = False) -> str:
    """The device type the Trainer will train on: `"cpu"` when asked (`use_cpu`, or `accelerate launch --cpu`, which
    sets `ACCELERATE_USE_CPU`) or without an accelerator, else the accelerator's (`"cuda"`, `"mps"`, `"xpu"`...)."""
    if use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes", "y", "on"):
        return "cpu"
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if accelerator is None else accelerator.type


def launcher_mixed_precision() -> str | None:
    """The mixed precision `accelerate launch` asked for (`ACCELERATE_MIXED_PRECISION`, from its flag or its config
    file), or None: not launched by it, or its `"no"`, which is also what it sets when nothing was asked."""
    value = os.environ.get(LAUNCHER_ENV, "no").strip().lower()
    if value == "no":
        return None
    if value not in ("bf16", "fp16"):
        raise ValueError(
            f"{LAUNCHER_ENV}={value!r} (from `accelerate launch --mixed_precision` or its config file): merit_hf "
            "trains in 'no', 'bf16' or 'fp16'"
        )
    return value


def resolve_finetune_precision(
    choice: str = "auto",
    device_type: str = "cpu",
    cuda_capability: tuple[int, int] | None = None,
    launcher: str | None = None,
) -> str:
    """The mixed precision (`"no"`, `"bf16"` or `"fp16"`) that `choice` means for fine-tuning on `device_type`, given
    the `launcher`'s (`launcher_mixed_precision()`); the rules are the module's.

    Args:
        cuda_capability: the GPU's compute capability (default: `torch.cuda.get_device_capability()`); tests pass
            others.

    Raises `ValueError` for an unknown choice, a choice that contradicts the launcher's, bf16 on a CUDA GPU without
    bf16 (before Ampere), and fp16 off CUDA.
    """
    if choice not in FINETUNE_MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision: must be one of {FINETUNE_MIXED_PRECISIONS}, got {choice!r}")
    if launcher is not None and choice not in ("auto", launcher):
        raise ValueError(
            f"--mixed_precision {choice} contradicts `accelerate launch`'s mixed precision {launcher!r} "
            f"({LAUNCHER_ENV}, from its --mixed_precision or its config file): give one of them, or the same value"
        )
    if device_type == "cuda" and cuda_capability is None:
        cuda_capability = torch.cuda.get_device_capability()
    # a refusal names where the precision came from: `auto` takes the launcher's, maybe from a forgotten config file
    asked = f"mixed_precision {choice!r}"
    if choice == "auto":
        if launcher is not None:
            asked = (
                f"`accelerate launch`'s mixed precision {launcher!r} ({LAUNCHER_ENV}, which --mixed_precision auto "
                "follows)"
            )
        choice = launcher or (
            "bf16" if device_type == "cuda" and tuple(cuda_capability) >= BF16_MIN_CUDA_CAPABILITY else "no"
        )
    if choice == "bf16" and device_type == "cuda" and tuple(cuda_capability) < BF16_MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"{asked} needs a GPU with bf16 (compute capability 8.0+: Ampere and later); this cuda device has compute "
            f"capability {cuda_capability[0]}.{cuda_capability[1]}. Use 'fp16' (its fast half precision, with loss "
            "scaling) or 'no'"
        )
    if choice == "fp16" and device_type != "cuda":
        raise ValueError(
            f"{asked} is CUDA autocast with loss scaling; on {device_type} Accelerate would train in fp32 under the "
            "name fp16. Use 'bf16' or 'no' there"
        )
    return choice


def trainer_precision_arguments(precision: str, device_type: str, use_cpu: bool = False) -> dict[str, bool]:
    """The `TrainingArguments` keywords of a resolved `precision`: `bf16`, `fp16`, and `use_cpu`, which the Trainer
    needs for bf16 on CPU (it refuses bf16 without a bf16 GPU otherwise)."""
    return {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": use_cpu or (precision == "bf16" and device_type == "cpu"),
    }


def finetune_precision_arguments(choice: str = "auto", use_cpu: bool = False) -> tuple[str, dict[str, bool]]:
    """`(precision, TrainingArguments keywords)` of `--mixed_precision choice` on this machine and launcher."""
    device_type = training_device_type(use_cpu)
    precision = resolve_finetune_precision(choice, device_type, launcher=launcher_mixed_precision())
    return precision, trainer_precision_arguments(precision, device_type, use_cpu)


__all__ = [
    "finetune_precision_arguments",
    "launcher_mixed_precision",
    "resolve_finetune_precision",
    "trainer_precision_arguments",
    "training_device_type",
]
