"""The input contract on real PTB-XL records and on every kind of bad input named in the issue."""

import re
import shutil

import numpy as np
import pytest
import torch
import wfdb
from transformers import AutoFeatureExtractor

from merit_hf import MeritFeatureExtractor
from merit_hf.models.merit.feature_extraction_merit import EcgInputError, read_wfdb_record

PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _record(ptbxl_dir, ecg_id, rate=100):
    suffix = "lr" if rate == 100 else "hr"
    return ptbxl_dir / f"records{rate}" / "00000" / f"{ecg_id:05d}_{suffix}"


def _signal(ptbxl_dir, ecg_id=1, rate=500):
    signal, fields = wfdb.rdsamp(str(_record(ptbxl_dir, ecg_id, rate)))
    return signal, fields


def test_real_record_path_and_array_agree(ptbxl_dir):
    fe = MeritFeatureExtractor()
    from_path = fe(str(_record(ptbxl_dir, 1, 500)), return_tensors="np")["ecg_values"]
    signal, fields = _signal(ptbxl_dir)
    assert fields["sig_name"] == PTBXL_LEADS  # PTB-XL writes AVR/AVL/AVF in upper case
    from_array = fe(signal, sampling_rate=500, lead_names=fields["sig_name"], return_tensors="np")["ecg_values"]
    assert from_path.shape == (1, 12, 2250) and from_path.dtype == np.float32
    np.testing.assert_array_equal(from_path, from_array)
    np.testing.assert_allclose(from_path[0].mean(axis=1), 0.0, atol=1e-5)  # z-score per lead
    np.testing.assert_allclose(from_path[0].std(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("ecg_id", [1, 2, 5, 9, 12])
def test_100_hz_and_500_hz_versions_agree(ptbxl_dir, ecg_id):
    """PTB-XL's 100 Hz files are a downsampled copy of the 500 Hz ones; after resampling both to 250 Hz and
    band-passing to 0.67-40 Hz, each lead must correlate at >= 0.97 and differ by < 0.1 standard deviations on
    average (every lead of ecg_id 1-100 does since the record edges are extended before resampling; before, ecg_id 8
    fell to 0.890 from ringing in the last half second)."""
    fe = MeritFeatureExtractor()
    low = fe(str(_record(ptbxl_dir, ecg_id, 100)), return_tensors="np")["ecg_values"][0]
    high = fe(str(_record(ptbxl_dir, ecg_id, 500)), return_tensors="np")["ecg_values"][0]
    correlations = [np.corrcoef(low[lead], high[lead])[0, 1] for lead in range(12)]
    assert min(correlations) >= 0.97
    assert np.abs(low - high).mean() < 0.1


@pytest.mark.slow
def test_100_hz_and_500_hz_on_all_shared_records(shared_ptbxl_dir):
    fe = MeritFeatureExtractor()
    worst = []
    for ecg_id in range(1, 101):
        low = fe(str(_record(shared_ptbxl_dir, ecg_id, 100)), return_tensors="np")["ecg_values"][0]
        high = fe(str(_record(shared_ptbxl_dir, ecg_id, 500)), return_tensors="np")["ecg_values"][0]
        worst.append(min(np.corrcoef(low[k], high[k])[0, 1] for k in range(12)))
    assert min(worst) >= 0.97


@pytest.mark.parametrize("rate", [100, 360, 500])
def test_an_offset_changes_nothing_and_a_flat_lead_stays_flat(ptbxl_dir, rate):
    """The high-pass removes DC, so a lead's offset must not reach the output. With scipy's zero padding it did: the
    offset became a step at each end of the record, rung out into the window (up to 5.9 std at 100 Hz, 2 mV)."""
    signal, fields = _signal(ptbxl_dir)
    from merit_hf.evaluation.shifts import resample_record

    signal, _ = resample_record(signal, 500, rate)
    fe = MeritFeatureExtractor()
    reference = fe(signal, sampling_rate=rate, lead_names=fields["sig_name"])["ecg_values"]
    shifted = fe(signal + np.linspace(-3, 5, 12), sampling_rate=rate, lead_names=fields["sig_name"])["ecg_values"]
    np.testing.assert_allclose(shifted, reference, atol=1e-5)
    flat = signal.copy()
    flat[:, 3] = 3.7  # a lead-off electrode at a constant 3.7 mV: refused by default, exactly zero when asked
    with pytest.raises(EcgInputError, match=r"record 0: leads \['AVR'\] are flat"):
        fe(flat, sampling_rate=rate, lead_names=fields["sig_name"])
    zeroed = MeritFeatureExtractor(flat_lead_policy="zero")
    assert np.abs(zeroed(flat, sampling_rate=rate, lead_names=fields["sig_name"])["ecg_values"][0, 3]).max() == 0


@pytest.mark.parametrize("num_samples", [5000, 1000, 257, 40, 3])
def test_the_fast_flat_lead_test_never_misses_a_flat_lead(num_samples):
    """`_maybe_flat_columns` (a histogram of every 8th sample, then of every sample for the leads it does not clear)
    must return every lead the exact statistic calls flat (99th percentile of |x - median| below the limit), here on
    leads built to sit at the limit: as many samples as a flat lead may have inside its interval, the rest far off and
    placed on the subsampled positions, where they hurt the first test most; plus noise of every width and a lead
    hundreds of mV wide (capped bins)."""
    from merit_hf.models.merit.feature_extraction_merit import _maybe_flat_columns, check_lead_amplitudes

    limit = 0.02
    rng = np.random.default_rng(num_samples)
    inside = int(np.floor(0.99 * (num_samples - 1))) + 1  # samples a flat lead has within `limit` of its median
    columns, flat_by_construction = [], []
    strided = np.arange(0, num_samples, 8)  # the first test's samples: outliers there hurt it most
    order = np.concatenate([strided, np.setdiff1d(np.arange(num_samples), strided)])
    for trial in range(60):
        kind = trial % 4
        if kind < 2:  # at the limit: all but one of the samples a flat lead may have off its interval, far off, or
            # all of them, as far off as the percentile's interpolation lets a flat lead have them
            lead = rng.uniform(-0.5, 0.5, num_samples) * limit + rng.normal(0, 2)
            far = order[: num_samples - inside - (kind == 0)]
            # the percentile interpolates between the last inside sample and the nearest outlier: that far, no more
            frac = 0.99 * (num_samples - 1) % 1
            size = rng.uniform(1, 50, len(far)) if kind == 0 else limit * min(40, 0.4 / frac if frac else 40)
            lead[far] += rng.choice([-1, 1], len(far)) * size
        elif kind == 2:  # noise of any width
            lead = rng.normal(0, 10 ** rng.uniform(-3, 0), num_samples)
        else:  # a constant, or a lead of hundreds of mV
            lead = np.full(num_samples, rng.normal(0, 3)) if trial % 8 == 3 else rng.normal(0, 300, num_samples)
        columns.append(lead)
        flat_by_construction.append(kind == 0)
    signal = np.stack(columns, axis=1)
    exact = np.percentile(np.abs(signal - np.median(signal, axis=0)), 99, axis=0) < limit
    assert exact[np.array(flat_by_construction)].all()  # the adversarial leads really are flat
    assert exact.sum() >= 10 and (~exact).sum() >= 10
    assert set(np.flatnonzero(exact)) <= set(_maybe_flat_columns(signal, limit).tolist())
    names = [f"lead{i}" for i in range(signal.shape[1])]
    _, flat = check_lead_amplitudes(signal, names, "test", np.inf, limit, flat_lead_policy="drop")
    assert flat == [names[i] for i in np.flatnonzero(exact)]


def test_rates_that_resample_exactly_and_records_too_short(ptbxl_dir):
    fe = MeritFeatureExtractor(padding=True)
    for rate in (2048, 1001, 360, 128):
        record = np.random.default_rng(0).standard_normal((10 * rate, 12)) * 0.1
        assert fe(record, sampling_rate=rate, lead_names=PTBXL_LEADS)["ecg_values"].shape == (1, 12, 2250), rate
    with pytest.raises(EcgInputError, match="record 0: 1 samples; a record needs at least 2"):
        fe(np.zeros((1, 12)), sampling_rate=500, lead_names=PTBXL_LEADS)
    with pytest.raises(EcgInputError, match="record 0: 5 samples are too short for the band-pass filter"):
        fe(np.random.default_rng(0).standard_normal((5, 12)), sampling_rate=500, lead_names=PTBXL_LEADS)


def test_random_crops_differ_between_dataloader_workers(ptbxl_dir):
    """Forked workers inherit one generator state; each is re-seeded from its worker seed."""
    import torch

    signal, fields = _signal(ptbxl_dir)
    fe = MeritFeatureExtractor(crop="random", seed=0)

    class Crops(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return fe(signal, sampling_rate=500, lead_names=fields["sig_name"])["ecg_values"][0, 0, :5]

    torch.manual_seed(0)
    batches = [batch.numpy() for batch in torch.utils.data.DataLoader(Crops(), batch_size=2, num_workers=2)]
    assert not np.allclose(batches[0], batches[1]), "both workers cut the same crops"
    torch.manual_seed(0)
    again = [batch.numpy() for batch in torch.utils.data.DataLoader(Crops(), batch_size=2, num_workers=2)]
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))  # reproducible under a seeded loader


def test_extra_leads_raise_unless_asked_to_drop(ptbxl_dir, tmp_path):
    """A 15-lead record (12 + Frank vx, vy, vz, as PTB's) from a real record, as an array and as a WFDB record."""
    signal, fields = _signal(ptbxl_dir)
    frank = np.stack([signal[:, 0] - signal[:, 6], signal[:, 1] * 0.5, signal[:, 7] - signal[:, 8]], axis=1)
    fifteen, names = np.concatenate([signal, frank], axis=1), [*fields["sig_name"], "vx", "vy", "vz"]
    with pytest.raises(EcgInputError, match=r"unknown lead name 'vx'.*drop_extra_leads=True"):
        MeritFeatureExtractor()(fifteen, sampling_rate=500, lead_names=names)
    dropping = MeritFeatureExtractor(drop_extra_leads=True)
    twelve = MeritFeatureExtractor()(signal, sampling_rate=500, lead_names=fields["sig_name"])["ecg_values"]
    np.testing.assert_array_equal(dropping(fifteen, sampling_rate=500, lead_names=names)["ecg_values"], twelve)
    wfdb.wrsamp("r15", fs=500, units=["mV"] * 15, sig_name=names, p_signal=fifteen, fmt=["16"] * 15,
                write_dir=str(tmp_path))  # fmt: skip
    from_file = dropping(str(tmp_path / "r15"))["ecg_values"]
    np.testing.assert_allclose(from_file, twelve, atol=2e-3)  # 16-bit storage
    dropping.save_pretrained(tmp_path / "fe")
    assert MeritFeatureExtractor.from_pretrained(tmp_path / "fe").drop_extra_leads is True


def test_lead_names_are_matched_case_insensitively_and_reordered(ptbxl_dir):
    fe = MeritFeatureExtractor()
    signal, fields = _signal(ptbxl_dir)
    reference = fe(signal, sampling_rate=500, lead_names=PTBXL_LEADS, return_tensors="np")["ecg_values"]
    order = np.random.default_rng(0).permutation(12)
    shuffled_names = [PTBXL_LEADS[i].lower() if i % 2 else PTBXL_LEADS[i] for i in order]
    shuffled = fe(signal[:, order], sampling_rate=500, lead_names=shuffled_names, return_tensors="np")["ecg_values"]
    np.testing.assert_array_equal(reference, shuffled)


def test_units_are_converted(ptbxl_dir):
    fe = MeritFeatureExtractor(normalization="none")
    signal, _ = _signal(ptbxl_dir)
    mv = fe(signal, sampling_rate=500, lead_names=PTBXL_LEADS, return_tensors="np")["ecg_values"]
    uv = fe(signal * 1000, sampling_rate=500, lead_names=PTBXL_LEADS, units="uV", return_tensors="np")["ecg_values"]
    micro = fe(signal * 1000, sampling_rate=500, lead_names=PTBXL_LEADS, units="µV", return_tensors="np")
    np.testing.assert_allclose(mv, uv, atol=1e-5)
    np.testing.assert_allclose(mv, micro["ecg_values"], atol=1e-5)


def test_missing_limb_leads_can_be_derived_on_request(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    keep = [0, 1] + list(range(6, 12))  # I, II, V1-V6: what 8-lead devices record
    names = [PTBXL_LEADS[i] for i in keep]
    with pytest.raises(EcgInputError, match=re.escape("record 0: 8 leads given, 12 expected; missing ['III', 'aVR'")):
        MeritFeatureExtractor()(signal[:, keep], sampling_rate=500, lead_names=names)
    repaired = MeritFeatureExtractor(derive_limb_leads=True)(signal[:, keep], sampling_rate=500, lead_names=names)
    original = MeritFeatureExtractor()(signal, sampling_rate=500, lead_names=PTBXL_LEADS)
    # PTB-XL's recorded limb leads obey Einthoven/Goldberger up to quantisation
    np.testing.assert_allclose(repaired["ecg_values"], original["ecg_values"], atol=0.05)


def test_nan_interpolation_on_request(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    broken = signal.copy()
    broken[1000:1003, 4] = np.nan
    with pytest.raises(EcgInputError, match="record 0: lead aVL has 3 NaN/inf samples"):
        MeritFeatureExtractor()(broken, sampling_rate=500, lead_names=PTBXL_LEADS)
    repaired = MeritFeatureExtractor(nan_policy="interpolate")(broken, sampling_rate=500, lead_names=PTBXL_LEADS)
    assert np.isfinite(repaired["ecg_values"]).all()
    broken[:, 4] = np.inf
    with pytest.raises(EcgInputError, match="lead aVL is entirely NaN/inf"):
        MeritFeatureExtractor(nan_policy="interpolate")(broken, sampling_rate=500, lead_names=PTBXL_LEADS)


def test_padding_on_request_returns_an_attention_mask(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    short = signal[:2000]  # 4 s at 500 Hz -> 1000 samples at 250 Hz
    with pytest.raises(EcgInputError, match="record 0: 1000 samples at 250 Hz .* shorter than the 2250-sample window"):
        MeritFeatureExtractor()(short, sampling_rate=500, lead_names=PTBXL_LEADS)
    out = MeritFeatureExtractor(padding=True)(short, sampling_rate=500, lead_names=PTBXL_LEADS, return_tensors="np")
    assert out["ecg_attention_mask"].sum() == 1000
    assert (out["ecg_values"][0, :, 1000:] == 0).all()


def test_padding_takes_transformers_padding_strategies(ptbxl_dir):
    """`"do_not_pad"` is a string, hence truthy: it padded. transformers' `PaddingStrategy` values (strings or the
    enum) now mean what they say; every window is `num_samples` long, so "longest" and "max_length" both pad to it."""
    from transformers.utils import PaddingStrategy

    signal, _ = _signal(ptbxl_dir)
    short = signal[:2000]  # 1000 samples at 250 Hz
    fe = MeritFeatureExtractor()
    for padding in ("do_not_pad", PaddingStrategy.DO_NOT_PAD, False):
        with pytest.raises(EcgInputError, match="shorter than the 2250-sample window"):
            fe(short, sampling_rate=500, lead_names=PTBXL_LEADS, padding=padding)
        with pytest.raises(EcgInputError, match="shorter than the 2250-sample window"):
            MeritFeatureExtractor(padding=padding)(short, sampling_rate=500, lead_names=PTBXL_LEADS)
    for padding in ("longest", "max_length", PaddingStrategy.MAX_LENGTH, True):
        out = fe(short, sampling_rate=500, lead_names=PTBXL_LEADS, padding=padding, return_tensors="np")
        assert out["ecg_attention_mask"].sum() == 1000, padding
    assert MeritFeatureExtractor(padding="max_length").padding is True
    with pytest.raises(ValueError, match=r"padding must be True, False or one of \('longest', 'max_length', 'do_not"):
        fe(short, sampling_rate=500, lead_names=PTBXL_LEADS, padding="yes")


def test_return_attention_mask_forces_or_drops_the_mask(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    short = signal[:2000]  # 1000 samples at 250 Hz
    fe = MeritFeatureExtractor()
    plain = fe(signal, sampling_rate=500, lead_names=PTBXL_LEADS, return_tensors="np")
    assert list(plain) == ["ecg_values"]  # None: a mask only with padding
    forced = fe(signal, sampling_rate=500, lead_names=PTBXL_LEADS, return_tensors="np", return_attention_mask=True)
    np.testing.assert_array_equal(forced["ecg_attention_mask"], np.ones((1, 2250), dtype=np.int64))
    np.testing.assert_array_equal(forced["ecg_values"], plain["ecg_values"])
    both = fe([signal, short], sampling_rate=500, lead_names=PTBXL_LEADS, padding=True, return_tensors="np")
    assert both["ecg_attention_mask"].sum(axis=1).tolist() == [2250, 1000]
    dropped = fe([signal, short], sampling_rate=500, lead_names=PTBXL_LEADS, padding=True, return_attention_mask=False)
    assert list(dropped) == ["ecg_values"]
    np.testing.assert_array_equal(dropped["ecg_values"], both["ecg_values"])


def test_per_record_sampling_rates_as_an_array_or_tensor(ptbxl_dir):
    high, _ = _signal(ptbxl_dir, rate=500)
    low, _ = _signal(ptbxl_dir, rate=100)
    fe = MeritFeatureExtractor()
    expected = fe([high, low], sampling_rate=[500, 100], lead_names=PTBXL_LEADS)["ecg_values"]
    for rates in (np.array([500, 100]), torch.tensor([500.0, 100.0])):
        np.testing.assert_array_equal(
            fe([high, low], sampling_rate=rates, lead_names=PTBXL_LEADS)["ecg_values"], expected
        )
    with pytest.raises(EcgInputError, match=re.escape("sampling_rate: 3 values given for 2 records")):
        fe([high, low], sampling_rate=np.array([500, 100, 250]), lead_names=PTBXL_LEADS)


def test_random_crop_is_seeded(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    a = MeritFeatureExtractor(crop="random", seed=3)(signal, sampling_rate=500, lead_names=PTBXL_LEADS)
    b = MeritFeatureExtractor(crop="random", seed=3)(signal, sampling_rate=500, lead_names=PTBXL_LEADS)
    np.testing.assert_array_equal(a["ecg_values"], b["ecg_values"])


def test_save_and_auto_load(tmp_path):
    fe = MeritFeatureExtractor(lowpass_hz=45.0, normalization="zscore_record", seed=7)
    fe.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(reloaded, MeritFeatureExtractor)
    assert (reloaded.lowpass_hz, reloaded.normalization, reloaded.seed) == (45.0, "zscore_record", 7)


def test_a_feature_extractor_saved_after_its_processor_names_only_itself(tmp_path):
    """`ProcessorMixin.save_pretrained` leaves the processor's `auto_map` entry on the feature extractor object: saved
    alone afterwards (an encoder or classifier folder, no tokenizer), its file sent `AutoProcessor` to a
    `MeritProcessor` that failed on the missing tokenizer. The processor's entry stays in its own file."""
    import json

    from merit_hf import MeritProcessor
    from tests.conftest import train_tiny_tokenizer

    processor = MeritProcessor(
        feature_extractor=MeritFeatureExtractor(), tokenizer=train_tiny_tokenizer(tmp_path / "t")
    )
    processor.save_pretrained(tmp_path / "processor")
    processor.feature_extractor.save_pretrained(tmp_path / "encoder")
    assert json.loads((tmp_path / "encoder" / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoFeatureExtractor": "feature_extraction_merit.MeritFeatureExtractor"
    }
    saved = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_merit.MeritProcessor"}


def _largest_sample_deviation(root) -> tuple[int, float]:
    """Every record of a PTB-XL folder through validation with the default bounds (none may be refused), and the
    largest |x - median| of any of their samples, in mV."""
    fe = MeritFeatureExtractor()
    headers = sorted(root.glob("records*/*/*.hea"))
    largest = 0.0
    for header in headers:
        signal, _, _, _ = fe.validate_one(str(header.with_suffix("")), None, None)
        largest = max(largest, float(np.abs(signal - np.median(signal, axis=0)).max()))
    return len(headers), largest


def test_no_bundled_record_comes_near_the_sample_bound(ptbxl_dir):
    """`max_sample_deviation_mv` (50 mV) refuses none of the 512 bundled records: their largest |x - median| is
    11.3 mV (ecg_id 421, V4)."""
    from merit_hf.models.merit.feature_extraction_merit import DEFAULT_MAX_SAMPLE_DEVIATION_MV

    count, largest = _largest_sample_deviation(ptbxl_dir)
    assert count == 512
    assert 11.0 < largest < 11.5 < DEFAULT_MAX_SAMPLE_DEVIATION_MV / 4


@pytest.mark.slow
def test_no_shared_record_comes_near_the_sample_bound():
    """The same over ../shared/data: the 1,987 records of ptbxl_2k (largest 11.5 mV, ecg_id 710, V2) and the 600 of
    ptbxl_subset500 at 100 and 500 Hz."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "ptbxl_2k").is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the shared data folder sits beside the checkout)")
    assert _largest_sample_deviation(SHARED_DATA / "ptbxl_2k") == (1987, pytest.approx(11.534, abs=1e-3))
    count, largest = _largest_sample_deviation(SHARED_DATA / "ptbxl_subset500")
    assert count == 600 and largest < 11.5


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each its own message naming the record
# ---------------------------------------------------------------------------------------------------------------------
BAD_ARRAYS = [
    ({"drop": 4}, "record 0: 12 lead names for an array of shape (5000, 8)"),
    ({"rename": ("V6", "V7")}, "record 0: unknown lead name 'V7'"),
    ({"nan_lead": 7}, "record 0: lead V2 has 5000 NaN/inf samples"),
    ({"sampling_rate": None}, "record 0: sampling_rate is required"),
    ({"sampling_rate": 50}, "record 0: 50 Hz cannot reach the model's band"),
    ({"units": "furlongs"}, "record 0: unknown unit 'furlongs'"),
    ({"scale": 1000.0}, "the signal is probably in µV: pass units='uV'"),
    ({"lead_names": None}, "record 0: lead_names is required"),
]


@pytest.mark.parametrize(("change", "message"), BAD_ARRAYS)
def test_bad_arrays_raise_clear_errors(ptbxl_dir, change, message):
    signal, _ = _signal(ptbxl_dir)
    names = list(PTBXL_LEADS)
    kwargs = {"sampling_rate": 500, "units": "mV"}
    if "drop" in change:
        signal = signal[:, :8]
    if "rename" in change:
        names[names.index(change["rename"][0])] = change["rename"][1]
    if "nan_lead" in change:
        signal = signal.copy()
        signal[:, change["nan_lead"]] = np.nan
    if "scale" in change:
        signal = signal * change["scale"]
    for key in ("sampling_rate", "units"):
        if key in change:
            kwargs[key] = change[key]
    lead_names = change.get("lead_names", names)
    with pytest.raises(EcgInputError, match=re.escape(message)):
        MeritFeatureExtractor()(signal, lead_names=lead_names, **kwargs)


def test_transposed_array_gets_a_hint(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    with pytest.raises(EcgInputError, match="transposed"):
        MeritFeatureExtractor()(signal.T, sampling_rate=500, lead_names=PTBXL_LEADS)


def test_the_failing_record_of_a_batch_is_named(ptbxl_dir):
    signal, _ = _signal(ptbxl_dir)
    broken = signal.copy()
    broken[10, 0] = np.inf
    with pytest.raises(EcgInputError, match="record 2: lead I has 1 NaN/inf samples"):
        MeritFeatureExtractor()([signal, signal, broken], sampling_rate=500, lead_names=PTBXL_LEADS)


@pytest.fixture
def record_copy(ptbxl_dir, tmp_path):
    for suffix in (".hea", ".dat"):
        shutil.copy(_record(ptbxl_dir, 1, 500).with_suffix(suffix), tmp_path / f"00001_hr{suffix}")
    return tmp_path / "00001_hr"


def test_corrupt_header_names_the_file(record_copy):
    header = record_copy.with_suffix(".hea")
    header.write_text(header.read_text().splitlines()[0] + "\n")  # record line only: signal lines lost
    with pytest.raises(EcgInputError, match=rf"{re.escape(str(header))}: corrupt or truncated WFDB header"):
        read_wfdb_record(record_copy)


def test_garbage_header_names_the_file(record_copy):
    header = record_copy.with_suffix(".hea")
    header.write_text("this is not a header\n")
    with pytest.raises(EcgInputError, match=rf"{re.escape(str(header))}: corrupt or truncated WFDB header"):
        MeritFeatureExtractor()(str(record_copy))


def test_missing_signal_file_names_it(record_copy):
    record_copy.with_suffix(".dat").unlink()
    with pytest.raises(EcgInputError, match="signal file 00001_hr.dat is missing"):
        read_wfdb_record(record_copy)


def test_truncated_signal_file_is_detected(record_copy):
    data = record_copy.with_suffix(".dat")
    data.write_bytes(data.read_bytes()[:50_000])
    with pytest.raises(EcgInputError, match=r"00001_hr.dat: signal file holds 50000 bytes, the header declares 5000"):
        read_wfdb_record(record_copy)


def test_header_rate_conflict_is_an_error(record_copy):
    with pytest.raises(EcgInputError, match="sampling_rate=250 given but the header says 500.0 Hz"):
        MeritFeatureExtractor()(str(record_copy), sampling_rate=250)


def test_a_path_with_other_lead_names_or_units_is_an_error(record_copy):
    fe = MeritFeatureExtractor()
    with pytest.raises(EcgInputError, match=r"lead_names=\['V6', .*given but the header names \['I', 'II'"):
        fe(str(record_copy), lead_names=PTBXL_LEADS[::-1])
    with pytest.raises(EcgInputError, match=r"units='uV' given but the header says \['mV', "):
        fe(str(record_copy), units="uV")
    with pytest.raises(EcgInputError, match=r"units='uV' given"):
        fe(str(record_copy), units="uV", device="cpu")
    expected = fe(str(record_copy))["ecg_values"]  # the header's own names and units, spelt otherwise, are no conflict
    same = fe(str(record_copy), lead_names=[lead.lower() for lead in PTBXL_LEADS], units=["MV"] * 12)["ecg_values"]
    np.testing.assert_array_equal(same, expected)


def test_a_lead_named_twice_is_an_error_before_a_flat_copy_is_dropped(ptbxl_dir):
    """A flat column named as another lead was dropped by name, taking its good twin with it."""
    signal, _ = _signal(ptbxl_dir)
    signal[:, 1] = 0.0
    names = ["I", "I", *PTBXL_LEADS[2:]]
    fe = MeritFeatureExtractor(flat_lead_policy="drop", missing_leads="mask")
    for device in (None, "cpu"):
        with pytest.raises(EcgInputError, match="record 0: lead 'I' appears twice"):
            fe(signal, sampling_rate=500, lead_names=names, device=device)


def test_missing_header(tmp_path):
    with pytest.raises(EcgInputError, match="WFDB header not found"):
        MeritFeatureExtractor()(str(tmp_path / "nothing"))


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match=r"MeritFeatureExtractor.lowpass_hz: must be in \(0, 125.0\) Hz"):
        MeritFeatureExtractor(lowpass_hz=200.0)
    with pytest.raises(ValueError, match="MeritFeatureExtractor.nan_policy"):
        MeritFeatureExtractor(nan_policy="ignore")


@pytest.mark.slow
def test_reader_matches_wfdb_on_every_bundled_record(ptbxl_dir):
    """The numpy reader for format-16 records gives wfdb.rdrecord's float64 signal bit for bit, and its units."""
    paths = sorted(ptbxl_dir.glob("records*/*/*.hea"))
    assert len(paths) >= 500
    for header in paths:
        ours = read_wfdb_record(header)
        theirs = wfdb.rdrecord(str(header.with_suffix("")))
        np.testing.assert_array_equal(ours["signal"], theirs.p_signal, err_msg=str(header))
        assert ours["units"] == theirs.units and ours["lead_names"] == theirs.sig_name


def test_invalid_format16_samples_become_nan_as_in_wfdb(record_copy):
    data = record_copy.with_suffix(".dat")
    raw = bytearray(data.read_bytes())
    position = (100 * 12 + 3) * 2  # sample 100, aVR
    old_value = int.from_bytes(raw[position : position + 2], "little", signed=True)
    raw[position : position + 2] = (-32768).to_bytes(2, "little", signed=True)
    data.write_bytes(bytes(raw))
    # WFDB counts the invalid value in the checksum: the header of a record written with it says so
    header = record_copy.with_suffix(".hea")
    checksum = (53190 - old_value - 32768) % 65536
    header.write_text(header.read_text().replace("82 53190 0 AVR", f"82 {checksum} 0 AVR"))
    signal = read_wfdb_record(record_copy)["signal"]
    np.testing.assert_array_equal(signal, wfdb.rdrecord(str(record_copy)).p_signal)
    assert np.isnan(signal[100, 3]) and np.isnan(signal).sum() == 1
    with pytest.raises(EcgInputError, match=r"00001_hr: lead aVR has 1 NaN/inf samples"):
        MeritFeatureExtractor()(str(record_copy))


def test_other_storage_formats_are_read_by_wfdb(ptbxl_dir, tmp_path):
    signal, fields = _signal(ptbxl_dir)
    wfdb.wrsamp(
        "format212", fs=500, units=fields["units"], sig_name=fields["sig_name"], p_signal=signal,
        fmt=["212"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path),
    )  # fmt: skip
    record = read_wfdb_record(tmp_path / "format212")
    np.testing.assert_array_equal(record["signal"], wfdb.rdrecord(str(tmp_path / "format212")).p_signal)
    np.testing.assert_allclose(record["signal"], signal, atol=1e-3)
