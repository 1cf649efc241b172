"""MedMNIST data: registry (from ``medmnist.INFO``), offline ``.npz`` loading, MD5 checks, tensors.

Files are the official MedMNIST release files, ``<flag>.npz`` (size 28) or ``<flag>_<size>.npz``,
looked up in ``--data-dir``, else ``$MEDMNIST_DATA``, else ``~/.medmnist``. Nothing here writes into
the data directory except an explicit download or :func:`write_synthetic_npz`.

Images stay ``uint8`` in memory (channel-first); :func:`to_float` is the one scaling to float32 in
``[-1, 1]`` used everywhere.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import medmnist
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "UnknownDatasetError",
    "MissingFileError",
    "ChecksumError",
    "FormatError",
    "UnsupportedSizeError",
    "DatasetInfo",
    "REGISTRY",
    "SPLITS",
    "get_info",
    "resolve_data_dir",
    "file_name",
    "file_md5",
    "verify_file",
    "dataset_path",
    "MedMNISTSplit",
    "to_float",
    "load_split",
    "load_splits",
    "write_synthetic_npz",
    "data_status",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
ENV_VAR = "MEDMNIST_DATA"
DEFAULT_DIR = "~/.medmnist"  # medmnist's own default root


# --------------------------------------------------------------------------- errors


class DataError(Exception):
    """Base: bad or missing data. The CLI maps it to exit code 2; ``str(e)`` is one line."""


class UnknownDatasetError(DataError, KeyError):
    """A dataset flag that MedMNIST does not have; the message lists the valid flags."""

    def __str__(self) -> str:  # KeyError would repr() the message (adding quotes)
        return str(self.args[0]) if self.args else ""


class MissingFileError(DataError, FileNotFoundError):
    """The expected ``.npz`` file is not in the data directory."""

    def __str__(self) -> str:  # plain message, not OSError's "[Errno ...]" form
        return str(self.args[0]) if self.args else ""


class ChecksumError(DataError):
    """A file's MD5 differs from the official one: corrupt or modified."""


class FormatError(DataError):
    """A file that is not a MedMNIST npz: wrong keys, dtype, shapes, labels, pickles, not a zip."""


class UnsupportedSizeError(DataError, ValueError):
    """An image size for which the subset has no official file."""


# --------------------------------------------------------------------------- registry

# Short modality names for the 18 subsets of medmnist 3.0 (fallback: description's first sentence).
_MODALITY: dict[str, str] = {
    "pathmnist": "colon pathology (H&E histology)",
    "chestmnist": "chest X-ray",
    "dermamnist": "dermatoscope",
    "octmnist": "retinal OCT",
    "pneumoniamnist": "pediatric chest X-ray",
    "retinamnist": "fundus camera",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscope",
    "tissuemnist": "kidney cortex microscope",
    "organamnist": "abdominal CT (axial)",
    "organcmnist": "abdominal CT (coronal)",
    "organsmnist": "abdominal CT (sagittal)",
    "organmnist3d": "abdominal CT (3D)",
    "nodulemnist3d": "chest CT (3D nodules)",
    "adrenalmnist3d": "shapes from abdominal CT (3D)",
    "fracturemnist3d": "chest CT (3D rib fractures)",
    "vesselmnist3d": "shapes from brain MRA (3D)",
    "synapsemnist3d": "electron microscope (3D)",
}

_TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")


