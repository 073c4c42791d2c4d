"""Configs: round trip through JSON, any text AutoConfig, and validation that names the field."""

import pytest
from transformers import AutoConfig, BertConfig, DistilBertConfig

from merit_hf import MeritConfig, MeritEcgConfig
from tests.conftest import tiny_merit_config


def test_round_trip_through_save_pretrained(tmp_path):
    config = tiny_merit_config(contrastive_weight=0.5, contrastive_input="masked")
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, MeritConfig)
    assert isinstance(reloaded.ecg_config, MeritEcgConfig)
    assert reloaded.ecg_config.hidden_size == 32
    assert reloaded.ecg_config.lead_names == ["I", "II", "III", "aVR", "aVL", "aVF"] + [f"V{i}" for i in range(1, 7)]
    assert reloaded.contrastive_weight == 0.5 and reloaded.contrastive_input == "masked"
    assert isinstance(reloaded.text_config, BertConfig) and reloaded.text_config.hidden_size == 32


def test_defaults_are_st_mem_vit_b_75():
    config = MeritEcgConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.sampling_rate, config.num_samples, config.patch_size) == (250, 2250, 75)
    assert config.num_patches_per_lead == 30 and config.tokens_per_lead == 32
    assert config.num_visible_patches == 7  # int(30 * 0.25), as in ST-MEM


def test_any_text_auto_config():
    config = MeritConfig(text_config=DistilBertConfig(dim=64, n_layers=1, n_heads=2, hidden_dim=64))
    assert config.text_config.model_type == "distilbert"
    assert MeritConfig(**config.to_dict()).text_config.model_type == "distilbert"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 2000}, "MeritEcgConfig.num_samples: 2000 is not a multiple of patch_size 75"),
        ({"hidden_size": 100}, "MeritEcgConfig.hidden_size: 100 is not divisible by num_attention_heads 12"),
        ({"mask_ratio": 1.0}, "MeritEcgConfig.mask_ratio: must be in [0, 1), got 1.0"),
        ({"num_leads": 8}, "MeritEcgConfig.lead_names: has 12 names but num_leads is 8"),
        ({"hidden_size": "big"}, "MeritEcgConfig.hidden_size: expected int, got str (value: 'big')"),
        ({"hidden_size": 0}, "MeritEcgConfig.hidden_size: must be a positive integer, got 0"),
        ({"lead_names": ["I"] * 12}, "MeritEcgConfig.lead_names: contains duplicates"),
    ],
)
def test_ecg_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        MeritEcgConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contrastive_input": "both"}, "MeritConfig.contrastive_input: expected one of ('full', 'masked'), got both"),
        ({"text_pooling": "max"}, "MeritConfig.text_pooling: expected one of ('mean', 'cls', 'pooler'), got max"),
        ({"contrastive_weight": 0.0, "reconstruction_weight": 0.0}, "no loss would be trained"),
        ({"contrastive_weight": -1.0}, "MeritConfig.contrastive_weight: must be >= 0"),
        (
            {"ecg_config": {"mask_ratio": 0.0}},
            "MeritConfig.reconstruction_weight: is 1.0 but ecg_config.mask_ratio 0.0 "
            "hides no patch (all 30 per lead stay visible)",
        ),
        ({"projection_dim": 0}, "MeritConfig.projection_dim: must be a positive integer"),
        ({"logit_scale_init_value": 9.0}, "MeritConfig.logit_scale_init_value: 9.0 is above logit_scale_max"),
    ],
)
def test_merit_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        MeritConfig(**kwargs)


def test_a_config_broken_after_it_was_built_is_refused_when_saved(tmp_path):
    from huggingface_hub.errors import StrictDataclassError

    config = tiny_merit_config()
    config.ecg_config.mask_ratio = 1.0  # no check at assignment: the shapes are checked together
    message = __import__("re").escape("MeritEcgConfig.mask_ratio: must be in [0, 1), got 1.0")
    with pytest.raises(ValueError, match=message):  # the ValueError of construction, not huggingface_hub's error
        config.ecg_config.save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassError, match="expected one of"):
        config.contrastive_input = "both"  # a Literal field is checked at once


@pytest.mark.parametrize("mask_ratio, visible", [(0.5, 15), (0.75, 7), (0.8, 6), (0.9, 3), (0.7, 9), (0.6, 12)])
def test_visible_patches_follow_the_mask_ratio_as_written(mask_ratio, visible):
    """30 patches per lead: `int(30 * (1 - r))` on the written ratio; floats made 0.8 keep 5 and 0.9 keep 2 (0.833 and
    0.933 masked)."""
    config = MeritEcgConfig(mask_ratio=mask_ratio)
    assert config.num_patches_per_lead == 30 and config.num_visible_patches == visible


def test_problem_type_is_checked_when_it_is_set(tmp_path):
    """transformers sets `from_pretrained`'s config kwargs after the config's validation: a bad `problem_type` (a
    typo of `multi_label_classification`) fails there, naming the allowed values, not at the first loss."""
    from transformers import AutoModelForSequenceClassification

    from merit_hf import MeritForEcgClassification

    message = r"MeritConfig.problem_type: must be one of \(None, 'multi_label_classification', .*got 'multilabel'"
    config = tiny_merit_config(num_labels=3)
    with pytest.raises(ValueError, match=message):
        config.problem_type = "multilabel"
    MeritForEcgClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, problem_type="multilabel")
    with pytest.raises(ValueError, match=message):
        MeritConfig.from_pretrained(tmp_path, problem_type="multilabel")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, problem_type="single_label_classification")
    assert reloaded.config.problem_type == "single_label_classification"
