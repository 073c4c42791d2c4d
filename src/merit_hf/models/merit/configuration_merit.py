"""Configurations of MERIT (Multimodal ECG Representation via Information Theory, arXiv 2605.27583).

This file is Hub remote code: it imports only transformers, huggingface_hub and the standard library.
The paper does not publish its architecture, so every default here is a field, taken from the closest published
recipe and named in the docstring (ST-MEM, ICLR 2024, for the ECG tower; MERL, ICML 2024, and CLIP for the
contrastive branch).
"""

import functools
import math
import re
from fractions import Fraction
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# No `from __future__ import annotations` in this file: `@strict` checks each field against its annotation only when
# the annotation is a real type, not a string.
STANDARD_LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
ContrastiveInput = Literal["full", "masked"]
LossBalancing = Literal["fixed", "gradient_norm"]
TextPooling = Literal["mean", "cls", "pooler"]
InitializerScheme = Literal["xavier_uniform", "trunc_normal"]
DecoderAttention = Literal["per_lead", "axial"]
CONTRASTIVE_INPUTS = get_args(ContrastiveInput)
LOSS_BALANCINGS = get_args(LossBalancing)
TEXT_POOLINGS = get_args(TextPooling)
INITIALIZER_SCHEMES = get_args(InitializerScheme)
# `PreTrainedConfig.problem_type` is annotated as a string there, so `@strict` does not check it: validated below.
PROBLEM_TYPES = (None, "multi_label_classification", "single_label_classification", "regression")


