"""What merit_hf refuses (README, "What merit_hf refuses"): one test per silent path closed, on real PTB-XL records
from `../shared/data` copied into the test's folder and corrupted there. Each bad input must give an `EcgInputError`
(or the component's own error type) whose message names the file, the field and the value, or a documented repair.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from merit_hf import MeritFeatureExtractor, MeritModel
from merit_hf.data import EcgInputError, convert_ptbxl, read_ecg_record
from merit_hf.data.ptbxl import read_ptbxl_database
from merit_hf.hub import HubFolderError, check_model_folder, clear_local_name_or_path, leak_problems, push_model
from merit_hf.hub.cards import public_path
from merit_hf.models.merit.feature_extraction_merit import read_wfdb_record
from tests.conftest import SHARED_DATA, tiny_merit_config

SUBSET = SHARED_DATA / "ptbxl_subset500"
PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@pytest.fixture
def record(tmp_path):
    """A copy of a real PTB-XL record (ecg_id 1, 100 Hz) named `rec`, to corrupt."""
    source = SUBSET / "records100" / "00000" / "00001_lr"
    if not source.with_suffix(".hea").is_file():
        pytest.skip(f"{source} not present (the shared data folder sits beside the checkout)")
    shutil.copyfile(source.with_suffix(".dat"), tmp_path / "rec.dat")
    (tmp_path / "rec.hea").write_text(source.with_suffix(".hea").read_text().replace("00001_lr", "rec"))
    return tmp_path / "rec"


def edit_header(path, old: str, new: str, line: int | None = None) -> None:
    """Replace `old` by `new` in the header (in one line, 0 = the record line, or in all)."""
    header = path.with_suffix(".hea")
    lines = header.read_text().splitlines()
    lines = [text.replace(old, new) if line in (None, number) else text for number, text in enumerate(lines)]
    assert lines != header.read_text().splitlines(), f"{old!r} not in the header"
    header.write_text("\n".join(lines) + "\n")


def set_lead(path, column: int, values) -> None:
    """Overwrite one lead's samples in the format-16 file and fix its checksum, as a recorder would have written it."""
    data = path.with_suffix(".dat")
    digital = np.fromfile(data, dtype="<i2").reshape(-1, 12)
    digital[:, column] = values
    digital.tofile(data)
    header = path.with_suffix(".hea")
    lines = header.read_text().splitlines()
    fields = lines[column + 1].split()
    fields[5], fields[6] = str(int(digital[0, column])), str(int(digital[:, column].sum(dtype=np.int64)) % 65536)
    lines[column + 1] = " ".join(fields)
    header.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# 1-2. Header fields that wfdb silently replaces
# ----------------------------------------------------------------------------------------------------------------------


def test_gain_zero_is_uncalibrated_and_refused_everywhere(record):
    edit_header(record, "1000.0(0)/mV", "0(0)/mV", line=10)  # V4 only: wfdb would read it at gain 200 (5x)
    message = rf"{record}\.hea: signal line 10 \(lead V4\): ADC gain 0 means uncalibrated in WFDB"
    with pytest.raises(EcgInputError, match=message):
        read_wfdb_record(record)
    with pytest.raises(EcgInputError, match=message):
        read_ecg_record(record)
    with pytest.raises(EcgInputError, match=message):
        MeritFeatureExtractor()(str(record))


def test_missing_gain_is_uncalibrated(record):
    edit_header(record, " 1000.0(0)/mV 16 0 -119 1508 0 I", "", line=1)
    with pytest.raises(EcgInputError, match=r"signal line 1: no ADC gain: the lead is uncalibrated"):
        read_ecg_record(record)


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        ("-500", r"record line: sampling frequency '-500' is not a positive number of Hz \(wfdb would read 250 Hz\)"),
        ("0", r"record line: sampling frequency '0' is not a positive number"),
        (None, r"record line gives no sampling frequency \(wfdb would assume 250 Hz\)"),
    ],
)
def test_negative_zero_or_missing_sampling_rate(record, rate, message):
    edit_header(record, "rec 12 100 1000", "rec 12" if rate is None else f"rec 12 {rate} 1000", line=0)
    with pytest.raises(EcgInputError, match=rf"{record}\.hea: {message}"):
        read_ecg_record(record)
    with pytest.raises(EcgInputError, match=message):
        MeritFeatureExtractor()(str(record))


