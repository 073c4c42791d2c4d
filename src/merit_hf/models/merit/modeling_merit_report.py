"""`MeritForReportGeneration`: the MERIT ECG encoder, a projector and any causal language model, writing ECG reports.

LLaVA's recipe applied to a 1-D signal (`LlavaForConditionalGeneration`; ECG-Chat and GEM for ECGs): the encoder's
patch tokens, pooled in time per lead, go through a Linear-GELU-Linear projector and replace the input embeddings of
the `<ecg>` placeholder tokens that `MeritProcessor` put in the prompt (`masked_scatter`, with a count check).
The encoder is frozen by default; LoRA goes on the language model only (`merit_hf.training.report_lora`).

This file is Hub remote code: it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_merit import MeritReportConfig
from .modeling_merit import MeritBasePreTrainedModel, MeritEcgModel


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
    ECG-conditioned report generation: `ecg_encoder` ([`MeritEcgModel`]) -> `multi_modal_projector` -> soft tokens at
    the `<ecg>` positions of `language_model` (any `AutoModelForCausalLM`).

    `generate()` embeds the prompt, scatters the ECG tokens and decodes from those embeddings, so it returns **only
    the new tokens** (as `generate(inputs_embeds=...)` does). It works the same on the PEFT-wrapped model.

    Example:

    ```python
    >>> from merit_hf import MeritForReportGeneration, MeritProcessor
    >>> model = MeritForReportGeneration.from_pretrained("path/to/merit-report")  # doctest: +SKIP
    >>> processor = MeritProcessor.from_pretrained("path/to/merit-report")  # doctest: +SKIP
    >>> inputs = processor(ecgs=signal, sampling_rate=500, lead_names=leads, text=processor.format_prompt())  # doctest: +SKIP
    >>> new_tokens = model.generate(**inputs, max_new_tokens=64)  # doctest: +SKIP
    >>> processor.batch_decode(new_tokens, skip_special_tokens=True)  # doctest: +SKIP
    ```"""

    _keys_to_ignore_on_load_unexpected = [r"^ecg_encoder\.decoder\."]

    def __init__(self, config: MeritReportConfig):
        super().__init__(config)
        self.ecg_encoder = MeritEcgModel(config.ecg_config)
        self.multi_modal_projector = MeritReportProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        if config.freeze_ecg_encoder:
            self.ecg_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> MeritForReportGeneration:
        super().train(mode)
        if self.config.freeze_ecg_encoder:  # a frozen encoder stays deterministic (no dropout) while the rest trains
            self.ecg_encoder.eval()
        return self

    # The LM's own embeddings and head, so that `resize_token_embeddings`, tying and generation see them.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_ecg_features(
        self,
        ecg_values: torch.Tensor,
        ecg_attention_mask: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Encode ECGs into the soft tokens the LM reads.

        Args:
            ecg_values (`torch.FloatTensor` of shape `(num_ecgs, num_leads, num_samples)`): feature-extractor output.
            ecg_attention_mask (`torch.LongTensor` of shape `(num_ecgs, num_samples)`, *optional*): padding mask.
            lead_mask (`torch.BoolTensor` of shape `(num_ecgs, num_leads)`, *optional*): recorded leads; the encoder
                leaves the missing ones out (their soft tokens are then masked in the LM, see `forward`).

        Returns:
            `torch.FloatTensor` of shape `(num_ecgs, ecg_seq_length, text_hidden_size)`.
        """
        ecg_config = self.config.ecg_config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_ecg_encoder):
            hidden = self.ecg_encoder(
                ecg_values, ecg_attention_mask=ecg_attention_mask, lead_mask=lead_mask
            ).last_hidden_state
        per_lead = hidden.reshape(hidden.shape[0], ecg_config.num_leads, ecg_config.tokens_per_lead, -1)
        if ecg_config.use_separator_tokens:
            per_lead = per_lead[:, :, 1:-1]
        num_ecgs, num_leads, num_patches, width = per_lead.shape
        # Average-pool each lead's patch tokens in time to `ecg_tokens_per_lead` tokens (identity when equal).
        pooled = F.adaptive_avg_pool1d(
            per_lead.reshape(num_ecgs * num_leads, num_patches, width).transpose(1, 2), self.config.ecg_tokens_per_lead
        ).transpose(1, 2)
        tokens = pooled.reshape(num_ecgs, num_leads * self.config.ecg_tokens_per_lead, width)
        return self.multi_modal_projector(tokens.to(self.multi_modal_projector.linear_1.weight.dtype))

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

        Returns `(inputs_embeds, ecg_features)`; `ecg_features` is `None` when no ECG was given.
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
        ecg_features = self.get_ecg_features(ecg_values, ecg_attention_mask, lead_mask)
        placeholder_mask = self.get_placeholder_mask(input_ids, ecg_features)
        inputs_embeds = inputs_embeds.masked_scatter(
            placeholder_mask[..., None].to(inputs_embeds.device), ecg_features.to(inputs_embeds.dtype)
        )
        return inputs_embeds, ecg_features

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
    ) -> MeritReportOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Tokenised prompt (and report, in training) from [`MeritProcessor`], `<ecg>` expanded to `ecg_seq_length`.
        ecg_values (`torch.FloatTensor` of shape `(num_ecgs, num_leads, num_samples)`, *optional*):
            The ECGs, in the order of their `<ecg>` placeholders. Leave out for text-only prompts.
        ecg_attention_mask (`torch.LongTensor` of shape `(num_ecgs, num_samples)`, *optional*):
            Padding mask of the ECGs (feature extractor with `padding=True`).
        lead_mask (`torch.BoolTensor` of shape `(num_ecgs, num_leads)`, *optional*):
            Recorded leads (feature extractor with `missing_leads="mask"`): the encoder leaves the missing ones out,
            and their `<ecg>` positions are masked in the LM's `attention_mask`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, -100 where no loss is taken (prompt, ECG tokens, padding); the processor builds them.
        inputs_embeds (`torch.FloatTensor`, *optional*):
            Ready embeddings (ECG tokens already in place): what `generate()` passes on its first step.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
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

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        ecg_values: torch.FloatTensor | None = None,
        ecg_attention_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        r"""
        Write reports. Takes the processor's output (`input_ids`, `attention_mask`, `ecg_values`) plus any
        `GenerationConfig` field (`max_new_tokens`, `num_beams`, ...) and returns **only the generated tokens**,
        `(batch_size, num_new_tokens)` (or a `GenerateOutput` whose `sequences` are those tokens). Batched prompts
        must be left-padded (the processor does so when no `reports` are given). Without `attention_mask`, the mask
        is inferred from `pad_token_id` as transformers does for `input_ids`. `<ecg>` is never generated.
        """
        if input_ids is None:
            if ecg_values is not None:
                raise ValueError("generate() needs input_ids holding <ecg> placeholders to place ecg_values")
            return super().generate(attention_mask=attention_mask, **kwargs)
        inputs_embeds, _ = self.embed_inputs(input_ids, ecg_values, ecg_attention_mask, lead_mask)
        if attention_mask is None:
            # transformers infers the mask only for `input_ids`, never for the `inputs_embeds` passed on: do it here.
            generation_kwargs = dict(kwargs)
            generation_config, _ = self._prepare_generation_config(
                generation_kwargs.pop("generation_config", None), **generation_kwargs
            )
            self._prepare_special_tokens(
                generation_config, kwargs_has_attention_mask=False, device=input_ids.device, batch_size=len(input_ids)
            )
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, generation_config, {})
        if ecg_values is not None:
            attention_mask = self.mask_missing_lead_tokens(input_ids, attention_mask, lead_mask)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def _prepare_generation_config(self, *args, **kwargs):
        """transformers' merge of the caller's and the model's generation settings, with `<ecg>` always in
        `suppress_tokens`: an emitted placeholder has no ECG to stand for (and would stop the decoding with the count
        error), whatever generation config the caller or the checkpoint gives."""
        generation_config, model_kwargs = super()._prepare_generation_config(*args, **kwargs)
        suppress_tokens = list(generation_config.suppress_tokens or [])
        if self.config.ecg_token_index not in suppress_tokens:
            generation_config.suppress_tokens = [*suppress_tokens, self.config.ecg_token_index]
        return generation_config, model_kwargs

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
        model.ecg_encoder.load_state_dict(ecg_encoder.state_dict())
        model.language_model.load_state_dict(language_model.state_dict())
        model.generation_config = language_model.generation_config
        return model.to(language_model.dtype)


__all__ = ["MeritForReportGeneration", "MeritReportOutput", "MeritReportPreTrainedModel", "MeritReportProjector"]
