"""The Gradio Space (`spaces_demo/app.py`) driven over HTTP with `gradio_client` on 127.0.0.1: every feature on a
bundled real PTB-XL record and on an upload, every bad input (a readable error, the app keeps serving), and one
headless-Chromium screenshot of the page checked to contain the ECG plot.

The model is a tiny random-weight MERIT (and a tiny random report model) built here: the values are checked against
direct calls of the same merit_hf functions, never for clinical meaning.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import numpy as np
import pytest
import torch
import wfdb
from packaging.requirements import Requirement

from merit_hf import (
    MeritEcgModel,
    MeritFeatureExtractor,
    MeritForPreTraining,
    MeritForReportGeneration,
    MeritProcessor,
    zero_shot_classify,
)
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, tiny_ecg_config, tiny_merit_config, train_tiny_tokenizer
from tests.test_report_generation import tiny_llama, train_sentencepiece_tokenizer

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")
pytest.importorskip("matplotlib")

APP_PATH = REPO_ROOT / "spaces_demo" / "app.py"
UPLOAD_RECORD = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
STANDARD_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def load_app_module():
    spec = importlib.util.spec_from_file_location("merit_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The app on a free loopback port, with a tiny MERIT model and a tiny report model saved here."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("space")
    model_dir, report_dir = root / "merit", root / "merit-report"
    model = MeritForPreTraining(tiny_merit_config())  # what the quick-start saves
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    model.save_pretrained(model_dir)
    MeritProcessor(feature_extractor, train_tiny_tokenizer(root / "tokenizer")).save_pretrained(model_dir)
    feature_extractor.save_pretrained(model_dir)

    lm_tokenizer = train_sentencepiece_tokenizer(root / "spm")
    report_model = MeritForReportGeneration.from_parts(
        MeritEcgModel(tiny_ecg_config()), tiny_llama(len(lm_tokenizer)), lm_tokenizer, ecg_tokens_per_lead=2
    )
    report_model.save_pretrained(report_dir)
    MeritProcessor(feature_extractor, lm_tokenizer, ecg_seq_length=report_model.config.ecg_seq_length).save_pretrained(
        report_dir
    )

    app = load_app_module()
    app.MAX_NEW_TOKENS = 8  # a random tiny LM: the length only costs time
    models = app.load_models(str(model_dir), str(report_dir))
    demo = app.create_demo(models)
    demo.queue().launch(
        server_name="127.0.0.1",
        prevent_thread_lock=True,
        share=False,
        show_error=True,
        quiet=True,
        max_file_size="20mb",
    )
    client = gradio_client.Client(demo.local_url, verbose=False)
    yield app, models, client, demo.local_url
    client.close() if hasattr(client, "close") else None
    demo.close()


def analyse(client, files=None, example=None, label_set="superclass"):
    files = [gradio_client.handle_file(str(path)) for path in files] if files else None
    return client.predict(files, example, label_set, api_name="/analyse")


def decode_plot(plot: dict) -> np.ndarray:
    """The figure as Gradio sends it (a data URL, WebP in Gradio 6) as RGB floats in [0, 1]."""
    from PIL import Image

    assert plot["type"] == "matplotlib"
    data = plot["plot"].split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.float64) / 255


def grid_fraction(image: np.ndarray) -> float:
    """Fraction of pixels in the salmon of the ECG grid's large squares (#f08080, anti-aliased and lossy-encoded)."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    grid = (red > 0.85) & (green > 0.45) & (green < 0.7) & (np.abs(green - blue) < 0.06)
    return float(grid.mean())


@pytest.mark.slow
def test_bundled_example_shows_every_feature(space):
    app, models, client, _ = space
    figure, scores, neighbours, report, status = analyse(client, example="00003_lr")

    image = decode_plot(figure)
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert grid_fraction(image) > 0.001, "no ECG grid on the plot"

    record = str(app.EXAMPLES_DIR / "00003_lr")
    ecg_values = models.processor.feature_extractor(record, return_tensors="pt")["ecg_values"]
    direct = zero_shot_classify(
        models.model,
        models.processor,
        ecg_values=ecg_values,
        candidate_labels=["CD", "HYP", "MI", "NORM", "STTC"],
        class_descriptions="superclass",
    )
    got = {row[0]: row[2] for row in scores["data"]}
    assert set(got) == {"CD", "HYP", "MI", "NORM", "STTC"}
    for label, score in zip(direct["labels"], direct["scores"][0], strict=True):
        assert got[label] == pytest.approx(float(score), abs=1e-4)

    assert neighbours["data"][0][0] == "PTB-XL 3" and neighbours["data"][0][3] == pytest.approx(1.0, abs=1e-4)
    assert len(neighbours["data"]) == 3

    read = app.read_wfdb_record(record)
    assert report == app.generate_report(models, read["signal"], read)
    assert "Resampled 100 Hz -> 250 Hz" in status and "00003_lr" in status


