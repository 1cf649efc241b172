"""A site's own images: ``medfl data import`` reads PNG folders, NIfTI volumes and DICOM series (MONAI),
writes an official-format npz plus a dataset card, refuses bad input with one line and nothing written;
the imported datasets then join a federation with a real MedMNIST site (simulation and deployment
paths, in process) and fine-tune. The images are made here."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from config import load_scenario
from inprocess import InProcessGrid
from medformer.data import REGISTRY, get_info, load_splits, register_data_dir
from server.federation import Federation, RunSettings
from simulations.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "simulations" / "configs" / "quickstart.yaml"
FAST = ["model.preset=tiny", "training.rounds=1", "training.local_steps=2", "training.batch_size=16",
        "evaluation.max_train_examples=64"]

pytestmark = [pytest.mark.usefixtures("one_torch_thread", "clean_registry")]


@pytest.fixture
def clean_registry():
    """Imported datasets registered by a test do not outlive it (the registry is process-wide)."""
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


# ---- images made here --------------------------------------------------------------------------------------

def png_folder(root: Path, n: int = 24, *, rgb: bool = False, seed: int = 0) -> Path:
    """``n`` PNGs of different sizes in two class folders: malignant ones carry a bright block."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    src = root / "png"
    lines = ["image,label"]
    for i in range(n):
        c = i % 2
        h, w = 36 + i % 7, 44 + i % 5
        a = rng.integers(0, 90, (h, w), dtype=np.uint8)
        if c:
            a[8:20, 10:30] = 230
        name = f"{['benign', 'malignant'][c]}/case{i:03d}.png"
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([a, a // 2, a // 3], -1) if rgb else a).save(src / name)
        lines.append(f"{name},{['benign', 'malignant'][c]}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src


def nifti_folder(root: Path, n: int = 18, seed: int = 1) -> Path:
    """``n`` CT-like float volumes of different shapes, 3 grades (a brighter blob per grade), splits given."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    src = root / "nii"
    src.mkdir(parents=True)
    lines = ["image,label,split"]
    for i in range(n):
        grade = i % 3
        v = rng.normal(-500, 100, (20 + i % 4, 24, 18 + i % 3)).astype(np.float32)
        v[6:12, 6:14, 5:11] += 400 * (grade + 1)
        nib.save(nib.Nifti1Image(v, np.diag([1.2, 1.0, 2.0, 1.0])), src / f"vol{i:02d}.nii.gz")
        lines.append(f"vol{i:02d}.nii.gz,{grade},{['train', 'train', 'train', 'train', 'val', 'test'][i // 3]}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src


def dicom_folder(root: Path, n: int = 9) -> Path:
    """``n`` DICOM series (a folder of 6 CT slices each), 3 classes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(2)
    src = root / "dcm"
    lines = ["image,label"]
    for s in range(n):
        series, study, frame = generate_uid(), generate_uid(), generate_uid()
        vol = rng.integers(0, 300, (6, 16, 20)).astype(np.int16) + 200 * (s % 3)
        folder = src / f"patient{s}"
        folder.mkdir(parents=True)
        for z in range(vol.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
            meta.MediaStorageSOPInstanceUID = sop = generate_uid()
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = CTImageStorage, sop, "CT", f"anon{s}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.InstanceNumber, ds.ImagePositionPatient = z + 1, [0.0, 0.0, 2.5 * z]
            ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1, 0, 0, 0, 1, 0], [1.0, 1.0], 2.5
            ds.Rows, ds.Columns = vol.shape[1:]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = vol[z].tobytes()
            ds.save_as(folder / f"slice{z:02d}.dcm", enforce_file_format=True)
        lines.append(f"patient{s},{['small', 'medium', 'large'][s % 3]}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src


def _import(capsys, src, *args):
    code = main(["data", "import", str(src), "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.strip().splitlines() if line.startswith("medfl")], captured.out


# ---- the importer -----------------------------------------------------------------------------------------

def test_png_folder_imports_as_an_official_format_dataset(tmp_path, capsys):
    src = png_folder(tmp_path)
    out = tmp_path / "data"
    code, err, said = _import(capsys, src, "--name", "mypng", "--task", "binary-class", "--size", "28", "--out", out,
                              "--modality", "breast ultrasound (synthetic)")
    assert code == 0, err
    assert "imported mypng: binary-class, 2 labels, 2D 1-channel at 28 pixels" in said
    assert sorted(p.name for p in out.iterdir()) == ["mypng.dataset.json", "mypng.dataset.md", "mypng.npz"]
    card = json.loads((out / "mypng.dataset.json").read_text())
    assert card["labels"] == {"0": "benign", "1": "malignant"} and card["n_channels"] == 1 and not card["is_3d"]
    assert sum(card["n_samples"].values()) == 24 and min(card["n_samples"].values()) >= 2
    with np.load(out / "mypng.npz", allow_pickle=False) as npz:  # the official layout, no pickle
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
        assert npz["train_images"].dtype == np.uint8 and npz["train_images"].shape[1:] == (28, 28)
        assert npz["train_labels"].shape[1:] == (1,)
    assert register_data_dir(out) == ["mypng"]
    info = get_info("mypng")
    assert info.imported and info.task == "binary-class" and info.input_kind == "2d-1ch" and info.sizes == (28,)
    splits = load_splits("mypng", data_dir=out)  # MD5-checked against the card
    for s in splits.values():  # every class in every split (stratified); bright blocks survived the resize
        assert set(s.labels[:, 0]) == {0, 1}
        bright = s.images[s.labels[:, 0] == 1].mean(), s.images[s.labels[:, 0] == 0].mean()
        assert bright[0] > bright[1] + 20
    assert "| task | binary-class |" in (out / "mypng.dataset.md").read_text()


def test_rgb_64_nifti_and_dicom_import(tmp_path, capsys):
    out = tmp_path / "data"
    assert _import(capsys, png_folder(tmp_path / "a", rgb=True), "--name", "rgbpng", "--task", "binary-class",
                   "--size", "64", "--out", out)[0] == 0
    code, err, _ = _import(capsys, nifti_folder(tmp_path / "b"), "--name", "mynii", "--task", "ordinal-regression",
                           "--size", "28", "--out", out, "--classes", "low,mid,high")
    assert code == 0, err
    code, err, _ = _import(capsys, dicom_folder(tmp_path / "c"), "--name", "mydcm", "--task", "multi-class",
                           "--size", "28", "--out", out, "--classes", "small,medium,large")
    assert code == 0, err
    assert sorted(register_data_dir(out)) == ["mydcm", "mynii", "rgbpng"]
    rgb = load_splits("rgbpng", size=64, data_dir=out)["train"]
    assert rgb.images.shape[1:] == (3, 64, 64) and get_info("rgbpng").input_kind == "2d-3ch"
    nii = load_splits("mynii", data_dir=out)
    assert nii["train"].images.shape[1:] == (1, 28, 28, 28) and [len(nii[s]) for s in ("train", "val", "test")] == [12, 3, 3]
    assert get_info("mynii").labels == {"0": "low", "1": "mid", "2": "high"} and get_info("mynii").input_kind == "3d-1ch"
    # intensities scaled per volume: the graded blob is what varies
    assert nii["train"].images.min() == 0 and nii["train"].images.max() == 255
    dcm = load_splits("mydcm", data_dir=out)
    assert dcm["train"].images.shape[1:] == (1, 28, 28, 28) and sum(len(s) for s in dcm.values()) == 9
    assert json.loads((out / "mydcm.dataset.json").read_text())["source"]["kind"] == "dicom"


def _bad(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A source folder with one kind of bad input, and the extra arguments it needs."""
    src = png_folder(tmp_path / case)
    lines = (src / "labels.csv").read_text().splitlines()
    extra: list[str] = []
    if case == "unreadable":
        (src / "benign" / "case000.png").write_bytes(b"\x89PNG not really")
    elif case == "mixed-shapes":
        from PIL import Image

        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(src / "benign" / "case002.png")
    elif case == "mixed-2d-3d":
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), src / "vol.nii.gz")
        lines.append("vol.nii.gz,benign")
    elif case == "missing-image":
        lines.append("malignant/case999.png,malignant")
    elif case == "empty-class":
        extra = ["--classes", "benign,malignant,uncertain"]
    elif case == "tiny-class":  # one malignant case only: no stratified split can give it to val and test
        malignant = [line for line in lines[1:] if line.endswith(",malignant")]
        lines = [lines[0]] + [line for line in lines[1:] if line.endswith(",benign")] + malignant[:1]
    elif case == "unknown-label":
        lines[1] = lines[1].replace(",benign", ",maybe")
        extra = ["--classes", "benign,malignant"]
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src, extra


@pytest.mark.parametrize("case, needle", [
    ("unreadable", "cannot read image"),
    ("mixed-shapes", "mixed shapes"),
    ("mixed-2d-3d", "mixed shapes"),
    ("missing-image", "names image(s) not in"),
    ("empty-class", "class 'uncertain' has no example"),
    ("tiny-class", "has 1 example(s)"),
    ("unknown-label", "label 'maybe' is not one of the classes"),
])
def test_bad_input_is_exit_2_one_line_and_nothing_written(tmp_path, capsys, case, needle):
    src, extra = _bad(tmp_path, case)
    out = tmp_path / "out"
    task = "multi-class" if case == "empty-class" else "binary-class"
    code, err, _ = _import(capsys, src, "--name", "bad", "--task", task, "--out", out, *extra)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_names_that_are_taken_are_refused(tmp_path, capsys):
    src, out = png_folder(tmp_path), tmp_path / "out"
    for name, needle in [("breastmnist", "is a MedMNIST flag"), ("mae", "pretext task"), ("Bad-Name", "not valid")]:
        code, err, _ = _import(capsys, src, "--name", name, "--task", "binary-class", "--out", out)
        assert code == 2 and needle in err[0], err
    assert not out.exists()
    assert _import(capsys, src, "--name", "twice", "--task", "binary-class", "--out", out)[0] == 0
    code, err, _ = _import(capsys, src, "--name", "twice", "--task", "binary-class", "--out", out)
    assert code == 2 and "already holds a dataset 'twice'" in err[0]


# ---- imported datasets in a federation --------------------------------------------------------------------

def _imported_data_dir(tmp_path: Path, capsys, real_data_dir: Path) -> Path:
    """One data folder: two imported datasets (PNG, NIfTI) and a link to the real BreastMNIST file."""
    data = tmp_path / "data"
    assert _import(capsys, png_folder(tmp_path), "--name", "mypng", "--task", "binary-class", "--out", data)[0] == 0
    assert _import(capsys, nifti_folder(tmp_path), "--name", "mynii", "--task", "multi-class", "--out", data)[0] == 0
    os.symlink((real_data_dir / "breastmnist.npz").resolve(), data / "breastmnist.npz")
    return data


HOSPITALS = ("hospitals=[{name: png-site, dataset: mypng}, {name: nii-site, dataset: mynii}, "
             "{name: breast, dataset: breastmnist}]")


@pytest.mark.usefixtures("flower_task_identity")
def test_imported_datasets_join_a_simulation_with_a_real_site_then_fine_tune(tmp_path, capsys, real_data_dir):
    data = _imported_data_dir(tmp_path, capsys, real_data_dir)
    register_data_dir(data)
    scenario = load_scenario(QUICKSTART, [*FAST, HOSPITALS])  # names the imported datasets: known from their cards
    run = tmp_path / "run"
    grid = InProcessGrid({i: {"partition-id": i, "num-partitions": 3} for i in range(3)})  # the simulation's nodes
    summary = Federation(RunSettings(scenario=scenario, out_dir=run, data_dir=str(data), expected_nodes=3,
                                     progress=False)).run(grid)
    assert summary["rounds_completed"] == 1 and set(summary["clients"]) == {"png-site", "nii-site", "breast"}
    assert summary["clients"]["png-site"]["num_examples"] == get_info("mypng").n_samples["train"]
    assert set(summary["downstream"]) == {"mypng", "mynii", "breastmnist"}  # the server holds their files here
    assert set(summary["imported_datasets"]) == {"mypng", "mynii"}
    model = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model)]) == 0
    config = json.loads((model / "config.json").read_text())
    assert {d["flag"]: d["input_kind"] for d in config["datasets"]} == {
        "mypng": "2d-1ch", "mynii": "3d-1ch", "breastmnist": "2d-1ch"}
    for flag in ("mypng", "mynii"):
        ft = tmp_path / f"ft-{flag}"
        assert main(["finetune", str(model), "--dataset", flag, "--data-dir", str(data), "--epochs", "2",
                     "--batch-size", "8", "--out", str(ft), "--no-progress"]) == 0
        metrics = json.loads((ft / "metrics.json").read_text())
        assert metrics["new_parts"] == {} and 0 <= metrics["auc"] <= 1
        csv = tmp_path / f"{flag}.csv"
        assert main(["predict", str(ft), "--dataset", flag, "--split", "test", "--data-dir", str(data),
                     "--out", str(csv)]) == 0
        assert len(csv.read_text().splitlines()) == get_info(flag).n_samples["test"]


@pytest.mark.usefixtures("flower_task_identity")
def test_in_a_deployment_the_server_learns_a_sites_dataset_from_discovery_only(tmp_path, capsys, real_data_dir, caplog):
    """The sites' own datasets reach the server only as their cards' public part; it builds the model for
    them and skips their central evaluation (it has no files), with a log line, instead of crashing."""
    from client.app import app

    data = _imported_data_dir(tmp_path, capsys, real_data_dir)
    imported = ("mypng", "mynii")

    def separate_process(msg, context):  # the ClientApp's registrations stay in its own process
        server_view = {flag: REGISTRY.get(flag) for flag in imported}
        reply = app(msg, context)
        for flag, info in server_view.items():
            REGISTRY.pop(flag, None) if info is None else REGISTRY.__setitem__(flag, info)
        return reply

    nodes = {7: {"dataset": "mypng", "name": "png-site", "data-dir": str(data)},
             8: {"dataset": "mynii", "name": "nii-site", "data-dir": str(data), "device": "cpu"},
             9: {"dataset": "breastmnist", "name": "breast", "data-dir": str(real_data_dir)}}
    scenario = load_scenario(QUICKSTART, FAST)
    with caplog.at_level(logging.INFO):
        summary = Federation(RunSettings(scenario=scenario, out_dir=tmp_path / "run", data_dir=str(real_data_dir),
                                         expected_nodes=3, progress=False, simulation=False)).run(
            InProcessGrid(nodes, client_app=separate_process))
    assert set(summary["clients"]) == {"png-site", "nii-site", "breast"} and not summary["dropouts"]
    assert set(summary["downstream"]) == {"breastmnist"}
    for flag in imported:
        assert any(f"central evaluation of {flag} skipped" in r.getMessage() for r in caplog.records), flag
        assert any(f"holds its own dataset {flag}" in r.getMessage() for r in caplog.records), flag
        assert get_info(flag).imported and not get_info(flag)._md5s  # what the server knows: the public card only
    sent = summary["imported_datasets"]["mypng"]
    assert "files" not in sent and "n_samples" not in sent  # no checksums or counts left the site


def test_a_card_that_contradicts_a_known_dataset_is_refused(tmp_path, capsys):
    from medformer.data import DataError, register_public

    out = tmp_path / "data"
    assert _import(capsys, png_folder(tmp_path), "--name", "mypng", "--task", "binary-class", "--out", out)[0] == 0
    register_data_dir(out)
    card = {"name": "mypng", "task": "multi-class", "labels": {"0": "a", "1": "b", "2": "c"}, "n_channels": 1,
            "is_3d": False, "sizes": [28]}
    with pytest.raises(DataError, match="described differently"):
        register_public(card, "a site's card")
    with pytest.raises(DataError, match="MedMNIST flag"):
        register_public({**card, "name": "breastmnist"}, "a site's card")


def test_medfl_data_lists_imported_datasets(tmp_path, capsys):
    out = tmp_path / "data"
    assert _import(capsys, png_folder(tmp_path), "--name", "mypng", "--task", "binary-class", "--out", out)[0] == 0
    assert main(["data", "--data-dir", str(out)]) == 0
    assert any(line.startswith("mypng ") and "present" in line for line in capsys.readouterr().out.splitlines())
    (out / "mypng.npz").write_bytes(b"changed")
    assert main(["data", "--data-dir", str(out)]) == 2  # its MD5 is the card's


@pytest.mark.slow
def test_medfl_run_with_imported_datasets_end_to_end(tmp_path, capsys, real_data_dir):
    """``medfl run`` (Flower's simulation engine, Ray) with a PNG site, a NIfTI site and a real site."""
    data = _imported_data_dir(tmp_path, capsys, real_data_dir)
    out, model = tmp_path / "run", tmp_path / "model"
    sets = [x for s in [*FAST, HOSPITALS] for x in ("--set", s)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "run", str(QUICKSTART), "--data-dir", str(data),
                           "--out", str(out), "--no-progress", "--device", "cpu", *sets], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["downstream"]) == {"mypng", "mynii", "breastmnist"}
    for cmd in (["export", str(out), "--out", str(model)],
                ["finetune", str(model), "--dataset", "mypng", "--data-dir", str(data), "--epochs", "2",
                 "--out", str(tmp_path / "ft"), "--no-progress"]):
        proc = subprocess.run([sys.executable, "-m", "simulations.cli", *cmd], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["dataset"] == "mypng"
