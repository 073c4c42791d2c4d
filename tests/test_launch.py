"""Several launched processes: every command line refuses to run them as unjoined copies, and the linear probe runs on
the first process only. (Two-process runs against one process are in test_pretrain, test_report_generation and
test_embedding.)"""

from __future__ import annotations

import pytest

from merit_hf.utils.launch import is_first_launched_process, require_joined_processes


def test_processes_the_launcher_started_but_accelerate_did_not_join_are_refused(monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` without a GPU and without `--use_cpu true`: Accelerate gives
    each process a state of 1 process, so each ran the whole job and wrote the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        RuntimeError, match=r"launched as 2 processes .* runs alone as 1 of them.* Pass --use_cpu true"
    ):
        require_joined_processes(1)
    require_joined_processes(2)
    monkeypatch.delenv("WORLD_SIZE")
    require_joined_processes(1)  # no launcher


def test_linear_probe_runs_on_the_first_launched_process_only(monkeypatch, tmp_path):
    """The other processes return at once, before reading anything (the model path here does not exist): they used
    to run the whole probe too and write the same results files."""
    from merit_hf.training.probe import main

    monkeypatch.setenv("RANK", "1")
    assert not is_first_launched_process()
    assert main(["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == {}
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    assert is_first_launched_process()
