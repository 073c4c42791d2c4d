"""The identity of a model's weights, for cache and resume keys, and for tying reported numbers to weights.

A feature cache (`merit_hf.evaluation.probe.extract_features`) or a half-written embedding file
(`merit_hf.embedding`) must never be reused for other weights. A checkpoint's path or Hub commit does not say that:
a model instance may have been changed in memory, and a folder may be overwritten in place. So the key is a hash of
what computes the outputs: the config and every tensor of the `state_dict` ([`model_fingerprint`]).

A results JSON records [`weights_fingerprint`] of the weights it evaluated, and a model card rendered from it is
checked against the folder's weights (`merit_hf.hub.cards`). That hash reads the tensors only, by name: the config of
the same weights differs between a model in memory and the folder it was saved to (`architectures`, `auto_map`,
`transformers_version`), so a config hash would tell them apart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import PreTrainedModel


def model_fingerprint(model: PreTrainedModel) -> str:
    """A 16-hex-digit SHA-1 of `model.config` (as JSON) and of every tensor of `model.state_dict()` (as float32).

    Equal for two models with the same config and weights, whatever device or dtype they sit in up to float32
    rounding; different as soon as one weight differs. It reads every weight once, so compute it once per run.
    """
    digest = hashlib.sha1(model.config.to_json_string().encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def tensors_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A 16-hex-digit SHA-1 of named tensors, in name order: each name, shape and float32 values. The config is not
    read (see the module docstring)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """[`tensors_fingerprint`] of `module.state_dict()`: the same for a model in memory and for the model loaded back
    from the folder it was saved to (any device or dtype up to float32 rounding); different as soon as one weight
    differs. What a results JSON records of the weights it evaluated (`weights_fingerprint` of its `model` entry)."""
    return tensors_fingerprint(module.state_dict().items())


def safetensors_fingerprint(path: str | os.PathLike) -> str:
    """[`tensors_fingerprint`] of the tensors of a `.safetensors` file (a PEFT adapter's `adapter_model.safetensors`):
    equal to [`weights_fingerprint`] of a module whose `state_dict` holds exactly those tensors under those names."""
    return safetensors_files_fingerprint([path])


def safetensors_files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """[`tensors_fingerprint`] of all the tensors of several `.safetensors` files (a sharded checkpoint's shards),
    read one at a time with `safe_open` (no model is built, and at most one tensor is held): it depends on the
    tensors' names, shapes and values only, not on how they are split into files or on the files' headers. Each file
    is opened once (also a path given twice); a tensor name found in several files is read from the last of them."""
    from safetensors import safe_open

    located = {}
    digest = hashlib.sha1()
    with ExitStack() as stack:
        opened = {}
        for path in map(str, map(Path, paths)):
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(path, framework="pt"))
            located.update(dict.fromkeys(opened[path].keys(), opened[path]))
        for name in sorted(located):
            tensor = located[name].get_tensor(name)
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


__all__ = [
    "model_fingerprint",
    "safetensors_files_fingerprint",
    "safetensors_fingerprint",
    "tensors_fingerprint",
    "weights_fingerprint",
]
