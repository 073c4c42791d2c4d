"""Argument parsing shared by the training jobs: YAML scalars and strings for list fields, `None` on the command line
for optional fields, and config mappings checked against the config's fields."""

from __future__ import annotations

import re

import pytest

from merit_hf import MeritEcgConfig
from merit_hf.training.pretrain import ARGUMENT_CLASSES
from merit_hf.training.probe import ProbeArguments
from merit_hf.utils.arguments import config_from_argument, parse_arguments


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_scalar_for_a_list_field_is_a_one_element_list(tmp_path):
    *_, train_args = parse_arguments(ARGUMENT_CLASSES, [write_yaml(tmp_path, "report_to: none\n")])
    assert train_args.report_to == ["none"]
    (probe_args,) = parse_arguments([ProbeArguments], [write_yaml(tmp_path, "label_sets: form\nseeds: 3\n")])
    assert probe_args.label_sets == ["form"] and probe_args.seeds == [3]


def test_yaml_list_elements_take_the_declared_type(tmp_path):
    yaml_path = write_yaml(tmp_path, "label_fractions: [1e-2, 0.1, 1]\nseeds: ['4', 5]\n")
    (probe_args,) = parse_arguments([ProbeArguments], [yaml_path])
    assert probe_args.label_fractions == [0.01, 0.1, 1.0] and probe_args.seeds == [4, 5]
    assert [type(value) for value in probe_args.label_fractions + probe_args.seeds] == [float] * 3 + [int] * 2
    (probe_args,) = parse_arguments([ProbeArguments], [yaml_path, "--label_fractions", "0.5"])  # the flag wins
    assert probe_args.label_fractions == [0.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("label_fractions: [0.1, ten]\n", "label_fractions: expected a list of float, got element 'ten'"),
        ("seeds: [1.5]\n", "seeds: expected a list of int, got element 1.5"),
        ("seeds: [true]\n", "seeds: expected a list of int, got element True"),
    ],
)
def test_yaml_list_element_of_the_wrong_type_names_the_field(tmp_path, text, message):
    with pytest.raises(ValueError, match=re.escape(f"job.yaml: {message}")):
        parse_arguments([ProbeArguments], [write_yaml(tmp_path, text)])


@pytest.mark.parametrize("none", ["None", "none", "null"])
def test_none_on_the_command_line_turns_an_optional_field_off(none):
    flags = ["--max_grad_norm", "--save_total_limit", "--eval_split", "--resume_from_checkpoint", "--ecg_config"]
    model_args, data_args, train_args = parse_arguments(
        ARGUMENT_CLASSES, [item for flag in flags for item in (flag, none)]
    )
    assert train_args.max_grad_norm is None and train_args.save_total_limit is None
    assert data_args.eval_split is None and train_args.resume_from_checkpoint is None
    assert model_args.ecg_config is None


def test_optional_fields_still_parse_their_type_and_reject_other_text(capsys):
    *_, train_args = parse_arguments(ARGUMENT_CLASSES, ["--max_grad_norm", "0.5", "--save_total_limit", "3"])
    assert train_args.max_grad_norm == 0.5 and train_args.save_total_limit == 3
    with pytest.raises(SystemExit):
        parse_arguments(ARGUMENT_CLASSES, ["--max_grad_norm", "off"])
    assert "argument --max_grad_norm/--max-grad-norm: invalid float value: 'off'" in capsys.readouterr().err


def test_config_from_argument_refuses_an_unknown_key_and_names_the_closest():
    with pytest.raises(
        ValueError,
        match=re.escape("--ecg_config: 'mask_rato' is not a field of MeritEcgConfig; did you mean 'mask_ratio'?"),
    ):
        config_from_argument(MeritEcgConfig, '{"mask_rato": 0.5}', "ecg_config")
    with pytest.raises(
        ValueError, match=re.escape("'hiden_size' is not a field of MeritEcgConfig; did you mean 'hidden_size'?")
    ):
        config_from_argument(MeritEcgConfig, {"hiden_size": 64}, "ecg_config")
    with pytest.raises(ValueError, match=r"'zzz' is not a field of MeritEcgConfig; fields are \[.*'mask_ratio'"):
        config_from_argument(MeritEcgConfig, {"zzz": 1}, "ecg_config")
    # Its own fields, PreTrainedConfig's and the keys of a saved config.json are accepted.
    config = config_from_argument(
        MeritEcgConfig, {"mask_ratio": 0.5, "output_hidden_states": True, "model_type": "merit_ecg"}, "ecg_config"
    )
    assert config.mask_ratio == 0.5 and config.output_hidden_states is True
    assert config_from_argument(MeritEcgConfig, None, "ecg_config").to_dict() == MeritEcgConfig().to_dict()


