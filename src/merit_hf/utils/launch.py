"""A check that every process `accelerate launch` started takes part in the run.

`accelerate launch --multi_gpu --num_processes N` on a machine without a GPU starts N processes, but Accelerate
joins them only when it is told to run on the CPU (`Accelerator(cpu=True)`, `PartialState(cpu=True)`,
`TrainingArguments(use_cpu=True)`). Otherwise each process runs alone, as process 0 of 1: N copies of the whole job
that write the same output files, with nothing said (measured: `Accelerator()` in 2 launched CPU processes reports 1
process in each). The command lines call `require_joined_processes` once their state exists.
"""

from __future__ import annotations

import os


def require_joined_processes(num_processes: int, flag: str = "--use_cpu true") -> None:
    """Raise when the launcher started more processes (`WORLD_SIZE`, set by `torchrun` and `accelerate launch`) than
    the `num_processes` this process's Accelerate state has joined, naming the flag that joins them."""
    launched = launched_processes()
    if launched > num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE={launched}), but this one runs alone as {num_processes} "
            f"of them: without a GPU, Accelerate joins processes only on the CPU when asked to. Pass {flag} (each "
            "process would otherwise run the whole job and write the same files)"
        )


def launched_processes() -> int:
    """How many processes the launcher started (`WORLD_SIZE`; 1 without a launcher): the processes a job runs on once
    `require_joined_processes` has passed, known before any Accelerate state exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1")


def is_first_launched_process() -> bool:
    """Whether this is the launch's first process (`RANK` 0, or no launcher): the one that writes a job's shared
    outputs. Read from the environment, so it needs no process group (the linear probe's other processes exit
    without one)."""
    return int(os.environ.get("RANK", "0") or "0") == 0


__all__ = ["is_first_launched_process", "launched_processes", "require_joined_processes"]
