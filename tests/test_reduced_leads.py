"""Reduced-lead input (`lead_mask`) and long records (`window="sliding"`), on real PTB-XL records and tiny models.

A missing lead's tokens must be left out, never fed as zeros: a 12-lead record with leads dropped through `lead_mask`
embeds exactly as the same record given with only those leads, whatever values the dropped leads hold, and as a
reference encoder that never sees the dropped leads' tokens at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit_hf import (
    MeritEcgModel,
    MeritFeatureExtractor,
    MeritForEcgClassification,
    MeritForPreTraining,
    MeritModel,
    pool_window_embeddings,
)
from merit_hf.models.merit.feature_extraction_merit import EcgInputError, read_wfdb_record
from tests.conftest import BUNDLED_PTBXL, tiny_ecg_config, tiny_merit_config

LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
SUBSETS = {1: ["I"], 2: ["I", "II"], 3: ["I", "II", "V2"], 6: LEADS[:6], 8: ["I", "II", *LEADS[6:]]}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """The bundled real PTB-XL records at 500 Hz, 10 s each."""
    headers = sorted((BUNDLED_PTBXL / "records500").rglob("*.hea"))
    return [read_wfdb_record(header) for header in headers]


def _columns(record: dict, leads: list[str]) -> tuple[np.ndarray, list[str]]:
    names = [name.upper() for name in record["lead_names"]]
    return record["signal"][:, [names.index(lead) for lead in leads]], leads


# ----------------------------------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", sorted(SUBSETS))
def test_any_lead_subset_gives_its_leads_and_a_lead_mask(records, count):
    record = records[0]
    extractor = MeritFeatureExtractor(missing_leads="mask")
    full = extractor(record["signal"], sampling_rate=500, lead_names=record["lead_names"], return_tensors="np")
    signal, leads = _columns(record, SUBSETS[count])
    subset = extractor(signal, sampling_rate=500, lead_names=leads, return_tensors="np")
    present = np.array([lead in SUBSETS[count] for lead in LEADS])
    assert subset["lead_mask"].dtype == bool and subset["lead_mask"].tolist() == [present.tolist()]
    assert full["lead_mask"].all()
    np.testing.assert_array_equal(subset["ecg_values"][0, present], full["ecg_values"][0, present])
    assert not subset["ecg_values"][0, ~present].any()


def test_missing_leads_raise_unless_masking_is_asked_for(records):
    signal, leads = _columns(records[0], ["I", "II"])
    with pytest.raises(EcgInputError, match=r"record 0: 2 leads given, 12 expected; .*missing_leads='mask'"):
        MeritFeatureExtractor()(signal, sampling_rate=500, lead_names=leads)
    assert "lead_mask" not in MeritFeatureExtractor()(records[0]["signal"], sampling_rate=500, lead_names=LEADS)
    with pytest.raises(ValueError, match=r"MeritFeatureExtractor.missing_leads: must be one of \('raise', 'mask'\)"):
        MeritFeatureExtractor(missing_leads="zeros")
    only_frank = np.zeros((5000, 1))
    with pytest.raises(EcgInputError, match=r"record 0: none of the leads .* is in the record"):
        MeritFeatureExtractor(missing_leads="mask", drop_extra_leads=True)(
            only_frank, sampling_rate=500, lead_names=["vx"]
        )


def test_derivable_limb_leads_are_derived_and_the_rest_masked(records):
    signal, leads = _columns(records[0], ["I", "II", "V1"])
    extractor = MeritFeatureExtractor(missing_leads="mask", derive_limb_leads=True)
    derived = extractor(signal, sampling_rate=500, lead_names=leads, return_tensors="np")
    assert derived["lead_mask"][0].tolist() == [True] * 7 + [False] * 5
    # one limb lead cannot give the others: it is kept and the rest masked, instead of the derivation's error
    single = extractor(signal[:, :1], sampling_rate=500, lead_names=["I"], return_tensors="np")
    assert single["lead_mask"][0].tolist() == [True] + [False] * 11


def test_record_normalisation_uses_only_the_recorded_leads(records):
    signal, leads = _columns(records[0], ["II", "V5"])
    extractor = MeritFeatureExtractor(missing_leads="mask", normalization="zscore_record")
    values = extractor(signal, sampling_rate=500, lead_names=leads, return_tensors="np")["ecg_values"][0]
    recorded = values[[1, 10]]
    assert abs(recorded.mean()) < 1e-6 and abs(recorded.std() - 1) < 1e-4


def test_the_settings_are_saved_with_the_extractor(tmp_path):
    MeritFeatureExtractor(missing_leads="mask", window="sliding", window_stride=500).save_pretrained(tmp_path)
    reloaded = MeritFeatureExtractor.from_pretrained(tmp_path)
    assert (reloaded.missing_leads, reloaded.window, reloaded.window_stride) == ("mask", "sliding", 500)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
def _dropped_and_subset(records, leads: list[str], count: int = 2):
    """The 12-lead feature-extractor output of `count` records, and the output of the same records given with only
    `leads` (with its `lead_mask`)."""
    extractor = MeritFeatureExtractor(missing_leads="mask")
    chosen = records[:count]
    full = extractor([r["signal"] for r in chosen], sampling_rate=500, lead_names=LEADS, return_tensors="pt")
    subset = extractor(
        [_columns(r, leads)[0] for r in chosen], sampling_rate=500, lead_names=leads, return_tensors="pt"
    )
    return full["ecg_values"], subset["ecg_values"], subset["lead_mask"]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_record_with_leads_dropped_embeds_as_the_record_given_only_those_leads(records, attn_implementation):
    full, subset, lead_mask = _dropped_and_subset(records, ["I", "II", "V2"])
    noise = torch.randn_like(full) * 3
    anything = torch.where(lead_mask[:, :, None], full, noise)  # the dropped leads hold any values
    encoder = MeritEcgModel(tiny_ecg_config(attn_implementation=attn_implementation)).eval()
    two_towers = MeritModel(tiny_merit_config()).eval()
    classifier = MeritForEcgClassification(tiny_merit_config(num_labels=5)).eval()
    runs = {
        "encoder": lambda ecg, **kw: encoder(ecg, **kw).pooler_output,
        "two_towers": lambda ecg, **kw: two_towers.get_ecg_features(ecg, **kw).pooler_output,
        "classifier": lambda ecg, **kw: classifier(ecg, **kw).logits,
    }
    with torch.no_grad():
        for name, run in runs.items():
            dropped = run(full, lead_mask=lead_mask)
            torch.testing.assert_close(dropped, run(subset, lead_mask=lead_mask), msg=name)
            torch.testing.assert_close(dropped, run(anything, lead_mask=lead_mask), msg=name)
            assert not torch.allclose(dropped, run(subset), atol=1e-3), f"{name}: zero-filled leads changed nothing"


def test_lead_mask_leaves_the_missing_leads_tokens_out(records):
    """Reference: the encoder run by hand on the recorded leads' tokens only (no mask anywhere) gives the same
    `pooler_output` as the model given all leads with `lead_mask`."""
    full, _, lead_mask = _dropped_and_subset(records, ["II", "V1", "V4", "V6"], count=1)
    config = tiny_ecg_config()
    model = MeritEcgModel(config).eval()
    with torch.no_grad():
        tokens, *_ = model.embeddings(full)
        per_lead = tokens.reshape(1, config.num_leads, config.tokens_per_lead, -1)[:, lead_mask[0]]
        hidden = per_lead.reshape(1, -1, config.hidden_size)
        for layer in model.layers:
            hidden = layer(hidden)
        hidden = model.norm(hidden).reshape(1, int(lead_mask.sum()), config.tokens_per_lead, -1)
        expected = model.pooler_norm(hidden[:, :, 1:-1].mean(dim=(1, 2)))  # patch tokens, [SEP]s left out
        torch.testing.assert_close(model(full, lead_mask=lead_mask).pooler_output, expected)


@pytest.mark.slow
def test_lead_mask_with_padding_compiles_as_one_graph():
    """`torch.compile(fullgraph=True)` traces the lead mask (alone and with padding) without a graph break, and a
    missing lead stays out when the record is padded too."""
    model = MeritEcgModel(tiny_ecg_config()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ecg = torch.randn(2, 12, 2250)
    lead_mask = torch.ones(2, 12, dtype=torch.bool)
    lead_mask[0, 3:] = False
    padding = torch.ones(2, 2250, dtype=torch.long)
    padding[1, 1500:] = 0
    other = ecg.clone()
    other[0, 3:] = 7.0
    with torch.no_grad():
        for kwargs in ({"lead_mask": lead_mask}, {"lead_mask": lead_mask, "ecg_attention_mask": padding}):
            expected = model(ecg, **kwargs).pooler_output
            torch.testing.assert_close(compiled(ecg, **kwargs).pooler_output, expected)
            torch.testing.assert_close(model(other, **kwargs).pooler_output, expected)


def test_pretraining_loss_leaves_the_missing_leads_out(records):
    full, subset, lead_mask = _dropped_and_subset(records, ["I", "V3"])
    model = MeritForPreTraining(tiny_merit_config(contrastive_weight=0.0)).eval()
    noise = torch.rand(full.shape[0], 12, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dropped = model(full, noise=noise, lead_mask=lead_mask).reconstruction_loss
        torch.testing.assert_close(dropped, model(subset, noise=noise, lead_mask=lead_mask).reconstruction_loss)
        assert not torch.allclose(dropped, model(subset, noise=noise).reconstruction_loss)


def test_a_bad_lead_mask_is_named():
    model = MeritEcgModel(tiny_ecg_config())
    ecg = torch.randn(2, 12, 2250)
    with pytest.raises(ValueError, match=r"lead_mask must have shape \(batch, 12\) .* got \(2, 6\)"):
        model(ecg, lead_mask=torch.ones(2, 6, dtype=torch.bool))
    empty = torch.ones(2, 12, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"lead_mask: records \[1\] have no lead"):
        model(ecg, lead_mask=empty)


def test_the_collator_and_the_processor_pass_the_lead_mask(records, tokenizer):
    from merit_hf import MeritProcessor
    from merit_hf.data import MeritCollator

    extractor = MeritFeatureExtractor(missing_leads="mask")
    rows = [
        {"signal": _columns(records[0], ["I"])[0], "sampling_rate": 500, "lead_names": ["I"]},
        {"signal": records[1]["signal"], "sampling_rate": 500, "lead_names": LEADS},
    ]
    batch = MeritCollator(extractor)(rows)
    assert batch["lead_mask"].tolist() == [[True] + [False] * 11, [True] * 12]
    model = MeritEcgModel(tiny_ecg_config()).eval()
    with torch.no_grad():
        pooled = model(**batch).pooler_output
        alone = model(batch["ecg_values"][:1], lead_mask=batch["lead_mask"][:1]).pooler_output
    torch.testing.assert_close(pooled[:1], alone)
    processed = MeritProcessor(extractor, tokenizer)(ecgs=rows[0]["signal"], sampling_rate=500, lead_names=["I"])
    assert processed["lead_mask"].tolist() == batch["lead_mask"][:1].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Long records: sliding windows
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minute(records) -> np.ndarray:
    """A 60 s, 12-lead, 500 Hz record: six real 10 s PTB-XL records one after the other."""
    return np.concatenate([records[i % len(records)]["signal"] for i in range(6)])


def test_sliding_windows_cover_a_60_s_record(minute, records):
    extractor = MeritFeatureExtractor(window="sliding")
    windows = extractor([minute, records[0]["signal"]], sampling_rate=500, lead_names=LEADS, return_tensors="np")
    # 60 s at 250 Hz = 15000 samples: windows at 0, 2250, ..., 11250 and one aligned to the end (12750); the 10 s
    # record (2500 samples) gets one at 0 and one at 250
    assert windows["record_index"].tolist() == [0] * 7 + [1] * 2
    single = MeritFeatureExtractor(crop="start")(minute, sampling_rate=500, lead_names=LEADS, return_tensors="np")
    np.testing.assert_allclose(windows["ecg_values"][0], single["ecg_values"][0], atol=1e-6)
    overlapping = MeritFeatureExtractor(window="sliding", window_stride=1125)
    assert len(overlapping(minute, sampling_rate=500, lead_names=LEADS)["ecg_values"]) == 13
    with pytest.raises(ValueError, match=r"MeritFeatureExtractor.window: must be one of \('single', 'sliding'\)"):
        MeritFeatureExtractor(window="all")


def test_window_embeddings_pool_back_per_record(minute, records):
    extractor = MeritFeatureExtractor(window="sliding")
    windows = extractor([minute, records[0]["signal"]], sampling_rate=500, lead_names=LEADS, return_tensors="pt")
    model = MeritEcgModel(tiny_ecg_config()).eval()
    with torch.no_grad():
        embeddings = model(windows["ecg_values"]).pooler_output
    mean = pool_window_embeddings(embeddings, windows["record_index"])
    largest = pool_window_embeddings(embeddings, windows["record_index"], pooling="max")
    torch.testing.assert_close(mean, torch.stack([embeddings[:7].mean(0), embeddings[7:].mean(0)]))
    torch.testing.assert_close(largest, torch.stack([embeddings[:7].amax(0), embeddings[7:].amax(0)]))
    with pytest.raises(ValueError, match=r"record_index must give every one of 3 records at least one window"):
        pool_window_embeddings(embeddings, windows["record_index"], num_records=3)
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'max'\), got 'median'"):
        pool_window_embeddings(embeddings, windows["record_index"], pooling="median")
