"""The batched torch path of the feature extractor (`device=`) against the scipy path: scipy's own resampling and
filtering reproduced to rounding in float64, the same output within float32 rounding on every bundled PTB-XL record,
and the same errors, crops, masks and options."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import signal as sp_signal

from merit_hf import MeritFeatureExtractor
from merit_hf.models.merit import feature_extraction_torch_merit
from merit_hf.models.merit.feature_extraction_merit import EcgInputError, read_wfdb_record
from merit_hf.models.merit.feature_extraction_torch_merit import resample_poly, sosfiltfilt

PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
# Measured on the 1,112 bundled and shared records: 6.2e-6 (float32 arithmetic against scipy's float64); asserted
# with headroom for other BLAS builds.
MAX_ABS_ERROR = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On the shared 2-core CI machine torch's two intra-op threads made the batched path 27x slower than one
    (benchmarks/README.md); DataLoader workers run with one thread anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("up", "down"), [(1, 2), (5, 2), (25, 36), (250, 1001), (125, 256), (2, 1)])
def test_resample_poly_is_scipys_to_rounding(up, down):
    """500, 100, 360, 1001 and 512 Hz to 250 Hz, and 125 to 250: scipy's filter, placement and output length."""
    signals = np.random.default_rng(0).standard_normal((3, 1001))
    for length in (37, 1001):
        expected = sp_signal.resample_poly(signals[:, :length], up, down, axis=-1)
        actual = resample_poly(torch.from_numpy(signals[:, :length]), up, down).numpy()
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["fft", "blocked"])
@pytest.mark.parametrize("band", [(0.67, 40.0), (0.67, None), (None, 40.0)])
def test_sosfiltfilt_is_scipys_to_rounding(band, path, monkeypatch):
    """Band-, high- and low-pass, from the shortest signal scipy accepts to one of several 64-block segments, through
    the FFT (records up to `FFT_MAX_LENGTH` samples) and through the blocked filter (longer ones)."""
    if path == "blocked":
        monkeypatch.setattr(feature_extraction_torch_merit, "FFT_MAX_LENGTH", 0)
    else:
        monkeypatch.setattr(feature_extraction_torch_merit, "FFT_MIN_ROWS", 1)
    fe = MeritFeatureExtractor(highpass_hz=band[0], lowpass_hz=band[1])
    sos = fe._band_pass_sos()
    if path == "fft":  # the operators pass their own check against scipy (else the blocked filter would stand in)
        key, padding = sos.tobytes(), 2 * feature_extraction_torch_merit.filtfilt_padlen(sos)
        for length, tolerance in [(16, 1e-15), (3030, 1e-15), (20_000, 1e-15), (3030, 1e-10)]:
            assert feature_extraction_torch_merit._fft_operators(key, length + padding, tolerance) is not None
    signals = np.random.default_rng(1).standard_normal((2, 20_000)).cumsum(axis=-1)  # a wandering baseline
    for length in (16, 3030, 20_000):
        expected = sp_signal.sosfiltfilt(sos, signals[:, :length], axis=-1)
        actual = sosfiltfilt(torch.from_numpy(signals[:, :length]), sos).numpy()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
        single = sosfiltfilt(torch.from_numpy(signals[:, :length]).float(), sos).numpy()  # float32 rounding only
        np.testing.assert_allclose(single, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _bundled_records(root: Path) -> list[dict]:
    paths = sorted((root / "records100" / "00000").glob("*_lr.hea")) + sorted(
        (root / "records500" / "00000").glob("*_hr.hea")
    )
    return [read_wfdb_record(path.with_suffix("")) for path in paths]


def _compare_on_records(records: list[dict]) -> tuple[float, float]:
    fe = MeritFeatureExtractor()
    arguments = {
        "ecgs": [record["signal"] for record in records],
        "sampling_rate": [record["sampling_rate"] for record in records],
        "lead_names": [record["lead_names"] for record in records],
        "return_tensors": "np",
    }
    expected = fe(**arguments)["ecg_values"]
    actual = fe(**arguments, device="cpu")["ecg_values"]
    centred = [values - values.mean(axis=-1, keepdims=True) for values in (expected, actual)]
    correlation = (centred[0] * centred[1]).sum(-1) / np.sqrt((centred[0] ** 2).sum(-1) * (centred[1] ** 2).sum(-1))
    return float(correlation.min()), float(np.abs(actual - expected).max())


@pytest.mark.slow
def test_every_bundled_record_matches_the_scipy_path(ptbxl_dir):
    """500 records at 100 Hz and 12 at 500 Hz, in one mixed batch: per-lead correlation >= 0.999 (in fact >= 1 - 2.4e-7)
    and the largest difference of any z-scored sample below `MAX_ABS_ERROR`."""
    records = _bundled_records(ptbxl_dir)
    assert len(records) == 512
    worst_correlation, max_error = _compare_on_records(records)
    assert worst_correlation >= 0.999
    assert max_error < MAX_ABS_ERROR


@pytest.mark.slow
def test_every_shared_record_matches_the_scipy_path(shared_ptbxl_dir):
    """The shared PTB-XL subset: 500 records at 100 Hz and 100 at 500 Hz."""
    records = _bundled_records(shared_ptbxl_dir)
    assert len(records) == 600
    worst_correlation, max_error = _compare_on_records(records)
    assert worst_correlation >= 0.999
    assert max_error < MAX_ABS_ERROR


def _signal(ptbxl_dir):
    record = read_wfdb_record(ptbxl_dir / "records500" / "00000" / "00001_hr")
    return record["signal"], record["lead_names"]


def _both_paths(settings, *args, **kwargs):
    """Two feature extractors with the same settings (and seed), so that random crops draw the same numbers."""
    expected = MeritFeatureExtractor(**settings)(*args, **kwargs)
    actual = MeritFeatureExtractor(**settings)(*args, **kwargs, device="cpu")
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and actual[key].shape == expected[key].shape, key
    return expected, actual


@pytest.mark.parametrize(
    "settings",
    [
        {"normalization": "zscore_record"},
        {"normalization": "none"},
        {"highpass_hz": None},  # the lead means are kept
        {"lowpass_hz": None},
        {"highpass_hz": None, "lowpass_hz": None},  # resampling alone
        {"crop": "random", "seed": 5},  # the same crops: drawn by the same code in the same order
        {"crop": "start", "padding": True},
        {"derive_limb_leads": True, "nan_policy": "interpolate"},
        {"sampling_rate": 500, "num_samples": 4000},  # no resampling
    ],
)
def test_options_give_the_scipy_paths_output(ptbxl_dir, settings):
    signal, names = _signal(ptbxl_dir)
    broken = signal[:, [0, 1, *range(6, 12)]].copy()  # I, II, V1-V6 with a gap
    broken[100:103, 2] = np.nan
    eight = [names[i] for i in [0, 1, *range(6, 12)]]
    fe = MeritFeatureExtractor(**settings)
    ecgs = [signal, signal[:2500] if fe.padding else signal[::-1]]
    if fe.derive_limb_leads:
        ecgs, names = [broken, broken * 2], eight
    expected, actual = _both_paths(settings, ecgs, sampling_rate=500, lead_names=names, return_tensors="np")
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)


