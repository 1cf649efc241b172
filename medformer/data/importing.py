"""``medfl data import``: a site's own images as a MedMNIST-style dataset (official-format npz + card).

Reads a folder of PNG/JPEG images (2D, gray or RGB), NIfTI volumes or DICOM series (3D, one folder
of slices per volume) named by a ``labels.csv``, with the field's own library: MONAI's ``LoadImage``
(``PILReader``, ``NibabelReader``, ``PydicomReader``) and its transforms, preprocessed like MedMNIST:

* 2D: centre crop to a square, resize to ``size`` x ``size`` (bilinear, anti-aliased); 8-bit images
  keep their values, others are then scaled min-max to 0..255 per image.
* 3D: reoriented to RAS, centre crop to a cube, resize to ``size``^3 (trilinear, anti-aliased), then
  intensities scaled min-max to 0..255 per volume.

The splits come from the file's ``split`` column, or are drawn stratified by class from ``seed``.
Everything is read and checked before anything is written: an unreadable image, mixed shapes, a
label file naming missing images, a class without examples in a split, are one-line
:class:`~medformer.data.DataError` s and nothing is written.

This is the only module that imports MONAI (slow to import, and not needed to train).

``labels.csv`` (a header row, then one row per image)::

    image,label,split          # split optional: train / val / test
    benign/001.png,benign,train
    malignant/007.png,1,test   # a label is a class name or its index
    patient3,malignant,val     # DICOM: a folder of one series' slices

Multi-label tasks list the positive labels of an image separated by ``;`` (empty: none).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medformer.data.cards import (CARD_FORMAT, CARD_VERSION, SIZES_2D, SIZES_3D, TASKS, card_path, check_name,
                                  info_from_card)
from medformer.data.registry import SPLITS, DataError
from medformer.files import write_bytes_atomic, write_text_atomic

with warnings.catch_warnings():  # MONAI announces optional GPU decoders it does not find
    warnings.simplefilter("ignore")
    import monai
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import CenterSpatialCrop, LoadImage, Orientation, Resize, ScaleIntensity

log = logging.getLogger(__name__)

IMAGE_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI = (".nii", ".nii.gz")
DICOM = (".dcm",)
TASK_ALIASES = {"multi-label": "multi-label, binary-class"}
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass(frozen=True, kw_only=True)
class ImportSpec:
    """What to import.

    Args:
        src: folder holding the images (paths in the label file are relative to it).
        name: the new dataset's name (lower-case, not a MedMNIST flag): its files are ``<name>.npz``
            (``<name>_<size>.npz`` above 28 pixels) and ``<name>.dataset.json``.
        task: ``binary-class``, ``multi-class``, ``multi-label`` or ``ordinal-regression``.
        labels: the label file (default ``<src>/labels.csv``).
        size: image side in pixels (2D: 28, 64, 128, 224; 3D: 28, 64).
        out: the data folder to write into.
        classes: label names in order (index = class); default: the labels found, sorted (numbers
            numerically; integer labels 0..max name classes 0..max, so a missing one is an error).
        seed: seeds the stratified split when the label file has no ``split`` column.
        fractions: train / val / test shares of that split.
        modality, license: free text for the card.
    """

    src: Path
    name: str
    task: str
    labels: Path | None = None
    size: int = 28
    out: Path
    classes: tuple[str, ...] | None = None
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    modality: str = ""
    license: str = ""


@dataclass
class _Row:
    line: int
    image: str
    path: Path
    label: str
    split: str | None


# --------------------------------------------------------------------------- the label file


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir() or name.endswith(DICOM):
        return "dicom"
    if name.endswith(NIFTI):
        return "nifti"
    if name.endswith(IMAGE_2D):
        return "2d"
    return None


def read_label_file(spec: ImportSpec) -> list[_Row]:
    """Rows of the label file, each naming an existing image under ``src``."""
    src = spec.src.resolve()
    if not src.is_dir():
        raise DataError(f"{spec.src} is not a folder of images")
    labels = spec.labels if spec.labels is not None else spec.src / "labels.csv"
    try:
        text = Path(labels).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read label file {labels}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DataError(f"label file {labels} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    for needed in ("image", "label"):
        if needed not in columns:
            raise DataError(f"label file {labels} has no {needed!r} column (columns: {', '.join(columns) or 'none'}); "
                            "expected a header row image,label[,split]")
    rows, seen, missing = [], {}, []
    for i, raw in enumerate(reader, start=2):
        raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        image = raw["image"]
        if not image:
            raise DataError(f"label file {labels} line {i}: empty image name")
        if image in seen:
            raise DataError(f"label file {labels} line {i}: image {image!r} is listed twice (also line {seen[image]})")
        seen[image] = i
        path = (src / image).resolve()
        if not path.is_relative_to(src):
            raise DataError(f"label file {labels} line {i}: image {image!r} lies outside {spec.src}")
        if not path.exists():
            missing.append(image)
            continue
        split = raw.get("split") or None
        if "split" in columns and split not in SPLITS:
            raise DataError(f"label file {labels} line {i}: split {split or ''!r} is not one of train, val, test")
        rows.append(_Row(i, image, path, raw["label"], split))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"label file {labels} names image(s) not in {spec.src}: {missing[0]!r}{more}")
    if not rows:
        raise DataError(f"label file {labels} lists no images")
    return rows


def _is_int(text: str) -> bool:
    return text.isdigit()


def class_names(rows: list[_Row], spec: ImportSpec) -> list[str]:
    """The label names, in class order (see :class:`ImportSpec`)."""
    multi = spec.task.startswith("multi-label")
    found = sorted({v.strip() for r in rows for v in (r.label.split(";") if multi else [r.label]) if v.strip()})
    if spec.classes is not None:
        names = list(spec.classes)
        if len(set(names)) != len(names) or any(not n for n in names):
            raise DataError(f"--classes {','.join(names)}: names must be distinct and non-empty")
    elif found and all(_is_int(v) for v in found):
        names = [str(k) for k in range(max(int(v) for v in found) + 1)]
    else:
        names = found
    if spec.task == "binary-class" and len(names) != 2:
        raise DataError(f"a binary-class task needs exactly 2 classes, the labels give {len(names)}: {', '.join(names)}")
    if len(names) < 2:
        raise DataError(f"a {spec.task} task needs at least 2 classes, the labels give {len(names)}: {', '.join(names)}")
    return names


def encode_labels(rows: list[_Row], names: list[str], task: str, labels_file: str) -> np.ndarray:
    """uint8 labels, ``(N, 1)`` (class index) or ``(N, L)`` (multi-label 0/1)."""
    index = {n: k for k, n in enumerate(names)}

    def one(r: _Row, v: str) -> int:
        v = v.strip()
        if v in index:
            return index[v]
        if _is_int(v) and int(v) < len(names):
            return int(v)
        raise DataError(f"label file {labels_file} line {r.line}: label {v!r} is not one of the classes "
                        f"{', '.join(names)}")

    if task.startswith("multi-label"):
        y = np.zeros((len(rows), len(names)), dtype=np.uint8)
        for i, r in enumerate(rows):
            for v in r.label.split(";"):
                if v.strip():
                    y[i, one(r, v)] = 1
        return y
    for r in rows:
        if not r.label:
            raise DataError(f"label file {labels_file} line {r.line}: image {r.image!r} has no label")
    return np.array([[one(r, r.label)] for r in rows], dtype=np.uint8)


# --------------------------------------------------------------------------- splits


def stratified_splits(y: np.ndarray, task: str, *, seed: int, fractions: tuple[float, float, float],
                      names: list[str]) -> np.ndarray:
    """A split name per row: per class, its shares of val and test (at least one each), rest train."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=object)
    if task.startswith("multi-label"):  # no exact stratification: the first of 100 seeded draws that works
        for _ in range(100):
            order = rng.permutation(len(y))
            n_val = max(1, round(fractions[1] * len(y)))
            n_test = max(1, round(fractions[2] * len(y)))
            out[order[:n_val]], out[order[n_val:n_val + n_test]], out[order[n_val + n_test:]] = "val", "test", "train"
            if _split_problem(y, out, task, names) is None:
                return out
        raise DataError("no random split gives every label a positive and a negative example in train, val and "
                        "test; give the splits in the label file's split column")
    for k, name in enumerate(names):
        idx = np.flatnonzero(y[:, 0] == k)
        if 0 < len(idx) < 3:
            raise DataError(f"class {name!r} has {len(idx)} example(s); a split needs at least 3 (one each for "
                            "train, val and test), or give the splits in the label file's split column")
        idx = rng.permutation(idx)
        n_val, n_test = (max(1, math.floor(f * len(idx) + 0.5)) for f in fractions[1:])
        while n_val + n_test > len(idx) - 1:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        out[idx[:n_val]], out[idx[n_val:n_val + n_test]], out[idx[n_val + n_test:]] = "val", "test", "train"
    return out