def test_microvolt_sign_is_read_as_written(record):
    """wfdb drops the µ of `µV` and reads volts (10^6 x); the reader takes the unit from the header's text."""
    edit_header(record, "/mV", "/µV")
    assert read_wfdb_record(record)["units"] == ["µV"] * 12
    with pytest.raises(EcgInputError, match=r"leads \['I', 'II', .*\] are flat .* every lead is flat, mV labelled µV"):
        read_ecg_record(record)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Flat leads and mV labelled µV
# ----------------------------------------------------------------------------------------------------------------------


def test_flat_lead_policies_in_the_reader(record):
    set_lead(record, 9, 0)  # V4 not recorded: all zeros
    reference = read_ecg_record(SUBSET / "records100" / "00000" / "00001_lr")["signal"]
    with pytest.raises(
        EcgInputError, match=rf"{record}\.hea: leads \['V4'\] are flat \(at most 0 mV of signal, below min_amplitude"
    ):
        read_ecg_record(record)
    zeroed = read_ecg_record(record, flat_lead_policy="zero")
    assert zeroed["flat_leads"] == ["V4"] and zeroed["lead_names"][9] == "V4"
    assert not zeroed["signal"][:, 9].any()
    np.testing.assert_array_equal(np.delete(zeroed["signal"], 9, axis=1), np.delete(reference, 9, axis=1))
    dropped = read_ecg_record(record, flat_lead_policy="drop")
    assert dropped["flat_leads"] == ["V4"] and "V4" not in dropped["lead_names"] and dropped["signal"].shape[1] == 11
    np.testing.assert_array_equal(dropped["signal"], np.delete(reference, 9, axis=1))


def test_flat_lead_policies_in_the_feature_extractor(record):
    read = read_wfdb_record(record)
    signal = read["signal"].copy()
    signal[:, 3] = 0.37  # aVR: a lead-off electrode at a constant offset
    with pytest.raises(EcgInputError, match=r"record 0: leads \['AVR'\] are flat"):  # named as the record names it
        MeritFeatureExtractor()(signal, sampling_rate=100, lead_names=PTBXL_LEADS)
    out = MeritFeatureExtractor(flat_lead_policy="zero")(signal, sampling_rate=100, lead_names=PTBXL_LEADS)
    assert not out["ecg_values"][0, 3].any() and out["ecg_values"][0, 2].std() > 0.5
    # "drop": the lead is treated as not recorded; a limb lead is then rebuilt from I and II when asked
    derived = MeritFeatureExtractor(flat_lead_policy="drop", derive_limb_leads=True)
    expected = MeritFeatureExtractor(derive_limb_leads=True)(
        np.delete(signal, 3, axis=1), sampling_rate=100, lead_names=[n for n in PTBXL_LEADS if n != "AVR"]
    )["ecg_values"]
    np.testing.assert_array_equal(derived(signal, sampling_rate=100, lead_names=PTBXL_LEADS)["ecg_values"], expected)
    chest = read["signal"].copy()
    chest[:, 9] = 0.0
    with pytest.raises(
        EcgInputError, match=r"leads \['V4'\] are flat .* flat_lead_policy='drop' leaves them out, which"
    ):
        MeritFeatureExtractor(flat_lead_policy="drop")(chest, sampling_rate=100, lead_names=PTBXL_LEADS)
    with pytest.raises(EcgInputError, match=r"record 0: 11 leads given, 12 expected; missing \['V4'\]"):
        MeritFeatureExtractor(flat_lead_policy="drop", derive_limb_leads=True)(
            chest, sampling_rate=100, lead_names=PTBXL_LEADS
        )
    nan_lead = read["signal"].copy()
    nan_lead[:, 4] = 0.0
    nan_lead[10, 4] = np.nan  # a lead with NaN is the NaN check's: it names the NaN, not flatness
    with pytest.raises(EcgInputError, match=r"record 0: lead aVL has 1 NaN/inf samples"):
        MeritFeatureExtractor()(nan_lead, sampling_rate=100, lead_names=PTBXL_LEADS)
    frank = np.concatenate([read["signal"], np.zeros((len(signal), 1))], axis=1)  # a flat lead the model never uses
    kept = MeritFeatureExtractor(drop_extra_leads=True)(frank, sampling_rate=100, lead_names=[*PTBXL_LEADS, "vx"])
    np.testing.assert_array_equal(
        kept["ecg_values"],
        MeritFeatureExtractor()(read["signal"], sampling_rate=100, lead_names=PTBXL_LEADS)["ecg_values"],
    )
    with pytest.raises(ValueError, match="flat_lead_policy: must be one of"):
        MeritFeatureExtractor(flat_lead_policy="ignore")