def test_mixed_rates_units_lead_orders_and_padding_in_one_batch(ptbxl_dir):
    signal, names = _signal(ptbxl_dir)
    order = np.random.default_rng(0).permutation(12)
    at_360 = sp_signal.resample_poly(signal, 18, 25, axis=0)
    ecgs = [signal, signal[::5], signal[:, order], at_360, signal[:1800]]
    rates = [500, 100, 500, 360, 500]
    lead_names = [names, names, [names[i].lower() for i in order], names, names]
    fe = MeritFeatureExtractor(padding=True)
    expected, actual = _both_paths(
        {"padding": True}, ecgs, sampling_rate=rates, lead_names=lead_names, return_tensors="pt"
    )
    np.testing.assert_array_equal(actual["ecg_attention_mask"].numpy(), expected["ecg_attention_mask"].numpy())
    assert actual["ecg_attention_mask"][4].sum() == 900
    torch.testing.assert_close(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    microvolts = fe(signal * 1000, sampling_rate=500, lead_names=names, units="uV", device="cpu")["ecg_values"]
    np.testing.assert_allclose(microvolts[0], expected["ecg_values"][0].numpy(), atol=MAX_ABS_ERROR)


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_stay_on_the_device_asked_for(ptbxl_dir, device):
    signal, names = _signal(ptbxl_dir)
    fe = MeritFeatureExtractor()
    out = fe([signal, signal], sampling_rate=500, lead_names=names, return_tensors="pt", device=device)
    assert out["ecg_values"].device.type == device and out["ecg_values"].dtype == torch.float32
    as_numpy = fe([signal, signal], sampling_rate=500, lead_names=names, return_tensors="np", device=device)
    assert isinstance(as_numpy["ecg_values"], np.ndarray)
    reference = fe([signal, signal], sampling_rate=500, lead_names=names, return_tensors="np")["ecg_values"]
    np.testing.assert_allclose(as_numpy["ecg_values"], reference, rtol=0, atol=MAX_ABS_ERROR)


def _named_twice(column):
    """The model's leads with column `column` named I, as column 0 is."""
    return [*PTBXL_LEADS[:column], "I", *PTBXL_LEADS[column + 1 :]]


BAD_BATCHES = [
    ("a NaN", lambda s: [s, _with_nan(s)], {}),
    ("a too-short record", lambda s: [s, s[:5]], {}),
    ("a record shorter than the window", lambda s: [s, s[:2000]], {}),
    ("a rate below the band", lambda s: [s, s], {"sampling_rate": [500, 50]}),
    ("an invalid rate", lambda s: [s, s], {"sampling_rate": [500, float("nan")]}),
    ("no rate", lambda s: [s], {"sampling_rate": None}),
    ("a missing lead", lambda s: [s[:, :11]], {"lead_names": PTBXL_LEADS[:11]}),
    ("microvolts labelled mV", lambda s: [s, s * 1000], {}),
    ("an unknown unit", lambda s: [s], {"units": "furlongs"}),
    ("a transposed array", lambda s: [s.T], {}),
    ("the first of two bad records", lambda s: [s, s[:5], _with_nan(s)], {}),
    ("a flat lead", lambda s: [s, _with_flat_lead(s)], {}),
    # what the batched screen (`screen_records`) must never clear
    ("a flat lead at the limit", lambda s: [s, _flat_at_the_limit(s, 0.0)], {}),
    ("a flat lead at the limit, far from 0 mV", lambda s: [s, _flat_at_the_limit(s, 1000.0)], {}),
    ("microvolts by a hair over the limit", lambda s: [s, _wide_by_a_hair(s)], {}),
    ("an inf", lambda s: [s, _with_value(s, -np.inf)], {}),
    ("a NaN before a too-short record", lambda s: [_with_nan(s), s[:5]], {}),
    ("a NaN before a record of the wrong shape", lambda s: [s, _with_nan(s), s.T], {}),
    ("a flat lead in a record with an invalid rate", lambda s: [_with_flat_lead(s)], {"sampling_rate": float("nan")}),
    ("a wrong number of units", lambda s: [s], {"units": ["mV"] * 11}),
    ("fewer lists of lead names than records", lambda s: [s, s, s], {"lead_names": [PTBXL_LEADS, PTBXL_LEADS]}),
    ("no ECG at all", lambda s: None, {}),
    ("a number instead of an ECG", lambda s: 3.0, {}),
    ("a lead named twice, one copy flat", lambda s: [_with_flat_lead(s)], {"lead_names": _named_twice(7)}),
]


def _flat_at_the_limit(signal, offset):
    """Lead V2 flat at the limit, around `offset` mV (where float32 rounds): all but `flat_outside` samples 0.01999
    mV from the median (`offset`), the rest 5 mV away but one, 0.0205 mV away (the 99th percentile interpolates
    between the last sample inside and the first outside); every screen group holds samples on both sides (spans
    0.03998 mV, a hair under the 0.04 it counts as quiet), and each outside sample sits in a group of its own: the
    screen's worst case."""
    from merit_hf.models.merit.feature_extraction_merit import flat_outside
    from merit_hf.models.merit.feature_extraction_torch_merit import SCREEN_GROUP

    num_samples = len(signal)
    groups, outside = num_samples // SCREEN_GROUP, flat_outside(num_samples)
    assert groups % 2 == 0 and (num_samples - SCREEN_GROUP * groups) % 2 == 0 and groups > outside
    alternating = np.where(np.arange(groups) % 2 == 0, 1.0, -1.0)
    parts = [alternating if part % 2 == 0 else -alternating for part in range(SCREEN_GROUP)]
    tail = np.resize([1.0, -1.0], num_samples - SCREEN_GROUP * groups)
    sign = np.concatenate([*parts, tail])
    flat = signal.copy()
    flat[:, 7] = offset + 0.01999 * sign
    flat[:outside, 7] = offset + np.where(sign[:outside] > 0, 5.0, -0.0205)  # as many above the median as below
    flat[1 : outside - 1 : 2, 7] = offset - 5.0
    spread = np.percentile(np.abs(flat[:, 7] - np.median(flat[:, 7])), 99)
    assert 0.0199 < spread < 0.02 and abs(np.median(flat[:, 7]) - offset) < 1e-9
    return flat


def _wide_by_a_hair(signal):
    """Lead I: 98.9 % at 0 mV, 1.1 % at 30.0000005 mV: its 99th percentile of |x - median| is over the 30 mV limit,
    and the float32 cast of 30.0000005 is 30.0 (a screen without rounding slack would clear it)."""
    wide = signal.copy()
    wide[:, 0] = 0.0
    wide[: int(0.011 * len(signal)) + 1, 0] = 30.0000005
    assert np.float32(30.0000005) == np.float32(30.0)
    return wide


def _with_value(signal, value):
    changed = signal.copy()
    changed[20, 5] = value
    return changed


def _with_flat_lead(signal):
    flat = signal.copy()
    flat[:, 7] = 0.0
    return flat


def _with_nan(signal):
    broken = signal.copy()
    broken[10, 3] = np.nan
    return broken


@pytest.mark.parametrize(("what", "batch", "change"), BAD_BATCHES, ids=[what for what, _, _ in BAD_BATCHES])
def test_bad_input_raises_the_same_error_on_both_paths(ptbxl_dir, what, batch, change):
    signal, names = _signal(ptbxl_dir)
    kwargs = {"sampling_rate": 500, "lead_names": names, **change}
    fe = MeritFeatureExtractor()
    with pytest.raises(EcgInputError) as scipy_error:
        fe(batch(signal), **kwargs)
    with pytest.raises(EcgInputError, match=re.escape(str(scipy_error.value))):
        fe(batch(signal), **kwargs, device="cpu")


@pytest.mark.parametrize("normalization", ["zscore_lead", "zscore_record", "none"])
def test_missing_leads_give_the_scipy_paths_lead_mask_and_values(ptbxl_dir, normalization):
    """`missing_leads="mask"`: a full record, one with I, II and V1-V6 (limb leads not derived), one with lead II
    alone; missing leads zero, `zscore_record` over the recorded leads only, `lead_mask` as the scipy path's."""
    signal, names = _signal(ptbxl_dir)
    eight = [0, 1, *range(6, 12)]
    settings = {"missing_leads": "mask", "normalization": normalization}
    ecgs = [signal, signal[:, eight], signal[:, [1]]]
    lead_names = [names, [names[i] for i in eight], [names[1]]]
    expected, actual = _both_paths(settings, ecgs, sampling_rate=500, lead_names=lead_names, return_tensors="pt")
    torch.testing.assert_close(actual["lead_mask"], expected["lead_mask"])
    assert actual["lead_mask"].sum(dim=1).tolist() == [12, 8, 1]
    torch.testing.assert_close(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    assert (actual["ecg_values"][1, 2:6] == 0).all() and (actual["ecg_values"][2, [0, *range(2, 12)]] == 0).all()
    dropped = {**settings, "flat_lead_policy": "drop"}  # a dropped flat lead is a missing lead on both paths
    expected, actual = _both_paths(dropped, [signal, _with_flat_lead(signal)], sampling_rate=500, lead_names=names)
    assert actual["lead_mask"][1].tolist() == expected["lead_mask"][1].tolist() == [True] * 7 + [False] + [True] * 4
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    full = MeritFeatureExtractor()(signal, sampling_rate=500, lead_names=names, return_lead_mask=True, device="cpu")
    assert full["lead_mask"].tolist() == [[True] * 12]


@pytest.mark.parametrize("settings", [{}, {"window_stride": 700}, {"window_stride": 1000, "padding": True}])
def test_sliding_windows_give_the_scipy_paths_windows(ptbxl_dir, settings):
    """`window="sliding"`: the same windows (stride, end-aligned last window, a padded short record), `record_index`
    and masks, records of two rates in one batch."""
    signal, names = _signal(ptbxl_dir)
    settings = {"window": "sliding", **settings}
    ecgs = [signal, signal[::5]] + ([signal[:1800]] if settings.get("padding") else [signal[:4600]])
    expected, actual = _both_paths(
        settings, ecgs, sampling_rate=[500, 100, 500], lead_names=names, return_tensors="pt"
    )
    assert actual["record_index"].tolist() == expected["record_index"].tolist()
    assert len(actual["record_index"]) > 3
    if "ecg_attention_mask" in expected:
        torch.testing.assert_close(actual["ecg_attention_mask"], expected["ecg_attention_mask"])
    torch.testing.assert_close(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)


def test_the_batched_screen_clears_real_records_and_only_validates_the_rest(ptbxl_dir, monkeypatch):
    """The device path validates records with the model's leads in mV by one batched screen (`screen_records`) and
    calls `validate_signal` only for what the screen cannot clear: none of the bundled records; a lead that repeats
    every third of the record (every screen group quiet) is cleared by the exact flat-lead test, without it; the
    same within 0.1 mV (not flat, but neither test can tell) goes through it; all come out as on the scipy path, and
    so does float32 input."""
    from merit_hf.models.merit.feature_extraction_torch_merit import SCREEN_GROUP, screen_records

    calls = []
    validate = MeritFeatureExtractor.validate_signal
    monkeypatch.setattr(
        MeritFeatureExtractor, "validate_signal", lambda self, *a, **k: calls.append(a[3]) or validate(self, *a, **k)
    )
    records = _bundled_records(ptbxl_dir)
    fe = MeritFeatureExtractor()
    for rate in (100, 500):
        signals = [record["signal"] for record in records if record["sampling_rate"] == rate]
        out = fe(signals, sampling_rate=rate, lead_names=records[0]["lead_names"], return_tensors="np", device="cpu")
        assert len(out["ecg_values"]) == len(signals) > 10
    assert calls == []

    signal, names = _signal(ptbxl_dir)
    third = len(signal) // SCREEN_GROUP
    periodic = signal.copy()
    periodic[:, 3] = np.tile(np.linspace(-1.0, 1.0, third), SCREEN_GROUP + 1)[: len(signal)]
    narrow = signal.copy()  # the same within 0.1 mV: three of the exact test's bins hold it all, yet not flat
    narrow[:, 4] = np.tile(np.linspace(-0.05, 0.05, third), SCREEN_GROUP + 1)[: len(signal)]
    stack = torch.from_numpy(np.stack([periodic.T, narrow.T]).astype(np.float32))
    checked, may_be_flat, off_zero = screen_records(stack, fe.min_amplitude_mv, fe.max_amplitude_mv, 50)
    assert checked.all() and may_be_flat[0, 3] and may_be_flat[1, 4] and may_be_flat.sum() == 2
    assert not off_zero.any()

    batch = [signal, periodic, narrow, signal.astype(np.float32)]
    expected, actual = _both_paths({}, batch, sampling_rate=500, lead_names=names, return_tensors="np")
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    # the scipy path validates every record, the device path only the one the screen and the flat-lead test left
    assert calls == ["record 0", "record 1", "record 2", "record 3", "record 2"]


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_the_screen_flags_every_flat_lead(offset):
    """`screen_records` on random leads built near the flat limit (all but `outside - 1` samples within 0.019 mV of
    a level, the rest 5 mV away): every one is flagged `may_be_flat`, wherever its outside samples fall and whatever
    float32 does to values around 1000 mV; the same leads with 8x as many outside samples, spread over the record,
    are mostly cleared."""
    from merit_hf.models.merit.feature_extraction_merit import flat_outside
    from merit_hf.models.merit.feature_extraction_torch_merit import screen_records

    rng = np.random.default_rng(3)
    num_samples, num_leads = 5000, 64
    outside = flat_outside(num_samples)
    leads = offset + rng.uniform(-0.019, 0.019, (num_leads, num_samples))
    for lead in leads:
        lead[rng.choice(num_samples, outside - 1, replace=False)] = offset + rng.choice([-1, 1], outside - 1) * 5
    spread = np.percentile(np.abs(leads - np.median(leads, axis=1, keepdims=True)), 99, axis=1)
    assert (spread < 0.02).all()  # flat, by the definition
    _, may_be_flat, _ = screen_records(torch.from_numpy(leads[None].astype(np.float32)), 0.02, np.inf, outside)
    assert may_be_flat.all()
    for lead in leads:
        lead[rng.choice(num_samples, 8 * outside, replace=False)] = offset + rng.uniform(-5, 5, 8 * outside)
    _, may_be_flat, _ = screen_records(torch.from_numpy(leads[None].astype(np.float32)), 0.02, np.inf, outside)
    assert may_be_flat.float().mean() < 0.1


def test_crop_seeds_give_each_record_its_own_crop_on_both_paths(ptbxl_dir):
    """`crop_seeds`: a record's random crop comes from its own seed, whatever is batched with it, the same on the
    scipy and the torch path; a seed is an int or a sequence such as (seed, epoch, ecg_id)."""
    signal, leads = _signal(ptbxl_dir)
    fe = MeritFeatureExtractor(crop="random")
    alone = fe(signal, sampling_rate=500, lead_names=leads, crop_seeds=[(0, 1, 7)])["ecg_values"]
    batched = fe([signal, signal, signal], sampling_rate=500, lead_names=leads, crop_seeds=[(0, 2, 7), (0, 1, 7), 5])
    np.testing.assert_array_equal(batched["ecg_values"][1], alone[0])  # same seed, other records beside it
    assert not np.array_equal(batched["ecg_values"][0], alone[0])  # another epoch: another crop
    on_device = fe([signal, signal, signal], sampling_rate=500, lead_names=leads, crop_seeds=[(0, 2, 7), (0, 1, 7), 5],
                   device="cpu")  # fmt: skip
    assert np.abs(on_device["ecg_values"] - batched["ecg_values"]).max() < MAX_ABS_ERROR
    with pytest.raises(ValueError, match="crop_seeds are the seeds of random crops; this call crops 'center'"):
        fe(signal, sampling_rate=500, lead_names=leads, crop="center", crop_seeds=[1])
    with pytest.raises(ValueError, match="crop_seeds: one seed per record, got 2 for 1 records"):
        fe(signal, sampling_rate=500, lead_names=leads, crop_seeds=[1, 2])


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"highpass_hz": None},  # the offsets are signal then: taken out and put back
        {"highpass_hz": None, "normalization": "zscore_record"},
        {"highpass_hz": None, "normalization": "none"},
        {"highpass_hz": None, "normalization": "zscore_record", "missing_leads": "mask"},
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_leads_far_from_zero_give_the_scipy_paths_output(ptbxl_dir, settings, device):
    """Leads 300 mV off zero (electrode offsets reach that, and a DC-coupled recording keeps them;
    `max_amplitude_mv` bounds |x - median|, not |x|). A float32 copy of such a lead rounds its ECG to 3e-5 mV: the
    batched path was 5e-4 (z-scored) from the scipy path before it took the offsets out in float64."""
    signal, names = _signal(ptbxl_dir)
    ecgs, rates, lead_names = [signal + 300.0, signal[::5] - 200.0], [500, 100], [names, names]
    if settings.get("missing_leads") == "mask":
        ecgs, lead_names = [signal[:, :3] + 300.0, signal - 200.0], [names[:3], names]
        rates = [500, 500]
    arguments = {"sampling_rate": rates, "lead_names": lead_names, "return_tensors": "np"}
    expected = MeritFeatureExtractor(**settings)(ecgs, **arguments)
    actual = MeritFeatureExtractor(**settings)(ecgs, **arguments, device=device)
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)


