"""The encoder benchmark's measuring code runs (tiny shape, one round): the numbers in benchmarks/README.md come
from it, so it must not rot between the runs that refresh them."""

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import encoder_throughput  # noqa: E402
import reduced_leads  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("row, mode", [("merit_encoder", "infer"), ("merit_pretraining", "train")])
def test_encoder_throughput_group_measures_every_variant(row, mode):
    results = encoder_throughput.measure_group(row, "tiny-p75", mode, batch=2, rounds=2, device="cpu", dtype="fp32")
    by_variant = {result["variant"]: result for result in results["results"]}
    assert set(by_variant) == {"sdpa", "stmem_einsum"}
    for result in by_variant.values():
        assert result["ecgs_per_second"] > 0 and result["gflop_per_ecg_forward"] > 0
        assert 0 < result["fraction_of_matmul_peak"] < 2  # a model cannot run far above a plain matmul
    assert by_variant["sdpa"]["gflop_per_ecg_forward"] == by_variant["stmem_einsum"]["gflop_per_ecg_forward"]
    assert "vs_einsum_reference" in by_variant["sdpa"] and "vs_einsum_reference" not in by_variant["stmem_einsum"]


def test_einsum_reference_runs_in_every_layer_and_computes_the_same_attention(monkeypatch):
    import torch

    from merit_hf import MeritEcgConfig, MeritEcgModel

    calls = []
    original = encoder_throughput.einsum_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder_throughput, "einsum_attention", counting)
    encoder_throughput._register_einsum()
    model = MeritEcgModel(MeritEcgConfig.from_preset("tiny-p75")).eval()
    ecg = torch.randn(2, 12, model.config.num_samples)
    with torch.no_grad():
        fused = model(ecg).pooler_output
        assert not calls
        encoder_throughput.set_attention(model, "stmem_einsum")
        reference = model(ecg).pooler_output
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(reference, fused, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_reduced_lead_benchmark_writes_one_row_per_lead_count(tmp_path):
    """The reduced-lead benchmark on the bundled records with a tiny random model: every lead count gets its masked
    and zero-filled value, and 12 leads (nothing missing) equal each other."""
    import json

    import torch

    from merit_hf import MeritEcgModel, MeritFeatureExtractor
    from tests.conftest import BUNDLED_PTBXL, tiny_ecg_config

    torch.manual_seed(0)
    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "model")
    MeritFeatureExtractor.from_model_config(tiny_ecg_config()).save_pretrained(tmp_path / "model")
    summary = reduced_leads.main(["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(BUNDLED_PTBXL),
                                  "--output_dir", str(tmp_path / "out"), "--max_epochs", "2", "--num_bootstrap", "0",
                                  "--baseline", "false"])  # fmt: skip
    rows = summary["robustness_superclass_seed0"]
    assert sorted(rows) == [1, 2, 3, 6, 8, 12]
    assert rows[12]["masked"] == rows[12]["zeroed"] is not None
    assert rows[1]["masked"] != rows[1]["zeroed"]
    written = json.loads((tmp_path / "out" / "robustness_superclass_seed0.json").read_text())
    assert written["task"] == "robustness" and "leads_6_masked" in written["shifts"]
    table = (tmp_path / "out" / "reduced_leads.md").read_text()
    assert "| 2 | I, II |" in table and table.count("\n| ") == 9  # header, rule, clean, six lead counts


def test_end_to_end_names_the_stage_that_limits_the_script():
    """The end-to-end benchmark's verdict: nothing at 90 % of the step alone or more; else data (more than 10 % spent
    waiting for batches), else the per-term gradient norms (more than 10 % of the time), else the loop."""
    import pretrain_throughput

    def verdict(of_step_alone, data=0.0, diagnostics=0.0):
        steady = {"of_step_alone": of_step_alone, "data_wait_fraction": data, "diagnostics_fraction": diagnostics}
        return pretrain_throughput._limiting_stage(steady)

    assert verdict(0.95, data=0.5).startswith("nothing")
    assert verdict(0.6, data=0.3, diagnostics=0.3).startswith("data: the loop waits 30%")
    assert verdict(0.6, data=0.05, diagnostics=0.3).startswith("diagnostics: the per-term gradient norms take 30%")
    assert verdict(0.6, data=0.05, diagnostics=0.05).startswith("the loop around the step")
    assert pretrain_throughput.END_TO_END_VARIANTS["no per-term gradient norms"] == [
        "--gradient_norm_logging_steps", "0"
    ]  # fmt: skip