def test_an_unknown_flag_names_the_trainer_equivalent_or_the_closest_flag():
    """Before: transformers' 'Some specified arguments are not used by the HfArgumentParser' after a traceback."""
    with pytest.raises(ValueError) as error:
        parse_arguments(ARGUMENT_CLASSES, ["--num_train_epochs", "1", "--bf16=true", "--learning_rat", "1e-4"])
    assert str(error.value) == (
        "unknown flag(s): --num_train_epochs (a TrainingArguments flag; here: --max_steps); --bf16 (a "
        "TrainingArguments flag; here: --mixed_precision bf16); --learning_rat (did you mean --learning_rate?) "
        "(--help lists them)"
    )
    (probe,) = parse_arguments([ProbeArguments], ["--model_name_or_path", "m", "--dataset", "d"])  # known flags pass
    assert probe.model_name_or_path == "m"


def test_pretraining_auto_precision_does_not_take_emulated_bf16(monkeypatch):
    """`--mixed_precision auto` on a T4 or V100: `torch.cuda.is_bf16_supported()` says True there (it counts
    emulation), so auto picked emulated bf16 instead of the documented fp16."""
    import torch

    from merit_hf.training.pretrain import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: bf16 only emulated
    assert resolve_mixed_precision("auto", use_cpu=False) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Ampere and later
    assert resolve_mixed_precision("auto", use_cpu=False) == "bf16"
    assert resolve_mixed_precision("auto", use_cpu=True) == "no"


def test_pretraining_precision_follows_the_launcher_and_refuses_fp16_on_cpu(monkeypatch):
    """`accelerate launch --mixed_precision bf16` was overruled by the script's own value (the run trained in fp32 and
    recorded "no"), and --mixed_precision fp16 on CPU trained in fp32 under the name fp16: both as fine-tuning now."""
    import torch

    from merit_hf.training.pretrain import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto", use_cpu=True, launcher="bf16") == "bf16"
    assert resolve_mixed_precision("bf16", use_cpu=True, launcher="bf16") == "bf16"
    assert resolve_mixed_precision("bf16", use_cpu=True) == "bf16"
    with pytest.raises(
        ValueError, match="--mixed_precision no contradicts `accelerate launch`'s mixed precision 'bf16'"
    ):
        resolve_mixed_precision("no", use_cpu=True, launcher="bf16")
    with pytest.raises(ValueError, match="mixed_precision 'fp16' is CUDA autocast with loss scaling; on cpu"):
        resolve_mixed_precision("fp16", use_cpu=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--max_grad_norm", "-1"],
            "--max_grad_norm: the largest gradient norm to clip to, 0 or None for no clipping; got -1.0",
        ),
        (["--save_total_limit", "0"], "--save_total_limit: the number of newest checkpoints to keep, at least 1"),
        (["--save_total_limit", "-2"], "or None to keep every checkpoint; got -2"),
        (
            ["--activation_checkpointing_layers", "4"],
            "nothing is checkpointed with --activation_checkpointing none; add --activation_checkpointing full",
        ),
        (["--torch_compile_regional", "true"], "nothing is compiled without --torch_compile true"),
    ],
)
def test_pretraining_refuses_a_negative_clipping_norm_and_a_checkpoint_limit_below_1(flags, message):
    """A negative clipping norm has no meaning (0 turns clipping off; it used to scale every gradient to 0), and
    `--save_total_limit 0` kept one checkpoint, not none. A flag that only qualifies another one that is off was
    ignored without a word (`--activation_checkpointing_layers`, `--torch_compile_regional`)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_arguments(ARGUMENT_CLASSES, flags)
    *_, train_args = parse_arguments(ARGUMENT_CLASSES, ["--max_grad_norm", "0", "--save_total_limit", "1"])
    assert train_args.max_grad_norm == 0 and train_args.save_total_limit == 1  # 0: no clipping, as transformers
    *_, train_args = parse_arguments(
        ARGUMENT_CLASSES,
        ["--activation_checkpointing", "full", "--activation_checkpointing_layers", "4", "--torch_compile", "true",
         "--torch_compile_regional", "true"],
    )  # fmt: skip
    assert train_args.activation_checkpointing_layers == 4 and train_args.torch_compile_regional


def test_max_grad_norm_0_and_none_are_one_optimisation_for_resume():
    """Both turn clipping off, so the resume check (which compares `optimization_identity` with the checkpoint's)
    must not refuse a run started with one and resumed with the other; 1.0 stays another optimisation."""
    from merit_hf.training.pretrain import differing_values, optimization_identity

    identities = []
    for value in ("0", "None", "1.0"):
        model_args, _, train_args = parse_arguments(ARGUMENT_CLASSES, ["--max_grad_norm", value])
        identities.append(optimization_identity(train_args, model_args))
    zero, none, one = identities
    assert zero["max_grad_norm"] is None and not differing_values(zero, none, list(none))
    assert differing_values(zero, one, list(one)) == ["max_grad_norm: checkpoint None, this run 1.0"]