def _raises_value_error(config_class: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """Building the config raises `ValueError("<Config>.<field>: <problem>")`, as MERIT's configs always have.

    `@strict` checks every field against its type (`Literal` choices included) and then runs the `validate_*` hooks,
    but reports a failure as huggingface_hub's `StrictDataclassError`, which is no `ValueError` and, for a field of
    the wrong type, does not name the config. Later `validate()` calls (`save_pretrained` runs one) raise the same
    `ValueError`.
    """

    def as_value_error(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except StrictDataclassClassValidationError as error:  # a validate_* hook raised the ValueError below
                raise error.__cause__ from None
            except StrictDataclassFieldValidationError as error:
                named = re.match(r"Validation error for field '([^']+)'", str(error))
                if named is None:  # a message format this code does not know: keep huggingface_hub's error
                    raise
                field = named.group(1)
                problem = str(error.__cause__).removeprefix(f"Field '{field}' ")
                raise ValueError(f"{config_class.__name__}.{field}: {problem}") from None

        return wrapped

    config_class.__init__ = as_value_error(config_class.__init__)
    config_class.validate = as_value_error(config_class.validate)
    return config_class


def _check(condition: bool, config: PreTrainedConfig, field: str, problem: str) -> None:
    if not condition:
        raise ValueError(f"{type(config).__name__}.{field}: {problem}")


def _check_positive(config: PreTrainedConfig, fields: tuple[str, ...]) -> None:
    """Integer fields that count something (their type is already checked by `@strict`)."""
    for field in fields:
        value = getattr(config, field)
        _check(value > 0, config, field, f"must be a positive integer, got {value!r}")


@_raises_value_error
@strict
class MeritEcgConfig(PreTrainedConfig):
    r"""
    Configuration of the MERIT ECG tower: a Transformer over lead-wise patches (ST-MEM layout) plus the light
    decoder used by masked ECG modelling (per lead as in ST-MEM, or axial: see `decoder_attention`).

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
        initializer_range (`float`, defaults to 0.02): std of the normal init of the lead, separator and mask token
            embeddings (ViT-MAE), and of linear layers under `initializer_scheme="trunc_normal"`.
        initializer_scheme (`str`, defaults to `"xavier_uniform"`): init of the linear layers of the ECG tower, the
            decoder and the projection heads. `"xavier_uniform"` with zero bias is what ViT-MAE's and ST-MEM's code
            do; `"trunc_normal"` (std `initializer_range`, BERT/ViT) starves the masked-modelling branch: at
            initialisation its gradient into the encoder was 1e-4 of the contrastive one, against 1.3 with xavier
            (measured on the quick-start model; benchmarks/README.md). Only new weights are initialised: a
            checkpoint's own weights are loaded as saved, whatever this field says.
        qkv_bias (`bool`): bias on query/key/value projections.
        use_separator_tokens (`bool`): add ST-MEM's learnable [SEP] token at both ends of every lead.
        mask_ratio (`float`, defaults to 0.75): fraction of each lead's patches hidden in masked ECG modelling,
            rounded as ViT-MAE rounds it: `int(N * (1 - mask_ratio))` of a lead's N patches stay visible
            (`num_visible_patches`), so 0.75 hides 23 of `base-p75`'s 30 patches.
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size:
            the masked-modelling decoder (ST-MEM: 256 wide, 4 layers).
        decoder_attention (`str`, defaults to `"per_lead"`): which tokens a decoder token attends to.
            `"per_lead"` is ST-MEM's decoder: each lead is decoded on its own, so a hidden patch can use the other
            leads' signal at the same moment only through what the encoder wrote into its own lead's visible tokens
            at other moments; masked modelling then sits on the predict-the-patch-mean plateau (loss 1.0) for about
            500 steps. `"axial"` alternates two kinds of decoder layer: even layers attend across the leads at the
            same patch position, odd layers along each lead; a learnable decoder lead embedding tells every token
            (mask tokens included) its lead. A hidden patch then reads the other leads at the same moment in one
            step: on the quick-start tower the validation loss is below the cross-lead copy rule by step 300
            (benchmarks/README.md, "Masked ECG modelling"). Only pretraining uses the decoder: the encoder, its
            features and every checkpoint's encoder weights are the same either way. The default stays ST-MEM's so
            that configs saved before this field existed load the decoder they were trained with.
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
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    initializer_scheme: InitializerScheme = "xavier_uniform"
    qkv_bias: bool = True
    use_separator_tokens: bool = True
    mask_ratio: float | int = 0.75
    decoder_hidden_size: int = 256
    decoder_num_hidden_layers: int = 4
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 1024
    decoder_attention: DecoderAttention = "per_lead"
    norm_pix_loss: bool = True

    def __post_init__(self, **kwargs):
        self.lead_names = list(self.lead_names)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation (at construction and on `save_pretrained`): the shapes fit together."""
        super().validate_architecture()
        _check_positive(
            self,
            (
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
            ),
        )
        for nested in ("ecg_config", "text_config"):  # a two-tower config.json that says model_type "merit_ecg"
            _check(
                not hasattr(self, nested),
                self,
                nested,
                f"belongs to the two-tower MeritConfig (model_type {MeritConfig.model_type!r}), not to the ECG encoder's "
                f"config (model_type {self.model_type!r}): is config.json's model_type wrong?",
            )
        leads = self.lead_names
        _check(
            len(leads) == self.num_leads,
            self,
            "lead_names",
            f"has {len(leads)} names but num_leads is {self.num_leads}",
        )
        _check(
            len({lead.lower() for lead in leads}) == len(leads),
            self,
            "lead_names",
            f"contains duplicates (case-insensitive): {leads}",
        )
        _check(
            self.num_samples % self.patch_size == 0,
            self,
            "num_samples",
            f"{self.num_samples} is not a multiple of patch_size {self.patch_size}",
        )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            self,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        _check(
            self.decoder_hidden_size % self.decoder_num_attention_heads == 0,
            self,
            "decoder_hidden_size",
            f"{self.decoder_hidden_size} is not divisible by decoder_num_attention_heads "
            f"{self.decoder_num_attention_heads}",
        )
        for field in ("mask_ratio", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, field)
            _check(0.0 <= value < 1.0, self, field, f"must be in [0, 1), got {value}")
        _check(
            self.num_visible_patches >= 1,
            self,
            "mask_ratio",
            f"{self.mask_ratio} leaves no visible patch out of {self.num_patches_per_lead} per lead",
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MeritEcgConfig":
        """Named shapes (timm-style names: width, patch size). `"base-p75"` is ST-MEM's ViT-B/75 (about 71 GFLOP per
        ECG); `"small-p125"` is ViT-S width with 125-sample patches (about 7 times fewer FLOPs, faster than
        HuBERT-ECG base on CPU: see benchmarks/README.md); `"tiny-p75"` is for tests and the quick-start."""
        if name not in MERIT_ECG_PRESETS:
            raise ValueError(f"unknown MeritEcgConfig preset {name!r}; choose one of {sorted(MERIT_ECG_PRESETS)}")
        return cls(**{**MERIT_ECG_PRESETS[name], **overrides})

    @property
    def num_patches_per_lead(self) -> int:
        return self.num_samples // self.patch_size

    @property
    def num_visible_patches(self) -> int:
        """Patches per lead that stay visible under masking: ViT-MAE's `int(L * (1 - mask_ratio))`, computed on the
        ratio as written (`Fraction(str(float(mask_ratio)))`): in floats `30 * (1 - 0.8)` is 5.999..., which would
        keep 5 patches of 30, not 6."""
        return int(self.num_patches_per_lead * (1 - Fraction(str(float(self.mask_ratio)))))

    @property
    def tokens_per_lead(self) -> int:
        return self.num_patches_per_lead + (2 if self.use_separator_tokens else 0)


MERIT_ECG_PRESETS: dict[str, dict] = {
    "base-p75": {},
    "small-p125": {
        "patch_size": 125,
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "tiny-p75": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "decoder_hidden_size": 64,
        "decoder_num_hidden_layers": 2,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 256,
    },
}


@_raises_value_error
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
        logit_scale_max (`float`, defaults to ln(100)): cap of the log inverse temperature (CLIP). Training clamps
            the parameter after each optimizer step (`MeritModel.clamp_logit_scale_`, open_clip's recipe), never
            inside `forward`, where a clamp would leave a capped temperature with no gradient to come back by.
        reconstruction_weight (`float`, defaults to 1.0): weight of the masked-patch MSE.
        contrastive_weight (`float`, defaults to 1.0): weight of the symmetric InfoNCE.

            What the weights mean. MERIT maximises information the ECG embedding Z keeps about the signal X and about
            the report T. With a Gaussian decoder of noise variance s^2, the Barber-Agakov bound gives
            I(Z; X_hidden) >= const - D / (2 s^2) * MSE (D: hidden samples, MSE: their mean, what
            `reconstruction_loss` is), and InfoNCE gives I(Z; T) >= log N - contrastive_loss (N: the batch). So
            maximising I(Z; X_hidden) + beta * I(Z; T) is minimising
            `reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss` with
            `reconstruction_weight / contrastive_weight = D / (2 s^2 beta)`. The bound fixes the ratio only once the
            decoder's noise s^2 and beta (nats of report information worth one nat of signal information) are
            chosen, and the paper gives neither. The defaults 1 : 1 are therefore set by measurement: with xavier
            init both terms send gradients of the same size into the encoder at the start (ratio 0.9 on the
            quick-start model), and benchmarks/README.md ("Ablation") shows how the share moves during training.
        loss_balancing (`str`, defaults to `"fixed"`): `"fixed"` uses the two weights as given. `"gradient_norm"`
            rescales the reconstruction weight during pretraining so that both terms send gradients of the same norm
            into the ECG encoder (re-measured every `loss_balancing_interval` optimizer steps, smoothed, within
            `loss_balancing_max_ratio` of `reconstruction_weight` either way): the contrastive term otherwise takes
            over the shared encoder and masked modelling stalls (benchmarks/README.md, "Ablation"). The training
            loop applies it (`merit_hf.training.pretrain.ReconstructionWeightBalancer`); the model's own
            `forward` takes the weight as `reconstruction_weight=`.
        loss_balancing_interval (`int`, defaults to 10): optimizer steps between two measurements.
        loss_balancing_max_ratio (`float`, defaults to 100.0): bound of the balanced weight relative to
            `reconstruction_weight`.
        contrastive_input (`str`, defaults to `"full"`): which ECG the contrastive branch embeds: `"full"` (a second,
            unmasked pass) or `"masked"` (reuse the masked pass, FLIP-style, cheaper).
        gather_contrastive_features (`bool`, defaults to `True`): distributed pretraining gathers both embeddings
            from every process with gradient, so N processes of batch b equal one process of batch N*b (the training
            side does it, `merit_hf.training.losses.ContrastiveLoss`; the model's own loss is over its batch).

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
    text_pooling: TextPooling = "mean"
    logit_scale_init_value: float | int = math.log(1 / 0.07)
    logit_scale_max: float | int = math.log(100.0)
    reconstruction_weight: float | int = 1.0
    contrastive_weight: float | int = 1.0
    contrastive_input: ContrastiveInput = "full"
    gather_contrastive_features: bool = True
    loss_balancing: LossBalancing = "fixed"
    loss_balancing_interval: int = 10
    loss_balancing_max_ratio: float | int = 100.0
    initializer_range: float = 0.02

    def __setattr__(self, name, value):
        # transformers sets `from_pretrained`'s config kwargs (`problem_type="multilabel"`) after validation: checked
        # here, so that a bad value fails at load time and not at the first loss
        if name == "problem_type":
            _check(value in PROBLEM_TYPES, self, "problem_type", f"must be one of {PROBLEM_TYPES}, got {value!r}")
        super().__setattr__(name, value)

    def validate_architecture(self):
        """Part of `@strict`-powered validation (at construction and on `save_pretrained`): the losses, the
        temperature and the towers make sense together."""
        super().validate_architecture()
        _check_positive(self, ("projection_dim", "loss_balancing_interval"))
        for field in ("reconstruction_weight", "contrastive_weight"):
            _check(getattr(self, field) >= 0, self, field, f"must be >= 0, got {getattr(self, field)}")
        _check(
            self.loss_balancing_max_ratio >= 1,
            self,
            "loss_balancing_max_ratio",
            f"must be >= 1, got {self.loss_balancing_max_ratio}",
        )
        _check(
            self.reconstruction_weight > 0 or self.contrastive_weight > 0,
            self,
            "contrastive_weight",
            "and reconstruction_weight are both 0: no loss would be trained",
        )
        ecg = self.ecg_config
        _check(
            self.reconstruction_weight == 0 or ecg.num_visible_patches < ecg.num_patches_per_lead,
            self,
            "reconstruction_weight",
            f"is {self.reconstruction_weight} but ecg_config.mask_ratio {ecg.mask_ratio} hides no patch (all "
            f"{ecg.num_patches_per_lead} per lead stay visible): the reconstruction loss would be 0 with no gradient; "
            "set a mask_ratio that hides patches, or reconstruction_weight=0",
        )
        _check(
            self.logit_scale_init_value <= self.logit_scale_max,
            self,
            "logit_scale_init_value",
            f"{self.logit_scale_init_value} is above logit_scale_max {self.logit_scale_max}",
        )
        _check(
            getattr(self.text_config, "is_decoder", False) is False,
            self,
            "text_config",
            "must describe an encoder (is_decoder=True given); causal LMs belong in MeritReportConfig",
        )
        _check(
            self.problem_type in PROBLEM_TYPES,
            self,
            "problem_type",
            f"must be one of {PROBLEM_TYPES}, got {self.problem_type!r}",
        )


@_raises_value_error
@strict
class MeritReportConfig(PreTrainedConfig):
    r"""
    Configuration of [`MeritForReportGeneration`]: the MERIT ECG encoder, a projector and any causal language model,
    shaped like LLaVA (`LlavaConfig`): one `<ecg>` placeholder in the prompt is expanded by the processor into
    `ecg_seq_length` tokens, whose input embeddings the model overwrites with the projected ECG tokens.

    The ECG tokens are each lead's patch tokens average-pooled in time to `ecg_tokens_per_lead` tokens, so
    `ecg_seq_length = num_leads * ecg_tokens_per_lead`. The default of 5 per lead (60 tokens for 12 leads) follows
    anyECG-chat's 12 x 5 patch layout for a 10 s record; `ecg_tokens_per_lead = num_patches_per_lead` keeps every
    patch token (LLaVA / ECG-Chat keep all).

    Args:
        ecg_config (`dict` or [`MeritEcgConfig`]): the ECG encoder.
        text_config (`dict` or `PreTrainedConfig`): any causal LM that `AutoModelForCausalLM` can build. Defaults to a
            Llama shape with 32064 tokens (LLaVA-1.5's padded vocabulary, whose id 32000 is the placeholder).
        ecg_token_index (`int`, defaults to 32000): id of the `<ecg>` placeholder in the LM vocabulary.
        ecg_tokens_per_lead (`int`, defaults to 5): soft tokens per lead after pooling in time.
        ecg_seq_length (`int`, *optional*): soft tokens per ECG; derived from the two fields above when not given and
            checked against them when given (the processor reads it).
        projector_hidden_act (`str`, defaults to `"gelu"`): activation of the Linear-GELU-Linear projector (LLaVA-1.5).
        projector_bias (`bool`, defaults to `True`): bias in both projector layers.
        freeze_ecg_encoder (`bool`, defaults to `True`): keep the encoder frozen (ECG-Chat, GEM); `False` trains it
            too (anyECG-chat, Q-HEART).
        initializer_range (`float`, defaults to 0.02): the projector is initialised as the ECG tower's Linear layers
            are (`ecg_config.initializer_scheme`): xavier-uniform with zero biases by default, whatever this says; it
            is the std of a truncated normal only with `initializer_scheme="trunc_normal"`. transformers also reads it,
            e.g. for the rows that `resize_token_embeddings(..., mean_resizing=False)` adds to the input embeddings.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from merit_hf import MeritEcgConfig, MeritReportConfig
    >>> config = MeritReportConfig(ecg_config=MeritEcgConfig(), text_config=LlamaConfig(vocab_size=32064))
    >>> config.ecg_seq_length
    60
    ```"""

    model_type = "merit_report"
    attribute_map = {"ecg_token_id": "ecg_token_index"}
    sub_configs_defaults = {
        "ecg_config": MeritEcgConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32064}),
    }

    ecg_config: dict | MeritEcgConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    ecg_token_index: int = 32000
    ecg_tokens_per_lead: int = 5
    ecg_seq_length: int | None = None
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    freeze_ecg_encoder: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LM's own tying lives in text_config; the wrapper mirrors it so that save/load keeps it.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.ecg_seq_length is None:
            self.ecg_seq_length = self.ecg_config.num_leads * self.ecg_tokens_per_lead

    def validate_architecture(self):
        """Part of `@strict`-powered validation (at construction and on `save_pretrained`): the ECG tokens fit the
        encoder's patches and the placeholder fits the language model's vocabulary."""
        super().validate_architecture()
        patches = self.ecg_config.num_patches_per_lead
        _check(
            1 <= self.ecg_tokens_per_lead <= patches,
            self,
            "ecg_tokens_per_lead",
            f"must be between 1 and the {patches} patches per lead, got {self.ecg_tokens_per_lead}",
        )
        derived = self.ecg_config.num_leads * self.ecg_tokens_per_lead
        _check(
            self.ecg_seq_length == derived,
            self,
            "ecg_seq_length",
            f"is {self.ecg_seq_length} but num_leads x ecg_tokens_per_lead = {derived}",
        )
        vocab_size = getattr(self.text_config, "vocab_size", None)
        _check(
            vocab_size is None or 0 <= self.ecg_token_index < vocab_size,
            self,
            "ecg_token_index",
            f"{self.ecg_token_index} is outside the language model's vocabulary of {vocab_size} tokens",
        )
        _check(
            getattr(self.text_config, "is_encoder_decoder", False) is False,
            self,
            "text_config",
            "must describe a decoder-only causal LM (is_encoder_decoder=True given)",
        )


__all__ = ["MERIT_ECG_PRESETS", "MeritConfig", "MeritEcgConfig", "MeritReportConfig", "STANDARD_LEAD_NAMES"]
