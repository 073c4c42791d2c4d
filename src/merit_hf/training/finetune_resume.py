"""Resuming an interrupted fine-tune (`merit_hf.training.finetune`, `--resume_from_checkpoint latest`): what a fine-tune
keeps on disk while it runs, which checkpoint a resume continues from, and when it refuses.

The fine-tuning command runs units of work: one results file `<run>.json` per label set, label fraction and seed, each
with two roles, the checkpoint's encoder (`model`) and its random-init twin (`baseline`). While a role trains,
`<run>_<role>_checkpoints/` beside the results file holds:

- `settings.json`: the unit's settings (`unit_settings`: the protocol with every fine-tuning and feature-extractor
  setting and the mixed precision, the data and its records, the encoder's weights, the number of processes),
  written when the role starts;
- `checkpoint-<step>/`: the Trainer's full checkpoints (weights, AdamW state, scheduler, RNG states, and
  `trainer_state.json` with the epoch, the best epoch and its metric and the early-stopping counter), written at
  every epoch's end and every `--finetune_save_steps` steps, each closed by `run_history.json` (the throughput so far,
  the steps the run resumed at). The Trainer keeps two (`save_total_limit=2`): the newest and the best epoch's,
  which it never rotates out, or the newest two when the newest is the best; a third while one is written. So a
  checkpoint a kill interrupted, or one damaged, always has an earlier one to fall back to, and a run killed after
  its last epoch (while scoring) resumes without training again;
- `finished.json`: the role's results entry once it is trained and scored; its checkpoints are then removed.

When the unit's results file is written, its role folders are removed. A resume keeps a finished results file, and
a finished role's entry, only when their settings are this run's, and refuses otherwise, naming each setting that
differs: it never joins numbers of two settings in one results file, nor reports a file of other settings as this
run's.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from ..evaluation.results import EvaluationResults, json_safe, read_results, write_json_whole
from ..utils.throughput import ThroughputMeter
from .checkpoint_integrity import damaged_files

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
FINISHED_FILE = "finished.json"
# The last file of each checkpoint (the Trainer calls `on_save` after writing its own files and rotating the old
# checkpoints out): a checkpoint without it was being saved when the run stopped.
RUN_HISTORY_FILE = "run_history.json"
ROLES = ("model", "baseline")
OVERWRITE_ADVICE = "start again with --overwrite_output_dir true, or choose another --output_dir"


def role_checkpoint_dir(output_file: str | Path, role: str) -> Path:
    """`<run>_<role>_checkpoints/` beside the results file `<run>.json`: where a role of the unit keeps its settings,
    checkpoints and finished entry while the unit runs."""
    output_file = Path(output_file)
    return output_file.with_name(f"{output_file.stem}_{role}_checkpoints")


# ----------------------------------------------------------------------------------------------------------------------
# Settings: what decides a unit's numbers
# ----------------------------------------------------------------------------------------------------------------------
def unit_settings(
    *,
    task: str,
    label_set: str,
    label_names: Sequence[str],
    label_fraction: float,
    seed: int,
    protocol: Mapping[str, Any],
    dataset: Mapping[str, Any],
    ecg_encoder: str | None,
    num_processes: int,
    baseline: bool,
    merged_model: bool,
) -> dict[str, Any]:
    """The settings that decide a fine-tune unit's numbers, as its results file records them: the protocol (every
    fine-tuning setting, the feature extractor's, the mixed precision, the bootstrap), the dataset entry (source,
    rate, records per split, training label counts), the fingerprint of the encoder's weights, the number of processes
    (the batch each step trains), whether the random-init baseline and a merged LoRA model are made. Not the
    encoder's path (a moved folder is the same encoder) nor where the outputs go. JSON values, so that settings read
    back from a file compare equal (`settings_differences`)."""
    return json_safe(
        {
            "task": task,
            "label_set": label_set,
            "label_names": list(label_names),
            "label_fraction": label_fraction,
            "seed": seed,
            "protocol": dict(protocol),
            "dataset": dict(dataset),
            "ecg_encoder": ecg_encoder,
            "num_processes": num_processes,
            "baseline": baseline,
            "merged_model": merged_model,
        }
    )


def settings_of_results(results: EvaluationResults) -> dict[str, Any]:
    """`unit_settings` of a written fine-tune results file."""
    training = results.model.extra.get("training") or {}
    return unit_settings(
        task=results.task,
        label_set=results.label_set,
        label_names=results.label_names,
        label_fraction=results.label_fraction,
        seed=results.seed,
        protocol=results.protocol,
        dataset=results.dataset,
        ecg_encoder=(results.model.weights_fingerprint or {}).get("ecg_encoder"),
        num_processes=training.get("num_processes"),
        baseline=results.baseline is not None,
        merged_model="merged_dir" in training,
    )


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        return {key: item for name, inner in value.items() for key, item in _flat(inner, f"{prefix}{name}.").items()}
    return {prefix[:-1]: value}


def settings_differences(saved: Mapping[str, Any], expected: Mapping[str, Any], saved_name: str) -> list[str]:
    """`"<dotted.field>: <saved_name> <value>, this run <value>"` for every setting that differs."""
    saved_flat, expected_flat = _flat(saved), _flat(expected)
    return [
        f"{key}: {saved_name} {saved_flat.get(key, '(not set)')!r}, this run {expected_flat.get(key, '(not set)')!r}"
        for key in sorted(set(saved_flat) | set(expected_flat))
        if key not in saved_flat or key not in expected_flat or saved_flat[key] != expected_flat[key]
    ]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: cannot be read back ({error}); remove {path.parent} to run that fine-tune again from epoch 0, "
            f"or {OVERWRITE_ADVICE}"
        ) from error


def finished_unit(output_file: Path, settings: Mapping[str, Any], roles: Sequence[str]) -> EvaluationResults | None:
    """What `--resume_from_checkpoint latest` does with a unit before it trains anything: its results file, when an
    earlier run finished it with these `settings` (`None` when it is not written yet). Refuses a results file or a
    role folder (`role_checkpoint_dir`) of other settings, naming each setting that differs, and a role folder whose
    settings cannot be read."""
    if output_file.exists():
        try:
            results = read_results(output_file)
        except (OSError, ValueError) as error:
            raise ValueError(f"{output_file}: cannot be read back ({error}); {OVERWRITE_ADVICE}") from error
        if differences := settings_differences(settings_of_results(results), settings, "results file"):
            raise ValueError(
                f"{output_file}: written with other settings than this run's, so it is neither kept as this run's "
                f"result nor replaced: {'; '.join(differences)}. Run with that file's settings to continue, or "
                f"{OVERWRITE_ADVICE}."
            )
        return results
    for role in roles:
        folder = role_checkpoint_dir(output_file, role)
        if (folder / SETTINGS_FILE).is_file():
            saved = _read_json(folder / SETTINGS_FILE)
            if differences := settings_differences(saved, settings, "interrupted run"):
                raise ValueError(
                    f"{folder}: an interrupted fine-tune with other settings than this run's, so it cannot be "
                    f"continued: {'; '.join(differences)}. Continue it with its settings, or {OVERWRITE_ADVICE}."
                )
        elif trainer_checkpoints(folder):
            raise ValueError(
                f"{folder}: holds checkpoints without {SETTINGS_FILE} (written by a merit_hf that could not resume a "
                f"fine-tune), so their settings cannot be checked; {OVERWRITE_ADVICE}"
            )
    return None


def finished_role_entry(folder: Path) -> dict[str, Any] | None:
    """A role's results entry (`finished.json`) when an earlier run trained and scored it, else `None`: its settings
    are the folder's `settings.json`, which `finished_unit` compared with this run's."""
    return _read_json(folder / FINISHED_FILE) if (folder / FINISHED_FILE).is_file() else None


def start_role(folder: Path, settings: Mapping[str, Any], resume: bool) -> None:
    """Before a role trains: without `resume`, remove what an earlier run left in its folder; write this run's
    `settings.json`. On the first process only."""
    if not resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_whole(folder / SETTINGS_FILE, settings, indent=1)


def finish_role(folder: Path, entry: Mapping[str, Any]) -> None:
    """Keep a role's results entry once it is trained and scored, so that a resume does not train it again."""
    write_json_whole(folder / FINISHED_FILE, entry, indent=1)


