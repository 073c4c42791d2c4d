"""Fine-tuning's `--mixed_precision` (`merit_hf.training.finetune_precision`): how it resolves on each device and under
`accelerate launch`, the `TrainingArguments` it gives, that the Trainer really trains in it (the head's output dtype
during training), that the default on CPU is the fp32 run it always was, and the precision in the results JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from merit_hf.evaluation.probe import ProbeArguments, probe_rows
from merit_hf.training import finetune, finetune_precision
from merit_hf.training.finetune_precision import (
    finetune_precision_arguments,
    launcher_mixed_precision,
    resolve_finetune_precision,
)
from merit_hf.training.probe import main
from merit_hf.utils.arguments import parse_arguments
from tests.conftest import ACCELERATE_LAUNCH, BUNDLED_PTBXL, REPO_ROOT
from tests.test_eval_probe import synthetic_ptbxl
from tests.test_finetune_lora import base_checkpoint  # noqa: F401  (fixture: a tiny pretraining checkpoint)
from tests.test_trainer_classification import tiny_encoder

# The bundled records' own rate and length: nothing to resample, short sequences (20 patches per lead).
TINY_ECG = {"sampling_rate": 100, "num_samples": 1000, "patch_size": 50}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """Each test says which launcher it runs under; the suite itself may run under one."""
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("choice", "device_type", "cuda_capability", "launcher", "expected"),
    [
        ("auto", "cpu", None, None, "no"),  # fp32 on CPU unless asked, as pretraining
        ("auto", "cuda", (9, 0), None, "bf16"),  # H100
        ("auto", "cuda", (8, 0), None, "bf16"),  # A100
        ("auto", "cuda", (7, 5), None, "no"),  # T4: no bf16, and fp16 only when asked
        ("auto", "mps", None, None, "no"),
        ("fp16", "cuda", (7, 0), None, "fp16"),  # V100, asked
        ("bf16", "cpu", None, None, "bf16"),
        ("no", "cuda", (9, 0), None, "no"),
        ("auto", "cpu", None, "bf16", "bf16"),  # accelerate launch --mixed_precision bf16 (or its config file)
        ("auto", "cuda", (9, 0), "fp16", "fp16"),
        ("bf16", "cuda", (9, 0), "bf16", "bf16"),  # the same value twice is no contradiction
    ],
)
def test_mixed_precision_resolves_per_device_and_launcher(choice, device_type, cuda_capability, launcher, expected):
    assert resolve_finetune_precision(choice, device_type, cuda_capability, launcher) == expected


@pytest.mark.parametrize(
    ("choice", "device_type", "cuda_capability", "launcher", "message"),
    [
        ("fp16", "cpu", None, "bf16", r"--mixed_precision fp16 contradicts `accelerate launch`'s mixed precision "
                                      r"'bf16' \(ACCELERATE_MIXED_PRECISION, from its --mixed_precision or its"),
        ("no", "cuda", (9, 0), "bf16", r"--mixed_precision no contradicts `accelerate launch`'s mixed precision"),
        ("bf16", "cuda", (7, 5), None, r"^mixed_precision 'bf16' needs a GPU with bf16 \(compute capability 8.0\+: "
                                       r"Ampere and later\); this cuda device has compute capability 7.5. Use 'fp16'"),
        ("auto", "cuda", (7, 0), "bf16", r"^`accelerate launch`'s mixed precision 'bf16' \(ACCELERATE_MIXED_PRECISION"
                                         r", which --mixed_precision auto follows\) needs a GPU with bf16 .* 7.0"),
        ("fp16", "cpu", None, None, r"^mixed_precision 'fp16' is CUDA autocast with loss scaling; on cpu Accelerate "
                                    r"would train in fp32 under the name fp16. Use 'bf16' or 'no' there"),
        ("auto", "cpu", None, "fp16", r"^`accelerate launch`'s mixed precision 'fp16' \(ACCELERATE_MIXED_PRECISION, "
                                      r"which --mixed_precision auto follows\) is CUDA autocast"),  # on CPU
        ("fp32", "cpu", None, None, r"mixed_precision: must be one of \('auto', 'no', 'bf16', 'fp16'\), got 'fp32'"),
    ],
)  # fmt: skip
def test_mixed_precision_refusals_name_the_problem(choice, device_type, cuda_capability, launcher, message):
    with pytest.raises(ValueError, match=message):
        resolve_finetune_precision(choice, device_type, cuda_capability, launcher)


def test_launcher_precision_is_read_from_accelerate_launch_environment(monkeypatch):
    assert launcher_mixed_precision() is None  # not launched
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch sets when nothing is asked
    assert launcher_mixed_precision() is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launcher_mixed_precision() == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    message = r"ACCELERATE_MIXED_PRECISION='fp8' \(from `accelerate launch --mixed_precision` or its config file\): "
    with pytest.raises(ValueError, match=message + "merit_hf trains in 'no', 'bf16' or 'fp16'"):
        launcher_mixed_precision()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mixed_precision": "fp32", "mode": "finetune"}, r"mixed_precision: must be one of \('auto', 'no', 'bf16'"),
        ({"mixed_precision": "bf16"}, r"mixed_precision 'bf16': set, but mode is 'linear', so it would be ignored"),
    ],
)
def test_probe_arguments_refuse_a_mixed_precision_that_would_be_ignored(settings, message):
    with pytest.raises(ValueError, match=message):
        ProbeArguments(**settings)


def test_trainer_flags_for_precision_point_to_mixed_precision_on_the_probe_command():
    with pytest.raises(ValueError, match=r"--bf16 \(a TrainingArguments flag; here: --mixed_precision bf16\); --fp16 "
                                         r"\(a TrainingArguments flag; here: --mixed_precision fp16\)"):  # fmt: skip
        parse_arguments([ProbeArguments], ["--mode", "finetune", "--bf16", "true", "--fp16", "true"])
    (arguments,) = parse_arguments([ProbeArguments], ["--mode", "finetune", "--mixed_precision", "bf16"])
    assert arguments.mixed_precision == "bf16"
    assert ProbeArguments().mixed_precision == "auto"


@pytest.mark.parametrize(
    ("choice", "use_cpu", "launcher", "expected"),
    [
        ("auto", False, None, {"bf16": False, "fp16": False, "use_cpu": False, "mixed_precision": "no"}),
        ("no", True, None, {"bf16": False, "fp16": False, "use_cpu": True, "mixed_precision": "no"}),
        # bf16 on CPU: the Trainer refuses it without use_cpu ("Your setup doesn't support bf16/gpu")
        ("bf16", False, None, {"bf16": True, "fp16": False, "use_cpu": True, "mixed_precision": "bf16"}),
        ("auto", False, "bf16", {"bf16": True, "fp16": False, "use_cpu": True, "mixed_precision": "bf16"}),
        ("bf16", False, "bf16", {"bf16": True, "fp16": False, "use_cpu": True, "mixed_precision": "bf16"}),
    ],
)
def test_flag_gives_training_arguments_on_cpu(monkeypatch, tmp_path, choice, use_cpu, launcher, expected):
    monkeypatch.setattr(finetune_precision, "training_device_type", lambda use_cpu: "cpu")  # a GPU machine too
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    precision, keywords = finetune_precision_arguments(choice, use_cpu)
    assert precision == expected["mixed_precision"]
    assert keywords == {name: expected[name] for name in ("bf16", "fp16", "use_cpu")}
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to="none", **keywords)
    assert {name: getattr(arguments, name) for name in expected} == expected
    if keywords["use_cpu"]:
        assert arguments.device.type == "cpu"


def record_training_outputs(monkeypatch) -> list[tuple[torch.dtype, float]]:
    """`(head output dtype, loss)` of every training-mode forward of the classifier that `fine_tune` builds (under
    LoRA too: peft's wrapper calls it, and its trained copy of the head keeps the hook). The dtype is the head's: the
    model's own outputs come back in fp32 (Accelerate wraps the forward in `convert_outputs_to_fp32`)."""
    recorded, head_dtypes = [], []

    def record_head(module, inputs, output):
        head_dtypes.append(output.dtype)

    def record(module, inputs, output):
        if module.training:
            recorded.append((head_dtypes[-1], output.loss.item()))

    build = finetune._classifier_from

    def classifier_from(*args, **kwargs):
        model = build(*args, **kwargs)
        model.classifier.register_forward_hook(record_head)
        model.register_forward_hook(record)
        return model

    monkeypatch.setattr(finetune, "_classifier_from", classifier_from)
    return recorded


def fine_tune_tiny(method: str = "full", **settings):
    """One epoch of 2 steps on synthetic records, on CPU unless `use_cpu=False` is given (on a GPU machine too)."""
    data = synthetic_ptbxl(sizes=(8, 6, 6))
    arguments = ProbeArguments(mode="finetune", finetune_method=method, batch_size=4, finetune_learning_rate=1e-3,
                               finetune_max_epochs=1, **{"use_cpu": True, **settings})  # fmt: skip
    encoder, feature_extractor = tiny_encoder()
    return finetune.fine_tune(
        encoder, feature_extractor, data, "superclass", probe_rows(data, "superclass"), arguments
    )


def test_default_on_cpu_is_the_fp32_run_and_bf16_trains_in_bf16(monkeypatch):
    """The default resolves to 'no' on CPU and its numbers are exactly those of an explicit fp32 run (so those of
    every run before the flag existed); bf16 autocast changes them, its losses stay finite."""
    recorded = record_training_outputs(monkeypatch)
    runs = {}
    for choice in ("auto", "no", "bf16"):
        recorded.clear()
        *logits, training = fine_tune_tiny(**({} if choice == "auto" else {"mixed_precision": choice}))
        runs[choice] = (logits, training, list(recorded))
    for choice, expected, dtype in (("auto", "no", torch.float32), ("no", "no", torch.float32),
                                    ("bf16", "bf16", torch.bfloat16)):  # fmt: skip
        _, training, outputs = runs[choice]
        assert training["mixed_precision"] == expected
        assert len(outputs) == 2 and {output_dtype for output_dtype, _ in outputs} == {dtype}  # 8 rows, batch 4
        assert all(math.isfinite(loss) for _, loss in outputs)
    for default, fp32 in zip(runs["auto"][0], runs["no"][0]):
        np.testing.assert_array_equal(default, fp32)
    assert [loss for _, loss in runs["auto"][2]] == [loss for _, loss in runs["no"][2]]
    validation_bf16, test_bf16 = runs["bf16"][0]
    assert test_bf16.dtype == np.float32 and np.isfinite(test_bf16).all() and np.isfinite(validation_bf16).all()
    assert not np.array_equal(test_bf16, runs["no"][0][1])  # bf16 did change the numbers
    np.testing.assert_allclose(test_bf16, runs["no"][0][1], atol=0.1)  # ... by bf16's rounding, not more


def test_lora_trains_in_bf16_under_peft(monkeypatch):
    recorded = record_training_outputs(monkeypatch)
    *logits, training = fine_tune_tiny("lora", mixed_precision="bf16")
    assert (training["method"], training["mixed_precision"]) == ("lora", "bf16")
    assert recorded and {dtype for dtype, _ in recorded} == {torch.bfloat16}
    assert all(math.isfinite(loss) for _, loss in recorded) and all(np.isfinite(array).all() for array in logits)


def test_launcher_precision_is_followed_and_a_contradiction_refused(monkeypatch):
    """What `accelerate launch --mixed_precision bf16` (or its config file) gives one process: the environment."""
    monkeypatch.setattr(finetune_precision, "training_device_type", lambda use_cpu: "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    recorded = record_training_outputs(monkeypatch)
    *_, training = fine_tune_tiny()
    assert training["mixed_precision"] == "bf16" and {dtype for dtype, _ in recorded} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"--mixed_precision no contradicts `accelerate launch`'s mixed precision"):
        fine_tune_tiny(mixed_precision="no")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_on_cuda_auto_is_bf16_on_ampere_and_fp16_runs_when_asked(monkeypatch, method):
    recorded = record_training_outputs(monkeypatch)
    bf16_gpu = torch.cuda.get_device_capability() >= (8, 0)
    for choice, expected in (("auto", "bf16" if bf16_gpu else "no"), ("fp16", "fp16")):
        recorded.clear()
        *logits, training = fine_tune_tiny(method, use_cpu=False, mixed_precision=choice)
        assert training["mixed_precision"] == expected
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[expected]
        assert recorded and {output_dtype for output_dtype, _ in recorded} == {dtype}
        assert all(math.isfinite(loss) for _, loss in recorded) and all(np.isfinite(array).all() for array in logits)
    if not bf16_gpu:
        with pytest.raises(ValueError, match=r"mixed_precision 'bf16' needs a GPU with bf16 \(compute capability"):
            fine_tune_tiny(method, use_cpu=False, mixed_precision="bf16")


def probe_argv(checkpoint: Path, output: Path, *flags: str) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--dataset", str(BUNDLED_PTBXL), "--mode", "finetune",
            "--finetune_max_epochs", "1", "--batch_size", "32", "--num_bootstrap", "0", "--baseline", "false",
            "--output_dir", str(output), *flags]  # fmt: skip


