"""`MeritForReportGeneration`: the MERIT ECG encoder, a projector and any causal language model, writing ECG reports.

LLaVA's recipe applied to a 1-D signal (`LlavaForConditionalGeneration`; ECG-Chat and GEM for ECGs): the encoder's
patch tokens, pooled in time per lead, go through a Linear-GELU-Linear projector and replace the input embeddings of
the `<ecg>` placeholder tokens that `MeritProcessor` put in the prompt (`masked_scatter`, with a count check).
The encoder is frozen by default; LoRA goes on the language model only (`merit_hf.training.report_lora`).

This file is Hub remote code: it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .configuration_merit import MeritReportConfig
from .modeling_merit import MeritBasePreTrainedModel, MeritEcgModel, _output_flags


@dataclass
class MeritReportOutput(CausalLMOutputWithPast):
    r"""
    [`CausalLMOutputWithPast`] plus the projected ECG tokens.

    ecg_hidden_states (`torch.FloatTensor` of shape `(num_ecgs, ecg_seq_length, text_hidden_size)`, *optional*):
        What was scattered into the `<ecg>` positions (present when `ecg_values` were given).
    """

    ecg_hidden_states: torch.FloatTensor | None = None


class MeritReportProjector(nn.Module):
    """Linear-GELU-Linear from the ECG width to the LM width (LLaVA-1.5's `mlp2x_gelu`, ECG-Chat, anyECG-chat)."""

    def __init__(self, config: MeritReportConfig):
        super().__init__()
        ecg_size, text_size = config.ecg_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(ecg_size, text_size, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size, bias=config.projector_bias)

    def forward(self, ecg_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(ecg_features)))


class MeritReportPreTrainedModel(MeritBasePreTrainedModel):
    config_class = MeritReportConfig
    config: MeritReportConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("ecg", "text")
    _auto_map = {
        "AutoConfig": "configuration_merit.MeritReportConfig",
        "AutoModelForCausalLM": "modeling_merit_report.MeritForReportGeneration",
    }