def _split_problem(y: np.ndarray, splits: np.ndarray, task: str, names: list[str]) -> str | None:
    """Why these splits cannot be scored with the official metrics, or None."""
    for split in SPLITS:
        part = y[splits == split]
        if not len(part):
            return f"the {split} split has no image"
        if task.startswith("multi-label"):
            for k, name in enumerate(names):
                if part[:, k].min() == part[:, k].max():
                    value = "positive" if part[0, k] else "negative"
                    return f"label {name!r} is {value} for every image of the {split} split (it needs both)"
        else:
            absent = [names[k] for k in range(len(names)) if not np.any(part[:, 0] == k)]
            if absent:
                return f"class {absent[0]!r} has no example in the {split} split"
    return None


# --------------------------------------------------------------------------- images


def _to_gray_or_rgb(image):
    """PIL modes to L (gray, also 16-bit I/F kept) or RGB: alpha and palettes dropped."""
    if image.mode in ("L", "RGB", "I", "I;16", "F"):
        return image
    return image.convert("L" if image.mode in ("LA", "1") else "RGB")


def _loader(kind: str) -> LoadImage:
    reader = {"2d": PILReader(reverse_indexing=False, converter=_to_gray_or_rgb), "nifti": NibabelReader(),
              "dicom": PydicomReader()}[kind]
    return LoadImage(image_only=True, ensure_channel_first=True, reader=reader)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def preprocess(image: torch.Tensor, *, ndim: int, size: int) -> np.ndarray:
    """MONAI image ``[C, *S]`` -> uint8 ``[C, size, ...]``: (3D: RAS) centre crop, resize, (min-max) 0..255."""
    image = image.float()
    eight_bit = bool(image.min() >= 0 and image.max() <= 255 and torch.equal(image, image.round()))
    if ndim == 3:
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    side = min(image.shape[1:])
    image = CenterSpatialCrop(roi_size=[side] * ndim)(image)
    image = Resize(spatial_size=[size] * ndim, mode="bilinear" if ndim == 2 else "trilinear",
                   anti_aliasing=True)(image)
    if ndim == 3 or not eight_bit:
        image = ScaleIntensity(minv=0.0, maxv=255.0)(image)
    return torch.as_tensor(image).clamp(0, 255).round().to(torch.uint8).numpy()