@pytest.mark.slow
def test_pretraining_memory_options_group_runs_every_option():
    """The GPU measurement of issue 14 item 4 (peak memory and MFU per option) runs on CPU, tiny shape, one step."""
    import pretrain_throughput

    results = pretrain_throughput.memory_options_group("tiny-p75", 1, ["none", "selective", "full, half the layers"],
                                                       warmup=0, steps=1, peak_tflops=1.0)  # fmt: skip
    assert [result["option"] for result in results] == ["none", "selective", "full, half the layers"]
    for result in results:
        assert "error" not in result, result
        assert result["ecgs_per_second"] > 0 and result["gflops_per_ecg"] > 0
        assert result["mfu"] == pytest.approx(result["achieved_tflops"])  # against the given 1 TFLOP/s peak
    assert len({result["gflops_per_ecg"] for result in results}) == 1  # model FLOPs: recomputation not counted


@pytest.mark.slow
def test_pretraining_memory_options_selective_runs_under_bf16_autocast():
    """Selective checkpointing under bf16 autocast (on a GPU; forced on here) with autocast's cache on failed in the
    backward ("aten._to_copy.default invocation index 2 ... not found in storage"), and is not how the pretraining
    script runs it (`make_accelerator` turns the cache off for selective)."""
    import pretrain_throughput

    results = pretrain_throughput.memory_options_group("tiny-p75", 2, ["selective"], warmup=0, steps=1,
                                                       peak_tflops=1.0, device="cpu", bf16_autocast=True)  # fmt: skip
    assert "error" not in results[0], results[0]
    assert results[0]["ecgs_per_second"] > 0


def test_pretraining_memory_options_passes_cpu_to_each_group(monkeypatch):
    """`--memory_options --cpu` on a GPU machine: each (preset, batch) runs in its own process, which picked CUDA."""
    import subprocess

    import pretrain_throughput

    commands, group_kwargs = [], []

    def run(command, **kwargs):
        commands.append(command)
        if "--single_memory_group" in command:
            group_kwargs.append(kwargs)
        return subprocess.CompletedProcess(command, 0, stdout="[]\n", stderr="")

    monkeypatch.setattr(pretrain_throughput.subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["pretrain_throughput.py", "--memory_options", "--cpu", "--base_batches", "1",
                                      "--small_batches", "--output", "/dev/null"])  # fmt: skip
    pretrain_throughput.main()
    groups = [command for command in commands if "--single_memory_group" in command]  # platform runs `uname` too
    assert len(groups) == 1 and "--cpu" in groups[0]
    # the group's stderr is not captured: its rows reach the log as measured, also when a deadline cuts the run short
    assert all(kwargs.get("stdout") == subprocess.PIPE and "stderr" not in kwargs and not kwargs.get("capture_output")
               for kwargs in group_kwargs)  # fmt: skip