def test_complex_input_raises_on_both_paths(ptbxl_dir):
    """numpy casts complex to float by dropping the imaginary part (a warning, not an error)."""
    signal, names = _signal(ptbxl_dir)
    for device in (None, "cpu"):
        with pytest.raises(EcgInputError, match=r"record 1: not an array of numbers \(complex values"):
            MeritFeatureExtractor()([signal, signal + 0.1j], sampling_rate=500, lead_names=names, device=device)


def _matmul_precision(full: bool = False):
    """The float32 matmul precision the products run in: per backend on torch >= 2.9, where the legacy getter still
    says what the legacy setter last set; `full=True`: what full float32 reads as."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        return ("ieee", "ieee") if full else tuple(backend.fp32_precision for backend in backends)
    return "highest" if full else torch.get_float32_matmul_precision()


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_set_by_the_caller_does_not_reach_the_dsp(ptbxl_dir, monkeypatch, device):
    """`TrainingArguments(tf32=True)` / `allow_tf32 = True` (float32 matmul precision "high"): the resampling and
    filtering products ran in TF32 on a GPU, about 1e-3 of a z-scored sample off. Inside the DSP the precision is
    "highest"; the caller's setting is back after (on a GPU the output is also compared with the scipy path)."""
    signal, names = _signal(ptbxl_dir)
    seen = []
    resample = feature_extraction_torch_merit.resample_poly_padded

    def recording(*args):
        seen.append(_matmul_precision())
        return resample(*args)

    monkeypatch.setattr(feature_extraction_torch_merit, "resample_poly_padded", recording)
    fe = MeritFeatureExtractor()
    expected = fe([signal, signal[::5]], sampling_rate=[500, 100], lead_names=names, return_tensors="np")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        actual = fe([signal, signal[::5]], sampling_rate=[500, 100], lead_names=names, return_tensors="np",
                    device=device)  # fmt: skip
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == [_matmul_precision(full=True)] * 2
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)