@dataclass(frozen=True)
class DatasetInfo:
    """What the project needs to know about one MedMNIST subset (from ``medmnist.INFO``)."""

    flag: str
    python_class: str
    modality: str
    task: str
    n_channels: int
    is_3d: bool
    labels: dict[str, str]
    n_samples: dict[str, int]
    sizes: tuple[int, ...]
    license: str
    _md5s: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    _urls: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_kind(self) -> str:
        """``"2d-1ch"``, ``"2d-3ch"`` or ``"3d-1ch"``."""
        return f"{'3d' if self.is_3d else '2d'}-{self.n_channels}ch"

    @property
    def n_classes(self) -> int:
        """Number of labels in ``INFO["label"]`` (classes, or binary labels for multi-label)."""
        return len(self.labels)

    @property
    def num_outputs(self) -> int:
        """Logits a downstream head needs (ordinal regression: n-1 cumulative logits)."""
        if self.task == "binary-class":
            return 2
        if self.task == "ordinal-regression":
            return self.n_classes - 1
        return self.n_classes

    @property
    def is_multi_label(self) -> bool:
        return self.task.startswith("multi-label")

    def __hash__(self) -> int:  # dict fields are unhashable; the flag identifies a subset
        return hash((self.flag, self.python_class))

    def md5(self, size: int) -> str:
        """Official MD5 of the file for ``size``; :class:`UnsupportedSizeError` otherwise."""
        _check_size(self, size)
        return self._md5s[size]

    def url(self, size: int) -> str:
        """Official download URL of the file for ``size``."""
        _check_size(self, size)
        return self._urls.get(size, "")


def _modality(flag: str, description: str) -> str:
    if flag in _MODALITY:
        return _MODALITY[flag]
    first = description.split(". ")[0].strip().rstrip(".")
    return first[:80]


def _build_registry(info: dict[str, dict[str, Any]]) -> dict[str, DatasetInfo]:
    registry: dict[str, DatasetInfo] = {}
    for flag, raw in info.items():
        md5s: dict[int, str] = {}
        urls: dict[int, str] = {}
        for key, value in raw.items():
            if key == "MD5":
                size = 28
            elif key.startswith("MD5_") and key[4:].isdigit():
                size = int(key[4:])
            else:
                continue
            md5s[size] = str(value)
            urls[size] = str(raw.get("url" if size == 28 else f"url_{size}", ""))
        registry[flag] = DatasetInfo(
            flag=flag,
            python_class=str(raw["python_class"]),
            modality=_modality(flag, str(raw.get("description", ""))),
            task=str(raw["task"]),
            n_channels=int(raw["n_channels"]),
            is_3d=flag.endswith("3d"),
            labels={str(k): str(v) for k, v in raw["label"].items()},
            n_samples={str(k): int(v) for k, v in raw["n_samples"].items()},
            sizes=tuple(sorted(md5s)),
            license=str(raw.get("license", "")),
            _md5s=md5s,
            _urls=urls,
        )
    return registry


REGISTRY: dict[str, DatasetInfo] = _build_registry(medmnist.INFO)


def get_info(flag: str) -> DatasetInfo:
    """Registry entry for ``flag``; :class:`UnknownDatasetError` listing the valid flags."""
    try:
        return REGISTRY[flag]
    except (KeyError, TypeError):
        raise UnknownDatasetError(
            f"unknown MedMNIST dataset {flag!r}; valid flags: {', '.join(REGISTRY)}"
        ) from None


def _check_size(info: DatasetInfo, size: int) -> None:
    if size not in info._md5s:
        sizes = ", ".join(str(s) for s in info.sizes)
        raise UnsupportedSizeError(
            f"{info.flag} has no official size {size!r}; available sizes: {sizes}"
        )