def read_images(rows: list[_Row], size: int, *, progress: bool = True) -> tuple[np.ndarray, str, int]:
    """All images, preprocessed: uint8 ``(N, H, W)``, ``(N, H, W, 3)`` or ``(N, D, H, W)``; kind; channels."""
    kinds = {r.image: _kind(r.path) for r in rows}
    bad = next((img for img, k in kinds.items() if k is None), None)
    if bad is not None:
        raise DataError(f"{bad}: not an image this importer reads (2D: {', '.join(IMAGE_2D)}; 3D: "
                        f"{', '.join(NIFTI)}, or a folder of one DICOM series' .dcm slices)")
    dims = {k: ("2D" if k == "2d" else "3D") for k in set(kinds.values())}
    if len(set(dims.values())) > 1:
        first2d = next(i for i, k in kinds.items() if k == "2d")
        first3d = next(i for i, k in kinds.items() if k != "2d")
        raise DataError(f"mixed shapes: {first2d} is a 2D image but {first3d} a 3D volume; import them as two datasets")
    ndim = 2 if "2d" in kinds.values() else 3
    allowed = SIZES_2D if ndim == 2 else SIZES_3D
    if size not in allowed:
        raise DataError(f"--size {size} is not available for {ndim}D images; choose from {', '.join(map(str, allowed))}")
    with warnings.catch_warnings():  # PydicomReader announces GPU decoders it does not find
        warnings.simplefilter("ignore")
        loaders = {k: _loader(k) for k in set(kinds.values())}
    out, channels, first = [], None, None
    bar = _bar(len(rows), progress)
    try:
        for r in rows:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = loaders[kinds[r.image]](str(r.path))
            except Exception as e:  # each reader fails its own way (PIL, nibabel, pydicom)
                raise DataError(f"cannot read image {r.path}: {_short(e)}") from None
            spatial = tuple(image.shape[1:])
            if len(spatial) != ndim or min(spatial) < 1:
                raise DataError(f"mixed shapes: {r.image} has shape {tuple(image.shape)} (channels first), "
                                f"not a {ndim}D {'image' if ndim == 2 else 'volume'}")
            c = int(image.shape[0])
            if c not in ((1, 3) if ndim == 2 else (1,)):
                need = "2D images need 1 (gray) or 3 (RGB)" if ndim == 2 else "3D volumes need 1"
                raise DataError(f"{r.image} has {c} channels; {need}")
            if channels is None:
                channels, first = c, r.image
            elif c != channels:
                raise DataError(f"mixed shapes: {first} has {channels} channel(s) but {r.image} has {c}; "
                                "convert them to one kind (gray or RGB) first")
            out.append(preprocess(image, ndim=ndim, size=size))
            bar.update(1)
    finally:
        bar.close()
    images = np.stack(out)                           # [N, C, *S]
    images = images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), ("2d" if ndim == 2 else sorted(set(kinds.values()))[0]), channels


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="reading images", unit="image", disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------- the whole import