_TF32_THE_NEW_WAY = """
import numpy as np, torch
from merit_hf import MeritFeatureExtractor
from merit_hf.models.merit import feature_extraction_torch_merit as fet

signal = np.random.default_rng(0).normal(size=(5000, 12)) * 0.3
fe = MeritFeatureExtractor()
names = list(fe.lead_names)
expected = fe([signal, signal[::5]], sampling_rate=[500, 100], lead_names=names, return_tensors="np")["ecg_values"]
seen, resample = [], fet.resample_poly_padded
def recording(*args):
    seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
    return resample(*args)
fet.resample_poly_padded = recording
torch.backends.fp32_precision = "tf32"  # transformers' enable_tf32(True) on torch >= 2.9
actual = fe([signal, signal[::5]], sampling_rate=[500, 100], lead_names=names, return_tensors="np", device="cpu")
assert seen == [("ieee", "ieee")] * 2, seen
after = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
         torch.backends.mkldnn.matmul.fp32_precision)
assert after == ("tf32",) * 3, after
assert np.abs(actual["ecg_values"] - expected).max() <= 1e-4
print("TF32 NEW API OK")
"""


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9 has no per-backend precision")
def test_tf32_set_through_the_new_api_does_not_break_the_dsp():
    """`TrainingArguments(tf32=True)` on torch >= 2.9 sets `torch.backends.fp32_precision = "tf32"`, after which
    `torch.get_float32_matmul_precision()` raised ("mix of the legacy and new APIs") and every `device=` call failed.
    A fresh process (the setting is process-global, and an earlier legacy call hides the error): the products run in
    "ieee", the caller's "tf32" is back after, and the output is the scipy path's."""
    done = subprocess.run([sys.executable, "-c", _TF32_THE_NEW_WAY], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TF32 NEW API OK" in done.stdout


def _records_of_every_layout() -> list[np.ndarray]:
    """One random record 300 mV off zero (rounding happens after a subtraction) with NaN, inf, -inf and a subnormal,
    as float64, read-only, big-endian, float32 and reversed: the copies' torch path and numpy's fallback."""
    signal = np.random.default_rng(0).normal(size=(5000, 12)) * 3 + 300.0
    signal[7, 2], signal[9, 4], signal[0, 5], signal[11, 6] = np.nan, np.inf, -np.inf, 1e-310
    read_only = signal.copy()
    read_only.flags.writeable = False
    return [signal, read_only, signal.astype(">f8"), signal.astype(np.float32), signal[::-1]]


def test_the_centred_float32_copy_is_the_same_on_torch_threads_as_in_numpy():
    """`_write_centred` copies a float64 record into the batched DSP's float32 input on torch's threads (one pass
    that numpy runs on one core): bit for bit what numpy's float64 subtraction and cast give, non-finite values,
    large offsets and subnormal differences included; a read-only, non-native, float32 or reversed record takes numpy's
    path."""
    from merit_hf.models.merit.feature_extraction_merit import _write_centred

    for record in _records_of_every_layout():
        out = np.empty((12, 5000), np.float32)
        offset = _write_centred(out, record)
        with np.errstate(invalid="ignore", over="ignore"):
            expected = np.subtract(
                record.T.astype(np.float64), np.asarray(record[0], np.float64)[:, None], dtype=np.float64
            ).astype(np.float32)
        np.testing.assert_array_equal(out, expected)  # NaN where NaN, inf where inf
        np.testing.assert_array_equal(offset, np.asarray(record[0], np.float64))


def test_records_are_cast_as_they_are_unless_a_lead_sits_off_zero(ptbxl_dir, monkeypatch):
    """The device path copies a record whose leads are the model's, in mV, into float32 as it is (`_write_cast`, bit
    for bit numpy's cast, whatever the record's layout) and copies it again around its first samples
    (`_write_centred`) only where the screen's `off_zero` says the cast rounded more than that would: a lead whose
    values reach farther from 0 mV than its range. No bundled record is copied twice; one 5 mV off zero is, and
    comes out as on the scipy path; a float32 record, which the cast does not round, never is."""
    from merit_hf.models.merit import feature_extraction_merit
    from merit_hf.models.merit.feature_extraction_merit import _write_cast
    from merit_hf.models.merit.feature_extraction_torch_merit import screen_records

    for record in _records_of_every_layout():
        out = np.empty((12, 5000), np.float32)
        rounded = _write_cast(out, record)
        np.testing.assert_array_equal(out, record.T.astype(np.float32))
        assert rounded == (record.dtype != np.float32)

    recentred = []
    write_centred = feature_extraction_merit._write_centred
    monkeypatch.setattr(
        feature_extraction_merit,
        "_write_centred",
        lambda out, record: recentred.append(1) or write_centred(out, record),
    )
    real, names = _signal(ptbxl_dir)
    records = [record["signal"] for record in _bundled_records(ptbxl_dir) if record["sampling_rate"] == 500]
    MeritFeatureExtractor()(records, sampling_rate=500, lead_names=names, device="cpu")
    assert recentred == []
    shifted = real.copy()
    shifted[:, 5] += 5.0  # lead aVF entirely 5 mV above zero: wider off zero than its range
    stack = torch.from_numpy(np.stack([real.T, shifted.T]).astype(np.float32))
    checked, _, off_zero = screen_records(stack, 0.02, 30.0, 50)
    assert checked.all() and off_zero.tolist() == [False, True]
    expected, actual = _both_paths({}, [real, shifted], sampling_rate=500, lead_names=names, return_tensors="np")
    assert len(recentred) == 1
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    MeritFeatureExtractor()([shifted.astype(np.float32)], sampling_rate=500, lead_names=names, device="cpu")
    assert len(recentred) == 1


def _with_gap(signal, lead, start, length, value=np.nan):
    broken = signal.copy()
    broken[start : start + length, lead] = value
    return broken


def _nan_but_two_samples(signal):
    """Every lead NaN but its first and last sample: the audit's record that interpolation made into 12 lines."""
    broken = np.full_like(signal, np.nan)
    broken[0], broken[-1] = 0.1, -0.1
    return broken


# 500 Hz: `max_nan_gap_s` 0.05 s is 25 samples, `max_nan_fraction` 5 % is 250 of a lead's 5000
BEYOND_INTERPOLATION = [
    (
        "every lead NaN but two samples",
        _nan_but_two_samples,
        "record 1: lead I has 4998 NaN/inf samples of 5000 (99.96%), more than the 5.0% nan_policy='interpolate' "
        "repairs (max_nan_fraction)",
    ),
    (
        "aVR 90 % NaN",
        lambda s: _with_gap(s, 3, 250, 4500),
        "record 1: lead aVR has 4500 NaN/inf samples of 5000 (90.00%), more than the 5.0%",
    ),
    (
        "every other sample of V1 NaN",
        lambda s: _every_other_nan(s, 6),
        "record 1: lead V1 has 2500 NaN/inf samples of 5000 (50.00%)",
    ),
    (
        "a gap of 26 samples (52 ms)",
        lambda s: _with_gap(s, 4, 1000, 26),
        "record 1: lead aVL has a gap of 26 NaN/inf samples (0.052 s at 500 Hz, samples 1000-1025), longer than the "
        "0.05 s nan_policy='interpolate' repairs (max_nan_gap_s)",
    ),
    (
        "a 0.4 s gap at the start",
        lambda s: _with_gap(s, 11, 0, 200),
        "record 1: lead V6 has a gap of 200 NaN/inf samples (0.4 s at 500 Hz, samples 0-199)",
    ),
    (
        # aVR all zeros but two samples: interpolated to an all-zero lead, which the flat-lead check refuses as it
        # refuses the same lead without NaN (it skipped leads with NaN before they were interpolated)
        "an interpolated lead that is flat",
        lambda s: _with_gap(_with_gap(s, 3, 0, len(s), 0.0), 3, 2000, 20),
        "record 1: leads ['AVR'] are flat (at most 0 mV of signal, below min_amplitude_mv=0.02): a lead that was not "
        "recorded",
    ),
]


def _every_other_nan(signal, lead):
    broken = signal.copy()
    broken[::2, lead] = np.nan
    return broken


@pytest.mark.parametrize(
    ("what", "change", "message"), BEYOND_INTERPOLATION, ids=[w for w, _, _ in BEYOND_INTERPOLATION]
)
def test_interpolation_repairs_short_gaps_only_on_both_paths(ptbxl_dir, what, change, message):
    """`nan_policy="interpolate"` fills gaps up to `max_nan_gap_s` (0.05 s) and `max_nan_fraction` (5 %) of a lead,
    and raises naming the record, the lead and the gap or share beyond that; an interpolated lead then goes through
    the flat-lead check. Before, each of these records came back as a tensor: 12 z-scored straight lines, a lead
    90 % invented, a zero lead fed as a signal."""
    signal, names = _signal(ptbxl_dir)
    fe = MeritFeatureExtractor(nan_policy="interpolate")
    for device in (None, "cpu"):
        with pytest.raises(EcgInputError, match=re.escape(message)):
            fe([signal, change(signal)], sampling_rate=500, lead_names=names, device=device)


def test_gaps_within_the_bounds_are_repaired_and_the_bounds_are_settings(ptbxl_dir, tmp_path):
    """A 25-sample gap (exactly 0.05 s at 500 Hz), gaps at both ends, and 240 of 5000 samples of one lead (4.8 %) in
    short gaps are repaired alike on both paths, close to the record without gaps; a longer gap is repaired when
    `max_nan_gap_s` allows it, and the bounds are saved with the feature extractor; `None` lifts a bound."""
    signal, names = _signal(ptbxl_dir)
    many_short = signal.copy()
    for start in range(100, 4900, 400):  # 12 gaps of 20 samples: 4.8 % of V3
        many_short[start : start + 20, 8] = np.nan
    ecgs = [_with_gap(signal, 4, 1000, 25), _with_gap(_with_gap(signal, 0, 0, 25), 0, 4975, 25), many_short]
    expected, actual = _both_paths({"nan_policy": "interpolate"}, ecgs, sampling_rate=500, lead_names=names,
                                   return_tensors="np")  # fmt: skip
    np.testing.assert_allclose(actual["ecg_values"], expected["ecg_values"], rtol=0, atol=MAX_ABS_ERROR)
    clean = MeritFeatureExtractor()(signal, sampling_rate=500, lead_names=names, return_tensors="np")["ecg_values"][0]
    for values, lead in zip(expected["ecg_values"], (4, 0, 8)):
        assert np.corrcoef(values[lead], clean[lead])[0, 1] > 0.9

    long_gap = _with_gap(signal, 4, 1000, 100)  # 0.2 s
    with pytest.raises(EcgInputError, match=r"record 0: lead aVL has a gap of 100 NaN/inf samples \(0\.2 s"):
        MeritFeatureExtractor(nan_policy="interpolate")(long_gap, sampling_rate=500, lead_names=names)
    MeritFeatureExtractor(nan_policy="interpolate", max_nan_gap_s=0.25).save_pretrained(tmp_path)
    reloaded = MeritFeatureExtractor.from_pretrained(tmp_path)
    assert (reloaded.max_nan_gap_s, reloaded.max_nan_fraction) == (0.25, 0.05)
    for device in (None, "cpu"):
        assert np.isfinite(reloaded(long_gap, sampling_rate=500, lead_names=names, device=device)["ecg_values"]).all()
    unbounded = {"nan_policy": "interpolate", "max_nan_gap_s": None, "max_nan_fraction": None}
    _both_paths(unbounded, _with_gap(signal, 4, 250, 4500), sampling_rate=500, lead_names=names)
    for field, value in [("max_nan_gap_s", -1.0), ("max_nan_fraction", 1.5)]:
        with pytest.raises(ValueError, match=f"MeritFeatureExtractor.{field}: must be None or"):
            MeritFeatureExtractor(**{field: value})


def _with_spike(signal, value, sample=2500, leads=slice(None)):
    spiked = signal.copy()
    spiked[sample, leads] = value
    return spiked


@pytest.mark.parametrize(
    ("what", "change", "message"),
    [
        ("1e6 mV in every lead", lambda s: _with_spike(s, 1e6), "record 1: lead I sample 2500 is 1e+06 mV"),
        ("1000 mV in every lead", lambda s: _with_spike(s, 1000.0), "record 1: lead I sample 2500 is 1000 mV"),
        ("-80 mV in V5 only", lambda s: _with_spike(s, -80.0, 17, 10), "record 1: lead V5 sample 17 is -80 mV"),
        # 300 mV off zero (`test_leads_far_from_zero...` passes): the bound is on |x - median|, not on |x|
        (
            "a sample 50.1 mV off a lead 300 mV off zero",
            lambda s: _with_spike(s + 300.0, 350.1, 40, 2),
            "record 1: lead III sample 40 is 350.1 mV",
        ),
    ],  # fmt: skip
    ids=["1e6 mV", "1000 mV", "-80 mV in V5", "off zero"],
)
def test_one_impossible_sample_raises_naming_it_on_both_paths(ptbxl_dir, what, change, message):
    """One sample farther than `max_sample_deviation_mv` (50 mV) from its lead's median: before, the 99th-percentile
    bound let it through and it dominated the band-passed, z-scored lead (1e6 mV in every lead of a 500 Hz record:
    correlation -0.007 with the clean output, max |z| 30)."""
    signal, names = _signal(ptbxl_dir)
    fe = MeritFeatureExtractor()
    for device in (None, "cpu"):
        with pytest.raises(EcgInputError, match=re.escape(message)) as error:
            fe([signal, change(signal)], sampling_rate=500, lead_names=names, device=device)
        assert "beyond the 50 mV no surface ECG reaches" in str(error.value)
        assert "raise max_sample_deviation_mv" in str(error.value)
    # the bound is a setting: raised, the record is read (on both paths alike)
    _both_paths({"max_sample_deviation_mv": 2e6, "max_amplitude_mv": 2e6}, change(signal), sampling_rate=500,
                lead_names=names)  # fmt: skip