def test_uploaded_record_and_other_label_set(space, tmp_path):
    _, _, client, _ = space
    files = [UPLOAD_RECORD.with_suffix(".hea"), UPLOAD_RECORD.with_suffix(".dat")]
    _, scores, _, _, status = analyse(client, files=files, label_set="rhythm")
    assert "`00001_lr`: 12 leads, 100 Hz, 10.0 s" in status
    assert "SR" in {row[0] for row in scores["data"]}


@pytest.mark.slow
@pytest.mark.parametrize(("header", "data"), [(".HEA", ".DAT"), (".Hea", ".dAt")])
def test_upload_with_upper_or_mixed_case_extensions(space, tmp_path, header, data):
    """Some exports upper-case the file names but not the header, which still names `00001_lr.dat`."""
    _, _, client, _ = space
    files = [tmp_path / f"00001_lr{header}", tmp_path / f"00001_lr{data}"]
    shutil.copyfile(UPLOAD_RECORD.with_suffix(".hea"), files[0])
    shutil.copyfile(UPLOAD_RECORD.with_suffix(".dat"), files[1])
    _, scores, neighbours, report, status = analyse(client, files=files)
    _, lower_scores, lower_neighbours, lower_report, lower_status = analyse(
        client, files=[UPLOAD_RECORD.with_suffix(".hea"), UPLOAD_RECORD.with_suffix(".dat")]
    )
    assert "`00001_lr`: 12 leads, 100 Hz, 10.0 s" in status and status == lower_status
    assert scores["data"] == lower_scores["data"] and neighbours["data"] == lower_neighbours["data"]
    assert report == lower_report


def test_the_plot_puts_each_lead_in_its_standard_place_whatever_the_stored_order():
    """Limb leads left, chest leads right: a record storing V1-V6 first is drawn as one storing I-aVF first, and a
    reduced-lead record leaves the other places blank."""
    app = load_app_module()
    signal = np.stack([np.full(1000, 0.1 * (index + 1)) for index in range(12)], axis=1)  # lead k is flat at 0.1 k mV

    def traces(figure):  # figure.axes runs row by row over the 6 x 2 grid: [0::2] is the left column
        drawn = [(axis.texts[0].get_text(), float(axis.lines[0].get_ydata()[0])) if axis.lines else None
                 for axis in figure.axes]  # fmt: skip
        return drawn[0::2], drawn[1::2]

    standard = app.plot_ecg(signal, 100.0, STANDARD_LEADS, "standard")
    chest_first = [*range(6, 12), *range(6)]
    stored = app.plot_ecg(signal[:, chest_first], 100.0, [STANDARD_LEADS[i] for i in chest_first], "chest first")
    left, right = traces(stored)
    assert traces(standard) == (left, right)
    assert [name for name, _ in left] == STANDARD_LEADS[:6] and [name for name, _ in right] == STANDARD_LEADS[6:]
    assert [value for _, value in left + right] == pytest.approx([0.1 * k for k in range(1, 13)])
    reduced = app.plot_ecg(signal[:, [6, 1]], 100.0, ["V1", "II"], "two leads")
    placed = {axis.texts[0].get_text(): index for index, axis in enumerate(reduced.axes) if axis.lines}
    rows = (
        6  # axes are numbered row by row, 2 columns: place k (column k // 6, row k % 6) is axis 2 * (k % 6) + k // 6
    )
    assert placed == {"II": 2 * (1 % rows) + 0, "V1": 2 * (6 % rows) + 1}


def test_unreadable_upload_is_a_readable_error(space, tmp_path):
    app, models, _, _ = space
    with pytest.raises(app.DemoInputError) as error:
        app.analyse(models, app.ExampleIndex(models), [tmp_path / "gone.hea"], None, "superclass")
    assert str(error.value) == (
        "'gone.hea' could not be read (No such file or directory); upload the record's .hea and .dat files again."
    )


