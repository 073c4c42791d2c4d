"""Configurations of MERIT (Multimodal ECG Representation via Information Theory, arXiv 2605.27583).

This file is Hub remote code: it imports only transformers, huggingface_hub and the standard library.
The paper does not publish its architecture, so every default here is a field, taken from the closest published
recipe and named in the docstring (ST-MEM, ICLR 2024, for the ECG tower; MERL, ICML 2024, and CLIP for the
contrastive branch).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

STANDARD_LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
CONTRASTIVE_INPUTS = ("full", "masked")
TEXT_POOLINGS = ("mean", "cls", "pooler")


def _require(condition: bool, config_name: str, field: str, problem: str) -> None:
    if not condition:
        raise ValueError(f"{config_name}.{field}: {problem}")


@strict
class MeritEcgConfig(PreTrainedConfig):
    r"""
    Configuration of the MERIT ECG tower: a Transformer over lead-wise patches (ST-MEM layout) plus the light
    per-lead decoder used by masked ECG modelling.

    Defaults give ST-MEM's ViT-B/75: 12 leads x 2250 samples (9 s at 250 Hz), patches of 75 samples, so 30 patches
    per lead and 360 patch tokens, plus one learnable separator token at each end of each lead.

    Args:
        num_leads (`int`, defaults to 12): number of leads; `lead_names` must have this many entries.
        lead_names (`list[str]`): lead order of `ecg_values` (the feature extractor reorders records to it).
        sampling_rate (`int`, defaults to 250): sampling rate in Hz of `ecg_values`.
        num_samples (`int`, defaults to 2250): samples per lead in one window; a multiple of `patch_size`.
        patch_size (`int`, defaults to 75): samples per patch.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: encoder shape (ViT-B by default).
        hidden_act (`str`): activation of the MLPs.
        hidden_dropout_prob, attention_probs_dropout_prob (`float`): dropout rates.
        layer_norm_eps (`float`): LayerNorm epsilon.
        initializer_range (`float`): std of the truncated-normal init of linear layers.
        qkv_bias (`bool`): bias on query/key/value projections.
        use_separator_tokens (`bool`): add ST-MEM's learnable [SEP] token at both ends of every lead.
        mask_ratio (`float`, defaults to 0.75): fraction of each lead's patches hidden in masked ECG modelling.
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size:
            the per-lead decoder (ST-MEM: 256 wide, 4 layers).
        norm_pix_loss (`bool`, defaults to `True`): reconstruct each patch normalised by its own mean and std
            (ST-MEM's pretraining setting).

    Example:

    ```python
    >>> from merit_hf import MeritEcgConfig, MeritEcgModel
    >>> config = MeritEcgConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    >>> model = MeritEcgModel(config)
    ```"""

    model_type = "merit_ecg"
    base_config_key = "ecg_config"

    num_leads: int = 12
    lead_names: list[str] | tuple[str, ...] = STANDARD_LEAD_NAMES
    sampling_rate: int = 250
    num_samples: int = 2250
    patch_size: int = 75
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    qkv_bias: bool = True
    use_separator_tokens: bool = True
    mask_ratio: float = 0.75
    decoder_hidden_size: int = 256
    decoder_num_hidden_layers: int = 4
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 1024
    norm_pix_loss: bool = True

    def __post_init__(self, **kwargs):
        self.lead_names = list(self.lead_names)
        super().__post_init__(**kwargs)
        name = type(self).__name__
        for field in (
            "num_leads",
            "sampling_rate",
            "num_samples",
            "patch_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
        ):
            _require(getattr(self, field) > 0, name, field, f"must be a positive integer, got {getattr(self, field)}")
        _require(
            len(self.lead_names) == self.num_leads,
            name,
            "lead_names",
            f"has {len(self.lead_names)} names but num_leads is {self.num_leads}",
        )
        _require(
            len({lead.lower() for lead in self.lead_names}) == len(self.lead_names),
            name,
            "lead_names",
            f"contains duplicates (case-insensitive): {self.lead_names}",
        )
        _require(
            self.num_samples % self.patch_size == 0,
            name,
            "num_samples",
            f"{self.num_samples} is not a multiple of patch_size {self.patch_size}",
        )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            name,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        _require(
            self.decoder_hidden_size % self.decoder_num_attention_heads == 0,
            name,
            "decoder_hidden_size",
            f"{self.decoder_hidden_size} is not divisible by decoder_num_attention_heads "
            f"{self.decoder_num_attention_heads}",
        )
        _require(0.0 <= self.mask_ratio < 1.0, name, "mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        _require(
            self.num_visible_patches >= 1,
            name,
            "mask_ratio",
            f"{self.mask_ratio} leaves no visible patch out of {self.num_patches_per_lead} per lead",
        )
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, field)
            _require(0.0 <= value < 1.0, name, field, f"must be in [0, 1), got {value}")

    @property
    def num_patches_per_lead(self) -> int:
        return self.num_samples // self.patch_size

    @property
    def num_visible_patches(self) -> int:
        """Patches per lead that stay visible under masking (ViT-MAE's `int(L * (1 - mask_ratio))`)."""
        return int(self.num_patches_per_lead * (1 - self.mask_ratio))

    @property
    def tokens_per_lead(self) -> int:
        return self.num_patches_per_lead + (2 if self.use_separator_tokens else 0)


@strict
class MeritConfig(PreTrainedConfig):
    r"""
    Configuration of the two-tower MERIT model: the ECG tower (`ecg_config`), any Hugging Face text encoder
    (`text_config`, an `AutoConfig`), the projections to a shared space and the two pretraining losses.

    `loss = reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss`. Setting either weight
    to 0 turns that branch off (the ablations "contrastive only" and "reconstruction only").

    Args:
        ecg_config (`dict` or [`MeritEcgConfig`]): the ECG tower.
        text_config (`dict` or `PreTrainedConfig`): the text tower; any encoder `AutoModel` can build. Defaults to a
            BERT-base shape (MERL uses MedCPT, a BERT-base).
        projection_dim (`int`, defaults to 256): size of the shared ECG-report space (MERL).
        projection_hidden_act (`str`): activation between the two layers of each projection head.
        text_pooling (`str`, defaults to `"mean"`): `"mean"` over non-padding tokens (works for every encoder and is
            how sentence-transformers models were trained), `"cls"` (first token) or `"pooler"` (the encoder's
            `pooler_output`, MERL's choice for MedCPT).
        logit_scale_init_value (`float`, defaults to ln(1/0.07)): initial log inverse temperature (CLIP).
        logit_scale_max (`float`, defaults to ln(100)): the log inverse temperature is clamped here (CLIP).
        reconstruction_weight (`float`, defaults to 1.0): weight of the masked-patch MSE.
        contrastive_weight (`float`, defaults to 1.0): weight of the symmetric InfoNCE.
        contrastive_input (`str`, defaults to `"full"`): which ECG the contrastive branch embeds: `"full"` (a second,
            unmasked pass) or `"masked"` (reuse the masked pass, FLIP-style, cheaper).
        gather_contrastive_features (`bool`, defaults to `True`): under `torch.distributed`, gather both embeddings
            from every process with gradient, so N processes of batch b equal one process of batch N*b.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from merit_hf import MeritConfig, MeritEcgConfig
    >>> config = MeritConfig(ecg_config=MeritEcgConfig(), text_config=BertConfig())
    ```"""

    model_type = "merit"
    sub_configs_defaults = {
        "ecg_config": MeritEcgConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    ecg_config: dict | MeritEcgConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 256
    projection_hidden_act: str = "gelu"
    text_pooling: str = "mean"
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    reconstruction_weight: float = 1.0
    contrastive_weight: float = 1.0
    contrastive_input: str = "full"
    gather_contrastive_features: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        name = type(self).__name__
        _require(self.projection_dim > 0, name, "projection_dim", f"must be positive, got {self.projection_dim}")
        _require(
            self.text_pooling in TEXT_POOLINGS,
            name,
            "text_pooling",
            f"must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}",
        )
        _require(
            self.contrastive_input in CONTRASTIVE_INPUTS,
            name,
            "contrastive_input",
            f"must be one of {CONTRASTIVE_INPUTS}, got {self.contrastive_input!r}",
        )
        for field in ("reconstruction_weight", "contrastive_weight"):
            _require(getattr(self, field) >= 0, name, field, f"must be >= 0, got {getattr(self, field)}")
        _require(
            self.reconstruction_weight > 0 or self.contrastive_weight > 0,
            name,
            "contrastive_weight",
            "and reconstruction_weight are both 0: no loss would be trained",
        )
        _require(
            self.logit_scale_init_value <= self.logit_scale_max,
            name,
            "logit_scale_init_value",
            f"{self.logit_scale_init_value} is above logit_scale_max {self.logit_scale_max}",
        )
        _require(
            getattr(self.text_config, "is_decoder", False) is False,
            name,
            "text_config",
            "must describe an encoder (is_decoder=True given); causal LMs belong in MeritReportConfig",
        )


__all__ = ["MeritConfig", "MeritEcgConfig", "STANDARD_LEAD_NAMES"]