def test_millivolts_labelled_microvolts_and_an_all_flat_record(record):
    signal = read_wfdb_record(record)["signal"]
    fe = MeritFeatureExtractor(flat_lead_policy="zero")  # even when flat leads are allowed
    with pytest.raises(EcgInputError, match=r"every lead is flat, mV labelled µV \(1000x too small\)\? check `units`"):
        fe(signal, sampling_rate=100, lead_names=PTBXL_LEADS, units="uV")
    with pytest.raises(EcgInputError, match=r"every lead is flat, no lead was recorded"):
        fe(np.zeros_like(signal), sampling_rate=100, lead_names=PTBXL_LEADS)
    edit_header(record, "1000.0(0)/mV", "1000.0(0)/uV")
    with pytest.raises(EcgInputError, match=r"check the header's units and ADC gain"):
        read_ecg_record(record)


def test_real_records_are_not_flat():
    """The lower bound leaves real ECGs alone: every lead of every shared 100 Hz record passes."""
    records = sorted((SUBSET / "records100").glob("*/*.hea"))[:100]
    if not records:
        pytest.skip(f"{SUBSET} not present")
    for path in records:
        assert read_ecg_record(path.with_suffix(""))["flat_leads"] == []


def exchange_lead_names(path, first: int, second: int) -> None:
    """Exchange the names of two signal lines (0 = the first lead) in the header: the data stay where they are."""
    header = path.with_suffix(".hea")
    lines = header.read_text().splitlines()
    fields = [lines[first + 1].split(), lines[second + 1].split()]
    fields[0][-1], fields[1][-1] = fields[1][-1], fields[0][-1]
    lines[first + 1], lines[second + 1] = " ".join(fields[0]), " ".join(fields[1])
    header.write_text("\n".join(lines) + "\n")