def remove_role_folders(output_file: Path) -> None:
    """Remove the unit's role folders, once its results file is written."""
    for role in ROLES:
        shutil.rmtree(role_checkpoint_dir(output_file, role), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: which one a resume continues from
# ----------------------------------------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    """The step in a Trainer checkpoint's name, `checkpoint-<step>`."""
    return int(path.name.rsplit("-", 1)[1])


def trainer_checkpoints(folder: Path) -> list[Path]:
    """The Trainer's `checkpoint-<step>` folders in `folder`, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*[0-9]"), key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """Whether the saving of a checkpoint got to its end (`RUN_HISTORY_FILE`, written last, is there)."""
    return (path / TRAINER_STATE_NAME).is_file() and (path / RUN_HISTORY_FILE).is_file()


def checkpoint_problems(path: Path, num_processes: int, check_best: bool = True) -> dict[str, str]:
    """`{file: problem}` of a checkpoint: a file every Trainer checkpoint of a fine-tune has that is missing (the
    weights or the LoRA adapter, optimizer, scheduler, one RNG state per process, trainer state, run history), a file
    that does not read back whole (`damaged_files`), and, with `check_best`, the best epoch's checkpoint its state
    names when that one is missing or has problems of its own (the Trainer would otherwise drop it with a warning
    and keep the last epoch's weights instead of the best's)."""
    rng_states = (
        ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{index}.pth" for index in range(num_processes)]
    )
    required = [TRAINER_STATE_NAME, RUN_HISTORY_FILE, OPTIMIZER_NAME, SCHEDULER_NAME, *rng_states]
    problems = {name: "is missing" for name in required if not (path / name).is_file()}
    weights = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
    if not any((path / name).is_file() for name in weights):
        problems[SAFE_WEIGHTS_NAME] = f"is missing (and so is {ADAPTER_SAFE_WEIGHTS_NAME})"
    problems.update(damaged_files(path))
    if check_best and TRAINER_STATE_NAME not in problems:
        best = json.loads((path / TRAINER_STATE_NAME).read_text()).get("best_model_checkpoint")
        if best is not None and Path(best) != path:
            if not Path(best).is_dir():
                problems["best epoch's checkpoint"] = f"{best} is missing"
            elif best_problems := checkpoint_problems(Path(best), num_processes, check_best=False):
                problems["best epoch's checkpoint"] = f"{best} is damaged ({_described(best_problems)})"
    return problems


def _described(problems: Mapping[str, str]) -> str:
    return "; ".join(f"{name} {problem}" for name, problem in sorted(problems.items()))


def find_resume_checkpoint(folder: Path, resume_from_checkpoint: str, num_processes: int) -> Path | None:
    """The checkpoint a resume continues from. `"latest"`: the newest complete one in `folder` whose files (and best
    epoch's checkpoint) read back whole; newer ones a kill interrupted or that are damaged are passed over with a
    warning naming each and its problem. With none complete, `None` (the fine-tune starts at epoch 0, and says so);
    with only damaged ones, a `ValueError` naming them (never weights that did not load). A path: that checkpoint,
    refused when it has problems."""
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if problems := checkpoint_problems(path, num_processes):
            raise ValueError(f"{path}: cannot resume from this checkpoint: {_described(problems)}")
        return path
    passed_over: dict[str, str] = {}
    damaged = False
    for path in reversed(trainer_checkpoints(folder)):
        if not is_complete(path):
            passed_over[path.name] = "incomplete (its saving was interrupted)"
            continue
        if problems := checkpoint_problems(path, num_processes):
            passed_over[path.name] = f"damaged: {_described(problems)}"
            damaged = True
            continue
        if passed_over:
            logger.warning("%s: resuming from %s, the newest intact checkpoint; passed over %s", folder, path.name,
                           "; ".join(f"{name} ({why})" for name, why in passed_over.items()))  # fmt: skip
        return path
    if damaged:
        raise ValueError(
            f"{folder}: no checkpoint there can be resumed: "
            + "; ".join(f"{name} {why}" for name, why in passed_over.items())
            + f". Remove {folder} to train this fine-tune again from epoch 0, or {OVERWRITE_ADVICE}."
        )
    logger.warning(
        "--resume_from_checkpoint latest: no complete checkpoint in %s%s; this fine-tune starts at epoch 0",
        folder,
        f" ({len(passed_over)} incomplete one(s) there are removed)" if passed_over else "",
    )
    return None


def stopped_at_step(path: Path | None) -> int | None:
    """The step at which the run of checkpoint `path` had stopped (early stopping or its last epoch), `None` when it
    was still training. Given as `max_steps` to the resumed Trainer, which otherwise trains one step of another epoch
    before it reads the restored stop."""
    if path is None:
        return None
    state = json.loads((path / TRAINER_STATE_NAME).read_text())
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    return state["global_step"] if control.get("args", {}).get("should_training_stop") else None


def remove_checkpoints_after(folder: Path, step: int) -> None:
    """Remove the checkpoints of `folder` after `step`, where the run starts again: those a kill interrupted or that
    were passed over as damaged (the Trainer would write the new ones into them, and rotate them in among its own)."""
    for path in trainer_checkpoints(folder):
        if checkpoint_step(path) > step:
            shutil.rmtree(path)


def load_run_history(path: Path | None) -> dict[str, Any]:
    """`run_history.json` of checkpoint `path`: the throughput counts of the run up to it and the steps it resumed at
    before (empty for a run that starts at epoch 0)."""
    if path is None:
        return {"throughput": {}, "resumed_at_steps": []}
    return json.loads((path / RUN_HISTORY_FILE).read_text())


class RunHistoryCallback(TrainerCallback):
    """Closes each checkpoint with `run_history.json`: the `ThroughputMeter`'s counts so far (a resumed run adds them,
    so that its totals cover the whole run) and the steps at which the run resumed."""

    def __init__(self, meter: ThroughputMeter, resumed_at_steps: Sequence[int]):
        self.meter = meter
        self.resumed_at_steps = list(resumed_at_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_json_whole(folder / RUN_HISTORY_FILE, indent=1,
                             value={"throughput": self.meter.run_counts(), "resumed_at_steps": self.resumed_at_steps})  # fmt: skip


class SaveStepsCallback(TrainerCallback):
    """Saves a checkpoint every `save_steps` optimizer steps inside an epoch (`--finetune_save_steps`), beside those of
    each epoch's end (the Trainer's `save_strategy="epoch"`, after the evaluation that early stopping and the best
    epoch need): a `save_strategy="steps"` would have to evaluate at every save for `load_best_model_at_end`. A step
    that ends an epoch is left to the epoch's own save."""

    def __init__(self, save_steps: int):
        self.save_steps = save_steps

    def on_step_end(self, args, state, control, **kwargs):
        # `state.epoch` is `epoch + steps done / steps per epoch`: a whole number exactly at an epoch's last step
        if state.global_step % self.save_steps == 0 and state.epoch != int(state.epoch):
            control.should_save = True


__all__ = [
    "FINISHED_FILE",
    "ROLES",
    "RUN_HISTORY_FILE",
    "SETTINGS_FILE",
    "RunHistoryCallback",
    "SaveStepsCallback",
    "checkpoint_problems",
    "checkpoint_step",
    "find_resume_checkpoint",
    "finish_role",
    "finished_role_entry",
    "finished_unit",
    "load_run_history",
    "remove_checkpoints_after",
    "remove_role_folders",
    "role_checkpoint_dir",
    "settings_differences",
    "settings_of_results",
    "start_role",
    "stopped_at_step",
    "trainer_checkpoints",
    "unit_settings",
]