def _library_versions() -> str:
    try:
        own = version("medformer-fl")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without an install
        own = "source"
    return f"medformer-fl {own}, monai {monai.__version__}"


def import_dataset(spec: ImportSpec, *, progress: bool = True) -> dict[str, Any]:
    """Read, check and write a dataset (npz, card JSON, card Markdown); returns the card.

    Raises:
        DataError: bad input, with nothing written.
    """
    t0 = time.monotonic()
    name = check_name(spec.name)
    task = TASK_ALIASES.get(spec.task, spec.task)
    if task not in TASKS:
        raise DataError(f"--task {spec.task!r} is not one of binary-class, multi-class, multi-label, ordinal-regression")
    if len(spec.fractions) != 3 or any(f < 0 for f in spec.fractions) or not math.isclose(sum(spec.fractions), 1.0):
        raise DataError(f"split fractions {spec.fractions} must be three shares >= 0 that sum to 1")
    spec = ImportSpec(**{**spec.__dict__, "task": task})
    npz_name = f"{name}.npz" if spec.size == 28 else f"{name}_{spec.size}.npz"
    out = Path(spec.out)
    for existing in (card_path(out, name), out / npz_name):
        if existing.exists():
            raise DataError(f"{existing} exists: {out} already holds a dataset {name!r}; choose another --name or --out")
    labels_file = str(spec.labels if spec.labels is not None else spec.src / "labels.csv")
    rows = read_label_file(spec)
    names = class_names(rows, spec)
    y = encode_labels(rows, names, task, labels_file)
    if not task.startswith("multi-label"):
        absent = [names[k] for k in range(len(names)) if not np.any(y[:, 0] == k)]
        if absent:
            raise DataError(f"class {absent[0]!r} has no example in {labels_file}")
    given = [r.split for r in rows]
    if any(given) and not all(given):
        line = next(r.line for r in rows if not r.split)
        raise DataError(f"label file {labels_file} line {line}: no split, while other rows have one; give all or none")
    if all(given):
        splits = np.array(given, dtype=object)
        how = "given in the label file"
    else:
        splits = stratified_splits(y, task, seed=spec.seed, fractions=spec.fractions, names=names)
        how = (f"stratified by class, seed {spec.seed}, fractions "
               f"{'/'.join(f'{f:g}' for f in spec.fractions)} (train/val/test)")
    problem = _split_problem(y, splits, task, names)
    if problem is not None:
        raise DataError(f"{problem}; the official AUC needs every class in every split")
    images, kind, channels = read_images(rows, spec.size, progress=progress)

    arrays = {}
    for split in SPLITS:
        keep = splits == split
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], y[keep]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    unlisted = _unlisted(spec.src, rows)
    card = {
        "format": CARD_FORMAT, "version": CARD_VERSION, "name": name, "task": task,
        "labels": {str(k): n for k, n in enumerate(names)}, "n_channels": channels, "is_3d": kind != "2d",
        "sizes": [spec.size], "modality": spec.modality, "license": spec.license or "the site's own data",
        "n_samples": {s: int((splits == s).sum()) for s in SPLITS},
        "files": {str(spec.size): {"file": npz_name, "md5": hashlib.md5(data).hexdigest(),
                                   "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "source": {"kind": kind, "images": len(rows), "labels_file": Path(labels_file).name,
                   "labels_sha256": hashlib.sha256(Path(labels_file).read_bytes()).hexdigest(),
                   "split": how, "unlisted_files_left_out": unlisted},
        "preprocessing": _preprocessing(kind, spec.size),
        "created_by": f"medfl data import ({_library_versions()})",
    }
    info_from_card(card, f"the card of {name}")  # the card reads back as it will be read
    # --- everything read and checked: from here on we write (the JSON card last: it makes the dataset) ---
    write_bytes_atomic(out / npz_name, data)
    write_text_atomic(out / f"{name}.dataset.md", render_card(card))
    write_text_atomic(card_path(out, name), json.dumps(card, indent=2) + "\n")
    log.info("imported %s: %d images (%s) in %.1f s", name, len(rows), ", ".join(f"{s} {card['n_samples'][s]}"
                                                                                  for s in SPLITS), time.monotonic() - t0)
    return card


def _unlisted(src: Path, rows: list[_Row]) -> int:
    listed = {r.path for r in rows}
    count = 0
    for p in Path(src).rglob("*"):
        if p.is_file() and p.name.lower().endswith(IMAGE_2D + NIFTI + DICOM) and p.resolve() not in listed \
                and not any(p.resolve().is_relative_to(d) for d in listed if d.is_dir()):
            count += 1
    if count:
        log.warning("%d image file(s) in %s are not in the label file: left out", count, src)
    return count


def _preprocessing(kind: str, size: int) -> str:
    if kind == "2d":
        return (f"MONAI: LoadImage (PILReader), centre crop to a square, Resize to {size}x{size} (bilinear, "
                "anti-aliased); 8-bit images keep their values, others then min-max scaled to 0..255 per image")
    return (f"MONAI: LoadImage ({'NibabelReader' if kind == 'nifti' else 'PydicomReader'}), Orientation RAS, "
            f"centre crop to a cube, Resize to {size}^3 (trilinear, anti-aliased), then min-max scaled to 0..255 per volume")


def render_card(card: dict[str, Any]) -> str:
    """The dataset card for people (Markdown)."""
    f = next(iter(card["files"].values()))
    lines = [f"# Dataset card: {card['name']}", "",
             f"Imported with `medfl data import`; use it as `--dataset {card['name']}` (or in a scenario's "
             f"`hospitals`) with `--data-dir` this folder.", "",
             "| field | value |", "|---|---|",
             f"| task | {card['task']} |",
             f"| labels | {', '.join(f'{k}: {v}' for k, v in card['labels'].items())} |",
             f"| images | {'3D volumes' if card['is_3d'] else '2D images'}, {card['n_channels']} channel(s), "
             f"{card['sizes'][0]} pixels per side |",
             "| splits | " + ", ".join(f"{s} {n}" for s, n in card["n_samples"].items()) + " |",
             f"| split | {card['source']['split']} |",
             f"| source | {card['source']['images']} {card['source']['kind']} image(s), labels from "
             f"{card['source']['labels_file']} |",
             f"| preprocessing | {card['preprocessing']} |",
             f"| file | {f['file']} ({f['bytes']} bytes), MD5 {f['md5']}, SHA-256 {f['sha256']} |",
             f"| modality | {card['modality'] or '-'} |", f"| license | {card['license']} |",
             f"| created by | {card['created_by']} |", ""]
    return "\n".join(lines)