def lead_swap_warnings(read) -> list[str]:
    """The messages of the `EcgLeadSwapWarning`s (`merit_hf.data`) that `read()` gives."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read()
    return [str(warning.message) for warning in caught if warning.category.__name__ == "EcgLeadSwapWarning"]


def test_limb_leads_swapped_in_a_header_are_named(record):
    """A header with I and II exchanged was read as a valid ECG: the model got lead II's signal under lead I's
    embedding. Einthoven's law (I + III - II = 0) no longer holds, which every reader now says, naming the file and
    the likely swap: a warning by default, an error with lead_swap_policy="raise", nothing with "off"."""
    signal = read_wfdb_record(record)["signal"]
    exchange_lead_names(record, 0, 1)
    assert read_wfdb_record(record)["lead_names"][:2] == ["II", "I"]  # a valid header: the names are all it changes
    problem = (
        r": Einthoven's law does not hold: I \+ III - II has \d+% of the RMS of its largest lead \(I or III exchanged "
        r"with II, .*\); .* two limb leads are likely swapped in the header"
    )
    readers = {  # each with the name its messages give the record
        "read_ecg_record": (lambda **policy: read_ecg_record(record, **policy), f"{record}.hea"),
        "feature extractor": (lambda **policy: MeritFeatureExtractor(**policy)(str(record)), str(record)),
        "feature extractor, torch path": (
            lambda **policy: MeritFeatureExtractor(**policy)(str(record), device="cpu"),
            str(record),
        ),
        "feature extractor, array": (
            lambda **policy: MeritFeatureExtractor(**policy)(
                signal, sampling_rate=100, lead_names=["II", "I", *PTBXL_LEADS[2:]]
            ),
            "record 0",
        ),
        # the model's lead names in order: the torch path's batched screen clears the record without validate_signal
        "feature extractor, torch path, screened array": (
            lambda **policy: MeritFeatureExtractor(**policy)(
                [signal, signal[:, [1, 0, *range(2, 12)]]], sampling_rate=100, lead_names=PTBXL_LEADS, device="cpu"
            ),
            "record 1",
        ),
    }
    for reader, (read, name) in readers.items():
        found = lead_swap_warnings(read)
        assert len(found) == 1 and re.match(re.escape(name) + problem, found[0]), (reader, found)
        with pytest.raises(EcgInputError, match="Einthoven's law does not hold"):
            read(lead_swap_policy="raise")
        assert lead_swap_warnings(lambda: read(lead_swap_policy="off")) == [], reader
    exchange_lead_names(record, 0, 1)  # the names back where they belong
    assert lead_swap_warnings(lambda: read_ecg_record(record)) == []
    assert lead_swap_warnings(lambda: MeritFeatureExtractor()(str(record), device="cpu")) == []


def test_an_augmented_lead_swapped_and_a_flat_lead_zeroed(record):
    """Goldberger's law (aVR + aVL + aVF = 0) names an augmented lead exchanged with a limb lead; a flat lead zeroed by
    `flat_lead_policy="zero"` (or a missing one) is left out of the laws instead of breaking Einthoven's."""
    exchange_lead_names(record, 0, 4)  # I and aVL
    found = lead_swap_warnings(lambda: read_ecg_record(record))
    assert len(found) == 1 and "Goldberger's law does not hold: aVR + aVL + aVF has" in found[0], found
    exchange_lead_names(record, 0, 4)
    set_lead(record, 2, 0)  # lead III not recorded
    assert lead_swap_warnings(lambda: read_ecg_record(record, flat_lead_policy="zero")) == []
    assert lead_swap_warnings(lambda: MeritFeatureExtractor(flat_lead_policy="zero")(str(record))) == []


def test_real_records_keep_einthoven_and_goldberger_laws():
    """The threshold lies between every real record and every record with I and II exchanged
    (benchmarks/results/limb_lead_residuals.json, measured on 1,987 + 100 records), and the shared records pass."""
    from merit_hf.models.merit.feature_extraction_merit import DEFAULT_MAX_LIMB_LEAD_RESIDUAL
    from tests.conftest import REPO_ROOT

    measured = json.loads((REPO_ROOT / "benchmarks" / "results" / "limb_lead_residuals.json").read_text())
    assert measured["max_limb_lead_residual"] == DEFAULT_MAX_LIMB_LEAD_RESIDUAL
    assert (
        measured["largest_as_labelled"] < DEFAULT_MAX_LIMB_LEAD_RESIDUAL < measured["smallest_with_I_and_II_exchanged"]
    )
    records = [
        *sorted((SUBSET / "records100").glob("*/*.hea"))[:100],
        *sorted((SUBSET / "records500").glob("*/*.hea")),
    ]
    if not records:
        pytest.skip(f"{SUBSET} not present")
    for path in records:
        assert lead_swap_warnings(lambda path=path: read_ecg_record(path.with_suffix(""), lead_names=None)) == [], path


def test_the_lead_swap_settings_are_saved_and_older_configs_load(tmp_path):
    extractor = MeritFeatureExtractor(lead_swap_policy="raise", max_limb_lead_residual=0.2)
    extractor.save_pretrained(tmp_path / "new")
    reloaded = MeritFeatureExtractor.from_pretrained(tmp_path / "new")
    assert (reloaded.lead_swap_policy, reloaded.max_limb_lead_residual) == ("raise", 0.2)
    config = json.loads((tmp_path / "new" / "preprocessor_config.json").read_text())
    del config["lead_swap_policy"], config["max_limb_lead_residual"]  # saved before the check existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(config))
    older = MeritFeatureExtractor.from_pretrained(tmp_path / "old")
    assert (older.lead_swap_policy, older.max_limb_lead_residual) == ("warn", 0.1)
    with pytest.raises(
        ValueError, match=r"MeritFeatureExtractor.lead_swap_policy: must be one of \('warn', 'raise', 'off'\)"
    ):
        MeritFeatureExtractor(lead_swap_policy="ignore")
    with pytest.raises(ValueError, match="MeritFeatureExtractor.max_limb_lead_residual: must be positive"):
        MeritFeatureExtractor(max_limb_lead_residual=0)


