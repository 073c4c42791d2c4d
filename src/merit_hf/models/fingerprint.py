"""The identity of a model's weights, for cache and resume keys.

A feature cache (`merit_hf.evaluation.probe.extract_features`) or a half-written embedding file
(`merit_hf.embedding`) must never be reused for other weights. A checkpoint's path or Hub commit does not say that:
a model instance may have been changed in memory, and a folder may be overwritten in place. So the key is a hash of
what computes the outputs: the config and every tensor of the `state_dict`.
"""

from __future__ import annotations

import hashlib

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


__all__ = ["model_fingerprint"]
