"""Tests for medformer.data and the `medfl data` command."""

from __future__ import annotations

import hashlib
import shutil
import sys
import zipfile
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch

from synthetic import write_synthetic_npz
from medformer import data as D
from medformer.data import (
    REGISTRY,
    ChecksumError,
    DataError,
    FormatError,
    MissingFileError,
    UnknownDatasetError,
    UnsupportedSizeError,
)
from simulations.data_cmd import run_data_command

REAL = {  # file -> (flag, size)
    "breastmnist.npz": ("breastmnist", 28),
    "pneumoniamnist.npz": ("pneumoniamnist", 28),
    "retinamnist.npz": ("retinamnist", 28),
    "adrenalmnist3d.npz": ("adrenalmnist3d", 28),
    "adrenalmnist3d_64.npz": ("adrenalmnist3d", 64),
    "vesselmnist3d.npz": ("vesselmnist3d", 28),
}


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDMNIST_DATA", raising=False)


def _official_arrays(flag: str, n: int = 8) -> dict[str, np.ndarray]:
    """Tiny arrays in the official layout (for hand-made broken files)."""
    info = D.get_info(flag)
    shape = (28, 28) if info.n_channels == 1 else (28, 28, 3)
    out = {}
    for s in D.SPLITS:
        out[f"{s}_images"] = np.zeros((n, *shape), np.uint8)
        out[f"{s}_labels"] = np.zeros((n, 1), np.uint8)
    return out


# --------------------------------------------------------------------------- registry


def test_registry_has_all_18_subsets_with_right_kinds() -> None:
    assert set(REGISTRY) == set(medmnist.INFO)
    assert len(REGISTRY) == 18
    kinds = {f: i.input_kind for f, i in REGISTRY.items()}
    assert sum(k == "3d-1ch" for k in kinds.values()) == 6
    assert {f for f, k in kinds.items() if k == "2d-3ch"} == {
        "pathmnist", "dermamnist", "retinamnist", "bloodmnist"}
    assert kinds["breastmnist"] == "2d-1ch" and kinds["vesselmnist3d"] == "3d-1ch"
    for flag, info in REGISTRY.items():
        raw = medmnist.INFO[flag]
        assert info.python_class == raw["python_class"] and hasattr(medmnist, info.python_class)
        assert info.is_3d == flag.endswith("3d")
        assert info.sizes == ((28, 64) if info.is_3d else (28, 64, 128, 224))
        assert info.md5(28) == raw["MD5"] and info.md5(64) == raw["MD5_64"]
        assert info.n_samples == raw["n_samples"] and info.labels == raw["label"]
        assert info.modality and info.license
    assert D.get_info("breastmnist").num_outputs == 2
    assert D.get_info("retinamnist").task == "ordinal-regression"
    assert D.get_info("retinamnist").num_outputs == 4  # 5 grades -> 4 cumulative logits
    assert D.get_info("chestmnist").num_outputs == 14
    assert D.get_info("organamnist").num_outputs == D.get_info("organamnist").n_classes == 11
    assert len({D.get_info("breastmnist"), D.get_info("breastmnist")}) == 1  # hashable


def test_unknown_flag_lists_valid_ones() -> None:
    with pytest.raises(UnknownDatasetError) as exc:
        D.get_info("brestmnist")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, DataError)
    msg = str(exc.value)
    assert msg.startswith("unknown MedMNIST dataset 'brestmnist'")
    assert "breastmnist" in msg and "vesselmnist3d" in msg and "\n" not in msg


def test_file_names_and_sizes() -> None:
    assert D.file_name("breastmnist") == "breastmnist.npz"
    assert D.file_name("adrenalmnist3d", 64) == "adrenalmnist3d_64.npz"
    assert D.file_name("pathmnist", 224) == "pathmnist_224.npz"
    with pytest.raises(UnsupportedSizeError, match="adrenalmnist3d.*28, 64") as exc:
        D.file_name("adrenalmnist3d", 128)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, DataError)


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.resolve_data_dir() == tmp_path / "home" / ".medmnist"
    monkeypatch.setenv("MEDMNIST_DATA", str(tmp_path / "env"))
    assert D.resolve_data_dir() == tmp_path / "env"
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


# --------------------------------------------------------------------------- real files