def test_converter_lists_a_flat_record_in_the_report(tmp_path):
    root = tmp_path / "ptbxl"
    (root / "records100" / "00000").mkdir(parents=True)
    shutil.copy(SUBSET / "scp_statements.csv", root)
    table = pd.read_csv(SUBSET / "ptbxl_database.csv")
    table = table[table.ecg_id.isin([1, 2])]
    table.to_csv(root / "ptbxl_database.csv", index=False)
    for name in table.filename_lr:
        for suffix in (".hea", ".dat"):
            shutil.copyfile(SUBSET / f"{name}{suffix}", root / f"{name}{suffix}")
    flat = root / table.filename_lr.iloc[1]
    set_lead(flat, 6, 0)
    report = convert_ptbxl(root, tmp_path / "out", sampling_rate=100)
    assert (report.total, report.written) == (2, 1)
    saved = json.loads((tmp_path / "out" / "100hz" / "conversion_report.json").read_text())
    assert [failure["record"] for failure in saved["failures"]] == [table.filename_lr.iloc[1]]  # relative to root
    assert "leads ['V1'] are flat" in saved["failures"][0]["reason"]


# ----------------------------------------------------------------------------------------------------------------------
# 4. Duplicate ecg_id
# ----------------------------------------------------------------------------------------------------------------------