class MeritForReportGeneration(MeritReportPreTrainedModel, GenerationMixin):
    r"""
    ECG-conditioned report generation: `ecg_model` ([`MeritEcgModel`]) -> `multi_modal_projector` -> soft tokens at
    the `<ecg>` positions of `language_model` (any `AutoModelForCausalLM`).

    `generate()` is transformers' own, as for `LlavaForConditionalGeneration`: it returns the prompt followed by the
    new tokens, `ecg_values` are read on the first (prefill) step only (`prepare_inputs_for_generation`), and `<ecg>`
    is in the model's `generation_config.suppress_tokens`. It works the same on the PEFT-wrapped model.

    Example:

    ```python
    >>> from merit_hf import MeritForReportGeneration, MeritProcessor
    >>> model = MeritForReportGeneration.from_pretrained("path/to/merit-report")  # doctest: +SKIP
    >>> processor = MeritProcessor.from_pretrained("path/to/merit-report")  # doctest: +SKIP
    >>> inputs = processor(ecgs=signal, sampling_rate=500, lead_names=leads, text=processor.format_prompt())  # doctest: +SKIP
    >>> generated = model.generate(**inputs, max_new_tokens=64)  # doctest: +SKIP
    >>> new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # doctest: +SKIP
    >>> processor.batch_decode(new_tokens, skip_special_tokens=True)  # doctest: +SKIP
    ```"""

    _keys_to_ignore_on_load_unexpected = [r"^ecg_model\.decoder\."]
    # Folders saved before the encoder was named `ecg_model` (as in every other MERIT class) hold `ecg_encoder.*`
    # weights: renamed on load by transformers' `key_mapping` (`WeightRenaming`), and by PEFT for adapters.
    _checkpoint_key_mapping = {r"^ecg_encoder\.": "ecg_model."}

    def __init__(self, config: MeritReportConfig):
        super().__init__(config)
        self.ecg_model = MeritEcgModel(config.ecg_config)
        self.multi_modal_projector = MeritReportProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self.generation_config = self.suppress_ecg_token(self.generation_config)
        self._freeze_fixed_parameters()

    def _freeze_fixed_parameters(self) -> None:
        super()._freeze_fixed_parameters()
        if self.config.freeze_ecg_encoder:
            self.ecg_model.requires_grad_(False)

    def train(self, mode: bool = True) -> MeritForReportGeneration:
        super().train(mode)
        if self.config.freeze_ecg_encoder:  # a frozen encoder stays deterministic (no dropout) while the rest trains
            self.ecg_model.eval()
        return self

    def suppress_ecg_token(self, generation_config: GenerationConfig) -> GenerationConfig:
        """A copy of `generation_config` with `<ecg>` in `suppress_tokens`: an emitted placeholder has no ECG to stand
        for. The model's own generation config always holds it (set here on construction, in `from_parts` and by
        `merit_hf.training.report_lora` when it loads a generation config)."""
        generation_config = copy.deepcopy(generation_config)
        suppress_tokens = list(generation_config.suppress_tokens or [])
        if self.config.ecg_token_index not in suppress_tokens:
            generation_config.suppress_tokens = [*suppress_tokens, self.config.ecg_token_index]
        return generation_config

    # The LM's own embeddings and head, so that `resize_token_embeddings`, tying and generation see them.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @can_return_tuple
    def get_ecg_features(
        self,
        ecg_values: torch.Tensor,
        ecg_attention_mask: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Encode ECGs into the soft tokens the LM reads.

        Args:
            ecg_values (`torch.FloatTensor` of shape `(num_ecgs, num_leads, num_samples)`): feature-extractor output.
            ecg_attention_mask (`torch.LongTensor` of shape `(num_ecgs, num_samples)`, *optional*): padding mask; each
                soft token is the mean of the real patches of its time bin (an all-padding bin raises).
            lead_mask (`torch.BoolTensor` of shape `(num_ecgs, num_leads)`, *optional*): recorded leads; the encoder
                leaves the missing ones out (their soft tokens are then masked in the LM, see `forward`).

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(num_ecgs, ecg_seq_length, text_hidden_size)` holds the
            projected soft tokens (as `LlavaModel.get_image_features` and `MeritModel.get_ecg_features` put the
            projected features in `pooler_output`); `last_hidden_state`, `hidden_states` and `attentions` are the ECG
            encoder's.
        """
        ecg_config = self.config.ecg_config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_ecg_encoder):
            ecg_output = self.ecg_model(
                ecg_values,
                ecg_attention_mask=ecg_attention_mask,
                lead_mask=lead_mask,
                return_dict=True,
                **_output_flags(output_attentions, output_hidden_states),
            )
        hidden = ecg_output.last_hidden_state
        per_lead = hidden.reshape(hidden.shape[0], ecg_config.num_leads, ecg_config.tokens_per_lead, -1)
        if ecg_config.use_separator_tokens:
            per_lead = per_lead[:, :, 1:-1]
        num_ecgs, num_leads, num_patches, width = per_lead.shape
        # Average-pool each lead's patch tokens in time to `ecg_tokens_per_lead` tokens (identity when equal).
        pooled = F.adaptive_avg_pool1d(
            per_lead.reshape(num_ecgs * num_leads, num_patches, width).transpose(1, 2), self.config.ecg_tokens_per_lead
        ).transpose(1, 2)
        if ecg_attention_mask is not None:
            pooled = self._pool_real_patches(per_lead, ecg_attention_mask, pooled)
        tokens = pooled.reshape(num_ecgs, num_leads * self.config.ecg_tokens_per_lead, width)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.multi_modal_projector(tokens.to(self.multi_modal_projector.linear_1.weight.dtype)),
            hidden_states=ecg_output.hidden_states,
            attentions=ecg_output.attentions,
        )

    def _pool_real_patches(
        self, per_lead: torch.Tensor, ecg_attention_mask: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """The time pooling of `get_ecg_features` over the patches that hold recorded samples only (the encoder's
        rule: a patch with any real sample is real), so padding never enters a soft token; `pooled` (the plain mean)
        is returned as it is when nothing is padded. A soft token whose time bin holds padding only would reach the LM
        unmasked, so it raises, naming the ECG rows."""
        num_ecgs, num_leads, num_patches, width = per_lead.shape
        real = ecg_attention_mask.reshape(num_ecgs, num_patches, -1).bool().any(-1)
        if bool(real.all()):
            return pooled
        bins = self.config.ecg_tokens_per_lead
        weights = real.to(per_lead.dtype)[:, None, :, None].expand(-1, num_leads, -1, -1)
        summed = F.adaptive_avg_pool1d((per_lead * weights).reshape(-1, num_patches, width).transpose(1, 2), bins)
        counts = F.adaptive_avg_pool1d(weights.reshape(-1, num_patches, 1).transpose(1, 2), bins)
        empty = (counts == 0).reshape(num_ecgs, -1).any(dim=1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).flatten().tolist()
            raise ValueError(
                f"ECG rows {rows}: a time bin of the {bins} soft tokens per lead holds padding only "
                f"(ecg_attention_mask); pad less (records of at least {self.config.ecg_config.num_samples} samples "
                "need no padding) or use fewer ecg_tokens_per_lead"
            )
        return (summed / counts).transpose(1, 2)

    def get_placeholder_mask(self, input_ids: torch.Tensor, ecg_features: torch.Tensor) -> torch.Tensor:
        """Positions of `<ecg>` tokens, `(batch, seq_len)`; raises when their number does not match the ECG tokens."""
        placeholder_mask = input_ids == self.config.ecg_token_index
        num_positions = int(placeholder_mask.sum())
        num_ecgs, seq_length = ecg_features.shape[:2]
        if num_positions != num_ecgs * seq_length:
            raise ValueError(
                f"input_ids hold {num_positions} <ecg> token positions (id {self.config.ecg_token_index}) but "
                f"{num_ecgs} ECG(s) x ecg_seq_length {seq_length} = {num_ecgs * seq_length} ECG tokens were given; "
                f"build the inputs with MeritProcessor (ecg_seq_length={seq_length}) and put exactly one <ecg> per ECG"
            )
        return placeholder_mask

    def mask_missing_lead_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, lead_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The LM's `attention_mask` with 0 at the `<ecg>` positions that stand for missing leads (`lead_mask`
        `(num_ecgs, num_leads)`): the soft tokens are lead after lead, `ecg_tokens_per_lead` each, and those of a
        lead the record does not have are left out of the LM's attention, as the encoder leaves out its patches."""
        if lead_mask is None or bool(lead_mask.all()):
            return attention_mask
        placeholders = input_ids == self.config.ecg_token_index
        valid = lead_mask.bool().to(input_ids.device).repeat_interleave(self.config.ecg_tokens_per_lead, dim=1)
        if int(placeholders.sum()) != valid.numel():
            raise ValueError(
                f"lead_mask {tuple(lead_mask.shape)} gives {valid.numel()} ECG tokens, input_ids hold "
                f"{int(placeholders.sum())} <ecg> positions"
            )
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
        attention_mask[placeholders] = attention_mask[placeholders] * valid.flatten().to(attention_mask.dtype)
        return attention_mask

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        ecg_values: torch.Tensor | None = None,
        ecg_attention_mask: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings of `input_ids` with the projected ECG tokens scattered into the `<ecg>` positions.

        Returns `(inputs_embeds, ecg_features)`; `ecg_features` is `None` when no ECG was given. With `lead_mask`, pass
        `forward` / `generate` these `inputs_embeds` with `attention_mask=mask_missing_lead_tokens(input_ids,
        attention_mask, lead_mask)`: the embeddings cannot carry which `<ecg>` positions stand for missing leads, and
        with that mask the results equal those of `input_ids` + `ecg_values` + `lead_mask`.
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if ecg_values is None:
            num_positions = int((input_ids == self.config.ecg_token_index).sum())
            if num_positions:
                raise ValueError(
                    f"input_ids hold {num_positions} <ecg> token positions but no ecg_values were given; pass the "
                    "ECGs the prompt refers to, or a prompt without <ecg>"
                )
            return inputs_embeds, None
        ecg_features = self.get_ecg_features(ecg_values, ecg_attention_mask, lead_mask, return_dict=True).pooler_output
        placeholder_mask = self.get_placeholder_mask(input_ids, ecg_features)
        inputs_embeds = inputs_embeds.masked_scatter(
            placeholder_mask[..., None].to(inputs_embeds.device), ecg_features.to(inputs_embeds.dtype)
        )
        return inputs_embeds, ecg_features

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        ecg_values: torch.FloatTensor | None = None,
        ecg_attention_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MeritReportOutput | tuple:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Tokenised prompt (and report, in training) from [`MeritProcessor`], `<ecg>` expanded to `ecg_seq_length`.
        ecg_values (`torch.FloatTensor` of shape `(num_ecgs, num_leads, num_samples)`, *optional*):
            The ECGs, in the order of their `<ecg>` placeholders. Leave out for text-only prompts.
        ecg_attention_mask (`torch.LongTensor` of shape `(num_ecgs, num_samples)`, *optional*):
            Padding mask of the ECGs (feature extractor with `padding=True`).
        lead_mask (`torch.BoolTensor` of shape `(num_ecgs, num_leads)`, *optional*):
            Recorded leads (feature extractor with `missing_leads="mask"`): the encoder leaves the missing ones out,
            and their `<ecg>` positions are masked in the LM's `attention_mask`. Only with `ecg_values` (else it
            raises: with `inputs_embeds`, mask the `attention_mask` with `mask_missing_lead_tokens` instead).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, -100 where no loss is taken (prompt, ECG tokens, padding); the processor builds them.
        inputs_embeds (`torch.FloatTensor`, *optional*):
            Ready embeddings (ECG tokens already in place, e.g. from `embed_inputs`; see there for `lead_mask`).
        return_dict (`bool`, *optional*): `False` (or `config.return_dict=False`) gives a tuple, as in Llava.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if lead_mask is not None and ecg_values is None:
            raise ValueError(
                "lead_mask was given without ecg_values and would be ignored; with inputs_embeds from "
                "embed_inputs(..., lead_mask=lead_mask), pass attention_mask=model.mask_missing_lead_tokens(input_ids, "
                "attention_mask, lead_mask) instead, so that the missing leads' <ecg> positions are masked"
            )
        ecg_features = None
        if inputs_embeds is None:
            inputs_embeds, ecg_features = self.embed_inputs(input_ids, ecg_values, ecg_attention_mask, lead_mask)
            if ecg_values is not None:
                attention_mask = self.mask_missing_lead_tokens(input_ids, attention_mask, lead_mask)
        elif ecg_values is not None:
            raise ValueError("ecg_values cannot be combined with inputs_embeds; embed the prompt with embed_inputs()")
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **{**kwargs, "return_dict": True},
        )
        return MeritReportOutput(**outputs, ecg_hidden_states=ecg_features)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        ecg_values: torch.FloatTensor | None = None,
        ecg_attention_mask: torch.LongTensor | None = None,
        lead_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' step inputs, plus the ECG inputs on the prefill step only (as `LlavaForConditionalGeneration`
        passes `pixel_values`): after it the `<ecg>` positions live in the cache. With `use_cache=False` every step
        reads the whole sequence, so the ECGs go with every step. `inputs_embeds` (from `embed_inputs`, ECG tokens in
        place) is named here because `generate()` accepts it only from models whose signature names it.

        `input_ids` is the whole sequence so far, so the `<ecg>` positions of missing leads (`lead_mask`) are masked
        in the `attention_mask` of every step, not only the first. A generated `<ecg>` (only possible when the
        caller removes it from `suppress_tokens`) raises: it has no ECG to stand for.
        """
        if not is_first_iteration and bool((input_ids[:, -1] == self.config.ecg_token_index).any()):
            raise ValueError(
                f"generate() produced the <ecg> placeholder (id {self.config.ecg_token_index}), which has no ECG to "
                "stand for; keep it in generation_config.suppress_tokens (the model's generation config has it)"
            )
        if ecg_values is not None:
            attention_mask = self.mask_missing_lead_tokens(input_ids, attention_mask, lead_mask)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(ecg_values=ecg_values, ecg_attention_mask=ecg_attention_mask, lead_mask=lead_mask)
        return model_inputs

    @classmethod
    def from_parts(
        cls,
        ecg_encoder: MeritEcgModel | str,
        language_model: PreTrainedModel | str,
        tokenizer,
        ecg_token: str = "<ecg>",
        **config_kwargs,
    ) -> MeritForReportGeneration:
        """Assemble a new report model from a (pretrained) MERIT encoder and a (pretrained) causal LM.

        Adds `ecg_token` to `tokenizer` as a special token (in place) and grows the LM's embeddings to the tokenizer's
        length. The projector starts random: train it with `merit_hf.training.report_lora` (stage 1).

        Args:
            ecg_encoder ([`MeritEcgModel`] or path): any MERIT checkpoint holding an encoder (pretraining too).
            language_model (`PreTrainedModel` or path): a causal LM (`AutoModelForCausalLM`).
            tokenizer: the LM's tokenizer.
            config_kwargs: other [`MeritReportConfig`] fields (`ecg_tokens_per_lead`, `freeze_ecg_encoder`, ...).
        """
        if isinstance(ecg_encoder, str):
            ecg_encoder = MeritEcgModel.from_pretrained(ecg_encoder)
        if isinstance(language_model, str):
            language_model = AutoModelForCausalLM.from_pretrained(language_model)
        if ecg_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [ecg_token]})
        old_size = language_model.get_input_embeddings().num_embeddings
        if len(tokenizer) > old_size:
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            # The new rows are never read as inputs (masked_scatter overwrites them); zeros instead of random values
            # make the base model a deterministic function of its two parts.
            with torch.no_grad():
                language_model.get_input_embeddings().weight[old_size:] = 0
                output_embeddings = language_model.get_output_embeddings()
                if output_embeddings is not None:
                    output_embeddings.weight[old_size:] = 0
        text_config = language_model.config
        text_config.vocab_size = language_model.get_input_embeddings().num_embeddings
        if hasattr(text_config, "quantization_config"):  # a GGUF checkpoint, already dequantised on load
            del text_config.quantization_config
        ecg_token_index = tokenizer.convert_tokens_to_ids(ecg_token)
        config = MeritReportConfig(
            ecg_config=ecg_encoder.config,
            text_config=text_config,
            ecg_token_index=ecg_token_index,
            **config_kwargs,
        )
        model = cls(config)
        model.ecg_model.load_state_dict(ecg_encoder.state_dict())
        model.language_model.load_state_dict(language_model.state_dict())
        model.generation_config = model.suppress_ecg_token(language_model.generation_config)
        return model.to(language_model.dtype)


__all__ = ["MeritForReportGeneration", "MeritReportOutput", "MeritReportPreTrainedModel", "MeritReportProjector"]
