"""Robustness shifts change the input exactly as stated (measured on a real PTB-XL record), and the robustness
evaluation reports every shift for the model and the random-init baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import wfdb

from merit_hf import MeritModel
from merit_hf.evaluation.robustness import (
    device_family,
    input_shifts,
    reduced_lead_extractor,
    robustness_table,
    run_robustness,
)
from merit_hf.evaluation.shifts import (
    LEAD_SUBSETS,
    LIMB_LEADS,
    acquired_at_rate,
    add_baseline_wander,
    add_white_noise,
    keep_leads,
    measured_snr_db,
    resample_record,
    signal_power,
    zero_leads,
)
from merit_hf.training.probe import ProbeArguments

from .conftest import BUNDLED_PTBXL, tiny_merit_config
from .test_eval_probe import synthetic_ptbxl


@pytest.fixture(scope="module")
def record():
    signal, fields = wfdb.rdsamp(str(BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"))
    return signal, fields["fs"], list(fields["sig_name"])


@pytest.mark.parametrize("snr_db", [20.0, 10.0, 0.0])
def test_white_noise_has_the_stated_snr(record, snr_db):
    signal, _, _ = record
    noisy = add_white_noise(signal, snr_db, np.random.default_rng(0))
    np.testing.assert_allclose(measured_snr_db(signal, noisy), snr_db, atol=0.5)
    residual = noisy - signal
    assert abs(residual.mean()) < 0.05 * residual.std()  # zero-mean noise, not a shifted baseline


def test_band_limited_noise_reaches_the_model_at_the_stated_snr_whatever_the_record_rate():
    """White noise up to a 500 Hz record's Nyquist frequency lost 8 dB of its power to the feature extractor's 40 Hz
    low-pass (a 100 Hz record's 1 dB): the same nominal SNR was a different shift at each rate. Limited to the model's
    band, nearly all its power passes the band-pass at both rates, and the raw SNR is still the stated one."""
    from merit_hf.evaluation.shifts import band_limited

    for rate in (100, 500):
        signal, fields = wfdb.rdsamp(
            str(BUNDLED_PTBXL / f"records{rate}" / "00000" / f"00001_{'lr' if rate == 100 else 'hr'}")
        )
        noisy = add_white_noise(signal, 10.0, np.random.default_rng(0), band_hz=(0.67, 40.0), sampling_rate=rate)
        np.testing.assert_allclose(measured_snr_db(signal, noisy), 10.0, atol=1e-6)
        noise = noisy - signal
        kept = signal_power(band_limited(noise, rate, (0.67, 40.0))) / signal_power(noise)
        assert kept.min() > 0.85, (rate, kept)
        white = add_white_noise(signal, 10.0, np.random.default_rng(0)) - signal
        kept_white = signal_power(band_limited(white, rate, (0.67, 40.0))) / signal_power(white)
        assert (kept_white.mean() < 0.2) == (rate == 500), (rate, kept_white.mean())  # what the old shift lost
    with pytest.raises(ValueError, match="band_hz needs the record's sampling_rate"):
        add_white_noise(signal, 10.0, np.random.default_rng(0), band_hz=(0.67, 40.0))


def test_shifts_keep_a_few_nan_samples_where_they_are_and_the_rest_finite(record):
    """A record the extractor repairs (`nan_policy="interpolate"`) with one NaN sample: noise and wander made the whole
    lead NaN (their powers were NaN), the low-rate device spread it over 84 samples; both were then refused."""
    signal, rate, _ = record
    broken = signal.copy()
    broken[500, 1] = np.nan
    for shifted in (
        add_white_noise(broken, 10.0, np.random.default_rng(0)),
        add_white_noise(broken, 10.0, np.random.default_rng(0), band_hz=(0.67, 40.0), sampling_rate=rate),
        add_baseline_wander(broken, rate, 0.0, np.random.default_rng(0)),
        acquired_at_rate(broken, rate, 50)[0],
    ):
        assert np.array_equal(np.isnan(shifted), np.isnan(broken))


def test_the_low_rate_device_adds_no_edge_step_for_a_lead_offset(record):
    """`resample_poly` padded the edges with zeros, pulling each lead towards 0 there by its offset: a 2 mV offset
    changed the shifted record by over 1 mV near the ends. The edges are padded with their line now."""
    signal, rate, _ = record
    plain, _ = acquired_at_rate(signal, rate, 50)
    offset, _ = acquired_at_rate(signal + 2.0, rate, 50)
    assert np.abs(offset - 2.0 - plain).max() < 0.01  # was 1.1 mV near the ends (the filter's DC gain is 1 - 5e-4)


@pytest.mark.parametrize("snr_db", [10.0, 0.0])
def test_baseline_wander_has_the_stated_snr_and_frequency(record, snr_db):
    signal, rate, _ = record
    wandering = add_baseline_wander(signal, rate, snr_db, np.random.default_rng(0), frequency_hz=0.3)
    np.testing.assert_allclose(measured_snr_db(signal, wandering), snr_db, atol=0.5)
    drift = wandering[:, 0] - signal[:, 0]
    spectrum = np.abs(np.fft.rfft(drift - drift.mean()))
    frequencies = np.fft.rfftfreq(len(drift), 1 / rate)
    assert frequencies[np.argmax(spectrum)] == pytest.approx(0.3, abs=0.1)
    with pytest.raises(ValueError, match="frequency_hz"):
        add_baseline_wander(signal, rate, 10, np.random.default_rng(0), frequency_hz=80)


def test_missing_leads_are_zeroed_and_the_others_kept(record):
    signal, _, leads = record  # PTB-XL writes AVR/AVL/AVF: matching is case-insensitive
    limb = zero_leads(signal, leads, LIMB_LEADS)
    np.testing.assert_array_equal(limb[:, :6], signal[:, :6])
    assert np.all(limb[:, 6:] == 0)
    only_ii = zero_leads(signal, leads, ("II",))
    assert np.count_nonzero(signal_power(only_ii)) == 1 and np.array_equal(only_ii[:, 1], signal[:, 1])
    with pytest.raises(ValueError, match="V7"):
        zero_leads(signal, leads, ("V7",))


def test_a_reduced_lead_record_has_only_its_leads(record):
    signal, _, leads = record
    for count, keep in LEAD_SUBSETS.items():
        kept, names = keep_leads(signal, leads, keep)
        assert kept.shape == (len(signal), count) and [name.upper() for name in names] == [k.upper() for k in keep]
        np.testing.assert_array_equal(kept, signal[:, [leads.index(name) for name in names]])
    with pytest.raises(ValueError, match="V7"):
        keep_leads(signal, leads, ("I", "V7"))


def test_resampling_changes_rate_and_length_but_not_the_waveform(record):
    signal, rate, _ = record
    upsampled, new_rate = resample_record(signal, rate, 500)
    assert new_rate == 500 and upsampled.shape == (5000, 12)
    back, _ = resample_record(upsampled, 500, rate)
    np.testing.assert_allclose(back[50:-50], signal[50:-50], atol=0.02)  # mV; edges excluded (filter transients)


def test_a_low_rate_device_keeps_nothing_above_half_its_rate(record):
    """The shift must reach the model: the feature extractor resamples every rate to its own, so only the content
    the device could not capture is left to change."""
    from scipy.signal import welch

    from merit_hf import MeritFeatureExtractor

    signal, rate, leads = record
    shifted, shifted_rate = acquired_at_rate(signal, rate, 50)
    assert shifted_rate == rate and shifted.shape == signal.shape
    frequencies, clean_power = welch(signal, fs=rate, axis=0, nperseg=256)
    _, shifted_power = welch(shifted, fs=rate, axis=0, nperseg=256)
    above, below = frequencies > 27, (frequencies > 1) & (frequencies < 20)
    assert shifted_power[above].sum() < 0.01 * clean_power[above].sum()
    np.testing.assert_allclose(shifted_power[below].sum(), clean_power[below].sum(), rtol=0.05)
    fe = MeritFeatureExtractor()
    a = fe(signal, sampling_rate=rate, lead_names=leads)["ecg_values"]
    b = fe(shifted, sampling_rate=rate, lead_names=leads)["ecg_values"]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) > 0.05  # the model input changes
    with pytest.raises(ValueError, match="below the record's 100 Hz"):
        acquired_at_rate(signal, rate, 500)


def _tone_response_db(frequency: float, rate: float, device_rate: float) -> float:
    """The gain of `acquired_at_rate` at `frequency`: a tone through it, amplitudes by least squares (edges left out)."""
    time = np.arange(int(20 * rate)) / rate
    tone = np.cos(2 * np.pi * frequency * time + 0.7)[:, None]
    shifted, _ = acquired_at_rate(tone, rate, device_rate)
    middle = slice(len(time) // 4, 3 * len(time) // 4)
    basis = np.c_[np.cos(2 * np.pi * frequency * time[middle]), np.sin(2 * np.pi * frequency * time[middle])]
    amplitude = [np.hypot(*np.linalg.lstsq(basis, x[middle, 0], rcond=None)[0]) for x in (tone, shifted)]
    return 20 * np.log10(amplitude[1] / amplitude[0])


def _close_to(documented_db: float, measured_db: float) -> bool:
    return abs(measured_db - documented_db) <= max(0.5, 0.05 * abs(documented_db))


@pytest.mark.parametrize(("rate", "device_rate"), [(100, 50), (500, 50), (500, 40)])
def test_the_device_rate_shift_has_the_documented_response(rate, device_rate):
    """The shift filters twice (down to the device rate and back up), so its response is the anti-aliasing filter's
    squared; the docs quoted one pass (-6 dB at half the device rate, where the shift is at -12 dB, and -6 dB is
    reached at 0.48 x). `ACQUIRED_AT_RATE_RESPONSE_DB` is what the docs quote, measured here."""
    from merit_hf.evaluation.shifts import ACQUIRED_AT_RATE_RESPONSE_DB

    for fraction, documented in ACQUIRED_AT_RATE_RESPONSE_DB.items():
        measured = _tone_response_db(fraction * device_rate, rate, device_rate)
        assert _close_to(documented, measured), (fraction * device_rate, documented, measured)
    assert _tone_response_db(0.4 * device_rate, rate, device_rate) > -0.1  # the band below is kept
    assert _tone_response_db(0.6 * device_rate, rate, device_rate) < -90


def test_every_quoted_figure_of_the_device_rate_shift_is_its_measured_response():
    """Each "-N dB at F Hz" (or "at F x" the device rate) that the shift's docs, its robustness description and the
    benchmarks README give for a 50 Hz device is measured on the shift, so the texts cannot drift from the code."""
    import re

    from merit_hf.evaluation import robustness, shifts

    from .conftest import REPO_ROOT

    readme = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    texts = {
        "shifts docstring": shifts.__doc__.split("- `acquired_at_rate(")[1].split("\n- ")[0],
        "robustness table": next(line for line in robustness.__doc__.splitlines() if "`acquired_at_<rate>hz`" in line),
        "results description": input_shifts(device_rates=(50,))["acquired_at_50hz"][0],
        "benchmarks README": readme.split("`acquired_at_50hz` is a low-pass")[1].split("\n\n")[0],
    }
    for name, text in texts.items():
        # "-N dB at F Hz" or "-N dB at F x" (a fraction of the device rate)
        figures = re.findall(r"(-\d+(?:\.\d+)?)\s+dB\s+at\s+(?:about\s+)?(\d+(?:\.\d+)?)\s+(x|Hz)\b", text)
        assert len(figures) >= 3, (name, text)
        for db, value, unit in figures:
            frequency = float(value) * (50 if unit == "x" else 1)
            measured = _tone_response_db(frequency, 500, 50)
            assert _close_to(float(db), measured), (name, db, frequency, measured)


def test_masked_lead_shifts_feed_only_the_recorded_leads(record):
    """A checkpoint whose feature extractor derives limb leads turned `leads_2_masked` (I, II) into six leads."""
    from merit_hf import MeritFeatureExtractor

    signal, rate, leads = record
    extractor = reduced_lead_extractor(MeritFeatureExtractor(derive_limb_leads=True))
    shifts = input_shifts(lead_counts=(1, 2, 3, 12))
    for count in (1, 2, 3, 12):
        kept, kept_rate, names = shifts[f"leads_{count}_masked"][1](signal, rate, leads, 0)
        lead_mask = extractor(kept, sampling_rate=kept_rate, lead_names=names, return_tensors="np")["lead_mask"]
        assert lead_mask.sum() == count, count


FLAT_LEAD_EXTRACTORS = {
    "drop, masked": {"flat_lead_policy": "drop", "missing_leads": "mask"},
    "drop, derived": {"flat_lead_policy": "drop", "derive_limb_leads": True},
    "zero": {"flat_lead_policy": "zero"},
}


@pytest.mark.parametrize("settings", list(FLAT_LEAD_EXTRACTORS.values()), ids=list(FLAT_LEAD_EXTRACTORS))
def test_a_shift_that_changes_nothing_gives_the_clean_input_whatever_the_flat_lead_policy(record, settings):
    """`reduced_lead_extractor` forced `flat_lead_policy="zero"` on the raw record: a flat lead III that the clean
    extractor left out (`"drop"` with `missing_leads="mask"`) or rebuilt (`"drop"` with `derive_limb_leads`) was fed
    as zeros in every shift, so the shifted features differed from the clean ones by more than the shift. The shift
    now gets the record as the clean extractor read it."""
    from merit_hf import MeritFeatureExtractor
    from merit_hf.evaluation.robustness import shifted_as_read
    from merit_hf.training.probe import ecg_model_inputs

    signal, rate, leads = record
    flat_iii = signal.copy()
    flat_iii[:, 2] = 0.0
    rows = {"signal": [signal, flat_iii], "sampling_rate": [rate, rate], "lead_names": [leads, leads]}
    extractor = MeritFeatureExtractor(**settings)
    clean = ecg_model_inputs(extractor, rows)
    clean_mask = clean.get("lead_mask", torch.ones(2, 12, dtype=torch.bool))
    shifts = input_shifts(lead_counts=(2, 12))
    unchanged = {name: shifts[name][1] for name in ("leads_12_masked", "leads_12_zeroed")}
    unchanged["identity"] = lambda signal, sr, names, row: (signal, sr)
    for name, transform in unchanged.items():
        shifted = ecg_model_inputs(reduced_lead_extractor(extractor), rows, shifted_as_read(extractor, transform))
        torch.testing.assert_close(shifted["ecg_values"], clean["ecg_values"], rtol=0, atol=0, msg=name)
        assert torch.equal(shifted["lead_mask"], clean_mask), name
    two = ecg_model_inputs(
        reduced_lead_extractor(extractor), rows, shifted_as_read(extractor, shifts["leads_2_masked"][1])
    )
    assert two["lead_mask"].sum(dim=1).tolist() == [2, 2]  # I and II: never the limb leads rebuilt from them


def test_shifts_that_break_einthoven_on_purpose_are_not_warned_about(record):
    """Noise added to each lead on its own breaks Einthoven's law, as a lead-swap would: the clean extraction checks
    the records, the shifted path does not warn about every shifted record."""
    import warnings

    from merit_hf import MeritFeatureExtractor
    from merit_hf.data import EcgLeadSwapWarning
    from merit_hf.evaluation.robustness import shifted_as_read
    from merit_hf.training.probe import ecg_model_inputs

    signal, rate, leads = record
    rows = {"signal": [signal], "sampling_rate": [rate], "lead_names": [leads]}
    noise = input_shifts(noise_snrs_db=(5,))["white_noise_5db"][1]
    extractor = MeritFeatureExtractor()
    with pytest.warns(EcgLeadSwapWarning, match="record 0: Einthoven's law does not hold"):
        extractor(noise(signal, rate, leads, 0)[0], sampling_rate=rate, lead_names=leads)  # what the check sees
    with warnings.catch_warnings():
        warnings.simplefilter("error", EcgLeadSwapWarning)
        ecg_model_inputs(reduced_lead_extractor(extractor), rows, shifted_as_read(extractor, noise))
    assert extractor.lead_swap_policy == "warn"  # the caller's extractor is left as it was


def test_robustness_with_a_drop_policy_extractor_scores_unchanged_shifts_as_clean():
    """End to end: a checkpoint whose feature extractor drops flat leads (`missing_leads="mask"`), test records with a
    flat lead III: the all-leads shifts must score exactly as the clean test split."""
    from merit_hf import MeritFeatureExtractor

    torch.manual_seed(7)
    model = MeritModel(tiny_merit_config()).eval()
    data = synthetic_ptbxl(sizes=(16, 8, 10))
    data["test"] = data["test"].map(lambda row, index: {"signal": np.where(np.arange(12) == 2, 0.0, row["signal"])
                                    if index % 2 else row["signal"]}, with_indices=True)  # fmt: skip
    extractor = MeritFeatureExtractor.from_model_config(
        model.config.ecg_config, flat_lead_policy="drop", missing_leads="mask"
    )
    shifts = {name: shift for name, shift in input_shifts(lead_counts=(12,)).items() if name.startswith("leads_12")}
    arguments = ProbeArguments(max_epochs=2, num_bootstrap=0, ptbxl_version="as_is")
    results = run_robustness(
        model, data, "superclass", baseline=False, feature_extractor=extractor, arguments=arguments, shifts=shifts,
        group_columns=(),
    )  # fmt: skip
    clean = results["model"]["metrics"]["macro_auroc"]["value"]
    for name in shifts:
        assert results["shifts"][name]["model"]["metrics"]["macro_auroc"]["value"] == clean, name


def test_limb_leads_only_and_leads_6_zeroed_are_one_input_computed_once(monkeypatch):
    """Both zero every lead but the six limb leads (`LEAD_SUBSETS[6]` is `LIMB_LEADS`): their features were computed
    twice per encoder. They share one transform now, computed once, and both names keep their entry."""
    from merit_hf.evaluation import robustness

    shifts = input_shifts(device_rates=(), noise_snrs_db=(), wander_snrs_db=(), lead_counts=(6,))
    assert shifts["limb_leads_only"][1] is shifts["leads_6_zeroed"][1]
    assert shifts["precordial_leads_only"][1] is not shifts["leads_6_zeroed"][1]
    extracted = []
    original = robustness.extract_features

    def counting(*args, **kwargs):
        extracted.append(kwargs["cache_tag"].split("_seed")[0].rsplit("_", 1)[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(robustness, "extract_features", counting)
    torch.manual_seed(7)
    model = MeritModel(tiny_merit_config()).eval()
    chosen = {name: shifts[name] for name in ("limb_leads_only", "leads_6_zeroed", "leads_6_masked")}
    results = run_robustness(
        model, synthetic_ptbxl(sizes=(16, 8, 10)), "superclass",
        arguments=ProbeArguments(max_epochs=1, num_bootstrap=0, ptbxl_version="as_is"), shifts=chosen,
        group_columns=(),
    )  # fmt: skip
    assert extracted == ["limb_leads_only"] * 2 + ["leads_6_masked"] * 2  # one pass each for model and baseline
    for role in ("model", "baseline"):
        assert results["shifts"]["limb_leads_only"][role] == results["shifts"]["leads_6_zeroed"][role]
    assert results["shifts"]["leads_6_zeroed"]["description"] != results["shifts"]["limb_leads_only"]["description"]


@pytest.mark.slow
def test_shift_features_are_cached_per_parameters(tmp_path):
    from merit_hf import MeritEcgModel, MeritFeatureExtractor
    from merit_hf.training.probe import extract_features

    from .conftest import tiny_ecg_config

    torch.manual_seed(0)
    model = MeritModel(tiny_merit_config()).eval()
    data = synthetic_ptbxl(sizes=(16, 8, 10))
    arguments = ProbeArguments(max_epochs=2, num_bootstrap=0, cache_dir=str(tmp_path / "cache"))
    slow, fast = (input_shifts(device_rates=(), noise_snrs_db=(), wander_snrs_db=(0,), wander_frequency_hz=f,
                               lead_counts=()) for f in (0.3, 5.0))  # fmt: skip
    first = run_robustness(model, data, "superclass", arguments=arguments, shifts=slow, group_columns=())
    second = run_robustness(model, data, "superclass", arguments=arguments, shifts=fast, group_columns=())
    uncached = run_robustness(
        model, data, "superclass", arguments=ProbeArguments(max_epochs=2, num_bootstrap=0), shifts=fast,
        group_columns=(),
    )  # fmt: skip
    auroc = lambda r: r["shifts"]["baseline_wander_0db"]["model"]["metrics"]["macro_auroc"]["value"]  # noqa: E731
    assert auroc(second) == auroc(uncached) and auroc(second) != auroc(first)
    with pytest.raises(ValueError, match="name the transform in cache_tag"):
        extract_features(MeritEcgModel(tiny_ecg_config()), MeritFeatureExtractor(), data["test"],
                         transform=lambda *row: row[:2], cache_dir=tmp_path / "c")  # fmt: skip


def test_device_family():
    assert device_family("CS-12   E") == "CS-12"
    assert device_family("AT-6 C 5.5") == "AT-6"
    assert device_family(None) == "unknown"


@pytest.mark.slow
def test_robustness_reports_every_shift_for_model_and_baseline(tmp_path):
    torch.manual_seed(7)
    model = MeritModel(tiny_merit_config()).eval()
    data = synthetic_ptbxl(sizes=(16, 8, 10))
    arguments = ProbeArguments(max_epochs=3, num_bootstrap=10, ptbxl_version="as_is")
    shifts = input_shifts(noise_snrs_db=(10,), wander_snrs_db=(0,), lead_counts=(1, 12))
    results = run_robustness(
        model, data, "superclass", arguments=arguments, shifts=shifts, output_file=tmp_path / "robustness.json"
    )
    assert results["task"] == "robustness" and (tmp_path / "robustness.json").is_file()
    from merit_hf.models.fingerprint import weights_fingerprint

    assert results.model.weights_fingerprint == {"ecg_encoder": weights_fingerprint(model.ecg_model)}
    assert results["dataset"]["version"].startswith("as_is")  # the rows as read, not v1.0.3's: said so
    assert results.dataset["sampling_rate"] == 100  # the records', before the feature extractor resamples them
    assert results.protocol["feature_extractor"]["sampling_rate"] == model.config.ecg_config.sampling_rate
    expected = {
        "acquired_at_50hz",
        "white_noise_10db",
        "baseline_wander_0db",
        "limb_leads_only",
        "precordial_leads_only",
        "lead_II_only",
        "leads_1_masked",
        "leads_1_zeroed",
        "leads_12_masked",
        "leads_12_zeroed",
        "device_CS-12_in",
        "device_CS-12_to_other",
        "site_0_in",
        "site_0_to_other",
        "age_0_40",
        "age_40_65",
        "age_65_plus",
        "sex_male",
        "sex_female",
    }
    assert set(results["shifts"]) == expected
    for name, shift in results["shifts"].items():
        assert {"model", "baseline", "kind", "description"} <= set(shift), name
    assert results["shifts"]["device_CS-12_to_other"]["model"]["num_records"] == 4  # test rows 0, 3, 6, 9
    # tuned on the source family's own validation records (5 of 8), never on the families it is tested on
    assert (
        "early stopping and F1 thresholds on its 5 validation records"
        in (results["shifts"]["device_CS-12_to_other"]["description"])
    )
    assert results["shifts"]["sex_female"]["model"]["num_records"] == 5
    clean = results["model"]["metrics"]["macro_auroc"]["value"]
    noisy = results["shifts"]["white_noise_10db"]["model"]["metrics"]["macro_auroc"]["value"]
    assert clean is not None and noisy is not None
    auroc = lambda name: results["shifts"][name]["model"]["metrics"]["macro_auroc"]["value"]  # noqa: E731
    assert auroc("leads_12_masked") == auroc("leads_12_zeroed") == clean  # all leads recorded: the clean input
    assert auroc("leads_1_masked") != auroc("leads_1_zeroed")  # left out is not fed as zeros
    table = robustness_table(results)
    assert table.count("\n") == len(expected) + 2 and "| clean | - | 10 |" in table
    assert "baseline_wander_0db" in robustness_table(results, role="baseline")


def test_random_shifts_name_their_seed_so_cached_features_of_another_seed_are_not_reused():
    """Shift features are cached under the shift's description: the noise and wander shifts name their seed, so
    `input_shifts(seed=1)` never reads the features `input_shifts(seed=0)` cached; deterministic shifts stay shared."""
    first, second = input_shifts(seed=0), input_shifts(seed=1)
    random_shifts = {name for name in first if name.startswith(("white_noise", "baseline_wander"))}
    assert random_shifts and all(first[name][0] != second[name][0] for name in random_shifts)
    assert all(first[name][0] == second[name][0] for name in set(first) - random_shifts)


def test_a_record_a_shift_makes_unreadable_is_named_with_the_shift():
    """The feature extractor's refusal of a shifted record did not say which shift made it (after the clean probe)."""
    torch.manual_seed(7)
    model = MeritModel(tiny_merit_config()).eval()
    data = synthetic_ptbxl(sizes=(16, 8, 10))
    broken = {"all_nan": ("every sample NaN", lambda signal, sr, leads, row: (signal * np.nan, sr))}
    arguments = ProbeArguments(max_epochs=1, num_bootstrap=0, ptbxl_version="as_is")
    with pytest.raises(ValueError, match=r"^shift all_nan: .*NaN"):
        run_robustness(model, data, "superclass", baseline=False, arguments=arguments, shifts=broken, group_columns=())
