"""MedMNIST files on disk: where they are looked up, their official names and MD5s, offline loading
of the official ``.npz`` (no pickle, every array checked) and a status table of a data folder.

Files are ``<flag>.npz`` (size 28) or ``<flag>_<size>.npz``, looked up in ``--data-dir``, else
``$MEDMNIST_DATA``, else ``~/.medmnist``. Nothing here writes into the data directory except an
explicit download.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

import medmnist
import numpy as np

from medformer.data.registry import (REGISTRY, SPLITS, ChecksumError, DataError, DatasetInfo, FormatError,
                                     MissingFileError, _check_size, get_info)
from medformer.data.splits import MedMNISTSplit

ENV_VAR = "MEDMNIST_DATA"
DEFAULT_DIR = "~/.medmnist"  # medmnist's own default root

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
    if info.imported:
        raise MissingFileError(f"{info.flag} is a site's imported dataset, not a MedMNIST file: there is nothing to "
                               f"download; its card and npz come from `medfl data import`")
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
        if not path.exists() and info.imported:
            raise MissingFileError(
                f"{name} not found in {directory} (searched {path}); {flag} is a site's imported dataset "
                f"(`medfl data import`): point --data-dir at the folder that holds it and its card"
            )
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
            if size not in info._md5s:  # an imported dataset known only by its public description
                continue
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