def write_record(directory, name, num_leads=12, rate=500, seconds=10.0, file_name=None, lead_names=None):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lead_names = lead_names or STANDARD_LEADS[:num_leads]
    num_leads = len(lead_names)
    signal = rng.normal(scale=0.2, size=(int(rate * seconds), num_leads))
    wfdb.wrsamp(
        name,
        fs=rate,
        units=["mV"] * num_leads,
        sig_name=lead_names,
        p_signal=signal,
        fmt=["16"] * num_leads,
        write_dir=str(directory),
    )
    if file_name is not None:
        header = directory / f"{name}.hea"
        header.write_text(header.read_text().replace(f"{name}.dat", file_name))
    return [directory / f"{name}.hea", directory / f"{name}.dat"]


def bad_not_wfdb(tmp_path):
    (tmp_path / "notes.hea").write_text("this is a discharge letter, not a header\n")
    (tmp_path / "notes.dat").write_bytes(b"\x00" * 100)
    return [tmp_path / "notes.hea", tmp_path / "notes.dat"]


def bad_other_file_type(tmp_path):
    (tmp_path / "ecg.txt").write_text("1,2,3\n")
    return [tmp_path / "ecg.txt"]


def bad_missing_dat(tmp_path):
    return write_record(tmp_path, "lonely")[:1]


def bad_outside_file(tmp_path):
    secret = tmp_path / "secret.dat"
    shutil.copyfile(UPLOAD_RECORD.with_suffix(".dat"), secret)
    files = write_record(tmp_path / "upload", "escape", rate=100, file_name="../secret.dat")
    return files[:1]


def bad_too_long(tmp_path):
    return write_record(tmp_path, "holter", seconds=120.0)


def bad_too_big(tmp_path):
    files = write_record(tmp_path, "bulky", seconds=10.0)
    with open(files[1], "ab") as handle:
        handle.write(b"\0" * 6 * 2**20)
    return files


def bad_fifteen_leads(tmp_path):
    return write_record(tmp_path, "frank", lead_names=[*STANDARD_LEADS, "vx", "vy", "vz"])


def bad_unknown_leads(tmp_path):
    return write_record(tmp_path, "channels", lead_names=["ECG1", "ECG2"])


def bad_200_hz(tmp_path):
    return write_record(tmp_path, "rate200", rate=200)


def bad_truncated_dat(tmp_path):
    files = write_record(tmp_path, "cut", rate=100)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    return files


def bad_flat(tmp_path):
    """Every lead flat (a recorder that stored nothing): refused, never zero-shot scores of zeros."""
    wfdb.wrsamp("flat", fs=500, units=["mV"] * 12, sig_name=STANDARD_LEADS, p_signal=np.zeros((5000, 12)),
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))  # fmt: skip
    return [tmp_path / "flat.hea", tmp_path / "flat.dat"]