# --------------------------------------------------------------------------- files


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` if given, else ``$MEDMNIST_DATA``, else ``~/.medmnist`` (not created)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_DIR).expanduser()


def file_name(flag: str, size: int = 28) -> str:
    """Official file name: ``breastmnist.npz`` (size 28) or ``adrenalmnist3d_64.npz``."""
    _check_size(get_info(flag), size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


_MD5_CACHE: dict[tuple[str, int, int, int, int], str] = {}
_MD5_LOCK = threading.Lock()


def file_md5(path: str | os.PathLike[str]) -> str:
    """Streaming MD5 of a file, cached in this process by (path, size, mtime, ctime, inode)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _MD5_LOCK:
        cached = _MD5_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.md5()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _MD5_LOCK:
        _MD5_CACHE[key] = digest
    return digest


def verify_file(flag: str, size: int, path: str | os.PathLike[str]) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the official MD5 of ``flag``/``size``."""
    expected = get_info(flag).md5(size)
    try:
        actual = file_md5(path)
    except FileNotFoundError:
        raise MissingFileError(
            f"{path} does not exist; get it with `medfl data --download {flag}@{size}`"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if actual != expected:
        raise ChecksumError(
            f"MD5 mismatch for {path}: expected {expected} (official {file_name(flag, size)}), "
            f"got {actual}; the file is corrupt or modified - delete it and download it again "
            f"(medfl data --download {flag}@{size})"
        )


def _download(info: DatasetInfo, size: int, directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {directory}: {e.strerror or e}") from e
    cls = getattr(medmnist, info.python_class, None)
    if cls is None:
        raise DataError(f"medmnist {medmnist.__version__} has no class {info.python_class}")
    url = info.url(size)
    try:
        cls(split="train", download=True, root=str(directory), size=size)
    except Exception as e:  # medmnist wraps every failure into a multi-line RuntimeError
        raise DataError(
            f"download of {file_name(info.flag, size)} from {url or 'Zenodo'} into {directory} "
            f"failed (offline or URL unreachable: {type(e).__name__}); download it by hand and "
            f"put it there, or point $MEDMNIST_DATA / --data-dir at a folder that has it"
        ) from e


def dataset_path(
    flag: str,
    size: int = 28,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
) -> Path:
    """Path of the official file; download it on request; MD5-check it unless ``verify=False``."""
    info = get_info(flag)
    name = file_name(flag, size)
    directory = resolve_data_dir(data_dir)
    path = directory / name
    if not path.exists():
        if download:
            _download(info, size, directory)
        if not path.exists():
            raise MissingFileError(
                f"{name} not found in {directory} (searched {path}); get it with "
                f"`medfl data --download {flag}@{size}` or set $MEDMNIST_DATA / --data-dir to a "
                f"folder that has it"
            )
    if not path.is_file():
        raise DataError(f"{path} is not a regular file")
    if verify:
        verify_file(flag, size, path)
    return path


# --------------------------------------------------------------------------- tensors


def to_float(x_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (``x / 127.5 - 1``); the one scaling used everywhere."""
    x = torch.from_numpy(np.asarray(x_uint8)) if isinstance(x_uint8, np.ndarray) else x_uint8
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"to_float expects uint8 pixels, got {got}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass(eq=False)
class MedMNISTSplit(Dataset):
    """One split of one subset, in memory as uint8 (channel-first) and int64 labels.

    ``images``: 2D ``(N, C, H, W)``, 3D ``(N, 1, D, H, W)``; ``labels``: ``(N, L)``, L = 1 except
    multi-label. ``ds[i]`` gives ``(float32 image, int64 labels of shape (L,))``.
    """

    flag: str
    split: str
    size: int
    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def info(self) -> DatasetInfo:
        return get_info(self.flag)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(torch.from_numpy(self.images[i]))
        y = torch.from_numpy(np.asarray(self.labels[i], dtype=np.int64))
        return x, y

    def batch(self, idx: np.ndarray | slice | Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised batch: ``(float32 (B, C, ...), int64 (B, L))``."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        x = to_float(torch.from_numpy(np.ascontiguousarray(self.images[idx])))
        y = torch.from_numpy(np.ascontiguousarray(self.labels[idx], dtype=np.int64))
        return x, y

    def subset(self, idx: np.ndarray | slice | Iterable[int]) -> "MedMNISTSplit":
        """A new split holding only ``idx`` (copies for index arrays, views for slices)."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        return MedMNISTSplit(self.flag, self.split, self.size, self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        return (
            f"MedMNISTSplit(flag={self.flag!r}, split={self.split!r}, size={self.size}, "
            f"n={len(self)}, images={tuple(self.images.shape)})"
        )


# --------------------------------------------------------------------------- loading


def _expected_image_shape(info: DatasetInfo, size: int) -> tuple[int, ...]:
    if info.is_3d:
        return (size, size, size)
    return (size, size) if info.n_channels == 1 else (size, size, info.n_channels)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All six arrays of an npz, without pickle; :class:`FormatError` for anything else."""
    keys = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    try:
        obj = np.load(path, allow_pickle=False)
    except (PermissionError, IsADirectoryError) as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:  # numpy falls back to "pickle" for anything it does not recognise
        raise FormatError(
            f"{path} is not an npz archive (pickled data or unknown format; pickle is never loaded)"
        ) from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise FormatError(f"{path} is not a valid npz archive (truncated or corrupt?): {e}") from e
    except Exception as e:  # a hostile file can trip any part of numpy's parser
        raise FormatError(f"{path} cannot be parsed as npz ({type(e).__name__})") from e
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise FormatError(f"{path} holds a single .npy array, not an npz archive")
    with obj as npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise FormatError(
                f"{path} lacks key(s) {', '.join(missing)} (has: {', '.join(npz.files) or 'none'})"
            )
        out: dict[str, np.ndarray] = {}
        for k in keys:
            try:
                out[k] = npz[k]
            except ValueError as e:
                what = ("holds a pickled object array (refused: pickle is never loaded)"
                        if "pickle" in str(e) or "Object arrays" in str(e)
                        else f"is not a valid .npy array ({e})")
                raise FormatError(f"{path}: key {k} {what}") from e
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise FormatError(
                    f"{path}: key {k} cannot be read (truncated or corrupt?): {e}"
                ) from e
            except Exception as e:  # e.g. a corrupt .npy header makes numpy's literal_eval raise SyntaxError
                raise FormatError(f"{path}: key {k} has a corrupt .npy header ({type(e).__name__})") from e
        return out


def _validate(path: Path, info: DatasetInfo, size: int, arrays: dict[str, np.ndarray]) -> None:
    shape = _expected_image_shape(info, size)
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        img, lab = arrays[ik], arrays[lk]
        if img.dtype != np.uint8:
            raise FormatError(f"{path}: key {ik} has dtype {img.dtype}, expected uint8")
        if img.ndim != 1 + len(shape) or tuple(img.shape[1:]) != shape:
            raise FormatError(
                f"{path}: key {ik} has shape {img.shape}, "
                f"expected (N, {', '.join(map(str, shape))}) "
                f"for {info.flag} size {size}"
            )
        if not np.issubdtype(lab.dtype, np.integer):
            raise FormatError(f"{path}: key {lk} has dtype {lab.dtype}, expected uint8")
        n_labels = info.n_classes if info.is_multi_label else 1
        if lab.ndim != 2 or lab.shape[1] != n_labels:
            raise FormatError(f"{path}: key {lk} has shape {lab.shape}, expected (N, {n_labels})")
        if lab.shape[0] != img.shape[0]:
            raise FormatError(
                f"{path}: key {lk} has {lab.shape[0]} labels but {ik} has {img.shape[0]} images"
            )
        if lab.size:
            hi = 2 if info.is_multi_label else info.n_classes
            lo_v, hi_v = int(lab.min()), int(lab.max())
            if lo_v < 0 or hi_v >= hi:
                raise FormatError(
                    f"{path}: key {lk} has values in [{lo_v}, {hi_v}], expected 0..{hi - 1} "
                    f"for {info.task}"
                )


def _to_split(flag: str, split: str, size: int, info: DatasetInfo, img: np.ndarray,
              lab: np.ndarray) -> MedMNISTSplit:
    if info.is_3d or info.n_channels == 1:
        images = img[:, None]  # view, no copy
    else:
        images = np.ascontiguousarray(img.transpose(0, 3, 1, 2))
    return MedMNISTSplit(flag, split, size, images, lab.astype(np.int64))


def load_splits(
    flag: str,
    *,
    size: int = 28,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verify: bool = True,
) -> dict[str, MedMNISTSplit]:
    """All three splits (``train``, ``val``, ``test``), reading the npz once."""
    info = get_info(flag)
    path = dataset_path(flag, size, data_dir, download=download, verify=verify)
    arrays = _read_npz(path)
    _validate(path, info, size, arrays)
    return {
        s: _to_split(flag, s, size, info, arrays[f"{s}_images"], arrays[f"{s}_labels"])
        for s in SPLITS
    }


def load_split(
    flag: str,
    split: str,
    *,
    size: int = 28,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verify: bool = True,
) -> MedMNISTSplit:
    """One split (``train``, ``val`` or ``test``) of ``flag``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return load_splits(flag, size=size, data_dir=data_dir, download=download, verify=verify)[split]


# --------------------------------------------------------------------------- synthetic data


def _blob_masks(n_masks: int, size: int, ndim: int, *, central: bool) -> np.ndarray:
    """``n_masks`` soft blobs (float32, shape (n_masks, size, ..., size)) at distinct places."""
    grid = np.meshgrid(*([np.linspace(-1.0, 1.0, size, dtype=np.float32)] * ndim), indexing="ij")
    masks = np.zeros((n_masks,) + (size,) * ndim, dtype=np.float32)
    for m in range(n_masks):
        if central:  # growing blob at the centre (ordinal)
            centre, radius = [0.0] * ndim, 0.2 + 0.5 * m / max(n_masks - 1, 1)
        else:  # same-size blob on a ring
            a = 2 * np.pi * m / max(n_masks, 1)
            centre = [0.5 * np.cos(a), 0.5 * np.sin(a)] + [0.5 * np.cos(2 * a)] * (ndim - 2)
            radius = 0.3
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        masks[m] = np.exp(-d2 / (2 * (radius / 1.5) ** 2))
    return masks


def _synthetic_split(info: DatasetInfo, size: int, n: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    k = info.n_classes
    ndim = 3 if info.is_3d else 2
    if info.is_multi_label:
        labels = (rng.random((n, k)) < 0.3).astype(np.uint8)
        if n >= 2:  # every label has both values
            labels[0] = 1
            labels[1] = 0
        masks = _blob_masks(k, size, ndim, central=False).reshape(k, -1)
        signal = labels.astype(np.float32) @ masks
    else:
        labels = rng.permutation(np.arange(n) % k).astype(np.uint8).reshape(n, 1)
        if info.task == "binary-class":  # bright blob only for positives
            masks = np.concatenate([np.zeros((1,) + (size,) * ndim, np.float32),
                                    _blob_masks(1, size, ndim, central=True)])
        else:
            masks = _blob_masks(k, size, ndim, central=info.task == "ordinal-regression")
        signal = masks.reshape(k, -1)[labels[:, 0]]
    spatial = (size,) * ndim
    signal = signal.reshape((n,) + spatial)
    noise = rng.normal(60.0, 20.0, size=(n,) + spatial).astype(np.float32)
    img = noise + 150.0 * np.minimum(signal, 1.0)
    if info.n_channels == 3 and not info.is_3d:
        tint = np.array([1.0, 0.8, 0.6], dtype=np.float32)
        img = img[..., None] * tint
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def write_synthetic_npz(
    directory: str | os.PathLike[str],
    flag: str,
    *,
    size: int = 28,
    n_train: int = 64,
    n_val: int = 16,
    n_test: int = 16,
    seed: int = 0,
) -> Path:
    """Write ``<directory>/<file_name(flag, size)>`` in the official format with a learnable signal.

    uint8 images (N, H, W) gray / (N, H, W, 3) RGB / (N, D, H, W) 3D, uint8 labels (N, 1) or
    (N, L) multi-label; a class-dependent blob makes labels learnable. Written atomically. Its MD5
    is not the official one: load it with ``verify=False``.
    """
    info = get_info(flag)
    name = file_name(flag, size)
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _synthetic_split(info, size, n, rng)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, out_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_dir / name


# --------------------------------------------------------------------------- status


def data_status(data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
                ) -> list[dict[str, Any]]:
    """One row per (flag, official size): ``flag, size, file, status, path``.

    ``status`` is ``present`` (MD5 ok, or merely exists with ``verify=False``), ``missing``,
    ``md5-mismatch`` or ``unreadable``.
    """
    directory = resolve_data_dir(data_dir)
    rows: list[dict[str, Any]] = []
    for flag, info in REGISTRY.items():
        for size in info.sizes:
            name = file_name(flag, size)
            path = directory / name
            if not path.exists():
                status = "missing"
            elif not path.is_file():
                status = "unreadable"
            else:
                try:
                    if verify:
                        status = "present" if file_md5(path) == info.md5(size) else "md5-mismatch"
                    else:
                        with open(path, "rb"):
                            status = "present"
                except OSError:
                    status = "unreadable"
            rows.append({"flag": flag, "size": size, "file": name, "status": status,
                         "path": str(path)})
    return rows