@pytest.mark.real_data
@pytest.mark.parametrize("name", list(REAL))
def test_real_files_load_and_verify(real_data_dir: Path, name: str) -> None:
    flag, size = REAL[name]
    info = D.get_info(flag)
    assert D.file_name(flag, size) == name
    D.verify_file(flag, size, real_data_dir / name)
    splits = D.load_splits(flag, size=size, data_dir=real_data_dir)
    c = info.n_channels
    spatial = (size,) * (3 if info.is_3d else 2)
    for split, ds in splits.items():
        n = info.n_samples[split]
        assert len(ds) == n and ds.flag == flag and ds.split == split and ds.size == size
        assert ds.images.dtype == np.uint8 and ds.images.shape == (n, c, *spatial)
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (n, 1)
        assert 0 <= ds.labels.min() and ds.labels.max() < info.n_classes
    x, y = splits["val"].batch(np.arange(4))
    assert x.dtype == torch.float32 and x.shape == (4, c, *spatial) and y.shape == (4, 1)
    assert -1.0 <= x.min().item() <= x.max().item() <= 1.0
    x0, y0 = splits["val"][0]
    assert torch.equal(x0, x[0]) and y0.dtype == torch.int64 and y0.shape == (1,)


@pytest.mark.real_data
def test_real_status_and_command(real_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = D.data_status(real_data_dir)
    assert len(rows) == 12 * 4 + 6 * 2
    present = {r["file"] for r in rows if r["status"] == "present"}
    assert present == set(REAL)
    assert {r["status"] for r in rows if r["file"] not in REAL} == {"missing"}
    assert run_data_command(str(real_data_dir)) == 0
    out = capsys.readouterr().out
    assert "breast ultrasound" in out and "6 present, 0 md5-mismatch" in out


@pytest.mark.real_data
def test_tampered_copy_raises_checksum_error(real_data_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "breastmnist.npz"
    shutil.copyfile(real_data_dir / "breastmnist.npz", path)
    D.load_split("breastmnist", "test", data_dir=tmp_path)  # intact copy loads
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as exc:
        D.load_split("breastmnist", "train", data_dir=tmp_path)
    msg = str(exc.value)
    assert str(path) in msg and "MD5 mismatch" in msg
    assert D.get_info("breastmnist").md5(28) in msg and hashlib.md5(raw).hexdigest() in msg
    assert "corrupt or modified" in msg and "\n" not in msg
    status = {r["file"]: r["status"] for r in D.data_status(tmp_path)}
    assert status["breastmnist.npz"] == "md5-mismatch" and status["retinamnist.npz"] == "missing"
    assert run_data_command(str(tmp_path)) == 2
    assert "md5-mismatch" in capsys.readouterr().err


# --------------------------------------------------------------------------- missing, checksum


def test_missing_file_names_folder_and_fix(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as exc:
        D.dataset_path("pneumoniamnist", data_dir=tmp_path / "nowhere")
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert str(tmp_path / "nowhere") in msg and "pneumoniamnist.npz" in msg
    assert "medfl data --download" in msg and "MEDMNIST_DATA" in msg and "--data-dir" in msg


def test_env_var_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_synthetic_npz(tmp_path, "breastmnist", n_train=4, n_val=2, n_test=2)
    monkeypatch.setenv("MEDMNIST_DATA", str(tmp_path))
    assert len(D.load_split("breastmnist", "train", verify=False)) == 4


def test_file_md5_streams_and_tracks_changes(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 3_000_000)
    assert D.file_md5(p) == hashlib.md5(b"a" * 3_000_000).hexdigest()
    assert D.file_md5(p) == D.file_md5(str(p))  # cached
    p.write_bytes(b"b" * 10)
    assert D.file_md5(p) == hashlib.md5(b"b" * 10).hexdigest()


def test_status_of_synthetic_dir(tmp_path: Path) -> None:
    write_synthetic_npz(tmp_path, "breastmnist")
    (tmp_path / "retinamnist.npz").mkdir()
    status = {r["file"]: r for r in D.data_status(tmp_path)}
    assert status["breastmnist.npz"]["status"] == "md5-mismatch"
    assert status["retinamnist.npz"]["status"] == "unreadable"
    assert status["pathmnist_224.npz"]["status"] == "missing"
    assert status["breastmnist.npz"]["path"] == str(tmp_path / "breastmnist.npz")
    assert D.data_status(tmp_path, verify=False)[0]["status"] == "missing"
    with pytest.raises(ChecksumError, match="MD5 mismatch"):
        D.load_split("breastmnist", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize(
    "flag,size",
    [("breastmnist", 28), ("retinamnist", 28), ("chestmnist", 28), ("organamnist", 64),
     ("adrenalmnist3d", 28), ("vesselmnist3d", 64)],
)
def test_synthetic_round_trip(tmp_path: Path, flag: str, size: int) -> None:
    info = D.get_info(flag)
    path = write_synthetic_npz(tmp_path, flag, size=size, n_train=40, n_val=10, n_test=12)
    assert path == tmp_path / D.file_name(flag, size)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    with np.load(path, allow_pickle=False) as npz:  # exactly the official layout
        keys = sorted(f"{s}_{k}" for s in D.SPLITS for k in ("images", "labels"))
        assert sorted(npz.files) == keys
        img, lab = npz["train_images"], npz["train_labels"]
    spatial = (size,) * (3 if info.is_3d else 2)
    assert img.dtype == np.uint8 and lab.dtype == np.uint8
    assert img.shape == (40, *spatial) + ((3,) if info.n_channels == 3 else ())
    assert lab.shape == (40, info.n_classes if info.is_multi_label else 1)

    ds = D.load_split(flag, "train", size=size, data_dir=tmp_path, verify=False)
    assert ds.images.shape == (40, info.n_channels, *spatial)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, lab)
    test = D.load_split(flag, "test", size=size, data_dir=tmp_path, verify=False)
    assert len(test) == 12
    if not info.is_multi_label:  # every class shows up, and classes differ in their mean image
        assert set(ds.labels[:, 0]) == set(range(info.n_classes))
        x, y = ds.batch(slice(None))
        means = torch.stack([x[y[:, 0] == c].mean(0) for c in range(info.n_classes)])
        assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 1.0
    else:
        assert ds.labels.min() == 0 and ds.labels.max() == 1


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_npz(tmp_path / "a", "breastmnist", seed=3)
    b = write_synthetic_npz(tmp_path / "b", "breastmnist", seed=3)
    c = write_synthetic_npz(tmp_path / "c", "breastmnist", seed=4)
    la = D.load_splits("breastmnist", data_dir=a.parent, verify=False)["train"]
    lb = D.load_splits("breastmnist", data_dir=b.parent, verify=False)["train"]
    lc = D.load_splits("breastmnist", data_dir=c.parent, verify=False)["train"]
    assert np.array_equal(la.images, lb.images) and not np.array_equal(la.images, lc.images)


def test_split_dataset_api(tmp_path: Path) -> None:
    write_synthetic_npz(tmp_path, "retinamnist", n_train=20)
    ds = D.load_split("retinamnist", "train", data_dir=tmp_path, verify=False)
    x, y = ds[3]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xb, yb = ds.batch(np.array([3, 5]))
    assert torch.equal(xb[0], x) and torch.equal(yb[0], y) and yb.shape == (2, 1)
    sub = ds.subset(np.array([5, 6, 7]))
    assert len(sub) == 3 and sub.flag == "retinamnist"
    assert np.array_equal(sub.images[0], ds.images[5])
    assert len(ds.subset(slice(0, 10))) == 10
    assert "n=20" in repr(ds) and ds.info.task == "ordinal-regression"
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    assert next(iter(loader))[0].shape == (8, 3, 28, 28)
    with pytest.raises(DataError, match="unknown split"):
        D.load_split("retinamnist", "dev", data_dir=tmp_path, verify=False)


def test_to_float_scaling() -> None:
    x = D.to_float(np.array([0, 127, 255], np.uint8))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
    t = torch.tensor([0, 255], dtype=torch.uint8)
    assert torch.equal(D.to_float(t), torch.tensor([-1.0, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        D.to_float(torch.zeros(2))


# --------------------------------------------------------------------------- broken files


def _save(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "breastmnist.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _load_error(tmp_path: Path, flag: str = "breastmnist") -> str:
    with pytest.raises(FormatError) as exc:
        D.load_splits(flag, data_dir=tmp_path, verify=False)
    msg = str(exc.value)
    assert str(tmp_path / D.file_name(flag)) in msg and "\n" not in msg
    return msg


def test_format_error_wrong_keys(tmp_path: Path) -> None:
    arrays = _official_arrays("breastmnist")
    arrays["x_train"] = arrays.pop("train_images")
    _save(tmp_path, arrays)
    assert "train_images" in _load_error(tmp_path)


def test_format_error_wrong_dtype(tmp_path: Path) -> None:
    arrays = _official_arrays("breastmnist")
    arrays["val_images"] = arrays["val_images"].astype(np.float32)
    _save(tmp_path, arrays)
    msg = _load_error(tmp_path)
    assert "val_images" in msg and "float32" in msg and "uint8" in msg


def test_format_error_mismatched_label_count(tmp_path: Path) -> None:
    arrays = _official_arrays("breastmnist")
    arrays["test_labels"] = arrays["test_labels"][:-1]
    _save(tmp_path, arrays)
    msg = _load_error(tmp_path)
    assert "test_labels" in msg and "7 labels" in msg and "8 images" in msg


def test_format_error_wrong_shape_and_label_range(tmp_path: Path) -> None:
    arrays = _official_arrays("breastmnist")
    arrays["train_images"] = np.zeros((8, 28, 28, 3), np.uint8)  # RGB where gray expected
    _save(tmp_path, arrays)
    assert "train_images" in _load_error(tmp_path)
    arrays = _official_arrays("breastmnist")
    arrays["train_labels"][0] = 2  # binary task
    _save(tmp_path, arrays)
    msg = _load_error(tmp_path)
    assert "train_labels" in msg and "binary-class" in msg
    arrays = _official_arrays("breastmnist")
    arrays["train_labels"] = arrays["train_labels"][:, 0]  # flattened labels
    _save(tmp_path, arrays)
    assert "train_labels" in _load_error(tmp_path)


def test_format_error_pickled_object_array(tmp_path: Path) -> None:
    arrays = _official_arrays("breastmnist")
    arrays["train_labels"] = np.array([{"label": 0}] * 8, dtype=object).reshape(8, 1)
    _save(tmp_path, arrays)
    msg = _load_error(tmp_path)
    assert "train_labels" in msg and "pickle" in msg
    (tmp_path / "breastmnist.npz").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a raw pickle
    assert "pickle" in _load_error(tmp_path)


def test_format_error_truncated_or_not_zip(tmp_path: Path) -> None:
    path = write_synthetic_npz(tmp_path, "breastmnist")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert "truncated" in _load_error(tmp_path)
    path.write_bytes(b"hello, not a zip")
    _load_error(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(3, np.uint8))
    shutil.move(tmp_path / "x.npy", path)
    assert "not an npz" in _load_error(tmp_path)
    # a zip whose member is corrupt but whose central directory is intact
    write_synthetic_npz(tmp_path, "breastmnist")
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("train_images.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    _load_error(tmp_path)


# --------------------------------------------------------------------------- download


def test_download_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Offline:
        def __init__(self, **kwargs: object) -> None:
            raise RuntimeError("Automatic download failed!\n  multi-line medmnist text")

    monkeypatch.setattr(medmnist, "BreastMNIST", Offline)
    with pytest.raises(DataError) as exc:
        D.dataset_path("breastmnist", data_dir=tmp_path / "dl", download=True)
    msg = str(exc.value)
    assert D.get_info("breastmnist").url(28) in msg and "breastmnist.npz" in msg
    assert "offline" in msg and "\n" not in msg


def test_download_calls_medmnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    class Fake:
        def __init__(self, *, split: str, download: bool, root: str, size: int) -> None:
            calls.append((split, download, root, size))
            write_synthetic_npz(root, "vesselmnist3d", size=size, n_train=4, n_val=2, n_test=2)

    monkeypatch.setattr(medmnist, "VesselMNIST3D", Fake)
    target = tmp_path / "new" / "dir"
    path = D.dataset_path("vesselmnist3d", 64, target, download=True, verify=False)
    assert path == target / "vesselmnist3d_64.npz" and path.is_file()
    assert calls == [("train", True, str(target), 64)]
    D.dataset_path("vesselmnist3d", 64, target, download=True, verify=False)
    assert len(calls) == 1  # present: no second download


def test_command_bad_download_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_data_command(str(tmp_path), download=["nosuchmnist"]) == 2
    assert "valid flags" in capsys.readouterr().err
    assert run_data_command(str(tmp_path), download=["breastmnist@x"]) == 2
    assert run_data_command(str(tmp_path), download=["adrenalmnist3d@224"]) == 2
    assert "28, 64" in capsys.readouterr().err
    assert run_data_command(str(tmp_path / "empty")) == 0
    assert "does not exist" in capsys.readouterr().out


def test_library_does_not_import_flwr() -> None:
    import subprocess

    code = "import sys, medformer.data; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