@pytest.mark.slow  # the command end to end on the bundled records, twice (about 15 s on 2 shared cores)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_probe_command_fine_tunes_in_bf16_and_records_it(base_checkpoint, tmp_path, method):  # noqa: F811
    main(probe_argv(base_checkpoint, tmp_path, "--mixed_precision", "bf16", "--finetune_method", method,
                    *(["--finetune_learning_rate", "1e-3"] if method == "lora" else [])))  # fmt: skip
    name = f"fine-tune{'-lora' if method == 'lora' else ''}_superclass_1_seed0"
    results = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["protocol"]["finetune_method"] == method and results["protocol"]["mixed_precision"] == "bf16"
    assert results["model"]["training"]["mixed_precision"] == "bf16"
    assert math.isfinite(results["model"]["metrics"]["macro_auroc"]["value"])


@pytest.mark.slow  # accelerate launch in a subprocess (about 20 s on 2 shared cores)
def test_accelerate_launch_mixed_precision_reaches_fine_tuning_and_the_results(base_checkpoint, tmp_path):  # noqa: F811
    """The real launcher, one process (on the GPU where there is one): its --mixed_precision bf16 is what the Trainer
    trains in and the results say so (before the flag existed it was also trained in, but recorded nowhere)."""
    device_flags = [] if torch.cuda.is_available() else ["--cpu"]
    argv = [*ACCELERATE_LAUNCH, *device_flags, "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
            "bf16", "--dynamo_backend", "no", "-m", "merit_hf.training.probe",
            *probe_argv(base_checkpoint, tmp_path)]  # fmt: skip
    done = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "fine-tune_superclass_1_seed0.json").read_text())
    assert results["protocol"]["mixed_precision"] == "bf16"
    assert results["model"]["training"]["mixed_precision"] == "bf16"


