"""An interrupted fine-tune resumes (`--resume_from_checkpoint latest`, `merit_hf.training.finetune_resume`): it ends
with the results of the uninterrupted run, keeps what was finished, refuses other settings and damaged checkpoints.

The interruptions are exceptions raised inside the Trainer's loop (a Ctrl-C or a crash does the same to the process;
a kill leaves the files as they were at that moment, which the corrupt-checkpoint tests imitate). "The same results"
is exact equality on the CPU: the resumed run restores the weights, AdamW's moments, the scheduler and the RNG states
bit for bit, sees the batches in the same order with the same crops, and so does the same float32 operations in the
same order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from transformers import Trainer

from merit_hf.evaluation.probe import ProbeArguments, probe_rows
from merit_hf.evaluation.results import read_results
from merit_hf.training import finetune
from merit_hf.training.finetune_resume import RUN_HISTORY_FILE, role_checkpoint_dir
from merit_hf.training.probe import main
from tests.test_eval_probe import synthetic_ptbxl
from tests.test_trainer_classification import tiny_encoder

# 24 training records in batches of 8: 3 steps per epoch. With a checkpoint every 2 steps inside an epoch, this run
# is best at epoch 1, then 2 epochs without a gain stop it at epoch 3 (step 9); a run interrupted when step 9 begins
# has kept checkpoint-3 (the best epoch) and checkpoint-8 (inside epoch 3, the early-stopping counter at 1).
DATA = synthetic_ptbxl(sizes=(24, 8, 6))
ROWS = probe_rows(DATA, "superclass")
FULL = {"finetune_learning_rate": 1e-3}
# LoRA: best at epoch 3, stopped after epoch 5 (step 15); interrupted at step 11: checkpoint-9 (best) and checkpoint-10
LORA = {"finetune_method": "lora", "finetune_learning_rate": 1e-2}


class Interrupted(Exception):
    """What the tests raise to stop a run part-way."""


def arguments(**overrides) -> ProbeArguments:
    settings = {"mode": "finetune", "batch_size": 8, "finetune_max_epochs": 8, "finetune_patience": 2,
                "finetune_save_steps": 2, "num_bootstrap": 0, **FULL, **overrides}  # fmt: skip
    return ProbeArguments(**settings)


def interrupt_trainer(monkeypatch, at_step: int, trainer: int = 1, method: str = "training_step") -> None:
    """Make `fine_tune`'s `trainer`-th Trainer from now raise `Interrupted` when its step `at_step + 1` begins (with
    `method="predict"`: when it scores, its training done)."""
    made = []

    class InterruptedTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            self.interrupted = len(made) == trainer

        def training_step(self, *args, **kwargs):
            if self.interrupted and method == "training_step" and self.state.global_step == at_step:
                raise Interrupted(f"at step {at_step}")
            return super().training_step(*args, **kwargs)

        def predict(self, *args, **kwargs):
            if self.interrupted and method == "predict":
                raise Interrupted("while scoring")
            return super().predict(*args, **kwargs)

    monkeypatch.setattr(finetune, "Trainer", InterruptedTrainer)


def run(checkpoint_dir: Path | None, resume: str | None = None, **overrides):
    encoder, feature_extractor = tiny_encoder()
    return finetune.fine_tune(encoder, feature_extractor, DATA, "superclass", ROWS, arguments(**overrides), seed=0,
                              checkpoint_dir=checkpoint_dir, resume_from_checkpoint=resume)  # fmt: skip


def interrupted(monkeypatch, folder: Path, at_step: int, method: str = "training_step", **overrides) -> list[str]:
    """Run into `folder` until the interruption; the checkpoints it left."""
    with monkeypatch.context() as patched:
        interrupt_trainer(patched, at_step, method=method)
        with pytest.raises(Interrupted):
            run(folder, **overrides)
    return sorted(path.name for path in folder.glob("checkpoint-*"))


def without_timing(training: dict) -> dict:
    """The training record less what measures time (and the resume's own note)."""
    return {key: value for key, value in training.items() if key not in ("throughput", "resumed_at_steps")}


def assert_same_run(resumed, uninterrupted) -> None:
    (validation, test, training), (validation_0, test_0, training_0) = resumed, uninterrupted
    np.testing.assert_array_equal(validation, validation_0)
    np.testing.assert_array_equal(test, test_0)
    assert without_timing(training) == without_timing(training_0)
    for count in ("steps_measured", "ecgs_seen"):  # the whole run, the part before the checkpoint included
        assert training["throughput"][count] == training_0["throughput"][count]


@pytest.fixture(scope="module")
def uninterrupted():
    return {"full": run(None), "lora": run(None, **LORA)}


@pytest.mark.parametrize(
    ("method", "at_step", "left", "resumed_at"),
    [
        ("full", 8, ["checkpoint-3", "checkpoint-8"], 8),  # inside epoch 3, one epoch without a gain counted
        ("full", 6, ["checkpoint-3", "checkpoint-6"], 6),  # at the end of epoch 2
        ("lora", 11, ["checkpoint-10", "checkpoint-9"], 10),
    ],
)
def test_an_interrupted_fine_tune_resumes_to_the_uninterrupted_results(
    method, at_step, left, resumed_at, uninterrupted, monkeypatch, tmp_path
):
    """The resumed run trains the steps the interrupted one had not, with the crops, dropout and early stopping it
    would have had: the same logits, best epoch, epochs run and ECGs seen (without the early-stopping counter, the run
    interrupted inside epoch 3 would train 4 epochs; before, a fine-tune could not resume at all)."""
    overrides = LORA if method == "lora" else {}
    assert interrupted(monkeypatch, tmp_path / "run", at_step, **overrides) == left
    resumed = run(tmp_path / "run", "latest", **overrides)
    assert_same_run(resumed, uninterrupted[method])
    assert resumed[2]["resumed_at_steps"] == [resumed_at]
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # a finished fine-tune removes its checkpoints


def test_a_fine_tune_killed_while_scoring_resumes_without_training_again(uninterrupted, monkeypatch, tmp_path):
    """The checkpoint of the epoch that stopped training says so; the resumed Trainer would otherwise train one more
    epoch before it read the stop (measured: 4 epochs, 12 steps, instead of 3 and 9)."""
    assert interrupted(monkeypatch, tmp_path / "run", 0, method="predict") == ["checkpoint-3", "checkpoint-9"]
    resumed = run(tmp_path / "run", "latest")
    assert_same_run(resumed, uninterrupted["full"])
    assert resumed[2]["resumed_at_steps"] == [9]


@pytest.mark.parametrize("damage", ["truncated optimizer", "corrupt RNG state", "save interrupted"])
def test_a_damaged_or_incomplete_newest_checkpoint_is_passed_over(
    damage, uninterrupted, monkeypatch, tmp_path, caplog
):
    """The newest checkpoint is truncated, corrupt or was being written: the resume continues from the one before
    it (the best epoch's, step 3), says which it passed over and why, and still ends as the uninterrupted run."""
    folder = tmp_path / "run"
    interrupted(monkeypatch, folder, 8)
    newest = folder / "checkpoint-8"
    if damage == "truncated optimizer":
        content = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(content[: len(content) // 2])
    elif damage == "corrupt RNG state":
        content = bytearray((newest / "rng_state.pth").read_bytes())
        content[len(content) // 3] ^= 0xFF
        (newest / "rng_state.pth").write_bytes(bytes(content))
    else:
        (newest / RUN_HISTORY_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="merit_hf.training.finetune_resume"):
        resumed = run(folder, "latest")
    assert "resuming from checkpoint-3, the newest intact checkpoint; passed over checkpoint-8 (" in caplog.text
    expected = {
        "truncated optimizer": "optimizer.pt is not a complete torch.save archive",
        "corrupt RNG state": "rng_state.pth is corrupt",
        "save interrupted": "incomplete (its saving was interrupted)",
    }[damage]
    assert expected in caplog.text
    assert_same_run(resumed, uninterrupted["full"])
    assert resumed[2]["resumed_at_steps"] == [3]


def test_a_resume_refuses_when_no_intact_checkpoint_is_left(monkeypatch, tmp_path):
    """The best epoch's checkpoint is damaged: the newest one, which names it, cannot be continued either (its best
    weights would not load), and nothing else is left. The resume refuses, naming the folder and each problem, and
    trains nothing (never from weights that did not load)."""
    folder = tmp_path / "run"
    interrupted(monkeypatch, folder, 8)
    weights = folder / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setattr(finetune.Trainer, "train", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(ValueError) as refused:
        run(folder, "latest")
    message = str(refused.value)
    assert message.startswith(f"{folder}: no checkpoint there can be resumed: checkpoint-8 damaged: best epoch's ")
    assert (
        f"checkpoint {folder / 'checkpoint-3'} is damaged (model.safetensors is not a complete safetensors" in message
    )
    assert "; checkpoint-3 damaged: model.safetensors is not a complete safetensors file" in message
    assert message.endswith(
        f"Remove {folder} to train this fine-tune again from epoch 0, or start again with --overwrite_output_dir "
        "true, or choose another --output_dir."
    )
    assert sorted(path.name for path in folder.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-8"]  # kept


def test_latest_without_a_complete_checkpoint_starts_at_epoch_0_and_says_so(
    uninterrupted, monkeypatch, tmp_path, caplog
):
    folder = tmp_path / "run"
    assert interrupted(monkeypatch, folder, 1) == []  # stopped before its first checkpoint (step 2)
    (folder / "checkpoint-2").mkdir()  # and one whose saving a kill interrupted
    with caplog.at_level(logging.WARNING, logger="merit_hf.training.finetune_resume"):
        started_again = run(folder, "latest")
    assert (
        f"--resume_from_checkpoint latest: no complete checkpoint in {folder} (1 incomplete one(s) there are "
        "removed); this fine-tune starts at epoch 0" in caplog.text
    )
    assert_same_run(started_again, uninterrupted["full"])
    assert "resumed_at_steps" not in started_again[2]


# ----------------------------------------------------------------------------------------------------------------------
# The command: units of work (label set x fraction x seed, each with the encoder and its random-init twin)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_command")
    encoder, feature_extractor = tiny_encoder()
    encoder.save_pretrained(folder / "model")
    feature_extractor.save_pretrained(folder / "model")
    DATA.save_to_disk(str(folder / "data"))
    return folder / "model", folder / "data"


def command(checkpoint_and_data, output_dir: Path, *flags: str) -> list[str]:
    model, data = checkpoint_and_data
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--mode", "finetune", "--batch_size", "8",
            "--finetune_max_epochs", "8", "--finetune_patience", "2", "--finetune_learning_rate", "1e-3",
            "--finetune_save_steps", "2", "--num_bootstrap", "0", "--seeds", "0", "1", "--output_dir",
            str(output_dir), *flags]  # fmt: skip


def recorded_fine_tunes(monkeypatch) -> list[str]:
    """The checkpoint folder of every `fine_tune` the command runs from now, in order."""
    calls = []
    original = finetune.fine_tune

    def recording(*args, **kwargs):
        calls.append(Path(args[7]).name)
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "fine_tune", recording)
    return calls


def test_the_command_resumes_keeping_finished_units_and_refusing_other_settings(
    checkpoint_and_data, monkeypatch, tmp_path
):
    """Interrupted in its last fine-tune (seed 1's random-init twin), the command resumed with
    `--resume_from_checkpoint latest` trains that one alone, from its checkpoint: seed 0's results file and seed 1's
    finished encoder fine-tune are kept, not trained again, and the results equal an uninterrupted run's. Other
    settings are refused before anything trains, naming each setting that differs; a run that does not resume
    refuses the folder rather than throw away what the interrupted one trained."""
    whole = main(command(checkpoint_and_data, tmp_path / "whole"))
    output = tmp_path / "resumed"
    with monkeypatch.context() as patched:
        interrupt_trainer(patched, at_step=5, trainer=4)  # seed 0: model, baseline; seed 1: model, baseline
        with pytest.raises(Interrupted):
            main(command(checkpoint_and_data, output))
    first, second = output / "fine-tune_superclass_1_seed0.json", output / "fine-tune_superclass_1_seed1.json"
    assert first.is_file() and not second.exists()
    assert (role_checkpoint_dir(second, "model") / "finished.json").is_file()
    assert list(role_checkpoint_dir(second, "baseline").glob("checkpoint-*"))
    first_bytes = first.read_bytes()

    with pytest.raises(FileExistsError, match=r"_checkpoints.*pass --resume_from_checkpoint latest\.$"):
        main(command(checkpoint_and_data, output))
    changed = command(checkpoint_and_data, output, "--resume_from_checkpoint", "latest", "--finetune_patience", "3")
    with pytest.raises(ValueError) as refused:
        main(changed)
    assert str(refused.value).startswith(
        f"{first}: written with other settings than this run's, so it is neither kept as this run's result nor "
        "replaced: protocol.patience: results file 2, this run 3. Run with that file's settings to continue"
    )
    with pytest.raises(ValueError) as refused:
        main([*changed, "--seeds", "1"])  # the unit left half-done
    assert str(refused.value).startswith(
        f"{role_checkpoint_dir(second, 'model')}: an interrupted fine-tune with other settings than this run's, so it "
        "cannot be continued: protocol.patience: interrupted run 2, this run 3. Continue it with its settings"
    )

    trained = recorded_fine_tunes(monkeypatch)
    resumed = main(command(checkpoint_and_data, output, "--resume_from_checkpoint", "latest"))
    assert trained == [role_checkpoint_dir(second, "baseline").name]
    assert first.read_bytes() == first_bytes
    assert resumed == whole
    for name in (first.name, second.name):
        results, expected = read_results(output / name).to_dict(), read_results(tmp_path / "whole" / name).to_dict()
        for role in ("model", "baseline"):
            assert results[role]["metrics"] == expected[role]["metrics"]
            assert without_timing(results[role]["training"]) == without_timing(expected[role]["training"])
    assert read_results(second).baseline.extra["training"]["resumed_at_steps"] == [4]
    assert sorted(path.name for path in output.iterdir()) == [first.name, second.name]  # no checkpoints left

    trained.clear()  # everything finished: a resume trains nothing and keeps the files
    assert main(command(checkpoint_and_data, output, "--resume_from_checkpoint", "latest")) == whole
    assert trained == [] and first.read_bytes() == first_bytes


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"mode": "linear", "resume_from_checkpoint": "latest"}, "resume_from_checkpoint 'latest': set, but mode is"),
        ({"mode": "linear", "finetune_save_steps": 5}, "finetune_save_steps 5: set, but mode is 'linear'"),
        ({"mode": "finetune", "finetune_save_steps": 0}, r"finetune_save_steps: must be >= 1 \(or None\), got 0"),
        ({"mode": "finetune", "resume_from_checkpoint": "out/checkpoint-8"}, "resume_from_checkpoint: 'latest' or"),
        (
            {"mode": "finetune", "resume_from_checkpoint": "latest", "overwrite_output_dir": True},
            "--overwrite_output_dir: replaces the results and removes the checkpoints that --resume_from_checkpoint",
        ),
    ],
)
def test_resume_settings_that_make_no_sense_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        ProbeArguments(**flags)


def test_fine_tune_resumes_only_from_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="fine_tune: resume_from_checkpoint needs checkpoint_dir"):
        run(None, "latest")
    with pytest.raises(ValueError, match="run_fine_tune: resume_from_checkpoint continues the fine-tunes whose"):
        finetune.run_fine_tune(tiny_encoder()[0], DATA, arguments=arguments(resume_from_checkpoint="latest"))


def test_settings_differences_name_every_field_with_both_values():
    from merit_hf.training.finetune_resume import settings_differences

    saved = {"protocol": {"learning_rate": 1e-3, "lora": {"r": 8}}, "seed": 0}
    expected = {"protocol": {"learning_rate": 1e-3, "lora": {"r": 4}}, "seed": 0, "num_processes": 2}
    assert settings_differences(saved, expected, "results file") == [
        "num_processes: results file '(not set)', this run 2",
        "protocol.lora.r: results file 8, this run 4",
    ]