def test_duplicate_ecg_id_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "ptbxl"
    root.mkdir()
    shutil.copy(SUBSET / "scp_statements.csv", root)
    table = pd.read_csv(SUBSET / "ptbxl_database.csv")
    pd.concat([table, table[table.ecg_id == 10]]).to_csv(root / "ptbxl_database.csv", index=False)
    with pytest.raises(ValueError, match=r"ptbxl_database.csv: ecg_id\(s\) \[10\] listed more than once"):
        read_ptbxl_database(root)
    with pytest.raises(ValueError, match=r"listed more than once"):
        convert_ptbxl(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 5-6. hub push: tokens and local paths; loading NaN weights
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    model = MeritModel(tiny_merit_config())
    model.save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(model.config.ecg_config).save_pretrained(folder)
    (folder / "README.md").write_text(f"---\n{CARD_METADATA}---\n# a model\nUnits: 10 mm/mV, see docs/usage.md.\n")
    return folder


# what the push check needs of a card's metadata (`merit_hf.hub.cards.model_card_problems`)
CARD_METADATA = "library_name: transformers\nlicense: apache-2.0\npipeline_tag: feature-extraction\ntags:\n- ecg\n"


def test_push_refuses_tokens_in_any_text_file(model_folder):
    token = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE"
    (model_folder / "notes").mkdir()
    (model_folder / "notes" / "hf_token.txt").write_text(token + "\n")
    (model_folder / "train.log").write_text(f"step 1\nlogin with {token}\n")
    assert leak_problems(model_folder) == [
        "notes/hf_token.txt holds a Hugging Face token (line 1: hf_aB3d...): remove the file or the token before "
        "pushing, and revoke the token at https://huggingface.co/settings/tokens",
        "train.log holds a Hugging Face token (line 2: hf_aB3d...): remove the file or the token before pushing, "
        "and revoke the token at https://huggingface.co/settings/tokens",
    ]
    with pytest.raises(HubFolderError, match="train.log holds a Hugging Face token"):
        push_model(model_folder, "org/x", endpoint="http://127.0.0.1:9")  # refused before any request
    (model_folder / "train.log").write_text("hf_short is not a token\n")
    (model_folder / "notes" / "hf_token.txt").unlink()
    assert leak_problems(model_folder) == []


def test_push_clears_local_name_or_path_and_refuses_other_local_paths(model_folder):
    config = json.loads((model_folder / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/home/me/.venv/lib/python3.11/site-packages/minilm/model"
    (model_folder / "config.json").write_text(json.dumps(config))
    assert check_model_folder(model_folder) == [
        "config.json: text_config._name_or_path is the local path "
        "'/home/me/.venv/lib/python3.11/site-packages/minilm/model' (nobody else can load from it): set it to a Hub "
        "id or ''"
    ]
    assert clear_local_name_or_path(model_folder) == ["config.json: text_config._name_or_path"]
    assert json.loads((model_folder / "config.json").read_text())["text_config"]["_name_or_path"] == ""
    assert check_model_folder(model_folder) == []
    (model_folder / "README.md").write_text(f"---\n{CARD_METADATA}---\n# card\nPrompts: /home/me/merit/prompts.json\n")
    assert check_model_folder(model_folder) == [
        "README.md names local paths ['/home/me/merit/prompts.json']: write file names or Hub ids instead, or leave "
        "the file out of the push"
    ]


def test_card_renders_local_paths_as_file_names():
    assert public_path("/home/me/.venv/lib/merit_hf/evaluation/prompts/ptbxl_prompts.json") == "ptbxl_prompts.json"
    assert public_path("org/merit-ecg") == "org/merit-ecg" and public_path(0.75) == 0.75


def test_nan_weights_are_refused_by_name(model_folder):
    weights = load_file(model_folder / "model.safetensors")
    name = next(key for key in sorted(weights) if weights[key].ndim == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, model_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"weights \['{name}'\] hold NaN or inf values"):
        MeritModel.from_pretrained(model_folder)
    weights[name] = torch.nan_to_num(weights[name], nan=0.0)
    save_file(weights, model_folder / "model.safetensors", metadata={"format": "pt"})
    assert isinstance(MeritModel.from_pretrained(model_folder), MeritModel)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Messages that used to mislead
# ----------------------------------------------------------------------------------------------------------------------


def test_derive_limb_leads_hint_only_when_it_can_help(record):
    signal = read_wfdb_record(record)["signal"]
    fe = MeritFeatureExtractor()
    names = [n for n in PTBXL_LEADS if n != "V3"]
    with pytest.raises(EcgInputError) as error:
        fe(np.delete(signal, 8, axis=1), sampling_rate=100, lead_names=names)
    assert str(error.value) == (
        "record 0: 11 leads given, 12 expected; missing ['V3'] (missing_leads='mask' leaves the missing leads out)"
    )
    with pytest.raises(EcgInputError, match=r"missing \['III', 'aVR'\] \(derive_limb_leads=True rebuilds"):
        fe(
            np.delete(signal, [2, 3], axis=1),
            sampling_rate=100,
            lead_names=[n for n in PTBXL_LEADS if n not in ("III", "AVR")],
        )


def test_unicode_record_and_lead_names_are_reported_as_written(record):
    for suffix in (".hea", ".dat"):
        shutil.copyfile(record.with_suffix(suffix), record.parent / f"écg_ü{suffix}")
    unicode_record = record.parent / "écg_ü"
    edit_header(unicode_record, "rec", "écg_ü")
    with pytest.raises(EcgInputError, match=r"record line: record name 'écg_ü' holds characters other than ASCII"):
        read_wfdb_record(unicode_record)
    edit_header(record, " V1", " V₁")
    assert read_wfdb_record(record)["lead_names"][6] == "V₁"  # wfdb reads it as no name at all
    with pytest.raises(EcgInputError, match=r"unknown lead name 'V₁'"):
        MeritFeatureExtractor()(str(record))


def test_missing_length_is_taken_from_the_signal_file(record):
    edit_header(record, "rec 12 100 1000", "rec 12 100", line=0)
    read = read_wfdb_record(record)
    assert read["signal"].shape == (1000, 12)
    with open(record.with_suffix(".dat"), "ab") as handle:
        handle.write(b"\0")  # half a sample: not a whole number of frames
    with pytest.raises(EcgInputError, match=r"rec\.dat: the header gives no number of samples, and the signal file"):
        read_wfdb_record(record)


def test_an_array_of_text_names_the_record(record):
    signal = read_wfdb_record(record)["signal"]
    with pytest.raises(EcgInputError, match=r"record 1: not an array of numbers \(an array of text \(dtype <U"):
        MeritFeatureExtractor()([signal, signal.astype(str)], sampling_rate=100, lead_names=PTBXL_LEADS)
