"""Activation checkpointing of the ECG encoder's layers, to fit large pretraining batches in GPU memory.

The ECG encoder holds most of a pretraining step's activations: with `contrastive_input="full"` it runs twice per
step (the masked pass for reconstruction, a quarter of the tokens, and the full pass for the contrastive term), and
each layer keeps about 36 bytes per token and hidden unit for the backward under bf16 autocast (the fp32 residual
stream twice, the bf16 inputs of four matmuls, the fc1 output and the GELU output). Two ways to give some of it back:

- `"full"`: a checkpointed layer keeps only its input and runs its forward again in the backward (transformers'
  `GradientCheckpointingLayer`). Frees nearly all of the layer's activations for one more forward of the layer: about
  a third more arithmetic for that layer, which lowers MFU (recomputation is not model FLOPs).
- `"selective"`: PyTorch's selective activation checkpointing keeps the outputs of the matmuls and of the attention
  kernel and recomputes only the cheap element-wise work (LayerNorms, GELU, residual additions, dtype casts). Frees
  the LayerNorm outputs' casts, the GELU output and the second residual copy (about a third of the layer) for no
  matmul recomputation.

`num_layers` limits either to the first N layers, the usual trade when only some memory is missing. The objective
is untouched: a test checks loss and gradients equal the plain run's. Which option pays on a given GPU is measured by
`benchmarks/pretrain_throughput.py --memory_options` (peak memory and MFU per option).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ACTIVATION_CHECKPOINTING_MODES = ("none", "full", "selective")

# Ops whose outputs selective checkpointing keeps: the matmuls and every fused attention kernel (recomputing them is
# what full checkpointing pays for). Everything else is recomputed in the backward.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def ecg_encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ECG encoder's Transformer layers of any MERIT model (pretraining, two-tower, classification, encoder)."""
    for path in ("merit.ecg_model", "ecg_model", ""):
        module = model
        for name in filter(None, path.split(".")):
            module = getattr(module, name, None)
        if module is not None and hasattr(module, "embeddings") and hasattr(module, "layers"):
            return module.layers
    raise ValueError(f"{type(model).__name__}: no MERIT ECG encoder found (looked for merit.ecg_model, ecg_model)")


def enable_activation_checkpointing(model: torch.nn.Module, mode: str, num_layers: int | None = None) -> int:
    """Checkpoint the first `num_layers` (all when `None`) layers of `model`'s ECG encoder in `mode` (one of
    `ACTIVATION_CHECKPOINTING_MODES`); returns how many layers are checkpointed. Applies in training mode only, as
    transformers' own `activation_checkpointing_enable` does."""
    if mode not in ACTIVATION_CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing: must be one of {ACTIVATION_CHECKPOINTING_MODES}, got {mode!r}")
    layers = ecg_encoder_layers(model)
    if num_layers is not None and not 0 <= num_layers <= len(layers):
        raise ValueError(
            f"activation_checkpointing_layers: must be between 0 and the encoder's {len(layers)} layers, "
            f"got {num_layers}"
        )
    chosen = 0 if mode == "none" else len(layers) if num_layers is None else num_layers
    options = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = _selective_context
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < chosen
        layer._gradient_checkpointing_func = functools.partial(checkpoint, **options)
    return chosen


__all__ = [
    "ACTIVATION_CHECKPOINTING_MODES",
    "ecg_encoder_layers",
    "enable_activation_checkpointing",
]
