"""The masked-modelling decoder: which tokens a hidden patch can read under `decoder_attention`, padding and missing
leads, and checkpoints saved before the option existed."""

from __future__ import annotations

import json

import pytest
import torch

from merit_hf import MeritEcgConfig, MeritForPreTraining
from merit_hf.models.merit.modeling_merit import MeritEcgDecoder
from tests.conftest import tiny_merit_config

LEAD, POSITION = 3, 7  # the output patch whose inputs are traced


def _decoder(attention: str, layers: int, attn_implementation: str = "sdpa") -> MeritEcgDecoder:
    """The decoder of a pretraining model (whose config carries the attention implementation that masks use)."""
    torch.manual_seed(0)
    ecg_overrides = {"decoder_attention": attention, "decoder_num_hidden_layers": layers}
    config = tiny_merit_config(ecg_overrides)
    config._attn_implementation = attn_implementation
    model = MeritForPreTraining(config)
    assert model.config.ecg_config._attn_implementation == attn_implementation
    decoder = model.decoder.eval()
    for parameter in decoder.parameters():  # random, so that no weight hides a dependency by being zero
        torch.nn.init.normal_(parameter, std=0.5)
    return decoder


def _all_visible_inputs(config: MeritEcgConfig, batch_size: int = 2):
    """Decoder inputs with every patch visible (the identity restore), so token (lead, t) is input index
    `lead * (N + 2) + 1 + t`: the inputs an output depends on can be read off a gradient."""
    num_patches = config.num_patches_per_lead
    hidden = torch.randn(batch_size, config.num_leads * (num_patches + 2), config.hidden_size, requires_grad=True)
    ids_restore = torch.arange(num_patches).expand(batch_size, config.num_leads, num_patches).contiguous()
    return hidden, ids_restore


def _inputs_read_by_one_patch(decoder: MeritEcgDecoder) -> torch.Tensor:
    """`(leads, N + 2)` bool: which input tokens the predicted patch (LEAD, POSITION) of the first ECG depends on."""
    config = decoder.config
    hidden, ids_restore = _all_visible_inputs(config)
    decoder(hidden, ids_restore)[0, LEAD, POSITION].sum().backward()
    return hidden.grad[0].reshape(config.num_leads, -1, config.hidden_size).abs().sum(-1) > 0


def test_per_lead_decoder_reads_only_its_own_lead():
    read = _inputs_read_by_one_patch(_decoder("per_lead", layers=1))
    assert read[LEAD].all()
    assert not read[torch.arange(read.shape[0]) != LEAD].any()


def test_axial_decoder_first_layer_reads_the_other_leads_at_the_same_moment():
    read = _inputs_read_by_one_patch(_decoder("axial", layers=1))
    position = POSITION + 1  # after the leading separator token
    assert read[:, position].all(), "every lead at the same patch position"
    others = torch.ones_like(read)
    others[:, position] = False
    assert not read[others].any(), "nothing at any other position after one (across-lead) layer"


def test_axial_decoder_second_layer_reads_along_the_lead_too():
    read = _inputs_read_by_one_patch(_decoder("axial", layers=2))
    assert read.all()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["per_lead", "axial"])
def test_padding_and_missing_leads_never_reach_a_valid_prediction(attention, attn_implementation):
    decoder = _decoder(attention, layers=2, attn_implementation=attn_implementation)
    config = decoder.config
    hidden, ids_restore = _all_visible_inputs(config)
    valid = torch.ones(2, config.num_leads, config.num_patches_per_lead)
    valid[:, :, -5:] = 0  # a shorter recording: the last 5 patch positions are padding
    valid[0, 4] = 0  # lead 4 missing in the first ECG
    with torch.no_grad():
        before = decoder(hidden, ids_restore, valid)
        changed = hidden.detach().clone().reshape(2, config.num_leads, -1, config.hidden_size)
        changed[:, :, -6:-1] += 100.0  # the padded positions (the last token is the trailing separator)
        changed[0, 4, 1:-1] += 100.0  # the missing lead's patches
        after = decoder(changed.reshape_as(hidden), ids_restore, valid)
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    keep = valid.bool()
    torch.testing.assert_close(before[keep[..., None].expand_as(before)], after[keep[..., None].expand_as(after)])
    assert not torch.allclose(before, after), "the changed inputs must change something, or the test proves nothing"


def test_axial_pretraining_with_a_missing_lead_gives_a_finite_loss():
    torch.manual_seed(0)
    model = MeritForPreTraining(tiny_merit_config(ecg_overrides={"decoder_attention": "axial"}, contrastive_weight=0))
    lead_mask = torch.ones(2, 12)
    lead_mask[1, 6:] = 0
    output = model(torch.randn(2, 12, 2250), lead_mask=lead_mask)
    assert torch.isfinite(output.reconstruction_loss)
    output.reconstruction_loss.backward()
    assert model.decoder.decoder_lead_embeddings.grad.abs().sum() > 0


def test_axial_decoder_lead_embeddings_are_saved_and_not_decayed(tmp_path):
    torch.manual_seed(0)
    model = MeritForPreTraining(tiny_merit_config(ecg_overrides={"decoder_attention": "axial"}))
    assert "decoder.decoder_lead_embeddings" in model.no_weight_decay()
    model.save_pretrained(tmp_path)
    reloaded = MeritForPreTraining.from_pretrained(tmp_path)
    assert reloaded.config.ecg_config.decoder_attention == "axial"
    torch.testing.assert_close(reloaded.decoder.decoder_lead_embeddings, model.decoder.decoder_lead_embeddings)


def test_checkpoint_from_before_decoder_attention_loads_the_per_lead_decoder(tmp_path):
    """A folder written before `decoder_attention` existed has no such key: it gets ST-MEM's per-lead decoder it was
    trained with, every weight as saved, and no new parameter."""
    torch.manual_seed(0)
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["ecg_config"]["decoder_attention"]
    config_file.write_text(json.dumps(saved))
    reloaded = MeritForPreTraining.from_pretrained(tmp_path)
    assert reloaded.config.ecg_config.decoder_attention == "per_lead"
    assert reloaded.decoder.decoder_lead_embeddings is None
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, msg=name)


def test_unknown_decoder_attention_is_refused():
    with pytest.raises(ValueError, match=r"MeritEcgConfig.decoder_attention: expected one of \('per_lead', 'axial'\)"):
        MeritEcgConfig(decoder_attention="all")