def test_encoder_throughput_mfu_uses_the_peak_of_the_h100_variant(monkeypatch, tmp_path):
    """The MFU of a bf16 row is against the package's peak for the GPU's name: an H100 PCIe's 756 TFLOP/s, not the
    SXM's 989 that every "H100" got."""
    import torch

    row = {"row": "merit_encoder", "preset": "tiny-p75", "variant": "sdpa", "mode": "infer", "dtype": "bf16",
           "ecgs_per_second": 1.0, "gflop_per_ecg_forward": 1.0, "achieved_tflops": 75.6,
           "fraction_of_matmul_peak": 0.5}  # fmt: skip
    monkeypatch.setattr(encoder_throughput, "_in_subprocess", lambda **kwargs: {"results": [dict(row)]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    report = encoder_throughput.main(["--device", "cuda", "--dtypes", "bf16", "--presets", "tiny-p75", "--modes",
                                      "infer", "--skip_hubert", "--output", str(tmp_path / "out.json")])  # fmt: skip
    assert report["results"][0]["mfu_vs_dense_bf16_peak"] == pytest.approx(0.1)


def test_finetune_precision_writes_each_run_as_it_finishes(monkeypatch, tmp_path):
    """The JSON was written only after all runs: a run cut short by the device call's limit brought nothing back.
    Now after every run ("partial" until the checks), and whole at the end."""
    import json

    import finetune_precision

    def measure(method, precision, *args):
        if stop_after is not None and len(measured) == stop_after:
            raise TimeoutError("the step's budget")
        measured.append((method, precision))
        recorded = "no" if precision == "auto" else precision  # 'auto' on a CPU
        return {"method": method, "asked": precision, "protocol_mixed_precision": recorded,
                "training_mixed_precision": recorded, "seconds_per_step": 1.0, "test_macro_auroc": 0.5}  # fmt: skip

    monkeypatch.setattr(finetune_precision, "measure", measure)
    monkeypatch.setattr(finetune_precision, "load_dataset_dict", lambda *args: None)
    monkeypatch.setattr(finetune_precision, "training_device_type", lambda: "cpu")
    monkeypatch.setattr(finetune_precision.torch, "set_num_threads", lambda threads: None)
    output = tmp_path / "finetune_precision.json"
    monkeypatch.setattr(sys, "argv", ["finetune_precision.py", "--output", str(output)])
    measured, stop_after = [], 2
    with pytest.raises(TimeoutError):
        finetune_precision.main()
    written = json.loads(output.read_text())
    assert [(row["method"], row["asked"]) for row in written["results"]] == [("full", "no"), ("full", "auto")]
    assert written["partial"].startswith("2 of 6 runs") and "checks" not in written
    measured, stop_after = [], None
    finetune_precision.main()
    written = json.loads(output.read_text())
    assert len(written["results"]) == 6 and "partial" not in written and all(written["checks"].values())


def test_end_to_end_writes_each_row_as_it_finishes(monkeypatch, tmp_path):
    """The end-to-end JSON was written only after the step alone and every script run."""
    import json

    import pretrain_throughput

    def script(args, extra):
        if extra == pretrain_throughput.END_TO_END_VARIANTS["no per-term gradient norms"]:
            raise TimeoutError("the step's budget")
        steady = {"ecgs_per_second": 50.0, "data_wait_fraction": 0.0, "diagnostics_fraction": 0.0}
        return {"flags": extra, "steady": steady}

    monkeypatch.setattr(pretrain_throughput, "end_to_end_step_alone", lambda args, device: {"ecgs_per_second": 100.0})
    monkeypatch.setattr(pretrain_throughput, "end_to_end_script", script)
    monkeypatch.chdir(REPO_ROOT)  # main changes to the repository root
    output = tmp_path / "e2e.json"
    monkeypatch.setattr(sys, "argv", ["pretrain_throughput.py", "--end_to_end", "--cpu", "--output", str(output),
                                      "--e2e_variants", "persistent workers (default)", "no per-term gradient norms"])  # fmt: skip
    with pytest.raises(TimeoutError):
        pretrain_throughput.main()
    written = json.loads(output.read_text())["end_to_end"]
    assert written["step_alone"] == {"ecgs_per_second": 100.0}
    assert list(written["script"]) == ["persistent workers (default)"]
    assert written["script"]["persistent workers (default)"]["steady"]["of_step_alone"] == 0.5


@pytest.mark.slow
def test_encoder_throughput_measures_bf16_weights_and_says_why_fp8_is_skipped_on_cpu():
    """The GPU run compares autocast, bf16 weights and fp8; on a CPU the same code measures bf16 weights and records
    why fp8 cannot run there."""
    results = encoder_throughput.measure_group(
        "merit_encoder", "tiny-p75", "infer", batch=2, rounds=1, device="cpu", dtype="bf16", precision_variants=True
    )
    by_variant = {result["variant"]: result for result in results["results"]}
    assert set(by_variant) == {"sdpa", "stmem_einsum", "sdpa+bf16_weights"}
    assert (
        by_variant["sdpa+bf16_weights"]["weights"] == "bf16" and "vs_sdpa_autocast" in by_variant["sdpa+bf16_weights"]
    )
    assert "needs a CUDA GPU with FP8 tensor cores" in results["skipped"]["sdpa+fp8"]


@pytest.mark.slow
def test_cpu_inference_times_every_precision_against_the_references():
    import cpu_inference

    from merit_hf.models.merit.inference_precision import cpu_int8_engines

    result = cpu_inference.measure_preset("tiny-p75", batch=2, rounds=1, with_hubert=False, compile_bf16=True)
    assert set(result["ecgs_per_second"]) == {
        "einsum_ref/fp32", "merit/fp32", "einsum_ref/bf16-autocast", "einsum_ref/bf16", "merit/bf16-sdpa",
        "merit/bf16-matmul", "einsum_ref/int8", "merit/int8", *(f"merit/int8-{e}" for e in cpu_int8_engines()),
        "matmul_floor/fp32", "matmul_floor/bf16", "merit/bf16-compiled", "einsum_ref/bf16-compiled",
    }  # fmt: skip
    assert set(result["compile_seconds"]) == {"merit/bf16-compiled", "einsum_ref/bf16-compiled"}
    assert "merit/bf16-compiled vs einsum_ref/bf16-compiled" in result["ratios"]
    assert "matmul_floor/bf16 vs einsum_ref/bf16-autocast" in result["ratios"]
    breakdown = result["merit_bf16_sdpa_time_breakdown"]
    assert breakdown["ms_per_forward"]["linear layers (GELU fused into fc1)"] > 0
    assert breakdown["ms_per_forward"]["attention kernel"] > 0
    assert breakdown["ms_per_forward_total"] == pytest.approx(sum(breakdown["ms_per_forward"].values()), abs=0.3)
    assert result["int8_engine_picked_by_the_model"] in cpu_int8_engines()
    assert ("int8-onednn vs int8-x86" in result["ratios"]) is (len(cpu_int8_engines()) == 2)
    assert all(rate > 0 for rate in result["ecgs_per_second"].values())
    assert list(result["bf16_attention_picked_by_the_model"].values())[0] in ("sdpa", "matmul")
    assert all(0.99 < cosine <= 1.0 + 1e-6 for cosine in result["min_cosine_to_fp32_pooled_output"].values())
    assert result["min_cosine_to_fp32_pooled_output"]["merit/fp32"] > 0.99999  # prepacked or not: float rounding
    assert set(result["fp32_prepacking_timed_by_the_model"].values()) <= {"prepacked", "nn.Linear"}


def test_cpu_inference_matmul_floor_computes_exactly_the_blocks_matrix_products():
    """The floor's FLOPs are the encoder blocks' matrix products, attention's included, and nothing else: the model's
    forward FLOPs (eager attention, so the counter sees the score and output products) less the patch projection."""
    import cpu_inference
    import torch
    from encoder_throughput import build
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, make_input = build("merit_encoder", "tiny-p75", "eager")
    model.eval()
    inputs = make_input(2)
    tokens = cpu_inference._token_count(model, inputs)
    floor = cpu_inference.MatmulFloor(model, batch=2, tokens=tokens)
    with torch.inference_mode(), FlopCounterMode(display=False) as counted_model:
        model(**inputs)
    with torch.inference_mode(), FlopCounterMode(display=False) as counted_floor:
        floor()
    projection = model.embeddings.patch_projection
    patches = inputs["ecg_values"].shape[1] * (inputs["ecg_values"].shape[-1] // projection.in_features)
    embedding_flops = 2 * 2 * patches * projection.in_features * projection.out_features
    assert counted_floor.get_total_flops() == counted_model.get_total_flops() - embedding_flops
    assert floor.probabilities.shape == (2, model.config.num_attention_heads, tokens, tokens)


def test_cross_lead_copy_baseline_is_exact_when_a_visible_lead_carries_the_hidden_signal():
    """The masked-modelling benchmark's copy rule: a hidden patch of lead 0 whose twin lead 1 (here its negative) is
    visible at that moment is copied exactly, sign included; the patch-mean rule scores 1.0 in the same units."""
    import masked_modelling
    import torch

    torch.manual_seed(0)
    signal = torch.randn(4, 1, 200)
    values = torch.cat([signal, -signal, torch.randn(4, 10, 200)], dim=1)
    mask = torch.zeros(4, 12, 4)  # patches of 50 samples; 1 = hidden
    mask[:, 0, :2] = 1  # lead 0 hidden where lead 1 is visible, and the other way round
    mask[:, 1, 2:] = 1
    result = masked_modelling.baselines(values, mask, masked_modelling.lead_correlations(values), patch_size=50)
    assert result["patch_mean"] == pytest.approx(1.0, abs=1e-4)
    assert result["cross_lead_copy"] == pytest.approx(0.0, abs=1e-8)
    assert result["hidden_patches_with_a_visible_lead"] == 1.0
    mask[:, 1, :2] = 1  # now the twin is hidden too: the copy rule falls back to other, unrelated leads
    assert (
        masked_modelling.baselines(values, mask, masked_modelling.lead_correlations(values), 50)["cross_lead_copy"]
        > 0.5
    )


@pytest.mark.slow
def test_masked_modelling_benchmark_compares_the_decoders(tmp_path, monkeypatch):
    import json

    import masked_modelling

    output = tmp_path / "masked_modelling.json"
    argv = ["masked_modelling.py", "--steps", "2", "--eval_every", "1", "--threads", "1", "--schemes",
                "xavier_uniform", "--decoder_attention", "axial", "per_lead", "--output", str(output)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    masked_modelling.main()
    result = json.loads(output.read_text())
    assert set(result["runs"]) == {"xavier_uniform/axial", "xavier_uniform/per_lead"}
    assert result["records"] == {"train": 344, "validation": 78}  # the bundled sample read as v1.0.3
    assert 0.5 < result["baselines"]["cross_lead_copy"] < result["baselines"]["patch_mean"]
    assert all(len(run["curve"]) == 2 for run in result["runs"].values())


def test_the_evaluation_suite_reads_the_dataset_as_its_arguments_say(monkeypatch):
    """`--ptbxl_version as_is` / `--dataset_name wfdb` reach the loader (they were dropped, while the results JSONs
    described the data by them)."""
    import evaluation

    class Loaded(Exception):
        pass

    seen = {}

    def load_dataset_dict(path, sampling_rate=100, arguments=None):
        seen.update(path=path, arguments=arguments)
        raise Loaded

    monkeypatch.setattr(evaluation, "load_dataset_dict", load_dataset_dict)
    with pytest.raises(Loaded):
        evaluation.main(["--model_name_or_path", "m", "--dataset", "folder", "--ptbxl_version", "as_is"])
    assert seen["path"] == "folder" and seen["arguments"].ptbxl_version == "as_is"


def test_the_evaluation_suite_runs_once_per_launch_and_takes_none_for_no_label_set(monkeypatch):
    """Under `accelerate launch` every process ran the whole suite and wrote the same files; `none` was read as a
    label set named 'None' and crashed at the end."""
    import evaluation

    from merit_hf.utils.arguments import parse_arguments

    monkeypatch.setattr(evaluation, "load_dataset_dict", lambda *args, **kwargs: pytest.fail("process 1 loaded data"))
    monkeypatch.setenv("RANK", "1")
    assert evaluation.main(["--model_name_or_path", "m", "--dataset", "folder"]) == {}
    _, suite = parse_arguments(
        [evaluation.ProbeArguments, evaluation.SuiteArguments],
        ["--robustness_label_sets", "None", "--zero_shot_label_sets", "none"],
    )
    assert suite.robustness_label_sets == [] and suite.zero_shot_label_sets == []


def test_the_evaluation_suite_refuses_to_replace_earlier_results(tmp_path, monkeypatch):
    """The documented command rewrote the shipped results in benchmarks/results/evaluation/quickstart without a
    word; its config now writes elsewhere, and the suite refuses existing results files unless told to replace them."""
    import evaluation
    import yaml

    config = yaml.safe_load((REPO_ROOT / "configs" / "probe_quickstart.yaml").read_text())
    assert not config["output_dir"].startswith("benchmarks/")
    (tmp_path / "zero-shot_superclass_seed0.json").write_text("{}")
    monkeypatch.setattr(evaluation, "load_dataset_dict", lambda *args, **kwargs: pytest.fail("loaded before refusing"))
    with pytest.raises(FileExistsError, match=r"holds results this run would replace \(zero-shot_superclass_seed0"):
        evaluation.main(["--model_name_or_path", "m", "--dataset", "folder", "--output_dir", str(tmp_path)])

    class Loaded(Exception):
        pass

    monkeypatch.setattr(evaluation, "load_dataset_dict", lambda *args, **kwargs: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):
        evaluation.main(["--model_name_or_path", "m", "--dataset", "folder", "--output_dir", str(tmp_path),
                         "--overwrite_output_dir", "true"])  # fmt: skip


def test_the_evaluation_summary_of_a_run_without_the_baseline(tmp_path):
    """`--no_baseline`: the summary was written last and crashed on the missing random-init entry, after every run."""
    import dataclasses

    import evaluation

    from merit_hf.evaluation.probe import ProbeArguments
    from merit_hf.evaluation.results import read_results
    from merit_hf.evaluation.robustness import robustness_table

    results = read_results(REPO_ROOT / "benchmarks/results/evaluation/quickstart/robustness_superclass_seed0.json")
    shifts = {name: dataclasses.replace(shift, baseline=None) for name, shift in results.shifts.items()}
    alone = dataclasses.replace(results, baseline=None, shifts=shifts)
    summary = evaluation.summary_markdown({"robustness_superclass_seed0": alone}, ProbeArguments(), 1.0)
    assert "## Robustness (robustness_superclass_seed0), model" in summary and "random-init encoder" not in summary
    assert summary.count("| clean | - |") == 1
    both = evaluation.summary_markdown({"robustness_superclass_seed0": results}, ProbeArguments(), 1.0)
    assert both.count("| clean | - |") == 2
    with pytest.raises(ValueError, match="no 'baseline' entry"):
        robustness_table(alone, "baseline")


def test_feature_extraction_benchmark_times_both_paths_and_counts_page_faults(tmp_path):
    """One round on 4 records: every variant timed, the torch path as exact as the tests demand, and a page-fault
    count per variant (where the platform keeps one)."""
    import feature_extraction

    result = feature_extraction.main(["--rounds", "1", "--num_records", "4", "--output", str(tmp_path / "fe.json")])
    variants = {"scipy", "torch_cpu", "torch_cpu_1_thread", "validation_only", "prepare_only", "dsp_only_cpu_4"}
    assert set(result["ecgs_per_s_median"]) == variants == set(result["page_faults_per_batch_median"])
    assert all(rate > 0 for rate in result["ecgs_per_s_median"].values())
    assert all(
        isinstance(count, (int, float)) and count >= 0 for count in result["page_faults_per_batch_median"].values()
    )
    assert result["max_abs_error_vs_scipy"]["scipy"] == 0.0 and result["max_abs_error_vs_scipy"]["torch_cpu"] < 1e-4
    assert (tmp_path / "fe.json").exists()


@pytest.mark.slow
def test_allocator_benchmark_runs_each_setting_in_its_own_process(tmp_path):
    """`cpu_allocator.py` on the tiny preset: one child process per setting, every precision and batch timed, and
    the children that keep memory say so (glibc)."""
    import platform

    import cpu_allocator

    report = cpu_allocator.main([
        "--presets", "tiny-p75", "--precisions", "fp32", "int8", "--batches", "2", "--repeats", "1", "--rounds", "1",
        "--output", str(tmp_path / "allocator.json"),
    ])  # fmt: skip
    assert [(row["precision"], row["batch"]) for row in report["rows"]] == [("fp32", 2), ("int8", 2)]
    for row in report["rows"]:
        assert set(row["ecgs_per_s"]) == {"system", "keep"} and min(row["ecgs_per_s"].values()) > 0
        assert row["keep_speedup_median"] > 0
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert report["kept_in_keep_children"] == [glibc]


def test_report_benchmark_scores_the_constant_report_on_the_reports_the_arms_scored(monkeypatch, tmp_path):
    """Flags passed through to report_lora (`--max_eval_reports 4`, `--max_train_reports 1`) reached the three arms
    but not the constant-report row, which scored every English report of the eval folds (31 on the bundled
    records) against the model rows' 4, with its report drawn from all the training reports. It is now scored on
    the arms' own predictions.jsonl, its report the most frequent under their data settings."""
    import json
    from pathlib import Path

    import report_generation

    from merit_hf.training import report_lora
    from merit_hf.utils.arguments import arguments_to_dict, parse_arguments
    from tests.conftest import BUNDLED_PTBXL

    def fake_report_lora(argv):
        """report_lora's argument parsing and eval reports, without a model: every arm writes 'sinus rhythm.'."""
        parsed = parse_arguments(
            (report_lora.ReportModelArguments, report_lora.ReportDataArguments, report_lora.ReportTrainingArguments),
            argv,
        )
        data, training = parsed[1], parsed[2]
        ptbxl = report_lora.load_ptbxl_rows(data.ptbxl_dir, data.ptbxl_sampling_rate)
        evaluation, _ = report_lora.read_ptbxl_reports(
            ptbxl, data.eval_folds, data.non_english_reports, data.max_eval_reports
        )
        output_dir = Path(training.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / report_lora.PREDICTIONS_FILE).open("w") as handle:
            for row in evaluation.select_columns(["ecg_id", "filename", "report"]):
                handle.write(json.dumps({**row, "generated": "sinus rhythm."}) + "\n")
        scores = dict.fromkeys(report_generation.METRICS, 0.5)
        return {"arguments": arguments_to_dict(*parsed), "eval": {**scores, "num_reports": evaluation.num_rows},
                "generation_speed": {}, "num_train_reports": 1, "num_eval_reports": evaluation.num_rows,
                "lora_loss_first": 1.0, "lora_loss_last": 0.5}  # fmt: skip

    monkeypatch.setattr(report_lora, "main", fake_report_lora)
    monkeypatch.setattr(report_generation, "fetch_smollm2", lambda cache_dir: tmp_path / "smollm2")
    monkeypatch.setattr(report_generation, "encoder_config_flags", lambda ecg_encoder: {"hidden_size": 32})
    monkeypatch.setattr(report_generation, "measure_generation_speed", lambda *args, **kwargs: {})
    output = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["report_generation.py", "--ecg_encoder", "encoder", "--ptbxl_dir",
                                      str(BUNDLED_PTBXL), "--output_dir", str(tmp_path / "arms"), "--json",
                                      str(output), "--max_eval_reports", "4", "--max_train_reports", "1",
                                      "--compute_meteor", "false"])  # fmt: skip
    report_generation.main()
    record = json.loads(output.read_text())
    arm_ids = {name: [line["ecg_id"] for line in arm["predictions"]] for name, arm in record["arms"].items()}
    constant = record["constant_report"]
    assert constant["eval"]["num_reports"] == 4 and "meteor" not in constant["eval"]
    assert len(arm_ids) == 3 and all(ids == constant["ecg_ids"] for ids in arm_ids.values())
    ptbxl = report_lora.load_ptbxl_rows(BUNDLED_PTBXL)
    first_train, _ = report_lora.read_ptbxl_reports(ptbxl, range(1, 9), limit=1)
    assert constant["report"] == first_train["report"][0]  # the one training report of the arms
    assert record["table"].splitlines()[-1].startswith("| constant report | ")