@pytest.mark.slow  # two launches of 2 and 1 processes (about 40 s on 2 shared cores)
def test_two_processes_with_batch_b_fine_tune_as_one_with_batch_2b(base_checkpoint, tmp_path):  # noqa: F811
    """The README's claim for `--mode finetune`: random crops keyed by (seed, epoch, ecg_id) and DDP's mean gradient
    make 2 processes of batch b train as 1 process of batch 2b, when the training records are a multiple of 2b (172
    superclass records at label fraction 0.5 = 2 x 86; otherwise Accelerate pads the last batch with repeats)."""
    common = ["-m", "merit_hf.training.probe", "--model_name_or_path", str(base_checkpoint), "--dataset",
              str(BUNDLED_PTBXL), "--mode", "finetune", "--label_fractions", "0.5", "--finetune_max_epochs", "2",
              "--num_bootstrap", "0", "--baseline", "false", "--use_cpu", "true"]  # fmt: skip
    runs = {
        "two": [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *common, "--batch_size", "43"],
        "one": [sys.executable, *common, "--batch_size", "86"],
    }  # fmt: skip
    results = {}
    for name, argv in runs.items():
        done = subprocess.run([*argv, "--output_dir", str(tmp_path / name)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "fine-tune_superclass_0.5_seed0.json").read_text())
    two, one = results["two"]["model"], results["one"]["model"]
    assert two["training"]["num_processes"] == 2 and two["training"]["global_batch_size"] == 86
    assert two["training"]["throughput"]["ecgs_seen"] == one["training"]["throughput"]["ecgs_seen"] == 2 * 172
    assert two["metrics"]["macro_auroc"]["value"] == pytest.approx(one["metrics"]["macro_auroc"]["value"], abs=1e-5)
    assert two["metrics"]["macro_f1"]["value"] == pytest.approx(one["metrics"]["macro_f1"]["value"], abs=1e-5)
    assert two["training"]["best_epoch"] == one["training"]["best_epoch"]