BAD_INPUTS = {
    "not_wfdb": (bad_not_wfdb, "'notes.hea' is not a readable WFDB header"),
    "other_file_type": (bad_other_file_type, "Invalid file type. Please upload a file that is one of these formats"),
    "missing_dat": (bad_missing_dat, "'lonely.hea' needs the signal file 'lonely.dat', which was not uploaded"),
    "file_outside_upload": (bad_outside_file, "names the signal file '../secret.dat', outside the upload"),
    "too_long": (bad_too_long, "'holter' lasts 120.0 s; the demo takes records of 9 to 60 s"),
    "too_big": (bad_too_big, "The upload is 6.1 MB; the demo takes records up to 5 MB"),
    "fifteen_leads": (bad_fifteen_leads, "'frank' has 15 leads; the demo takes 1 to 12 of the standard leads"),
    "unknown_leads": (bad_unknown_leads, "'channels': unknown lead name 'ECG1'; expected leads ['I', 'II', 'III'"),
    "200_hz": (bad_200_hz, "'rate200' is sampled at 200 Hz; the demo accepts 100, 250, 500, 1000 Hz"),
    "truncated_dat": (bad_truncated_dat, re.compile(r"cut\.dat: .*truncated")),  # wording of read_wfdb_record
    "flat": (bad_flat, "every lead is flat, no lead was recorded"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_readable_error(space, tmp_path, case):
    _, _, client, _ = space
    make, message = BAD_INPUTS[case]
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        analyse(client, files=make(tmp_path))
    text = str(error.value)
    assert message.search(text) if isinstance(message, re.Pattern) else message in text, text
    assert "Traceback" not in text and tempfile.gettempdir() not in text  # no stack, no server paths


LIMB = "I, II, III, aVR, aVL, aVF"
CHEST = "V1, V2, V3, V4, V5, V6"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("leads", "derived", "left_out"),
    [
        (["I"], None, f"II, III, aVR, aVL, aVF, {CHEST}"),  # a single-lead device
        (["I", "II"], "III, aVR, aVL, aVF", CHEST),  # a two-lead Holter: the other limb leads derived
        (STANDARD_LEADS[:6], None, CHEST),  # the six limb leads
    ],
)
def test_reduced_lead_uploads_leave_the_missing_leads_out(space, tmp_path, leads, derived, left_out):
    """1-, 2- and 6-lead uploads: the page says which leads were derived and which left out, and its scores,
    neighbours and report are those of the merit_hf functions given the feature extractor's `lead_mask`."""
    app, models, client, _ = space
    files = write_record(tmp_path, "reduced", lead_names=leads)
    _, scores, neighbours, report, status = analyse(client, files=files)
    assert f"`reduced`: {len(leads)} lead{'s' if len(leads) > 1 else ''}, 500 Hz, 10.0 s" in status
    assert (f"Derived from the recorded limb leads: {derived}." in status) == (derived is not None)
    assert f"Not recorded, left out of the model: {left_out}." in status

    read = app.read_wfdb_record(files[0])
    features = models.processor.feature_extractor(
        read["signal"], sampling_rate=500, lead_names=read["lead_names"], return_tensors="pt"
    )
    labels = ["CD", "HYP", "MI", "NORM", "STTC"]
    common = {"ecg_values": features["ecg_values"], "candidate_labels": labels, "class_descriptions": "superclass"}
    direct = zero_shot_classify(models.model, models.processor, lead_mask=features["lead_mask"], **common)
    zero_filled = zero_shot_classify(models.model, models.processor, **common)
    got = {row[0]: row[2] for row in scores["data"]}
    for label, score in zip(labels, direct["scores"][0], strict=True):
        assert got[label] == pytest.approx(float(score), abs=1e-4)
    assert not np.allclose(direct["scores"], zero_filled["scores"], atol=1e-3), "the missing leads were fed as zeros"
    assert len(neighbours["data"]) == 3
    assert report == app.generate_report(models, read["signal"], read)


def test_no_input_and_unknown_example_are_refused(space):
    _, _, client, _ = space
    with pytest.raises(gradio_client.exceptions.AppError, match="Upload a WFDB record"):
        client.predict(None, None, "superclass", api_name="/analyse")
    with pytest.raises(gradio_client.exceptions.AppError, match="../../etc/passwd is not in the list of choices"):
        analyse(client, example="../../etc/passwd")


def test_app_still_serves_after_bad_inputs(space):
    _, _, client, _ = space
    _, scores, *_ = analyse(client, example="00131_lr")
    assert len(scores["data"]) == 5


@pytest.mark.slow
def test_screenshot_in_headless_chromium_shows_the_plot(space, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); screenshot test skipped")
    _, _, _, url = space
    screenshot = tmp_path / "space.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium_profile'}",
        "--window-size=1400,1600",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # loopback only
        "--virtual-time-budget=15000",
        f"--screenshot={screenshot}",
        url,
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert screenshot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image

    image = matplotlib.image.imread(screenshot)[..., :3]
    grid = grid_fraction(image)
    assert grid > 0.0005, f"the ECG grid covers {grid:.5f} of the page: the plot is not on the screenshot"


def test_report_panel_says_unavailable_without_a_report_model():
    app = load_app_module()
    models = app.DemoModels(model=None, processor=None, name="org/merit-ecg")
    assert app.generate_report(models, np.zeros((1000, 12)), {}) == (
        "No report model configured (set MERIT_REPORT_MODEL): report generation is unavailable."
    )


def test_space_card_matches_the_app():
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(REPO_ROOT / "spaces_demo" / "README.md")
    assert card.data.sdk == "gradio"
    assert card.data.sdk_version == gradio.__version__, "pin sdk_version to the Gradio the tests ran"
    assert (REPO_ROOT / "spaces_demo" / card.data.app_file).is_file()
    app = load_app_module()
    assert card.data.models == [app.SPACE_MODEL], "the card lists the models the Space loads, nothing else"
    for item in app.example_catalogue():
        for suffix in (".hea", ".dat"):
            assert (app.EXAMPLES_DIR / f"{item['record']}{suffix}").is_file()
    assert (app.EXAMPLES_DIR / "LICENSE.txt").read_text().startswith("Creative Commons Attribution 4.0")


def space_requirements() -> list[Requirement]:
    """The requirements of spaces_demo/requirements.txt given by name (not the options, nor a wheel's file name)."""
    lines = (REPO_ROOT / "spaces_demo" / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-", "./"))]


def test_space_requirements_install_the_wheel_the_deploy_steps_build():
    """merit_hf is not on PyPI: the requirements' `merit_hf>=0.1.0` failed the Space's build (or installed what anyone
    published under that unclaimed name). They install the wheel that the README's "Deploying" builds beside
    app.py, under the file name pip gives it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wheel = f"./{project['name']}-{project['version']}-py3-none-any.whl"
    lines = (REPO_ROOT / "spaces_demo" / "requirements.txt").read_text().splitlines()
    assert wheel in lines
    assert "merit_hf" not in {requirement.name for requirement in space_requirements()}, "never merit_hf by name"
    deploying = " ".join((REPO_ROOT / "spaces_demo" / "README.md").read_text().split("## Deploying")[1].split())
    assert "`python -m pip wheel --no-deps -w spaces_demo .`" in deploying and f"`{wheel}`" in deploying


def test_the_app_says_the_space_runs_on_its_cpu():
    """The requirements install the CPU build of torch, so a GPU Space runs the app on its CPU; the docstring said
    the app ran "on the GPU when the Space has one"."""
    assert "download.pytorch.org/whl/cpu" in (REPO_ROOT / "spaces_demo" / "requirements.txt").read_text()
    docstring = " ".join(load_app_module().load_models.__doc__.split())
    assert "the Space runs on its CPU" in docstring and "when the Space has one" not in docstring


def test_space_requirements_install_peft_for_a_report_adapter():
    """`MERIT_REPORT_MODEL` may name a LoRA adapter folder, which the app loads through peft; the Space's requirements
    installed merit_hf without peft, so such a Space failed at start-up. They install it, at the version merit_hf's
    `report` extra asks for."""
    by_name = {requirement.name: requirement for requirement in space_requirements()}
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    report_extra = [Requirement(line) for line in pyproject["project"]["optional-dependencies"]["report"]]
    peft = next(requirement for requirement in report_extra if requirement.name == "peft")
    if "merit_hf" not in by_name or "report" not in by_name["merit_hf"].extras:  # the wheel: merit_hf, no extra
        assert "peft" in by_name, "spaces_demo/requirements.txt: a LoRA adapter as MERIT_REPORT_MODEL needs peft"
        assert by_name["peft"].specifier == peft.specifier


# ----------------------------------------------------------------------------------------------------------------------
# What the Space refuses without a server (tests/test_refusals.py has the reader's side)
# ----------------------------------------------------------------------------------------------------------------------


def test_no_model_configured_says_set_merit_model(monkeypatch, tmp_path):
    app = load_app_module()
    monkeypatch.delenv("MERIT_MODEL", raising=False)
    monkeypatch.setattr(app, "DEFAULT_MODELS", (tmp_path / "quickstart_output" / "model",))
    with pytest.raises(SystemExit, match="No model: set MERIT_MODEL to a MERIT checkpoint folder or Hub id"):
        app.default_model_path()
    monkeypatch.setenv("MERIT_MODEL", "org/my-own-merit")
    assert app.default_model_path() == "org/my-own-merit"


def test_models_load_with_merit_hf_classes_never_the_checkpoints_code(tmp_path, tokenizer):
    folder = tmp_path / "merit"
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(folder)
    MeritProcessor(MeritFeatureExtractor.from_model_config(model.config.ecg_config), tokenizer).save_pretrained(folder)
    marker = tmp_path / "remote_code_ran"
    for name in ("modeling_merit.py", "configuration_merit.py"):  # code a Hub account could have changed
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('remote code')\n")
    models = load_app_module().load_models(str(folder))
    assert type(models.model).__module__ == "merit_hf.models.merit.modeling_merit" and not marker.exists()


def test_record_checks_use_the_readers_header_check(tmp_path):
    app = load_app_module()
    files = write_record(tmp_path / "gain", "gain0", rate=500)
    lines = files[0].read_text().splitlines()
    fields = lines[1].split()
    fields[2] = "0(0)/mV"  # lead I uncalibrated: wfdb would read it at gain 200
    files[0].write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(app.DemoInputError, match=r"'gain0.hea' is not a readable WFDB header: gain0.hea: signal line 1 "
                       r"\(lead I\): ADC gain 0 means uncalibrated"):  # fmt: skip
        app.read_record(files[0].with_suffix(""))
    files = write_record(tmp_path / "rate", "negative", rate=500)
    files[0].write_text(files[0].read_text().replace("negative 12 500 5000", "negative 12 -500 5000"))
    with pytest.raises(app.DemoInputError, match=r"sampling frequency '-500' is not a positive number"):
        app.read_record(files[0].with_suffix(""))


def test_header_without_length_is_timed_from_its_signal(tmp_path):
    app = load_app_module()
    files = write_record(tmp_path, "nolength", rate=500, seconds=5.0)
    files[0].write_text(files[0].read_text().replace("nolength 12 500 2500", "nolength 12 500"))
    with pytest.raises(app.DemoInputError, match=r"'nolength' lasts 5.0 s; the demo takes records of 9 to 60 s"):
        app.read_record(files[0].with_suffix(""))


def test_browser_renamed_download_and_non_ascii_names(tmp_path):
    app = load_app_module()
    hea, dat = write_record(tmp_path / "download", "00001_lr", rate=100)
    renamed = [hea.with_name("00001_lr (1).hea"), dat.with_name("00001_lr (1).dat")]
    hea.rename(renamed[0])
    dat.rename(renamed[1])
    (tmp_path / "work").mkdir()
    staged = app.stage_upload(renamed, tmp_path / "work")
    assert staged.name == "00001_lr" and app.read_record(staged)["signal"].shape == (1000, 12)
    unicode_file = tmp_path / "écg.hea"
    unicode_file.write_text("écg 12 100 1000\n")
    with pytest.raises(app.DemoInputError, match=r"'écg.hea': a WFDB record's files may only have ASCII letters"):
        app.stage_upload([unicode_file], tmp_path / "work2")


def test_errors_leave_out_the_library_settings_a_visitor_cannot_set():
    """The feature extractor's errors end with the setting that would repair the input; the page cannot take one."""
    from merit_hf.models.merit.feature_extraction_merit import EcgInputError

    app = load_app_module()
    signal = wfdb.rdsamp(str(UPLOAD_RECORD))[0]
    broken, flat, renamed = signal.copy(), signal.copy(), list(STANDARD_LEADS)
    broken[10:20, 3] = np.nan
    flat[:, 7] = 0.0
    renamed[1] = "MLII"
    strict = MeritFeatureExtractor(missing_leads="raise")
    cases = [
        (broken, STANDARD_LEADS, "lead aVR has 10 NaN/inf samples"),
        (signal, renamed, "unknown lead name 'MLII'"),
    ]
    cases += [(flat, STANDARD_LEADS, "a lead that was not recorded, or a unit 1000x too small")]
    cases += [(signal[:, :8], STANDARD_LEADS[:8], "8 leads given, 12 expected")]
    cases += [(signal * 1000, STANDARD_LEADS, "above the 30 mV an ECG can span")]  # "...: pass units='uV'"
    for values, leads, kept in cases:
        with pytest.raises(EcgInputError) as error:
            strict(values, sampling_rate=100, lead_names=leads)
        assert re.search(r"[a-z_]+=(True|')", str(error.value))  # the library names a setting ...
        shown = app.for_visitors(str(error.value))
        assert kept in shown and not re.search(r"[a-z_]+=(True|')", shown), shown  # ... the page does not


# ----------------------------------------------------------------------------------------------------------------------
# What a record looks like on the page, called in-process on the server's models
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct(space):
    """The app module, the server's models and an index of the bundled examples, for `app.analyse` in-process."""
    app, models, _, _ = space
    return app, models, app.ExampleIndex(models)


def edited_upload(directory, edit=None):
    """`UPLOAD_RECORD` in `directory` with its header text passed through `edit`."""
    directory.mkdir(parents=True)
    header, data = directory / "00001_lr.hea", directory / "00001_lr.dat"
    text = UPLOAD_RECORD.with_suffix(".hea").read_text()
    header.write_text(edit(text) if edit else text, encoding="utf-8")
    shutil.copyfile(UPLOAD_RECORD.with_suffix(".dat"), data)
    return [header, data]


def plotted(figure) -> dict[str, np.ndarray]:
    """Lead name -> the values drawn for it."""
    return {axis.texts[0].get_text(): axis.lines[0].get_ydata() for axis in figure.axes if axis.lines}


def test_a_record_in_nanovolt_is_plotted_in_millivolt(direct, tmp_path):
    """The plot converts with the feature extractor's unit table: the app's own table did not know nV, which the
    model reads, and drew such a record 10^6 too large (clipped at the plot's limit)."""
    app, models, index = direct
    nano = edited_upload(tmp_path / "nv", lambda text: text.replace("1000.0(0)/mV", "0.001(0)/nV"))
    figure, scores, *_ = app.analyse(models, index, nano, None, "superclass")
    _, mv_scores, *_ = app.analyse(models, index, edited_upload(tmp_path / "mv"), None, "superclass")
    millivolt, fields = wfdb.rdsamp(str(UPLOAD_RECORD))
    axes = [axis for axis in figure.axes if axis.lines]
    assert len(axes) == 12
    for axis in axes:  # each lead as drawn, against the record in mV at the same samples (100 Hz)
        samples = np.round(axis.lines[0].get_xdata() * 100).astype(int)
        column = fields["sig_name"].index(axis.texts[0].get_text())
        np.testing.assert_allclose(axis.lines[0].get_ydata(), millivolt[samples, column], atol=1e-9)
    assert scores == mv_scores


def test_a_header_in_utf8_is_read_as_the_library_reads_it(direct, tmp_path):
    """A comment in German and a unit written µV, which `read_wfdb_header` reads: the app refused any non-ASCII byte
    as "not a WFDB header (not plain text)". A binary file is still refused before parsing."""
    app, models, index = direct

    def utf8(text):
        return text.replace("1000.0(0)/mV", "1.0(0)/µV") + "# Befund: Grundlinie überdreht\n"

    figure, scores, neighbours, _, status = app.analyse(models, index, edited_upload(tmp_path / "uv", utf8), None,
                                                        "superclass")  # fmt: skip
    mv_figure, *mv_outputs = app.analyse(models, index, edited_upload(tmp_path / "mv"), None, "superclass")
    assert [scores, neighbours, status] == [mv_outputs[0], mv_outputs[1], mv_outputs[3]]
    for lead, values in plotted(mv_figure).items():
        np.testing.assert_allclose(plotted(figure)[lead], values, atol=1e-9)
    binary = edited_upload(tmp_path / "binary")
    binary[0].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(app.DemoInputError, match=r"^'00001_lr.hea' is not a WFDB header \(a binary file, not text\)"):
        app.analyse(models, index, binary, None, "superclass")


@pytest.mark.parametrize(
    ("unit", "hint"),
    [
        ("1.0(0)/mV", "span up to 1217 mV after unit conversion, above the 30 mV an ECG can span: the header's units "
         "or ADC gain are probably wrong (µV stored as mV, or a gain of 1 instead of 1000)"),
        ("1000.0(0)/uV", "every lead is flat, mV labelled µV (1000x too small)? check the header's units and ADC gain"),
    ],
)  # fmt: skip
def test_unit_errors_point_to_the_headers_units_and_gain(direct, tmp_path, unit, hint):
    """A visitor can fix an upload's header, not set the library's `units=` argument ("pass units='uV'")."""
    app, models, index = direct
    files = edited_upload(tmp_path / "units", lambda text: text.replace("1000.0(0)/mV", unit))
    with pytest.raises(app.DemoInputError) as error:
        app.analyse(models, index, files, None, "superclass")
    message = str(error.value)
    assert message.startswith("'00001_lr': leads [") and message.endswith(hint), message
    assert "units=" not in message and tempfile.gettempdir() not in message


@pytest.mark.parametrize("saved", [{"crop": "random"}, {"window": "sliding"}])
def test_a_folder_saved_with_a_random_crop_or_sliding_windows_reads_the_central_window(tmp_path, tokenizer, saved):
    """The app fixes the feature extractor's window, whatever the folder saved: with `crop="random"` two clicks gave
    two scores (the status said "central"), with `window="sliding"` the example index held one row per window and
    the app could not start (IndexError)."""
    app = load_app_module()
    folder = tmp_path / "merit"
    torch.manual_seed(0)
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(folder)
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config, **saved)
    MeritProcessor(feature_extractor, tokenizer).save_pretrained(folder)
    models = app.load_models(str(folder))
    index = app.ExampleIndex(models)
    _, scores, neighbours, _, status = app.analyse(models, index, None, "00003_lr", "superclass")
    assert app.analyse(models, index, None, "00003_lr", "superclass")[1] == scores
    assert neighbours[0][0] == "PTB-XL 3" and neighbours[0][3] == pytest.approx(1.0, abs=1e-4)
    assert "model reads the central 9 s (0.5-9.5 s), which the plot shows" in status
    centre = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    ecg_values = centre(str(app.EXAMPLES_DIR / "00003_lr"), return_tensors="pt")["ecg_values"]
    labels = [row[0] for row in scores]
    direct = zero_shot_classify(
        models.model, models.processor, ecg_values=ecg_values, candidate_labels=labels, class_descriptions="superclass"
    )
    assert [row[2] for row in scores] == pytest.approx(direct["scores"][0].tolist(), abs=1e-4)


def test_a_click_encodes_the_ecg_once_and_no_class_prompt(direct, monkeypatch):
    """The class prompts' embeddings are computed once at start-up (the text tower was most of each click's time),
    and one ECG embedding serves the scores and the neighbours (it was encoded twice); the scores are still
    `zero_shot_classify`'s."""
    from merit_hf.models.merit import pipeline_merit

    app, models, index = direct
    record = str(app.EXAMPLES_DIR / "00022_lr")
    expected = {}
    for label_set in app.ZERO_SHOT_MENU:
        labels = list(app.load_class_descriptions(label_set))
        result = zero_shot_classify(models.model, models.processor, ecgs=record, candidate_labels=labels,
                                    class_descriptions=label_set)  # fmt: skip
        expected[label_set] = dict(zip(labels, result["scores"][0].tolist(), strict=True))
    calls = {"ecg": 0, "text": 0}
    original = pipeline_merit.encode_ecgs

    def counted(*args, **kwargs):
        calls["ecg"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline_merit, "encode_ecgs", counted)
    monkeypatch.setattr(app, "encode_ecgs", counted)
    text_model = pipeline_merit.two_tower_model(models.model).text_model
    hook = text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    try:
        tables = {label_set: app.analyse(models, index, None, "00022_lr", label_set)[1] for label_set in expected}
    finally:
        hook.remove()
    assert calls == {"ecg": len(expected), "text": 0}
    for label_set, table in tables.items():
        assert {row[0]: row[2] for row in table} == pytest.approx(expected[label_set], abs=1e-4)


def test_the_plot_shows_the_models_window_and_says_what_it_clips(direct, tmp_path):
    """A 20 s single-lead record: the plot is the central 9 s the model reads (it was the first 10 s, which a 60 s
    record's window does not even overlap), a lead beyond the plot's +-4 mV is said to be clipped, and "1 lead"."""
    app, models, index = direct
    signal = np.random.default_rng(0).normal(scale=0.2, size=(10000, 1))
    signal[::500] = 6.0  # a 6 mV spike every second (high-voltage QRS)
    wfdb.wrsamp("strip", fs=500, units=["mV"], sig_name=["II"], p_signal=signal, fmt=["16"], write_dir=str(tmp_path))
    files = [tmp_path / "strip.hea", tmp_path / "strip.dat"]
    figure, _, _, _, status = app.analyse(models, index, files, None, "superclass")
    assert status.startswith("Record `strip`: 1 lead, 500 Hz, 20.0 s. Resampled 500 Hz -> 250 Hz; the model reads "
                             "the central 9 s (5.5-14.5 s), which the plot shows. Leads beyond ±4 mV are clipped on "
                             "the plot: II."), status  # fmt: skip
    assert (
        figure.get_suptitle() == "strip: 1 lead, 500 Hz, 20.0 s; the model's window, 5.5-14.5 s; clipped at ±4 mV: II"
    )
    (axis,) = [axis for axis in figure.axes if axis.lines]
    assert axis.get_xlim() == pytest.approx((5.5, 14.5))
    read = app.read_wfdb_record(files[0])["signal"][2750:7250, 0]
    np.testing.assert_allclose(axis.lines[0].get_xdata(), 5.5 + np.arange(4500) / 500)
    np.testing.assert_allclose(axis.lines[0].get_ydata(), read)


def test_the_plot_uses_no_pyplot_state():
    """Two queue workers draw at once: the figure is matplotlib's object API, never in pyplot's global list (which
    is not thread-safe, and kept a figure when a later step of the click failed)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figure = load_app_module().plot_ecg(np.full((1000, 12), 0.1), 100.0, STANDARD_LEADS, "flat")
    assert isinstance(figure, matplotlib.figure.Figure) and plt.get_fignums() == before


def test_main_limits_uploads_to_the_stated_size_and_deletes_them(direct, monkeypatch):
    """Gradio's own upload limit is the 5 MB the page states (it was 10 MB, with Gradio's message above 10 MB), and
    its cached copies of uploads are deleted (they stayed on disk, refused uploads included)."""
    import gradio

    app, models, _ = direct
    launched = {}
    monkeypatch.setattr(app, "default_model_path", lambda: "tiny")
    monkeypatch.setattr(app, "load_models", lambda *args: models)
    monkeypatch.setattr(gradio.Blocks, "launch", lambda demo, **kwargs: launched.update(kwargs, demo=demo))
    app.main()
    assert launched["max_file_size"] == app.MAX_UPLOAD_BYTES == 5 * 2**20
    assert "at most 5 MB" in app.INPUT_POLICY and "Uploads are deleted from the server within 20 minutes" in (
        app.INPUT_POLICY
    )
    assert launched["demo"].delete_cache == app.UPLOAD_CACHE_SECONDS == (600, 600)
